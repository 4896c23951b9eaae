"""The collector: results of all workers (PULL) -> duplicates dropped -> RootOutput (or ZMQOutput).

Its path is HLTCollectorInput -> ECLDQM -> RootOutput (the very modules of steering/reco.py, so
the file has the same branches and DQM histograms) or HLTCollectorInput -> ZMQOutput onward. It runs with one thread: when the source is asked
for the next batch, the previous one has gone through the output, and only then are its
sequence ids confirmed to the distributor (DEALER on the control address): CONFIRM (processed:
the latency ends here, the workers are done with it). RootOutput buffers; when the batch is in
the file (RootOutput.batches_written, at most `--flush-interval` later) the collector sends
SAVED, and only then does the distributor forget the event: a collector killed with buffered
results is replaced and those events are produced again (docs/deployment.md).
"""
from __future__ import annotations

import collections
import os
import signal
import socket
import stat
import sys
import time
from typing import NamedTuple

import numpy as np
import zmq

import eclreco
from eclreco import Module, _core
from eclreco.dqm import registry
from eclreco.hlt import protocol as P
from eclreco.log_lines import whole_lines
from eclreco.raw_sockets import attach


def event_keys(exp, run, evt, detector) -> list:
    """One key per event, distinct for every (exp, run, evt, detector) (exp and run are up to 64 bits, evt
    32; a 64-bit key with exp << 48 made run 65536 of exp 0 collide with exp 1): the detector is part of an
    event's identity, as in `hlt merge` (a copy has its event's detector; two streams, a belle2-ecl and an
    array30 one, each numbered from 0, are not copies of each other). Built for a whole batch in numpy: an
    int where exp < 2^12 and run < 2^20, the numbers a DAQ gives (below 2^64 for detector 0; another
    detector's code above bit 64, one Python step per such event), else 21 bytes, exp, run, evt and detector
    big-endian. An int never equals a bytes object, and which form an event gets follows from its own
    exp and run only."""
    # the types of the EventBatch columns these fill (a stray message's wider evt wraps there too)
    exp = np.asarray(exp).astype(np.uint64)
    run = np.asarray(run).astype(np.uint64)
    evt = np.asarray(evt).astype(np.uint32).astype(np.uint64)
    detector = np.asarray(detector).astype(np.uint8)
    keys = ((exp << np.uint64(52)) | (run << np.uint64(32)) | evt).tolist()
    other = np.flatnonzero(detector)
    for i, d in zip(other.tolist(), detector[other].tolist()):
        keys[i] |= d << 64
    large = np.flatnonzero((exp >= 1 << 12) | (run >= 1 << 20))
    if len(large):
        k = np.empty(len(large), dtype=[("exp", ">u8"), ("run", ">u8"), ("evt", ">u4"), ("detector", "u1")])
        k["exp"], k["run"], k["evt"], k["detector"] = exp[large], run[large], evt[large], detector[large]
        for i, key in zip(large.tolist(), k.view("V21").tolist()):
            keys[i] = key
    return keys


def take_new(known: set, keys: list, remember=None) -> np.ndarray:
    """keep[i]: keys[i] is neither in `known` nor earlier in `keys`; the kept keys join `known`
    (and are passed to `remember`, as one list). One set operation per batch when every key is new;
    one key at a time only when the batch holds a repeat."""
    fresh = set(keys)
    if len(fresh) == len(keys) and known.isdisjoint(fresh):
        known |= fresh
        if remember is not None:
            remember(keys)
        return np.ones(len(keys), dtype=bool)
    keep = np.zeros(len(keys), dtype=bool)
    for i, k in enumerate(keys):
        if k not in known:
            known.add(k)
            keep[i] = True
            if remember is not None:  # before the next key: it may push an old repeat out of a window
                remember([k])
    return keep


class UnsavedBatch(NamedTuple):
    """A batch the output has taken and the collector confirmed, not yet in the file (CollectorLink.unsaved)."""
    batch: int              # the output's count of batches taken through it (in the file once batches_written >= it)
    seqs: np.ndarray        # its sequence ids, said SAVED once it is in the file
    counts: dict            # the run's counts (run_counts) through it
    orphans: dict | None    # its orphaned results (orphan_counts), or None
    dropped: dict           # the run's drops (dropped_in_run) through it


class RecentKeys:
    """The (exp, run, evt, detector) keys of the last `window` events written: a repeat within the window is a
    duplicate. Bounded, so that a collector can run for days (a set of every key of a long run
    would grow by ~60 bytes per event). Redeliveries inside the farm are caught by sequence id
    regardless of the window; this catches a source that sends an event twice. Keys are remembered
    and forgotten a batch at a time (take_new), and the window is exact in events, also inside a
    batch."""

    def __init__(self, window: int):
        self.window = max(1, int(window))
        self.set: set = set()
        self.order: collections.deque = collections.deque()  # lists of keys, oldest first
        self.count = 0

    def add_new(self, keys: list) -> np.ndarray:
        """keep[i]: keys[i] is not among the recent keys nor earlier in `keys` (and is now remembered)."""
        return take_new(self.set, keys, self._remember)

    def _remember(self, keys: list):
        # All new and distinct, so forgetting the oldest after the batch decides as after each key.
        if not keys:  # a batch of rejected events only: nothing to hold (a list each would pile up)
            return
        self.order.append(keys)
        self.count += len(keys)
        excess = self.count - self.window
        while excess > 0:
            oldest = self.order[0]
            if len(oldest) <= excess:
                self.order.popleft()
                forget = oldest
            else:
                forget, self.order[0] = oldest[:excess], oldest[excess:]
            self.set.difference_update(forget)
            self.count -= len(forget)
            excess -= len(forget)


class CollectorLink:
    def __init__(self, collector_addr: str, control: str, rcvhwm: int = 200, curve=None, dedup_window: int = 1_000_000):
        self.ctx = zmq.Context.instance()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, rcvhwm)
        self.pull.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.server(self.pull)
        attach(self.pull, collector_addr, bind=True, what="--collector-addr")
        self.address = self.pull.getsockopt_string(zmq.LAST_ENDPOINT)
        self.ctl = self.ctx.socket(zmq.DEALER)
        self.ctl.setsockopt(zmq.LINGER, 2000)
        if curve is not None:
            curve.client(self.ctl, "distributor")
        attach(self.ctl, control, bind=False)
        self.low = 0                   # every seq below was confirmed by the distributor
        self.seen: set[int] = set()    # seqs at or above `low` already written
        self.dedup_window = dedup_window
        self.keys = RecentKeys(dedup_window)  # (exp, run, evt, detector) of the recent events written (per run)
        self.end_run = self.terminate = False
        self.run_index = 1
        self.ended_run_index = None
        # END_RUNs read behind the one that ends the run now (a stop just as a failed stop's leftovers end: END_RUN N
        # and N+1 in one read, and N+1 taken for the leftovers' run): each ends the run or wait that follows
        self.later_end_runs: collections.deque = collections.deque()
        self.state = "idle"
        self.next_report = 0.0
        self.duplicates = 0      # events dropped as copies of ones already taken (over the process's life)
        self.duplicates_before_run = 0  # of them, those of earlier runs (status: the run's, as its other counts)
        self.repeated_keys = 0   # of them, a new event whose (exp, run, evt, detector) was taken (not a redelivery)
        # First results of events of a distributor this collector was registered with before the one now (a
        # predecessor, restarted): below the new one's LOW, never taken here, and no distributor holds them any more:
        # the only copy, written and counted apart (they were dropped, first as duplicates). A copy is still caught
        # by its id (seen) and by its (exp, run, evt) (keys; `hlt merge` across files).
        self.orphaned = 0
        # per handover, [the old one's low when last heard, the next one's first LOW): the ids of the distributors
        # that died not known to be saved (the last 16 handovers; it kept only the last: a late result of the
        # one before was counted as a duplicate)
        self.previous_ids: collections.deque = collections.deque(maxlen=16)
        # the token of the distributor that took it (its answer to HELLO; None: one that sends none)
        self.distributor_instance: bytes | None = None
        self.first_upstream_error = ""
        self.bad_messages = 0
        self.confirmed = 0
        self.messages = 0
        self.bytes = 0
        self.metrics_port = 0
        self.filename = ""
        # the run's output is open (every module of the path initialized: its file exists): a collector that
        # exits before (an output folder gone, a crash at its start) made no file, and none is named for it
        self.output_made = False
        # why the output file could not be written (RootOutput's error, which names where its events are kept)
        self.output_error = ""
        # the batches confirmed, not yet in the file
        self.unsaved: collections.deque[UnsavedBatch] = collections.deque()
        self.saved = 0
        # the run's counts (run_counts) and drops (dropped_in_run) through its last batch said SAVED: after a failed
        # write, the events of the later batches go to the next collector, which counts them
        self.saved_counts = run_counts(None)
        self.saved_dropped = NO_DROPS
        # tells this process from another one with the same pid and host name (containers)
        self.instance = os.urandom(8).hex()
        self.registered = False  # the distributor took this collector (it answers HELLO with LOW)
        self.joins_run = None    # the distributor's run index in that answer
        self.joins_unstarted = False  # and that the run has not started: the file is made at its first result
        self.refused = None      # why the distributor refused it (another live collector is registered)
        self.hello()

    def hello(self):
        self.ctl.send_multipart([P.HELLO, P.pack(self.status())])

    def previous_id(self, seq) -> bool | np.ndarray:
        """Whether seq (or each of an array) is an id of a distributor that died (previous_ids)."""
        hit = False
        for lo, hi in self.previous_ids:
            hit = hit | ((seq >= lo) & (seq < hi))
        return hit

    def status(self) -> dict:
        d = {"role": "collector", "pid": os.getpid(), "host": socket.gethostname(), "instance": self.instance,
             "state": self.state,
             "address": self.address, "run_index": self.run_index, "output": self.filename,
             "output_made": self.output_made, "output_error": self.output_error,
             "duplicates": self.duplicates, "duplicates_run": self.duplicates - self.duplicates_before_run,
             "orphaned": self.orphaned, "bad_messages": self.bad_messages, "confirmed": self.confirmed,
             "saved": self.saved, "low_watermark": self.low,
             "saves": True, "metrics_port": self.metrics_port,
             "dqm_open_runs": [list(k) for k in registry.open_runs()],
             # [exp, run, parts] of the runs whose DQM is in several cycles (the run in progress, or the last one)
             "dqm_runs_in_parts": [list(k) for k in registry.runs_in_parts()]}
        d.update(eclreco.statistics.counters())
        return d

    def service(self):
        while True:
            try:
                frames = self.ctl.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            cmd = frames[0]
            if cmd == P.LOW:
                try:
                    low = int(frames[1])
                except (IndexError, ValueError):
                    self.bad_message("control", "LOW without a number")
                    continue
                if len(frames) > 2 and frames[2].isdigit():  # the answer to HELLO: the run this collector joins
                    self.joins_run = int(frames[2])
                    self.joins_unstarted = len(frames) > 3 and frames[3] == b"1"
                    # Registered again with a restarted distributor (ids above): another token, or none to tell. The
                    # same one, back after a broken connection, has only moved LOW on: its ids below are its own (a
                    # late result of one it gave up is a duplicate, not a dead distributor's orphan).
                    token = frames[4] if len(frames) > 4 else None
                    if self.low and low > self.low and (token is None or token != self.distributor_instance):
                        self.previous_ids.append((self.low, low))
                    self.distributor_instance = token
                self.low = max(self.low, low)
                self.registered = True
                if len(self.seen) > 100000:  # (those of the previous ids stay: a later copy is a duplicate)
                    self.seen = {s for s in self.seen if s >= self.low or self.previous_id(s)}
            elif cmd == P.END_RUN:
                try:  # the distributor's index of the run that ended (the collector follows it)
                    index = int(frames[1])
                except (IndexError, ValueError):
                    index = None
                if self.end_run and not self.terminate:
                    self.later_end_runs.append(index)
                else:
                    self.end_run, self.ended_run_index = True, index
            elif cmd == P.TERMINATE:
                self.end_run = self.terminate = True
            elif cmd == P.WHO:
                self.registered = False
                if self.refused is None:
                    self.hello()
            elif cmd == P.REFUSED:
                try:
                    self.refused = str(P.unpack(frames[1])["reason"])
                except Exception:  # noqa: BLE001 - still a refusal
                    self.refused = "(no reason given)"
                self.end_run = self.terminate = True
        if time.monotonic() >= self.next_report:
            self.report()

    def reset_end_run(self):
        """A run, or the wait between runs, begins: not ended, unless by an END_RUN read behind the last one's."""
        self.end_run = self.terminate
        if self.later_end_runs and not self.terminate:
            self.end_run, self.ended_run_index = True, self.later_end_runs.popleft()

    def report(self):
        """STATUS now; service() sends one every P.COLLECTOR_REPORT_S. Also at once when the output file is named: the
        distributor lists a collector that dies in the run by the file of its last report (it was '' for
        one killed within 0.5 s of registering)."""
        self.next_report = time.monotonic() + P.COLLECTOR_REPORT_S
        self.ctl.send_multipart([P.STATUS, P.pack(self.status())])

    def wait_registered(self, control: str) -> bool:
        """Waits until the distributor has taken this collector (True) or refused it (False),
        before the output file is created: a second collector must not recreate the file of the
        one that is running, and the file is named after the run it joins. The distributor may
        start later (the roles start in any order)."""
        t0 = time.monotonic()
        told = False
        while not self.registered and self.refused is None:
            self.service()
            if not told and time.monotonic() - t0 > 5.0:
                print(f"[collector] waiting for the distributor at {control}", flush=True)
                told = True
            self.ctl.poll(100, zmq.POLLIN)
        if self.joins_run:  # started in the middle of the farm's life (a replacement): its run, not 1
            self.run_index = self.joins_run
        return self.refused is None

    def bad_message(self, where: str, why: str):
        """A message that cannot be understood (a stray peer, a bug): counted and logged, ignored."""
        self.bad_messages += 1
        if self.bad_messages <= 20:
            print(f"[collector] ignored a bad message on the {where} socket: {why}", flush=True)

    def confirm(self, seqs: np.ndarray, output=None, orphans: dict | None = None, dropped: dict | None = None):
        """CONFIRM the seqs of a batch the output has taken; SAVED now when the output keeps
        nothing back (output None: ZMQOutput), else once `output.batches_written` covers it. orphans: the
        batch's orphaned results (orphan_counts), which only this collector holds until they are in the file;
        dropped: the run's dropped_in_run through this batch."""
        if len(seqs):
            self.ctl.send_multipart([P.CONFIRM, P.seqs_to_bytes(seqs)])
            self.confirmed += len(seqs)
            if output is None:
                self._saved(seqs)
            else:  # (one thread: the run's statistics count the batch, which went through the whole path)
                self.unsaved.append(UnsavedBatch(output.batches_taken, seqs, run_counts(eclreco.statistics.summary()),
                                                 orphans, dropped or NO_DROPS))

    def release_saved(self, output=None, everything: bool = False):
        """SAVED for the batches now in the output file (everything: the file was closed)."""
        if output is not None and not everything:
            output.flush_if_due()
        done = []
        while self.unsaved and (everything or self.unsaved[0].batch <= output.batches_written):
            entry = self.unsaved.popleft()
            self.saved_counts, self.saved_dropped = entry.counts, entry.dropped
            done.append(entry.seqs)
        if done:
            self._saved(np.concatenate(done), None if output is None else output.events_written_run)

    def _saved(self, seqs, written: int | None = None):
        """SAVED for seqs; written: the events in the run's file now. The seqs include events the file does
        not hold (rejected by a worker, discarded, a producer's repeat dropped here): the distributor reports
        a replaced collector's file by this count, not by the seqs it released."""
        extra = [] if written is None else [str(int(written)).encode()]
        self.ctl.send_multipart([P.SAVED, P.seqs_to_bytes(seqs), *extra])
        self.saved += len(seqs)

    def run_ended(self, info: dict):
        self.ctl.send_multipart([P.RUN_ENDED, P.pack(info)])

    def close(self):
        self.pull.close(0)
        self.ctl.close(2000)


# dropped_in_run of a run that dropped nothing
NO_DROPS = {"duplicates": 0, "repeated_keys": 0, "orphaned": 0}


def run_counts(summary: dict | None) -> dict:
    """The counts of a run that RUN_ENDED carries, of eclreco.statistics.summary() (None: all 0)."""
    s = summary or {}
    return {"received": s.get("received", 0), "discarded": s.get("discarded", 0), "errors": s.get("errors", 0),
            # of those, the events its output raised on (a write that failed): not errors of the chain
            "errors_in_outputs": s.get("errors_in_outputs", 0),
            "rejected": s.get("rejected", 0), "rejected_by_reason": dict(s.get("rejected_by_reason", {}))}


def orphan_counts(m: P.DecodedBatch, taken: np.ndarray, into: dict | None = None) -> dict:
    """The orphaned results of a message taken (indices), added to `into` (None: new counts): received, rejected
    (by reason: a worker keeps them in its quarantine file), discarded (by a filter) and the others, which are in
    no file until written (`lost` when a failed write leaves them unsaved: no distributor holds them to hand on)."""
    rejected = [m.rejections[i][0] for i in taken.tolist() if i in m.rejections]
    discarded = sum(1 for i in taken.tolist() if i in m.discards and i not in m.rejections)
    reasons = {}
    for reason in rejected:
        reasons[reason] = reasons.get(reason, 0) + 1
    return add_counts(into, {"received": len(taken), "rejected": len(rejected), "rejected_by_reason": reasons,
                             "discarded": discarded, "lost": len(taken) - len(rejected) - discarded})


def add_counts(into: dict | None, more: dict) -> dict:
    """`into` (None: nothing) plus `more`, key by key, for the keys of `more` (rejected_by_reason by reason)."""
    total = dict(into or {})
    for k, n in more.items():
        if k == "rejected_by_reason":
            reasons = dict(total.get(k, {}))
            for reason, r in n.items():
                reasons[reason] = reasons.get(reason, 0) + r
            total[k] = reasons
        else:
            total[k] = total.get(k, 0) + n
    return total


def run_report(link: CollectorLink, run_index: int, filename: str = "", written: int = 0, summary: dict | None = None,
               dropped: dict | None = None, first_error: str = "", dqm_parts: list | None = None) -> dict:
    """RUN_ENDED: what the run wrote and what failed (the stop's reply and the farm's output line);
    every key also for a run without events (it lacked all but the first five). dqm_parts: [exp, run, parts] of
    the runs whose DQM the file holds in several cycles (their totals are the sum: `eclreco dqm` sums them)."""
    dropped = dropped or NO_DROPS
    return {"run_index": run_index, "filename": filename, "events_written": written, **run_counts(summary),
            "duplicates": link.duplicates, **{k + "_run": v for k, v in dropped.items()}, "first_error": first_error,
            "dqm_parts": [list(p) for p in dqm_parts or ()]}


class HLTCollectorInput(Module):
    """HLT collector source: batches from the workers, duplicates dropped; confirms what was written."""

    def __init__(self, link: CollectorLink | None = None):
        super().__init__()
        self.add_param("max_latency_ms", 2.0, "longest wait for more results after the first")
        self.add_param("poll_ms", 100.0, "longest time between returns to the framework")
        self.add_param("max_open_runs", 8, "runs whose DQM histograms are kept apart at once (results of "
                       "several runs interleave); with more, the oldest run's are written (a later event of "
                       "it goes to a further cycle)")
        self.link = link
        self.output = None  # the RootOutput of the path, set by main (None: results go on with ZMQOutput)
        self._unconfirmed = np.zeros(0, "<u8")
        self._orphans = None  # orphan_counts of the batch of _unconfirmed (None: it has none)
        self._producers = {}
        self._runs = {}

    def is_source(self):
        return True

    def makes(self):
        return None  # the collections the workers send: those of their chain, which this process does not run

    def requires(self):
        return ()

    def initialize(self):
        if self.link is None:
            raise RuntimeError("HLTCollectorInput needs a CollectorLink")
        if self.param("max_open_runs") < 1:
            raise ValueError(f"HLTCollectorInput: max_open_runs must be >= 1, not {self.param('max_open_runs')}")
        # One DQM cycle per run: the workers' results of two runs interleave (docs/architecture.md)
        registry.keep_runs_open()
        # (exp, run) -> [first, last sequence id of its events taken, all of them had one], in order of arrival
        self._runs = {}
        self.link.reset_end_run()
        self.link.keys = RecentKeys(self.link.dedup_window)
        self.link.state = "ready"
        self.link.first_upstream_error = ""  # of the run: a worker's module error message
        self._unconfirmed = np.zeros(0, "<u8")
        self._orphans = None
        self._producers = {}  # (host, pid) or None -> [events taken, provenance JSON or None], of the run
        self._dropped_before = (self.link.duplicates, self.link.repeated_keys, self.link.orphaned)
        self.link.duplicates_before_run = self.link.duplicates
        self.link.saved_counts = run_counts(None)
        self.link.saved_dropped = NO_DROPS

    def begin_run(self, exp, run):
        self.link.state = "running"

    def _confirm_previous(self):
        # One thread: the previous batch went through the output before this call.
        self.link.confirm(self._unconfirmed, self.output, self._orphans, self.dropped_in_run())
        self._unconfirmed = np.zeros(0, "<u8")
        self._orphans = None
        self.link.release_saved(self.output)

    def next_batch(self, batch, max_events):
        link = self.link
        if not link.output_made:  # the first call of the run: every module initialized, the file made
            link.output_made = True
            link.report()
        self._confirm_previous()
        self._close_complete_runs()
        latency = self.param("max_latency_ms") * 1e-3
        t0 = time.monotonic()
        t_first = None
        msgs, n = [], 0
        while True:
            link.service()
            link.release_saved(self.output)  # also while no result comes: the flush interval runs on
            if link.end_run and not link.terminate:
                # Every result of the run was confirmed before its END_RUN: one read after it is the next run's (a
                # START while a failed stop's leftovers were written opens its input at once), taken by that run.
                if not msgs:
                    return False
                break
            try:
                while n < max_events:
                    frames = link.pull.recv_multipart(zmq.NOBLOCK)
                    link.messages += 1
                    link.bytes += sum(map(len, frames))
                    if len(frames) != 1:  # a worker sends one frame: a stray peer's message, counted once
                        link.bad_message("results", f"{len(frames)} frames, not one")
                        continue
                    data = frames[0]
                    try:
                        m = P.DecodedBatch(P.unpack(data))
                    except Exception as err:  # noqa: BLE001 - not a worker's batch: its events stay held
                        link.bad_message("results", f"{type(err).__name__}: {err or '(no message)'}")
                        continue
                    msgs.append(m)
                    if m.errors and not link.first_upstream_error:
                        link.first_upstream_error = str(next(iter(m.errors.values())))
                    n += m.n
            except zmq.Again:
                pass
            now = time.monotonic()
            if msgs and t_first is None:
                t_first = now
            if n >= max_events or _core.stop_requested():
                break
            if t_first is not None and now - t_first >= latency:
                break
            if link.end_run and not msgs:
                return False
            wait = (t_first + latency - now) if t_first is not None else (self.param("poll_ms") * 1e-3 - (now - t0))
            if wait <= 0:
                break
            link.pull.poll(max(1, int(wait * 1000)), zmq.POLLIN)
        if not msgs:
            return True
        keeps, seqs_all, orphans = [], [], None
        for m in msgs:
            keep = np.ones(m.n, dtype=bool)
            orphan = None
            if m.seq is not None:
                seqs_all.append(m.seq)
                keep = m.seq >= link.low
                above = np.flatnonzero(keep)
                keep[above] = take_new(link.seen, m.seq[above].tolist())
                if link.previous_ids and len(old := np.flatnonzero(~keep & link.previous_id(m.seq) & (m.seq < link.low))):
                    orphan = np.zeros(m.n, dtype=bool)  # first copies, written; later ones: duplicates
                    orphan[old] = take_new(link.seen, m.seq[old].tolist())
                    keep |= orphan
            cand = np.flatnonzero(keep & ((m.meta["error_flags"] & eclreco.ERROR_REJECTED) == 0))
            keys = event_keys(*(m.meta[c][cand] for c in ("exp", "run", "evt", "detector")))
            repeated = cand[~link.keys.add_new(keys)]
            keep[repeated] = False
            self._note_runs(m, cand[keep[cand]])
            link.repeated_keys += int(repeated.size)
            link.duplicates += int(m.n - keep.sum())
            if orphan is not None and len(taken := np.flatnonzero(orphan & keep)):
                link.orphaned += len(taken)
                orphans = orphan_counts(m, taken, orphans)
            keeps.append(keep)
            producer = self._producers.setdefault(m.producer, [0, None])
            producer[0] += int(keep.sum())
            if m.provenance is not None:
                producer[1] = m.provenance
        P.fill_batch(batch, msgs, keeps)
        if seqs_all:
            self._unconfirmed = np.concatenate(seqs_all)
        self._orphans = orphans
        return True

    def dropped_saved(self) -> dict:
        """dropped_in_run for the report of a failed write, which counts the events it said SAVED (the others go to the
        next collector): the orphaned results and producer's repeats (repeated_keys) of the batches in the file (a
        repeat it dropped from a later batch is handed on with its batch, the next collector takes or drops it), and
        every copy it dropped by sequence id (its event is held once at the distributor: the copy comes no more)."""
        now, saved = self.dropped_in_run(), self.link.saved_dropped
        return {"duplicates": now["duplicates"] - (now["repeated_keys"] - saved["repeated_keys"]),
                "repeated_keys": saved["repeated_keys"], "orphaned": saved["orphaned"]}

    def orphans_not_saved(self) -> dict:
        """orphan_counts of the orphaned results not in the file: of the batches confirmed and not saved, and of the
        one taken and not confirmed (the output raised on it)."""
        total = {"received": 0, "rejected": 0, "rejected_by_reason": {}, "discarded": 0, "lost": 0}
        for orphans in [entry.orphans for entry in self.link.unsaved] + [self._orphans]:
            if orphans is not None:
                total = add_counts(total, orphans)
        return total

    def _note_runs(self, m: P.DecodedBatch, taken: np.ndarray):
        """Notes the runs of a message's events taken (indices; rejected ones have no run to trust) and the
        first and last sequence id of each: numpy over the message, one Python step per run in it."""
        if not len(taken):
            return
        exp, run = m.meta["exp"][taken], m.meta["run"][taken]
        seq = None if m.seq is None else m.seq[taken]
        if (exp == exp[0]).all() and (run == run[0]).all():
            groups = [((int(exp[0]), int(run[0])), seq)]
        else:
            pairs, inverse = np.unique(np.stack([exp, run], axis=1), axis=0, return_inverse=True)
            inverse = inverse.ravel()
            groups = [((int(e), int(r)), None if seq is None else seq[inverse == i]) for i, (e, r) in enumerate(pairs)]
        for key, s in groups:
            r = self._runs.get(key)
            if r is None:
                r = self._runs[key] = [None, None, True]
            if s is None:
                r[2] = False  # an event without a sequence id (not from the distributor): no rule can close it
            else:
                lo, hi = int(s.min()), int(s.max())
                r[0] = lo if r[0] is None else min(r[0], lo)
                r[1] = hi if r[1] is None else max(r[1], hi)

    def _close_complete_runs(self):
        """Closes the DQM of the runs of which no more events can come: one whose events come before those of
        a later run (by sequence id: the distributor numbers the events in input order, and the input gives
        them run after run) when every sequence id before that later run's is confirmed and saved (the
        distributor's LOW); and beyond max_open_runs, the oldest. The rest at the end of the job
        (RootOutput). A run closed too early (an input whose runs interleave, an event held longer than
        max_open_runs runs) gets a further cycle for its late events (DQMRegistry.begin_run)."""
        runs = self._runs
        if len(runs) < 2:  # (the common case: one run, nothing to decide)
            return
        low = self.link.low
        firsts = [r[0] for r in runs.values() if r[0] is not None]
        done = [key for key, (_, last, sequenced) in runs.items()
                if sequenced and last is not None and any(last < first <= low for first in firsts)]
        excess = len(runs) - len(done) - self.param("max_open_runs")
        if excess > 0:
            done += [key for key in runs if key not in done][:excess]
        for key in done:
            del runs[key]
            registry.close_run(*key)

    def dropped_in_run(self) -> dict:
        """This run's events dropped as duplicates: redelivered copies (a worker lost, a collector
        replaced) and events whose (exp, run, evt, detector) had been taken already (a producer that repeated
        one: the spec makes them unique in a stream; reco.py processes both: docs/wire-format.md says why); apart,
        the orphaned: first results of events of a distributor that died (this collector's earlier one)."""
        d0, r0, o0 = self._dropped_before
        return {"duplicates": self.link.duplicates - d0, "repeated_keys": self.link.repeated_keys - r0,
                "orphaned": self.link.orphaned - o0}

    def provenance(self) -> dict:
        """The producers of this run's events, for the output file's metadata: each worker's host, pid,
        events taken from it (rejected ones included, duplicates not) and its path with every
        parameter and the CNN's model files (the collector's own path only reads and writes)."""
        import json

        workers = []
        for key, (events, prov) in sorted(self._producers.items(), key=lambda kv: (kv[0] is None, kv[0] or ("", 0))):
            entry = {"host": key[0] if key else None, "pid": key[1] if key else None, "events": events}
            if prov is None:
                entry["path"] = None  # a producer that sends no provenance, or none received in this run
            else:
                try:
                    d = json.loads(prov)
                except ValueError:
                    d = {"provenance_text": prov}
                if isinstance(d, dict):
                    d.pop("host", None)
                    entry.update(d)
            workers.append(entry)
        return {"workers": workers, "dropped": self.dropped_in_run()}

    def terminate(self):
        self._confirm_previous()
        self.link.state = "idle"


def _output_failed(link: CollectorLink, out, source: HLTCollectorInput) -> int:
    """RootOutput could not write its file (disk full, file-size limit, I/O error): this collector can save
    nothing more. Its file keeps what was written (RootOutput: NAME.incomplete), and the distributor has
    forgotten the events it was told SAVED for: SAVED now for every batch in the file (with its count), and a
    RUN_ENDED that names the kept file and the error; the events not in the file stay at the distributor for
    the next collector. Its counts are those of the events it said SAVED: the others go to the next collector,
    whose report counts them (they were counted by both: received, rejected and discarded twice). When the
    distributor had ended the run (the last write, at the close, failed), it is the run's report: the stop's
    reply names the error and the kept file (it said that the collector did not report the run's end within
    30 s, the error only in replaced_collectors). In the middle of the run the distributor counts it as a
    collector's that left the run (it sent none: the rejected and discarded events it had saved were counted
    nowhere). Exit 1 (hlt run restarts it, within --collector-restarts).
    The orphaned results among the events not in the file (late results of a dead distributor's events) are held
    by no distributor: nobody hands them on, and they were counted nowhere. The report counts them as received
    (rejected and discarded as such) and the others as `orphaned_lost`, in no file. Its drops are those of the
    events it said SAVED too (dropped_saved: it sent none, the orphans in its file were not counted as written)."""
    link.release_saved(out)
    link.filename = out.kept_file
    link.output_error = out.write_error
    link.report()
    unsaved = source.orphans_not_saved()
    lost = unsaved.pop("lost")
    # the runs whose DQM the kept file holds in parts (those closed or open since are in no file)
    report = run_report(link, (link.ended_run_index if link.end_run else None) or link.run_index, out.kept_file,
                        out.events_written_run if out.kept_file else 0, add_counts(link.saved_counts, unsaved),
                        source.dropped_saved(), dqm_parts=registry.runs_in_parts(in_file=True) if out.kept_file else [])
    link.run_ended({**report, "output_error": out.write_error, "orphaned_lost": lost})
    print(f"[collector] error: {out.write_error}; the distributor keeps the events not in it for the next collector"
          + (f"; {lost} late results of events of a distributor that died are lost with it (none holds them)"
             if lost else ""), file=sys.stderr, flush=True)
    return 1


def _refused_exit_code(link: CollectorLink) -> int:
    """1, with the reason on stderr, when the distributor refused this collector (at start, or
    after it restarted and took another collector first); else 0."""
    if link.refused is None:
        return 0
    print(f"[collector] error: the distributor refused this collector: {link.refused}", file=sys.stderr, flush=True)
    return 1


def output_error(output: str) -> str:
    """Why a collector cannot write --output (hlt run's and hlt collector's check before any socket), '' when
    it can: a directory was written beside itself as DIR.2 (unused_filename), a missing folder failed
    only once the collector had registered with the distributor; a tcp:// output libzmq would misread (no port,
    a port above 65535) was found only by ZMQOutput at the run's start, after the collector had registered. A
    device or a FIFO (-o /dev/null) is refused: the collector makes a new file of each run, never over an existing
    name, so it wrote /dev/null.2 (a regular file made in /dev) for what was meant to be discarded."""
    if output.startswith("tcp://"):
        from eclreco.raw_sockets import check_address

        try:
            check_address(output)
        except ValueError as err:
            return f"--output: {err}"
        return ""
    from eclreco.paths import output_file_error

    path = output_filename(output, 1)
    if why := output_file_error(path, "--output"):
        return why
    try:
        mode = os.stat(path).st_mode  # (a symlink's target)
    except OSError:  # nothing there (a dangling symlink: skipped for NAME.2 as an existing name)
        return ""
    if stat.S_ISREG(mode):
        return ""  # kept, and NAME.2 written (unused_filename)
    kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    return (f"--output {path!r} is not a regular file ({kind}): the collector makes a ROOT file of each run, never "
            "over an existing name; name a new file, or a tcp:// address to send the results on")


def root_output_options_unused(args, options=("--flush-interval", "--dqm-open-runs", "--cluster-columns")) -> str:
    """Which of `options` a tcp:// --output would ignore, as an error message ('' when none, or a ROOT file): the
    flush interval, the DQM runs and the branches are RootOutput's and ECLDQM's, which only a ROOT file output has
    (the results go on as the workers sent them). Refused when given, whatever the value (hlt run passes them on
    to a ROOT file's collector only). (hlt run's --cluster-columns chooses what its workers send: it acts with a
    tcp:// output too.)"""
    from eclreco.cli_types import option_given
    from eclreco.hlt.cli import DQM_OPEN_RUNS, FLUSH_INTERVAL_S
    from eclreco.modules.root_output import DEFAULT_CLUSTER_COLUMNS

    if not args.output.startswith("tcp://"):
        return ""
    defaults = {"--flush-interval": FLUSH_INTERVAL_S, "--dqm-open-runs": DQM_OPEN_RUNS,
                "--cluster-columns": list(DEFAULT_CLUSTER_COLUMNS)}
    given = [option for option in options if option_given(args, option, defaults[option])]
    if not given:
        return ""
    return (f"{', '.join(given)}: {'this option is' if len(given) == 1 else 'these options are'} for a ROOT file "
            f"--output (its writes, DQM histograms and branches): --output {args.output!r} sends the results on as "
            "the workers made them")


def output_filename(template: str, run_index: int) -> str:
    """The output file of run `run_index`: {run_index} replaced, else _runN after the first run's. Replaced
    as text, not by str.format: any other brace in a file name ({date}, a '{' alone) is part of the name."""
    if "{run_index}" in template:
        return template.replace("{run_index}", str(run_index))
    if run_index <= 1:
        return template
    stem, ext = os.path.splitext(template)
    return f"{stem}_run{run_index}{ext}"


def unused_filename(path: str) -> tuple[str, tuple | None]:
    """(name, reservation): path, or path with .2, .3, ... before the extension where a file is there already,
    created empty in the step that chooses it (O_CREAT | O_EXCL) for RootOutput to write into: a collector never
    overwrites a file (a replacement collector, started with the same -o while the distributor is in run N, would
    otherwise recreate the finished file of run 1). It checked that the name was free and RootOutput made the
    file later: a file made between (a second collector started by hand with the same -o) was overwritten.
    reservation: the (device, inode) of the file made, for discard_reserved; None where the name could not be
    made for another reason (its folder gone, no permission): RootOutput's initialize then says why, naming it."""
    stem, ext = os.path.splitext(path)
    name, k = path, 2
    while True:
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            name, k = f"{stem}.{k}{ext}", k + 1
            continue
        except OSError:
            reservation = None
        else:
            st = os.fstat(fd)
            os.close(fd)
            reservation = (st.st_dev, st.st_ino)
        break
    if name != path:
        print(f"[collector] warning: {path} exists (an earlier run's or collector's file, kept); writing {name}",
              file=sys.stderr, flush=True)
    return name, reservation


def discard_reserved(name: str, reservation: tuple | None):
    """Removes the file unused_filename made when the run failed before its output was made (a module's
    initialize, RootOutput's header write): empty or a header cut short, under a name no report gives (a
    collector that exits before its file is made makes none). Only that file: one put in its place is kept."""
    try:
        st = os.stat(name)
        if reservation == (st.st_dev, st.st_ino):
            os.remove(name)
    except OSError:  # gone already
        pass


def _wait_for_results(link: CollectorLink) -> bool:
    """Between runs: the next run (and its output file) begins with its first result (True); False at a
    terminate or a signal. A run without any result (start, then stop) still ends here: reported at once (no
    file), and the next file is named after the distributor's run index (the stop used to wait 30 s for the
    report, and the file names then lagged one run behind)."""
    link.state = "idle"
    while not link.terminate and not _core.stop_requested():
        link.reset_end_run()
        link.service()
        if link.end_run and not link.terminate:
            idx = link.ended_run_index or link.run_index
            link.run_ended(run_report(link, idx))
            print(f"[collector] run {idx} ended without events", flush=True)
            link.run_index = idx + 1
            continue
        if link.pull.poll(100, zmq.POLLIN):
            return True
    return False


def main(args) -> int:
    whole_lines()  # its lines whole in a log shared with the other roles
    from eclreco import open_files, scheduling
    from eclreco.cli_types import metrics_host_unused
    from eclreco.curve import Curve, curve_option_error
    from eclreco.hlt.worker import curve_params

    if why := output_error(args.output):  # a bad option: exit 2 (cli.main), before the distributor knows it
        raise ValueError(why)
    if args.output_bind and not args.output.startswith("tcp://"):  # ignored, it wrote the file as if not given
        raise ValueError(f"--output-bind binds a tcp:// output: --output {args.output!r} is a ROOT file")
    if why := root_output_options_unused(args):  # and these ignored with a tcp:// one
        raise ValueError(why)
    if why := curve_option_error(args, "collector", P.curve_servers("collector", args)):
        raise ValueError(why)
    if why := metrics_host_unused(args):
        raise ValueError(why)
    scheduling.apply(args.sched, "collector")  # before the ZeroMQ context: its threads inherit the policy
    open_files.raise_soft_limit("collector")  # it accepts the connections of every worker
    link = CollectorLink(args.collector_addr, args.control, curve=Curve.from_args(args, "collector"),
                         dedup_window=args.dedup_window)
    exporter = None
    path = eclreco.create_path()
    if args.metrics_port >= 0:
        from eclreco.metrics import serve_role_metrics
        from prometheus_client.core import CounterMetricFamily

        def extra():
            f = CounterMetricFamily("eclreco_hlt_duplicates", "Duplicate events dropped by the collector")
            f.add_metric([], link.duplicates)
            yield f
            f = CounterMetricFamily("eclreco_hlt_orphaned_results", "Results of events of a distributor that died "
                                    "(first copies, not duplicates): written, no distributor holds them")
            f.add_metric([], link.orphaned)
            yield f
            f = CounterMetricFamily("eclreco_hlt_bad_messages", "Messages that were not understood (ignored)")
            f.add_metric([], link.bad_messages)
            yield f
            f = CounterMetricFamily("eclreco_hlt_events_confirmed", "Events confirmed to the distributor")
            f.add_metric([], link.confirmed)
            yield f
            f = CounterMetricFamily("eclreco_input_bytes_received", "Bytes of result messages received")
            f.add_metric([], link.bytes)
            yield f

        exporter = serve_role_metrics("collector", args.metrics_port, args.metrics_host, path=path, extra=extra)
        link.metrics_port = exporter.port
    def interrupt(sig, frame):  # before a distributor took it: no file is made, leave at once
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # (SIGINT raises it already) it was the default: killed by it
    try:
        registered = link.wait_registered(args.control)
    except KeyboardInterrupt:
        print("[collector] stopped before a distributor took it: no file made", flush=True)
        registered = False
    if not registered:
        link.close()
        if exporter is not None:
            exporter.close()
        return _refused_exit_code(link)
    source = HLTCollectorInput(link)
    path.add_module(source, max_latency_ms=args.max_latency, max_open_runs=args.dqm_open_runs)
    out = None
    if args.output.startswith("tcp://"):
        path.add_module("ZMQOutput", address=args.output, bind=args.output_bind,
                        **curve_params(args, "collector", "reco"))
    else:
        # the DQM histograms of the whole farm, in the file as in a single-process job (dqm/)
        path.add_module("ECLDQM")
        out = path.add_module("RootOutput", filename=output_filename(args.output, 1),
                              flush_interval_s=args.flush_interval, cluster_columns=args.cluster_columns)
        source.output = out
    def on_signal(sig, frame):  # between runs; during one, eclreco.process handles them (the file is closed)
        _core.request_stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"[collector] pid {os.getpid()} {path} on {link.address}, control {args.control}, metrics "
          f"{exporter.port if exporter else '-'}", flush=True)
    try:
        # registered between runs: the next run's file is made at its first result (the run may never start)
        if link.joins_unstarted and not _wait_for_results(link):
            return _refused_exit_code(link)
        while True:
            if out is not None:
                link.filename, reservation = unused_filename(output_filename(args.output, link.run_index))
                out.set_param("filename", link.filename)
            else:
                link.filename, reservation = args.output, None
            link.output_made = False
            link.report()  # the name before the file is made; output_made follows once it is (next_batch)
            try:
                eclreco.process(path, threads=1, batch_size=args.batch_size)
            except Exception:
                if not link.output_made:
                    discard_reserved(link.filename, reservation)
                if out is None or not out.write_error:
                    raise
                return _output_failed(link, out, source)
            if exporter is not None:
                exporter.checkpoint()
            link.release_saved(out, everything=True)  # the file of the run is closed
            s = eclreco.statistics.summary()
            # discarded: events a worker's event filter did not keep (processed, counted, not written)
            # errors: events a module failed on here (e.g. RootOutput asked for a column the workers do not send)
            written = out.events_written_run if out is not None else s.get("processed", 0) - s.get("discarded", 0)
            errors = eclreco.statistics.state.error_messages() if s.get("errors", 0) else []
            # the collector's own modules' first message, else the first a worker sent
            link.run_ended(run_report(link, link.run_index, link.filename, written, s, source.dropped_in_run(),
                                      errors[0] if errors else link.first_upstream_error,
                                      registry.runs_in_parts()))
            # where the collector's time went in the run (module table, as the workers print it)
            print(f"[collector] run {link.run_index} ended: {written} events written to {link.filename}\n"
                  f"{eclreco.statistics}", flush=True)
            if _core.stop_requested() or link.terminate:
                break
            link.run_index = (link.ended_run_index or link.run_index) + 1
            if not _wait_for_results(link):
                break
        return _refused_exit_code(link)
    finally:
        link.service()
        link.close()
        if exporter is not None:
            exporter.close()
        del source
