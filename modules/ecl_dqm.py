"""ECLDQM: data-quality histograms of the ECL reconstruction, filled per batch with numpy."""
from __future__ import annotations

import numpy as np

from eclreco import ERROR_REJECTED, Module
from eclreco.dqm import CategoryHistogram, Histogram1D, registry

PI0_MASS_GEV = 0.134977


def pair_indices(offsets: np.ndarray, max_per_event: int):
    """Indices (i, j), i < j, of all pairs of rows within each event (first max_per_event rows)."""
    counts = np.minimum(np.diff(offsets), max_per_event)
    firsts, seconds = [], []
    for c in np.unique(counts[counts >= 2]):
        starts = offsets[:-1][counts == c]
        a, b = np.triu_indices(int(c), 1)
        firsts.append((starts[:, None] + a[None, :]).ravel())
        seconds.append((starts[:, None] + b[None, :]).ravel())
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(firsts), np.concatenate(seconds)


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
        per_event = np.add.reduceat(np.append(sel, False).astype(np.int64), off[:-1]) * (np.diff(off) > 0)
        self.h["cluster_multiplicity"].fill(per_event[good])
        # Photon candidates: the selected clusters, re-offset per event (clusters are sorted by energy).
        idx = np.flatnonzero(sel)
        if idx.size < 2 or "theta" not in cl:
            return
        event_of = np.repeat(np.arange(off.size - 1), np.diff(off))[idx]
        new_off = np.searchsorted(event_of, np.arange(off.size))
        i, j = pair_indices(new_off, self.param("max_photons_per_event"))
        if i.size == 0:
            return
        ee, th, ph = e[idx].astype(np.float64), cl["theta"][idx].astype(np.float64), cl["phi"][idx].astype(np.float64)
        cos_open = (np.sin(th[i]) * np.sin(th[j]) * np.cos(ph[i] - ph[j]) + np.cos(th[i]) * np.cos(th[j]))
        m2 = 2.0 * ee[i] * ee[j] * (1.0 - cos_open)
        self.h["gg_mass"].fill(np.sqrt(np.maximum(m2, 0.0)))
