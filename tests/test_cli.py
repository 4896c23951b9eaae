"""Command lines with bad options: one line saying what is wrong, exit code 2, nothing written
(found by a robustness review: these were tracebacks, silent truncations or a destroyed input)."""
import os
import sys

import pytest

from eclreco import cli
from eclreco.rawdata import encode_events, write_raw_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(os.path.dirname(cli.__file__), "models")


def _reco():
    sys.path.insert(0, os.path.join(REPO, "steering"))
    try:
        import reco
    finally:
        sys.path.pop(0)
    return reco


@pytest.mark.parametrize("argv,message", [
    (["simulate", "--events", "5", "--energy-range", "5", "1", "-q", "-o", "{tmp}/x.msgpack"], "0 < LO < HI"),
    (["simulate", "--events", "5", "-q", "-o", "/proc/nonexistent/x.msgpack"], "error: FileNotFoundError"),
    (["validate", "--detector", "belle2-ecl", "-o", "{tmp}/v", "--model", os.path.join(MODELS, "array30.onnx")],
     "trained for detector 'array30'"),
    (["daq-emulator", "--input", "{tmp}/missing.msgpack", "--connect", "tcp://127.0.0.1:1"], "No such file"),
])
def test_eclreco_bad_options_exit_2_with_one_line(argv, message, tmp_path, capsys):
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["train", "--detector", "array30", "-o", "{tmp}", "--epochs", "0"], "--epochs must be >= 1"),
    (["hlt", "run", "-n", "0"], "--workers out of range"),
    (["hlt", "run", "--model", "{tmp}/missing.onnx"], "is not a file"),
    (["hlt", "run", "--no-cnn", "--model", os.path.join(MODELS, "belle2-ecl.onnx")], "does nothing with --no-cnn"),
    (["hlt", "run", "--max-message-bytes", "100", "--refuse-message-bytes", "50"], "must exceed max_message_bytes"),
    (["bench", "--events", "0"], "--events >= 100"),
])
def test_eclreco_refused_before_any_work(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        cli.main([a.format(tmp=tmp_path) for a in argv])


def test_reco_py_refuses_contradictions_and_an_output_over_its_input(tmp_path, capsys):
    reco = _reco()
    raw = tmp_path / "raw.msgpack"
    write_raw_file(raw, encode_events("array30", 0, 1, [0, 1], [0, 0, 0], [], [], [], []))
    before = raw.read_bytes()
    for argv in (["-i", str(raw), "--events", "10"], ["--no-cnn", "--model", "m.onnx"], ["-n", "-1"]):
        with pytest.raises(SystemExit) as e:
            reco.main(argv)
        assert e.value.code == 2
    assert reco.main(["-i", str(raw), "-o", str(raw)]) == 2
    assert reco.main(["-i", str(raw), "--rejected", str(raw)]) == 2
    assert reco.main(["-i", str(raw), "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert "use another file" in err and "threads must be 1..256, not 0" in err and "use -n N" in err
    assert raw.read_bytes() == before


def test_reco_py_fails_when_every_event_fails(capsys):
    """--model of the other detector: every event gets a module error; the job says so and exits 1
    (it exited 0 with a module error on each event)."""
    reco = _reco()
    rc = reco.main(["--events", "20", "--detector", "belle2-ecl", "--model", os.path.join(MODELS, "array30.onnx"),
                    "--threads", "1", "--no-dqm"])
    assert rc == 1 and "every event failed in a module" in capsys.readouterr().err


def test_reco_py_writes_corrected_clusters_and_a_pi0_peak(tmp_path):
    """The main job end to end (steering/reco.py, the embedded simulation, the default chain): the
    ROOT file read back with uproot holds every event, clusters whose energy the CNN changed, and
    DQM histograms; on pi0 -> gamma gamma events the gg_mass histogram peaks at the pi0 mass."""
    import numpy as np
    import uproot

    reco = _reco()
    out = tmp_path / "pi0.root"
    assert reco.main(["--events", "400", "--particle", "pi0", "--energy", "1.0", "--threads", "1",
                      "-o", str(out)]) == 0
    with uproot.open(out) as f:
        t = f["events"]
        assert np.array_equal(np.sort(t["evt"].array(library="np")), np.arange(400))
        e = np.concatenate(t["cluster_energy"].array(library="np"))
        e_raw = np.concatenate(t["cluster_energy_raw"].array(library="np"))
        above = e_raw > 0.03  # the CNN's domain (ECLEnergyCorrection min_energy_gev)
        assert above.sum() > 400 and np.mean(e[above] != e_raw[above]) > 0.9
        h = f["dqm/gg_mass"]
        counts, edges = h.values(), h.axis().edges()
        assert counts.sum() > 200
        peak = 0.5 * (edges[np.argmax(counts)] + edges[np.argmax(counts) + 1])
        assert 0.120 < peak < 0.150, peak  # GeV; m(pi0) = 0.135
