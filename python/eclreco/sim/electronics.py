"""Electronics of spec/wire-format.md: noise, digitisation, zero suppression, time, quality.

- amplitude [ADC counts] = round(E[GeV] * 20000 + N(0, 5)) on every channel of the detector
  (5 counts = 0.25 MeV noise);
- zero suppression: a channel is read out only if amplitude >= 25 counts (1.25 MeV);
- channels without any deposit pass the threshold with the Gaussian tail probability
  P(N(0,5) >= 24.5) = 4.8e-7 (about 0.004 per belle2-ecl event): their number per event is drawn
  from a binomial, their cells uniformly among the empty channels, their amplitude from the tail;
- time: t = hit time + N(0, sigma_t), sigma_t = sqrt((A/E)^2 + B^2) with A = 200 ns*MeV and
  B = 1 ns (100 ns at 2 MeV, 20 ns at 10 MeV, 1.02 ns at 1 GeV), in ticks of 0.4913 ns, rounded
  and clipped to the 12-bit range -2048..2047;
- quality 0 (good fit) when amplitude >= FIT_THRESHOLD_COUNTS (40 counts = 2 MeV), otherwise 2
  (below fit threshold, time not valid: time field 0). Pure-noise channels get a random time.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtri

from .showers import geometry_arrays

ADC_PER_GEV = 20000.0
NOISE_COUNTS = 5.0
ZS_THRESHOLD_COUNTS = 25
FIT_THRESHOLD_COUNTS = 40
TICK_NS = 0.4913
TIME_A_NS_MEV = 200.0
TIME_B_NS = 1.0
TICK_MIN, TICK_MAX = -2048, 2047

# P(round(noise) >= 25) for a channel without energy
_Z_TAIL = (ZS_THRESHOLD_COUNTS - 0.5) / NOISE_COUNTS
_P_TAIL = 0.5 * math.erfc(_Z_TAIL / math.sqrt(2.0))


def time_sigma_ns(e_mev):
    e = np.maximum(np.asarray(e_mev, dtype=np.float64), 1e-3)
    return np.sqrt((TIME_A_NS_MEV / e) ** 2 + TIME_B_NS ** 2)


def _n_cells(detector: str) -> int:
    return geometry_arrays(detector)["n_cells"]


def add_electronics(detector, offsets, cell, edep_gev, rng, hit_time_ns=None):
    """Digitise per-event deposits (columnar, sorted or not, one entry per cell per event).

    Returns (offsets int64, cell int32, amplitude int32, time_ticks int16, quality uint8),
    sorted by cellId within each event, zero-suppressed.
    """
    n_cells = _n_cells(detector)
    offsets = np.asarray(offsets, dtype=np.int64)
    cell = np.asarray(cell, dtype=np.int64)
    e = np.asarray(edep_gev, dtype=np.float64)
    n_ev = offsets.size - 1
    counts = np.diff(offsets)
    ev = np.repeat(np.arange(n_ev, dtype=np.int64), counts)
    t_hit = np.zeros(e.size) if hit_time_ns is None else np.asarray(hit_time_ns, np.float64)

    amp = np.rint(e * ADC_PER_GEV + rng.standard_normal(e.size) * NOISE_COUNTS)
    sig = time_sigma_ns(amp / ADC_PER_GEV * 1000.0)
    t = t_hit + rng.standard_normal(e.size) * sig

    # pure-noise channels among the channels without a deposit
    n_empty = np.maximum(n_cells - counts, 0)
    n_noise = rng.binomial(n_empty, _P_TAIL)
    tot = int(n_noise.sum())
    if tot:
        nev = np.repeat(np.arange(n_ev, dtype=np.int64), n_noise)
        ncell = rng.integers(1, n_cells + 1, tot)
        # reject cells that already have a deposit (rare), and duplicates
        hit_keys = ev * (n_cells + 1) + cell
        nkeys = nev * (n_cells + 1) + ncell
        sk = hit_keys if hit_keys.size < 2 or np.all(hit_keys[1:] >= hit_keys[:-1]) else np.sort(hit_keys)
        j = np.minimum(np.searchsorted(sk, nkeys), max(sk.size - 1, 0))
        good = ~(sk[j] == nkeys) if sk.size else np.ones(tot, bool)
        _, first = np.unique(nkeys, return_index=True)
        uniq = np.zeros(tot, bool)
        uniq[first] = True
        good &= uniq
        nev, ncell = nev[good], ncell[good]
        u = rng.random(nev.size) * _P_TAIL
        x = -ndtri(np.maximum(u, 1e-300))  # upper tail quantile, >= _Z_TAIL
        namp = np.maximum(np.rint(x * NOISE_COUNTS), ZS_THRESHOLD_COUNTS)
        nt = rng.uniform(TICK_MIN * TICK_NS, TICK_MAX * TICK_NS, nev.size)
        ev = np.concatenate([ev, nev])
        cell = np.concatenate([cell, ncell])
        amp = np.concatenate([amp, namp])
        t = np.concatenate([t, nt])

    keep = amp >= ZS_THRESHOLD_COUNTS
    ev, cell, amp, t = ev[keep], cell[keep], amp[keep], t[keep]
    key = ev * (n_cells + 1) + cell
    if key.size > 1 and np.any(key[1:] < key[:-1]):
        order = np.argsort(key, kind="stable")
        ev, cell, amp, t = ev[order], cell[order], amp[order], t[order]
    out_off = np.zeros(n_ev + 1, np.int64)
    np.cumsum(np.bincount(ev, minlength=n_ev), out=out_off[1:])
    quality = np.where(amp >= FIT_THRESHOLD_COUNTS, 0, 2).astype(np.uint8)
    ticks = np.clip(np.rint(t / TICK_NS), TICK_MIN, TICK_MAX)
    ticks = np.where(quality == 0, ticks, 0).astype(np.int16)
    # pure-noise channels below the fit threshold: time invalid (0) as well, by the rule above
    return (out_off, cell.astype(np.int32), np.minimum(amp, 2**18 - 129).astype(np.int32),
            ticks, quality)
