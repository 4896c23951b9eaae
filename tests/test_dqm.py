"""DQM histograms: filling, pi0 pairs, writing into the ROOT file, drawing."""
import numpy as np
import uproot

import eclreco
from eclreco.dqm import DQMRegistry, Histogram1D
from eclreco.modules.ecl_dqm import pair_indices
from helpers import CountingSource


def test_histogram_fill_and_overflow():
    h = Histogram1D("h", "h", 10, 0.0, 1.0)
    h.fill([-1.0, 0.05, 0.05, 0.95, 1.0, 7.0])
    assert h.counts[0] == 1 and h.counts[1] == 2 and h.counts[10] == 1 and h.counts[11] == 2
    assert h.entries == 6


def test_registry_merge_adds_counts():
    a, b = DQMRegistry(), DQMRegistry()
    ha = a.book(Histogram1D("x", "x", 4, 0, 4))
    hb = b.book(Histogram1D("x", "x", 4, 0, 4))
    ha.fill([0.5, 1.5])
    hb.fill([1.5, 3.5])
    a.merge_dicts(b.to_dicts())
    assert a.histograms["x"].counts[1:-1].tolist() == [1, 2, 0, 1]


def test_pair_indices():
    off = np.array([0, 3, 4, 6])
    i, j = pair_indices(off, 10)
    pairs = sorted(zip(i.tolist(), j.tolist()))
    assert pairs == [(0, 1), (0, 2), (1, 2), (4, 5)]
    i, j = pair_indices(off, 2)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1), (4, 5)]


class Pi0Source(eclreco.Module):
    """events with two photons of a pi0 at rest: mass must come out at 135 MeV"""

    def __init__(self):
        super().__init__()
        self.done = False

    def is_source(self):
        return True

    def next_batch(self, batch, max_events):
        n = 100
        batch.resize(n)
        batch.evt[:] = np.arange(n)
        off = np.arange(0, 2 * n + 1, 2)
        m = 0.134977
        e = np.full(2 * n, m / 2, np.float32)
        theta = np.tile([0.5, np.pi - 0.5], n).astype(np.float32)
        phi = np.tile([0.3, 0.3 + np.pi], n).astype(np.float32)
        batch.add_collection("ECLClusters", off, {"energy": e, "theta": theta, "phi": phi,
                                                  "time": np.zeros(2 * n, np.float32)})
        return False


def test_gg_mass_peak(tmp_path):
    out = tmp_path / "dqm.root"
    path = eclreco.create_path()
    path.add_module(Pi0Source())
    path.add_module("ECLDQM")
    path.add_module("RootOutput", filename=str(out))
    eclreco.process(path)
    with uproot.open(out) as f:
        counts, edges = f["dqm/gg_mass"].to_numpy()
        centres = 0.5 * (edges[1:] + edges[:-1])
        assert counts.sum() == 100
        assert abs(centres[np.argmax(counts)] - 0.135) < 0.002
        mult, _ = f["dqm/cluster_multiplicity"].to_numpy()
        assert mult[2] == 100


def test_dqm_written_and_drawn(tmp_path):
    out = tmp_path / "d.root"
    path = eclreco.create_path()
    path.add_module(CountingSource(500))
    path.add_module("ECLDQM")
    path.add_module("RootOutput", filename=str(out))
    eclreco.process(path)
    with uproot.open(out) as f:
        counts, _ = f["dqm/digits_per_event"].to_numpy()
        assert counts.sum() == 500
    from eclreco.cli import main

    assert main(["dqm", str(out), "-o", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "digits_per_event.png").stat().st_size > 1000
