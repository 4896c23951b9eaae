"""ZMQInput: raw events (docs/wire-format.md, one envelope per message) from a ZeroMQ PULL socket."""
from __future__ import annotations

import sys
import time

from eclreco import Module, _core
from eclreco.curve import apply_curve_params, declare_curve_params
from eclreco.framework import RAW


class ZMQInput(Module):
    """Raw events from a ZeroMQ PULL socket (bind or connect), batched by count or latency.

    A batch holds up to max_events messages or what arrived within max_latency_ms of its first
    message. idle_timeout_s > 0 ends the run that long after the last message (counting starts
    at the first message). A message larger than max_message_bytes is rejected as ``oversize``,
    counted and kept like any bad message, and the stream goes on. Only above
    refuse_message_bytes (a memory guard, far higher) does libzmq refuse a message before it is
    read (ZMQ_MAXMSGSIZE): the receiver drops the sender's connection, the sender's socket
    reconnects by itself, and the message and whatever the sender had already written behind it
    on that connection are lost; such a drop is counted as a dropped connection
    (``disconnects``; a sender closing its socket counts there too). An ipc:// sender that closes its
    connection while this input's queue is full (rcvhwm) loses what it had written and the input not
    read (libzmq drops the connection with it): counted in bytes (``lost_bytes_at_disconnect``) and
    said. The module returns to the
    framework at least every poll_ms, so that SIGINT/SIGTERM end the run promptly: after a stop
    request it reads on, and the chain processes what it reads, until the input has been quiet
    for stop_drain_ms (at most stop_timeout_s), since the messages queued in the socket would be
    lost with it; not after an output that cannot write ended the run (they would be lost in it). Messages still queued when the run ends (the stop timeout reached, or sent
    after the idle timeout or the event count ended the run), and those in flight in its tcp:// connections
    (each ended first and read to its end: raw_sockets.end_input), are counted as ``unread_at_end`` and reported.

    Memory is bounded in bytes by max_queue_bytes, with back-pressure (nothing is dropped): a sender
    connection's receive queue holds at most max_queue_bytes // refuse_message_bytes messages (rcvhwm
    lowered to that, at least 1; libzmq counts its queue in messages, each up to refuse_message_bytes),
    beyond which libzmq stops reading that connection and the sender blocks; and a batch ends at the
    message that brings it to max_queue_bytes (the rest wait in the queue). Worst case: connections x
    max_queue_bytes queued (+ the kernel's socket buffers) and, per batch the processor holds (at most
    3 x threads + 1), max_queue_bytes + refuse_message_bytes. rcvhwm x refuse_message_bytes alone was
    640 GiB per connection.
    """

    def __init__(self):
        super().__init__()
        self.add_param("address", "tcp://127.0.0.1:5555", "ZeroMQ endpoint, e.g. tcp://127.0.0.1:5555")
        self.add_param("bind", True, "bind the address (True) or connect to it (False)")
        self.add_param("idle_timeout_s", 0.0, "end the run this long after the last message (0: never)")
        self.add_param("max_latency_ms", 20.0, "longest wait for a batch to fill after its first message (<= 60000)")
        self.add_param("max_message_bytes", 1 << 20, "larger messages are rejected as oversize and kept (0: no limit)")
        self.add_param("refuse_message_bytes", 64 << 20,
                       "larger messages are refused by the socket unread, their connection dropped (0: no limit)")
        self.add_param("rcvhwm", 10000, "receive high-water mark (messages queued per connection before the sender "
                       "blocks); lowered to max_queue_bytes // refuse_message_bytes")
        self.add_param("max_queue_bytes", 1 << 30, "bytes a connection's receive queue holds at most (the sender blocks "
                       "beyond), and a batch ends at the message that reaches them (0: no bound: rcvhwm x "
                       "refuse_message_bytes per connection)")
        self.add_param("poll_ms", 100.0, "longest time between returns to the framework (<= 60000)")
        self.add_param("stop_drain_ms", 200.0, "after SIGINT/SIGTERM, read on until the input is quiet this long "
                       "(0: stop at once)")
        self.add_param("stop_timeout_s", 10.0, "after SIGINT/SIGTERM, read on at most this long")
        declare_curve_params(self, "reco", "daq")
        self._ctx = self._sock = self._monitor = None
        self.messages_received = 0
        self.bytes_received = 0
        self.unread_at_end = 0
        self._closed_counts = {}  # connection counters of the sockets of earlier runs (cumulative)
        self._first = self._last = None
        self._ended = False
        self._stop_at = self._quiet_since = None
        self._msgs_bytes = 0  # the bytes of the batch being read

    def is_source(self):
        return True

    def drains_at_stop(self):
        return self.param("stop_drain_ms") > 0

    def makes(self):
        return RAW

    def requires(self):
        return ()

    def initialize(self):
        import zmq

        for name, ok, rule in (("idle_timeout_s", self.param("idle_timeout_s") >= 0, ">= 0 (0: never)"),
                               ("max_latency_ms", self.param("max_latency_ms") >= 0, ">= 0"),
                               ("max_latency_ms", self.param("max_latency_ms") <= 60_000, "<= 60000 (a minute)"),
                               ("poll_ms", 0 < self.param("poll_ms") <= 60_000, "> 0 and <= 60000 (a minute)"),
                               ("stop_drain_ms", self.param("stop_drain_ms") >= 0, ">= 0 (0: stop at once)"),
                               ("stop_timeout_s", self.param("stop_timeout_s") >= 0, ">= 0"),
                               ("max_message_bytes", self.param("max_message_bytes") >= 0, ">= 0 (0: no limit)"),
                               ("refuse_message_bytes", self.param("refuse_message_bytes") >= 0, ">= 0 (0: no limit)"),
                               ("rcvhwm", self.param("rcvhwm") >= 0, ">= 0"),
                               ("max_queue_bytes", self.param("max_queue_bytes") >= 0, ">= 0 (0: no bound)")):
            if not ok:
                raise ValueError(f"ZMQInput: {name} must be {rule}")
        from eclreco.raw_sockets import ConnectionMonitor, attach, check_message_limits, check_queue_bound

        check_message_limits("ZMQInput", self.param("max_message_bytes"), self.param("refuse_message_bytes"))
        check_queue_bound("ZMQInput", self.param("max_queue_bytes"), self.param("refuse_message_bytes"))

        self._zmq = zmq
        self._ctx = zmq.Context.instance()
        s = self._ctx.socket(zmq.PULL)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, self.queue_hwm)
        if self.param("refuse_message_bytes") > 0:
            s.setsockopt(zmq.MAXMSGSIZE, int(self.param("refuse_message_bytes")))
        # ipc:// connections held, so that events libzmq drops unread with one are counted (raw_sockets);
        # tcp:// connections tracked, to end them before the close tears them down (terminate)
        self._monitor = ConnectionMonitor(s, hold_ipc=True, track_tcp=True)
        apply_curve_params(self, s)
        address = self.param("address")
        attach(s, address, bind=self.param("bind"), what="ZMQInput address")
        self._waits_for_peer = not self.param("bind")
        self._sock = s
        self._first = self._last = None
        self._ended = False
        self._stop_at = self._quiet_since = None

    @property
    def queue_hwm(self) -> int:
        """The receive high-water mark set on the socket: rcvhwm, lowered so that a connection's queue of
        messages of up to refuse_message_bytes holds at most max_queue_bytes (0: unlimited, as libzmq reads it)."""
        from eclreco.raw_sockets import queue_hwm

        return queue_hwm(*(int(self.param(k)) for k in ("rcvhwm", "max_queue_bytes", "refuse_message_bytes")))

    def _read_waiting(self, msgs: list, max_events: int) -> bool:
        """Appends the messages waiting in the socket to msgs until it holds max_events or max_queue_bytes (the
        rest wait in the queue, whose sender blocks when it is full); True when msgs is full."""
        from eclreco.raw_sockets import recv_message

        bound = int(self.param("max_queue_bytes"))
        try:
            while len(msgs) < max_events and not (bound and self._msgs_bytes >= bound):
                msgs.append(recv_message(self._sock, max_bytes=int(self.param("max_message_bytes"))))
                self._msgs_bytes += len(msgs[-1])
        except self._zmq.Again:
            pass
        return len(msgs) >= max_events or bool(bound and self._msgs_bytes >= bound)

    @property
    def endpoint(self) -> str:
        """The bound endpoint (with the real port when the address asked for port 0 or '*')."""
        return self._sock.getsockopt_string(self._zmq.LAST_ENDPOINT) if self._sock is not None else ""

    def next_batch(self, batch, max_events):
        if _core.stop_requested() and _core.output_failed():
            # An output can keep nothing more: what is queued stays unread (counted as unread_at_end), and
            # what the sender still holds stays with it. Read on, it was processed into no file (18240 of
            # 40000 events of a stream, flagged as module errors, after a full disk under reco.py).
            return False
        if _core.stop_requested() and self.drains_at_stop():
            return self._drain(batch, max_events)
        zmq = self._zmq
        sock = self._sock
        msgs: list[bytes] = []
        self._msgs_bytes = 0
        latency = self.param("max_latency_ms") * 1e-3
        idle = self.param("idle_timeout_s")
        poll_s = self.param("poll_ms") * 1e-3
        t_enter = time.monotonic()
        t_batch = None
        while True:
            full = self._read_waiting(msgs, max_events)
            now = time.monotonic()
            if msgs and t_batch is None:
                t_batch = now
            if full or _core.stop_requested():
                break
            if t_batch is not None:
                wait = t_batch + latency - now
                if wait <= 0:
                    break
            else:
                if idle > 0 and self._last is not None and now - self._last >= idle:
                    self._ended = True
                    break
                wait = poll_s - (now - t_enter)
                if wait <= 0:
                    break
                if idle > 0 and self._last is not None:
                    wait = min(wait, self._last + idle - now)
            sock.poll(max(1, int(wait * 1000)), zmq.POLLIN)
        self._take(batch, msgs)
        return not self._ended

    def _take(self, batch, msgs):
        if self._monitor is not None:
            lost = self._monitor.lost_bytes
            if self._waits_for_peer:  # connecting: a sender that is not there is said, not waited for in silence
                self._waits_for_peer = not self._monitor.say_while_unconnected("[ZMQInput]", self.param("address"))
            else:
                self._monitor.poll()
            self._monitor.say_lost("ZMQInput:", self.param("address"), lost)
        if msgs:
            now = time.monotonic()
            if self._first is None:
                self._first = now
            self._last = now
            self.messages_received += len(msgs)
            self.bytes_received += sum(map(len, msgs))
            _core.append_envelopes(batch, msgs)

    def _drain(self, batch, max_events):
        """After a stop request: what the socket holds and what still comes, until it has been
        quiet for stop_drain_ms, or stop_timeout_s after the request. Batches fill as in the run
        (max_events, or max_latency_ms after their first message): returned at the first empty
        poll, a source still sending at 2 kHz made batches of one or two events, each paying the
        chain's per-batch cost (the CNN's call): 213 against 19 us of CPU per event in the chain."""
        zmq, sock = self._zmq, self._sock
        quiet_s, limit_s = self.param("stop_drain_ms") * 1e-3, self.param("stop_timeout_s")
        latency = self.param("max_latency_ms") * 1e-3
        now = time.monotonic()
        if self._stop_at is None:
            self._stop_at = self._quiet_since = now
        if now - self._stop_at >= limit_s:
            self._ended = True
        msgs: list[bytes] = []
        self._msgs_bytes = 0
        t_batch = None
        while not self._ended:
            n = len(msgs)
            full = self._read_waiting(msgs, max_events)
            now = time.monotonic()
            if len(msgs) > n:
                self._quiet_since = now  # quiet counts from the last message read
                if t_batch is None:
                    t_batch = now
            if full:
                break
            if now - self._stop_at >= limit_s or now - self._quiet_since >= quiet_s:
                self._ended = True
            elif msgs and now - t_batch >= latency:
                break
            else:
                deadline = min(self._quiet_since + quiet_s, self._stop_at + limit_s)
                if msgs:
                    deadline = min(deadline, t_batch + latency)
                sock.poll(max(1, int((deadline - now) * 1000)), zmq.POLLIN)
        self._take(batch, msgs)
        return not self._ended

    def _count_unread(self) -> int:
        """Messages left in the socket's queue and in the kernels' buffers of its tcp:// connections, which its
        close would tear down with them (the sender's libzmq had them sent): read to their end and counted, not
        read into the chain (raw_sockets.end_input: a source that sends on is ended after stop_drain_ms). What
        libzmq dropped unread all the same is counted in lost_bytes_at_disconnect."""
        from eclreco.raw_sockets import end_input

        if self._sock is None or self._monitor is None:
            return 0
        sock = self._sock

        def detach():
            if self.param("bind"):
                sock.unbind(sock.getsockopt_string(self._zmq.LAST_ENDPOINT))
            else:
                sock.disconnect(self.param("address"))

        return end_input(sock, self._monitor, detach, force_after_s=self.param("stop_drain_ms") / 1000)

    def terminate(self):
        lost = self._monitor.lost_bytes if self._monitor is not None else 0
        unread = self._count_unread()
        if unread:
            self.unread_at_end += unread
            why = ("an output could not write, which ended the run" if _core.output_failed()
                   else "the run was stopped and the drain (stop_drain_ms, stop_timeout_s) ended" if _core.stop_requested()
                   else "the run had ended before they were read: its event count (-n) reached, or its input "
                   "idle for idle_timeout_s")
            print(f"ZMQInput: warning: {unread} messages were still queued at the input when the run ended and "
                  f"were not processed ({why})", file=sys.stderr, flush=True)
        if self._monitor is not None:
            self._monitor.close()
            self._monitor.say_lost("ZMQInput:", self.param("address"), lost, at_end=True)
            for k, v in self._monitor.counters().items():
                self._closed_counts[k] = self._closed_counts.get(k, 0.0) + v
            self._monitor = None
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def counters(self):
        out = {"messages_received": float(self.messages_received), "bytes_received": float(self.bytes_received),
               "unread_at_end": float(self.unread_at_end),
               "disconnects": 0.0, "connections": 0.0, "auth_failures": 0.0, "lost_bytes_at_disconnect": 0.0}
        live = self._monitor.counters() if self._monitor is not None else {}
        for k in ("disconnects", "connections", "auth_failures", "lost_bytes_at_disconnect"):
            out[k] = self._closed_counts.get(k, 0.0) + live.get(k, 0.0)
        return out
