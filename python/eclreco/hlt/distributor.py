"""The distributor: input (PULL) -> workers (ROUTER, credit-based) and run control (ROUTER).

It numbers every event it reads (a sequence id), hands events to workers only as far as they
have announced credit, and keeps each event until the collector confirms it (CONFIRM: the
latency ends there) and, for a collector that buffers its output, until it says the event is in
the file (SAVED); a replacement collector gets the confirmed but unsaved events again. A worker that says
BYE or misses heartbeats for `heartbeat_timeout_s` loses its unconfirmed events to the others.
When no worker has credit and `queue_size` events wait, it stops reading its input (the sender
blocks on its high-water mark) or, with `drop_when_busy`, reads and drops (counted).
"""
from __future__ import annotations

import collections
import math
import numbers
import os
import signal
import socket
import sys
import threading
import time

import numpy as np
import zmq

from eclreco import open_files, scheduling
from eclreco.cli_types import metrics_host_unused
from eclreco.curve import Curve, curve_option_error
from eclreco.paths import output_file_error
from eclreco.hlt import protocol as P
from eclreco.hlt.cli import STOP_DRAIN_MAX_S
from eclreco.hlt.control import output_line, summary_line
from eclreco.log_lines import whole_lines
from eclreco.quarantine import RecordWriter
from eclreco.rawdata import envelope_ids
from eclreco.raw_sockets import (ConnectionMonitor, as_sent, attach, check_message_limits, check_queue_bound, end_input,
                                 queue_hwm, recv_message)

# Latency histogram: log-spaced bounds from 10 us to 100 s (percentiles), and the Prometheus buckets,
# counted apart: the grid holds 1e-x but not 3e-x (a bucket read off it counted up to 2.82e-x only).
# 20 ms is the farm's p99 target (docs/performance.md).
LATENCY_BOUNDS = np.logspace(-5, 2, 141)
PROM_LATENCY_BUCKETS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 2e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]

# the quarantine records of the messages read at terminate and not processed (count_unread_input)
UNREAD_REASON = "unread_at_terminate"
# the standalone distributor's quarantine file of them (its working directory; {pid}: one per process)
DEFAULT_UNREAD_FILE = "distributor_unread_{pid}.msgpack"


class Worker:
    def __init__(self, ident: bytes, info: dict, now: float):
        self.ident = ident
        self.info = info
        self.credit = int(info.get("credit", 0))
        if not 0 <= self.credit <= 1 << 30:
            raise ValueError(f"credit {self.credit}")
        self.assigned: set[int] = set()
        self.last_seen = now
        self.status: dict = {}
        self.sent = 0
        # its heartbeats say "blocked" (its results wait for the collector): since when, and when one of its
        # events was last confirmed or the collector last silent (its wait is then the collector's, not its own)
        self.blocked_since: float | None = None
        self.progress = now
        # told END_RUN: its credit was of the run that ended, and its READY for the next run says the new one
        # (events sent on the old credit before that READY came were taken back by it, and processed twice)
        self.ended = False

    def end_run(self):
        self.credit = 0
        self.ended = True


def _frame(frames, i: int) -> bytes:
    if len(frames) <= i:
        raise ValueError(f"frame {i} missing")
    return frames[i]


def _map(frames, i: int) -> dict:
    """The MessagePack map in frame i (ValueError for anything else)."""
    obj = P.unpack(_frame(frames, i))
    if not isinstance(obj, dict):
        raise ValueError(f"frame {i} is not a map")
    return obj


def _dqm_parts(value) -> list[tuple[int, int, int]]:
    """RUN_ENDED's dqm_parts, [exp, run, parts] each; an entry that is not one is left out (a report is counted
    as it comes: one malformed entry must not lose the rest)."""
    out = []
    for item in value if isinstance(value, list) else ():
        if isinstance(item, list) and len(item) == 3 and all(isinstance(x, int) for x in item):
            out.append((item[0], item[1], item[2]))
    return out


class LatencyHistogram:
    def __init__(self):
        self.counts = np.zeros(len(LATENCY_BOUNDS) + 1, dtype=np.int64)
        self.prom_bounds = np.asarray(PROM_LATENCY_BUCKETS, dtype=float)
        self.prom_counts = np.zeros(len(self.prom_bounds) + 1, dtype=np.int64)  # bin i: (bound[i-1], bound[i]]
        self.total = 0.0
        self.n = 0
        # the exporter's thread reads what the distributor's adds: one state per scrape (buckets, count, sum)
        self._lock = threading.Lock()

    def add(self, values: np.ndarray):
        if len(values):
            counts = np.bincount(np.searchsorted(LATENCY_BOUNDS, values), minlength=len(self.counts))
            prom = np.bincount(np.searchsorted(self.prom_bounds, values), minlength=len(self.prom_counts))
            total = float(values.sum())
            with self._lock:
                self.counts += counts
                self.prom_counts += prom
                self.total += total
                self.n += len(values)

    def quantile(self, q: float) -> float:
        if self.n == 0:
            return float("nan")
        k = int(np.searchsorted(np.cumsum(self.counts), q * self.n))
        return float(LATENCY_BOUNDS[min(k, len(LATENCY_BOUNDS) - 1)])  # upper bound of the bin

    def buckets(self):
        """(cumulative Prometheus buckets, sum) of one state: le=B counts every latency <= B."""
        with self._lock:
            cum, n, total = np.cumsum(self.prom_counts), self.n, self.total
        return [(repr(float(b)), int(c)) for b, c in zip(self.prom_bounds, cum)] + [("+Inf", n)], total


# The bounds of `eclreco hlt distributor`'s options (cli.py's argparse types), for a Distributor built
# in Python: chunk=0 never dispatched and its stop hung, a NaN heartbeat timeout never lost a worker.
_MIN_INT = {"queue_size": 1, "max_held": 1, "chunk": 1, "input_hwm": 0, "max_queue_bytes": 0, "max_held_bytes": 0,
            "keep_unread_bytes": 0}
_POSITIVE_SECONDS = ("heartbeat_timeout_s",)


def _check_settings(**values) -> None:
    for name, value in values.items():
        if name in _MIN_INT:
            lo = _MIN_INT[name]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
                raise ValueError(f"Distributor: {name} must be an int >= {lo}, not {value!r}")
        elif (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
              or value < 0 or (name in _POSITIVE_SECONDS and value == 0)):
            rule = "> 0" if name in _POSITIVE_SECONDS else ">= 0"
            raise ValueError(f"Distributor: {name} must be a finite number {rule}, not {value!r}")


class Distributor:
    def __init__(self, input_addr: str, workers_addr: str, control_addr: str, queue_size: int = 4000,
                 max_held: int = 20000, chunk: int = 256, heartbeat_timeout_s: float = 5.0,
                 drop_when_busy: bool = False, input_hwm: int = 1000, stop_drain_s: float = 0.5,
                 stop_timeout_s: float = 120.0, input_bind: bool = True, curve=None,
                 stop_drain_max_s: float = STOP_DRAIN_MAX_S,
                 max_message_bytes: int = 0, refuse_message_bytes: int = 0, cycle_s: float = 5e-4,
                 max_queue_bytes: int = 0, max_held_bytes: int = 0, unread_file: str = "",
                 keep_unread_bytes: int = 1 << 30):
        """unread_file: the quarantine file of the messages read at terminate and not processed (reason
        unread_at_terminate; '': none kept), at most keep_unread_bytes of them (0: no bound; count_unread_input)."""
        check_message_limits("distributor", max_message_bytes, refuse_message_bytes)
        _check_settings(queue_size=queue_size, max_held=max_held, chunk=chunk, input_hwm=input_hwm,
                        max_queue_bytes=max_queue_bytes, max_held_bytes=max_held_bytes,
                        keep_unread_bytes=keep_unread_bytes,
                        heartbeat_timeout_s=heartbeat_timeout_s, stop_drain_s=stop_drain_s,
                        stop_drain_max_s=stop_drain_max_s, stop_timeout_s=stop_timeout_s, cycle_s=cycle_s)
        check_queue_bound("distributor", max_queue_bytes, refuse_message_bytes)
        self.max_message_bytes = max_message_bytes
        self.ctx = zmq.Context.instance()
        self.inp = self.ctx.socket(zmq.PULL)
        # a connection's queue bounded in bytes as ZMQInput's (docs/deployment.md): input_hwm messages of up to
        # refuse_message_bytes were 64 GiB per sender at the command line's defaults
        self.inp.setsockopt(zmq.RCVHWM, queue_hwm(input_hwm, max_queue_bytes, refuse_message_bytes))
        self.inp.setsockopt(zmq.LINGER, 0)
        if refuse_message_bytes > 0:
            self.inp.setsockopt(zmq.MAXMSGSIZE, refuse_message_bytes)
        if curve is not None:  # optional CURVE (eclreco.curve): servers on bound sockets
            curve.apply(self.inp, input_bind, "daq")
        # messages refused by the socket (ZMQ_MAXMSGSIZE) are only seen as disconnects: counted, not silent
        # ipc:// connections held: events libzmq drops unread with one are counted (lost_bytes, raw_sockets)
        # tcp:// connections tracked: the terminate ends them before it closes the input (count_unread_input)
        self.input_monitor = ConnectionMonitor(self.inp, hold_ipc=True, track_tcp=True)
        attach(self.inp, input_addr, bind=input_bind, what="--input")
        self.input_addr, self.input_bind = input_addr, input_bind
        self.wrk = self.ctx.socket(zmq.ROUTER)
        self.wrk.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.wrk.setsockopt(zmq.SNDHWM, 0)  # bounded by credit instead
        self.wrk.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.server(self.wrk)
        attach(self.wrk, workers_addr, bind=True, what="--workers-addr")
        self.ctl = self.ctx.socket(zmq.ROUTER)
        self.ctl.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.ctl.setsockopt(zmq.LINGER, 1000)
        if curve is not None:
            curve.server(self.ctl)
        attach(self.ctl, control_addr, bind=True, what="--control")
        self.addresses = {"input": self.inp.getsockopt_string(zmq.LAST_ENDPOINT),
                          "workers": self.wrk.getsockopt_string(zmq.LAST_ENDPOINT),
                          "control": self.ctl.getsockopt_string(zmq.LAST_ENDPOINT)}
        self.queue_size, self.max_held, self.chunk = queue_size, max_held, chunk
        # held in bytes too (0: no bound): max_held events of up to refuse_message_bytes were 1.25 TiB
        self.max_held_bytes = max_held_bytes
        self.held_bytes = 0  # of the envelopes in events and unsaved
        self.heartbeat_timeout_s, self.drop_when_busy = heartbeat_timeout_s, drop_when_busy
        # a collector's closed connection is its death only once it has not been heard from for this long: a live one
        # whose connection broke registers again within it (collector_lost)
        self.reconnect_grace_s = min(heartbeat_timeout_s, P.COLLECTOR_REPORT_S * P.COLLECTOR_RECONNECT_REPORTS)
        self.stop_drain_s, self.stop_timeout_s = stop_drain_s, stop_timeout_s
        # a stop's drain under a source that never pauses; within half the time-out, which is the events' too
        self.stop_drain_max_s = min(stop_drain_max_s, stop_timeout_s / 2)
        self.drain_cut_said = False
        self.cycle_s = cycle_s
        self.unread = RecordWriter(unread_file, keep_unread_bytes)

        self.events: dict[int, list] = {}          # seq -> [envelope, t_received, worker ident or None]
        self.unsaved: dict[int, bytes] = {}        # seq -> envelope: confirmed, not yet in the output file
        self.pending: collections.deque[int] = collections.deque()  # seqs waiting for a worker
        # Sequence ids start at the start time in µs: a restarted distributor continues above every
        # id of its predecessor (unless that one took more than an event per µs), so a collector
        # that outlived it does not take the new events for ones it has already written.
        self.next_seq = time.time_ns() // 1000
        # Who this process is, in its answer to a collector's HELLO: a collector whose connection broke registers again
        # with this one (a LOW moved on, no handover), one that outlived a predecessor with another token
        self.instance = os.urandom(8).hex()
        self.lost_before_run = 0
        self.workers: dict[bytes, Worker] = {}
        self.collector: dict | None = None          # {"ident", "last_seen", "status"}
        self.supervisors: dict[bytes, dict] = {}
        self.state = "running"
        self.run_index = 1
        self.stop_requesters: list[bytes] = []
        self.stop_since = 0.0
        self.last_input = 0.0
        self.terminating = False
        self.terminate_since = 0.0
        self.terminate_farm = False  # at terminate: also tell the workers and the collector to exit
        self.lost_last_run = 0
        self.terminate_requester: bytes | None = None
        self.c = collections.Counter()               # counters (see metrics_families)
        self.latency = LatencyHistogram()
        self.t_first_input = None   # of this run
        self.t_last_confirm = None  # of this run
        self.earlier_runs_s = 0.0   # first input to last confirmation, summed over the runs before
        self.workers_restarted = 0
        self.collectors_restarted = 0  # by hlt run's supervisor (its report), as workers_restarted
        self.collector_restarts_failed = 0  # of them, collectors that exited before they made their file
        self.workers_lost = 0
        self.lost_workers: dict[bytes, int] = {}  # ident -> run index in which it was given up on
        self.confirmed_low = 0
        self.reconfirm: set[int] = set()  # confirmed once, produced again for a new collector (collector_replaced)
        # What the collectors reported at the ends of the runs (RUN_ENDED), summed over the farm's
        # life: the file side of the farm, which the confirmations alone do not show.
        self.output = {"runs": 0, "runs_without_events": 0, "received": 0, "events_written": 0, "errors": 0, "errors_in_outputs": 0,
                       "discarded": 0, "rejected": 0, "rejected_by_reason": {}, "first_error": "", "duplicates": 0, "repeated_keys": 0,
                       "orphaned": 0, "orphaned_lost": 0, "received_before": 0, "replaced_collectors": 0, "saved_by_replaced": 0, "replaced_files": [],
                       "left_collectors": 0, "written_by_left": 0, "left_files": [],
                       "failed_collectors": 0, "written_by_failed": 0, "failed_files": [],
                       "unreported_collectors": 0, "saved_by_unreported": 0, "unreported_files": [],
                       # the events of failed stops written after them to a file of their run (its collector's report)
                       "leftovers_collectors": 0, "written_as_leftovers": 0, "leftovers_files": [],
                       # of the files above, those their collector saved no event in (gone before its first write:
                       # no `events` tree), the first 20: the output line says so of them. Each is one entry of a list
                       # above, {files: its key, index: its place in it, output}: by name, another collector's file of
                       # the same name (another host, the same path) was said to hold none too
                       "files_without_events": [],
                       "output_errors": [],
                       # runs whose DQM a collector wrote in several cycles (parts): {run_index, exp, run, parts,
                       # file}, the first 20, and how many
                       "dqm_runs_in_parts": [], "dqm_runs_in_parts_total": 0,
                       # farm runs whose events are in several collectors' files (one replaced, failed or writing
                       # a failed stop's leftovers): {run_index, files, without_dqm, shared_paths}, the first 20;
                       # `eclreco dqm` sums across them (without_dqm: of them, files whose write failed: the DQM open
                       # then is in none; shared_paths, if any: paths of several of them, named HOST:PATH,
                       # run_file_names)
                       "runs_in_several_files": []}
        # farm run index -> {(host, pid, path) of a collector's file holding its events: whether it holds their DQM}
        # (note_run_file). By its collector too: by path, two collectors' files of one path (two hosts, the same -o)
        # were one file, and the run's file count and `eclreco dqm` advice missed one
        self.run_files: dict[int, dict[tuple, bool]] = {}
        # The farm's runs (their indices) whose end a collector reported, and of them those it received events in:
        # a run is counted once, also when several collectors report on it, and a run without events counts too.
        self.reported_runs: set[int] = set()
        self.runs_with_events: set[int] = set()
        self.replaced_run: list[dict] = []  # collectors replaced in this run: their files hold part of it
        # files of a failed stop's leftovers reported since the last stop's reply (which came before them): the next
        # stop's reply names them ({run_index, pid, host, output, events_written})
        self.leftovers_written: list[dict] = []
        self.unregistered: dict[bytes, dict] = {}  # CONFIRM/SAVED/RUN_ENDED held until their sender registers
        # A START came while the events of the run that ended waited for a new collector (its collector's last write
        # failed, or it died at the stop): that run's index. The next collector joins that run for them, and the new
        # run reads no input until they are written (the collector joined the new run and wrote them to its file).
        self.leftovers_waiting: int | None = None
        self.run_started_at = time.monotonic()  # of the run now (its input waits from here for leftovers)

    # ---------------------------------------------------------------- main loop
    def serve(self):
        poller = zmq.Poller()
        poller.register(self.wrk, zmq.POLLIN)
        poller.register(self.ctl, zmq.POLLIN)
        input_registered = False
        next_housekeeping = 0.0
        while True:
            want_input = self.accepting_input()
            if want_input and not input_registered:
                poller.register(self.inp, zmq.POLLIN)
            elif input_registered and not want_input:
                poller.unregister(self.inp)
            input_registered = want_input
            ready = dict(poller.poll(50))
            t_cycle = time.monotonic()
            if self.ctl in ready:
                self.handle_control()
            if self.wrk in ready:
                self.handle_workers()
            if input_registered and self.inp in ready:
                self.read_input()
            self.dispatch()
            now = time.monotonic()
            if ready and self.cycle_s > 0 and now - t_cycle < self.cycle_s:
                # Under load, at most one cycle per cycle_s: what arrives meanwhile is read in one
                # go. Waking per message (30 kHz) costs more CPU than handling the message.
                time.sleep(self.cycle_s - (now - t_cycle))
                now = time.monotonic()
            if now >= next_housekeeping:
                next_housekeeping = now + 0.2
                self.housekeeping(now)
                # a live collector still has to say SAVED for what it holds (it does on END_RUN)
                if self.terminating and self.state == "stopped" and not self.stop_requesters:
                    gone = self.collector_gone(now)  # (once: each call probes the collector's connection)
                    done = gone or (not self.unsaved and self.run_reported(now) and not self.writing_leftovers(now))
                    # one reconnecting (within its grace) is waited for: TERMINATE to its closed connection was
                    # dropped, and it never exited
                    if done and (gone or not self.terminate_farm or self.collector_connected()):
                        self.finish_terminate()
                        return

    def accepting_input(self) -> bool:
        if self.state == "stopped" or (self.state == "stopping" and self.stop_drain_over()):
            return False
        if self.input_waits_for_leftovers() is not None:
            return False  # the next run's events wait until the collector's file of the ended run has its leftovers
        if self.drop_when_busy:
            return True
        return (len(self.pending) < self.queue_size and self.held_events() < self.max_held
                and not self.held_bytes_full())

    def input_waits_for_leftovers(self) -> int | None:
        """The index of the ended run whose leftovers (events its collector could not write: a failed stop) hold the
        input of the next run until a collector has written them (leftovers_waiting: none has registered yet; or the
        registered one writes them, until its report of that run: confirmed is not yet in its file, and the next
        run's events read meanwhile went, with the leftovers, to the file of the ended run when it died before SAVED);
        None when nothing holds it."""
        if self.leftovers_waiting is not None:
            return self.leftovers_waiting
        c = self.collector
        return c.get("leftovers_run") if c is not None else None

    def leftovers_saved_in(self) -> str | None:
        """The file of the collector that writes a failed stop's leftovers once it said SAVED for all of them (none
        held here): the next run's input then waits for its report of their run only, or, when it died before that
        report, for a new collector (the messages said the events were still to be written); None otherwise."""
        c = self.collector
        if self.leftovers_waiting is None and c is not None and c.get("leftovers_run") is not None \
                and not self.held_events():
            return str(c["status"].get("output") or "")
        return None

    def input_wait(self, now: float) -> dict | None:
        """What holds the run's input, for the status and `hlt status` (a wait with no collector lasts until one
        registers: hlt run's restarts spent, a collector service down; only a log line and the START's reply said
        so); None when the input is not held for leftovers."""
        run = self.input_waits_for_leftovers()
        if run is None or self.state == "stopped":
            return None
        return {"leftovers_of": run, "events": self.held_events(),
                "collector_writing": self.leftovers_waiting is None, "saved_in": self.leftovers_saved_in(),
                "waited_s": round(now - self.run_started_at, 3)}

    def held_events(self) -> int:
        """The events held for the next collector, confirmed or not (--max-held bounds them)."""
        return len(self.events) + len(self.unsaved)

    def held_bytes_full(self) -> bool:
        """max_held_bytes reached: the input is read no further (the message that reached it was taken)."""
        return 0 < self.max_held_bytes <= self.held_bytes

    def stop_drain_over(self) -> bool:
        """The stop reads the input until it is quiet for stop_drain_s (a source that sends on: at most
        stop_drain_max_s, said once); a terminate's, stop_drain_s after the terminate, quiet or not: with a live
        source it drained for stop_timeout_s / 2 (60 s) and then counted the unread input for 10 s more. What comes
        after is counted at the exit (count_unread_input)."""
        now = time.monotonic()
        if now - max(self.last_input, self.stop_since) >= self.stop_drain_s or (
                self.terminating and now - self.terminate_since >= self.stop_drain_s):
            return True
        if now - self.stop_since <= self.stop_drain_max_s:
            return False
        if not self.drain_cut_said:
            self.drain_cut_said = True
            print(f"[distributor] run {self.run_index}: the input was never quiet for {self.stop_drain_s:g} s "
                  f"(--stop-drain) within {self.stop_drain_max_s:g} s (--stop-drain-max): it is read no further; "
                  "what the source sends now waits for the next run", flush=True)
        return True

    def read_input(self):
        inp = self.inp
        now = time.monotonic()
        if self.t_first_input is None:
            self.t_first_input = now
        n = nbytes = 0
        max_bytes = self.max_message_bytes
        busy_limit = min(self.queue_size - len(self.pending), self.max_held - len(self.events) - len(self.unsaved))
        try:
            for _ in range(2000):
                if busy_limit <= 0 or self.held_bytes_full():
                    if not self.drop_when_busy:
                        break
                    recv_message(inp)  # dropped: no need to mark it
                    self.c["dropped"] += 1
                    continue
                msg = recv_message(inp, max_bytes=max_bytes)
                seq = self.next_seq
                self.next_seq += 1
                self.events[seq] = [msg, now, None]
                self.pending.append(seq)
                n += 1
                nbytes += len(msg)
                self.held_bytes += len(msg)
                busy_limit -= 1
        except zmq.Again:
            pass
        if n:
            self.last_input = now
        self.c["received"] += n
        self.c["bytes_received"] += nbytes

    def dispatch(self):
        if not self.pending:
            return
        for w in sorted(self.workers.values(), key=lambda w: -w.credit):
            if not self.pending:
                break
            if w.credit <= 0:
                continue
            take = min(w.credit, self.chunk)
            seqs, envs = [], []
            while self.pending and len(seqs) < take:
                seq = self.pending.popleft()
                e = self.events.get(seq)
                if e is None or e[2] is not None:  # confirmed meanwhile / already out again
                    continue
                e[2] = w.ident
                seqs.append(seq)
                envs.append(e[0])
            if not seqs:
                break
            try:
                self.wrk.send_multipart([w.ident, P.EV, P.seqs_to_bytes(seqs), *P.envelope_frames(envs)], copy=False)
            except zmq.ZMQError:  # the worker is gone (ROUTER_MANDATORY)
                for seq in seqs:
                    self.events[seq][2] = None
                self.pending.extendleft(reversed(seqs))
                self.lose_worker(w, "unreachable")
                continue
            w.credit -= len(seqs)
            w.assigned.update(seqs)
            w.sent += len(seqs)
            self.c["dispatched"] += len(seqs)

    def lose_worker(self, w: Worker, why: str):
        if self.workers.pop(w.ident, None) is None:
            return
        back = sorted(s for s in w.assigned if s in self.events)
        for s in back:
            self.events[s][2] = None
        self.pending.extendleft(reversed(back))
        self.c["redelivered"] += len(back)
        if why not in ("bye", "re-registered"):
            self.workers_lost += 1
            self.lost_workers[w.ident] = self.run_index
            while len(self.lost_workers) > 1000:  # bounded: a farm that loses workers for days
                del self.lost_workers[next(iter(self.lost_workers))]
        if why == "re-registered" and not back:
            return
        print(f"[distributor] worker {w.info.get('pid')} left ({why}); {len(back)} unconfirmed events go to "
              f"other workers", flush=True)

    # Messages on the workers and control sockets come from processes of the farm, but a stray
    # peer (or a bug) can send anything: a message that cannot be understood is counted, logged
    # and answered with ERR where a reply is expected; it never takes the distributor down.
    def handle_workers(self):
        now = time.monotonic()
        while True:
            try:
                frames = self.wrk.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._on_worker_message(frames, now)
            except Exception as err:  # noqa: BLE001 - see above
                self._bad_message("workers", frames, err)

    def _on_worker_message(self, frames, now):
        if len(frames) < 2:
            raise ValueError("no command frame")
        ident, cmd = frames[0], frames[1]
        w = self.workers.get(ident)
        if cmd == P.READY:
            new = Worker(ident, _map(frames, 2), now)  # valid before the old registration is dropped
            if w is not None:  # re-registration (a new run): whatever it had is not coming back
                self.lose_worker(w, "re-registered")
            self.workers[ident] = new
            lost_in = self.lost_workers.pop(ident, None)
            if (lost_in is not None and new.info.get("state") == "running"
                    and (self.state == "stopped" or lost_in < self.run_index)):
                # Given up on (hung) in run lost_in, it missed that run's END_RUN: its run would go on
                # into the next one and merge their counts. Its results were redelivered or dropped as
                # duplicates; it ends the run now and registers again for the next.
                self._send(self.wrk, ident, P.END_RUN)
                new.end_run()
                print(f"[distributor] worker {new.info.get('pid')} came back in the middle of run {lost_in}, "
                      "which has ended: told to end it", flush=True)
            return
        if w is None:
            if cmd != P.BYE:
                self._send(self.wrk, ident, P.WHO)
            return
        w.last_seen = now
        if cmd == P.CREDIT:
            n = int(_frame(frames, 2))
            if not 0 <= n <= 1 << 30:
                raise ValueError(f"credit {n}")
            if not w.ended:  # sent before END_RUN reached it: its next READY says its credit
                w.credit += n
        elif cmd == P.HB:
            w.status = _map(frames, 2)
            if w.status.get("state") != "blocked":
                w.blocked_since = None
            elif w.blocked_since is None:
                w.blocked_since = now
        elif cmd == P.BYE:
            self.lose_worker(w, "bye")
        else:
            raise ValueError(f"unknown command {cmd[:32]!r}")

    def handle_control(self):
        now = time.monotonic()
        while True:
            try:
                frames = self.ctl.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._on_control_message(frames, now)
            except Exception as err:  # noqa: BLE001 - see handle_workers
                self._bad_message("control", frames, err)
                if len(frames) >= 2:
                    self._send(self.ctl, frames[0], P.ERR, f"bad message: {err}".encode()[:200])

    def _on_control_message(self, frames, now):
        if len(frames) < 2:
            raise ValueError("no command frame")
        ident, cmd, body = frames[0], frames[1], frames[2:]
        if cmd in (P.CONFIRM, P.SAVED):
            seqs = P.seqs_from_bytes(_frame(frames, 2))
            # SAVED's optional third frame: the events in the collector's file of the run so far
            written = int(frames[3]) if cmd == P.SAVED and len(frames) > 3 else None
            if written is not None and not 0 <= written < 1 << 63:
                raise ValueError(f"SAVED: events written {written}")
            if self.collector is None or self.collector["ident"] != ident:
                # Only the registered collector speaks for the output file. A collector that outlived
                # the previous distributor confirms before its HELLO (the answer to WHO) arrives:
                # kept, and taken if that HELLO registers it (dropped, those events waited for the
                # stop's time-out and were counted lost although they were in the file).
                self._send(self.ctl, ident, P.WHO)
                self.hold_unregistered(ident, cmd, seqs, now, written)
                return
            self.apply_confirmation(cmd, seqs, now, written)
        elif cmd == P.HELLO:
            info = _map(frames, 2)
            if info.get("role") == "collector":
                if self.collector is not None and self.collector["ident"] == ident:
                    self.collector.update(last_seen=now, status=info)
                elif self.collector is not None and self.other_collector_alive(info, now):
                    self.refuse_collector(ident, info)
                    return
                else:
                    old = self.collector
                    same = old is not None and info.get("instance") is not None and \
                        old["status"].get("instance") == info.get("instance")  # reconnected
                    if same:  # what it reported, or has to report, stays
                        carried = {k: old.get(k) for k in ("received_before", "saved", "written", "run_ended",
                                                           "between_runs", "left", "leftovers", "leftovers_run",
                                                           "untold")}
                    else:
                        # One registered in the middle of its run by a distributor that had none (this
                        # one restarted) reports at its end what it received from the previous
                        # distributor too: noted, so that the output line can say so.
                        received = info.get("received", 0) if old is None and info.get("state") == "running" else 0
                        # between_runs: registered while the farm is stopped (or silent at a run's start): it
                        # takes no part in the run, has no report of it to wait for, and its file holds none
                        # of it (it had `run_ended: {}`, which a stop's reply gave as the report of a run whose
                        # collector had died)
                        carried = {"received_before": max(0, int(received or 0)), "saved": 0, "written": None,
                                   "run_ended": None, "between_runs": self.state == "stopped"}
                    if old is not None:  # (after what can fail on a malformed HELLO)
                        self.collector_replaced(same)
                    # the old one wrote the leftovers of a failed stop and died before its report of them: they are
                    # back in the queue (after a START too: it joined the run now, and wrote them to its file)
                    dying = None if same or old is None else old.get("leftovers_run")
                    if not same and ((self.state == "stopped" and self.events) or self.leftovers_waiting is not None
                                     or (dying is not None and self.events)):
                        # Between runs (or after a START that came first), with events of the run that ended to write
                        # again (its collector's last write failed): this one joins that run for them, in a file named
                        # after it, and is told END_RUN once they are confirmed (housekeeping). It joined the next run
                        # and wrote them to that run's file, one of a run that may never start.
                        run = next(r for r in (self.leftovers_waiting, dying, self.run_index) if r is not None)
                        carried.update(leftovers=True, leftovers_run=run, between_runs=False)
                        self.leftovers_waiting = None
                    self.collector = {"ident": ident, "last_seen": now, "status": info, **carried}
                    self.apply_held(ident, now)
                # and the run it joins (between runs: the next, unless it writes the ended run's leftovers), which a
                # new collector's first file is named after; "1": that run has not started, the collector makes its
                # file at its first result (it made an empty one for a run that never started)
                leftovers = self.collector.get("leftovers_run")
                joins = leftovers or self.run_index + (self.state == "stopped")
                self._send(self.ctl, ident, P.LOW, str(self.low_watermark()).encode(), str(joins).encode(),
                           b"1" if self.state == "stopped" and not leftovers else b"0", self.instance.encode())
                for told in self.collector.pop("untold", None) or ():  # (back on a new connection: tell_collector)
                    self.tell_collector(*told)
            else:
                self.add_supervisor(ident, info, now)
        elif cmd == P.STATUS and body:  # a report
            info = _map(frames, 2)
            if info.get("role") == "collector":
                if self.collector is None or self.collector["ident"] != ident:
                    self._send(self.ctl, ident, P.WHO)
                    return
                self.collector.update(last_seen=now, status=info)
                self._send(self.ctl, ident, P.LOW, str(self.low_watermark()).encode())
            else:
                self.add_supervisor(ident, info, now)
        elif cmd == P.STATUS:  # a request
            self._send(self.ctl, ident, P.OK, P.pack(self.status()))
        elif cmd == P.RUN_ENDED:
            info = _map(frames, 2)
            if self.collector is None or self.collector["ident"] != ident:
                # A collector whose control connection broke sends it from its new identity before its HELLO (its
                # DEALER queued it): held as CONFIRM/SAVED, in order with them (dropped, the stop waited 30 s for a
                # report that had come, and replied `timeout: true`)
                self._send(self.ctl, ident, P.WHO)
                self.hold_unregistered(ident, cmd, info, now)
                return
            self.apply_run_ended(info, now)
        elif cmd == P.STOP:
            if self.state == "stopped":
                self._send(self.ctl, ident, P.OK, P.pack({"state": "stopped", "run_index": self.run_index,
                                                          "already": True}))
            else:
                self.begin_stop()
                self.stop_requesters.append(ident)
        elif cmd == P.START:
            already = self.state != "stopped"
            # its last write failed (it exits): no part of the next run (it was listed as a replaced collector of it,
            # its error counted twice), and not alive (the reply said it was)
            failed = self.collector_failed()
            # dead or hung: silent, or its connection closed past the reconnect grace (collector_gone; once: each call
            # probes its connection). Silent alone, one killed 2-5 s before was taken for alive until the heartbeat
            # time-out: no warning, and it was listed as a replaced collector of the new run
            gone = failed or self.collector_gone(now)
            if self.state == "stopped":
                # the throughput counts the runs' own time, not the pauses between them
                self.earlier_runs_s += self.run_seconds()
                self.t_first_input = self.t_last_confirm = None
                c = self.collector
                if (self.events or self.unsaved) and gone and not (
                        c is not None and c.get("leftovers")):
                    self.leftovers_waiting = self.run_index
                    print(f"[distributor] run {self.run_index + 1} reads no input until the next collector has "
                          f"written the {self.held_events()} events of run {self.run_index} that "
                          "its collector did not", flush=True)
                self.run_index += 1
                self.replaced_run = []
                if c is not None:
                    # in this run unless it is gone (dead): a file of its earlier run holds none of this one;
                    # its report of the earlier run is none of this one (kept, it was taken for one, and a collector
                    # replaced in this run was not listed in replaced_collectors)
                    c.update(run_ended=None, between_runs=gone)
                    if c.get("leftovers_run") is None:
                        # (one still without its report of the leftovers keeps what it saved of them: its file is of
                        # that run, counted with 0 events when it died after SAVED and before that report)
                        c.update(saved=0, written=None)
                self.state = "running"
                self.run_started_at = now
                print(f"[distributor] run {self.run_index} started", flush=True)
            waits = self.input_waits_for_leftovers()
            self._send(self.ctl, ident, P.OK, P.pack({"state": self.state, "run_index": self.run_index,
                                                      "collector_alive": not gone,
                                                      "already": already, "leftovers_of": waits,
                                                      "leftovers_saved_in": self.leftovers_saved_in()}))
        elif cmd == P.TERMINATE:
            self.terminate_requester = ident
            self.request_terminate()
        else:  # counted as a bad message, answered with ERR (handle_control)
            raise ValueError(f"unknown command {cmd[:64]!r}")

    def apply_confirmation(self, cmd: bytes, seqs: np.ndarray, now: float, written: int | None = None):
        """CONFIRM or SAVED of the registered collector (written: SAVED's count of the events in its file)."""
        self.collector["between_runs"] = False  # (one silent at the start, back) its file holds part of the run
        if cmd == P.CONFIRM:
            self.confirm(seqs, now)
            self.collector["last_seen"] = now
        else:
            pop = self.unsaved.pop
            saved = 0
            for s in seqs.tolist():
                env = pop(s, None)
                if env is not None:
                    saved += 1
                    self.held_bytes -= len(env)
            self.collector["saved"] += saved
            if written is not None:
                self.collector["written"] = written

    def apply_run_ended(self, info: dict, now: float):
        """RUN_ENDED of the registered collector: its report of a run's end (or of a failed stop's leftovers')."""
        self.collector["last_seen"] = now
        run = self.collector.get("leftovers_run")
        if run is not None and info.get("run_index") == run:  # the leftovers' run, ended by housekeeping
            self.collector["leftovers_run"] = None
            # its write failed before their END_RUN, or at the file's close after it (events not in its file
            # held: they went to the next run's collector, into that run's file): the next one's
            if self.collector.get("leftovers") or (info.get("output_error") and self.held_events()):
                self.collector["left"] = True
                self.leftovers_waiting = run
                self.add_run_report(info, left=True, run_index=run)
                return
            # (after a START it is no report of the run now, also once that run has stopped: the stop's reply
            # gave run N's leftovers as run N+1's report)
            if self.state == "stopped" and run == self.run_index:
                self.collector["run_ended"] = info
            self.add_run_report(info, run_index=run)
            self.note_leftovers_file(info, run)
            return
        self.collector["run_ended"] = info
        # no END_RUN asked for it (the END_RUN goes out as the state becomes stopped): the collector left the
        # run (SIGINT/SIGTERM, also while the run stops), or its write failed before the run's end; the next
        # collector writes the rest. (A report while stopping was taken as the run's: its file named nowhere.)
        left = self.state != "stopped"
        self.collector["left"] = left
        self.add_run_report(info, left=left)

    def hold_unregistered(self, ident: bytes, cmd: bytes, body, now: float, written: int | None = None):
        """Keeps CONFIRM/SAVED (body: their ids) and RUN_ENDED (body: its report) of a process that is not the
        registered collector until its HELLO, which applies them in order (apply_held); housekeeping drops them,
        as bad messages, when none comes within the heartbeat time-out. Bounded: at most 8 such processes and
        max_held entries each (an id, or a report)."""
        held = self.unregistered.get(ident) or {"since": now, "messages": [], "n": 0}
        n = 1 if cmd == P.RUN_ENDED else len(body)
        if (ident not in self.unregistered and len(self.unregistered) >= 8) or held["n"] + n > self.max_held:
            raise ValueError(f"{cmd.decode()} from a process that is not the registered collector")
        held["messages"].append((cmd, body, written))
        held["n"] += n
        self.unregistered[ident] = held

    def apply_held(self, ident: bytes, now: float):
        """What the process `ident`, now the registered collector, sent before its HELLO (hold_unregistered)."""
        held = self.unregistered.pop(ident, None)
        for cmd, body, written in (held["messages"] if held else ()):
            if cmd == P.RUN_ENDED:
                self.apply_run_ended(body, now)
            else:
                self.apply_confirmation(cmd, body, now, written)

    def add_supervisor(self, ident: bytes, info: dict, now: float):
        """The report of `hlt run`'s supervisor (checked before it is kept: a stray peer's message is a bad
        message, not a row of the status table)."""
        if info.get("role") != "supervisor":
            raise ValueError(f"a report of role {str(info.get('role'))[:32]!r}: only a collector or a supervisor "
                             "reports")
        counts = {k: info.get(k, getattr(self, k))
                  for k in ("workers_restarted", "collectors_restarted", "collector_restarts_failed")}
        for k, n in counts.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{k} {n!r} is not a count")
        for k, n in counts.items():
            setattr(self, k, n)
        self.supervisors[ident] = {"last_seen": now, "status": info}

    def _bad_message(self, socket_name: str, frames, err: Exception):
        self.c["bad_messages"] += 1
        if self.c["bad_messages"] <= 20:  # the first ones: a flood must not flood the log
            print(f"[distributor] ignored a bad message on the {socket_name} socket "
                  f"({len(frames)} frames): {type(err).__name__}: {err or '(no message)'}", flush=True)

    def other_collector_alive(self, info: dict, now: float) -> bool:
        """True when the registered collector is another process (not the one of `info`, which
        reconnected under a new identity: same instance token) that is still heard from and connected
        (collector_connected)."""
        token = self.collector["status"].get("instance")
        if (token is not None and token == info.get("instance")) or self.collector_silent(now):
            return False
        return self.collector_connected()

    def refuse_collector(self, ident: bytes, info: dict):
        """A second collector while the registered one is alive would take its place, then lose
        it again on the old one's next report, and so on, each time with every unconfirmed event
        produced again (and its output file recreated over whatever was at that path). It is told
        why and exits; a collector started after the registered one died is taken."""
        old = self.collector["status"]
        reason = (f"another collector is registered and alive: pid {old.get('pid')} on {old.get('host')}, "
                  f"results address {old.get('address')}, output {old.get('output') or '-'}")
        self.c["collectors_refused"] += 1
        if self.c["collectors_refused"] <= 20:
            print(f"[distributor] refused collector pid {info.get('pid')} on {info.get('host')}: {reason}", flush=True)
        self._send(self.ctl, ident, P.REFUSED, P.pack({"reason": reason}))

    def collector_replaced(self, same_process: bool = False):
        """A new collector (or the registered one on a new connection): results the old one never
        confirmed, or confirmed but never saved, are produced again. What another process saved in a
        run it did not report on is in its own file: counted in `output` (saved_by_replaced,
        replaced_files) and in the stop's reply."""
        if not same_process:
            self.note_unreported_collector(("replaced_collectors", "saved_by_replaced", "replaced_files"))
        back = []
        for seq, e in self.events.items():
            if e[2] is not None:
                e[2] = None
                back.append(seq)
        now = time.monotonic()
        for seq, env in self.unsaved.items():
            self.events[seq] = [env, now, None]
            back.append(seq)
        # confirmed but never in a file: the new collector confirms them again, which is not counted twice
        self.reconfirm.update(self.unsaved)
        self.unsaved.clear()
        for w in self.workers.values():
            w.assigned.clear()
        back.sort()
        self.pending.extendleft(reversed(back))
        self.c["redelivered"] += len(back)
        # (the same process on a new connection is no new collector: an operator looked for a second one)
        st = self.collector["status"]
        who = (f"the collector pid {st.get('pid')} on {st.get('host')} reconnected" if same_process
               else "a new collector registered")
        print(f"[distributor] {who}; {len(back)} unconfirmed events are processed again", flush=True)

    def note_unreported_collector(self, keys: tuple[str, str, str]):
        """The registered collector goes without a report of its run (replaced by a new one, or dead or hung
        at the farm's terminate): its file holds what it saved, listed under keys (note_collector_file) when
        it made one; a collector that went before it made its file (a failed start) has nothing of the run."""
        old = self.collector
        st = old["status"]
        # (left: in the report already; between_runs: it took no part in the run, unless it wrote the leftovers of
        # the run that ended, which its file holds: silent at the START, it was counted nowhere)
        if old["run_ended"] is not None or old.get("left") or (old.get("between_runs")
                                                                and old.get("leftovers_run") is None):
            return
        if st.get("output_made", True):
            # its file's count where it said it (the ids it released include events no file holds)
            in_file = old["saved"] if old.get("written") is None else old["written"]
            # (one that wrote the leftovers of a failed stop holds that run's events)
            self.note_collector_file(st, st.get("output"), in_file, keys, run_index=old.get("leftovers_run"))
        else:
            print(f"[distributor] collector pid {st.get('pid')} went before it made its output file "
                  f"{st.get('output') or '-'} (a failed start): not listed", flush=True)

    def request_terminate(self, farm: bool = True):
        """Stop the run, then exit; farm: tell the workers and the collector to exit too (run control's
        TERMINATE, `hlt run`), else they stay and re-register with the next distributor (a service
        stop or restart of this one)."""
        if not self.terminating:
            self.terminate_since = time.monotonic()
        self.terminating = True
        self.terminate_farm = self.terminate_farm or farm
        if self.state == "running":
            self.begin_stop()

    def begin_stop(self):
        if self.state == "running":
            self.state = "stopping"
            self.stop_since = time.monotonic()
            if self.collector is not None:  # a live one reports this run's end: waited for
                c = self.collector
                c["run_ended"] = None
                # one gone at the START stays out of the run while it is gone (collector_gone, as at the START: silent
                # alone, one killed 2-5 s before was taken into the run again, its report waited for, and it was
                # listed as a replaced collector of the run once the next one registered)
                c["between_runs"] = bool(c.get("between_runs")) and self.collector_gone(self.stop_since)
            self.drain_cut_said = False
            print(f"[distributor] stopping run {self.run_index}: reading the input until it is quiet for "
                  f"{self.stop_drain_s:g} s, at most {self.stop_drain_max_s:g} s", flush=True)

    def confirm(self, seqs: np.ndarray, now: float):
        t = []
        pop = self.events.pop
        workers = self.workers
        saves = self.collector is not None and self.collector["status"].get("saves", False)
        unsaved = self.unsaved
        reconfirm, taken = self.reconfirm, 0
        for s in seqs.tolist():
            e = pop(s, None)
            if e is None:
                self.c["confirmed_again"] += 1
                continue
            taken += 1
            if reconfirm and s in reconfirm:
                # confirmed by a collector that died before saving it: counted, and its latency taken, then
                reconfirm.discard(s)
            else:
                t.append(e[1])
            if saves:
                unsaved[s] = e[0]
            else:
                self.held_bytes -= len(e[0])
            w = workers.get(e[2]) if e[2] is not None else None
            if w is not None:
                w.assigned.discard(s)
                w.progress = now
        if taken:
            self.latency.add(now - np.asarray(t))
            self.c["confirmed"] += len(t)
            self.t_last_confirm = now

    def low_watermark(self) -> int:
        """Every seq below this was confirmed and saved (none is held any more)."""
        return min(min(self.events, default=self.next_seq), min(self.unsaved, default=self.next_seq))

    def housekeeping(self, now: float):
        lost = self.input_monitor.lost_bytes
        self.input_monitor.poll()
        self.input_monitor.say_lost("[distributor]", self.input_addr, lost)
        for ident in [i for i, h in self.unregistered.items() if now - h["since"] > self.heartbeat_timeout_s]:
            held = self.unregistered.pop(ident)  # its sender never registered: a stray peer's, counted
            self.c["bad_messages"] += len(held["messages"]) - 1
            self._bad_message("control", [ident], ValueError(
                f"{len(held['messages'])} CONFIRM/SAVED/RUN_ENDED ({held['n']} ids and reports) from a process that "
                "did not register as the collector"))
        for ident in [i for i, v in self.supervisors.items() if now - v["last_seen"] > 10 * self.heartbeat_timeout_s]:
            del self.supervisors[ident]  # it reports every second: gone (FINAL goes to the live ones)
        collector_silent = self.collector_silent(now)
        self.say_collector_silence(now)
        for w in list(self.workers.values()):
            if now - w.last_seen > self.heartbeat_timeout_s:
                self.lose_worker(w, f"no heartbeat for {self.heartbeat_timeout_s:g} s")
            elif w.blocked_since is not None:
                # Blocked sending its results. Behind a hung or dead collector every worker is: they stay (counted
                # lost, their events went to workers as blocked, and came back as duplicates). One whose results
                # the collector does not take while it takes others' (a broken link to it) is given up, after
                # twice the time-out (a collector that has just hung is silent only after one).
                if collector_silent:
                    w.progress = now
                elif now - max(w.progress, w.blocked_since) > 2 * self.heartbeat_timeout_s:
                    self.lose_worker(w, f"its results blocked for {2 * self.heartbeat_timeout_s:g} s while the "
                                     "collector confirmed none of them")
        c = self.collector
        if c is not None and c.get("leftovers") and not self.events and not self.pending:
            # the leftovers of the run that ended are confirmed: their run ends (RUN_ENDED, SAVED at the file's close)
            self.tell_collector(P.END_RUN, str(c["leftovers_run"]).encode())
            c["leftovers"] = False
        if self.state == "stopping" and self.stop_drain_over() and not self.events and not self.pending:
            # Every event of the run is confirmed: end the run everywhere.
            for w in list(self.workers.values()):
                self._send(self.wrk, w.ident, P.END_RUN)
                w.end_run()
            if self.collector is not None:
                self.tell_collector(P.END_RUN, str(self.run_index).encode())
            self.state = "stopped"
            self.stopped_at = now
            lost = self.c["lost_at_stop"] - self.lost_before_run
            print(f"[distributor] run {self.run_index} stopped: " + (
                "every event confirmed" if not lost else f"{lost} events given up, counted as lost_at_stop"), flush=True)
            self.lost_before_run = self.c["lost_at_stop"]
            self.lost_last_run = lost
        if self.state == "stopped" and self.stop_requesters:
            ended = self.collector is None or self.collector.get("run_ended") is not None
            if self.run_reported(now):
                info = {"state": "stopped", "run_index": self.run_index,
                        "collector": (self.collector or {}).get("run_ended"), "timeout": not ended,
                        "lost_at_stop": self.lost_last_run, "replaced_collectors": list(self.replaced_run),
                        "unsaved": len(self.unsaved), "leftovers_written": self.leftovers_written,
                        # the run's events in several collectors' files: `hlt control stop` gives the eclreco dqm
                        # advice of the output line (without DQM parts it gave none)
                        "in_several_files": self.several_files_entry(self.run_index)}
                self.leftovers_written = []
                for r in self.stop_requesters:
                    self._send(self.ctl, r, P.OK, P.pack(info))
                self.stop_requesters = []
        if (self.state == "stopping" and self.terminating and self.events and self.stop_drain_over()
                and ((self.collector_silent(now) and now - self.stop_since > self.heartbeat_timeout_s)
                     or self.collector_lost(now))):
            # Terminating with no live collector (silent, or its connection closed: dead): nobody can
            # confirm any more; do not wait for stop_timeout_s. What was held is lost, and counted.
            print(f"[distributor] terminating without a live collector: {len(self.events)} unconfirmed events lost",
                  flush=True)
            self.give_up_held()
        if self.state == "stopping" and now - self.stop_since > self.stop_timeout_s:
            print(f"[distributor] stop timed out with {len(self.events)} unconfirmed events", flush=True)
            self.give_up_held()

    def give_up_held(self):
        """Every event still held is lost, and counted as lost_at_stop: the unconfirmed ones, and
        the confirmed ones not known to be in the output file (lost_unsaved, also in `confirmed`;
        the collector may have written some of them before it died: at most this many are missing)."""
        self.c["lost_at_stop"] += self.held_events()
        # unsaved: also those a replaced collector had confirmed and the next one had not yet
        self.c["lost_unsaved"] += len(self.unsaved) + len(self.reconfirm)
        self.reconfirm.clear()
        self.events.clear()
        self.unsaved.clear()
        self.held_bytes = 0
        self.pending.clear()
        for w in self.workers.values():
            w.assigned.clear()

    def note_collector_file(self, status: dict, output, saved: int, keys: tuple[str, str, str], error: str = "",
                            run_index: int | None = None):
        """A collector other than the one that reports the run's end holds part of the run in its file:
        listed in the stop's reply (replaced_run) and counted in `output` under keys (collectors, events,
        files: at most 20 names). error: why it could not write its file (default: its last status's). run_index: the
        run its file holds (default: the run now); one of a run that ended (a failed stop's leftovers, written after a
        START) is no part of the run now: counted in `output` only (it was listed in the next run's stop reply)."""
        rec = {"pid": status.get("pid"), "host": status.get("host"), "output": str(output or ""), "saved": saved}
        error = error or status.get("output_error")
        if error:  # it could not write its file (a full disk): its error says what it kept
            rec["error"] = str(error)
            self.count_output_error(rec["error"])
        if run_index is None or run_index == self.run_index:
            self.replaced_run.append(rec)
        if saved:
            # (no DQM of the run unless it reported the run's end: add_run_report's call says so)
            self.note_run_file(self.run_index if run_index is None else run_index, status, rec["output"], dqm=False)
        n, events, files = keys
        self.output[n] += 1
        self.output[events] += saved
        if len(self.output[files]) < 20:
            if not saved and len(self.output["files_without_events"]) < 20:
                self.output["files_without_events"].append({"files": files, "index": len(self.output[files]),
                                                            "output": rec["output"]})
            self.output[files].append(rec["output"])

    def note_leftovers_file(self, info: dict, run: int):
        """The registered collector's report of the leftovers of a failed stop of `run` (RUN_ENDED, no error): their
        file, written after that stop's reply, is named in the output line (`output`'s leftovers_*) and in the next
        stop's reply (leftovers_written); its counts are the run's (add_run_report). It was named nowhere."""
        st = self.collector["status"]
        rec = {"run_index": run, "pid": st.get("pid"), "host": st.get("host"),
               "output": str(info.get("filename") or st.get("output") or ""),
               "events_written": int(info.get("events_written", 0) or 0)}
        self.leftovers_written = (self.leftovers_written + [rec])[-20:]
        o = self.output
        o["leftovers_collectors"] += 1
        o["written_as_leftovers"] += rec["events_written"]
        if len(o["leftovers_files"]) < 20:
            o["leftovers_files"].append(rec["output"])
        if rec["events_written"]:
            self.note_run_file(run, st, rec["output"])

    def note_run_file(self, run: int, status: dict, path: str, dqm: bool = True):
        """A file of the collector of `status` (its pid and host: the file's identity with its path) holds events of
        farm run `run`: a run in several files is listed in `output`'s
        runs_in_several_files, which the output line names as the files to give `eclreco dqm` together (it named
        one: the run's DQM drawn from it alone looked like the whole run's). dqm: its collector reported the run's
        end without an error; otherwise (killed, hung, its write failed) the DQM of the runs open then is in no file
        (a collector writes a run's DQM at its end)."""
        files = self.run_files.setdefault(run, {})
        key = (str(status.get("host") or ""), status.get("pid"), path)
        if not path or files.get(key) in (dqm, True):
            return
        files[key] = dqm
        if len(files) > 1:
            self.output["runs_in_several_files"] = [
                self.several_files_entry(r) for r, f in sorted(self.run_files.items()) if len(f) > 1][:20]

    def several_files_entry(self, run: int) -> dict | None:
        """{run_index, files, without_dqm, shared_paths} of farm run `run` whose events are in several files (None: one
        or none), as `output`'s runs_in_several_files lists them and the stop's reply names its run's."""
        files = self.run_files.get(run, {})
        if len(files) < 2:
            return None
        names = run_file_names(list(files))
        paths = collections.Counter(p for _, _, p in files)
        shared = [p for p in paths if paths[p] > 1]
        return {"run_index": run, "files": names, "without_dqm": [n for n, d in zip(names, files.values()) if not d],
                **({"shared_paths": shared} if shared else {})}

    def count_output_error(self, error: str):
        self.c["collector_output_errors"] += 1
        if len(self.output["output_errors"]) < 20:
            self.output["output_errors"].append(error)

    def add_run_report(self, info: dict, left: bool = False, run_index: int | None = None):
        """A collector's RUN_ENDED. left: it ended its run while the farm's run goes on (a service stop or
        restart of the collector); its file holds the run's first events and a new collector writes the
        rest in its own. Its counts are the run's, and the run is counted once: the stop's reply and the
        output line name its file (they named only the new collector's, and counted a second run). run_index: the
        farm's run the report is of (default: the current one)."""
        o = self.output
        o["received_before"] += self.collector.pop("received_before", 0)
        run = self.run_index if run_index is None else run_index
        self.reported_runs.add(run)
        if info.get("received", 0):
            self.runs_with_events.add(run)
        if int(info.get("events_written", 0) or 0):
            st = self.collector["status"] if self.collector is not None else {}
            self.note_run_file(run, st, str(info.get("filename") or st.get("output") or ""),
                               dqm=not info.get("output_error"))
        o["runs"] = len(self.reported_runs)
        o["runs_without_events"] = len(self.reported_runs - self.runs_with_events)
        error = str(info.get("output_error") or "")
        if left:
            st = self.collector["status"]
            keys = (("failed_collectors", "written_by_failed", "failed_files") if error else
                    ("left_collectors", "written_by_left", "left_files"))
            self.note_collector_file(st, info.get("filename") or st.get("output"), int(info.get("events_written", 0) or 0),
                                     keys, error, run)
        counts = {k: int(info.get(k, 0) or 0)
                  for k in ("received", "events_written", "errors", "errors_in_outputs", "discarded", "rejected",
                            # late results of a dead distributor's events a failed write left unsaved: in no file
                            "orphaned_lost")}
        # (a report with output_error counts the events its collector said SAVED only: the rest were handed on)
        for k, n in counts.items():
            o[k] += n
        for k in ("duplicates", "repeated_keys", "orphaned"):  # the collector's of this run (its `duplicates` is its life's)
            o[k] += int(info.get(k + "_run", 0) or 0)
        reasons = info.get("rejected_by_reason")
        for reason, n in (reasons.items() if isinstance(reasons, dict) else ()):
            o["rejected_by_reason"][str(reason)] = o["rejected_by_reason"].get(str(reason), 0) + int(n)
        o["first_error"] = o["first_error"] or str(info.get("first_error", ""))
        for exp, run_number, parts in _dqm_parts(info.get("dqm_parts")):
            o["dqm_runs_in_parts_total"] += 1
            if len(o["dqm_runs_in_parts"]) < 20:
                o["dqm_runs_in_parts"].append({"run_index": run, "exp": exp, "run": run_number, "parts": parts,
                                               "file": str(info.get("filename") or "")})
        if error and not left:  # its file could not be written at the run's end (it names the kept file)
            self.count_output_error(error)

    def run_reported(self, now: float) -> bool:
        """The collector's RUN_ENDED for the stopped run is in (what it wrote and what failed there: the
        STOP reply and the final status carry it), or it cannot come: no live collector (collector_gone: a killed one
        was waited for until the heartbeat time-out, 3 s after it was given up), or 30 s gone."""
        return (self.collector_gone(now) or self.collector.get("run_ended") is not None
                or self.collector.get("between_runs", False) or now - self.stopped_at > 30)

    def writing_leftovers(self, now: float) -> bool:
        """At terminate: the collector still writes the leftovers of the run that ended (its events held here, or
        its report of that run not in) and the terminate has waited less than stop_timeout_s: waited for, as a stop
        waits for its run's events (the terminate went 30 s after the stop, and the leftovers with it, uncounted)."""
        c = self.collector
        return (c is not None and c.get("leftovers_run") is not None and not self.collector_silent(now)
                and now - self.terminate_since <= self.stop_timeout_s)

    def collector_failed(self) -> bool:
        """The registered collector could not write its file (its report or last status says output_error): it
        exits, and the next collector takes what it did not save."""
        c = self.collector
        return c is not None and bool((c.get("run_ended") or {}).get("output_error") or c["status"].get("output_error"))

    def say_collector_silence(self, now: float):
        """One line when the registered collector is gone (collector_gone: silent, dead or hung, or its connection
        closed past the reconnect grace, dead: the workers block on their results and nothing is confirmed), one when
        it is heard from again; it was said in `hlt status` only, and for a killed one only at the heartbeat time-out,
        3 s after the distributor had given it up. Not for one that left (BYE after its report) or whose write failed
        (it exits, and says so)."""
        c = self.collector
        if c is None or c.get("left") or self.collector_failed():
            return
        st = c["status"]
        gone = self.collector_gone(now)
        if gone and not c.get("silence_said"):
            c["silence_said"] = True
            quiet = f"{now - c['last_seen']:.0f} s"
            why = (f"has not been heard from for {quiet} (dead or hung" if self.collector_silent(now) else
                   f"closed its control connection and has not registered again for {quiet} (dead")
            print(f"[distributor] warning: the collector pid {st.get('pid')} on {st.get('host')} {why}; `hlt status`: "
                  f"silent): the workers block on their results and no event is confirmed; restart it with the same "
                  f"--collector-addr (`hlt run` restarts its own): the new one takes every event not in a file",
                  file=sys.stderr, flush=True)
        elif not gone and c.get("silence_said"):
            c["silence_said"] = False
            print(f"[distributor] the collector pid {st.get('pid')} on {st.get('host')} is heard from again",
                  file=sys.stderr, flush=True)

    def collector_silent(self, now: float) -> bool:
        return self.collector is None or now - self.collector["last_seen"] > self.heartbeat_timeout_s

    def collector_connected(self) -> bool:
        """Whether the registered collector's connection is open: a probe (LOW) fails at once under
        ROUTER_MANDATORY when it is closed, as it is when the process died (a hung one keeps it)."""
        if self.collector is None:
            return False
        try:
            self.ctl.send_multipart([self.collector["ident"], P.LOW, str(self.low_watermark()).encode()], zmq.NOBLOCK)
        except zmq.ZMQError as err:
            return err.errno == zmq.EAGAIN  # connected, its queue full: alive
        return True

    def collector_lost(self, now: float) -> bool:
        """None, or dead: its connection is closed and it has not been heard from for reconnect_grace_s. A live
        collector whose connection broke (a network glitch) reconnects under a new identity and registers again
        with its next report; taken for dead at once, a terminate in that window gave up the events it was
        confirming (lost_at_stop), and a START waited for the leftovers of a run it had written. A killed one
        reported last at most COLLECTOR_REPORT_S before it died: lost within that and the grace."""
        return self.collector is None or (now - self.collector["last_seen"] > self.reconnect_grace_s
                                          and not self.collector_connected())

    def collector_gone(self, now: float) -> bool:
        """No collector will confirm, save or report any more (none, silent, or dead): what a terminate and a START
        act on, and what `hlt status` shows as silent."""
        return self.collector_silent(now) or self.collector_lost(now)

    def count_unread_input(self, max_s: float = 10.0):
        """At terminate: what a source sent after the last run stopped reading (a source that kept
        sending, or sent while the farm was stopped) waits in the input socket and would go with it,
        counted nowhere. The input is closed first (unbound, or disconnected): what the socket has taken
        is still read, nothing more comes (a live source's further messages stay queued at its end, for
        the next distributor or its own count; read until quiet, a live source kept this going for
        max_s, 10 s). What is in flight in the kernel's socket buffers when the close tears a connection
        down would be lost with it: the tcp:// connections are ended first (raw_sockets.end_input, as ZMQInput's:
        once quiet, at the latest --stop-drain after; each sender closes its side after what it wrote, which is
        read here), and what is left in one that the close tore down all the same is counted in bytes, as over
        ipc:// (input_lost_bytes; docs/deployment.md).
        Counted as unread_at_terminate and said; not processed (no run is open), as reco.py's ZMQInput
        counts unread_at_end. Kept as they are read, as sent, in the quarantine file (unread_file, reason
        unread_at_terminate: `eclreco quarantine --extract` replays them), at most keep_unread_bytes: those
        beyond, or after a failed write, are counted unread_not_kept and said (they were counted only)."""
        lost = self.input_monitor.lost_bytes

        def detach():
            (self.inp.unbind if self.input_bind else self.inp.disconnect)(
                self.addresses["input"] if self.input_bind else self.input_addr)

        def keep(msg: bytes):
            msg = as_sent(msg)
            self.unread.add(UNREAD_REASON, "sent after the last run stopped reading; read at the distributor's "
                            f"terminate from {self.input_addr}, not processed", msg, envelope_ids(msg))

        try:
            n = end_input(self.inp, self.input_monitor, detach, force_after_s=self.stop_drain_s, max_s=max_s, keep=keep)
        finally:
            self.unread.close()
        self.input_monitor.say_lost("[distributor]", self.input_addr, lost, at_end=True)
        if n:
            self.c["unread_at_terminate"] += n
            print(f"[distributor] {n} messages arrived after the last run stopped reading: not processed, counted "
                  "as unread_at_terminate" + (f", kept in {self.unread.path}" if self.unread.kept else ""), flush=True)
        u = self.unread
        if u.not_kept:
            why = (u.error if u.error else
                   f"over --keep-unread-bytes {u.max_bytes} (kept the first {u.kept})" if u.full else
                   "no quarantine file (--rejected '')")
            print(f"[distributor] error: {u.not_kept} of the messages unread at terminate are in no file: {why}",
                  file=sys.stderr, flush=True)

    def finish_terminate(self):
        self.count_unread_input()
        gone = self.collector_gone(time.monotonic())
        if self.collector is not None and gone:
            # dead or hung, not replaced, no report of the run: its file was named nowhere ("0 events written")
            self.note_unreported_collector(("unreported_collectors", "saved_by_unreported", "unreported_files"))
        if self.unsaved or self.events:
            # confirmed, but the collector died before they were in its file; or, also unconfirmed, the leftovers of
            # a failed stop that the next collector did not write within the stop's time-out (they went uncounted)
            why = "without a live collector" if gone else "before the leftovers of the failed stop were written"
            print(f"[distributor] terminating {why}: {len(self.unsaved)} confirmed events that were not in its file "
                  f"are lost" + (f", and {len(self.events)} unconfirmed ones" if self.events else ""), flush=True)
            self.give_up_held()
        final = self.status()
        if self.terminate_farm:
            for w in list(self.workers.values()):
                self._send(self.wrk, w.ident, P.TERMINATE)
            if self.collector is not None:
                self._send(self.ctl, self.collector["ident"], P.TERMINATE)
        else:
            print("[distributor] exiting alone: the workers and the collector stay, for the next distributor",
                  flush=True)
        for ident in self.supervisors:
            self._send(self.ctl, ident, P.FINAL, P.pack(final))
        if self.terminate_requester is not None:
            self._send(self.ctl, self.terminate_requester, P.OK, P.pack(final))
        print("[distributor] terminated: " + summary_line(final["processes"][0]), flush=True)
        print("[distributor] " + output_line(final["processes"][0]), flush=True)

    def tell_collector(self, *frames):
        """Sends the registered collector a message it must act on (END_RUN). Its connection closed (a network glitch:
        it reconnects under a new identity and registers again within reconnect_grace_s), the message did not go: kept
        in its "untold", sent again when it registers back (same instance token). It was dropped: a stop in that
        window waited 30 s for a report the collector was never asked for, and replied `timeout: true`."""
        try:
            self.ctl.send_multipart([self.collector["ident"], *frames], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.collector.setdefault("untold", []).append(frames)

    def _send(self, sock, ident, *frames):
        try:
            sock.send_multipart([ident, *frames], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def close(self, linger: int | None = None):
        """Closes the input's monitor, then the sockets (the monitor needs its socket open). For a
        distributor driven in process (tests, benchmarks/bench_distributor.py)."""
        self.input_monitor.close()
        for s in (self.inp, self.wrk, self.ctl):
            s.close(linger)

    # ---------------------------------------------------------------- status and metrics
    def run_seconds(self) -> float:
        """This run's time from its first input to its last confirmation (0 before both)."""
        return self.t_last_confirm - self.t_first_input if self.t_first_input and self.t_last_confirm else 0.0

    def own_status(self) -> dict:
        wall = self.earlier_runs_s + self.run_seconds()
        return {
            "role": "distributor", "pid": os.getpid(), "host": socket.gethostname(), "state": self.state,
            "run_index": self.run_index, "addresses": self.addresses,
            # a stop that still reads its input, and for how long it may (hlt control stop says it)
            "draining": self.state == "stopping" and not self.stop_drain_over(),
            "stop_drain_s": self.stop_drain_s, "stop_drain_max_s": self.stop_drain_max_s,
            "received": self.c["received"], "bytes_received": self.c["bytes_received"],
            "dispatched": self.c["dispatched"], "confirmed": self.c["confirmed"],
            "redelivered": self.c["redelivered"], "dropped": self.c["dropped"],
            "lost_at_stop": self.c["lost_at_stop"], "lost_unsaved": self.c["lost_unsaved"],
            "unread_at_terminate": self.c["unread_at_terminate"],
            # of them, in the quarantine file (unread_file) and not (count_unread_input)
            "unread_kept": self.unread.kept, "unread_not_kept": self.unread.not_kept, "unread_file": self.unread.path,
            "input_disconnects": self.input_monitor.disconnects, "input_auth_failures": self.input_monitor.auth_failures,
            "input_lost_bytes": self.input_monitor.lost_bytes,
            "bad_messages": self.c["bad_messages"], "collectors_refused": self.c["collectors_refused"],
            "held": len(self.events), "unsaved": len(self.unsaved), "queued": len(self.pending),
            "held_bytes": self.held_bytes,
            "low_watermark": self.low_watermark(),
            "workers_alive": len(self.workers), "workers_restarted": self.workers_restarted,
            "workers_lost": self.workers_lost, "collectors_restarted": self.collectors_restarted,
            "collector_restarts_failed": self.collector_restarts_failed,
            "latency_p50_s": self.latency.quantile(0.5), "latency_p99_s": self.latency.quantile(0.99),
            "throughput_hz": self.c["confirmed"] / wall if wall > 0 else 0.0,
            "output": dict(self.output),
            "input_waits": self.input_wait(time.monotonic()),
            "metrics_port": getattr(self, "metrics_port", 0),
        }

    def status(self) -> dict:
        procs = [self.own_status()]
        now = time.monotonic()
        for w in list(self.workers.values()):
            d = {"role": "worker", "pid": w.info.get("pid"), "host": w.info.get("host"),
                 "state": w.status.get("state", "ready"), "credit": w.credit, "assigned": len(w.assigned),
                 "sent": w.sent, "last_seen_s": round(now - w.last_seen, 3),
                 "metrics_port": w.info.get("metrics_port", 0)}
            d.update({k: v for k, v in w.status.items() if k not in d})
            procs.append(d)
        if self.collector is not None:
            d = dict(self.collector["status"])
            d.update(role="collector", last_seen_s=round(now - self.collector["last_seen"], 3))
            if self.collector_gone(now):
                # not heard from for --heartbeat-timeout, or its connection closed past the reconnect grace: what the
                # distributor acts on (a killed one showed its last report's state, running, until the time-out)
                d["state"] = "silent"
            elif not self.collector_connected():
                # its control connection closed, within the grace in which a live one registers again (collector_lost):
                # its last report's state (running) said nothing of it
                d["state"] = "reconnecting"
            procs.append(d)
        for s in list(self.supervisors.values()):
            d = dict(s["status"])
            d.update(role=d.get("role", "supervisor"), last_seen_s=round(now - s["last_seen"], 3))
            procs.append(d)
        return {"processes": procs}

    def metrics_families(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        def counter(name, help_, value):
            f = CounterMetricFamily(name, help_)
            f.add_metric([], value)
            return f

        def gauge(name, help_, value):
            f = GaugeMetricFamily(name, help_)
            f.add_metric([], value)
            return f

        yield counter("eclreco_events_received", "Events read from the input", self.c["received"])
        yield counter("eclreco_input_bytes_received", "Bytes read from the input", self.c["bytes_received"])
        yield counter("eclreco_input_disconnects", "Input connections dropped (a sender closing, or a message over "
                      "--refuse-message-bytes)", self.input_monitor.disconnects)
        yield counter("eclreco_input_lost_bytes_at_disconnect", "Bytes of events lost unread with an ipc:// input "
                      "connection its sender closed while the input queue was full, or with an input connection "
                      "the terminate closed (docs/deployment.md)",
                      self.input_monitor.lost_bytes)
        yield counter("eclreco_hlt_bad_messages", "Messages on the workers/control sockets that were not understood "
                      "(ignored)", self.c["bad_messages"])
        yield counter("eclreco_hlt_collectors_refused", "Collectors refused because another one was registered "
                      "and alive", self.c["collectors_refused"])
        yield counter("eclreco_input_auth_failures", "Input handshakes refused (CURVE: unknown key or no CURVE)",
                      self.input_monitor.auth_failures)
        yield counter("eclreco_hlt_events_dispatched", "Events sent to workers (redeliveries included)",
                      self.c["dispatched"])
        yield counter("eclreco_hlt_events_confirmed", "Events confirmed by the collector", self.c["confirmed"])
        yield counter("eclreco_hlt_events_redelivered", "Events given to another worker after a worker was lost",
                      self.c["redelivered"])
        yield counter("eclreco_hlt_events_dropped", "Events dropped because every worker was busy (--drop-when-busy)",
                      self.c["dropped"])
        yield counter("eclreco_hlt_events_lost_at_stop", "Events given up at a stop or terminate without a live "
                      "collector: unconfirmed, or confirmed but not known to be saved", self.c["lost_at_stop"])
        yield counter("eclreco_hlt_input_unread_at_terminate", "Messages in the input at terminate that no run "
                      "read (sent after the last stop): not processed", self.c["unread_at_terminate"])
        yield counter("eclreco_hlt_input_unread_not_kept", "Of unread_at_terminate: not in the quarantine file (over "
                      "--keep-unread-bytes, a failed write, or --rejected '')", self.unread.not_kept)
        yield counter("eclreco_hlt_events_lost_unsaved", "Of lost_at_stop: confirmed, not known to be in the file "
                      "(the collector may have written them)", self.c["lost_unsaved"])
        yield gauge("eclreco_hlt_events_held", "Events held until the collector confirms them", len(self.events))
        yield gauge("eclreco_hlt_events_unsaved", "Events confirmed, held until the collector has them in its file",
                    len(self.unsaved))
        yield gauge("eclreco_hlt_events_held_bytes", "Bytes of the events held and unsaved (bounded by --max-held-bytes)",
                    self.held_bytes)
        yield gauge("eclreco_input_queue_depth", "Events read and waiting for a worker", len(self.pending))
        yield gauge("eclreco_events_in_flight", "Events at workers, not yet confirmed",
                    len(self.events) - len(self.pending))
        yield gauge("eclreco_hlt_workers_alive", "Workers with a recent heartbeat", len(self.workers))
        yield counter("eclreco_hlt_workers_restarted", "Workers restarted by the farm supervisor",
                      self.workers_restarted)
        yield counter("eclreco_hlt_workers_lost", "Workers lost (no heartbeat, unreachable)", self.workers_lost)
        yield counter("eclreco_hlt_collectors_restarted", "Collectors restarted by the farm supervisor (each one's "
                      "successor writes its own file)", self.collectors_restarted)
        yield counter("eclreco_hlt_collector_output_errors", "Collectors that could not write their output file "
                      "(disk full, file-size limit, I/O error; their file keeps what they wrote)",
                      self.c["collector_output_errors"])
        yield counter("eclreco_hlt_dqm_runs_in_parts", "Runs whose DQM a collector wrote in several parts (cycles: "
                      "late events of a run already written; its totals are the sum, `eclreco dqm FILE` draws it)",
                      self.output["dqm_runs_in_parts_total"])
        yield counter("eclreco_hlt_collector_restarts_failed", "Of the collector restarts, those whose collector "
                      "exited before it made its output file", self.collector_restarts_failed)
        yield gauge("eclreco_hlt_worker_credit", "Events the workers can take now",
                    sum(w.credit for w in list(self.workers.values())))
        yield gauge("eclreco_hlt_run_index", "Run of the farm (1, 2, ... after each start)", self.run_index)
        wait = self.input_wait(time.monotonic())
        yield gauge("eclreco_hlt_input_wait_seconds", "How long the run's input has been held for the events of "
                    "the run before that its collector could not write, until a collector writes them (0: not held)",
                    wait["waited_s"] if wait else 0.0)
        h = HistogramMetricFamily("eclreco_hlt_event_latency_seconds",
                                  "Event latency from distributor receipt to collector confirmation")
        buckets, total = self.latency.buckets()
        h.add_metric([], buckets, sum_value=total)
        yield h


def run_file_names(keys: list[tuple]) -> list[str]:
    """The name of each (host, pid, path) of a run's files: its path, or HOST:PATH where another collector's file of
    the run has the same path (two hosts, the same -o; `eclreco dqm` takes a path once), and ' (pid N)' after it
    where the host is the same too."""
    paths = collections.Counter(p for _, _, p in keys)
    on_host = collections.Counter((h, p) for h, _, p in keys)
    return [p if paths[p] == 1 else f"{h}:{p}" if on_host[h, p] == 1 else f"{h}:{p} (pid {pid})" for h, pid, p in keys]


def unread_file(args) -> str:
    """--rejected: the quarantine file of the messages unread at terminate ({pid} replaced; '' none; default:
    DEFAULT_UNREAD_FILE), made at the first one. A folder it cannot be made in is a bad option now, not an error
    at terminate (ValueError: one line, exit 2)."""
    given = args.rejected is not None
    name = (args.rejected if given else DEFAULT_UNREAD_FILE).replace("{pid}", str(os.getpid()))
    if name and (why := output_file_error(name, "--rejected")):
        raise ValueError(why if given else why + ": pass --rejected FILE (or --rejected '' to keep none)")
    return name


def main(args) -> int:
    whole_lines()  # its lines whole in a log shared with the other roles
    if why := curve_option_error(args, "distributor", P.curve_servers("distributor", args)):
        raise ValueError(why)  # a bad option: one line, exit 2 (cli.main), before any socket
    if why := metrics_host_unused(args):
        raise ValueError(why)
    check_queue_bound("", args.max_queue_bytes, args.refuse_message_bytes,
                      ("--max-queue-bytes", "--refuse-message-bytes"))  # named by their options, not Distributor's
    scheduling.apply(args.sched, "distributor")  # before the ZeroMQ context: its threads inherit the policy
    open_files.raise_soft_limit("distributor")  # it accepts the connections of every worker (and sender)
    d = Distributor(args.input, args.workers_addr, args.control, queue_size=args.queue_size,
                    max_held=args.max_held, chunk=args.chunk, heartbeat_timeout_s=args.heartbeat_timeout,
                    drop_when_busy=args.drop_when_busy, input_hwm=args.input_hwm, stop_drain_s=args.stop_drain,
                    stop_drain_max_s=args.stop_drain_max, stop_timeout_s=args.stop_timeout,
                    input_bind=not args.input_connect, curve=Curve.from_args(args, "distributor"),
                    max_message_bytes=args.max_message_bytes, refuse_message_bytes=args.refuse_message_bytes,
                    cycle_s=args.cycle_ms * 1e-3, max_queue_bytes=args.max_queue_bytes,
                    max_held_bytes=args.max_held_bytes, unread_file=unread_file(args),
                    keep_unread_bytes=args.keep_unread_bytes)
    exporter = None
    if args.metrics_port >= 0:
        from eclreco.metrics import serve_role_metrics

        exporter = serve_role_metrics("distributor", args.metrics_port, args.metrics_host, extra=d.metrics_families,
                                      framework=False)
        d.metrics_port = exporter.port
    from eclreco.hlt.run import started_with_parent_death_signal

    signals = {"n": 0, "t": 0.0}
    supervised = started_with_parent_death_signal()

    def on_signal(sig, frame):
        now = time.monotonic()
        if signals["n"] and supervised and now - signals["t"] < 2.0:
            return  # the kernel's repeats of the supervisor's death signal: the drain goes on
        signals["n"] += 1
        signals["t"] = now
        if signals["n"] > 1:
            os._exit(1)
        # A service stop or restart of this distributor alone (systemd sends SIGTERM): its run ends, the
        # other roles stay and re-register with the next one; it took the whole farm down (every role
        # exit 0, so Restart=on-failure restarted none). Under `hlt run` (a parent-death signal) the
        # supervisor ends the farm.
        d.request_terminate(farm=supervised)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"[distributor] pid {os.getpid()} input {d.addresses['input']} workers {d.addresses['workers']} "
          f"control {d.addresses['control']} metrics {d.metrics_port if exporter else '-'}", flush=True)
    try:
        d.serve()
    finally:
        if exporter is not None:
            exporter.close()
        d.input_monitor.close()
        time.sleep(0.2)  # let the last replies leave
    # events given up (no live collector, a stop that timed out), or messages unread at terminate that are in no
    # file (unread_not_kept), break the farm's promise: say so by the exit code too (a service manager, or hlt run,
    # which exits 1 with it)
    return 1 if d.c["lost_at_stop"] or d.unread.not_kept else 0
