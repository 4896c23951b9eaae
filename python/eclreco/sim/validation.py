"""Shower-shape observables used to compare the fast simulation with Geant4."""
from __future__ import annotations

import numpy as np

from .showers import geometry_arrays


def _neigh(detector):
    from eclreco import Geometry
    g = Geometry.get(detector)
    return (np.asarray(g.n1_offsets, np.int64), np.asarray(g.n1_cells, np.int64),
            np.asarray(g.nc2_offsets, np.int64), np.asarray(g.nc2_cells, np.int64))


def _sum_over(sets_off, sets_cells, seed_cell, ev, keys, e, n_cells):
    """Sum of e over the neighbour set of seed_cell (one per event)."""
    n = seed_cell.size
    lo = sets_off[seed_cell - 1]
    cnt = sets_off[seed_cell] - lo
    rep = np.repeat(np.arange(n), cnt)
    pos = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt) + np.repeat(lo, cnt)
    nk = ev[rep] * (n_cells + 1) + sets_cells[pos]
    j = np.clip(np.searchsorted(keys, nk), 0, max(keys.size - 1, 0))
    found = keys[j] == nk
    return np.bincount(rep, weights=np.where(found, e[j], 0.0), minlength=n)


def shower_shapes(detector, offsets, cell, e_gev):
    """Per event: total energy, E1/E9 and E9/E21 around the highest-energy crystal.

    Inputs are columnar and sorted by (event, cell). Events without any entry give total 0 and
    NaN ratios.
    """
    n_cells = geometry_arrays(detector)["n_cells"]
    n1o, n1c, n2o, n2c = _neigh(detector)
    offsets = np.asarray(offsets, np.int64)
    cell = np.asarray(cell, np.int64)
    e = np.asarray(e_gev, np.float64)
    n_ev = offsets.size - 1
    counts = np.diff(offsets)
    evi = np.repeat(np.arange(n_ev), counts)
    keys = evi * (n_cells + 1) + cell
    order = np.argsort(keys, kind="stable")
    keys, e_s, cell_s, ev_s = keys[order], e[order], cell[order], evi[order]
    tot = np.bincount(ev_s, weights=e_s, minlength=n_ev)
    has = counts > 0
    # highest-energy crystal per event
    o2 = np.lexsort((-e_s, ev_s))
    firsts = np.flatnonzero(np.concatenate(([True], ev_s[o2][1:] != ev_s[o2][:-1])))
    seed = np.zeros(n_ev, np.int64)
    e1 = np.zeros(n_ev)
    seed[ev_s[o2][firsts]] = cell_s[o2][firsts]
    e1[ev_s[o2][firsts]] = e_s[o2][firsts]
    idx = np.flatnonzero(has)
    e9 = np.zeros(n_ev)
    e21 = np.zeros(n_ev)
    if idx.size:
        e9[idx] = _sum_over(n1o, n1c, seed[idx], idx, keys, e_s, n_cells)
        e21[idx] = _sum_over(n2o, n2c, seed[idx], idx, keys, e_s, n_cells)
    with np.errstate(invalid="ignore", divide="ignore"):
        r19 = np.where(has, e1 / e9, np.nan)
        r921 = np.where(has, e9 / e21, np.nan)
    return tot, r19, r921, seed
