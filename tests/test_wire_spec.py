"""eclreco against spec/wire-format.md as another producer reads it: every boundary value of every
envelope field and payload word through a real path (MessageSource -> ECLUnpacker), and random
envelopes and payloads decoded by eclreco and by reference decoders written from the spec alone
(tests/_spec_producer.py). Each event is processed with the right values or rejected with its
reason, counted."""
import random
import struct
import zlib

import msgpack
import numpy as np
import pytest

from eclreco import rawdata
from _raw_helpers import MessageSource, run_path
from _spec_producer import (INT_RANGES, Encoded, block, envelope, hit, mp_bin, mp_int, mp_map, mp_str, payload_of,
                            reference_unpack, shaper, words)

P = words(block(1, 2), shaper(1, 1), hit(0, 0, 100))
BASE = [("v", mp_int(1)), ("exp", mp_int(0)), ("run", mp_int(0)), ("evt", mp_int(0)), ("det", mp_str("array30")),
        ("ecl", mp_bin(b""))]


def E(b: bytes) -> Encoded:
    return Encoded(b)


def largest_belle2_event():
    """Every crystal hit, every field value spread over its range, and an empty block of each of
    collectors 47..255 holding all 12 shapers with empty masks: the largest payload the spec allows
    (no word could be added without breaking a rule)."""
    cells = range(1, 8737)
    fields = {c: (c % 4, c % 4096 - 2048, (c * 37) % 2**18 - 128) for c in cells}
    extra = [w for coll in range(47, 256) for w in [block(coll, 12)] + [shaper(s, 0) for s in range(1, 13)]]
    return payload_of({c: hit(*fields[c]) for c in cells}) + words(*extra), fields


def cases():
    """(name, message, reason or None for a valid event)."""
    c = []
    for f in ("fix", "u8", "u16", "u32", "u64", "i8", "i16", "i32", "i64"):
        c += [(f"v=1 as {f}", envelope(P, v=E(mp_int(1, f))), None)]
    c += [("v=0", envelope(P, v=0), "bad_version"), ("v=2", envelope(P, v=2), "bad_version"),
          ("v=-1", envelope(P, v=-1), "bad_version"), ("v='1'", envelope(P, v=E(mp_str("1"))), "wrong_type")]
    for k in ("exp", "run"):
        c += [(f"{k}=2^64-1", envelope(P, **{k: 2**64 - 1}), None), (f"{k}=0", envelope(P, **{k: 0}), None),
              (f"{k}=-1", envelope(P, **{k: -1}), "out_of_range"),
              (f"{k}=-2^63", envelope(P, **{k: -2**63}), "out_of_range"),
              (f"{k}=1.0", envelope(P, **{k: E(b"\xcb" + struct.pack(">d", 1.0))}), "wrong_type")]
    c += [("evt=2^32-1", envelope(P, evt=2**32 - 1), None), ("evt=2^32", envelope(P, evt=2**32), "out_of_range"),
          ("evt=-1", envelope(P, evt=-1), "out_of_range"), ("evt=5 as u64", envelope(P, evt=E(mp_int(5, "u64"))), None)]
    c += [("det=array30", envelope(P, det="array30"), None),
          ("det as str8", envelope(P, det=E(mp_str("belle2-ecl", "s8"))), None),
          ("det as str32", envelope(P, det=E(mp_str("array30", "s32"))), None),
          ("det=Belle2-ECL", envelope(P, det="Belle2-ECL"), "unknown_detector"),
          ("det with a NUL", envelope(P, det="belle2-ecl\0"), "unknown_detector"),
          ("det=''", envelope(P, det=""), "unknown_detector"),
          ("det as bin", envelope(P, det=E(mp_bin(b"belle2-ecl"))), "wrong_type")]
    c += [("ecl as bin16", envelope(E(mp_bin(P, "b16"))), None), ("ecl as bin32", envelope(E(mp_bin(P, "b32"))), None),
          ("ecl as str", envelope(E(mp_str(P))), "wrong_type"), ("ecl empty", envelope(b""), None),
          ("ecl nil", envelope(E(b"\xc0")), "wrong_type")]
    c += [("crc32 right", envelope(P, crc=True), None),
          ("crc32 one bit off", envelope(P, crc=E(mp_int(zlib.crc32(P) ^ 1))), "crc_mismatch"),
          ("crc32 as u64", envelope(P, crc=E(mp_int(zlib.crc32(P), "u64"))), None),
          ("crc32=2^32", envelope(P, crc=E(mp_int(2**32))), "out_of_range"),
          ("crc32=-1", envelope(P, crc=E(mp_int(-1))), "out_of_range"),
          ("crc32=0 of an empty payload", envelope(b"", crc=E(mp_int(0))), None),
          ("crc32 nil", envelope(P, crc=E(b"\xc0")), "wrong_type")]
    c += [("time_ns=-2^63", envelope(P, time_ns=-2**63), None), ("time_ns=2^63-1", envelope(P, time_ns=2**63 - 1), None),
          ("time_ns=2^63", envelope(P, time_ns=2**63), "out_of_range"),
          ("time_ns float", envelope(P, time_ns=E(b"\xcb" + struct.pack(">d", 1.0))), "wrong_type")]
    c += [("truth map", envelope(P, extra=[("truth", mp_map([("e", mp_int(1))]))]), None),
          ("truth array", envelope(P, extra=[("truth", b"\x90")]), "wrong_type"),
          ("unknown key nil", envelope(P, extra=[("zz", b"\xc0")]), None),
          ("unknown key twice", envelope(P, extra=[("zz", b"\xc0"), ("zz", b"\x90")]), None),
          ("v twice", envelope(P, extra=[("v", mp_int(1))]), "duplicate_key"),
          ("bin key", envelope(P, extra=[(mp_bin(b"zz"), mp_int(1))]), "wrong_type"),
          ("keys as str8", mp_map([(mp_str(k, "s8"), v) for k, v in BASE]), None),
          ("map16", mp_map(BASE, "m16"), None), ("map32", mp_map(BASE, "m32"), None),
          ("no ecl", mp_map(BASE[:5]), "missing_key"), ("an array", b"\x90", "not_a_map"),
          ("trailing nil", envelope(P) + b"\xc0", "trailing_bytes"), ("no bytes", b"", "empty_message"),
          ("cut by one byte", envelope(P)[:-1], "truncated"), ("0xc1", b"\xc1", "not_msgpack")]
    # payload
    c += [(f"payload + {n} byte(s)", envelope(P + b"\0" * n), "payload_not_words") for n in (1, 2, 3)]
    c += [("big-endian words", envelope(struct.pack(">3I", block(1, 2), shaper(1, 1), hit(0, 0, 100))),
           "bad_block_marker")]
    c += [(f"block marker 0x{m:02x}", envelope(words((m << 24) | (1 << 16))), "bad_block_marker")
          for m in (0x00, 0xEB, 0xED, 0xFF, 0x10)]
    c += [("collector 0", envelope(words(block(0, 0))), "bad_collector_id"),
          ("collector 255, empty", envelope(words(block(255, 0))), None),
          ("collector 255, empty shaper", envelope(words(block(255, 1), shaper(12, 0))), None),
          ("collector 255, a hit", envelope(words(block(255, 2), shaper(1, 1), hit(0, 0, 5))), "unmapped_channel"),
          ("length one past the payload", envelope(words(block(1, 3), shaper(1, 1), hit(0, 0, 5))), "block_overrun"),
          ("length 65535", envelope(words(block(1, 0xffff), shaper(1, 1), hit(0, 0, 5))), "block_overrun"),
          ("length one short", envelope(words(block(1, 1), shaper(1, 1), hit(0, 0, 5))), "missing_hit_words")]
    c += [(f"shaper marker 0x{m:02x}", envelope(words(block(1, 1), (m << 24) | (1 << 16))), "bad_shaper_marker")
          for m in (0x00, 0x0F, 0x11, 0xEC)]
    c += [(f"shaper {s}", envelope(words(block(1, 1), shaper(s, 0))), r)
          for s, r in ((0, "bad_shaper_id"), (1, None), (12, None), (13, "bad_shaper_id"), (255, "bad_shaper_id"))]
    full = [hit(3, -2048, 2**18 - 1 - 128)] * 16
    c += [("mask 0xffff", envelope(words(block(1, 17), shaper(1, 0xffff), *full)), None),
          ("mask 0xffff, 15 hits", envelope(words(block(1, 16), shaper(1, 0xffff), *full[:15])), "missing_hit_words"),
          ("collector twice", envelope(words(block(3, 0), block(3, 0))), "duplicate_collector"),
          ("shaper twice in a block", envelope(words(block(3, 2), shaper(2, 0), shaper(2, 0))), "duplicate_shaper"),
          ("a shaper in two blocks", envelope(words(block(3, 1), shaper(2, 0), block(4, 1), shaper(2, 0))), None),
          ("array30 cell 900", envelope(words(block(5, 2), shaper(9, 1 << 3), hit(0, 0, 1)), det="array30"), None),
          ("array30 cell 901", envelope(words(block(5, 2), shaper(9, 1 << 4), hit(0, 0, 1)), det="array30"),
           "unmapped_channel"),
          ("belle2-ecl cell 8736", envelope(words(block(46, 2), shaper(6, 1 << 15), hit(0, 0, 1))), None),
          ("belle2-ecl cell 8737", envelope(words(block(46, 2), shaper(7, 1), hit(0, 0, 1))), "unmapped_channel"),
          ("largest event", envelope(largest_belle2_event()[0], crc=True), None)]
    return c


def test_every_boundary_value_is_processed_or_rejected_with_its_reason():
    table = cases()
    events, stats = run_path(MessageSource([m for _, m, _ in table]), batch_size=16)
    assert [(name, e["reason"]) for (name, _, _), e in zip(table, events)] == [(name, r) for name, _, r in table]
    n_bad = sum(r is not None for *_, r in table)
    assert (stats["received"], stats["processed"], stats["rejected"]) == (len(table), len(table) - n_bad, n_bad)
    got = {name: e for (name, _, _), e in zip(table, events)}
    assert (got["exp=2^64-1"]["exp"], got["run=2^64-1"]["run"], got["evt=2^32-1"]["evt"]) == (2**64 - 1,) * 2 + (2**32 - 1,)
    assert (got["time_ns=-2^63"]["time_ns"], got["time_ns=2^63-1"]["time_ns"]) == (-2**63, 2**63 - 1)
    d = got["mask 0xffff"]["digits"]
    assert d["cell"].tolist() == list(range(1, 17)) and set(d["amplitude"].tolist()) == {2**18 - 1 - 128}
    assert set(d["quality"].tolist()) == {3} and set(d["time"].tolist()) == {np.float32(-2048 * 0.4913)}
    d, fields = got["largest event"]["digits"], largest_belle2_event()[1]
    q, t, a = (np.array([fields[c][k] for c in range(1, 8737)]) for k in range(3))
    assert d["cell"].tolist() == list(range(1, 8737))
    np.testing.assert_array_equal(d["quality"], q)
    np.testing.assert_array_equal(d["amplitude"], a)
    np.testing.assert_array_equal(d["time"], (t * 0.4913).astype(np.float32))
    np.testing.assert_array_equal(d["energy"], (a * (1 / 20000)).astype(np.float32))


def _random_payload(rng, n_cells):
    ws = []
    for coll in rng.sample(range(1, n_cells // 192 + 3), rng.randint(0, min(6, n_cells // 192 + 2))):
        body = []
        for s in rng.sample(range(1, 13), rng.randint(0, 4)):
            mask = rng.getrandbits(16) & rng.getrandbits(16)
            body += [shaper(s, mask)] + [rng.getrandbits(32) for _ in range(bin(mask).count("1"))]
        ws += [block(coll, len(body))] + body
    p = bytearray(words(*ws))
    for _ in range(rng.choice([0, 0, 1, 1, 2])):  # a bit flipped, a byte or word lost or added, a header, an id
        k, j = rng.randrange(6), rng.randrange(len(p) // 4) * 4 if len(p) >= 8 else None
        if k == 0 and p:
            p[rng.randrange(len(p))] ^= 1 << rng.randrange(8)
        elif k == 1 and p:
            del p[rng.randrange(len(p))]
        elif k == 2:
            p += bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 4])))
        elif k == 3 and j is not None:
            p[j:j + 4] = struct.pack("<I", rng.choice([0xEC, 0x10]) << 24 | rng.getrandbits(24))
        elif k == 4 and j is not None:
            del p[j:j + 4]
        elif k == 5 and j is not None:
            p[j + 2] = rng.choice([0, 1, 5, 6, 12, 13, 46, 47, 255])
    return bytes(p)


@pytest.mark.parametrize("seed", [1, 2])
def test_payloads_decode_as_the_spec_reads_them(seed):
    rng, n_valid = random.Random(seed), 0
    for _ in range(3000):
        det = rng.choice(["belle2-ecl", "array30"])
        p = _random_payload(rng, rawdata.N_CELLS[det])
        want = reference_unpack(p, rawdata.N_CELLS[det])
        try:
            got = rawdata.unpack_payload(p, det)
        except rawdata.RawDataError as e:
            assert e.reason == want, p.hex()
            continue
        n_valid += 1
        ticks = np.round(got["time"] / np.float32(0.4913)).astype(int)
        assert list(zip(got["cell"].tolist(), got["quality"].tolist(), ticks.tolist(), got["amplitude"].tolist())) \
            == want, p.hex()
    assert 1000 < n_valid < 2000  # both outcomes exercised


REQUIRED = ("v", "exp", "run", "evt", "det", "ecl")


def reference_envelope(msg: bytes):
    """The spec's envelope rules (with eclreco's documented int64 bound of time_ns): the fields of a
    valid envelope, or None. MessagePack parsed by the msgpack package, maps kept as pairs."""
    try:
        top = msgpack.unpackb(msg, raw=False, strict_map_key=False, unicode_errors="surrogateescape",
                              object_pairs_hook=lambda pairs: ("map", pairs))
    except Exception:
        return None
    if not (isinstance(top, tuple) and top[0] == "map"):
        return None
    d = {}
    for k, v in top[1]:
        if not isinstance(k, str) or (k in d and k in REQUIRED + ("time_ns", "crc32", "truth")):
            return None
        d.setdefault(k, v)
    is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    if any(k not in d for k in REQUIRED) or not is_int(d["v"]) or d["v"] != 1:
        return None
    if not all(is_int(d[k]) and d[k] >= 0 for k in ("exp", "run", "evt")) or d["evt"] >= 2**32:
        return None
    if d["det"] not in ("belle2-ecl", "array30") or not isinstance(d["ecl"], bytes):
        return None
    if "time_ns" in d and not (is_int(d["time_ns"]) and d["time_ns"] < 2**63):
        return None
    if "crc32" in d and not (is_int(d["crc32"]) and d["crc32"] == zlib.crc32(d["ecl"])):
        return None
    if "truth" in d and not (isinstance(d["truth"], tuple) and d["truth"][0] == "map"):
        return None
    return {k: d.get(k) for k in ("exp", "run", "evt", "det", "ecl", "time_ns", "crc32")}


def _random_envelope(rng):
    kinds = {"v": "int", "exp": "int", "run": "int", "evt": "int", "det": "str", "ecl": "bin", "time_ns": "int",
             "crc32": "int", "truth": "map"}
    ints = [0, 1, 5, 127, 128, 255, 256, 70000, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -1, -32, -33,
            -2**63]

    def value(kind):
        if rng.random() < 0.03:  # a value of another type
            return rng.choice([b"\xc0", b"\xc2", b"\xca" + struct.pack(">f", 1.0), mp_str("1"), mp_bin(b"\x01"),
                               b"\x90", b"\x80", b"\xd4\x01\x00"])
        if kind == "int":
            v = rng.choice([1] * 12 + ints)
            return mp_int(v, rng.choice([f for f, (lo, hi) in INT_RANGES.items() if lo <= v <= hi]))
        if kind == "str":
            return mp_str(rng.choice(["belle2-ecl", "array30", "array3", ""]), rng.choice([None, "s8", "s16"]))
        if kind == "bin":
            return mp_bin(rng.choice([b"", words(block(1, 0)), b"abc"]), rng.choice(["b8", "b16", "b32"]))
        return rng.choice([mp_map([("a", mp_int(1))]), b"\x80"])

    keys = [k for k in REQUIRED if rng.random() < 0.97]
    keys += [k for k in ("time_ns", "crc32", "truth", "zz", "v") if rng.random() < 0.2]
    rng.shuffle(keys)
    pairs = [(k, value(kinds.get(k, rng.choice(list(kinds.values()))))) for k in keys]
    ecl = next((msgpack.unpackb(v) for k, v in pairs if k == "ecl" and v[:1] in (b"\xc4", b"\xc5", b"\xc6")), b"")
    pairs = [(k, mp_int(zlib.crc32(ecl)) if k == "crc32" and rng.random() < 0.5 else v) for k, v in pairs]
    if rng.random() < 0.03:
        pairs.append((mp_int(7), mp_int(1)))
    msg = mp_map(pairs, rng.choice([None, "m16", "m32"]))
    if rng.random() < 0.02:
        msg = msg[:rng.randrange(len(msg))]
    return msg


@pytest.mark.parametrize("seed", [1, 2])
def test_envelopes_decode_as_the_spec_reads_them(seed):
    rng, n_valid = random.Random(seed), 0
    for _ in range(5000):
        msg = _random_envelope(rng)
        want = reference_envelope(msg)
        try:
            got = rawdata.decode_envelope(msg)
        except rawdata.RawDataError as e:
            assert want is None, (msg.hex(), e.reason, e.detail)
            continue
        n_valid += 1
        assert want is not None and {k: got[k] for k in want} == want, msg.hex()
    assert n_valid > 200  # both outcomes exercised
