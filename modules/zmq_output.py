"""ZMQOutput: reconstructed events downstream over ZeroMQ, one MessagePack message per batch."""
from __future__ import annotations

import os
import socket
import sys
import time

from eclreco import Module, _core
from eclreco.curve import apply_curve_params, declare_curve_params
from eclreco.raw_sockets import attach


class ZMQOutput(Module):
    """Sends each batch downstream as one MessagePack message over a ZeroMQ PUSH socket.

    The message (docs/deployment.md, "batch message") holds the metadata columns exp, run, evt,
    error_flags, time_ns, detector, the per-event counts and the columns of `collections`
    (default ECLClusters), counts only of `count_collections` (default ECLDigits), the rejection
    reasons, discards and module errors and, inside the HLT, the distributor's sequence ids. Every
    message names its producer (host, pid); the first one of a run, and one every
    `provenance_interval_s`, also carry the producer's provenance (its path with every parameter
    and the CNN's model files: what the HLT collector records in its file's metadata). The
    events an event filter discarded go with their metadata and reason but without their rows in
    `strip_discarded` (default ECLClusters). `columns` restricts the columns sent; a name none of the sent
    collections will have is refused at initialize where their columns are known (framework.columns_made),
    else left out with one warning on stderr at the first batch that holds every collection of `collections`
    (the receiver, which knows what it needs, says so too). Arrays are raw little-endian
    bytes with dtype and shape. Sending blocks while the receiver is slow (high-water mark), so
    the chain feels backpressure; after a stop request it gives the receiver `stop_timeout_s`
    more and then drops (and counts) what it could not send; at terminate it waits up to
    `stop_timeout_s` for the receiver to take what is queued (one started late, a slow one). With
    `give_up_unconnected` it gives a receiver that is not connected (dead) no time at all.
    """

    def __init__(self):
        super().__init__()
        self.add_param("address", "tcp://127.0.0.1:5560", "ZeroMQ endpoint of the receiver")
        self.add_param("bind", False, "bind the address instead of connecting to it")
        self.add_param("collections", ["ECLClusters"], "collections sent with all their columns")
        self.add_param("count_collections", ["ECLDigits"], "collections sent as per-event counts only")
        self.add_param("columns", [], "restrict the columns sent, of every collection of `collections` (empty: all); "
                       "a name that none will have is refused at initialize where that is known (collections "
                       "ECLClusters alone, made by ECLClusterizer, only eclreco's modules after it), elsewhere not "
                       "sent where a batch lacks it, said once on stderr at the first batch that holds every "
                       "collection, and by its receiver (the HLT collector's RootOutput fails the events, all "
                       "counted: docs/deployment.md)", type="list[str]")
        self.add_param("strip_discarded", ["ECLClusters"], "collections sent without the rows of events that an "
                       "event filter discarded (their count 0; not a per-event collection such as ECLEventInformation)",
                       type="list[str]")
        self.add_param("sndhwm", 100, "send high-water mark, in batch messages")
        self.add_param("stop_timeout_s", 10.0, "after a stop request, give up sending after this long")
        self.add_param("give_up_unconnected", False, "after a stop request, drop at once what waits for a receiver "
                       "that is not connected (one that died), and close without lingering for it: for results "
                       "that are kept upstream until confirmed (the HLT worker's: the distributor has them)")
        self.add_param("provenance_interval_s", 10.0, "resend the provenance (this process's path) this often, so that "
                       "a receiver started later learns it too (it is always in the first message of a run)")
        declare_curve_params(self, "worker", "collector")
        self._sock = None
        self._ctx = None
        self._monitor = None
        # called with the seconds waited, about every 0.2 s, while the receiver takes nothing: the HLT worker
        # heartbeats from it (its source, which heartbeats otherwise, is not called while this blocks)
        self.on_wait = None
        self.batches_sent = self.events_sent = self.bytes_sent = self.batches_dropped = 0
        self._columns_unchecked = False  # `columns` to check at the first batch (initialize)

    def ordered(self):
        return True

    def writes_events(self):
        return True

    def makes(self):
        return ()

    def requires(self):  # it sends what the batch has of its collections
        return ()

    def initialize(self):
        import zmq

        from eclreco.framework import modules_before, unknown_columns_error

        self._collections = collections = list(dict.fromkeys(self.param("collections")))  # (a name given twice: once)
        # Before the socket: a misspelt name is refused, not left out of every message without a word. A name may
        # be of any of the collections, so it is known to be of none only where they are one whose columns are
        # known (columns_made: ECLClusters of the clusterizer's chain), as by default.
        before = modules_before(self)
        if before is not None and len(collections) == 1 and (
                why := unknown_columns_error(before, collections[0], self.param("columns"), "ZMQOutput: columns")):
            raise ValueError(why)
        # elsewhere checked at the first batch that holds the collections: a warning, not an error (the HLT worker's
        # events would stay unsent and unconfirmed, the farm stalled: docs/deployment.md)
        self._columns_unchecked = bool(self.param("columns"))

        self._zmq = zmq
        # Its own context, terminated at terminate(): a socket's linger is kept only by the context's
        # term (its I/O thread delivers the queue), and the shared Context.instance() is never
        # terminated: a job that exited after its last send dropped what was queued, counted as sent.
        self._ctx = zmq.Context()
        self._sock = s = self._ctx.socket(zmq.PUSH)
        try:
            s.setsockopt(zmq.SNDHWM, int(self.param("sndhwm")))
            s.setsockopt(zmq.LINGER, int(self.param("stop_timeout_s") * 1000))
            apply_curve_params(self, s)
            if self.param("give_up_unconnected"):
                from eclreco.raw_sockets import ConnectionMonitor

                self._monitor = ConnectionMonitor(s)  # before the connect: it sees every connection
            attach(s, self.param("address"), bind=self.param("bind"), what="ZMQOutput address")
        except Exception:
            self._close(linger=0)
            raise
        self._producer = {"host": socket.gethostname(), "pid": os.getpid()}
        self._provenance = None  # made at the first event: every module of the path has initialized by then
        self._provenance_due = 0.0

    def begin_run(self, exp, run):
        self._provenance_due = 0.0

    def event(self, batch):
        from eclreco.hlt.protocol import batch_to_message, pack

        columns = self.param("columns")
        if self._columns_unchecked:
            self._warn_of_unsent_columns(batch)
        msg = batch_to_message(batch, collections=self.param("collections"),
                               count_collections=self.param("count_collections"), columns=columns,
                               strip_discarded=self.param("strip_discarded"))
        msg["producer"] = self._producer
        now = time.monotonic()
        if now >= self._provenance_due:
            if self._provenance is None:
                import json

                from eclreco.framework import job_provenance, running_path

                # JSON text: a parameter value msgpack cannot pack must not fail the events
                self._provenance = json.dumps(job_provenance(running_path()), default=str)
            msg["provenance"] = self._provenance
            self._provenance_due = now + self.param("provenance_interval_s")
        data = pack(msg)
        zmq = self._zmq
        stop_since = None
        t_wait = None
        while True:
            if self._sock.poll(200, zmq.POLLOUT):
                self._sock.send(data, copy=False)  # pyzmq copies what is below its copy_threshold
                break
            t_wait = t_wait or time.monotonic()
            if self.on_wait is not None:
                self.on_wait(time.monotonic() - t_wait)
            if _core.stop_requested():
                stop_since = stop_since or time.monotonic()
                if time.monotonic() - stop_since > self.param("stop_timeout_s") or self._receiver_gone():
                    self.batches_dropped += 1
                    return
        self.batches_sent += 1
        self.events_sent += len(batch)
        self.bytes_sent += len(data)

    def _warn_of_unsent_columns(self, batch):
        """Once, at the first batch that holds every collection of `collections`: the names of `columns` that none of
        them has (a misspelt name, where initialize could not refuse it) are said on stderr, the log of a farm's
        worker; a batch without some collection cannot tell."""
        collections = self._collections
        if not all(name in batch for name in collections):
            return
        self._columns_unchecked = False
        have = {name: list(batch[name].columns()) for name in collections}
        unsent = [n for n in self.param("columns") if not any(n in cols for cols in have.values())]
        if unsent:
            print(f"ZMQOutput: warning: columns: {', '.join(repr(n) for n in unsent)} "
                  f"{'is a column' if len(unsent) == 1 else 'are columns'} of none of the collections sent, so not "
                  f"sent (its receiver lacks it); their columns: "
                  + "; ".join(f"{name}: {', '.join(cols) or '(none)'}" for name, cols in have.items()),
                  file=sys.stderr, flush=True)

    def _receiver_gone(self) -> bool:
        """give_up_unconnected: no receiver is connected now (a dead one's connection is closed by its
        kernel; one that is alive but stopped keeps it)."""
        m = self._monitor
        if m is None:
            return False
        m.poll()
        return m.connections <= m.disconnects

    def terminate(self):
        if self._sock is not None:
            # else it lingers up to stop_timeout_s to deliver what is queued
            self._close(linger=0 if self._receiver_gone() else None)

    def _close(self, linger):
        """Closes the socket, its monitor's socket and then the context, whose term waits for the linger: a
        context with a socket still open (the monitor's, after a failed attach) never terminates."""
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        self._sock.close(linger)
        self._sock = None
        self._ctx.term()
        self._ctx = None

    def counters(self):
        return {"batches_sent": float(self.batches_sent), "events_sent": float(self.events_sent),
                "bytes_sent": float(self.bytes_sent), "batches_dropped": float(self.batches_dropped)}
