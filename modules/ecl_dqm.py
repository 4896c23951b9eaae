"""ECLDQM: data-quality histograms of the ECL reconstruction, filled per batch with numpy."""
from __future__ import annotations

import numpy as np

from eclreco import ERROR_REJECTED, Module
from eclreco.dqm import CategoryHistogram, Histogram1D, registry

PI0_MASS_GEV = 0.134977


_PAIR_TABLES: dict = {}


def _pair_table(c: int):
    """All pairs (a, b), a < b < c, ordered by b then a: the pairs of the first k rows are the
    first k (k - 1) / 2 entries, for every k <= c."""
    t = _PAIR_TABLES.get(c)
    if t is None:
        a, b = np.triu_indices(c, 1)
        order = np.lexsort((a, b))
        t = _PAIR_TABLES[c] = (a[order].astype(np.int64), b[order].astype(np.int64))
    return t


def pair_indices(offsets: np.ndarray, max_per_event: int):
    """Indices (i, j), i < j, of all pairs of rows within each event (first max_per_event rows)."""
    offsets = np.asarray(offsets, np.int64)
    counts = np.minimum(np.diff(offsets), max_per_event)
    np.maximum(counts, 0, out=counts)
    npairs = counts * (counts - 1) // 2
    total = int(npairs.sum())
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a, b = _pair_table(int(counts.max()))
    first = np.cumsum(npairs) - npairs  # first pair of each event
    start = np.repeat(offsets[:-1], npairs)
    pos = np.arange(total, dtype=np.int64) - np.repeat(first, npairs)
    return start + a[pos], start + b[pos]


class ECLDQM(Module):
    """Per-run DQM histograms: cluster energy, multiplicity, time, E1/E9, gamma-gamma mass, digits, rejections."""

    def __init__(self):
        super().__init__()
        self.add_param("min_cluster_energy_gev", 0.03, "clusters counted in multiplicity and pi0 pairs")
        self.add_param("max_photons_per_event", 12, "most energetic clusters per event used for pairs")
        self.h = {}

    def initialize(self):
        book = registry.book
        self.h = {
            "cluster_energy": book(Histogram1D("cluster_energy", "cluster energy;E [GeV]", 120, 0, 6, "GeV")),
            "cluster_multiplicity": book(Histogram1D("cluster_multiplicity", "clusters per event", 40, 0, 40)),
            "cluster_time": book(Histogram1D("cluster_time", "cluster time;t [ns]", 100, -500, 500, "ns")),
            "cluster_e1e9": book(Histogram1D("cluster_e1e9", "cluster E1/E9", 50, 0, 1)),
            "gg_mass": book(Histogram1D("gg_mass", "two-photon invariant mass;m [GeV]", 100, 0.05, 0.25, "GeV")),
            "digits_per_event": book(Histogram1D("digits_per_event", "ECL digits per event", 100, 0, 2000)),
            "rejections": book(CategoryHistogram("rejections", "rejected events by reason")),
        }

    def begin_run(self, exp, run):
        registry.reset()

    def event(self, batch):
        good = (batch.error_flags & ERROR_REJECTED) == 0
        rejections = batch.rejections()
        if rejections:
            reasons = {}
            for reason, _detail in rejections.values():
                reasons[reason] = reasons.get(reason, 0) + 1
            self.h["rejections"].fill_counts(reasons)
        if "ECLDigits" in batch:
            self.h["digits_per_event"].fill(np.diff(batch["ECLDigits"].offsets)[good])
        if "ECLClusters" not in batch:
            return
        cl = batch["ECLClusters"]
        off = cl.offsets
        e = cl["energy"]
        self.h["cluster_energy"].fill(e)
        if "time" in cl:
            self.h["cluster_time"].fill(cl["time"])
        if "e1e9" in cl:
            self.h["cluster_e1e9"].fill(cl["e1e9"])
        sel = e >= self.param("min_cluster_energy_gev")
        # selected clusters before each event's first row: per-event counts and the offsets of
        # the photon candidates (the selected clusters, clusters are sorted by energy)
        csum = np.zeros(sel.size + 1, np.int64)
        np.cumsum(sel, out=csum[1:])
        new_off = csum[np.asarray(off)]
        self.h["cluster_multiplicity"].fill(np.diff(new_off)[good])
        if new_off[-1] < 2 or "theta" not in cl:
            return
        i, j = pair_indices(new_off, self.param("max_photons_per_event"))
        if i.size == 0:
            return
        idx = np.flatnonzero(sel)
        th = cl["theta"][idx].astype(np.float64)
        ph = cl["phi"][idx].astype(np.float64)
        ee = e[idx].astype(np.float64)
        ee2 = ee * 2.0
        # m^2 = 2 E_i E_j (1 - cos_open), cos_open = u_i . u_j with the unit vectors u computed
        # per photon: per pair only gathers, products and sums (a per-pair cos cost a third of
        # the module), in place on few temporaries
        st = np.sin(th)
        ux, uy, uz = st * np.cos(ph), st * np.sin(ph), np.cos(th)
        cos_open = np.take(ux, i)
        cos_open *= np.take(ux, j)
        d = np.take(uy, i)
        d *= np.take(uy, j)
        cos_open += d
        np.take(uz, i, out=d)
        d *= np.take(uz, j)
        cos_open += d
        m2 = np.take(ee2, i)
        m2 *= np.take(ee, j)
        np.subtract(1.0, cos_open, out=cos_open)
        m2 *= cos_open
        np.maximum(m2, 0.0, out=m2)
        np.sqrt(m2, out=m2)
        self.h["gg_mass"].fill(m2)
