"""The user-facing framework API: Module, Path, create_path, process, statistics."""
from __future__ import annotations

import functools
import importlib
import json
import numbers
import os
import pkgutil
import sys
import time
from typing import Any

import numpy as np

from eclreco import _core
from eclreco.paths import file_sha256

REQUIRED = object()  # default of a parameter that a steering file must set


def _infer_type(default: Any) -> str:
    # numpy's scalars too (np.True_, np.int64(5), np.float32(0.5)): np.bool_, numbers.Integral / Real
    if isinstance(default, (bool, np.bool_)):
        return "bool"
    if isinstance(default, numbers.Integral):
        return "int"
    if isinstance(default, numbers.Real):
        return "float"
    if isinstance(default, str):
        return "str"
    if isinstance(default, (list, tuple)):
        if not default:
            raise TypeError("cannot infer the element type of an empty list default; pass type='list[float]', "
                            "'list[int]' or 'list[str]'")
        kinds = {_infer_type(x) for x in default}
        for kinds_in, name in (({"int"}, "list[int]"), ({"str"}, "list[str]"), ({"int", "float"}, "list[float]")):
            if kinds <= kinds_in:
                return name
        raise TypeError(f"cannot infer a parameter type from {default!r} (mixed elements); pass type=")
    raise TypeError(f"cannot infer a parameter type from {default!r}; pass type=")


class Module(_core.Module):
    """Base class of Python modules.

    Subclasses call ``super().__init__()`` and declare their parameters with :meth:`add_param`;
    the framework calls ``initialize``, ``begin_run(exp, run)``, ``event(batch)``,
    ``end_run(exp, run)`` and ``terminate``. ``event`` receives a whole :class:`EventBatch`;
    its collections are read-only numpy views, so work on them with array operations and write a
    column by assigning a new array (``clusters["energy"] = clusters["energy"] * k``). A module that
    reads columns of a collection checks them with ``self.require_columns(collection, names)``: one the
    collection lacks ends the job at its first batch, with one message (the C++ modules' check).
    A module that reads a file at initialize defines ``provenance()`` returning a dict (its path and
    SHA-256) that the output file's metadata adds to its entry (eclreco.framework.job_provenance).
    """

    def __init__(self):
        super().__init__()
        doc = (type(self).__doc__ or "").strip().splitlines()
        self._set_identity(type(self).__name__, doc[0] if doc else "")

    def add_param(self, name: str, default: Any = REQUIRED, description: str = "", type: str | None = None):
        """Declare a parameter: name, default (or REQUIRED with an explicit type) and description."""
        if type is None:
            if default is REQUIRED:
                raise TypeError(f"{self.type}: required parameter '{name}' needs type=")
            try:
                type = _infer_type(default)
            except TypeError as err:  # whose parameter: the module's constructor may declare many
                raise TypeError(f"{self.type}: parameter '{name}': {err}") from None
        self.declare_param(name, type, None if default is REQUIRED else default, description)

    def param(self, name: str) -> Any:
        """The current value of a parameter."""
        return self.get_param(name)

    def makes(self) -> tuple[str, ...] | None:
        """The collections this module adds to its batches; None (the default): not said, it may add any.
        An output of a job without events writes what the modules before it make (RootOutput: the
        branches of a file of the same chain with events). A module that rewrites a collection made
        before it (filters its rows) does not make it: it requires it."""
        return None

    def requires(self) -> tuple[str, ...] | None:
        """The collections this module reads and cannot do without (a module that reads one only where
        the batch has it does not require it); None (the default): not said."""
        return None

    def __repr__(self):
        return f"<{self.type}>"


def _python_module_classes() -> dict[str, type]:
    """Python modules shipped in eclreco.modules (installed from the repository's modules/).

    A class's name is its module name in steering files: a name taken twice (two files of modules/, or
    a Python module named as a C++ one) is a ValueError naming both, not one of them taken silently
    (the other one never ran: the C++ module, or the file that pkgutil imported last, won)."""
    import eclreco.modules as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    cpp = dict(_core.cpp_modules())

    def where(cls):
        return f"{cls.__module__}.{cls.__qualname__} ({getattr(sys.modules.get(cls.__module__), '__file__', '?')})"

    found = {}
    stack = list(Module.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.startswith("eclreco.modules."):
            name = cls.__name__
            if name in cpp:
                raise ValueError(f"the Python module {where(cls)} has the name of the C++ module {name}: rename "
                                 f"the class (its name is the module's name in steering files)")
            if found.get(name, cls) is not cls:
                raise ValueError(f"two Python modules are named {name}: {where(found[name])} and {where(cls)}: "
                                 f"rename one (a class's name is the module's name in steering files)")
            found[name] = cls
    return found


def available_modules() -> dict[str, str]:
    """name -> one-line description of every module, C++ and Python."""
    out = dict(_core.cpp_modules())
    for name, cls in _python_module_classes().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        out.setdefault(name, doc[0] if doc else "")
    return dict(sorted(out.items()))


def create_module(name: str) -> _core.Module:
    """A new instance of the module registered under `name` (C++ or Python)."""
    classes = _python_module_classes()  # first: a Python module with a C++ module's name is an error
    if name in dict(_core.cpp_modules()):
        return _core.create_cpp_module(name)
    if name in classes:
        return classes[name]()
    raise ValueError(f"unknown module '{name}'; available: {', '.join(available_modules())}")


# The collections of raw events that _core.append_envelopes writes: what the Python raw sources make.
RAW = ("RawEnvelopes", "RawPayloadRef")


def collections_made(modules) -> set[str] | None:
    """The collections that `modules` add to a batch (their makes(), C++ and Python); None when one of
    them does not say."""
    made: set[str] = set()
    for m in modules:
        names = m.makes()
        if names is None:
            return None
        made.update(names)
    return made


def columns_made(modules, collection: str) -> dict[str, str] | None:
    """The columns of one value per row (name -> numpy dtype name) that `collection` has after `modules`,
    where they are known before the first batch: the collection is made by ECLClusterizer (its columns:
    _core.cluster_columns()) and every module after it is one of eclreco's own, which rewrite columns
    (ECLLeakageCorrection, ECLEnergyCorrection: energy) but add none. None otherwise: columns are not
    declared (Module.makes names collections), and a module of a steering file may add one."""
    maker = next((k for k in range(len(modules) - 1, -1, -1) if collection in (modules[k].makes() or ())), None)
    if maker is None or modules[maker].type != "ECLClusterizer" or isinstance(modules[maker], Module):
        return None
    for m in modules[maker + 1:]:
        if isinstance(m, Module) and not type(m).__module__.startswith("eclreco."):
            return None  # a user's module
    return dict(_core.cluster_columns())


def modules_before(module) -> list | None:
    """The modules before `module` in the path eclreco.process is running (None: not run by it)."""
    path = running_path()
    mine = next((i for i, m in enumerate(path.modules) if m is module), None) if path is not None else None
    return None if mine is None else path.modules[:mine]


def unknown_columns_error(modules, collection: str, names, what: str) -> str:
    """The error for `names` (what: the parameter or option that lists them) that `collection` will not have
    after `modules`, naming them and the valid ones; '' when all are there or its columns are not known
    before the first batch (columns_made)."""
    known = columns_made(modules, collection)
    unknown = [n for n in names if known is not None and n not in known]
    if not unknown:
        return ""
    return (f"{what}: {', '.join(repr(n) for n in unknown)} {'is not a column' if len(unknown) == 1 else 'are not columns'}"
            f" of {collection}; its columns of one value per cluster are {', '.join(known)}")


def per_event_sum(values, offsets) -> np.ndarray:
    """The sum of each event's rows of a column (event i owns rows offsets[i]:offsets[i+1]; booleans
    count), from cumulative sums at the offsets: no loop over events. int64 for integers and
    booleans, float64 for floats."""
    values = np.asarray(values)
    cum = np.zeros(values.size + 1, np.float64 if values.dtype.kind == "f" else np.int64)
    np.cumsum(values, out=cum[1:])
    return np.diff(cum[np.asarray(offsets)])


def per_event_value(batch, collection: str, column: str, missing) -> np.ndarray:
    """One value per event of an event-level collection of the batch (at most one row per event:
    ECLEventInformation): the event's row, `missing` for an event without one (ECLUnpacker writes none
    for an event it failed on, and the batch is put together again from its events). The column's dtype,
    or what also holds `missing` (float64 for NaN and an integer column). An event with several rows is a
    ValueError naming the collection: RootOutput, ECLDQM and the CNN's event features read it alike."""
    c = batch[collection]
    try:
        rows = _core.event_rows(c.offsets)  # one C++ pass, as _core.inference_inputs reads the CNN's event features
    except ValueError as err:
        raise ValueError(f"{collection}.{column} has one row per event, but {err}") from None
    values = np.asarray(c[column])
    if len(values) == len(rows):  # a row for every event (at most one each, as many as events)
        return values
    out = np.full(len(rows), missing, np.result_type(values, missing))
    out[rows >= 0] = values
    return out


class Path:
    """An ordered list of modules: one input module first, then processing and output modules."""

    def __init__(self):
        self._cpp = _core.Path()
        self._modules: list[_core.Module] = []  # keeps Python module objects alive

    def add_module(self, module: str | _core.Module, **params) -> _core.Module:
        """Add a module by name (with parameters) or an instance; returns the module."""
        if isinstance(module, str):
            module = create_module(module)
        elif isinstance(module, type) and issubclass(module, _core.Module):
            raise TypeError(f"add_module takes a module name or a Module instance, not the class {module.__name__}: "
                            f"add_module({module.__name__}())")
        elif not isinstance(module, _core.Module):
            raise TypeError(f"add_module takes a module name or a Module, not {type(module).__name__}")
        elif any(m is module for m in self._modules):  # its event() would run twice on each batch
            raise ValueError(f"add_module: this {module.type} instance is already in the path (create another one)")
        for flag in ("is_source", "ordered", "drains_at_stop", "writes_events"):
            # the processor calls them; a class attribute `ordered = True` would fail there, unnamed
            if not callable(getattr(module, flag)):
                raise TypeError(f"{module.type}: {flag} must be a method returning bool "
                                f"(def {flag}(self): return True), not {type(getattr(module, flag)).__name__}")
        for key, value in params.items():
            module.set_param(key, value)
        module.check_required()
        self._cpp.add(module)
        self._modules.append(module)
        return module

    @property
    def modules(self) -> list[_core.Module]:
        return list(self._modules)

    def __repr__(self):
        return "[" + " -> ".join(m.type for m in self._modules) + "]"


def create_path() -> Path:
    return Path()


_running_path: Path | None = None


def running_path() -> Path | None:
    """The path eclreco.process is running (None outside it)."""
    return _running_path


def package_data_digests() -> dict:
    """SHA-256 of the package's data files (eclreco/data: the classical leakage tables that
    ECLLeakageCorrection loads by default), by name: the version number alone does not say which
    tables a build shipped (they were rebuilt within one version). Hashed at each call, as installed
    now: ECLLeakageCorrection loads them at each job, so a process that outlives a reinstall (a farm
    worker, a notebook) must not record its first job's digests (~19 kB: ~50 us per output file)."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    digests = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        digests["data/" + name] = file_sha256(os.path.join(folder, name))
    return digests


@functools.lru_cache(maxsize=1)
def build_info() -> dict:
    """The git commit the installed package was built from (CMakeLists.txt writes build_info.json at
    build time): {"git_commit": hex or "unknown" (not built from a git checkout), "git_dirty": True when
    tracked files differed from that commit, None when unknown}."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "build_info.json")) as f:
            info = json.load(f)
        return {"git_commit": str(info["git_commit"]), "git_dirty": info["git_dirty"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {"git_commit": "unknown", "git_dirty": None}


def version_text() -> str:
    """`eclreco --version`: the version and the commit it was built from."""
    import eclreco

    b = build_info()
    # "-dirty" as `git describe --dirty` marks it: tracked files differed from the commit
    return f"eclreco {eclreco.__version__} (commit {b['git_commit']}{'-dirty' if b['git_dirty'] else ''})"


def job_provenance(path: Path | None) -> dict:
    """What made an output file, for its metadata (RootOutput): the eclreco version, the command
    line, the host, the digests of the package's data files (package_data_digests), and each module
    of the path with every parameter's value, plus what a module's provenance() adds
    (ECLEnergyCorrection: the model files it loaded and their SHA-256; a C++ module's from
    fw::Module::provenance, ECLUnpacker: its conditions file and the SHA-256 of the bytes it parsed;
    ECLLeakageCorrection: the tables it loaded, the same way, `table` or the package's `table_<detector>`;
    RawFileInput: its raw file's `input`, path, size, mtime and the SHA-256 of its first and last 64 KiB,
    fw::large_file_identity)."""
    import socket

    import eclreco

    modules = []
    for m in (path.modules if path is not None else []):
        entry = {"module": m.type, "params": {p["name"]: p["value"] for p in m.param_list()}}
        extra = getattr(m, "provenance", None)
        if callable(extra):
            entry.update(extra())
        modules.append(entry)
    return {"eclreco_version": eclreco.__version__, "build": build_info(), "command": list(sys.argv),
            "host": socket.gethostname(), "package_data": package_data_digests(), "path": modules}


class Statistics:
    """Counters and per-module timing of the last process() call (basf2's statistics)."""

    def __init__(self):
        self._processor = None
        self._path = None
        self._unread_before = 0
        self._outputs_before: dict[str, tuple[int, int]] = {}

    def _attach(self, processor, path=None):
        self._processor = processor
        self._path = path
        self._unread_before = self._unread_total()
        self._outputs_before = self._output_counts()

    def _unread_total(self) -> int:
        """The `unread_at_end` counters of the path's sources, summed: messages still queued in an input that
        goes with its source (ZMQInput's socket) when a run ends, counted at its terminate (cumulative per
        module, as its metrics are)."""
        total = 0
        for m in self._path.modules if self._path is not None else []:
            try:
                if m.is_source():
                    total += int(m.counters().get("unread_at_end", 0))
            except Exception:  # noqa: BLE001 - a module's counters must never break the job's summary
                pass
        return total

    def _output_counts(self) -> dict[str, tuple[int, int]]:
        """(events written, events lost) of the path's outputs that count their losses (RootOutput's
        `events_written`, `events_lost`: taken, then in no file when its file failed), by module name as in
        the module table (RootOutput#1 for a second one; cumulative per module, as its metrics are)."""
        out = {}
        for name, m in self._named_modules():
            try:
                c = m.counters() if m.writes_events() else {}
                if "events_lost" in c:
                    out[name] = (int(c.get("events_written", 0)), int(c["events_lost"]))
            except Exception:  # noqa: BLE001 - a module's counters must never break the job's summary
                pass
        return out

    def _output_names(self) -> list[str]:
        """The path's outputs (writes_events), by module name as in the module table (RootOutput#1)."""
        out = []
        for name, m in self._named_modules():
            try:
                if m.writes_events():
                    out.append(name)
            except Exception:  # noqa: BLE001 - a module's flags must never break the job's summary
                pass
        return out

    def _named_modules(self):
        """(name, module) of the path's modules, named as in the module table: RootOutput#1 for a second one."""
        seen: dict[str, int] = {}
        for m in self._path.modules if self._path is not None else []:
            k = seen[m.type] = seen.get(m.type, -1) + 1
            yield (f"{m.type}#{k}" if k else m.type), m

    @property
    def state(self):
        return None if self._processor is None else self._processor.state

    def counters(self) -> dict:
        """The live event counters of the current (or last) run; empty before the first run."""
        s = self.state
        if s is None:
            return {}
        return {"received": s.received, "processed": s.processed, "rejected": s.rejected,
                "discarded": s.discarded, "errors": s.errors, "batches": s.batches}

    def summary(self) -> dict:
        s = self.state
        if s is None:
            return {}
        wall = s.wall_seconds if not s.running else time.time() - s.start_time
        outputs = {name: {"written": w - self._outputs_before.get(name, (0, 0))[0],
                          "lost": lost - self._outputs_before.get(name, (0, 0))[1]}
                   for name, (w, lost) in self._output_counts().items()}
        modules = s.modules()
        module_errors = {m["name"]: m["errors"] for m in modules}
        for name, o in outputs.items():
            o["errors"] = module_errors.get(name, 0)
        return {
            "received": s.received,
            "processed": s.processed,
            "rejected": s.rejected,
            # received but neither processed nor rejected: in flight, or the run stopped on a fatal
            # error (a module's begin_run, an output that cannot write) before they were done
            "not_processed": (s.received - s.processed - s.rejected) if not s.running else 0,
            "rejected_by_reason": s.rejected_by_reason(),
            # processed, then not kept by an event filter (batch.discard): part of processed
            "discarded": s.discarded,
            "discarded_by_reason": s.discarded_by_reason(),
            "errors": s.errors,
            # of those, the module errors that the outputs gave (an output whose write failed raises on each
            # event it is given after: not an error of the event, nor of the modules before it)
            "errors_in_outputs": sum(module_errors.get(name, 0) for name in self._output_names()),
            # events in each output, and those it had taken when its file failed: processed, in no file
            "outputs": outputs,
            "lost_with_output": sum(o["lost"] for o in outputs.values()),
            # never read: still queued at the input when the run ended (its stop timeout, -n, the idle timeout)
            "unread_at_end": self._unread_total() - self._unread_before,
            # the error that ended the job before the end of its input (None: none did)
            "fatal_error": s.fatal_error or None,
            "batches": s.batches,
            "wall_seconds": wall,
            "loop_seconds": s.loop_seconds if not s.running else wall,
            "events_per_second": s.received / wall if wall > 0 else 0.0,
            "modules": modules,
        }

    def __str__(self):
        if self._processor is None:
            return "(no process() call yet)"
        s = self.summary()
        lines = [self._processor.statistics_table().rstrip()]
        lines.append(
            f"events received {s['received']}, processed {s['processed']}, rejected {s['rejected']}, "
            f"with module errors {s['errors']}; {s['wall_seconds']:.2f} s, "
            f"{s['events_per_second']:,.0f} events/s"
        )
        if s["errors_in_outputs"]:
            lines.append(f"  module errors in the outputs: {s['errors_in_outputs']} (events an output raised on, e.g. after its "
                         f"write failed; {s['errors'] - s['errors_in_outputs']} at most are errors of the modules before)")
        if s["not_processed"]:
            lines.append(f"  not processed: {s['not_processed']} (the run stopped on an error before they were done)")
        for name, o in s["outputs"].items():
            if o["lost"]:
                lines.append(f"  lost with the failed output {name}: {o['lost']} processed events that it had taken "
                             f"are in no file ({o['written']} events are in its file)")
        if s["unread_at_end"]:
            lines.append(f"  unread at end: {s['unread_at_end']} messages still queued at the input when the run "
                         "ended: never read, not in the counts above")
        for reason, n in sorted(s["rejected_by_reason"].items()):
            lines.append(f"  rejected [{reason}]: {n}")
        if s["discarded"]:
            kept = s["processed"] - s["discarded"]
            lines.append(f"  kept {kept} of the processed, discarded {s['discarded']} by event filters:")
            for reason, n in sorted(s["discarded_by_reason"].items()):
                lines.append(f"  discarded [{reason}]: {n}")
        return "\n".join(lines)


statistics = Statistics()


def job_failure(counts: dict) -> str:
    """Why a finished job made nothing of its input ('' when it did), from the counters of
    Statistics.summary() (or the HLT collector's, summed): every event rejected (not raw data of
    this format, no conditions for its runs), or every event the filters kept failed in a module (a
    misconfigured chain, not bad events). The rule of exit code 1 in steering/reco.py and `hlt run`."""
    processed, discarded, errors = (int(counts.get(k, 0) or 0) for k in ("processed", "discarded", "errors"))
    rejected = counts.get("rejected_by_reason") or {}
    if counts.get("rejected") and not processed:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(rejected.items(), key=lambda kv: -kv[1]))
        return f"every event was rejected ({reasons})"
    # discarded events never reach the modules after the filter, so they cannot fail there
    if errors and errors >= processed - discarded:
        return "every event failed in a module" + (" (of those the event filter kept)" if discarded else "")
    return ""


# Module parameters that name a file the module reads or (over)writes: module type -> parameter.
FILE_INPUTS = {"RawFileInput": "filename", "ECLUnpacker": "conditions", "ECLLeakageCorrection": "table",
               "ECLEnergyCorrection": "model"}
FILE_OUTPUTS = {"RootOutput": "filename", "RejectedOutput": "filename"}


def _check_files(path: Path) -> None:
    """An output over an input of the same path, or two outputs on one file, is refused before
    anything is opened: the output would truncate the raw data being read (a crash of the
    memory-mapped reader, or the raw file replaced by ROOT bytes), replace a model, conditions or
    table read at initialize by ROOT bytes (a trained network lost, the job exiting 0), or both
    writers corrupt it."""
    seen: dict[object, tuple[str, str]] = {}  # file -> (module, "reads" | "writes")
    for m in path.modules:
        role = "reads" if m.type in FILE_INPUTS else "writes" if m.type in FILE_OUTPUTS else None
        name = m.get_param((FILE_INPUTS if role == "reads" else FILE_OUTPUTS)[m.type]) if role else ""
        if not name:
            continue
        try:  # an existing file by its inode: a hard link is another name of the same file
            st = os.stat(name)
            key: object = (st.st_dev, st.st_ino)
        except OSError:  # not there yet (an output): by its real path
            key = os.path.realpath(name)
        if key in seen and "writes" in (role, seen[key][1]):
            raise ValueError(f"{m.type} {role} {name!r}, which {seen[key][0]} {seen[key][1]} in the same path: use another file")
        if key not in seen or role == "writes":
            seen[key] = (m.type, role)


def process(path: Path, max_events: int = 0, threads: int = 1, batch_size: int = 256,
            install_signal_handlers: bool = True) -> Statistics:
    """Run `path`: the event loop runs in C++ with the GIL released.

    threads > 1 processes batches concurrently; output modules still see them in input order.
    SIGINT/SIGTERM end the run cleanly (outputs are closed); a second signal kills.
    """
    try:  # the binding's checks (a bool is no count), refused before the statistics of the previous job are replaced
        _core.check_process_options(threads=threads, batch_size=batch_size, max_events=max_events,
                                    install_signal_handlers=install_signal_handlers)
    except TypeError as err:
        raise TypeError(f"process(): {err}") from None
    except ValueError as err:
        raise ValueError(f"process(): {err}") from None
    _check_files(path)
    from eclreco.dqm import registry

    registry.clear()  # the DQM of this job is what its modules book; an earlier job's is not written again
    processor = _core.Processor()
    statistics._attach(processor, path)
    global _running_path
    _running_path = path
    try:
        processor.process(path._cpp, max_events=max_events, threads=threads, batch_size=batch_size,
                          install_signal_handlers=install_signal_handlers)
    finally:
        _running_path = None
    if sys.stdout:
        sys.stdout.flush()
    return statistics
