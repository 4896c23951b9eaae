"""Speed of the C++ ECL clustering, and its speed-up over the NumPy reference.

    .venv/bin/python benchmarks/bench_clustering.py [--events 2000] [--repeat 20]

Workloads: belle2-ecl toy events (1-3 photons of 0.1-2 GeV, about 300 digits/event, most of
them low-energy beam-background-like digits with random times) and the Geant4 array30 held-out sample
of tests/data with the simple electronics. Prints CPU us/event (best of several runs) of _core.find_clusters (the pure
algorithm, batch loop in C++), of the ECLClusterizer module in a path (framework included, the
digits handed in by eclreco.sources.ArraySource), and of the NumPy reference.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no spinning BLAS threads in the timings
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]


def best_of(f, n=5):
    """Best CPU time (process_time: less sensitive to other jobs on a shared machine) of n runs."""
    t = []
    for _ in range(n):
        t0 = time.process_time()
        f()
        t.append(time.process_time() - t0)
    return min(t)


def workloads(n_events, rng):
    from toy_events import make_events
    from build_leakage_tables import simple_digits
    out = {}
    out["belle2-ecl toy, ~300 digits/event"] = ("belle2-ecl", make_events(
        "belle2-ecl", n_events, rng, n_showers=(1, 3), energy=(0.1, 2.0), n_background=290,
        bkg_offset_gev=0.00125, bkg_mean_gev=0.0015, bkg_tail_frac=0.02, bkg_tail_mean_gev=0.01))
    sub = HERE.parent / "tests" / "data" / "g4_array30_heldout.npz"
    if sub.exists():
        with np.load(sub) as f:
            out["array30 Geant4 photons"] = ("array30", simple_digits(f["offsets"], f["cell"], f["edep_mev"], rng))
    return out


def run_module(detector, dig, repeat):
    import eclreco
    from eclreco.sources import ArraySource

    path = eclreco.create_path()
    path.add_module(ArraySource("ECLDigits", dig["offsets"], {k: dig[k] for k in ("cell", "energy", "time", "quality")},
                                detector=detector, repeat=repeat))
    path.add_module("ECLClusterizer")
    eclreco.process(path, batch_size=len(dig["offsets"]) - 1, install_signal_handlers=False)
    for m in eclreco.statistics.summary()["modules"]:
        if m["name"] == "ECLClusterizer":
            return m["seconds"] * 1e6 / m["events"]
    return float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    from eclreco import _core
    import numpy_clustering

    rng = np.random.default_rng(42)
    if "ECLUnpacker" not in dict(_core.cpp_modules()):
        print("(ECLUnpacker not available: unpack+cluster not measured)")
    for name, (det, dig) in workloads(args.events, rng).items():
        n = len(dig["offsets"]) - 1
        _core.find_clusters(det, **dig)  # warm-up (geometry, caches)
        t_cpp = best_of(lambda: _core.find_clusters(det, repeat=args.repeat, **dig)) / (n * args.repeat)
        numpy_clustering.find_clusters(det, **dig)
        t_np = best_of(lambda: numpy_clustering.find_clusters(det, **dig), 2) / n
        try:
            t_mod = run_module(det, dig, args.repeat)
        except Exception as e:  # noqa: BLE001
            t_mod = float("nan")
            print("module timing failed:", e)
        cl = _core.find_clusters(det, **dig)
        print(f"{name}: {n} events, {dig['offsets'][-1] / n:.0f} digits/event, "
              f"{len(cl['energy_raw']) / n:.2f} clusters/event")
        print(f"  C++ find_clusters      {t_cpp * 1e6:8.2f} us/event")
        print(f"  ECLClusterizer module  {t_mod:8.2f} us/event (framework, columns)")
        print(f"  NumPy reference        {t_np * 1e6:8.1f} us/event   speed-up x{t_np / t_cpp:.0f}")


if __name__ == "__main__":
    main()
