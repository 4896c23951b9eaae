"""`eclreco hlt merge FILES... -o OUT`: the events of a farm's files, each (exp, run, evt) of a detector once.

A collector killed (SIGKILL) in a run may have written events whose SAVED never reached the
distributor; its replacement writes them again in its own file (NAME.2.root, ...): every event is in
the union of the files, at least once (docs/deployment.md, "Loss semantics"). This writes one file
with each event once: the first copy in the order of FILES (the killed collector's file first), the
others dropped and counted per file. An empty file (0 bytes: a collector killed before it wrote its file)
beside others holds no event and is said to be empty. A repeat within one file (a producer's, further apart than the
collector's --dedup-window) is dropped too: the spec makes (exp, run, evt) unique in a stream. Events of
two detectors with one (exp, run, evt) are two events (the files of two streams), never copies of one: a
copy has its event's detector; both are written.

OUT has the TTree `events` with the inputs' branches, and a `metadata` string (JSON) naming the detectors of the
events written (`detectors`, sorted names, as RootOutput writes it), each input (the name typed, and its absolute
path, size and mtime), its events, those written and dropped, and the input's own metadata. The inputs' `dqm/` histograms are
not merged: they count the copies too (read them in the input files).

Files written before RootOutput's per-event `detector` branch merge with newer ones: such a file's branch is
filled from its metadata where that names one detector (recorded in its entry's `note`); a file of events
whose detector its metadata does not name (both detectors, no metadata) is refused, saying so.
"""
from __future__ import annotations

import json
import os

import numpy as np

from eclreco.paths import OutputsChangedError, StagedOutputs, output_file_error, output_states

DETECTOR = "detector"  # RootOutput's per-event branch, absent from the files written before it
CLUSTER_PREFIX = "cluster_"  # RootOutput's cluster branches, with the counter n + "cluster"
KEY_BRANCHES = ("exp", "run", "evt")
STEP_EVENTS = 100_000  # events read and written at a time: memory bounded by a step, not by a file
# 21 bytes per event of every file, in memory; detector 0 in files all without the branch (as before it)
_KEY = np.dtype([("exp", "<u8"), ("run", "<u8"), ("evt", "<u4"), ("detector", "u1")])


def _open(name: str, tree: str):
    """The uproot file and its tree (None: no tree, a collector killed before its first write); (None, None) for an
    empty file (0 bytes: a collector killed before it wrote its header; root_output.EmptyInputFile)."""
    from eclreco.modules.root_output import EmptyInputFile, open_input_file, reading_input_file

    try:
        f = open_input_file(name)
    except EmptyInputFile:
        return None, None
    try:
        with reading_input_file(name):  # a damaged tree header
            return f, (f[tree] if tree in f else None)
    except ValueError:
        f.close()
        raise


def _chunks(name: str, t, branches: list[str]):
    """The branches of tree `t` of file `name`, STEP_EVENTS events at a time (awkward arrays); a basket that
    cannot be read (cut short, damaged) is an error naming the file (root_output.reading_input_file)."""
    from eclreco.modules.root_output import reading_input_file

    chunks = t.iterate(branches, step_size=STEP_EVENTS, library="ak")
    while True:
        with reading_input_file(name):
            chunk = next(chunks, None)
        if chunk is None:
            return
        yield chunk


def _layout(t) -> dict:
    """Branch -> its type name, the counter excluded: what two files must share to be merged."""
    return {k: v for k, v in t.typenames().items() if k != "n" + CLUSTER_PREFIX[:-1]}


def _detector_of(name: str, f, t) -> int:
    """The detector code of every event of a file without the `detector` branch, from its metadata; a
    ValueError saying why where the metadata does not name one detector."""
    from eclreco.modules.root_output import metadata_detectors, reading_input_file
    from eclreco.rawdata import DETECTORS

    with reading_input_file(name):
        names = metadata_detectors(f)
    old = (f"{name}: its {t.num_entries} events have no {DETECTOR!r} branch (a file written before RootOutput "
           f"had it) and the other files' do")
    if not isinstance(names, list):
        raise ValueError(f"{old}, but it has no metadata naming its detector (a collector killed before its "
                         f"end): its events cannot be given one; merge it with files without the branch")
    if len(names) != 1 or names[0] not in DETECTORS:
        raise ValueError(f"{old}, but its metadata names the detectors {names} and not one of "
                         f"{', '.join(DETECTORS)}: which event is of which cannot be told")
    return DETECTORS[names[0]]


def _identity(name: str) -> dict:
    """Which file an input was, beyond the name typed (relative, reused by the next run): {"path": absolute,
    normalised, "size": bytes, "mtime_ns", "mtime_utc": ISO-8601}, numbers as decimal strings: the shape of
    RawFileInput's `input` (fw::large_file_identity) without its head/tail digest. Not hashed: farm files are GBs."""
    import time

    st = os.stat(name)
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(st.st_mtime_ns // 1_000_000_000))
    return {"path": os.path.abspath(name), "size": str(st.st_size), "mtime_ns": str(st.st_mtime_ns),
            "mtime_utc": f"{when}.{st.st_mtime_ns % 1_000_000_000:09d}Z"}


def first_copies(keys: list[np.ndarray]) -> list[np.ndarray]:
    """keep masks, one per file: True for the first event of each (exp, run, evt, detector), in file order."""
    allk = np.concatenate(keys) if keys else np.zeros(0, _KEY)
    keep = np.zeros(len(allk), dtype=bool)
    if len(allk):
        _, first = np.unique(allk, return_index=True)  # the index of each key's first occurrence
        keep[first] = True
    bounds = np.cumsum([0] + [len(k) for k in keys])
    return [keep[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def merge(files: list[str], output: str, tree: str = "events") -> dict:
    """Writes the events of `files` to `output`, each (exp, run, evt) of a detector once; the report (also the
    output's `metadata`)."""
    import awkward as ak
    import uproot

    from eclreco import __version__
    from eclreco.modules.root_output import cluster_array, make_events_tree, read_metadata, reading_input_file
    from eclreco.rawdata import DETECTOR_NAMES

    if os.path.lexists(output):
        raise ValueError(f"-o {output!r} exists: merge never overwrites a file (choose another name)")
    if why := output_file_error(output, "-o"):
        raise ValueError(why)
    target = os.path.realpath(output)
    free = output_states([target])  # (nothing there): its end takes the name only if still so
    if len(set(map(os.path.realpath, files))) != len(files):
        raise ValueError("a file is named twice: each of its events would be dropped as its own duplicate")
    from eclreco.modules.root_output import open_input_file

    opened, identities, keys, layout, first_with_tree = [], [], [], None, None
    try:
        for name in files:
            opened.append(_open(name, tree))  # (a name that is no ROOT file, or none: its one-line error)
            identities.append(_identity(name))
        if all(f is None for f, _ in opened):
            open_input_file(files[0])  # every file empty: the first one's error (a file alone is refused)
        # the layout of the first file with the detector branch (else of the first with a tree): an older
        # file lacks only that branch, and gets it
        for name, (f, t) in zip(files, opened):
            if t is not None and (layout is None or (DETECTOR in _layout(t) and DETECTOR not in layout)):
                layout, first_with_tree = _layout(t), name
        if layout is None:
            raise ValueError(f"none of the files has a TTree {tree!r}")
        filled = {}  # file index -> the detector code its events get (a file without the branch)
        for i, (name, (f, t)) in enumerate(zip(files, opened)):
            if t is None:
                keys.append(np.zeros(0, _KEY))
                continue
            mine = _layout(t)
            lacks_detector = DETECTOR in layout and DETECTOR not in mine
            if lacks_detector:
                mine[DETECTOR] = layout[DETECTOR]
            if mine != layout:
                diff = sorted(set(mine.items()) ^ set(layout.items()))
                raise ValueError(f"{name}: its {tree!r} branches differ from those of {first_with_tree} "
                                 f"({', '.join(f'{b} {ty}' for b, ty in diff)}): not files of one farm")
            if lacks_detector and t.num_entries:
                filled[i] = _detector_of(name, f, t)
            k = np.zeros(t.num_entries, _KEY)
            with reading_input_file(name):  # a basket cut short or damaged: the file named, on one line
                for b in KEY_BRANCHES:
                    k[b] = t[b].array(library="np")
                if DETECTOR in t.keys():
                    k[DETECTOR] = t[DETECTOR].array(library="np")
            if i in filled:
                k[DETECTOR] = filled[i]
            keys.append(k)
        keeps = first_copies(keys)
        report = {"merged_by": "eclreco hlt merge", "eclreco_version": __version__, "tree": tree, "detectors": [],
                  "inputs": [], "events_written": 0, "duplicates_dropped": 0}
        written = set()  # the detector codes of the events written (None: one of an input that does not say)
        event_branches = [b for b in layout if not b.startswith(CLUSTER_PREFIX)]
        cluster_branches = [b for b in layout if b.startswith(CLUSTER_PREFIX)]
        with StagedOutputs() as staged:
            out = uproot.recreate(staged.path(target))
            made = False
            for i, (name, (f, t), keep) in enumerate(zip(files, opened, keeps)):
                with reading_input_file(name):
                    meta = None if f is None else read_metadata(f)
                entry = {"file": name, **identities[i], "events": 0 if t is None else int(t.num_entries),
                         "written": int(keep.sum()), "dropped": int((~keep).sum()), "metadata": meta}
                if f is None:
                    entry["note"] = "empty: 0 bytes, a collector killed before it wrote its file"
                elif t is None:
                    entry["note"] = f"no TTree {tree!r} (a collector killed before its first write)"
                elif i in filled:
                    entry["note"] = (f"no {DETECTOR!r} branch (written before it): {DETECTOR} "
                                     f"{DETECTOR_NAMES[filled[i]]} for its events, from its metadata")
                report["inputs"].append(entry)
                report["events_written"] += entry["written"]
                if entry["written"]:
                    with reading_input_file(name):
                        written.update(_written_detectors(f, t, keep, filled.get(i)))
                report["duplicates_dropped"] += entry["dropped"]
                start = 0
                read = [] if t is None else [b for b in event_branches + cluster_branches if b in t.keys()]
                for chunk in ([] if t is None else _chunks(name, t, read)):
                    n = len(chunk)
                    sel = keep[start:start + n]
                    start += n
                    if not sel.any() and made:
                        continue
                    chunk = chunk[sel]
                    data = {b: np.full(len(chunk), filled[i], np.uint8) if i in filled and b == DETECTOR
                            else ak.to_numpy(chunk[b]) for b in event_branches}
                    if cluster_branches:
                        counts = ak.to_numpy(ak.num(chunk[cluster_branches[0]]))
                        offsets = np.zeros(len(counts) + 1, np.int64)
                        np.cumsum(counts, out=offsets[1:])
                        data["cluster"] = cluster_array(offsets, {b[len(CLUSTER_PREFIX):]: ak.to_numpy(ak.flatten(chunk[b]))
                                                                  for b in cluster_branches})
                    if not made:
                        make_events_tree(out, tree, {k: (v.dtype if isinstance(v, np.ndarray) else v.type)
                                                     for k, v in data.items()})
                        made = True
                    out[tree].extend(data)
            if not made:  # trees that are all empty: no file is written
                raise ValueError(f"the files hold no events in their TTree {tree!r}: nothing to merge")
            report["detectors"] = None if None in written else sorted(DETECTOR_NAMES.get(c, str(c)) for c in written)
            out["metadata"] = json.dumps(report, default=str)
            out.close()
            try:  # not over a file made under the name while the inputs were read (another merge's)
                staged.publish(free, "merge")
            except OutputsChangedError as err:
                raise ValueError(f"-o {output!r}: {err}") from None
    finally:
        for f, _ in opened:
            if f is not None:
                f.close()
    return report


def _written_detectors(f, t, keep, filled) -> set:
    """The detector codes of an input's events that are written (`keep`): from its `detector` branch, the code its
    events were given (`filled`), or, in a merge of files all without the branch, its metadata's `detectors` (a
    set with None where it names none: a collector killed before its end)."""
    from eclreco.modules.root_output import metadata_detectors
    from eclreco.rawdata import DETECTORS

    if DETECTOR in t.keys():
        return set(np.unique(t[DETECTOR].array(library="np")[keep]).tolist())
    if filled is not None:
        return {filled}
    names = metadata_detectors(f)
    if not isinstance(names, list):
        return {None}
    return {DETECTORS.get(n, n) for n in names}


def main(args) -> int:
    report = merge(args.files, args.output, args.tree)
    detectors = report["detectors"]
    print(f"[hlt merge] {report['events_written']} events written to {args.output} from {len(args.files)} file(s), "
          f"detector{'s' if detectors is None or len(detectors) != 1 else ''} "
          f"{', '.join(detectors) if detectors is not None else 'unknown (an input without the branch names none)'}; "
          f"{report['duplicates_dropped']} duplicate(s) dropped (an (exp, run, evt) already taken)", flush=True)
    for entry in report["inputs"]:
        print(f"  {entry['file']}: {entry['events']} events, {entry['written']} written, {entry['dropped']} dropped"
              + (f" ({entry['note']})" if "note" in entry else ""), flush=True)
    return 0
