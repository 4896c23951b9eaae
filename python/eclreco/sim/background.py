"""Parametrised beam-background overlay (NOT a background simulation).

Per event and at level 1.0 (nominal) the overlay adds Poisson-distributed numbers of hits:

- `N_OOT` "out-of-time" hits, time uniform in [-1000, 1000] ns, energy from a broken power law
  dN/dE ~ E^-1.3 on [1, 7] MeV and ~ E^-3.0 on [7, 300] MeV with 26 % of the hits above 7 MeV;
  tuned so that about 180 digits per event have E >= 7 MeV and |t| >= 110 ns (the basf2
  counting) after electronics;
- `N_INTIME` soft in-time hits: E from E^-2 on [1, 5] MeV, t ~ N(0, 30 ns).

Hits are placed in crystals with per-ring weights: barrel 1, rising towards its ends; forward
endcap 3-9 and backward endcap 4-14 per crystal, largest on the rings next to the beam pipe.
All numbers scale linearly with `level`. For array30 the weights are uniform (level 0 by default).
Hits in the same crystal (each other or a signal deposit) add up; the time of the merged
deposit is that of its largest contribution.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .showers import aggregate, geometry_arrays

N_OOT = 776.0
N_INTIME = 60.0
E_LO, E_BREAK, E_HI = 0.001, 0.007, 0.300
GAMMA_LO, GAMMA_HI = 1.3, 3.0
FRAC_ABOVE_BREAK = 0.26
T_WINDOW_NS = 1000.0


@lru_cache(maxsize=None)
def cell_cdf(detector: str):
    geo = geometry_arrays(detector)
    n = geo["n_cells"]
    if detector != "belle2-ecl":
        w = np.ones(n)
    else:
        ring = geo["cell_ring"]
        r = ring.astype(np.float64)
        w = np.ones(n)
        fwd = ring <= 12
        bwd = ring >= 59
        bar = ~(fwd | bwd)
        w[bar] = 1.0 + 1.0 * np.exp(-(r[bar] - 13) / 4.0) + 1.5 * np.exp(-(58 - r[bar]) / 4.0)
        w[fwd] = 3.0 + 6.0 * np.exp(-r[fwd] / 3.0)
        w[bwd] = 4.0 + 10.0 * np.exp(-(68 - r[bwd]) / 2.5)
    c = np.cumsum(w)
    return c / c[-1]


@lru_cache(maxsize=None)
def cell_table(detector: str, size: int = 1 << 20):
    """Look-up table u -> cellId for sampling cells with the weights (resolution 1e-6)."""
    cdf = cell_cdf(detector)
    u = (np.arange(size) + 0.5) / size
    return (np.minimum(np.searchsorted(cdf, u, side="right"), cdf.size - 1) + 1).astype(np.int32)


def _power_law(rng, n, g, lo, hi):
    u = rng.random(n)
    a, b = lo ** (1 - g), hi ** (1 - g)
    return (a + u * (b - a)) ** (1.0 / (1 - g))


def background_hits(detector, n_events, level, rng):
    """(event, cell, e_gev, t_ns) of the overlay hits of n_events events."""
    if level <= 0 or n_events == 0:
        z = np.zeros(0)
        return z.astype(np.int64), z.astype(np.int64), z, z
    n1 = rng.poisson(N_OOT * level, n_events)
    n2 = rng.poisson(N_INTIME * level, n_events)
    t1, t2 = int(n1.sum()), int(n2.sum())
    ev = np.concatenate([np.repeat(np.arange(n_events), n1), np.repeat(np.arange(n_events), n2)])
    hi = rng.random(t1) < FRAC_ABOVE_BREAK
    e1 = np.where(hi, _power_law(rng, t1, GAMMA_HI, E_BREAK, E_HI),
                  _power_law(rng, t1, GAMMA_LO, E_LO, E_BREAK))
    e2 = _power_law(rng, t2, 2.0, E_LO, 0.005)
    tt1 = rng.uniform(-T_WINDOW_NS, T_WINDOW_NS, t1)
    tt2 = rng.normal(0.0, 30.0, t2)
    table = cell_table(detector)
    cell = table[(rng.random(t1 + t2) * table.size).astype(np.int64)]
    return ev, cell, np.concatenate([e1, e2]), np.concatenate([tt1, tt2])


def overlay_background(detector, offsets, cell, edep_gev, time_ns, level, rng):
    """Add the background of `level` to columnar deposits; returns merged
    (offsets, cell, edep_gev, time_ns), sorted by cellId within each event."""
    offsets = np.asarray(offsets, np.int64)
    n_ev = offsets.size - 1
    n_cells = geometry_arrays(detector)["n_cells"]
    cell = np.asarray(cell, np.int64)
    e = np.asarray(edep_gev, np.float64)
    t = np.zeros(e.size) if time_ns is None else np.asarray(time_ns, np.float64)
    ev = np.repeat(np.arange(n_ev), np.diff(offsets))
    bev, bcell, be, bt = background_hits(detector, n_ev, level, rng)
    return aggregate(np.concatenate([ev, bev]), np.concatenate([cell, bcell]),
                     np.concatenate([e, be]), n_ev, n_cells, time=np.concatenate([t, bt]))
