"""ECLEventFilter: an HLT selection on the ECL clusters (cluster count and energy sum)."""
from __future__ import annotations

import threading

import numpy as np

from eclreco import Module, per_event_sum


class ECLEventFilter(Module):
    """Event filter: discards events with too few clusters or too little cluster energy (counted by reason, not written)."""

    def __init__(self):
        super().__init__()
        self.add_param("min_clusters", 0, "keep an event with at least this many counted clusters (0: no cut)")
        self.add_param("min_energy_sum_gev", 0.0, "and with at least this energy sum of its counted clusters, GeV "
                       "(0: no cut)")
        self.add_param("cluster_energy_gev", 0.1, "clusters counted: energy at least this, GeV")
        self.add_param("max_abs_time_ns", 50.0, "and |time| at most this, ns: out-of-time clusters are beam "
                       "background (0: no time cut)")
        self.add_param("collection", "ECLClusters", "cluster collection to count")
        self.add_param("energy_column", "energy", "its energy column (energy: after the corrections that ran "
                       "before this module; energy_raw: the cluster sum)")
        self.add_param("reason", "", "label of the discarded events in the statistics and the "
                       "eclreco_events_discarded_total metric ('': the module's name)")
        # event() runs on several batches at once (threads > 1): the counters' read-add-write lost counts
        self._lock = threading.Lock()
        self.kept = self.discarded = 0

    def makes(self):
        return ()

    def requires(self):
        return (self.param("collection"),)

    def initialize(self):
        for name in ("min_clusters", "min_energy_sum_gev", "cluster_energy_gev", "max_abs_time_ns"):
            if not self.param(name) >= 0:
                raise ValueError(f"ECLEventFilter: {name} must be >= 0, not {self.param(name)}")
        if not self.param("collection") or not self.param("energy_column"):
            raise ValueError("ECLEventFilter: collection and energy_column must be names")
        self._reason = self.param("reason") or self.type
        # (the counters run on over the module's life, as ECLEnergyCorrection's: the HLT worker runs one
        # process() per run, and its Prometheus counters must not fall back to 0 at each)

    def event(self, batch):
        n = len(batch)
        if n == 0:
            return
        active = batch.active()
        coll = self.param("collection")
        if coll not in batch:  # a path without the clusterizer would discard everything, silently
            if active.any():
                raise RuntimeError(f"ECLEventFilter: no collection {coll!r} in the batch (ECLClusterizer makes it)")
            return
        cl = batch[coll]
        t_cut = self.param("max_abs_time_ns")
        # the columns it reads: a collection without one (a custom source, a misspelt energy_column) ends
        # the job here, not every event on its own
        self.require_columns(cl, [self.param("energy_column")] + (["time"] if t_cut > 0 else []))
        off = np.asarray(cl.offsets)
        e = np.asarray(cl[self.param("energy_column")])
        counted = e >= self.param("cluster_energy_gev")
        if t_cut > 0:
            counted &= np.abs(np.asarray(cl["time"])) <= t_cut
        n_clusters = per_event_sum(counted, off)
        energy_sum = per_event_sum(np.where(counted, e, 0.0), off)
        keep = (n_clusters >= self.param("min_clusters")) & (energy_sum >= self.param("min_energy_sum_gev"))
        drop = active & ~keep
        if drop.any():
            batch.discard(drop, self._reason)
        n_drop = int(drop.sum())
        n_kept = int(active.sum()) - n_drop
        with self._lock:
            self.discarded += n_drop
            self.kept += n_kept

    def counters(self):
        return {"events_kept": float(self.kept), "events_discarded": float(self.discarded)}
