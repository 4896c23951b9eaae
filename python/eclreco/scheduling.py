"""CPU scheduling of the light roles of a farm node: distributor, collector, DAQ emulator.

They wake up thousands of times a second for a little work each (a read/dispatch cycle, a batch of
results, a burst of events). Under the default policy every wake-up preempts a worker in the middle
of its batch and takes its caches. Under Linux's SCHED_BATCH a waking thread does not preempt the
running one; it runs at the next scheduling point instead (their share of the CPU is unchanged).
What it bought on the 2-core reference machine: docs/deployment.md, "Scheduling".
apply() sets the threads the process has (numpy's OpenBLAS threads, started at its import) and the
calling thread; threads inherit the policy of the thread that creates them, and apply() runs before the
role starts its ZeroMQ context and its metrics server, so their threads run under it too.
"""
from __future__ import annotations

import argparse
import os

POLICIES = ("batch", "normal")


def add_scheduling_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sched", choices=POLICIES, default="batch",
                   help="CPU scheduling policy of this light role (Linux): 'batch' (SCHED_BATCH: its wake-ups do "
                        "not preempt the workers) or 'normal'")


def apply(policy: str, role: str) -> str:
    """Puts the calling thread (and the threads it starts afterwards) under `policy`; returns the policy
    in effect. Where the system has no SCHED_BATCH or refuses it, says so in one line and goes on
    under the normal policy."""
    if policy not in POLICIES:
        raise ValueError(f"scheduling policy {policy!r} is not one of {', '.join(POLICIES)}")
    if policy == "normal":
        return "normal"
    if not hasattr(os, "SCHED_BATCH"):
        print(f"[{role}] SCHED_BATCH is not available on this system; running under the normal policy", flush=True)
        return "normal"
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as err:
        print(f"[{role}] could not switch to SCHED_BATCH ({err}); running under the normal policy", flush=True)
        return "normal"
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: the calling thread only
        tids = []
    for tid in tids:
        try:
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        except OSError:  # a thread that ended meanwhile
            pass
    return "batch"
