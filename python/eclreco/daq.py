"""DAQ emulator: replays a raw file over a ZeroMQ PUSH socket at a steady rate.

    eclreco daq-emulator --input run.msgpack --connect tcp://127.0.0.1:5555 --rate 30000 [--loop] [--events N]

One event per ZeroMQ message (a single frame holding the envelope bytes, spec/wire-format.md).
Pacing: the number of messages due is computed from a monotonic clock (rate x elapsed time) and
the emulator sends whatever is due in one burst, then sleeps for a tick (--tick-ms, 1 ms), so
that rates of 30-100 kHz are reachable despite the coarse granularity of sleep() and the
receivers are not woken once per event (a DAQ readout sends in bursts too). Rate 0 sends as
fast as the socket takes them. The socket binds (--bind) or connects (--connect) exactly to the
address given and to nothing else.
"""
from __future__ import annotations

import argparse
import struct
import sys
import time
from typing import Callable, Sequence

from eclreco import scheduling
from eclreco.cli_types import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, CommandParser, input_file
from eclreco.rawdata import read_raw_file


_UINT64, _UINT32 = struct.Struct(">Q"), struct.Struct(">I")


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
    repeated in every pass). Only those bytes change: run and evt are rewritten once as a
    fixed-width uint64 and uint32, so that a pass costs an in-place patch of 12 bytes per message,
    and every other byte stays as in the file. A message that is not a valid envelope has no
    identity: it is sent unchanged in every pass (and rejected with its reason each time)."""

    def __init__(self, messages: Sequence[bytes]):
        self.messages, self.run_offsets, self.evt_offsets, self.numbers = [], [], [], []
        for m in messages:
            d = self._identity(m)
            if d is None:
                self.messages.append(m)
                self.run_offsets.append(-1)
                self.evt_offsets.append(-1)
                self.numbers.append(0)
                continue
            # in message order: a rewritten int moves the bytes after it by its change of width
            pos, moved = {}, 0
            for start, size, tag, width, key in sorted([(d["run_offset"], d["run_size"], b"\xcf", 8, "run"),
                                                        (d["evt_offset"], d["evt_size"], b"\xce", 4, "evt")]):
                start += moved
                m = m[:start] + tag + bytes(width) + m[start + size:]
                pos[key] = start + 1
                moved += 1 + width - size
            self.run_offsets.append(pos["run"])
            self.evt_offsets.append(pos["evt"])
            self.numbers.append((d["run"] << 32) | d["evt"])
            b = bytearray(m)
            self._patch(b, len(self.numbers) - 1, 0)
            self.messages.append(bytes(b))
        valid = [n for n, o in zip(self.numbers, self.evt_offsets) if o >= 0]
        self.span = (max(valid) - min(valid) + 1) if valid else 1
        self._patched: list = [None] * len(self.messages)  # one reusable copy per message, made on demand
        # pyzmq sends a buffer of this size or more without a copy (send(copy=False); smaller ones are
        # copied into the ZeroMQ message at once): libzmq keeps a reference until it is written out
        import zmq

        self.zero_copy_min_bytes = zmq.COPY_THRESHOLD

    @staticmethod
    def _identity(m: bytes):
        """The decoded envelope (with where its run and evt bytes lie), or None if not valid."""
        from eclreco import _core

        try:
            return _core.decode_envelope(m if isinstance(m, bytes) else bytes(m))
        except ValueError:  # not a valid envelope (the reconstruction rejects it): replayed as it is
            return None

    def _patch(self, b: bytearray, idx: int, shift: int) -> None:
        """Writes the run and evt of number numbers[idx] + shift into b, message idx's buffer."""
        n = self.numbers[idx] + shift
        try:
            _UINT64.pack_into(b, self.run_offsets[idx], n >> 32)
        except struct.error:
            raise OverflowError(f"looped replay: run {n >> 32} of message {idx} does not fit the 64 bits of the "
                                "wire format; restart the replay") from None
        _UINT32.pack_into(b, self.evt_offsets[idx], n & 0xFFFFFFFF)

    def message(self, idx: int, pass_k: int) -> bytes:
        """The message of pass pass_k. Valid until the next call for the same idx: a message sent
        with a copy gets the bytes patched in one reusable buffer (a fresh copy per message cost
        the emulator 0.7 µs); one sent without a copy gets a buffer of its own, because libzmq may
        still hold the previous pass's."""
        m, off = self.messages[idx], self.evt_offsets[idx]
        if pass_k == 0 or off < 0:
            return m
        if len(m) >= self.zero_copy_min_bytes:
            b = bytearray(m)
        else:
            b = self._patched[idx]
            if b is None:
                b = self._patched[idx] = bytearray(m)
        self._patch(b, idx, pass_k * self.span)
        return b


def emulate(messages: Sequence[bytes], address: str, bind: bool = False, rate: float = 0.0, loop: bool = False,
            events: int = 0, linger_ms: int = 10000, report: Callable[[str], None] | None = None,
            context=None, curve=None, curve_server: str = "distributor", tick_s: float = 1e-3,
            stall_timeout_s: float = 0.0) -> dict:
    """Send `messages` over a PUSH socket; returns {"sent", "seconds", "rate_hz", "stalled_s", ...}.
    "undelivered_at_close": messages were still queued when the linger ran out (None with `context`).

    events: stop after this many messages (0: the whole file once, or forever with loop).
    tick_s: with a rate, the messages due are sent in bursts at most this far apart.
    stall_timeout_s: a receiver that takes nothing (gone, or no receiver at a bound address: the
    send queue is full) is reported every 5 s; after this long without a message taken the
    replay stops (0: it waits).
    """
    import zmq

    if not messages:
        raise ValueError("no messages to send (empty input)")
    if rate < 0:
        raise ValueError("rate must be >= 0 (0: as fast as possible)")
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

    handshakes = ConnectionMonitor(sock)
    attach(sock, address, bind=bind, what="--bind" if bind else "--connect")
    # 0: unbounded; without loop the file is sent at most once
    total = events if events > 0 else (0 if loop else len(messages))
    n_msgs = len(messages)
    renumber = LoopRenumbering(messages) if loop else None
    pass_k = 0
    sent = 0
    idx = 0
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
        while (total == 0 or sent < total) and not gave_up:
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
                m = renumber.message(idx, pass_k) if pass_k else messages[idx]
                if not send(m):
                    break
                sent += 1
                idx += 1
                if idx == n_msgs:
                    idx = 0
                    pass_k += 1
                    if not loop:
                        total = sent  # the file once: done
                        break
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
                       f"{2 * linger_ms / 1000:g} s (the linger) for one to take them")
            handshakes.wait_for_handshake(linger_ms * 1e-3)
        handshakes.close()
        sock.close()
        # "sent" counts what ZeroMQ took; a receiver that went away leaves the rest in its queue (up to
        # the high-water mark, seconds of events), dropped when the linger runs out: that shows as a
        # close that lasts the whole linger. (None: not known, with a caller's context.)
        undelivered = None
        if own_context:
            t_close = time.monotonic()
            ctx.term()
            undelivered = bool(sent) and linger_ms > 0 and time.monotonic() - t_close >= 0.95 * linger_ms * 1e-3
    result = {"sent": sent, "seconds": seconds, "rate_hz": sent / seconds if seconds > 0 else 0.0,
              "handshakes": handshakes.handshakes, "handshake_failures": handshakes.auth_failures,
              "stalled_s": stalled_s, "stopped_stalled": gave_up, "undelivered_at_close": undelivered}
    if report:
        report(f"[daq-emulator] sent {sent} events in {seconds:.3f} s: {result['rate_hz']:,.0f} Hz achieved"
               + (f" (asked {rate:,.0f} Hz)" if rate > 0 else " (as fast as possible)"))
        if gave_up:
            report(f"[daq-emulator] error: stopped after {stalled_s:.1f} s in which the receiver at {address} took "
                   f"no event (--stall-timeout-s); {sent} events were handed to ZeroMQ, those still queued were not "
                   f"delivered")
        if undelivered and handshakes.handshakes:
            report(f"[daq-emulator] error: events were still queued for {address} when the linger of "
                   f"{linger_ms / 1000:g} s ran out: the receiver stopped taking them, and those were not "
                   f"delivered (of the {sent} handed to ZeroMQ)")
        if sent and not handshakes.handshakes:
            report(f"[daq-emulator] error: no receiver completed a handshake with {address} "
                   f"({handshakes.auth_failures} failed handshakes); the {sent} events were not delivered"
                   + (" (CURVE: does the receiver know this key, and is --curve-server its key name?)"
                      if curve is not None else ""))
    return result


def run_daq_emulator(args: argparse.Namespace) -> int:
    from eclreco.curve import curve_option_error

    if why := curve_option_error(args, "daq", (args.curve_server,) if args.connect else (), "--curve-server"):
        raise ValueError(why)  # a bad option: one line, exit 2 (cli.main), before the file is read
    messages = read_raw_file(args.input)
    if not args.loop and args.events > len(messages):
        print(f"[daq-emulator] the file has {len(messages)} events; --events {args.events} needs --loop",
              file=sys.stderr)
        return 2
    scheduling.apply(args.sched, "daq-emulator")  # a load generator beside the workers should not preempt them
    address = args.bind or args.connect
    print(f"[daq-emulator] {len(messages)} events from {args.input}, "
          f"{'binding' if args.bind else 'connecting'} PUSH {address}", flush=True)
    from eclreco.curve import Curve

    res = emulate(messages, address, bind=bool(args.bind), rate=args.rate, loop=args.loop, events=args.events,
                  report=lambda s: print(s, flush=True), curve=Curve.from_args(args, "daq"),
                  curve_server=args.curve_server, tick_s=args.tick_ms * 1e-3, stall_timeout_s=args.stall_timeout_s)
    # nothing was delivered, or the receiver stopped taking events (said above)
    return 1 if (res["sent"] and not res["handshakes"]) or res["stopped_stalled"] or res["undelivered_at_close"] else 0


def add_daq_emulator_parser(subparsers) -> argparse.ArgumentParser:
    """Register `daq-emulator` on the CLI's subparsers; the handler is in `func` (run_daq_emulator)."""
    p = subparsers.add_parser(
        "daq-emulator", help="replay a raw file over ZeroMQ (PUSH) at a steady rate",
        description=__doc__)
    p.add_argument("--input", type=input_file("raw file"), required=True,
                   help="raw file (.msgpack, envelopes back to back)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--connect", metavar="ADDR", help="connect the PUSH socket to ADDR, e.g. tcp://127.0.0.1:5555")
    where.add_argument("--bind", metavar="ADDR", help="bind the PUSH socket to ADDR, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--rate", type=NON_NEGATIVE, default=0.0, help="events per second (0: as fast as possible)")
    p.add_argument("--tick-ms", type=POSITIVE, default=1.0, help="with --rate: send what is due every TICK ms")
    p.add_argument("--stall-timeout-s", type=NON_NEGATIVE, default=0.0,
                   help="stop (exit 1) when the receiver has taken no event for this long (0: wait, saying so every 5 s)")
    scheduling.add_scheduling_argument(p)
    p.add_argument("--loop", action="store_true", help="replay the file again and again (pass k: "
                   "(run, evt) shifted by k x the file's span, evt carrying into run, so that event numbers stay unique)")
    p.add_argument("--events", type=NON_NEGATIVE_INT, default=0, help="stop after N events (0: the file once, or forever with --loop)")
    from eclreco.curve import add_curve_arguments

    g = add_curve_arguments(p, "daq")
    g.add_argument("--curve-server", default="distributor",
                   help="key name of the receiver when connecting (distributor, or reco for steering/reco.py)")
    p.set_defaults(func=run_daq_emulator)
    return p


def main(argv=None) -> int:
    parser = CommandParser(prog="eclreco-daq-emulator")
    sub = parser.add_subparsers(dest="command", required=True)
    add_daq_emulator_parser(sub)
    args = parser.parse_args(["daq-emulator", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
