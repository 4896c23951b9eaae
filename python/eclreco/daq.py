"""DAQ emulator: replays a raw file over a ZeroMQ PUSH socket at a steady rate.

    eclreco daq-emulator --input run.msgpack --connect tcp://127.0.0.1:5555 --rate 30000 [--loop] [--events N]

One event per ZeroMQ message (a single frame holding the envelope bytes, spec/wire-format.md).
Pacing: the number of messages due is computed from a monotonic clock (rate x elapsed time) and
the emulator sends whatever is due in one burst, then sleeps for a tick (--tick-ms, 1 ms), so
that rates of 30-100 kHz are reachable despite the coarse granularity of sleep() and the
receivers are not woken once per event (a DAQ readout sends in bursts too). Rate 0 sends as
fast as the socket takes them (--tick-ms is then refused: it would do nothing). The socket binds
(--bind) or connects (--connect) exactly to the address given and to nothing else.
"""
from __future__ import annotations

import argparse
import itertools
import os
import struct
import sys
import time
from typing import Callable, Iterable

from eclreco import scheduling
from eclreco.cli_types import ADDRESS, CONNECT_ADDRESS, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, input_file
from eclreco.log_lines import whole_lines
from eclreco.rawdata import RawFile, RawFileError, count_messages, not_a_raw_file, read_raw_file


_UINT64, _UINT32 = struct.Struct(">Q"), struct.Struct(">I")


# --tick-ms when not given: with a rate, what is due goes out at least every millisecond
TICK_MS = 1.0
# --curve-server when not given: the key name of the farm's input (a reco.py -i tcp:// is 'reco')
CURVE_SERVER = "distributor"

# A looped replay of a file up to this size holds it in memory, its envelopes decoded once: a pass then costs ~2 us
# per message, not the ~7 us of reading and decoding it again (at 30 kHz, a fifth of a core taken from the farm the
# replay feeds; docs/performance.md).
LOOP_HOLD_BYTES = 256 << 20


class LoopRenumbering:
    """Event numbers for the passes of a looped replay: (exp, run, evt) must be unique in a
    stream (spec/wire-format.md), and the collector drops a repeat within its window as a
    duplicate. An envelope's (run, evt) is read as one number n = run * 2^32 + evt (evt < 2^32 by
    the spec); pass k sends n + k * span (span = max n - min n + 1 over the file's valid envelopes),
    split back into run and evt. In a file of one run that is evt + k * span until evt would pass
    2^32 (after ~40 h at 30 kHz), and then the next run, as a DAQ starts a new run, instead of
    evt wrapping to numbers already sent; a file of several runs moves to new runs every pass.
    Every valid envelope is renumbered: the messages are decoded by the reconstruction's own
    decoder (C++), which also says where the bytes of `run` and `evt` lie (Python's msgpack, used
    before, gave up on a valid envelope with a truth nested 1024 levels deep, whose evt then
    repeated in every pass). Only those bytes change: run and evt are rewritten as a fixed-width
    uint64 and uint32, and every other byte stays as in the file. A message that is not a valid
    envelope has no identity: it is sent unchanged in every pass (and rejected with its reason each time).

    The span comes from one pass over `messages` here. Messages held in a list keep their decoded
    numbers and offsets from that pass; an iterable read anew (RawFile) keeps nothing per message, and
    message() decodes each message of a later pass again (a file of millions of events held a patched
    copy of each, memory proportional to the file)."""

    def __init__(self, messages: Iterable[bytes]):
        lo = hi = None
        self.count = 0  # messages in the pass
        # messages held in a list: their identities are kept too (message(m, k, i)), a looped message then costs a
        # patch, not a decode (~3 us of CPU that a replay takes from the farm it feeds, on a 2-core machine)
        self._ids = [] if isinstance(messages, list) else None
        for m in messages:
            self.count += 1
            d = self._identity(m)
            if self._ids is not None:
                self._ids.append(d)
            if d is not None:
                n = (d[0] << 32) | d[1]
                lo, hi = (n, n) if lo is None else (min(lo, n), max(hi, n))
        self.span = hi - lo + 1 if lo is not None else 1

    @staticmethod
    def _identity(m: bytes):
        """(run, evt, run_offset, run_size, evt_offset, evt_size), or None for a message that is not a
        valid envelope (the reconstruction rejects it: replayed as it is)."""
        from eclreco import _core

        return _core.envelope_numbers(m if isinstance(m, bytes) else bytes(m))

    def message(self, m: bytes, pass_k: int, i: int | None = None) -> bytes:
        """Message m (index i of a held list) as pass pass_k sends it; renumbered, a new bytes object
        (libzmq may still hold the previous pass's when it went out without a copy)."""
        d = (self._ids[i] if self._ids is not None and i is not None else self._identity(m)) if pass_k else None
        if d is None:
            return m
        run, evt, run_offset, run_size, evt_offset, evt_size = d
        n = ((run << 32) | evt) + pass_k * self.span
        if n >> 96:
            raise OverflowError(f"looped replay: run {n >> 32} of pass {pass_k} does not fit the 64 bits of the "
                                "wire format; restart the replay")
        r, e = b"\xcf" + _UINT64.pack(n >> 32), b"\xce" + _UINT32.pack(n & 0xFFFFFFFF)
        if run_offset < evt_offset:
            return b"".join((m[:run_offset], r, m[run_offset + run_size:evt_offset], e, m[evt_offset + evt_size:]))
        return b"".join((m[:evt_offset], e, m[evt_offset + evt_size:run_offset], r, m[run_offset + run_size:]))


def emulate(messages: Iterable[bytes], address: str, bind: bool = False, rate: float = 0.0, loop: bool = False,
            events: int = 0, linger_ms: int = 10000, report: Callable[[str], None] | None = None,
            context=None, curve=None, curve_server: str = "distributor", tick_s: float = 1e-3,
            stall_timeout_s: float = 0.0) -> dict:
    """Send `messages` over a PUSH socket; returns {"sent", "seconds", "rate_hz", "stalled_s", ...}.
    "undelivered_at_close": messages were still queued when the linger ran out (None with `context`);
    "unread_bytes_at_close": of them, what was written to an ipc:// receiver and not read by it (the kernel's
    count: the bytes of the writes with its own overhead, more than the events' bytes).
    "read_error": why the input could not be read on (RawFileError: bytes that cannot be framed), the
    replay stopped there, else None; "input_ended": the end of the input was reached (without loop).

    messages: a list, or an iterable read anew for each pass (RawFile: a file read one message at a
    time); with loop, one pass is read first for the renumbering span (LoopRenumbering).

    events: stop after this many messages (0: the whole file once, or forever with loop).
    tick_s: with a rate, the messages due are sent in bursts at most this far apart.
    stall_timeout_s: a receiver that takes nothing (gone, or no receiver at a bound address: the
    send queue is full) is reported every 5 s; after this long without a message taken the
    replay stops (0: it waits).
    """
    import zmq

    if rate < 0:
        raise ValueError("rate must be >= 0 (0: as fast as possible)")
    renumber = LoopRenumbering(messages) if loop else None
    if (renumber.count if loop else sum(1 for _ in itertools.islice(messages, 1))) == 0:
        raise ValueError("no messages to send (empty input)")
    own_context = context is None
    ctx = context or zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, 100000)
    sock.setsockopt(zmq.SNDTIMEO, 250)  # a full queue: wake up to count the stall (and say so every 5 s)
    if curve is not None:  # eclreco.curve.Curve: CURVE server when binding, else client of curve_server
        curve.apply(sock, bind, curve_server)
    # A PUSH socket takes messages whether or not a receiver ever completes the handshake (none
    # listening, a CURVE key it does not know): the handshakes tell the run that delivered nothing.
    from eclreco.raw_sockets import ConnectionMonitor, attach

    # With our own context, its term is the end of libzmq's writing: the ipc:// connections are held
    # open after it until the receivers have read them (ConnectionMonitor.hold_ipc_until_read).
    handshakes = ConnectionMonitor(sock, hold_ipc=own_context)
    attach(sock, address, bind=bind, what="--bind" if bind else "--connect")
    total = events  # 0: the file once, or unbounded with loop

    def stream():
        """The messages to send: the file once, or pass after pass with loop (renumbered)."""
        pass_k, n = 0, 1
        while loop or pass_k == 0:
            if n == 0:  # a pass with nothing in it (the file emptied since): no end otherwise
                return
            n = 0
            for i, m in enumerate(messages):
                n += 1
                yield renumber.message(m, pass_k, i) if pass_k else m
            pass_k += 1

    upcoming = stream()
    sent, done = 0, False
    read_error = None
    start = time.monotonic()
    last_report, last_sent = start, 0
    max_burst = 4096
    stalled_s, gave_up = 0.0, False

    def send(m) -> bool:
        """False when the replay is to stop: nothing taken for stall_timeout_s."""
        nonlocal stalled_s, gave_up
        t0, next_report = time.monotonic(), 5.0
        while True:
            try:
                sock.send(m, copy=False)  # pyzmq copies what is below its copy_threshold
                return True
            except zmq.Again:
                waited = time.monotonic() - t0
                stalled_s = max(stalled_s, waited)
                if stall_timeout_s > 0 and waited >= stall_timeout_s:
                    gave_up = True
                    return False
                if report and waited >= next_report:
                    next_report += 5.0
                    report(f"[daq-emulator] blocked for {waited:.0f} s: the receiver at {address} takes no events "
                           f"(gone, or not there); {sent} sent")

    try:
        while not done and (total == 0 or sent < total) and not gave_up:
            now = time.monotonic()
            if rate > 0:
                due = int((now - start) * rate) + 1 - sent
                if due <= 0:
                    # wake once per tick, not once per message: at 30 kHz a wake-up per event
                    # (here and in every receiver downstream) costs more CPU than the event itself
                    time.sleep(max(tick_s, (sent + 1 - (now - start) * rate) / rate))
                    continue
            else:
                due = max_burst
            burst = min(due, max_burst) if total == 0 else min(due, max_burst, total - sent)
            for _ in range(burst):
                try:
                    m = next(upcoming)
                except StopIteration:  # the file once: done
                    done = True
                    break
                except RawFileError as err:  # bytes that cannot be framed: nothing after them can be sent
                    read_error, done = str(err), True
                    break
                if not send(m):
                    break
                sent += 1
            if report and now - last_report >= 5.0:
                report(f"[daq-emulator] {sent} events sent, {(sent - last_sent) / (now - last_report):,.0f} Hz")
                last_report, last_sent = now, sent
    except KeyboardInterrupt:
        pass
    finally:
        seconds = time.monotonic() - start
        if sent:  # what is queued goes out during the linger, once a receiver has shaken hands
            handshakes.poll()
            if report and not handshakes.handshakes and linger_ms > 0:  # (it waited twice the linger in silence)
                report(f"[daq-emulator] {sent} events queued, no receiver at {address} yet: waiting up to "
                       f"{2 * linger_ms / 1000:g} s (a handshake, then the close's linger of {linger_ms / 1000:g} s) "
                       f"for one to take them")
            handshakes.wait_for_handshake(linger_ms * 1e-3)
        handshakes.close(keep_held=True)
        sock.close()
        # "sent" counts what ZeroMQ took; a receiver that went away leaves the rest in its queue (up to
        # the high-water mark, seconds of events), dropped when the linger runs out: that shows as a
        # close that lasts the whole linger. (None: not known, with a caller's context.)
        undelivered, unread_bytes = None, 0
        if own_context:
            t_close = time.monotonic()
            ctx.term()
            undelivered = bool(sent) and linger_ms > 0 and time.monotonic() - t_close >= 0.95 * linger_ms * 1e-3
            # written, not yet read: a receiver's libzmq would drop it at our close (ipc://), so the
            # rest of the linger is waited for it
            wait_s = max(0.0, linger_ms * 1e-3 - (time.monotonic() - t_close))
            if report and wait_s > 0 and (unread := handshakes.unread_ipc_bytes()):
                report(f"[daq-emulator] waiting up to {wait_s:.1f} s for the receiver at {address} to read the "
                       f"events written to it ({unread} bytes, the kernel's count)")
            unread_bytes = handshakes.hold_ipc_until_read(wait_s)
            undelivered = undelivered or unread_bytes > 0
    result = {"sent": sent, "seconds": seconds, "rate_hz": sent / seconds if seconds > 0 else 0.0,
              "handshakes": handshakes.handshakes, "handshake_failures": handshakes.auth_failures,
              "stalled_s": stalled_s, "stopped_stalled": gave_up, "undelivered_at_close": undelivered,
              "unread_bytes_at_close": unread_bytes, "read_error": read_error, "input_ended": done and not read_error}
    if report:
        report(f"[daq-emulator] sent {sent} events in {seconds:.3f} s: {result['rate_hz']:,.0f} Hz achieved"
               + (f" (asked {rate:,.0f} Hz)" if rate > 0 else " (as fast as possible)"))
        if read_error:
            report(f"[daq-emulator] error: {read_error}: the replay stopped there, after {sent} events")
        if gave_up:
            report(f"[daq-emulator] error: stopped after {stalled_s:.1f} s in which the receiver at {address} took "
                   f"no event (--stall-timeout-s); {sent} events were handed to ZeroMQ, those still queued were not "
                   f"delivered")
        if undelivered and handshakes.handshakes:
            unread = (f"; written to it and still unread: {unread_bytes} bytes (the kernel's count)"
                      if unread_bytes else "")
            report(f"[daq-emulator] error: events were still queued for {address} when the linger of "
                   f"{linger_ms / 1000:g} s ran out: the receiver stopped taking them, and those were not "
                   f"delivered (of the {sent} handed to ZeroMQ){unread}")
        if sent and not handshakes.handshakes:
            report(f"[daq-emulator] error: no receiver completed a handshake with {address} "
                   f"({handshakes.auth_failures} failed handshakes); the {sent} events were not delivered"
                   + (" (CURVE: does the receiver know this key, and is --curve-server its key name?)"
                      if curve is not None else ""))
    return result


def _refuse(message: str) -> int:
    """A bad option or combination: one line, exit 2, as argparse's own checks (before any socket)."""
    print(f"eclreco daq-emulator: error: {message}", file=sys.stderr, flush=True)
    return 2


def option_error(args: argparse.Namespace) -> str:
    """Why the options contradict one another or one of them would do nothing ('' when they do not):
    an option that is silently ignored looks like a setting that took effect."""
    if args.tick_ms is not None and not args.rate:
        return (f"--tick-ms {args.tick_ms:g} paces the bursts of --rate: it does nothing without a --rate > 0 "
                "(the events go out as fast as possible)")
    return ""


def run_daq_emulator(args: argparse.Namespace) -> int:
    whole_lines()  # its lines whole in a log shared with the farm's roles
    from eclreco.curve import curve_option_error

    if why := option_error(args) or curve_option_error(args, "daq", (args.curve_server or CURVE_SERVER,)
                                                       if args.connect else (), "--curve-server"):
        return _refuse(why)  # before the file is read
    # one line naming --input, exit 2, before any socket: read message by message, any bytes are some
    # MessagePack, and `hello` went out as 6 events
    if why := not_a_raw_file(args.input):
        return _refuse(f"--input {args.input!r}: {why}")
    if args.events and not args.loop:  # refused before anything is sent: a counting pass up to --events
        try:
            n = count_messages(args.input, args.events)
        except RawFileError as err:
            return _refuse(f"--input: {err}")
        if n < args.events:
            return _refuse(f"the file has {n} events; --events {args.events} needs --loop")
    scheduling.apply(args.sched, "daq-emulator")  # a load generator beside the workers should not preempt them
    address = args.bind or args.connect
    # looped, a file up to LOOP_HOLD_BYTES is held (read once, decoded once); a larger one is read anew each pass
    held = args.loop and os.path.getsize(args.input) <= LOOP_HOLD_BYTES
    print(f"[daq-emulator] {args.input} ({os.path.getsize(args.input):,} bytes, "
          f"{'held in memory' if held else 'read one event at a time'}"
          f"{'; a first pass for the renumbering span' if args.loop else ''}), "
          f"{'binding' if args.bind else 'connecting'} PUSH {address}", flush=True)
    from eclreco.curve import Curve

    try:
        res = emulate(read_raw_file(args.input) if held else RawFile(args.input), address, bind=bool(args.bind),
                      rate=args.rate, loop=args.loop,
                      events=args.events, report=lambda s: print(s, flush=True), curve=Curve.from_args(args, "daq"),
                      curve_server=args.curve_server or CURVE_SERVER, tick_s=(args.tick_ms or TICK_MS) * 1e-3,
                      stall_timeout_s=args.stall_timeout_s)
    except RawFileError as err:  # found by --loop's first pass, before anything was sent
        return _refuse(f"--input: {err}")
    short = not args.loop and res["input_ended"] and res["sent"] < args.events  # the file shrank since it was counted
    if short:
        print(f"[daq-emulator] error: the file has {res['sent']} events, all sent; --events {args.events} needs --loop",
              flush=True)
    # nothing was delivered, the receiver stopped taking events, the file went bad (said above), or it was short
    return 1 if ((res["sent"] and not res["handshakes"]) or res["stopped_stalled"] or res["undelivered_at_close"]
                 or res["read_error"] or short) else 0


def add_daq_emulator_parser(subparsers) -> argparse.ArgumentParser:
    """Register `daq-emulator` on the CLI's subparsers; the handler is in `func` (run_daq_emulator)."""
    p = subparsers.add_parser(
        "daq-emulator", help="replay a raw file over ZeroMQ (PUSH) at a steady rate",
        description=__doc__)
    p.add_argument("--input", type=input_file("raw file"), required=True,
                   help="raw file (.msgpack, envelopes back to back)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--connect", metavar="ADDR", type=CONNECT_ADDRESS, help="connect the PUSH socket to ADDR, e.g. tcp://127.0.0.1:5555")
    where.add_argument("--bind", metavar="ADDR", type=ADDRESS, help="bind the PUSH socket to ADDR, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--rate", type=NON_NEGATIVE, default=0.0, help="events per second (0: as fast as possible)")
    # no default here: given without --rate, it is refused (option_error)
    p.add_argument("--tick-ms", type=POSITIVE, help=f"with --rate: send what is due every TICK ms (default {TICK_MS:g})")
    p.add_argument("--stall-timeout-s", type=NON_NEGATIVE, default=0.0,
                   help="stop (exit 1) when the receiver has taken no event for this long (0: wait, saying so every 5 s)")
    scheduling.add_scheduling_argument(p)
    p.add_argument("--loop", action="store_true", help="replay the file again and again (pass k: "
                   "(run, evt) shifted by k x the file's span, evt carrying into run, so that event numbers stay unique)")
    p.add_argument("--events", type=NON_NEGATIVE_INT, default=0, help="stop after N events (0: the file once, or forever with --loop)")
    from eclreco.curve import add_curve_arguments

    g = add_curve_arguments(p, "daq")
    # no default here: given with --bind or without --curve-dir, it is refused (curve_option_error)
    g.add_argument("--curve-server", help=f"with --connect: key name of the receiver ({CURVE_SERVER}, the default, or "
                                          "reco for steering/reco.py)")
    p.set_defaults(func=run_daq_emulator)
    return p


def main(argv=None) -> int:
    """`python -m eclreco.daq ARGS` is `eclreco daq-emulator ARGS`, through the CLI's own handling: a refusal is one
    line and exit 2, Ctrl-C exit 130 (its own parser showed a traceback and exited 1)."""
    from eclreco import cli

    return cli.main(["daq-emulator", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
