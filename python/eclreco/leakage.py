"""Classical leakage correction: building the response table from simulation.

The table holds the median response R = E_raw / E_true of the leading cluster of single-photon
events, in bins of ln(E_raw / GeV) and of the cluster position:

* belle2-ecl: ln E_raw x seed theta ring (69 rings, nearest ring);
* array30:    ln E_raw x max(|u|, |v|) x min(|u|, |v|), where (u, v) = (local_u, local_v) is the
  cluster centroid relative to the seed crystal centre in units of the 6 cm pitch (0.5 = middle
  of the aluminium gap): photons near a gap lose much of their energy in the aluminium.

The C++ module ``ECLLeakageCorrection`` (cpp/ecl/leakage.hpp) applies it as
E = E_raw / R(ln E_raw, position) with multilinear interpolation between bin centres (nearest ring).
Binning in *raw* energy means no iteration is needed.

How to feed it (training team): run the reconstruction (digits from your electronics ->
``ECLClusterizer``) on single-photon samples, take per event the leading cluster (highest
``energy_raw``) and call::

    build_leakage_table("array30", energy_raw, true_energy_gev, ring=ring, local_u=u, local_v=v,
                        out_path="python/eclreco/data/leakage_array30.npz")

with the columns ``ECLClusters.energy_raw``, ``ring``, ``local_u``, ``local_v`` of that cluster
and the generated photon energy in GeV. Use only the events reserved for building (never evaluate
on them). ``benchmarks/build_leakage_tables.py`` does this for the Geant4 samples with a simple
electronics (noise 0.25 MeV, zero suppression 1.25 MeV).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

AXIS_CODES = {"log_energy_raw": 0, "ring": 1, "abs_uv_max": 2, "abs_uv_min": 3, "abs_u": 4, "abs_v": 5}

DEFAULT_LOG_E_EDGES = np.log(np.geomspace(0.02, 8.0, 15))  # ln(E_raw / GeV), 14 bins
DEFAULT_UV_EDGES = np.linspace(0.0, 0.5, 6)                 # 5 bins of |u|, |v| in [0, 0.5]


def default_table_path(detector: str) -> Path:
    """The table shipped with the package for `detector`."""
    return Path(__file__).parent / "data" / f"leakage_{detector}.npz"


def _axis_value(name, energy_raw, ring, u, v):
    if name == "log_energy_raw":
        return np.log(np.asarray(energy_raw, np.float64))
    if name == "ring":
        return np.asarray(ring, np.float64)
    au = np.minimum(0.5, np.abs(np.asarray(u, np.float64))) if u is not None else None
    av = np.minimum(0.5, np.abs(np.asarray(v, np.float64))) if v is not None else None
    return {"abs_uv_max": lambda: np.maximum(au, av), "abs_uv_min": lambda: np.minimum(au, av),
            "abs_u": lambda: au, "abs_v": lambda: av}[name]()


def build_leakage_table(detector: str, energy_raw, true_energy, ring=None, local_u=None, local_v=None,
                        out_path=None, log_e_edges=None, uv_edges=None, min_entries: int = 30) -> dict:
    """Median response table from (leading-cluster raw energy, true energy, position) arrays.

    energy_raw, true_energy in GeV (one entry per event); ring (seed ring) for belle2-ecl;
    local_u, local_v for array30. Bins with fewer than `min_entries` entries take the response of
    the nearest filled energy bin at the same position; a position without any filled bin takes
    the nearest filled ring's column (belle2-ecl) or the energy bin's median over all positions
    (array30).
    Energy bins that lie wholly below the sample's smallest true energy count as empty: only
    photons that lost much of their energy land there (a sample from 50 MeV puts a median
    response of 0.28 at E_raw = 25 MeV, a correction of x3.6 for every cluster that low), so
    they take the response of the first bin above, i.e. the table is flat below the sample.
    Writes an uncompressed .npz (numpy.savez) when out_path is given; returns the arrays.
    """
    from eclreco.rawdata import DETECTORS

    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}")
    e = np.asarray(energy_raw, np.float64)
    t = np.asarray(true_energy, np.float64)
    ok = (e > 0) & (t > 0)
    le = np.asarray(DEFAULT_LOG_E_EDGES if log_e_edges is None else log_e_edges, np.float64)
    if detector == "belle2-ecl":
        from eclreco import Geometry
        n_rings = Geometry.get("belle2-ecl").n_rings
        names = ["log_energy_raw", "ring"]
        edges = [le, np.arange(n_rings + 1) - 0.5]
        linear = [1, 0]
        centers = [0.5 * (le[1:] + le[:-1]), np.arange(n_rings, dtype=np.float64)]
    else:
        ue = np.asarray(DEFAULT_UV_EDGES if uv_edges is None else uv_edges, np.float64)
        names = ["log_energy_raw", "abs_uv_max", "abs_uv_min"]
        edges = [le, ue, ue]
        linear = [1, 1, 1]
        centers = [0.5 * (le[1:] + le[:-1]), 0.5 * (ue[1:] + ue[:-1]), 0.5 * (ue[1:] + ue[:-1])]
    vals = [_axis_value(n, e[ok], None if ring is None else np.asarray(ring)[ok],
                        None if local_u is None else np.asarray(local_u)[ok],
                        None if local_v is None else np.asarray(local_v)[ok]) for n in names]
    resp_ratio = e[ok] / t[ok]
    shape = tuple(len(c) for c in centers)
    idx = [np.clip(np.searchsorted(ed, x, side="right") - 1, 0, len(ed) - 2) for ed, x in zip(edges, vals)]
    flat = np.ravel_multi_index(idx, shape)
    response = np.full(int(np.prod(shape)), np.nan)
    counts = np.bincount(flat, minlength=response.size)
    order = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[order], np.arange(response.size))
    # energy bins below the sample (their upper edge at most its smallest true energy): biased
    truncated = le[1:] <= np.log(t[ok].min())
    usable = counts >= min_entries
    usable.reshape(shape[0], -1)[truncated] = False
    for b in np.flatnonzero(usable):
        response[b] = np.median(resp_ratio[order[starts[b]:starts[b] + counts[b]]])
    response = response.reshape(shape)
    # Fallbacks for bins with too few entries: the nearest filled energy bin at the same position,
    # else the nearest filled ring (belle2-ecl) or the energy bin's median over all positions
    # (else the nearest filled energy bin's).
    e_med = np.full(shape[0], np.nan)
    for k in range(shape[0]):
        sel = idx[0] == k
        if sel.sum() >= min_entries and not truncated[k]:
            e_med[k] = np.median(resp_ratio[sel])
    filled = np.flatnonzero(~np.isnan(e_med))
    if len(filled) == 0:
        raise ValueError("not enough events to build a leakage table")
    for k in range(shape[0]):
        if np.isnan(e_med[k]):
            e_med[k] = e_med[filled[np.argmin(np.abs(filled - k))]]
    cols = response.reshape(shape[0], -1)
    empty = np.isnan(cols).all(axis=0)
    for j in np.flatnonzero(~empty):
        col = cols[:, j]
        ok_k = np.flatnonzero(~np.isnan(col))
        for k in np.flatnonzero(np.isnan(col)):
            col[k] = col[ok_k[np.argmin(np.abs(ok_k - k))]]
    filled_cols = np.flatnonzero(~empty)
    for j in np.flatnonzero(empty):
        # rings next to each other leak alike (the innermost endcap rings, which the sample may
        # not reach, are closer to their neighbour than to the average over the detector)
        cols[:, j] = (cols[:, filled_cols[np.argmin(np.abs(filled_cols - j))]]
                      if detector == "belle2-ecl" and len(filled_cols) else e_med)
    response = cols.reshape(shape)
    out = dict(detector_code=np.int64(DETECTORS[detector]),
               axis_codes=np.array([AXIS_CODES[n] for n in names], np.int64),
               axis_linear=np.array(linear, np.int64), response=response.astype(np.float32),
               counts=counts.reshape(shape).astype(np.int32), axis_names=np.array(names),
               detector=np.array(detector))
    for k, (c, ed) in enumerate(zip(centers, edges)):
        out[f"centers_{k}"] = np.asarray(c, np.float64)
        out[f"edges_{k}"] = np.asarray(ed, np.float64)
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(out_path, **out)  # uncompressed: the C++ reader needs stored members
    return out


def response(table: dict, energy_raw, ring=None, local_u=None, local_v=None) -> np.ndarray:
    """NumPy evaluation of the table (same interpolation as the C++ module), for checks."""
    inv = {v: k for k, v in AXIS_CODES.items()}
    names = [inv[int(c)] for c in table["axis_codes"]]
    n = len(np.atleast_1d(energy_raw))
    resp = np.asarray(table["response"], np.float64)
    lo, frac, lin = [], [], []
    for k, name in enumerate(names):
        c = np.asarray(table[f"centers_{k}"], np.float64)
        x = np.broadcast_to(_axis_value(name, energy_raw, ring, local_u, local_v), (n,))
        if not table["axis_linear"][k] or len(c) == 1:
            i = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
            lo.append(i); frac.append(np.zeros(n)); lin.append(False)
        else:
            i = np.clip(np.searchsorted(c, x, side="right") - 1, 0, len(c) - 2)
            f = np.clip((x - c[i]) / (c[i + 1] - c[i]), 0.0, 1.0)
            lo.append(i); frac.append(f); lin.append(True)
    r = np.zeros(n)
    d = len(names)
    for corner in range(1 << d):
        w = np.ones(n)
        idx = []
        skip = False
        for k in range(d):
            up = (corner >> k) & 1
            if not lin[k] and up:
                skip = True
                break
            w = w * ((frac[k] if up else 1 - frac[k]) if lin[k] else 1.0)
            idx.append(lo[k] + up)
        if not skip:
            r += w * resp[tuple(idx)]
    return r


def load_table(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}
