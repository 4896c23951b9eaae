"""Framework overhead: events/s through a path of empty modules, and the cost per event.

    python benchmarks/bench_framework.py [--events N] [--modules K] [--repeat R]

Runs EventInfoSetter -> K x NoOp for several batch sizes and thread counts and prints the median
of R repetitions. Overhead per event = wall time / events (source included), so it is an upper
bound on what the framework adds to a real chain.
"""
from __future__ import annotations

import argparse
import json
import statistics as st

from eclreco.bench import framework_run_seconds as run_once


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--modules", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for threads in (1, 2):
        for batch_size in (1, 64, 256, 1024):
            for py in (False, True):
                events = args.events if batch_size > 1 else args.events // 50
                times = [run_once(events, args.modules, batch_size, threads, py) for _ in range(args.repeat)]
                med = st.median(times)
                rows.append({"threads": threads, "batch_size": batch_size, "python_module": py,
                             "events": events, "events_per_s": events / med,
                             "us_per_event": med / events * 1e6,
                             "min_events_per_s": events / max(times), "max_events_per_s": events / min(times)})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"EventInfoSetter -> {args.modules} x NoOp (+ optional Python no-op module), median of {args.repeat}")
    print(f"{'threads':>7} {'batch':>6} {'py mod':>6} {'events/s':>14} {'us/event':>9}")
    for r in rows:
        print(f"{r['threads']:>7} {r['batch_size']:>6} {str(r['python_module']):>6} "
              f"{r['events_per_s']:>14,.0f} {r['us_per_event']:>9.3f}")


if __name__ == "__main__":
    main()
