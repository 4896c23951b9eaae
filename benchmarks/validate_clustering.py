"""Clustering validation on belle2-ecl single photons (fast simulation, fresh samples).

    python benchmarks/validate_clustering.py [--events N] [--background B] [-o docs/img]

For photons of 0.1, 0.2, 0.5, 1 and 2 GeV from the interaction point: the fraction of events with
a cluster above half the photon energy (0.25 GeV at 0.5 GeV) within 0.075 rad of the true
direction, the angular resolution, and the rate of clusters not matched to the photon (beam
background and split-offs) above 20, 50 and 100 MeV. Raw and classically corrected energy of the
matched cluster (the most energetic within 0.075 rad): bias (median E/E_true - 1), sigma68 and
the RMS of E/E_true (which the photons lost in the air gaps widen), with the number of matched
photons. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

import eclreco
from eclreco.cnn_model import sigma68
from eclreco.rawdata import encode_events
from eclreco.sources import MessageSource
from eclreco.sim import simulate


class CollectClusters(eclreco.Module):
    """keeps the clusters of every event"""

    def __init__(self):
        super().__init__()
        self.parts = []

    def makes(self):
        return ()

    def requires(self):
        return ("ECLClusters",)

    def event(self, batch):
        cl = batch["ECLClusters"]
        self.parts.append((batch.evt.copy(), np.diff(cl.offsets),
                           {k: np.array(cl[k]) for k in ("energy_raw", "energy", "theta", "phi")}))


def run_energy(e_gev, n, background, seed):
    ev = simulate(detector="belle2-ecl", n_events=n, particle="gamma", energy=e_gev, background=background,
                  seed=seed)
    msgs = encode_events("belle2-ecl", 0, 1, np.arange(n), ev.offsets, ev.cell, ev.amplitude, ev.time_ticks,
                         ev.quality)
    path = eclreco.create_path()
    path.add_module(MessageSource(msgs))
    path.add_module("ECLUnpacker")
    path.add_module("ECLClusterizer")
    path.add_module("ECLLeakageCorrection")
    col = path.add_module(CollectClusters())
    eclreco.process(path, batch_size=256)
    evt = np.concatenate([p[0] for p in col.parts])
    counts = np.concatenate([p[1] for p in col.parts])
    cols = {k: np.concatenate([p[2][k] for p in col.parts]) for k in col.parts[0][2]}
    true_th = np.array([t["particles"][0]["theta"] for t in ev.truth])[evt]
    true_ph = np.array([t["particles"][0]["phi"] for t in ev.truth])[evt]
    ev_of = np.repeat(np.arange(evt.size), counts)
    th, ph = cols["theta"], cols["phi"]
    cos_a = (np.sin(th) * np.sin(true_th[ev_of]) * np.cos(ph - true_ph[ev_of]) + np.cos(th) * np.cos(true_th[ev_of]))
    angle = np.arccos(np.clip(cos_a, -1, 1))
    near = angle < 0.075
    good = near & (cols["energy_raw"] > 0.5 * e_gev)
    found = np.zeros(evt.size, bool)
    np.logical_or.at(found, ev_of[good], True)
    # The matched cluster: the most energetic cluster within 0.075 rad.
    best = np.full(evt.size, -1)
    order = np.argsort(-cols["energy_raw"], kind="stable")
    for k in order[::-1]:  # reversed: the most energetic is written last
        if near[k]:
            best[ev_of[k]] = k
    m = best[best >= 0]
    fake = ~(angle < 0.2)
    geo = eclreco.Geometry.get("belle2-ecl")
    in_acceptance = np.array([geo.ring_at_theta(t) >= 0 for t in true_th])
    ratio_raw, ratio_cls = cols["energy_raw"][m] / e_gev, cols["energy"][m] / e_gev
    res = {"E": e_gev, "n": int(evt.size), "n_matched": int(m.size), "efficiency": found.mean(),
           "eff_err": np.sqrt(found.mean() * (1 - found.mean()) / evt.size),
           "angle_res_mrad": 1e3 * np.median(angle[m]),
           "raw_bias": np.median(ratio_raw) - 1, "raw_s68": sigma68(ratio_raw), "raw_rms": np.std(ratio_raw),
           "cls_bias": np.median(ratio_cls) - 1, "cls_s68": sigma68(ratio_cls), "cls_rms": np.std(ratio_cls),
           "ratio_raw": ratio_raw, "ratio_cls": ratio_cls}
    deposited = np.add.reduceat(np.append(ev.true_edep_gev, 0.0), ev.true_edep_offsets[:-1]) * (
        np.diff(ev.true_edep_offsets) > 0)
    contained = deposited[evt] > 0.5 * e_gev
    res["eff_deposited"] = found[contained].mean()
    res["n_deposited"] = int(contained.sum())
    res["eff_acceptance"] = found[in_acceptance].mean()
    res["n_acceptance"] = int(in_acceptance.sum())
    for thr in (0.02, 0.05, 0.1):
        res[f"fake_{int(thr * 1000)}"] = np.count_nonzero(fake & (cols["energy_raw"] > thr)) / evt.size
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--background", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=424242, help="not a seed used by training or the tables")
    ap.add_argument("-o", "--plots", default="docs/img")
    args = ap.parse_args(argv)
    rows = [run_energy(e, args.events, args.background, args.seed + k) for k, e in enumerate((0.1, 0.2, 0.5, 1.0, 2.0))]
    print(f"belle2-ecl single photons, fast simulation, background {args.background}, seed {args.seed}\n")
    print("| E (GeV) | events | efficiency (cluster > E/2 within 0.075 rad) | same, photons not aimed at a theta gap | same, photons that deposited > E/2 | median angle (mrad) | "
          "unmatched clusters/event > 20 / 50 / 100 MeV | matched | raw bias | raw σ68 | raw RMS | classical bias | classical σ68 | "
          "classical RMS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['E']:g} | {r['n']} | {100 * r['efficiency']:.2f} ± {100 * r['eff_err']:.2f} % | "
              f"{100 * r['eff_acceptance']:.2f} % of {r['n_acceptance']} | "
              f"{100 * r['eff_deposited']:.2f} % of {r['n_deposited']} | "
              f"{r['angle_res_mrad']:.1f} | {r['fake_20']:.2f} / {r['fake_50']:.2f} / {r['fake_100']:.2f} | "
              f"{r['n_matched']} | {100 * r['raw_bias']:+.2f} % | {r['raw_s68']:.4f} | {r['raw_rms']:.4f} | "
              f"{100 * r['cls_bias']:+.2f} % | {r['cls_s68']:.4f} | {r['cls_rms']:.4f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3), sharey=False)
    for ax, r in zip(axes, rows):
        bins = np.linspace(0.6, 1.2, 61)
        ax.hist(r["ratio_raw"], bins, histtype="step", label="raw")
        ax.hist(r["ratio_cls"], bins, histtype="step", label="classical")
        ax.set_title(f"{r['E']:g} GeV, bkg {args.background:g}")
        ax.set_xlabel("E / E_true")
    axes[0].legend()
    fig.tight_layout()
    os.makedirs(args.plots, exist_ok=True)
    out = os.path.join(args.plots, f"clustering_energy_bkg{args.background:g}.png")
    fig.savefig(out, dpi=90)
    print(f"\nplot: {out}")


if __name__ == "__main__":
    main()
