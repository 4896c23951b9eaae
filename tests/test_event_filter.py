"""Event filters: batch.discard (an HLT selection's decision), its accounting, the modules and
outputs that skip discarded events, ECLEventFilter against a per-event reference, and the
discards on the way through the farm's batch message."""
import numpy as np
import pytest
import uproot

import eclreco
from helpers import CountingSource, Recorder


class _DropsMultiplesOf3(eclreco.Module):
    """Discards evt % 3 == 0, as a boolean mask (or as indices with as_indices)."""

    def __init__(self, as_indices=False):
        super().__init__()
        self.as_indices = as_indices

    def event(self, batch):
        drop = batch.evt % 3 == 0
        batch.discard(np.flatnonzero(drop) if self.as_indices else drop, "evt_mod_3")


class _RecordsActive(eclreco.Module):
    def __init__(self):
        super().__init__()
        self.active, self.discards = [], {}

    def ordered(self):
        return True

    def event(self, batch):
        base = len(self.active)
        self.active.extend(batch.active().tolist())
        self.discards.update({base + i: r for i, r in batch.discards().items()})


@pytest.mark.parametrize("threads,as_indices", [(1, False), (2, True)])
def test_discarded_events_are_counted_as_processed_skipped_after_the_filter_and_not_written(
        tmp_path, threads, as_indices):
    path = eclreco.create_path()
    path.add_module(CountingSource(n=1000))
    path.add_module(_DropsMultiplesOf3(as_indices))
    seen = path.add_module(_RecordsActive())
    rec = path.add_module(Recorder())
    path.add_module("RootOutput", filename=str(tmp_path / "kept.root"))
    eclreco.process(path, threads=threads, batch_size=100, install_signal_handlers=False)
    s = eclreco.statistics.summary()
    assert (s["received"], s["processed"], s["rejected"], s["errors"]) == (1000, 1000, 0, 0)
    assert s["discarded"] == 334 and s["discarded_by_reason"] == {"evt_mod_3": 334}
    assert "discarded [evt_mod_3]: 334" in str(eclreco.statistics)
    assert "kept 666 of the processed" in str(eclreco.statistics)
    evt = np.array(rec.evt)
    assert evt.tolist() == list(range(1000))  # modules after the filter still get the whole batch
    flags = np.array(rec.flags)
    np.testing.assert_array_equal((flags & eclreco.ERROR_DISCARDED) != 0, evt % 3 == 0)
    np.testing.assert_array_equal(seen.active, evt % 3 != 0)
    assert set(seen.discards.values()) == {"evt_mod_3"} and sorted(seen.discards) == list(range(0, 1000, 3))
    with uproot.open(tmp_path / "kept.root") as f:
        written = f["events"]["evt"].array(library="np")
    np.testing.assert_array_equal(written, evt[evt % 3 != 0])


def test_discard_refuses_what_it_cannot_mean():
    b = eclreco.EventBatch(4)
    with pytest.raises(ValueError, match="the mask has 3 entries for a batch of 4"):
        b.discard(np.array([True, False, True]), "cut")
    with pytest.raises(IndexError, match="negative"):
        b.discard([-1], "cut")
    with pytest.raises(IndexError):
        b.discard(4, "cut")
    with pytest.raises(TypeError, match="integers or the mask booleans"):
        b.discard(np.array([0.5]), "cut")
    with pytest.raises(ValueError, match="needs a reason"):
        b.discard(0, "")
    # a 0/1 integer mask read as indices discarded events 0 and 1; a bad index after good ones
    # left the good ones discarded
    with pytest.raises(ValueError, match="index 1 is given twice; a mask must be boolean"):
        b.discard(np.array([1, 0, 1, 1], np.int8), "cut")
    with pytest.raises(IndexError, match="-1 is negative"):
        b.discard([0, -1], "cut")
    with pytest.raises(IndexError, match="4 is out of range for a batch of 4"):
        b.discard([0, 4], "cut")
    assert b.discards() == {} and not (b.error_flags & eclreco.ERROR_DISCARDED).any()
    b.reject(1, "crc_mismatch")
    b.discard([1, 2], "cut")
    b.discard(2, "another")  # the first decision stays
    assert b.discards() == {2: "cut"}  # a rejected event is not processed, so no filter decides on it
    assert b.active().tolist() == [True, False, False, True]
    assert b.select([2, 3]).discards() == {0: "cut"}
    assert eclreco.EventBatch.concat([b, b]).discards() == {2: "cut", 6: "cut"}


def test_discard_and_reject_take_numpy_indices_and_refuse_a_bool():
    """An index from numpy (`for i in np.flatnonzero(cut): batch.discard(i, ...)`, `np.argmax`) was refused
    with a TypeError, and `discard(True, ...)` / `reject(True, ...)` took the bool for index 1."""
    b = eclreco.EventBatch(4)
    for i in np.flatnonzero(np.array([False, True, False, True])):
        b.discard(i, "cut")
    assert b.discards() == {1: "cut", 3: "cut"}
    b.reject(np.int32(0), "crc_mismatch")
    assert list(b.rejections()) == [0]
    for scalar in (True, np.True_, False):
        with pytest.raises(TypeError, match="is not an event index"):
            b.discard(scalar, "cut")
        with pytest.raises(TypeError, match="is not an event index"):
            b.reject(scalar, "crc_mismatch")
    with pytest.raises(IndexError, match="-1 is negative"):
        b.reject(-1, "crc_mismatch")
    with pytest.raises(IndexError, match="event index 4 out of range"):
        b.discard(np.uint64(4), "cut")
    assert b.discards() == {1: "cut", 3: "cut"} and list(b.rejections()) == [0]


def test_a_checked_event_index_past_int64_is_named_as_given():
    """event_index reads an index with the steps of checked_integer (one place for them), with its own messages: an
    index past int64 either way is an IndexError naming it as given, a numpy int is an index, a float is not."""
    b = eclreco.EventBatch(4)
    for call in (b.reject, b.discard):
        name = call.__name__
        with pytest.raises(IndexError, match=rf"^{name}: event index {-2**70} is negative$"):
            call(-2**70, "cut")
        with pytest.raises(IndexError, match=rf"^{name}: event index {2**70} is out of range$"):
            call(2**70, "cut")
        with pytest.raises(TypeError, match=rf"^{name}: True is not an event index \(a mask is a boolean array"):
            call(True, "cut")
        with pytest.raises(TypeError, match=rf"^{name}: takes "):  # not read as event 1
            call(1.0, "cut")
    b.reject(np.uint8(2), "cut")
    b.discard(np.int64(3), "cut")
    assert list(b.rejections()) == [2] and b.discards() == {3: "cut"}


def test_discard_names_an_index_as_given():
    """discard converted integer indices with pybind11's forcecast to int64: a uint64 2**64 - 1 wrapped to -1 and was
    refused as 'event index -1 is negative', a value the caller never gave. The indices now go through
    checked_numbers<int64_t>: the error names the entry as given; indices of any integer width that fit are read
    as before."""
    b = eclreco.EventBatch(4)
    with pytest.raises(IndexError, match=rf"^discard: events\[1\] = {2**64 - 1} is out of range \(above 2\*\*63 - 1\)$"):
        b.discard(np.array([0, 2**64 - 1], np.uint64), "cut")
    with pytest.raises(IndexError, match=r"^discard: events\[0\] = -3 is negative$"):
        b.discard(np.array([-3, 1], np.int8), "cut")
    assert b.discards() == {}  # a refused call discards nothing
    b.discard(np.array([1, 3], ">u8"), "cut")
    b.discard(np.array([0], np.uint8), "cut")
    assert b.discards() == {0: "cut", 1: "cut", 3: "cut"}


class _DropsOdd(eclreco.Module):
    def event(self, batch):
        batch.discard(batch.evt % 2 == 1, "odd")


def test_cpp_and_cnn_modules_skip_events_discarded_before_them():
    """A filter early in the chain saves the work after it: ECLClusterizer makes no clusters for
    a discarded event, and ECLEnergyCorrection runs its network only on the clusters of the kept
    ones (theirs keep the classical energy)."""

    def run(drop_before):
        path = eclreco.create_path()
        path.add_module("SimulationInput", events=400, seed=5)
        path.add_module("ECLUnpacker")
        for name in ("ECLClusterizer", "ECLLeakageCorrection", "ECLEnergyCorrection"):
            if name == drop_before:
                path.add_module(_DropsOdd())
            path.add_module(name)
        out = {"counts": [], "energy": []}

        class Clusters(eclreco.Module):
            def ordered(self):
                return True

            def event(self, batch):
                c = batch["ECLClusters"]
                out["counts"].extend(np.diff(c.offsets).tolist())
                out["energy"].append(np.asarray(c["energy"]))

        path.add_module(Clusters())
        eclreco.process(path, install_signal_handlers=False)
        cnn = [m for m in path.modules if m.type == "ECLEnergyCorrection"][0]
        return np.array(out["counts"]), np.concatenate(out["energy"]), cnn.counters()["clusters_corrected"]

    all_counts, all_energy, all_cnn = run(None)
    odd = np.arange(400) % 2 == 1
    counts, _, n_cnn = run("ECLClusterizer")
    assert (counts[odd] == 0).all() and (all_counts[odd] > 0).mean() > 0.9
    np.testing.assert_array_equal(counts[~odd], all_counts[~odd])
    assert 0.3 * all_cnn < n_cnn < 0.7 * all_cnn
    counts, energy, n_cnn = run("ECLEnergyCorrection")
    np.testing.assert_array_equal(counts, all_counts)
    assert 0.3 * all_cnn < n_cnn < 0.7 * all_cnn, (n_cnn, all_cnn)
    rows_odd = np.repeat(odd, counts)
    # the network's result depends on its batch's size in the last bits
    np.testing.assert_allclose(energy[~rows_odd], all_energy[~rows_odd], rtol=1e-5)
    assert (~np.isclose(energy[rows_odd], all_energy[rows_odd], rtol=1e-3)).mean() > 0.3  # classical, not the CNN's


def test_ecl_event_filter_keeps_the_events_its_cuts_select(tmp_path):
    """ECLEventFilter against a reference computed per event from the clusters of the unfiltered
    job's ROOT file: at least 2 clusters of >= 0.1 GeV within 50 ns, summing to >= 1 GeV."""
    from eclreco.reconstruction import add_reconstruction

    def run(name, **cuts):
        path = eclreco.create_path()
        path.add_module("SimulationInput", events=600, seed=11)
        add_reconstruction(path)
        if cuts:
            path.add_module("ECLEventFilter", **cuts)
        path.add_module("RootOutput", filename=str(tmp_path / name))
        eclreco.process(path, install_signal_handlers=False)
        return eclreco.statistics.summary()

    run("all.root")
    s = run("kept.root", min_clusters=2, min_energy_sum_gev=1.0)
    with uproot.open(tmp_path / "all.root") as f:
        t = f["events"]
        evt, energy, time = t["evt"].array(library="np"), t["cluster_energy"].array(), t["cluster_time"].array()
    expected = []
    for i in range(len(evt)):
        e, tm = np.asarray(energy[i]), np.asarray(time[i])
        counted = (e >= 0.1) & (np.abs(tm) <= 50.0)
        if counted.sum() >= 2 and e[counted].sum() >= 1.0:
            expected.append(evt[i])
    with uproot.open(tmp_path / "kept.root") as f:
        kept = f["events"]["evt"].array(library="np")
    assert 0.2 * len(evt) < len(expected) < 0.95 * len(evt)  # a cut that selects
    np.testing.assert_array_equal(kept, expected)
    assert s["discarded_by_reason"] == {"ECLEventFilter": len(evt) - len(expected)}


def test_ecl_event_filter_refuses_negative_cuts_and_a_path_without_clusters():
    path = eclreco.create_path()
    path.add_module(CountingSource(n=10))
    path.add_module("ECLEventFilter", min_energy_sum_gev=-1.0)
    with pytest.raises(Exception, match="min_energy_sum_gev must be >= 0"):
        eclreco.process(path, install_signal_handlers=False)
    path = eclreco.create_path()
    path.add_module(CountingSource(n=10))
    path.add_module("ECLEventFilter", min_clusters=1)
    eclreco.process(path, install_signal_handlers=False)
    s = eclreco.statistics.summary()
    assert s["errors"] == 10 and s["discarded"] == 0  # not "every event discarded", silently
    assert "no collection 'ECLClusters'" in eclreco.statistics.state.error_messages()[0]


def test_discards_travel_in_the_batch_message():
    """worker -> collector: the reasons come back on the same events, a flag without its reason
    is still counted (discarded_upstream); the discarded events' clusters are not sent
    (strip_discarded), a per-event collection keeps its row for every event."""
    from eclreco.hlt import protocol as P

    b = eclreco.EventBatch(3)
    b.evt[:] = [7, 8, 9]
    b.add_collection("ECLClusters", np.array([0, 2, 3, 5]), {"energy": np.arange(5, dtype=np.float32),
                                                             "seed_cell": np.arange(5, dtype=np.int32) + 10})
    b.add_collection("ECLEventInformation", np.arange(4), {"n_out_of_time_digits": np.array([4, 5, 6], np.int32)})
    b.discard([0, 2], "too_soft")
    kept_all = P.unpack(P.pack(P.batch_to_message(b, collections=["ECLClusters", "ECLEventInformation"],
                                                  strip_discarded=())))
    msg = P.unpack(P.pack(P.batch_to_message(b, collections=["ECLClusters", "ECLEventInformation"])))
    assert len(P.pack(msg)) < len(P.pack(kept_all))
    assert msg["discards"] == [[0, "too_soft"], [2, "too_soft"]]
    out = eclreco.EventBatch(0)
    d = P.DecodedBatch(msg)
    P.fill_batch(out, [d], [np.array([True, True, True])])
    assert out.discards() == {0: "too_soft", 2: "too_soft"} and out.active().tolist() == [False, True, False]
    assert out.evt.tolist() == [7, 8, 9]
    np.testing.assert_array_equal(out["ECLClusters"].offsets, [0, 0, 1, 1])
    np.testing.assert_array_equal(out["ECLClusters"]["energy"], [2])
    np.testing.assert_array_equal(out["ECLClusters"]["seed_cell"], [12])
    np.testing.assert_array_equal(out["ECLEventInformation"]["n_out_of_time_digits"], [4, 5, 6])
    out = eclreco.EventBatch(0)
    P.fill_batch(out, [P.DecodedBatch(kept_all)], [np.array([True, True, True])])
    np.testing.assert_array_equal(out["ECLClusters"]["energy"], np.arange(5))  # strip_discarded=(): all rows
    del msg["discards"]  # the flag alone
    out = eclreco.EventBatch(0)
    P.fill_batch(out, [P.DecodedBatch(msg)], [np.array([False, True, True])])
    assert out.discards() == {1: "discarded_upstream"}
    bad = P.unpack(P.pack(P.batch_to_message(b)))
    bad["discards"] = [[5, "x"]]
    with pytest.raises(ValueError, match="index out of range"):
        P.DecodedBatch(bad)


def test_flags_that_arrive_without_their_reasons_are_still_counted():
    """A batch message whose error_flags mark events rejected, failed or discarded, without the
    reason lists (an older or foreign producer): the collector keeps each event in its class, under a
    generic reason, and the flags of the kept events only."""
    from eclreco.hlt import protocol as P

    b = eclreco.EventBatch(5)
    b.evt[:] = np.arange(5)
    b.reject(0, "bad_header", "x")
    b.flag_error(1, "boom")
    b.discard(2, "too_soft")
    b.discard(4, "too_soft")
    msg = P.unpack(P.pack(P.batch_to_message(b)))
    for key in ("rejections", "errors", "discards"):
        del msg[key]
    out = eclreco.EventBatch(0)
    P.fill_batch(out, [P.DecodedBatch(msg)], [np.array([True, True, True, True, False])])
    assert out.evt.tolist() == [0, 1, 2, 3]
    assert out.rejections() == {0: ("rejected_upstream", "flagged rejected without a reason")}
    assert out.errors() == {1: "module error upstream (no message)"}
    assert out.discards() == {2: "discarded_upstream"}
    assert out.active().tolist() == [False, True, False, True]


def test_discarded_events_are_exported_by_reason():
    from eclreco.metrics import ProcessMetricsCollector

    path = eclreco.create_path()
    path.add_module(CountingSource(n=300))
    path.add_module(_DropsMultiplesOf3())
    eclreco.process(path, install_signal_handlers=False)
    fams = {f.name: f for f in ProcessMetricsCollector("test", path).collect()}
    samples = {s.labels["reason"]: s.value for s in fams["eclreco_events_discarded"].samples
               if s.name.endswith("_total")}
    assert samples == {"evt_mod_3": 100}
    processed = [s.value for s in fams["eclreco_events_processed"].samples if s.name.endswith("_total")]
    assert processed == [300]


def test_ecldqm_after_a_filter_histograms_the_kept_events_only():
    """As in the farm, where the collector's ECLDQM gets the workers' filtered events: the DQM
    after a filter shows what is kept (the discarded events' clusters are not filled)."""
    def run(drop):
        path = eclreco.create_path()
        path.add_module("SimulationInput", events=300, seed=2)
        path.add_module("ECLUnpacker")
        path.add_module("ECLClusterizer")
        if drop:
            path.add_module(_DropsOdd())
        dqm = path.add_module("ECLDQM")
        eclreco.process(path, install_signal_handlers=False)
        return {name: h.entries for name, h in dqm.h.items()}  # the histograms are reset by the next run

    full, kept = run(False), run(True)
    assert 0.3 * full["cluster_energy"] < kept["cluster_energy"] < 0.7 * full["cluster_energy"], (kept, full)
    assert kept["cluster_multiplicity"] == 150 and full["cluster_multiplicity"] == 300
    assert kept["digits_per_event"] == 150
    assert 0 < kept["gg_mass"] < full["gg_mass"]


def test_per_event_sum_matches_a_loop_over_events():
    off = np.array([0, 3, 3, 4, 8])  # an event without rows in between
    e = np.array([0.1, 0.2, 0.3, 5.0, 1.0, 2.0, 3.0, 4.0], np.float32)
    np.testing.assert_allclose(eclreco.per_event_sum(e, off), [sum(e[a:b]) for a, b in zip(off[:-1], off[1:])])
    flags = e > 0.25
    counts = eclreco.per_event_sum(flags, off)
    assert counts.dtype == np.int64 and counts.tolist() == [1, 0, 1, 4]
    assert eclreco.per_event_sum(np.zeros(0, np.float32), np.array([0, 0])).tolist() == [0.0]


def test_event_filter_counters_are_exact_with_threads():
    """ECLEventFilter runs on two batches at once with threads > 1; its counters (events_kept,
    events_discarded: eclreco_module_value) were updated by a read-add-write around a numpy call
    and lost counts (12,594 of 12,619 kept with forced thread switches)."""
    from eclreco.sources import ArraySource
    from helpers import forced_thread_switches

    rng = np.random.default_rng(1)
    off = np.concatenate([[0], np.cumsum(rng.integers(0, 3, 20000))])
    cols = {"energy": rng.uniform(0, 1, off[-1]).astype(np.float32), "time": np.zeros(off[-1], np.float32)}
    for _ in range(4):
        path = eclreco.create_path()
        path.add_module(ArraySource("ECLClusters", off, cols))
        f = path.add_module("ECLEventFilter", min_clusters=1)
        with forced_thread_switches():
            eclreco.process(path, threads=2, batch_size=4, install_signal_handlers=False)
        s = eclreco.statistics.summary()
        assert f.counters() == {"events_kept": s["processed"] - s["discarded"], "events_discarded": s["discarded"]}


def test_event_filter_counters_run_on_over_runs():
    """An HLT worker runs one process() per run with the same path: ECLEventFilter's counters (exported
    as eclreco_module_value, read as Prometheus counters) went back to 0 at each initialize."""
    from eclreco.sources import ArraySource

    off = np.array([0, 0, 1, 3, 3, 4])
    cols = {"energy": np.full(4, 0.5, np.float32), "time": np.zeros(4, np.float32)}
    path = eclreco.create_path()
    path.add_module(ArraySource("ECLClusters", off, cols))
    f = path.add_module("ECLEventFilter", min_clusters=1)
    for k in (1, 2):
        eclreco.process(path, install_signal_handlers=False)
        assert f.counters() == {"events_kept": 3.0 * k, "events_discarded": 2.0 * k}


@pytest.mark.parametrize("threads", [1, 2])
def test_a_cluster_collection_without_a_column_the_filter_reads_ends_the_job_at_its_first_batch(threads):
    """ECLEventFilter on clusters without `time` (an ArraySource of energies, as README's) or with a misspelt
    `energy_column` failed every event, each re-run on its own, with a KeyError: 2000 module errors for one
    mistake. It checks the columns it reads at its first batch, as the chain's other modules do
    (Module.require_columns): the job ends there with one message naming the module and the column."""
    from eclreco.sources import ArraySource

    n = 2000
    offsets = np.arange(n + 1) * 2
    energy = np.tile(np.array([0.5, 1.5], np.float32), n)
    for params, message in (
            ({}, "ECLEventFilter reads the columns energy, time of the collection 'ECLClusters', which has no "
                 "'time' (its columns: energy): the module that makes 'ECLClusters' must write them; the job "
                 "ends at its first batch"),
            ({"energy_column": "enrgy", "max_abs_time_ns": 0.0},
             "ECLEventFilter reads the columns enrgy of the collection 'ECLClusters', which has no 'enrgy' (its "
             "columns: energy): the module that makes 'ECLClusters' must write them; the job ends at its first "
             "batch")):
        path = eclreco.create_path()
        path.add_module(ArraySource("ECLClusters", offsets, {"energy": energy}))
        path.add_module("ECLEventFilter", min_clusters=2, **params)
        with pytest.raises(RuntimeError) as err:
            eclreco.process(path, threads=threads, batch_size=100, install_signal_handlers=False)
        assert str(err.value) == message
        s = eclreco.statistics.summary()
        assert s["received"] < n and s["fatal_error"] == message, s
    # without the time cut, energies alone are enough
    path = eclreco.create_path()
    path.add_module(ArraySource("ECLClusters", offsets, {"energy": energy}))
    path.add_module("ECLEventFilter", min_clusters=2, min_energy_sum_gev=1.0, max_abs_time_ns=0.0)
    eclreco.process(path, threads=threads, batch_size=100, install_signal_handlers=False)
    s = eclreco.statistics.summary()
    assert s["processed"] == n and s["errors"] == 0 and s["discarded"] == 0, s
