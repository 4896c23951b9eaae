"""The threaded runs that fuzz/build_tsan.sh checks under ThreadSanitizer (docs/reliability.md).

    fuzz/build_tsan.sh                      runs this file: exit 66 when TSan reported a race
    python fuzz/tsan_scenarios.py [EVENTS]  the same runs without TSan

steering/reco.py's path on a raw file with a few invalid messages (RawFileInput, the reconstruction with the
CNN, ECLDQM, RootOutput and its writer thread, RejectedOutput) on two threads, twice in a row, while a thread
scrapes the Prometheus exporter (eclreco.metrics) over HTTP: it reads the live counters of the C++ loop and
the modules' counters() from another thread, at the start of a run (the statistics replaced) and during it.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import threading
import time
import urllib.request

import msgpack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_scraped(path, events: int, serve_process_metrics) -> int:
    """Processes `path` twice while a thread scrapes its exporter; the number of scrapes."""
    import eclreco

    exporter = serve_process_metrics(0, path=path)
    done = threading.Event()
    scrapes = []

    def scrape():
        while not done.is_set():
            with urllib.request.urlopen(exporter.url, timeout=60) as r:
                scrapes.append(len(r.read()))
            time.sleep(0.01)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        for _ in range(2):  # the second run replaces the first one's statistics while they are read
            eclreco.process(path, threads=2, batch_size=64, install_signal_handlers=False)
            s = eclreco.statistics.summary()
            assert s["received"] == events + 5 and s["rejected"] == 5, s
    finally:
        done.set()
        scraper.join(120)
        exporter.close()
    return len(scrapes)


def main(events: int) -> int:
    from eclreco import cli
    from eclreco.metrics import serve_process_metrics

    spec = importlib.util.spec_from_file_location("reco", os.path.join(REPO, "steering", "reco.py"))
    reco = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reco)
    with tempfile.TemporaryDirectory(prefix="eclreco-tsan-") as tmp:
        raw = os.path.join(tmp, "raw.msgpack")
        cli.main(["simulate", "--events", str(events), "--particle", "generic", "-q", "-o", raw])
        with open(raw, "ab") as f:  # MessagePack, not envelopes: rejected, for RejectedOutput
            for i in range(5):
                f.write(msgpack.packb({"not": "an envelope", "i": i}))
        quarantine = os.path.join(tmp, "rejected.msgpack")
        # the whole chain (Python modules take the GIL, RootOutput writes in its own thread); the C++ modules
        # alone (the event loop never takes the GIL: nothing orders its writes before a scrape but the code's own)
        for argv in (["-o", os.path.join(tmp, "out.root")], ["--no-cnn", "--no-dqm"]):
            args = reco.parse_args(["-i", raw, "--threads", "2", "--batch-size", "64", "--rejected", quarantine] + argv)
            scrapes = run_scraped(reco.build_path(args), events, serve_process_metrics)
            print(f"tsan_scenarios: {' '.join(argv)}: 2 runs of {events + 5} events, {scrapes} scrapes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
