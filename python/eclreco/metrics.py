"""Prometheus metrics of an eclreco process (steering job or HLT role).

:func:`serve_process_metrics` starts an HTTP exporter (a daemon thread) whose custom collector
reads the live C++ counters of the running process (``eclreco.statistics.state``) and the
``counters()`` of the path's modules ONLY when Prometheus scrapes: the event loop makes no
Python call per event for monitoring.

Metric names follow the Prometheus conventions (base units, ``_total`` for counters)::

    eclreco_process_info{role, version}                 1
    eclreco_events_received_total                       events read by the input module
    eclreco_events_processed_total                      events through the whole path
    eclreco_events_rejected_total{reason}               malformed input, by reason
    eclreco_events_discarded_total{reason}              processed, not kept by an event filter
    eclreco_events_module_errors_total                  events flagged by a failing module
    eclreco_batches_total                               batches through the whole path
    eclreco_events_in_flight                            received, not yet through the path
    eclreco_batches_in_flight
    eclreco_events_per_batch                            histogram (1, 2, 4, ... 1024)
    eclreco_module_batch_seconds{module}                histogram of module time per batch (a source's
                                                        calls that bring no event, idle polls, are not batches)
    eclreco_module_events_total{module}
    eclreco_module_errors_total{module}                 events a module raised on (summary()'s per-module
                                                        errors; eclreco_events_module_errors_total counts an
                                                        event once, whatever the modules that failed on it)
    eclreco_input_messages_received_total               ZeroMQ inputs
    eclreco_input_bytes_received_total
    eclreco_input_disconnects_total                     closes and refused (over refuse_message_bytes) messages
    eclreco_input_unread_at_end_total                   queued at the end of a run, not processed
    eclreco_input_lost_bytes_at_disconnect_total        ipc:// bytes libzmq dropped unread with a closed connection
    eclreco_input_queue_depth                           messages waiting in the input (a module's
                                                        counter `queue_depth`; the HLT distributor's own)
    eclreco_cnn_inference_seconds_total                 CNN energy correction, if present
    eclreco_cnn_clusters_corrected_total
    eclreco_module_value{module, name}                  every other module counter

HLT roles add their own families through ``extra`` (a callable returning metric families),
e.g. the distributor's workers alive / restarted, drops and latency.
"""
from __future__ import annotations

import os
import re
import threading
import time
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

import eclreco
from eclreco import _core

EVENTS_PER_BATCH_BUCKETS = [float(1 << k) for k in range(11)]  # 1 .. 1024, then +Inf

# Module counter name (as returned by Module.counters()) -> (metric, type, help, module type or
# None for any module). Matched by substring so that e.g. "cnn_inference_seconds" and
# "inference_seconds" both land. The CNN's two only from ECLEnergyCorrection: ECLLeakageCorrection
# has a "clusters_corrected" as well (every cluster it corrects classically), which would be added
# to the CNN's rate; it goes to eclreco_module_value.
_KNOWN_COUNTERS = [
    ("inference_seconds", "eclreco_cnn_inference_seconds", "counter", "Seconds spent in CNN inference",
     "ECLEnergyCorrection"),
    ("clusters_corrected", "eclreco_cnn_clusters_corrected", "counter", "Clusters corrected by the CNN",
     "ECLEnergyCorrection"),
    ("bytes_received", "eclreco_input_bytes_received", "counter", "Bytes received by the input module", None),
    ("messages_received", "eclreco_input_messages_received", "counter", "Messages received by the input", None),
    ("disconnects", "eclreco_input_disconnects", "counter",
     "Peer connections dropped at the input (a sender closing, or a message over refuse_message_bytes)", None),
    ("unread_at_end", "eclreco_input_unread_at_end", "counter",
     "Messages still queued at the input when a run ended (stop timeout, or after the idle timeout): not processed",
     None),
    ("lost_bytes_at_disconnect", "eclreco_input_lost_bytes_at_disconnect", "counter",
     "Bytes of events lost unread with an ipc:// connection its sender closed while the input's queue was full "
     "(libzmq drops them; docs/deployment.md)", None),
    ("queue_depth", "eclreco_input_queue_depth", "gauge", "Messages waiting in the input module", None),
]


def _hist_buckets(bounds: Iterable[float], counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (last = +Inf) -> cumulative Prometheus buckets."""
    out, total = [], 0
    bounds = list(bounds)
    for le, c in zip(bounds + [float("inf")], counts):
        total += int(c)
        out.append(("+Inf" if le == float("inf") else repr(float(le)), total))
    return out


def _add_counts(acc: dict, counts: dict) -> None:
    """Adds per-reason counts into `acc`."""
    for k, v in counts.items():
        acc[k] = acc.get(k, 0) + v


def _by_reason(totals, state, kind: str, help_: str):
    """(counts by reason of earlier runs plus the live one, the counter family eclreco_events_<kind>)
    for kind "rejected" or "discarded"."""
    counts = dict(getattr(totals, kind))
    if state is not None:
        _add_counts(counts, getattr(state, f"{kind}_by_reason")())
    family = CounterMetricFamily(f"eclreco_events_{kind}", help_, labels=["reason"])
    for reason, n in sorted(counts.items()):
        family.add_metric([reason], n)
    return counts, family


def _add_module_stats(acc: dict, modules: list) -> None:
    """Adds the per-module statistics of one run (ProcessState.modules()) to `acc`, keyed by
    position and name (names are unique in a path, RootOutput#1; the position orders them)."""
    for i, m in enumerate(modules):
        a = acc.setdefault(f"{i}:{m['name']}", {"name": m["name"], "calls": 0, "events": 0, "seconds": 0.0,
                                                "cpu_seconds": 0.0, "errors": 0,
                                                "hist": [0] * len(m["batch_seconds_hist"])})
        for k in ("calls", "events", "seconds", "cpu_seconds", "errors"):
            a[k] += m[k]
        a["hist"] = [x + y for x, y in zip(a["hist"], m["batch_seconds_hist"])]


class _Totals:
    """Counters of earlier process() calls of this process (HLT roles run one per run), so that
    the exported counters stay monotonic across runs."""

    def __init__(self):
        self.received = self.processed = self.errors = self.batches = 0
        self.rejected: dict[str, int] = {}
        self.discarded: dict[str, int] = {}
        self.per_batch = [0] * 12
        self.modules: dict[str, dict] = {}
        self.counters: dict[tuple[str, str], float] = {}

    def add_state(self, s, modules):
        self.received += s.received
        self.processed += s.processed
        self.errors += s.errors
        self.batches += s.batches
        _add_counts(self.rejected, s.rejected_by_reason())
        _add_counts(self.discarded, s.discarded_by_reason())
        self.per_batch = [a + b for a, b in zip(self.per_batch, s.events_per_batch_hist())]
        _add_module_stats(self.modules, s.modules())


class ProcessMetricsCollector(Collector):
    """Reads the live counters at scrape time."""

    def __init__(self, role: str, path=None, extra: Callable[[], Iterable] | None = None, framework: bool = True):
        self.role = role
        self.framework = framework
        self.path = path
        self.extra = extra
        self.totals = _Totals()
        self._lock = threading.Condition()  # notified when a scrape begins (MetricsExporter.wait_for_scrape)
        self.scrapes = 0
        self._scrape_thread: threading.Thread | None = None  # the server's thread of the latest scrape
        self._checkpointed_state = None
        # A process whose event loop also waits between its runs (the HLT worker starts the next
        # one at once) says here whether it is in a run: eclreco_process_running is 0 otherwise.
        self.in_run: Callable[[], bool] | None = None

    def checkpoint(self):
        """Fold the counters of the process() call that just ended into the running totals."""
        with self._lock:
            s = eclreco.statistics.state
            if s is None or s is self._checkpointed_state:
                return
            self.totals.add_state(s, self.path)
            self._checkpointed_state = s

    def _live_state(self):
        s = eclreco.statistics.state
        return None if s is None or s is self._checkpointed_state else s

    def collect(self):
        with self._lock:
            self.scrapes += 1
            self._scrape_thread = threading.current_thread()
            self._lock.notify_all()
            yield from self._collect()

    def _collect(self):
        t = self.totals
        s = self._live_state()
        info = GaugeMetricFamily("eclreco_process_info", "eclreco process: role and version",
                                 labels=["role", "version", "pid"])
        info.add_metric([self.role, eclreco.__version__, str(os.getpid())], 1)
        yield info
        if self.framework:
            yield from self._collect_framework(t, s)
        if self.extra is not None:
            yield from self.extra()

    def _collect_framework(self, t, s):
        running = GaugeMetricFamily("eclreco_process_running", "1 while an event loop is running")
        running.add_metric([], 1 if (s is not None and s.running and (self.in_run is None or self.in_run())) else 0)
        yield running

        def val(attr):
            return getattr(t, attr) + (getattr(s, attr) if s is not None else 0)

        for attr, help_ in (("received", "Events read by the input module"),
                            ("processed", "Events processed through the whole path (not rejected)"),
                            ("batches", "Batches processed through the whole path")):
            name = "eclreco_batches" if attr == "batches" else f"eclreco_events_{attr}"
            c = CounterMetricFamily(name, help_)
            c.add_metric([], val(attr))
            yield c
        err = CounterMetricFamily("eclreco_events_module_errors", "Events flagged because a module raised")
        err.add_metric([], val("errors"))
        yield err

        rejected, family = _by_reason(t, s, "rejected", "Events rejected at input, by reason")
        yield family
        yield _by_reason(t, s, "discarded", "Events processed and not kept by an event filter (part of processed), "
                                            "by reason")[1]

        in_flight = GaugeMetricFamily("eclreco_events_in_flight", "Events received and not yet through the path")
        bif = GaugeMetricFamily("eclreco_batches_in_flight", "Batches dispatched and not yet through the path")
        if s is not None:
            in_flight.add_metric([], max(0, s.received - s.processed - s.rejected))
            bif.add_metric([], s.batches_in_flight)
        else:
            in_flight.add_metric([], 0)
            bif.add_metric([], 0)
        yield in_flight
        yield bif

        per_batch = list(t.per_batch)
        if s is not None:
            per_batch = [a + b for a, b in zip(per_batch, s.events_per_batch_hist())]
        h = HistogramMetricFamily("eclreco_events_per_batch", "Events per batch through the path")
        h.add_metric([], _hist_buckets(EVENTS_PER_BATCH_BUCKETS, per_batch),
                     sum_value=val("processed") + sum(rejected.values()))
        yield h

        modules = {k: dict(v, hist=list(v["hist"])) for k, v in t.modules.items()}
        if s is not None:
            _add_module_stats(modules, s.modules())
        mh = HistogramMetricFamily("eclreco_module_batch_seconds", "Time a module spends on one batch",
                                   labels=["module"], unit="")
        me = CounterMetricFamily("eclreco_module_events", "Events seen by a module", labels=["module"])
        mc = CounterMetricFamily("eclreco_module_cpu_seconds", "CPU time of the calling thread in a module",
                                 labels=["module"])
        merr = CounterMetricFamily("eclreco_module_errors", "Events a module raised on (flagged ERROR_MODULE)",
                                   labels=["module"])
        for key, m in sorted(modules.items(), key=lambda kv: int(kv[0].split(":")[0])):
            label = m["name"]  # unique in a path: the processor numbers a repeated type (RootOutput#1)
            mh.add_metric([label], _hist_buckets(_core.BATCH_SECONDS_BUCKETS, m["hist"]), sum_value=m["seconds"])
            me.add_metric([label], m["events"])
            mc.add_metric([label], m["cpu_seconds"])
            merr.add_metric([label], m["errors"])
        yield mh
        yield me
        yield mc
        yield merr

        yield from self._module_counters()

    def _module_counters(self):
        families: dict[str, object] = {}
        generic = GaugeMetricFamily("eclreco_module_value", "Other module-specific counters (Module.counters())",
                                    labels=["module", "name"])
        modules = list(self.path.modules) if self.path is not None else []
        for m in modules:
            try:
                counters = m.counters()
            except Exception:  # noqa: BLE001 - a module's monitoring must never break the scrape
                continue
            for key, value in counters.items():
                for pattern, name, kind, help_, only in _KNOWN_COUNTERS:
                    if pattern in key and only in (None, m.type):
                        fam = families.get(name)
                        if fam is None:
                            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                            fam = families[name] = cls(name, help_, labels=["module"])
                        fam.add_metric([m.type], float(value))
                        break
                else:
                    generic.add_metric([m.type, re.sub(r"[^a-zA-Z0-9_]", "_", key)], float(value))
        yield from families.values()
        yield generic


class MetricsExporter:
    """A running exporter; ``.port`` is the bound port, ``.close()`` stops it."""

    def __init__(self, server, thread, collector: ProcessMetricsCollector, registry: CollectorRegistry):
        self._server, self._thread = server, thread
        self.collector = collector
        self.registry = registry
        self.host, self.port = server.server_address[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def checkpoint(self):
        self.collector.checkpoint()

    def wait_for_scrape(self, timeout_s: float) -> bool:
        """Waits until a scrape that begins after this call has been answered, at most timeout_s; True
        when one was. For a process about to exit: counters set at the end of its run (ZMQInput's
        unread_at_end, counted when its socket closes; the last events of a stopped run) are otherwise
        gone with the exporter before any scrape reads them."""
        deadline = time.monotonic() + timeout_s
        c = self.collector
        with c._lock:
            seen = c.scrapes
            if not c._lock.wait_for(lambda: c.scrapes > seen, timeout_s):
                return False
            thread = c._scrape_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))  # the answer is written on that thread
            return not thread.is_alive()
        return True

    def set_path(self, path):
        self.collector.path = path

    def close(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve_process_metrics(port: int, host: str = "127.0.0.1", role: str = "reco", path=None,
                          extra: Callable[[], Iterable] | None = None, framework: bool = True) -> MetricsExporter:
    """Start the Prometheus exporter of this process on host:port (port 0: a free port).

    `path` (an eclreco Path) adds its modules' counters(); `extra` adds role-specific families;
    framework=False leaves out the event-loop families (a process without eclreco.process()).
    Returns an exporter with ``.port``, ``.url`` and ``.close()``.
    """
    registry = CollectorRegistry(auto_describe=False)
    collector = ProcessMetricsCollector(role, path, extra, framework)
    registry.register(collector)
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:  # say which address: "Address already in use" alone read like the input's
        raise OSError(err.errno, f"cannot serve metrics on {host}:{port}: {err.strerror or err}") from err
    return MetricsExporter(server, thread, collector, registry)


def serve_role_metrics(role: str, port: int, host: str = "127.0.0.1", **kw) -> MetricsExporter:
    """serve_process_metrics for an HLT role. A --metrics-port that cannot be served (taken, privileged) is an
    OSError naming it: the role exits 2 before its sockets (eclreco.cli), as reco.py does. It fell back to a free
    port, said in one line of the role's output: a scrape configuration, which names the port, then read the
    process that held it (another farm's role) or nothing, and the role's alerts stayed silent. Port 0 asks for
    a free one (reported as metrics_port in `hlt status --json`)."""
    try:
        return serve_process_metrics(port, host, role=role, **kw)
    except OSError as err:
        raise OSError(f"--metrics-port {port}: {err.strerror} (0: a free port, -1: no exporter)") from None


def metrics_port_error(port: int, host: str = "127.0.0.1") -> str:
    """Why an exporter cannot be served on host:port now (its error line), '' when it can: tried by serving one
    and closing it (`hlt run` checks its roles' ports before it starts them)."""
    try:
        serve_process_metrics(port, host, framework=False).close()
    except OSError as err:
        return err.strerror or str(err)
    return ""
