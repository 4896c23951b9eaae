"""DQM histograms: filling, pi0 pairs, writing into the ROOT file, drawing."""
import json
import os

import numpy as np
import pytest
import uproot

import eclreco
from eclreco import _core
from eclreco.dqm import DQMRegistry, Histogram1D
from eclreco.sources import ArraySource
from helpers import CountingSource, assert_checked_float


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
    max_per_event clusters >= min_energy with |time| <= max_abs_time (when > 0),
    m^2 = 2 E1 E2 (1 - cos of the opening angle)."""
    from eclreco import _core

    rng = np.random.default_rng(3)
    counts = rng.integers(0, 16, 300)
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(off[-1])
    e = rng.exponential(0.1, n).astype(np.float32)
    th = rng.uniform(0.3, 2.7, n).astype(np.float32)
    ph = rng.uniform(-np.pi, np.pi, n).astype(np.float32)
    r = rng.uniform(125, 200, n)  # cm: the photon direction does not depend on the distance
    x, y, z = (r * np.sin(th) * np.cos(ph)).astype(np.float32), (r * np.sin(th) * np.sin(ph)).astype(np.float32), \
        (r * np.cos(th)).astype(np.float32)
    t = rng.uniform(-300, 300, n).astype(np.float32)
    t[::7] = np.float32(50.0)  # on the cut: kept
    for max_t in (0.0, 50.0):
        got = _core.gamma_gamma_masses(off, e, x, y, z, t, 0.03, max_t, 5)
        ref = []
        for a, b in zip(off[:-1], off[1:]):
            idx = [k for k in range(a, b) if e[k] >= 0.03 and (max_t <= 0 or abs(t[k]) <= max_t)][:5]
            for ka in range(len(idx)):
                for kb in range(ka + 1, len(idx)):
                    i, j = idx[ka], idx[kb]
                    u = [np.array([np.sin(t_) * np.cos(p), np.sin(t_) * np.sin(p), np.cos(t_)], float)
                         for t_, p in ((float(th[i]), float(ph[i])), (float(th[j]), float(ph[j])))]
                    ref.append(np.sqrt(max(2 * float(e[i]) * float(e[j]) * (1 - u[0] @ u[1]), 0.0)))
        assert len(ref) > (500 if max_t <= 0 else 50) and got.size == len(ref)
        np.testing.assert_allclose(np.sort(got), np.sort(ref), rtol=2e-5, atol=1e-4)  # float trigonometry; DQM bins are 2 MeV
    for short in ((e[:-1], x, y, z, t), (e, x, y[:-1], z, t), (e, x, y, z[:-1], t), (e, x, y, z, t[:-1])):
        with pytest.raises(ValueError, match="shorter"):  # one column short
            _core.gamma_gamma_masses(off, *short, 0.03, 50.0, 5)


def test_dqm_kernels_check_their_float_arguments():
    """gamma_gamma_masses' min_energy and max_abs_time and fill_uniform_histogram's lo and hi were cast by pybind11: a
    bool was read as 0.0 / 1.0 (min_energy=True as 1 GeV) and a string, None or complex value was refused naming
    nothing. Now they go through checked_float."""
    off = np.array([0, 3], np.int64)
    e = np.array([0.5, 1.0, 2.0], np.float32)
    x, y, z = np.float32([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    t = np.float32([0.0, 0.5, 2.0])
    assert_checked_float(lambda m: _core.gamma_gamma_masses(off, e, x, y, z, t, m, 0.0, 5), "min_energy")
    assert_checked_float(lambda m: _core.gamma_gamma_masses(off, e, x, y, z, t, 0.0, m, 5), "max_abs_time")

    def filled(lo, hi):
        counts, moments = np.zeros(6), np.zeros(2)
        _core.fill_uniform_histogram(counts, np.linspace(-1.0, 7.0, 33), lo, hi, moments)
        return counts, moments

    assert_checked_float(lambda lo: filled(lo, 6.0), "lo")
    assert_checked_float(lambda hi: filled(-1.0, hi), "hi")


def test_gamma_gamma_masses_checks_max_per_event():
    """gamma_gamma_masses' max_per_event was cast by pybind11: True was read as 1 (no pair, no mass) and 2**40 raised
    the generic 'incompatible function arguments' naming nothing. It now goes through checked_integer<int>."""
    off = np.array([0, 3], np.int64)
    e = np.array([0.5, 1.0, 2.0], np.float32)
    x, y, z = np.float32([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    t = np.zeros(3, np.float32)
    masses = lambda n: _core.gamma_gamma_masses(off, e, x, y, z, t, 0.0, 0.0, n)  # noqa: E731
    assert masses(2).size == 1 and masses(3).size == 3
    for same in (np.int64(2), np.uint8(2), np.array(2)):
        np.testing.assert_array_equal(masses(same), masses(2))
    for bad in (True, np.True_, 2.0, "2", None):
        with pytest.raises(TypeError, match=rf"^max_per_event must be an int, not {type(bad).__name__} "):
            masses(bad)
    for bad in (2**40, -2**31 - 1):
        with pytest.raises(ValueError, match=rf"^max_per_event = {bad} is out of range \(-2\*\*31 \.\. 2\*\*31 - 1\)$"):
            masses(bad)


def pi0_source():
    """100 events with the two photons of a pi0 at rest: the mass must come out at 135 MeV"""
    n, m = 100, 0.134977
    th, ph = np.tile([0.5, np.pi - 0.5], n), np.tile([0.3, 0.3 + np.pi], n)  # back to back
    r = 150.0  # cm
    return ArraySource("ECLClusters", np.arange(0, 2 * n + 1, 2), {
        "energy": np.full(2 * n, m / 2, np.float32), "theta": th.astype(np.float32), "phi": ph.astype(np.float32),
        "x": (r * np.sin(th) * np.cos(ph)).astype(np.float32), "y": (r * np.sin(th) * np.sin(ph)).astype(np.float32),
        "z": (r * np.cos(th)).astype(np.float32), "time": np.zeros(2 * n, np.float32)})


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


@pytest.mark.parametrize("params,pairs,multiplicity_bin", [
    ({"min_cluster_energy_gev": 0.07}, 0, 0),     # both photons (67.5 MeV) below the cut
    ({"max_photons_per_event": 1}, 0, 2),         # one photon per event for pairs: none
    ({"min_cluster_energy_gev": 0.06}, 100, 2),   # both above: one pair per event
])
def test_dqm_parameters(tmp_path, params, pairs, multiplicity_bin):
    out = tmp_path / "dqm.root"
    path = eclreco.create_path()
    path.add_module(pi0_source())
    path.add_module("ECLDQM", **params)
    path.add_module("RootOutput", filename=str(out))
    eclreco.process(path)
    with uproot.open(out) as f:
        assert f["dqm/gg_mass"].values().sum() == pairs
        mult, _ = f["dqm/cluster_multiplicity"].to_numpy()
        assert mult[multiplicity_bin] == 100


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


def test_dqm_root_histograms_carry_titles_flows_and_labels(tmp_path):
    """What a ROOT user reads: title, x-axis title, under- and overflow, entries; category counts
    as labelled bins, and one empty '(none)' bin when there is no category (a TAxis needs a bin)."""
    from eclreco.dqm import CategoryHistogram

    reg = DQMRegistry()
    h = reg.book(Histogram1D("e", "cluster energy", 4, 0.0, 2.0, "E [GeV]"))
    h.fill(np.array([-1.0, 0.1, 0.6, 0.6, 1.9, 2.0, 5.0]))
    reg.book(CategoryHistogram("rejections", "rejected events by reason")).fill_counts({"crc_mismatch": 3, "bad_magic": 1})
    reg.book(CategoryHistogram("nothing", "no categories"))
    with uproot.recreate(tmp_path / "h.root") as f:
        reg.write_root(f)
    with uproot.open(tmp_path / "h.root") as f:
        e = f["dqm/e"]
        assert e.member("fTitle") == "cluster energy" and e.axis().member("fTitle") == "E [GeV]"
        assert e.values(flow=True).tolist() == [1, 1, 2, 0, 1, 2] and e.member("fEntries") == 7
        assert e.axis().edges().tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
        r = f["dqm/rejections"]
        assert list(r.axis().labels()) == ["bad_magic", "crc_mismatch"] and r.values().tolist() == [1, 3]
        assert r.member("fTitle") == "rejected events by reason"
        n = f["dqm/nothing"]
        assert list(n.axis().labels()) == ["(none)"] and n.values().tolist() == [0]


def test_ecldqm_e1e9_axis_holds_single_crystal_clusters(tmp_path):
    """E1/E9 = 1 (a cluster of one crystal) is in the last bin, not the overflow."""
    out = tmp_path / "e.root"
    n = 50
    path = eclreco.create_path()
    path.add_module(ArraySource("ECLClusters", np.arange(n + 1), {
        "energy": np.full(n, 0.5, np.float32), "e1e9": np.where(np.arange(n) % 2, 1.0, 0.7).astype(np.float32)}))
    path.add_module("ECLDQM")
    path.add_module("RootOutput", filename=str(out))
    eclreco.process(path)
    with uproot.open(out) as f:
        v = f["dqm/cluster_e1e9"].values(flow=True)
        assert v[0] == v[-1] == 0 and v[-2] == n // 2 and v.sum() == n


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
def test_histogram_fill_in_cpp_matches_numpy_binning(dtype):
    """Histogram1D.fill (one C++ pass) puts every value where floor((v - lo) / (hi - lo) * nb) + 1
    computed with numpy puts it, bin edges included; NaN and -inf underflow, +inf overflows."""
    rng = np.random.default_rng(5)
    h = Histogram1D("a", "a", 120, 0, 6)
    if np.dtype(dtype).kind == "f":
        vals = np.concatenate([rng.normal(3, 3, 20000), np.linspace(0, 6, 121)]).astype(dtype)
    else:
        vals = rng.integers(-5, 20, 20000).astype(dtype)
    h.fill(vals)
    x = np.floor((vals.astype(np.float64) - 0.0) / 6.0 * 120)
    ref = np.bincount(np.clip(x, -1, 120).astype(np.int64) + 1, minlength=122)
    np.testing.assert_array_equal(h.counts, ref)
    if np.dtype(dtype).kind == "f":
        h.fill(np.array([np.nan, -np.inf, np.inf], dtype))
        assert h.counts[0] == ref[0] + 2 and h.counts[-1] == ref[-1] + 1
    with pytest.raises(TypeError):  # the counts are updated in place: no silent conversion to a copy
        _core.fill_uniform_histogram(np.zeros(122, np.float32), vals, 0.0, 6.0, np.zeros(2))


def test_root_statistics_are_those_of_the_values_not_the_bin_centres(tmp_path):
    """ROOT's GetMean/GetStdDev of a DQM histogram (fTsumwx, fTsumwx2) are of the in-range values
    filled, through the C++ fill, the weighted numpy fill and a merge across processes; they were
    computed from the bin centres (2 % off for the cluster energies of a generic event)."""
    rng = np.random.default_rng(2)
    vals = rng.exponential(0.13, 5000)
    a, b = DQMRegistry(), DQMRegistry()
    ha = a.book(Histogram1D("e", "e", 120, 0, 6))
    ha.fill(vals[:3000].astype(np.float32))  # C++
    hb = b.book(Histogram1D("e", "e", 120, 0, 6))
    hb.fill(vals[3000:], weights=np.ones(2000))  # numpy
    hb.fill(np.array([-1.0, 7.0]))  # under- and overflow: not in the statistics
    a.merge_dicts(b.to_dicts())
    inside = np.concatenate([vals[:3000].astype(np.float32).astype(np.float64), vals[3000:]])
    with uproot.recreate(tmp_path / "h.root") as f:
        a.write_root(f)
    with uproot.open(tmp_path / "h.root") as f:
        h = f["dqm/e"]
        mean = h.member("fTsumwx") / h.member("fTsumw")
        std = np.sqrt(h.member("fTsumwx2") / h.member("fTsumw") - mean ** 2)
    assert mean == pytest.approx(inside.mean(), rel=1e-9) and std == pytest.approx(inside.std(), rel=1e-9)
    assert h.member("fEntries") == 5002
    a.reset()
    assert not a.histograms["e"].moments.any()


def test_dqm_refuses_negative_parameters():
    """max_photons_per_event = -3 selected no photon (an empty gg_mass, without a word)."""
    for params in ({"max_photons_per_event": -3}, {"min_cluster_energy_gev": -1.0}):
        path = eclreco.create_path()
        path.add_module("EventInfoSetter", events=1)
        path.add_module("ECLDQM", **params)
        with pytest.raises(Exception, match="min_cluster_energy_gev and max_photons_per_event must be >= 0"):
            eclreco.process(path, install_signal_handlers=False)


@pytest.mark.parametrize("n_garbage,n_good", [(7, 20), (7, 0), (0, 0)])
def test_dqm_counts_rejections_before_the_first_run_and_without_any(tmp_path, n_garbage, n_good):
    """Rejected events carry no run number, so those before the first good one do not begin a run:
    ECLDQM's begin_run wiped the rejections they had filled (3 of 7 kept with batches of 4), and a
    file of rejected events only (or none) had no dqm/ at all, although its rejections are what
    the shifter needs to see."""
    import msgpack

    from _raw_helpers import two_digit_events
    from eclreco.rawdata import write_raw_file

    raw = tmp_path / "in.msgpack"
    garbage = [msgpack.packb({"x": i}) for i in range(n_garbage)]
    write_raw_file(raw, garbage + (two_digit_events(n_good) if n_good else []))
    out = tmp_path / "out.root"
    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=str(raw))
    path.add_module("ECLUnpacker")
    path.add_module("ECLClusterizer")
    path.add_module("ECLDQM")
    path.add_module("RootOutput", filename=str(out))
    eclreco.process(path, batch_size=4, install_signal_handlers=False)
    with uproot.open(out) as f:
        assert f["events"].num_entries == n_good
        r = f["dqm/rejections"]
        assert dict(zip(r.axis().labels(), r.values().tolist())) == ({"missing_key": n_garbage} if n_garbage
                                                                      else {"(none)": 0})
        assert f["dqm/cluster_energy"].values().sum() == n_good
    from eclreco.cli import main

    assert main(["dqm", str(out), "-o", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "rejections.png").stat().st_size > 1000


@pytest.mark.parametrize("batch_size", [1, 4, 5, 256])
def test_rejections_between_two_runs_count_in_the_run_in_progress(tmp_path, batch_size):
    """3 events of run 1, 2 rejected events, 3 of run 2: the rejected ones came during run 1 and count
    in its cycle of dqm/rejections, whatever the batch boundaries (with batches of 4, one counted in
    run 1 and the other, at the start of the next batch, in run 2)."""
    import msgpack

    from _raw_helpers import two_digit_events
    from eclreco.rawdata import write_raw_file

    raw = tmp_path / "in.msgpack"
    write_raw_file(raw, two_digit_events(3, run=1) + [msgpack.packb({"x": 1})] * 2 + two_digit_events(3, run=2))
    out = tmp_path / "out.root"
    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=str(raw))
    path.add_module("ECLUnpacker")
    path.add_module("ECLDQM")
    path.add_module("RootOutput", filename=str(out))
    eclreco.process(path, batch_size=batch_size, install_signal_handlers=False)
    with uproot.open(out) as f:
        cycles = sorted((k for k in f.keys() if k.startswith("dqm/rejections;")), key=lambda k: int(k.split(";")[1]))
        counts = [(f[k].title.split("(")[-1], dict(zip(f[k].axis().labels(), f[k].values().tolist()))) for k in cycles]
    assert counts == [("exp 0, run 1)", {"missing_key": 2}), ("exp 0, run 2)", {"(none)": 0})]


def test_a_payload_rejected_event_of_another_run_splits_the_run(tmp_path):
    """What docs/architecture.md says of rejections and runs: an envelope-rejected message has no run;
    one that ECLUnpacker rejects (here a payload of 3 bytes) has its envelope's run and begins it."""
    import msgpack

    from _raw_helpers import two_digit_events
    from eclreco.rawdata import write_raw_file

    bad = msgpack.packb({"v": 1, "exp": 0, "run": 5, "evt": 0, "det": "array30", "ecl": b"\0\0\0"})
    raw = tmp_path / "in.msgpack"
    write_raw_file(raw, two_digit_events(6, run=1)[:3] + [bad, msgpack.packb({"x": 1})] + two_digit_events(6, run=1)[3:])
    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=str(raw))
    path.add_module("ECLUnpacker")
    path.add_module("ECLDQM")
    path.add_module("RootOutput", filename=str(tmp_path / "out.root"))
    eclreco.process(path, install_signal_handlers=False)
    with uproot.open(tmp_path / "out.root") as f:
        got = [(f[f"dqm/rejections;{c}"].title.split("(")[-1], f[f"dqm/digits_per_event;{c}"].values().sum(),
                dict(zip(f[f"dqm/rejections;{c}"].axis().labels(), f[f"dqm/rejections;{c}"].values().tolist())))
               for c in (1, 2, 3)]
        assert f["dqm/digits_per_event"].values().sum() == 3  # the plain key: the last part of run 1
    assert got == [("exp 0, run 1)", 3, {"(none)": 0}), ("exp 0, run 5)", 0, {"missing_key": 1, "payload_not_words": 1}),
                   ("exp 0, run 1)", 3, {"(none)": 0})]


def test_eclreco_dqm_sums_the_parts_of_a_run_and_names_the_plots_by_run(tmp_path, capsys):
    """A run written in two DQM cycles (here by RootOutput: run 1, an event of run 5, run 1 again; the farm's
    collector writes late events of a run as a further part too). `eclreco dqm` drew each cycle apart as
    NAME_cycleK.png, so that a run's plots were its parts and a user had to add them up (the docs promise that
    a run's totals are the sum of its parts); it now draws one plot per run, its parts summed, named by (exp,
    run), and says how many parts it summed; --parts draws them apart."""
    import msgpack

    from _raw_helpers import two_digit_events
    from eclreco.cli import main
    from eclreco.dqm import by_run, read_histograms
    from eclreco.rawdata import write_raw_file

    bad = msgpack.packb({"v": 1, "exp": 0, "run": 5, "evt": 0, "det": "array30", "ecl": b"\0\0\0"})
    write_raw_file(tmp_path / "in.msgpack", two_digit_events(6, run=1)[:2] + [bad] + two_digit_events(6, run=1)[2:])
    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=str(tmp_path / "in.msgpack"))
    path.add_module("ECLUnpacker")
    path.add_module("ECLDQM")
    path.add_module("RootOutput", filename=str(tmp_path / "out.root"))
    eclreco.process(path, install_signal_handlers=False)
    runs = {(h["name"], h["run"]): h for h in by_run(read_histograms(str(tmp_path / "out.root")))}
    run1 = runs[("digits_per_event", (0, 1))]
    assert run1["counts"].sum() == 6 and run1["cycles"] == [1, 3] and run1["title"].endswith("(exp 0, run 1: 2 parts summed)")
    assert run1["png"] == "digits_per_event_exp0_run1.png"
    assert runs[("rejections", (0, 5))]["labels"] == ["payload_not_words"]
    assert runs[("rejections", (0, 1))]["labels"] == ["(none)"]  # two parts without rejections: the empty bin once
    out_dir = tmp_path / "png"
    capsys.readouterr()
    assert main(["dqm", str(tmp_path / "out.root"), "-o", str(out_dir)]) == 0
    out, err = capsys.readouterr()
    assert str(out_dir / "digits_per_event_exp0_run1.png") in out.split()
    assert str(out_dir / "digits_per_event_exp0_run5.png") in out.split()
    assert not list(out_dir.glob("*_cycle*")) and not list(out_dir.glob("*_part*"))
    assert "exp 0, run 1 was written in 2 DQM parts (cycles 1, 3): their sum drawn (--parts: apart)" in err, err
    assert main(["dqm", str(tmp_path / "out.root"), "-o", str(out_dir), "--parts"]) == 0
    assert {p.name for p in out_dir.glob("digits_per_event*")} == {
        "digits_per_event_exp0_run1_part1.png", "digits_per_event_exp0_run1_part2.png", "digits_per_event_exp0_run5.png"}
    assert "(cycles 1, 3): drawn apart" in capsys.readouterr().err


def test_a_file_of_several_runs_has_its_dqm_drawn_per_run(tmp_path, capsys):
    """Runs 1 then 2 in one file: one cycle of each histogram per run. `eclreco dqm` drew only the
    last cycle (run 2), and nothing said which run a histogram was; titles now end with the run and
    every cycle is drawn. Its errors go to stderr (they went to stdout)."""
    from eclreco.cli import main
    from _raw_helpers import two_digit_events
    from eclreco.rawdata import write_raw_file

    write_raw_file(tmp_path / "in.msgpack", two_digit_events(10, run=1) + two_digit_events(15, run=2))
    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=str(tmp_path / "in.msgpack"))
    path.add_module("ECLUnpacker")
    path.add_module("ECLClusterizer")
    path.add_module("ECLDQM")
    path.add_module("RootOutput", filename=str(tmp_path / "out.root"))
    eclreco.process(path, install_signal_handlers=False)
    with uproot.open(tmp_path / "out.root") as f:
        for cycle, run, n in ((1, 1, 10), (2, 2, 15)):
            h = f[f"dqm/cluster_energy;{cycle}"]
            assert h.member("fTitle") == f"cluster energy (exp 0, run {run})" and h.values().sum() == n
    assert main(["dqm", str(tmp_path / "out.root"), "-o", str(tmp_path / "png")]) == 0
    assert {p.name for p in (tmp_path / "png").iterdir()} >= {"cluster_energy_exp0_run1.png", "cluster_energy_exp0_run2.png"}
    capsys.readouterr()
    with uproot.recreate(tmp_path / "plain.root") as f:
        f["x"] = "no dqm here"
    assert main(["dqm", str(tmp_path / "plain.root"), "-o", str(tmp_path / "none")]) == 2
    out, err = capsys.readouterr()
    assert "has no dqm directory" in err and not out


def test_category_counts_filled_from_two_threads_are_exact():
    """ECLDQM runs on two batches at once with threads > 1; the rejection counts' get-then-set lost
    fills (339,910 of 400,000 with forced thread switches)."""
    import threading

    from eclreco.dqm import CategoryHistogram
    from helpers import forced_thread_switches

    h = CategoryHistogram("r", "r")

    def fill():
        for _ in range(50000):
            h.fill_counts({"a": 1})

    with forced_thread_switches():
        threads = [threading.Thread(target=fill) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert h.counts == {"a": 100000}


def test_a_job_without_ecldqm_writes_no_dqm_of_an_earlier_job(tmp_path):
    """Two jobs in one process (a script, a notebook): the first with ECLDQM, the second without. The
    second file had the first job's histograms under dqm/ (its 10 clusters, titled with its run), as if
    they were its own: the registry kept what the first path had booked."""
    from _raw_helpers import two_digit_events
    from eclreco.rawdata import write_raw_file

    write_raw_file(tmp_path / "in.msgpack", two_digit_events(10, run=1))
    for out, dqm in (("first.root", True), ("second.root", False)):
        path = eclreco.create_path()
        path.add_module("RawFileInput", filename=str(tmp_path / "in.msgpack"))
        path.add_module("ECLUnpacker")
        path.add_module("ECLClusterizer")
        if dqm:
            path.add_module("ECLDQM")
        path.add_module("RootOutput", filename=str(tmp_path / out))
        eclreco.process(path, install_signal_handlers=False)
    with uproot.open(tmp_path / "first.root") as f:
        assert f["dqm/cluster_energy"].values().sum() == 10
    with uproot.open(tmp_path / "second.root") as f:
        assert f["events"].num_entries == 10
        assert not any(k.startswith("dqm") for k in f.keys())


def _dqm_file(path, titles):
    """A ROOT file whose dqm/ holds one histogram per title, named h0, h1, ... (one entry each)."""
    from eclreco.dqm import _to_th1d

    with uproot.recreate(path) as f:
        for i, title in enumerate(titles):
            h = Histogram1D(f"h{i}", title, 10, 0.0, 1.0, "x")
            h.fill(np.array([0.5]))
            f[f"dqm/h{i}"] = _to_th1d(h)


def test_eclreco_dqm_refuses_a_bad_file_in_one_line_and_leaves_the_output_folder_as_it_was(tmp_path, capsys):
    """`eclreco dqm` made its -o folder before it opened the file (an empty folder after a typo), said
    uproot's error over three lines ('expected Chunk of length 403,\nreceived 0 bytes from FSSpecSource\n
    for file path ...') with exit 1 (a bad argument is exit 2 elsewhere), and wrote each plot as it was
    drawn: a histogram that failed to draw left the plots before it new and those after it old, mixed
    in one folder. The file is now read first, each refusal is one line naming it (exit 2), and the plots
    take their names together at the end (or the folder stays as it was)."""
    from eclreco.cli import main

    _dqm_file(tmp_path / "good.root", ["fine", "fine too"])
    data = (tmp_path / "good.root").read_bytes()
    (tmp_path / "empty.root").write_bytes(b"")
    (tmp_path / "cut.root").write_bytes(data[:200])  # its keys are further on
    (tmp_path / "notes.txt").write_text("not ROOT\n")
    (tmp_path / "adir").mkdir()
    for name, message in (("missing.root", "no such file"), ("adir", "a directory, not a ROOT file")):
        with pytest.raises(SystemExit) as e:  # the parser's line naming FILE (cli_types.input_file), as hlt merge's
            main(["dqm", str(tmp_path / name), "-o", str(tmp_path / "png")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.endswith(f"error: argument FILE: {str(tmp_path / name)!r}: {message}\n"), err
        assert not (tmp_path / "png").exists(), name
    cases = [("empty.root", ": not a ROOT file (empty)"), ("cut.root", ": not a readable ROOT file, cut short or damaged?"),
             ("notes.txt", ": not a ROOT file")]
    for name, message in cases:
        capsys.readouterr()
        assert main(["dqm", str(tmp_path / name), "-o", str(tmp_path / "png")]) == 2, name
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and f"{tmp_path / name}{message}" in err and not out, err
        assert not (tmp_path / "png").exists(), name
    assert main(["dqm", str(tmp_path / "good.root"), "-o", str(tmp_path / "notes.txt")]) == 2
    assert "-o '%s' is not a directory" % (tmp_path / "notes.txt") in capsys.readouterr().err
    # a histogram that matplotlib cannot draw (its title is no valid mathtext), after one it can
    _dqm_file(tmp_path / "bad.root", ["fine", "cost [$\\nosuch$]"])
    folder = tmp_path / "old"
    folder.mkdir()
    for name in ("h0.png", "h1.png"):
        (folder / name).write_bytes(b"an earlier run's plot")
    assert main(["dqm", str(tmp_path / "bad.root"), "-o", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.root: cannot draw dqm/h1;1: " in err and "Traceback" not in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["h0.png", "h1.png"]
    assert all(p.read_bytes() == b"an earlier run's plot" for p in folder.iterdir())
    assert main(["dqm", str(tmp_path / "good.root"), "-o", str(folder)]) == 0
    assert capsys.readouterr().out.split() == [str(folder / "h0.png"), str(folder / "h1.png")]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in folder.glob("*.png"))


def test_eclreco_dqm_into_a_reused_folder_removes_its_own_earlier_plots_only(tmp_path, capsys):
    """`eclreco dqm B.root -o DIR` into the DIR of an earlier A.root left A's PNGs of the histograms (or
    cycles) that B lacks: DIR mixed two files' plots. The command now lists what it made in
    DIR/eclreco-dqm.json and removes, the next time, those it does not make again; a file a user put
    there, or one of its PNGs changed since, stays (and is named on stderr)."""

    from eclreco.cli import main

    _dqm_file(tmp_path / "a.root", ["a0", "a1", "a2"])
    _dqm_file(tmp_path / "b.root", ["b0"])
    folder = tmp_path / "png"
    assert main(["dqm", str(tmp_path / "a.root"), "-o", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["eclreco-dqm.json", "h0.png", "h1.png", "h2.png"]
    (folder / "mine.png").write_bytes(b"a user's plot")
    (folder / "h1.png").write_bytes(b"a user's plot, saved over one of a.root's")
    capsys.readouterr()
    assert main(["dqm", str(tmp_path / "b.root"), "-o", str(folder)]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(folder / "h0.png")]
    assert sorted(p.name for p in folder.iterdir()) == ["eclreco-dqm.json", "h0.png", "h1.png", "mine.png"]
    assert (folder / "mine.png").read_bytes() == b"a user's plot"
    assert (folder / "h1.png").read_bytes() == b"a user's plot, saved over one of a.root's"
    assert err.count("\n") == 1 and "also holds 2 PNG file(s) not drawn from" in err and "h1.png, mine.png" in err, err
    manifest = json.loads((folder / "eclreco-dqm.json").read_text())
    assert manifest["file"] == str(tmp_path / "b.root") and list(manifest["plots"]) == ["h0.png"]
    # a manifest that is not one removes nothing, and says so
    (folder / "eclreco-dqm.json").write_text('{"plots": ["../a.root"]}')
    assert main(["dqm", str(tmp_path / "a.root"), "-o", str(folder)]) == 0
    assert "is not a readable list of this command's plots" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["eclreco-dqm.json", "h0.png", "h1.png", "h2.png", "mine.png"]
    assert (tmp_path / "a.root").exists()


def test_eclreco_dqm_does_not_overwrite_a_file_that_appeared_in_its_folder_while_it_drew(tmp_path, monkeypatch,
                                                                                          capsys):
    """`eclreco dqm -o DIR` replaces the plots under its names that DIR holds at its start (an earlier run's), but its
    end also wrote over a file put under one of those names while it drew (another dqm into DIR, a user's), without a
    word. They are checked again as they take their names (paths.StagedOutputs.publish, as train's -o): exit 2 naming
    it, DIR left as it is, the run's files kept under their temporary names, named too."""
    from eclreco import dqm
    from eclreco.cli import main

    _dqm_file(tmp_path / "a.root", ["a0", "a1"])
    folder = tmp_path / "png"
    real, meanwhile = dqm._plot, []

    def plots(ax, h):  # each plot drawn, then what happens in DIR while the next one is
        real(ax, h)
        while meanwhile:
            meanwhile.pop()()
    monkeypatch.setattr(dqm, "_plot", plots)

    def refused(happens, name):
        meanwhile.append(happens)
        capsys.readouterr()
        assert main(["dqm", str(tmp_path / "a.root"), "-o", str(folder)]) == 2
        err = capsys.readouterr().err
        kept = sorted(p.name for p in folder.iterdir() if ".partial." in p.name)
        assert len(kept) == 3 and all(k in err for k in kept) and err.count("\n") == 1, (kept, err)
        assert err.startswith(f"eclreco dqm: error: -o {str(folder)!r}: {name} appeared or changed there since this "
                              "dqm run began"), err
        for k in kept:
            (folder / k).unlink()

    folder.mkdir()
    refused(lambda: (folder / "h1.png").write_bytes(b"mine"), "h1.png")  # a name free at the start
    assert sorted(p.name for p in folder.iterdir()) == ["h1.png"] and (folder / "h1.png").read_bytes() == b"mine"
    (folder / "h1.png").unlink()
    assert main(["dqm", str(tmp_path / "a.root"), "-o", str(folder)]) == 0
    assert main(["dqm", str(tmp_path / "a.root"), "-o", str(folder)]) == 0  # its own earlier plots: replaced
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    refused(lambda: (folder / "h0.png").write_bytes(b"mine"), "h0.png")  # a plot it may replace, changed meanwhile
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {**before, "h0.png": b"mine"}


def test_eclreco_dqm_takes_its_outputs_states_before_it_reads_its_files(tmp_path, monkeypatch, capsys):
    """`eclreco dqm` took the states of its outputs (paths.output_states) after it had read its files, where every
    other command takes them before its work: a plot put under -o while it read (another dqm into the folder, a
    user's), new or changed, was taken as the state to compare against and written over without a word, exit 0.
    Taken before the reading: exit 2 naming it, the file left as it is."""
    from _raw_helpers import two_digit_events
    from eclreco import dqm
    from eclreco.cli import main

    root = reco_file(tmp_path, "a", two_digit_events(4, run=1))
    folder = tmp_path / "png"
    real, meanwhile = dqm.read_histograms, []

    def read_histograms(path):  # the file read, then what happens in -o before the reading ends
        got = real(path)
        while meanwhile:
            meanwhile.pop()()
        return got
    monkeypatch.setattr(dqm, "read_histograms", read_histograms)

    def refused(name):
        meanwhile.append(lambda: (folder / name).write_bytes(b"mine"))
        capsys.readouterr()
        assert main(["dqm", root, "-o", str(folder)]) == 2
        err = capsys.readouterr().err.splitlines()[-1]  # (a manifest that is not one: a warning first)
        assert err.startswith(f"eclreco dqm: error: -o {str(folder)!r}: {name} appeared or changed there since this "
                              "dqm run began"), err
        assert (folder / name).read_bytes() == b"mine"
        for kept in folder.glob(".*.partial.*"):
            kept.unlink()

    folder.mkdir()
    refused("digits_per_event.png")  # a name free at the start
    (folder / "digits_per_event.png").unlink()
    assert main(["dqm", root, "-o", str(folder)]) == 0
    refused("digits_per_event.png")  # its own earlier plot, changed while it read
    refused("eclreco-dqm.json")


def test_a_registry_that_keeps_runs_open_writes_one_cycle_per_run(tmp_path, capsys):
    """The HLT collector's DQM (docs/architecture.md, "The ROOT output"): runs 1 and 2 alternate, each keeps its
    own contents until it is closed; the run in progress is written when it is closed, and what comes of it
    afterwards is a further part, written only if a batch came (a run left right after its close has none)."""
    r = DQMRegistry()
    h = r.book(Histogram1D("x", "x", 4, 0, 4))
    r.keep_runs_open()
    for run, values in ((1, [0.5]), (2, [1.5, 1.5]), (1, [0.5])):
        r.begin_run(0, run)
        r.filled()
        h.fill(values)
    assert r.open_runs() == [(0, 2), (0, 1)]
    r.close_run(0, 1)  # in progress: ready at once
    r.begin_run(0, 2)  # nothing came into run 1 since: no further part
    assert r.open_runs() == [(0, 2)] and h.entries == 2
    r.close_run(0, 2)
    r.filled()
    h.fill([3.5])  # a late event of run 2, still in progress
    r.close_all()
    with uproot.recreate(tmp_path / "dqm.root") as f:
        assert r.write_closed(f)
    with uproot.open(tmp_path / "dqm.root") as f:
        got = [(f[f"dqm/x;{c}"].member("fTitle"), f[f"dqm/x;{c}"].values().tolist()) for c in (1, 2, 3)]
    assert got == [("x (exp 0, run 1)", [2, 0, 0, 0]), ("x (exp 0, run 2)", [0, 2, 0, 0]),
                   ("x (exp 0, run 2, part 2)", [0, 0, 0, 1])]
    assert "[DQM] warning: events of exp 0, run 2 after its histograms were written" in capsys.readouterr().err
    assert r.open_runs() == [] and not r.write_closed(None)


class _ChainOutputSource(eclreco.Module):
    """n events as the reconstruction leaves them: ECLDigits (i % 4 digits), ECLEventInformation (without a
    row for every 5th event when `unpacker_failures`: ECLUnpacker failed on it), every 7th event rejected, and
    ECLClusters (i % 3 clusters with energy, time, x; with y and z when `positions`; time of shape (rows, 2) when
    `two_times`, a custom source's column that no histogram takes)."""

    def __init__(self, n=40, positions=True, unpacker_failures=True, two_times=False):
        super().__init__()
        self.n, self.positions, self.failures, self.next = n, positions, unpacker_failures, 0
        self.two_times = two_times

    def is_source(self):
        return True

    def next_batch(self, batch, max_events):
        k = min(max_events, self.n - self.next)
        evt = np.arange(self.next, self.next + k)
        batch.resize(k)
        batch.evt[:] = evt
        batch.exp[:] = 1
        batch.run[:] = 1
        for i in np.flatnonzero(evt % 7 == 6):
            batch.reject(int(i), "bad_payload", "")
        digits = np.concatenate([[0], np.cumsum(evt % 4)])
        batch.add_collection("ECLDigits", digits, {"cell": np.ones(digits[-1], np.int32)})
        has_row = (evt % 5 != 4) | (not self.failures)
        info = np.concatenate([[0], np.cumsum(has_row)])
        batch.add_collection("ECLEventInformation", info, {"n_out_of_time_digits": evt[has_row].astype(np.int32)})
        off = np.concatenate([[0], np.cumsum(evt % 3)])
        rows = off[-1]
        cols = {"energy": np.full(rows, 0.2, np.float32),
                "time": np.zeros((rows, 2) if self.two_times else rows, np.float32),
                "x": np.linspace(-50, 50, rows, dtype=np.float32)}
        if self.positions:
            cols.update(y=np.full(rows, 100.0, np.float32), z=np.linspace(-20, 20, rows, dtype=np.float32))
        batch.add_collection("ECLClusters", off, cols)
        self.next += k
        return self.next < self.n


def _dqm_counts(batch_size, dqm=None, **source):
    from eclreco.dqm import registry

    path = eclreco.create_path()
    path.add_module(_ChainOutputSource(**source))
    path.add_module("ECLDQM", **(dqm or {}))
    eclreco.process(path, batch_size=batch_size, install_signal_handlers=False)
    return ({name: (dict(h.counts) if name == "rejections" else h.counts.tolist())
             for name, h in registry.histograms.items()}, eclreco.statistics.summary())


@pytest.mark.parametrize("batch_size", [1, 8])
def test_an_event_without_its_event_information_row_is_histogrammed_not_an_error(batch_size):
    """An event on which ECLUnpacker failed has no row of ECLEventInformation: ECLDQM failed with an
    IndexError on every batch with one (its boolean selection had one value per event), re-run event by
    event, and the event got an ECLDQM error too. It counts 0 out-of-time digits, as in RootOutput's branch."""
    counts, s = _dqm_counts(batch_size)
    assert s["errors"] == 0, s
    good = 40 - 40 // 7  # every 7th event rejected
    assert sum(counts["digits_per_event"]) == sum(counts["out_of_time_digits"]) == good
    assert counts["out_of_time_digits"][1] >= sum(1 for i in range(40) if i % 5 == 4 and i % 7 != 6)
    assert counts["rejections"] == {"bad_payload": 40 // 7}


def test_a_dqm_call_that_raises_fills_nothing_before_its_rerun():
    """A batch on which ECLDQM raises (here clusters with x but without y, read for the pi0 masses) is re-run
    event by event: what the call had filled before it raised (rejections, digits, cluster energies) was
    filled again by the re-run, so the histograms depended on the batch size. They are those of batches
    of one event."""
    one, s_one = _dqm_counts(1, positions=False, unpacker_failures=False)
    assert s_one["errors"] > 0  # the events with two clusters
    eight, s_eight = _dqm_counts(8, positions=False, unpacker_failures=False)
    assert s_eight["errors"] == s_one["errors"]
    assert eight == one
    assert sum(one["cluster_energy"]) > 0 and sum(one["digits_per_event"]) > 0


def test_a_histogram_whose_own_fill_raises_fills_no_histogram_of_its_batch(capfd):
    """Values no histogram can take (a custom source's cluster time of two values per cluster) raised in
    Histogram1D.fill of cluster_time (numpy's bincount), after the batch's rejections, digits and cluster
    energies were filled: the re-run event by event filled them again. Every histogram's bins of a batch are
    computed before any is filled, and the error names the histogram."""
    no_pairs = {"min_cluster_energy_gev": 1.0}  # (the pi0 masses, computed first, would raise first)
    one, s_one = _dqm_counts(1, no_pairs, two_times=True)
    assert s_one["errors"] > 0  # the events with clusters
    eight, s_eight = _dqm_counts(8, no_pairs, two_times=True)
    assert s_eight["errors"] == s_one["errors"]
    assert eight == one
    assert sum(one["digits_per_event"]) > 0 and sum(one["cluster_energy"]) == 0
    assert "histogram 'cluster_time' takes one value per entry, not values of shape" in capfd.readouterr().err
    with pytest.raises(ValueError, match="histogram 'h' takes one value per entry"):
        Histogram1D("h", "h", 4, 0, 4).fill(np.zeros((3, 2)))


def test_a_large_histogram_filled_with_weights_from_two_threads_counts_every_fill():
    """Histogram1D's numpy path (weights, or dtypes the C++ fill does not take) added counts without a lock,
    and numpy releases the GIL in an add of more than 500 bins: with threads=2 two batches' adds to one
    histogram of 200,000 bins overlapped and lost counts (1,004,969 of 1,005,000)."""

    class BigFill(eclreco.Module):
        def initialize(self):
            self.h = Histogram1D("big", "big", 200_000, 0, 200_000)
            self.one = Histogram1D("big", "big", 200_000, 0, 200_000)  # merged in (the collector's add)
            self.one.counts[-1] = 1

        def event(self, batch):
            v = np.arange(0, 200_000, 997, dtype=np.float64)  # 201 values, one per 997 bins
            for _ in range(4):
                self.h.fill(v, np.ones(v.size))
            self.h.add(self.one)

    path = eclreco.create_path()
    path.add_module(CountingSource(20000))
    m = path.add_module(BigFill())
    eclreco.process(path, threads=2, batch_size=16, install_signal_handlers=False)
    batches = 20000 // 16
    assert m.h.entries == batches * (4 * 201 + 1)
    assert m.h.counts[-1] == batches  # the adds, each one count in the overflow


@pytest.mark.parametrize("weighted", [True, False], ids=["numpy_add", "cpp_fill"])
def test_a_reset_while_two_threads_fill_splits_no_fill(weighted):
    """DQMRegistry.reset zeroed the histograms without their lock while two threads filled them: a fill
    went partly before the reset and partly after it (bins of one fill at 1 and 2, moments of 2 fills
    beside counts of 1, rejection reasons {'a': 1, 'b': 2} of fills that each add one of both). Every
    fill must go wholly before or after the reset."""
    import threading

    from eclreco.dqm import CategoryHistogram
    from helpers import forced_thread_switches

    v = np.arange(0.5, 20_000, 97.0)  # one value in each of 207 bins spread over 20,000 (numpy drops the GIL)
    bins = np.floor(v).astype(int) + 1
    for _ in range(5):
        reg = DQMRegistry()
        h = reg.book(Histogram1D("big", "big", 20_000, 0, 20_000))
        c = reg.book(CategoryHistogram("r", "r"))
        stop = threading.Event()

        def fill():
            while not stop.is_set():
                h.fill(v, np.ones(v.size) if weighted else None)
                c.fill_counts({"a": 1, "b": 1})

        with forced_thread_switches():
            threads = [threading.Thread(target=fill) for _ in range(2)]
            for t in threads:
                t.start()
            for _ in range(300):
                reg.reset()
            stop.set()
            for t in threads:
                t.join()
        fills = h.counts[bins[0]]  # those after the last reset
        assert h.counts[bins].tolist() == [fills] * bins.size and h.entries == fills * bins.size
        assert h.moments.tolist() == [fills * v.sum(), fills * (v * v).sum()]
        assert c.counts.get("a") == c.counts.get("b")


def reco_file(folder, name: str, events: list, dqm: bool = True) -> str:
    """FOLDER/NAME.root: `events` (raw) written, unpacked, their DQM filled (dqm) and written by RootOutput."""
    from eclreco.rawdata import write_raw_file

    write_raw_file(folder / f"{name}.msgpack", events)
    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=str(folder / f"{name}.msgpack"))
    path.add_module("ECLUnpacker")
    if dqm:
        path.add_module("ECLDQM")
    path.add_module("RootOutput", filename=str(folder / f"{name}.root"))
    eclreco.process(path, install_signal_handlers=False)
    return str(folder / f"{name}.root")


def test_eclreco_dqm_sums_a_runs_parts_across_files_and_refuses_files_it_cannot_sum(tmp_path, capsys):
    """A run split across two collectors' files (one replaced mid-run wrote part of it, its replacement the rest):
    `eclreco dqm` read one file, so the run's DQM was drawn as two partial runs, one per call. It now takes several
    files and sums the parts of each (exp, run) across them; it refuses, naming them, files of other detectors and
    a run's histogram of other bins."""

    import uproot

    from _raw_helpers import two_digit_events
    from eclreco.cli import main
    from eclreco.dqm import DQMRegistry, Histogram1D

    events = two_digit_events(6, run=1)
    for name, part in (("a", events[:2]), ("b", events[2:])):  # the run's events in two jobs' files
        reco_file(tmp_path, name, part)
    a, b, out_dir = str(tmp_path / "a.root"), str(tmp_path / "b.root"), tmp_path / "png"
    capsys.readouterr()
    assert main(["dqm", a, b, "-o", str(out_dir)]) == 0
    out, err = capsys.readouterr()
    assert str(out_dir / "digits_per_event.png") in out.split(), out
    assert f"exp 0, run 1 was written in 2 DQM parts (cycles {a};1, {b};1): their sum drawn" in err, err
    summed = next(h for h in eclreco.dqm.by_run(eclreco.dqm.read_files([a, b])) if h["name"] == "digits_per_event")
    assert summed["counts"].sum() == 6 and summed["title"].endswith("(exp 0, run 1: 2 parts summed)"), summed
    assert json.loads((out_dir / "eclreco-dqm.json").read_text())["files"] == [a, b]

    def other_file(name, detectors, nbins):  # the output's own writer: a run-1 histogram of nbins bins
        r = DQMRegistry()
        r.book(Histogram1D("digits_per_event", "digits per event", nbins, 0, 10)).fill(np.array([1.0]))
        with uproot.recreate(tmp_path / name) as f:
            r.write_root(f, label="exp 0, run 1")
            f["metadata"] = json.dumps({"detectors": detectors})
        return str(tmp_path / name)

    before = sorted(p.name for p in out_dir.iterdir())
    ecl = other_file("ecl.root", ["belle2-ecl"], 10)
    assert main(["dqm", a, ecl, "-o", str(out_dir)]) == 2
    assert (f"{ecl} is of the detector(s) belle2-ecl and {a} of array30: the DQM of different detectors is not summed"
            in capsys.readouterr().err)
    binned = other_file("binned.root", ["array30"], 3)
    assert main(["dqm", a, binned, "-o", str(out_dir)]) == 2
    assert (f"cannot sum the parts of dqm/digits_per_event of exp 0, run 1: cycle {binned};1 has other bins than "
            f"cycle {a};1" in capsys.readouterr().err)
    assert sorted(p.name for p in out_dir.iterdir()) == before  # refused: the folder as it was


def test_eclreco_dqm_warns_of_a_file_whose_detector_it_cannot_check(tmp_path, capsys):
    """`eclreco dqm FILE...` refuses files whose metadata name other detectors, but took a file without metadata
    (a collector killed before its end writes none) beside any other without a word: its detector was never
    checked. It now names that file on stderr, and still draws (a killed collector's file and its replacement's
    are what it sums)."""
    from _raw_helpers import two_digit_events
    from eclreco.cli import main

    events = two_digit_events(4, run=1)
    for name, part in (("a", events[:2]), ("killed", events[2:])):
        reco_file(tmp_path, name, part)
    a, killed = str(tmp_path / "a.root"), str(tmp_path / "killed.root")
    with uproot.update(killed) as f:  # as a collector killed before its end left it: dqm/, no metadata
        del f["metadata"]
    with uproot.open(killed) as f:
        assert "dqm" in {k.split(";")[0] for k in f.keys(recursive=False)}
        assert "metadata" not in {k.split(";")[0] for k in f.keys(recursive=False)}
    warning = (f"eclreco dqm: warning: {killed} has no metadata (a collector killed before its end?): its detector "
               f"could not be checked against the other files' (array30)")
    capsys.readouterr()
    assert main(["dqm", a, killed, "-o", str(tmp_path / "png")]) == 0
    assert warning in capsys.readouterr().err
    assert main(["dqm", killed, "-o", str(tmp_path / "png1")]) == 0  # one file: nothing to check it against
    assert "warning" not in capsys.readouterr().err


def test_eclreco_dqm_takes_a_file_without_events_beside_another(tmp_path, capsys):
    """A RootOutput file of a job that wrote no event (every event rejected, or none came) has metadata naming no
    detector; `eclreco dqm` refused it beside any other: 'e.root is of the detector(s)  and a.root of array30: the
    DQM of different detectors is not summed'. Naming no detector, it conflicts with none."""
    from _raw_helpers import two_digit_events
    from eclreco.cli import main

    for name, part in (("a", two_digit_events(2, run=1)), ("empty", [])):
        reco_file(tmp_path, name, part)
    a, empty = str(tmp_path / "a.root"), str(tmp_path / "empty.root")
    capsys.readouterr()
    assert main(["dqm", a, empty, "-o", str(tmp_path / "png")]) == 0, capsys.readouterr().err
    assert "warning" not in capsys.readouterr().err


def test_eclreco_dqm_skips_a_file_without_dqm_beside_files_with_it(tmp_path, capsys):
    """A farm collector killed, or whose write failed, mid-run keeps its events in a file without dqm/ (the DQM of
    a run is written at its end); `eclreco dqm` of it and its replacement's file stopped at it ('... has no dqm
    directory', exit 2) and drew nothing. Beside a file with dqm/ it is now skipped with a warning naming it; exit 2
    only where no file has dqm/ (one file alone: refused as before)."""
    from _raw_helpers import two_digit_events
    from eclreco.cli import main

    events = two_digit_events(5, run=1)
    for name, part, dqm in (("killed", events[:2], False), ("b", events[2:], True), ("plain", events[:1], False)):
        reco_file(tmp_path, name, part, dqm)
    killed, b, plain = (str(tmp_path / f"{n}.root") for n in ("killed", "b", "plain"))
    with uproot.open(killed) as f:  # its events, no DQM
        assert f["events"].num_entries == 2 and "dqm" not in {k.split(";")[0] for k in f.keys(recursive=False)}
    capsys.readouterr()
    assert main(["dqm", killed, b, "-o", str(tmp_path / "png")]) == 0
    out, err = capsys.readouterr()
    assert (f"eclreco dqm: warning: {killed} has no dqm directory, skipped: its events have no DQM there" in err
            and b not in err.split("warning")[1]), err
    assert str(tmp_path / "png" / "digits_per_event.png") in out.split(), out
    assert "could not be checked" not in err  # one file drawn: nothing to check its detector against
    manifest = json.loads((tmp_path / "png" / eclreco.dqm.MANIFEST).read_text())
    assert manifest["files"] == [os.path.abspath(b)], manifest  # what was drawn from: not the skipped file
    summed = next(h for h in eclreco.dqm.by_run(eclreco.dqm.read_files([killed, b])) if h["name"] == "digits_per_event")
    assert summed["counts"].sum() == 3, summed  # b's events: the killed file's have no DQM
    assert main(["dqm", killed, plain, "-o", str(tmp_path / "none")]) == 2
    out, err = capsys.readouterr()
    assert f"eclreco dqm: error: {killed}, {plain}: none has a dqm directory" in err and not out, err
    assert main(["dqm", killed, "-o", str(tmp_path / "none")]) == 2  # one file: refused as before
    assert f"eclreco dqm: error: {killed} has no dqm directory" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_eclreco_dqm_refuses_a_file_given_twice(tmp_path, capsys):
    """`eclreco dqm A A` (or A under another name, ./A, a link) read A twice and summed each run's cycles across the
    two readings as parts of one run: every count drawn doubled, titled '2 parts summed'. It is refused, naming it."""
    from _raw_helpers import two_digit_events
    from eclreco.cli import main

    a = reco_file(tmp_path, "a", two_digit_events(3, run=1))
    (tmp_path / "link.root").symlink_to(a)
    for again in (a, str(tmp_path / "." / "a.root"), str(tmp_path / "link.root")):
        capsys.readouterr()
        assert main(["dqm", a, again, "-o", str(tmp_path / "png")]) == 2
        out, err = capsys.readouterr()
        assert f"eclreco dqm: error: {again} is given twice (as {a}): its DQM would be summed twice" in err, err
        assert not out and not (tmp_path / "png").exists()
    assert main(["dqm", a, "-o", str(tmp_path / "png")]) == 0
