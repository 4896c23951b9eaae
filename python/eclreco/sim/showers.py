"""Vectorised parametrised EM showers (GFlash / Grindhammer-Peters) and their deposit in crystals.

A shower is a set of equal-energy *spots*. Per shower we draw the longitudinal parameters
(ln T, ln alpha) from a correlated 2D Gaussian (Grindhammer-Peters homogeneous-medium
parametrisation), a photon first-interaction depth t0 ~ Exp(9/7 X0) and then, per spot,
a depth t ~ Gamma(alpha, T/(alpha-1)) (in X0) and a radius from the GFlash two-component
(core + tail) radial profile in Moliere radii.  Spots are turned into 3D points and assigned
to crystals by the detector geometry; spots outside any crystal are lost (leakage / gaps).

Everything works on flat numpy arrays: one entry per shower or per spot, no Python loops over
showers.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["Medium", "CSI", "ALUMINIUM", "ShowerParams", "DEFAULT_PARAMS", "shower_spots",
           "deposit_belle2", "deposit_array30", "array30_in_gap", "geometry_arrays"]


@dataclass(frozen=True)
class Medium:
    name: str
    x0_cm: float        # radiation length
    rm_cm: float        # Moliere radius
    ec_gev: float       # critical energy
    z: float            # (effective) atomic number, for the GFlash lateral parameters


CSI = Medium("CsI(Tl)", 1.86, 3.57, 0.011, 54.0)
ALUMINIUM = Medium("Al", 8.9, 4.42, 0.0430, 13.0)


@dataclass(frozen=True)
class ShowerParams:
    """Tunable knobs of the fast simulation (defaults: tuned against the Geant4 samples)."""
    # number of spots per shower: n = spots_ref * (E/GeV)^0.876, clipped to [spots_min, spots_max]
    spots_ref: float = 300.0
    spots_min: int = 24
    spots_max: int = 600
    # photon first-interaction depth t0 ~ Exp(mean = photon_t0_x0) in X0 (9/7 from pair production)
    photon_t0_x0: float = 9.0 / 7.0
    # shift of the electron-profile depth for a photon shower (X0); GP photons ~ electrons + ~1 X0
    # are modelled by t0 above, this is an extra constant offset
    t_shift_x0: float = 0.0
    # scale of the fluctuations of (ln T, ln alpha) with respect to Grindhammer-Peters
    fluct_scale: float = 1.0
    # scale of the mean T (shower maximum)
    t_scale: float = 1.0
    # scale factors of the lateral radii (core, tail) and of the core probability
    rc_scale: float = 1.2
    rt_scale: float = 1.0
    p_scale: float = 1.0
    # array30: a spot that falls in the aluminium between crystals is lost when it is within
    # gap_loss_half_cm of the gap centre (0.25 cm = the whole 5 mm gap)
    gap_loss_half_cm: float = 0.2
    # array30: photons entering an aluminium gap shower in aluminium; the Al radii are scaled
    al_lateral_scale: float = 1.0
    # effective medium of a shower that starts in an aluminium gap (part Al, part CsI)
    gap_x0_cm: float = 6.0
    gap_rm_cm: float = 2.0
    # lower bound of the shape parameter alpha (alpha -> 1 makes the gamma profile run away)
    alpha_min: float = 1.5
    # energy dependence of the lateral size: radii scaled by 1 + lat_log_slope * ln(E/GeV)
    lat_log_slope: float = 0.08
    # belle2-ecl: projective air gaps between crystals (width at the front face); a photon
    # pointing into one travels along it without showering and is lost
    b2_gap_cm: float = 0.1


DEFAULT_PARAMS = ShowerParams()


# --------------------------------------------------------------------------------------------
# Spot generation
# --------------------------------------------------------------------------------------------
def _longitudinal(e_gev, medium: Medium, p: ShowerParams, rng):
    """Per shower (T, alpha) of the Grindhammer-Peters homogeneous parametrisation."""
    y = np.maximum(e_gev / medium.ec_gev, 1.0)
    lny = np.maximum(np.log(y), 1.3)
    mu_lnT = np.log(np.maximum(lny - 0.812, 0.3)) + np.log(p.t_scale)
    mu_lna = np.log(0.81 + (0.458 + 2.26 / medium.z) * lny)
    lny_f = np.maximum(lny, 2.0)  # keep the fluctuation formulas finite at low energy
    s_lnT = np.minimum(1.0 / (-1.4 + 1.26 * lny_f), 0.6) * p.fluct_scale
    s_lna = np.minimum(1.0 / (-0.58 + 0.86 * lny_f), 0.6) * p.fluct_scale
    rho = np.clip(0.705 - 0.023 * lny, -0.99, 0.99)
    z1 = rng.standard_normal(e_gev.shape)
    z2 = rng.standard_normal(e_gev.shape)
    lnT = mu_lnT + s_lnT * z1
    lna = mu_lna + s_lna * (rho * z1 + np.sqrt(1.0 - rho * rho) * z2)
    alpha = np.maximum(np.exp(lna), p.alpha_min)
    T = np.exp(lnT)
    return T, alpha


def shower_spots(e_gev, medium: Medium, rng, params: ShowerParams = DEFAULT_PARAMS,
                 photon=True, lateral_scale=1.0):
    """Spots of showers of energies `e_gev` (one entry per shower).

    Returns (shower_index, depth_cm, r_cm, phi, spot_e_gev) with one entry per spot;
    depth is measured from the point where the particle enters the medium.
    """
    p = params
    e_gev = np.asarray(e_gev, dtype=np.float64)
    ns = e_gev.size
    n_sp = np.clip(np.rint(p.spots_ref * np.maximum(e_gev, 1e-6) ** 0.876),
                   p.spots_min, p.spots_max).astype(np.int64)
    T, alpha = _longitudinal(e_gev, medium, p, rng)
    beta = (alpha - 1.0) / T
    t0 = rng.exponential(p.photon_t0_x0, ns) if photon else np.zeros(ns)
    t0 = t0 + p.t_shift_x0
    idx = np.repeat(np.arange(ns), n_sp)
    # depth within the shower (X0)
    t = rng.standard_gamma(alpha[idx]) / beta[idx]
    tau = t / T[idx]
    # lateral profile: GFlash homogeneous, E in GeV
    lnE = np.log(np.maximum(e_gev, 1e-3))[idx]
    Z = medium.z
    z1 = 0.0251 + 0.00319 * lnE
    z2 = 0.1162 - 0.000381 * Z
    rc = (z1 + z2 * tau) * p.rc_scale
    k1 = 0.659 - 0.00309 * Z
    k2 = 0.645
    k3 = -2.59
    k4 = 0.3585 + 0.0412 * lnE
    rt = k1 * (np.exp(k3 * (tau - k2)) + np.exp(k4 * (tau - k2))) * p.rt_scale
    p1 = 2.632 - 0.00094 * Z
    p2 = 0.401 + 0.00187 * Z
    p3 = 1.313 - 0.0686 * lnE
    a = (p2 - tau) / p3
    pc = np.clip(p1 * np.exp(a - np.exp(a)) * p.p_scale, 0.0, 1.0)
    u = rng.random((2, idx.size))
    R = np.where(u[0] < pc, rc, rt)
    w = np.minimum(u[1], 0.98)
    lat = np.clip(1.0 + p.lat_log_slope * lnE, 0.5, 1.5)
    r = R * np.sqrt(w / (1.0 - w)) * medium.rm_cm * lateral_scale * lat
    phi = rng.random(idx.size) * (2.0 * np.pi)
    depth = (t + t0[idx]) * medium.x0_cm
    spot_e = (e_gev / n_sp)[idx]
    return idx, depth, r, phi, spot_e


def _perp_basis(dx, dy, dz):
    """Two unit vectors orthogonal to the unit vectors (dx, dy, dz)."""
    # u = d x ez (or d x ex when d is along z)
    along_z = np.abs(dz) > 0.999
    ax = np.where(along_z, 1.0, 0.0)
    az = np.where(along_z, 0.0, 1.0)
    # u = d x a with a = (ax, 0, az)
    ux = dy * az
    uy = dz * ax - dx * az
    uz = -dy * ax
    n = np.sqrt(ux * ux + uy * uy + uz * uz)
    ux, uy, uz = ux / n, uy / n, uz / n
    vx = dy * uz - dz * uy
    vy = dz * ux - dx * uz
    vz = dx * uy - dy * ux
    return (ux, uy, uz), (vx, vy, vz)


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def geometry_arrays(detector: str):
    """Plain numpy copies of what the vectorised code needs from eclreco.Geometry."""
    from eclreco import Geometry
    g = Geometry.get(detector)
    d = {
        "n_cells": int(g.n_cells),
        "n_rings": int(g.n_rings),
        "ring_size": np.asarray(g.ring_size, dtype=np.int64),
        "ring_first_cell": np.asarray(g.ring_first_cell, dtype=np.int64),
        "ring_theta": np.asarray(g.ring_theta, dtype=np.float64),
        "ring_theta_lo": np.asarray(g.ring_theta_lo, dtype=np.float64),
        "ring_theta_hi": np.asarray(g.ring_theta_hi, dtype=np.float64),
        "ring_front_distance": np.asarray(g.ring_front_distance, dtype=np.float64),
        "cell_ring": np.asarray(g.cell_ring, dtype=np.int64),
        "crystal_length": float(g.crystal_length_cm),
    }
    # theta -> ring look-up (ring whose lower edge is at or below the bin start; belle2-ecl)
    lo = d["ring_theta_lo"]
    nb = 1 << 16
    edges = np.arange(nb) * (np.pi / nb)
    d["theta_table"] = np.clip(np.searchsorted(lo, edges, side="right") - 1, 0, lo.size - 1)
    d["ring_theta_lo_next"] = np.append(lo[1:], np.inf)
    return d


def _belle2_cells(px, py, pz, geo):
    """cellId (0 = no crystal) of 3D points for belle2-ecl."""
    rr = np.sqrt(px * px + py * py + pz * pz)
    theta = np.arccos(np.clip(pz / np.maximum(rr, 1e-12), -1.0, 1.0))
    phi = np.mod(np.arctan2(py, px), 2.0 * np.pi)
    lo = geo["ring_theta_lo"]
    tab = geo["theta_table"]
    ringc = tab[(theta * (tab.size / np.pi)).astype(np.int64).clip(0, tab.size - 1)]
    ringc = ringc + (theta >= geo["ring_theta_lo_next"][ringc])
    ok = (theta >= lo[ringc]) & (theta < geo["ring_theta_hi"][ringc])
    d0 = geo["ring_front_distance"][ringc]
    ok &= (rr >= d0) & (rr <= d0 + geo["crystal_length"])
    nsz = geo["ring_size"][ringc]
    iphi = np.minimum((phi * (nsz / (2.0 * np.pi))).astype(np.int64), nsz - 1)
    cell = geo["ring_first_cell"][ringc] + iphi
    return np.where(ok, cell, 0)


def deposit_belle2(e_gev, dirs, rng, params: ShowerParams = DEFAULT_PARAMS):
    """Photon showers from the origin along unit vectors dirs (n, 3).

    Returns (shower_index, cellId, e_gev) per contributing spot (spots outside crystals dropped).
    """
    geo = geometry_arrays("belle2-ecl")
    e_gev = np.asarray(e_gev, dtype=np.float64)
    dirs = np.asarray(dirs, dtype=np.float64).reshape(-1, 3)
    dx, dy, dz = dirs[:, 0], dirs[:, 1], dirs[:, 2]
    # front face where the photon enters: the ring of its own theta (gap: any ring, it is lost)
    theta = np.arccos(np.clip(dz, -1, 1))
    lo = geo["ring_theta_lo"]
    ring = np.clip(np.searchsorted(lo, theta, side="right") - 1, 0, lo.size - 1)
    in_ring = (theta >= lo[ring]) & (theta < geo["ring_theta_hi"][ring])
    s0 = geo["ring_front_distance"][ring]
    # projective air gaps between crystals: distance of the entry point to the crystal edges
    if params.b2_gap_cm > 0:
        half = 0.5 * params.b2_gap_cm
        dth = np.minimum(theta - lo[ring], geo["ring_theta_hi"][ring] - theta) * s0
        nsz = geo["ring_size"][ring]
        fph = np.mod(np.arctan2(dy, dx), 2 * np.pi) * nsz / (2 * np.pi)
        fph = fph - np.floor(fph)
        dph = np.minimum(fph, 1 - fph) * (2 * np.pi / nsz) * s0 * np.sin(theta)
        in_ring &= (dth > half) & (dph > half)
    idx, depth, r, phi, se = shower_spots(e_gev, CSI, rng, params)
    (ux, uy, uz), (vx, vy, vz) = _perp_basis(dx, dy, dz)
    s = s0[idx] + depth
    c, sn = np.cos(phi) * r, np.sin(phi) * r
    px = s * dx[idx] + c * ux[idx] + sn * vx[idx]
    py = s * dy[idx] + c * uy[idx] + sn * vy[idx]
    pz = s * dz[idx] + c * uz[idx] + sn * vz[idx]
    cell = _belle2_cells(px, py, pz, geo)
    # a photon in a theta gap meets no material: it deposits nothing
    keep = (cell > 0) & in_ring[idx]
    return idx[keep], cell[keep], se[keep]


ARRAY_PITCH_CM = 6.0
ARRAY_HALF_CRYSTAL_CM = 2.75
ARRAY_N = 30


def array30_in_gap(xy_cm):
    """True where an entry point (n, 2) on the array30 front plane (cm) lies in the aluminium
    between the crystals (5 mm between 55 mm crystals on a 60 mm pitch)."""
    xy = np.asarray(xy_cm, dtype=np.float64).reshape(-1, 2)
    f = np.abs(np.mod(xy, ARRAY_PITCH_CM) - ARRAY_PITCH_CM / 2)
    return (f[:, 0] > ARRAY_HALF_CRYSTAL_CM) | (f[:, 1] > ARRAY_HALF_CRYSTAL_CM)


def deposit_array30(e_gev, xy_cm, dirs, rng, params: ShowerParams = DEFAULT_PARAMS):
    """Photon showers entering the array30 front plane (z = 0) at xy_cm (n, 2) along dirs (n, 3).

    A photon entering through an aluminium gap showers in an effective Al+CsI medium
    (X0 = params.gap_x0_cm, 6 cm by default; not aluminium's 8.9 cm, since the particles that
    leak sideways develop in CsI) and its spots that fall back in the gap, or behind the 30 cm,
    are lost; a photon entering a crystal showers in CsI and its spots in the gaps are lost.
    """
    e_gev = np.asarray(e_gev, dtype=np.float64)
    xy = np.asarray(xy_cm, dtype=np.float64).reshape(-1, 2)
    dirs = np.asarray(dirs, dtype=np.float64).reshape(-1, 3)
    in_gap = array30_in_gap(xy)
    out_i, out_c, out_e = [], [], []
    gap_med = Medium("Al+CsI", params.gap_x0_cm, params.gap_rm_cm, ALUMINIUM.ec_gev, ALUMINIUM.z)
    for gap, med, lat in ((False, CSI, 1.0), (True, gap_med, params.al_lateral_scale)):
        sel = np.flatnonzero(in_gap == gap)
        if sel.size == 0:
            continue
        idx, depth, r, phi, se = shower_spots(e_gev[sel], med, rng, params, lateral_scale=lat)
        d = dirs[sel]
        dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
        (ux, uy, uz), (vx, vy, vz) = _perp_basis(dx, dy, dz)
        c, sn = np.cos(phi) * r, np.sin(phi) * r
        px = xy[sel, 0][idx] + depth * dx[idx] + c * ux[idx] + sn * vx[idx]
        py = xy[sel, 1][idx] + depth * dy[idx] + c * uy[idx] + sn * vy[idx]
        pz = depth * dz[idx] + c * uz[idx] + sn * vz[idx]
        col = np.floor(px / ARRAY_PITCH_CM + ARRAY_N / 2).astype(np.int64)
        row = np.floor(py / ARRAY_PITCH_CM + ARRAY_N / 2).astype(np.int64)
        gx = np.mod(px, ARRAY_PITCH_CM) - ARRAY_PITCH_CM / 2
        gy = np.mod(py, ARRAY_PITCH_CM) - ARRAY_PITCH_CM / 2
        # distance into the gap from its centre line (gap centre at |g| = 3 cm)
        lost_gap = ((ARRAY_PITCH_CM / 2 - np.abs(gx)) < params.gap_loss_half_cm) | \
                   ((ARRAY_PITCH_CM / 2 - np.abs(gy)) < params.gap_loss_half_cm)
        ok = (~lost_gap) & (pz >= 0) & (pz <= 30.0) & (col >= 0) & (col < ARRAY_N) & \
             (row >= 0) & (row < ARRAY_N)
        out_i.append(sel[idx[ok]])
        out_c.append((1 + ARRAY_N * row + col)[ok])
        out_e.append(se[ok])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(out_i), np.concatenate(out_c), np.concatenate(out_e)


def aggregate(event_of_entry, cell, e, n_events, n_cells, time=None):
    """Sum (event, cell) duplicates; returns offsets, cell, e (and time of the largest deposit).

    Entries come back sorted by event then cellId.
    """
    key = np.asarray(event_of_entry, np.int64) * (n_cells + 1) + np.asarray(cell, np.int64)
    if key.size == 0:
        out = (np.zeros(n_events + 1, np.int64), np.zeros(0, np.int32), np.zeros(0))
        return out + ((np.zeros(0),) if time is not None else ())
    order = np.argsort(key, kind="stable")
    ks = key[order]
    first = np.concatenate(([True], ks[1:] != ks[:-1]))
    starts = np.flatnonzero(first)
    esum = np.add.reduceat(np.asarray(e, np.float64)[order], starts)
    uk = ks[starts]
    ev = uk // (n_cells + 1)
    c = (uk - ev * (n_cells + 1)).astype(np.int32)
    offsets = np.zeros(n_events + 1, np.int64)
    np.cumsum(np.bincount(ev, minlength=n_events), out=offsets[1:])
    if time is None:
        return offsets, c, esum
    # time of the merged deposit: that of its largest contribution
    e_s = np.asarray(e, np.float64)[order]
    t_s = np.asarray(time, np.float64)[order]
    grp = np.cumsum(first) - 1
    emax = np.maximum.reduceat(e_s, starts)
    is_max = e_s == emax[grp]
    pos = np.flatnonzero(is_max)
    firstmax = pos[np.concatenate(([True], grp[pos][1:] != grp[pos][:-1]))]
    return offsets, c, esum, t_s[firstmax]
