"""Build the provisional leakage tables from the Geant4 samples and evaluate them.

    .venv/bin/python benchmarks/build_leakage_tables.py --g4-dir /work/shared/data [--out python/eclreco/data]

Digits from the Geant4 deposits with a simple electronics (Gaussian noise 0.25 MeV per hit
crystal, ADC rounding 20000 counts/GeV, zero suppression at 25 counts = 1.25 MeV, time 0,
quality 0); clustering with the default ECLClusterizer parameters; the leading cluster of each
event. The first 80 % of each file builds the table, the last 20 % evaluates it (bias = median
of E/E_true - 1, sigma68 = half-width of the central 68 % interval of E/E_true, per bin of true
energy), never the same events.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

FILES = {"array30": "g4_array30_train.npz", "belle2-ecl": "g4_belle2_train.npz"}
TRUE_BINS_MEV = [50, 100, 200, 500, 1000, 2000, 4000, 6000]


def simple_digits(offsets, cell, edep_mev, rng, noise_mev=0.25, zs_counts=25, counts_per_gev=20000):
    """ECLDigits-like arrays (offsets, cell, energy GeV, time, quality) from true deposits."""
    e = (np.asarray(edep_mev, np.float64) + rng.normal(0.0, noise_mev, len(edep_mev))) * 1e-3
    amp = np.rint(e * counts_per_gev).astype(np.int64)
    keep = amp >= zs_counts
    ev = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    counts = np.bincount(ev[keep], minlength=len(offsets) - 1)
    new_off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    c = np.asarray(cell, np.int32)[keep]
    # sort by cell within events
    o = np.lexsort((c, ev[keep]))
    return dict(offsets=new_off, cell=c[o], energy=(amp[keep][o] / counts_per_gev).astype(np.float32),
                time=np.zeros(keep.sum(), np.float32), quality=np.zeros(keep.sum(), np.uint8))


def load_g4(path, start=0.0, stop=1.0, max_events=None):
    """Events [start, stop) (fractions of the file) of a Geant4 sample; true energy in GeV."""
    with np.load(path) as f:
        off = f["offsets"]
        n = len(off) - 1
        a, b = int(start * n), int(stop * n)
        if max_events:
            b = min(b, a + max_events)
        sl = slice(off[a], off[b])
        true = f["true_energy_mev"][a:b] if "true_energy_mev" in f.files else f["photons"][a:b, 0, 0]
        return dict(offsets=off[a:b + 1] - off[a], cell=f["cell"][sl], edep_mev=f["edep_mev"][sl],
                    true_gev=np.asarray(true, np.float64) * 1e-3)


def leading_clusters(detector, digits):
    """Per event: leading-cluster (energy_raw, ring, local_u, local_v), has-cluster mask, and
    the containment (sum of cluster raw energies) / (sum of digit energies)."""
    from eclreco import _core
    cl = _core.find_clusters(detector, **digits)
    off = cl["offsets"]
    has = np.diff(off) > 0
    first = off[:-1][has]
    lead = {k: cl[k][first] for k in ("energy_raw", "ring", "local_u", "local_v")}
    n = len(off) - 1
    ev_c = np.repeat(np.arange(n), np.diff(off))
    e_cl = np.bincount(ev_c, cl["energy_raw"].astype(np.float64), minlength=n)
    ev_d = np.repeat(np.arange(n), np.diff(digits["offsets"]))
    e_dig = np.bincount(ev_d, digits["energy"].astype(np.float64), minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        containment = np.where(e_dig > 0, e_cl / e_dig, np.nan)
    return lead, has, containment


def evaluate(true_gev, e_raw, e_corr):
    from eclreco.cnn_model import sigma68

    rows = []
    for lo, hi in zip(TRUE_BINS_MEV[:-1], TRUE_BINS_MEV[1:]):
        sel = (true_gev * 1e3 >= lo) & (true_gev * 1e3 < hi)
        if sel.sum() < 10:
            continue
        rr, rc = e_raw[sel] / true_gev[sel], e_corr[sel] / true_gev[sel]
        rows.append((lo, hi, int(sel.sum()), np.median(rr) - 1, sigma68(rr), np.median(rc) - 1, sigma68(rc)))
    rr, rc = e_raw / true_gev, e_corr / true_gev
    rows.append((TRUE_BINS_MEV[0], TRUE_BINS_MEV[-1], len(rr), np.median(rr) - 1, sigma68(rr),
                 np.median(rc) - 1, sigma68(rc)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--g4-dir", default="/work/shared/data")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "python" / "eclreco" / "data"))
    ap.add_argument("--detectors", nargs="+", default=list(FILES))
    ap.add_argument("--max-events", type=int, default=None, help="per part (build / evaluate), for quick runs")
    ap.add_argument("--seed", type=int, default=12345)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eclreco import _core
    from eclreco.leakage import build_leakage_table

    for det in args.detectors:
        rng = np.random.default_rng(args.seed)
        path = Path(args.g4_dir) / FILES[det]
        build = load_g4(path, 0.0, 0.8, args.max_events)
        dig = simple_digits(build["offsets"], build["cell"], build["edep_mev"], rng)
        lead, has, cont = leading_clusters(det, dig)
        out = Path(args.out) / f"leakage_{det}.npz"
        build_leakage_table(det, lead["energy_raw"], build["true_gev"][has], ring=lead["ring"],
                            local_u=lead["local_u"], local_v=lead["local_v"], out_path=out)
        print(f"[{det}] table from {has.sum()} events (first 80 %) -> {out} ({out.stat().st_size} bytes)")

        test = load_g4(path, 0.8, 1.0, args.max_events)
        dig = simple_digits(test["offsets"], test["cell"], test["edep_mev"], rng)
        lead, has, cont = leading_clusters(det, dig)
        e_corr = _core.leakage_correct(str(out), lead["energy_raw"], lead["ring"], lead["local_u"], lead["local_v"])
        true = test["true_gev"][has]
        print(f"[{det}] evaluation on {has.sum()} held-out events (last 20 %); "
              f"median containment (sum cluster E_raw / sum digit E) = {np.nanmedian(cont):.4f}, "
              f"events without cluster: {(~has).sum()}")
        print(f"  {'E_true [MeV]':>13} {'N':>6} {'raw bias':>9} {'raw s68':>8} {'corr bias':>9} {'corr s68':>8}")
        for lo, hi, n, b0, s0, b1, s1 in evaluate(true, lead["energy_raw"].astype(np.float64), e_corr.astype(np.float64)):
            print(f"  {lo:>6}-{hi:<6} {n:>6} {b0:>+9.4f} {s0:>8.4f} {b1:>+9.4f} {s1:>8.4f}")


if __name__ == "__main__":
    main()
