"""An independent producer and reference decoders of the raw wire format, written from
spec/wire-format.md alone: MessagePack by hand (no msgpack package, no eclreco.rawdata), every
int in any width the caller picks. The tests hold eclreco's decoders against them; they are the
"other DAQ producers" of the spec, which write the format from that page only."""
import struct
import zlib

# ---- MessagePack, by hand ------------------------------------------------------------------

_INT = {"u8": (0xcc, ">B"), "u16": (0xcd, ">H"), "u32": (0xce, ">I"), "u64": (0xcf, ">Q"),
        "i8": (0xd0, ">b"), "i16": (0xd1, ">h"), "i32": (0xd2, ">i"), "i64": (0xd3, ">q")}
INT_RANGES = {"u8": (0, 2**8 - 1), "u16": (0, 2**16 - 1), "u32": (0, 2**32 - 1), "u64": (0, 2**64 - 1),
              "i8": (-2**7, 2**7 - 1), "i16": (-2**15, 2**15 - 1), "i32": (-2**31, 2**31 - 1),
              "i64": (-2**63, 2**63 - 1), "fix": (-32, 127)}


def mp_int(v: int, fmt: str | None = None) -> bytes:
    """A MessagePack int; fmt forces a format: fix, u8..u64, i8..i64 (default: the smallest)."""
    if fmt is None:
        fmt = next(f for f in ("fix", "u8", "u16", "u32", "u64", "i8", "i16", "i32", "i64")
                   if INT_RANGES[f][0] <= v <= INT_RANGES[f][1])
    if fmt == "fix":
        assert -32 <= v <= 127
        return bytes([v & 0xff])
    code, layout = _INT[fmt]
    return bytes([code]) + struct.pack(layout, v)


def mp_str(s, fmt: str | None = None) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    n = len(b)
    fmt = fmt or ("fix" if n < 32 else "s8" if n < 256 else "s16" if n < 65536 else "s32")
    if fmt == "fix":
        assert n < 32
        return bytes([0xa0 | n]) + b
    code, layout = {"s8": (0xd9, ">B"), "s16": (0xda, ">H"), "s32": (0xdb, ">I")}[fmt]
    return bytes([code]) + struct.pack(layout, n) + b


def mp_bin(b: bytes, fmt: str | None = None) -> bytes:
    n = len(b)
    fmt = fmt or ("b8" if n < 256 else "b16" if n < 65536 else "b32")
    code, layout = {"b8": (0xc4, ">B"), "b16": (0xc5, ">H"), "b32": (0xc6, ">I")}[fmt]
    return bytes([code]) + struct.pack(layout, n) + b


def mp_map(pairs, fmt: str | None = None) -> bytes:
    """pairs: (key, encoded value); a str key is encoded as a fixstr, bytes are taken as encoded."""
    n = len(pairs)
    fmt = fmt or ("fix" if n < 16 else "m16")
    if fmt == "fix":
        assert n < 16
        head = bytes([0x80 | n])
    else:
        head = b"\xde" + struct.pack(">H", n) if fmt == "m16" else b"\xdf" + struct.pack(">I", n)
    return head + b"".join((mp_str(k) if isinstance(k, str) else k) + v for k, v in pairs)


class Encoded(bytes):
    """A value already encoded as MessagePack (envelope() takes it as it is)."""


def envelope(payload, v=1, exp=0, run=1, evt=0, det="belle2-ecl", crc=False, time_ns=None, extra=()) -> bytes:
    """An envelope; a field given as int/str/bytes is encoded in the default format, one given as
    Encoded is written as it is. crc: False (none), True (the right one) or an Encoded value."""
    def enc(x, default):
        return x if isinstance(x, Encoded) else default(x)
    pairs = [("v", enc(v, mp_int)), ("exp", enc(exp, mp_int)), ("run", enc(run, mp_int)), ("evt", enc(evt, mp_int)),
             ("det", enc(det, mp_str)), ("ecl", enc(payload, mp_bin))]
    if crc is True:
        pairs.append(("crc32", mp_int(zlib.crc32(payload))))
    elif crc is not False:
        pairs.append(("crc32", crc))
    if time_ns is not None:
        pairs.append(("time_ns", enc(time_ns, mp_int)))
    return mp_map(pairs + list(extra))


# ---- ECL payload ---------------------------------------------------------------------------

def words(*ws) -> bytes:
    return b"".join(struct.pack("<I", w) for w in ws)


def block(collector: int, length: int) -> int:
    return (0xEC << 24) | (collector << 16) | length


def shaper(sid: int, mask: int) -> int:
    return (0x10 << 24) | (sid << 16) | mask


def hit(quality: int, ticks: int, amplitude: int) -> int:
    return (quality << 30) | ((ticks & 0xFFF) << 18) | (amplitude + 128)


def payload_of(hits: dict) -> bytes:
    """A payload of {cellId: hit word} under the spec's linear map, blocks and shapers ascending."""
    tree: dict = {}
    for c, w in hits.items():
        i = c - 1
        tree.setdefault(i // 192 + 1, {}).setdefault((i % 192) // 16 + 1, {})[i % 16] = w
    out = []
    for coll in sorted(tree):
        body = []
        for sid in sorted(tree[coll]):
            chans = tree[coll][sid]
            body += [shaper(sid, sum(1 << ch for ch in chans))] + [chans[ch] for ch in sorted(chans)]
        out += [block(coll, len(body))] + body
    return words(*out)


def reference_unpack(payload: bytes, n_cells: int):
    """The spec's payload rules, read sentence by sentence: sorted [(cellId, quality, ticks,
    amplitude)], or the name of the first rule broken (eclreco's reason codes)."""
    if len(payload) % 4:
        return "payload_not_words"
    w = struct.unpack(f"<{len(payload) // 4}I", payload)
    i, collectors, out = 0, set(), []
    while i < len(w):
        if w[i] >> 24 != 0xEC:
            return "bad_block_marker"
        coll, length = (w[i] >> 16) & 0xff, w[i] & 0xffff
        if coll == 0:
            return "bad_collector_id"
        if i + 1 + length > len(w):
            return "block_overrun"
        if coll in collectors:
            return "duplicate_collector"
        collectors.add(coll)
        end, i, shapers = i + 1 + length, i + 1, set()
        while i < end:
            if w[i] >> 24 != 0x10:
                return "bad_shaper_marker"
            sid, mask = (w[i] >> 16) & 0xff, w[i] & 0xffff
            if not 1 <= sid <= 12:
                return "bad_shaper_id"
            if sid in shapers:
                return "duplicate_shaper"
            shapers.add(sid)
            channels = [ch for ch in range(16) if mask >> ch & 1]
            if i + 1 + len(channels) > end:
                return "missing_hit_words"
            i += 1
            for ch in channels:
                cell = (coll - 1) * 192 + (sid - 1) * 16 + ch + 1
                if cell > n_cells:
                    return "unmapped_channel"
                ticks = (w[i] >> 18) & 0xfff
                out.append((cell, w[i] >> 30, ticks - 4096 if ticks >= 2048 else ticks, (w[i] & 0x3ffff) - 128))
                i += 1
    return sorted(out)
