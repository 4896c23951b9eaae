"""Fast simulation of the ECL: parametrised EM showers, electronics, beam-background overlay.

    from eclreco.sim import simulate
    ev = simulate(detector="belle2-ecl", n_events=1000, particle="gamma", energy=1.0, seed=1)

See docs/simulation.md for the models, their tuning against Geant4 and their limits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .background import overlay_background
from .electronics import add_electronics
from .generators import generate
from .showers import (DEFAULT_PARAMS, ShowerParams, aggregate, deposit_array30,
                      deposit_belle2, geometry_arrays)

__all__ = ["SimEvents", "simulate", "add_electronics", "overlay_background", "generate",
           "shower_deposits", "ShowerParams", "DEFAULT_PARAMS"]

DETECTORS = ("belle2-ecl", "array30")


@dataclass
class SimEvents:
    detector: str
    offsets: np.ndarray      # int64 (n_events + 1)
    cell: np.ndarray         # int32 cellId
    amplitude: np.ndarray    # int32 ADC counts (>= 25)
    time_ticks: np.ndarray   # int16, -2048..2047
    quality: np.ndarray      # uint8
    truth: list = field(default_factory=list)
    true_edep_offsets: np.ndarray = None  # signal deposits only (no background), before electronics
    true_edep_cell: np.ndarray = None
    true_edep_gev: np.ndarray = None

    @property
    def n_events(self) -> int:
        return self.offsets.size - 1

    def __len__(self):
        return self.n_events


def shower_deposits(detector, photons, n_events, rng, params: ShowerParams = DEFAULT_PARAMS):
    """Deposits (offsets, cell int32, e_gev) of the photons (generators.Photons) per event."""
    n_cells = geometry_arrays(detector)["n_cells"]
    if photons.e.size == 0:
        return np.zeros(n_events + 1, np.int64), np.zeros(0, np.int32), np.zeros(0)
    if detector == "belle2-ecl":
        si, sc, se = deposit_belle2(photons.e, photons.dir, rng, params)
    else:
        d = photons.dir
        # photons of a pi0 decay may fly away from the array: no deposit
        fwd = d[:, 2] > 1e-6
        sel = np.flatnonzero(fwd)
        si, sc, se = deposit_array30(photons.e[sel], photons.pos[sel, :2], d[sel], rng, params)
        si = sel[si]
    return aggregate(photons.event[si], sc, se, n_events, n_cells)


def simulate(detector="belle2-ecl", n_events=1000, particle="gamma", energy=1.0,
             energy_range=None, background=None, seed=1, rng=None,
             params: ShowerParams = DEFAULT_PARAMS) -> SimEvents:
    """Generate, shower, overlay background and digitise `n_events` events.

    background: level (1.0 = nominal). None means nominal for belle2-ecl and 0 for array30.
    """
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}")
    if rng is None:
        rng = np.random.default_rng(seed)
    if background is None:
        background = 1.0 if detector == "belle2-ecl" else 0.0
    n_events = int(n_events)
    photons, truth = generate(detector, n_events, particle, energy, energy_range, rng=rng)
    off, cell, e = shower_deposits(detector, photons, n_events, rng, params)
    t = np.zeros(e.size)
    if background > 0:
        boff, bcell, be, bt = overlay_background(detector, off, cell, e, t, background, rng)
    else:
        boff, bcell, be, bt = off, cell, e, t
    o, c, a, tt, q = add_electronics(detector, boff, bcell, be, rng, hit_time_ns=bt)
    return SimEvents(detector=detector, offsets=o, cell=c, amplitude=a, time_ticks=tt, quality=q,
                     truth=truth, true_edep_offsets=off, true_edep_cell=cell.astype(np.int32),
                     true_edep_gev=e)
