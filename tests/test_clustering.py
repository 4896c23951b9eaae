"""ECL clustering: C++ vs NumPy reference, unit tests, the ECLClusterizer and
ECLLeakageCorrection modules, and the containment of Geant4 array30 showers."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import eclreco
from eclreco import _core

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(Path(__file__).parent)]
import numpy_clustering  # noqa: E402
from toy_events import make_events, shower_cells  # noqa: E402

DATA = Path(__file__).parent / "data"


def digits(*events):
    """events: lists of (cell, energy_gev[, time_ns[, quality]]) -> find_clusters arrays."""
    offs, cell, en, tm, q = [0], [], [], [], []
    for ev in events:
        ev = sorted(ev)
        for d in ev:
            cell.append(d[0]); en.append(d[1])
            tm.append(d[2] if len(d) > 2 else 0.0); q.append(d[3] if len(d) > 3 else 0)
        offs.append(len(cell))
    return dict(offsets=np.array(offs, np.int64), cell=np.array(cell, np.int32),
                energy=np.array(en, np.float32), time=np.array(tm, np.float32), quality=np.array(q, np.uint8))


def toy_shower(detector, cell_id, energy, rng=None, offset=(0.0, 0.0, 0.0)):
    g = eclreco.Geometry.get(detector)
    impact = np.array([g.front_x[cell_id - 1], g.front_y[cell_id - 1], g.front_z[cell_id - 1]]) + offset
    cells, e = shower_cells(g, impact, energy, rng or np.random.default_rng(0))
    keep = e >= 0.00125
    return [(int(c), float(x)) for c, x in zip(cells[keep], e[keep])]


# ---------------------------------------------------------------------------------------------
# C++ and NumPy agree

@pytest.mark.parametrize("detector,n_bkg", [("belle2-ecl", 250), ("array30", 15)])
def test_cpp_matches_numpy(detector, n_bkg):
    rng = np.random.default_rng(7)
    ev = make_events(detector, 250, rng, n_showers=(1, 3), n_background=n_bkg, overlap=True)
    a = _core.find_clusters(detector, **ev)
    b = numpy_clustering.find_clusters(detector, **ev)
    assert len(a["energy_raw"]) > 300
    assert (a["n_maxima"] > 1).sum() > 20  # overlapping showers were split
    assert_same_clusters(a, b)


# Every algorithm parameter of ECLClusterizer away from its default (digit threshold above the
# toy events' zero suppression, 1.25 MeV, so that it matters; background_level and
# image_size have tests of their own).
OTHER_PARAMETERS = dict(seed_energy_gev=0.02, growth_energy_gev=0.003, digit_energy_gev=0.0014, lm_energy_gev=0.015,
                        time_cut_ns=80.0, sharing_a=1.5, moliere_radius_cm=4.5, log_weight_w0=3.0,
                        convergence_cm=0.002, max_iterations=3, lat_r0_cm=4.0, max_local_maxima=2,
                        position_crystals=21)


@pytest.mark.parametrize("detector,n_bkg", [("belle2-ecl", 250), ("array30", 15)])
def test_position_from_the_whole_region_matches_numpy(detector, n_bkg):
    """position_crystals=0 (every crystal of the cluster, the default before the seed's 3 x 3): C++ and the
    reference agree, and it differs from the default where background digits join a region."""
    ev = make_events(detector, 250, np.random.default_rng(9), n_showers=(1, 3), n_background=n_bkg, overlap=True)
    a = _core.find_clusters(detector, position_crystals=0, **ev)
    assert_same_clusters(a, numpy_clustering.find_clusters(detector, position_crystals=0, **ev))
    default = _core.find_clusters(detector, **ev)
    assert not np.array_equal(a["theta" if detector == "belle2-ecl" else "phi"],
                              default["theta" if detector == "belle2-ecl" else "phi"])


@pytest.mark.parametrize("detector,n_bkg", [("belle2-ecl", 250), ("array30", 15)])
def test_cpp_matches_numpy_with_other_parameters(detector, n_bkg):
    """The C++ and the reference agree with every parameter changed, and each parameter alone
    changes the clusters (it reaches the algorithm; a parameter read but unused would pass the
    comparison)."""
    ev = make_events(detector, 250, np.random.default_rng(8), n_showers=(1, 3), n_background=n_bkg, overlap=True)
    a = _core.find_clusters(detector, **OTHER_PARAMETERS, **ev)
    assert_same_clusters(a, numpy_clustering.find_clusters(detector, **OTHER_PARAMETERS, **ev))
    default = _core.find_clusters(detector, **ev)
    for name, value in OTHER_PARAMETERS.items():
        one = _core.find_clusters(detector, **{name: value}, **ev)
        assert any(one[k].shape != default[k].shape or not np.array_equal(one[k], default[k])
                   for k in ("offsets", "energy_raw", "x", "lat", "e1e9")), name


def test_clusterizer_module_passes_its_parameters():
    """ECLClusterizer in a path with every parameter changed (and other collection names) writes
    what the kernel computes with those parameters."""
    dig, _ = _g4_digits("belle2")
    n = 200
    dig = {k: (v[:n + 1] if k == "offsets" else v[:dig["offsets"][n]]) for k, v in dig.items()}
    path = eclreco.create_path()
    path.add_module(_Source(dig, 0, collection="MyDigits"))
    path.add_module("ECLClusterizer", input="MyDigits", output="MyClusters", **OTHER_PARAMETERS)
    sink = path.add_module(_Collect("MyClusters"))
    eclreco.process(path, batch_size=1000, install_signal_handlers=False)
    ref = _core.find_clusters("belle2-ecl", **OTHER_PARAMETERS, **dig)
    assert len(ref["energy_raw"]) > n / 2
    for k in ("offsets", "energy_raw", "seed_cell", "x", "lat", "e1e9", "image"):
        np.testing.assert_array_equal(sink.out[k], ref[k], err_msg=k)


def assert_same_clusters(a, b):
    np.testing.assert_array_equal(a["offsets"], b["offsets"])
    for k in ("seed_cell", "ring", "n_maxima", "region_index"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_allclose(a["energy_raw"], b["energy_raw"], rtol=1e-4, atol=1e-6)
    for k in ("x", "y", "z"):
        np.testing.assert_allclose(a[k], b[k], atol=0.02, err_msg=k)
    for k in ("theta", "phi", "local_u", "local_v"):
        np.testing.assert_allclose(a[k], b[k], atol=2e-3, err_msg=k)
    for k in ("e1e9", "e9e21", "lat", "weight_sum"):
        np.testing.assert_allclose(a[k], b[k], atol=2e-3, err_msg=k)
    np.testing.assert_allclose(a["second_moment"], b["second_moment"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(a["time"], b["time"], atol=1e-4)
    np.testing.assert_allclose(a["image"], b["image"], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(a["features"], b["features"], rtol=1e-3, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# Unit tests

def test_single_isolated_shower_one_cluster_full_energy():
    sh = toy_shower("belle2-ecl", 4000, 1.0)
    d = digits(sh)
    out = _core.find_clusters("belle2-ecl", **d)
    assert len(out["energy_raw"]) == 1
    assert out["seed_cell"][0] == 4000
    assert out["energy_raw"][0] == pytest.approx(d["energy"].astype(float).sum(), rel=1e-5)
    assert out["energy_raw"][0] == out["features"][0, 4]
    g = eclreco.Geometry.get("belle2-ecl")
    assert out["theta"][0] == pytest.approx(g.cell_theta[3999], abs=0.01)
    assert out["n_maxima"][0] == 1 and out["n_crystals"][0] == len(sh)


def test_two_separated_showers_two_clusters():
    g = eclreco.Geometry.get("belle2-ecl")
    c1, c2 = g.cell_id(30, 10), g.cell_id(30, 40)
    d = digits(toy_shower("belle2-ecl", c1, 0.5) + toy_shower("belle2-ecl", c2, 1.5))
    out = _core.find_clusters("belle2-ecl", **d)
    assert len(out["energy_raw"]) == 2
    assert list(out["seed_cell"]) == [c2, c1]  # sorted by energy
    assert out["energy_raw"][0] > out["energy_raw"][1]
    assert set(out["region_index"]) == {0, 1}
    assert out["energy_raw"].sum() == pytest.approx(d["energy"].astype(float).sum(), rel=1e-5)


def test_merged_showers_split_energy_conserved():
    g = eclreco.Geometry.get("belle2-ecl")
    c1, c2 = g.cell_id(30, 10), g.cell_id(30, 13)
    acc = {}
    for c, e in toy_shower("belle2-ecl", c1, 1.0) + toy_shower("belle2-ecl", c2, 0.6):
        acc[c] = acc.get(c, 0.0) + e
    d = digits(list(acc.items()))
    out = _core.find_clusters("belle2-ecl", **d)
    assert len(out["energy_raw"]) == 2
    assert list(out["n_maxima"]) == [2, 2]
    assert list(out["region_index"]) == [0, 0]
    assert set(out["seed_cell"]) == {c1, c2}
    assert out["energy_raw"].sum() == pytest.approx(d["energy"].astype(float).sum(), rel=1e-5)
    assert out["energy_raw"][0] == pytest.approx(1.0 * 0.95, rel=0.08)
    assert out["energy_raw"][1] == pytest.approx(0.6 * 0.95, rel=0.12)
    ref = numpy_clustering.find_clusters("belle2-ecl", **d)
    np.testing.assert_allclose(out["energy_raw"], ref["energy_raw"], rtol=1e-4)


def test_out_of_time_digits_do_not_seed():
    # 50 MeV with a valid time 500 ns late: no cluster; same with an invalid time (quality 2): kept.
    assert len(_core.find_clusters("belle2-ecl", **digits([(100, 0.05, 500.0, 0)]))["energy_raw"]) == 0
    assert len(_core.find_clusters("belle2-ecl", **digits([(100, 0.05, -130.0, 0)]))["energy_raw"]) == 0
    assert len(_core.find_clusters("belle2-ecl", **digits([(100, 0.05, 500.0, 2)]))["energy_raw"]) == 1
    assert len(_core.find_clusters("belle2-ecl", **digits([(100, 0.05, 100.0, 0)]))["energy_raw"]) == 1
    # the time cut can be disabled
    assert len(_core.find_clusters("belle2-ecl", time_cut_ns=0.0, **digits([(100, 0.05, 500.0, 0)]))["energy_raw"]) == 1
    # an out-of-time neighbour is attached (digit level) but does not make a maximum
    g = eclreco.Geometry.get("belle2-ecl")
    a, b = g.cell_id(30, 5), g.cell_id(30, 6)
    out = _core.find_clusters("belle2-ecl", **digits([(a, 0.05, 0.0, 0), (b, 0.08, 900.0, 0)]))
    assert list(out["seed_cell"]) == [a]
    assert out["energy_raw"][0] == pytest.approx(0.13, rel=1e-6)


def test_thresholds_and_background_level():
    d = digits([(100, 0.012)])
    assert len(_core.find_clusters("belle2-ecl", **d)["energy_raw"]) == 1
    assert len(_core.find_clusters("belle2-ecl", background_level=1.0, **d)["energy_raw"]) == 0  # 10*sqrt(2) MeV
    # digit-level crystals (0.5..1.5 MeV) are attached but do not grow the region
    g = eclreco.Geometry.get("belle2-ecl")
    s, n1, n2 = g.cell_id(30, 5), g.cell_id(30, 6), g.cell_id(30, 7)
    out = _core.find_clusters("belle2-ecl", **digits([(s, 0.05), (n1, 0.001), (n2, 0.001)]))
    assert out["energy_raw"][0] == pytest.approx(0.051, rel=1e-6)  # n2 is not attached
    out = _core.find_clusters("belle2-ecl", **digits([(s, 0.05), (n1, 0.002), (n2, 0.001)]))
    assert out["energy_raw"][0] == pytest.approx(0.053, rel=1e-6)  # n1 grows the region to n2
    out = _core.find_clusters("belle2-ecl", **digits([(s, 0.05), (n1, 0.0004), (n2, 0.001)]))
    assert out["energy_raw"][0] == pytest.approx(0.05, rel=1e-6)  # below the digit threshold
    with pytest.raises(TypeError):
        _core.find_clusters("belle2-ecl", seed_energy=1.0, **d)
    with pytest.raises(ValueError):
        _core.find_clusters("belle2-ecl", growth_energy_gev=0.1, **d)
    for n in (1, 8, 25, -9):  # the position's crystals: 9, 21 or 0 (all), nothing else
        with pytest.raises(ValueError, match="position_crystals must be 0 .all the cluster's crystals., 9 or 21"):
            _core.find_clusters("belle2-ecl", position_crystals=n, **d)
    path = eclreco.create_path()
    path.add_module("EventInfoSetter", events=1)
    path.add_module("ECLClusterizer", position_crystals=5)
    with pytest.raises(Exception, match="position_crystals must be 0"):  # refused at initialize
        eclreco.process(path, install_signal_handlers=False)


def test_single_crystal_shapes():
    out = _core.find_clusters("belle2-ecl", **digits([(5000, 0.3)]))
    assert out["e1e9"][0] == pytest.approx(1.0)
    assert out["e9e21"][0] == pytest.approx(1.0)
    assert out["second_moment"][0] == pytest.approx(0.0, abs=1e-6)
    assert out["lat"][0] == 0.0
    assert out["n_crystals"][0] == 1
    assert abs(out["local_u"][0]) < 1e-4 and abs(out["local_v"][0]) < 1e-4
    # a 3x3 deposit: e1e9 = E_seed / E_3x3
    g = eclreco.Geometry.get("belle2-ecl")
    cells = [g.cell_id(30 + dr, 20 + dp) for dr in (-1, 0, 1) for dp in (-1, 0, 1)]
    ev = [(c, 0.5 if c == g.cell_id(30, 20) else 0.05) for c in cells]
    out = _core.find_clusters("belle2-ecl", **digits(ev))
    assert out["e1e9"][0] == pytest.approx(0.5 / 0.9, rel=1e-5)
    assert 0 < out["lat"][0] < 1


@pytest.mark.parametrize("detector", ["belle2-ecl", "array30"])
def test_image_centred_on_seed(detector):
    g = eclreco.Geometry.get(detector)
    seed = g.cell_id(15, 15)
    sh = toy_shower(detector, seed, 1.0)
    out = _core.find_clusters(detector, image_size=7, **digits(sh))
    img = out["image"][0]
    assert img.shape == (7, 7)
    assert img[3, 3] == pytest.approx(dict(sh)[seed], rel=1e-6)
    assert np.unravel_index(np.argmax(img), img.shape) == (3, 3)
    assert img.sum() <= out["energy_raw"][0] * (1 + 1e-6)
    assert _core.find_clusters(detector, image_size=5, **digits(sh))["image"].shape == (1, 5, 5)


def test_array30_edges():
    g = eclreco.Geometry.get("array30")
    corner = g.cell_id(0, 0)
    ev = [(corner, 0.5), (g.cell_id(0, 1), 0.1), (g.cell_id(1, 0), 0.1), (g.cell_id(1, 1), 0.05)]
    out = _core.find_clusters("array30", **digits(ev))
    img = out["image"][0]
    assert out["seed_cell"][0] == corner
    assert np.all(img[:3, :] == 0) and np.all(img[:, :3] == 0)  # outside the array
    assert img[3, 3] == pytest.approx(0.5) and img[3, 4] == pytest.approx(0.1) and img[4, 3] == pytest.approx(0.1)
    assert img.sum() == pytest.approx(out["energy_raw"][0], rel=1e-6)
    # local position: pulled towards +x (col) and +y (row), in units of the 6 cm pitch
    assert 0 < out["local_u"][0] < 0.5 and 0 < out["local_v"][0] < 0.5
    far = g.cell_id(29, 29)
    out = _core.find_clusters("array30", **digits([(far, 0.2)]))
    assert out["image"][0][3, 3] == pytest.approx(0.2) and out["image"][0].sum() == pytest.approx(0.2)
    ref = numpy_clustering.find_clusters("array30", **digits(ev))
    np.testing.assert_allclose(ref["image"], _core.find_clusters("array30", **digits(ev))["image"], rtol=1e-6)


def test_a_per_event_detector_array_is_checked_as_given():
    """find_clusters' per-event detector array was converted with pybind11's forcecast to uint8: a code 257 wrapped
    to 1 and the event was clustered as array30, 1.7 was truncated to 1, -255 wrapped to 1. Now each is an error
    naming detector and its first bad entry (as for cell); codes that fit are read as before."""
    d = digits([(100, 0.5)], [(200, 0.5)])
    with pytest.raises(ValueError, match=r"detector\[1\] = 257 is out of range \(above 2\*\*8 - 1\)"):
        _core.find_clusters(np.array([0, 257]), **d)
    with pytest.raises(ValueError, match=r"detector\[0\] = -255 is negative"):
        _core.find_clusters(np.array([-255, 0], np.int16), **d)
    with pytest.raises(TypeError, match="detector must be an integer array, not float64"):
        _core.find_clusters(np.array([0, 1.7]), **d)
    with pytest.raises(ValueError, match="unknown detector code 2"):  # fits uint8: the clustering's own error
        _core.find_clusters(np.array([0, 2]), **d)
    with pytest.raises(ValueError, match="one entry per event"):
        _core.find_clusters(np.array([0]), **d)
    ref = _core.find_clusters("array30", **digits([(200, 0.5)]))["seed_cell"].tolist()
    for ok in (np.array([0, 1], np.uint8), np.array([0, 1]), [0, 1], np.array([0, 1], ">i4")):
        out = _core.find_clusters(ok, **d)
        assert out["seed_cell"].tolist() == [100] + ref and out["offsets"].tolist() == [0, 1, 2]



def test_a_detector_for_all_events_is_checked_as_given():
    """find_clusters' detector for all events was cast with pybind11: 257, -1 or 2**70 raised "RuntimeError: Unable to
    cast Python instance of type <class 'int'> to C++ type '?'" naming nothing, a numpy int was refused as '0-d',
    True was read as array30. It now goes through detector_arg, as unpack_payload's: errors name detector and its
    value; names, Python and numpy ints 0 / 1 are read as before."""
    d = digits([(100, 0.5)])
    for bad in (257, -1, 2, 2**70, np.int64(5)):
        with pytest.raises(ValueError, match=rf"detector = {int(bad)} is not a detector code \(0 belle2-ecl, 1 array30\)"):
            _core.find_clusters(bad, **d)
    with pytest.raises(ValueError, match=r"detector = 'belle2' is not a detector name \(belle2-ecl or array30\)"):
        _core.find_clusters("belle2", **d)
    for bad, shown in ((1.5, "float 1.5"), (True, "bool True"), (None, "NoneType None")):
        with pytest.raises(TypeError, match=rf"detector must be a detector name \(belle2-ecl or array30\) or code "
                                            rf"\(0 or 1\), not {shown}"):
            _core.find_clusters(bad, **d)
    for name, code in (("belle2-ecl", 0), ("array30", 1)):
        want = _core.find_clusters(name, **d)["seed_cell"].tolist()
        for ok in (code, np.int64(code), np.uint8(code)):
            assert _core.find_clusters(ok, **d)["seed_cell"].tolist() == want

def test_find_clusters_refuses_a_repeat_count_below_one():
    """find_clusters(repeat=0) or a negative repeat ran the clustering once (std::max(1, repeat)), and
    bench_clustering.py --repeat 0 then divided by 0; _bench_rawdata refuses repeats < 1 since fdb9517."""
    d = digits([(1000, 0.5)])
    for bad in (0, -3, np.int64(0)):
        with pytest.raises(ValueError, match=rf"^repeat must be >= 1, not {int(bad)}$"):
            _core.find_clusters("belle2-ecl", **d, repeat=bad)
    assert _core.find_clusters("belle2-ecl", **d, repeat=3)["seed_cell"].tolist() == [1000]


def test_find_clusters_checks_its_keyword_parameters_and_repeat():
    """find_clusters' keyword parameters were read with pybind11's cast: max_iterations=True ran with 1 iteration,
    seed_energy_gev=True was read as 1 GeV, and max_iterations=2**40, image_size=7.9 or max_iterations='3' raised
    "RuntimeError: Unable to cast ... to C++ type '?'" naming nothing; repeat=True ran once. The ints now go through
    checked_integer<int>, the floats through checked_float: errors name the parameter; ints and floats, Python's or
    numpy's, are read as before."""
    from helpers import assert_checked_float, assert_checked_integer

    g = eclreco.Geometry.get("belle2-ecl")
    acc = {}  # two showers sharing crystals: the sharing iterates
    for c, e in toy_shower("belle2-ecl", g.cell_id(30, 10), 1.0) + toy_shower("belle2-ecl", g.cell_id(30, 13), 0.6):
        acc[c] = acc.get(c, 0.0) + e
    d = digits(list(acc.items()))
    run = lambda **kw: _core.find_clusters("belle2-ecl", **d, **kw)  # noqa: E731
    # for each float parameter, the others that let it be 1.0 (growth <= seed, digit <= growth)
    floats = {"seed_energy_gev": {}, "growth_energy_gev": {"seed_energy_gev": 2.0},
              "digit_energy_gev": {"seed_energy_gev": 2.0, "growth_energy_gev": 2.0}, "lm_energy_gev": {},
              "time_cut_ns": {}, "background_level": {}, "sharing_a": {}, "moliere_radius_cm": {},
              "log_weight_w0": {}, "convergence_cm": {}, "lat_r0_cm": {}}
    for name, others in floats.items():
        assert_checked_float(lambda x: run(**others, **{name: x}), name)
    ints = {"max_iterations": 3, "max_local_maxima": 2, "position_crystals": 21, "image_size": 5, "repeat": 2}
    for name, value in ints.items():
        assert_checked_integer(lambda x: run(**{name: x}), name, value, 31)
    assert run(max_iterations=1)["energy_raw"].tolist() != run()["energy_raw"].tolist()  # what True gave: 1 iteration


def test_digit_quality_is_checked_as_given():
    """find_clusters' and count_out_of_time_digits' quality was converted with pybind11's forcecast to uint8: 256
    wrapped to 0 (a good fit), so a digit whose time the caller had marked not valid was cut on its time (no
    cluster) and counted out of time; -254 wrapped to 2, 0.7 was truncated to 0, a string array was parsed. Now
    each goes through checked_numbers: a non-integer array is a TypeError naming quality, an entry past uint8 a
    ValueError naming it; integer qualities that fit are read as before."""
    d = digits([(100, 0.5, 500.0, 2)])  # quality 2: the time is not valid, not cut on
    want = _core.find_clusters("belle2-ecl", **d)["seed_cell"].tolist()
    assert want == [100] and _core.find_clusters("belle2-ecl", **{**d, "quality": np.array([0], np.uint8)})[
        "seed_cell"].tolist() == []  # a good fit 500 ns late is cut
    off, time = d["offsets"], d["time"]
    assert _core.count_out_of_time_digits(off, time, d["quality"]).tolist() == [0]
    for bad, err, msg in ((np.array([256]), ValueError, r"quality\[0\] = 256 is out of range \(above 2\*\*8 - 1\)"),
                          (np.array([-254]), ValueError, r"quality\[0\] = -254 is negative"),
                          (np.array([0.7]), TypeError, "quality must be an integer array, not float64"),
                          (np.array(["2"]), TypeError, "quality must be an integer array, not <U1")):
        with pytest.raises(err, match=msg):
            _core.find_clusters("belle2-ecl", **{**d, "quality": bad})
        with pytest.raises(err, match=msg):
            _core.count_out_of_time_digits(off, time, bad)
    for ok in (np.array([2]), [2], np.array([2], ">i2"), np.array([2], np.uint64)):
        assert _core.find_clusters("belle2-ecl", **{**d, "quality": ok})["seed_cell"].tolist() == want
        assert _core.count_out_of_time_digits(off, time, ok).tolist() == [0]


def test_skip_and_empty_events():
    d = digits([(100, 0.05)], [], [(200, 0.05)])
    out = _core.find_clusters("belle2-ecl", skip=np.array([0, 0, 1], np.uint8), **d)
    assert list(out["offsets"]) == [0, 1, 1, 1]


def test_skip_flags_are_checked_as_given():
    """find_clusters' skip flags were converted with pybind11's forcecast to uint8: 0.5 was truncated and 256
    wrapped to 0, and the event was clustered although the caller had flagged it. Now a float array is a
    TypeError naming skip, an integer past uint8 a ValueError naming its first bad entry; bools and integers
    that fit are read as before (nonzero: skip)."""
    d = digits([(100, 0.05)], [(200, 0.05)])
    with pytest.raises(TypeError, match="skip must be a bool or integer array, not float64"):
        _core.find_clusters("belle2-ecl", skip=np.array([0, 0.5]), **d)
    with pytest.raises(ValueError, match=r"skip\[1\] = 256 is out of range \(above 2\*\*8 - 1\)"):
        _core.find_clusters("belle2-ecl", skip=np.array([0, 256]), **d)
    with pytest.raises(ValueError, match=r"skip\[0\] = -1 is negative"):
        _core.find_clusters("belle2-ecl", skip=np.array([-1, 0]), **d)
    with pytest.raises(ValueError, match="one entry per event"):
        _core.find_clusters("belle2-ecl", skip=np.array([True]), **d)
    for ok in (np.array([False, True]), np.array([0, 1], np.uint8), np.array([0, 2]), [0, 1], [False, True]):
        assert _core.find_clusters("belle2-ecl", skip=ok, **d)["offsets"].tolist() == [0, 1, 1]


# ---------------------------------------------------------------------------------------------
# Geant4 array30 showers: the clusters collect the read-out energy

def _g4_digits(name, seed=3):
    from build_leakage_tables import simple_digits
    with np.load(DATA / f"g4_{name}_heldout.npz") as f:
        dig = simple_digits(f["offsets"], f["cell"], f["edep_mev"], np.random.default_rng(seed))
        # true energies: array30's own array; a belle2-ecl sample gives them in 'photons' (E, direction)
        true = f["true_energy_mev"] if "true_energy_mev" in f.files else f["photons"][:, 0, 0]
        return dig, true * 1e-3


def test_g4_array30_containment():
    dig, _ = _g4_digits("array30")
    out = _core.find_clusters("array30", **dig)
    n = len(dig["offsets"]) - 1
    e_cl = np.bincount(np.repeat(np.arange(n), np.diff(out["offsets"])), out["energy_raw"].astype(float), minlength=n)
    e_dig = np.bincount(np.repeat(np.arange(n), np.diff(dig["offsets"])), dig["energy"].astype(float), minlength=n)
    ok = e_dig > 0
    assert np.median(e_cl[ok] / e_dig[ok]) >= 0.98
    # and C++ agrees with NumPy on real showers
    ref = numpy_clustering.find_clusters("array30", **dig)
    np.testing.assert_array_equal(out["seed_cell"], ref["seed_cell"])
    np.testing.assert_allclose(out["energy_raw"], ref["energy_raw"], rtol=1e-4, atol=1e-6)


def test_g4_belle2_cpp_matches_numpy():
    dig, _ = _g4_digits("belle2")
    a = _core.find_clusters("belle2-ecl", **dig)
    b = numpy_clustering.find_clusters("belle2-ecl", **dig)
    np.testing.assert_array_equal(a["offsets"], b["offsets"])
    np.testing.assert_array_equal(a["seed_cell"], b["seed_cell"])
    np.testing.assert_allclose(a["energy_raw"], b["energy_raw"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a["theta"], b["theta"], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Modules in a path

class _Source(eclreco.Module):
    """test source: one batch of ECLDigits"""

    def __init__(self, dig, detector, rejected=(), collection="ECLDigits"):
        super().__init__()
        self.dig, self.det, self.rejected, self.collection = dig, detector, rejected, collection

    def is_source(self):
        return True

    def next_batch(self, batch, max_events):
        n = len(self.dig["offsets"]) - 1
        batch.resize(n)
        batch.detector[:] = self.det
        batch.evt[:] = np.arange(n)
        offs = np.asarray(self.dig["offsets"]).copy()
        cols = {k: self.dig[k] for k in ("cell", "energy", "time", "quality")}
        cols["amplitude"] = np.rint(self.dig["energy"] * 20000).astype(np.int32)
        for i in self.rejected:  # rejected events have no digits
            cut = offs[i + 1] - offs[i]
            keep = np.ones(len(cols["cell"]), bool)
            keep[offs[i]:offs[i + 1]] = False
            cols = {k: v[keep] for k, v in cols.items()}
            offs[i + 1:] -= cut
        batch.add_collection(self.collection, offs, cols)
        for i in self.rejected:
            batch.reject(i, "test", "")
        return False


class _Collect(eclreco.Module):
    """test sink: copies ECLClusters (or another cluster collection)"""

    def __init__(self, collection="ECLClusters"):
        super().__init__()
        self.out = None
        self.collection = collection

    def ordered(self):
        return True

    def event(self, batch):
        c = batch[self.collection]
        self.out = {k: np.array(c[k]) for k in c.columns()}
        self.out["offsets"] = np.array(c.offsets)


def test_modules_in_path():
    dig, true = _g4_digits("array30")
    n = 300
    dig = {k: (v[:n + 1] if k == "offsets" else v[:dig["offsets"][n]]) for k, v in dig.items()}
    path = eclreco.create_path()
    path.add_module(_Source(dig, 1, rejected=(5,)))
    path.add_module("ECLClusterizer", image_size=5, background_level=0.0)
    sink_raw = path.add_module(_Collect())
    eclreco.process(path, batch_size=1000, install_signal_handlers=False)
    out = sink_raw.out
    assert out["image"].shape[1:] == (5, 5)
    assert out["features"].shape[1:] == (len(_core.cluster_feature_names()),)
    assert out["offsets"][6] == out["offsets"][5]  # the rejected event has no clusters
    np.testing.assert_array_equal(out["energy"], out["energy_raw"])
    for k, dt in (("energy_raw", np.float32), ("n_crystals", np.int32), ("seed_cell", np.int32), ("ring", np.int32)):
        assert out[k].dtype == dt
    dig5 = dict(dig)
    skip = np.zeros(n, np.uint8)
    skip[5] = 1
    ref = _core.find_clusters("array30", skip=skip, image_size=5, **dig5)
    np.testing.assert_allclose(out["energy_raw"], ref["energy_raw"])
    np.testing.assert_array_equal(out["seed_cell"], ref["seed_cell"])

    # leakage correction with the shipped table
    path = eclreco.create_path()
    path.add_module(_Source(dig, 1))
    path.add_module("ECLClusterizer")
    path.add_module("ECLLeakageCorrection")
    sink = path.add_module(_Collect())
    eclreco.process(path, batch_size=1000, install_signal_handlers=False)
    out = sink.out
    table = str(Path(eclreco.__file__).parent / "data" / "leakage_array30.npz")
    expect = _core.leakage_correct(table, out["energy_raw"], out["ring"], out["local_u"], out["local_v"])
    np.testing.assert_allclose(out["energy"], expect, rtol=1e-6)
    assert np.all(out["energy"] > out["energy_raw"] * 0.99)
    # the leading clusters get closer to the true energy
    lead = out["offsets"][:-1][np.diff(out["offsets"]) > 0]
    has = np.diff(out["offsets"]) > 0
    r_raw = np.median(out["energy_raw"][lead] / true[:n][has])
    r_cor = np.median(out["energy"][lead] / true[:n][has])
    assert abs(r_cor - 1) < abs(r_raw - 1) and abs(r_cor - 1) < 0.03


def test_leakage_module_reads_its_table_and_collection_parameters(tmp_path):
    """ECLLeakageCorrection with `table` (a table of its own: the shipped one with 10 % more
    response) and `collection` (clusters under another name) corrects with that table, there."""
    dig, _ = _g4_digits("array30")
    n = 200
    dig = {k: (v[:n + 1] if k == "offsets" else v[:dig["offsets"][n]]) for k, v in dig.items()}
    shipped = Path(eclreco.__file__).parent / "data" / "leakage_array30.npz"
    with np.load(shipped) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["response"] = (arrays["response"] * 1.1).astype(np.float32)
    mine = tmp_path / "mine.npz"
    np.savez(mine, **arrays)
    path = eclreco.create_path()
    path.add_module(_Source(dig, 1))
    path.add_module("ECLClusterizer", output="MyClusters")
    path.add_module("ECLLeakageCorrection", table=str(mine), collection="MyClusters")
    sink = path.add_module(_Collect("MyClusters"))
    eclreco.process(path, batch_size=1000, install_signal_handlers=False)
    out = sink.out
    args = (out["energy_raw"], out["ring"], out["local_u"], out["local_v"])
    np.testing.assert_allclose(out["energy"], _core.leakage_correct(str(mine), *args), rtol=1e-6)
    np.testing.assert_allclose(out["energy"] * 1.1, _core.leakage_correct(str(shipped), *args), rtol=1e-5)


def test_leakage_correct_reads_the_ring_as_given():
    """leakage_correct's ring was converted with pybind11's forcecast to int32: ring 30.9 was truncated to 30 and
    an int64 2**32 + 30 wrapped to ring 30, each corrected with ring 30's response without a word. Now a float ring
    is a TypeError naming ring, one that is negative or past int32 a ValueError naming its first bad entry."""
    table = str(Path(eclreco.__file__).parent / "data" / "leakage_belle2-ecl.npz")
    e, u = np.full(3, 0.5, np.float32), np.zeros(3, np.float32)
    with pytest.raises(TypeError, match="ring must be an integer array, not float64"):
        _core.leakage_correct(table, e, np.array([3, 30.9, 60]), u, u)
    with pytest.raises(ValueError, match=rf"ring\[1\] = {2**32 + 30} is out of range \(above 2\*\*31 - 1\)"):
        _core.leakage_correct(table, e, np.array([3, 2**32 + 30, 60]), u, u)
    with pytest.raises(ValueError, match=r"ring\[0\] = -1 is negative"):
        _core.leakage_correct(table, e, np.array([-1, 30, 60]), u, u)
    ref = _core.leakage_correct(table, e, np.array([3, 30, 60], np.int32), u, u)
    assert ref[0] != ref[1]  # the table's response depends on the ring
    for ok in (np.array([3, 30, 60]), np.array([3, 30, 60], np.uint8), [3, 30, 60]):
        np.testing.assert_array_equal(_core.leakage_correct(table, e, ok, u, u), ref)


def test_leakage_table_cpp_matches_numpy(tmp_path):
    from eclreco.leakage import build_leakage_table, load_table, response
    rng = np.random.default_rng(1)
    n = 20000
    true = np.exp(rng.uniform(np.log(0.05), np.log(6), n))
    u, v = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
    resp = 0.95 - 0.3 * np.maximum(np.abs(u), np.abs(v)) ** 4 / 0.0625 - 0.01 * np.log(true)
    raw = true * resp * rng.normal(1, 0.02, n)
    p = tmp_path / "t.npz"
    build_leakage_table("array30", raw, true, ring=np.zeros(n, int), local_u=u, local_v=v, out_path=p)
    t = load_table(p)
    ring = np.zeros(n, np.int32)
    cpp = _core.leakage_correct(str(p), raw.astype(np.float32), ring, u.astype(np.float32), v.astype(np.float32))
    ref = raw.astype(np.float32) / response(t, raw.astype(np.float32), ring, u.astype(np.float32), v.astype(np.float32))
    np.testing.assert_allclose(cpp, ref, rtol=1e-5)
    ratio = cpp / true
    assert abs(np.median(ratio) - 1) < 0.01
    assert np.std(ratio) < np.std(raw / true)
    # belle2 tables: nearest ring
    ring = rng.integers(0, 69, n).astype(np.int32)
    raw2 = true * (0.9 + 0.001 * ring)
    build_leakage_table("belle2-ecl", raw2, true, ring=ring, out_path=p, min_entries=5)
    cpp = _core.leakage_correct(str(p), raw2.astype(np.float32), ring, np.zeros(n, np.float32), np.zeros(n, np.float32))
    np.testing.assert_allclose(cpp / true, 1.0, atol=0.01)
    with pytest.raises(ValueError):
        _core.leakage_correct(str(tmp_path / "missing.npz"), raw2[:1].astype(np.float32), ring[:1],
                              np.zeros(1, np.float32), np.zeros(1, np.float32))


def test_a_region_keeps_at_most_max_local_maxima():
    """Every crystal of belle2-ecl hit with 5-50 MeV (a noise burst): ~1000 local maxima in one
    region took the sharing 10 s (maxima x crystals x iterations). The region keeps the highest 30
    (max_local_maxima) and all its energy; physics events, even at 5x the nominal background, have
    at most 16 and do not change."""
    rng = np.random.default_rng(2)
    n = 8736
    burst = dict(offsets=np.array([0, n], np.int64), cell=np.arange(1, n + 1, dtype=np.int32),
                 energy=rng.uniform(0.005, 0.05, n).astype(np.float32), time=np.zeros(n, np.float32),
                 quality=np.zeros(n, np.uint8))
    c = _core.find_clusters("belle2-ecl", **burst)
    assert len(c["energy_raw"]) == 30 and np.all(c["n_maxima"] == 30)
    np.testing.assert_allclose(c["energy_raw"].sum(), burst["energy"].sum(), rtol=1e-5)
    top = np.sort(burst["energy"])[-30:]
    seeds = burst["energy"][c["seed_cell"] - 1]
    assert seeds.min() >= np.sort(burst["energy"])[-400]  # maxima of the highest energies (a maximum beats its neighbours only)
    assert top.max() in seeds
    ev = make_events("belle2-ecl", 200, np.random.default_rng(9), n_showers=(1, 3), n_background=250, overlap=True)
    a = _core.find_clusters("belle2-ecl", **ev)
    b = _core.find_clusters("belle2-ecl", max_local_maxima=1000, **ev)
    assert a["n_maxima"].max() > 1
    for k in ("energy_raw", "theta", "phi", "n_maxima"):
        np.testing.assert_array_equal(a[k], b[k])


def test_leakage_table_below_the_sample_and_in_rings_it_missed(tmp_path):
    """Photons from 50 MeV with a response of 0.95 (5 % spread) and a 10 % tail at 0.3: the bins
    wholly below 50 MeV raw hold only the tail, whose median (~0.3) made the table correct a 25 MeV
    cluster x3.6. They now take the first bin above (flat below the sample). belle2-ecl rings without
    events took the all-ring median; now the nearest ring's response."""
    from eclreco.leakage import build_leakage_table, response

    rng = np.random.default_rng(3)
    n = 60000
    true = np.exp(rng.uniform(np.log(0.05), np.log(6), n))
    tail = rng.random(n) < 0.1
    u, v = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
    raw = true * np.where(tail, 0.3, 0.95) * rng.normal(1, 0.05, n)
    t = build_leakage_table("array30", raw, true, ring=np.zeros(n, int), local_u=u, local_v=v,
                            out_path=tmp_path / "a.npz")
    low = np.array([0.02, 0.025, 0.035, 0.045], np.float32)
    r = response(t, low, np.zeros(4, np.int32), np.zeros(4, np.float32), np.zeros(4, np.float32))
    np.testing.assert_allclose(r, 0.95, atol=0.02)
    ring = rng.integers(5, 69, n).astype(np.int32)  # rings 0..4 never hit
    resp_ring = 0.80 + 0.002 * ring
    raw2 = true * resp_ring * rng.normal(1, 0.02, n)
    t = build_leakage_table("belle2-ecl", raw2, true, ring=ring, out_path=tmp_path / "b.npz")
    e = np.full(5, 0.5, np.float32)
    r = response(t, e, np.arange(5, dtype=np.int32), np.zeros(5, np.float32), np.zeros(5, np.float32))
    np.testing.assert_allclose(r, 0.80 + 0.002 * 5, atol=0.005)  # ring 5's, not the average (0.874)


@pytest.mark.parametrize("detector", ["array30", "belle2-ecl"])
def test_shipped_tables_load(detector):
    path = Path(eclreco.__file__).parent / "data" / f"leakage_{detector}.npz"
    assert path.exists() and path.stat().st_size < 50_000
    e = _core.leakage_correct(str(path), np.array([0.1, 1.0], np.float32), np.array([30, 30], np.int32),
                              np.zeros(2, np.float32), np.zeros(2, np.float32))
    assert np.all(e > np.array([0.1, 1.0])) and np.all(e < 1.5 * np.array([0.1, 1.0]))
    # below the Geant4 samples (50 MeV) and in every ring: a correction of a few per cent, not x3.6
    low = np.repeat(np.float32([0.015, 0.02, 0.025, 0.03, 0.04, 0.05]), 69)
    rings = np.tile(np.arange(69, dtype=np.int32), 6)
    e = _core.leakage_correct(str(path), low, rings, np.zeros(low.size, np.float32), np.zeros(low.size, np.float32))
    assert np.all(e / low < 1.2), (e / low).max()


def test_bad_leakage_tables_are_refused_with_the_file_named(tmp_path):
    """Found by a robustness review: a crafted .npy header crashed the reader; tables with
    non-positive, non-finite or unsorted entries silently meant 'no correction'."""
    path = Path(eclreco.__file__).parent / "data" / "leakage_array30.npz"
    good = dict(np.load(path))

    def table(**change):
        p = tmp_path / "t.npz"
        np.savez(p, **{**good, **change})
        return str(p)

    one = (np.array([1.0], np.float32), np.zeros(1, np.int32), np.zeros(1, np.float32), np.zeros(1, np.float32))
    resp = good["response"]
    bad = {
        "response values must be finite and > 0": [dict(response=np.zeros_like(resp)), dict(response=np.full_like(resp, np.nan)),
                                            dict(response=-resp)],
        "centers_0 must be finite and increasing": [dict(centers_0=good["centers_0"][::-1].copy())],
        "detector_code must be 0": [dict(detector_code=np.array([7]))],
        "unknown axis code": [dict(axis_codes=good["axis_codes"].astype(float) + 0.5)],
    }
    for match, changes in bad.items():
        for change in changes:
            p = table(**change)
            with pytest.raises(ValueError, match=match) as e:
                _core.leakage_correct(p, *one)
            assert p in str(e.value)
    # a member whose header claims a 255-byte integer (was copied into 8 bytes on the stack)
    import zipfile

    header = b"{'descr': '<i255', 'fortran_order': False, 'shape': (), }"
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(255)
    p = tmp_path / "crafted.npz"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as z:
        z.writestr("detector_code.npy", npy)
    with pytest.raises(ValueError, match="detector_code.*unsupported npy dtype '<i255'"):
        _core.leakage_correct(str(p), *one)


def test_the_seeds_3x3_gives_the_photon_direction_at_nominal_background():
    """At nominal background a 100 MeV photon's connected region holds background digits; with log
    weights over the whole region (position_crystals=0) they pulled its centroid (2000 photons through
    the chain: median angle to the true direction 9.1 mrad, 90 % quantile 25), the seed's 3 x 3 (the
    default) gives 6.6 / 14."""
    from eclreco.rawdata import encode_events
    from eclreco.sim import simulate
    from eclreco.sources import MessageSource

    n = 600
    ev = simulate(detector="belle2-ecl", n_events=n, particle="gamma", energy=0.1, background=1.0, seed=31)
    msgs = encode_events("belle2-ecl", 0, 1, np.arange(n), ev.offsets, ev.cell, ev.amplitude, ev.time_ticks,
                         ev.quality)
    true_th = np.array([t["particles"][0]["theta"] for t in ev.truth])
    true_ph = np.array([t["particles"][0]["phi"] for t in ev.truth])
    q = {}
    for pc in (0, 9):
        leading = []

        class Leading(eclreco.Module):
            def event(self, batch):
                cl = batch["ECLClusters"]
                off = np.asarray(cl.offsets)
                for i, e in enumerate(np.asarray(batch.evt).tolist()):
                    if off[i + 1] > off[i]:  # sorted by energy: the first is the leading cluster
                        leading.append((e, cl["theta"][off[i]], cl["phi"][off[i]]))

        path = eclreco.create_path()
        path.add_module(MessageSource(msgs))
        path.add_module("ECLUnpacker")
        path.add_module("ECLClusterizer", position_crystals=pc)
        path.add_module(Leading())
        eclreco.process(path, install_signal_handlers=False)
        e, th, ph = (np.array(x) for x in zip(*leading))
        angle = np.arccos(np.clip(np.sin(th) * np.sin(true_th[e]) * np.cos(ph - true_ph[e])
                                  + np.cos(th) * np.cos(true_th[e]), -1, 1))
        angle = angle[angle < 0.2]  # the photon's (not a background cluster where the photon left nothing)
        q[pc] = np.percentile(angle, [50, 90])
    assert q[9][0] < 0.85 * q[0][0] and q[9][1] < 0.75 * q[0][1], q


def test_an_unknown_detector_code_is_the_events_error_not_belle2_ecl():
    """The clusterizer took any detector code but 1 (array30) for belle2-ecl: a custom source's events of
    detector 5 got belle2-ecl clusters without a word. Such an event is now a module error of its own;
    the other events of the batch are clustered as before."""

    class ThreeDetectors(eclreco.Module):
        def is_source(self):
            return True

        def next_batch(self, batch, max_events):
            batch.resize(3)
            batch.evt[:] = [0, 1, 2]
            batch.detector[:] = [0, 5, 1]
            cell = np.array([100, 101, 100, 101, 455, 456], np.int32)  # cells of both detectors
            batch.add_collection("ECLDigits", np.array([0, 2, 4, 6]),
                                 {"cell": cell, "energy": np.full(6, 0.2, np.float32),
                                  "time": np.zeros(6, np.float32), "quality": np.zeros(6, np.uint8)})
            return False

    class Keep(eclreco.Module):
        def event(self, batch):
            Keep.flags = batch.error_flags.copy()
            Keep.clusters = np.diff(batch["ECLClusters"].offsets)

    path = eclreco.create_path()
    path.add_module(ThreeDetectors())
    path.add_module("ECLClusterizer")
    path.add_module(Keep())
    eclreco.process(path, install_signal_handlers=False)
    assert eclreco.statistics.summary()["errors"] == 1
    assert [bool(f) for f in Keep.flags] == [False, True, False]
    assert Keep.clusters.tolist() == [1, 0, 1]
    assert any("unknown detector code 5" in m for m in eclreco.statistics.state.error_messages())


def test_leakage_correction_refuses_a_column_of_two_values_per_cluster():
    """ECLLeakageCorrection read its columns with data<>(): a custom module's (n, 2) energy_raw was read
    interleaved (energies of other clusters, no error). A column of more than one value per cluster is now
    the events' error, naming it; a well-formed batch is corrected as before."""

    class Clusters(eclreco.Module):
        def __init__(self, width):
            super().__init__()
            self.width = width

        def is_source(self):
            return True

        def next_batch(self, batch, max_events):
            batch.resize(2)
            batch.evt[:] = [0, 1]
            raw = np.ones((3, self.width), np.float32) if self.width > 1 else np.ones(3, np.float32)
            batch.add_collection("ECLClusters", np.array([0, 2, 3]),
                                 {"energy_raw": raw, "energy": np.ones(3, np.float32),
                                  "ring": np.full(3, 30, np.int32), "local_u": np.zeros(3, np.float32),
                                  "local_v": np.zeros(3, np.float32)})
            return False

    class Keep(eclreco.Module):
        def event(self, batch):
            Keep.energy = batch["ECLClusters"]["energy"].copy()
            Keep.flags = batch.error_flags.copy()

    for width in (1, 2):
        path = eclreco.create_path()
        path.add_module(Clusters(width))
        path.add_module("ECLLeakageCorrection")
        path.add_module(Keep())
        eclreco.process(path, install_signal_handlers=False)
        if width == 1:
            assert not Keep.flags.any() and np.all(Keep.energy > 1.0)  # corrected upwards
        else:
            assert Keep.flags.all() and eclreco.statistics.summary()["errors"] == 2
            assert any("column 'energy_raw' holds rows of 2 values" in m
                       for m in eclreco.statistics.state.error_messages())


def test_a_missing_column_error_names_the_columns_there_are():
    """A custom source's ECLDigits without 'time' failed every event with "no column 'time' in collection":
    which collection, and what it had, went unsaid. The clusterizer now checks the columns it reads at its
    first batch and ends the job there, naming them and what the collection has."""

    class NoTime(eclreco.Module):
        def is_source(self):
            return True

        def next_batch(self, batch, max_events):
            batch.resize(1)
            batch.add_collection("ECLDigits", np.array([0, 2]), {
                "cell": np.array([100, 101], np.int32), "energy": np.full(2, 0.2, np.float32),
                "quality": np.zeros(2, np.uint8)})
            return False

    path = eclreco.create_path()
    path.add_module(NoTime())
    path.add_module("ECLClusterizer")
    with pytest.raises(RuntimeError, match=r"ECLClusterizer reads the columns cell, energy, time, quality of the "
                                           r"collection 'ECLDigits', which has no 'time' \(its columns: cell, "
                                           r"energy, quality\)"):
        eclreco.process(path, install_signal_handlers=False)
    assert eclreco.statistics.summary()["errors"] == 1


def test_a_repeated_cell_is_an_invalid_digit_not_a_second_cluster():
    """A custom source's event with two digits of one cell (raw data cannot have them; ArraySource
    rejects them) had the crystal counted twice: one cluster with both energies, or two clusters
    seeded by one crystal. The second digit is now invalid: counted in invalid_digits and dropped,
    the first one kept."""
    shower = toy_shower("belle2-ecl", 4000, 0.5)
    lone = [(7000, 0.2)]
    clean = digits(shower + lone, shower)
    seed_cell, seed_e = max(shower, key=lambda d: d[1])
    # event 0: a copy of the isolated crystal (a second cluster before); event 1: a copy of the
    # shower's seed with more energy than the original (it took the seed's place before)
    dup = digits(shower + lone + [(7000, 0.25)], shower + [(seed_cell, seed_e * 2)])
    path = eclreco.create_path()
    path.add_module(_Source(dup, 0))
    cl = path.add_module("ECLClusterizer")
    sink = path.add_module(_Collect())
    eclreco.process(path, install_signal_handlers=False)
    assert cl.counters()["invalid_digits"] == 2
    # digits() sorts each event's digits by cell: the copy follows the original, which is kept
    ref = _core.find_clusters("belle2-ecl", **clean)
    assert np.diff(ref["offsets"]).tolist() == [2, 1]
    for k in ("offsets", "energy_raw", "seed_cell", "n_crystals", "image"):
        np.testing.assert_array_equal(sink.out[k], ref[k], err_msg=k)


def test_a_seed_without_a_valid_time_gives_its_cluster_time_0():
    """A digit of quality 1-3 has no valid time (wire-format.md: its time bits mean nothing); the
    clusterizer takes it as in time, but a cluster seeded by it took the seed's time field as its time
    (up to +-1006 ns), which then put it outside the CNN's time domain. Its time is now 0, as the seed
    was taken: in time. A seed of quality 0 keeps its time; the NumPy twin agrees."""
    ev = [(4000, 0.8, 1006.0, 2), (3999, 0.1, 3.0, 0), (4001, 0.1, -2.0, 0), (7000, 0.3, 40.0, 0)]
    d = digits(ev)
    out = _core.find_clusters("belle2-ecl", **d)
    assert dict(zip(out["seed_cell"].tolist(), out["time"].tolist())) == {4000: 0.0, 7000: 40.0}
    ref = numpy_clustering.find_clusters("belle2-ecl", **d)
    np.testing.assert_array_equal(out["time"], ref["time"])
    good = _core.find_clusters("belle2-ecl", **digits([(4000, 0.8, 12.0, 0)] + ev[1:]))
    assert good["time"].tolist() == [12.0, 40.0]


def test_leakage_module_s_own_table_is_in_the_metadata_with_its_digest(tmp_path):
    """A `table` of its own is in the output file's metadata with the SHA-256 of the bytes ECLLeakageCorrection
    loaded, under its entry's `table`: it was named by its path only, and a table changed after the job could not be
    told apart. The package's tables are under `table_<detector>` (test below), never `table`."""
    import hashlib

    import uproot

    from eclreco.modules.root_output import read_metadata
    from eclreco.rawdata import encode_events, write_raw_file

    raw = tmp_path / "raw.msgpack"
    write_raw_file(raw, encode_events("array30", 0, 1, [0, 1], [0, 1, 2], [100, 101], [5000, 4000], [0, 0], [0, 0]))
    shipped = Path(eclreco.__file__).parent / "data" / "leakage_array30.npz"
    mine = tmp_path / "mine.npz"
    mine.write_bytes(shipped.read_bytes())
    sha = hashlib.sha256(mine.read_bytes()).hexdigest()
    for table in (str(mine), ""):
        path = eclreco.create_path()
        path.add_module("RawFileInput", filename=str(raw))
        path.add_module("ECLUnpacker")
        path.add_module("ECLClusterizer")
        path.add_module("ECLLeakageCorrection", table=table)
        path.add_module("RootOutput", filename=str(tmp_path / "out.root"))
        eclreco.process(path, install_signal_handlers=False)
        with uproot.open(tmp_path / "out.root") as f:
            entry = next(m for m in read_metadata(f)["path"] if m["module"] == "ECLLeakageCorrection")
        if table:
            mine.write_bytes(b"changed after the job")
            assert entry["table"] == {"path": str(mine), "sha256": sha}
        else:
            assert "table" not in entry


def test_leakage_module_s_package_tables_are_in_the_metadata_with_the_digest_of_the_bytes_loaded(tmp_path):
    """Without a `table` of its own, ECLLeakageCorrection's entry gives the package's tables it loaded, path and
    SHA-256 of the bytes it loaded, under `table_<detector>`. Only package_data gave them, from a second read of the
    files, cached once per process: the second job of a process after a reinstall replaced a table recorded the
    old table's digest beside energies corrected with the new one."""
    import hashlib

    import uproot

    from eclreco.modules.root_output import read_metadata
    from eclreco.rawdata import encode_events, write_raw_file

    raw = tmp_path / "raw.msgpack"
    write_raw_file(raw, encode_events("array30", 0, 1, [0, 1], [0, 1, 2], [100, 101], [5000, 4000], [0, 0], [0, 0]))
    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=str(raw))
    path.add_module("ECLUnpacker")
    path.add_module("ECLClusterizer")
    path.add_module("ECLLeakageCorrection")
    path.add_module("RootOutput", filename=str(tmp_path / "out.root"))
    eclreco.process(path, install_signal_handlers=False)
    with uproot.open(tmp_path / "out.root") as f:
        entry = next(m for m in read_metadata(f)["path"] if m["module"] == "ECLLeakageCorrection")
    data = Path(eclreco.__file__).parent / "data"
    for det in ("array30", "belle2-ecl"):
        table = data / f"leakage_{det}.npz"
        assert entry[f"table_{det}"] == {"path": str(table), "sha256": hashlib.sha256(table.read_bytes()).hexdigest()}


_TWO_JOBS_SCRIPT = """
import sys
from pathlib import Path

import numpy as np

import eclreco
from eclreco.rawdata import encode_events, write_raw_file

tmp = Path(sys.argv[1])
assert Path(eclreco.__file__).parent == tmp / "site" / "eclreco", eclreco.__file__
raw = tmp / "raw.msgpack"
write_raw_file(raw, encode_events("array30", 0, 1, [0, 1], [0, 1, 2], [100, 101], [5000, 4000], [0, 0], [0, 0]))


def job(out):
    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=str(raw))
    path.add_module("ECLUnpacker")
    path.add_module("ECLClusterizer")
    path.add_module("ECLLeakageCorrection")
    path.add_module("RootOutput", filename=str(out))
    eclreco.process(path, install_signal_handlers=False)


job(tmp / "first.root")
# a reinstall with a rebuilt table, the process still up (a farm worker, a notebook)
table = Path(eclreco.__file__).parent / "data" / "leakage_array30.npz"
arrays = dict(np.load(table))
arrays["response"] = arrays["response"] * np.float32(0.99)
with open(table, "wb") as f:
    np.savez(f, **arrays)
job(tmp / "second.root")
"""


def test_package_data_is_the_tables_as_installed_at_each_job_not_at_the_first_of_the_process(tmp_path):
    """package_data (job_provenance) was hashed once per process (lru_cache): in a long-lived process, a table
    replaced after its first job (a reinstall) was recorded with the old digest in every later file, beside the
    module's `table_array30` giving the new one. A copy of the installed package in a process of its own runs two
    jobs, the table rewritten between them: each file's package_data is the table it was made with."""
    import hashlib
    import shutil
    import subprocess

    import uproot

    from eclreco.modules.root_output import read_metadata

    shutil.copytree(Path(eclreco.__file__).parent, tmp_path / "site" / "eclreco",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    r = subprocess.run([sys.executable, "-c", _TWO_JOBS_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    table = tmp_path / "site" / "eclreco" / "data" / "leakage_array30.npz"
    digests = []
    for name in ("first.root", "second.root"):
        with uproot.open(tmp_path / name) as f:
            meta = read_metadata(f)
        entry = next(m for m in meta["path"] if m["module"] == "ECLLeakageCorrection")
        assert entry["table_array30"]["path"] == str(table), entry
        assert meta["package_data"]["data/leakage_array30.npz"] == entry["table_array30"]["sha256"], (name, meta)
        digests.append(entry["table_array30"]["sha256"])
    assert digests[0] != digests[1] == hashlib.sha256(table.read_bytes()).hexdigest()
