"""DQM: per-run histograms, filled per batch with numpy, mergeable across processes, written by
RootOutput into the `dqm` directory of the ROOT file, drawn by `eclreco dqm FILE.root -o DIR`."""
from __future__ import annotations

import collections
import copy
import os
import re
import sys
import threading

import numpy as np

from eclreco import _core
from eclreco.cli_types import input_file
from eclreco.paths import one_line


class Histogram1D:
    """A fixed-binning histogram with under/overflow, filled with whole arrays at a time."""

    def __init__(self, name: str, title: str, nbins: int, lo: float, hi: float, xlabel: str = ""):
        self.name, self.title, self.xlabel = name, title, xlabel
        self.edges = np.linspace(lo, hi, nbins + 1)
        self.counts = np.zeros(nbins + 2, np.float64)  # [underflow, bins..., overflow]
        self.moments = np.zeros(2, np.float64)  # sum of w x and of w x^2 over the in-range fills (ROOT's statistics)
        # numpy releases the GIL in an add of more than 500 bins: two framework threads (threads > 1) adding
        # to one histogram at once lost counts. The C++ fill holds the GIL.
        self._lock = threading.Lock()

    def fill(self, values, weights=None) -> None:
        self.add_bins(self.bins(values, weights))

    def bins(self, values, weights=None):
        """What fill(values, weights) adds, computed without changing the histogram; add_bins adds it and
        cannot fail (ECLDQM computes every histogram's bins of a batch before it adds any: a call that
        raised is re-run event by event, and what it had added was counted twice). A ValueError naming the
        histogram for values that are not one per entry."""
        values = np.asarray(values)
        if values.size == 0:
            return None
        if values.ndim != 1:
            raise ValueError(f"histogram '{self.name}' takes one value per entry, not values of shape {values.shape}")
        if weights is None and values.dtype.kind in "if" and values.dtype.itemsize in (4, 8):
            # one C++ pass instead of ~8 numpy passes and temporaries (the same bins), in place in add_bins:
            # it takes any 1-d array of these types
            return values
        nb = self.edges.size - 1
        lo, hi = self.edges[0], self.edges[-1]
        # floor((values - lo) / (hi - lo) * nb) in float64, in place on one temporary
        x = np.subtract(values, lo, dtype=np.float64)
        x /= hi - lo
        x *= nb
        np.floor(x, out=x)
        idx = x.astype(np.int64)
        idx += 1
        np.maximum(idx, 0, out=idx)
        np.minimum(idx, nb + 1, out=idx)
        counts = np.bincount(idx, weights=weights, minlength=nb + 2)
        inside = (idx >= 1) & (idx <= nb)
        v = np.asarray(values, np.float64)[inside]
        w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64)[inside]
        return counts, np.array([(w * v).sum(), (w * v * v).sum()])

    def add_bins(self, bins) -> None:
        """Adds what bins() computed."""
        if bins is None:
            return
        if isinstance(bins, np.ndarray):
            with self._lock:  # a reset's zeroing (numpy, without the GIL) would overlap it
                _core.fill_uniform_histogram(self.counts, bins, float(self.edges[0]), float(self.edges[-1]),
                                             self.moments)
        else:
            self._add(bins[0], bins[1])

    def add(self, other: "Histogram1D") -> None:
        self._add(other.counts, other.moments)

    def _add(self, counts, moments) -> None:
        with self._lock:
            self.counts += counts
            self.moments += moments

    # The registry's reset and run switches take the histogram's lock as a fill does: each fill goes wholly
    # before or after them (a reset between a fill's counts and its moments, or within its bins, split it).
    def clear(self) -> None:
        with self._lock:
            self.counts[:] = 0
            self.moments[:] = 0

    def swap(self, contents=None):
        """Puts `contents` ((counts, moments); None: empty) in place of the histogram's; returns the old."""
        with self._lock:
            old = self.counts, self.moments
            self.counts, self.moments = contents or (np.zeros_like(self.counts), np.zeros_like(self.moments))
            return old

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "xlabel": self.xlabel,
                "edges": self.edges.tolist(), "counts": self.counts.tolist(), "moments": self.moments.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Histogram1D":
        h = cls(d["name"], d["title"], len(d["edges"]) - 1, d["edges"][0], d["edges"][-1], d.get("xlabel", ""))
        h.counts = np.asarray(d["counts"], np.float64)
        h.moments = np.asarray(d["moments"], np.float64)
        return h

    @property
    def entries(self) -> float:
        return float(self.counts.sum())


class CategoryHistogram:
    """Counts per label (e.g. rejections by reason)."""

    def __init__(self, name: str, title: str):
        self.name, self.title = name, title
        self.counts: dict[str, float] = {}
        # a module fills from several framework threads (threads > 1): get-then-set lost counts
        self._lock = threading.Lock()

    def bins(self, counts: dict) -> dict:
        """What fill_counts(counts) adds (Histogram1D's two-step fill, for ECLDQM)."""
        return counts

    def add_bins(self, counts: dict) -> None:
        self.fill_counts(counts)

    def fill_counts(self, counts: dict) -> None:
        with self._lock:
            for k, v in counts.items():
                self.counts[k] = self.counts.get(k, 0.0) + v

    def add(self, other: "CategoryHistogram") -> None:
        self.fill_counts(other.counts)

    def clear(self) -> None:
        with self._lock:
            self.counts.clear()

    def swap(self, contents=None):
        """Puts `contents` (None: empty) in place of the histogram's counts; returns the old."""
        with self._lock:
            old, self.counts = self.counts, ({} if contents is None else contents)
            return old

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "labels": dict(self.counts)}

    @property
    def entries(self) -> float:
        return float(sum(self.counts.values()))


# the title's run of histograms filled in a job in which no run began
NO_RUN_LABEL = "no run: no event, or every event rejected"


class DQMRegistry:
    """The histograms of the current run in this process; modules fill, outputs write.

    One run at a time by default: a run's histograms are written at its end_run and start empty at the
    next begin_run. With keep_runs_open() (the HLT collector, whose results of two runs arrive
    interleaved), each (exp, run) keeps its own contents until close_run() says that no more of its
    events can come (or close_all() at the end of the job), and an output writes one cycle per run
    (write_closed)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.histograms: dict[str, Histogram1D | CategoryHistogram] = {}
        self._new_job()

    def _new_job(self):
        self.runs_kept_open = False
        self._current = None        # the (exp, run) of the histograms' contents; None: before the first run
        # runs kept open: the current part began when its run was closed (written) while the job was in it; it
        # is a further cycle of the run only if a batch came into it (filled())
        self._fresh = False
        self._filled = False
        self._open: dict[tuple, dict] = {}   # (exp, run) -> contents put aside (open runs but the current)
        self._closed: list[tuple] = []       # ((exp, run), label, histograms with their contents) to write
        # (exp, run) -> cycles written (a late event's run gets one more); the recent runs only: bounded
        self._written: collections.OrderedDict = collections.OrderedDict()
        # of them, those write_closed has put in the file (a failed write leaves the rest out of it)
        self._in_file: collections.OrderedDict = collections.OrderedDict()

    def book(self, hist):
        with self.lock:
            return self.histograms.setdefault(hist.name, hist)

    def clear(self) -> None:
        """Forgets every booked histogram and run (eclreco.process, before a job: its modules book theirs at
        initialize; a job without ECLDQM wrote the histograms of an earlier job in this process)."""
        with self.lock:
            self.histograms.clear()
            self._new_job()

    def reset(self) -> None:
        with self.lock:
            self._reset()

    def _reset(self) -> None:
        for h in self.histograms.values():
            h.clear()

    def _take(self) -> dict:
        """The contents of every histogram (their arrays, not copies), which start empty again."""
        return {name: h.swap() for name, h in self.histograms.items()}

    def _put(self, contents: dict) -> None:
        for name, h in self.histograms.items():
            if name in contents:  # (a histogram booked after the run was put aside starts empty)
                h.swap(contents[name])

    def keep_runs_open(self) -> None:
        """Each (exp, run) keeps its own histograms until close_run / close_all (the HLT collector; for the
        job: clear() ends it)."""
        with self.lock:
            self.runs_kept_open = True

    def begin_run(self, exp, run) -> None:
        """The job's events are now of (exp, run) (ECLDQM.begin_run). The first run keeps what was filled
        before it (rejected events before the first good one). One run at a time, a later run starts
        empty. Runs kept open: the contents of the run left are put aside and those of (exp, run) taken up;
        a run whose cycle was written already starts empty and gets one more cycle, titled "part 2",
        "part 3", ... (late events: never dropped, never added to a cycle written)."""
        key = (int(exp), int(run))
        with self.lock:
            if not self.runs_kept_open:
                if self._current is not None:
                    self._reset()
                self._current = key
                return
            if key == self._current:
                return
            if self._current is not None:
                contents = self._take()
                if self._current_part_kept():
                    self._open[self._current] = contents
            self._current, self._fresh, self._filled = key, False, False
            if key in self._open:
                self._put(self._open.pop(key))
            elif key in self._written:
                self._warn_late(key)

    def filled(self) -> None:
        """A batch went into the histograms (ECLDQM.event): a part begun at close_run has late events."""
        self._filled = True

    def _current_part_kept(self) -> bool:
        """The current part is to be kept: not one begun at close_run that no batch came into."""
        if not self._fresh:
            return True
        if self._filled:
            self._warn_late(self._current)
            self._fresh = False
        return self._filled

    def _warn_late(self, key) -> None:
        print(f"[DQM] warning: events of exp {key[0]}, run {key[1]} after its histograms were written (the run "
              f"was complete by the farm's sequence ids, or more runs were open than the collector keeps): they "
              f"go to a further cycle, '{self._label(key)}'", file=sys.stderr, flush=True)

    def close_run(self, exp, run) -> None:
        """Runs kept open: no more events of (exp, run) can come; its cycle is ready to write. Events of it
        that still come (the current run's in the job's hands, a late one) go to a further cycle."""
        key = (int(exp), int(run))
        with self.lock:
            if key == self._current:
                contents = self._take()
                if self._current_part_kept():
                    self._closed.append(self._part(key, contents))
                self._fresh, self._filled = True, False
            elif key in self._open:
                self._closed.append(self._part(key, self._open.pop(key)))

    def close_all(self) -> None:
        """Runs kept open: the job ends; every open run is ready to write (the current one too, or, if no
        run began, what was filled: rejected events without a run)."""
        with self.lock:
            for key in list(self._open):
                self._closed.append(self._part(key, self._open.pop(key)))
            contents = self._take()
            if self._current is None or self._current_part_kept():
                self._closed.append(self._part(self._current, contents))
            self._current, self._fresh, self._filled = None, False, False

    def open_runs(self) -> list[tuple]:
        """Runs kept open: the (exp, run) whose histograms are not yet written, in the order they began."""
        with self.lock:
            return self._open_runs()

    def _open_runs(self) -> list[tuple]:
        current = [self._current] if self._current is not None and (not self._fresh or self._filled) else []
        return list(self._open) + current

    def runs_in_parts(self, in_file: bool = False) -> list[tuple]:
        """Runs kept open: the (exp, run, parts) of the job's runs whose DQM is in more than one cycle (written, or
        a further part open now), in the order they were first written (the collector's report of its run).
        in_file: the cycles that write_closed has put in the output file only (after a failed write: what the
        kept file holds; the parts closed or open since are in no file)."""
        with self.lock:
            if not self.histograms:  # no ECLDQM in the job (the collector's tcp:// output): no DQM written
                return []
            if in_file:
                return [(*key, n) for key, n in self._in_file.items() if n > 1]
            now_open = set(self._open_runs())
            parts = ((key, n + (key in now_open)) for key, n in self._written.items())
            return [(*key, n) for key, n in parts if n > 1]

    def _label(self, key) -> str:
        if key is None:
            return NO_RUN_LABEL
        part = self._written.get(key, 0) + 1
        return f"exp {key[0]}, run {key[1]}" + (f", part {part}" if part > 1 else "")

    def _part(self, key, contents: dict) -> tuple:
        """(label, histograms holding `contents`) of a closed run; its cycle is counted as written."""
        label = self._label(key)
        if key is not None:
            _count(self._written, key)
        hists = []
        for name, h in self.histograms.items():
            c = copy.copy(h)
            if isinstance(h, Histogram1D):
                c.counts, c.moments = contents.get(name, (np.zeros_like(h.counts), np.zeros_like(h.moments)))
            else:
                c.counts = contents.get(name, {})
            hists.append(c)
        return key, label, hists

    def write_closed(self, root_file, directory: str = "dqm") -> bool:
        """Writes the closed runs' histograms, one cycle per run, each title followed by its run (see
        write_root); True when there was any. A cycle counts as in the file (runs_in_parts(in_file=True)) once
        all its histograms are written."""
        with self.lock:
            closed, self._closed = self._closed, []
        for key, label, hists in closed:
            for h in hists:
                root_file[f"{directory}/{h.name}"] = _to_th1d(h, label)
            if key is not None:
                with self.lock:
                    _count(self._in_file, key)
        return bool(closed)

    def has_closed(self) -> bool:
        return bool(self._closed)

    def to_dicts(self) -> list[dict]:
        with self.lock:
            return [h.to_dict() for h in self.histograms.values()]

    def merge_dicts(self, dicts: list[dict]) -> None:
        """Adds histograms received from another process (HLT workers -> collector)."""
        with self.lock:
            for d in dicts:
                if "labels" in d:
                    h = self.histograms.setdefault(d["name"], CategoryHistogram(d["name"], d["title"]))
                    h.fill_counts(d["labels"])
                elif d["name"] in self.histograms:
                    self.histograms[d["name"]].add(Histogram1D.from_dict(d))
                else:
                    self.histograms[d["name"]] = Histogram1D.from_dict(d)

    def write_root(self, root_file, directory: str = "dqm", label: str = "") -> None:
        """Writes every histogram into an open uproot file as a TH1D with its title (followed by
        `label` in parentheses when given: the run), x-axis title, under- and overflow and entries;
        category counts as a TH1D with one labelled bin per category (ROOT's alphanumeric bins),
        sorted by label."""
        with self.lock:
            for name, h in self.histograms.items():
                root_file[f"{directory}/{name}"] = _to_th1d(h, label)


def _to_th1d(h, run_label: str = ""):
    from uproot.writing import to_TH1x, to_TObjString
    from uproot.writing.identify import to_TAxis, to_THashList

    if isinstance(h, Histogram1D):
        counts, edges, labels, xlabel = h.counts, h.edges, None, h.xlabel
    else:
        names = sorted(h.counts) or ["(none)"]  # ROOT has no axis without bins
        counts = np.array([0.0] + [h.counts.get(k, 0.0) for k in names] + [0.0])
        edges = np.arange(len(names) + 1, dtype=np.float64)
        labels = to_THashList([to_TObjString(k) for k in names])
        for i, label in enumerate(labels):
            label._bases[0]._members["@fUniqueID"] = i + 1  # the bin number, as TAxis::SetBinLabel sets it
        xlabel = ""
    counts = np.asarray(counts, np.float64)
    inner = counts[1:-1]
    if isinstance(h, Histogram1D):
        sumwx, sumwx2 = (float(m) for m in h.moments)
    else:  # a label's bin: its centre is the value
        centers = 0.5 * (edges[:-1] + edges[1:])
        sumwx, sumwx2 = float((inner * centers).sum()), float((inner * centers**2).sum())
    # ROOT's statistics (GetMean, GetStdDev) are of the in-range fills, from the values themselves;
    # entries count every fill; unweighted fills: the sum of squared weights per bin (fSumw2) is the count
    axis = to_TAxis("xaxis", xlabel, len(edges) - 1, float(edges[0]), float(edges[-1]), fLabels=labels)
    title = f"{h.title} ({run_label})" if run_label else h.title
    return to_TH1x(h.name, title, counts, float(counts.sum()), float(inner.sum()), float(inner.sum()),
                   sumwx, sumwx2, counts, axis)


def _count(counts: collections.OrderedDict, key) -> None:
    """One more cycle of run `key`; the 10000 runs counted last are kept (a farm's life: bounded)."""
    counts[key] = counts.pop(key, 0) + 1
    while len(counts) > 10000:
        counts.popitem(last=False)


registry = DQMRegistry()


class NoDQMError(ValueError):
    """A readable ROOT file without a dqm directory (read_histograms): beside files that have one, read_files
    skips it (a farm collector killed, or whose write failed, mid-run wrote its events but no DQM of the runs
    open then)."""


def read_histograms(root_path: str) -> list[dict]:
    """Every histogram of the file's dqm directory, each cycle (run) of it: name, cycle, counts and edges,
    under- and overflow, bin labels, title, x-axis title. A file that is missing, not ROOT or cut short is a
    ValueError of one line naming it; one without dqm/ a NoDQMError."""
    from eclreco.modules.root_output import (metadata_detectors, open_input_file,  # (it imports this module)
                                             reading_input_file)

    hists = None  # no dqm directory
    with open_input_file(root_path) as f, reading_input_file(root_path):
        detectors = metadata_detectors(f)  # None: no metadata (a collector killed before its end)
        if "dqm" in {k.split(";")[0] for k in f.keys(recursive=False)}:
            d = f["dqm"]
            cycles: dict[str, set[int]] = {}
            for k in d.keys(recursive=False):
                name, _, cycle = k.partition(";")
                cycles.setdefault(name, set()).add(int(cycle or 1))
            hists = []
            for name, cycle in sorted((k, c) for k, cs in cycles.items() for c in cs):
                obj = d[f"{name};{cycle}"]
                if not hasattr(obj, "to_numpy"):
                    continue
                counts, edges = obj.to_numpy()
                hists.append({"name": name, "cycle": cycle, "runs": len(cycles[name]), "counts": counts,
                              "edges": edges, "flow": obj.values(flow=True)[[0, -1]],
                              "labels": obj.axis().labels(), "title": obj.member("fTitle") or name,
                              "xlabel": obj.axis().member("fTitle"), "file": root_path,
                              "detectors": detectors})
    if hists is None:
        raise NoDQMError(f"{root_path} has no dqm directory (a job without ECLDQM, or not a RootOutput file)")
    return hists


# In the -o folder: the PNGs that `eclreco dqm` made there last, and of which file, so that the next file
# drawn into the folder removes those it does not make again (its plots would have mixed with the
# earlier file's) and nothing else (files a user put there, or changed since).
MANIFEST = "eclreco-dqm.json"


def _previous_plots(out_dir: str) -> dict[str, str]:
    """{PNG name: SHA-256} of the folder's manifest; {} when there is none or it is not one (said)."""
    import json

    path = os.path.join(out_dir, MANIFEST)
    try:
        with open(path) as f:
            plots = json.load(f)["plots"]
        if not (isinstance(plots, dict) and all(isinstance(v, str) for v in plots.values())):
            raise TypeError("'plots' is not a map of names to hashes")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"eclreco dqm: warning: {path} is not a readable list of this command's plots ({one_line(err)}): "
              "no earlier plot is removed", file=sys.stderr)
        return {}
    # names only, in the folder itself: a manifest never removes a file elsewhere
    return {name: sha for name, sha in plots.items() if os.path.basename(name) == name and name.endswith(".png")}


# the run at the end of a histogram's title: "(exp 1, run 2)" or "(exp 1, run 2, part 3)" (DQMRegistry._label)
_RUN_IN_TITLE = re.compile(r" \(exp (\d+), run (\d+)(?:, part \d+)?\)$")


def by_run(hists: list[dict], parts: bool = False) -> list[dict]:
    """read_histograms' cycles (of one file or several: a run whose collector was replaced wrote part of it in each
    file), one entry per histogram and (exp, run) of its title: the cycles of a run written in several parts (the
    farm's collector, a run that came back in one job) are summed, as the run's totals are the sum of its parts
    (docs/architecture.md); each entry names its `run` ((exp, run), None when the title gives none: such cycles
    stay apart), its `cycles` and `where` (K, or FILE;K of several files). parts=True: every cycle
    apart, each with its `part` (1, 2, ... in file and cycle order within its run). Each entry's `png` is its file
    name: NAME.png where the histogram has one entry, else NAME_expE_runR.png (NAME_expE_runR_partK.png for a
    part of a run of several, NAME_cycleK.png for a cycle without a run, NAME_fileF_cycleK.png of the F-th of
    several files)."""
    files = list(dict.fromkeys(h["file"] for h in hists))
    several = len(files) > 1
    groups: dict[tuple, list[dict]] = {}
    for h in hists:  # (read_histograms: sorted by name, then cycle; the files in their order)
        m = _RUN_IN_TITLE.search(h["title"])
        run = (int(m.group(1)), int(m.group(2))) if m else None
        groups.setdefault((h["name"], run if run is not None else ("cycle", h["file"], h["cycle"])), []).append(
            {**h, "run": run, "base_title": h["title"][:m.start()] if m else h["title"],
             "where": [f"{h['file']};{h['cycle']}" if several else str(h["cycle"])]})
    out = []
    for (name, _), cycles in groups.items():
        if parts or len(cycles) == 1:
            out += [{**c, "cycles": [c["cycle"]], "part": k if len(cycles) > 1 else None}
                    for k, c in enumerate(cycles, 1)]
        else:
            out.append(_summed(cycles))
    per_name = collections.Counter(e["name"] for e in out)
    for e in out:
        if per_name[e["name"]] == 1:
            e["png"] = f"{e['name']}.png"
        elif e["run"] is None:
            tag = f"_file{files.index(e['file']) + 1}" if several else ""
            e["png"] = f"{e['name']}{tag}_cycle{e['cycle']}.png"
        else:
            e["png"] = (f"{e['name']}_exp{e['run'][0]}_run{e['run'][1]}"
                        + (f"_part{e['part']}" if e["part"] else "") + ".png")
    return out


def _summed(cycles: list[dict]) -> dict:
    """One histogram of the cycles (parts) of one run: the counts bin by bin, labelled bins by label (a part
    without rejections has only the empty bin `(none)`). A ValueError naming both where the parts' bins differ
    (several files: of another binning or version)."""
    first = cycles[0]
    exp, run = first["run"]
    for c in cycles[1:]:
        if bool(c["labels"]) != bool(first["labels"]) or (
                not first["labels"] and not np.array_equal(c["edges"], first["edges"])):
            raise ValueError(f"cannot sum the parts of dqm/{first['name']} of exp {exp}, run {run}: "
                             f"cycle {c['where'][0]} has other bins than cycle {first['where'][0]}")
    total = {**first, "cycles": [c["cycle"] for c in cycles], "where": [c["where"][0] for c in cycles],
             "part": None, "title": f"{first['base_title']} (exp {exp}, run {run}: {len(cycles)} parts summed)",
             "flow": sum(c["flow"] for c in cycles)}
    if first["labels"]:
        counts: dict[str, float] = {}
        for c in cycles:
            for label, n in zip(c["labels"], c["counts"]):
                counts[label] = counts.get(label, 0.0) + float(n)
        if len(counts) > 1:
            counts.pop("(none)", None)
        labels = sorted(counts)
        total.update(labels=labels, counts=np.array([counts[k] for k in labels]),
                     edges=np.arange(len(labels) + 1, dtype=np.float64))
        return total
    total["counts"] = sum(c["counts"] for c in cycles)
    return total


def read_files(paths: list[str]) -> list[dict]:
    """read_histograms of each file, in order (a run whose collector was replaced mid-run is in two files: by_run
    sums its parts across them). A ValueError naming both where two files' metadata name other detectors (one that
    names none, of a job that wrote no event, is of any). A file without metadata (a collector killed before its
    end writes none) beside others cannot be checked: a warning on stderr names it (its histograms are still
    refused where their bins differ: by_run). A file without dqm/ beside files with it is skipped with a warning
    naming it (a collector killed, or whose write failed, mid-run: its events have no DQM there); a NoDQMError only
    where no file has dqm/. So is an empty file (0 bytes: a collector killed before it wrote its file; alone, the
    error of root_output.EmptyInputFile). A file given twice (under any name) is refused: its runs' parts would be
    summed twice."""
    seen: dict[str, str] = {}  # the file itself (realpath) -> the name it was first given under
    for path in paths:
        if (real := os.path.realpath(path)) in seen:
            raise ValueError(f"{path} is given twice (as {seen[real]}): its DQM would be summed twice")
        seen[real] = path
    from eclreco.modules.root_output import EmptyInputFile

    hists, detectors, unchecked, without, empty = [], {}, [], [], []
    for path in paths:
        try:
            got = read_histograms(path)
        except (NoDQMError, EmptyInputFile) as err:
            if len(paths) == 1:
                raise
            (empty if isinstance(err, EmptyInputFile) else without).append(path)
            continue
        hists += got
        if got and got[0]["detectors"]:
            detectors.setdefault(tuple(got[0]["detectors"]), path)
        elif got and got[0]["detectors"] is None:
            unchecked.append(path)
        # (a file whose metadata names no detector wrote no event: its DQM holds the rejections only)
    if len(detectors) > 1:
        (a, pa), (b, pb) = list(detectors.items())[:2]
        raise ValueError(f"{pb} is of the detector(s) {', '.join(b)} and {pa} of {', '.join(a)}: "
                         "the DQM of different detectors is not summed")
    if len(without) + len(empty) == len(paths):
        raise NoDQMError(f"{', '.join(paths)}: none has a dqm directory (jobs without ECLDQM, or not RootOutput files"
                         + (f"; {', '.join(empty)} empty" if empty else "") + ")")
    for path in empty:
        print(f"eclreco dqm: warning: {path} is empty (0 bytes), skipped: a farm collector killed before it wrote its "
              "file", file=sys.stderr)
    for path in without:
        print(f"eclreco dqm: warning: {path} has no dqm directory, skipped: its events have no DQM there (a job "
              "without ECLDQM, or a farm collector killed or whose write failed mid-run: the DQM of the runs open "
              "then is in no file)", file=sys.stderr)
    if len(paths) - len(without) - len(empty) > 1:
        known = next(iter(detectors), None)
        others = "the other files'" + (f" ({', '.join(known)})" if known else "")
        for path in unchecked:
            print(f"eclreco dqm: warning: {path} has no metadata (a collector killed before its end?): its "
                  f"detector could not be checked against {others}", file=sys.stderr)
    return hists


def draw(root_paths: list[str] | str, out_dir: str, parts: bool = False) -> list[str]:
    """PNG of every histogram in the files' dqm directory; returns the files written. Several files: the DQM of
    one detector (read_files), a run's parts in them summed as those of one file. A file of
    several runs holds one cycle of each histogram per run (titles end with the run), and a run written in
    several parts one cycle per part: one PNG per histogram and run, its parts summed (by_run; parts=True:
    one per part), named by run. The file is read before out_dir is made, and the PNGs take their names together
    at the end (paths.StagedOutputs): a file that cannot be read, or a failure while drawing, leaves
    out_dir as it was (no new empty folder, no mix of new and old plots). Then the PNGs that the last
    `eclreco dqm` into out_dir made (its MANIFEST) and this one did not make again are removed, unless
    changed since; other files stay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eclreco.paths import OutputsChangedError, StagedOutputs, file_sha256, output_folder, output_states
    from eclreco.strict_json import dumps

    paths = [root_paths] if isinstance(root_paths, str) else list(root_paths)
    root_path = ", ".join(paths)  # (the files named in an error)
    # the names it may write as they are before the reading, as every command takes them before its work: its end
    # replaces them only if still so (a plot of an earlier `eclreco dqm`), not a file put there meanwhile (another
    # dqm into out_dir, a user's). Its names come from the files, so every name it can write (PNGs, MANIFEST) in
    # out_dir is taken; one not there now is free (None).
    before = output_states(os.path.join(out_dir, name) for name in _listed(out_dir)
                           if name.endswith(".png") or name == MANIFEST)
    hists = read_files(paths)
    drawn_from = list(dict.fromkeys(h["file"] for h in hists))  # (a file without DQM beside others is skipped)
    try:
        hists = by_run(hists, parts)
    except ValueError as err:
        raise ValueError(f"{root_path}: {err}") from None
    outputs = [os.path.join(out_dir, name) for name in [*(h["png"] for h in hists), MANIFEST]]
    unchanged = {out: before.get(out) for out in outputs}
    written = []
    with output_folder(out_dir):
        with StagedOutputs() as staged:
            for h in hists:
                out = os.path.join(out_dir, h["png"])
                fig, ax = plt.subplots(figsize=(6, 4))
                try:
                    _plot(ax, h)
                    fig.tight_layout()
                    fig.savefig(staged.path(out), dpi=90)
                except ValueError as err:  # matplotlib's, e.g. a title that is no valid mathtext
                    raise ValueError(f"{h['file']}: cannot draw dqm/{h['name']};{h['cycle']}: {one_line(err)}") from None
                finally:
                    plt.close(fig)
                written.append(out)
            plots = {os.path.basename(out): file_sha256(staged.path(out)) for out in written}
            with open(staged.path(os.path.join(out_dir, MANIFEST)), "w") as f:
                drawn = ({"file": os.path.abspath(paths[0])} if len(paths) == 1 else
                         {"files": [os.path.abspath(p) for p in drawn_from]})
                f.write(dumps({**drawn, "plots": plots}, indent=1) + "\n")
            previous = _previous_plots(out_dir)
            try:
                staged.publish(unchanged, "dqm run")
            except OutputsChangedError as err:
                raise ValueError(f"-o {out_dir!r}: {err}") from None
        for name, sha in previous.items():
            stale = os.path.join(out_dir, name)
            if name not in plots and os.path.isfile(stale) and file_sha256(stale) == sha:
                os.unlink(stale)
    for (exp, run), cycles in _runs_in_parts(hists).items():
        print(f"eclreco dqm: exp {exp}, run {run} was written in {len(cycles)} DQM parts (cycles "
              f"{', '.join(map(str, cycles))}): " + ("drawn apart" if parts else "their sum drawn (--parts: apart)"),
              file=sys.stderr)
    return written


def _listed(folder: str) -> list[str]:
    """The names in `folder`; none where it is not a folder it can list (output_folder says why, after the reading)."""
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _runs_in_parts(hists: list[dict]) -> dict[tuple, list[str]]:
    """(exp, run) -> its cycles (by_run's `where`), of the runs of by_run's entries written in more than one part (by the first
    histogram of the run: each part is one cycle of every histogram)."""
    runs: dict[tuple, tuple] = {}
    for h in hists:
        if h["run"] is not None and runs.setdefault(h["run"], (h["name"], []))[0] == h["name"]:
            runs[h["run"]][1].extend(h["where"])
    return {key: cycles for key, (_, cycles) in runs.items() if len(cycles) > 1}


def _plot(ax, h: dict) -> None:
    """One histogram of read_histograms on `ax`: bars for labelled bins, else the bins as stairs and
    what the axis range does not show (under- and overflow) said."""
    counts, edges, flow = h["counts"], h["edges"], h["flow"]
    if h["labels"]:
        ax.bar(range(len(counts)), counts)
        ax.set_xticks(range(len(h["labels"])), h["labels"], rotation=45, ha="right", fontsize=7)
    else:
        ax.stairs(counts, edges, fill=True, alpha=0.6)
        if flow[0] or flow[-1]:
            ax.text(0.98, 0.95, f"underflow {flow[0]:g}, overflow {flow[-1]:g}", transform=ax.transAxes,
                    ha="right", va="top", fontsize=8)
    ax.set_title(h["title"])
    ax.set_xlabel(h["xlabel"])
    ax.set_ylabel("entries")


def _run(args) -> int:
    try:
        files = draw(args.files, args.output, parts=args.parts)
    except (OSError, ValueError) as err:  # a bad FILE or -o: one line, exit 2 as for any bad argument
        print(f"eclreco dqm: error: {err}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    ours = {os.path.basename(f) for f in files}
    others = sorted(n for n in os.listdir(args.output) if n.endswith(".png") and n not in ours)
    if others:  # made by hand, by an eclreco before the manifest, or changed since: not this file's plots
        print(f"eclreco dqm: note: {args.output} also holds {len(others)} PNG file(s) not drawn from {', '.join(args.files)}, "
              f"left as they are: {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}", file=sys.stderr)
    return 0


def add_dqm_parser(subparsers) -> None:
    p = subparsers.add_parser("dqm", help="draw the DQM histograms of a ROOT file as PNG")
    # a missing file or a directory: the parser's line naming FILE, in the words of hlt merge's and quarantine's
    p.add_argument("files", nargs="+", type=input_file("ROOT file"), metavar="FILE",
                   help="ROOT file(s) written by RootOutput; of several (the files of one farm run, a collector "
                        "replaced mid-run), the parts of a run in them are summed; they must be of one detector")
    p.add_argument("-o", "--output", default="dqm",
                   help=f"directory for the PNG files; the PNGs that an earlier `eclreco dqm` made there (its {MANIFEST}) "
                        "and this file has not are removed, other files stay")
    p.add_argument("--parts", action="store_true",
                   help="draw each DQM part of a run apart (NAME_expE_runR_partK.png); by default the parts of a run "
                        "(the farm's collector writes a run whose events came late in several) are summed into one plot")
    p.set_defaults(func=_run)
