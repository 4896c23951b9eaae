"""ECLDQM: data-quality histograms of the ECL reconstruction, filled per batch with numpy."""
from __future__ import annotations

import numpy as np

from eclreco import Module, _core, per_event_sum
from eclreco.dqm import CategoryHistogram, Histogram1D, registry
from eclreco.framework import per_event_value

PI0_MASS_GEV = 0.134977


class ECLDQM(Module):
    """Per-run DQM histograms: cluster energy, multiplicity, time, E1/E9, gamma-gamma mass, digits, out-of-time digits, rejections."""

    def __init__(self):
        super().__init__()
        self.add_param("min_cluster_energy_gev", 0.03, "clusters counted in multiplicity and pi0 pairs")
        self.add_param("max_photons_per_event", 12, "clusters per event used for pairs: the first ones (stored "
                                                    "order: highest raw energy first) that pass the cuts")
        self.add_param("max_abs_time_ns", 50.0, "pi0 photon candidates need |time| <= this (out-of-time clusters are "
                                                "beam background); <= 0: no cut")
        self.h = {}

    def makes(self):
        return ()

    def requires(self):  # each histogram is filled where the batch has its collection
        return ()

    def initialize(self):
        # a negative count selected no photon at all (an empty gg_mass, silently)
        if not self.param("min_cluster_energy_gev") >= 0 or self.param("max_photons_per_event") < 0:
            raise ValueError("ECLDQM: min_cluster_energy_gev and max_photons_per_event must be >= 0")
        book = registry.book
        self.h = {
            "cluster_energy": book(Histogram1D("cluster_energy", "cluster energy", 120, 0, 6, "E [GeV]")),
            "cluster_multiplicity": book(Histogram1D("cluster_multiplicity", "clusters per event", 40, 0, 40,
                                                     "clusters with E >= min_cluster_energy_gev")),
            "cluster_time": book(Histogram1D("cluster_time", "cluster time", 100, -500, 500, "t [ns]")),
            # 51 bins of 0.02 up to 1.02: the last one holds E1/E9 = 1 (single-crystal clusters), which
            # a [0, 1) axis put into the overflow
            "cluster_e1e9": book(Histogram1D("cluster_e1e9", "cluster E1/E9", 51, 0, 1.02, "E1/E9")),
            "gg_mass": book(Histogram1D("gg_mass", "two-photon invariant mass", 100, 0.05, 0.25, "two-photon mass [GeV]")),
            "digits_per_event": book(Histogram1D("digits_per_event", "ECL digits per event", 100, 0, 2000, "digits")),
            "out_of_time_digits": book(Histogram1D("out_of_time_digits", "out-of-time digits per event "
                                                   "(|t| > 125 ns: beam background)", 100, 0, 2000, "digits")),
            "rejections": book(CategoryHistogram("rejections", "rejected events by reason")),
        }
        registry.reset()  # a job's earlier path in this process (the HLT collector's runs) left its counts

    def begin_run(self, exp, run):
        # Empty histograms, but not at the first run: rejected events carry no run number, so those before
        # the first good event do not start a run; their rejections were filled before it began. (Where the
        # registry keeps runs open, the HLT collector, those of (exp, run) so far.)
        registry.begin_run(exp, run)

    def event(self, batch):
        # Every histogram's bins are computed first and added at the end, where nothing can raise: a call that
        # raises (a column the collection lacks, values a histogram cannot take) is re-run event by event
        # from the batch as it was, and what it had filled was counted twice.
        bins = [(self.h[name], self.h[name].bins(values)) for name, values in self._fills(batch)]
        registry.filled()
        for h, b in bins:
            h.add_bins(b)

    def _fills(self, batch):
        """(histogram name, values) of a batch, in filling order; nothing is filled here."""
        fills = []
        good = batch.active()  # not rejected, not discarded by an event filter before this module
        rejections = batch.rejections()
        if rejections:
            reasons = {}
            for reason, _detail in rejections.values():
                reasons[reason] = reasons.get(reason, 0) + 1
            fills.append(("rejections", reasons))
        if "ECLDigits" in batch:
            fills.append(("digits_per_event", np.diff(batch["ECLDigits"].offsets)[good]))
        if "ECLEventInformation" in batch:
            # 0 for an event without a row (one on which the unpacker failed), as in RootOutput's branch
            oot = per_event_value(batch, "ECLEventInformation", "n_out_of_time_digits", 0)
            fills.append(("out_of_time_digits", oot[good]))
        if "ECLClusters" not in batch:
            return fills
        cl = batch["ECLClusters"]
        off = cl.offsets
        e = cl["energy"]
        rows = slice(None)
        if batch.discards():  # the clusters of the discarded events are not histogrammed
            rows = np.repeat(good, np.diff(off))
            e = np.where(rows, e, np.float32(-1.0))  # below any threshold: no multiplicity, no pairs
        fills.append(("cluster_energy", e[rows]))
        if "time" in cl:
            fills.append(("cluster_time", cl["time"][rows]))
        if "e1e9" in cl:
            fills.append(("cluster_e1e9", cl["e1e9"][rows]))
        sel = e >= self.param("min_cluster_energy_gev")
        multiplicity = per_event_sum(sel, off)
        fills.append(("cluster_multiplicity", multiplicity[good]))
        if multiplicity.sum() < 2 or "x" not in cl or "time" not in cl:
            return fills
        # all pairs of the most energetic photon candidates per event, in one C++ pass without the
        # GIL (cpp/ecl/dqm.cpp; the numpy version was 60 % of this module's time); directions
        # from the cluster positions
        masses = _core.gamma_gamma_masses(off, e, cl["x"], cl["y"], cl["z"], cl["time"],
                                          self.param("min_cluster_energy_gev"), self.param("max_abs_time_ns"),
                                          self.param("max_photons_per_event"))
        fills.append(("gg_mass", masses))
        return fills
