"""Helpers shared by the raw data tests: random digits, hand-made payload words, the
MessageSource (eclreco.sources) and a module collecting what reaches the end of a path."""
import struct

import numpy as np

import eclreco
from eclreco.sources import MessageSource  # noqa: F401  (re-exported for the tests)
from eclreco import rawdata


def random_digits(rng, detector, n_events, max_digits=300):
    n_cells = rawdata.N_CELLS[detector]
    counts = rng.integers(0, max_digits + 1, n_events)
    counts[: min(3, n_events)] = [0, 1, n_cells if max_digits >= n_cells else max_digits][: min(3, n_events)]
    cells = [rng.choice(n_cells, size=int(c), replace=False) + 1 for c in counts]
    offsets = np.zeros(n_events + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    n = int(offsets[-1])
    cell = np.concatenate(cells).astype(np.int64) if n else np.zeros(0, np.int64)
    return {
        "offsets": offsets,
        "cell": cell,
        "amplitude": rng.integers(25, (1 << 18) - 1 - 128, n, endpoint=True),
        "time_ticks": rng.integers(-2048, 2047, n, endpoint=True),
        "quality": rng.integers(0, 3, n, endpoint=True),
    }


def two_digit_events(n, run=1, amplitude=5000):
    """n array30 envelopes (exp 0, evt 0..n-1) of two in-time digits each, cells 100 and 101: a cluster
    per event."""
    offsets = np.arange(n + 1) * 2
    cells = np.tile([100, 101], n)
    zeros = np.zeros(cells.size, np.int64)
    return rawdata.encode_events("array30", 0, run, np.arange(n), offsets, cells, np.full(cells.size, amplitude),
                                 zeros, zeros)


def n_out_of_time(time, quality):
    """Digits with a valid time (quality 0) outside +-125 ns: ECLEventInformation.n_out_of_time_digits."""
    return int(np.count_nonzero((np.asarray(quality) == 0) & (np.abs(time) > 125.0)))


class Collect(eclreco.Module):
    """Keeps (evt, rejected, reason, digits dict, ECLEventInformation.n_out_of_time_digits) of every
    event that reaches it, in order."""

    def __init__(self):
        super().__init__()
        self.events = []

    def ordered(self):
        return True

    def event(self, batch):
        rej = batch.rejections()
        d = batch["ECLDigits"] if "ECLDigits" in batch else None
        info = batch["ECLEventInformation"] if "ECLEventInformation" in batch else None
        for i in range(len(batch)):
            digits = None
            if d is not None:
                a, b = d.offsets[i], d.offsets[i + 1]
                digits = {k: np.array(d[k][a:b]) for k in d.columns()}
            self.events.append({
                "evt": int(batch.evt[i]), "exp": int(batch.exp[i]), "run": int(batch.run[i]),
                "detector": int(batch.detector[i]), "time_ns": int(batch.time_ns[i]),
                "rejected": bool(batch.error_flags[i] & eclreco.ERROR_REJECTED),
                "reason": rej[i][0] if i in rej else None, "digits": digits,
                "n_out_of_time": None if info is None else int(info["n_out_of_time_digits"][i]),
            })


def run_path(source, unpack=True, batch_size=64, threads=1, **unpacker_params):
    path = eclreco.create_path()
    path.add_module(source)
    if unpack:
        path.add_module("ECLUnpacker", **unpacker_params)
    col = Collect()
    path.add_module(col)
    eclreco.process(path, batch_size=batch_size, threads=threads, install_signal_handlers=False)
    return col.events, eclreco.statistics.summary()


def words(*ws):
    """Little-endian payload bytes of 32-bit words."""
    return struct.pack(f"<{len(ws)}I", *ws)


def block(collector, length):
    return (0xEC << 24) | (collector << 16) | length


def shaper(sid, mask):
    return (0x10 << 24) | (sid << 16) | mask


def hit(amplitude, ticks=0, quality=0):
    return (quality << 30) | ((ticks & 0xFFF) << 18) | (amplitude + 128)
