"""Cost of writing the ROOT output: RootOutput's CPU per event and the file size for each
compression setting, on the clusters of generated belle2-ecl generic events (nominal background).
The writes are timed around RootOutput._write (compression + uproot), which runs in RootOutput's
writer thread; baskets of 2000 events.

    .venv/bin/python benchmarks/bench_root_output.py [--events 10000] [--compression zlib:1,zstd:1,lz4:1,none]
"""
import argparse
import os
import tempfile
import time

import eclreco
from eclreco.bench import make_raw_file
from eclreco.modules.root_output import RootOutput
from eclreco.reconstruction import add_reconstruction


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10000)
    ap.add_argument("--compression", default="zlib:1,zstd:1,zstd:3,lz4:1,none")
    args = ap.parse_args()
    tmp_dir = tempfile.TemporaryDirectory(prefix="eclreco-bench-root-")  # the raw file and the outputs, removed at exit
    tmp = tmp_dir.name
    raw = os.path.join(tmp, "generic.msgpack")
    make_raw_file(raw, args.events, 1.0)
    spent = {"s": 0.0}
    write = RootOutput._write

    def timed(self, parts):
        t0 = time.thread_time()  # CPU time of the writer thread
        write(self, parts)
        spent["s"] += time.thread_time() - t0

    RootOutput._write = timed
    print(f"{'compression':<12} {'write µs/event':>15} {'file MB':>8}  ({args.events} events)")
    for spec in args.compression.split(","):
        spent["s"] = 0.0
        out = os.path.join(tmp, f"{spec.replace(':', '')}.root")
        path = eclreco.create_path()
        path.add_module("RawFileInput", filename=raw)
        add_reconstruction(path, cnn=False)
        path.add_module("RootOutput", filename=out, basket_events=2000, compression=spec)
        eclreco.process(path, threads=1, batch_size=256)
        print(f"{spec:<12} {spent['s'] / args.events * 1e6:>15.2f} {os.path.getsize(out) / 1e6:>8.2f}")


if __name__ == "__main__":
    main()
