"""Helpers of the streaming/HLT tests: wire-format envelopes, free ports, a PUSH feeder."""
from __future__ import annotations

import struct
import time
import zlib

import msgpack
import zmq

from eclreco.hlt.run import free_address, free_port  # noqa: F401 - the tests' ports, as hlt run picks its own


def payload(evt: int) -> bytes:
    """A valid ECL payload (spec/wire-format.md): collector 1, shaper 1, one or two good hits."""
    mask = 0b1 if evt % 2 == 0 else 0b11
    hits = [(1000 + evt % 500) + 128] + ([400 + 128] if mask == 0b11 else [])
    words = [(0xEC << 24) | (1 << 16) | (1 + len(hits)), (0x10 << 24) | (1 << 16) | mask] + hits
    return struct.pack(f"<{len(words)}I", *words)


def envelope(evt: int, exp: int = 1, run: int = 1, det: str = "belle2-ecl") -> bytes:
    ecl = payload(evt)
    return msgpack.packb({"v": 1, "exp": exp, "run": run, "evt": evt, "det": det, "ecl": ecl,
                          "time_ns": 1_700_000_000_000_000_000 + evt, "crc32": zlib.crc32(ecl)},
                         use_bin_type=True)


def read_quarantine(path) -> list[dict]:
    """The records of a quarantine file (RejectedOutput, the HLT workers' --rejected), as `eclreco
    quarantine` reads them: a record that is not one, or a file cut inside a record, is an error."""
    from eclreco.quarantine import read_records

    return list(read_records(path))


def big_envelope(evt: int, nbytes: int) -> bytes:
    """A valid envelope of more than nbytes (the spec sets no size; `truth` may hold anything)."""
    m = msgpack.unpackb(envelope(evt), raw=False)
    m["truth"] = {"pad": b"t" * nbytes}
    return msgpack.packb(m, use_bin_type=True)


def push_events(address: str, evts, exp: int = 1, run: int = 1, rate_hz: float = 0.0, timeout_s: float = 60.0,
                ctx=None) -> int:
    """Connect a PUSH socket to `address` and send one envelope per evt (blocking on backpressure)."""
    return push_messages(address, (envelope(int(e), exp=exp, run=run) for e in evts), rate_hz=rate_hz,
                         timeout_s=timeout_s, ctx=ctx)


def push_messages(address: str, messages, rate_hz: float = 0.0, timeout_s: float = 60.0, ctx=None) -> int:
    """Connect a PUSH socket to `address` and send each message (blocking on backpressure); a
    message given as a list of frames is sent as one multipart message."""
    ctx = ctx or zmq.Context.instance()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 1000)
    s.setsockopt(zmq.LINGER, int(timeout_s * 1000))
    s.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    s.connect(address)
    t0 = time.monotonic()
    n = 0
    for k, m in enumerate(messages):
        if rate_hz > 0:
            due = t0 + k / rate_hz
            delay = due - time.monotonic()
            if delay > 0.001:
                time.sleep(delay)
        if isinstance(m, list):
            s.send_multipart(m)
        else:
            s.send(m)
        n += 1
    s.close()
    return n


def send_until_blocked(push, messages) -> int:
    """Sends `messages` on `push` (a socket with a SNDTIMEO) until one is refused (zmq.Again: the receiver's
    queue, the kernels' buffers and the socket's own queue are full); how many were sent."""
    n = 0
    for m in messages:
        try:
            push.send(m)
        except zmq.Again:
            break
        n += 1
    return n


def bind_send_and_close(address: str, messages, after_handshake=None) -> None:
    """A plain pyzmq sender that binds `address`, waits for a receiver's handshake (then calls
    after_handshake), writes `messages` and closes: its own context's term returns once libzmq has
    written everything, which on ipc:// the kernel may still hold unread (a DAQ sender's exit)."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 5000)
    s.bind(address)
    mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    assert mon.poll(10000), f"no receiver connected to {address}"
    if after_handshake is not None:
        after_handshake()
    for m in messages:
        s.send(m)
    s.disable_monitor()
    mon.close()
    s.close()
    ctx.term()
