"""Decode speed of raw events: envelope decoding + ECL payload unpacking, with and without the
framework, for events of ~300 digits (nominal background level, belle2-ecl).

    .venv/bin/python benchmarks/bench_unpacker.py [--events 20000] [--digits 300] [--batch-size 256]
"""
import argparse
import os
import tempfile
import time

import numpy as np

import eclreco
from eclreco import _core, rawdata


def make_events(n, digits, seed=1):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(digits, n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    cell = np.concatenate([rng.choice(8736, size=int(c), replace=False) + 1 for c in counts])
    m = int(offsets[-1])
    amp = np.minimum(25 + rng.exponential(200, m).astype(np.int64), 262015)
    return rawdata.encode_events("belle2-ecl", 0, 1, np.arange(n), offsets, cell, amp,
                                 rng.integers(-200, 200, m), rng.integers(0, 4, m), time_ns=np.arange(n))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--digits", type=int, default=300, help="mean digits per event")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    t = time.perf_counter()
    msgs = make_events(args.events, args.digits)
    size = sum(map(len, msgs))
    print(f"{args.events} events, {size / args.events:.0f} bytes/event, encoded in {time.perf_counter() - t:.2f} s "
          f"(Python encoder)")

    r = _core._bench_rawdata(msgs, args.repeats)
    n, d = r["events"], r["digits"]
    print(f"\nwithout the framework (C++ loop, {args.repeats} passes, {d / n:.0f} digits/event, crc32 checked):")
    print(f"  envelope decoding  : {r['envelope_s'] / n * 1e9:8.1f} ns/event  {n / r['envelope_s']:14,.0f} events/s")
    print(f"  payload unpacking  : {r['unpack_s'] / n * 1e9:8.1f} ns/event  {n / r['unpack_s']:14,.0f} events/s"
          f"  {d / r['unpack_s']:16,.0f} digits/s")
    both = r["envelope_s"] + r["unpack_s"]
    print(f"  both               : {both / n * 1e9:8.1f} ns/event  {n / both:14,.0f} events/s  {d / both:16,.0f} digits/s")
    print(f"  append_envelopes   : {r['append_envelopes_s'] / n * 1e9:8.1f} ns/event  (one batch: decode + copy bytes + metadata)")

    with tempfile.TemporaryDirectory() as tmp:
        f = os.path.join(tmp, "bench.msgpack")
        rawdata.write_raw_file(f, msgs)
        best = None
        for _ in range(3):
            path = eclreco.create_path()
            path.add_module("RawFileInput", filename=f)
            path.add_module("ECLUnpacker")
            t = time.perf_counter()
            stats = eclreco.process(path, batch_size=args.batch_size, install_signal_handlers=False)
            wall = time.perf_counter() - t
            s = stats.summary()
            if best is None or wall < best[0]:
                best = (wall, s, str(stats))
        wall, s, table = best
        mods = {m["name"]: m for m in s["modules"]}
        print(f"\nwith the framework (RawFileInput -> ECLUnpacker, batch size {args.batch_size}, 1 thread, best of 3):")
        print(table)
        src = mods["RawFileInput"]["seconds"]
        unp = mods["ECLUnpacker"]["seconds"]
        print(f"  RawFileInput (framing + envelope + batch): {src / n * 1e9:8.1f} ns/event")
        print(f"  ECLUnpacker                              : {unp / n * 1e9:8.1f} ns/event  {d / unp:16,.0f} digits/s")
        print(f"  whole process()                          : {wall / n * 1e9:8.1f} ns/event  {n / wall:14,.0f} events/s"
              f"  {d / wall:16,.0f} digits/s")


if __name__ == "__main__":
    main()
