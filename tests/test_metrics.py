"""Prometheus metrics: a running steering job scraped with plain HTTP, by promtool and by a real
Prometheus server (Debian's `prometheus` package; skipped, saying so, where it is missing)."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request

import pytest

import eclreco
from helpers import kill_if_running
from hlt_helpers import free_address, free_port, push_events

pytestmark = pytest.mark.timeout(90)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def sample(text: str, name: str, labels: str = "") -> float | None:
    for line in text.splitlines():
        if line.startswith(name + (labels or " ")) or (not labels and line.startswith(name + "{")):
            if labels or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


def wait_for(cond, timeout=20.0, step=0.1):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def steering_job(tmp_path, repo_dir):
    """steering/reco.py on a ZeroMQ input with --metrics-port (reduced chain: the unpacker only)."""
    address, port = free_address(), free_port()
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(repo_dir, "steering")!r})
        import eclreco, reco
        def reduced(path, **kw):
            path.add_module("ECLUnpacker")
        reco.add_reconstruction = reduced
        sys.exit(reco.main(["-i", {address!r}, "--metrics-port", "{port}", "--threads", "1",
                            "--max-latency", "5"]))
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def up():
        try:
            return scrape(port)
        except OSError:
            assert p.poll() is None, p.stdout.read()
            return None

    wait_for(up)
    yield address, port, p
    if p.poll() is None:
        p.send_signal(2)
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 0, out


def test_metrics_plain_http_and_promtool(steering_job):
    address, port, _ = steering_job
    text = scrape(port)
    assert 'eclreco_process_info{' in text and 'role="reco"' in text
    assert sample(text, "eclreco_events_processed_total") == 0
    push_events(address, range(1500))
    wait_for(lambda: sample(scrape(port), "eclreco_events_processed_total") == 1500)
    text = scrape(port)
    assert sample(text, "eclreco_events_received_total") == 1500
    assert sample(text, "eclreco_input_messages_received_total", '{module="ZMQInput"}') == 1500
    assert sample(text, "eclreco_input_bytes_received_total", '{module="ZMQInput"}') > 1500 * 20
    assert sample(text, "eclreco_module_batch_seconds_count", '{module="ZMQInput"}') > 0
    assert sample(text, "eclreco_events_per_batch_sum") == 1500
    assert sample(text, "eclreco_events_in_flight") == 0
    assert "# TYPE eclreco_module_batch_seconds histogram" in text
    assert "# TYPE eclreco_module_cpu_seconds_total counter" in text
    cpu = sample(text, "eclreco_module_cpu_seconds_total", '{module="ECLUnpacker"}')
    assert 0 < cpu <= sample(text, "eclreco_module_batch_seconds_sum", '{module="ECLUnpacker"}') + 1e-3
    # Malformed messages are counted by reason.
    import zmq
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.connect(address)
    sock.send(b"\x81\xa1v\x01")  # a map without the required keys
    sock.close(linger=5000)
    wait_for(lambda: sample(scrape(port), "eclreco_events_rejected_total", '{reason="missing_key"}') == 1)
    text = scrape(port)
    assert sample(text, "eclreco_events_processed_total") == 1500
    assert sample(text, "eclreco_events_received_total") == 1501
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'); exposition not linted")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@contextlib.contextmanager
def prometheus_server(tmp_path, target_port: int):
    """A real Prometheus server scraping 127.0.0.1:target_port every second; yields query(PromQL): the
    value of its first result, None when there is none (the test is skipped without the binary)."""
    prom = shutil.which("prometheus")
    if prom is None:
        pytest.skip("the 'prometheus' binary is not installed (apt-get install prometheus; .ci/run does); "
                    "real-server scrape test skipped")
    web = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(textwrap.dedent(f"""
        global:
          scrape_interval: 1s
          evaluation_interval: 1s
        scrape_configs:
          - job_name: eclreco
            static_configs:
              - targets: ["127.0.0.1:{target_port}"]
    """))
    server = subprocess.Popen([prom, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{web}", "--log.level=warn"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def query(q):
        url = f"http://127.0.0.1:{web}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                res = json.loads(r.read())["data"]["result"]
        except OSError:
            assert server.poll() is None, server.stderr.read()
            return None
        return float(res[0]["value"][1]) if res else None

    try:
        yield query
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_metrics_real_prometheus_server(steering_job, tmp_path):
    address, port, _ = steering_job
    with prometheus_server(tmp_path, port) as query:
        # Prometheus has scraped the idle job at least twice before any event arrives.
        wait_for(lambda: (query('count_over_time(eclreco_events_processed_total[1m])') or 0) >= 2, timeout=40)
        n = 2000
        push_events(address, range(n), rate_hz=4000)
        wait_for(lambda: sample(scrape(port), "eclreco_events_processed_total") == n)
        wait_for(lambda: query("eclreco_events_processed_total") == n, timeout=20)
        # The increase seen by Prometheus is exactly the events processed: it saw 0 before.
        delta = 'max_over_time(eclreco_events_processed_total[2m]) - min_over_time(eclreco_events_processed_total[2m])'
        assert query(delta) == n
        assert query("eclreco_events_received_total") == n
        rate = query("rate(eclreco_events_processed_total[1m])")
        assert rate is not None and rate > 0
        inc = query("increase(eclreco_events_processed_total[1m])")
        assert inc is not None and 0.5 * n <= inc <= 3 * n  # extrapolated by Prometheus
        assert query('sum(eclreco_module_batch_seconds_count{module="ZMQInput"})') > 0


def test_prometheus_reads_the_counts_of_a_jobs_end_with_metrics_linger(tmp_path, repo_dir):
    """What reco.py counts at the very end of its run was never seen by a real Prometheus: the exporter closed
    with the job, milliseconds after ZMQInput counted the messages still queued (unread_at_end) when its socket
    closed (checked: with a 1 s scrape interval Prometheus read eclreco_input_unread_at_end_total 0 while the
    job warned of 200). With --metrics-linger the job serves its final counts until a scrape has read them."""
    address, port = free_address(), free_port()
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(repo_dir, "steering")!r})
        import reco
        reco.add_reconstruction = lambda path, **kw: path.add_module("ECLUnpacker")  # the rest is not needed here
        sys.exit(reco.main(["-i", {address!r}, "-n", "100", "--metrics-port", "{port}", "--metrics-linger", "60",
                            "--threads", "1", "--batch-size", "10"]))
    """))
    with prometheus_server(tmp_path, port) as query:
        p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        try:
            # the job is up and scraped, then gets 300 messages at once: it reads 100, 200 stay queued
            wait_for(lambda: query("eclreco_events_received_total") == 0, timeout=40)
            push_events(address, range(300))
            out, _ = p.communicate(timeout=60)
        finally:
            kill_if_running(p)
        assert p.returncode == 0, out
        unread = int(out.split("ZMQInput: warning: ")[1].split()[0])
        assert unread > 0 and "serving the final metrics" in out and "no scrape" not in out, out
        assert query("max_over_time(eclreco_events_received_total[5m])") == 100  # the series is stale once the job is gone
        assert query('max_over_time(eclreco_input_unread_at_end_total{module="ZMQInput"}[5m])') == unread


def test_cnn_counters_come_from_the_cnn_module_only():
    """ECLLeakageCorrection counts its own "clusters_corrected" (every cluster it corrects
    classically): it goes to eclreco_module_value, not to the CNN's metric, which the dashboards
    sum over modules (that sum was ~3.7x the CNN's rate)."""
    from eclreco.metrics import ProcessMetricsCollector

    path = eclreco.create_path()
    path.add_module("ECLLeakageCorrection")
    path.add_module("ECLEnergyCorrection")
    fams = {f.name: f for f in ProcessMetricsCollector("test", path).collect()}
    cnn = fams["eclreco_cnn_clusters_corrected"].samples
    assert {s.labels["module"] for s in cnn} == {"ECLEnergyCorrection"}
    assert {s.labels["module"] for s in fams["eclreco_cnn_inference_seconds"].samples} == {"ECLEnergyCorrection"}
    other = [s for s in fams["eclreco_module_value"].samples if s.labels["module"] == "ECLLeakageCorrection"]
    assert [s.labels["name"] for s in other] == ["clusters_corrected"]


def test_the_dashboard_counts_each_event_once():
    """Every role of the farm exports the eclreco_events_* counters, and the collector counts again
    what the workers rejected or failed on; the dashboard's rejection and module-error panel summed
    every role (twice the real rate). Each sum of these counters must pick one role or split by it."""
    import json
    import re

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "deploy", "grafana-eclreco.json")) as f:
        exprs = [t["expr"] for p in json.load(f)["panels"] for t in p.get("targets", [])]
    counted = [e for e in exprs if re.search(r"eclreco_events_(received|processed|rejected|module_errors|discarded)_total",
                                              e)]
    assert len(counted) >= 5
    for e in counted:
        assert re.search(r'role="(collector|distributor|worker)"', e) or "by (role)" in e, e


def test_the_distributors_latency_buckets_count_every_event_up_to_their_bound():
    """eclreco_hlt_event_latency_seconds: a bucket le=B counts every event of latency <= B. The buckets
    were read off the distributor's internal grid (20 log steps a decade), which holds 1e-x but not 3e-x:
    le="0.03" counted the events up to 28.2 ms only (a 29 ms event first in le="0.1"), and
    histogram_quantile and a threshold query were off. The docs' p99 target, 20 ms, is a bucket."""
    import numpy as np
    from prometheus_client.parser import text_string_to_metric_families

    from eclreco.hlt.distributor import Distributor
    from eclreco.metrics import serve_process_metrics

    d = Distributor(free_address(), free_address(), free_address())
    exporter = serve_process_metrics(0, role="distributor", extra=d.metrics_families, framework=False)
    try:
        bounds = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 2e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]
        values = np.array([f * b for b in bounds for f in (0.5, 0.95, 1.0, 1.05)] + [100.0])
        d.latency.add(values)
        family = {f.name: f for f in text_string_to_metric_families(scrape(exporter.port))}[
            "eclreco_hlt_event_latency_seconds"]
        buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
        assert set(map(float, buckets)) >= set(bounds), sorted(buckets)
        for le, count in buckets.items():
            assert count == int(np.sum(values <= float(le))), (le, count, buckets)
        count = [s.value for s in family.samples if s.name.endswith("_count")]
        assert count == [len(values)] and buckets["+Inf"] == len(values)
    finally:
        exporter.close()
        d.close()


def test_a_scrape_during_a_confirmation_sees_a_whole_latency_histogram():
    """The distributor's main thread adds confirmed events' latencies while the exporter's thread reads
    them: the buckets, the +Inf bucket (the count) and the sum were read at different moments, so a scrape
    between two of the updates saw le="30.0" above le="+Inf" (a histogram Prometheus must repair) or a sum
    without its count. Each scrape now reads one state."""
    import threading

    import numpy as np

    from eclreco.hlt.distributor import Distributor

    d = Distributor(free_address(), free_address(), free_address())
    stop = threading.Event()

    def confirm():
        v = np.full(7, 0.005)
        while not stop.is_set():
            d.latency.add(v)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # thread switches anywhere, as a busy distributor meets them over hours
    t = threading.Thread(target=confirm)
    t.start()
    bad = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5 and not bad:  # ~3 torn scrapes a second before
            h = next(f for f in d.metrics_families() if f.name == "eclreco_hlt_event_latency_seconds")
            buckets = [s.value for s in h.samples if s.name.endswith("_bucket")]
            total = next(s.value for s in h.samples if s.name.endswith("_sum"))
            if buckets != sorted(buckets) or abs(total - 0.005 * buckets[-1]) > 1e-6 * max(1.0, total):
                bad.append((buckets[-3:], total))
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(interval)
        d.close()
    assert not bad, bad


def test_idle_polls_of_a_source_are_not_batches_in_the_time_histogram():
    """A stream input's poll that brings no event (ZMQInput, HLTWorkerInput, HLTCollectorInput wait up to
    0.1 s each) was recorded as a batch of eclreco_module_batch_seconds: an idle worker added ten 0.1 s
    "batches" a second, and the dashboard's module time per batch (p99) showed 0.28 s for its input. The
    calls are still counted (the statistics table), the histogram holds the calls that brought events."""
    import numpy as np

    from eclreco.metrics import ProcessMetricsCollector

    class IdleThenEvents(eclreco.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def is_source(self):
            return True

        def next_batch(self, batch, max_events):
            self.calls += 1
            if self.calls <= 6:  # idle: waits and brings nothing
                time.sleep(0.02)
                return True
            batch.resize(10)
            batch.evt[:] = np.arange(10) + 10 * self.calls
            return self.calls < 9

    path = eclreco.create_path()
    path.add_module(IdleThenEvents())
    eclreco.process(path, batch_size=10, install_signal_handlers=False)
    src = eclreco.statistics.summary()["modules"][0]
    assert src["calls"] == 9 and src["events"] == 30
    assert sum(src["batch_seconds_hist"]) == 3, src["batch_seconds_hist"]  # the three calls with events
    family = next(f for f in ProcessMetricsCollector("reco", path).collect()
                  if f.name == "eclreco_module_batch_seconds")
    counts = {s.labels["module"]: s.value for s in family.samples if s.name.endswith("_count")}
    assert counts["IdleThenEvents"] == 3, counts


def test_every_event_of_a_job_is_in_the_exported_accounting():
    """docs/reliability.md, "Loss semantics": received = processed + rejected, the rejections by reason,
    the events a module failed on in eclreco_events_module_errors_total, an event filter's in
    eclreco_events_discarded_total{reason}, and the messages still queued when the run ended in
    eclreco_input_unread_at_end_total; scraped over HTTP from the exporter reco.py serves, after the run,
    and equal to the job's own statistics."""
    import numpy as np
    import zmq

    from eclreco.metrics import serve_process_metrics
    from hlt_helpers import envelope

    fail_on, cut = {3, 17, 18}, {5, 6, 7, 30}
    bad = {"not_a_map": b"\x92\x01\x02", "missing_key": b"\x81\xa1v\x01", "empty_message": b""}
    address = f"inproc://accounting-{os.getpid()}"
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.connect(address)
    messages = [envelope(e) for e in range(40)]
    for k, m in enumerate(bad.values()):
        messages.insert(5 + 10 * k, m)
    messages += [envelope(e) for e in range(1000, 1020)]  # the job stops before these: unread at its end

    class FailOn(eclreco.Module):
        def event(self, batch):  # raises on a batch holding one of them: the re-run flags that event only
            if set(np.asarray(batch.evt)[batch.active()].tolist()) & fail_on:
                raise RuntimeError("a module failed")

    class Cut(eclreco.Module):
        def event(self, batch):
            batch.discard(np.isin(np.asarray(batch.evt), list(cut)) & batch.active(), "test_cut")

    path = eclreco.create_path()
    path.add_module("ZMQInput", address=address, idle_timeout_s=1.0)
    path.add_module("ECLUnpacker")
    path.add_module(Cut())
    path.add_module(FailOn())
    exporter = serve_process_metrics(0, role="reco", path=path)
    try:
        for m in messages:
            push.send(m)
        eclreco.process(path, max_events=len(messages) - 20, batch_size=8, threads=1, install_signal_handlers=False)
        text = scrape(exporter.port)
    finally:
        exporter.close()
        push.close(0)
    s = eclreco.statistics.summary()
    n_valid, n_bad = 40, len(bad)
    assert (s["received"], s["processed"], s["rejected"]) == (n_valid + n_bad, n_valid, n_bad), s
    assert sample(text, "eclreco_events_received_total") == n_valid + n_bad
    assert sample(text, "eclreco_events_processed_total") == n_valid
    for reason in bad:
        assert sample(text, "eclreco_events_rejected_total", f'{{reason="{reason}"}}') == 1, (reason, text)
    assert sample(text, "eclreco_events_module_errors_total") == len(fail_on) == s["errors"], text
    assert sample(text, "eclreco_events_discarded_total", '{reason="test_cut"}') == len(cut), text
    assert sample(text, "eclreco_input_unread_at_end_total", '{module="ZMQInput"}') == 20, text


def test_prometheus_reads_the_module_errors_by_module(tmp_path):
    """summary()'s per-module errors were not exported: Prometheus saw only eclreco_events_module_errors_total,
    one count per event, and could not tell which module failed (an output's failed writes from the errors
    of the chain before it). eclreco_module_errors_total{module} counts them, monotonic over the runs of a
    process (checkpoint), as read by a real Prometheus server."""
    import numpy as np

    from eclreco.metrics import serve_process_metrics
    from helpers import CountingSource

    class Source(CountingSource):
        def initialize(self):
            self.next = 0  # every run reads the same events

    class FailOn(eclreco.Module):
        def __init__(self, events):
            super().__init__()
            self.events = events

        def event(self, batch):  # the re-run flags only the events named
            if set(np.asarray(batch.evt).tolist()) & self.events:
                raise RuntimeError("failed")

    class FailA(FailOn):
        pass

    class FailB(FailOn):
        pass

    path = eclreco.create_path()
    path.add_module(Source(n=40))
    path.add_module(FailA({3, 5}))
    path.add_module(FailB({5, 30}))
    exporter = serve_process_metrics(0, role="reco", path=path)
    try:
        with prometheus_server(tmp_path, exporter.port) as query:
            for _ in range(2):
                eclreco.process(path, batch_size=8, install_signal_handlers=False)
                exporter.checkpoint()
            s = eclreco.statistics.summary()
            assert {m["name"]: m["errors"] for m in s["modules"]} == {"Source": 0, "FailA": 2, "FailB": 2}, s
            text = scrape(exporter.port)
            assert sample(text, "eclreco_module_errors_total", '{module="FailA"}') == 4, text
            assert sample(text, "eclreco_events_module_errors_total") == 6  # event 5 once
            wait_for(lambda: query('eclreco_module_errors_total{module="FailB"}') == 4, timeout=40)
            assert query('eclreco_module_errors_total{module="FailA"}') == 4
            assert query('eclreco_module_errors_total{module="Source"}') == 0
    finally:
        exporter.close()


@pytest.mark.parametrize("role", ["distributor", "collector", "worker"])
def test_an_hlt_role_refuses_a_taken_metrics_port_naming_it(tmp_path, role):
    """A scrape configuration names each role's port. A role whose --metrics-port another process held served
    on a free port instead, said in one line among its output, and ran on: Prometheus read the process that held
    the port (here an exporter of role "holder"; in a farm, another farm's role) and never this one, whose alerts
    stayed silent. It refuses now, exit 2, one line naming the port, before its sockets, as reco.py does."""
    from eclreco.metrics import serve_process_metrics

    holder = serve_process_metrics(0, role="holder", framework=False)
    port = holder.port
    ctl, work, coll = free_address(), free_address(), free_address()
    argv = {"distributor": ["--input", free_address(), "--workers-addr", work, "--control", ctl],
            "collector": ["--collector-addr", coll, "--control", ctl, "-o", str(tmp_path / "c.root")],
            "worker": ["--distributor", work, "--collector", coll, "--no-cnn"]}[role]
    try:
        try:  # it ran on (waiting for a farm), on another port
            r = subprocess.run([sys.executable, "-m", "eclreco.cli", "hlt", role, *argv, "--metrics-port", str(port),
                                *(["--sched", "normal"] if role != "worker" else [])],
                               capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(f"the {role} ran on: {err.stdout!r}") from None
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr == (f"eclreco hlt {role}: error: --metrics-port {port}: cannot serve metrics on 127.0.0.1:{port}: "
                            "Address already in use (0: a free port, -1: no exporter)\n"), r.stderr
        info = [line for line in scrape(port).splitlines() if line.startswith("eclreco_process_info{")]
        assert info and 'role="holder"' in info[0] and f'pid="{os.getpid()}"' in info[0], info  # what a scrape reads
    finally:
        holder.close()
