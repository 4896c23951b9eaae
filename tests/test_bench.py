"""`eclreco bench` end to end on a small sample: every measurement runs and its numbers are
consistent (the timings themselves are benchmarks, not tested)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "benchmarks")]  # the benchmark scripts' functions


@pytest.mark.timeout(300)
def test_bench_json_runs_every_measurement(tmp_path):
    """... and leaves no temporary file: the farm measurement left its folder, with the farm's ROOT
    file (~6 kB/event, 118 MB at 30 kHz for 5 s), in the temporary directory at every run."""
    import os

    (tmp_path / "tmp").mkdir()
    r = subprocess.run([sys.executable, "-m", "eclreco.cli", "bench", "--json", "--events", "600", "--repeat", "1",
                        "--farm-rate", "2000", "--farm-seconds", "1", "--plots", str(tmp_path / "plots")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=280,
                       env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.listdir(tmp_path / "tmp") == []
    res = json.loads(r.stdout)
    assert res["input"]["events"] == 600 and res["input"]["digits_per_event"] > 100
    for key in ("e2e_events_per_s", "e2e_no_cnn_events_per_s", "framework_overhead_us_per_event",
                "cnn_clusters_per_s_in_chain", "ort_alone_clusters_per_s", "zmq_input_events_per_s",
                "bare_pyzmq_msgpack_events_per_s", "peak_rss_mb"):
        assert res[key] > 0, key
    assert res["e2e_events_per_s_min"] <= res["e2e_events_per_s"] <= res["e2e_events_per_s_max"]
    assert {(g["threads"], g["batch_size"]) for g in res["grid"]} == {(t, b) for t in (1, 2) for b in (1, 64, 256, 1024)}
    assert set(res["stage_us_per_event"]) >= {"RawFileInput", "ECLUnpacker", "ECLClusterizer", "ECLEnergyCorrection",
                                              "RootOutput"}
    assert set(res["stage_cpu_us_per_event"]) == set(res["stage_us_per_event"])
    assert all(0 < res["stage_cpu_us_per_event"][k] for k in ("ECLUnpacker", "ECLClusterizer"))
    # one repetition: one (module, onnxruntime alone) pair, whose ratio is the median
    assert res["cnn_vs_ort_ratio"] == pytest.approx(res["cnn_clusters_per_s_in_chain"] / res["ort_alone_clusters_per_s"])
    assert res["cnn_vs_ort_ratio_min"] == res["cnn_vs_ort_ratio"] == res["cnn_vs_ort_ratio_max"]
    assert res["zmq_events"] == 600  # both loops received every message
    farm = res["farm"]
    assert farm["confirmed"] == farm["events"] == 2000  # the farm lost nothing
    assert 0 < farm["latency_p50_ms"] <= farm["latency_p99_ms"]
    assert {"distributor", "worker", "collector"} <= set(farm["cpu_us_per_event"])
    assert all(v >= 0 for v in farm["cpu_us_per_event"].values())
    assert set(farm["page_faults_per_event"]) == set(farm["cpu_us_per_event"])
    assert all(v >= 0 for v in farm["page_faults_per_event"].values())
    assert sorted(p.rsplit("/", 1)[1] for p in res["plots"]) == ["bench_batch_size.png", "bench_stages.png"]


def test_bench_table_labels_the_farm_figures(capsys):
    """The table names what each per-role figure is (CPU µs or page faults per event)."""
    from eclreco.bench import print_table

    print_table({"background": 1.0, "events": 10, "repeat": 1, "machine": {"cpus": 2}, "peak_rss_mb": 100.0,
                 "farm": {"confirmed": 10, "cpu_us_per_event": {"worker": 41.26},
                          "page_faults_per_event": {"worker": 0.0712}}})
    out = capsys.readouterr().out
    assert "farm CPU worker" in out and "41.3 µs/event" in out
    assert "farm page faults worker" in out and "0.07 per event" in out


@pytest.mark.timeout(120)
def test_zmq_hop_benchmark_measures_both_codes():
    """benchmarks/bench_zmq_hop.py: every message of each sender/receiver pair arrives (a receiver
    that misses one fails the run) and each process reports its CPU per message; the C pair is
    compiled against pyzmq's libzmq here, or left out with its reason."""
    import os

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_zmq_hop.py")
    r = subprocess.run([sys.executable, script, "--messages", "3000", "--repeat", "1", "--transports", "tcp",
                        "--rate", "20000", "--json"], capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["message_bytes"] > 1000  # the mean raw event of the generator, not a toy size
    rows = {row["sender/receiver"]: row for row in res["rows"]}
    assert rows["pyzmq"]["send_us_per_msg"] > 0 and rows["pyzmq"]["recv_us_per_msg"] > 0
    c = rows["C"]
    if "skipped" in c:  # only for what the machine lacks; a zmq_hop.c that no longer compiles fails here
        assert c["skipped"] in ("no C compiler", "this pyzmq has no bundled libzmq in pyzmq.libs/"), c["skipped"]
    else:
        assert c["send_us_per_msg"] > 0 and c["recv_us_per_msg"] > 0


@pytest.mark.timeout(120)
def test_distributor_benchmark_runs_every_phase():
    """benchmarks/bench_distributor.py: every queued event is read, dispatched, confirmed and saved
    (it asserts so itself) and each phase reports its time."""
    import os

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_distributor.py")
    r = subprocess.run([sys.executable, script, "--events", "3000", "--repeat", "1"], capture_output=True, text=True,
                       timeout=110)
    assert r.returncode == 0, r.stderr[-3000:]
    for phase in ("read_input", "dispatch", "confirm", "SAVED", "total"):
        assert phase in r.stdout, r.stdout


def test_convolutions_as_dense_matrices_compute_the_shipped_model(tmp_path):
    """benchmarks/bench_cnn_variants.py's conv_as_gemm form of the belle2-ecl model gives the shipped
    model's energies on real cluster inputs (a Toeplitz matrix transposed or shifted by one would not)."""
    import onnx

    from eclreco.bench import collect_cnn_inputs, make_raw_file
    from eclreco.modules.ecl_energy_correction import load_session, shipped_model

    from bench_cnn_variants import convs_as_gemm

    raw = str(tmp_path / "generic.msgpack")
    make_raw_file(raw, 300, 1.0)
    shipped, meta = load_session(shipped_model("belle2-ecl"))
    dense = str(tmp_path / "conv_as_gemm.onnx")
    convs_as_gemm(shipped_model("belle2-ecl"), dense)
    rewritten, _ = load_session(dense)
    assert not any(n.op_type == "Conv" for n in onnx.load(dense).graph.node)
    image, features = collect_cnn_inputs(raw, 300, meta["extra_features"])[0]
    assert image.shape[0] > 1000  # ~12 clusters per event above the model's threshold
    ref = shipped.run(["energy"], {"image": image, "features": features})[0]
    got = rewritten.run(["energy"], {"image": image, "features": features})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.timeout(180)
def test_cnn_variants_benchmark_measures_every_variant():
    """benchmarks/bench_cnn_variants.py: each form of the model (quantized ones included) is built,
    loaded with the module's own checks and timed; the dense form matches the shipped model."""
    import os

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_cnn_variants.py")
    r = subprocess.run([sys.executable, script, "--events", "600", "--rounds", "1"], capture_output=True, text=True,
                       timeout=170)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[2:]}
    assert set(rows) == {"shipped", "conv_as_gemm", "int8_qdq", "int8_qoperator", "int8_dynamic"}, r.stdout
    assert all(float(row[1].replace(",", "")) > 0 for row in rows.values()), r.stdout
    assert float(rows["conv_as_gemm"][-1]) < 1e-5, r.stdout  # max |ΔE/E| against the shipped model
    # too few events for a calibration half and a timed half: refused with the reason
    r = subprocess.run([sys.executable, script, "--events", "300"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--events must be >= 512" in r.stderr, r.stderr


def test_bench_zmq_sender_reads_only_the_messages_it_sends(tmp_path):
    """The zmq step of `eclreco bench` sends 5000 events of a ~100 MB file, and read the whole file to do so,
    twice (its count and its sender process, read_raw_file). It reads the first N now (push_raw_messages,
    rawdata.count_messages): a file whose bytes after them cannot be framed sends them all."""
    import zmq

    from eclreco.bench import push_raw_messages
    from eclreco.rawdata import RawFileError, count_messages, read_raw_file, write_raw_file
    from hlt_helpers import envelope

    raw = tmp_path / "raw.msgpack"
    write_raw_file(raw, (envelope(e) for e in range(5)))
    with open(raw, "ab") as f:
        f.write(b"\xc1 not a message")  # read to the end, the file is an error
    with pytest.raises(RawFileError):
        read_raw_file(raw)
    assert count_messages(raw, 3) == 3
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        assert push_raw_messages(str(raw), 3, f"tcp://127.0.0.1:{port}") == 3
        got = [pull.recv() for _ in range(3) if pull.poll(5000)]
        assert got == [envelope(e) for e in range(3)] and not pull.poll(200)
    finally:
        pull.close(0)
        ctx.term()
