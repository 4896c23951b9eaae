"""ECLUnpacker and the payload rules of spec/wire-format.md: round trip through a real path,
one test per payload rejection reason, conditions (gain / t0, channel map, intervals of validity)."""
import json

import msgpack
import numpy as np
import pytest

import eclreco
from eclreco import rawdata
from _raw_helpers import MessageSource, block, hit, n_out_of_time, random_digits, run_path, shaper, words


LINEAR30 = rawdata.linear_channel_map("array30").tolist()


def envelope(payload, evt=0, det="belle2-ecl", exp=1, run=2, **extra):
    env = {"v": 1, "exp": exp, "run": run, "evt": evt, "det": det, "ecl": payload}
    env.update(extra)
    return msgpack.packb(env, use_bin_type=True)


def expected_events(detector, d, gain=None, t0=None):
    """Per event: the digits sorted by cell, with the reference calibration."""
    out = []
    off = d["offsets"]
    for i in range(len(off) - 1):
        s = slice(off[i], off[i + 1])
        order = np.argsort(d["cell"][s], kind="stable")
        cell = d["cell"][s][order]
        amp = d["amplitude"][s][order]
        ticks = d["time_ticks"][s][order]
        energy, time = rawdata.calibrate(cell, amp, ticks, gain, t0)
        out.append({"cell": cell.astype(np.int32), "amplitude": amp.astype(np.int32),
                    "quality": d["quality"][s][order].astype(np.uint8), "energy": energy, "time": time})
    return out


def assert_digits_equal(got, want):
    assert set(got) == {"cell", "energy", "time", "quality", "amplitude"}
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("detector", ["belle2-ecl", "array30"])
def test_round_trip_through_path(detector):
    rng = np.random.default_rng(42 if detector == "belle2-ecl" else 7)
    n = 400
    d = random_digits(rng, detector, n, max_digits=300 if detector == "belle2-ecl" else 120)
    if detector == "belle2-ecl":  # one event with every crystal
        d2 = random_digits(rng, detector, 1, max_digits=0)
        all_cells = rng.permutation(8736) + 1
        d2 = {"offsets": np.array([0, 8736]), "cell": all_cells,
              "amplitude": rng.integers(25, 262015, 8736), "time_ticks": rng.integers(-2048, 2048, 8736),
              "quality": rng.integers(0, 4, 8736)}
        d = {k: (np.concatenate([d[k], d2[k][1:] + d[k][-1]]) if k == "offsets" else np.concatenate([d[k], d2[k]]))
             for k in d}
        n += 1
    evt = np.arange(1000, 1000 + n)
    msgs = rawdata.encode_events(detector, 3, 14, evt, time_ns=1_700_000_000_000_000_000 + evt, **d)
    events, stats = run_path(MessageSource(msgs), batch_size=50)
    assert stats["received"] == n and stats["processed"] == n and stats["rejected"] == 0
    want = expected_events(detector, d)
    assert [e["evt"] for e in events] == list(evt)
    for e, w, t in zip(events, want, evt):
        assert not e["rejected"]
        assert (e["exp"], e["run"], e["detector"]) == (3, 14, rawdata.DETECTORS[detector])
        assert e["time_ns"] == 1_700_000_000_000_000_000 + t
        assert_digits_equal(e["digits"], w)
        assert e["n_out_of_time"] == n_out_of_time(w["time"], w["quality"])  # ECLEventInformation
    assert sum(e["n_out_of_time"] for e in events) > n  # the random times (+-1 us) put many out of time


def test_round_trip_threads_and_direct_unpack():
    rng = np.random.default_rng(3)
    d = random_digits(rng, "belle2-ecl", 200)
    msgs = rawdata.encode_events("belle2-ecl", 0, 1, np.arange(200), **d)
    want = expected_events("belle2-ecl", d)
    events, stats = run_path(MessageSource(msgs), batch_size=16, threads=2)
    assert stats["processed"] == 200
    for e, w in zip(events, want):
        assert_digits_equal(e["digits"], w)
    # The same through the direct bindings.
    for m, w in zip(msgs[:20], want):
        env = rawdata.decode_envelope(m)
        assert_digits_equal(rawdata.unpack_payload(env["ecl"], "belle2-ecl"), w)


def test_out_of_order_blocks_and_shapers_come_out_sorted():
    # collector 2 before collector 1, shaper 3 before shaper 1; cells: c2s1ch0 = 193, c1s3ch1 = 34, c1s1ch0 = 1
    payload = words(block(2, 2), shaper(1, 0b1), hit(100),
                    block(1, 4), shaper(3, 0b10), hit(200, 5, 1), shaper(1, 0b1), hit(300, -7, 3))
    got = rawdata.unpack_payload(payload)
    np.testing.assert_array_equal(got["cell"], [1, 34, 193])
    np.testing.assert_array_equal(got["amplitude"], [300, 200, 100])
    np.testing.assert_array_equal(got["quality"], [3, 1, 0])
    np.testing.assert_array_equal(got["time"], np.float32(np.array([-7, 5, 0]) * 0.4913))


def test_valid_corner_cases():
    assert len(rawdata.unpack_payload(b"")["cell"]) == 0
    got = rawdata.unpack_payload(words(block(1, 0), block(3, 1), shaper(12, 0)))  # empty block and shaper
    assert len(got["cell"]) == 0
    # amplitude field 0 -> -128, last cell of each detector
    got = rawdata.unpack_payload(words(block(46, 2), shaper(6, 1 << 15), 0))
    assert got["cell"].tolist() == [8736] and got["amplitude"].tolist() == [-128]
    got = rawdata.unpack_payload(words(block(5, 2), shaper(9, 1 << 3), hit(30)), "array30")
    assert got["cell"].tolist() == [900]


BAD_PAYLOADS = {
    "payload_not_words": (words(block(1, 2), shaper(1, 1), hit(50)) + b"\x00", "belle2-ecl"),
    "bad_block_marker": (words(0xED010002, shaper(1, 1), hit(50)), "belle2-ecl"),
    "bad_collector_id": (words(block(0, 2), shaper(1, 1), hit(50)), "belle2-ecl"),
    "block_overrun": (words(block(1, 3), shaper(1, 1), hit(50)), "belle2-ecl"),
    "duplicate_collector": (words(block(1, 2), shaper(1, 1), hit(50), block(1, 2), shaper(2, 1), hit(50)), "belle2-ecl"),
    "bad_shaper_marker": (words(block(1, 3), shaper(1, 1), hit(50), hit(60)), "belle2-ecl"),  # a word left in the block
    "bad_shaper_id": (words(block(1, 2), shaper(13, 1), hit(50)), "belle2-ecl"),
    "duplicate_shaper": (words(block(1, 4), shaper(2, 1), hit(50), shaper(2, 2), hit(50)), "belle2-ecl"),
    "missing_hit_words": (words(block(1, 2), shaper(1, 0b11), hit(50), block(2, 0)), "belle2-ecl"),
    "unmapped_channel": (words(block(46, 2), shaper(7, 1), hit(50)), "belle2-ecl"),  # cellId 8737
}
BAD_PAYLOADS_EXTRA = {
    "unmapped_channel_array30": ("unmapped_channel", words(block(5, 2), shaper(9, 1 << 4), hit(50)), "array30"),
    "unmapped_collector_array30": ("unmapped_channel", words(block(6, 2), shaper(1, 1), hit(50)), "array30"),
    "shaper_id_zero": ("bad_shaper_id", words(block(1, 2), shaper(0, 1), hit(50)), "belle2-ecl"),
    "hits_cross_block_end": ("missing_hit_words", words(block(1, 2), shaper(1, 0b11), hit(50), hit(50)), "belle2-ecl"),
}


def _bad_cases():
    cases = [(r, r, p, det) for r, (p, det) in BAD_PAYLOADS.items()]
    cases += [(name, r, p, det) for name, (r, p, det) in BAD_PAYLOADS_EXTRA.items()]
    return cases


@pytest.mark.parametrize("name,reason,payload,det", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_payload_rejection(name, reason, payload, det):
    with pytest.raises(rawdata.RawDataError) as e:
        rawdata.unpack_payload(payload, det)
    assert e.value.reason == reason
    # Through a path: the valid events around the bad one are processed.
    good = words(block(1, 3), shaper(1, 0b101), hit(40, 1, 0), hit(70, -1, 2))
    msgs = [envelope(good, evt=1, det=det), envelope(payload, evt=2, det=det), envelope(good, evt=3, det=det)]
    events, stats = run_path(MessageSource(msgs))
    assert stats["received"] == 3 and stats["processed"] == 2 and stats["rejected"] == 1
    assert stats["received"] == stats["processed"] + stats["rejected"]
    assert stats["rejected_by_reason"] == {reason: 1}
    assert [e["rejected"] for e in events] == [False, True, False]
    assert events[1]["reason"] == reason and len(events[1]["digits"]["cell"]) == 0
    assert events[1]["n_out_of_time"] == 0
    for k in (0, 2):
        assert events[k]["digits"]["cell"].tolist() == [1, 3]
        assert events[k]["digits"]["amplitude"].tolist() == [40, 70]


def test_details_say_how_short_and_which_key():
    """Two details a DAQ engineer found too vague: missing_hit_words said "fewer words left" (now how
    many), and a non-string map key said only that (now which key, and what it is)."""
    import msgpack

    with pytest.raises(rawdata.RawDataError) as e:
        rawdata.unpack_payload(words(block(1, 2), shaper(1, 0b111), hit(50)), "belle2-ecl")
    assert e.value.detail == "word 1: shaper 1 of collector 1 has 3 channels set, only 1 words left in the block"
    m = msgpack.unpackb(envelope(words(block(1, 2), shaper(1, 1), hit(50))), raw=False)
    bad = msgpack.packb({**m, 7: b"x"}, use_bin_type=True, strict_types=False)
    with pytest.raises(rawdata.RawDataError) as e:
        rawdata.decode_envelope(bad)
    assert (e.value.reason, e.value.detail) == ("wrong_type", f"map key {len(m) + 1} is int, not a string (keys are str)")


def test_all_payload_reasons_covered():
    import re
    src = open(__import__("os").path.join(__import__("os").path.dirname(__file__), "..", "cpp", "ecl",
                                         "unpacker.cpp")).read()
    codes = set(re.findall(r'fail\("([a-z_]+)"', src))
    assert codes == set(BAD_PAYLOADS)


def test_conditions_file(tmp_path):
    rng = np.random.default_rng(11)
    gain = rng.uniform(0.8, 1.2, 8736)
    t0 = rng.uniform(-20, 20, 8736)
    cond = tmp_path / "cond.json"
    rawdata.write_conditions(cond, "belle2-ecl", gain=gain, t0=t0)
    d = random_digits(rng, "belle2-ecl", 50)
    msgs = rawdata.encode_events("belle2-ecl", 0, 1, np.arange(50), **d)
    # array30 events in the same stream keep the default calibration
    d30 = random_digits(rng, "array30", 10, max_digits=50)
    msgs30 = rawdata.encode_events("array30", 0, 1, np.arange(50, 60), **d30)
    events, stats = run_path(MessageSource(msgs + msgs30), conditions=str(cond))
    assert stats["processed"] == 60
    want = expected_events("belle2-ecl", d, gain, t0) + expected_events("array30", d30)
    for e, w in zip(events, want):
        assert_digits_equal(e["digits"], w)
    # the defaults really differ from the calibrated values
    assert not np.array_equal(events[5]["digits"]["energy"], expected_events("belle2-ecl", d)[5]["energy"])
    # direct binding with the same gains
    env = rawdata.decode_envelope(msgs[5])
    assert_digits_equal(rawdata.unpack_payload(env["ecl"], "belle2-ecl", gain, t0), want[5])


def swapped_channel_map(rng, detector):
    """The linear map with a random quarter of the cells permuted among their addresses and 20
    cells moved to addresses the linear map does not use (collectors 200..255)."""
    m = rawdata.linear_channel_map(detector)
    n = len(m)
    moved = rng.choice(n, n // 4, replace=False)
    m[moved] = m[rng.permutation(moved)]
    far = rng.choice(n, 20, replace=False)
    m[far] = np.stack([rng.choice(np.arange(200, 256), 20, replace=False), rng.integers(1, 13, 20),
                       rng.integers(0, 16, 20)], axis=1)
    return m, far


@pytest.mark.parametrize("detector", ["belle2-ecl", "array30"])
def test_channel_map_from_conditions(tmp_path, detector):
    """The spec's channel map is conditions data a run may override: a producer whose cables
    differ from the linear map writes its payloads with its map; the conditions file tells the
    unpacker, which then gives the same digits as the linear map gives the linear payloads."""
    rng = np.random.default_rng(31)
    n_cells = rawdata.N_CELLS[detector]
    cmap, far = swapped_channel_map(rng, detector)
    gain = rng.uniform(0.8, 1.2, n_cells)
    d = random_digits(rng, detector, 119, max_digits=min(300, n_cells))
    n = int(d["offsets"][-1])  # a last event with every cell on a far address
    d = {"offsets": np.append(d["offsets"], n + len(far)), "cell": np.concatenate([d["cell"], far + 1]),
         **{k: np.concatenate([d[k], d[k][: len(far)]]) for k in ("amplitude", "time_ticks", "quality")}}
    msgs = rawdata.encode_events(detector, 0, 1, np.arange(120), channel_map=cmap, **d)
    assert msgs != rawdata.encode_events(detector, 0, 1, np.arange(120), **d)
    cond = tmp_path / "cond.json"
    rawdata.write_conditions(cond, detector, gain=gain, channel_map=cmap)
    events, stats = run_path(MessageSource(msgs), conditions=str(cond), threads=2, batch_size=32)
    assert stats["processed"] == 120 and stats["rejected"] == 0
    for e, w in zip(events, expected_events(detector, d, gain)):
        assert_digits_equal(e["digits"], w)
    # the same bytes read with the linear map: other cells, and the far addresses map to nothing
    events, stats = run_path(MessageSource(msgs))
    assert stats["rejected"] > 0 and {e["reason"] for e in events if e["rejected"]} == {"unmapped_channel"}
    moved = np.flatnonzero((cmap != rawdata.linear_channel_map(detector)).any(axis=1)) + 1
    kept = [(e, w) for e, w in zip(events, expected_events(detector, d))
            if not e["rejected"] and np.isin(w["cell"], moved).any()]
    assert len(kept) >= 10 and all(not np.array_equal(e["digits"]["cell"], w["cell"]) for e, w in kept)
    # a linear address that the override leaves without a crystal is unmapped_channel
    free = int(far[0])  # its linear address (collector, shaper, channel) is now unused
    linear = rawdata.encode_events(detector, 0, 1, [7], [0, 1], [free + 1], [100], [0], [0])
    events, stats = run_path(MessageSource(linear), conditions=str(cond))
    assert events[0]["reason"] == "unmapped_channel"
    # the direct binding with the same map
    env = rawdata.decode_envelope(msgs[5])
    assert_digits_equal(rawdata.unpack_payload(env["ecl"], detector, gain, None, cmap),
                        expected_events(detector, d, gain)[5])


def test_conditions_per_run(tmp_path):
    """Payloads with intervals of validity (basf2's [exp_low, run_low, exp_high, run_high], -1
    open): each event is unpacked with the payload of its (exp, run); a run no payload of its
    detector covers is rejected as no_conditions and kept; a detector without payloads keeps the
    defaults for every run."""
    rng = np.random.default_rng(5)
    g1, g2 = rng.uniform(0.8, 1.2, (2, 8736))
    t0 = rng.uniform(-20, 20, 8736)
    cmap, _ = swapped_channel_map(rng, "belle2-ecl")
    cond = tmp_path / "cond.json"
    rawdata.write_conditions(cond, payloads=[
        rawdata.conditions_payload("belle2-ecl", gain=g2, t0=t0, channel_map=cmap, iov=[0, 6, 1, 3]),
        rawdata.conditions_payload("belle2-ecl", gain=g1, iov=[-1, -1, 0, 5]),
        rawdata.conditions_payload("belle2-ecl", iov=[2, -1, -1, -1]),
    ])
    runs = [(0, 1), (0, 5), (0, 6), (1, 3), (1, 4), (2, 0), (7, 99)]
    want_cal = [(g1, None, None), (g1, None, None), (g2, t0, cmap), (g2, t0, cmap), None, (None, None, None),
                (None, None, None)]
    msgs, want = [], []
    for k, ((exp, run), cal) in enumerate(zip(runs, want_cal)):
        d = random_digits(rng, "belle2-ecl", 30)
        cm = None if cal is None else cal[2]
        msgs += rawdata.encode_events("belle2-ecl", exp, run, np.arange(30) + 100 * k, channel_map=cm, **d)
        want += [None] * 30 if cal is None else expected_events("belle2-ecl", d, cal[0], cal[1])
    d30 = random_digits(rng, "array30", 10, max_digits=50)  # array30: no payload, defaults in any run
    msgs += rawdata.encode_events("array30", 1, 4, np.arange(10), **d30)
    want += expected_events("array30", d30)
    rejected = tmp_path / "rejected.msgpack"
    path = eclreco.create_path()
    path.add_module(MessageSource(msgs))
    path.add_module("ECLUnpacker", conditions=str(cond))
    from _raw_helpers import Collect
    col = Collect()
    path.add_module(col)
    path.add_module("RejectedOutput", filename=str(rejected))
    eclreco.process(path, batch_size=16, threads=2, install_signal_handlers=False)
    stats = eclreco.statistics.summary()
    assert stats["processed"] == len(msgs) - 30 and stats["rejected"] == 30
    for e, w in zip(col.events, want):
        if w is None:
            assert e["rejected"] and e["reason"] == "no_conditions" and (e["exp"], e["run"]) == (1, 4)
        else:
            assert not e["rejected"]
            assert_digits_equal(e["digits"], w)
    kept = list(msgpack.Unpacker(open(rejected, "rb"), raw=False))
    assert len(kept) == 30 and {k["reason"] for k in kept} == {"no_conditions"}
    assert "covers exp 1 run 4" in kept[0]["detail"] and "[0, 6, 1, 3]" in kept[0]["detail"]
    assert [k["message"] for k in kept] == msgs[4 * 30:5 * 30]


def test_conditions_writer_refuses_what_the_unpacker_would(tmp_path):
    lin = rawdata.linear_channel_map("array30")
    dup, far = lin.copy(), lin.copy()
    dup[1] = dup[0]
    far[0] = [256, 1, 0]
    for kwargs, match in [({"iov": [0, 1, 2]}, "iov must be"), ({"iov": [0, True, 1, 1]}, "iov must be"),
                          ({"iov": [0, -2, 1, 1]}, "iov must be"), ({"channel_map": lin[:899]}, r"shape \(900, 3\)"),
                          ({"channel_map": lin.astype(float)}, "integer array"),
                          ({"channel_map": dup}, "an address for two cells"), ({"channel_map": far}, "collector 1..255")]:
        with pytest.raises(ValueError, match=match):
            rawdata.conditions_payload("array30", **kwargs)
    with pytest.raises(ValueError, match="an address for two cells"):
        rawdata.encode_events("array30", 0, 1, [0], [0, 1], [5], [100], [0], [0], channel_map=dup)
    with pytest.raises(ValueError, match="needs a detector"):
        rawdata.write_conditions(tmp_path / "c.json")
    with pytest.raises(ValueError, match="not both"):
        rawdata.write_conditions(tmp_path / "c.json", "array30", payloads=[rawdata.conditions_payload("array30")])
    # what it writes, the unpacker reads (the linear map given explicitly = the default)
    rawdata.write_conditions(tmp_path / "c.json", payloads=[rawdata.conditions_payload("array30", channel_map=lin,
                                                                                       iov=[0, -1, 0, -1])])
    d = random_digits(np.random.default_rng(1), "array30", 20, max_digits=100)
    events, stats = run_path(MessageSource(rawdata.encode_events("array30", 0, 3, np.arange(20), **d)),
                             conditions=str(tmp_path / "c.json"))
    assert stats["processed"] == 20 and stats["rejected"] == 0
    for e, w in zip(events, expected_events("array30", d)):
        assert_digits_equal(e["digits"], w)


@pytest.mark.parametrize("content,match", [
    ("{not json", "invalid JSON"),
    ('{"gain": [1.0]}', "detector"),
    ('{"detector": "cms", "gain": [1.0]}', "unknown detector"),
    ('{"detector": "array30", "gain": [1.0, 2.0]}', "900 cells"),
    ('{"detector": "array30", "gains": []}', "unknown key"),
    ('{"detector": "array30", "t0": ' + json.dumps([0] * 899 + ["x"]) + '}', "not a finite number"),
    # found by a robustness review: each used to crash, pass or give a unreadable message
    ('{"detector": "array30", "gain": ' + "[" * 200000 + "]" * 200000 + "}", "nested deeper than 64"),
    ('{"detector": "array30", "gain": ' + json.dumps([1.0] * 899 + [0.0]) + '}', r"'gain'\[899\] \(cellId 900\) must be in \(0, 1e6\]"),
    ('{"detector": "array30", "gain": ' + json.dumps([1.0] * 899 + [-1.0]) + '}', "must be in"),
    ('{"detector": "array30", "gain": ' + json.dumps([1.0] * 899 + [1e300]) + '}', "must be in"),
    ('{"detector": "array30", "t0": ' + json.dumps([0.0] * 899 + [1e30]) + '}', "beyond 1 ms"),
    ('{"detector": "array30", "gain": [' + ", ".join(["1.0"] * 899) + ', 0x1p0]}', "bad number|expected"),
    ('{"detector": "array30", "gain": [' + ", ".join(["1.0"] * 899) + ', 1e999]}', "not a finite number"),
    ('{"detector": "array30", "detector": "array30"}', "appears twice"),
    ('\ufeff{"detector": "array30"}', r"unexpected character '\\xef'"),
    ('{"detector": "array30", "g\u00e4in": []}', r"unknown key 'g\\xc3\\xa4in'"),
    # several payloads, channel maps, intervals of validity
    ("[]", "empty array of payloads"),
    ("5", "JSON object \\(one payload\\) or an array"),
    ('[{"detector": "array30"}, {"detector": "array30", "gains": []}]', "payload 1: unknown key 'gains'"),
    ('[{"detector": "array30"}, 3]', "payload 1: a payload is a JSON object"),
    ('{"detector": "array30", "channel_map": ' + json.dumps(LINEAR30[:899]) + '}', "899 entries, expected 900"),
    ('{"detector": "array30", "channel_map": ' + json.dumps(LINEAR30[:899] + [[256, 1, 0]]) + '}',
     r"'channel_map'\[899\] \(cellId 900\): collector must be an integer in 1..255"),
    ('{"detector": "array30", "channel_map": ' + json.dumps(LINEAR30[:899] + [[1, 13, 0]]) + '}', "shaper must be"),
    ('{"detector": "array30", "channel_map": ' + json.dumps(LINEAR30[:899] + [[1, 1, 16]]) + '}', "channel must be"),
    ('{"detector": "array30", "channel_map": ' + json.dumps(LINEAR30[:899] + [[1, 1, 0.5]]) + '}', "channel must be"),
    ('{"detector": "array30", "channel_map": ' + json.dumps(LINEAR30[:899] + [[1, 1]]) + '}',
     r"must be \[collector, shaper, channel\]"),
    ('{"detector": "array30", "channel_map": ' + json.dumps(LINEAR30[:899] + [[1, 1, 0]]) + '}',
     r"cellId 900\): address \(1, 1, 0\) already reads cellId 1"),
    ('{"detector": "array30", "channel_map": 7}', "must be an array of"),
    ('{"detector": "array30", "iov": [0, 1, 2]}', "exp_low, run_low, exp_high, run_high"),
    ('{"detector": "array30", "iov": [0, 1.5, 2, 3]}', "run_low .* must be an integer in -1..9007199254740992"),
    ('{"detector": "array30", "iov": [0, -2, 2, 3]}', "run_low"),
    ('{"detector": "array30", "iov": [-1, 3, 2, 3]}', "a run bound needs its experiment"),
    ('{"detector": "array30", "iov": [0, 3, -1, 3]}', "a run bound needs its experiment"),
    ('{"detector": "array30", "iov": [2, 0, 1, 5]}', "ends before it starts"),
    ('[{"detector": "array30", "iov": [0, 0, 0, 10]}, {"detector": "array30", "iov": [0, 10, -1, -1]}]',
     r"overlapping intervals of validity \[0, 0, 0, 10\] and \[0, 10, -1, -1\]"),
    ('[{"detector": "array30"}, {"detector": "array30", "iov": [5, -1, 5, -1]}]', "overlapping"),
])
def test_bad_conditions_file(tmp_path, content, match):
    cond = tmp_path / "bad.json"
    cond.write_text(content)
    msgs = rawdata.encode_events("array30", 0, 1, [0], [0, 0], [], [], [], [])
    with pytest.raises(Exception, match=match):
        run_path(MessageSource(msgs), conditions=str(cond))


def test_missing_conditions_file(tmp_path):
    with pytest.raises(Exception, match="cannot open conditions"):
        run_path(MessageSource([]), conditions=str(tmp_path / "nope.json"))
    with pytest.raises(Exception, match="not a regular file"):
        run_path(MessageSource([]), conditions=str(tmp_path))


def test_unpacker_without_raw_data_flags_module_error():
    class Empty(eclreco.Module):
        def __init__(self):
            super().__init__()
            self.done = False

        def is_source(self):
            return True

        def next_batch(self, batch, max_events):
            batch.resize(2)
            return False

    events, stats = run_path(Empty())
    assert stats["errors"] == 2


def test_mutated_payloads_never_crash():
    """Light fuzzing: random word edits of valid payloads give digits (sorted, in range) or a known reason."""
    rng = np.random.default_rng(123)
    known = set(BAD_PAYLOADS)
    for det, n_cells in (("belle2-ecl", 8736), ("array30", 900)):
        d = random_digits(rng, det, 20, max_digits=40)
        msgs = rawdata.encode_events(det, 0, 1, np.arange(20), **d)
        payloads = [rawdata.decode_envelope(m)["ecl"] for m in msgs]
        for _ in range(1500):
            w = bytearray(payloads[rng.integers(len(payloads))])
            for _ in range(rng.integers(1, 3)):
                if len(w) >= 4 and rng.random() < 0.7:
                    k = 4 * rng.integers(len(w) // 4)
                    w[k + rng.integers(4)] ^= 1 << rng.integers(8)
                else:
                    w += bytes(rng.integers(0, 256, rng.choice([1, 4, 8])).astype(np.uint8))
            try:
                got = rawdata.unpack_payload(bytes(w), det)
            except rawdata.RawDataError as e:
                assert e.reason in known
                continue
            c = got["cell"]
            assert np.all((c >= 1) & (c <= n_cells)) and np.all(np.diff(c) > 0)


@pytest.mark.parametrize("offset,size", [(10**8, 16), (-10**8, 16), (40, 10**5), (0, -5)])
def test_a_payload_ref_outside_its_message_is_an_event_error(tmp_path, offset, size):
    """A source that builds RawPayloadRef itself (not with _core.append_envelopes) and gets an
    event's offset or size wrong: the unpacker read bytes outside the message (a segfault for
    offset 1e8, a read past its end for size 1e5, a bad_alloc text for size -5). It is now that
    event's module error, naming RawPayloadRef; the other event is unpacked."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json
        import numpy as np, eclreco
        from eclreco import _core, rawdata
        msgs = rawdata.encode_events("belle2-ecl", 0, 1, [0, 1], [0, 2, 4], np.array([10, 11, 20, 21], np.int32),
                                     np.full(4, 1000, np.int32), np.zeros(4, np.int32), np.zeros(4, np.uint8))
        class Src(eclreco.Module):
            def is_source(self):
                return True
            def next_batch(self, batch, max_events):
                _core.append_envelopes(batch, msgs)
                ref = batch["RawPayloadRef"]
                cols = {{k: np.array(ref[k]) for k in ref.columns()}}
                cols["offset"][0], cols["size"][0] = {offset}, {size}
                batch.add_collection("RawPayloadRef", ref.offsets, cols)
                return False
        class Rec(eclreco.Module):
            def event(self, batch):
                print("digits", np.diff(batch["ECLDigits"].offsets).tolist())
                print("errors", json.dumps(batch.errors()))
        p = eclreco.create_path()
        p.add_module(Src())
        p.add_module("ECLUnpacker")
        p.add_module(Rec())
        eclreco.process(p, install_signal_handlers=False)
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "digits [0, 2]" in r.stdout, r.stdout
    errors = json.loads(r.stdout.split("errors ", 1)[1])
    assert list(errors) == ["0"], errors
    assert errors["0"].startswith("ECLUnpacker raised on exp 0 run 1 evt 0: RawPayloadRef puts the payload at offset "), errors


def test_conditions_file_digest_is_of_the_bytes_parsed(tmp_path):
    """provenance() gives the conditions file's absolute path and the SHA-256 of the bytes ECLUnpacker parsed
    (hashlib's digest, at every length around SHA-256's 64-byte blocks and for a full belle2-ecl payload); a file
    rewritten after initialize keeps the digest of what was loaded. Without a file: nothing (the parameter says
    '')."""
    import hashlib
    import os

    from eclreco import _core

    cond = tmp_path / "cond.json"
    payload = json.dumps({"detector": "array30", "iov": [0, 0, 0, 5]}).encode()
    for pad in range(0, 140):  # JSON whitespace: every tail length of the last block(s)
        cond.write_bytes(payload + b" " * pad)
        m = _core.create_cpp_module("ECLUnpacker")
        m.set_param("conditions", str(cond))
        m.initialize()
        assert m.provenance() == {"conditions": {"path": str(cond), "sha256": hashlib.sha256(cond.read_bytes()).hexdigest()}}
    rawdata.write_conditions(cond, "belle2-ecl", gain=np.linspace(0.9, 1.1, 8736), t0=np.zeros(8736))
    loaded = hashlib.sha256(cond.read_bytes()).hexdigest()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        m = _core.create_cpp_module("ECLUnpacker")
        (tmp_path / "sub").mkdir()
        m.set_param("conditions", "./sub/../cond.json")  # recorded as os.path.abspath gives it
        m.initialize()
    finally:
        os.chdir(cwd)
    cond.write_bytes(payload)  # replaced after the job read it
    assert m.provenance() == {"conditions": {"path": str(cond), "sha256": loaded}}
    assert _core.create_cpp_module("ECLUnpacker").provenance() == {}
