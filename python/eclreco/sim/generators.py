"""Event generators: single photons, pi0 -> gamma gamma, and generic multi-photon events.

A generated sample is a flat list of *photons* to be showered (event index, energy, direction,
start point) plus the per-event truth.  Electrons/positrons of the Bhabha-like pairs in `generic`
are simulated as photon showers: same profile, but starting at a photon's first-interaction depth,
on average 9/7 X0 deeper than an electron's shower starts (docs/simulation.md, "Not modelled").
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np

PI0_MASS = 0.134977  # GeV
COS_MIN = np.cos(np.radians(155.1))
COS_MAX = np.cos(np.radians(12.4))
ARRAY30_BEAM_CM = (0.0, 6.0)  # x, y uniform over the cell of col 15, row 15


@dataclass
class Photons:
    event: np.ndarray   # int64
    e: np.ndarray       # GeV
    dir: np.ndarray     # (n, 3) unit vectors
    pos: np.ndarray     # (n, 3) start point, cm (origin for belle2-ecl, front plane for array30)


def _energies(rng, n, energy, energy_range):
    if energy_range is not None:
        lo, hi = float(energy_range[0]), float(energy_range[1])
        return np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    return np.full(n, float(energy))


def _iso_dirs(rng, n, cmin=-1.0, cmax=1.0):
    c = rng.uniform(cmin, cmax, n)
    s = np.sqrt(np.maximum(1 - c * c, 0))
    ph = rng.uniform(0, 2 * np.pi, n)
    return np.stack([s * np.cos(ph), s * np.sin(ph), c], axis=1)


def _primary_dirs(detector, rng, n):
    """Directions and start points of primaries: belle2-ecl from the origin over the ECL
    acceptance; array30 the reference beam (normal incidence, x, y uniform in [0, 6] cm)."""
    if detector == "belle2-ecl":
        return _iso_dirs(rng, n, COS_MIN, COS_MAX), np.zeros((n, 3))
    d = np.zeros((n, 3))
    d[:, 2] = 1.0
    pos = np.zeros((n, 3))
    pos[:, :2] = rng.uniform(*ARRAY30_BEAM_CM, (n, 2))
    return d, pos


def _pi0_decay(rng, p, dirs):
    """Photons (e1, d1, e2, d2) of pi0s of momenta p along dirs: isotropic in the rest frame."""
    n = p.size
    E = np.sqrt(p * p + PI0_MASS ** 2)
    gam = E / PI0_MASS
    bg = p / PI0_MASS
    cs = rng.uniform(-1, 1, n)  # cos theta* w.r.t. the flight direction
    sn = np.sqrt(1 - cs * cs)
    ph = rng.uniform(0, 2 * np.pi, n)
    half = PI0_MASS / 2
    # boosted along flight axis
    out = []
    for sgn in (1.0, -1.0):
        pl = half * (gam * sgn * cs + bg)
        ee = half * (gam + bg * sgn * cs)
        pt = half * sn
        # transverse basis around dirs
        from .showers import _perp_basis
        (ux, uy, uz), (vx, vy, vz) = _perp_basis(dirs[:, 0], dirs[:, 1], dirs[:, 2])
        cp, sp = np.cos(ph) * sgn, np.sin(ph) * sgn
        vec = (pl[:, None] * dirs + (pt * cp)[:, None] * np.stack([ux, uy, uz], 1)
               + (pt * sp)[:, None] * np.stack([vx, vy, vz], 1))
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        out.append((ee, vec))
    return out


def _truth_particle(pdg, e, d, pos):
    return {"pdg": int(pdg), "e": float(e), "theta": math.acos(max(-1.0, min(1.0, float(d[2])))),
            "phi": math.atan2(float(d[1]), float(d[0])), "x": float(pos[0]), "y": float(pos[1]),
            "z": float(pos[2])}


def generate(detector="belle2-ecl", n_events=1000, particle="gamma", energy=1.0,
             energy_range=None, rng=None, seed=None):
    """Generate primaries. Returns (Photons, truth list)."""
    if rng is None:
        rng = np.random.default_rng(seed)
    n = int(n_events)
    if particle == "gamma":
        e = _energies(rng, n, energy, energy_range)
        d, pos = _primary_dirs(detector, rng, n)
        truth = [{"particles": [_truth_particle(22, e[i], d[i], pos[i])]} for i in range(n)]
        return Photons(np.arange(n), e, d, pos), truth
    if particle == "pi0":
        p = _energies(rng, n, energy, energy_range)
        d, pos = _primary_dirs(detector, rng, n)
        (e1, d1), (e2, d2) = _pi0_decay(rng, p, d)
        ph = Photons(np.repeat(np.arange(n), 2), np.stack([e1, e2], 1).ravel(),
                     np.stack([d1, d2], 1).reshape(-1, 3), np.repeat(pos, 2, axis=0))
        E = np.sqrt(p * p + PI0_MASS ** 2)
        truth = [{"particles": [_truth_particle(111, E[i], d[i], pos[i]),
                                _truth_particle(22, e1[i], d1[i], pos[i]),
                                _truth_particle(22, e2[i], d2[i], pos[i])]} for i in range(n)]
        return ph, truth
    if particle == "generic":
        if detector != "belle2-ecl":
            raise ValueError("generic events exist for belle2-ecl only")
        return _generic(rng, n)
    raise ValueError(f"unknown particle {particle!r} (gamma, pi0, generic)")


def _generic(rng, n):
    """2-6 pi0s with exponential momenta (mean 0.4 GeV, > 0.05 GeV), 0-3 single photons
    (exponential, mean 0.25 GeV, > 0.03 GeV); 5 % of events add a back-to-back pair of
    5 GeV photons (e+e- of a Bhabha simulated as photon showers)."""
    npi = rng.integers(2, 7, n)
    ngam = rng.integers(0, 4, n)
    bhabha = rng.random(n) < 0.05
    tp = int(npi.sum())
    p = 0.05 + rng.exponential(0.35, tp)
    # pi0 directions: isotropic; photons outside the acceptance are simply lost
    dpi = _iso_dirs(rng, tp)
    (e1, d1), (e2, d2) = _pi0_decay(rng, p, dpi)
    tg = int(ngam.sum())
    eg = 0.03 + rng.exponential(0.22, tg)
    dg = _iso_dirs(rng, tg)
    nb = int(bhabha.sum())
    eb = rng.normal(5.0, 0.05, nb)
    db = _iso_dirs(rng, nb, COS_MIN + 0.05, COS_MAX - 0.05)
    ev_pi = np.repeat(np.arange(n), npi)
    ev_g = np.repeat(np.arange(n), ngam)
    ev_b = np.flatnonzero(bhabha)
    event = np.concatenate([np.repeat(ev_pi, 2), ev_g, ev_b, ev_b])
    e = np.concatenate([np.stack([e1, e2], 1).ravel(), eg, eb, eb])
    d = np.concatenate([np.stack([d1, d2], 1).reshape(-1, 3), dg, db, -db])
    order = np.argsort(event, kind="stable")
    ph = Photons(event[order], e[order], d[order], np.zeros((event.size, 3)))
    # truth: pi0s (each followed by its photons), then single photons / pair
    truth = [{"particles": []} for _ in range(n)]
    Epi = np.sqrt(p * p + PI0_MASS ** 2)
    def rows(pdg, e_, d_):
        th = np.arccos(np.clip(d_[:, 2], -1, 1)).tolist()
        ph_ = np.arctan2(d_[:, 1], d_[:, 0]).tolist()
        return [{"pdg": pdg, "e": a, "theta": b, "phi": c, "x": 0.0, "y": 0.0, "z": 0.0}
                for a, b, c in zip(np.asarray(e_, float).tolist(), th, ph_)]
    rp, r1, r2 = rows(111, Epi, dpi), rows(22, e1, d1), rows(22, e2, d2)
    for k, i in enumerate(ev_pi.tolist()):
        truth[i]["particles"].extend((rp[k], r1[k], r2[k]))
    rg = rows(22, eg, dg)
    for k, i in enumerate(ev_g.tolist()):
        truth[i]["particles"].append(rg[k])
    rb1, rb2 = rows(11, eb, db), rows(-11, eb, -db)
    for k, i in enumerate(ev_b.tolist()):
        truth[i]["particles"].extend((rb1[k], rb2[k]))
    return ph, truth
