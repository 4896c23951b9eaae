"""Detector geometry against its contract, spec/detector.md: cell numbering, angles, positions and
neighbour sets of every cell of both configurations, compared with an independent NumPy
reference written from the spec page alone (not from cpp/ecl/geometry.cpp).

Readings of the spec this reference makes (where the page leaves a choice):
- belle2-ecl theta: each part's coverage (forward 12.4-31.4 deg, barrel 32.2-128.7, backward
  130.7-155.1) is the outer edges of its rings, split into equal theta intervals; a ring's
  central theta is the middle of its interval. The gaps between the parts belong to no ring.
- Front face of a crystal: the point at its ring's central theta and its phi centre on the
  cylinder r = 125 cm (barrel) or the plane z = +196 / -102 cm (endcaps); its axis is the unit
  vector from the interaction point through that point ("crystals point at the IP").
- N1 / NC2 on a ring of another size: the block is centred, on that ring, on the crystal nearest
  in phi to the cell's phi centre (each ring looked up directly from the cell, not chained through
  the ring in between), and extends +-1 (N1) or +-2 (NC2; +-1 on rings +-2, the corners being cut)
  crystals in phi from it, wrapping around in phi. A phi centre exactly midway between two
  crystals of the other ring (48->64, 96->64, 144->96 rings; 528 (cell, ring) rows) is a tie the
  spec does not decide: either crystal is "nearest". The project takes what the double arithmetic
  of floor(phi n / 2pi) gives (IEEE basic operations only, so the same on every platform, but no
  rule: the crystal above for most ties, below for 69 of them, e.g. cellId 50 -> above, cellId
  56 -> below), so the test accepts either there, and only there. Rings are neighbours
  by index: thetaId 12/13 and 58/59 are neighbours across the empty theta gap. Outside rings
  0..68 (belle2-ecl) or the 30x30 array, cells are absent.
- array30: ring = row and phi index = col (so cell_id(row, col) = 1 + 30 row + col); the front
  face centre is (x, y, 0) and the crystal axis +z.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import eclreco
from helpers import assert_checked_float

DETECTORS = ["belle2-ecl", "array30"]

# ---------------------------------------------------------------------------------------------
# Reference, from spec/detector.md

B2_RING_SIZE = np.array([48, 48, 64, 64, 64, 96, 96, 96, 96, 96, 96, 144, 144] + [144] * 46
                        + [144, 144, 96, 96, 96, 96, 96, 64, 64, 64])
# (first thetaId, number of rings, theta_lo, theta_hi in degrees, front face: ("r" | "z", cm))
B2_PARTS = [(0, 13, 12.4, 31.4, ("z", 196.0)), (13, 46, 32.2, 128.7, ("r", 125.0)),
            (59, 10, 130.7, 155.1, ("z", -102.0))]
A30_PITCH_CM = 6.0


def _reference(detector):
    ref = {}
    if detector == "belle2-ecl":
        sizes = B2_RING_SIZE
        lo, hi, dist = (np.empty(len(sizes)) for _ in range(3))
        for first, n, t0, t1, (surface, value) in B2_PARTS:
            edges = np.radians(t0 + (t1 - t0) * np.arange(n + 1) / n)
            lo[first:first + n], hi[first:first + n] = edges[:-1], edges[1:]
            mid = 0.5 * (edges[:-1] + edges[1:])
            dist[first:first + n] = value / np.sin(mid) if surface == "r" else value / np.cos(mid)
        ref.update(ring_theta_lo=lo, ring_theta_hi=hi, ring_theta=0.5 * (lo + hi), ring_front_distance=dist)
    else:
        sizes = np.full(30, 30)
    first = 1 + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    ring = np.repeat(np.arange(len(sizes)), sizes)
    phi_id = np.arange(sizes.sum()) + 1 - first[ring]
    ref.update(n_cells=int(sizes.sum()), n_rings=len(sizes), ring_size=sizes, ring_first_cell=first,
               cell_ring=ring, cell_phi_index=phi_id)
    if detector == "belle2-ecl":
        theta = ref["ring_theta"][ring]
        phi = (phi_id + 0.5) * 2 * np.pi / sizes[ring]
        d = ref["ring_front_distance"][ring]
        u = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)])
        ref.update(cell_theta=theta, cell_phi=phi, front=d * u, dir=u)
    else:  # row = ring, col = phi index; mm -> cm
        x, y = (phi_id - 14.5) * A30_PITCH_CM, (ring - 14.5) * A30_PITCH_CM
        ref.update(front=np.stack([x, y, np.zeros_like(x)]),
                   dir=np.stack([np.zeros_like(x), np.zeros_like(x), np.ones_like(x)]))
    wrap = detector == "belle2-ecl"
    for kind, half in (("n1", 1), ("nc2", 2)):
        for tie in ("upper", "lower"):
            ref[kind, tie] = _reference_block(sizes, first, ring, phi_id, wrap, half, tie)
    return ref


def _reference_block(sizes, first, ring, phi_id, wrap, half, tie):
    """(cellId, neighbour cellId) pairs of the (2 half + 1)^2 block (NC2: minus its corners).
    tie: which of two crystals equally near in phi centres the row ("upper" or "lower")."""
    cells = np.arange(len(ring)) + 1
    pairs = []
    for dr in range(-half, half + 1):
        r2 = ring + dr
        inside = (r2 >= 0) & (r2 < len(sizes))
        r2 = np.clip(r2, 0, len(sizes) - 1)
        n, n2 = sizes[ring], sizes[r2]
        # nearest crystal in phi on ring r2, in exact integers: the centre (j + 1/2) 2pi/n lies in
        # segment floor((2j + 1) n2 / 2n) of ring r2; exactly on a segment boundary (remainder 0,
        # rings of different sizes) the crystals below and above are equally near.
        j0, rem = np.divmod((2 * phi_id + 1) * n2, 2 * n)
        if tie == "lower":
            j0 = j0 - ((rem == 0) & (n2 != n))
        width = 1 if (half == 2 and abs(dr) == 2) else half
        for dp in range(-width, width + 1):
            k = j0 + dp
            ok = inside.copy()
            if wrap:
                k = k % n2
            else:
                ok &= (k >= 0) & (k < n2)
            pairs.append(np.stack([cells[ok], first[r2[ok]] + k[ok]], axis=1))
    return np.concatenate(pairs)


_REF = {}


def reference(detector):
    if detector not in _REF:
        _REF[detector] = _reference(detector)
    return _REF[detector]


def csr_pairs(offsets, cells):
    """CSR over cellId - 1 -> (cellId, neighbour cellId) pairs."""
    return np.stack([np.repeat(np.arange(len(offsets) - 1) + 1, np.diff(offsets)), cells], axis=1).astype(np.int64)


def pair_keys(pairs):
    return pairs[:, 0].astype(np.int64) * 100_000 + pairs[:, 1]


def neighbour_dict(pairs, cells):
    return {int(c): sorted(int(b) for b in pairs[pairs[:, 0] == c, 1]) for c in cells}


def assert_close(name, actual, expected, atol):
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape}, spec {expected.shape}"
    bad = np.flatnonzero(~np.isclose(actual, expected, rtol=1e-9, atol=atol))
    assert bad.size == 0, (f"{name}: {bad.size} entries differ from the spec, first at index {bad[:5].tolist()}: "
                           f"{actual[bad[:5]].tolist()} != {expected[bad[:5]].tolist()}")


def assert_equal(name, actual, expected):
    actual = np.asarray(actual)
    assert actual.shape == np.shape(expected), f"{name}: shape {actual.shape}, spec {np.shape(expected)}"
    bad = np.flatnonzero(actual != expected)
    assert bad.size == 0, (f"{name}: {bad.size} entries differ from the spec, first at index {bad[:5].tolist()}: "
                           f"{actual[bad[:5]].tolist()} != {np.asarray(expected)[bad[:5]].tolist()}")


# ---------------------------------------------------------------------------------------------
# Numbering, angles, positions: every cell

@pytest.mark.parametrize("detector", DETECTORS)
def test_numbering(detector):
    g, ref = eclreco.Geometry.get(detector), reference(detector)
    assert g.n_cells == ref["n_cells"] and g.n_rings == ref["n_rings"]
    if detector == "belle2-ecl":  # the spec's part totals
        assert (g.n_cells, ref["ring_size"][:13].sum(), ref["ring_size"][13:59].sum(),
                ref["ring_size"][59:].sum()) == (8736, 1152, 6624, 960)
    for k in ("ring_size", "ring_first_cell", "cell_ring", "cell_phi_index"):
        assert_equal(k, getattr(g, k), ref[k])


def test_belle2_angles():
    g, ref = eclreco.Geometry.get("belle2-ecl"), reference("belle2-ecl")
    for k in ("ring_theta_lo", "ring_theta_hi", "ring_theta", "cell_theta", "cell_phi"):
        assert_close(k, getattr(g, k), ref[k], atol=1e-12)
    # coverage: the parts' outer edges, and the rings of a part tile it without gaps or overlaps
    for first, n, t0, t1, _ in B2_PARTS:
        assert np.degrees([g.ring_theta_lo[first], g.ring_theta_hi[first + n - 1]]) == pytest.approx([t0, t1], abs=1e-9)
        np.testing.assert_allclose(g.ring_theta_lo[first + 1:first + n], g.ring_theta_hi[first:first + n - 1],
                                   rtol=0, atol=1e-15)


@pytest.mark.parametrize("detector", DETECTORS)
def test_positions(detector):
    """Front-face centres (cm) and crystal axes of every crystal. atol 1e-9 cm on ~100 cm
    coordinates: the spec's formulas evaluated in double, in any order, agree to ~1e-13."""
    g, ref = eclreco.Geometry.get(detector), reference(detector)
    front = np.stack([g.front_x, g.front_y, g.front_z])
    axis = np.stack([g.dir_x, g.dir_y, g.dir_z])
    for i, c in enumerate("xyz"):
        assert_close(f"front_{c}", front[i], ref["front"][i], atol=1e-9)
        assert_close(f"dir_{c}", axis[i], ref["dir"][i], atol=1e-12)
    # the same, as the spec states it
    if detector == "belle2-ecl":
        assert_close("ring_front_distance", g.ring_front_distance, ref["ring_front_distance"], atol=1e-9)
        part = np.searchsorted([13, 59], g.cell_ring, side="right")  # 0 forward, 1 barrel, 2 backward
        np.testing.assert_allclose(np.hypot(g.front_x, g.front_y)[part == 1], 125.0, rtol=1e-12)
        np.testing.assert_array_equal(g.front_z[part == 0], 196.0)
        np.testing.assert_array_equal(g.front_z[part == 2], -102.0)
        # pointing at the IP: the axis is the unit vector along the front-face centre
        np.testing.assert_allclose(np.linalg.norm(front, axis=0), g.ring_front_distance[g.cell_ring], rtol=1e-12)
        np.testing.assert_allclose(front / np.linalg.norm(front, axis=0), axis, atol=1e-12)
    else:
        cell = np.arange(900)  # cellId - 1 = 30 row + col
        np.testing.assert_array_equal(g.front_x, (cell % 30 - 14.5) * 6.0)
        np.testing.assert_array_equal(g.front_y, (cell // 30 - 14.5) * 6.0)
        np.testing.assert_array_equal(g.width, 5.5)  # 55 x 55 mm^2 boxes
    np.testing.assert_allclose(np.linalg.norm(axis, axis=0), 1.0, rtol=1e-12)
    assert g.crystal_length_cm == 30.0


# ---------------------------------------------------------------------------------------------
# Neighbours: every cell's set

@pytest.mark.parametrize("kind", ["n1", "nc2"])
@pytest.mark.parametrize("detector", DETECTORS)
def test_neighbour_sets(detector, kind):
    """Every cell's set, one ring row at a time. Where the cell's phi centre lies exactly midway
    between two crystals of a ring of another size (e.g. cellId 56, ring 1 phiId 7 -> ring 2,
    phi 10 of 64 segments), the spec's "nearest in phi" allows the row centred on either; the
    project decides by the rounding of floor(phi n / 2pi) (module docstring), so both are accepted
    there and only there."""
    g, ref = eclreco.Geometry.get(detector), reference(detector)
    offsets, cells = getattr(g, f"{kind}_offsets"), getattr(g, f"{kind}_cells")
    assert len(offsets) == g.n_cells + 1 and offsets[0] == 0 and offsets[-1] == len(cells)
    assert ((cells >= 1) & (cells <= g.n_cells)).all(), f"{kind}: a cellId outside 1..{g.n_cells}"
    got = csr_pairs(offsets, cells)
    key = pair_keys(got)
    assert len(np.unique(key)) == len(key), f"{kind}: a cell lists a neighbour twice"
    ring = ref["cell_ring"]

    def rows(pairs):  # row id of each pair: 100 cellId + ring offset + 50
        return pairs[:, 0] * 100 + ring[pairs[:, 1] - 1] - ring[pairs[:, 0] - 1] + 50

    up, lo = ref[kind, "upper"], ref[kind, "lower"]
    differ = np.unique(rows(np.concatenate([got[~np.isin(key, pair_keys(up))],
                                            up[~np.isin(pair_keys(up), key)]])))

    def row_sets(pairs):  # {row id: neighbour set} for the rows that differ from "upper"
        r = rows(pairs)
        sel = np.isin(r, differ)
        out = {}
        for rid, nb in zip(r[sel].tolist(), pairs[sel, 1].tolist()):
            out.setdefault(rid, set()).add(nb)
        return out

    g_rows, lo_rows = row_sets(got), row_sets(lo)
    bad = sorted({rid // 100 for rid in differ if g_rows.get(rid) != lo_rows.get(rid)})
    assert not bad, (f"{kind}: {len(bad)} cells differ from the spec, e.g. "
                     f"{neighbour_dict(got, bad[:3])} != spec {neighbour_dict(up, bad[:3])}")


@pytest.mark.parametrize("detector", DETECTORS)
def test_neighbour_properties(detector):
    """What the spec implies, checked on the project's tables directly."""
    g = eclreco.Geometry.get(detector)
    n1, nc2 = (csr_pairs(getattr(g, f"{k}_offsets"), getattr(g, f"{k}_cells")) for k in ("n1", "nc2"))
    k1, k2 = pair_keys(n1), pair_keys(nc2)
    cells = np.arange(1, g.n_cells + 1)
    self_keys = cells * 100_000 + cells
    assert np.isin(self_keys, k1).all() and np.isin(self_keys, k2).all(), "a cell is missing from its own N1 or NC2"
    assert np.isin(k1, k2).all(), "an N1 neighbour is not in the NC2 set"
    size1, size2 = np.diff(g.n1_offsets), np.diff(g.nc2_offsets)
    ring, phi = np.asarray(g.cell_ring), np.asarray(g.cell_phi_index)
    if detector == "belle2-ecl":
        # one row of 3 (N1) or 5/3 (NC2) crystals per ring, also where the ring size changes:
        # only the first/last one or two rings lose rows
        np.testing.assert_array_equal(size1, np.where((ring == 0) | (ring == 68), 6, 9), err_msg="|N1|")
        np.testing.assert_array_equal(size2, np.select([(ring == 0) | (ring == 68), (ring == 1) | (ring == 67)],
                                                       [13, 18], 21), err_msg="|NC2|")
        # N1 is symmetric between rings of the same size, not across a size change (the nearest
        # crystal in phi is not a symmetric relation): e.g. 96 -> 144 rings
        same = g.ring_size[ring[n1[:, 0] - 1]] == g.ring_size[ring[n1[:, 1] - 1]]
        rev = np.isin(n1[:, 1] * 100_000 + n1[:, 0], k1)
        assert rev[same].all(), "N1 not symmetric between two rings of the same size"
        assert not rev[~same].all(), "N1 symmetric across ring-size changes: not the nearest-in-phi rule"
        # phi wraps around: phiId 0 and n-1 of a ring are N1 neighbours, phiId 0 and n-2 NC2 ones
        for r in (0, 12, 30, 68):
            c0, c_last, c_prev = (g.cell_id(r, j) for j in (0, g.ring_size[r] - 1, g.ring_size[r] - 2))
            assert c_last in g.n1_cells[g.n1_offsets[c0 - 1]:g.n1_offsets[c0]]
            assert c0 in g.n1_cells[g.n1_offsets[c_last - 1]:g.n1_offsets[c_last]]
            assert c_prev in g.nc2_cells[g.nc2_offsets[c0 - 1]:g.nc2_offsets[c0]]
    else:
        interior1 = (ring > 0) & (ring < 29) & (phi > 0) & (phi < 29)
        interior2 = (ring > 1) & (ring < 28) & (phi > 1) & (phi < 28)
        assert (size1[interior1] == 9).all() and (size2[interior2] == 21).all()
        assert size1[0] == 4 and size2[0] == 8  # corner crystal: what is outside is absent
        # no wrap-around in the array, and the blocks are symmetric
        assert 30 not in g.n1_cells[:g.n1_offsets[1]]
        for k in (k1, k2):
            assert np.isin((k % 100_000) * 100_000 + k // 100_000, k).all()


# ---------------------------------------------------------------------------------------------
# Look-ups

@pytest.mark.parametrize("detector", DETECTORS)
def test_lookups_match_tables(detector):
    g = eclreco.Geometry.get(detector)
    ring, phi_id = g.cell_ring.tolist(), g.cell_phi_index.tolist()
    ids = [g.cell_id(r, j) for r, j in zip(ring, phi_id)]
    np.testing.assert_array_equal(ids, np.arange(1, g.n_cells + 1), err_msg="cell_id(ring, phi index)")
    assert g.cell_id(-1, 0) == 0 and g.cell_id(g.n_rings, 0) == 0  # no such ring
    # phi index out of range: wraps around in belle2-ecl (the project's documented choice; phi is
    # periodic), outside the array in array30
    n0 = int(g.ring_size[0])
    assert [g.cell_id(0, -1), g.cell_id(0, n0)] == ([n0, 1] if detector == "belle2-ecl" else [0, 0])
    if detector == "array30":
        assert g.cell_id(15, 15) == 1 + 30 * 15 + 15  # the reference beam's crystal
        return
    # phi_index_at: the segment containing phi, at the centre and just inside both edges
    n = g.ring_size[g.cell_ring]
    step = 2 * np.pi / n
    for frac in (0.5, 1e-6, 1 - 1e-6):
        got = [g.phi_index_at(r, p) for r, p in zip(ring, ((g.cell_phi_index + frac) * step).tolist())]
        np.testing.assert_array_equal(got, phi_id, err_msg=f"phi_index_at at {frac} of a segment")
    # phi is periodic: one turn below gives the same crystal
    got = [g.phi_index_at(r, p) for r, p in zip(ring, (g.cell_phi - 2 * np.pi).tolist())]
    np.testing.assert_array_equal(got, phi_id, err_msg="phi_index_at(phi - 2 pi)")
    # ring_at_theta: the ring's centre and just inside its edges; -1 in the gaps and outside
    for t in (g.ring_theta, g.ring_theta_lo + 1e-9, g.ring_theta_hi - 1e-9):
        np.testing.assert_array_equal([g.ring_at_theta(x) for x in t], np.arange(g.n_rings), err_msg="ring_at_theta")
    outside = np.radians([0.0, 12.3, 31.8, 129.7, 155.2, 180.0])  # before, in the two gaps, after
    assert [g.ring_at_theta(x) for x in outside] == [-1] * len(outside), "ring_at_theta in a gap or outside"


@pytest.mark.parametrize("detector", DETECTORS)
def test_phi_index_at_outside_the_detector_is_minus_one(detector):
    """phi_index_at of a ring that does not exist, of a NaN or infinite phi, or in array30 (no phi
    segments) is -1, as ring_at_theta answers outside: it read ring_size past its end (a garbage
    index such as -1079594741 for ring 69) and cast NaN to int (-2147483648)."""
    g = eclreco.Geometry.get(detector)
    bad_rings = [-1, g.n_rings, 100_000, -100_000]
    assert [g.phi_index_at(r, 0.1) for r in bad_rings] == [-1] * len(bad_rings)
    phis = [float("nan"), float("inf"), -float("inf")]
    assert [g.phi_index_at(0, p) for p in phis] == [-1] * len(phis)
    if detector == "array30":
        assert g.phi_index_at(0, 0.1) == -1
    else:
        assert g.phi_index_at(0, 0.1) == 0 and g.phi_index_at(68, 2 * np.pi - 1e-9) == 63


def test_geometry_get_reads_its_detector_as_every_detector_argument():
    """Geometry.get parsed the detector name with its own copy of the parsing: a code (Geometry.get(1), numpy's
    np.int64(0)) was refused with pybind11's generic 'incompatible function arguments', and an unknown name had
    a message of its own. It now goes through detector_arg, as unpack_payload's and find_clusters': names and
    codes are accepted and refused exactly as there, with the same messages."""
    for ok, name in (("belle2-ecl", "belle2-ecl"), ("array30", "array30"), (0, "belle2-ecl"), (1, "array30"),
                     (np.int64(1), "array30"), (np.uint8(0), "belle2-ecl")):
        g = eclreco.Geometry.get(ok)
        assert g.name == name and g is eclreco.Geometry.get(name)  # the singleton, not a copy
    with pytest.raises(ValueError, match=r"^detector = 'cms' is not a detector name \(belle2-ecl or array30\)$"):
        eclreco.Geometry.get("cms")
    for bad in (2, -1, 2**70):
        with pytest.raises(ValueError, match=rf"^detector = {bad} is not a detector code \(0 belle2-ecl, 1 array30\)$"):
            eclreco.Geometry.get(bad)
    for bad, shown in ((1.5, "float 1.5"), (True, "bool True"), (None, "NoneType None")):
        with pytest.raises(TypeError, match=r"^detector must be a detector name \(belle2-ecl or array30\) or code "
                                            rf"\(0 or 1\), not {re.escape(shown)}$"):
            eclreco.Geometry.get(bad)


def test_cell_id_and_phi_index_at_check_their_int_arguments():
    """Geometry.cell_id's and phi_index_at's int arguments were cast by pybind11: a bool was read as a number
    (cell_id(True, 0) as ring 1, cellId 49) and a value past int32 (cell_id(2**40, 0)) raised the generic
    'incompatible function arguments' naming nothing. Now a bool or non-integer is a TypeError, a value past int32
    a ValueError, each naming the argument; ints (Python's or numpy's) inside int32 are read as before (outside
    the detector: 0 / -1)."""
    g = eclreco.Geometry.get("belle2-ecl")
    for call, first in ((lambda a, b: g.cell_id(a, b), "ring"), (lambda a, b: g.cell_id(b, a), "phi_index"),
                        (lambda a, b: g.phi_index_at(a, 0.1), "ring")):
        for bad in (True, np.True_, 1.5, None, "1", np.array([1, 2])):
            shown = f"{type(bad).__name__} {bad!r}"  # 'bool True', 'float 1.5', "str '1'", ...
            with pytest.raises(TypeError, match=rf"^{first} must be an int, not {re.escape(shown)}$"):
                call(bad, 0)
        for bad in (2**40, 2**31, -2**31 - 1, np.uint64(2**64 - 1)):
            with pytest.raises(ValueError, match=rf"^{first} = {int(bad)} is out of range \(-2\*\*31 \.\. 2\*\*31 - 1\)$"):
                call(bad, 0)
    assert [g.cell_id(1, 0), g.cell_id(np.int64(1), np.uint8(0)), g.cell_id(np.array(1), 0)] == [49, 49, 49]
    assert g.cell_id(2**31 - 1, 0) == 0 and g.cell_id(-2**31, 0) == 0  # the widest rings there are not: outside
    assert g.phi_index_at(np.int32(1), 0.1) == g.phi_index_at(1, 0.1) and g.phi_index_at(-5, 0.1) == -1


def test_phi_index_at_and_ring_at_theta_check_their_float_arguments():
    """phi_index_at's phi and ring_at_theta's theta were cast by pybind11: a bool was read as 0.0 / 1.0
    (phi_index_at(1, True) gave 7, ring_at_theta(True) 24) and a string, None or complex value was refused with the
    generic 'incompatible function arguments' naming nothing. Now they go through checked_float."""
    g = eclreco.Geometry.get("belle2-ecl")
    assert_checked_float(lambda x: g.phi_index_at(1, x), "phi")
    assert_checked_float(lambda x: g.ring_at_theta(x), "theta")
    assert g.phi_index_at(1, 1.0) == 7 and g.ring_at_theta(1.0) == 24  # as before for a float
