"""DQM histograms: filling, pi0 pairs, writing into the ROOT file, drawing."""
import numpy as np
import pytest
import uproot

import eclreco
from eclreco.dqm import DQMRegistry, Histogram1D
from eclreco.sources import ArraySource
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


def test_gamma_gamma_masses_against_a_plain_loop():
    """The C++ kernel of ECLDQM against the definition, event by event: pairs among the first
    max_per_event clusters >= min_energy, m^2 = 2 E1 E2 (1 - cos of the opening angle)."""
    from eclreco import _core

    rng = np.random.default_rng(3)
    counts = rng.integers(0, 16, 300)
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(off[-1])
    e = rng.exponential(0.1, n).astype(np.float32)
    th = rng.uniform(0.3, 2.7, n).astype(np.float32)
    ph = rng.uniform(-np.pi, np.pi, n).astype(np.float32)
    got = _core.gamma_gamma_masses(off, e, th, ph, 0.03, 5)
    ref = []
    for a, b in zip(off[:-1], off[1:]):
        idx = [k for k in range(a, b) if e[k] >= 0.03][:5]
        for x in range(len(idx)):
            for y in range(x + 1, len(idx)):
                i, j = idx[x], idx[y]
                u = [np.array([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], float)
                     for t, p in ((float(th[i]), float(ph[i])), (float(th[j]), float(ph[j])))]
                ref.append(np.sqrt(max(2 * float(e[i]) * float(e[j]) * (1 - u[0] @ u[1]), 0.0)))
    assert len(ref) > 500 and got.size == len(ref)
    np.testing.assert_allclose(np.sort(got), np.sort(ref), rtol=2e-5, atol=1e-4)  # float trigonometry; DQM bins are 2 MeV
    with pytest.raises(ValueError, match="shorter"):
        _core.gamma_gamma_masses(off, e[:-1], th, ph, 0.03, 5)


def pi0_source():
    """100 events with the two photons of a pi0 at rest: the mass must come out at 135 MeV"""
    n, m = 100, 0.134977
    return ArraySource("ECLClusters", np.arange(0, 2 * n + 1, 2), {
        "energy": np.full(2 * n, m / 2, np.float32), "theta": np.tile([0.5, np.pi - 0.5], n).astype(np.float32),
        "phi": np.tile([0.3, 0.3 + np.pi], n).astype(np.float32), "time": np.zeros(2 * n, np.float32)})


def test_gg_mass_peak(tmp_path):
    out = tmp_path / "dqm.root"
    path = eclreco.create_path()
    path.add_module(pi0_source())
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
