"""Framework core: batches, parameters, paths, the processor, statistics."""
import ast
import glob
import os
import platform
import re
import subprocess
import sys

import numpy as np
import pytest

import eclreco
from helpers import CountingSource, Recorder, assert_checked_float, kill_if_running


def test_batch_columns_are_zero_copy_views():
    b = eclreco.EventBatch(3)
    c = b.add_collection("X", np.array([0, 2, 2, 5]), {"e": np.arange(5, dtype=np.float32)})
    view = b["X"]["e"]
    assert np.shares_memory(view, b["X"]["e"])  # both look at the C++ column's buffer
    # read-only: the processor's snapshot for re-running a failed module shares that buffer
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 42.0
    b["X"]["e"] = view * 2  # a write replaces the column
    assert b["X"]["e"].tolist() == [0, 2, 4, 6, 8] and view.tolist() == [0, 1, 2, 3, 4]
    assert len(b) == 3 and list(c.offsets) == [0, 2, 2, 5]
    with pytest.raises(KeyError):
        b["missing"]
    with pytest.raises(ValueError):
        b.add_collection("Y", np.array([0, 1]), {})


def test_a_column_is_set_from_a_list_like_a_new_collection_and_a_scalar_gets_one_line():
    """Collection[name] = [...] was refused with pybind11's multi-line 'incompatible function arguments'
    (only an ndarray was taken there, while add_collection converts lists), and so was a scalar."""
    b = eclreco.EventBatch(2)
    c = b.add_collection("X", np.array([0, 1, 3]), {"e": [1.0, 2.0, 3.0]})
    c["n"] = [1, 2, 3]
    assert c["n"].tolist() == [1, 2, 3] and c["n"].dtype == np.asarray([1, 2, 3]).dtype
    c["k"] = (True, False, True)
    assert c["k"].dtype == np.bool_
    # which collection, as for a wrong length (docs/architecture.md, "Data model"): it named the column only
    with pytest.raises(ValueError, match=r"^column 'z' needs one value per row \(collection 'X' has 3\), not a scalar$"):
        c["z"] = 1.0
    with pytest.raises(ValueError, match=r"^column 'w' has 2 rows, collection 'X' has 3$"):  # which collection
        c["w"] = [1.0, 2.0]
    with pytest.raises(TypeError, match=r"^unsupported dtype for a column: object$"):
        c["o"] = [None, 1, 2]
    with pytest.raises(ValueError, match=r"^column 'r': setting an array element with a sequence"):
        c["r"] = [[1], [1, 2], [3]]
    with pytest.raises(ValueError, match=r"^column 'r': setting an array element with a sequence"):
        b.add_collection("Y", np.array([0, 1, 3]), {"r": [[1], [1, 2], [3]]})
    assert set(c.columns()) == {"e", "n", "k"}


def test_view_survives_batch():
    b = eclreco.EventBatch(1)
    b.add_collection("X", np.array([0, 3]), {"e": np.array([1.0, 2.0, 3.0])})
    v = b["X"]["e"]
    del b
    assert v.tolist() == [1.0, 2.0, 3.0]


def test_select_and_concat_roundtrip():
    b = eclreco.EventBatch(4)
    b.evt[:] = [10, 11, 12, 13]
    b.add_collection("X", np.array([0, 1, 3, 3, 6]), {"v": np.arange(6, dtype=np.int32)})
    parts = [b.select([i]) for i in range(4)]
    c = eclreco.EventBatch.concat(parts)
    assert c.evt.tolist() == [10, 11, 12, 13]
    assert c["X"].offsets.tolist() == [0, 1, 3, 3, 6]
    assert c["X"]["v"].tolist() == list(range(6))
    s = b.select([3, 1])
    assert s["X"]["v"].tolist() == [3, 4, 5, 1, 2]


def test_unknown_parameter_and_wrong_type_raise_at_add_module():
    path = eclreco.create_path()
    with pytest.raises(eclreco.ParameterError, match="Progress.*unknown parameter 'interval'"):
        path.add_module("Progress", interval=3)
    with pytest.raises(TypeError, match="Progress: parameter 'interval_s' must be float"):
        path.add_module("Progress", interval_s="often")
    with pytest.raises(TypeError, match="RootOutput: parameter 'filename' must be str"):
        path.add_module("RootOutput", filename=3)
    with pytest.raises(ValueError, match="unknown module 'NoSuchModule'"):
        path.add_module("NoSuchModule")


def test_an_unknown_parameter_error_lists_the_modules_parameters():
    """A misspelt parameter (basf2's outputFileName for RootOutput's filename) was refused without
    saying which names the module takes: the list that Parameters::set builds was never reached from
    add_module, which looked the name up with get() first."""
    path = eclreco.create_path()
    with pytest.raises(eclreco.ParameterError, match=r"^RootOutput: unknown parameter 'outputFileName' "
                                                     r"\(parameters: filename, tree, basket_events, .*flush_interval_s\)$"):
        path.add_module("RootOutput", outputFileName="out.root")
    with pytest.raises(eclreco.ParameterError, match=r"NoOp: unknown parameter 'x' \(parameters: none\)"):
        path.add_module("NoOp", x=1)

    class Cut(eclreco.Module):
        def __init__(self):
            super().__init__()
            self.add_param("threshold_gev", 1.0, "energy threshold")

    with pytest.raises(eclreco.ParameterError, match=r"Cut: unknown parameter 'threshold' \(parameters: threshold_gev\)"):
        path.add_module(Cut(), threshold=2.0)
    with pytest.raises(eclreco.ParameterError, match=r"Cut: unknown parameter 'thr' \(parameters: threshold_gev\)"):
        Cut().param("thr")


def test_reading_a_required_parameter_that_is_not_set_raises():
    """Module.param of a required parameter not set yet gave False (the empty value), whatever its type:
    a module tried outside a path (m = MyModule(); m.initialize()) computed with it silently."""

    class NeedsCut(eclreco.Module):
        def __init__(self):
            super().__init__()
            self.add_param("cut_gev", description="energy cut", type="float")

    m = NeedsCut()
    with pytest.raises(eclreco.ParameterError, match="^NeedsCut: required parameter 'cut_gev' is not set$"):
        m.param("cut_gev")
    with pytest.raises(eclreco.ParameterError, match="^RawFileInput: required parameter 'filename' is not set$"):
        eclreco.create_module("RawFileInput").get_param("filename")
    m.set_param("cut_gev", 0.5)
    assert m.param("cut_gev") == 0.5


def test_required_parameter():
    class NeedsX(eclreco.Module):
        """needs x"""

        def __init__(self):
            super().__init__()
            self.add_param("x", eclreco.REQUIRED, "x", type="float")

    m = NeedsX()
    with pytest.raises(eclreco.ParameterError, match="required parameter 'x'"):
        eclreco.create_path().add_module(m)
    m.set_param("x", 2)  # an int is a valid float
    assert m.param("x") == 2.0


def test_python_module_between_cpp_modules_sees_every_event():
    seen = []

    class Reader(eclreco.Module):
        """reads numpy views"""

        def event(self, batch):
            d = batch["ECLDigits"]
            assert isinstance(d["energy"], np.ndarray) and d.offsets[-1] == len(d["energy"])
            seen.extend(batch.evt.tolist())

    path = eclreco.create_path()
    path.add_module(CountingSource(1000))
    path.add_module("Progress", interval_s=100.0)
    path.add_module(Reader())
    path.add_module("Progress", interval_s=100.0)
    rec = path.add_module(Recorder())
    eclreco.process(path, batch_size=64)
    assert seen == list(range(1000))
    assert rec.evt == list(range(1000))
    s = eclreco.statistics.summary()
    assert s["received"] == s["processed"] == 1000 and s["rejected"] == 0
    assert [m["events"] for m in s["modules"]] == [1000] * 5


@pytest.mark.parametrize("threads", [1, 2])
def test_a_module_may_keep_batches_after_the_call(threads):
    """A Python module that keeps the batch object beyond event() (a list of batches) keeps a
    copy-on-write copy: after the run every kept batch still reads what the module saw, and the
    chain's output is unchanged. (Before: a pointer into the processor's batch, which dangled.)"""

    class Keeper(eclreco.Module):
        def __init__(self):
            super().__init__()
            self.kept, self.seen = [], []

        def event(self, batch):
            self.kept.append(batch)
            d = batch["ECLDigits"]
            self.seen.append((batch.evt.copy(), np.asarray(d["energy"]).copy(), np.asarray(d.offsets).copy()))
            d["energy"] = np.asarray(d["energy"]) * 2  # a change the later modules must see

    path = eclreco.create_path()
    path.add_module(CountingSource(2000, run_length=700))
    keeper = path.add_module(Keeper())
    rec = path.add_module(Recorder())
    eclreco.process(path, threads=threads, batch_size=64)
    assert rec.evt == list(range(2000))
    assert sum(len(b) for b in keeper.kept) == 2000
    for b, (evt, energy, off) in zip(keeper.kept, keeper.seen):
        np.testing.assert_array_equal(b.evt, evt)
        np.testing.assert_array_equal(np.asarray(b["ECLDigits"].offsets), off)
        np.testing.assert_allclose(np.asarray(b["ECLDigits"]["energy"]), 2 * energy)
    # the change made by Keeper reached the next module
    assert rec.digit_sums == pytest.approx([s * 2 for s in _digit_sums_without_change(2000, 700)])


def _digit_sums_without_change(n, run_length):
    path = eclreco.create_path()
    path.add_module(CountingSource(n, run_length=run_length))
    rec = path.add_module(Recorder())
    eclreco.process(path, batch_size=64)
    return rec.digit_sums


@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_threads_two_gives_same_output_as_one(batch_size):
    results = []
    for threads in (1, 2):
        path = eclreco.create_path()
        path.add_module(CountingSource(3000, run_length=700))
        rec = path.add_module(Recorder())
        eclreco.process(path, threads=threads, batch_size=batch_size)
        results.append((rec.evt, rec.digit_sums, rec.runs))
    assert results[0] == results[1]
    assert results[0][0] == list(range(3000))
    assert results[0][2] == [(1, r) for r in range(5)]


def test_max_events():
    path = eclreco.create_path()
    path.add_module(CountingSource(1000))
    rec = path.add_module(Recorder())
    eclreco.process(path, max_events=130, batch_size=50)
    assert rec.evt == list(range(130))


def test_exception_flags_only_the_failing_event_and_run_goes_on(capfd):
    class Fails(eclreco.Module):
        """fails on evt 77"""

        def event(self, batch):
            if 77 in batch.evt:
                raise RuntimeError("bad event")

    for threads in (1, 2):
        path = eclreco.create_path()
        path.add_module(CountingSource(300))
        path.add_module(Fails())
        rec = path.add_module(Recorder())
        eclreco.process(path, threads=threads, batch_size=32)
        assert rec.evt == list(range(300))
        flagged = [e for e, f in zip(rec.evt, rec.flags) if f & eclreco.ERROR_MODULE]
        assert flagged == [77]
        s = eclreco.statistics.summary()
        assert s["errors"] == 1 and s["processed"] == 300
    err = capfd.readouterr().err
    assert "Fails raised on exp 1 run 0 evt 77" in err and "bad event" in err


def test_path_needs_one_source():
    path = eclreco.create_path()
    path.add_module("Progress")
    with pytest.raises(Exception, match="input module"):
        eclreco.process(path)
    path = eclreco.create_path()
    path.add_module(CountingSource(10))
    path.add_module(CountingSource(10))
    with pytest.raises(Exception, match="one input module"):
        eclreco.process(path)


def test_progress_prints_every_n_events(capfd):
    """Progress `every`: a line each time the count passes a multiple (batches of 100, every 250:
    at 300, 500, 800 and 1000 events), and none by time (interval_s far away)."""
    path = eclreco.create_path()
    path.add_module(CountingSource(1000))
    path.add_module("Progress", interval_s=1000.0, every=250)
    eclreco.process(path, batch_size=100)
    lines = [ln for ln in capfd.readouterr().out.splitlines() if ln.startswith("[Progress]")]
    assert [int(ln.split()[1]) for ln in lines[:-1]] == [300, 500, 800, 1000], lines
    assert lines[-1].startswith("[Progress] done: 1000 events")


def test_statistics_table_lists_modules():
    path = eclreco.create_path()
    path.add_module(CountingSource(100))
    path.add_module("Progress", interval_s=100.0)
    eclreco.process(path)
    text = str(eclreco.statistics)
    assert "CountingSource" in text and "Progress" in text and "events/s" in text


def test_module_list_and_help(capsys):
    from eclreco.cli import main

    assert main(["modules"]) == 0
    out = capsys.readouterr().out
    assert "RootOutput" in out and "Progress" in out
    assert main(["modules", "Progress"]) == 0
    out = capsys.readouterr().out
    assert "interval_s" in out and "float" in out
    # what a module reads and adds, checked at initialize: said where its parameters are
    assert "\nRequires: (none)\nMakes: (none)\n" in out
    assert main(["modules", "ECLUnpacker"]) == 0
    out = capsys.readouterr().out
    assert ("\nRequires: RawEnvelopes, RawPayloadRef (default parameters)\n"
            "Makes: ECLDigits, ECLEventInformation (default parameters)\n") in out
    # an error, on stderr (it went to stdout), exit 2 as for any bad argument (it was 1); '' printed the list
    for name in ("Foo", ""):
        assert main(["modules", name]) == 2
        out, err = capsys.readouterr()
        assert f"eclreco modules: error: unknown module '{name}'; available: " in err and not out, err
    # every module's table fits a terminal: RootOutput's default list of cluster columns made it 194
    # characters wide; a wrapped default still reads back whole
    for name in eclreco.available_modules():
        assert main(["modules", name]) == 0
        out = capsys.readouterr().out
        assert max(len(line) for line in out.splitlines()[1:]) <= 125, (name, out)
    assert main(["modules", "RootOutput"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("Parameter"))
    a, b = header.index("Default"), header.index("Description")
    first = next(i for i, line in enumerate(lines) if line.startswith("cluster_columns"))
    parts = [lines[first][a:b].strip()]
    for line in lines[first + 1:]:
        if line[:a].strip() or not line[a:b].strip():  # the next parameter, or the default has ended
            break
        parts.append(line[a:b].strip())
    default = " ".join(parts)
    assert default == repr(eclreco.create_module("RootOutput").get_param("cluster_columns"))


def test_gather_rows_per_row_and_per_event_blocks():
    """_core.gather_rows: selected rows of per-row blocks side by side with their event's values."""
    from eclreco import _core

    off = np.array([0, 2, 2, 5], np.int64)  # events of 2, 0 and 3 rows
    a = np.arange(10, dtype=np.float32).reshape(5, 2)
    ev = np.array([[100], [200], [300]], np.float32)
    rows = np.array([1, 2, 4], np.int64)
    out = _core.gather_rows(rows, off, [a, ev], [False, True])
    np.testing.assert_array_equal(out, [[2, 3, 100], [4, 5, 300], [8, 9, 300]])
    assert _core.gather_rows(np.zeros(0, np.int64), off, [a], [False]).shape == (0, 2)
    with pytest.raises(ValueError, match="ascending"):
        _core.gather_rows(np.array([2, 1]), off, [a], [False])
    with pytest.raises(ValueError, match="rows, expected 3"):
        _core.gather_rows(rows, off, [a, ev[:2]], [False, True])


def _inference_batch():
    """An EventBatch of 6 events for _core.inference_inputs: clusters with NaN and boundary values, an event
    without clusters and without an ECLEventInformation row, events of both detectors."""
    from eclreco import _core

    rng = np.random.default_rng(3)
    counts = np.array([4, 0, 3, 5, 2, 6])
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(off[-1])
    e = rng.uniform(0.0, 0.3, n).astype(np.float32)
    e[[0, 5, 9]] = [0.05, np.nan, 0.25]  # at the threshold, NaN, above max_value below
    t = rng.uniform(-100, 100, n).astype(np.float32)
    t[[1, 6]] = [np.nan, 50.0]  # NaN time: never inside; at the window's edge: inside
    b = _core.EventBatch(6)
    b.detector[:] = [0, 0, 0, 1, 0, 1]
    b.add_collection("ECLClusters", off, {
        "energy_raw": e, "time": t, "energy": e * 1.1,
        "features": rng.normal(size=(n, 3)).astype(np.float32),
        "image": rng.normal(size=(n, 2, 2)).astype(np.float32)})
    info_off = np.array([0, 1, 1, 2, 3, 4, 5], np.int64)  # event 1 (no clusters) has no row
    b.add_collection("ECLEventInformation", info_off, {"n_out_of_time_digits": np.array([7, 8, 9, 10, 11], np.int32)})
    return b, off, e, t


def test_inference_inputs_match_numpy():
    """_core.inference_inputs (ECLEnergyCorrection's one call per batch): the selection as numpy computes it in
    float32 over the events worked on (not discarded or rejected, of the detector asked for), the count of rows
    left out by their time alone, and the gathered images and features with the event's value per row."""
    from eclreco import _core

    b, off, e, t = _inference_batch()
    ev_of = np.repeat(np.arange(6), np.diff(off))
    per_event = np.array([7, np.nan, 8, 9, 10, 11], np.float32)
    cl = b["ECLClusters"]
    blocks = [("", "features"), ("", "energy"), ("ECLEventInformation", "n_out_of_time_digits")]

    def expected(lo, hi, max_abs, events):
        above = (e >= np.float32(lo)) & np.isin(ev_of, events)
        inside = np.abs(t) <= np.float32(max_abs) if max_abs > 0 else np.ones(e.size, bool)
        keep = above & inside & ((e <= np.float32(hi)) if hi > 0 else True)
        return np.flatnonzero(keep), int((above & ~inside).sum())

    b.discard(4, "test")
    for lo, hi, max_abs, det, events in ((0.05, 0.2, 50.0, None, [0, 1, 2, 3, 5]), (0.05, 0.0, 0.0, None, [0, 1, 2, 3, 5]),
                                         (0.1, 0.0, 50.0, 0, [0, 1, 2]), (0.0, 0.28, 60.0, 1, [3, 5])):
        rows, outside, images, features, found = _core.inference_inputs(b, "ECLClusters", blocks, lo, hi, max_abs, det)
        want, want_outside = expected(lo, hi, max_abs, events)
        assert found == (-1 if det is None else det)  # events 0-2 of detector 0, 3 and 5 of detector 1
        assert rows.size > 0 and outside == want_outside
        np.testing.assert_array_equal(rows, want)
        np.testing.assert_array_equal(images, np.asarray(cl["image"])[want])
        np.testing.assert_array_equal(features, np.column_stack([np.asarray(cl["features"])[want], e[want] * 1.1,
                                                                 per_event[ev_of[want]]]))
    assert 5 not in rows.tolist()  # NaN energy: never selected
    for i in (0, 1, 2):
        b.discard(i, "test")
    assert _core.inference_inputs(b, "ECLClusters", blocks, 0.0, 0.0, 0.0)[4] == 1  # the events worked on: one detector
    # no time window: the collection needs no time column
    b2 = _core.EventBatch(1)
    b2.add_collection("C", np.array([0, 2]), {"energy_raw": np.array([1, 2], np.float32),
                                              "image": np.zeros((2, 1), np.float32)})
    rows, outside, images, features, found = _core.inference_inputs(b2, "C", [], 1.5, 0.0, 0.0)
    assert rows.tolist() == [1] and outside == 0 and images.shape == (1, 1) and features.shape == (1, 0) and found == 0
    for blocks, max_abs, missing in (([], 10.0, "time"), ([("", "nope")], 0.0, "nope")):  # KeyError: Module.require_columns
        with pytest.raises(KeyError, match=missing):
            _core.inference_inputs(b2, "C", blocks, 1.5, 0.0, max_abs)


def test_inference_inputs_refuse_event_values_they_cannot_place():
    """An event with clusters and no row of the event-level collection, an event with several rows, or a batch
    without that collection: a ValueError naming it, not a NaN or a neighbour's value fed to the network."""
    from eclreco import _core

    b, off, e, t = _inference_batch()
    block = [("ECLEventInformation", "n_out_of_time_digits")]
    info = np.array([7, 8, 9, 10, 11], np.int32)
    b.add_collection("ECLEventInformation", np.array([0, 1, 2, 2, 3, 4, 5]), {"n_out_of_time_digits": info})
    with pytest.raises(ValueError, match=r"1 event\(s\) with rows in ECLClusters have no row in ECLEventInformation "
                                         r"\(first: event 2 of the batch\)"):
        _core.inference_inputs(b, "ECLClusters", block, 0.0, 0.0, 0.0)
    b.discard(2, "test")  # an event not worked on needs no row
    assert _core.inference_inputs(b, "ECLClusters", block, 0.0, 0.0, 0.0)[0].size > 0
    b.add_collection("ECLEventInformation", np.array([0, 1, 1, 3, 4, 5, 5]), {"n_out_of_time_digits": info})
    with pytest.raises(ValueError, match="ECLEventInformation.n_out_of_time_digits has one row per event, but event 2 "
                                         "of the batch has 2 rows"):
        _core.inference_inputs(b, "ECLClusters", block, 0.0, 0.0, 0.0)
    b.remove("ECLEventInformation")
    with pytest.raises(ValueError, match="the batch has no ECLEventInformation"):
        _core.inference_inputs(b, "ECLClusters", block, 0.0, 0.0, 0.0)
    assert _core.event_rows(np.array([0, 1, 1, 2])).tolist() == [0, -1, 1]
    with pytest.raises(ValueError, match="event 1 of the batch has 3 rows"):
        _core.event_rows(np.array([0, 1, 4]))


def test_write_rows_writes_a_copy_and_caps_at_the_ratio():
    """_core.write_rows (ECLEnergyCorrection's write-back): the parts' values at the rows, in a new column (a view
    taken before keeps the old values: the processor re-runs a failed module on the batch as it was), capped at
    max_ratio x the old value where they are above it or NaN; what it cannot write is refused, naming it."""
    from eclreco import _core

    b = _core.EventBatch(2)
    b.add_collection("C", np.array([0, 3, 5]), {"e": np.arange(1, 6, dtype=np.float32),
                                                "i": np.arange(5, dtype=np.int32)})
    c = b["C"]
    before = c["e"]
    parts = [np.array([10.0, 2.5], np.float32), np.array([np.nan], np.float32)]
    assert _core.write_rows(c, "e", np.array([0, 2, 4]), parts, 2.0) == 2  # 10 > 2 x 1, NaN: kept
    assert c["e"].tolist() == [1, 2, 2.5, 4, 5] and before.tolist() == [1, 2, 3, 4, 5]
    assert _core.write_rows(c, "e", np.array([0, 2, 4]), parts, 0.0) == 0  # no cap
    np.testing.assert_array_equal(c["e"], [10, 2, 2.5, 4, np.nan])
    with pytest.raises(ValueError, match="parts hold 3 values for 2 rows"):
        _core.write_rows(c, "e", np.array([0, 1]), parts, 2.0)
    with pytest.raises(IndexError, match="rows out of range"):
        _core.write_rows(c, "e", np.array([5]), [np.ones(1, np.float32)], 2.0)
    with pytest.raises(TypeError, match="column 'i' must hold one float32 per row"):
        _core.write_rows(c, "i", np.array([0]), [np.ones(1, np.float32)], 2.0)
    with pytest.raises(KeyError, match="x"):
        _core.write_rows(c, "x", np.array([0]), [np.ones(1, np.float32)], 2.0)


_REQUEST_STOP_SCRIPT = """
import sys
from eclreco import _core
value = eval(sys.argv[1])
try:
    _core.request_stop(value)
except TypeError as err:
    print("TypeError:", err)
print("stop", _core.stop_requested(), "output_failed", _core.output_failed())
"""


@pytest.mark.parametrize("value, out", [
    ("2", "TypeError: output_failed must be a bool (True or False), not int 2\nstop False output_failed False"),
    ("None", "TypeError: output_failed must be a bool (True or False), not NoneType None\nstop False output_failed False"),
    ("0", "TypeError: output_failed must be a bool (True or False), not int 0\nstop False output_failed False"),
    ("True", "stop True output_failed True"),
    ("__import__('numpy').bool_(False)", "stop True output_failed False"),
], ids=["2", "None", "0", "True", "numpy-bool"])
def test_bool_arguments_are_bools(value, out):
    """pybind11's bool cast read None as False and any number as its truth: request_stop(2) stopped the running
    process() as a failed output, request_stop(None) as a plain stop. Only Python's and numpy's bools are taken
    (checked_bool), the others refused naming the argument. A subprocess: the stop flag is the process's."""
    r = subprocess.run([sys.executable, "-c", _REQUEST_STOP_SCRIPT, value], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == out


def test_process_and_gather_rows_take_only_bool_flags():
    """process(install_signal_handlers=None / 0 / 2) and gather_rows' per_event [0, 1, None] were read as flags
    by pybind11's bool cast; refused now with a TypeError naming the argument (process(): before the statistics
    of the last job are replaced), numpy's bools taken."""
    from eclreco import _core
    from eclreco.sources import ArraySource

    path = eclreco.create_path()
    path.add_module(ArraySource("X", np.arange(4), {"a": np.zeros(3)}))
    eclreco.process(path, install_signal_handlers=False)
    for value, shown in [(None, "NoneType None"), (0, "int 0"), (2, "int 2"), ("yes", "str 'yes'")]:
        path = eclreco.create_path()
        path.add_module(ArraySource("X", np.arange(6), {"a": np.zeros(5)}))
        with pytest.raises(TypeError, match=rf"^process\(\): install_signal_handlers must be a bool \(True or False\), "
                                            rf"not {re.escape(shown)}$"):
            eclreco.process(path, install_signal_handlers=value)
        assert eclreco.statistics.summary()["processed"] == 3, value
        with pytest.raises(TypeError, match=rf"^install_signal_handlers must be a bool \(True or False\), not {re.escape(shown)}$"):
            _core.Processor().process(path._cpp, install_signal_handlers=value)
    eclreco.process(path, install_signal_handlers=np.bool_(False))
    assert eclreco.statistics.summary()["processed"] == 5

    off = np.array([0, 2, 2, 5], np.int64)
    a = np.arange(10, dtype=np.float32).reshape(5, 2)
    ev = np.array([[100], [200], [300]], np.float32)
    rows = np.array([1, 2, 4], np.int64)
    for flags, what in [([0, 1], r"per_event\[0\] must be a bool \(True or False\), not int 0"),
                        ([False, None], r"per_event\[1\] must be a bool \(True or False\), not NoneType None"),
                        ([False, 1.0], r"per_event\[1\] must be a bool \(True or False\), not float 1.0"),
                        ("01", r"per_event must be a sequence of bools \(one per block\), not str"),
                        (True, r"per_event must be a sequence of bools \(one per block\), not bool")]:
        with pytest.raises(TypeError, match=f"^{what}$"):
            _core.gather_rows(rows, off, [a, ev], flags)
    for flags in ([False, True], (False, True), np.array([False, True]), [np.bool_(False), np.bool_(True)]):
        np.testing.assert_array_equal(_core.gather_rows(rows, off, [a, ev], flags),
                                      [[2, 3, 100], [4, 5, 300], [8, 9, 300]])


def _clusters(columns, n_events=1):
    """An EventBatch of one collection "C" with `columns` (rows spread over n_events events) and the image column
    _core.inference_inputs gathers (one zero per row): for the selection and the write-back alone."""
    from eclreco import _core

    n = len(next(iter(columns.values())))
    b = _core.EventBatch(n_events)
    b.add_collection("C", np.linspace(0, n, n_events + 1).astype(np.int64),
                     {"image": np.zeros((n, 1), np.float32), **columns})
    return b


def test_inference_inputs_select_as_numpy_in_float32():
    """_core.inference_inputs' selection is flatnonzero(values >= min_value) as numpy computes it in float32
    (float32(0.03) < 0.03 is selected, NaN never), including a selection that ends before the last value (the
    branch-free fill writes one scratch slot past the selection) and none at all; a value column of several
    floats per row is refused, naming it."""
    from eclreco import _core

    rng = np.random.default_rng(3)
    edge = np.float32(0.03)
    cases = [rng.exponential(0.05, 5555).astype(np.float32),
             np.array([edge, np.nextafter(edge, np.float32(0)), np.nan, 1.0, 0.0], np.float32),
             np.array([1.0, 0.0, 0.0], np.float32), np.zeros(0, np.float32), np.full(7, np.inf, np.float32)]
    for v in cases:
        for n_events in (1, 3):
            rows = _core.inference_inputs(_clusters({"energy_raw": v}, n_events), "C", [], 0.03, 0.0, 0.0)[0]
            assert rows.dtype == np.int64
            np.testing.assert_array_equal(rows, np.flatnonzero(v >= edge))
    assert _core.inference_inputs(_clusters({"energy_raw": cases[1]}), "C", [], 0.03, 0.0, 0.0)[0].tolist() == [0, 3]
    with pytest.raises(ValueError, match=r"^energy_raw must have shape \(2,\) \(one per row\), not \(2, 2\)$"):
        _core.inference_inputs(_clusters({"energy_raw": np.zeros((2, 2), np.float32)}), "C", [], 0.0, 0.0, 0.0)


def test_inference_inputs_and_write_rows_match_numpy_on_many_rows():
    """ECLEnergyCorrection's domain and cap on 5000 rows of 20 events: the rows >= min_value with |time| <=
    max_abs_within (the edge inside, NaN never) and the count the window alone left out, then write_rows' cap at
    max_ratio x the value before (NaN capped), against numpy. A time column of several floats per row, a part
    that is not 1-d and a column that is not one float32 per row (a float64 one would be capped in a converted
    copy) are refused, naming them."""
    from eclreco import _core

    rng = np.random.default_rng(4)
    v = rng.exponential(0.05, 5000).astype(np.float32)
    t = rng.uniform(-300, 300, v.size).astype(np.float32)
    t[::11] = np.float32(50.0)  # on the edge: inside
    t[5], v[6] = np.nan, np.nan
    ref = rng.uniform(0.03, 1.0, v.size).astype(np.float32)
    b = _clusters({"energy_raw": v, "time": t, "energy": ref}, 20)
    rows, outside = _core.inference_inputs(b, "C", [], 0.03, 0.0, 50.0)[:2]
    above = v >= np.float32(0.03)
    np.testing.assert_array_equal(rows, np.flatnonzero(above & (np.abs(t) <= 50)))
    assert outside == int(np.sum(above & ~(np.abs(t) <= 50))) > 0
    new = (ref[rows] * rng.uniform(0.5, 4.0, rows.size)).astype(np.float32)
    new[:3] = np.nan
    bad = ~(new <= np.float32(2.0) * ref[rows])
    want = ref.copy()
    want[rows] = np.where(bad, ref[rows], new)
    c = b["C"]
    assert _core.write_rows(c, "energy", rows, [new[:100], new[100:]], 2.0) == bad.sum() > 3
    np.testing.assert_array_equal(c["energy"], want)
    wide = _clusters({"energy_raw": v[:2], "time": np.zeros((2, 3), np.float32), "e64": np.ones(2),
                      "e2": np.ones((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"^time must have shape \(2,\) \(one per row\), not \(2, 3\)$"):
        _core.inference_inputs(wide, "C", [], 0.03, 0.0, 50.0)
    with pytest.raises(ValueError, match=r"^parts\[1\] must be 1-d, not of shape \(1, 1\)$"):
        _core.write_rows(c, "energy", rows[:2], [new[:1], new[1:2, None]], 2.0)
    for column, held in (("e64", "1 float64"), ("e2", "2 float32")):
        with pytest.raises(TypeError, match=rf"^column '{column}' must hold one float32 per row to be written, "
                                            rf"not {held}$"):
            _core.write_rows(wide["C"], column, np.array([0]), [np.ones(1, np.float32)], 2.0)


def test_the_selection_and_the_write_back_check_their_float_arguments():
    """inference_inputs' min_value, max_value and max_abs_within and write_rows' max_ratio go through checked_float:
    pybind11's cast read a bool as 0.0 / 1.0 (a threshold True selected the values >= 1) and refused a string, None
    or complex value naming nothing."""
    from eclreco import _core

    v = np.array([0.5, 1.0, 1.5, 3.0], np.float32)
    t = np.array([0.0, 2.0, 0.5, 1.0], np.float32)

    def select(lo=0.0, hi=0.0, max_abs=0.0):
        return _core.inference_inputs(_clusters({"energy_raw": v, "time": t}), "C", [], lo, hi, max_abs)[:2]

    assert_checked_float(lambda x: select(lo=x), "min_value")
    assert_checked_float(lambda x: select(hi=x), "max_value")
    assert_checked_float(lambda x: select(max_abs=x), "max_abs_within")

    def capped(ratio):
        b = _clusters({"energy": t})
        return _core.write_rows(b["C"], "energy", np.arange(4), [v], ratio), np.asarray(b["C"]["energy"])

    assert_checked_float(capped, "max_ratio")


def test_add_collection_rejects_decreasing_offsets():
    """Offsets that go down would give an event rows the collection does not have: a ValueError,
    not a collection that C++ modules would read past the end of."""
    b = eclreco._core.EventBatch(2)
    with pytest.raises(ValueError, match="non-decreasing"):
        b.add_collection("X", np.array([0, 5, 3]), {"a": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="len\\(batch\\) \\+ 1"):
        b.add_collection("X", np.array([0, 3]), {"a": np.zeros(3, np.float32)})
    b.add_collection("X", np.array([0, 2, 3]), {"a": np.zeros(3, np.float32)})
    assert np.asarray(b["X"].offsets).tolist() == [0, 2, 3]


def test_offsets_are_checked_as_given_not_as_converted():
    """The C++ kernels converted offsets to int64 before checking them: a uint64 above 2**63 - 1 wrapped to a
    negative value and was named "non-decreasing" among values that increase, the first entry of a batch with
    no events was never checked (a uint64 2**64 - 1 was accepted), and a float offset was truncated (1.7 read
    as 1). Each is now an error naming the entry or the dtype, in every function that takes offsets."""
    from eclreco import _core

    none_f, none_u = np.zeros(0, np.float32), np.zeros(0, np.uint8)
    with pytest.raises(ValueError, match=r"offsets\[1\] = 9223372036854775809 is out of range \(above 2\*\*63 - 1\)"):
        _core.count_out_of_time_digits(np.array([0, 2**63 + 1], np.uint64), none_f, none_u)
    with pytest.raises(ValueError, match=r"offsets\[0\] = 18446744073709551615 is out of range"):
        _core.EventBatch(0).add_collection("X", np.array([2**64 - 1], np.uint64), {})
    with pytest.raises(ValueError, match=r"offsets\[0\] = -1 is negative"):
        _core.EventBatch(0).add_collection("X", np.array([-1]), {})
    for call in (lambda o: _core.count_out_of_time_digits(o, np.zeros(2, np.float32), np.zeros(2, np.uint8)),
                 lambda o: _core.EventBatch(1).add_collection("X", o, {}),
                 lambda o: _core.gather_rows(np.zeros(0, np.int64), o, [], []),
                 lambda o: _core.find_clusters("array30", o, np.ones(2, np.int32), *[np.zeros(2, np.float32)] * 2,
                                               np.zeros(2, np.uint8)),
                 lambda o: _core.gamma_gamma_masses(o, *[np.zeros(2, np.float32)] * 5, 0.1, 0.0, 4)):
        with pytest.raises(TypeError, match=r"offsets must be an integer array, not float64"):
            call(np.array([0, 1.7]))
        with pytest.raises(TypeError, match=r"offsets must be an integer array, not bool"):
            call(np.array([False, True]))
        with pytest.raises(ValueError, match=r"non-decreasing: offsets\[0\] = 2, offsets\[1\] = 1"):
            call(np.array([2, 1], np.uint64))
        for ok in (np.array([0, 1], np.int64), np.array([0, 1], np.uint64), np.array([0, 1], np.int32), [0, 1]):
            call(ok)  # integer offsets of any width, and a list of ints, are read as before
    empty = _core.EventBatch(0)
    empty.add_collection("X", np.array([0], np.uint64), {})
    assert np.asarray(empty["X"].offsets).tolist() == [0]


def test_row_and_cell_numbers_are_checked_as_given():
    """gather_rows' and write_rows' rows and find_clusters' cell were converted with pybind11's forcecast: a
    float was truncated (rows 1.7 read as row 1, cell 100.7 as cell 100), an int64 cellId above 2**31 - 1 wrapped
    to another cell (2**32 + 100 clustered as cell 100) and a uint64 above 2**63 - 1 became a negative row. Each
    is now an error naming the argument and its first bad entry, as for offsets."""
    from eclreco import _core

    off, block = np.array([0, 4], np.int64), [np.arange(8, dtype=np.float32).reshape(4, 2)]
    digit = dict(offsets=np.array([0, 2], np.int64), energy=np.full(2, 0.5, np.float32), time=np.zeros(2, np.float32),
                 quality=np.zeros(2, np.uint8))
    four = _clusters({"e": np.ones(4, np.float32)})
    calls = {"rows": (lambda r: _core.gather_rows(r, off, block, [False]),
                      lambda r: _core.write_rows(four["C"], "e", r, [np.full(2, 9, np.float32)], 2.0)),
             "cell": (lambda c: _core.find_clusters("belle2-ecl", cell=c, **digit),)}
    for name, fns in calls.items():
        for call in fns:
            with pytest.raises(TypeError, match=f"{name} must be an integer array, not float64"):
                call(np.array([1, 2.7]))
            with pytest.raises(TypeError, match=f"{name} must be an integer array, not bool"):
                call(np.array([False, True]))
            with pytest.raises(ValueError, match=rf"{name}\[1\] = -5 is negative"):
                call(np.array([1, -5], np.int64))
            with pytest.raises(ValueError, match=rf"{name}\[1\] = {2**64 - 1} is out of range \(above 2\*\*"):
                call(np.array([1, 2**64 - 1], np.uint64))
            for ok in (np.array([1, 2], np.int64), np.array([1, 2], np.uint64), np.array([1, 2], np.int16), [1, 2],
                       np.array([1, 2], ">i8")):
                call(ok)  # integers of any width that fit, and a list of ints, are read as before
    with pytest.raises(ValueError, match=rf"cell\[0\] = {2**32 + 100} is out of range \(above 2\*\*31 - 1\)"):
        _core.find_clusters("belle2-ecl", cell=np.array([2**32 + 100, 101], np.int64), **digit)
    assert _core.gather_rows(np.array([1, 3], ">u4"), np.array([0, 4], ">i8"), block, [False]).tolist() == [[2, 3], [6, 7]]
    assert _core.gather_rows(np.zeros(0), off, block, [False]).shape == (0, 2)  # no rows: any dtype, as np.array([])
    out = _core.find_clusters("belle2-ecl", cell=np.array([100, 2**20], np.int64), **digit)
    assert out["seed_cell"].tolist() == [100]  # a cellId outside the detector is still left out, not refused


def test_array_source_hands_out_the_collection_in_batches():
    from eclreco.sources import ArraySource

    counts = np.array([2, 0, 3, 1, 4, 0, 2])  # 7 events, 12 rows
    off = np.concatenate([[0], np.cumsum(counts)])
    e = np.arange(12, dtype=np.float32)
    seen = []

    class Look(eclreco.Module):
        """records evt, detector and the per-event energies of each batch"""

        def ordered(self):
            return True

        def event(self, batch):
            d = batch["ECLDigits"]
            o, en = np.asarray(d.offsets), np.asarray(d["energy"])
            seen.append((np.array(batch.evt), np.array(batch.detector),
                         [en[o[i]:o[i + 1]].tolist() for i in range(len(batch))]))

    path = eclreco.create_path()
    path.add_module(ArraySource("ECLDigits", off, {"energy": e}, detector="array30", repeat=2))
    path.add_module(Look())
    eclreco.process(path, batch_size=3, install_signal_handlers=False)
    assert [len(s[0]) for s in seen] == [3, 3, 1, 3, 3, 1]  # batches never straddle a pass
    assert np.concatenate([s[0] for s in seen]).tolist() == list(range(14))  # evt = pass * 7 + i
    assert all((s[1] == 1).all() for s in seen)
    per_event = [ev for s in seen for ev in s[2]]
    assert per_event[:7] == per_event[7:] == [e[a:b].tolist() for a, b in zip(off[:-1], off[1:])]
    with pytest.raises(ValueError, match="offsets"):
        ArraySource("X", [0, 3, 2], {"a": np.zeros(2)})
    with pytest.raises(ValueError, match="rows"):
        ArraySource("X", [0, 3], {"a": np.zeros(2)})
    with pytest.raises(ValueError, match="detector"):
        ArraySource("X", [0, 2], {"a": np.zeros(2)}, detector="cms")


def test_array_source_checks_offsets_as_given():
    """ArraySource cast its offsets to int64 before checking them: float offsets were truncated (0, 1.7, 3.2 read
    as 0, 1, 3: event 0 lost a row to event 1) and a uint64 above 2**63 - 1 wrapped to a negative number. Both are
    refused, naming what the offsets hold."""
    from eclreco.sources import ArraySource

    with pytest.raises(ValueError, match="offsets must be integers .*not float64"):
        ArraySource("ECLDigits", np.array([0, 1.7, 3.2]), {"cell": np.ones(3, np.int32)}, detector="array30")
    with pytest.raises(ValueError, match=f"offsets hold {2**64 - 1}, above 2\\*\\*63 - 1"):
        ArraySource("X", np.array([0, 2**64 - 1], np.uint64), {"a": np.zeros(2)})
    assert ArraySource("X", np.array([0, 1, 2], np.uint32), {"a": np.zeros(2)}).offsets.tolist() == [0, 1, 2]


def test_array_source_event_information_agrees_with_the_digits_it_hands_out():
    """ArraySource reads its (uncopied) arrays batch by batch; the out-of-time count it adds is
    counted from the same rows, so it agrees with the digits even when the caller changed the
    arrays after making the source (it was counted once at construction before)."""
    from eclreco import _core
    from eclreco.sources import ArraySource

    off = np.array([0, 3, 5, 9], np.int64)
    t = np.array([0, 200, -300, 10, 5, 400, 0, 0, 130], np.float32)
    cols = {"cell": np.arange(1, 10, dtype=np.int32), "energy": np.full(9, 0.01, np.float32), "time": t,
            "quality": np.zeros(9, np.uint8)}
    source = ArraySource("ECLDigits", off, cols, detector="belle2-ecl")
    t[:] = 0  # every digit now in time
    t[4] = -500
    got = []

    class Look(eclreco.Module):
        def event(self, batch):
            d = batch["ECLDigits"]
            o, tt, q = np.asarray(d.offsets), np.asarray(d["time"]), np.asarray(d["quality"])
            got.append((np.array(batch["ECLEventInformation"]["n_out_of_time_digits"]),
                        _core.count_out_of_time_digits(o, tt, q)))

    path = eclreco.create_path()
    path.add_module(source)
    path.add_module(Look())
    eclreco.process(path, threads=1, batch_size=2, install_signal_handlers=False)
    counts = np.concatenate([g[0] for g in got])
    assert counts.tolist() == [0, 1, 0]
    for info, digits in got:
        np.testing.assert_array_equal(info, digits)


def test_array_source_rejects_digits_the_unpacker_would_never_write():
    """A cellId outside the detector, a NaN or infinite energy or time, two digits of one crystal:
    the event is rejected with the reason (the clusterizer dropped such a digit unseen, or made two
    clusters of one crystal), and the other events are clustered as before."""
    from eclreco.sources import ArraySource

    off = np.array([0, 2, 4, 6, 8, 10, 12, 13])
    cell = np.array([0, 1, 100, 100, 5, 6, 7, 8, 901, 3, 40, 41, 50], np.int32)
    e = np.array([0.5, 0.1, 0.5, 0.1, np.nan, 0.2, 0.3, 0.3, 0.4, 0.3, 0.3, 0.2, 0.6], np.float32)
    t = np.zeros(13, np.float32)
    t[7] = np.inf
    kept = []

    class Keep(eclreco.Module):
        def event(self, batch):
            active = np.flatnonzero(batch.active())
            kept.extend(np.array(batch.evt)[active].tolist())
            counts = np.diff(np.asarray(batch["ECLClusters"].offsets))
            kept.extend(f"n{c}" for c in counts[active].tolist())

    path = eclreco.create_path()
    path.add_module(ArraySource("ECLDigits", off, {"cell": cell, "energy": e, "time": t,
                                                    "quality": np.ones(13, np.uint8)}, detector="array30"))
    path.add_module("ECLClusterizer")
    path.add_module(Keep())
    eclreco.process(path, batch_size=4, install_signal_handlers=False)
    s = eclreco.statistics.summary()
    assert (s["received"], s["processed"], s["rejected"], s["errors"]) == (7, 2, 5, 0)
    assert s["rejected_by_reason"] == {"invalid_cell": 2, "duplicate_cell": 1, "non_finite_digit": 2}
    assert kept == [5, 6, "n1", "n1"]  # one cluster each: cells 40, 41 touch; 50 alone
    from eclreco.sources import digit_problems

    cols = {"cell": cell, "energy": e, "time": t}
    assert digit_problems(off, cols, 900) == {
        0: ("invalid_cell", "digit 0: cellId 0 not in 1..900"),
        1: ("duplicate_cell", "digit 1: a second digit of cellId 100"),
        2: ("non_finite_digit", "digit 0: energy nan"), 3: ("non_finite_digit", "digit 1: time inf"),
        4: ("invalid_cell", "digit 0: cellId 901 not in 1..900")}


class UncheckedDigits(eclreco.Module):
    """ECLDigits (belle2-ecl) as a Python module might write them, without ArraySource's checks and
    conversions: one batch of all the events."""

    def __init__(self, offsets, columns):
        super().__init__()
        self.offsets, self.columns = offsets, columns

    def is_source(self):
        return True

    def next_batch(self, batch, max_events):
        from eclreco.rawdata import DETECTORS

        batch.resize(len(self.offsets) - 1)
        batch.evt[:] = np.arange(len(batch))
        batch.detector[:] = DETECTORS["belle2-ecl"]
        batch.add_collection("ECLDigits", self.offsets, self.columns)
        return False


def test_wrong_column_dtype_is_named_in_the_module_error(capfd):
    """A C++ module reading a column of another dtype (here from a Python module's collection;
    ArraySource converts ECLDigits' own columns) flags the events and says which column."""
    off = np.array([0, 2, 3])
    cols = {"cell": np.array([100, 101, 5000], np.int32), "energy": np.array([0.5, 0.1, 0.2], np.float32),
            "time": np.zeros(3), "quality": np.zeros(3, np.uint8)}  # time float64, the clusterizer reads float32
    path = eclreco.create_path()
    path.add_module(UncheckedDigits(off, cols))
    path.add_module("ECLClusterizer")
    eclreco.process(path, install_signal_handlers=False)
    assert eclreco.statistics.summary()["errors"] == 2
    assert "column 'time' holds float64, accessed as float32" in capfd.readouterr().err


def test_array_source_takes_digits_in_numpys_default_dtypes():
    """The README's ArraySource example with arrays as numpy makes them from lists (int64 cells and
    quality, float64 energies and times) failed every event in ECLClusterizer ("column 'quality'
    holds int64, accessed as uint8"), one column per attempt. ArraySource now converts ECLDigits'
    own columns once; a value the column's dtype cannot hold, or a column that is not numbers, is an
    error when the source is made, naming the column."""
    from eclreco.sources import ArraySource

    off = [0, 3, 4]
    plain = {"cell": np.array([100, 101, 245, 5000]), "energy": np.array([0.5, 0.1, 0.05, 0.2]),
             "time": np.array([0.0, 3.0, -5.0, 1.0]), "quality": np.array([0, 0, 0, 0])}
    typed = {"cell": plain["cell"].astype(np.int32), "energy": plain["energy"].astype(np.float32),
             "time": plain["time"].astype(np.float32), "quality": plain["quality"].astype(np.uint8)}

    def clusters(cols):
        got = []

        class Grab(eclreco.Module):
            def event(self, batch):
                got.append(np.array(batch["ECLClusters"]["energy_raw"]))

        path = eclreco.create_path()
        path.add_module(ArraySource("ECLDigits", off, cols))
        path.add_module("ECLClusterizer")
        path.add_module(Grab())
        eclreco.process(path, install_signal_handlers=False)
        assert eclreco.statistics.summary()["errors"] == 0, eclreco.statistics.state.error_messages()
        return np.concatenate(got)

    ref = clusters(typed)
    assert ref.size == 3
    np.testing.assert_array_equal(clusters(plain), ref)
    assert plain["cell"].dtype == np.int64  # the caller's arrays are left as they were
    with pytest.raises(ValueError, match="column 'quality' holds 300, which uint8"):
        ArraySource("ECLDigits", off, {**plain, "quality": np.array([0, 0, 300, 0])})
    with pytest.raises(ValueError, match="column 'cell' holds float64, not numbers that convert to int32"):
        ArraySource("ECLDigits", off, {**plain, "cell": plain["cell"] + 0.5})
    with pytest.raises(ValueError, match="column 'energy' holds <U"):
        ArraySource("ECLDigits", off, {**plain, "energy": np.array(["a", "b", "c", "d"])})
    # other collections keep their columns as they are
    assert ArraySource("MyDigits", off, plain).columns["quality"].dtype == np.int64


def test_process_options_out_of_bounds_are_refused_before_the_run():
    """threads and batch_size outside their bounds are a ValueError that names them, before any
    module is initialized (30000 threads used to be started, and took the machine down)."""
    from eclreco.sources import ArraySource

    class Init(eclreco.Module):
        calls = 0

        def initialize(self):
            Init.calls += 1

    path = eclreco.create_path()
    path.add_module(ArraySource("X", np.arange(8), {"a": np.zeros(7)}))
    eclreco.process(path, install_signal_handlers=False)
    for kw, what in [({"threads": 0}, "threads must be 1..256, not 0"), ({"threads": -1}, "not -1"),
                     ({"threads": 30000}, "threads must be 1..256, not 30000"),
                     ({"batch_size": 0}, "batch_size must be 1..1048576, not 0"),
                     ({"batch_size": -5}, "not -5"), ({"batch_size": 1 << 21}, "not 2097152")]:
        path = eclreco.create_path()
        path.add_module(ArraySource("X", np.arange(11), {"a": np.zeros(10)}))
        path.add_module(Init())
        with pytest.raises(ValueError, match=what):
            eclreco.process(path, install_signal_handlers=False, **kw)
        # the statistics of the last job that ran are kept (a refused call emptied them)
        assert eclreco.statistics.summary()["processed"] == 7, kw
    assert Init.calls == 0
    eclreco.process(path, threads=256, batch_size=1 << 20, install_signal_handlers=False)
    assert Init.calls == 1 and eclreco.statistics.summary()["processed"] == 10


def test_a_module_cannot_corrupt_the_batch_or_its_accounting():
    """Event indices are checked (IndexError, not a crash); offsets and error flags are read-only
    views (the C++ modules trust the offsets; an event is rejected with its reason); a module
    cannot add or drop events. Each misuse is a module error of its events, and every event is
    still counted: received = processed + rejected."""
    from eclreco.sources import ArraySource

    attempts = {
        "reject": lambda b: b.reject(10 ** 6, "x"),
        "flag_error": lambda b: b.flag_error(10 ** 6, "x"),
        "select": lambda b: b.select([0, 10 ** 6]),
        "offsets": lambda b: b["X"].offsets.__setitem__(1, 10 ** 9),
        "error_flags": lambda b: b.error_flags.__setitem__(slice(None), 1),
        "resize": lambda b: b.resize(2 * len(b)),
    }
    expected = {"reject": "out of range", "flag_error": "out of range", "select": "out of range",
                "offsets": "read-only", "error_flags": "read-only", "resize": "cannot add or drop events"}
    for name, attempt in attempts.items():
        class Misuse(eclreco.Module):
            def event(self, batch):
                attempt(batch)

        path = eclreco.create_path()
        path.add_module(ArraySource("X", np.arange(0, 21, 2), {"a": np.zeros(20)}))
        path.add_module(Misuse())
        path.add_module("NoOp")
        eclreco.process(path, batch_size=4, install_signal_handlers=False)
        s = eclreco.statistics.summary()
        assert s["received"] == 10 == s["processed"] + s["rejected"] and s["errors"] == 10, (name, s)
        assert expected[name] in eclreco.statistics.state.error_messages()[0], name


def test_a_module_cannot_add_events_even_to_a_batch_without_collections():
    class Grow(eclreco.Module):
        def event(self, batch):
            batch.resize(len(batch) + 1)  # made received 10, processed 11 and a second evt 0

    path = eclreco.create_path()
    path.add_module("EventInfoSetter", events=10)
    path.add_module(Grow())
    eclreco.process(path, install_signal_handlers=False)
    s = eclreco.statistics.summary()
    assert s["received"] == s["processed"] == 10 and s["errors"] == 10 and s["not_processed"] == 0


def test_module_errors_are_all_counted_but_only_the_first_printed(capfd):
    """A module failing on every event: each event is flagged and counted, the log has the first
    20 messages and one line saying the rest are not printed (not one line per event)."""
    from eclreco.sources import ArraySource

    class Broken(eclreco.Module):
        def event(self, batch):
            raise ValueError("misconfigured")

    path = eclreco.create_path()
    path.add_module(ArraySource("X", np.arange(101), {"a": np.zeros(100)}))
    path.add_module(Broken())
    eclreco.process(path, batch_size=16, threads=2, install_signal_handlers=False)
    assert eclreco.statistics.summary()["errors"] == 100
    err = capfd.readouterr().err
    assert err.count("raised on") == 20 and err.count("misconfigured") == 20
    assert err.count("further module errors of this run are not printed") == 1


def test_module_cpu_time_is_counted_apart_from_wall_time():
    """statistics: 'seconds' is wall time in a module, 'cpu_seconds' the calling thread's CPU
    time in it: a module that waits has much less CPU than wall time; neither exceeds the other."""
    import time

    class Sleeper(eclreco.Module):
        """waits 20 ms per batch"""

        def event(self, batch):
            time.sleep(0.02)

    class Spinner(eclreco.Module):
        """computes for 20 ms per batch"""

        def event(self, batch):
            t = time.thread_time()
            while time.thread_time() - t < 0.02:
                pass

    path = eclreco.create_path()
    path.add_module(CountingSource(50))
    path.add_module(Sleeper())
    path.add_module(Spinner())
    eclreco.process(path, batch_size=10, install_signal_handlers=False)
    mods = {m["name"]: m for m in eclreco.statistics.summary()["modules"]}
    sleep, spin = mods["Sleeper"], mods["Spinner"]
    assert sleep["calls"] == spin["calls"] == 5
    assert sleep["seconds"] >= 0.1 and sleep["cpu_seconds"] < 0.3 * sleep["seconds"]
    assert spin["cpu_seconds"] >= 0.1 and spin["cpu_seconds"] <= spin["seconds"] + 1e-3
    assert "CPU us/event" in str(eclreco.statistics)


@pytest.mark.parametrize("threads", [1, 2])
def test_python_modules_keep_one_thread_state_per_framework_thread(threads):
    """A framework thread keeps its Python thread state from batch to batch (a new one per call
    made the first numpy call of every module call slow), and lets it go when process() ends."""
    import threading

    local = threading.local()  # per Python thread state: lost when the state is replaced

    class Probe(eclreco.Module):
        def __init__(self):
            super().__init__()
            self.calls = self.known = 0
            self.lock = threading.Lock()

        def event(self, batch):
            with self.lock:
                self.calls += 1
                self.known += getattr(local, "seen", False)
            local.seen = True

    before = threading.active_count()
    path = eclreco.create_path()
    path.add_module(CountingSource(2000))
    probe = path.add_module(Probe())
    eclreco.process(path, batch_size=50, threads=threads)
    assert probe.calls == 40
    # new thread states only for the first call of each thread (threads + the reader at most)
    assert probe.known >= probe.calls - (threads + 1)
    assert threading.active_count() == before  # the framework threads' states are gone


def test_parameters_numpy_scalars_nan_and_range():
    """np.int64 / np.float32 are ints / floats; NaN is refused (every comparison with it is false), and
    inf (a timeout of inf ms overflowed ZMQInput's poll once a message came);
    an int that the module's member cannot hold is refused, not truncated (2**32 + 5 was 5)."""
    m = eclreco.create_module("ECLClusterizer")
    m.set_param("max_iterations", np.int64(5))
    m.set_param("seed_energy_gev", np.float32(0.02))
    assert m.get_param("max_iterations") == 5 and abs(m.get_param("seed_energy_gev") - 0.02) < 1e-8
    for bad in (float("nan"), float("inf"), -float("inf"), np.float64("nan")):
        with pytest.raises(Exception, match="seed_energy_gev' must be a finite number, not NaN or inf"):
            m.set_param("seed_energy_gev", bad)
    with pytest.raises(Exception, match="must be a finite number"):
        eclreco.create_module("Progress").set_param("interval_s", float("inf"))
    with pytest.raises(Exception, match="max_iterations' = 4294967301 does not fit"):
        m.set_param("max_iterations", 2 ** 32 + 5)
    assert m.get_param("max_iterations") == 5  # unchanged by the refused value
    with pytest.raises(eclreco.ParameterError, match="ECLClusterizer: parameter 'max_iterations': .* does not fit a 64-bit int"):
        m.set_param("max_iterations", 2 ** 70)  # it named neither
    with pytest.raises(TypeError, match=r"not the class CountingSource: add_module\(CountingSource\(\)\)"):
        eclreco.create_path().add_module(CountingSource)  # it said "not pybind11_type"
    with pytest.raises(TypeError, match="must be int, got bool"):
        m.set_param("max_iterations", True)
    for bad, match in [({"image_size": 4}, "image_size must be odd"), ({"output": ""}, "output must be"),
                       ({"output": "ECLDigits"}, "output must be a collection name other than the input")]:
        path = eclreco.create_path()
        path.add_module("EventInfoSetter", events=1)
        path.add_module("ECLClusterizer", **bad)
        with pytest.raises(Exception, match=match):
            eclreco.process(path, install_signal_handlers=False)
    # over a collection of the input stage: the path's check of what modules make (it named no module)
    for taken, maker in [("ECLEventInformation", "ECLUnpacker (module 2"), ("RawEnvelopes", "SimulationInput (module 1")]:
        path = eclreco.create_path()
        path.add_module("SimulationInput", events=1, detector="array30", particle="gamma", seed=3)
        path.add_module("ECLUnpacker")
        path.add_module("ECLClusterizer", output=taken)
        with pytest.raises(ValueError, match=rf"ECLClusterizer \(module 3 of the path\) makes the collection '{taken}', "
                                             rf"which {re.escape(maker)} of the path\) makes already"):
            eclreco.process(path, install_signal_handlers=False)


class _Declares(eclreco.Module):
    def __init__(self, **defaults):
        super().__init__()
        for name, value in defaults.items():
            self.add_param(name, value, name)


def test_python_parameter_defaults_are_checked_and_typed_like_values():
    """add_param's default goes through the checks of set_param (NaN/inf refused, was accepted);
    numpy scalars infer their type (np.True_ is a bool and was refused as a value); an empty list
    needs type= (was typed list[float] silently)."""
    m = _Declares(flag=np.True_, n=np.int64(3), x=np.float32(0.5), ints=[1, 2], mixed=[1, 2.5])
    types = {p["name"]: p["type"] for p in m.param_list()}
    assert types == {"flag": "bool", "n": "int", "x": "float", "ints": "list[int]", "mixed": "list[float]"}
    m.set_param("flag", np.False_)
    assert m.param("flag") is False
    for bad in (float("nan"), float("inf"), [1.0, float("nan")]):
        with pytest.raises(eclreco.ParameterError, match="'p' must be a finite number"):
            _Declares(p=bad)
    # naming the module and the parameter (a None default said only "cannot infer a parameter type from None")
    for bad, match in (([], "empty list default; pass type="), ([1, "a"], "mixed elements"), (None, "from None")):
        with pytest.raises(TypeError, match="_Declares: parameter 'p': .*" + match):
            _Declares(p=bad)
    with pytest.raises(ValueError, match=r"_Typed: parameter 'p' has an unknown type 'float64' \(types: bool, int, "):
        _Typed()


class _Typed(eclreco.Module):
    def __init__(self):
        super().__init__()
        self.add_param("p", 1.0, "numpy's name for float", type="float64")


class _OrderedAttribute(eclreco.Module):
    ordered = True


@pytest.mark.parametrize("kwargs,error,match", [
    ({"max_events": -1}, ValueError, "max_events must be >= 0"),
    ({"max_events": 1.5}, TypeError, "max_events must be an int, not float"),
    ({"threads": "2"}, TypeError, "threads must be an int, not str"),
    ({"batch_size": True}, TypeError, "batch_size must be an int, not bool"),
])
def test_process_arguments_get_one_line_errors(kwargs, error, match):
    """Were pybind11's several-line 'incompatible function arguments'."""
    path = eclreco.create_path()
    path.add_module(CountingSource(n=3))
    with pytest.raises(error, match=match):
        eclreco.process(path, install_signal_handlers=False, **kwargs)


def test_a_flag_that_is_not_a_method_is_refused_naming_the_module():
    with pytest.raises(TypeError, match=r"_OrderedAttribute: ordered must be a method returning bool"):
        eclreco.create_path().add_module(_OrderedAttribute())


@pytest.mark.parametrize("module,params,match", [
    ("EventInfoSetter", {"events": -5}, "events must be >= 0"),  # used to run forever (cast to uint64)
    ("EventInfoSetter", {"exp": -1}, "exp must be >= 0"),
    ("SimulationInput", {"run": -1}, "exp and run must be >= 0"),
    ("SimulationInput", {"chunk": 0}, "chunk must be >= 1"),  # used to run forever
    ("SimulationInput", {"energy": -1.0}, "energy must be in"),
    ("SimulationInput", {"energy": 1e6}, "energy must be in"),
    ("SimulationInput", {"background": -2.0}, "background must be in"),
    ("ZMQInput", {"idle_timeout_s": -1.0}, "idle_timeout_s must be >= 0"),  # used to run forever
    ("ZMQInput", {"poll_ms": 0.0}, "poll_ms must be > 0"),
    ("Progress", {"interval_s": -1.0}, "interval_s must be >= 0"),  # printed a line per batch
])
def test_source_parameters_out_of_range_fail_at_initialize(module, params, match):
    path = eclreco.create_path()
    if module == "Progress":  # not a source: it needs one before it
        path.add_module("EventInfoSetter", events=1)
    path.add_module(module, **params)
    with pytest.raises(Exception, match=match):
        eclreco.process(path, install_signal_handlers=False)


def test_misbehaving_sources_and_paths_are_named(tmp_path):
    fifo = tmp_path / "fifo.msgpack"
    os.mkfifo(fifo)
    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=str(fifo))  # open() used to block for a writer
    with pytest.raises(Exception, match="not a regular file"):
        eclreco.process(path, install_signal_handlers=False)

    class NoReturn(eclreco.Module):
        def is_source(self):
            return True

        def next_batch(self, batch, max_events):
            batch.resize(1)  # and forgets to return: used to end the input silently

    class Raises(NoReturn):
        def next_batch(self, batch, max_events):
            return 1 / 0

    class Overfills(NoReturn):
        def next_batch(self, batch, max_events):
            batch.resize(max_events + 5)
            return True

    for source, match, kw in [(NoReturn(), "next_batch must return True .* not NoneType", {}),
                              (Raises(), "Raises.next_batch failed: .*division by zero", {}),
                              (Overfills(), "returned 15 events, at most 10", {"max_events": 10})]:
        path = eclreco.create_path()
        path.add_module(source)
        with pytest.raises(Exception, match=match):
            eclreco.process(path, install_signal_handlers=False, batch_size=10, **kw)
    path = eclreco.create_path()
    noop = path.add_module("NoOp")
    with pytest.raises(ValueError, match="already in the path"):
        path.add_module(noop)


def test_a_python_modules_bool_hook_must_return_a_bool():
    """is_source() / ordered() / drains_at_stop() / writes_events() of a Python module were read with pybind11's
    bool cast: None (a forgotten return) as False, 0 / 1 or a str by their truth. A source whose is_source()
    forgot its return was 'a path needs an input module', an ordered() returning None ran unordered."""
    class Source(eclreco.Module):
        def is_source(self):
            pass  # forgot `return True`

        def next_batch(self, batch, max_events):
            return False

    class Ordered(eclreco.Module):
        def ordered(self):
            pass

    class Drains(Source):
        def is_source(self):
            return True

        def drains_at_stop(self):
            return 1

    for modules, match in [([Source()], r"^Source\.is_source\(\) must be a bool \(True or False\), not NoneType None$"),
                           ([CountingSource(n=3), Ordered()],
                            r"^Ordered\.ordered\(\) must be a bool \(True or False\), not NoneType None$"),
                           ([Drains()], r"^Drains\.drains_at_stop\(\) must be a bool \(True or False\), not int 1$")]:
        path = eclreco.create_path()
        for m in modules:
            path.add_module(m)
        with pytest.raises(TypeError, match=match):
            eclreco.process(path, install_signal_handlers=False)


def test_simulation_input_takes_the_detectors_background_by_default():
    """SimulationInput's background default is the detector's, as eclreco.sim.simulate's and reco.py's:
    none for array30 (it overlaid nominal belle2-ecl-level background on array30, 515 digits/event
    against ~13, and the array30 CNN, trained without background, was applied to them)."""
    def digits_per_event(**params):
        path = eclreco.create_path()
        path.add_module("SimulationInput", events=40, particle="gamma", seed=3, **params)
        path.add_module("ECLUnpacker")
        counts = []

        class Count(eclreco.Module):
            def event(self, batch):
                counts.extend(np.diff(batch["ECLDigits"].offsets).tolist())

        path.add_module(Count())
        eclreco.process(path, install_signal_handlers=False)
        return counts

    assert digits_per_event(detector="array30") == digits_per_event(detector="array30", background=0.0)
    assert np.mean(digits_per_event(detector="array30", background=1.0)) > 5 * np.mean(
        digits_per_event(detector="array30"))
    assert digits_per_event(detector="belle2-ecl") == digits_per_event(detector="belle2-ecl", background=1.0)


def test_energy_correction_needs_its_collection():
    m = eclreco.create_module("ECLEnergyCorrection")
    m.set_param("threads", 100000)  # onnxruntime crashed creating them
    with pytest.raises(Exception, match="threads must be 1..64"):
        m.initialize()
    path = eclreco.create_path()
    path.add_module("SimulationInput", events=20, detector="array30", particle="gamma", seed=3)
    path.add_module("ECLUnpacker")
    path.add_module("ECLEnergyCorrection")  # no clusterizer: was silently no correction, then an error per event
    with pytest.raises(ValueError, match="ECLEnergyCorrection .module 3 of the path. requires the collection "
                                         "'ECLClusters', which no module before it makes"):
        eclreco.process(path, install_signal_handlers=False)
    s = eclreco.statistics.summary()
    assert s["received"] == 0 and "requires the collection 'ECLClusters'" in s["fatal_error"]


def test_an_output_over_an_input_or_another_output_is_refused(tmp_path):
    """-o raw.msgpack on -i raw.msgpack replaced the raw data by ROOT bytes; the quarantine file on
    the input crashed the memory-mapped reader (SIGBUS); two writers corrupted one ROOT file."""
    from eclreco.rawdata import encode_events, write_raw_file

    raw = tmp_path / "raw.msgpack"
    write_raw_file(raw, encode_events("array30", 0, 1, [0, 1], [0, 0, 0], [], [], [], []))
    before = raw.read_bytes()
    os.link(raw, tmp_path / "hard.msgpack")  # another name of the same file: it was truncated (SIGBUS)
    for outputs in ([("RootOutput", str(raw))], [("RejectedOutput", str(tmp_path / "." / "raw.msgpack"))],
                    [("RejectedOutput", str(tmp_path / "hard.msgpack"))],
                    [("RootOutput", str(tmp_path / "x.root")), ("RejectedOutput", str(tmp_path / "x.root"))]):
        path = eclreco.create_path()
        path.add_module("RawFileInput", filename=str(raw))
        for name, f in outputs:
            path.add_module(name, filename=f)
        with pytest.raises(ValueError, match="in the same path: use another file"):
            eclreco.process(path, install_signal_handlers=False)
    assert raw.read_bytes() == before and not (tmp_path / "x.root").exists()


def test_a_run_stopped_by_an_error_says_what_it_did_not_process():
    from eclreco.sources import ArraySource

    class BadRun(eclreco.Module):
        def begin_run(self, exp, run):
            raise ValueError("no conditions for this run")

    path = eclreco.create_path()
    path.add_module(ArraySource("X", np.arange(101), {"a": np.zeros(100)}))
    path.add_module(BadRun())
    with pytest.raises(RuntimeError, match="BadRun.begin_run failed"):
        eclreco.process(path, batch_size=32, install_signal_handlers=False)
    s = eclreco.statistics.summary()
    assert s["received"] == 32 and s["processed"] == s["rejected"] == 0 and s["not_processed"] == 32
    assert "not processed: 32" in str(eclreco.statistics)


def test_digit_columns_from_arrays_byte_order_shape_and_invalid_values():
    """Big-endian arrays are converted (were read as garbage: 3e38 GeV clusters); a 2-d column
    is an error naming it (was read interleaved); digits outside the detector or with a non-finite
    energy are rejected by ArraySource, and counted by the clusterizer when another source writes
    them (were dropped without a trace)."""
    from eclreco.sources import ArraySource

    rng = np.random.default_rng(4)
    n_ev, per = 20, 30
    cell = np.concatenate([rng.choice(np.arange(1, 8737), per, replace=False) for _ in range(n_ev)]).astype(np.int32)
    energy = rng.exponential(0.05, n_ev * per).astype(np.float32)
    cols = {"cell": cell, "energy": energy, "time": np.zeros(n_ev * per, np.float32),
            "quality": np.zeros(n_ev * per, np.uint8)}
    off = np.arange(0, n_ev * per + 1, per)

    def clusters(columns, source=ArraySource):
        got = []

        class Grab(eclreco.Module):
            def event(self, batch):
                got.append(np.array(batch["ECLClusters"]["energy_raw"]))

        path = eclreco.create_path()
        path.add_module(ArraySource("ECLDigits", off, columns) if source is ArraySource else source(off, columns))
        cl = path.add_module("ECLClusterizer")
        path.add_module(Grab())
        eclreco.process(path, install_signal_handlers=False)
        return np.concatenate(got) if got else None, cl.counters()["invalid_digits"], eclreco.statistics.summary()

    ref, invalid, _ = clusters(cols)
    assert ref.size > 20 and invalid == 0
    swapped, _, _ = clusters({**cols, "energy": energy.astype(">f4"), "cell": cell.astype(">i4")},
                             source=UncheckedDigits)  # (ArraySource converts them)
    np.testing.assert_array_equal(swapped, ref)
    _, _, s = clusters({**cols, "energy": np.stack([energy, energy], 1)})
    assert s["errors"] == n_ev and "column 'energy' holds rows of 2 values" in eclreco.statistics.state.error_messages()[0]
    bad_cell, bad_e = cell.copy(), energy.copy()
    bad_cell[[0, 40]] = [0, 99999]
    bad_e[[80, 120]] = [np.nan, np.inf]
    _, invalid, s = clusters({**cols, "cell": bad_cell, "energy": bad_e})
    assert invalid == 0 and s["rejected_by_reason"] == {"invalid_cell": 2, "non_finite_digit": 2}
    _, invalid, s = clusters({**cols, "cell": bad_cell, "energy": bad_e}, source=UncheckedDigits)
    assert invalid == 4 and s["rejected"] == 0
    # a NaN or infinite time too (it made the digit out of time without a count)
    bad_t = np.zeros(n_ev * per, np.float32)
    bad_t[[200, 230]] = [np.nan, -np.inf]
    _, invalid, s = clusters({**cols, "time": bad_t}, source=UncheckedDigits)
    assert invalid == 2 and s["rejected"] == 0


def test_reject_needs_a_reason_and_keeps_the_first():
    b = eclreco.EventBatch(2)
    with pytest.raises(ValueError, match="needs a reason"):
        b.reject(0, "")
    b.reject(1, "crc_mismatch", "first")
    b.reject(1, "later", "second")
    assert b.rejections() == {1: ("crc_mismatch", "first")} and b.error_flags.tolist() == [0, eclreco.ERROR_REJECTED]


def test_an_exception_without_a_message_is_named_by_its_type(capfd):
    from eclreco.sources import ArraySource

    class Silent(eclreco.Module):
        def event(self, batch):
            raise ValueError()

    path = eclreco.create_path()
    path.add_module(ArraySource("X", np.arange(3), {"a": np.zeros(2)}))
    path.add_module(Silent())
    eclreco.process(path, install_signal_handlers=False)
    assert "ValueError: (no message) (at " in eclreco.statistics.state.error_messages()[0]


# Page faults when 12 MB of 30 kB blocks are freed and taken again: glibc's default gives the
# freed top of the heap back to the kernel (every page faults in again, zero-filled); after
# retain_freed_memory (which process() calls) it keeps it. The HLT worker paid 4-5 faults per
# event for this (docs/performance.md).
_REFAULT_SCRIPT = r"""
import ctypes, resource, sys
import eclreco
from eclreco import _core
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
mode = sys.argv[1]
if mode == "retain":
    assert _core.retain_freed_memory()
elif mode == "process":
    path = eclreco.create_path()
    path.add_module("EventInfoSetter", events=10)
    eclreco.process(path, install_signal_handlers=False)

def round_trip():
    blocks = [libc.malloc(30_000) for _ in range(400)]
    for b in blocks:
        libc.memset(b, 1, 30_000)
    for b in reversed(blocks):
        libc.free(b)

round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator settings")
def test_freed_memory_is_reused_not_faulted_in_again():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _REFAULT_SCRIPT, mode], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    assert faults("default") > 1500  # 12 MB = 2,930 pages: glibc trimmed them (the case the setting is for)
    assert faults("retain") < 500
    assert faults("process") < 500


def test_retain_freed_memory_refuses_values_it_cannot_set():
    from eclreco import _core

    with pytest.raises(ValueError, match="at most"):
        _core.retain_freed_memory(2**31)
    if platform.libc_ver()[0] == "glibc":
        assert _core.retain_freed_memory() is True


def test_retain_freed_memory_checks_its_thresholds():
    """retain_freed_memory(trim_threshold, mmap_threshold) cast both with pybind11: True was taken as a threshold of
    1 byte (every free trimmed), -1 was its several-line "incompatible function arguments". Both now go through
    checked_integer<uint64_t>."""
    from eclreco import _core
    from helpers import assert_checked_integer

    try:
        assert_checked_integer(lambda t: _core.retain_freed_memory(t), "trim_threshold", 200, 64, signed=False)
        assert_checked_integer(lambda t: _core.retain_freed_memory(mmap_threshold=t), "mmap_threshold", 200, 64,
                               signed=False)
    finally:
        _core.retain_freed_memory()  # process()'s values again


class _RunLog(eclreco.Module):
    """Logs begin_run/end_run into a shared list; raises in end_run/begin_run of the runs named."""

    def __init__(self, name, log, fail_end=(), fail_begin=()):
        super().__init__()
        self.name, self.log, self.fail_end, self.fail_begin = name, log, fail_end, fail_begin

    def begin_run(self, exp, run):
        self.log.append((self.name, "begin", run))
        if run in self.fail_begin:
            raise RuntimeError(f"{self.name} cannot begin run {run}")

    def end_run(self, exp, run):
        self.log.append((self.name, "end", run))
        if run in self.fail_end:
            raise RuntimeError(f"{self.name} cannot end run {run}")

    def event(self, batch):
        pass


@pytest.mark.parametrize("fail", ["end", "begin"])
def test_a_failing_run_transition_ends_each_begun_run_once(fail):
    """A failing end_run at a run boundary: every module still gets end_run of that run, once (the
    failing one was called again at the end, the others twice); a failing begin_run: only the
    modules before it, which began the run, get its end_run."""
    log = []
    path = eclreco.create_path()
    path.add_module(CountingSource(n=30, run_length=10))
    kw = {"fail_end": (0,)} if fail == "end" else {"fail_begin": (1,)}
    for name in "ABC":
        path.add_module(_RunLog(name, log, **(kw if name == "B" else {})))
    with pytest.raises(Exception, match=f"_RunLog.{fail}_run failed: RuntimeError: B cannot {fail} run"):
        eclreco.process(path, batch_size=5, install_signal_handlers=False)
    ends = [(m, r) for m, what, r in log if what == "end"]
    if fail == "end":
        assert ends == [("A", 0), ("B", 0), ("C", 0)], log
    else:
        assert ends == [("A", 0), ("B", 0), ("C", 0), ("A", 1)], log  # C never began run 1, B failed to


def test_float16_and_longdouble_columns_are_refused():
    """numpy float16 / longdouble were taken as float64 (8 bytes read per 2-byte value: garbage)."""
    b = eclreco.EventBatch(3)
    for dtype in (np.float16, np.longdouble):
        with pytest.raises(TypeError, match="unsupported dtype for a column: .*float32 or float64"):
            b.add_collection("X", np.array([0, 1, 2, 3]), {"a": np.array([1.0, 2.0, 3.0], dtype)})
    c = b.add_collection("X", np.array([0, 1, 2, 3]), {"a": np.array([1.0, 2.0, 3.0], np.float32)})
    with pytest.raises(TypeError, match="unsupported dtype"):
        c["b"] = np.ones(3, np.float16)
    assert c["a"].tolist() == [1.0, 2.0, 3.0]


class _Interrupts(eclreco.Module):
    """Raises `exc` on the batch holding event `at` (a user's sys.exit, or Ctrl-C without the
    framework's signal handlers)."""

    def __init__(self, exc, at):
        super().__init__()
        self.exc, self.at = exc, at

    def event(self, batch):
        if self.at in batch.evt.tolist():
            raise self.exc


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt()])
def test_sys_exit_and_keyboard_interrupt_in_a_module_end_the_job(threads, exc, capfd):
    """KeyboardInterrupt and SystemExit from a module's event() stop the program, as in Python,
    after a clean end: the source is read no more, the batches in flight finish, every module gets
    end_run and terminate, and process() raises the same exception. The events of the interrupted
    call are flagged (counted as errors, none lost). They were counted as module errors of every
    event, one by one, and the job went on to the end."""
    log = []
    path = eclreco.create_path()
    path.add_module(CountingSource(n=20000))
    path.add_module(_RunLog("A", log))
    path.add_module(_Interrupts(exc, at=300))
    rec = Recorder()
    path.add_module(rec)
    with pytest.raises(type(exc)) as info:
        eclreco.process(path, threads=threads, batch_size=100, install_signal_handlers=False)
    if isinstance(exc, SystemExit):
        assert info.value.code == 3
    s = eclreco.statistics.summary()
    assert 400 <= s["received"] < 20000  # stopped reading (the batches in flight are at most a few)
    assert s["not_processed"] == 0 and s["processed"] == s["received"]
    assert s["errors"] == 100  # the interrupted call: one batch of 100 events, each flagged
    flagged = sorted(e for e, f in zip(rec.evt, rec.flags) if f)
    assert flagged == list(range(300, 400))
    assert sorted(rec.evt) == list(range(s["received"]))  # every event reached the output
    assert ("A", "end", 0) in log
    err = capfd.readouterr().err
    assert err.count(f"job ended by {type(exc).__name__}") == 1, err


class _FailsThenExits(eclreco.Module):
    """On the batch holding event `at`: a ValueError for the batch, then in the event-by-event
    re-run SystemExit at `at`."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def event(self, batch):
        evt = batch.evt.tolist()
        if self.at in evt:
            raise ValueError("the batch") if len(evt) > 1 else SystemExit(4)


def test_sys_exit_in_the_event_by_event_rerun_flags_that_event_and_the_rest():
    """The re-run of a failing batch meets SystemExit at event 350: 300..349 are processed
    normally, 350..399 (the one that ended the job and those not re-run) are flagged, the job ends."""
    path = eclreco.create_path()
    path.add_module(CountingSource(n=20000))
    path.add_module(_FailsThenExits(at=350))
    rec = Recorder()
    path.add_module(rec)
    with pytest.raises(SystemExit) as info:
        eclreco.process(path, threads=1, batch_size=100, install_signal_handlers=False)
    assert info.value.code == 4
    s = eclreco.statistics.summary()
    assert s["received"] == 400 and s["processed"] == 400 and s["errors"] == 50
    assert sorted(e for e, f in zip(rec.evt, rec.flags) if f) == list(range(350, 400))


class _DoublesThenFails(eclreco.Module):
    """Doubles every digit energy, then raises on the batch holding event `at`."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def event(self, batch):
        d = batch["ECLDigits"]
        d["energy"] = d["energy"] * 2
        if self.at in batch.evt.tolist():
            raise ValueError(f"event {self.at}")


@pytest.mark.parametrize("threads", [1, 2])
def test_a_failed_module_is_rerun_on_the_batch_as_it_was_before_its_call(threads):
    """The event-by-event re-run starts from the snapshot taken before the call: the innocent
    events of the failing batch are doubled once (were four times: the re-run saw the batch as
    the module left it), and the failing event keeps its energies from before the call."""

    def sums(at):
        path = eclreco.create_path()
        path.add_module(CountingSource(n=1000))
        path.add_module(_DoublesThenFails(at))
        rec = Recorder()
        path.add_module(rec)
        eclreco.process(path, threads=threads, batch_size=128, install_signal_handlers=False)
        return np.array(rec.evt), np.array(rec.digit_sums), np.array(rec.flags)

    evt0, ref, flags0 = sums(at=-1)
    evt, got, flags = sums(at=303)
    assert evt.tolist() == evt0.tolist() == list(range(1000)) and not flags0.any()
    assert np.flatnonzero(flags).tolist() == [303]
    ok = evt != 303
    np.testing.assert_array_equal(got[ok], ref[ok])
    assert got[303] == pytest.approx(ref[303] / 2, rel=1e-6) and ref[303] > 0


class _RenumbersEvents(eclreco.Module):
    def event(self, batch):
        batch.evt[:] = 0


def test_event_identity_is_read_only_in_a_module(capfd):
    """exp, run, evt, time_ns and detector are read-only views in event(): errors, rejections and
    outputs are keyed by them (a source writes them in next_batch)."""
    path = eclreco.create_path()
    path.add_module(CountingSource(n=10))
    path.add_module(_RenumbersEvents())
    rec = Recorder()
    path.add_module(rec)
    eclreco.process(path, threads=1, install_signal_handlers=False)
    assert rec.evt == list(range(10)) and all(rec.flags)
    err = capfd.readouterr().err
    assert "_RenumbersEvents raised on" in err and "read-only" in err, err
    assert "write a column by assigning a new array" in err, err  # and what to do instead


def _divide(x):
    return 1 / x  # the line the error message names


class _DividesByZero(eclreco.Module):
    def event(self, batch):
        return _divide(0)  # and the line of event() that called it


def test_a_python_module_error_names_the_line_that_raised_and_the_event_line(capfd):
    import inspect

    path = eclreco.create_path()
    path.add_module(CountingSource(n=3))
    path.add_module(_DividesByZero())
    eclreco.process(path, install_signal_handlers=False)
    raise_line = inspect.getsourcelines(_divide)[1] + 1
    call_line = inspect.getsourcelines(_DividesByZero.event)[1] + 1
    err = capfd.readouterr().err
    assert (f"ZeroDivisionError: division by zero (at {__file__}:{raise_line} in _divide, "
            f"called from {__file__}:{call_line} in event)") in err, err


def test_a_module_type_twice_in_a_path_gets_numbered_in_the_statistics():
    """The statistics table, summary() and the Prometheus labels name modules alike: the second
    NoOp is NoOp#1 (the table showed two rows called NoOp)."""
    path = eclreco.create_path()
    path.add_module(CountingSource(n=10))
    path.add_module("NoOp")
    path.add_module("NoOp")
    eclreco.process(path, install_signal_handlers=False)
    assert [m["name"] for m in eclreco.statistics.summary()["modules"]] == ["CountingSource", "NoOp", "NoOp#1"]
    rows = [line.split()[0] for line in str(eclreco.statistics).splitlines()[2:5]]
    assert rows == ["CountingSource", "NoOp", "NoOp#1"]


class _ExitsIn(eclreco.Module):
    """SystemExit(3) from the method named `where`; logs the calls it gets."""

    def __init__(self, where):
        super().__init__()
        self.where, self.log = where, []

    def initialize(self):
        self.log.append("initialize")
        if self.where == "initialize":
            raise SystemExit(3)

    def begin_run(self, exp, run):
        self.log.append("begin_run")
        if self.where == "begin_run":
            raise SystemExit(3)

    def end_run(self, exp, run):
        self.log.append("end_run")

    def terminate(self):
        self.log.append("terminate")


class _SourceExitsAfter(CountingSource):
    def __init__(self, n, exit_after):
        super().__init__(n=n)
        self.exit_after = exit_after

    def next_batch(self, batch, max_events):
        more = super().next_batch(batch, max_events)
        if self.next > self.exit_after:
            raise SystemExit(3)
        return more


@pytest.mark.parametrize("where,log,received,processed", [
    ("initialize", ["initialize"], 0, 0),  # was RuntimeError('job ended by SystemExit: 3')
    ("begin_run", ["initialize", "begin_run", "terminate"], 100, 0),  # its run never began: no end_run
    ("next_batch", ["initialize", "begin_run", "end_run", "terminate"], 500, 500),
])
def test_sys_exit_outside_event_ends_the_job_as_sys_exit(where, log, received, processed):
    path = eclreco.create_path()
    path.add_module(_SourceExitsAfter(n=2000, exit_after=500 if where == "next_batch" else 10 ** 9))
    m = _ExitsIn(where)
    path.add_module(m)
    with pytest.raises(SystemExit) as info:
        eclreco.process(path, batch_size=100, install_signal_handlers=False)
    assert info.value.code == 3 and m.log == log
    s = eclreco.statistics.summary()
    assert (s["received"], s["processed"]) == (received, processed)


def test_simulation_input_refuses_generic_events_of_array30_at_initialize(tmp_path):
    """SimulationInput(detector='array30') with its default particle, generic (belle2-ecl only), passed
    initialize: every module started, RootOutput created its file, and the job failed at the first
    batch ('SimulationInput.next_batch failed: ... generic events exist for belle2-ecl only'). Now
    initialize refuses it, before the modules after it start."""
    path = eclreco.create_path()
    path.add_module("SimulationInput", detector="array30", events=10)
    path.add_module("RootOutput", filename=str(tmp_path / "out.root"))
    with pytest.raises(Exception, match=r"SimulationInput.initialize failed.*generic events exist for belle2-ecl "
                                        r"only: particle gamma or pi0 for array30"):
        eclreco.process(path, install_signal_handlers=False)
    assert not (tmp_path / "out.root").exists()


def test_a_boolean_column_stays_a_boolean_mask():
    """A boolean column (a selection a module computes for the next one) came back as uint8, so that
    `c["energy"][c["sel"]]` indexed rows 0 and 1 instead of masking: a silently wrong selection."""
    b = eclreco.EventBatch(2)
    c = b.add_collection("C", np.array([0, 2, 4]), {"e": np.array([1.0, 2.0, 3.0, 4.0], np.float32),
                                                   "m": np.array([True, False, True, True])})
    c["sel"] = c["e"] > 2.5
    assert c["sel"].dtype == np.bool_ and c["m"].dtype == np.bool_
    assert c["e"][c["sel"]].tolist() == [3.0, 4.0]
    assert c["e"][c["m"]].tolist() == [1.0, 3.0, 4.0]
    s = eclreco.EventBatch.concat([b.select([1]), b.select([0])])  # select / concat keep the dtype
    assert s["C"]["sel"].dtype == np.bool_ and s["C"]["sel"].tolist() == [True, True, False, False]


def test_list_parameters_take_one_dimensional_numpy_arrays():
    """Bin edges from np.linspace, cuts from an np.array, column names from np.array of str were
    refused ("must be float list, got ndarray"): a 1-d array is taken like a list; 2-d is not."""

    class Lists(eclreco.Module):
        def __init__(self):
            super().__init__()
            self.add_param("edges", [0.0, 1.0], "bin edges")
            self.add_param("cells", [1], "cells")
            self.add_param("names", ["a"], "names")

    m = Lists()
    m.set_param("edges", np.linspace(0.0, 2.0, 5))
    m.set_param("cells", np.array([3, 5, 7], dtype=np.int32))
    m.set_param("names", np.array(["energy", "theta"]))
    assert m.param("edges") == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert m.param("cells") == [3, 5, 7] and m.param("names") == ["energy", "theta"]
    with pytest.raises(TypeError, match=r"'cells' must be list\[int\], got ndarray"):
        m.set_param("cells", np.array([1.5, 2.0]))
    with pytest.raises(TypeError, match=r"'edges' must be list\[float\], got ndarray"):
        m.set_param("edges", np.zeros((2, 2)))
    path = eclreco.create_path()
    out = path.add_module("RootOutput", filename="unused.root", cluster_columns=np.array(["energy", "theta"]))
    assert out.get_param("cluster_columns") == ["energy", "theta"]


def test_every_parameter_mistake_is_a_parameter_error():
    """A steering file that catches eclreco.ParameterError (as basf2 users catch its parameter errors) missed
    two of them: a value of the wrong type was a plain TypeError, an int beyond 64 bits a plain ValueError.
    Both are ParameterErrors now; the wrong type is also still a TypeError."""
    path = eclreco.create_path()
    for kw in ({"max_iterations": "100"}, {"max_iterations": 2**70}, {"seed_energy_gev": [0.01]},
               {"nonexistent": 1}):
        with pytest.raises(eclreco.ParameterError, match="ECLClusterizer"):
            path.add_module("ECLClusterizer", **kw)
    with pytest.raises(TypeError, match="must be int, got str"):
        path.add_module("ECLClusterizer", max_iterations="100")
    assert issubclass(eclreco.ParameterTypeError, eclreco.ParameterError)


@pytest.mark.parametrize("first,second", [("SIGINT", "SIGINT"), ("SIGTERM", "SIGINT")])
def test_a_second_signal_kills_a_run_at_once(first, second):
    """process(): SIGINT/SIGTERM ask the run to stop; a second signal kills at once, so that a run stuck in
    a module can still be interrupted (docs/reliability.md). The handler set the default action for the
    signals after the second, not for the second itself: a stuck job survived two Ctrl-C and needed a third."""
    import signal
    import textwrap
    import time

    script = textwrap.dedent("""
        import time, eclreco
        class Stuck(eclreco.Module):
            def event(self, batch):
                print("stuck", flush=True)
                time.sleep(60)  # does not return when the run is asked to stop
        path = eclreco.create_path()
        path.add_module("EventInfoSetter", events=100)
        path.add_module(Stuck())
        eclreco.process(path, batch_size=10)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert p.stdout.readline() == "stuck\n"  # in the run: its handlers are installed
        p.send_signal(getattr(signal, first))
        time.sleep(0.5)
        assert p.poll() is None  # the first signal asks the run to stop; the module goes on
        p.send_signal(getattr(signal, second))
        p.wait(timeout=10)
        assert p.returncode == -getattr(signal, second)
    finally:
        kill_if_running(p)


_RERUN_DTYPE_SCRIPT = """
import sys
import numpy as np
import eclreco
from helpers import CountingSource, Recorder


class TagsFromAList(eclreco.Module):
    '''Adds a column from a Python list (int64, float64 where the event has no digits) and raises on
    the batch of event 303; with cast=1 it also writes 'energy' in float64 (it was float32).'''

    def event(self, batch):
        d = batch["ECLDigits"]
        d["n_hi"] = [int(e > 5e-4) for e in d["energy"]]
        if int(sys.argv[2]):
            d["energy"] = d["energy"] * np.float64(2)
        if 303 in batch.evt.tolist():
            raise ValueError("event 303")


class Types(Recorder):
    def event(self, batch):
        super().event(batch)
        d = batch["ECLDigits"]
        self.types = getattr(self, "types", set()) | {str(d["n_hi"].dtype) if "n_hi" in d else "-"}


path = eclreco.create_path()
path.add_module(CountingSource(n=1000))
path.add_module(TagsFromAList())
rec = path.add_module(Types())
eclreco.process(path, threads=int(sys.argv[1]), batch_size=128, install_signal_handlers=False)
s = eclreco.statistics.summary()
print("RESULT", s["processed"], s["errors"], sorted(e for e, f in zip(rec.evt, rec.flags) if f) == [303],
      sorted(e for e, f in zip(rec.evt, rec.flags) if f) == list(range(256, 384)), sorted(rec.types))
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_a_rerun_whose_events_give_a_column_different_dtypes_does_not_end_the_job(threads):
    """A failing batch is re-run event by event and the events joined again. A column written from a
    Python list is float64 in an event without rows (np.asarray([])) and int64 in the others: the join
    raised 'append_rows: columns differ in dtype or shape', which ended the job (threads=1) or aborted
    the process (threads=2: std::terminate in a worker thread). Now an event without rows does not
    decide a column's dtype, so only event 303 is flagged; a column written in another dtype for some
    events than for others (energy float64 where the module ran, float32 where it failed) flags the
    batch's events with a message that names the module and the column, and the run goes on."""
    tests = os.path.dirname(os.path.abspath(__file__))
    for cast, flagged, types in ((0, "True False ['int64']", "1000 1"), (1, "False True", "1000 128")):
        out = subprocess.run([sys.executable, "-c", _RERUN_DTYPE_SCRIPT, str(threads), str(cast)], cwd=tests,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        result = out.stdout.split("RESULT ", 1)[1]
        assert result.startswith(types + " " + flagged), result
        if cast:
            assert ("TagsFromAList" in out.stderr and "'ECLDigits.energy'" in out.stderr and "float64" in out.stderr
                    and "float32" in out.stderr), out.stderr[-2000:]


@pytest.mark.parametrize("name", ["Progress", "ECLDQM"])
def test_a_module_name_taken_twice_is_an_error_naming_both(name, capsys):
    """A class in eclreco.modules named as a C++ module (Progress) or as another Python module
    (ECLDQM) was shadowed silently: the C++ Progress, or whichever file pkgutil imported last, was
    the module of that name in steering files and `eclreco modules`. Now both are named in the error."""
    import gc

    from eclreco.cli import main

    clash = type(name, (eclreco.Module,), {"__module__": "eclreco.modules.user_clash", "__doc__": "a user's module"})
    try:
        other = "C++ module Progress" if name == "Progress" else "eclreco.modules.ecl_dqm.ECLDQM"
        for create in (lambda: eclreco.create_module(name), lambda: eclreco.create_module("NoOp"),
                       eclreco.available_modules):
            try:
                create()
                message = "no error"
            except ValueError as err:  # its traceback's frames hold the class: not kept beyond this block
                message = str(err)
            assert f"eclreco.modules.user_clash.{name}" in message and other in message, message
        assert main(["modules"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("eclreco: error: ") and f"user_clash.{name}" in err and len(err.splitlines()) == 1
    finally:
        del clash
        gc.collect()  # out of Module.__subclasses__() for the tests after this one
    assert type(eclreco.create_module(name)).__module__ != "eclreco.modules.user_clash"


def test_a_cpp_module_name_registered_twice_is_a_conflict_naming_both_files(tmp_path, repo_dir):
    """ECLRECO_REGISTER_MODULE of a name already taken (a module copied from no_op.cpp whose name
    was left 'NoOp') was dropped without a word, and which of the two was 'NoOp' depended on the link
    order. The registry now records the conflict with both files, and importing eclreco fails on it
    (register_framework). A program of two modules of one name, built like eclreco_core, shows it."""
    import shutil

    cxx = shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("no C++ compiler")
    for name in ("first", "second"):
        (tmp_path / f"{name}.cpp").write_text(
            '#include "framework/registry.hpp"\nnamespace { class M : public fw::Module {}; }\n'
            f'ECLRECO_REGISTER_MODULE(M, "Twice", "{name}")\n')
    (tmp_path / "main.cpp").write_text(
        '#include <cstdio>\n#include "framework/registry.hpp"\nint main() {\n'
        '  auto& r = fw::ModuleRegistry::instance();\n'
        '  for (const auto& c : r.conflicts()) std::printf("%s\\n", c.c_str());\n'
        '  std::printf("kept %s\\n", r.find("Twice")->description.c_str());\n}\n')
    cpp = os.path.join(repo_dir, "cpp")
    exe = tmp_path / "twice"
    subprocess.run([cxx, "-std=c++17", "-I", cpp, "-o", str(exe), str(tmp_path / "main.cpp"), str(tmp_path / "first.cpp"),
                    str(tmp_path / "second.cpp"), os.path.join(cpp, "framework", "registry.cpp"),
                    os.path.join(cpp, "framework", "parameters.cpp")], check=True, timeout=300)
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == 2 and lines[1] in ("kept first", "kept second"), lines
    assert "'Twice' is registered twice" in lines[0] and "first.cpp" in lines[0] and "second.cpp" in lines[0], lines


class _ReadsMisspelt(eclreco.Module):
    def __init__(self, collection, column):
        super().__init__()
        self.collection, self.column = collection, column

    def event(self, batch):
        batch[self.collection][self.column]


@pytest.mark.parametrize("collection,column,listed", [
    ("ECLDigit", "energy", "no collection 'ECLDigit' in the batch (its collections: ECLDigits)"),
    ("ECLDigits", "energie", "no column 'energie' in the collection 'ECLDigits' (its columns: cell, energy)"),
])
def test_a_missing_column_or_collection_error_lists_what_there_is(collection, column, listed):
    """A Python module reading a column or collection that no module wrote got "no column 'energie'"
    (or "no collection 'ECLDigit' in the batch") on every event: the names there are were not said, as
    the C++ modules' "(its columns: ...)" says them, so a misspelling took a print() to see."""
    path = eclreco.create_path()
    path.add_module(CountingSource(n=5))
    path.add_module(_ReadsMisspelt(collection, column))
    eclreco.process(path, install_signal_handlers=False)
    messages = eclreco.statistics.state.error_messages()
    assert len(messages) == 5 and all(listed in m and "_ReadsMisspelt raised on" in m for m in messages), messages


def test_a_cpp_module_throwing_what_is_not_a_std_exception_flags_its_events(tmp_path, repo_dir):
    """A C++ module's `throw 42` in event() (not derived from std::exception) left the worker thread:
    'terminate called after throwing an instance of int', SIGABRT, outputs not closed. It is now an error
    of its events like any other (the run goes on), and in initialize() a 'NAME.initialize failed'. The
    plain C++ core is built with a module that throws so, as eclreco_core is, and run on two threads."""
    import shutil

    cxx = shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("no C++ compiler")
    (tmp_path / "main.cpp").write_text(r'''
#include <cstdio>
#include <stdexcept>
#include "framework/processor.hpp"
#include "framework/registry.hpp"
namespace {
class Throws42 : public fw::Module {
 public:
  Throws42() { params().add("in_initialize", &in_initialize_, false, "throw in initialize"); }
  void initialize() override { if (in_initialize_) throw 42; }
  void event(fw::EventBatch& b) override {
    for (size_t i = 0; i < b.size(); ++i)
      if (b.evt()[i] % 10 == 3) throw 42;
  }
 private:
  bool in_initialize_ = false;
};
}
ECLRECO_REGISTER_MODULE(Throws42, "Throws42", "throws an int")
int main() {
  for (bool in_initialize : {false, true}) {
    fw::Path path;
    auto& registry = fw::ModuleRegistry::instance();
    auto source = registry.create("EventInfoSetter");
    source->params().set("events", int64_t{100});
    auto thrower = registry.create("Throws42");
    thrower->params().set("in_initialize", in_initialize);
    path.add(source);
    path.add(thrower);
    fw::Processor p;
    fw::ProcessOptions o;
    o.threads = 2;
    o.batch_size = 16;
    o.install_signal_handlers = false;
    try {
      p.process(path, o);
    } catch (const std::exception& e) {
      std::printf("process failed: %s\n", e.what());
      continue;
    }
    auto s = p.state();
    std::printf("processed %llu errors %llu\n", (unsigned long long)s->processed, (unsigned long long)s->errors);
    for (const auto& m : s->error_messages()) std::printf("%s\n", m.c_str());
  }
}
''')
    cpp = os.path.join(repo_dir, "cpp")
    framework = sorted(glob.glob(os.path.join(cpp, "framework", "*.cpp")))
    exe = tmp_path / "throws"
    subprocess.run([cxx, "-std=c++17", "-pthread", "-I", cpp, "-o", str(exe), str(tmp_path / "main.cpp"), *framework,
                    os.path.join(repo_dir, "modules", "event_info_setter.cpp")], check=True, timeout=300)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    lines = r.stdout.splitlines()
    assert lines[0] == "processed 100 errors 10", lines
    assert sorted(lines[1:11], key=lambda m: int(m.split()[8].rstrip(":"))) == [  # two threads: in any order
        f"Throws42 raised on exp 0 run 1 evt {e}: an exception not derived from std::exception" for e in range(3, 100, 10)]
    assert lines[11:] == ["process failed: Throws42.initialize failed: an exception not derived from std::exception"]


def test_a_float_parameter_default_is_shown_as_python_writes_it():
    """`eclreco modules NAME` showed a float default with a stream's 6 significant digits: 1.23456789 as
    1.23457 (not the value the module uses) and 1.0 as 1 (an int's look). It is now Python's repr."""

    class Floats(eclreco.Module):
        def __init__(self):
            super().__init__()
            self.add_param("precise", 1.23456789, "a float")
            self.add_param("whole", 1.0, "a whole float")
            self.add_param("small", 2.5e-7, "a small one")
            self.add_param("edges", [0.1, 2.0, 1e20], "a list")
            self.add_param("count", 3, "an int")

    shown = {p["name"]: p["default_repr"] for p in Floats().param_list()}
    assert shown == {"precise": "1.23456789", "whole": "1.0", "small": "2.5e-07", "edges": "[0.1, 2.0, 1e+20]",
                     "count": "3"}, shown
    assert all(repr(float(v)) == v for v in ("1.23456789", "1.0", "0.1"))  # Python's own spelling
    # %g's shortest wrote a whole float of two or more digits as 5e+01 (ECLDQM's, ECLEnergyCorrection's and
    # ECLEventFilter's max_abs_time_ns, ZMQInput's and ZMQOutput's timeouts)
    values = [50.0, 100.0, 200.0, 1e15, 1e16, 0.0001, 1e-05, 123.456, -0.0, 0.0, -7.5e-12, 2.0 ** 60, 1.7976931348623157e+308]

    class Many(eclreco.Module):
        def __init__(self):
            super().__init__()
            self.add_param("values", values, "floats")

    assert Many().param_list()[0]["default_repr"] == repr(values)
    from eclreco.framework import available_modules, create_module

    for name in available_modules():  # every float default that `eclreco modules NAME` shows
        for p in create_module(name).param_list():
            if p["type"] in ("float", "list[float]") and p["default_repr"] != "(required)":
                assert p["default_repr"] == repr(ast.literal_eval(p["default_repr"])), (name, p["name"], p["default_repr"])


# What each shipped module adds to its batches and reads (with its default parameters): declared by the
# module itself, C++ (Module::makes / needs) or Python (makes / requires).
RAW = ("RawEnvelopes", "RawPayloadRef")
DECLARED = {
    "RawFileInput": (RAW, ()), "SimulationInput": (RAW, ()), "ZMQInput": (RAW, ()), "EventInfoSetter": ((), ()),
    "ECLUnpacker": (("ECLDigits", "ECLEventInformation"), RAW), "ECLClusterizer": (("ECLClusters",), ("ECLDigits",)),
    "ECLLeakageCorrection": ((), ("ECLClusters",)), "ECLEnergyCorrection": ((), ("ECLClusters",)),
    "ECLEventFilter": ((), ("ECLClusters",)), "ECLDQM": ((), ()), "RootOutput": ((), ()), "ZMQOutput": ((), ()),
    "RejectedOutput": ((), ()), "Progress": ((), ()), "NoOp": ((), ()),
}


def test_every_module_says_what_it_makes_and_requires():
    """framework.CPP_MAKES, a table in Python, said what three C++ modules add; every other C++ module,
    a user's own included, was taken to add nothing (a clusterizer of one's own: a file without events
    lacked its cluster branches), and what a module reads was said nowhere. Each module now says it
    itself, C++ modules through the bindings, from its parameters."""
    import eclreco.framework

    assert not hasattr(eclreco.framework, "CPP_MAKES")
    assert set(DECLARED) == set(eclreco.available_modules())
    for name, (makes, requires) in DECLARED.items():
        m = eclreco.create_module(name)
        assert (tuple(m.makes()), tuple(m.requires())) == (makes, requires), name
    m = eclreco.create_module("ECLClusterizer")
    m.set_param("input", "MyDigits")
    m.set_param("output", "MyClusters")
    assert (list(m.makes()), list(m.requires())) == (["MyClusters"], ["MyDigits"])
    m = eclreco.create_module("ECLLeakageCorrection")
    m.set_param("collection", "MyClusters")
    assert list(m.requires()) == ["MyClusters"]
    # a Python module that does not say: None, it may add or read anything
    assert (Recorder().makes(), Recorder().requires()) == (None, None)


def test_makes_and_requires_are_tuples_for_cpp_and_python_modules():
    """docs/architecture.md gives makes()/requires() as a tuple of names (`ECLClusterizer`'s `(output,)`), as a
    Python module returns them; a C++ module's came through pybind11's stl.h as a list, so that
    `create_module("ECLClusterizer").makes() == ("ECLClusters",)` was False and `NoOp`'s `[]` was not `()`."""
    for name, (makes, requires) in DECLARED.items():
        m = eclreco.create_module(name)
        assert (m.makes(), m.requires()) == (makes, requires), (name, m.makes(), m.requires())
        assert type(m.makes()) is tuple and type(m.requires()) is tuple, name


class _Requires(eclreco.Module):
    """Declares what it reads (None: does not say)."""

    def __init__(self, requires=None, makes=None):
        super().__init__()
        self._requires, self._makes = requires, makes

    def requires(self):
        return self._requires

    def makes(self):
        return self._makes


def test_a_collection_that_no_module_before_makes_is_an_error_at_initialize(tmp_path):
    """A chain whose module reads a collection that nobody writes (a misspelt input, a module left out or
    put after its reader) ran the whole input, every event failing in that module ("no collection
    'ECLDigit'"), and an output wrote them all with their error flags. It is now refused at initialize
    (after the module's own initialize: its parameters are checked first), naming the module, the
    collection and what the modules before it make; no event is read, an output after it makes no file."""
    from eclreco.sources import MessageSource

    def run(*modules, output=None):
        path = eclreco.create_path()
        path.add_module("SimulationInput", events=5, detector="array30", particle="gamma", seed=3)
        for name, params in modules:
            path.add_module(name, **params)
        if output:
            path.add_module("RootOutput", filename=str(output))
        return eclreco.process(path, install_signal_handlers=False)

    out = tmp_path / "out.root"
    with pytest.raises(ValueError) as err:
        run(("ECLUnpacker", {}), ("ECLClusterizer", {"input": "ECLDigit"}), output=out)
    assert str(err.value) == (
        "ECLClusterizer (module 3 of the path) requires the collection 'ECLDigit', which no module before it "
        "makes (made before it: RawEnvelopes, RawPayloadRef by SimulationInput; ECLDigits, ECLEventInformation "
        "by ECLUnpacker)")
    assert eclreco.statistics.summary()["received"] == 0 and not out.exists()
    with pytest.raises(ValueError, match=r"ECLClusterizer .module 2 of the path. requires the collection 'ECLDigits', "
                                         r"which no module before it makes: ECLUnpacker .module 3 of the path. makes "
                                         r"it, after it \(made before it: RawEnvelopes, RawPayloadRef by SimulationInput\)"):
        run(("ECLClusterizer", {}), ("ECLUnpacker", {}))
    with pytest.raises(ValueError, match="ECLLeakageCorrection .module 4 of the path. requires the collection "
                                         "'MyClusters'"):
        run(("ECLUnpacker", {}), ("ECLClusterizer", {}), ("ECLLeakageCorrection", {"collection": "MyClusters"}))
    # the module's own parameter check comes first (its names may come from a bad value)
    with pytest.raises(Exception, match="image_size must be odd"):
        run(("ECLClusterizer", {"image_size": 4}))
    run(("ECLUnpacker", {}), ("ECLClusterizer", {}), ("ECLLeakageCorrection", {}), ("ECLDQM", {}), output=out)
    assert eclreco.statistics.summary()["processed"] == 5

    # a Python module: what it requires is checked as a C++ module's; one that does not say is never refused
    def python_path(*modules):
        path = eclreco.create_path()
        for m in modules:
            path.add_module(m)
        return eclreco.process(path, install_signal_handlers=False)

    with pytest.raises(ValueError, match=r"_Requires .module 2 of the path. requires the collection 'Mine', which no "
                                         r"module before it makes \(made before it: RawEnvelopes, RawPayloadRef by "
                                         r"MessageSource\)"):
        python_path(MessageSource([]), _Requires(("Mine",)))
    python_path(MessageSource([]), _Requires(makes=("Mine",)), _Requires(("Mine",)))
    python_path(MessageSource([]), _Requires(None))  # requires() not said: not refused
    python_path(CountingSource(5), _Requires(("Mine",)))  # its source does not say what it makes: may make Mine
    with pytest.raises(ValueError, match=r"_Requires .module 2 of the path. requires the collection 'Mine', which no "
                                         r"module before it makes \(no module before it makes a collection\)"):
        python_path(_Source(makes=()), _Requires(("Mine",)))
    # a str is no tuple of names (read letter by letter it required 'M', 'i', ...)
    with pytest.raises(TypeError, match=r"_Requires.requires\(\) must return None \(not said\) or collection names, "
                                        r"e.g. \('ECLClusters',\), not 'Mine'"):
        python_path(MessageSource([]), _Requires("Mine"))


class _MakesAfterInitialize(eclreco.Module):
    """What it makes comes from its initialize (before it, makes() raises AttributeError)."""

    def initialize(self):
        self.output = "Mine"

    def makes(self):
        return (self.output,)


def test_a_later_module_whose_makes_raises_leaves_the_missing_collection_message_as_it_is():
    """A missing collection's error asks the modules after it whether they make it; a later Python module
    whose makes() raised there (it reads what its initialize sets, not run yet) replaced the message with
    its AttributeError: which collection was missing, and for whom, went unsaid."""
    from eclreco.sources import MessageSource

    path = eclreco.create_path()
    for m in (MessageSource([]), _Requires(("Mine",)), _MakesAfterInitialize()):
        path.add_module(m)
    with pytest.raises(ValueError, match=r"^_Requires .module 2 of the path. requires the collection 'Mine', which no "
                                         r"module before it makes \(made before it: RawEnvelopes, RawPayloadRef by "
                                         r"MessageSource\)$"):
        eclreco.process(path, install_signal_handlers=False)


class _Source(_Requires):
    def is_source(self):
        return True

    def next_batch(self, batch, max_events):
        return False


def test_a_second_module_making_a_collection_is_an_error_naming_both():
    """A second ECLClusterizer in a chain (another seed threshold, say) replaced ECLClusters without a
    word: the modules after it and the output saw the second's clusters only. Two modules that say they
    make one collection are refused at initialize, naming both; another output name, or a module that
    rewrites the collection (requires it, makes nothing), is not."""
    from eclreco.sources import MessageSource

    def run(*modules):
        path = eclreco.create_path()
        path.add_module("SimulationInput", events=5, detector="array30", particle="gamma", seed=3)
        for m, params in modules:
            path.add_module(m, **params)
        return eclreco.process(path, install_signal_handlers=False)

    with pytest.raises(ValueError) as err:
        run(("ECLUnpacker", {}), ("ECLClusterizer", {}), ("ECLLeakageCorrection", {}),
            ("ECLClusterizer", {"seed_energy_gev": 0.02}))
    assert str(err.value).startswith(
        "ECLClusterizer (module 5 of the path) makes the collection 'ECLClusters', which ECLClusterizer (module 3 of "
        "the path) makes already: it would replace it")
    assert eclreco.statistics.summary()["received"] == 0
    run(("ECLUnpacker", {}), ("ECLClusterizer", {}), ("ECLClusterizer", {"seed_energy_gev": 0.02, "output": "Tight"}))
    assert eclreco.statistics.summary()["processed"] == 5
    with pytest.raises(ValueError, match=r"_Requires .module 3 of the path. makes the collection 'RawPayloadRef', which "
                                         r"MessageSource .module 1 of the path. makes already"):
        path = eclreco.create_path()
        for m in (MessageSource([]), _Requires((), ("Mine",)), _Requires((), ("RawPayloadRef",))):
            path.add_module(m)
        eclreco.process(path, install_signal_handlers=False)
    path = eclreco.create_path()  # a module that rewrites a collection requires it
    for m in (MessageSource([]), _Requires((), ("Mine",)), _Requires(("Mine",), ())):
        path.add_module(m)
    eclreco.process(path, install_signal_handlers=False)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_cluster_collection_without_a_column_the_correction_reads_ends_the_job_at_its_first_batch(threads):
    """A custom cluster source without `ring` (ArraySource with energy_raw and energy) before
    ECLLeakageCorrection failed every event, each re-run on its own, with "no column 'ring' in the
    collection": not which collection, nor that every event of the job would fail so. The module checks the
    columns it reads at its first batch: the job ends there, naming the module, the collection and what
    it lacks; the source is read no more."""
    from eclreco.sources import ArraySource

    n = 2000
    off = np.arange(n + 1)
    e = np.ones(n, np.float32)
    path = eclreco.create_path()
    path.add_module(ArraySource("ECLClusters", off, {"energy_raw": e, "energy": e}))
    path.add_module("ECLLeakageCorrection")
    with pytest.raises(RuntimeError) as err:
        eclreco.process(path, threads=threads, batch_size=100, install_signal_handlers=False)
    assert str(err.value) == (
        "ECLLeakageCorrection reads the columns energy_raw, ring, local_u, local_v, energy of the collection "
        "'ECLClusters', which has no 'ring', 'local_u', 'local_v' (its columns: energy, energy_raw): the module "
        "that makes 'ECLClusters' must write them; the job ends at its first batch")
    s = eclreco.statistics.summary()
    assert s["received"] < n and s["errors"] == s["received"] and s["fatal_error"] == str(err.value), s


@pytest.mark.parametrize("batch_size", [1, 4])  # the batch as the source made it; the re-run's one-event parts
def test_a_column_of_the_wrong_length_names_its_collection(batch_size):
    """A module that writes a column of the wrong length gets an error naming the collection as well as the
    column: 'column 'bad' has 3 rows, collection has 21' did not say which of the batch's collections."""
    class WrongLength(eclreco.Module):
        def event(self, batch):
            batch["ECLDigits"]["bad"] = np.zeros(batch["ECLDigits"].n_rows + 1, np.float32)

    path = eclreco.create_path()
    path.add_module(CountingSource(n=8))
    path.add_module(WrongLength())
    eclreco.process(path, batch_size=batch_size)
    first = eclreco.statistics.state.error_messages()[0]
    assert re.search(r"column 'bad' has \d+ rows, collection 'ECLDigits' has \d+", first), first
    assert eclreco.statistics.summary()["errors"] == 8


class FailsAtTerminate(eclreco.Module):
    def terminate(self):
        raise OSError("cannot close the histogram file")


def test_a_module_failing_at_terminate_is_the_jobs_fatal_error(tmp_path):
    """process() raises a module's terminate error, and summary()["fatal_error"] says it: it stayed None, so a
    job that failed at its end looked clean in its summary, and an output terminated after the module wrote
    fatal_error null into its file."""
    import json

    import uproot

    out = tmp_path / "out.root"
    path = eclreco.create_path()
    path.add_module(CountingSource(n=10))
    path.add_module(FailsAtTerminate())
    path.add_module("RootOutput", filename=str(out))
    with pytest.raises(RuntimeError, match="FailsAtTerminate.terminate failed: OSError: cannot close"):
        eclreco.process(path, install_signal_handlers=False)
    fatal = eclreco.statistics.summary()["fatal_error"]
    assert fatal and "FailsAtTerminate.terminate failed" in fatal and "cannot close the histogram file" in fatal
    with uproot.open(out) as f:  # written after the failed terminate: the file says its job failed
        assert json.loads(str(f["metadata"]))["fatal_error"] == fatal


def test_a_path_run_twice_or_rerun_event_by_event_gives_what_one_run_gives(tmp_path):
    """The same path processed twice (the HLT worker's runs), and batches re-run event by event after an
    error (here ECLEnergyCorrection without a model for half of the events' detector), give what one run in
    batches of one event gives: ECLEnergyCorrection's counters grow by the same amount (nothing counted
    for a call that raised), ECLDQM's histograms and RootOutput's events are the same (nothing of the
    earlier run or of the failed call carried over)."""
    import json

    import uproot

    from eclreco.rawdata import encode_events, write_raw_file
    from eclreco.sim import simulate

    msgs = []
    for k, det in enumerate(("belle2-ecl", "array30")):
        ev = simulate(detector=det, n_events=24, particle="gamma", energy=0.8, seed=21 + k)
        msgs.append(encode_events(det, 0, 1, np.arange(24) + 100 * k, ev.offsets, ev.cell, ev.amplitude,
                                  ev.time_ticks, ev.quality))
    raw = tmp_path / "in.raw"
    write_raw_file(raw, [m for pair in zip(*msgs) for m in pair])
    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=str(raw))
    for name in ("ECLUnpacker", "ECLClusterizer", "ECLLeakageCorrection"):
        path.add_module(name)
    cnn = path.add_module("ECLEnergyCorrection", detector="array30")  # the belle2-ecl events fail in it
    path.add_module("ECLDQM")
    out = path.add_module("RootOutput")

    def run(name, batch_size):
        before = cnn.counters()
        out.set_param("filename", str(tmp_path / name))
        eclreco.process(path, batch_size=batch_size, install_signal_handlers=False)
        s = eclreco.statistics.summary()
        with uproot.open(tmp_path / name) as f:
            events = f["events"].arrays().to_list()
            dqm = {k.split(";")[0]: f["dqm"][k].values().tolist() for k in f["dqm"].keys()}
            job = json.loads(str(f["metadata"]))["job"]
        grown = {k: v - before[k] for k, v in cnn.counters().items() if k != "inference_seconds"}
        return grown, events, dqm, job, (s["processed"], s["errors"], s["outputs"])

    one = run("one.root", 1)
    assert one[0]["clusters_corrected"] > 0 and one[4][1] > 12, one[4]  # the belle2-ecl events with clusters failed
    for name in ("first.root", "second.root"):
        got = run(name, 16)
        assert got[0] == {**one[0], "inference_calls": got[0]["inference_calls"]}
        assert got[1:] == one[1:], name


@pytest.mark.timeout(900)
def test_threaded_runs_have_no_data_race_under_thread_sanitizer():
    """fuzz/build_tsan.sh (ThreadSanitizer build, docs/reliability.md) on fuzz/tsan_scenarios.py: reco.py's
    path on two threads, twice, while the Prometheus exporter is scraped. It reported the Processor's state
    pointer copied by the exporter while process() replaced it (and its modules' list filled after), and the
    plain counters that RawFileInput and RejectedOutput return from counters() while the loop updates them."""
    import shutil

    if shutil.which("clang++") is None:
        pytest.skip("clang++ not found: the ThreadSanitizer build is skipped (apt-get install clang)")
    if os.environ.get("ECLRECO_TSAN") != "1":
        pytest.skip("set ECLRECO_TSAN=1 to build the extension with ThreadSanitizer and run the threaded "
                    "scenarios under it (a second compilation of the extension, minutes on two cores)")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(["bash", os.path.join(repo, "fuzz", "build_tsan.sh"), "1000"], capture_output=True, text=True,
                       timeout=890, cwd=repo)
    out = r.stdout + r.stderr
    if r.returncode == 2 and "no TSan runtime runs" in out:
        pytest.skip(out.strip().splitlines()[-1])  # neither clang's nor GCC's runtime loads into this Python
    reports = re.findall(r"SUMMARY: ThreadSanitizer: .*", out)
    assert not reports and r.returncode == 0, "\n".join(reports) or out[-4000:]
    assert out.count("2 runs of 1005 events") == 2, out[-4000:]


def test_float_arrays_are_checked_as_given():
    """The float32 inputs of the C++ kernels were converted with pybind11's forcecast: an array of strings was
    parsed (rows_at_least(np.array(['1.5']), 1.0), since removed, gave [0]), a bool array read as 0/1, a complex one
    had its imaginary part dropped with only a ComplexWarning. Each now goes through checked_reals<float>: a TypeError
    naming the argument and its dtype; floats of any width and byte order, integers and lists are read as before
    (rounded to float32)."""
    from eclreco import _core

    two_f32 = np.array([0.5, 2.0], np.float32)
    rows, off2 = np.array([0, 1], np.int64), np.array([0, 2], np.int64)
    q = np.zeros(2, np.uint8)
    table = os.path.join(os.path.dirname(eclreco.__file__), "data", "leakage_belle2-ecl.npz")
    ring = np.array([3, 30], np.int32)

    def digits(**kw):
        d = dict(offsets=off2, cell=np.array([100, 101], np.int32), energy=two_f32, time=np.zeros(2, np.float32),
                 quality=q)
        return {**d, **kw}

    def written(a):  # write_rows' parts: what it returns and the column it wrote
        b = _clusters({"e": np.ones(2, np.float32)})
        return _core.write_rows(b["C"], "e", rows, [a], 0.0), np.asarray(b["C"]["e"])

    calls = {
        "parts[0]": [written],
        "blocks[1]": [lambda a: _core.gather_rows(rows, off2, [two_f32[:, None], np.asarray(a)[:, None]],
                                                  [False, False])],
        "energy": [lambda a: _core.find_clusters("belle2-ecl", **digits(energy=a)),
                   lambda a: _core.gamma_gamma_masses(off2, a, *[two_f32] * 4, 0.1, 0.0, 4)],
        "time": [lambda a: _core.find_clusters("belle2-ecl", **digits(time=a)),
                 lambda a: _core.count_out_of_time_digits(off2, a, q),
                 lambda a: _core.gamma_gamma_masses(off2, *[two_f32] * 4, a, 0.1, 0.0, 4)],
        "energy_raw": [lambda a: _core.leakage_correct(table, a, ring, two_f32, two_f32)],
        "local_u": [lambda a: _core.leakage_correct(table, two_f32, ring, a, two_f32)],
        "local_v": [lambda a: _core.leakage_correct(table, two_f32, ring, two_f32, a)],
        **{k: [lambda a, k=k: _core.gamma_gamma_masses(off2, *[a if c == k else two_f32 for c in "exyzt"], 0.1, 0.0,
                                                       4)] for k in "xyz"},
    }

    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, tuple):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return np.array_equal(a, b, equal_nan=np.asarray(a).dtype.kind == "f")

    for name, fns in calls.items():
        for call in fns:
            for bad, dtype in ((np.array(["1.5", "0.5"]), "<U3"), (np.array([True, False]), "bool"),
                               (np.array([1 + 2j, 0.5]), "complex128"), (np.array([1.5, None]), "object")):
                with pytest.raises(TypeError, match=rf"^{re.escape(name)} must be a float or integer array, not {dtype}$"):
                    call(bad)
            want = call(two_f32)
            for ok in (two_f32.astype(np.float64), two_f32.astype(">f4"), two_f32.astype(np.float16), [0.5, 2.0],
                       np.array([[0.5, 0.0], [2.0, 0.0]], np.float32)[:, 0]):
                assert same(call(ok), want), (name, ok)
            int_want = call(np.array([1, 2], np.float32))
            for ok in (np.array([1, 2]), np.array([1, 2], np.uint8), [1, 2]):
                assert same(call(ok), int_want), (name, ok)
    with pytest.raises(ValueError, match=r"^parts\[0\] must be 1-d, not of shape \(2, 2\)$"):
        written(np.zeros((2, 2), np.float32))
    # inference_inputs' value and time are columns: of the dtypes a column can hold, bool is refused, naming it
    def select(cols):
        return _core.inference_inputs(_clusters(cols), "C", [], 0.1, 0.0, 1.0)[:2]

    for name in ("energy_raw", "time"):
        with pytest.raises(TypeError, match=rf"^{name} must be a float or integer array, not bool$"):
            select({"energy_raw": two_f32, "time": two_f32, name: np.array([True, False])})
        want = select({"energy_raw": two_f32, "time": two_f32, name: np.array([1, 2], np.float32)})
        for ok in (np.array([1, 2]), np.array([1, 2], np.uint8), np.array([1, 2], np.float64)):
            assert same(select({"energy_raw": two_f32, "time": two_f32, name: ok}), want), (name, ok)
    with pytest.raises(ValueError, match=r"^blocks\[1\] must be 2-d, not 1-d$"):  # (it named no block)
        _core.gather_rows(rows, off2, [two_f32[:, None], two_f32], [False, False])


def test_event_batch_counts_and_sequence_are_checked_integers():
    """EventBatch(n_events), resize(n_events) and the sequence setter cast with pybind11: EventBatch(True) made a
    batch of 1 event, resize(True) resized to 1, sequence = True set 1, and -1 or 2**70 was the several-line
    "incompatible constructor arguments". They now go through checked_integer<uint64_t>."""
    from helpers import assert_checked_integer

    def resized(n):
        b = eclreco.EventBatch(3)
        b.resize(n)
        return len(b)

    def sequence(v):
        b = eclreco.EventBatch(1)
        b.sequence = v
        return b.sequence

    assert_checked_integer(lambda n: len(eclreco.EventBatch(n)), "n_events", 5, 64, signed=False)
    assert_checked_integer(resized, "n_events", 5, 64, signed=False)
    assert_checked_integer(sequence, "sequence", 5, 64, signed=False)
    assert len(eclreco.EventBatch()) == 0 and len(eclreco.EventBatch(n_events=2)) == 2 and resized(7) == 7
    assert sequence(2**64 - 1) == 2**64 - 1  # the whole uint64


def test_process_options_are_checked_in_the_binding():
    """Processor.process(path, max_events, threads, batch_size) and check_process_options cast with pybind11:
    check_process_options(True, 256) accepted True as 1 thread and Processor.process(threads=True) ran with 1 (only
    eclreco.process() checked, in Python, with its own words); 2**40 threads was pybind11's several-line
    "incompatible function arguments". Each now goes through checked_integer in one place (process_options), which
    eclreco.process() calls too."""
    from eclreco import _core
    from helpers import assert_checked_integer

    assert_checked_integer(lambda n: _core.check_process_options(n, 256), "threads", 5, 31)
    assert_checked_integer(lambda n: _core.check_process_options(1, n), "batch_size", 5, 63)
    assert_checked_integer(lambda n: _core.check_process_options(1, 1, max_events=n), "max_events", 5, 63)
    with pytest.raises(ValueError, match=r"^max_events must be >= 0 \(0: every event\), not -1$"):
        _core.check_process_options(1, 1, max_events=-1)
    for name, bad, error, match in (("threads", True, TypeError, "threads must be an int, not bool True"),
                                    ("batch_size", np.True_, TypeError, "batch_size must be an int, not bool"),
                                    ("max_events", 1.0, TypeError, "max_events must be an int, not float 1.0"),
                                    ("max_events", -1, ValueError, r"max_events must be >= 0 \(0: every event\)"),
                                    ("threads", 2**40, ValueError, r"threads = 1099511627776 is out of range"),
                                    ("threads", 0, ValueError, r"threads must be 1\.\.256, not 0")):
        path = eclreco.create_path()
        path.add_module(CountingSource(n=3))
        processor = _core.Processor()
        with pytest.raises(error, match=f"^{match}"):
            processor.process(path._cpp, install_signal_handlers=False, **{name: bad})
        assert processor.state.received == 0, name  # refused before any event
        with pytest.raises(error, match=f"^process\\(\\): {match}"):
            eclreco.process(path, install_signal_handlers=False, **{name: bad})
    path = eclreco.create_path()
    path.add_module(CountingSource(n=5))
    processor = _core.Processor()
    processor.process(path._cpp, max_events=np.int64(3), threads=np.uint8(2), batch_size=np.int32(2),
                      install_signal_handlers=False)
    assert processor.state.received == 3


def test_module_begin_run_and_end_run_check_exp_and_run():
    """Module.begin_run(exp, run) / end_run were bound to the C++ methods: pybind11 read begin_run(True, 1) as
    experiment 1, and -1 or 2**64 was its several-line "incompatible function arguments". exp and run now go through
    checked_integer<uint64_t>; a C++ module gets the values given."""
    from helpers import assert_checked_integer

    module = eclreco.Module()
    for method in (module.begin_run, module.end_run):
        assert_checked_integer(lambda exp: method(exp, 1), "exp", 5, 64, signed=False)
        assert_checked_integer(lambda run: method(1, run), "run", 5, 64, signed=False)
        method(exp=2**64 - 1, run=0)  # the whole uint64


def test_flag_error_and_select_refuse_bools_as_event_indices():
    """EventBatch.flag_error(index, message) and select(events) cast with pybind11: flag_error(True, 'x') flagged
    event 1, select([True, False]) selected events 1 and 0, and select([-1]) was the several-line "incompatible
    function arguments". flag_error now reads its index as reject does (event_index), select its indices as
    discard does (checked_numbers)."""
    b = eclreco.EventBatch(3)
    b.evt[:] = [10, 11, 12]
    for bad in (True, np.True_):
        with pytest.raises(TypeError, match=r"^flag_error: (True|np.True_) is not an event index"):
            b.flag_error(bad, "x")
    with pytest.raises(TypeError, match=r"^flag_error: takes one event index, not 1.5$"):
        b.flag_error(1.5, "x")
    with pytest.raises(IndexError, match=r"^flag_error: event index -1 is negative$"):
        b.flag_error(-1, "x")
    assert not b.errors()
    b.flag_error(np.int64(2), "x")
    assert b.errors() == {2: "x"}
    with pytest.raises(TypeError, match=r"^events must be an integer array, not bool"):
        b.select([True, False])
    with pytest.raises(IndexError, match=r"^select: events\[0\] = -1 is negative$"):
        b.select([-1])
    with pytest.raises(TypeError, match=r"^events must be an integer array, not float64"):
        b.select([1.0])
    assert b.select(np.array([2, 0], np.uint8)).evt.tolist() == [12, 10] and len(b.select([])) == 0
