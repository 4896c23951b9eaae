"""The CNN of the energy correction (PyTorch), its ONNX export and the metrics shared by
`eclreco train` and `eclreco validate`.

Graph (everything from the raw cluster columns to the corrected energy is INSIDE the network,
so that ECLEnergyCorrection feeds ECLClusters.image and ECLClusters.features as they are):

    inputs  image    float32 [N, S, S]  cluster image (GeV), ECLClusters.image
            features float32 [N, F]     ECLClusters.features (theta, phi, local_u, local_v,
                                        energy_raw, seed ring, region), then the extra features
                                        listed in the model's metadata `feature_names`, in that
                                        order (see EXTRA_FEATURE_NAMES):
                                          energy_in: ECLClusters.energy as it arrives at
                                            ECLEnergyCorrection, i.e. after ECLLeakageCorrection
                                            (the classical correction), GeV
                                          event_oot_digits: event-level background measure
                                            (belle2-ecl, see event_features)
    e_raw = max(features[:, 4], 1 MeV)
    x_in  = clamp(log(max(energy_in, 1 MeV) / e_raw), -0.7, 2.3)   (when energy_in is listed)
    x_img = image / e_raw                                    (shape only, energy-free)
    x_f   = [log(e_raw / 1 GeV), local_u, local_v, cos(theta), sin(theta),
             ring / 69, one-hot(region), 1 - sum(image) / e_raw,
             x_in, event features / EVENT_FEATURE_SCALE]
    conv 3x3 (1 -> c1, valid) ReLU, conv 3x3 (c1 -> c2, valid) ReLU  (7x7 -> 5x5 -> 3x3)
    concat(flatten, x_f) -> dense(hidden) ReLU -> dense(1) = r
    y = r, or y = x_in + r for a residual model (the last layer starts at zero, so training starts
        from the classical correction and learns what it can improve on top of it)
    output  energy   float32 [N]  = e_raw * exp(y)  (GeV), y = log(E_true / E_raw) predicted

The target is log(E_true / E_raw) with a Huber loss (delta 0.05, see eclreco.train.LOSS):
multiplicative, so that all energies weigh alike, symmetric in over- and under-correction, and
robust: the long low tail of E_raw/E_true (photons that convert in / shower into the aluminium
gaps of array30, or the gaps between barrel and endcaps) only enters linearly and does not drag
the prediction of the bulk (quadratic loss on E_raw/E_true, the seed's choice, fits the mean that
these tails pull down).
"""
from __future__ import annotations

import math
import warnings

import numpy as np

FEATURE_NAMES = ("theta", "phi", "local_u", "local_v", "energy_raw", "ring", "region")
E_RAW_INDEX = 4
MIN_E_RAW = 1e-3

# Extra features appended after the cluster features (ECLClusters.features) when a model's metadata
# `feature_names` lists them, in the listed order; identical in training (eclreco.train._arrays on
# the chain samples of eclreco.cnn_data) and online (ECLEnergyCorrection.inputs).
#   energy_in (cluster level): ECLClusters.energy as it arrives at ECLEnergyCorrection, i.e. after
#     ECLLeakageCorrection (the classical correction); the samples' `classical` column in training.
#   event_oot_digits (event level): ECLEventInformation.n_out_of_time_digits, written by ECLUnpacker:
#     the event's digits with a valid time (quality 0) and |t| > _core.OUT_OF_TIME_NS (125 ns), i.e.
#     out of time: beam background only (physics deposits are in time), a per-event measure of the
#     background level.
CLUSTER_EXTRA_NAMES = ("energy_in",)
EVENT_FEATURE_NAMES = ("event_oot_digits",)
EXTRA_FEATURE_NAMES = CLUSTER_EXTRA_NAMES + EVENT_FEATURE_NAMES
EVENT_FEATURE_SCALE = {"event_oot_digits": 500.0}  # inside the graph: feature / scale
X_IN_RANGE = (-0.7, 2.3)  # clamp of log(energy_in / energy_raw) inside the graph (factor 0.5 .. 10)
EVENT_FEATURE_COLUMNS = {"event_oot_digits": ("ECLEventInformation", "n_out_of_time_digits")}


def event_features(batch, names):
    """Per-event values [n_events, len(names)] float32 of the event-level features `names`
    (EVENT_FEATURE_COLUMNS: the event-level collections ECLUnpacker writes, one row per event).
    An event without a row gets NaN (framework.per_event_value): ECLUnpacker writes none for an event
    it failed on (which has no clusters either); before, such an event failed the features of its whole batch."""
    from eclreco.framework import per_event_value

    out = np.empty((len(batch), len(names)), np.float32)
    for j, name in enumerate(names):
        if name not in EVENT_FEATURE_COLUMNS:
            raise ValueError(f"unknown event feature {name!r} (known: {', '.join(EVENT_FEATURE_NAMES)})")
        coll, col = EVENT_FEATURE_COLUMNS[name]
        if coll not in batch:
            raise ValueError(f"event feature {name!r} needs {coll}.{col}, which ECLUnpacker writes; "
                             "this batch has no " + coll)
        try:
            out[:, j] = per_event_value(batch, coll, col, np.nan)
        except ValueError as err:  # an event with several rows
            raise ValueError(f"event feature {name!r}: {err}") from None
    return out


def split_feature_names(names):
    """(cluster feature names, extra feature names) of a model's feature_names list; raises
    ValueError when they are not the cluster features followed by known, distinct extra features
    (EXTRA_FEATURE_NAMES: energy_in, event-level features)."""
    names = list(names)
    core = list(FEATURE_NAMES)
    if names[: len(core)] != core:
        raise ValueError(f"features {names} do not start with the cluster features {core}")
    extra = names[len(core):]
    bad = [n for n in extra if n not in EXTRA_FEATURE_NAMES]
    if bad:
        raise ValueError(f"unknown extra features {bad} (known: {', '.join(EXTRA_FEATURE_NAMES)})")
    if len(set(extra)) != len(extra):
        raise ValueError(f"repeated extra features {extra}")
    return core, extra


def sigma68(x):
    x = np.asarray(x, np.float64)
    if x.size < 2:
        return float("nan")
    lo, hi = np.quantile(x, [0.16, 0.84])
    return 0.5 * float(hi - lo)


def sigma68_ratio_interval(a, b, n_boot=1000, seed=0):
    """sigma68(a) / sigma68(b) of two responses of the SAME events (e.g. E_CNN/E_true and
    E_raw/E_true) and its 16th and 84th percentiles over `n_boot` paired bootstrap resamplings of
    the events: (ratio, lo, hi). With a few hundred photons and a tail that holds about 16 % of
    them (array30's aluminium gaps), sigma68 jumps with the tail fraction of the sample, and the
    interval shows by how much."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boot = []
    for n in np.diff(np.r_[0:n_boot:100, n_boot]):  # resamplings in blocks: bounded memory for large samples
        idx = rng.integers(0, a.size, (n, a.size))
        qa = np.quantile(a[idx], [0.16, 0.84], axis=1)
        qb = np.quantile(b[idx], [0.16, 0.84], axis=1)
        wa, wb = qa[1] - qa[0], qb[1] - qb[0]
        boot.append(wa[wb > 0] / wb[wb > 0])  # a resampling of one repeated value has no width
    boot = np.concatenate(boot)
    if not boot.size or sigma68(b) <= 0:  # too few distinct events for a ratio
        return float("nan"), float("nan"), float("nan")
    lo, hi = np.quantile(boot, [0.16, 0.84])
    return sigma68(a) / sigma68(b), float(lo), float(hi)


def summary(e, e_true):
    """mean, rms (GeV), bias (median(E/E_true) - 1), sigma68 of E/E_true, n."""
    e = np.asarray(e, np.float64)
    r = e / np.asarray(e_true, np.float64)
    return {"n": int(e.size), "mean": float(e.mean()) if e.size else float("nan"),
            "rms": float(e.std()) if e.size else float("nan"),
            "bias": float(np.median(r) - 1) if e.size else float("nan"), "sigma68": sigma68(r)}


def build_model(image_size=7, n_features=7, c1=8, c2=16, hidden=32, extra_names=(), residual=False, bound=False):
    """The network; extra_names: the extra features after the cluster features (EXTRA_FEATURE_NAMES),
    residual: y = log(energy_in / energy_raw) + the network's output (needs energy_in), the last
    layer initialised to zero so that training starts at the classical correction; bound (residual
    only): the residual r is squashed to B tanh(r / B) with a learned, energy-dependent bound
    B = softplus(a + b log(E_raw)) (a = b = 0 at the start: B = log 2)."""
    import torch
    from torch import nn

    extra_names = tuple(extra_names)
    assert n_features == len(FEATURE_NAMES) + len(extra_names), "n_features = cluster features + extra features"
    split_feature_names(list(FEATURE_NAMES) + list(extra_names))
    assert not residual or "energy_in" in extra_names, "a residual model needs the energy_in feature"

    class EnergyCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.image_size = image_size
            self.n_features = n_features
            self.conv1 = nn.Conv2d(1, c1, 3)
            self.conv2 = nn.Conv2d(c1, c2, 3)
            s = image_size - 4
            self.n_flat = c2 * s * s
            self.extra_names = extra_names
            self.n_extra = len(extra_names)
            # column in `features` of energy_in (or -1), and (column, scale) of the event features
            self.i_in = len(FEATURE_NAMES) + extra_names.index("energy_in") if "energy_in" in extra_names else -1
            self.scaled = [(len(FEATURE_NAMES) + j, EVENT_FEATURE_SCALE[n]) for j, n in enumerate(extra_names)
                           if n in EVENT_FEATURE_SCALE]
            self.residual = bool(residual)
            self.n_xf = 10 + self.n_extra
            self.fc1 = nn.Linear(self.n_flat + self.n_xf, hidden)
            self.fc2 = nn.Linear(hidden, 1)
            if self.residual:
                nn.init.zeros_(self.fc2.weight)
                nn.init.zeros_(self.fc2.bias)
            self.bound = bool(bound)
            assert not self.bound or self.residual, "the bound applies to the residual"
            if self.bound:
                self.bound_ab = nn.Parameter(torch.zeros(2))
            self.config = dict(image_size=image_size, n_features=n_features, c1=c1, c2=c2, hidden=hidden,
                               extra_names=list(extra_names), residual=self.residual, bound=self.bound)

        def log_ratio(self, image, features):
            e_raw = torch.clamp(features[:, E_RAW_INDEX:E_RAW_INDEX + 1], min=MIN_E_RAW)
            x = (image / e_raw.unsqueeze(-1)).unsqueeze(1)
            frac_out = 1.0 - image.sum(dim=(1, 2)).unsqueeze(1) / e_raw
            th = features[:, 0:1]
            region = features[:, 6:7]
            cols = [torch.log(e_raw), features[:, 2:4], torch.cos(th), torch.sin(th),
                    features[:, 5:6] / 69.0, (region == 0).float(), (region == 1).float(),
                    (region == 2).float(), frac_out]
            x_in = None
            if self.i_in >= 0:
                e_in = torch.clamp(features[:, self.i_in:self.i_in + 1], min=MIN_E_RAW)
                x_in = torch.clamp(torch.log(e_in / e_raw), X_IN_RANGE[0], X_IN_RANGE[1])
                cols.append(x_in)
            cols += [features[:, j: j + 1] / sc for j, sc in self.scaled]
            xf = torch.cat(cols, dim=1)
            h = torch.relu(self.conv1(x))
            h = torch.relu(self.conv2(h))
            h = torch.cat([h.flatten(1), xf], dim=1)
            h = torch.relu(self.fc1(h))
            r = self.fc2(h).squeeze(1)
            if self.bound:
                b = nn.functional.softplus(self.bound_ab[0] + self.bound_ab[1] * torch.log(e_raw.squeeze(1)))
                r = b * torch.tanh(r / b)
            self.last_residual = r  # for a penalty on the residual in training (eclreco.train)
            return x_in.squeeze(1) + r if self.residual else r

        def forward(self, image, features):
            e_raw = torch.clamp(features[:, E_RAW_INDEX], min=MIN_E_RAW)
            return e_raw * torch.exp(self.log_ratio(image, features))

    return EnergyCNN()


def count_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def flops_per_cluster(cfg) -> int:
    """Multiply-adds x 2 of the convolutions and dense layers (+ the cheap elementwise ops)."""
    s = cfg["image_size"]
    c1, c2, h = cfg["c1"], cfg["c2"], cfg["hidden"]
    s1, s2 = s - 2, s - 4
    n_xf = 10 + cfg.get("n_features", len(FEATURE_NAMES)) - len(FEATURE_NAMES)
    macs = s1 * s1 * c1 * 9 + s2 * s2 * c2 * c1 * 9 + (c2 * s2 * s2 + n_xf) * h + h
    elementwise = 3 * s * s + s1 * s1 * c1 + s2 * s2 * c2 + h + 30
    return int(2 * macs + elementwise)


def export_onnx(model, path, metadata: dict, opset=17):
    """torch -> ONNX with a dynamic batch axis; metadata_props from `metadata`."""
    import onnx
    import torch

    model.eval()
    s, f = model.config["image_size"], model.config["n_features"]
    img = torch.zeros(2, s, s)
    feat = torch.zeros(2, f)
    feat[:, E_RAW_INDEX] = 1.0
    kwargs = dict(input_names=["image", "features"], output_names=["energy"],
                  dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}, "energy": {0: "batch"}},
                  opset_version=opset)
    # The TorchScript exporter on purpose: the shipped models are reproduced byte for byte with it
    # (docs/models.md); torch >= 2.9 marks it deprecated, a warning on every export that says nothing here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript-based ONNX export")
        try:
            torch.onnx.export(model, (img, feat), path, dynamo=False, **kwargs)
        except TypeError:  # torch < 2.5: no dynamo argument
            torch.onnx.export(model, (img, feat), path, **kwargs)
    m = onnx.load(path)
    del m.metadata_props[:]
    for k, v in metadata.items():
        p = m.metadata_props.add()
        p.key, p.value = str(k), str(v)
    onnx.checker.check_model(m)
    onnx.save(m, path)


def check_onnx_agreement(model, path, image, features, rtol=1e-4):
    """Max abs and relative difference of onnxruntime vs PyTorch on the given inputs."""
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"image": image.astype(np.float32), "features": features.astype(np.float32)})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(image.astype(np.float32)), torch.from_numpy(features.astype(np.float32))).numpy()
    diff = np.abs(out - ref)
    rel = float(np.max(diff / np.maximum(np.abs(ref), 1e-6))) if diff.size else 0.0
    return float(diff.max()) if diff.size else 0.0, rel


def onnx_throughput(path, image, features, batch=1024, repeats=20):
    """Clusters per second with onnxruntime, one thread, at the given batch size."""
    import time

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    n = min(batch, image.shape[0])
    feeds = {"image": np.ascontiguousarray(image[:n], np.float32),
             "features": np.ascontiguousarray(features[:n], np.float32)}
    sess.run(None, feeds)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            sess.run(None, feeds)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return n / best
