"""SimulationInput: the embedded default source, events simulated on the fly and digitised into
raw envelopes of the wire format, so that the chain downstream sees exactly what the DAQ sends."""
from __future__ import annotations

from eclreco import Module, _core
from eclreco.framework import RAW


class SimulationInput(Module):
    """Simulates events on the fly (fast shower simulation + electronics) as raw envelopes."""

    def __init__(self):
        super().__init__()
        self.add_param("events", 10000, "number of events to generate")
        self.add_param("detector", "belle2-ecl", "detector configuration: belle2-ecl or array30")
        self.add_param("particle", "generic", "event type: gamma, pi0 or generic (belle2-ecl only)")
        self.add_param("energy", 1.0, "particle energy in GeV (gamma, pi0) when energy_min/max are 0")
        self.add_param("energy_min", 0.0, "lower end of a log-uniform energy range in GeV (0: fixed energy)")
        self.add_param("energy_max", 0.0, "upper end of the energy range in GeV")
        self.add_param("background", -1.0, "beam-background level (1.0 = nominal; -1: the detector's default, as "
                       "eclreco.sim.simulate: 1.0 for belle2-ecl, 0 for array30)")
        self.add_param("seed", 1, "random seed")
        self.add_param("exp", 0, "experiment number")
        self.add_param("run", 1, "run number")
        self.add_param("chunk", 2000, "events simulated per call of the simulation")
        self._pending: list[bytes] = []
        self._generated = 0

    def is_source(self):
        return True

    def makes(self):
        return RAW

    def requires(self):
        return ()

    def initialize(self):
        if self.param("detector") not in ("belle2-ecl", "array30"):
            raise ValueError(f"SimulationInput: unknown detector {self.param('detector')!r}")
        if self.param("particle") not in ("gamma", "pi0", "generic"):
            raise ValueError(f"SimulationInput: unknown particle {self.param('particle')!r}")
        if self.param("particle") == "generic" and self.param("detector") != "belle2-ecl":
            # else every module started (outputs created their files) and the first batch failed
            raise ValueError("SimulationInput: generic events exist for belle2-ecl only: particle gamma or pi0 for "
                             f"{self.param('detector')}")
        lo, hi = self.param("energy_min"), self.param("energy_max")
        checks = [(self.param("events") >= 0, "events must be >= 0"),
                  (self.param("chunk") >= 1, "chunk must be >= 1"),
                  (0 < self.param("energy") < 1e3, "energy must be in (0, 1000) GeV"),
                  (hi == 0 or 0 < lo < hi < 1e3, "energy_min and energy_max: 0 < energy_min < energy_max < 1000 GeV "
                                                 "(or both 0)"),
                  (0 <= self.param("background") <= 100 or self.param("background") == -1,
                   "background must be in 0..100 (1 = nominal), or -1 (the detector's default)"),
                  (self.param("seed") >= 0, "seed must be >= 0"),
                  (self.param("exp") >= 0 and self.param("run") >= 0, "exp and run must be >= 0")]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"SimulationInput: {what}")
        self._pending, self._generated = [], 0

    def _simulate_chunk(self):
        from eclreco.rawdata import encode_events
        from eclreco.sim import simulate

        n = min(self.param("chunk"), self.param("events") - self._generated)
        lo, hi = self.param("energy_min"), self.param("energy_max")
        ev = simulate(detector=self.param("detector"), n_events=n, particle=self.param("particle"),
                      energy=self.param("energy"), energy_range=(lo, hi) if hi > 0 else None,
                      background=None if self.param("background") == -1 else self.param("background"),
                      seed=self.param("seed") * 1_000_003 + self._generated)
        evt = list(range(self._generated, self._generated + n))
        self._pending = encode_events(self.param("detector"), self.param("exp"), self.param("run"), evt,
                                      ev.offsets, ev.cell, ev.amplitude, ev.time_ticks, ev.quality,
                                      truth=ev.truth)
        self._generated += n

    def next_batch(self, batch, max_events):
        if not self._pending and self._generated < self.param("events"):
            self._simulate_chunk()
        take, self._pending = self._pending[:max_events], self._pending[max_events:]
        _core.append_envelopes(batch, take)
        return bool(self._pending) or self._generated < self.param("events")
