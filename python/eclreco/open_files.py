"""The open-files limit of a process that accepts connections (the HLT distributor and collector,
reco.py's ZeroMQ input). At the limit libzmq cannot accept a connection, retries at once and spins a
core without a word, and no new worker or sender gets in until descriptors are freed (`ulimit -n 64`
and 100 connections to a distributor: 80 % of a core, nothing printed). The soft limit is often far
below the hard one (1024 against 524288 under systemd); raising it needs no privilege."""
from __future__ import annotations

import resource

WANTED = 65536  # descriptors: thousands of workers and senders, with room to spare
LOW = 1024      # below this a farm of a few hundred connections can meet the limit


def raise_soft_limit(role: str, wanted: int = WANTED, low: int = LOW) -> int:
    """Raises this process's soft RLIMIT_NOFILE towards min(hard, wanted) (never lowers it) and says so in
    one line when it stays below `low`; returns the soft limit in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    target = wanted if hard == inf else min(hard, wanted)
    if soft != inf and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != inf and soft < low:
        print(f"[{role}] warning: this process may open only {soft} files (ulimit -n; hard limit "
              f"{'unlimited' if hard == inf else hard}): each connection takes one, and at the limit no new "
              f"connection is accepted; raise it (ulimit -n, systemd LimitNOFILE=)", flush=True)
    return soft
