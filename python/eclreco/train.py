"""`eclreco train`: train the CNN energy correction of a detector and export it to ONNX.

    eclreco train --detector array30 -o out/ [--g4 PATH] [--epochs N] [--seed S] [--sizes small]
                  [--restarts N]

The training set is made THROUGH THE PROJECT'S OWN CHAIN (eclreco.cnn_data): Geant4 deposits ->
(belle2-ecl: beam-background overlay, one level per chunk of 250 events: 0 in 50 % of the chunks,
else uniform in [0, 2]) -> electronics -> wire format -> ECLUnpacker -> ECLClusterizer ->
ECLLeakageCorrection -> the matched cluster (array30: the most energetic cluster; belle2-ecl: the
most energetic cluster within 0.1 rad of the true photon) with the extra features that
ECLEnergyCorrection computes the same way online (EXTRA_FEATURES): the cluster energy after the
classical correction (`energy_in`; the shipped networks are residuals on it, RESIDUAL) and,
belle2-ecl, the event's number of out-of-time digits (a measure of the background level).
Split: the last 20 % of the Geant4 file is the TEST set (never used here except for the test
metrics of the model card); of the first 80 %, the last 1/8 is the validation set for early
stopping, the rest the training set. Fixed seeds throughout, so the command reproduces the
shipped models (python/eclreco/models/<detector>.onnx) bit for bit on the same platform / torch
version (up to thread-count dependent float summation order).
--restarts N trains the network from N initialisations (seeds S, S+1, ...; the same chain sample)
and keeps the one with the lowest validation loss: an unlucky initialisation can stall (belle2-ecl,
seed 5: validation loss 14 % above seeds 1-4, sigma68 15 % wider), and the validation loss shows it.
The default, 1, is what reproduces the shipped models.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np

from eclreco import cnn_data
from eclreco.cli_types import choice_list_error
from eclreco.paths import (OutputsChangedError, StagedOutputs, file_sha256, missing_folder, output_folder,
                           overwrite_check, previous_outputs, remove_previous_outputs, stage_record, unwritable_folder)
from eclreco.cnn_model import (EVENT_FEATURE_NAMES, EVENT_FEATURE_SCALE, FEATURE_NAMES, X_IN_RANGE, build_model,
                               check_onnx_agreement, count_params, export_onnx, flops_per_cluster, onnx_throughput,
                               sigma68, summary)
from eclreco.wording import count

SIZES = {
    "tiny": dict(c1=4, c2=8, hidden=16),
    "small": dict(c1=8, c2=16, hidden=32),
    "wide": dict(c1=8, c2=16, hidden=64),
    "medium": dict(c1=16, c2=32, hidden=64),
}
DEFAULT_SIZE = {"array30": "wide", "belle2-ecl": "wide"}
# belle2-ecl: level 0 in 50 % of the chunks, else uniform in [0, 2]; one level per chunk of 250 events
BACKGROUND_RANGE = {"array30": None, "belle2-ecl": (0.0, 2.0, 0.5)}
BACKGROUND_CHUNK = {"array30": 2000, "belle2-ecl": 250}
# extra features appended to ECLClusters.features (eclreco.cnn_model.EXTRA_FEATURE_NAMES): the cluster
# energy as it arrives (after the classical correction) and, belle2-ecl, the event's background measure
EXTRA_FEATURES = {"array30": ("energy_in",), "belle2-ecl": ("energy_in", "event_oot_digits")}
# residual models: y = log(energy_in / energy_raw) + network, the last layer starting at zero
RESIDUAL = {"array30": True, "belle2-ecl": True}
# belle2-ecl: loss weight of the events without background (level 0), relative to the others
LEVEL0_WEIGHT = {"array30": 1.0, "belle2-ecl": 2.0}
EPOCHS = {"array30": 150, "belle2-ecl": 80}
# array30: the training events enter this many times, under the symmetries of the reference beam
# (cnn_data.G4Sample.symmetric_copies), each copy with its own electronics noise; validation and test
# events once, as they are
AUGMENT = {"array30": 1, "belle2-ecl": 1}
# decay per step of the exponential moving average of the weights that is validated and shipped (0: none)
EMA = {"array30": 0.998, "belle2-ecl": 0.998}
# residual squashed to B tanh(r/B), B = softplus(a + b log E_raw) learned (cnn_model.build_model)
BOUND = {"array30": False, "belle2-ecl": False}
HUBER_DELTA = 0.05
# loss on d = y_pred - y = log(E_pred / E_true):
#   huber_log: Huber(d, delta); mix: Huber(d, delta) + w_ratio * (exp(d) - 1)^2;
#   huber_over: Huber(d, delta) + w_ratio * max(exp(d) - 1, 0)^2 (only over-correction squared)
LOSS = {"array30": {"kind": "huber_log", "delta": HUBER_DELTA},
        "belle2-ecl": {"kind": "huber_log", "delta": HUBER_DELTA}}


def make_loss(spec):
    import torch

    kind, delta = spec["kind"], float(spec.get("delta", HUBER_DELTA))
    w = float(spec.get("w_ratio", 0.0))
    huber = torch.nn.HuberLoss(delta=delta, reduction="none")

    def loss(pred, y, weight=None):
        d = pred - y
        out = huber(d, torch.zeros_like(d)) if kind in ("huber_log", "mix", "huber_over") else 0.0
        if kind in ("mix", "mse_ratio"):
            out = out + (w if kind == "mix" else 1.0) * (torch.exp(d) - 1.0) ** 2
        elif kind == "huber_over":
            out = out + w * torch.clamp(torch.exp(d) - 1.0, min=0.0) ** 2
        if weight is None:
            return out.mean()
        return (out * weight).sum() / weight.sum()
    return loss


def loss_text(spec):
    if spec["kind"] == "huber_log":
        return f"Huber loss (delta {spec['delta']}) on log(E_pred/E_true)" + (
            f" + {spec['r_l1']} x |r| (r = the residual on the classical correction)" if spec.get("r_l1") else "")
    if spec["kind"] == "mix":
        return (f"Huber (delta {spec['delta']}) on log(E_pred/E_true) + {spec['w_ratio']} x "
                "(E_pred/E_true - 1)^2")
    if spec["kind"] == "huber_over":
        return (f"Huber (delta {spec['delta']}) on log(E_pred/E_true) + {spec['w_ratio']} x "
                "max(E_pred/E_true - 1, 0)^2")
    return "(E_pred/E_true - 1)^2"
# The fewest matched clusters the validation split may hold (eclreco train; about 1000 events of a file, whose
# validation split is 10 %). The network kept (early stopping, --restarts) is the one of the lowest validation
# loss, the only check against over-fitting 1-11 k parameters, and that loss spreads over the clusters by 3-4
# times its mean (the classical correction's Huber loss, 3000 photons of each reference file): with n clusters it
# is known to about 3.5 / sqrt(n), +-35 % at 100, below which the kept network is chosen by noise. A floor that
# catches a truncated or wrong file, not a recommendation: the reference files hold 100 000 events.
MIN_VALIDATION_CLUSTERS = 100
RECOMMENDED_MIN_ENERGY_GEV = 0.05  # the Geant4 samples start at 50 MeV (benchmarks/cnn_domain_scan.py)


def default_g4_path(detector: str) -> str:
    """../shared/data/<file> from the working directory or from the source tree of the package."""
    from eclreco.paths import find_beside_package

    rel = os.path.join("..", "shared", "data", cnn_data.G4_DEFAULT[detector])
    return find_beside_package(rel) or rel


def checked_g4_path(g4_path, detector) -> str:
    """The Geant4 file of train and validate: --g4, or the detector's default (default_g4_path), checked
    before any work: a TrainingInputError names --g4 and the path (open's OSError, '[Errno 21] Is a
    directory: ...', named neither)."""
    from eclreco.paths import unreadable_file

    path = g4_path or default_g4_path(detector)
    if why := unreadable_file(path, "Geant4 file"):
        raise TrainingInputError(g4_file_error(bool(g4_path), path, why))
    return path


def g4_file_error(given: bool, path: str, why: str) -> str:
    """The line of a Geant4 file that train and validate cannot use: it names --g4 (`given`), else says that
    the file is the detector's default, which --g4 replaces (G4Sample's own errors named the path alone)."""
    return f"--g4 {path!r}: {why}" if given else f"the default Geant4 file {path!r}: {why} (use --g4)"


def check_max_events(max_events, available, what):
    """TrainingInputError when --max-events asks for more than the `available` events of `what` (train: the
    Geant4 file; validate: its held-out part), before any work: both ran on all of them without a word, and
    train's card and reproduce command recorded the number asked for, not the events it trained on."""
    if max_events > available:
        raise TrainingInputError(f"--max-events {max_events}: {what} holds {count(available, 'event')} "
                                 "(0: all of them)")


def chain_samples(detector, g4_path, seed=1, max_events=0, quiet=False, copies=None):
    """(train, val, test) dicts of matched clusters through the chain; copies: how many times the
    training events enter (array30: under the symmetries of the beam, G4Sample.symmetric_copies;
    default AUGMENT)."""
    from tqdm import tqdm

    g4 = cnn_data.G4Sample(g4_path, detector)
    tr, va, te = g4.split()
    check_max_events(max_events, g4.n, f"the Geant4 file {g4_path!r}")
    if max_events:
        f = max_events / g4.n
        tr, va, te = tr[: max(int(tr.size * f), 1)], va[: max(int(va.size * f), 1)], te[: max(int(te.size * f), 1)]
    out = []
    levels = BACKGROUND_RANGE[detector]
    copies = AUGMENT[detector] if copies is None else int(copies)
    with tqdm(total=tr.size * copies + va.size + te.size, desc=f"chain {detector}", unit="ev", disable=quiet,
              file=sys.stderr) as bar:
        for k, idx in enumerate((tr, va, te)):
            src = g4
            if k == 0 and copies != 1:  # symmetric_copies refuses a count out of 1..8 or another detector
                src = g4.symmetric_copies(idx, copies)
                idx = np.arange(src.n)
            s = cnn_data.g4_chain_sample(src, idx, seed=seed * 100 + k, levels=levels, progress=bar,
                                         chunk=BACKGROUND_CHUNK[detector])
            s["copies"] = np.array(copies if k == 0 else 1)
            s["chain_seed"] = np.array(seed)  # (a cache's is its own: the card's command names it)
            out.append(s)
    return out


def extra_columns(s, names, m=None):
    """[n, len(names)] float32: the extra features (cnn_model.EXTRA_FEATURE_NAMES) of the matched clusters
    of a chain sample, as ECLEnergyCorrection feeds them online: energy_in = the cluster energy after
    the classical correction (`classical`, ECLClusters.energy before ECLEnergyCorrection), event
    features from the sample's `event_features` (computed by cnn_model.event_features)."""
    m = slice(None) if m is None else m
    cols = []
    for n in names:
        if n == "energy_in":
            cols.append(s["classical"][m].astype(np.float32))
        elif n in EVENT_FEATURE_NAMES:
            cols.append(s["event_features"][m][:, EVENT_FEATURE_NAMES.index(n)].astype(np.float32))
        else:
            raise ValueError(f"unknown extra feature {n!r}")
    n_rows = s["features"][m].shape[0]
    return np.stack(cols, 1) if cols else np.zeros((n_rows, 0), np.float32)


def _arrays(s, extra=()):
    """(image, features, y = log(E_true/E_raw), mask) of the matched clusters; features = the
    cluster features then the extra features `extra` (names)."""
    m = s["has"] & (s["energy_raw"] > 0)
    f = s["features"][m].astype(np.float32)
    if extra:
        f = np.ascontiguousarray(np.concatenate([f, extra_columns(s, extra, m)], 1), np.float32)
    return (s["image"][m].astype(np.float32), f,
            np.log(s["e_true"][m] / s["energy_raw"][m]).astype(np.float32), m)


def train_model(train, val, size_cfg, epochs=60, seed=1, batch_size=512, lr=3e-3, patience=10,
                quiet=False, image_size=7, event_features=(), loss=None, residual=False, level0_weight=1.0,
                ema=0.0, bound=False):
    """Train one network; event_features: the extra features (names, cnn_model.EXTRA_FEATURE_NAMES),
    residual: y = log(energy_in/energy_raw) + network, level0_weight: loss weight of the events
    without background (chain samples with a `background` column) relative to the others, ema: decay
    per step of an exponential moving average of the weights (0: none); with it, validation, early
    stopping and the returned network use the averaged weights."""
    import torch
    from tqdm import tqdm

    torch.set_num_threads(2)
    torch.manual_seed(seed)
    np.random.seed(seed)
    extra = tuple(event_features)
    xi, xf, y, m = _arrays(train, extra)
    vi, vf, vy, vm = _arrays(val, extra)
    for split, n_clusters, s in (("training", xi.shape[0], train), ("validation", vi.shape[0], val)):
        if n_clusters == 0:  # (the epoch's loss divided by zero, or early stopping ran on NaN)
            raise TrainingInputError(f"the {split} split has no matched cluster in its {len(s['has'])} events: "
                                     "use more events (--max-events) or another Geant4 file")
    model = build_model(image_size=image_size, n_features=len(FEATURE_NAMES) + len(extra), extra_names=extra,
                        residual=residual, bound=bound, **size_cfg)
    model.event_features = extra
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=3)
    loss_fn = make_loss(loss or {"kind": "huber_log", "delta": HUBER_DELTA})
    r_l1 = float((loss or {}).get("r_l1", 0.0))

    def weights(s, mask):
        if level0_weight == 1.0 or "background" not in s:
            return None
        return torch.from_numpy(np.where(s["background"][mask] == 0, level0_weight, 1.0).astype(np.float32))
    tw, vw = weights(train, m), weights(val, vm)
    ti, tf, ty = torch.from_numpy(xi), torch.from_numpy(xf), torch.from_numpy(y)
    vti, vtf, vty = torch.from_numpy(vi), torch.from_numpy(vf), torch.from_numpy(vy)
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    avg = [p.detach().clone() for p in params] if ema else None
    best, best_state, best_epoch, bad = float("inf"), None, -1, 0
    history = []
    t0 = time.time()
    bar = tqdm(range(epochs), desc=f"train {size_cfg}", disable=quiet, file=sys.stderr)
    for ep in bar:
        model.train()
        perm = torch.randperm(ti.shape[0], generator=gen)
        tot = 0.0
        for a in range(0, perm.numel(), batch_size):
            b = perm[a: a + batch_size]
            opt.zero_grad()
            loss = loss_fn(model.log_ratio(ti[b], tf[b]), ty[b], None if tw is None else tw[b])
            if r_l1 and model.residual:  # shrink the residual towards the classical correction
                loss = loss + r_l1 * model.last_residual.abs().mean()
            loss.backward()
            opt.step()
            if avg is not None:
                with torch.no_grad():
                    for q, p in zip(avg, params):
                        q.mul_(ema).add_(p.detach(), alpha=1.0 - ema)
            tot += loss.item() * b.numel()
        model.eval()
        if avg is not None:  # evaluate (and keep) the averaged weights; train on with the raw ones
            raw = [p.detach().clone() for p in params]
            with torch.no_grad():
                for q, p in zip(avg, params):
                    p.copy_(q)
        with torch.no_grad():
            pv = model.log_ratio(vti, vtf)
            vloss = float(loss_fn(pv, vty, vw))
            vs68 = sigma68(np.exp(pv.numpy() - vy))
        sched.step(vloss)
        history.append({"epoch": ep, "train_loss": tot / perm.numel(), "val_loss": vloss, "val_sigma68": vs68})
        bar.set_postfix(train=f"{tot / perm.numel():.5f}", val=f"{vloss:.5f}", s68=f"{vs68:.4f}")
        if vloss < best - 1e-7:
            best, best_epoch, bad = vloss, ep, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        if avg is not None:
            with torch.no_grad():
                for r_, p in zip(raw, params):
                    p.copy_(r_)
        if bad >= patience:
            break
    bar.close()
    if history and best_state is None:  # else the untrained network was written as the trained one (exit 0)
        raise TrainingInputError(f"the validation loss was not finite in any of the {len(history)} epochs (the "
                                 f"training diverged: {history[-1]['val_loss']}): lower the learning rate, or "
                                 "check the sample's energies")
    if best_state is not None:  # (epochs=0: the initial network)
        model.load_state_dict(best_state)
    model.eval()
    return model, {"epochs_run": len(history), "best_epoch": best_epoch, "best_val_loss": best,
                   "train_seconds": time.time() - t0, "history": history,
                   "n_train": int(xi.shape[0]), "n_val": int(vi.shape[0])}


def predict(model, s):
    import torch

    xi, xf, _, m = _arrays(s, tuple(model.config["extra_names"]))
    with torch.no_grad():
        e = model(torch.from_numpy(xi), torch.from_numpy(xf)).numpy()
    return e, m


def test_metrics(model, test, detector):
    e_cnn, m = predict(model, test)
    et = test["e_true"][m]
    res = {"n_events": int(test["has"].size), "n_matched": int(m.sum()),
           "raw_sum": summary(test["raw_sum"][m], et), "cluster_raw": summary(test["energy_raw"][m], et),
           "classical": summary(test["classical"][m], et), "cnn": summary(e_cnn, et)}
    # by energy decade
    bins = [0.05, 0.2, 0.5, 1.0, 2.0, 6.0]
    res["by_energy"] = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        k = (et >= lo) & (et < hi)
        res["by_energy"].append({"e_lo": lo, "e_hi": hi, "n": int(k.sum()),
                                 "sigma68_raw_sum": sigma68(test["raw_sum"][m][k] / et[k]),
                                 "sigma68_classical": sigma68(test["classical"][m][k] / et[k]),
                                 "sigma68_cnn": sigma68(e_cnn[k] / et[k]),
                                 "bias_cnn": float(np.median(e_cnn[k] / et[k]) - 1) if k.any() else float("nan")})
    # gap tails (array30): fraction of events with E_cnn/E_true < 0.9 / 0.8
    r = e_cnn / et
    res["tail_below_0.9"] = float(np.mean(r < 0.9))
    res["tail_below_0.8"] = float(np.mean(r < 0.8))
    return res


# What a card written before a provenance key (the shipped ones: no data.g4_sha256, data.g4_path, command, files)
# says for it: the key is not filled in with a guess
NOT_RECORDED = "not recorded (older card)"


def write_card(out_dir, detector, card, staged=None):
    """The card as <detector>.json and, readable, <detector>.md (paths.stage_record: the JSON records their SHA-256,
    so that the next training into out_dir replaces them only if unchanged), staged in `staged` (published with the
    networks), or written now without it; a card written before a provenance key (the shipped ones) is rendered too,
    with NOT_RECORDED for what it lacks."""
    t = card["test"]
    data = card["data"]
    sha = f"sha256 {data['g4_sha256'][:12]}..." if "g4_sha256" in data else f"sha256 {NOT_RECORDED}"
    g4_path = f"`{data['g4_path']}`" if "g4_path" in data else f"path {NOT_RECORDED}"
    command = f"`{card['command']}`" if "command" in card else NOT_RECORDED
    lines = [f"# Model card: CNN energy correction, {detector}", "",
             f"- file: `{detector}.onnx` ({card['onnx_bytes']} bytes), inputs `image` float32 [N,{card['config']['image_size']},{card['config']['image_size']}] (GeV), "
             f"`features` float32 [N,{card['config']['n_features']}] ({', '.join(card['feature_names'])}); output `energy` float32 [N] (GeV, corrected)",
             f"- target: {card['target']}",
             f"- architecture: {card['architecture']}",
             f"- parameters: {card['n_params']}, FLOPs per cluster: {card['flops_per_cluster']}",
             f"- throughput (onnxruntime, 1 thread, batch 1024): {card['clusters_per_second']:,.0f} clusters/s "
             f"({1e6 / card['clusters_per_second']:.2f} us/cluster)",
             f"- data: `{data['g4']}` ({sha}, {g4_path}; {data['chain']}); background: {data['background']}"
             + (f"; every training event {card['data']['training_copies']} times, under the symmetries of the beam spot "
                "(--augment)" if card["data"].get("training_copies", 1) > 1 else ""),
             f"- split: {card['data']['split']}; train {card['training']['n_train']}, validation {card['training']['n_val']} matched clusters",
             f"- training: {card['training']['epochs_run']} epochs (best {card['training']['best_epoch']}), "
             f"{card['training']['train_seconds']:.0f} s on {card['training']['threads']} CPU threads, seed {card['seed']}, "
             f"torch {card['training']['torch']}"
             + ("; kept the lowest validation loss of " + ", ".join(f"seed {r['seed']} {r['best_val_loss']:.6f}"
                                                                     for r in card["restarts"]["tried"])
                if card.get("restarts") else ""),
             f"- ONNX vs PyTorch: max abs diff {card['onnx_check']['max_abs_diff']:.2e} GeV, max rel {card['onnx_check']['max_rel_diff']:.2e}",
             f"- recommended min_energy_gev: {card['recommended_min_energy_gev']}",
             f"- reproduce: {command}", "",
             "## Test set (held-out last 20 % of the Geant4 file, all energies)", "",
             "| energy | n | bias (median E/E_true - 1) | sigma68 | RMS(E) GeV (of the whole spectrum, not a resolution) |",
             "|---|---|---|---|---|"]
    for k in ("raw_sum", "cluster_raw", "classical", "cnn"):
        s = t[k]
        lines.append(f"| {k} | {s['n']} | {s['bias']:+.4f} | {s['sigma68']:.4f} | {s['rms']:.3f} |")
    lines += ["", "raw_sum: every read-out digit of the event (with the beam-background overlay where there is one); "
              "cluster_raw: the matched cluster's raw energy. Resolutions per energy: docs/physics-validation.md."]
    lines += ["", "| E_true GeV | n | sigma68 raw sum | sigma68 classical | sigma68 CNN | bias CNN |", "|---|---|---|---|---|---|"]
    for b in t["by_energy"]:
        lines.append(f"| {b['e_lo']}-{b['e_hi']} | {b['n']} | {b['sigma68_raw_sum']:.4f} | {b['sigma68_classical']:.4f} | "
                     f"{b['sigma68_cnn']:.4f} | {b['bias_cnn']:+.4f} |")
    lines += ["", f"Tails: E_CNN/E_true < 0.9 in {100 * t['tail_below_0.9']:.1f} %, < 0.8 in {100 * t['tail_below_0.8']:.1f} % of the test events."]
    if card.get("size_scan"):
        lines += ["", "## Size scan (same data)", "",
                  "| size | seed | c1/c2/hidden | params | FLOPs/cluster | clusters/s (1 thread, batch 1024) | test sigma68 | val loss |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in card["size_scan"]:
            c = r["config"]
            lines.append(f"| {r['size']} | {r.get('seed', card['seed'])} | {c['c1']}/{c['c2']}/{c['hidden']} | {r['n_params']} | {r['flops_per_cluster']} | "
                         f"{r['clusters_per_second']:,.0f} | {r['test_sigma68']:.4f} | {r['best_val_loss']:.5f} |")
    with StagedOutputs() as own:
        stage_record(staged or own, out_dir, f"{detector}.json", card, {f"{detector}.md": "\n".join(lines) + "\n"})
        own.publish()


def save_samples(path, samples, meta=None):
    """The (train, val, test) chain samples in one .npz (to train again without re-running the chain),
    with `meta` (cache_provenance: what made them) as a JSON string. Written to a temporary file of the
    same folder that then takes the name `path` (exactly that name: np.savez adds .npz to a file name),
    so that an interrupted run leaves no half-written cache."""
    arrays = {f"{i}/{k}": v for i, s in enumerate(samples) for k, v in s.items()}
    if meta is not None:
        arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    with StagedOutputs() as staged:
        with open(staged.path(path), "wb") as f:
            np.savez(f, **arrays)
        staged.publish()


def load_samples(path):
    return load_cache(path)[0]


def load_cache(path):
    """(samples, meta) of a file save_samples wrote; meta None when it records none."""
    import zipfile

    out, meta = [{}, {}, {}], None
    try:
        with np.load(path) as d:
            for key in d.files:
                if key == "meta":
                    meta = json.loads(str(d[key]))
                    continue
                i, k = key.split("/", 1)
                out[int(i)][k] = d[key]
    except (ValueError, EOFError, TypeError, KeyError, IndexError, zipfile.BadZipFile) as err:
        raise TrainingInputError(f"the cache {path!r} is not readable ({type(err).__name__}: {err})"
                                 + cache_fix(path)) from None
    return out, meta


def cache_provenance(detector, g4_path, max_events):
    """What made a cache's chain samples, besides its seed and training copies (which the card records):
    a cache that differs in any of these holds other clusters than the chain would make now."""
    from eclreco.framework import package_data_digests, version_text

    return {"detector": detector, "g4": os.path.basename(g4_path), "g4_sha256": file_sha256(g4_path),
            "max_events": int(max_events), "eclreco": version_text(), "package_data": package_data_digests()}


def cache_fix(cache) -> str:
    """The end of a refusal of the --cache `cache` that the chain would make otherwise: what to do, as a command
    (the same training without that file remakes it)."""
    import shlex

    return f": remove it (rm {shlex.quote(cache)}) and run this command again, which remakes it, or use another --cache file"


def check_cache(cache, had, now):
    """TrainingInputError when the cache's provenance `had` is not `now` (cache_provenance)."""
    fix = cache_fix(cache)
    if had is None:
        raise TrainingInputError(f"the cache {cache!r} does not record what made it (written by an older eclreco)"
                                 + fix)
    if had.get("detector") != now["detector"]:
        raise TrainingInputError(f"the cache {cache!r} holds {had.get('detector')} chain samples, not "
                                 f"{now['detector']}'s" + fix)
    if had.get("g4_sha256") != now["g4_sha256"]:
        raise TrainingInputError(f"the cache {cache!r} was made from {had.get('g4')} (sha256 "
                                 f"{str(had.get('g4_sha256'))[:12]}...), not from {now['g4']} (sha256 "
                                 f"{now['g4_sha256'][:12]}...)" + fix)
    if had.get("max_events") != now["max_events"]:
        raise TrainingInputError(f"the cache {cache!r} was made with --max-events {had.get('max_events')}, not "
                                 f"{now['max_events']}" + fix)
    if had.get("eclreco") != now["eclreco"] or had.get("package_data") != now["package_data"]:
        same = had.get("eclreco") == now["eclreco"]
        raise TrainingInputError(f"the cache {cache!r} was made by {had.get('eclreco')}"
                                 + (" with other leakage tables" if same else "") + f", this is {now['eclreco']}: "
                                 "its chain may make other clusters" + fix)


MAX_SEED = 2 ** 32 - 1  # np.random.seed's bound (train_model seeds numpy and torch with the network seed)


class TrainingInputError(ValueError):
    """Inputs of run_training that do not fit together (the CLI prints it without a traceback)."""


def run_training(detector, out_dir, g4_path=None, epochs=None, seed=1, sizes=None, max_events=0, quiet=False,
                 samples=None, cache=None, augment=None, restarts=1, chain_seed=None):
    """Trains and writes the networks and their card; sizes: a list of the names of SIZES to train (None: the detector's
    default; an empty, unknown or repeated name is refused as --sizes is); chain_seed: the chain sample's seed
    (default seed; a --cache holds the sample of its own, which a chain_seed given must match)."""
    import onnx  # noqa: F401  (fail early when the training extras are missing)
    import torch

    if restarts < 1:
        raise TrainingInputError(f"restarts must be >= 1, not {restarts}")
    if sizes is not None and (why := choice_list_error(sizes, SIZES, "size")):  # None: the default size
        raise TrainingInputError(f"--sizes: {why}")  # (sizes=[] trained the default size, which --sizes '' refuses)
    if not 0 <= seed <= MAX_SEED or seed + restarts - 1 > MAX_SEED:  # numpy's and torch's seeds: 32 bits
        raise TrainingInputError(f"--seed {seed} with --restarts {restarts} tries seeds up to {seed + restarts - 1}: "
                                 f"at most {MAX_SEED}" if seed >= 0 else f"--seed must be >= 0, not {seed}")
    torch.set_num_threads(2)
    g4_path = checked_g4_path(g4_path, detector)
    if cache and os.path.isdir(cache):
        raise TrainingInputError(f"--cache {cache!r} is a directory: name a file in it")
    if samples is None and cache and not os.path.exists(cache):  # before the chain, not after it
        folder = missing_folder(cache)  # (a cache is a file in a folder that exists, as reco.py's -o)
        why = f"no directory {folder!r}" if folder else unwritable_folder(os.path.dirname(os.path.abspath(cache)))
        if why:
            raise TrainingInputError(f"--cache {cache!r}: {why}")
    t_start = time.time()
    provenance = cache_provenance(detector, g4_path, max_events) if samples is None and cache else None
    if samples is None and cache and os.path.exists(cache):
        samples, made_by = load_cache(cache)
        had = int(samples[0].get("copies", 1))
        if augment is not None and int(augment) != had:
            raise TrainingInputError(f"the cache {cache!r} holds {count(had, 'copy', 'copies')} of the "
                                     f"training events, not --augment {augment}" + cache_fix(cache))
        check_cache(cache, made_by, provenance)
        if max_events:  # a cache of a build that did not check it: the card would record events it never had
            n = cnn_data.g4_event_count(g4_path, detector)  # (the file that made the cache: its SHA-256 is checked)
            if max_events > n:
                raise TrainingInputError(f"the cache {cache!r} was made with --max-events {max_events}, but the Geant4 "
                                         f"file {g4_path!r} holds {count(n, 'event')}: remove the cache "
                                         f"and run again with --max-events {n} or fewer (0: all of them)")
        had = int(samples[0]["chain_seed"]) if "chain_seed" in samples[0] else None
        if had is None:  # (the card's command could not name the sample's seed)
            raise TrainingInputError(f"the cache {cache!r} does not record its chain sample's seed (written by an "
                                     "older eclreco)" + cache_fix(cache))
        if chain_seed not in (None, had):
            raise TrainingInputError(f"the cache {cache!r} holds the chain sample of seed {had}, not --chain-seed "
                                     f"{chain_seed}: use --chain-seed {had} (or none), or another --cache file")
        chain_seed = had
    chain_seed = seed if chain_seed is None else chain_seed
    sizes = [DEFAULT_SIZE[detector]] if sizes is None else list(sizes)
    with output_folder(out_dir):  # made now (an -o that cannot be one fails at once), gone again if left empty
        # (after -o's own check: '' is not this folder's networks); what it found is what publish may replace
        unchanged = check_overwrites(out_dir, detector, sizes)
        if samples is None:
            samples = chain_samples(detector, g4_path, seed=chain_seed, max_events=max_events, quiet=quiet,
                                    copies=augment)
            if cache:
                save_samples(cache, samples, provenance)
        train, val, test = samples
        check_sample_size(val, max_events)
        epochs = epochs or EPOCHS[detector]
        with StagedOutputs() as staged:
            card = _train_sizes(detector, out_dir, g4_path, sizes, seed, chain_seed, restarts, epochs, max_events,
                                quiet, train, val, test, t_start, staged)
            write_card(out_dir, detector, card, staged)
            previous = previous_networks(out_dir, detector, card)  # (the old card, before the new one)
            try:  # the networks, then their card: one set, as late as possible, over nothing made since the check
                staged.publish(unchanged, "training")
            except OutputsChangedError as err:
                raise TrainingInputError(f"-o {out_dir!r}: {err}") from None
            # then the previous training's other networks: a folder holds one training
            remove_previous_outputs(out_dir, *previous, "eclreco train", "training", quiet)
    if not quiet:
        print(f"wrote {', '.join(os.path.basename(f) for f in staged.files)} and {detector}.md/.json in {out_dir} "
              f"({time.time() - t_start:.0f} s)", flush=True)
    return card


def check_sample_size(val, max_events=0):
    """TrainingInputError when the validation split has fewer than MIN_VALIDATION_CLUSTERS matched clusters (a
    10-event file trained and wrote a network and its card, exit 0, without a word)."""
    n, events = int(_arrays(val)[3].sum()), len(val["has"])
    if n < MIN_VALIDATION_CLUSTERS:
        share = (1 - cnn_data.TEST_FRACTION) * cnn_data.VAL_FRACTION
        raise TrainingInputError(
            f"the validation split ({share:.0%} of the events) holds {count(n, 'matched cluster')} in "
            f"its {count(events, 'event')}: at least {MIN_VALIDATION_CLUSTERS} are needed to "
            "choose the network by its validation loss (early stopping, --restarts): "
            + ("most of its photons made no cluster (check the sample's energies and detector)" if 2 * n < events else
               "train on 1000 events or more" + (f" (not --max-events {max_events})" if max_events else "")))


def network_names(detector) -> set[str]:
    """The file names of the networks train writes (<detector>.onnx, <detector>-<size>.onnx)."""
    return {f"{detector}.onnx"} | {f"{detector}-{size}.onnx" for size in SIZES}


def network_files(detector, sizes) -> dict[str, str]:
    """{size: file name} of the networks a training of `sizes` writes: the detector's default size, or the first
    one listed when it is not among them, as <detector>.onnx (with the card), the others as <detector>-<size>.onnx."""
    ship = DEFAULT_SIZE[detector] if DEFAULT_SIZE[detector] in sizes else sizes[0]
    return {size: f"{detector}.onnx" if size == ship else f"{detector}-{size}.onnx" for size in sizes}


def previous_networks(out_dir, detector, card):
    """paths.previous_outputs of a training: the networks that the previous card in out_dir (<detector>.json)
    lists (`files`) and `card`'s training does not write."""
    return previous_outputs(out_dir, f"{detector}.json", network_names(detector), card["files"])


def check_overwrites(out_dir, detector, sizes) -> dict:
    """TrainingInputError, before any work, when a network this training would write, or its card (<detector>.json,
    .md), is in out_dir and is not the previous training's unchanged output (paths.overwrite_refusal): a card that
    cannot be checked (the shipped ones: no SHA-256 of itself) and its networks, a network or card changed since, or
    a file no card lists were replaced without a word. Else the state of those files (paths.overwrite_check): the end
    of the training replaces them only if still so (StagedOutputs.publish), not a second training's files or a user's
    that appeared there meanwhile."""
    why, unchanged = overwrite_check(out_dir, f"{detector}.json",
                                     set(network_files(detector, sizes).values()) | {f"{detector}.md"}, "training")
    if why:
        raise TrainingInputError(why)
    return unchanged


def _train_sizes(detector, out_dir, g4_path, sizes, seed, chain_seed, restarts, epochs, max_events, quiet, train, val,
                 test, t_start, staged):
    """run_training's networks, each exported to its temporary file staged.path(its output name); the card."""
    import torch

    extra = EXTRA_FEATURES[detector]
    chain = str(train["chain"])
    file_names = network_files(detector, sizes)
    ship = next(size for size, name in file_names.items() if name == f"{detector}.onnx")
    scan, shipped, files = [], None, {}
    for size in sizes:
        tried = []  # (best validation loss, network seed, model, info); the chain sample keeps `chain_seed`
        for net_seed in range(seed, seed + restarts):
            m_, i_ = train_model(train, val, SIZES[size], epochs=epochs, seed=net_seed, quiet=quiet,
                                 event_features=extra, loss=LOSS[detector], residual=RESIDUAL[detector],
                                 level0_weight=LEVEL0_WEIGHT[detector], ema=EMA[detector], bound=BOUND[detector])
            tried.append((i_["best_val_loss"], net_seed, m_, i_))
            if not quiet and restarts > 1:
                print(f"[{size}] seed {net_seed}: validation loss {i_['best_val_loss']:.6f} "
                      f"(best epoch {i_['best_epoch']})", flush=True)
        _, net_seed, model, info = min(tried, key=lambda t: (t[0], t[1]))
        restart_rows = [{"seed": sd, "best_val_loss": vl, "best_epoch": i_["best_epoch"], "epochs_run": i_["epochs_run"]}
                        for vl, sd, _m, i_ in tried]
        tm = test_metrics(model, test, detector)
        final = os.path.join(out_dir, file_names[size])
        path = staged.path(final)
        names = list(FEATURE_NAMES) + list(extra)
        meta = {"detector": detector, "feature_names": ",".join(names), "image_size": model.config["image_size"],
                "output": "energy: corrected cluster energy in GeV (E_raw * exp(y), y = predicted log(E_true/E_raw))"
                          + (" = log(energy_in/E_raw) + residual" if RESIDUAL[detector] else ""),
                "normalisation": "inside the graph: image / energy_raw, log(energy_raw), cos/sin(theta), ring/69, one-hot region"
                                 + "".join(f", {n}/{EVENT_FEATURE_SCALE[n]:g}" if n in EVENT_FEATURE_SCALE else
                                           f", clamp(log({n}/energy_raw), {X_IN_RANGE[0]}, {X_IN_RANGE[1]})" for n in extra),
                "recommended_min_energy_gev": RECOMMENDED_MIN_ENERGY_GEV, "config": json.dumps(model.config),
                "producer": "eclreco train", "seed": net_seed}
        if restarts > 1 or chain_seed != net_seed:
            meta["chain_seed"] = chain_seed
        export_onnx(model, path, meta)
        xi, xf, _, _ = _arrays(test, extra)
        mad, mrel = check_onnx_agreement(model, path, xi[:4096], xf[:4096])
        if not quiet:
            print(f"[{size}] ONNX vs PyTorch on {min(4096, xi.shape[0])} test clusters: max abs diff {mad:.3e} GeV, "
                  f"max rel diff {mrel:.3e}", flush=True)
        assert mrel < 1e-4, f"onnxruntime and PyTorch disagree: max relative difference {mrel}"
        files[os.path.basename(final)] = file_sha256(path)
        cps = onnx_throughput(path, np.resize(xi, (1024,) + xi.shape[1:]), np.resize(xf, (1024,) + xf.shape[1:]))
        row = {"size": size, "seed": net_seed, "config": model.config, "n_params": count_params(model),
               "flops_per_cluster": flops_per_cluster(model.config), "clusters_per_second": cps,
               "test_sigma68": tm["cnn"]["sigma68"], "best_val_loss": info["best_val_loss"],
               "train_seconds": info["train_seconds"], "file": os.path.basename(final)}
        scan.append(row)
        if not quiet:
            print(f"[{size}] params {row['n_params']}, {row['flops_per_cluster']} FLOPs/cluster, {cps:,.0f} clusters/s, "
                  f"test sigma68 {tm['cnn']['sigma68']:.4f} (classical {tm['classical']['sigma68']:.4f}, "
                  f"raw sum {tm['raw_sum']['sigma68']:.4f}), bias {tm['cnn']['bias']:+.4f}, "
                  f"{info['epochs_run']} epochs in {info['train_seconds']:.0f} s", flush=True)
        if size == ship:
            shipped = (model, info, tm, path, mad, mrel, cps, net_seed, restart_rows)
    model, info, tm, path, mad, mrel, cps, net_seed, restart_rows = shipped
    c = model.config
    card = {
        "detector": detector, "seed": net_seed, "size": ship, "config": c,
        "feature_names": list(FEATURE_NAMES) + list(extra),
        "architecture": (f"image/E_raw [1x{c['image_size']}x{c['image_size']}] -> conv3x3({c['c1']}) ReLU -> conv3x3({c['c2']}) ReLU -> "
                         f"flatten + {10 + len(extra)} derived features -> dense({c['hidden']}) ReLU -> dense(1) = "
                         + ("r, log(E_true/E_raw) = clamp(log(energy_in/E_raw)) + r (residual on the classical correction, "
                            "last layer initialised to zero)" if RESIDUAL[detector] else "log(E_true/E_raw)")),
        "target": f"y = log(E_true / E_raw), {loss_text(LOSS[detector])}; energy = E_raw * exp(y)",
        "n_params": count_params(model), "flops_per_cluster": flops_per_cluster(c), "clusters_per_second": cps,
        "onnx_bytes": os.path.getsize(path), "onnx_check": {"max_abs_diff": mad, "max_rel_diff": mrel},
        "files": files,  # every network of this training (name: SHA-256): the next one into -o replaces them all
        "recommended_min_energy_gev": RECOMMENDED_MIN_ENERGY_GEV,
        "command": reproduce_command(detector, out_dir, g4_path, seed, epochs, sizes, max_events, restarts,
                                     int(train.get("copies", 1)), chain_seed),
        "data": {"g4": os.path.basename(g4_path), "g4_path": os.path.abspath(g4_path), "g4_sha256": file_sha256(g4_path),
                 "chain": chain,
                 "background": (f"level 0 in {100 * BACKGROUND_RANGE[detector][2]:.0f} % of the chunks, else uniform in "
                                f"[{BACKGROUND_RANGE[detector][0]:g}, {BACKGROUND_RANGE[detector][1]:g}]; one level per "
                                f"chunk of {BACKGROUND_CHUNK[detector]} events; level-0 events weigh "
                                f"{LEVEL0_WEIGHT[detector]:g}x in the loss" if BACKGROUND_RANGE[detector] else "none"),
                 "split": (f"test = last {int(cnn_data.TEST_FRACTION * 100)} % of the file; validation = the "
                           f"last {cnn_data.VAL_FRACTION:.3f} of the rest (early stopping); train = the rest"),
                 "max_events": max_events, "training_copies": int(train.get("copies", 1)), "chain_seed": chain_seed},
        "training": {k: v for k, v in info.items() if k != "history"} | {
            "threads": 2, "torch": torch.__version__, "python": platform.python_version(),
            "optimizer": f"Adam lr 3e-3, batch 512, ReduceLROnPlateau(0.5, 3), at most {epochs} epochs, early stopping patience 10"
                         + (f", weights averaged (EMA, decay {EMA[detector]:g} per step)" if EMA[detector] else "")},
        "history": info["history"], "test": tm, "size_scan": scan if len(scan) > 1 else [],
        "total_seconds": time.time() - t_start,
    }
    if restarts > 1:  # (left out otherwise: the shipped cards stay as they were)
        card["restarts"] = {"tried": restart_rows, "chain_seed": chain_seed,
                            "rule": "lowest validation loss (the early-stopping loss on the validation split)"}
    return card


def reproduce_command(detector, out_dir, g4_path, seed, epochs, sizes, max_events, restarts, copies,
                      chain_seed=None) -> str:
    """The `eclreco train` command line that trains the card's networks again (the card's `command`): a
    network of a physicist's own sample is otherwise known by the file's base name only. (--chain-seed: a
    network trained on a --cache made with another --seed; the command without it made another sample.)"""
    import shlex

    argv = ["eclreco", "train", "--detector", detector, "-o", out_dir, "--g4", os.path.abspath(g4_path),
            "--seed", str(seed), "--epochs", str(epochs), "--sizes", ",".join(sizes)]
    argv += ["--max-events", str(max_events)] if max_events else []
    argv += ["--restarts", str(restarts)] if restarts > 1 else []
    argv += ["--augment", str(copies)] if copies != 1 else []
    argv += ["--chain-seed", str(chain_seed)] if chain_seed not in (None, seed) else []
    return shlex.join(argv)


def _cmd(args) -> int:
    from eclreco.cli_types import option_given

    # Before the Geant4 file is read (cnn_data.check_copies would refuse it there): --augment's range is argparse's,
    # and any value for another detector is refused here (--augment 1 too: it was ignored without a word).
    if option_given(args, "--augment") and args.detector != "array30":
        print(f"eclreco train: error: --augment: the training copies are made under the symmetries of array30's beam "
              f"spot; {args.detector}'s training events enter once", file=sys.stderr, flush=True)
        return 2
    try:
        run_training(args.detector, args.output, g4_path=args.g4, epochs=args.epochs, seed=args.seed, sizes=args.sizes,
                     max_events=args.max_events, quiet=args.quiet, cache=args.cache, augment=args.augment,
                     restarts=args.restarts, chain_seed=args.chain_seed)
    except TrainingInputError as err:  # an input it cannot train on: one line, exit 2, as every bad input
        print(f"eclreco train: error: {err}", file=sys.stderr, flush=True)
        return 2
    except cnn_data.G4SampleError as err:  # the file that --g4 (or the default) gave
        print(f"eclreco train: error: {g4_file_error(bool(args.g4), err.path, err.why)}", file=sys.stderr, flush=True)
        return 2
    return 0


def add_train_parser(subparsers):
    from eclreco.cli_types import NON_NEGATIVE_INT, POSITIVE_INT, choice_list, integer

    p = subparsers.add_parser("train", help="train the CNN energy correction of a detector (ONNX + model card)",
                              description=__doc__)
    p.add_argument("--detector", required=True, choices=["array30", "belle2-ecl"],
                   help="the detector whose network is trained (its Geant4 sample, chain and features)")
    p.add_argument("-o", "--output", required=True, help="output directory (<detector>.onnx, .md, .json)")
    p.add_argument("--g4", default=None, help="Geant4 file (default ../shared/data/g4_array30_train.npz or "
                   "g4_belle2_train.npz, from the working directory or the source tree)")
    p.add_argument("--epochs", type=POSITIVE_INT, default=None, help="maximum epochs (early stopping on the validation set; "
                   f"default {', '.join(f'{d}: {n}' for d, n in EPOCHS.items())})")
    p.add_argument("--seed", type=integer(0, MAX_SEED), default=1,
                   help="seed of the chain sample and of the first network (1: the shipped models)")
    p.add_argument("--chain-seed", type=integer(0, MAX_SEED), default=None,
                   help="seed of the chain sample (electronics noise, background overlay) when not --seed: a --cache "
                        "holds the sample of its own, and the model card's command names it")
    p.add_argument("--sizes", type=choice_list(SIZES, "size"), default=None, help=f"comma-separated network sizes to train ({', '.join(SIZES)}); "
                   "the default size of the detector, or the first one listed when it is not among them, is written as "
                   "<detector>.onnx with the model card, the others as <detector>-<size>.onnx")
    p.add_argument("--max-events", type=NON_NEGATIVE_INT, default=0, help="use only this many events of the file (0: all; more than "
                   "it holds: an error)")
    p.add_argument("--cache", default=None, help="npz file of the chain samples: written when missing, read when "
                   "present (the chain is deterministic, so this only saves time); refused when made from another "
                   "detector, Geant4 file, --max-events or eclreco build")
    p.add_argument("--augment", type=integer(1, 8), default=None, help="array30 only: the training events enter N times (1..8), "
                   "under the reflections and rotations of the beam spot, each with its own noise (default "
                   f"{AUGMENT['array30']}: not needed, see docs/physics-validation.md)")
    p.add_argument("--restarts", type=POSITIVE_INT, default=1, help="train from this many initialisations (seeds S, S+1, ...) "
                   "and keep the lowest validation loss (1: reproduces the shipped models)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary lines (warnings and errors "
                   "still go to stderr)")
    p.set_defaults(func=_cmd)
    return p
