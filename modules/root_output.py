"""RootOutput: writes reconstructed events to a ROOT file (TTree `events`) through uproot."""
from __future__ import annotations

import contextlib
import os
import threading
import time

import numpy as np

from eclreco import Module, _core
from eclreco.dqm import NO_RUN_LABEL, registry
from eclreco.framework import per_event_value
from eclreco.paths import missing_folder

# The event branches in the tree's order; n_digits and n_out_of_time_digits where the chain makes them.
# detector: the event's code (rawdata.DETECTORS, the batch's column), so that a file of both detectors splits
EVENT_BRANCH_TYPES = {"exp": np.uint64, "run": np.uint64, "evt": np.uint32, "time_ns": np.int64, "detector": np.uint8,
                      "n_digits": np.int32, "n_out_of_time_digits": np.int32, "error_flags": np.uint32}
# ECLClusters columns written by default, as branches cluster_<column> (the cluster_columns parameter)
DEFAULT_CLUSTER_COLUMNS = ("energy_raw", "energy", "theta", "phi", "x", "y", "z", "time", "n_crystals", "seed_cell",
                           "e1e9", "e9e21")


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_CHECKSUM_FLAG = 0x04  # bit 2 of the frame header descriptor (RFC 8878, 3.1.1.1.1)


def zstd_with_checksum(level: int):
    """uproot's ZSTD whose frames carry zstd's content checksum (the low 32 bits of XXH64 of the basket).
    cramjam writes frames without it, and ROOT's 9-byte block header holds only sizes: of the 50,928 single-bit
    flips of the zstd frame of an `evt` basket (3000 events), 99.4 % decoded to other values of the right size,
    silently. With the checksum, libzstd's decoder (uproot's through cramjam, ROOT's own) refuses such a basket:
    the reader's error names the file. The frames stay standard zstd; the cost is one XXH64 pass over the basket
    (xxhash: uproot's own dependency, for LZ4), 1.8 % of zstd level 1's time on a 2 MB basket."""
    import struct

    import uproot
    import xxhash

    class ZSTDWithChecksum(uproot.ZSTD):
        @property
        def code_pair(self):  # the file's fCompress: ZSTD's (uproot matches the exact class)
            return uproot.ZSTD(self.level).code_pair

        def compress(self, data) -> bytes:
            frame = bytes(super().compress(data))
            if frame[:4] != _ZSTD_MAGIC or frame[4] & _ZSTD_CHECKSUM_FLAG:
                return frame  # not one bare frame, or one that already has it
            return b"".join((frame[:4], bytes([frame[4] | _ZSTD_CHECKSUM_FLAG]), frame[5:],
                             struct.pack("<I", xxhash.xxh64(data).intdigest() & 0xFFFFFFFF)))

    return ZSTDWithChecksum(level)


def compression_of(spec: str):
    """uproot compression object of 'zstd:1', 'zlib:4', 'lzma:2', 'lz4:1' or 'none' (ValueError otherwise); zstd
    with its content checksum (zstd_with_checksum; zlib, lzma and lz4 check their data already)."""
    import uproot

    if spec == "none":
        return None
    algo, _, level = spec.partition(":")
    kinds = {"zstd": zstd_with_checksum, "zlib": uproot.ZLIB, "lzma": uproot.LZMA, "lz4": uproot.LZ4}
    if algo not in kinds or not level.isdigit():
        raise ValueError(f"RootOutput: compression {spec!r} is not one of zstd:L, zlib:L, lzma:L, lz4:L, none")
    return kinds[algo](int(level))


def incomplete_name(path: str) -> str:
    """Where an output whose writing failed is kept: path.incomplete, or path.2.incomplete, ... where that
    is taken (an earlier failure's): a name that says what the file is, and never another file's."""
    name, k = f"{path}.incomplete", 2
    while os.path.lexists(name):
        name, k = f"{path}.{k}.incomplete", k + 1
    return name


def cluster_array(offsets, columns: dict):
    """The jagged record array of the clusters (the field `cluster` of the tree: branches cluster_<column>),
    built from its layout with one offsets array for all fields: what ak.zip of ak.unflatten per field
    makes, without their per-field checks, which were ~45 % of the write time (cProfile, 12 cluster
    branches, baskets of 2000 events)."""
    import awkward as ak

    fields = [ak.contents.NumpyArray(a) for a in columns.values()]
    return ak.Array(ak.contents.ListOffsetArray(ak.index.Index64(offsets),
                                                ak.contents.RecordArray(fields, list(columns))))


def make_events_tree(file, name: str, types: dict):
    """The TTree of eclreco's files in an uproot file: `types` of the event branches and of `cluster`
    (cluster_array's type), which becomes the branches cluster_<column> with one counter ncluster (uproot's
    default would be cluster.<column>). RootOutput and `eclreco hlt merge` write the same layout."""
    return file.mktree(name, types, counter_name=lambda outer: "n" + outer,
                       field_name=lambda outer, inner: f"{outer}_{inner}")


class EmptyInputFile(ValueError):
    """open_input_file's error for a file of 0 bytes: in a farm's folder, the file of a collector killed between
    choosing its name (unused_filename makes the file, empty) and RootOutput's header. Beside other files a reader
    of several (hlt merge, eclreco dqm) skips it, saying so; alone it is the error. They failed on it: one such
    file refused the merge of every file of the farm."""


def open_input_file(path: str):
    """An input ROOT file opened with uproot (the caller closes it), or a ValueError of one line naming it: missing,
    a directory or unreadable (paths.unreadable_file), not ROOT (what it begins with: uproot's own words for a short
    one are "expected Chunk of length 403"), or one that uproot cannot open (damaged_input_file). The one wording
    of every command that reads such files (eclreco dqm, hlt merge), which each said it its own way."""
    import uproot

    from eclreco.paths import unreadable_file

    if why := unreadable_file(path, "ROOT file"):
        raise ValueError(f"{path}: {why}")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:  # gone or changed since
        raise ValueError(f"{path}: cannot read it ({err.strerror})") from None
    if not head:
        raise EmptyInputFile(f"{path}: not a ROOT file (empty): 0 bytes, as a farm collector killed before its "
                             "first write leaves its file")
    if head != b"root":
        raise ValueError(f"{path}: not a ROOT file (it begins with {head!r})")
    with reading_input_file(path):  # uproot's OSError for a file cut inside its header, ...
        return uproot.open(path)


def damaged_input_file(path: str, err: Exception) -> ValueError:
    """The error of an input ROOT file that uproot cannot open or read (open_input_file's, and a reader's that fails
    further on: a file cut short, a damaged key), its message on one line (paths.one_line)."""
    from eclreco.paths import one_line

    return ValueError(f"{path}: not a readable ROOT file, cut short or damaged? ({one_line(err)})")


@contextlib.contextmanager
def reading_input_file(path: str):
    """Around the reads of an input ROOT file (open_input_file's; a tree, its baskets, a histogram, the metadata):
    what uproot raises for a part cut short or damaged (a basket's DecompressionError, a short read's OSError, a
    DeserializationError: messages over several lines, some without the file's name) is damaged_input_file's
    one line. Only reads go inside: the caller's own refusals and its output's errors are not the input's."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - uproot's errors have no common base
        raise damaged_input_file(path, err) from None


def read_metadata(f):
    """The `metadata` of an open output file (uproot): RootOutput's JSON (or `eclreco hlt merge`'s) as a dict,
    its text where it is not JSON, None where the file has none (a collector killed before its end)."""
    import json

    if "metadata" not in f:
        return None
    text = str(f["metadata"])
    try:
        return json.loads(text)
    except ValueError:
        return text


def metadata_detectors(f):
    """The `detectors` that an open output file's metadata names (sorted names), None where it has none."""
    meta = read_metadata(f)
    return meta.get("detectors") if isinstance(meta, dict) else None


class RootOutput(Module):
    """Writes events (metadata, digit counts, clusters) to a ROOT TTree `events` via uproot.

    Event branches: exp, run (uint64), evt, error_flags (uint32), time_ns (int64: the envelope's trigger
    time, ns since the Unix epoch; 0 when the envelope had none), detector (uint8: 0 belle2-ecl, 1 array30, the
    codes of eclreco.rawdata.DETECTORS), n_digits (ECLDigits), n_out_of_time_digits
    (ECLEventInformation: digits with |t| > 125 ns, the beam-background level), and the clusters
    as cluster_<column> with the counter ncluster (the columns of cluster_columns; one value per
    cluster each).

    The DQM histograms of the run (eclreco.dqm.registry) are written under `dqm/` at end_run (where the
    registry keeps runs open, the HLT collector: each run's when it is closed, at the latest at terminate); a
    TObjString `metadata` (JSON) at the end records what made the file and the job's counts.
    Rejected events are not written (they go to the quarantine file). Event branches whose data
    the chain does not produce are left out; a cluster column that ECLClusters lacks (a misspelt
    name) is refused at initialize where the chain's columns are known (framework.columns_made: ECLClusterizer
    and eclreco's modules after it), else an error of every batch that has clusters. Data are buffered and written in large
    baskets (ZSTD level 1 by default) by a background thread, one basket at a time, while the
    chain goes on; the file is closed and valid at the end of the run, also after SIGINT/SIGTERM.

    A write that fails (disk full, file size limit, I/O error, any other exception of the write) is fatal: the
    run is asked to stop and ends with the error ``cannot write output file 'NAME': ...; the N events written before it are
    kept in 'NAME.incomplete' (readable, incomplete)`` (eclreco.process raises, reco.py exits 1): never
    a truncated file under the output's name, and no event thrown away (kept_file names that file).
    The events it had taken but not yet written then are in no file: they are counted (``events_lost``,
    the job summary's ``lost_with_output``), not left among the processed events as if they were kept.
    """

    def __init__(self):
        super().__init__()
        self.add_param("filename", "eclreco.root", "output ROOT file")
        self.add_param("tree", "events", "name of the TTree")
        self.add_param("basket_events", 10000, "events buffered per basket (~1.3 kB each at nominal background)")
        self.add_param("compression", "zstd:1", "ROOT compression: zstd:L, zlib:L, lzma:L, lz4:L (L = level) or none; "
                       "zstd:1 writes 4x faster than zlib:1 for an 8 % larger file (benchmarks/bench_root_output.py); its "
                       "frames carry zstd's checksum, so that a damaged basket is refused as zlib's and lz4's are")
        self.add_param("cluster_columns", list(DEFAULT_CLUSTER_COLUMNS),
                       "ECLClusters columns written as branches cluster_<column> (one value per cluster: "
                       "not image or features); one that ECLClusters lacks is an error")
        self.add_param("flush_interval_s", 0.0, "also write the buffer when it is this old (0: only full baskets); "
                       "an uproot file is readable after every write, so this bounds what a crash can lose")
        self._file = None
        self._parts: list[dict] = []
        self._buffered = 0
        self._tree_created = False
        self._schema = None
        self._error = None
        self._writer = None
        self._write_error = None
        self.kept_file = ""  # after a failed write: the file that holds the events written before it
        self.events_written = 0  # over the module's life (a counter); events_written_run: this run's file
        self.events_written_run = 0
        # over the module's life: events taken that a failed write left in no file (taken this run - written)
        self.events_lost = 0
        self.events_taken_run = 0  # events of this run taken into the buffer (kept by the filters)
        # batches handed to event() / of those, how many are in the file: the HLT collector
        # confirms an event as saved only when its batch is (eclreco.hlt.collector)
        self.batches_taken = self.batches_written = 0
        self._oldest = None

    def ordered(self):
        return True

    def writes_events(self):
        return True

    def makes(self):
        return ()

    def requires(self):  # it writes what the batch has
        return ()

    def initialize(self):
        import uproot

        if not self.param("tree") or self.param("basket_events") < 1 or self.param("flush_interval_s") < 0:
            raise ValueError("RootOutput: tree must be a name, basket_events >= 1, flush_interval_s >= 0")
        cols = self.param("cluster_columns")
        if len(set(cols)) != len(cols) or not all(c.isidentifier() for c in cols):
            raise ValueError(f"RootOutput: cluster_columns must be distinct column names, not {cols}")
        if why := self._unknown_cluster_columns():  # before the file is made: the job is refused, nothing written
            raise ValueError(why)
        path = self.param("filename")
        # No directory is made: a misspelt one is an error, as for the quarantine file, not a new tree.
        folder = missing_folder(path)
        if folder:
            raise RuntimeError(f"cannot create output file '{path}': no directory '{folder}'")
        self._error = None
        self.kept_file = ""
        self.batches_taken = self.batches_written = 0
        self.events_written_run = self.events_taken_run = 0
        self._oldest = None
        self._dqm_written = False
        self._detectors = set()
        self._upstream_error = ""  # the first module error message among the events taken (the farm's workers')
        existed = os.path.lexists(path)
        try:
            self._file = uproot.recreate(path, compression=compression_of(self.param("compression")))
        except OSError as err:
            if not existed:  # made, then its header could not be written (a full disk): no unreadable file left
                try:
                    os.remove(path)
                except OSError:
                    pass
            raise RuntimeError(f"cannot create output file '{path}': {err}") from None
        self._tree_created = False
        self._schema = None  # (event branch dtypes, cluster field dtypes or None), fixed by the first basket
        self._made_before = self._collections_made_before()

    def _unknown_cluster_columns(self) -> str:
        """The error for cluster_columns that ECLClusters will not have, where its columns are known at
        initialize (framework.columns_made: the clusterizer's chain); else the first batch says it."""
        from eclreco.framework import modules_before, unknown_columns_error

        before = modules_before(self)
        return "" if before is None else unknown_columns_error(before, "ECLClusters", self.param("cluster_columns"),
                                                               "RootOutput: cluster_columns")

    def _collections_made_before(self) -> set[str] | None:
        """The collections that the modules before this one in the running path make (None: not known)."""
        from eclreco.framework import collections_made, modules_before

        before = modules_before(self)
        return None if before is None else collections_made(before)

    def _fail(self, err: BaseException):
        """A failed write: keep what the file holds, stop the run, remember the error. uproot leaves the
        file readable with every write completed before the failed one (checked under a file-size limit
        and on a full tmpfs, failing in a basket, the tree's metadata, the DQM or at close), and those
        events may exist nowhere else (a stream's; the farm's distributor forgets the events its
        collector has said SAVED for): the file is kept, renamed NAME.incomplete, so that it is not taken
        for a complete job's file. A file without events is removed."""
        path = self.param("filename")
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - the file is broken anyway
                pass
        n = self.events_written_run
        kept = ""
        try:
            if n:
                kept = incomplete_name(path)
                os.rename(path, kept)
                what = f"; the {n} events written before it are kept in '{kept}' (readable, incomplete)"
            else:
                os.remove(path)
                what = "; it held no event and was removed"
        except OSError as why:
            kept = path if kept else ""
            what = (f"; the {n} events written before it are in it (it could not be renamed: {why.strerror})" if n
                    else "")
        self.kept_file = kept if os.path.exists(kept) else ""
        # taken, never written (the failed basket, and those buffered since): processed, in no file
        self.events_lost += self.events_taken_run - n
        self._parts.clear()
        self._buffered = 0
        # OSError: the disk; ValueError: uproot on a closed/broken sink; another (a MemoryError) says its type
        why = err if isinstance(err, (OSError, ValueError)) else f"{type(err).__name__}{f': {err}' if str(err) else ''}"
        self._error = f"cannot write output file '{path}': {why}{what}"
        _core.request_stop(output_failed=True)
        raise RuntimeError(self._error) from None

    @property
    def write_error(self) -> str:
        """The error of a failed write ('' while the file is being written): the run ended with it."""
        return self._error or ""

    def event(self, batch):
        if self._writer is not None and not self._writer.is_alive():
            self._join_writer()  # a failed background write fails the run here
        if self._error:
            raise RuntimeError(self._error)
        keep = batch.active()  # not rejected, not discarded by an event filter
        # Built before anything is counted: a call that raises (a missing cluster column) is re-run event
        # by event, and its events are in no file (their detectors were in the metadata of a file of 0 events).
        part = self._part_of(batch, keep) if keep.any() else None
        self.batches_taken += 1
        self._detectors.update(np.unique(batch.detector[keep]).tolist())
        if not self._upstream_error and (batch.error_flags[keep] & _core.ERROR_MODULE).any():
            errors = batch.errors()
            first = min((i for i in errors if keep[i]), default=None)
            self._upstream_error = errors[first] if first is not None else ""
        if part is None:
            self._written_when_idle()  # nothing of it to write
            return
        self._parts.append(part)
        self._buffered += int(keep.sum())
        if self._oldest is None:
            self._oldest = time.monotonic()
        if self._buffered >= self.param("basket_events"):
            self._start_write()
        else:
            self.flush_if_due()
        # taken once event() returns: the events of a call that raised (a write failing in it) are module errors
        self.events_taken_run += int(keep.sum())

    def _part_of(self, batch, keep) -> dict:
        """The branches' data of the batch's kept events (and markers of what the chain failed to make); a
        ValueError for cluster_columns that ECLClusters lacks or that hold several values per cluster."""
        t = EVENT_BRANCH_TYPES
        part = {
            "exp": batch.exp[keep].astype(t["exp"]),  # 64 bits: the wire format bounds only evt
            "run": batch.run[keep].astype(t["run"]),
            "evt": batch.evt[keep].astype(t["evt"]),
            "time_ns": batch.time_ns[keep].astype(t["time_ns"], copy=False),  # the envelope's trigger time, 0 if absent
            "detector": batch.detector[keep].astype(t["detector"], copy=False),
            "error_flags": batch.error_flags[keep].astype(t["error_flags"]),
        }
        if "ECLDigits" in batch:
            part["n_digits"] = np.diff(batch["ECLDigits"].offsets)[keep].astype(t["n_digits"])
        if "ECLEventInformation" in batch:  # the event's background measure (ECLUnpacker)
            # 0 for an event without a row (one on which the unpacker failed), as for a rejected event
            oot = per_event_value(batch, "ECLEventInformation", "n_out_of_time_digits", 0)
            part["n_out_of_time_digits"] = oot[keep].astype(t["n_out_of_time_digits"], copy=False)
        failed = (batch.error_flags[keep] & _core.ERROR_MODULE).all()
        if "ECLDigits" not in batch and failed:
            # every event failed before or in the unpacker: no digit counts, but the branches of a chain
            # that makes them (a first basket without them dropped those of every later basket)
            part["_digits_failed"] = True
        if "ECLClusters" not in batch and failed and self.param("cluster_columns"):
            # every event failed before clustering (the clusterizer made nothing of this batch): their
            # cluster lists are empty, in the tree's first basket too (not a tree without cluster branches)
            part["_clusters_failed"] = True
        if "ECLClusters" in batch:
            clusters = batch["ECLClusters"]
            offsets = clusters.offsets
            missing = [c for c in self.param("cluster_columns") if c not in clusters]
            if missing and not failed:
                # a misspelt or unmade column is an error, never a silently absent branch
                raise ValueError(f"RootOutput: cluster_columns {', '.join(missing)} not in ECLClusters, whose columns "
                                 f"are {', '.join(sorted(clusters.columns()))} (in the HLT farm the workers send "
                                 f"those of their --cluster-columns)")
            # A batch without them whose every event failed in the module that makes them (re-run one
            # by one, or a batch of one): written with their flags and no clusters, as in a batch where
            # other events succeeded they are written with what they have (they were dropped, which
            # made the file depend on the batch size).
            if missing:
                part["_clusters_failed"] = True
            else:
                counts = np.diff(offsets)
                # Rows of the kept events only.
                row_keep = np.repeat(keep, counts)
                cols = {}
                for column in self.param("cluster_columns"):
                    values = clusters[column]
                    if values.ndim != 1:
                        raise ValueError(f"RootOutput: cluster column '{column}' holds {values.shape[1:]} values per "
                                         f"cluster; cluster_columns takes columns of one value per cluster")
                    cols[column] = np.ascontiguousarray(values[row_keep])
                if cols:
                    part["_cluster_counts"] = counts[keep].astype(np.int32)
                    part["_cluster_cols"] = cols
        return part

    def flush_if_due(self):
        """Starts writing the buffer when flush_interval_s is set and its oldest batch is that old
        (called by event() and, between batches, by a source that needs its data on disk: the HLT
        collector). Also surfaces the error of a finished background write."""
        if self._writer is not None and not self._writer.is_alive():
            self._join_writer()
        self._written_when_idle()  # a batch without events to write taken during the write that ended
        iv = self.param("flush_interval_s")
        if iv > 0 and self._oldest is not None and time.monotonic() - self._oldest >= iv:
            self._start_write()
        elif self._writer is None and registry.runs_kept_open and registry.has_closed() and not self._error:
            try:  # a run closed while the file is not being written: its cycle now (not with the next basket)
                self._write_dqm("")
            except OSError as err:
                self._fail(err)

    # Writing (compression + uproot) runs in one background thread, one basket at a time, so that
    # the chain (and the HLT collector's confirmations) go on meanwhile; the next basket waits for
    # the previous write. batches_written moves when a write is complete.
    def _start_write(self):
        self._join_writer()
        if self._error:
            return
        parts, taken = self._parts, self.batches_taken
        self._parts, self._buffered, self._oldest = [], 0, None
        if not parts:
            self._written_when_idle()
            return

        def write():
            try:
                self._write(parts)
                self.batches_written = taken
            except Exception as err:  # noqa: BLE001 - any: its parts are in no file, a later write must not cover them
                self._write_error = err

        self._writer = threading.Thread(target=write, name="RootOutput-writer", daemon=True)
        self._writer.start()

    def _written_when_idle(self):
        """Nothing buffered and no write in flight: every batch taken is in the file (batches_written, the HLT
        collector's SAVED), also one that had nothing to write and came while a write was in flight."""
        if not self._parts and self._writer is None and not self._error:
            self.batches_written = self.batches_taken

    def _join_writer(self):
        w, self._writer = self._writer, None
        if w is not None:
            w.join()
        err, self._write_error = self._write_error, None
        if err is not None:
            self._fail(err)

    def _flush(self):
        """Everything buffered is in the file when this returns."""
        self._start_write()
        self._join_writer()

    def _write(self, parts):
        # The branches: those of the tree once it exists, else those of any part. A batch without
        # one (ECLClusters missing where the clusterizer failed on all its events, say) gets zeros
        # / empty cluster lists: dropping the branch for the basket made the tree inconsistent.
        # A first basket whose events all failed before clustering has the cluster branches of
        # cluster_columns with the clusterizer's types (as a file without events): a tree made without
        # them could take no later clusters, and the job stopped with its file removed.
        if self._schema is None:
            present = {k for p in parts for k in p}
            if any(p.get("_digits_failed") for p in parts):
                present |= {"n_digits", "n_out_of_time_digits"}
            ev = {k: np.dtype(t) for k, t in EVENT_BRANCH_TYPES.items() if k in present}
            cl = next(({n: a.dtype for n, a in p["_cluster_cols"].items()} for p in parts if "_cluster_cols" in p), None)
            if cl is None and any(p.get("_clusters_failed") for p in parts):
                cl = self._cluster_types()
            self._schema = (ev, cl)
        ev_types, cl_types = self._schema
        if cl_types is None and any("_cluster_cols" in p for p in parts):
            # a TTree gets no branches after its creation: not silently without the clusters
            raise ValueError("ECLClusters appeared after the tree was created without cluster branches (every event "
                             "of its first basket failed before clustering): a TTree gets no new branches")
        sizes = [len(p["evt"]) for p in parts]
        data = {key: np.concatenate([p[key] if key in p else np.zeros(k, dt) for p, k in zip(parts, sizes)])
                for key, dt in ev_types.items()}
        if cl_types is not None:
            counts = np.concatenate([p["_cluster_counts"] if "_cluster_cols" in p else np.zeros(k, np.int32)
                                     for p, k in zip(parts, sizes)])
            offsets = np.zeros(counts.size + 1, np.int64)
            np.cumsum(counts, out=offsets[1:])
            # astype: a user's column under the clusterizer's types of a first basket without clusters
            data["cluster"] = cluster_array(offsets, {n: np.concatenate([p["_cluster_cols"][n].astype(dt, copy=False)
                                                                          if "_cluster_cols" in p
                                                                          else np.zeros(0, dt) for p in parts])
                                                       for n, dt in cl_types.items()})
        n = len(data["evt"])
        if not self._tree_created:
            self._make_tree({k: (v.dtype if isinstance(v, np.ndarray) else v.type) for k, v in data.items()})
        self._file[self.param("tree")].extend(data)
        self.events_written += n
        self.events_written_run += n

    def _make_tree(self, types):
        make_events_tree(self._file, self.param("tree"), types)
        self._tree_created = True

    def _cluster_types(self) -> dict:
        """The clusterizer's types of the cluster_columns, for branches made before any cluster was seen."""
        types = _core.cluster_columns()  # a column of another module: float32
        return {n: np.dtype(types.get(n, "float32")) for n in self.param("cluster_columns")}

    def _empty_tree_types(self):
        """The branches of a tree that no event reached: those a file of the same chain with events has
        (the digit counts where a module before this one makes ECLDigits / ECLEventInformation, the
        cluster_columns where one makes ECLClusters), so that an analysis reading the branches of its
        other files reads empty arrays from this one, neither a KeyError nor branches the others lack.
        A chain with a module that does not say what it makes (Module.makes): every branch."""
        made = self._made_before
        wanted = {"n_digits": "ECLDigits", "n_out_of_time_digits": "ECLEventInformation"}
        types = {k: np.dtype(t) for k, t in EVENT_BRANCH_TYPES.items()
                 if k not in wanted or made is None or wanted[k] in made}
        columns = {n: np.zeros(0, dt) for n, dt in self._cluster_types().items()}
        if columns and (made is None or "ECLClusters" in made):
            types["cluster"] = cluster_array(np.zeros(1, np.int64), columns).type
        return types

    def end_run(self, exp, run):
        self._flush()
        if self._error:
            return
        try:
            self._write_dqm(f"exp {exp}, run {run}")
        except OSError as err:
            self._fail(err)

    def _write_dqm(self, label: str):
        """The DQM of the run that ended (label: its run), or where the registry keeps runs open, of the
        runs closed so far, one cycle each (label unused)."""
        if self._file is None:
            return
        if registry.runs_kept_open:
            self._dqm_written |= registry.write_closed(self._file)
        elif registry.histograms:
            registry.write_root(self._file, label=label)
            self._dqm_written = True

    def terminate(self):
        if self._error:
            raise RuntimeError(self._error)
        self._flush()
        if self._error:
            raise RuntimeError(self._error)
        try:
            if self._file is not None and not self._tree_created:
                self._make_tree(self._empty_tree_types())  # no event reached the output: a readable empty tree
            if registry.runs_kept_open:
                registry.close_all()  # the runs still open: their cycles now (or what came without a run)
                self._write_dqm("")
            elif not self._dqm_written:
                # No run began (no event, or every event rejected: no run number to trust), so no
                # end_run wrote the DQM: its histograms still go in, the rejections above all.
                self._write_dqm(NO_RUN_LABEL)
            if self._file is not None:
                self._file["metadata"] = self._metadata()
                self._file.close()
                self._file = None
        except OSError as err:
            self._fail(err)

    def _metadata(self) -> str:
        """The file's `metadata` (a TObjString of JSON): what made it (eclreco.framework.job_provenance:
        version, command, host, every module's parameters, the CNN's model files), the detectors of its
        events, and the job's counts, so that a file says whether cluster_energy is the CNN's and
        how many events of the input are not in it (rejected, discarded, failed, never read from a stream:
        unread_at_end; the first module error's message), and whether a signal (`stopped_by`) or an error (`fatal_error`) stopped the job before
        the end of its input."""
        import datetime
        import json
        import signal

        from eclreco.framework import job_provenance, running_path, statistics
        from eclreco.rawdata import DETECTOR_NAMES

        s = statistics.summary()
        # first_error: the message of the first module error, of this process's modules (RootOutput's own
        # included, whose events are not written) or else of an event written (a farm worker's): the file
        # says which module failed on the events whose error_flags are set, as hlt run's output line does
        own = statistics.state.error_messages() if s.get("errors") else []
        first_error = own[0] if own else self._upstream_error or None
        sig = _core.stop_signal()  # SIGINT/SIGTERM ended the job: the file holds the events before it
        meta = job_provenance(running_path())
        meta.update(
            written_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            detectors=sorted(DETECTOR_NAMES.get(c, str(c)) for c in self._detectors),
            events_written=self.events_written_run,
            stopped_by=signal.Signals(sig).name if sig else None,
            fatal_error=s.get("fatal_error"),
            job={**{k: s.get(k) for k in ("received", "processed", "rejected", "rejected_by_reason", "discarded",
                                          "discarded_by_reason", "errors", "unread_at_end")},
                 "first_error": first_error})
        return json.dumps(meta, default=str)

    def counters(self):
        return {"events_written": float(self.events_written), "events_lost": float(self.events_lost)}
