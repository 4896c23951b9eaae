"""Envelope decoding (every rejection reason), RawFileInput, RejectedOutput, the encoder's
helpers and the DAQ emulator."""
import os
import re
import struct
import threading
import time
import warnings
import zlib

import msgpack
import numpy as np
import pytest

import eclreco
from eclreco import _core, rawdata
from eclreco.raw_sockets import mark_multi_frame, mark_oversize, recv_message
from _raw_helpers import MessageSource, block, hit, random_digits, run_path, shaper, words

GOOD_PAYLOAD = words(block(1, 3), shaper(1, 0b101), hit(40, 1, 0), hit(70, -1, 2))


def env(**over):
    e = {"v": 1, "exp": 1, "run": 2, "evt": 3, "det": "belle2-ecl", "ecl": GOOD_PAYLOAD}
    e.update(over)
    return {k: v for k, v in e.items() if v is not DROP}


DROP = object()


def pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def raw_map(*pairs):
    """A MessagePack map written by hand (allows duplicate and non-string keys)."""
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(pack(k) + pack(v) for k, v in pairs)


VALID = pack(env())
MARK = _core.MULTI_FRAME_TAG  # in-band mark of a multipart ZeroMQ message (raw_sockets.mark_multi_frame)
OVERSIZE = _core.OVERSIZE_TAG  # in-band mark of a message over the receiver's limit (raw_sockets.mark_oversize)
VERBATIM = _core.VERBATIM_TAG  # in-band escape of a producer's message that starts like a mark (recv_message)

BAD_ENVELOPES = {
    "empty_message": [b""],
    "not_msgpack": [b"\xc1", b"\x82\xa1v\x01\xc1",
                    # the mark with sizes that do not account for the bytes (or 1 frame) is no mark
                    MARK + struct.pack(">3Q", 2, 10, len(VALID) - 9) + VALID, MARK + struct.pack(">2Q", 1, len(VALID)) + VALID,
                    MARK + struct.pack(">Q", 2), MARK + struct.pack(">Q", 1 << 61) + VALID, MARK + struct.pack(">3Q", 2, 1 << 63, 1 << 63),
                    # an oversize mark whose message is within its limit (or absent) is no mark
                    OVERSIZE + struct.pack(">Q", len(VALID)) + VALID, OVERSIZE + struct.pack(">Q", 0), OVERSIZE,
                    # escaped messages are decoded as sent; behind the escape, bytes not starting with 0xc1 are no mark
                    VERBATIM + b"\xc1", VERBATIM + mark_multi_frame([VALID, VALID]), VERBATIM + mark_oversize(VALID, 1),
                    VERBATIM + VALID, VERBATIM],
    "oversize": [mark_oversize(VALID, 10), mark_oversize(VALID, len(VALID) - 1), mark_oversize(b"\x00" * 100, 0),
                 mark_oversize(mark_oversize(VALID, 1), 2)],
    "multi_frame": [mark_multi_frame([VALID[:10], VALID[10:]]), mark_multi_frame([VALID, b""]),
                    mark_multi_frame([b"", VALID]), mark_multi_frame([VALID, VALID]), mark_multi_frame([b""] * 20)],
    "truncated": [VALID[:-1], VALID[:10], b"\xc6\xff\xff\xff\xff"],
    "trailing_bytes": [VALID + b"\x00", VALID + VALID],
    "not_a_map": [pack([1, 2]), pack(5), pack("v"), pack(b"x"), pack(None)],
    "wrong_type": [
        pack(env(ecl=GOOD_PAYLOAD.decode("latin-1"))),  # str, not bin
        pack(env(exp=1.0)), pack(env(run="2")), pack(env(evt=None)), pack(env(det=0)),
        pack(env(time_ns=1.5)), pack(env(crc32="abc")), pack(env(truth=[1, 2])), pack(env(v=True)),
        pack(env(evt={"a": 1})), pack(env(ecl=[1, 2])),
        raw_map(("v", 1), ("exp", 1), ("run", 2), ("evt", 3), ("det", "array30"), ("ecl", b""), (7, 1)),
    ],
    "duplicate_key": [
        raw_map(("v", 1), ("exp", 1), ("run", 2), ("evt", 3), ("det", "belle2-ecl"), ("ecl", b""), ("evt", 4)),
    ],
    "missing_key": [pack(env(v=DROP)), pack(env(exp=DROP)), pack(env(run=DROP)), pack(env(evt=DROP)),
                    pack(env(det=DROP)), pack(env(ecl=DROP)), pack({})],
    "bad_version": [pack(env(v=2)), pack(env(v=0)), pack(env(v=-1)), pack({"v": 2, "whatever": 1})],
    "unknown_detector": [pack(env(det="belle2")), pack(env(det="")), pack(env(det="ARRAY30"))],
    "out_of_range": [pack(env(exp=-1)), pack(env(run=-1)), pack(env(exp=-(1 << 63))), pack(env(evt=1 << 32)), pack(env(evt=-5)),
                     pack(env(time_ns=1 << 63)), pack(env(crc32=1 << 32)), pack(env(crc32=-1))],
    "crc_mismatch": [pack(env(crc32=zlib.crc32(GOOD_PAYLOAD) ^ 1)), pack(env(ecl=b"", crc32=1))],
}


def _cases():
    return [(reason, k, m) for reason, msgs in BAD_ENVELOPES.items() for k, m in enumerate(msgs)]


@pytest.mark.parametrize("reason,k,message", _cases(), ids=[f"{r}-{k}" for r, k, _ in _cases()])
def test_decode_envelope_rejects(reason, k, message):
    with pytest.raises(rawdata.RawDataError) as e:
        rawdata.decode_envelope(message)
    assert e.value.reason == reason, e.value.detail
    assert e.value.detail


@pytest.mark.parametrize("reason", sorted(BAD_ENVELOPES))
def test_envelope_rejection_in_path(reason):
    bad = BAD_ENVELOPES[reason]
    msgs = [pack(env(evt=100))] + bad + [pack(env(evt=101))]
    events, stats = run_path(MessageSource(msgs))
    n = len(msgs)
    assert stats["received"] == n and stats["processed"] == 2 and stats["rejected"] == len(bad)
    assert stats["received"] == stats["processed"] + stats["rejected"]
    assert stats["rejected_by_reason"] == {reason: len(bad)}
    assert [e["rejected"] for e in events] == [False] + [True] * len(bad) + [False]
    assert all(e["reason"] == reason and len(e["digits"]["cell"]) == 0 for e in events[1:-1])
    for e in (events[0], events[-1]):
        assert e["digits"]["cell"].tolist() == [1, 3] and e["digits"]["amplitude"].tolist() == [40, 70]
    assert [events[0]["evt"], events[-1]["evt"]] == [100, 101]


def test_oversized_zmq_message_is_marked_and_rejected_with_its_identifiers(zmq_context):
    """recv_message(max_bytes=L) hands a single-frame message of more than L bytes on marked (the
    tag, L, the message): the decoder rejects it as oversize and still reads its exp/run/evt for
    the quarantine record; a message of exactly L bytes passes as it is."""
    import zmq

    big = pack(env(evt=77, exp=5, run=6, truth={"pad": b"x" * 5000}))
    assert mark_oversize(big, 4096) == OVERSIZE + struct.pack(">Q", 4096) + big
    ctx = zmq_context
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind("inproc://oversize")
    push.connect("inproc://oversize")
    for msg, limit, marked in [(big, 4096, True), (big, len(big), False), (big, len(big) - 1, True), (big, 0, False),
                               (VALID, 10, True)]:
        push.send(msg)
        got = recv_message(pull, 0, max_bytes=limit)
        assert got == (mark_oversize(msg, limit) if marked else msg)
    push.send_multipart([big, b""])  # a multipart message stays multi_frame, whatever its size
    assert recv_message(pull, 0, max_bytes=100) == mark_multi_frame([big, b""])
    with pytest.raises(rawdata.RawDataError) as e:
        rawdata.decode_envelope(mark_oversize(big, 4096))
    assert e.value.reason == "oversize"
    assert e.value.detail == f"a message of {len(big)} bytes, over the receiver's limit of 4096 bytes (max_message_bytes)"
    events, stats = run_path(MessageSource([mark_oversize(big, 4096), pack(env(evt=78))]), unpack=False)
    assert stats["rejected_by_reason"] == {"oversize": 1} and stats["processed"] == 1
    assert (events[0]["exp"], events[0]["run"], events[0]["evt"]) == (5, 6, 77)


def test_multipart_zmq_message_is_marked_and_rejected(tmp_path, zmq_context):
    """Spec, Transport: one event per message, a single frame. recv_message marks a multipart
    message (the tag, the frame count, each frame's size, the frames) and the decoder rejects it
    as multi_frame, saying how many frames; a single frame is returned as it is."""
    import zmq

    second = pack(env(evt=4))
    assert mark_multi_frame([VALID[:10], VALID[10:]]) == MARK + struct.pack(">3Q", 2, 10, len(VALID) - 10) + VALID
    ctx = zmq_context
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind("inproc://multipart")
    push.connect("inproc://multipart")
    cases = [[VALID[:10], VALID[10:]], [VALID, b""], [b"", VALID], [VALID, second], [VALID, b"", second]]
    for frames in cases + [[VALID]]:
        push.send_multipart(frames)
        got = recv_message(pull, 0)
        if len(frames) == 1:
            assert got == VALID and rawdata.decode_envelope(got)["evt"] == 3
            continue
        assert got == mark_multi_frame(frames)
        with pytest.raises(rawdata.RawDataError) as e:
            rawdata.decode_envelope(got)
        assert e.value.reason == "multi_frame"
        assert e.value.detail.startswith(f"a ZeroMQ message of {len(frames)} frames ({', '.join(str(len(f)) for f in frames)} bytes)")
    # only a ZeroMQ receiver marks: in a raw file (framed by decode_envelope_prefix) it is garbage
    f = tmp_path / "marked.msgpack"
    f.write_bytes(VALID + mark_multi_frame([VALID, VALID]))
    events, stats = run_path(_file_source(f), unpack=False)
    assert stats["rejected_by_reason"] == {"not_msgpack": 1}


def test_producer_bytes_that_imitate_a_mark_are_rejected_as_sent(zmq_context):
    """A receiver's marks start with 0xc1, which starts no envelope. A producer's single-frame
    message that starts with it (a forged multi_frame or oversize mark, or a forged escape) comes
    back from recv_message escaped, and is rejected as not_msgpack, not under the mark's reason;
    a real multipart message is still multi_frame."""
    import zmq

    ctx = zmq_context
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind("inproc://forged")
    push.connect("inproc://forged")
    forged = [mark_multi_frame([VALID, VALID]), mark_oversize(VALID, 1), VERBATIM + b"\xc1" + VALID, b"\xc1"]
    for msg in forged:
        push.send(msg)
        got = recv_message(pull, 0, max_bytes=1 << 20)
        assert got == VERBATIM + msg
        with pytest.raises(rawdata.RawDataError) as e:
            rawdata.decode_envelope(got)
        assert e.value.reason == "not_msgpack"
        assert e.value.detail == "as sent (escaped by the receiver): not MessagePack: invalid byte 0xc1 at byte 0"
    push.send(VALID)
    assert recv_message(pull, 0) == VALID
    events, stats = run_path(MessageSource([VERBATIM + m for m in forged] + [mark_multi_frame([VALID, VALID]), VALID]),
                             unpack=False)
    assert stats["rejected_by_reason"] == {"not_msgpack": len(forged), "multi_frame": 1} and stats["processed"] == 1


def test_exp_and_run_are_64_bit():
    """Spec: exp and run are ints >= 0 (only evt is bounded, < 2^32): any MessagePack uint is
    valid, in any width (they were rejected from 2^32 on). 2^64 cannot be a MessagePack int: the
    encoder refuses it, and written as a float or an ext it is wrong_type; negative stays
    out_of_range."""
    for exp, run in [(2 ** 64 - 1, 2 ** 64 - 1), (1, 202406011200), (2 ** 32, 2 ** 32), (0, 2 ** 63)]:
        d = rawdata.decode_envelope(pack(env(exp=exp, run=run)))
        assert (d["exp"], d["run"]) == (exp, run)
    m = b"\x86" + pack("v") + signed(0xD3, 1) + pack("exp") + signed(0xD3, 2 ** 63 - 1) + pack("run") + \
        b"\xcf" + (2 ** 64 - 1).to_bytes(8, "big") + b"".join(pack(k) + pack(v) for k, v in env().items() if k in ("evt", "det", "ecl"))
    assert (rawdata.decode_envelope(m)["exp"], rawdata.decode_envelope(m)["run"]) == (2 ** 63 - 1, 2 ** 64 - 1)
    with pytest.raises(OverflowError):
        pack(2 ** 64)
    for bad, reason in [(pack(env(exp=float(2 ** 64))), "wrong_type"), (pack(env(run=msgpack.ExtType(1, b"\x01" * 9))), "wrong_type"),
                        (pack(env(exp=-1)), "out_of_range"), (pack(env(run=-(2 ** 63))), "out_of_range")]:
        with pytest.raises(rawdata.RawDataError) as e:
            rawdata.decode_envelope(bad)
        assert e.value.reason == reason
    one = dict(offsets=[0, 1], cell=[1], amplitude=[100], time_ticks=[0], quality=[0])
    msg, = rawdata.encode_events("belle2-ecl", 2 ** 64 - 1, np.array([202406011200], np.uint64), 2 ** 32 - 1, **one)
    assert (msgpack.unpackb(msg)["exp"], msgpack.unpackb(msg)["run"]) == (2 ** 64 - 1, 202406011200)
    for over, match in [({"exp": 2 ** 64}, "exp must be in 0..2\\^64-1"), ({"run": -1}, "run must be in 0..2\\^64-1"),
                        ({"evt": 2 ** 32}, "evt must be in 0..2\\^32-1"), ({"exp": 1.0}, "exp must be an int"),
                        ({"run": [1, 2]}, "one entry per event")]:
        args = {"exp": 0, "run": 1, "evt": 0, **over}
        with pytest.raises(ValueError, match=match):
            rawdata.encode_events("belle2-ecl", args["exp"], args["run"], args["evt"], **one)


def test_exp_and_run_64_bit_through_the_chain(tmp_path):
    """exp = run = 2^64 - 1 and run = 202406011200 from the raw file to the ROOT file (uint64
    branches), begin_run/end_run and the run boundaries, and the quarantine of a rejected one."""
    import uproot

    ids = [(2 ** 64 - 1, 2 ** 64 - 1, 1), (1, 202406011200, 2), (1, 202406011201, 3), (0, 2 ** 32, 4), (1, 0, 5)]
    msgs = [pack(env(exp=e, run=r, evt=v)) for e, r, v in ids] + [pack(env(exp=2 ** 64 - 1, run=2 ** 63, evt=6, det="x"))]
    raw = tmp_path / "ids.msgpack"
    rawdata.write_raw_file(raw, msgs)

    class Runs(eclreco.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def begin_run(self, exp, run):
            self.calls.append(("begin", exp, run))

        def end_run(self, exp, run):
            self.calls.append(("end", exp, run))

    runs = Runs()
    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=str(raw))
    path.add_module("ECLUnpacker")
    path.add_module("ECLClusterizer")
    path.add_module(runs)
    path.add_module("RejectedOutput", filename=str(tmp_path / "rejected.msgpack"))
    path.add_module("RootOutput", filename=str(tmp_path / "ids.root"))
    eclreco.process(path, batch_size=4, install_signal_handlers=False)
    assert eclreco.statistics.summary()["rejected_by_reason"] == {"unknown_detector": 1}
    with uproot.open(tmp_path / "ids.root") as f:
        t = f["events"].arrays(["exp", "run", "evt"], library="np")
    assert t["exp"].dtype == np.uint64 and t["run"].dtype == np.uint64
    assert list(zip(t["exp"].tolist(), t["run"].tolist(), t["evt"].tolist())) == ids
    assert runs.calls == [c for e, r, _ in ids for c in (("begin", e, r), ("end", e, r))]
    with open(tmp_path / "rejected.msgpack", "rb") as f:
        rec, = msgpack.Unpacker(f, raw=False)
    assert (rec["exp"], rec["run"], rec["evt"], rec["reason"]) == (2 ** 64 - 1, 2 ** 63, 6, "unknown_detector")


def test_valid_envelope_variants():
    # optional keys absent, unknown keys of any type, a truth map with anything, negative time_ns
    for e in [env(), env(time_ns=-5, crc32=zlib.crc32(GOOD_PAYLOAD)), env(truth={"x": [1, {"y": b"z"}], 3: None}),
              env(extra=[1, 2, {"v": 2}], another=None, evt=(1 << 32) - 1), env(ecl=b"", det="array30", truth={})]:
        d = rawdata.decode_envelope(pack(e))
        assert (d["exp"], d["run"], d["evt"]) == (e["exp"], e["run"], e["evt"])
        assert d["ecl"] == e["ecl"] and d["det"] == e["det"]
        assert d["time_ns"] == e.get("time_ns") and d["crc32"] == e.get("crc32")
        assert d.get("truth") == e.get("truth")  # the simulation's truth comes back (it was left out)
    # bin8 / bin16 / bin32 payload headers
    for size in (0, 4, 252, 256, 65532, 65536, 70000):
        p = bytes(size)
        assert rawdata.decode_envelope(pack(env(ecl=p)))["payload_size"] == size



def test_truth_with_array_or_map_keys_decodes():
    """MessagePack map keys may be arrays or maps, and the spec lets a producer put anything in
    `truth`: such an envelope is valid. Python's msgpack cannot build a dict with those keys
    (TypeError: unhashable type), which escaped decode_envelope; the truth is left out instead,
    as for one nested too deep for it."""
    for truth in (b"\x81\x91\x01\x02", b"\x81\x80\xc0", b"\x81\xa1a\x81\x92\x01\x02\xa1b"):
        m = b"\x87" + b"".join(pack(k) + pack(v) for k, v in env().items()) + pack("truth") + truth
        d = rawdata.decode_envelope(m)
        assert (d["exp"], d["run"], d["evt"], d["ecl"]) == (1, 2, 3, GOOD_PAYLOAD)
        assert "truth" not in d

def signed(fmt: int, v: int) -> bytes:
    """v in a MessagePack signed format (0xd0 int8 .. 0xd3 int64), as some producers write ints."""
    n = {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}[fmt]
    return bytes([fmt]) + v.to_bytes(n, "big", signed=True)


def test_signed_formats_of_non_negative_ints_are_accepted():
    """The spec asks for an int: 1 written as int8 (d0 01) is the int 1, like 01 or cc 01."""
    crc = zlib.crc32(GOOD_PAYLOAD)

    def envelope(fmt):
        return (b"\x87" + pack("v") + signed(fmt, 1) + pack("exp") + signed(fmt, 7) + pack("run") + signed(fmt, 3)
                + pack("evt") + signed(fmt, 100) + pack("det") + pack("belle2-ecl") + pack("ecl") + pack(GOOD_PAYLOAD)
                + pack("crc32") + (signed(fmt, crc) if fmt == 0xD3 else pack(crc)))

    for fmt in (0xD0, 0xD1, 0xD2, 0xD3):
        d = rawdata.decode_envelope(envelope(fmt))
        assert (d["exp"], d["run"], d["evt"], d["crc32"]) == (7, 3, 100, crc)
    neg = b"\x86" + b"".join(pack(k) + (signed(0xD3, -2) if k == "evt" else pack(v)) for k, v in env().items())
    with pytest.raises(rawdata.RawDataError, match="negative") as e:
        rawdata.decode_envelope(neg)
    assert e.value.reason == "out_of_range"
    with pytest.raises(rawdata.RawDataError, match="crc32 = 4294967296 does not fit"):
        rawdata.decode_envelope(b"\x87" + b"".join(pack(k) + pack(v) for k, v in env().items())
                                + pack("crc32") + signed(0xD3, 1 << 32))


def test_a_crc32_outside_0_to_2_32_is_refused_saying_it_must_be_unsigned():
    """The spec makes crc32 an unsigned 32-bit value ('crc32 >= 2^32 or negative' is out_of_range): a producer that
    writes its CRC as a signed int32 (Java's int, C's int32_t: 0xFFFFFFFF as -1) has every event with such a CRC
    rejected. The reason said 'crc32 = -1 is negative', not what the value must be; it now says it, as the one for
    2^32, in decode_envelope and in a batch's rejections alike (docs/wire-format.md)."""
    crc = zlib.crc32(GOOD_PAYLOAD)
    head = b"\x87" + b"".join(pack(k) + pack(v) for k, v in env().items()) + pack("crc32")
    for value, shown in ((crc - 2**32, f"{crc - 2**32} is negative"), (-1, "-1 is negative"),
                         (2**32, "4294967296 does not fit 32 bits")):
        message = head + signed(0xD3, value)
        with pytest.raises(rawdata.RawDataError) as e:
            rawdata.decode_envelope(message)
        want = f"crc32 = {shown}; the CRC-32 is unsigned, 0..2^32-1"
        assert (e.value.reason, e.value.detail) == ("out_of_range", want)
        b = eclreco.EventBatch(0)
        _core.append_envelopes(b, [message])
        assert b.rejections() == {0: ("out_of_range", want)}
    assert rawdata.decode_envelope(head + signed(0xD3, crc))["crc32"] == crc  # the same CRC, unsigned


def test_not_msgpack_names_the_invalid_byte():
    for m, at in [(b"\xc1", 0), (b"\x81\xa1v\xc1", 3), (b"\x82\xa1v\x01\xa3exp\xc1", 8)]:
        with pytest.raises(rawdata.RawDataError, match=f"invalid byte 0xc1 at byte {at}$"):
            rawdata.decode_envelope(m)


def test_identifiers_kept_for_rejected_events():
    msgs = [pack(env(exp=7, run=8, evt=9, det="cms")), pack(env(exp=7, run=8, evt=10, ecl=b"\x00"))]
    events, stats = run_path(MessageSource(msgs))
    assert [(e["exp"], e["run"], e["evt"], e["reason"]) for e in events] == [
        (7, 8, 9, "unknown_detector"), (7, 8, 10, "payload_not_words")]


def test_crc32_matches_zlib():
    rng = np.random.default_rng(0)
    for n in list(range(0, 200)) + [1000, 4097, 65536 + 3]:
        b = rng.bytes(n)
        assert _core.crc32(b) == zlib.crc32(b)
    assert _core.crc32(b"123456789") == 0xCBF43926


def test_encoder_layout_matches_spec():
    # cell 1 -> collector 1, shaper 1, channel 0; cell 17 -> shaper 2 channel 0; cell 193 -> collector 2
    msgs = rawdata.encode_events("belle2-ecl", 0, 0, [5], [0, 3], [193, 17, 1], [100, 0, 25], [-1, 0, 2047],
                                 [3, 0, 1], crc=False)
    d = msgpack.unpackb(msgs[0], raw=False)
    assert set(d) == {"v", "exp", "run", "evt", "det", "ecl"} and d["v"] == 1
    w = struct.unpack(f"<{len(d['ecl']) // 4}I", d["ecl"])
    assert w == (block(1, 4), shaper(1, 1), hit(25, 2047, 1), shaper(2, 1), hit(0, 0, 0),
                 block(2, 2), shaper(1, 1), hit(100, -1, 3))
    with pytest.raises(ValueError, match="twice"):
        rawdata.encode_events("array30", 0, 0, [0], [0, 2], [5, 5], [30, 30], [0, 0], [0, 0])
    with pytest.raises(ValueError, match="cellId"):
        rawdata.encode_events("array30", 0, 0, [0], [0, 1], [901], [30], [0], [0])


def write_hand_file(path):
    """Another producer following the spec with plain msgpack: no crc32, no time_ns, extra keys, truth."""
    p1 = struct.pack("<4I", 0xEC010003, 0x10010005, (0 << 30) | (3 << 18) | (128 + 500), (2 << 30) | (4093 << 18) | 228)
    p2 = struct.pack("<3I", 0xEC050002, 0x10090008, (1 << 30) | 160)  # array30 cell 4*192+8*16+3+1 = 900
    msgs = [
        msgpack.packb({"det": "belle2-ecl", "ecl": p1, "evt": 1, "run": 5, "exp": 2, "v": 1,
                       "producer": "hand", "truth": {"particles": [{"pdg": 22, "e": 1.5}], "seed": 4}},
                      use_bin_type=True),
        msgpack.packb({"v": 1, "exp": 2, "run": 5, "evt": 2, "det": "array30", "ecl": p2, "time_ns": 12345},
                      use_bin_type=True),
    ]
    with open(path, "wb") as f:
        for m in msgs:
            f.write(m)
    return msgs


def test_raw_file_input_hand_written(tmp_path):
    f = tmp_path / "hand.msgpack"
    write_hand_file(f)
    events, stats = run_path(_file_source(f))
    assert stats["processed"] == 2 and stats["rejected"] == 0
    a, b = events
    assert (a["exp"], a["run"], a["evt"], a["detector"], a["time_ns"]) == (2, 5, 1, 0, 0)
    assert a["digits"]["cell"].tolist() == [1, 3] and a["digits"]["amplitude"].tolist() == [500, 100]
    assert a["digits"]["quality"].tolist() == [0, 2]
    np.testing.assert_array_equal(a["digits"]["time"], np.float32(np.array([3, -3]) * 0.4913))
    assert (b["detector"], b["time_ns"], b["digits"]["cell"].tolist(), b["digits"]["amplitude"].tolist()) == (
        1, 12345, [900], [32])


def _file_source(path):
    m = eclreco.create_module("RawFileInput")
    m.set_param("filename", str(path))
    return m


def test_raw_file_input_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    d = random_digits(rng, "belle2-ecl", 300)
    msgs = rawdata.encode_events("belle2-ecl", 1, np.repeat([1, 2, 3], 100), np.arange(300), **d,
                                 truth=[{"n": int(k)} for k in range(300)])
    f = tmp_path / "run.msgpack"
    assert rawdata.write_raw_file(f, msgs) == 300
    assert rawdata.read_raw_file(f) == msgs
    events, stats = run_path(_file_source(f), batch_size=64)
    assert stats["received"] == 300 and stats["processed"] == 300
    assert [e["run"] for e in events] == [1] * 100 + [2] * 100 + [3] * 100
    off = d["offsets"]
    for i, e in enumerate(events):
        assert e["evt"] == i
        assert sorted(d["cell"][off[i]:off[i + 1]].tolist()) == e["digits"]["cell"].tolist()


def deep_truth(depth, evt=3):
    """A valid envelope whose truth (ignored by the reconstruction) nests `depth` arrays deep."""
    return b"\x87" + b"".join(pack(k) + pack(v) for k, v in env(evt=evt).items()) + pack("truth") \
        + b"\x81\xa1a" + b"\x91" * depth + b"\xc0"


def test_split_stream_frames_as_raw_file_input(tmp_path):
    """read_raw_file / split_stream (the DAQ emulator, hlt run, benchmarks) frame a raw file with
    the C++ decoder, exactly as RawFileInput does: a valid envelope whose truth nests 1024 levels
    or more used to stop Python's msgpack (ValueError: the file could not be replayed at all).
    Bytes that cannot be framed raise a ValueError naming their byte offset."""
    msgs = [deep_truth(d, evt=k) for k, d in enumerate([10, 1023, 1024, 5000, 100_000])]
    msgs += [pack([1, 2]), pack(env(evt=9, det="x")), pack(env(evt=10))]  # framed, then rejected / valid
    f = tmp_path / "deep.msgpack"
    rawdata.write_raw_file(f, msgs)
    assert rawdata.split_stream(b"".join(msgs)) == msgs
    assert rawdata.split_stream(bytearray(b"".join(msgs))) == msgs
    assert rawdata.read_raw_file(f) == msgs
    assert rawdata.split_stream(b"") == []

    class Framed(eclreco.Module):  # what RawFileInput framed: each event's message and reason
        def __init__(self):
            super().__init__()
            self.seen = []

        def ordered(self):
            return True

        def event(self, batch):
            raw, rej = batch["RawEnvelopes"], batch.rejections()
            self.seen += [(bytes(raw["bytes"][raw.offsets[i]:raw.offsets[i + 1]]), rej.get(i, ("",))[0])
                          for i in range(len(batch))]

    framed = Framed()
    path = eclreco.create_path()
    path.add_module(_file_source(f))
    path.add_module(framed)
    eclreco.process(path, batch_size=3, install_signal_handlers=False)
    assert framed.seen == list(zip(msgs, [""] * 5 + ["not_a_map", "unknown_detector", ""]))
    head = b"".join(msgs[:2])
    for tail, reason in [(b"\xc1" + msgs[0], "not_msgpack"), (msgs[0][:-1], "truncated"),
                         (b"\x81\xa1a\xc1", "not_msgpack")]:
        with pytest.raises(ValueError, match=f"^{reason} at byte {len(head)} of {len(head + tail)}: .*2 message"):
            rawdata.split_stream(head + tail)
        f.write_bytes(head + tail)
        with pytest.raises(ValueError, match=f"^raw file '{f}': {reason} at byte {len(head)} "):
            rawdata.read_raw_file(f)


def test_raw_file_input_missing_file(tmp_path):
    with pytest.raises(Exception, match="cannot open raw file"):
        run_path(_file_source(tmp_path / "none.msgpack"))


def test_raw_file_input_empty_file(tmp_path):
    f = tmp_path / "empty.msgpack"
    f.write_bytes(b"")
    events, stats = run_path(_file_source(f))
    assert events == [] and stats.get("received", 0) == 0


# (a receiver's escape in a file is no escape: the quarantine keeps its bytes whole)
@pytest.mark.parametrize("tail,reason", [(b"\xc1\x00garbage", "not_msgpack"), (VALID[:-3], "truncated"),
                                         (VERBATIM + b"\xc1" + VALID, "not_msgpack")],
                         ids=["not_msgpack", "truncated", "escape_in_file"])
def test_raw_file_garbage_stops_reading(tmp_path, tail, reason):
    good = [pack(env(evt=k)) for k in range(5)]
    bad_middle = pack([1, 2, 3])  # MessagePack but no envelope: rejected, reading goes on
    f = tmp_path / "g.msgpack"
    f.write_bytes(b"".join(good[:2]) + bad_middle + b"".join(good[2:]) + tail)
    q = tmp_path / "q.msgpack"
    path = eclreco.create_path()
    path.add_module(_file_source(f))
    path.add_module("ECLUnpacker")
    path.add_module("RejectedOutput", filename=str(q))
    eclreco.process(path, batch_size=3, install_signal_handlers=False)
    s = eclreco.statistics.summary()
    assert s["received"] == 7 and s["processed"] == 5 and s["rejected"] == 2
    assert s["rejected_by_reason"] == {"not_a_map": 1, reason: 1}
    recs = list(msgpack.Unpacker(open(q, "rb"), raw=False))
    assert [r["reason"] for r in recs] == ["not_a_map", reason]
    assert recs[0]["message"] == bad_middle and recs[1]["message"] == tail
    assert "reading stopped" in recs[1]["detail"]


def test_rejected_output_quarantine(tmp_path):
    rng = np.random.default_rng(9)
    d = random_digits(rng, "array30", 6, max_digits=40)
    good = rawdata.encode_events("array30", 4, 5, np.arange(6), **d)
    bad = [
        pack(env(exp=4, run=5, evt=100, crc32=1)),                      # crc_mismatch, ids known
        pack(env(exp=4, run=5, evt=101, ecl=words(block(1, 1), 0x11000000))),  # payload: bad_shaper_marker
        pack(env(exp=4, run=5, evt=-3)),                                # out_of_range: evt unknown
        b"\xc1",                       # not_msgpack, no ids: cannot be framed, so last in the file
    ]
    msgs = good[:3] + bad[:3] + good[3:] + bad[3:]
    f = tmp_path / "in.msgpack"
    rawdata.write_raw_file(f, msgs)
    q = tmp_path / "rejected.msgpack"
    path = eclreco.create_path()
    path.add_module(_file_source(f))
    path.add_module("ECLUnpacker")
    path.add_module("RejectedOutput", filename=str(q))
    eclreco.process(path, batch_size=4, install_signal_handlers=False)
    s = eclreco.statistics.summary()
    assert s["received"] == 10 and s["processed"] == 6 and s["rejected"] == 4
    recs = list(msgpack.Unpacker(open(q, "rb"), raw=False))
    assert [r["reason"] for r in recs] == ["crc_mismatch", "bad_shaper_marker", "out_of_range", "not_msgpack"]
    assert all(r["detail"] for r in recs)
    assert [r["message"] for r in recs] == bad
    assert (recs[0]["exp"], recs[0]["run"], recs[0]["evt"]) == (4, 5, 100)
    assert recs[1]["evt"] == 101
    assert recs[2]["exp"] == 4 and "evt" not in recs[2]
    assert "exp" not in recs[3] and "evt" not in recs[3]


def test_a_quarantine_file_is_not_taken_for_a_raw_file(tmp_path, capsys):
    """A quarantine record keeps exp, run and evt wherever they could be read, so the file RejectedOutput
    writes starts with a map that has those keys of an envelope, and not_a_raw_file (judged by "none of
    v, exp, run, evt, det, ecl") passed it: `reco.py -i job.rejected.msgpack` ran every record as an
    event, each rejected (missing_key) into a quarantine of the quarantine, and `daq-emulator --input`
    replayed it. A map without v, det and ecl, the keys only an envelope has, is refused."""
    from eclreco import cli

    q = tmp_path / "rejected.msgpack"
    path = eclreco.create_path()
    path.add_module(MessageSource([pack(env(exp=4, run=5, evt=100, crc32=1))]))
    path.add_module("RejectedOutput", filename=str(q))
    eclreco.process(path, install_signal_handlers=False)
    recs = list(msgpack.Unpacker(open(q, "rb"), raw=False))
    assert [(r["reason"], r["exp"], r["run"], r["evt"]) for r in recs] == [("crc_mismatch", 4, 5, 100)]
    why = rawdata.not_a_raw_file(q)
    assert why.startswith("not a raw file of the wire format: its first message is a map with none of an "
                          "envelope's keys v, det, ecl; a quarantine file's messages are written out by"), why
    rc = cli.main(["daq-emulator", "--input", str(q), "--connect", "tcp://127.0.0.1:1"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err == f"eclreco daq-emulator: error: --input '{q}': {why}\n"
    # an envelope that lacks only some of them is an event to replay (and to reject)
    assert not rawdata.not_a_raw_file(_write_bytes(tmp_path / "r", pack(env(v=DROP, ecl=DROP))))
    assert not rawdata.not_a_raw_file(_write_bytes(tmp_path / "r2", raw_map(("exp", 1), ("det", "array30"))))


def test_a_detail_counts_one_byte_in_the_singular(tmp_path, capsys):
    """A trailing_bytes detail said "1 byte(s) after the end of the MessagePack object (1 bytes)", and
    `eclreco quarantine` showed it so as the first detail of its reason; a truncated one "more than the 1 bytes
    given". One byte is "1 byte", others "N bytes"."""
    from eclreco import cli

    msgs = [b"\xc0\x00", b"\xc0\x00\x00", VALID + b"\x00", b"\x81", b"\x81\x01"]
    details = ["1 byte after the end of the MessagePack object (1 byte)",
               "2 bytes after the end of the MessagePack object (1 byte)",
               f"1 byte after the end of the MessagePack object ({len(VALID)} bytes)",
               "the MessagePack object needs more than the 1 byte given",
               "the MessagePack object needs more than the 2 bytes given"]
    for msg, detail in zip(msgs, details):
        with pytest.raises(rawdata.RawDataError) as e:
            rawdata.decode_envelope(msg)
        assert e.value.detail == detail
    with pytest.raises(rawdata.RawDataError, match=r"^oversize: a message of 2 bytes, over the receiver's limit of "
                                                   r"1 byte \(max_message_bytes\)$"):
        rawdata.decode_envelope(mark_oversize(b"\xc0\x00", 1))
    q = tmp_path / "rejected.msgpack"
    path = eclreco.create_path()
    path.add_module(MessageSource(msgs[:1]))
    path.add_module("RejectedOutput", filename=str(q))
    eclreco.process(path, install_signal_handlers=False)
    capsys.readouterr()
    assert cli.main(["quarantine", str(q)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].endswith(f"first: (no exp/run/evt): {details[0]}"), out


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


class _LateRejecter(eclreco.Module):
    """Rejects the events whose evt is in `which` (a user's module)."""

    def __init__(self, which):
        super().__init__()
        self.which = set(which)

    def event(self, batch):
        active = batch.active()
        for i, e in enumerate(np.asarray(batch.evt).tolist()):
            if e in self.which and active[i]:
                batch.reject(i, "late_check", f"evt {e} failed the check")


@pytest.mark.parametrize("order", ["root_first", "quarantine_first"])
def test_a_module_after_an_output_cannot_reject(tmp_path, order, capfd):
    """An output has written the event (RootOutput first: it would be in both files and counted as
    rejected) or passed it by (RejectedOutput first: it would be in neither file). Either way the
    rejection after the output becomes a module error, counted and kept with the event, which stays
    processed and in the ROOT file; a rejection before any output is a rejection as ever."""
    import uproot

    from eclreco.quarantine import read_records

    rng = np.random.default_rng(3)
    d = random_digits(rng, "array30", 12, max_digits=30)
    f = tmp_path / "in.msgpack"
    rawdata.write_raw_file(f, rawdata.encode_events("array30", 1, 2, np.arange(12), **d))
    root, quarantine = tmp_path / "out.root", tmp_path / "rejected.msgpack"
    outputs = [("RootOutput", root), ("RejectedOutput", quarantine)]
    if order == "quarantine_first":
        outputs.reverse()
    path = eclreco.create_path()
    path.add_module(_file_source(f))
    path.add_module("ECLUnpacker")
    path.add_module(_LateRejecter({0, 4}))
    path.add_module(outputs[0][0], filename=str(outputs[0][1]))
    path.add_module(_LateRejecter({4, 5, 9}))  # 4 is rejected already: no decision on it
    path.add_module(outputs[1][0], filename=str(outputs[1][1]))
    eclreco.process(path, batch_size=5, install_signal_handlers=False)
    s = eclreco.statistics.summary()
    assert s["received"] == 12 and s["processed"] == 10 and s["rejected"] == 2
    assert s["rejected_by_reason"] == {"late_check": 2} and s["errors"] == 2
    with uproot.open(root) as t:
        events = t["events"].arrays(["evt", "error_flags"], library="np")
    assert events["evt"].tolist() == [1, 2, 3, 5, 6, 7, 8, 9, 10, 11]
    # written before the error (RootOutput first), or with it
    flagged = events["evt"][events["error_flags"] == eclreco.ERROR_MODULE].tolist()
    assert flagged == ([] if order == "root_first" else [5, 9]) and set(events["error_flags"]) <= {0, eclreco.ERROR_MODULE}
    assert [r["evt"] for r in read_records(quarantine)] == [0, 4]
    err = capfd.readouterr().err
    assert (f"_LateRejecter rejected exp 1 run 2 evt 5 (late_check: evt 5 failed the check) after the output "
            f"{outputs[0][0]}: a module after an output cannot reject") in err


def test_append_envelopes_accepts_buffers_and_extends():
    b = eclreco.EventBatch(0)
    _core.append_envelopes(b, [VALID, bytearray(VALID), memoryview(pack(env(evt=9)))])
    _core.append_envelopes(b, [b"\xc1"])
    assert len(b) == 4 and list(b.evt) == [3, 3, 9, 0]
    assert b.rejections() == {3: ("not_msgpack", b.rejections()[3][1])}
    raw = b["RawEnvelopes"]
    assert bytes(raw["bytes"][raw.offsets[2]:raw.offsets[3]]) == pack(env(evt=9))
    ref = b["RawPayloadRef"]
    assert list(ref.offsets) == [0, 1, 2, 3, 4] and list(ref["size"]) == [16, 16, 16, 0]
    with pytest.raises(TypeError):
        _core.append_envelopes(b, [123])


def test_append_envelopes_reads_strided_buffers_in_their_logical_order():
    """A buffer that is not one run of memory (a strided or reversed view) is copied in its
    logical order, as bytes(view) reads it: its bytes used to be read from its pointer as if
    contiguous (other bytes decoded, or a read past the end of the memory for a reversed one).
    Buffers of wider items or more dimensions are refused."""
    m = pack(env(evt=77))
    interleaved = np.full(2 * len(m), 0xC1, np.uint8)
    interleaved[::2] = np.frombuffer(m, np.uint8)
    reversed_ = np.frombuffer(m[::-1], np.uint8).copy()
    views = [memoryview(interleaved)[::2], memoryview(reversed_)[::-1], interleaved[::2], reversed_[::-1],
             np.frombuffer(m, np.uint8).astype(np.int8)[:]]
    assert all(bytes(v) == m for v in views)
    events, stats = run_path(MessageSource(views))
    assert stats["rejected"] == 0 and [e["evt"] for e in events] == [77] * len(views)
    b = eclreco.EventBatch(0)
    _core.append_envelopes(b, [memoryview(interleaved)[::2]])
    raw = b["RawEnvelopes"]
    assert bytes(raw["bytes"][raw.offsets[0]:raw.offsets[1]]) == m  # the quarantine keeps the logical bytes
    for bad in [np.frombuffer(m[:len(m) // 4 * 4], np.uint32), np.frombuffer(m[:40], np.uint8).reshape(4, 10)]:
        with pytest.raises(TypeError, match="1-d buffer of bytes"):
            _core.append_envelopes(b, [bad])


def test_envelopes_in_one_frame_reach_the_batch_in_any_split():
    """The distributor's EV message carries its raw events back to back in one frame
    (protocol.envelope_frames); the worker splits them over batches of any size
    (WorkerLink.take) and appends them from the frame (append_envelope_blocks): every event,
    in order, byte for byte, the bad one rejected with its reason, with its own sequence id."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.worker import WorkerLink

    msgs = [pack(env(evt=e)) for e in range(7)] + [b"\xc1"] + [pack(env(evt=e)) for e in range(8, 12)]
    link = WorkerLink("tcp://127.0.0.1:1")  # never connects: only the buffer is used
    try:
        for part, first in ((msgs[:5], 100), (msgs[5:], 105)):  # two EV messages
            blob, off = P.envelopes_from_frames(P.envelope_frames(part), len(part))
            link.buffer.append((np.arange(first, first + len(part), dtype="<u8"), blob, off))
            link.buffered += len(part)
        got_seqs, batches = [], []
        for size in (3, 4, 100):  # the first EV split, then across both, then the rest
            seqs, blocks = link.take(size)
            b = eclreco.EventBatch(0)
            _core.append_envelope_blocks(b, blocks)
            assert len(b) == len(seqs)
            got_seqs += seqs.tolist()
            batches.append(b)
        assert link.buffered == 0 and not link.buffer
    finally:
        link.sock.close(0)
    assert got_seqs == list(range(100, 112))
    assert [e for b in batches for e in b.evt.tolist()] == [0, 1, 2, 3, 4, 5, 6, 0, 8, 9, 10, 11]
    raws = [bytes(b["RawEnvelopes"]["bytes"][b["RawEnvelopes"].offsets[i]:b["RawEnvelopes"].offsets[i + 1]])
            for b in batches for i in range(len(b))]
    assert raws == msgs
    assert [r[0] for r in batches[2].rejections().values()] == ["not_msgpack"]  # the 8th event
    with pytest.raises(ValueError, match="lengths add up"):
        P.envelopes_from_frames([P.envelope_frames(msgs[:2])[0], msgs[0]], 2)
    with pytest.raises(ValueError, match="1 lengths for 2"):
        P.envelopes_from_frames(P.envelope_frames(msgs[:1]), 2)


def test_block_offsets_are_checked_as_given():
    """append_envelope_blocks (the HLT worker's EV frames) converted each block's offsets with pybind11's forcecast
    to int64: a float offset was truncated (60.7 read as 60, the messages cut there without a word), a uint64 above
    2**63 - 1 wrapped negative and was named 'must not decrease'. They now go through checked_offsets, as every
    _core offsets: each error names the block and its first bad entry."""
    msgs = rawdata.encode_events("array30", 0, 1, np.arange(2), [0, 1, 2], np.array([5, 6], np.int32),
                                 np.array([500, 600]), np.zeros(2, int), np.zeros(2, int))
    blob, n0 = b"".join(msgs), len(msgs[0])

    def append(*blocks):
        b = eclreco.EventBatch(0)
        _core.append_envelope_blocks(b, list(blocks))
        return b

    with pytest.raises(TypeError, match=r"blocks\[1\] offsets must be an integer array, not float64"):
        append((blob, np.array([0, n0])), (blob, np.array([0.0, n0 + 0.7, len(blob)])))
    with pytest.raises(ValueError, match=rf"blocks\[0\] offsets\[2\] = {2**64 - 1} is out of range"):
        append((blob, np.array([0, n0, 2**64 - 1], np.uint64)))
    with pytest.raises(ValueError, match=r"blocks\[0\] offsets\[0\] = -1 is negative"):
        append((blob, np.array([-1, n0])))
    with pytest.raises(ValueError, match=rf"blocks\[0\] offsets\[1\] = {len(blob) + 1} is outside the block's "
                                         rf"{len(blob)} bytes"):
        append((blob, np.array([0, len(blob) + 1])))
    with pytest.raises(ValueError, match=rf"blocks\[0\] offsets must be non-decreasing: blocks\[0\] offsets\[1\] = "
                                         rf"{n0}, blocks\[0\] offsets\[2\] = 1"):
        append((blob, np.array([0, n0, 1])))
    for ok in (np.array([0, n0, len(blob)]), np.array([0, n0, len(blob)], np.uint32), [0, n0, len(blob)],
               np.array([0, n0, len(blob)], ">i8")):
        b = append((blob, ok))
        assert b.evt.tolist() == [0, 1] and not b.rejections()
    b = append((blob, np.array([n0, len(blob)])))  # a block's tail, as WorkerLink.take hands out
    assert b.evt.tolist() == [1] and not b.rejections()



def test_unpack_payload_checks_its_detector_as_given():
    """unpack_payload's detector was cast with pybind11: 2**40 and 1.5 raised "RuntimeError: Unable to cast Python
    instance of type ... to C++ type '?'" naming nothing. It now goes through detector_arg, as find_clusters': errors
    name detector and its value; names and codes are read as before."""
    for bad in (2**40, -1, 2):
        with pytest.raises(ValueError, match=rf"detector = {bad} is not a detector code \(0 belle2-ecl, 1 array30\)"):
            _core.unpack_payload(GOOD_PAYLOAD, bad)
    with pytest.raises(ValueError, match=r"detector = 'cms' is not a detector name \(belle2-ecl or array30\)"):
        _core.unpack_payload(GOOD_PAYLOAD, "cms")
    for bad, shown in ((1.5, "float 1.5"), (True, "bool True"), (None, "NoneType None"), (np.array([0, 1]), "ndarray")):
        with pytest.raises(TypeError, match=rf"detector must be a detector name \(belle2-ecl or array30\) or code "
                                            rf"\(0 or 1\), not {re.escape(shown)}"):
            _core.unpack_payload(GOOD_PAYLOAD, bad)
    want = _core.unpack_payload(GOOD_PAYLOAD, "belle2-ecl")["cell"].tolist()
    assert len(want) == 2
    for ok in (0, np.int64(0), np.uint8(0)):
        assert _core.unpack_payload(GOOD_PAYLOAD, ok)["cell"].tolist() == want
    assert _core.unpack_payload(words(block(5, 2), shaper(9, 1 << 3), hit(30)), 1)["cell"].tolist() == \
        _core.unpack_payload(words(block(5, 2), shaper(9, 1 << 3), hit(30)), "array30")["cell"].tolist()


def test_unpack_payload_reads_the_channel_map_as_given():
    """unpack_payload converted channel_map with pybind11's forcecast to int64: a float channel 3.7 was read as 3 (the
    digit landed in another cell without a word) and a uint64 2**64 - 1 wrapped negative. Each column now goes through
    checked_numbers: a float or bool map is a TypeError, an entry that is negative or past int32 a ValueError naming
    the column and the entry; integer maps of any width are read as before."""
    payload = words(block(5, 2), shaper(9, 1 << 3), hit(30))
    lin = rawdata.linear_channel_map("array30")
    want = _core.unpack_payload(payload, "array30")["cell"].tolist()

    def unpack(channel_map):
        return _core.unpack_payload(payload, "array30", None, None, channel_map)["cell"].tolist()

    for bad in (lin.astype(float), lin.astype(bool)):
        with pytest.raises(TypeError, match=rf"channel_map collector must be an integer array, not {bad.dtype}"):
            unpack(bad)
    frac = lin.astype(float)
    frac[3, 2] += 0.7
    with pytest.raises(TypeError, match="channel_map collector must be an integer array, not float64"):
        unpack(frac)
    wrapped = lin.astype(np.uint64)
    wrapped[1, 0] = 2**64 - 1
    with pytest.raises(ValueError, match=rf"channel_map collector\[1\] = {2**64 - 1} is out of range \(above 2\*\*31 - 1\)"):
        unpack(wrapped)
    neg = lin.copy()
    neg[4, 2] = -1
    with pytest.raises(ValueError, match=r"channel_map channel\[4\] = -1 is negative"):
        unpack(neg)
    far = lin.copy()
    far[0, 1] = 13
    with pytest.raises(ValueError, match=r"channel map entry 0 \(cellId 1\): address \(1, 13, 0\) outside"):
        unpack(far)
    for ok in (lin, lin.astype(np.uint8), lin.astype(">i4"), lin.tolist(), np.asfortranarray(lin)):
        assert unpack(ok) == want

def test_unpack_payload_raises_raw_data_error_for_the_payload_only():
    """rawdata.unpack_payload turned every ValueError of _core.unpack_payload into a RawDataError: an argument
    error (a 2-d gain, an unknown detector, a channel map that reads a cellId twice) looked like a wire-format
    rejection whose reason code was the message ('gain must have shape (8736,) ...'). The C++ now raises its
    rejections as _core.RawDataRejection (a ValueError) and the wrappers convert that only: an argument error
    stays a ValueError / TypeError naming the argument; a payload or envelope that breaks the format is still a
    RawDataError with a reason code of the spec's tables."""
    cases = ((lambda: rawdata.unpack_payload(b"", gain=np.ones((2, 3))), ValueError,
              r"^gain must have shape \(8736,\) \(one per cellId\), not \(2, 3\)$"),
             (lambda: rawdata.unpack_payload(b"", "cms"), ValueError, r"^detector = 'cms' is not a detector name"),
             (lambda: rawdata.unpack_payload(b"", gain=np.full(8736, "1")), TypeError, r"^gain must be a float"),
             (lambda: rawdata.unpack_payload(b"", channel_map=[(1, 1, 0)] * 8736), ValueError, "already reads cellId 1"))
    for call, err, msg in cases:
        with pytest.raises(err, match=msg) as e:
            call()
        assert not isinstance(e.value, rawdata.RawDataError)
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "wire-format.md")) as f:
        reasons = set(re.findall(r"^\| `(\w+)`", f.read(), re.M))  # the spec's tables of rejection reasons
    for call, reason in ((lambda: rawdata.unpack_payload(b"\0"), "payload_not_words"),
                         (lambda: rawdata.unpack_payload(words(block(1, 2), shaper(1, 0b111), hit(50))), "missing_hit_words"),
                         (lambda: rawdata.decode_envelope(b""), "empty_message")):
        with pytest.raises(rawdata.RawDataError) as e:
            call()
        assert e.value.reason == reason and reason in reasons
    with pytest.raises(_core.RawDataRejection, match="^payload_not_words: "):  # ValueError('reason: detail')
        _core.unpack_payload(b"\0")
    assert issubclass(_core.RawDataRejection, ValueError)


def test_unpack_payload_reads_gain_and_t0_as_given():
    """unpack_payload converted gain and t0 with pybind11's forcecast to float64: an array of strings was read as
    numbers, a bool array as 0/1, a complex one with its imaginary part dropped (only a ComplexWarning), and a 2-d one
    was refused with 'gain / t0 must be 1-d arrays', naming neither. Each now goes through checked_reals: TypeError
    naming the array and its dtype, ValueError naming it with the expected shape and the given one; float and integer
    arrays (and lists) of n_cells entries are read as before."""
    n = 8736

    def unpack(**kw):
        return _core.unpack_payload(GOOD_PAYLOAD, "belle2-ecl", **kw)

    for which in ("gain", "t0"):
        for bad in (np.full(n, "1.5"), np.ones(n, bool), np.full(n, 1 + 2j), ["1.5"] * n, np.full(n, None)):
            dtype = np.asarray(bad).dtype
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a ComplexWarning is no answer
                with pytest.raises(TypeError, match=rf"^{which} must be a float or integer array, not {dtype}$"):
                    unpack(**{which: bad})
        for bad, shape in ((np.ones((n, 1)), (n, 1)), (np.ones((2, 3)), (2, 3)), (np.ones(5), (5,)), (np.float64(1), ())):
            with pytest.raises(ValueError, match=rf"^{which} must have shape \({n},\) \(one per cellId\), "
                                                 rf"not {re.escape(str(shape))}$"):
                unpack(**{which: bad})
        with pytest.raises(TypeError, match=rf"^{which} must be an array of numbers, not list$"):
            unpack(**{which: [[1.0], [1.0, 2.0]]})
    want = unpack(gain=np.full(n, 2.0), t0=np.full(n, 1.0))
    assert want["energy"].tolist() != unpack()["energy"].tolist() and want["time"].tolist() != unpack()["time"].tolist()
    for gain, t0 in ((np.full(n, 2.0, np.float32), np.ones(n, np.int64)), ([2] * n, [1.0] * n),
                     (np.full(n, 2.0, ">f8"), np.ones(n, np.uint8)), (np.full(2 * n, 2.0)[::2], np.ones(n))):
        got = unpack(gain=gain, t0=t0)
        assert got["energy"].tolist() == want["energy"].tolist() and got["time"].tolist() == want["time"].tolist()


def test_daq_emulator_delivers_everything(tmp_path, zmq_context):
    import zmq
    from eclreco import daq

    msgs = rawdata.encode_events("array30", 0, 1, np.arange(200), **random_digits(np.random.default_rng(1), "array30",
                                                                                  200, max_digits=30))
    f = tmp_path / "daq.msgpack"
    rawdata.write_raw_file(f, msgs)
    ctx = zmq_context
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    import argparse
    parser = argparse.ArgumentParser()
    daq.add_daq_emulator_parser(parser.add_subparsers(dest="command"))
    # --sched normal: the emulator runs in this process, whose threads (and the processes the later
    # tests start) would otherwise stay under SCHED_BATCH
    args = parser.parse_args(["daq-emulator", "--input", str(f), "--connect", f"tcp://127.0.0.1:{port}",
                              "--rate", "20000", "--sched", "normal"])
    t = threading.Thread(target=args.func, args=(args,))
    t.start()
    got = []
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    while len(got) < len(msgs) and poller.poll(5000):
        got.append(pull.recv())
    t.join(10)
    assert got == msgs
    # a looped, counted run at full speed
    res = {}
    t = threading.Thread(target=lambda: res.update(daq.emulate(msgs, f"tcp://127.0.0.1:{port}", events=450, loop=True)))
    t.start()
    looped = []
    while len(looped) < 450 and poller.poll(5000):
        looped.append(pull.recv())
    t.join(10)
    assert len(looped) == 450 and res["sent"] == 450 and res["undelivered_at_close"] is False
    # the first pass is the file as it is; later passes renumber evt so (exp, run, evt) stays
    # unique in the stream (the contract; a collector drops repeats as duplicates)
    import msgpack

    assert looped[: len(msgs)] == msgs
    envs = [msgpack.unpackb(m, raw=False) for m in looped]
    assert len({(e["exp"], e["run"], e["evt"]) for e in envs}) == 450
    for i, e in enumerate(envs):
        orig = msgpack.unpackb(msgs[i % len(msgs)], raw=False)
        assert e["ecl"] == orig["ecl"] and {k: v for k, v in e.items() if k != "evt"} == \
            {k: v for k, v in orig.items() if k != "evt"}


def test_daq_emulator_stops_when_the_receiver_takes_nothing(tmp_path, zmq_context, capsys):
    """A receiver that is not there (bound, nobody connected) or gone (after taking 100 events):
    the send queue fills, the emulator says so and, with --stall-timeout-s, stops with exit 1
    (it blocked in send for ever, silently)."""
    import zmq
    from eclreco import daq

    msgs = rawdata.encode_events("array30", 0, 1, np.arange(50), **random_digits(np.random.default_rng(2), "array30",
                                                                                 50, max_digits=10))
    f = tmp_path / "daq.msgpack"
    rawdata.write_raw_file(f, msgs)
    import argparse
    parser = argparse.ArgumentParser()
    daq.add_daq_emulator_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["daq-emulator", "--input", str(f), "--bind", "tcp://127.0.0.1:*", "--loop",
                              "--stall-timeout-s", "1.5", "--sched", "normal"])
    t0 = time.monotonic()
    assert args.func(args) == 1
    assert time.monotonic() - t0 < 20
    out = capsys.readouterr().out
    assert re.search(r"error: stopped after 1\.[5-9] s in which the receiver", out) and "0 events were handed" in out, out
    def receiver_taking_100_then_gone(**emulate_kw) -> dict:
        """emulate() into a receiver that takes 100 events and closes; its result"""
        pull = zmq_context.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        res = {}
        th = threading.Thread(target=lambda: res.update(daq.emulate(msgs, f"tcp://127.0.0.1:{port}", loop=True,
                                                                    **emulate_kw)))
        th.start()
        for _ in range(100):
            assert pull.poll(5000)
            pull.recv()
        pull.close()
        th.join(120)
        assert not th.is_alive()
        return res

    res = receiver_taking_100_then_gone(linger_ms=0, stall_timeout_s=1.0)
    assert res["stopped_stalled"] and res["sent"] >= 100 and res["stalled_s"] >= 1.0
    # a receiver that goes away while the queue still has room (the high-water mark holds seconds of
    # events): every event is "sent", the rest is dropped when the linger runs out, and that is said
    # (it printed "sent N" and exited 0)
    said = []
    res = receiver_taking_100_then_gone(events=3000, rate=3000, linger_ms=1000, report=said.append)
    assert res["sent"] == 3000 and res["undelivered_at_close"] is True
    assert any("events were still queued" in line and "when the linger of 1 s ran out" in line for line in said), said


def _run_daq_emulator_into(zmq_context, argv, expect: int, keep_from: int = 0) -> tuple[int, list, list, int]:
    """`daq-emulator ARGV --connect` (in this process) to a PULL socket that takes `expect` messages;
    (exit code, the CRC-32 of each message taken, the messages from index keep_from, the peak of
    Python's memory while it ran, in bytes)."""
    import argparse
    import tracemalloc

    import zmq
    from eclreco import daq

    pull = zmq_context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    parser = argparse.ArgumentParser()
    daq.add_daq_emulator_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["daq-emulator", *argv, "--connect", f"tcp://127.0.0.1:{port}", "--sched", "normal"])
    crcs, got, rc = [], [], []
    tracemalloc.start()
    try:
        t = threading.Thread(target=lambda: rc.append(args.func(args)))
        t.start()
        while len(crcs) < expect and pull.poll(10000):
            m = pull.recv()
            if len(crcs) >= keep_from:
                got.append(m)
            crcs.append(zlib.crc32(m))
        t.join(60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        pull.close()
    assert not t.is_alive()
    return rc[0], crcs, got, peak


def test_daq_emulator_holds_a_message_not_the_file(tmp_path, zmq_context, monkeypatch):
    """`daq-emulator` read its whole input before it sent the first event (read_raw_file: a slow start
    and the file in memory, twice: its bytes and the list of messages), and --loop kept a patched copy
    of every message. It now reads the file one message at a time (a window of 1 MiB), --loop
    re-reading it for each pass (a file over LOOP_HOLD_BYTES; a smaller one is held, as the same
    messages show): its memory stays a few MiB with a file of 24 MB."""
    from eclreco import daq

    msgs = rawdata.encode_events("belle2-ecl", 0, 1, np.arange(1000), **random_digits(
        np.random.default_rng(5), "belle2-ecl", 1000, max_digits=600))
    f = tmp_path / "big.msgpack"
    with open(f, "wb") as out:
        for _ in range(12):
            out.write(b"".join(msgs))
    n = 12 * len(msgs)
    assert f.stat().st_size > 24e6
    crcs_file = [zlib.crc32(m) for m in msgs] * 12
    rc, crcs, _, peak = _run_daq_emulator_into(zmq_context, ["--input", str(f)], n, keep_from=n)
    assert rc == 0 and crcs == crcs_file
    assert peak < 6e6, peak
    # looped: a first pass for the span, then the file read again for each pass
    looped = ["--input", str(f), "--loop", "--events", str(n + 500)]
    monkeypatch.setattr(daq, "LOOP_HOLD_BYTES", 1 << 20)
    rc, crcs, got, peak = _run_daq_emulator_into(zmq_context, looped, n + 500, keep_from=n)
    assert rc == 0 and crcs[:n] == crcs_file and len(got) == 500
    assert [msgpack.unpackb(m)["evt"] for m in got] == list(range(1000, 1500))  # the span: evt 0..999
    assert peak < 6e6, peak
    monkeypatch.setattr(daq, "LOOP_HOLD_BYTES", 1 << 30)  # held: the same messages
    assert _run_daq_emulator_into(zmq_context, looped, n + 500, keep_from=n)[1:3] == (crcs, got)


def test_daq_emulator_reports_a_file_that_goes_bad(tmp_path, zmq_context, capsys):
    """A raw file with bytes that cannot be framed after some events: the events before them are sent,
    then the replay stops with an error naming the file and the byte (exit 1); with --loop the first
    pass finds them before anything is sent (exit 2, naming --input). Fewer events than --events without
    --loop: refused before anything is sent (exit 2), from a counting pass that holds a message at a time."""
    msgs = rawdata.encode_events("array30", 0, 1, np.arange(20), **random_digits(np.random.default_rng(3), "array30",
                                                                                 20, max_digits=10))
    f = tmp_path / "bad.msgpack"
    head = b"".join(msgs[:12])
    f.write_bytes(head + b"\xc1" + b"".join(msgs[12:]))
    rc, _, got, _ = _run_daq_emulator_into(zmq_context, ["--input", str(f)], 12)
    out = capsys.readouterr().out
    assert rc == 1 and got == msgs[:12]
    assert (f"[daq-emulator] error: raw file '{f}': not_msgpack at byte {len(head)} of {f.stat().st_size}" in out
            and "12 message(s) before it): the replay stopped there, after 12 events" in out), out
    rc, _, got, _ = _run_daq_emulator_into(zmq_context, ["--input", str(f), "--loop"], 0)
    err = capsys.readouterr().err
    assert rc == 2 and got == [] and err.startswith(f"eclreco daq-emulator: error: --input: raw file '{f}': not_msgpack"), err
    # --events within the good part: the counting pass stops at --events (it read the whole file, here to the
    # bad bytes that the replay never reaches: refused, exit 2; of a file of gigabytes, all of it for 12 events)
    rc, _, got, _ = _run_daq_emulator_into(zmq_context, ["--input", str(f), "--events", "12"], 12)
    assert rc == 0 and got == msgs[:12]
    assert rawdata.count_messages(f, 12) == 12
    g = tmp_path / "short.msgpack"
    rawdata.write_raw_file(g, msgs)
    rc, _, got, _ = _run_daq_emulator_into(zmq_context, ["--input", str(g), "--events", "25"], 0)
    err = capsys.readouterr().err
    assert rc == 2 and got == [] and "error: the file has 20 events; --events 25 needs --loop" in err, err
    rc, _, got, _ = _run_daq_emulator_into(zmq_context, ["--input", str(g), "--events", "20"], 20)
    assert rc == 0 and got == msgs
    # --tick-ms with the --rate it paces (without one it is refused: tests/test_cli.py)
    rc, _, got, _ = _run_daq_emulator_into(zmq_context, ["--input", str(g), "--rate", "2000", "--tick-ms", "5"], 20)
    assert rc == 0 and got == msgs


def test_loop_renumbering_carries_evt_into_run():
    """Event numbers near 2^32 (a replay of ~40 h at 30 kHz gets there): evt carries into run, as
    a DAQ starts a new run, instead of wrapping to (run, evt) already sent; a file of several runs
    moves to new runs every pass; a run past 64 bits is a clear error, not a repeat."""
    from eclreco.daq import LoopRenumbering

    top = 2 ** 32 - 1
    # run before evt in one map, after it in the other: both offsets must follow the rewrite
    late_run = raw_map(("v", 1), ("exp", 1), ("evt", top), ("det", "belle2-ecl"), ("ecl", GOOD_PAYLOAD), ("run", 2))
    r = LoopRenumbering([pack(env(run=2, evt=top - 5)), late_run])
    assert r.span == 6
    keys = [[tuple(rawdata.decode_envelope(bytes(r.message(m, p)))[x] for x in ("exp", "run", "evt"))
             for m in (pack(env(run=2, evt=top - 5)), late_run)] for p in range(3)]
    assert keys == [[(1, 2, top - 5), (1, 2, top)], [(1, 3, 0), (1, 3, 5)], [(1, 3, 6), (1, 3, 11)]]
    # two runs in the file: every pass moves to new runs, no (run, evt) twice
    msgs = [pack(env(run=1, evt=e)) for e in (5, 9, top)] + [pack(env(run=2, evt=e)) for e in (0, 3)]
    r = LoopRenumbering(msgs)
    seen = [(d["run"], d["evt"]) for p in range(50) for m in msgs
            for d in [rawdata.decode_envelope(bytes(r.message(m, p)))]]
    assert len(set(seen)) == len(seen) == 50 * len(msgs)
    assert r.span == (2 * 2 ** 32 + 3) - (2 ** 32 + 5) + 1
    assert seen[len(msgs)] == (2, 4)  # (1, 5) one span on
    # the last run number of the wire format: the next pass has none left
    last = pack(env(run=2 ** 64 - 1, evt=top))
    r = LoopRenumbering([last])
    with pytest.raises(OverflowError, match="64 bits"):
        r.message(last, 1)


def test_loop_renumbering_changes_only_the_run_and_evt_bytes():
    """A looped replay renumbers every valid envelope (found by the reconstruction's decoder, also
    one with a truth nested 2000 levels deep or holding non-UTF-8 strings, whose evt used to repeat
    in every pass) and changes only the bytes of its run and evt; a message that is not a valid envelope
    (a repeated key, a wrong CRC, garbage ...) has no identity and is replayed unchanged."""
    from eclreco.daq import LoopRenumbering

    good = pack(env(evt=5, crc32=zlib.crc32(GOOD_PAYLOAD), time_ns=-7))
    signed_evt = b"\x86" + b"".join(pack(k) + (signed(0xD3, v) if k == "evt" else pack(v)) for k, v in env(evt=7).items())
    deep = deep_truth(2000, evt=6)
    not_utf8 = b"\x87" + b"".join(pack(k) + pack(v) for k, v in env(evt=4).items()) + pack("truth") + b"\x81\xa1a\xa2\xff\xfe"
    valid = [good, signed_evt, deep, not_utf8]
    dup_crc = raw_map(("v", 1), ("exp", 1), ("run", 2), ("evt", 7), ("det", "belle2-ecl"), ("ecl", GOOD_PAYLOAD),
                      ("crc32", 1), ("crc32", zlib.crc32(GOOD_PAYLOAD)))
    bad_crc = pack(env(evt=8, crc32=1))
    dup_evt = BAD_ENVELOPES["duplicate_key"][0]
    wide = pack(env(evt=9))[:-len(pack(GOOD_PAYLOAD))]  # truncated before the payload: not framable
    invalid = [dup_crc, bad_crc, dup_evt, wide, b"\xc1", pack([1, 2]), pack(env(evt=True)), mark_multi_frame([good, good])]
    msgs = valid + invalid
    r = LoopRenumbering(msgs)
    assert r.count == len(msgs) and [bytes(r.message(m, 1)) != m for m in msgs] == [True] * len(valid) + [False] * len(invalid)
    assert r.span == 4  # evt 4..7 of the valid envelopes
    seen = set()
    ids = ("run", "evt", "payload_offset", "run_offset", "run_size", "evt_offset", "evt_size")
    for k, m in enumerate(valid):
        orig = rawdata.decode_envelope(m)
        for p in range(4):
            again = bytes(r.message(m, p))
            d = rawdata.decode_envelope(again)
            assert (d["run"], d["evt"]) == (orig["run"], orig["evt"] + p * r.span)  # no carry below 2^32
            assert {x: d[x] for x in d if x not in ids} == {x: orig[x] for x in orig if x not in ids}
            # the first pass sends the file as it is; in the others only the bytes of run and evt differ:
            # rewritten as a uint64 (cf + 8 bytes) and a uint32 (ce + 4 bytes), wherever the producer put them
            expected = m
            for key, tag, width in sorted([("run", b"\xcf", 8), ("evt", b"\xce", 4)],
                                          key=lambda f: -orig[f[0] + "_offset"]):
                start = orig[key + "_offset"]
                assert msgpack.unpackb(m[start: start + orig[key + "_size"]]) == orig[key]
                if p:
                    expected = expected[:start] + tag + d[key].to_bytes(width, "big") + expected[start + orig[key + "_size"]:]
            assert again == expected
            seen.add((d["exp"], d["run"], d["evt"]))
    assert len(seen) == 4 * len(valid)  # unique in the stream over the passes
    for k, m in enumerate(invalid, len(valid)):
        with pytest.raises(rawdata.RawDataError):  # no identity: never renumbered
            rawdata.decode_envelope(m)
        for p in range(4):
            assert bytes(r.message(m, p)) == m
    with pytest.raises(rawdata.RawDataError) as e:  # the repeated crc32 key stays a repeated key
        rawdata.decode_envelope(bytes(r.message(dup_crc, 3)))
    assert e.value.reason == "duplicate_key"
    # a renumbered message is a new object per pass: one of >= 64 kB goes out without a copy, and
    # libzmq may still hold the previous pass's
    import zmq

    big = pack(env(evt=5, pad=b"x" * zmq.COPY_THRESHOLD))
    r = LoopRenumbering([good, big])
    first, second = r.message(big, 1), r.message(big, 2)
    assert first is not second
    assert (msgpack.unpackb(bytes(first))["evt"], msgpack.unpackb(bytes(second))["evt"]) == (5 + 1, 5 + 2)


def test_raw_file_truncated_while_being_read_is_an_error_not_a_crash(tmp_path):
    """A raw file cut short while RawFileInput reads it (a copy or a DAQ rewriting it in place): the
    memory-mapped file raised SIGBUS at the first page past the new end, killing the job without a word
    ('Bus error', exit 135, the ROOT file left unclosed). Now the read ends with an error naming the file
    and both sizes; the events read before it are processed and the outputs closed."""
    import subprocess
    import sys

    rng = np.random.default_rng(7)
    n = 4000
    d = random_digits(rng, "belle2-ecl", n, max_digits=400)
    f = tmp_path / "big.msgpack"
    rawdata.write_raw_file(f, rawdata.encode_events("belle2-ecl", 1, 1, np.arange(n), **d))
    size = f.stat().st_size
    assert size > 4 << 20, size  # well beyond what a reader takes at once
    script = f"""
import os, eclreco
class CutTheFile(eclreco.Module):
    done = False
    def event(self, batch):
        if not self.done:
            self.done = True
            os.truncate({str(f)!r}, {size // 10})
path = eclreco.create_path()
path.add_module("RawFileInput", filename={str(f)!r})
path.add_module(CutTheFile())
path.add_module("RootOutput", filename={str(tmp_path / "out.root")!r}, cluster_columns=[])
try:
    eclreco.process(path, threads=1, batch_size=64)
except RuntimeError as err:
    print("ERROR", err, flush=True)
    print("received", eclreco.statistics.summary()["received"], flush=True)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.returncode, run.stdout[-2000:], run.stderr[-2000:])
    assert f"raw file '{f}' was cut short while being read: {size} bytes when opened" in run.stdout, run.stdout
    received = int(run.stdout.split("received")[-1])
    assert 64 <= received < n
    import uproot

    with uproot.open(tmp_path / "out.root") as out:  # closed and valid, with what was read
        assert out["events"].num_entries == received


def test_raw_file_input_frames_across_its_read_window(tmp_path):
    """RawFileInput reads the file in windows of 1 MiB and more: messages across a window's end, one
    larger than a window (a 3 MiB truth) and garbage after megabytes of events (a bin declaring 4 GB)
    are framed as they were with the whole file mapped."""
    rng = np.random.default_rng(11)
    n = 1500
    d = random_digits(rng, "belle2-ecl", n, max_digits=400)
    truth = [{"k": k} for k in range(n)]
    truth[700] = {"blob": b"\x01" * (3 << 20)}
    msgs = rawdata.encode_events("belle2-ecl", 1, 1, np.arange(n), **d, truth=truth)
    tail = b"\xc6\xff\xff\xff\xff" + b"\x00" * 100  # bin32 of 4 GB, cut by the end of the file
    f = tmp_path / "big.msgpack"
    f.write_bytes(b"".join(msgs) + tail)
    assert f.stat().st_size > 5 << 20

    class Framed(eclreco.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def event(self, batch):
            raw = batch["RawEnvelopes"]
            off, data = np.asarray(raw.offsets), np.asarray(raw["bytes"])
            self.seen += [bytes(data[off[i]:off[i + 1]]) for i in range(len(batch))]

    framed = Framed()
    path = eclreco.create_path()
    path.add_module(_file_source(f))
    path.add_module(framed)
    eclreco.process(path, batch_size=256, install_signal_handlers=False)
    s = eclreco.statistics.summary()
    assert s["received"] == n + 1 and s["rejected_by_reason"] == {"truncated": 1}, s
    assert framed.seen[:n] == msgs
    assert framed.seen[n] == tail


def test_daq_emulator_says_at_once_that_it_waits_for_a_receiver(zmq_context):
    """--connect to an address where nothing listens: the events go into ZeroMQ's queue, and the emulator
    waited twice its linger (20 s by default) in silence before its error. It now says at once that it
    waits, where and how long."""
    from eclreco import daq
    from hlt_helpers import free_address

    msgs = rawdata.encode_events("array30", 0, 1, np.arange(20), **random_digits(np.random.default_rng(2), "array30",
                                                                                 20, max_digits=10))
    address = free_address()
    lines = []

    def report(line):
        lines.append((time.monotonic(), line))
    t0 = time.monotonic()
    res = daq.emulate(msgs, address, linger_ms=1000, report=report, context=None)
    assert res["sent"] == 20 and res["handshakes"] == 0
    said = [(t, s) for t, s in lines if "no receiver at" in s]
    assert said and said[0][1] == (f"[daq-emulator] 20 events queued, no receiver at {address} yet: waiting up to "
                                   "2 s (a handshake, then the close's linger of 1 s) for one to take them"), lines
    assert said[0][0] - t0 < 0.9  # before the linger, not after it
    assert "error: no receiver completed a handshake" in lines[-1][1]


def test_a_raw_file_write_that_fails_leaves_the_old_file_and_no_partial_one(tmp_path):
    """write_raw_file (eclreco simulate -o, bench) opened the file for writing at once: a write that
    failed or was interrupted (disk full, Ctrl-C during the gigabytes of a long simulation) left a
    half-written raw file under the output's name, the old one gone. It is now written under a
    temporary name that it takes at the end; a device is still written directly."""
    from eclreco.rawdata import read_raw_file, write_raw_file

    out = tmp_path / "run.msgpack"
    write_raw_file(out, [msgpack.packb(1), msgpack.packb(2)])
    before = out.read_bytes()

    def interrupted():
        yield msgpack.packb(3)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_raw_file(out, interrupted())
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["run.msgpack"]
    link = tmp_path / "link.msgpack"
    link.symlink_to(out)
    assert write_raw_file(link, [msgpack.packb(4)]) == 1
    assert link.is_symlink() and read_raw_file(out) == [msgpack.packb(4)]
    assert write_raw_file(os.devnull, [msgpack.packb(5)]) == 1 and os.path.exists(os.devnull)


def test_a_raw_file_write_does_not_overwrite_a_file_that_appeared_while_it_wrote(tmp_path):
    """write_raw_file (eclreco simulate -o, bench) replaced its file at the end with whatever was there by then: a file
    put there while the messages were written (another simulation into the name, a user's file) was lost without a
    word. It is checked again as it takes the name (paths.StagedOutputs.publish, as train's -o): refused naming it,
    the file left as it is, the new one kept under its temporary name, named too. A file there at the start is
    replaced, as before."""
    from eclreco.paths import OutputsChangedError
    from eclreco.rawdata import read_raw_file, write_raw_file

    out = tmp_path / "run.msgpack"

    def meanwhile():  # a message written, then a file put under the name
        yield msgpack.packb(1)
        out.write_bytes(b"mine")

    for before in (None, b"the previous run's"):  # the name free at the start, or a file it may replace
        if before is not None:
            out.write_bytes(before)
        with pytest.raises(OutputsChangedError) as e:
            write_raw_file(out, meanwhile())
        kept = [p.name for p in tmp_path.iterdir() if ".partial." in p.name]
        assert len(kept) == 1 and kept[0] in str(e.value), (kept, e.value)
        assert str(e.value).startswith(f"{out}: run.msgpack appeared or changed there since this write began"), e.value
        assert out.read_bytes() == b"mine"
        (tmp_path / kept[0]).unlink()
    assert write_raw_file(out, [msgpack.packb(2)]) == 1  # nothing meanwhile: replaced, as before
    assert read_raw_file(out) == [msgpack.packb(2)] and os.listdir(tmp_path) == ["run.msgpack"]


def test_bench_rawdata_refuses_a_repeat_count_below_one():
    """_core._bench_rawdata(messages, repeats) took repeats=0 (or a negative count) and then read the smallest of no
    batch times: a segmentation fault (bench_unpacker.py --repeats 0); True was read as 1 pass. repeats now goes
    through checked_integer<int> and must be >= 1."""
    from eclreco import _core

    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"^repeats must be >= 1, not {bad}$"):
            _core._bench_rawdata([], bad)
    with pytest.raises(TypeError, match=r"^repeats must be an int, not bool True$"):
        _core._bench_rawdata([], True)
    assert _core._bench_rawdata([], 1)["events"] == 0.0


def test_crc32_checks_its_running_crc():
    """_core.crc32(data, crc) cast crc with pybind11: True was read as a running CRC of 1 (crc32(b'a', True) gave
    2679148245, not zlib's error), and -1 or 2**32 was its several-line "incompatible function arguments". crc now
    goes through checked_integer<uint32_t>; the values are zlib's."""
    from eclreco import _core
    from helpers import assert_checked_integer

    assert_checked_integer(lambda crc: _core.crc32(b"abc", crc), "crc", 7, 32, signed=False)
    for crc in (0, 7, 2**32 - 1, np.uint32(2**32 - 1), np.uint64(123456789)):
        assert _core.crc32(b"abc", crc) == zlib.crc32(b"abc", int(crc))
