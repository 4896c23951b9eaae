"""Sources for scripts and tests that already hold their events in memory: raw messages
(MessageSource) or a columnar collection (ArraySource)."""
from __future__ import annotations

import numpy as np

from eclreco import _core
from eclreco.framework import RAW, Module
from eclreco.rawdata import DETECTORS, N_CELLS


class MessageSource(Module):
    """Hands a list of raw messages (wire-format envelopes) to the path, batch by batch."""

    def __init__(self, messages=()):
        super().__init__()
        self.messages = list(messages)
        self.pos = 0

    def is_source(self):
        return True

    def makes(self):
        return RAW

    def requires(self):
        return ()

    def next_batch(self, batch, max_events):
        chunk = self.messages[self.pos:self.pos + max_events]
        self.pos += len(chunk)
        _core.append_envelopes(batch, chunk)
        return self.pos < len(self.messages)


# ECLDigits as ECLUnpacker writes them (docs/architecture.md): the dtypes the C++ modules read
DIGIT_DTYPES = {"cell": np.int32, "energy": np.float32, "time": np.float32, "quality": np.uint8,
                "amplitude": np.int32}


def as_digit_column(name: str, values: np.ndarray) -> np.ndarray:
    """`values` as the ECLDigits column `name` (DIGIT_DTYPES): the array itself when it has that dtype, else
    a converted copy (numpy's default int64 / float64 failed every event in the clusterizer); integers
    must fit, floats become float32 (one beyond its range becomes inf: a non_finite_digit)."""
    want = np.dtype(DIGIT_DTYPES[name])
    if values.dtype == want:
        return values
    kind = values.dtype.kind
    if want.kind == "f" and kind in "biuf" or want.kind in "iu" and kind in "biu":
        if want.kind in "iu" and values.size:
            info = np.iinfo(want)
            lo, hi = int(values.min()), int(values.max())
            if lo < info.min or hi > info.max:
                raise ValueError(f"ArraySource: ECLDigits column {name!r} holds {lo if lo < info.min else hi}, "
                                 f"which {want} (as ECLUnpacker writes {name}) cannot hold")
        return values.astype(want)
    raise ValueError(f"ArraySource: ECLDigits column {name!r} holds {values.dtype}, not numbers that convert to "
                     f"{want} (as ECLUnpacker writes {name})")


class ArraySource(Module):
    """Hands one collection held in numpy arrays to the path: event i owns rows
    offsets[i]:offsets[i + 1] of every column; at most max_events events per batch, `repeat`
    passes over the events (evt = pass * n_events + i). For analysis scripts, tests and
    benchmarks that already hold digits or clusters in memory. Columns keep their dtypes, except
    ECLDigits' own (DIGIT_DTYPES: cell int32, energy and time float32, quality uint8, amplitude
    int32, as the unpacker writes them and the C++ modules read them), which are converted once,
    here, when they have another (numpy's default int64 / float64). ECLDigits with `time` and
    `quality` also bring ECLEventInformation (n_out_of_time_digits, counted as ECLUnpacker does).
    ECLDigits are checked as ECLUnpacker checks raw data: an event with a cellId outside the
    detector (invalid_cell), a NaN or infinite energy or time (non_finite_digit) or two digits of
    one cell (duplicate_cell) is rejected with that reason (the clusterizer would only count such
    a digit in its invalid_digits and skip it).
    The arrays are not copied (but for those converted): each batch is read from them when the
    path gets to it, so they must not change while the path runs."""

    def __init__(self, collection: str, offsets, columns: dict, detector: str = "belle2-ecl", repeat: int = 1):
        super().__init__()
        given = np.asarray(offsets)
        # checked as given: the cast truncated float offsets (1.7 read as 1) and wrapped a uint64 above 2**63 - 1
        if given.size and given.dtype.kind not in "iu":
            raise ValueError(f"ArraySource: offsets must be integers (row numbers), not {given.dtype}")
        if given.dtype.kind == "u" and given.size and given.max() > np.iinfo(np.int64).max:
            raise ValueError(f"ArraySource: offsets hold {int(given.max())}, above 2**63 - 1 rows")
        off = given.astype(np.int64, copy=False)
        if off.ndim != 1 or off.size < 1 or off[0] != 0 or np.any(np.diff(off) < 0):
            raise ValueError("ArraySource: offsets must be 1-d, start at 0 and not decrease")
        cols = {k: np.asarray(v) for k, v in columns.items()}
        if collection == "ECLDigits":
            cols = {k: as_digit_column(k, v) if k in DIGIT_DTYPES else v for k, v in cols.items()}
        for k, v in cols.items():
            if v.shape[:1] != (off[-1],):
                raise ValueError(f"ArraySource: column {k!r} has {v.shape[:1]} rows, offsets end at {off[-1]}")
        if detector not in DETECTORS:
            raise ValueError(f"ArraySource: unknown detector {detector!r} (known: {', '.join(DETECTORS)})")
        if repeat < 1:
            raise ValueError("ArraySource: repeat must be >= 1")
        self.collection, self.offsets, self.columns = collection, off, cols
        # ECLDigits with times: also what ECLUnpacker writes beside them (the belle2-ecl CNN reads
        # the event's out-of-time digit count), so that the standard chain runs on array digits
        self.with_oot = collection == "ECLDigits" and "time" in cols and "quality" in cols
        self.detector_code, self.repeat = DETECTORS[detector], repeat
        self.pos = self.passes = 0
        self.n_cells = N_CELLS[detector] if collection == "ECLDigits" else 0

    def is_source(self):
        return True

    def makes(self):
        return (self.collection, "ECLEventInformation") if self.with_oot else (self.collection,)

    def requires(self):
        return ()

    def next_batch(self, batch, max_events):
        n = self.offsets.size - 1
        a, b = self.pos, min(self.pos + max_events, n)
        batch.resize(b - a)
        batch.evt[:] = self.passes * n + np.arange(a, b)
        batch.detector[:] = self.detector_code
        off = self.offsets
        rows = slice(off[a], off[b])
        sub = off[a: b + 1] - off[a]
        cols = {k: v[rows] for k, v in self.columns.items()}
        batch.add_collection(self.collection, sub, cols)
        if self.with_oot:  # counted from the rows of this batch, as they are now (the columns are not copied)
            batch.add_collection("ECLEventInformation", np.arange(b - a + 1, dtype=np.int64),
                                 {"n_out_of_time_digits": _core.count_out_of_time_digits(sub, cols["time"],
                                                                                         cols["quality"])})
        if self.n_cells:  # checked on the rows of this batch, as they are now (as the out-of-time count)
            for i, (reason, detail) in digit_problems(sub, cols, self.n_cells).items():
                batch.reject(i, reason, detail)
        self.pos = b
        if self.pos >= n:
            self.pos, self.passes = 0, self.passes + 1
        return self.passes < self.repeat and n > 0


def digit_problems(offsets: np.ndarray, columns: dict, n_cells: int) -> dict[int, tuple[str, str]]:
    """Events whose ECLDigits ECLUnpacker would never write: {event index: (reason, detail)}, the first
    problem of each event (invalid_cell, non_finite_digit, duplicate_cell, in that order)."""
    n = offsets.size - 1
    event = np.repeat(np.arange(n), np.diff(offsets))
    found: dict[int, tuple[str, str]] = {}

    def note(rows, reason, detail):
        events, first = np.unique(event[rows], return_index=True)
        for i, r in zip(events.tolist(), rows[first].tolist()):
            found.setdefault(i, (reason, detail(r)))

    # a column of another shape is the reading module's error to name (ECLClusterizer's)
    columns = {k: v for k, v in columns.items() if v.ndim == 1}
    cell = columns["cell"].astype(np.int64) if "cell" in columns else None
    if cell is not None:
        note(np.flatnonzero((cell < 1) | (cell > n_cells)), "invalid_cell",
             lambda r: f"digit {r - offsets[event[r]]}: cellId {cell[r]} not in 1..{n_cells}")
    for name in ("energy", "time"):
        v = columns.get(name)
        if v is not None and v.dtype.kind == "f":
            note(np.flatnonzero(~np.isfinite(v)), "non_finite_digit",
                 lambda r, v=v, name=name: f"digit {r - offsets[event[r]]}: {name} {v[r]}")
    if cell is not None and cell.size:
        order = np.lexsort((cell, event))
        same = (event[order][1:] == event[order][:-1]) & (cell[order][1:] == cell[order][:-1])
        note(np.sort(order[1:][same]), "duplicate_cell",
             lambda r: f"digit {r - offsets[event[r]]}: a second digit of cellId {cell[r]}")
    return found
