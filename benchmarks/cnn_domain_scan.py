"""Where the CNN correction should apply: its energy range, measured on the validation split.

    .venv/bin/python benchmarks/cnn_domain_scan.py [--g4-dir /work/shared/data] [--levels 0 1 2]

The CNNs were trained on Geant4 photons of 50 MeV to 6 GeV. Near and below 50 MeV raw the network
has learned that a cluster this soft must be a photon that lost energy (there were no softer ones),
and above the sample it extrapolates. This runs the validation split (events 70000-79999 of each
file, never the test split) through the chain with the CNN applied to every cluster
(min_energy_gev 0, no upper limit), keeps the classical energy alongside, and prints, for lower
raw-energy thresholds X, the median bias and sigma68 of E/E_true per true-energy bin when the CNN
applies from X (classical below). The thresholds of ECLEnergyCorrection were chosen from it
(docs/physics-validation.md, the "v3.1" paragraph of "CNN energy correction").
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

TRUE_BINS_GEV = [0.05, 0.06, 0.075, 0.1, 0.15, 0.2, 0.5]
THRESHOLDS_GEV = [0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1]


def scan(detector, g4_dir, level, max_events):
    from eclreco import cnn_data
    from eclreco.cnn_model import sigma68
    from eclreco.modules.ecl_energy_correction import shipped_model

    g4 = cnn_data.G4Sample(str(Path(g4_dir) / cnn_data.G4_DEFAULT[detector]), detector)
    _, val, _ = g4.split()
    val = val[g4.e_true[val] < TRUE_BINS_GEV[-1]][:max_events]
    res = cnn_data.g4_chain_sample(g4, val, seed=777 + int(10 * level), levels=level,
                                   model=shipped_model(detector), min_energy_gev=0.0)
    has = res["has"]
    e_true, e_raw = res["e_true"][has], res["energy_raw"][has].astype(np.float64)
    cls, cnn = res["classical"][has].astype(np.float64), res["energy"][has].astype(np.float64)
    print(f"\n[{detector}] background {level:g}: {has.sum()} validation photons with a cluster "
          f"(E_true {TRUE_BINS_GEV[0]}-{TRUE_BINS_GEV[-1]} GeV)")
    head = "  E_true GeV      n   classical bias/s68 " + " ".join(f"  CNN from {x * 1e3:3.0f} MeV " for x in THRESHOLDS_GEV)
    print(head)
    for lo, hi in zip(TRUE_BINS_GEV[:-1], TRUE_BINS_GEV[1:]):
        sel = (e_true >= lo) & (e_true < hi)
        if sel.sum() < 30:
            continue
        r = cls[sel] / e_true[sel]
        cells = [f"{np.median(r) - 1:+7.2%} {sigma68(r):.4f}"]
        for x in THRESHOLDS_GEV:
            e = np.where(e_raw[sel] >= x, cnn[sel], cls[sel]) / e_true[sel]
            cells.append(f"{np.median(e) - 1:+7.2%} {sigma68(e):.4f}")
        print(f"  {lo:.3f}-{hi:.3f} {sel.sum():6d}   " + "   ".join(cells))


def fast_sim_scan(detector, level, energies, n):
    """Photons below the Geant4 samples (fast simulation, docs/simulation.md): how many of their
    clusters each threshold hands to the CNN, and the median E/E_true then."""
    from eclreco import cnn_data
    from eclreco.modules.ecl_energy_correction import shipped_model
    from eclreco.rawdata import encode_events
    from eclreco.sim import simulate

    print(f"\n[{detector}] background {level:g}, fast-simulation photons below the Geant4 sample ({n} each): "
          f"share of clusters with E_raw >= X, median E/E_true when the CNN applies from X")
    print("  E_true GeV   classical " + " ".join(f"   CNN from {x * 1e3:3.0f} MeV" for x in THRESHOLDS_GEV))
    for k, e_true in enumerate(energies):
        ev = simulate(detector=detector, n_events=n, particle="gamma", energy=e_true, background=level, seed=4242 + k)
        direction = np.array([[np.sin(p["theta"]) * np.cos(p["phi"]), np.sin(p["theta"]) * np.sin(p["phi"]),
                               np.cos(p["theta"])] for p in (t["particles"][0] for t in ev.truth)])
        chunk = {"n": n, "envelopes": encode_events(detector, 0, 1, list(range(n)), ev.offsets, ev.cell, ev.amplitude,
                                                    ev.time_ticks, ev.quality)}
        res = cnn_data.run_chain(detector, iter([chunk]), direction=direction if detector == "belle2-ecl" else None,
                                 model=shipped_model(detector), min_energy_gev=0.0)
        has = res["has"]
        e_raw, cls, cnn = (res[k][has].astype(np.float64) for k in ("energy_raw", "classical", "energy"))
        cells = [f"{np.median(cls) / e_true:.3f}"]
        for x in THRESHOLDS_GEV:
            on = e_raw >= x
            cells.append(f"{on.mean():6.1%} {np.median(np.where(on, cnn, cls)) / e_true:.3f}")
        print(f"  {e_true:8.3f}      " + "   ".join(cells))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--g4-dir", default="/work/shared/data")
    ap.add_argument("--detectors", nargs="+", default=["array30", "belle2-ecl"])
    ap.add_argument("--levels", nargs="+", type=float, default=[0.0, 1.0],
                    help="belle2-ecl background levels (array30: 0 only)")
    ap.add_argument("--max-events", type=int, default=10000)
    ap.add_argument("--fast-sim-events", type=int, default=2000, help="per energy below the Geant4 sample")
    args = ap.parse_args(argv)
    for det in args.detectors:
        for level in (args.levels if det == "belle2-ecl" else [0.0]):
            scan(det, args.g4_dir, level, args.max_events)
            fast_sim_scan(det, level, [0.02, 0.03, 0.04, 0.045, 0.05], args.fast_sim_events)


if __name__ == "__main__":
    main()
