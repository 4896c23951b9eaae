"""Long run of the streaming farm: memory (RSS) of every role over time, and whether every event
came through. A farm that is left running for hours must not grow; this shows it in minutes.

    .venv/bin/python benchmarks/soak_farm.py [--rate 12000] [--seconds 100] [--every 10]
        [--modules standard] [--events 10000]

`eclreco hlt run --workers 2` with the worker chain `--modules`, fed by `eclreco daq-emulator
--loop` (renumbered passes over a generated belle2-ecl file) at `--rate` for `--seconds`
(eclreco.hlt.run.benchmark_farm); `ps` samples the resident memory of each role every `--every`
seconds. Expected: flat distributor and workers; the collector grows until its duplicate window
(`--dedup-window`, 1,000,000 events by default, ~70 B each as measured) is full, then stays flat.
"""
import argparse
import os
import subprocess
import tempfile
import threading
import time

from eclreco.bench import make_raw_file
from eclreco.hlt.run import benchmark_farm

ROLES = ("hlt distributor", "hlt collector", "hlt worker", "hlt run", "daq-emulator")


def rss_by_role() -> dict:
    """MiB of resident memory of each farm process, by role (several workers: a list)."""
    out = subprocess.run(["ps", "-eo", "rss,args"], capture_output=True, text=True).stdout
    row: dict = {}
    for line in out.splitlines()[1:]:
        rss, _, args = line.strip().partition(" ")
        role = next((r for r in ROLES if r in args), None)
        if role and "eclreco" in args:
            row.setdefault(role, []).append(int(rss) // 1024)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=12000.0)
    ap.add_argument("--seconds", type=float, default=100.0)
    ap.add_argument("--every", type=float, default=10.0, help="seconds between memory samples")
    ap.add_argument("--modules", default="standard", help="worker chain (hlt run --modules)")
    ap.add_argument("--events", type=int, default=10000, help="events in the replayed file")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="eclreco-soak-")  # the raw file, removed at exit
    raw = os.path.join(tmp.name, "generic.msgpack")
    make_raw_file(raw, args.events, 1.0)
    samples, done = [], threading.Event()

    def sample():
        t0 = time.monotonic()
        while not done.wait(0 if not samples else args.every):
            samples.append((time.monotonic() - t0, rss_by_role()))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        r = benchmark_farm(raw, args.rate, args.seconds, modules=args.modules,
                           timeout_s=max(300.0, 4 * args.seconds))
    finally:
        done.set()
        th.join()
        tmp.cleanup()
    print(f"{r['confirmed']} of {r['events']} events confirmed, {r['achieved_events_per_s']:,.0f} events/s, "
          f"latency p50 {r['latency_p50_ms']:.1f} ms, p99 {r['latency_p99_ms']:.1f} ms")
    print("RSS MiB by role over time (s):")
    for t, row in samples:
        if row:
            print(f"{t:6.0f}  " + ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in sorted(row.items())))
    return 0 if r["confirmed"] == r["events"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
