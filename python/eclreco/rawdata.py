"""Raw event wire format (spec/wire-format.md): encoder, raw files, and the C++ decoders.

The encoder builds the ECL payload words of many events at once with numpy (channel map, block
and shaper headers, hit words), then packs one MessagePack envelope per event::

    msgs = encode_events("belle2-ecl", exp=0, run=1, evt=np.arange(n), offsets=offsets,
                         cell=cell, amplitude=amp, time_ticks=ticks, quality=q)
    write_raw_file("run1.msgpack", msgs)

Decoding is in C++ (``_core``): :func:`decode_envelope` and :func:`unpack_payload` for single
messages (tests, fuzzing), ``_core.append_envelopes(batch, messages)`` for sources that form
batches, and the ``RawFileInput`` / ``ECLUnpacker`` / ``RejectedOutput`` modules.
"""
from __future__ import annotations

import itertools
import os
import zlib
from typing import Any, Iterable, Iterator, Sequence

import msgpack
import numpy as np

from eclreco import _core

FORMAT_VERSION = 1
DETECTORS = {"belle2-ecl": 0, "array30": 1}  # EventBatch.detector codes (ecl::Detector in cpp/ecl/geometry.hpp)
DETECTOR_NAMES = {code: name for name, code in DETECTORS.items()}
N_CELLS = {"belle2-ecl": 8736, "array30": 900}
TICK_NS = 0.4913
ADC_PER_GEV = 20000.0
AMPLITUDE_OFFSET = 128
AMPLITUDE_MIN, AMPLITUDE_MAX = -AMPLITUDE_OFFSET, (1 << 18) - 1 - AMPLITUDE_OFFSET
TICKS_MIN, TICKS_MAX = -2048, 2047

BLOCK_MARKER = 0xEC
SHAPER_MARKER = 0x10


class RawDataError(ValueError):
    """A message that breaks the wire format; ``reason`` is the short code, ``detail`` the text."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _reraise(e: _core.RawDataRejection):
    """The C++ decoders' rejection ('reason: detail') as a RawDataError; their argument errors are not caught."""
    reason, _, detail = str(e).partition(": ")
    raise RawDataError(reason, detail) from None


def decode_envelope(message: bytes) -> dict:
    """Decode one envelope (C++): dict with exp, run, evt, det, detector, time_ns, crc32, ecl, ...,
    and `truth` (the simulation's per-event object, as MessagePack gives it back) when it has one.

    Raises :class:`RawDataError` (a ValueError) with the rejection reason.
    """
    try:
        env = _core.decode_envelope(message)
    except _core.RawDataRejection as e:
        _reraise(e)
    if b"truth" in message:  # the C++ decoder checks it is a map and skips it (the chain never reads it)
        try:
            m = msgpack.unpackb(message, raw=False, strict_map_key=False)
        except (ValueError, msgpack.StackError, TypeError):  # valid, left out: nested deeper than
            return env  # msgpack-python unpacks, or a map key that is an array or a map (unhashable in Python)
        if "truth" in m:
            env["truth"] = m["truth"]
    return env


def envelope_ids(message: bytes) -> dict:
    """{exp, run, evt} of a message that is a valid envelope, {} for any other (as a quarantine record has them:
    the HLT distributor's unread_at_terminate records; RejectedOutput's own read them in C++)."""
    try:
        env = _core.decode_envelope(message)
    except _core.RawDataRejection:
        return {}
    return {k: env[k] for k in ("exp", "run", "evt")}


def unpack_payload(payload: bytes, detector: str = "belle2-ecl", gain=None, t0=None, channel_map=None) -> dict:
    """Unpack one ECL payload (C++): dict of numpy arrays cell, energy, time, quality, amplitude.
    gain, t0: per cellId - 1; channel_map: (n_cells, 3) addresses (default: the spec's linear map).

    Raises :class:`RawDataError` with the rejection reason for a payload that breaks the format, ValueError /
    TypeError naming the argument for an argument that is wrong (gain's shape, an unknown detector)."""
    try:
        return _core.unpack_payload(payload, detector, gain, t0, channel_map)
    except _core.RawDataRejection as e:
        _reraise(e)


def _per_event(value, n: int, name: str, dtype) -> np.ndarray:
    a = np.asarray(value)
    if a.ndim == 0:
        return np.full(n, a, dtype=dtype)
    if a.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have one entry per event ({n}), got shape {a.shape}")
    return a.astype(dtype)


def _per_event_ints(value, n: int, name: str, bits: int) -> list[int]:
    """exp, run or evt of each event as Python ints in 0..2^bits-1 (the spec: exp and run any int
    >= 0, a MessagePack uint reaches 2^64-1; evt < 2^32); numpy's int64 cannot hold them all."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (np.ndarray, list, tuple, range)):
        values = value.tolist() if isinstance(value, np.ndarray) else list(value)
        if len(values) != n:
            raise ValueError(f"{name} must be a scalar or have one entry per event ({n}), got {len(values)}")
    else:
        values = [value] * n
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {type(v).__name__} {v!r}")
        v = int(v)
        if not 0 <= v < 1 << bits:
            raise ValueError(f"{name} must be in 0..2^{bits}-1, got {v}")
        out.append(v)
    return out


def _n_cells(detector: str) -> int:
    """The detector's number of cells; ValueError for a name that is no detector."""
    if detector not in N_CELLS:
        raise ValueError(f"unknown detector '{detector}' (belle2-ecl or array30)")
    return N_CELLS[detector]


def linear_channel_map(detector: str) -> np.ndarray:
    """The spec's channel map: (n_cells, 3) int64 array, row cellId - 1 = (collector, shaper, channel).
    The start for a conditions file that overrides it (e.g. two swapped cables)."""
    return np.stack(_address(np.arange(_n_cells(detector), dtype=np.int64)), axis=1)


def _address_index(collector, shaper, channel):
    """Index of an electronics address, ((collector - 1) * 12 + shaper - 1) * 16 + channel: cellId - 1
    under the linear map (ecl::address_index)."""
    return ((collector - 1) * 12 + shaper - 1) * 16 + channel


def _address(index):
    """(collector, shaper, channel) of an address index (the inverse of _address_index)."""
    return index // 192 + 1, (index % 192) // 16 + 1, index % 16


def _checked_channel_map(detector: str, channel_map) -> np.ndarray:
    m, n_cells = np.asarray(channel_map), _n_cells(detector)
    if m.shape != (n_cells, 3) or m.dtype.kind not in "iu":
        raise ValueError(f"channel_map must be an integer array of shape ({n_cells}, 3) for {detector}, "
                         f"got {m.dtype} {m.shape}")
    m = m.astype(np.int64)
    if (m[:, 0].min() < 1 or m[:, 0].max() > 255 or m[:, 1].min() < 1 or m[:, 1].max() > 12
            or m[:, 2].min() < 0 or m[:, 2].max() > 15):
        raise ValueError("channel_map addresses must be collector 1..255, shaper 1..12, channel 0..15")
    if len(np.unique(_address_index(*m.T))) != len(m):
        raise ValueError("channel_map uses an address for two cells")
    return m


def encode_payloads(detector: str, offsets, cell, amplitude, time_ticks, quality, channel_map=None) -> list[bytes]:
    """ECL payloads (bytes) of many events; digits of event i are [offsets[i], offsets[i+1]).
    channel_map: (n_cells, 3) addresses of the cells (default: the spec's linear map)."""
    n_cells = _n_cells(detector)
    if channel_map is not None:
        channel_map = _checked_channel_map(detector, channel_map)
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise ValueError("offsets must start at 0 and not decrease")
    n_events = len(offsets) - 1
    n = int(offsets[-1])
    cell = np.asarray(cell, dtype=np.int64)
    amplitude = np.asarray(amplitude, dtype=np.int64)
    time_ticks = np.asarray(time_ticks, dtype=np.int64)
    quality = np.asarray(quality, dtype=np.int64)
    for name, a in (("cell", cell), ("amplitude", amplitude), ("time_ticks", time_ticks), ("quality", quality)):
        if a.shape != (n,):
            raise ValueError(f"{name} must have offsets[-1] = {n} entries, got shape {a.shape}")
    if n and (cell.min() < 1 or cell.max() > n_cells):
        raise ValueError(f"cellId outside 1..{n_cells} for {detector}")
    if n and (amplitude.min() < AMPLITUDE_MIN or amplitude.max() > AMPLITUDE_MAX):
        raise ValueError(f"amplitude outside {AMPLITUDE_MIN}..{AMPLITUDE_MAX}")
    if n and (time_ticks.min() < TICKS_MIN or time_ticks.max() > TICKS_MAX):
        raise ValueError(f"time_ticks outside {TICKS_MIN}..{TICKS_MAX}")
    if n and (quality.min() < 0 or quality.max() > 3):
        raise ValueError("quality outside 0..3")

    event = np.repeat(np.arange(n_events, dtype=np.int64), np.diff(offsets))
    # Digits in address order (the index of (collector, shaper, channel); cellId - 1 under the
    # linear map), so that each block and shaper is one contiguous run.
    address = cell - 1 if channel_map is None else _address_index(*channel_map[cell - 1].T)
    order = np.lexsort((address, event))
    address, amplitude, time_ticks, quality, event = (
        a[order] for a in (address, amplitude, time_ticks, quality, event))
    if n > 1 and np.any((event[1:] == event[:-1]) & (address[1:] == address[:-1])):
        raise ValueError("a cell appears twice in an event")

    collector, shaper, channel = _address(address)
    hit = ((quality << 30) | ((time_ticks & 0xFFF) << 18) | (amplitude + AMPLITUDE_OFFSET)).astype(np.uint32)

    # Group starts in the sorted digits: a new block at each (event, collector), a new shaper at
    # each (event, collector, shaper).
    new_block = np.ones(n, dtype=bool)
    new_shaper = np.ones(n, dtype=bool)
    if n > 1:
        same_block = (event[1:] == event[:-1]) & (collector[1:] == collector[:-1])
        new_block[1:] = ~same_block
        new_shaper[1:] = ~(same_block & (shaper[1:] == shaper[:-1]))
    blocks_so_far = np.cumsum(new_block)    # headers up to and including this digit's block
    shapers_so_far = np.cumsum(new_shaper)
    d = np.arange(n, dtype=np.int64)
    pos_hit = d + blocks_so_far + shapers_so_far
    total_words = n + (int(blocks_so_far[-1]) + int(shapers_so_far[-1]) if n else 0)
    words = np.empty(total_words, dtype="<u4")
    words[pos_hit] = hit

    shaper_start = np.flatnonzero(new_shaper)
    shaper_mask = np.bitwise_or.reduceat((1 << channel).astype(np.int64), shaper_start) if n else np.zeros(0, np.int64)
    words[pos_hit[shaper_start] - 1] = ((SHAPER_MARKER << 24) | (shaper[shaper_start] << 16) | shaper_mask).astype(np.uint32)

    block_start = np.flatnonzero(new_block)
    block_end = np.append(block_start[1:], n)
    # block length = its shaper headers + its hits
    shapers_in_block = np.add.reduceat(new_shaper.astype(np.int64), block_start) if n else np.zeros(0, np.int64)
    block_len = shapers_in_block + (block_end - block_start)
    block_pos = pos_hit[block_start] - 2  # the block's first shaper header comes right after it
    words[block_pos] = ((BLOCK_MARKER << 24) | (collector[block_start] << 16) | block_len).astype(np.uint32)

    # Event boundaries in the word array.
    event_words = np.zeros(n_events + 1, dtype=np.int64)
    if n:
        per_event = np.bincount(event, minlength=n_events) + np.bincount(
            event[new_block], minlength=n_events) + np.bincount(event[new_shaper], minlength=n_events)
        event_words[1:] = np.cumsum(per_event)
    raw = words.tobytes()
    return [raw[4 * event_words[k]:4 * event_words[k + 1]] for k in range(n_events)]


def encode_events(detector: str, exp, run, evt, offsets, cell, amplitude, time_ticks, quality,
                  truth: Sequence[Any] | None = None, time_ns=None, crc: bool = True,
                  channel_map=None) -> list[bytes]:
    """Envelopes (MessagePack bytes) of many events of one detector configuration.

    exp, run, evt: scalars or one value per event; offsets: CSR offsets of the digits (event i owns
    digits offsets[i]:offsets[i+1]); cell (cellId), amplitude (ADC counts), time_ticks (0.4913 ns
    ticks) and quality per digit, in any order within an event. truth: optional per-event objects
    (put under the `truth` key); time_ns: optional scalar or per-event trigger times; crc: add the
    `crc32` key; channel_map: the (n_cells, 3) addresses the producer's electronics use (default:
    the spec's linear map).
    """
    payloads = encode_payloads(detector, offsets, cell, amplitude, time_ticks, quality, channel_map)
    n = len(payloads)
    exp = _per_event_ints(exp, n, "exp", 64)
    run = _per_event_ints(run, n, "run", 64)
    evt = _per_event_ints(evt, n, "evt", 32)
    tns = None if time_ns is None else _per_event(time_ns, n, "time_ns", np.int64)
    if truth is not None and len(truth) != n:
        raise ValueError(f"truth must have one entry per event ({n})")
    packer = msgpack.Packer(use_bin_type=True)
    out = []
    for k in range(n):
        env = {"v": FORMAT_VERSION, "exp": exp[k], "run": run[k], "evt": evt[k], "det": detector,
               "ecl": payloads[k]}
        if tns is not None:
            env["time_ns"] = int(tns[k])
        if crc:
            env["crc32"] = zlib.crc32(payloads[k])
        if truth is not None and truth[k] is not None:
            env["truth"] = truth[k]
        out.append(packer.pack(env))
    return out


def write_raw_file(path: str | os.PathLike, messages: Iterable[bytes],
                   unchanged: dict[str, str | None] | None = None, run: str = "write", option: str = "") -> int:
    """Write messages back to back (a raw file); returns the number written. A file is written under a
    temporary name that it takes at the end (paths.StagedOutputs; through a symlink, its target): a write
    that fails or is interrupted (disk full, Ctrl-C in `eclreco simulate`'s gigabytes) leaves no
    half-written raw file, and an existing one as it was. It replaces only what was there when it began: a
    file put there while the messages were written is not written over (paths.OutputsChangedError naming it
    and the temporary file, which stays). A pipe or a device is written directly.
    unchanged: paths.output_states([os.path.realpath(path)]) taken when the `run` that makes the messages began
    (`eclreco simulate`'s start, before its minutes of simulation), so that a file put there meanwhile is not
    written over either; by default they are taken as the write begins. run names that run in the error, option
    the command's option that gave path (`-o 'PATH': ...`, as every command's refusal; the bare path without one)."""
    import stat

    from eclreco.paths import OutputsChangedError, StagedOutputs, output_states

    direct = os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode)
    target = "" if direct else os.path.realpath(path)
    if unchanged is None:
        unchanged = output_states([target] if target else [])
    n = 0
    with StagedOutputs() as staged:
        with open(path if direct else staged.path(target), "wb") as f:
            for m in messages:
                f.write(m)
                n += 1
        try:
            staged.publish(unchanged, run)
        except OutputsChangedError as err:
            where = f"{option} {os.fspath(path)!r}" if option else os.fspath(path)
            raise OutputsChangedError(f"{where}: {err}") from None
    return n


def split_stream(data: bytes) -> list[bytes]:
    """Split a MessagePack stream (a raw file's bytes) into the bytes of its objects, framed by the
    C++ decoder exactly as RawFileInput frames them: a message that is not a valid envelope but a
    whole MessagePack object is one message (the reconstruction rejects it). Python's msgpack
    framed differently (it refused a valid envelope whose truth nests 1024 levels deep). Bytes
    that cannot be framed raise ValueError naming their byte offset (RawFileInput stops there)."""
    if not isinstance(data, bytes):
        data = bytes(data)
    offsets, error = _core.frame_stream(data)
    if error is not None:
        at, reason, detail = error
        raise ValueError(f"{reason} at byte {at} of {len(data)}: no MessagePack object can be framed from there "
                         f"(the object starting there: {detail}; {len(offsets) - 1} message(s) before it)")
    bounds = offsets.tolist()
    return [data[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class RawFileError(ValueError):
    """Bytes of a raw file that cannot be framed: the file, the reason (not_msgpack, truncated), the byte
    offset where framing stopped and the number of messages framed before it."""

    def __init__(self, path, reason: str, at: int, size: int, detail: str, before: int):
        super().__init__(f"raw file '{os.fspath(path)}': {reason} at byte {at} of {size}: no MessagePack object "
                         f"can be framed from there (the object starting there: {detail}; {before} message(s) "
                         "before it)")
        self.reason, self.at, self.before = reason, at, before


READ_WINDOW = 1 << 20  # bytes read at a time, as RawFileInput (kWindow)
MAX_FRAME = 256 << 20  # the most read to frame one message, as RawFileInput (kMaxFrame)


def iter_raw_file(path: str | os.PathLike, window: int = READ_WINDOW) -> Iterator[bytes]:
    """The messages of a raw file one after the other, framed as RawFileInput frames them (the C++
    decoder, _core.frame_stream), reading `window` bytes at a time: memory is a window and the message
    being framed (at most MAX_FRAME), not the file. Bytes that cannot be framed raise RawFileError (a
    ValueError) when the iteration reaches them, after the messages before them."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf, base, n, eof, need = b"", 0, 0, False, window  # base: the file offset of buf[0]
        while True:
            while not eof and len(buf) < need:
                chunk = f.read(need - len(buf))
                eof = not chunk
                buf += chunk
            if not buf:
                return
            offsets, error = _core.frame_stream(buf)
            bounds = offsets.tolist()
            for a, b in zip(bounds[:-1], bounds[1:]):
                yield buf[a:b]
            n += len(bounds) - 1
            pos = bounds[-1]
            buf, base = buf[pos:], base + pos
            if error is None:
                need = window
                continue
            # an object cut by the window, not by the file, is read on (the window doubles) up to MAX_FRAME
            if eof or error[1] != "truncated" or len(buf) >= MAX_FRAME:
                raise RawFileError(path, error[1], base, max(size, base + len(buf)), error[2], n)
            need = window if pos else min(2 * len(buf), MAX_FRAME)


class RawFile:
    """A raw file as the iterable of its messages: each iteration reads the file anew, one message at a
    time (iter_raw_file), so that a replay of many passes holds a message, not the file."""

    def __init__(self, path: str | os.PathLike, window: int = READ_WINDOW):
        self.path, self.window = path, window

    def __iter__(self) -> Iterator[bytes]:
        return iter_raw_file(self.path, self.window)


def count_messages(path: str | os.PathLike, limit: int | None = None) -> int:
    """The number of messages of a raw file, counting stopped at `limit` (None: the whole file), framed one at a
    time (iter_raw_file): memory is a read window, not the file, and whether a file holds N events is known
    after N of them. RawFileError as iter_raw_file, for bytes before the limit."""
    return sum(1 for _ in itertools.islice(iter_raw_file(path), limit))


ENVELOPE_KEYS = ("v", "exp", "run", "evt", "det", "ecl")  # the required keys (spec/wire-format.md)
# The required keys that only an envelope has: a quarantine record (RejectedOutput) has exp, run and evt too,
# wherever they could be read, i.e. for almost every rejected event.
ENVELOPE_OWN_KEYS = ("v", "det", "ecl")


def not_a_raw_file(path: str | os.PathLike) -> str:
    """Why `path` is not a raw file of the wire format, judged by its first message ('' when it may be
    one): no MessagePack object can be framed there, it is no map, or a map with none of an envelope's
    own keys v, det and ecl (a quarantine file, whose records also hold exp, run and evt; a stream of
    other maps). Read message by message, any bytes are some
    MessagePack (each ASCII byte is an int): `hello` was replayed as 6 events. A raw file whose first
    message is an envelope, valid or not, is one; later messages are the reconstruction's to reject."""
    try:
        first = next(iter(RawFile(path)), None)
    except RawFileError as err:
        return f"not a raw file of the wire format: no MessagePack object at its start ({err.reason})"
    if first is None:
        return "an empty file, not a raw file (no event in it)"
    try:
        _core.decode_envelope(first)
        return ""
    except _core.RawDataRejection as err:
        reason, _, detail = str(err).partition(": ")
    if reason == "not_a_map":
        return f"not a raw file of the wire format: its first message is no envelope ({detail})"
    missing = detail.rpartition(": ")[2].split(", ") if reason == "missing_key" else ()
    if all(k in missing for k in ENVELOPE_OWN_KEYS):
        return ("not a raw file of the wire format: its first message is a map with none of an envelope's keys "
                f"{', '.join(ENVELOPE_OWN_KEYS)}; a quarantine file's messages are written out by "
                "`eclreco quarantine FILE --extract OUT`")
    return ""


def read_raw_file(path: str | os.PathLike) -> list[bytes]:
    """The messages of a raw file (bytes of each envelope, as on the wire), framed as RawFileInput
    frames them; RawFileError (a ValueError) naming the file and the byte offset of bytes that cannot be
    framed. The whole file in memory: iter_raw_file reads one message at a time."""
    return list(iter_raw_file(path))


def conditions_payload(detector: str, gain=None, t0=None, channel_map=None, iov=None) -> dict:
    """One conditions payload for ECLUnpacker(conditions=...): per-cell gain and t0 (cellId - 1),
    the channel map ((n_cells, 3) addresses), the interval of validity [exp_low, run_low,
    exp_high, run_high] (-1: open); None: the spec's default (for iov: all runs)."""
    _n_cells(detector)  # an unknown name is refused here, not first by the unpacker at initialize
    doc: dict[str, Any] = {"detector": detector}
    if gain is not None:
        doc["gain"] = [float(x) for x in np.asarray(gain, dtype=np.float64)]
    if t0 is not None:
        doc["t0"] = [float(x) for x in np.asarray(t0, dtype=np.float64)]
    if channel_map is not None:
        doc["channel_map"] = _checked_channel_map(detector, channel_map).tolist()
    if iov is not None:
        if len(iov) != 4 or not all(
                isinstance(b, (int, np.integer)) and not isinstance(b, bool) and -1 <= b <= 1 << 53 for b in iov):
            raise ValueError(f"iov must be [exp_low, run_low, exp_high, run_high], ints -1..2^53, got {iov!r}")
        doc["iov"] = [int(b) for b in iov]
    return doc


def write_conditions(path: str | os.PathLike, detector: str | None = None, gain=None, t0=None, channel_map=None,
                     iov=None, *, payloads: Sequence[dict] | None = None) -> None:
    """Write a conditions file for ECLUnpacker(conditions=path): one payload (the arguments of
    conditions_payload), or several (payloads=[conditions_payload(...), ...], e.g. per run range)."""
    import json

    if payloads is None:
        if detector is None:
            raise ValueError("write_conditions needs a detector, or payloads=[...]")
        doc: Any = conditions_payload(detector, gain, t0, channel_map, iov)
    else:
        if detector is not None or any(a is not None for a in (gain, t0, channel_map, iov)):
            raise ValueError("write_conditions takes either one payload's arguments or payloads=[...], not both")
        doc = list(payloads)
    with open(path, "w") as f:
        json.dump(doc, f)


def calibrate(cell, amplitude, time_ticks, gain=None, t0=None) -> tuple[np.ndarray, np.ndarray]:
    """Reference calibration, bit-identical to ECLUnpacker: (energy, time) as float32.

    energy = amplitude * (gain / 20000), time = ticks * 0.4913 - t0, in float64 then float32.
    """
    cell = np.asarray(cell, dtype=np.int64)
    g = 1.0 if gain is None else np.asarray(gain, dtype=np.float64)[cell - 1]
    t = 0.0 if t0 is None else np.asarray(t0, dtype=np.float64)[cell - 1]
    energy = (np.asarray(amplitude, dtype=np.float64) * (g / ADC_PER_GEV)).astype(np.float32)
    time = (np.asarray(time_ticks, dtype=np.float64) * TICK_NS - t).astype(np.float32)
    return energy, time
