"""RootOutput: read back with uproot."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import uproot

import eclreco
from helpers import CountingSource


def test_root_output_roundtrip(tmp_path):
    out = tmp_path / "out.root"
    path = eclreco.create_path()
    path.add_module(CountingSource(2500, run_length=1000))
    path.add_module("RootOutput", filename=str(out), basket_events=1000)
    eclreco.process(path, threads=2, batch_size=100)
    with uproot.open(out) as f:
        t = f["events"]
        assert t.num_entries == 2500
        arr = t.arrays(["evt", "run", "n_digits"], library="np")
        assert arr["evt"].tolist() == list(range(2500))
        assert arr["run"].tolist() == [e // 1000 for e in range(2500)]
        assert arr["n_digits"].tolist() == [e % 5 for e in range(2500)]
        # No clusters were produced: no made-up cluster branches.
        assert not any(k.startswith("cluster") for k in t.keys())


def test_root_output_valid_after_sigint(tmp_path):
    out = tmp_path / "sig.root"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import eclreco
        from helpers import CountingSource
        class Slow(eclreco.Module):
            '''slows the run down so that the signal arrives mid-run'''
            def event(self, batch):
                time.sleep(0.01)
        path = eclreco.create_path()
        path.add_module(CountingSource(10**9))
        path.add_module(Slow())
        path.add_module("ECLDQM")
        path.add_module("RootOutput", filename={str(out)!r}, basket_events=500)
        print("started", flush=True)
        eclreco.process(path, batch_size=100)
        print(eclreco.statistics, flush=True)
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "started"
    import time

    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    stdout, _ = p.communicate(timeout=60)
    assert p.returncode == 0, stdout
    with uproot.open(out) as f:
        n = f["events"].num_entries
        evt = f["events"]["evt"].array(library="np")
        dqm_entries = f["dqm/digits_per_event"].to_numpy()[0].sum()
    assert n > 0 and evt.tolist() == list(range(n))
    assert dqm_entries == n  # DQM histograms written at the end of the interrupted run


class InterruptedSource(CountingSource):
    """CountingSource that sends SIGINT to its own process after its third batch (as Ctrl-C would)."""

    def next_batch(self, batch, max_events):
        more = super().next_batch(batch, max_events)
        if self.next == 3 * max_events:
            os.kill(os.getpid(), signal.SIGINT)
        return more


def test_metadata_says_a_job_was_stopped_by_a_signal(tmp_path):
    """A job cut short by SIGINT/SIGTERM writes a valid file of the events before the stop; its metadata
    said nothing of it (the same counts as a complete job of that many events): `stopped_by` names the
    signal, and is null for a job that read its input to the end."""
    import json

    for name, source in (("whole.root", CountingSource(1000)), ("cut.root", InterruptedSource(10**6))):
        path = eclreco.create_path()
        path.add_module(source)
        path.add_module("RootOutput", filename=str(tmp_path / name))
        eclreco.process(path, batch_size=100)
    with uproot.open(tmp_path / "whole.root") as f:
        assert f["events"].num_entries == 1000
        meta = json.loads(str(f["metadata"]))
        assert meta["stopped_by"] is None and meta["fatal_error"] is None
    with uproot.open(tmp_path / "cut.root") as f:
        meta = json.loads(str(f["metadata"]))
        assert 300 <= f["events"].num_entries == meta["events_written"] < 10**6
        assert meta["stopped_by"] == "SIGINT" and meta["fatal_error"] is None
    # the next job of the process, without signal handlers (as `eclreco validate` runs its chains), was
    # said to be stopped by the SIGINT of the job before it
    path = eclreco.create_path()
    path.add_module(CountingSource(1000))
    path.add_module("RootOutput", filename=str(tmp_path / "after.root"))
    eclreco.process(path, batch_size=100, install_signal_handlers=False)
    with uproot.open(tmp_path / "after.root") as f:
        assert json.loads(str(f["metadata"]))["stopped_by"] is None


class FailsAtInitialize(eclreco.Module):
    def initialize(self):
        raise ValueError("misconfigured")


def test_a_module_failing_at_initialize_after_the_output_leaves_a_valid_file(tmp_path):
    """A module after RootOutput (RejectedOutput with a quarantine file it cannot open, a user's module)
    fails at initialize: RootOutput had recreated its file and never got terminate, which left a ROOT
    file without keys (no `events`, no `metadata`) over the earlier file of that name. The modules
    initialized before the failing one now get terminate: a valid file of 0 events that says so."""
    import json

    out = tmp_path / "out.root"
    path = eclreco.create_path()
    path.add_module(CountingSource(100))
    path.add_module("RootOutput", filename=str(out))
    path.add_module(FailsAtInitialize())
    with pytest.raises(RuntimeError, match="misconfigured"):
        eclreco.process(path, install_signal_handlers=False)
    with uproot.open(out) as f:
        assert f["events"].num_entries == 0
        meta = json.loads(str(f["metadata"]))
    assert meta["job"]["received"] == 0
    # the file says that its job failed, and why (it said 0 events, as a job of an empty input)
    assert "FailsAtInitialize.initialize failed" in meta["fatal_error"] and "misconfigured" in meta["fatal_error"]
    assert eclreco.statistics.summary()["fatal_error"] == meta["fatal_error"]


class FailsAtSecondRun(eclreco.Module):
    def begin_run(self, exp, run):
        if run == 1:
            raise OSError("conditions of run 1 unreadable")


def test_a_job_ended_by_an_error_says_so_in_its_metadata(tmp_path):
    """A job that an error ended in the middle of its input (here a module's begin_run of the second
    run) writes the events before it; its metadata had the same counts as a complete job of that many
    events. `fatal_error` now names the error (null for the complete job above)."""
    import json

    out = tmp_path / "out.root"
    path = eclreco.create_path()
    path.add_module(CountingSource(1000, run_length=500))
    path.add_module(FailsAtSecondRun())
    path.add_module("RootOutput", filename=str(out))
    with pytest.raises(RuntimeError, match="run 1 unreadable"):
        eclreco.process(path, batch_size=100, install_signal_handlers=False)
    with uproot.open(out) as f:
        meta = json.loads(str(f["metadata"]))
        assert f["events"].num_entries == meta["events_written"] == 500
    assert meta["stopped_by"] is None
    assert "FailsAtSecondRun.begin_run failed" in meta["fatal_error"] and "run 1 unreadable" in meta["fatal_error"]



class FailsOnEvent7(eclreco.Module):
    def event(self, batch):
        if 7 in batch.evt:
            raise ValueError("digit 3 unreadable")


@pytest.mark.parametrize("batch_size", [1, 100])
def test_the_metadata_names_the_first_module_error(tmp_path, batch_size):
    """A file with events whose error_flags were set said how many (job.errors) but not which module
    nor why: that was only in the job's log (and, for the farm, in hlt run's output line). job.first_error
    is the first message now: a module before the output (its event is written, flagged), the output
    itself (its events are not written), none (null)."""
    import json

    def first_error(*modules, cluster_columns=None):
        out = tmp_path / "out.root"
        path = eclreco.create_path()
        path.add_module(CountingSource(300))
        for m in modules:
            path.add_module(m)
        path.add_module("RootOutput", filename=str(out), **({"cluster_columns": cluster_columns}
                                                             if cluster_columns is not None else {}))
        eclreco.process(path, batch_size=batch_size, install_signal_handlers=False)
        with uproot.open(out) as f:
            meta = json.loads(str(f["metadata"]))
            flags = f["events"]["error_flags"].array(library="np")
        return meta, flags

    meta, flags = first_error(FailsOnEvent7())
    assert meta["job"]["errors"] == 1 and np.flatnonzero(flags).tolist() == [7]
    assert "FailsOnEvent7 raised on exp 1 run 0 evt 7" in meta["job"]["first_error"]
    assert "digit 3 unreadable" in meta["job"]["first_error"]
    meta, _ = first_error(ClusterSourceOf300(), cluster_columns=["energy", "latt"])
    assert meta["events_written"] == 0 and meta["job"]["errors"] == 300
    assert "RootOutput raised on exp 1 run 0 evt 0" in meta["job"]["first_error"]
    assert "cluster_columns latt not in ECLClusters" in meta["job"]["first_error"]
    meta, _ = first_error()
    assert meta["job"]["errors"] == 0 and meta["job"]["first_error"] is None


class ClusterSourceOf300(eclreco.Module):
    """Replaces CountingSource's events by ones with one cluster each (only `energy`)."""

    def event(self, batch):
        n = len(batch)
        batch.add_collection("ECLClusters", np.arange(n + 1), {"energy": np.ones(n, np.float32)})

class ClusterSource(eclreco.Module):
    """events with 0..3 clusters"""

    def is_source(self):
        return True

    def next_batch(self, batch, max_events):
        n = 50
        batch.resize(n)
        batch.evt[:] = np.arange(n)
        counts = np.arange(n) % 4
        off = np.concatenate([[0], np.cumsum(counts)])
        rows = off[-1]
        cols = {c: np.arange(rows, dtype=np.float32) for c in
                ("energy_raw", "energy", "theta", "phi", "x", "y", "z", "time", "e1e9", "e9e21")}
        cols["n_crystals"] = np.full(rows, 9, np.int32)
        cols["seed_cell"] = np.arange(rows, dtype=np.int32) + 1
        batch.add_collection("ECLClusters", off, cols)
        batch.reject(3, "test_reason", "rejected on purpose")
        return False


def test_cluster_branches(tmp_path):
    out = tmp_path / "c.root"
    path = eclreco.create_path()
    path.add_module(ClusterSource())
    path.add_module("RootOutput", filename=str(out))
    eclreco.process(path)
    with uproot.open(out) as f:
        t = f["events"]
        expected = {"cluster_energy_raw", "cluster_energy", "cluster_theta", "cluster_phi", "cluster_x",
                    "cluster_y", "cluster_z", "cluster_time", "cluster_n_crystals", "cluster_seed_cell",
                    "cluster_e1e9", "cluster_e9e21", "ncluster"}
        assert expected <= set(t.keys())
        assert t.num_entries == 49  # the rejected event is not written
        evt = t["evt"].array(library="np")
        assert 3 not in evt
        n = t["ncluster"].array(library="np")
        assert n.tolist() == [e % 4 for e in evt]
        seeds = t["cluster_seed_cell"].array()
        # event 5 has 1 cluster: rows 0+1+2+3(rejected event)+0 -> row index 6, seed 7
        assert seeds[list(evt).index(5)].tolist() == [7]


class _MarksHighEnergy(eclreco.Module):
    """adds a boolean cluster column, as an analysis module would"""

    def event(self, batch):
        c = batch["ECLClusters"]
        c["high"] = c["energy"] > 10


def test_a_boolean_cluster_column_is_a_bool_branch(tmp_path):
    """A boolean column a module adds was written as uint8_t[] (the batch stored it as uint8)."""
    out = tmp_path / "b.root"
    path = eclreco.create_path()
    path.add_module(ClusterSource())
    path.add_module(_MarksHighEnergy())
    path.add_module("RootOutput", filename=str(out), cluster_columns=["energy", "high"])
    eclreco.process(path)
    with uproot.open(out) as f:
        t = f["events"]
        assert t["cluster_high"].typename == "bool[]"
        a = t.arrays(["cluster_energy", "cluster_high"])
        assert (a.cluster_high == (a.cluster_energy > 10)).tolist() == [[True] * len(e) for e in a.cluster_energy]


def test_cluster_columns_choose_the_cluster_branches(tmp_path, capfd):
    """cluster_columns: the chosen columns only; one that ECLClusters lacks (a misspelt name) and a column
    of several values per cluster (image) are module errors naming them; duplicates are refused at
    initialize."""
    out = tmp_path / "c.root"
    path = eclreco.create_path()
    path.add_module(ClusterSource())
    path.add_module("RootOutput", filename=str(out), cluster_columns=["energy", "seed_cell"])
    eclreco.process(path)
    with uproot.open(out) as f:
        t = f["events"]
        assert {k for k in t.keys() if k.startswith("cluster_")} == {"cluster_energy", "cluster_seed_cell"}
        assert t["cluster_seed_cell"].array()[list(t["evt"].array(library="np")).index(5)].tolist() == [7]

    path = eclreco.create_path()
    path.add_module(ClusterSource())
    path.add_module("RootOutput", filename=str(tmp_path / "m.root"), cluster_columns=["energy", "enrgy", "lat"])
    eclreco.process(path)
    assert eclreco.statistics.summary()["errors"] == 49  # every event of the batch; the rejected one stays rejected
    err = capfd.readouterr().err
    assert "RootOutput: cluster_columns enrgy, lat not in ECLClusters, whose columns are e1e9, e9e21, energy," in err
    with uproot.open(tmp_path / "m.root") as f:
        assert f["events"].num_entries == 0  # no event is written without its requested branches

    class WithImages(ClusterSource):
        def next_batch(self, batch, max_events):
            super().next_batch(batch, max_events)
            cl = batch["ECLClusters"]
            cl["image"] = np.zeros((cl.n_rows, 7, 7), np.float32)
            return False

    path = eclreco.create_path()
    path.add_module(WithImages())
    path.add_module("RootOutput", filename=str(tmp_path / "i.root"), cluster_columns=["energy", "image"])
    eclreco.process(path)
    assert eclreco.statistics.summary()["errors"] == 49
    assert "cluster column 'image' holds (7, 7) values per cluster" in capfd.readouterr().err
    path = eclreco.create_path()
    path.add_module(ClusterSource())
    path.add_module("RootOutput", filename=str(tmp_path / "d.root"), cluster_columns=["energy", "energy"])
    with pytest.raises(Exception, match="cluster_columns must be distinct column names"):
        eclreco.process(path)


def test_no_output_file_in_a_directory_that_does_not_exist(tmp_path):
    """A misspelt directory is an error at initialize (the collector's --output too), not a new
    directory tree: RootOutput made every missing directory of its path."""
    path = eclreco.create_path()
    path.add_module(CountingSource(10))
    path.add_module("RootOutput", filename=str(tmp_path / "tpyo" / "out.root"))
    with pytest.raises(RuntimeError, match="cannot create output file .*: no directory .*tpyo"):
        eclreco.process(path, install_signal_handlers=False)
    assert not (tmp_path / "tpyo").exists()


def test_compression_is_a_parameter_and_a_bad_one_is_a_clear_error(tmp_path):
    """zstd:1 (default), zlib:1, none: the same events read back; the compressed files are smaller,
    and the file's compression setting (ROOT's fCompress) is the one asked for."""
    import pytest

    sizes = {}
    for spec in ("zstd:1", "zlib:1", "lzma:1", "lz4:1", "none"):
        out = tmp_path / f"{spec.replace(':', '')}.root"
        path = eclreco.create_path()
        path.add_module(CountingSource(3000))
        path.add_module("RootOutput", filename=str(out), compression=spec)
        eclreco.process(path, batch_size=256)
        with uproot.open(out) as f:
            t = f["events"]
            assert t["evt"].array(library="np").tolist() == list(range(3000))
            assert t["n_digits"].array(library="np").tolist() == [e % 5 for e in range(3000)]
            if spec == "none":  # level 0: stored uncompressed
                assert f.file.fCompress % 100 == 0, f.file.fCompress
            else:  # ROOT's algorithm * 100 + level
                assert f.file.fCompress == {"zstd:1": 501, "zlib:1": 101, "lzma:1": 201, "lz4:1": 401}[spec], \
                    f.file.fCompress
        sizes[spec] = os.path.getsize(out)
    assert all(sizes[spec] < sizes["none"] for spec in ("zstd:1", "zlib:1", "lzma:1", "lz4:1")), sizes
    path = eclreco.create_path()
    path.add_module(CountingSource(10))
    path.add_module("RootOutput", filename=str(tmp_path / "x.root"), compression="gzip:9")
    with pytest.raises(Exception, match="compression 'gzip:9'"):
        eclreco.process(path)


def test_background_measure_written_and_histogrammed(tmp_path):
    """ECLUnpacker's ECLEventInformation.n_out_of_time_digits reaches the ROOT file as the event
    branch n_out_of_time_digits and ECLDQM's out_of_time_digits histogram."""
    from _raw_helpers import MessageSource, n_out_of_time, random_digits
    from eclreco import rawdata

    rng = np.random.default_rng(11)
    d = random_digits(rng, "belle2-ecl", 300)
    msgs = rawdata.encode_events("belle2-ecl", 0, 1, np.arange(300), **d)
    want = []
    for i in range(300):
        s = slice(d["offsets"][i], d["offsets"][i + 1])
        _, t = rawdata.calibrate(d["cell"][s], d["amplitude"][s], d["time_ticks"][s])
        want.append(n_out_of_time(t, d["quality"][s]))
    out = tmp_path / "bkg.root"
    path = eclreco.create_path()
    path.add_module(MessageSource(msgs))
    path.add_module("ECLUnpacker")
    path.add_module("ECLDQM")
    path.add_module("RootOutput", filename=str(out))
    eclreco.process(path, batch_size=64, threads=2)
    with uproot.open(out) as f:
        assert f["events"]["n_out_of_time_digits"].array(library="np").tolist() == want
        counts, edges = f["dqm/out_of_time_digits"].to_numpy()
    assert sum(want) > 300 and counts.sum() == 300
    np.testing.assert_array_equal(counts, np.histogram(want, bins=edges)[0])


def test_the_trigger_time_is_written_and_0_where_the_envelope_had_none(tmp_path):
    """The wire format's optional time_ns reaches the file as the event branch time_ns (it was read
    and carried to the collector, but written nowhere)."""
    from _raw_helpers import MessageSource, random_digits
    from eclreco import rawdata

    rng = np.random.default_rng(5)
    d = random_digits(rng, "belle2-ecl", 40)
    times = 1_764_000_000_000_000_000 + rng.integers(0, 10**9, 40)
    msgs = rawdata.encode_events("belle2-ecl", 0, 1, np.arange(40), **d, time_ns=times)
    msgs[10:20] = rawdata.encode_events("belle2-ecl", 0, 1, np.arange(10, 20),
                                        **{k: v for k, v in random_digits(rng, "belle2-ecl", 10).items()})
    out = tmp_path / "t.root"
    path = eclreco.create_path()
    path.add_module(MessageSource(msgs))
    path.add_module("ECLUnpacker")
    path.add_module("RootOutput", filename=str(out))
    eclreco.process(path, batch_size=16, threads=2)
    want = times.copy()
    want[10:20] = 0
    with uproot.open(out) as f:
        got = f["events"].arrays(["evt", "time_ns"], library="np")
    assert got["time_ns"].dtype == np.int64 and got["evt"].tolist() == list(range(40))
    np.testing.assert_array_equal(got["time_ns"], want)


def test_a_batch_without_clusters_keeps_the_basket_consistent(tmp_path):
    """A batch whose events all failed before clustering has no ECLClusters: its events get empty
    cluster lists (the whole basket lost its cluster branches, or the tree became unwritable)."""
    import uproot

    import eclreco
    from eclreco.sources import ArraySource

    class DropClusters(eclreco.Module):  # as a batch looks where the clusterizer failed on every event
        def event(self, batch):
            if batch.evt[0] == 8:  # the batch of events 8..11
                batch.remove("ECLClusters")

    rng = np.random.default_rng(2)
    n = 16
    cols = {"cell": rng.integers(1, 8737, n * 20).astype(np.int32),
            "energy": rng.exponential(0.05, n * 20).astype(np.float32),
            "time": np.zeros(n * 20, np.float32), "quality": np.zeros(n * 20, np.uint8)}
    out = tmp_path / "o.root"
    path = eclreco.create_path()
    path.add_module(ArraySource("ECLDigits", np.arange(0, n * 20 + 1, 20), cols))
    path.add_module("ECLClusterizer")
    path.add_module(DropClusters())
    path.add_module("RootOutput", filename=str(out), basket_events=100)
    eclreco.process(path, batch_size=4, install_signal_handlers=False)
    with uproot.open(out) as f:
        t = f["events"]
        assert t.num_entries == n and "cluster_energy" in t.keys()
        ncl = t["ncluster"].array(library="np")
    assert (ncl[8:12] == 0).all() and (ncl[[0, 1, 2, 3, 12, 13]] > 0).all()


def test_a_first_basket_whose_events_failed_before_clustering_keeps_the_cluster_branches(tmp_path):
    """The tree's branches are fixed by its first basket. When every event of it failed in the
    clusterizer (one event in a batch of its own: more digits than the clusterizer takes; in the farm's
    collector, which writes every 0.25 s, the first results of a run), the tree was made without
    cluster branches, the next basket with clusters raised 'a TTree gets no new branches', and the
    job stopped with its file removed: one bad event cost the whole output. The failed events now
    get empty cluster lists there too, and the clusters of the others are written."""

    class Src(eclreco.Module):
        """event 0: 40000 digits (the clusterizer fails on it); events 1..5: 20 digits"""

        def __init__(self):
            super().__init__()
            self.i = 0

        def is_source(self):
            return True

        def next_batch(self, batch, max_events):
            k = 40000 if self.i == 0 else 20
            batch.resize(1)
            batch.evt[:] = self.i
            batch.add_collection("ECLDigits", np.array([0, k]), {
                "cell": (np.arange(k) % 8736 + 1).astype(np.int32), "energy": np.full(k, 0.05, np.float32),
                "time": np.zeros(k, np.float32), "quality": np.zeros(k, np.uint8)})
            self.i += 1
            return self.i < 6

    out = tmp_path / "o.root"
    path = eclreco.create_path()
    path.add_module(Src())
    path.add_module("ECLClusterizer")
    path.add_module("RootOutput", filename=str(out), basket_events=1,
                    cluster_columns=["energy", "seed_cell", "n_crystals"])
    eclreco.process(path, batch_size=1, install_signal_handlers=False)
    assert eclreco.statistics.summary()["fatal_error"] is None
    with uproot.open(out) as f:
        t = f["events"]
        a = t.arrays(["evt", "error_flags", "ncluster", "cluster_energy", "cluster_seed_cell"], library="np")
        assert t["cluster_seed_cell"].interpretation.content.from_dtype == np.dtype(">i4")
    assert a["evt"].tolist() == list(range(6))
    assert a["error_flags"].tolist() == [eclreco.ERROR_MODULE] + [0] * 5
    assert a["ncluster"][0] == 0 and (a["ncluster"][1:] > 0).all()
    assert all(e.sum() > 0 for e in a["cluster_energy"][1:])


def move_payload_outside(batch):
    """Points the batch's first event's RawPayloadRef outside its message: ECLUnpacker fails on it."""
    ref = batch["RawPayloadRef"]
    cols = {k: np.array(ref[k]) for k in ref.columns()}
    cols["offset"][0] = 10**6
    batch.add_collection("RawPayloadRef", ref.offsets, cols)


def test_an_event_on_which_the_unpacker_failed_is_written_with_its_flags(tmp_path):
    """An event on which ECLUnpacker failed (a module error: here a source's RawPayloadRef that puts
    its payload outside the message) has no row in ECLEventInformation, a collection of one row per
    event. RootOutput indexed that column with the batch's mask: IndexError, and the event was not
    written, though an event on which an earlier module failed is written with its error_flags. It is
    now written, n_out_of_time_digits 0, beside the events of its batch."""
    from eclreco import _core, rawdata

    msgs = rawdata.encode_events("belle2-ecl", 0, 1, [0, 1, 2], [0, 2, 4, 6],
                                 np.array([10, 11, 20, 21, 30, 31], np.int32), np.full(6, 1000, np.int32),
                                 np.array([0, 0, 0, 900, 0, 0], np.int32), np.zeros(6, np.uint8))

    class Src(eclreco.Module):
        def is_source(self):
            return True

        def next_batch(self, batch, max_events):
            _core.append_envelopes(batch, msgs)
            move_payload_outside(batch)
            return False

    out = tmp_path / "u.root"
    path = eclreco.create_path()
    path.add_module(Src())
    path.add_module("ECLUnpacker")
    path.add_module("ECLClusterizer")
    path.add_module("RootOutput", filename=str(out))
    eclreco.process(path, install_signal_handlers=False)
    s = eclreco.statistics.summary()
    assert s["errors"] == 1, s["errors"]
    with uproot.open(out) as f:
        a = f["events"].arrays(["evt", "error_flags", "n_digits", "n_out_of_time_digits"], library="np")
    assert a["evt"].tolist() == [0, 1, 2]
    assert a["error_flags"].tolist() == [eclreco.ERROR_MODULE, 0, 0]
    assert a["n_digits"].tolist() == [0, 2, 2] and a["n_out_of_time_digits"][0] == 0


def test_a_first_basket_whose_events_failed_in_the_unpacker_keeps_the_digit_branches(tmp_path):
    """The tree's event branches were those of its first basket: when every event of it failed in the
    unpacker (no ECLDigits, no ECLEventInformation), n_digits and n_out_of_time_digits were missing from
    the file and the digit counts of every later basket were dropped without a word. Such a basket now
    gets them (0 for its events), as it gets empty cluster lists."""
    from eclreco import _core, rawdata

    msgs = rawdata.encode_events("belle2-ecl", 0, 1, [0, 1, 2], [0, 2, 4, 6],
                                 np.array([10, 11, 20, 21, 30, 31], np.int32), np.full(6, 1000, np.int32),
                                 np.zeros(6, np.int32), np.zeros(6, np.uint8))

    class Src(eclreco.Module):
        """one event per batch; event 0's payload outside its message (ECLUnpacker fails on it)"""

        def __init__(self):
            super().__init__()
            self.i = 0

        def is_source(self):
            return True

        def next_batch(self, batch, max_events):
            _core.append_envelopes(batch, [msgs[self.i]])
            if self.i == 0:
                move_payload_outside(batch)
            self.i += 1
            return self.i < 3

    out = tmp_path / "d.root"
    path = eclreco.create_path()
    path.add_module(Src())
    path.add_module("ECLUnpacker")
    path.add_module("ECLClusterizer")
    path.add_module("RootOutput", filename=str(out), basket_events=1)
    eclreco.process(path, batch_size=1, install_signal_handlers=False)
    assert eclreco.statistics.summary()["errors"] == 1
    with uproot.open(out) as f:
        t = f["events"]
        assert {"n_digits", "n_out_of_time_digits"} <= set(t.keys()), t.keys()
        a = t.arrays(["evt", "error_flags", "n_digits"], library="np")
    assert a["evt"].tolist() == [0, 1, 2] and a["error_flags"].tolist() == [eclreco.ERROR_MODULE, 0, 0]
    assert a["n_digits"].tolist() == [0, 2, 2]


def test_tree_name_and_flush_interval(tmp_path):
    """`tree` names the TTree; `flush_interval_s` writes what is buffered when it is that old,
    even far below `basket_events` (a run of ~1 s at 0.1 s per batch: several baskets, not one)."""
    import time

    class Slow(eclreco.Module):
        def event(self, batch):
            time.sleep(0.1)

    out = tmp_path / "f.root"
    path = eclreco.create_path()
    path.add_module(CountingSource(1000))
    path.add_module(Slow())
    path.add_module("RootOutput", filename=str(out), tree="reco", basket_events=100000, flush_interval_s=0.2)
    eclreco.process(path, batch_size=100)
    with uproot.open(out) as f:
        assert "events" not in f and f["reco"].num_entries == 1000
        assert f["reco"]["evt"].num_baskets >= 3, f["reco"]["evt"].num_baskets
    path = eclreco.create_path()
    path.add_module(CountingSource(1000))
    path.add_module(Slow())
    path.add_module("RootOutput", filename=str(out), basket_events=100000)  # no flush interval: one basket
    eclreco.process(path, batch_size=100)
    with uproot.open(out) as f:
        assert f["events"]["evt"].num_baskets == 1


def test_the_file_records_what_made_it_and_the_jobs_counts(tmp_path):
    """An analyst's file said nothing of how it was made: with or without the CNN (which network),
    which detector, how many input events are not in it. The `metadata` TObjString (JSON) says."""
    import hashlib
    import json

    import msgpack

    from _raw_helpers import two_digit_events
    from eclreco.rawdata import write_raw_file

    n = 30
    write_raw_file(tmp_path / "in.msgpack", [msgpack.packb(1)] + two_digit_events(n, amplitude=50000))
    model = os.path.join(os.path.dirname(eclreco.__file__), "models", "array30.onnx")
    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=str(tmp_path / "in.msgpack"))
    path.add_module("ECLUnpacker")
    path.add_module("ECLClusterizer")
    path.add_module("ECLLeakageCorrection")
    path.add_module("ECLEnergyCorrection", model=model)
    path.add_module("ECLEventFilter", min_clusters=1, cluster_energy_gev=0.0)
    path.add_module("RootOutput", filename=str(tmp_path / "out.root"))
    eclreco.process(path, install_signal_handlers=False)
    with uproot.open(tmp_path / "out.root") as f:
        meta = json.loads(str(f["metadata"]))
        assert meta["events_written"] == f["events"].num_entries == n
    assert meta["detectors"] == ["array30"] and meta["eclreco_version"] == eclreco.__version__
    assert meta["job"]["received"] == n + 1 and meta["job"]["rejected_by_reason"] == {"not_a_map": 1}
    assert [m["module"] for m in meta["path"]] == ["RawFileInput", "ECLUnpacker", "ECLClusterizer",
                                                   "ECLLeakageCorrection", "ECLEnergyCorrection", "ECLEventFilter",
                                                   "RootOutput"]
    cnn = meta["path"][4]
    assert cnn["params"]["model"] == model and cnn["params"]["min_energy_gev"] == 0.05
    with open(model, "rb") as f:
        assert cnn["models"] == {"*": {"path": model, "sha256": hashlib.sha256(f.read()).hexdigest()}}
    assert meta["path"][5]["params"]["cluster_energy_gev"] == 0.0
    # the classical leakage tables ECLLeakageCorrection loads by default: which ones (a physicist could
    # not tell, from the version, tables rebuilt within it)
    data = os.path.join(os.path.dirname(eclreco.__file__), "data", "leakage_array30.npz")
    with open(data, "rb") as f:
        assert meta["package_data"]["data/leakage_array30.npz"] == hashlib.sha256(f.read()).hexdigest()
    assert meta["build"] == eclreco.framework.build_info()


def test_the_build_records_its_git_commit():
    """CMakeLists.txt writes the commit the package was built from; in a git checkout that is a commit
    of this repository (not necessarily HEAD: one may commit after installing), and --version shows it."""
    import re
    import shutil

    info = eclreco.framework.build_info()
    out = subprocess.run([sys.executable, "-m", "eclreco.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.strip() == f"eclreco {eclreco.__version__} (commit {info['git_commit']}" + \
        ("-dirty)" if info["git_dirty"] else ")")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True) \
        if shutil.which("git") else None
    if head is None or head.returncode != 0:
        pytest.skip("the tests are not in a git checkout: the build cannot have recorded a commit")
    assert re.fullmatch("[0-9a-f]{40}", info["git_commit"]) and isinstance(info["git_dirty"], bool)
    assert subprocess.run(["git", "-C", repo, "cat-file", "-e", info["git_commit"] + "^{commit}"]).returncode == 0


def test_the_recorded_model_digest_is_that_of_the_bytes_loaded(tmp_path, monkeypatch):
    """The model file is read once: its SHA-256 in the metadata is that of what onnxruntime loaded,
    even when the file is replaced right after (it was read a second time for the digest)."""
    import hashlib
    import json
    import shutil

    from _raw_helpers import two_digit_events
    from eclreco.modules import ecl_energy_correction as ec

    loaded = tmp_path / "model.onnx"
    shutil.copy(ec.shipped_model("array30"), loaded)
    with open(loaded, "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    real = ec.load_session

    def load_then_replace(path, *a, **kw):
        out = real(path, *a, **kw)
        with open(path, "ab") as f:  # another file now (a redeployment between load and digest)
            f.write(b"\0")
        return out

    monkeypatch.setattr(ec, "load_session", load_then_replace)
    from eclreco.rawdata import write_raw_file

    write_raw_file(tmp_path / "in.msgpack", two_digit_events(5, amplitude=50000))
    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=str(tmp_path / "in.msgpack"))
    path.add_module("ECLUnpacker")
    path.add_module("ECLClusterizer")
    path.add_module("ECLLeakageCorrection")
    path.add_module("ECLEnergyCorrection", model=str(loaded))
    path.add_module("RootOutput", filename=str(tmp_path / "out.root"))
    eclreco.process(path, install_signal_handlers=False)
    with uproot.open(tmp_path / "out.root") as f:
        meta = json.loads(str(f["metadata"]))
    assert meta["path"][4]["models"] == {"*": {"path": str(loaded), "sha256": want}}


@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_events_a_module_failed_on_are_written_whatever_the_batch_size(tmp_path, batch_size):
    """A module that adds a cluster column raises on some events: those events were written (flagged,
    the column 0) when their batch also held events it succeeded on, and dropped when every event of
    the batch failed (batches of 1: 1960 of 2000 written, 'processed 2000'). Now always written."""
    from eclreco.sources import ArraySource

    class Tagger(eclreco.Module):
        def event(self, batch):
            if (batch.evt % 10 == 3).any():
                raise RuntimeError("no tag for evt % 10 == 3")
            clusters = batch["ECLClusters"]
            clusters["tag"] = np.ones(clusters["energy"].size, np.int32)

    n = 100
    offsets = np.arange(n + 1) * 2
    path = eclreco.create_path()
    path.add_module(ArraySource("ECLClusters", offsets, {"energy": np.full(2 * n, 0.5, np.float32)}))
    path.add_module(Tagger())
    path.add_module("RootOutput", filename=str(tmp_path / "out.root"), cluster_columns=["energy", "tag"])
    eclreco.process(path, batch_size=batch_size, install_signal_handlers=False)
    assert eclreco.statistics.summary()["errors"] == n // 10
    with uproot.open(tmp_path / "out.root") as f:
        t = f["events"].arrays(["evt", "error_flags", "ncluster"], library="np")
    assert np.array_equal(np.sort(t["evt"]), np.arange(n))
    failed = t["evt"] % 10 == 3
    assert (t["error_flags"][failed] & eclreco.ERROR_MODULE).all() and not t["error_flags"][~failed].any()
    assert (t["ncluster"][~failed] == 2).all()


@pytest.mark.parametrize("chain,columns", [("standard", None), ("standard", ["energy", "n_maxima", "region_index", "lat"]),
                                           ("unpacker", None), ("raw", None), ("array digits", None)])
def test_a_file_without_events_has_the_branches_of_one_with_events(tmp_path, chain, columns):
    """A job that wrote no event (an empty input, every event rejected) left a tree of exp, run, evt and
    error_flags only: an analysis reading cluster_energy from each of its files got a KeyError on that
    one. Then it got every branch, also where its chain makes no clusters (an unpacker and RootOutput):
    branches that the files with events of the same chain lack. Its tree now has the branches and types of
    a file of the same chain with events (the collections that the modules before it make)."""
    from eclreco.bench import make_raw_file
    from eclreco.rawdata import write_raw_file
    from eclreco.reconstruction import add_reconstruction
    from eclreco.sources import ArraySource

    make_raw_file(str(tmp_path / "some.msgpack"), 20, 1.0)
    write_raw_file(tmp_path / "none.msgpack", [])
    extra = {} if columns is None else {"cluster_columns": columns}
    for name, n in (("some", 20), ("none", 0)):
        path = eclreco.create_path()
        if chain == "array digits":  # digits without times: no ECLEventInformation (nor clusters: the
            cells = np.tile(np.arange(1, 6, dtype=np.int32), n)  # clusterizer ends the job without times)
            path.add_module(ArraySource("ECLDigits", np.arange(n + 1) * 5, {
                "cell": cells, "energy": np.full(cells.size, 0.1), "quality": np.zeros(cells.size, np.uint8)}))
        else:
            path.add_module("RawFileInput", filename=str(tmp_path / f"{name}.msgpack"))
        if chain == "standard":
            add_reconstruction(path, cnn=False)
        elif chain == "unpacker":
            path.add_module("ECLUnpacker")
        path.add_module("RootOutput", filename=str(tmp_path / f"{name}.root"), **extra)
        eclreco.process(path, install_signal_handlers=False)
    with uproot.open(tmp_path / "some.root") as some, uproot.open(tmp_path / "none.root") as none:
        assert some["events"].num_entries == 20 and none["events"].num_entries == 0
        assert none["events"].typenames() == some["events"].typenames()
        assert len(none["events"].arrays(list(some["events"].keys()))) == 0
        made = set(none["events"].keys()) & {"n_digits", "n_out_of_time_digits", "cluster_energy"}
    assert made == {"standard": {"n_digits", "n_out_of_time_digits", "cluster_energy"},
                    "unpacker": {"n_digits", "n_out_of_time_digits"}, "raw": set(),
                    "array digits": {"n_digits"}}[chain]


def test_a_file_without_events_of_a_module_that_does_not_say_what_it_makes_has_every_branch(tmp_path):
    """A Python module whose makes() is not defined may add any collection (a source of clusters of
    its own): the tree of a job without events then has every branch, as before makes() existed."""

    class Nothing(eclreco.Module):
        def is_source(self):
            return True

        def next_batch(self, batch, max_events):
            return False

    path = eclreco.create_path()
    path.add_module(Nothing())
    path.add_module("RootOutput", filename=str(tmp_path / "none.root"))
    eclreco.process(path, install_signal_handlers=False)
    with uproot.open(tmp_path / "none.root") as f:
        assert {"n_digits", "n_out_of_time_digits", "cluster_energy", "ncluster"} <= set(f["events"].keys())


def test_the_summary_counts_the_events_lost_with_a_failed_output(tmp_path):
    """A write that fails (here a 300 kB file size limit) leaves the events RootOutput had taken into its buffer in no
    file: summary() says how many are in its file and how many were lost with it; they were counted as processed
    only (the error line alone said how many the file kept)."""
    import resource

    from hlt_helpers import envelope
    from eclreco.sources import MessageSource

    out = tmp_path / "out.root"
    path = eclreco.create_path()
    path.add_module(MessageSource([envelope(e) for e in range(12_000)]))
    path.add_module("ECLUnpacker")
    path.add_module("ECLClusterizer")
    path.add_module("RootOutput", filename=str(out), basket_events=2000)
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, old_limit[1]))  # a write beyond it fails with EFBIG
    try:
        with pytest.raises(RuntimeError, match="cannot write output file"):
            eclreco.process(path, batch_size=500, install_signal_handlers=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    s = eclreco.statistics.summary()
    with uproot.open(f"{out}.incomplete") as f:
        written = f["events"].num_entries
    o = s["outputs"]["RootOutput"]
    assert o["written"] == written > 0 and o["lost"] > 0 and s["lost_with_output"] == o["lost"], s["outputs"]
    assert s["processed"] == written + o["lost"] + s["errors"], s  # the errors: the batch on which it raised
    assert f"lost with the failed output RootOutput: {o['lost']} processed events" in str(eclreco.statistics)
    assert path.modules[-1].counters()["events_lost"] == o["lost"]
    # the events RootOutput raised on after its write failed are told apart from the errors of the modules
    # before it (nothing in the summary separated them: the output's message repeated on each)
    assert s["errors"] > 0 and s["errors_in_outputs"] == o["errors"] == s["errors"], s
    assert [m["errors"] for m in s["modules"]] == [0, 0, 0, s["errors"]], s["modules"]
    assert f"module errors in the outputs: {s['errors']} (events an output raised on" in str(eclreco.statistics)


class TwoDetectorClusters(eclreco.Module):
    """Two batches of 10 events with a cluster each: array30's with the column `tag`, then belle2-ecl's without it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def is_source(self):
        return True

    def next_batch(self, batch, max_events):
        n, self.calls = 10, self.calls + 1
        batch.resize(n)
        batch.evt[:] = np.arange(n) + 10 * (self.calls - 1)
        batch.detector[:] = 1 if self.calls == 1 else 0
        cols = {"energy": np.ones(n, np.float32)}
        if self.calls == 1:
            cols["tag"] = np.ones(n, np.float32)
        batch.add_collection("ECLClusters", np.arange(n + 1), cols)
        return self.calls < 2


def test_a_batch_the_output_raises_on_is_not_counted_in_the_file(tmp_path):
    """RootOutput counted a batch (batches_taken, the metadata's detectors) before the check of cluster_columns
    that raises: a file of array30 events only said detectors ["array30", "belle2-ecl"], and batches_taken rose
    once for the call and again for each event of its re-run."""
    import json

    path = eclreco.create_path()
    path.add_module(TwoDetectorClusters())
    out = path.add_module("RootOutput", filename=str(tmp_path / "out.root"), cluster_columns=["energy", "tag"])
    eclreco.process(path, batch_size=10, install_signal_handlers=False)
    assert eclreco.statistics.summary()["errors"] == 10  # the belle2-ecl events, without `tag`
    with uproot.open(tmp_path / "out.root") as f:
        meta = json.loads(str(f["metadata"]))
        assert f["events"]["evt"].array(library="np").tolist() == list(range(10))
    assert meta["detectors"] == ["array30"] and meta["events_written"] == 10
    assert out.batches_taken == out.batches_written == 1


class EventInformationRows(eclreco.Module):
    """ECLEventInformation as a custom module could make it: event 0 of the batch with two rows, event 1 with none."""

    def event(self, batch):
        rows = np.ones(len(batch), np.int64)
        rows[:2] = 2, 0
        off = np.concatenate([[0], np.cumsum(rows)])
        batch.add_collection("ECLEventInformation", off, {"n_out_of_time_digits": np.arange(off[-1], dtype=np.int32) + 100})


def test_an_event_with_several_event_information_rows_is_an_error_not_another_events_value(tmp_path):
    """RootOutput and ECLDQM took ECLEventInformation as one value per event whenever it had as many rows as the
    batch has events: event 0 with two rows and event 1 with none gave event 1 event 0's second row (101) and
    event 2 its own. They read it as the CNN's event features do now (framework.per_event_value): an event
    without a row counts 0, one with several is an error of that event."""
    from eclreco.dqm import registry

    path = eclreco.create_path()
    path.add_module(CountingSource(3))
    path.add_module(EventInformationRows())
    path.add_module("ECLDQM")
    path.add_module("RootOutput", filename=str(tmp_path / "out.root"))
    eclreco.process(path, batch_size=3, install_signal_handlers=False)
    errors = eclreco.statistics.state.error_messages()
    assert len(errors) == 2 and all("evt 0" in e and "event 0 of the batch has 2" in e for e in errors), errors
    with uproot.open(tmp_path / "out.root") as f:
        a = f["events"].arrays(["evt", "n_out_of_time_digits"], library="np")
    assert a["evt"].tolist() == [1, 2] and a["n_out_of_time_digits"].tolist() == [0, 102]
    assert registry.histograms["out_of_time_digits"].entries == 2  # events 1 and 2


def test_each_event_says_its_detector_and_a_file_of_both_splits_with_uproot(tmp_path):
    """The metadata listed the detectors of a file, but no event said its own: a file with events of both
    (one input of belle2-ecl and array30 envelopes) could not be split. The branch `detector` (uint8, the
    codes of rawdata.DETECTORS, as in the batch) holds each event's, a file without events has it too."""
    import json

    from eclreco.rawdata import DETECTORS, encode_events, write_raw_file
    from eclreco.reconstruction import add_reconstruction
    from eclreco.sim import simulate

    messages = {}
    for det in DETECTORS:
        ev = simulate(detector=det, n_events=12, seed=5)
        messages[det] = encode_events(det, 0, 1, np.arange(12) + 100 * DETECTORS[det], ev.offsets, ev.cell,
                                      ev.amplitude, ev.time_ticks, ev.quality)
    write_raw_file(tmp_path / "both.msgpack", [m for pair in zip(*messages.values()) for m in pair])  # interleaved
    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=str(tmp_path / "both.msgpack"))
    add_reconstruction(path, cnn=False)
    path.add_module("RootOutput", filename=str(tmp_path / "both.root"))
    eclreco.process(path, batch_size=8, install_signal_handlers=False)
    with uproot.open(tmp_path / "both.root") as f:
        t = f["events"]
        assert t["detector"].typename == "uint8_t" and json.loads(str(f["metadata"]))["detectors"] == sorted(DETECTORS)
        for det, code in DETECTORS.items():
            part = t.arrays(["evt", "ncluster"], cut=f"detector == {code}", library="np")
            assert part["evt"].tolist() == [e + 100 * code for e in range(12)], det
            assert part["ncluster"].sum() > 0
    path = eclreco.create_path()
    path.add_module(CountingSource(0))
    path.add_module("RootOutput", filename=str(tmp_path / "none.root"))
    eclreco.process(path, install_signal_handlers=False)
    with uproot.open(tmp_path / "none.root") as f:
        assert f["events"]["detector"].typename == "uint8_t" and f["events"].num_entries == 0


def _clusterizer_chain(*after):
    """Simulated belle2-ecl events -> ECLUnpacker -> ECLClusterizer -> `after`: ECLClusters of the clusterizer."""
    path = eclreco.create_path()
    path.add_module("SimulationInput", events=20, detector="belle2-ecl", particle="gamma", background=0.0)
    path.add_module("ECLUnpacker")
    path.add_module("ECLClusterizer")
    for m in after:
        path.add_module(m)
    return path


def test_a_misspelt_cluster_column_is_refused_at_initialize(tmp_path):
    """cluster_columns=['energy', 'latt'] after the clusterizer failed on every batch (each event re-run on its
    own, exit 1 at the end with an empty file). The clusterizer's columns are known before the first batch
    (_core.cluster_columns(), the list its event() writes): initialize refuses the name, lists the valid ones,
    and makes no file."""
    out = tmp_path / "x.root"
    path = _clusterizer_chain("ECLLeakageCorrection", "ECLEnergyCorrection")
    path.add_module("RootOutput", filename=str(out), cluster_columns=["energy", "latt"])
    with pytest.raises(RuntimeError) as err:
        eclreco.process(path, install_signal_handlers=False)
    message = str(err.value)
    assert "'latt' is not a column of ECLClusters" in message and "e1e9, e9e21, second_moment, lat" in message
    assert eclreco.statistics.summary()["received"] == 0 and not out.exists()


def test_the_cluster_column_list_is_what_the_clusterizer_writes(tmp_path):
    """_core.cluster_columns() (the check's list, and the branch types of a file without clusters) is the
    clusterizer's: every column of one value per cluster it writes, with its type; the corrections after it
    (leakage, CNN) overwrite energy and are accepted with any of them."""
    seen = {}

    class Columns(eclreco.Module):
        def event(self, batch):
            c = batch["ECLClusters"]
            seen.update({k: str(c[k].dtype) for k in c.columns() if c[k].ndim == 1})

    columns = list(eclreco._core.cluster_columns())
    path = _clusterizer_chain(Columns(), "ECLLeakageCorrection", "ECLEnergyCorrection")
    path.add_module("RootOutput", filename=str(tmp_path / "all.root"), cluster_columns=columns)
    eclreco.process(path, install_signal_handlers=False)
    assert seen == eclreco._core.cluster_columns()
    with uproot.open(tmp_path / "all.root") as f:
        assert {f"cluster_{c}" for c in columns} <= set(f["events"].keys())


def test_a_column_a_users_module_adds_is_accepted_after_the_clusterizer(tmp_path):
    """A module of a steering file may add a column to ECLClusters (Module.makes names collections, not
    columns): with one after the clusterizer, its name is not refused at initialize, and is written."""
    path = _clusterizer_chain(_MarksHighEnergy(), "ECLLeakageCorrection")
    path.add_module("RootOutput", filename=str(tmp_path / "h.root"), cluster_columns=["energy", "high"])
    eclreco.process(path, install_signal_handlers=False)
    with uproot.open(tmp_path / "h.root") as f:
        assert f["events"]["cluster_high"].typename == "bool[]"


def test_a_write_that_fails_with_any_exception_fails_the_run_and_leaves_no_gap(tmp_path):
    """The writer thread caught OSError and ValueError only: any other exception of a write (a MemoryError
    concatenating a large basket) ended the thread unseen (a traceback on stderr), its basket was in no file, the
    next write's batches_written covered its batches (the HLT collector said SAVED for them) and the job ended
    with exit 0 and a file with a hole. It is a failed write now: the run fails, the events before it are kept."""
    out_file = tmp_path / "out.root"
    path = eclreco.create_path()
    path.add_module(CountingSource(3000))
    out = path.add_module("RootOutput", filename=str(out_file), basket_events=1000)
    real, calls = out._write, []

    def write(parts):  # the second basket fails as numpy does when memory runs out; the others are written
        calls.append(len(parts))
        if len(calls) == 2:
            raise MemoryError
        real(parts)

    out._write = write
    with pytest.raises(RuntimeError, match=r"cannot write output file '.*out\.root': MemoryError; the 1000 events"):
        eclreco.process(path, batch_size=500, install_signal_handlers=False)
    with uproot.open(f"{out_file}.incomplete") as f:
        assert f["events"]["evt"].array(library="np").tolist() == list(range(1000))
    assert not out_file.exists()
    assert out.events_written_run == 1000 and out.batches_written == 2  # the batches of the first basket only
    out.flush_if_due()  # as the HLT collector's last release_saved after the failure: nothing more is in the file
    assert out.batches_written == 2


class KeptThenRejected(eclreco.Module):
    """A batch of 10 kept events, then one of 10 rejected events; the third call runs `between` and ends the input."""

    def __init__(self, between):
        super().__init__()
        self.calls, self.between = 0, between

    def is_source(self):
        return True

    def next_batch(self, batch, max_events):
        self.calls += 1
        if self.calls == 3:
            self.between()
            return False
        batch.resize(10)
        batch.evt[:] = np.arange(10) + 10 * (self.calls - 1)
        if self.calls == 2:
            for i in range(10):
                batch.reject(i, "test", "")
        return True


def test_a_batch_without_events_to_write_taken_during_a_write_is_written_once_that_write_is(tmp_path):
    """batches_written (the HLT collector's SAVED) moved for a batch with nothing to write (every event rejected or
    discarded) only when no write was in flight as it came: taken during one, it waited for the next write, which
    only a later batch with events starts, not flush_interval_s later as documented (a quiet stream held its
    events at the distributor). flush_if_due (the collector's call between batches) now moves it once the write
    in flight is done. The writer is held at a chosen point (threading.Event), the file written by uproot."""
    import threading

    go, seen = threading.Event(), []

    def between():  # the collector's step between batches: the write in flight has ended
        go.set()
        out._writer.join()
        out.flush_if_due()
        seen.append((out.batches_taken, out.batches_written))

    path = eclreco.create_path()
    path.add_module(KeptThenRejected(between))
    out = path.add_module("RootOutput", filename=str(tmp_path / "out.root"), basket_events=1, flush_interval_s=0.05)
    real = out._write

    def write(parts):  # the first basket's write is in flight while the rejected batch comes
        assert go.wait(30)
        real(parts)

    out._write = write
    eclreco.process(path, batch_size=10, install_signal_handlers=False)
    assert seen == [(2, 2)]
    with uproot.open(tmp_path / "out.root") as f:
        assert f["events"]["evt"].array(library="np").tolist() == list(range(10))


def test_a_zstd_basket_with_one_bit_flipped_is_refused_not_read_as_other_values(tmp_path, capsys):
    """RootOutput's default zstd:1 wrote frames without zstd's content checksum, and ROOT's block header holds only
    sizes: a basket with one bit flipped (a disk's or a copy's damage) mostly still decoded, to other values of the
    right size, and `hlt merge` wrote them as events. The frames now carry the checksum: every such basket is
    refused, the reader's error naming the file; the undamaged file reads back (and the frames are standard zstd)."""
    import cramjam

    from eclreco.cli import main
    from eclreco.modules.root_output import reading_input_file

    good = tmp_path / "good.root"
    path = eclreco.create_path()
    path.add_module(CountingSource(3000))
    path.add_module("RootOutput", filename=str(good))
    eclreco.process(path, batch_size=256, install_signal_handlers=False)
    data = good.read_bytes()
    with uproot.open(good) as f:
        t = f["events"]
        expected = t["evt"].array(library="np")
        at = int(t["evt"].member("fBasketSeek")[0])
    assert expected.tolist() == list(range(3000))
    block = at + int.from_bytes(data[at + 14:at + 16], "big")  # the basket's ROOT compression header (after fKeylen)
    assert data[block:block + 2] == b"ZS", data[block:block + 9]
    size = int.from_bytes(data[block + 3:block + 6], "little")
    frame = data[block + 9:block + 9 + size]
    assert len(bytes(cramjam.zstd.decompress(frame))) == int.from_bytes(data[block + 6:block + 9], "little")
    outcomes = {"refused": 0, "same values": 0, "other values": 0}
    damaged = tmp_path / "damaged.root"
    # 300 bits spread over the frame after its header (magic, descriptor, window): its blocks and checksum
    for position in np.linspace((block + 9 + 6) * 8, (block + 9 + size) * 8 - 1, 300).astype(int):
        flipped = bytearray(data)
        flipped[position // 8] ^= 1 << (position % 8)
        damaged.write_bytes(flipped)
        try:
            with uproot.open(damaged) as f, reading_input_file(str(damaged)):
                values = f["events"]["evt"].array(library="np")
        except ValueError as err:
            assert str(err).startswith(f"{damaged}: not a readable ROOT file, cut short or damaged? ("), err
            outcomes["refused"] += 1
            continue
        outcomes["same values" if np.array_equal(values, expected) else "other values"] += 1
    assert outcomes["other values"] == 0 and outcomes["refused"] > 0, outcomes
    # what a user runs on such a file: one line naming it, nothing written
    flipped = bytearray(data)
    flipped[block + 9 + size // 2] ^= 0x10
    damaged.write_bytes(flipped)
    capsys.readouterr()
    assert main(["hlt", "merge", str(damaged), "-o", str(tmp_path / "m.root")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eclreco hlt merge: error: {damaged}: not a readable ROOT file, cut short or damaged? ("), err
    assert not (tmp_path / "m.root").exists()
