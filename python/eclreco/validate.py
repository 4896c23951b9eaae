"""`eclreco validate`: physics validation of the CNN energy correction on samples never used in
training (the held-out last 20 % of the Geant4 files, plus fast-simulation pi0 events).

    eclreco validate --detector array30 -o out/ [--g4 PATH] [--model M.onnx]

array30: held-out Geant4 photons at true energies 0.1, 0.2, 0.5, 0.6, 1, 2, 3, 4, 5 GeV, each a
window of +-5 % of the log-uniform sample. belle2-ecl: the held-out Geant4 photons at background
levels 0, 1, 2 (overlay of the fast simulation) at 0.1 ... 5 GeV, and the pi0 -> gamma gamma
mass peak of fast-simulation pi0 events (nominal background), and the clusters away from single
1 GeV photons (fast simulation, nominal background: beam background and split-offs). Everything runs through the
production chain with ECLEnergyCorrection in the path (eclreco.cnn_data). Each table comes with
the ratio that the targets are about (array30: sigma68 CNN / raw sum, belle2-ecl: CNN / classical)
and its paired-bootstrap range; array30 also counts the photons that entered an aluminium gap
(truth, from the Geant4 entry point).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from eclreco import cnn_data
from eclreco.paths import (OutputsChangedError, StagedOutputs, file_sha256, output_folder, overwrite_check,
                           previous_outputs, remove_previous_outputs, stage_record)
from eclreco.cnn_model import sigma68, sigma68_ratio_interval, summary
from eclreco.sim.showers import array30_in_gap
from eclreco.wording import count

ENERGIES = {"array30": [0.1, 0.2, 0.5, 0.6, 1.0, 2.0, 3.0, 4.0, 5.0],
            "belle2-ecl": [0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0]}
WINDOW = 0.05
BACKGROUNDS = [0.0, 1.0, 2.0]
PI0_MASS = 0.1349768


def _model_path(detector, model):
    if model:
        return model
    from eclreco.modules.ecl_energy_correction import shipped_model

    return shipped_model(detector)


REFERENCE = {"array30": "raw_sum", "belle2-ecl": "classical"}  # what the issue's σ68 targets compare with
TARGET = {"array30": "σ68 CNN / raw sum: ≤ 0.85 below 1 GeV, ≤ 0.6 from 1 GeV",
          "belle2-ecl": "σ68 CNN / classical: < 1 at every energy and level, ≤ 0.85 at 0.1–1 GeV at level 1"}
COLUMN = {"raw_sum": "raw_sum", "cluster_raw": "energy_raw", "classical": "classical", "cnn": "energy"}
LABEL = {"raw_sum": "raw sum", "cluster_raw": "cluster raw", "classical": "classical", "cnn": "CNN"}


def in_window(res, e0, window=WINDOW):
    """Per event: the true energy within e0 (1 +- window)."""
    return (res["e_true"] >= e0 * (1 - window)) & (res["e_true"] <= e0 * (1 + window))


def at_nominal(res, col, k, e0):
    """Column col of the events k, each energy scaled to the window's nominal energy (E e0 / E_true):
    the spread of E_true inside the window stays out of the mean and the RMS, as in a fixed-energy sample."""
    return res[col][k] * (e0 / res["e_true"][k])


def energy_table(res, energies, window=WINDOW, reference="raw_sum", in_gap=None):
    """Per energy: summaries of raw sum / cluster raw / classical / CNN on events with a cluster
    (energies at the window's nominal energy, at_nominal), σ68(CNN) / σ68(reference) with its
    paired-bootstrap 68 % interval and, when in_gap (per event: the photon entered the aluminium,
    truth) is given, the fraction of gap photons in the window."""
    rows = []
    for e0 in energies:
        w = in_window(res, e0, window)
        k = w & res["has"]
        et = res["e_true"][k]
        row = {"e_true": e0, "n_window": int(w.sum()), "n": int(k.sum()), "n_no_cluster": int((w & ~res["has"]).sum())}
        for name, col in COLUMN.items():
            row[name] = summary(at_nominal(res, col, k, e0), np.full(et.shape, e0))
        q, lo, hi = sigma68_ratio_interval(res["energy"][k] / et, res[COLUMN[reference]][k] / et)
        row["sigma68_ratio"] = {"reference": reference, "ratio": q, "lo": lo, "hi": hi}
        if in_gap is not None:
            row["gap_fraction"] = _mean(in_gap[k])
        r = res["energy"][k] / et
        row["cnn_tail_below_0.9"], row["cnn_tail_below_0.8"] = _mean(r < 0.9), _mean(r < 0.8)
        rr = res["raw_sum"][k] / et
        row["raw_tail_below_0.8"] = _mean(rr < 0.8)
        rows.append(row)
    return rows


def _num(x, fmt, unit=""):
    """A table's number; a dash where there is none (a window of fewer than 2 photons: 'nan' read as a result)."""
    return format(x, fmt) + unit if np.isfinite(x) else "–"


def _mean(x):
    """The mean of x (a share, of a boolean x); nan, without numpy's 'Mean of empty slice', when x is empty
    (no photon entered a gap, none fell below a threshold): a dash in the report (_num), null in the JSON."""
    return float(np.mean(x)) if np.size(x) else float("nan")


def _median(x):
    """The median of x; nan, without a warning, when x is empty (as _mean)."""
    return float(np.median(x)) if np.size(x) else float("nan")


def empty_windows(rows):
    """The energies of a table whose windows hold no photon with a cluster (rows without a number)."""
    return [r["e_true"] for r in rows if r["n"] == 0]


def _empty_note(rows):
    empty = empty_windows(rows)
    return (f"\nNo held-out photon with a cluster at {', '.join(f'{e:g}' for e in empty)} GeV: "
            f"{'this row is' if len(empty) == 1 else 'these rows are'} empty (–).\n") if empty else ""


def check_windows(e_true, energies, window=WINDOW):
    """ValueError when no event of e_true (GeV) lies in any window: a report of empty rows is no validation."""
    if not any(np.any((e_true >= e0 * (1 - window)) & (e_true <= e0 * (1 + window))) for e0 in energies):
        raise ValueError(f"none of the {e_true.size} held-out photons (true energies {e_true.min():.3g}.."
                         f"{e_true.max():.3g} GeV) is within ±{100 * window:.0f} % of {', '.join(f'{e:g}' for e in energies)} "
                         "GeV: nothing to validate (use more events, --max-events, or a sample of these energies)")


def _fmt_table(rows, names, title):
    out = [f"### {title}", "",
           "| E_true GeV | n | " + " | ".join(f"mean {LABEL[n]}" for n in names) + " | "
           + " | ".join(f"RMS {LABEL[n]}" for n in names) + " | " + " | ".join(f"bias {LABEL[n]}" for n in names)
           + " | " + " | ".join(f"σ68 {LABEL[n]}" for n in names) + " |",
           "|" + "---|" * (2 + 4 * len(names))]
    for r in rows:
        cells = [f"{r['e_true']:g}", f"{r['n']}" + (f" (+{r['n_no_cluster']} no cl.)" if r["n_no_cluster"] else "")]
        cells += [_num(1000 * r[n]["mean"], ".0f") for n in names]
        cells += [_num(1000 * r[n]["rms"], ".1f") for n in names]
        cells += [_num(100 * r[n]["bias"], "+.1f", "%") for n in names]
        cells += [_num(r[n]["sigma68"], ".4f") for n in names]
        out.append("| " + " | ".join(cells) + " |")
    out.append(_empty_note(rows))
    out.append("mean and RMS in MeV of E × E_nominal / E_true (each photon's energy scaled to the window's nominal "
               "energy, so that the spread of E_true inside the window does not enter them: RMS / E_nominal is the RMS "
               "of E/E_true); bias = median(E/E_true) - 1; σ68 = half-width of the central 68 % of E/E_true.")
    return "\n".join(out) + "\n"


def plot_energy_hists(res, energies, path, names, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(energies)
    cols = 3
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows))
    col = {"raw_sum": "grey", "cluster_raw": "grey", "classical": "tab:blue", "cnn": "tab:red"}
    for ax, e0 in zip(np.ravel(axes), energies):
        k = in_window(res, e0) & res["has"]
        bins = np.linspace(0, 1.5 * e0 * 1000, 61)
        for nm in names:
            e = at_nominal(res, COLUMN[nm], k, e0)
            ax.hist(np.clip(e * 1000, 0, bins[-1] - 1e-6), bins, histtype="step", color=col[nm],
                    label=f"{LABEL[nm]} σ68={sigma68(e / e0):.3f}")
        ax.axvline(e0 * 1000, color="k", lw=0.6, ls=":")
        ax.set_title(f"E_true = {e0:g} GeV ±5 % (n={k.sum()})", fontsize=9)
        ax.set_xlabel("E × E_nominal / E_true [MeV]", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
    for ax in np.ravel(axes)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# pi0
# ---------------------------------------------------------------------------------------------

class _Pi0Collector(cnn_data.PartsCollector):
    """The two most energetic clusters of each event: raw / classical / CNN energies, directions."""

    def event(self, batch):
        cl = batch["ECLClusters"]
        off = np.asarray(cl.offsets)
        cnt = np.diff(off)
        two = np.flatnonzero(cnt >= 2)
        if two.size == 0:
            return
        i1, i2 = off[two], off[two] + 1  # sorted by energy within an event

        def g(c, dt=np.float64):
            a = np.asarray(cl[c], dt)
            return a[i1], a[i2]
        th, ph = g("theta"), g("phi")
        u = [np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], 1) for t, p in zip(th, ph)]
        cos12 = np.sum(u[0] * u[1], 1)
        rec = {"cos12": cos12}
        for name, c in (("raw", "energy_raw"), ("classical", "energy_classical"), ("cnn", "energy")):
            e1, e2 = g(c)
            rec[name + "_e1"], rec[name + "_e2"] = e1, e2
        self.parts.append(rec)


PI0_MIN_E2_MEV = 30  # pi0_peak's min_e: the second cluster's raw energy


def pi0_peak(detector, model, n_events=20000, seed=7, background=1.0, e_min=0.3, e_max=1.5,
             min_e=PI0_MIN_E2_MEV / 1000):
    import eclreco

    path = eclreco.create_path()
    path.add_module("SimulationInput", events=n_events, detector=detector, particle="pi0", energy_min=e_min,
                    energy_max=e_max, background=background, seed=seed)
    cnn_data.add_correction_chain(path, model)
    col = path.add_module(_Pi0Collector())
    eclreco.process(path, threads=1, install_signal_handlers=False)
    r = col.concatenated()  # {} when no event has two clusters
    out = {"n_events": n_events, "pi0_energy_gev": [e_min, e_max], "background": background}
    ok = r["raw_e2"] > min_e if r else np.zeros(0, bool)
    masses = {}
    for name in ("raw", "classical", "cnn"):
        m = np.sqrt(np.maximum(2 * r[name + "_e1"] * r[name + "_e2"] * (1 - r["cos12"]), 0))[ok] if r else np.zeros(0)
        masses[name] = m
        w = m[(m > 0.07) & (m < 0.2)]
        median = _median(w)
        out[name] = {"n_in_window": int(w.size), "median_gev": median, "sigma68_gev": sigma68(w),
                     "sigma68_rel": sigma68(w) / median}
    out["n_two_clusters"] = int(ok.sum())
    return out, masses


def _fmt_pi0(p):
    """The pi0 section of the report: a dash where there is no number (fewer than 2 masses in the window: one
    π0 event, --pi0-events 1, printed 'nan'), and a note when no event has two clusters."""
    n2 = p["n_two_clusters"]
    lines = ["### π0 → γγ mass peak (fast simulation, nominal background)", "",
             f"{count(p['n_events'], 'π0 event')}, momentum p(π0) log-uniform {p['pi0_energy_gev'][0]}-{p['pi0_energy_gev'][1]} GeV; "
             f"the two clusters of highest raw energy (the stored order), second > {PI0_MIN_E2_MEV} MeV raw "
             f"({count(n2, 'event')}); median and σ68 of m(γγ) in 70-200 MeV.", "",
             "| energy | n in window | median MeV | σ68 MeV | σ68 / median |", "|---|---|---|---|---|"]
    for name in ("raw", "classical", "cnn"):
        s = p[name]
        lines.append(f"| {name} | {s['n_in_window']} | {_num(1000 * s['median_gev'], '.1f')} | "
                     f"{_num(1000 * s['sigma68_gev'], '.2f')} | {_num(s['sigma68_rel'], '.4f')} |")
    if n2 == 0:
        lines += ["", pi0_none_text(p) + ": no mass peak (use more events, --pi0-events)."]
    return "\n".join(lines) + "\n"


def pi0_none_text(p):
    """What is missing when no pi0 event has two clusters (the report's note and the warning)."""
    return (f"none of the {count(p['n_events'], 'π0 event')} has two clusters with the "
            f"second above {PI0_MIN_E2_MEV} MeV raw")


def plot_pi0(masses, path, model_label=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0.05, 0.22, 69)
    for name, c in (("raw", "grey"), ("classical", "tab:blue"), ("cnn", "tab:red")):
        w = masses[name][(masses[name] > 0.07) & (masses[name] < 0.2)]
        median = _median(w)
        ax.hist(masses[name], bins, histtype="step", color=c,
                label=f"{name}: median {_num(1000 * median, '.1f', ' MeV')}, σ68 {_num(1000 * sigma68(w), '.1f', ' MeV')}")
    ax.axvline(PI0_MASS, color="k", ls=":", lw=0.7)
    ax.set_xlabel("m(γγ) [GeV]")
    ax.legend(fontsize=8)
    ax.set_title("π0 → γγ, belle2-ecl fast simulation, nominal background" + (f"\n{model_label}" if model_label else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# clusters away from the photon (beam background, split-offs)
# ---------------------------------------------------------------------------------------------

class _ClusterCollector(cnn_data.PartsCollector):
    """Every cluster: its event, direction and raw / classical / CNN energies."""

    def event(self, batch):
        cl = batch["ECLClusters"]
        self.parts.append({"event": np.repeat(np.asarray(batch.evt, np.int64), np.diff(np.asarray(cl.offsets))),
                           **{k: np.array(cl[k], np.float64)
                              for k in ("theta", "phi", "energy_raw", "energy_classical", "energy")}})


FAKE_THRESHOLDS_GEV = (0.02, 0.05, 0.1)


def fake_clusters(detector, model, n_events=2000, energy=1.0, background=1.0, seed=31, min_angle=0.2):
    """Single photons of the fast simulation: per event, the clusters more than min_angle rad from the
    photon above each of FAKE_THRESHOLDS_GEV in raw, classical and CNN energy (each its own), and the
    largest; the CNN once as shipped and once without its domain cuts (no time cut, no x2 guard)."""
    import eclreco
    from eclreco.rawdata import encode_events
    from eclreco.sim import simulate
    from eclreco.sources import MessageSource

    ev = simulate(detector=detector, n_events=n_events, particle="gamma", energy=energy, background=background,
                  seed=seed)
    msgs = encode_events(detector, 0, 1, np.arange(n_events), ev.offsets, ev.cell, ev.amplitude, ev.time_ticks,
                         ev.quality)
    true_dir = np.array([[t["particles"][0]["theta"], t["particles"][0]["phi"]] for t in ev.truth])
    out = {"n_events": n_events, "energy_gev": energy, "background": background, "seed": seed,
           "min_angle_rad": min_angle, "thresholds_gev": list(FAKE_THRESHOLDS_GEV)}
    for variant, cuts in (("shipped", {}), ("no_domain_cuts", {"max_abs_time_ns": 0.0, "max_ratio_to_classical": 0.0})):
        path = eclreco.create_path()
        path.add_module(MessageSource(msgs))
        cnn_data.add_correction_chain(path, model, **cuts)
        col = path.add_module(_ClusterCollector())
        eclreco.process(path, threads=1, install_signal_handlers=False)
        c = col.concatenated()
        th, ph = true_dir[c["event"], 0], true_dir[c["event"], 1]
        cos_a = np.sin(c["theta"]) * np.sin(th) * np.cos(c["phi"] - ph) + np.cos(c["theta"]) * np.cos(th)
        away = np.arccos(np.clip(cos_a, -1, 1)) > min_angle
        names = (("raw", "energy_raw"), ("classical", "energy_classical"), ("cnn", "energy")) if variant == "shipped" \
            else (("cnn", "energy"),)
        for name, column in names:
            e = c[column][away]
            key = name if variant == "shipped" else f"{name}_{variant}"
            out[key] = {"per_event": [float(np.count_nonzero(e > t)) / n_events for t in FAKE_THRESHOLDS_GEV],
                        "largest_gev": float(e.max()) if e.size else 0.0}
    return out


def _fmt_fakes(f):
    head = " | ".join(f"> {1000 * t:g} MeV" for t in f["thresholds_gev"])
    lines = ["### Clusters away from the photon (fast simulation)", "",
             f"{f['n_events']} single photons of {f['energy_gev']:g} GeV at background level {f['background']:g} "
             f"(seed {f['seed']}); clusters more than {f['min_angle_rad']:g} rad from the photon (beam background, "
             "split-offs) per event above each threshold, in each energy, and the largest:", "",
             f"| energy | {head} | largest |", "|---|" + "---|" * (len(f["thresholds_gev"]) + 1)]
    for key, label in (("raw", "raw"), ("classical", "classical"), ("cnn", "CNN (shipped: time cut and ×2 guard)"),
                       ("cnn_no_domain_cuts", "CNN without its domain cuts")):
        r = f[key]
        lines.append(f"| {label} | " + " | ".join(f"{x:.2f}" for x in r["per_event"]) + f" | {r['largest_gev']:.3f} GeV |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------

PI0_PLOT = "cnn_pi0_mass.png"


def levels(detector) -> list[float]:
    """The background levels of a validation's photon tables, one plot each (array30: none)."""
    return [0.0] if detector == "array30" else BACKGROUNDS


def level_plot(detector, bg) -> str:
    """The file name of the plot of background level `bg`'s photon table."""
    return f"cnn_{detector}_bg{bg:g}.png"


def plot_names(detector) -> set[str]:
    """The file names of the plots validate writes for `detector` (each background level's, the pi0 peak's)."""
    return ({level_plot(detector, bg) for bg in [0.0, *BACKGROUNDS]}
            | ({PI0_PLOT} if detector == "belle2-ecl" else set()))


def written_plots(detector, pi0_events) -> set[str]:
    """The plots a validation of `detector` with `pi0_events` may write: each level's, and the pi0 peak's (not
    drawn when no event has two clusters, which is known only at the end)."""
    return ({level_plot(detector, bg) for bg in levels(detector)}
            | ({PI0_PLOT} if detector == "belle2-ecl" and pi0_events else set()))


def previous_plots(out_dir, detector, report):
    """paths.previous_outputs of a validation: the plots that the previous report in out_dir
    (validation_<detector>.json) lists (`files`) and `report`'s validation does not write."""
    return previous_outputs(out_dir, f"validation_{detector}.json", plot_names(detector), report["files"])


def check_overwrites(out_dir, detector, pi0_events) -> dict:
    """ValueError, before any work, when a plot this validation may write (written_plots), or its report
    (validation_<detector>.json, .md), is in out_dir and is not the previous validation's unchanged output
    (paths.overwrite_refusal): a plot or report edited since, a report that cannot be checked (an older eclreco's:
    no SHA-256 of itself) and its plots, or a file no report lists were replaced without a word. Else the state of
    those files (paths.overwrite_check): the end of the validation replaces them only if still so
    (StagedOutputs.publish), not a second validation's files or a user's that appeared there meanwhile."""
    why, unchanged = overwrite_check(out_dir, f"validation_{detector}.json",
                                     written_plots(detector, pi0_events) | {f"validation_{detector}.md"}, "validation")
    if why:
        raise ValueError(why)
    return unchanged


def _fmt_ratio_table(rows, detector):
    lab = LABEL[REFERENCE[detector]]
    gap = "gap_fraction" in rows[0]
    out = [f"σ68(CNN) / σ68({lab}) with the 16–84 % range of 1000 paired bootstrap resamplings of the window's "
           f"photons (target: {TARGET[detector]})" + ("; photons that entered the aluminium between the crystals "
                                                       "(truth: the Geant4 entry point)" if gap else "") + ":", "",
           "| E_true GeV | n | σ68 ratio | bootstrap 16–84 % |" + (" entered a gap |" if gap else ""),
           "|---|---|---|---|" + ("---|" if gap else "")]
    for r in rows:
        q = r["sigma68_ratio"]
        out.append(f"| {r['e_true']:g} | {r['n']} | {_num(q['ratio'], '.2f')} | "
                   + (f"{q['lo']:.2f}–{q['hi']:.2f}" if np.isfinite(q["lo"]) else "–") + " |"
                   + (f" {_num(100 * r['gap_fraction'], '.1f', ' %')} |" if gap else ""))
    return "\n".join(out) + "\n"


def run_validation(detector, out_dir, g4_path=None, model="", max_events=0, seed=11, pi0_events=20000,
                   fake_events=2000, quiet=False):
    """Validates `model` on the held-out events; writes the plots, validation_DETECTOR.json and .md into
    out_dir, all at the end (each under a temporary name until then: an interrupted or failed run leaves
    out_dir as it was, not new plots beside an old report, and no new empty folder), and returns the report. A plot
    in out_dir that is not the previous validation's unchanged output is refused first (check_overwrites), and one
    that appeared or changed there since is not written over at the end."""
    with output_folder(out_dir), StagedOutputs() as staged:  # (-o checked first: '' is not this folder's plots)
        unchanged = check_overwrites(out_dir, detector, pi0_events)  # what publish may replace
        return _validate(detector, out_dir, g4_path, model, max_events, seed, pi0_events, fake_events, quiet, staged,
                         unchanged)


def _validate(detector, out_dir, g4_path, model, max_events, seed, pi0_events, fake_events, quiet, staged, unchanged):
    from tqdm import tqdm

    from eclreco.train import check_max_events, checked_g4_path

    g4_path = checked_g4_path(g4_path, detector)
    given = bool(model)
    model = _model_path(detector, model)
    from eclreco.modules.ecl_energy_correction import ModelError, load_session

    from eclreco.framework import version_text

    try:  # a model of the other detector: an error, not a report
        _, meta = load_session(model, expected_detector=detector)
    except ModelError as err:  # one line naming the option, as reco.py's (it was 'error: ModelError: ...')
        raise ValueError(f"--model: {err}" if given else str(err)) from None
    g4 = cnn_data.G4Sample(g4_path, detector)
    _, _, test = g4.split()
    check_max_events(max_events, test.size, f"the held-out part of {g4_path!r} (its last "
                     f"{cnn_data.TEST_FRACTION:.0%})")
    if max_events:
        test = test[:max_events]
    check_windows(g4.e_true[test], ENERGIES[detector])  # before any work
    # which network and which sample: a retrained network has the shipped one's file name
    model_file = meta.pop("file")
    model_meta = {k: v for k, v in meta.items() if isinstance(v, str)}
    g4_file = {"path": os.path.abspath(g4_path), "sha256": file_sha256(g4_path)}
    report = {"detector": detector, "g4": os.path.basename(g4_path), "model": os.path.basename(model),
              "model_file": model_file, "model_metadata": model_meta, "g4_file": g4_file, "eclreco": version_text(),
              "test_events": [int(test[0]), int(test[-1]) + 1], "window": WINDOW}
    try:
        config = json.loads(model_meta.get("config", "{}"))
        network = "/".join(str(config[k]) for k in ("c1", "c2", "hidden"))
    except (ValueError, KeyError, TypeError):
        network = "?"
    md = [f"## {detector}: CNN energy correction on held-out Geant4 photons", "",
          f"Model `{model_file['path']}` (sha256 {model_file['sha256'][:12]}..., {model_meta.get('producer', '?')}, "
          f"seed {model_meta.get('seed', '?')}, c1/c2/hidden {network}); Geant4 file `{g4_file['path']}` (sha256 "
          f"{g4_file['sha256'][:12]}...); {version_text()}.", "",
          f"Events {test[0]}..{test[-1]} of `{os.path.basename(g4_path)}` (the last 20 %, never used in training "
          f"or early stopping), through the chain with `{os.path.basename(model)}`; true-energy windows ±{100 * WINDOW:.0f} % "
          "of the log-uniform sample; E = energy of the event's "
          + ("most energetic cluster" if detector == "array30" else "most energetic cluster within 0.1 rad of the photon")
          + "; events without such a cluster are counted (no cl.) and left out of all columns.", ""]
    names = ["raw_sum", "classical", "cnn"] if detector == "array30" else ["cluster_raw", "classical", "cnn"]
    report["tables"] = {}
    report["files"] = {}  # every plot of this validation (name: SHA-256): the next one into -o replaces them all
    for bg in levels(detector):
        with tqdm(total=test.size, desc=f"validate {detector} bg {bg:g}", disable=quiet, file=sys.stderr) as bar:
            res = cnn_data.g4_chain_sample(g4, test, seed=seed + int(10 * bg), levels=bg if bg > 0 else None,
                                           model=model, progress=bar)
        in_gap = None
        if detector == "array30" and g4.entry_xy_mm is not None:
            in_gap = array30_in_gap(g4.entry_xy_mm[res["g4_index"]] / 10.0)
        rows = energy_table(res, ENERGIES[detector], reference=REFERENCE[detector], in_gap=in_gap)
        report["tables"][f"bg{bg:g}"] = rows
        if empty := empty_windows(rows):  # said, not only written as rows of dashes (they were 'nan', exit 0)
            report.setdefault("empty_windows", {})[f"bg{bg:g}"] = empty
        report["chain"] = str(res["chain"])
        title = f"{detector}, background level {bg:g}" if detector != "array30" else "array30 (no background)"
        md.append(_fmt_table(rows, names, title))
        md.append(_fmt_ratio_table(rows, detector))
        final = os.path.join(out_dir, level_plot(detector, bg))
        plot_energy_hists(res, ENERGIES[detector], staged.path(final), names,
                          f"{title}; {os.path.basename(model)} (sha256 {model_file['sha256'][:12]})")
        report["files"][os.path.basename(final)] = file_sha256(staged.path(final))
        if detector == "array30":
            k = res["has"]
            r = res["energy"][k] / res["e_true"][k]
            rr = res["raw_sum"][k] / res["e_true"][k]
            rc = res["classical"][k] / res["e_true"][k]
            report["tails"] = {"n": int(k.sum()), "n_no_cluster": int((~k).sum()),
                               "cnn_below_0.9": _mean(r < 0.9), "cnn_below_0.8": _mean(r < 0.8),
                               "cnn_below_0.5": _mean(r < 0.5), "cnn_above_1.5": _mean(r > 1.5), "cnn_above_2": _mean(r > 2),
                               "cnn_max": float(r.max()) if r.size else float("nan"),
                               "classical_below_0.8": _mean(rc < 0.8), "classical_below_0.5": _mean(rc < 0.5),
                               "classical_above_1.5": _mean(rc > 1.5),
                               "raw_below_0.8": _mean(rr < 0.8), "raw_below_0.5": _mean(rr < 0.5)}
            t = report["tails"]
            gap_text = ""
            if in_gap is not None:
                g = in_gap[k]
                t.update({"gap_fraction": _mean(in_gap), "gap_cnn_median": _median(r[g]),
                          "gap_raw_median": _median(rr[g]), "cnn_below_0.8_in_gap": _mean(g[r < 0.8])})
                gap_text = (f"{_num(100 * t['gap_fraction'], '.1f', ' %')} of the photons entered the aluminium between "
                            f"the crystals (truth); with a cluster, their median E/E_true is {_num(t['gap_raw_median'], '.2f')} "
                            f"(raw sum) and {_num(t['gap_cnn_median'], '.2f')} (CNN), and they are "
                            f"{_num(100 * t['cnn_below_0.8_in_gap'], '.0f', ' %')} of the photons with E_CNN/E_true < 0.8. ")
            md.append(f"Gap tails (all test energies): {gap_text}{t['n_no_cluster']} of {t['n'] + t['n_no_cluster']} events "
                      f"without any cluster; E_CNN/E_true < 0.9: {_num(100 * t['cnn_below_0.9'], '.1f', ' %')}, < 0.8: "
                      f"{_num(100 * t['cnn_below_0.8'], '.1f', ' %')}, < 0.5: {_num(100 * t['cnn_below_0.5'], '.1f', ' %')} "
                      f"(classical < 0.8: {_num(100 * t['classical_below_0.8'], '.1f', ' %')}, < 0.5: "
                      f"{_num(100 * t['classical_below_0.5'], '.1f', ' %')}; raw sum < 0.8: "
                      f"{_num(100 * t['raw_below_0.8'], '.1f', ' %')}, < 0.5: {_num(100 * t['raw_below_0.5'], '.1f', ' %')}). "
                      f"Over-correction: E_CNN/E_true > 1.5 in {_num(100 * t['cnn_above_1.5'], '.2f', ' %')}, > 2 in "
                      f"{_num(100 * t['cnn_above_2'], '.2f', ' %')} (largest {_num(t['cnn_max'], '.2f')}; classical > 1.5: "
                      f"{_num(100 * t['classical_above_1.5'], '.2f', ' %')}).\n")
    if detector == "belle2-ecl" and pi0_events:
        p, masses = pi0_peak(detector, model, n_events=pi0_events)
        report["pi0"] = p
        if p["n_two_clusters"]:  # (else nothing to draw: the section says so)
            final = os.path.join(out_dir, PI0_PLOT)
            plot_pi0(masses, staged.path(final),
                     f"{os.path.basename(model)} (sha256 {model_file['sha256'][:12]})")
            report["files"][os.path.basename(final)] = file_sha256(staged.path(final))
        md.append(_fmt_pi0(p))
    if detector == "belle2-ecl" and fake_events:
        report["fakes"] = fake_clusters(detector, model, n_events=fake_events)
        md.append(_fmt_fakes(report["fakes"]))
    if report.get("pi0", {}).get("n_two_clusters") == 0:
        print(f"eclreco validate: warning: {pi0_none_text(report['pi0'])}: the pi0 section has no mass peak",
              file=sys.stderr, flush=True)
    if report.get("empty_windows"):
        print("eclreco validate: warning: windows without a held-out photon with a cluster (empty rows): "
              + "; ".join(f"{bg} at {', '.join(f'{e:g}' for e in es)} GeV" for bg, es in report["empty_windows"].items())
              + f" (of {test.size} events)", file=sys.stderr, flush=True)
    stage_record(staged, out_dir, f"validation_{detector}.json", report, {f"validation_{detector}.md": "\n".join(md)})
    previous = previous_plots(out_dir, detector, report)  # (the old report, before the new one)
    try:  # the plots, then the report: one set, as late as possible, over nothing made since the check
        staged.publish(unchanged, "validation")
    except OutputsChangedError as err:
        raise ValueError(f"-o {out_dir!r}: {err}") from None
    if not quiet:
        print("\n".join(md))
    # then the previous validation's other plots (a pi0 peak that this one, --pi0-events 0, has not)
    remove_previous_outputs(out_dir, *previous, "eclreco validate", "validation", quiet)
    return report


PI0_EVENTS, FAKE_EVENTS = 20000, 2000  # the belle2-ecl sections' defaults


def _cmd(args) -> int:
    # belle2-ecl's sections: an option of one that does not run is a mistake to point out (it was ignored)
    given = [o for o, v in (("--pi0-events", args.pi0_events), ("--fake-events", args.fake_events)) if v is not None]
    if given and args.detector != "belle2-ecl":  # a bad option: one line, exit 2, as argparse's (SystemExit said 1)
        print(f"eclreco validate: error: {', '.join(given)}: the pi0 peak and the clusters away from the photon are "
              f"belle2-ecl's sections (fast simulation with beam background), not {args.detector}'s", file=sys.stderr,
              flush=True)
        return 2
    from eclreco.train import TrainingInputError, g4_file_error

    try:
        run_validation(args.detector, args.output, g4_path=args.g4, model=args.model, max_events=args.max_events,
                       pi0_events=PI0_EVENTS if args.pi0_events is None else args.pi0_events,
                       fake_events=FAKE_EVENTS if args.fake_events is None else args.fake_events, quiet=args.quiet)
    except TrainingInputError as err:  # a Geant4 file it cannot use: one line, exit 2, as train's
        print(f"eclreco validate: error: {err}", file=sys.stderr, flush=True)
        return 2
    except cnn_data.G4SampleError as err:  # named by its option, as train's
        print(f"eclreco validate: error: {g4_file_error(bool(args.g4), err.path, err.why)}", file=sys.stderr,
              flush=True)
        return 2
    return 0


def add_validate_parser(subparsers):
    from eclreco.cli_types import NON_NEGATIVE_INT

    p = subparsers.add_parser("validate", help="physics validation of the CNN energy correction (tables, plots)",
                              description=__doc__)
    p.add_argument("--detector", required=True, choices=["array30", "belle2-ecl"],
                   help="the detector whose model is validated (its held-out sample and sections)")
    p.add_argument("-o", "--output", required=True, help="output directory (validation_<det>.md/.json, PNGs)")
    p.add_argument("--g4", default=None, help="Geant4 file (default ../shared/data/g4_array30_train.npz or "
                   "g4_belle2_train.npz, from the working directory or the source tree)")
    p.add_argument("--model", default="", help="ONNX model (default: the shipped model)")
    p.add_argument("--max-events", type=NON_NEGATIVE_INT, default=0, help="use only this many held-out events (0: all; more than "
                   "there are: an error)")
    p.add_argument("--pi0-events", type=NON_NEGATIVE_INT, default=None,
                   help=f"pi0 events for the mass peak (belle2-ecl; default {PI0_EVENTS}, 0: none)")
    p.add_argument("--fake-events", type=NON_NEGATIVE_INT, default=None,
                   help=f"single 1 GeV photons at nominal background for the clusters away from the photon (belle2-ecl; "
                        f"default {FAKE_EVENTS}, 0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary lines (warnings and errors "
                   "still go to stderr)")
    p.set_defaults(func=_cmd)
    return p
