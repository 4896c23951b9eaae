"""Command lines with bad options: one line saying what is wrong, exit code 2, nothing written
(found by a robustness review: these were tracebacks, silent truncations or a destroyed input)."""
import os
import re
import sys

import pytest

from eclreco import cli
from eclreco.cli_types import METRICS_HOST
from eclreco.modules.root_output import DEFAULT_CLUSTER_COLUMNS
from eclreco.hlt.run import free_address
from eclreco.rawdata import encode_events, write_raw_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(os.path.dirname(cli.__file__), "models")
DEFAULT_COLUMNS = ",".join(DEFAULT_CLUSTER_COLUMNS)  # --cluster-columns given as its default


def _reco():
    sys.path.insert(0, os.path.join(REPO, "steering"))
    try:
        import reco
    finally:
        sys.path.pop(0)
    return reco


@pytest.mark.parametrize("argv,message", [
    (["simulate", "--events", "5", "-q", "-o", "/proc/nonexistent/x.msgpack"], "-o '/proc/nonexistent/x.msgpack': no directory '/proc/nonexistent'"),
    (["validate", "--detector", "belle2-ecl", "-o", "{tmp}/v", "--model", os.path.join(MODELS, "array30.onnx")],
     "trained for detector 'array30'"),
    # 'FileExistsError: [Errno 17] File exists' before
    (["validate", "--detector", "array30", "-o", os.path.join(REPO, "README.md")], "README.md' is not a directory"),
    (["train", "--detector", "array30", "-o", os.path.join(REPO, "README.md"), "--g4",
      os.path.join(REPO, "tests", "data", "g4_array30_subset.npz")], "README.md' is not a directory"),
    # it said "cellId outside 1..900 for array30" from the middle of the chain; the file is a belle2-ecl sample
    (["validate", "--detector", "array30", "-o", "{tmp}/v", "--g4", os.path.join(REPO, "tests", "data",
                                                                          "g4_belle2_heldout.npz")],
     "not a Geant4 sample of array30 (it holds photons, offsets, cell, edep_mev, source): a sample of belle2-ecl, "
     "whose photons its 'photons' array gives?"),
])
def test_eclreco_bad_options_exit_2_with_one_line(argv, message, tmp_path, capsys):
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_belle2_sample_used_as_the_other_detector_is_a_valid_belle2_sample():
    """tests/data/g4_belle2_heldout.npz, the "sample of the other detector" above, held 'true_energy_mev' (array30's
    layout) instead of 'photons', so it was no belle2-ecl sample either: G4Sample refused it for belle2-ecl ("has
    no 'photons' array"), and the test above passed on a file that no detector reads. It is the events
    95000..95499 of /work/shared/data/g4_belle2_train.npz, made with
        t = np.load(".../g4_belle2_train.npz"); o = t["offsets"]; a, b = o[95000], o[95500]
        np.savez_compressed(out, photons=t["photons"][95000:95500], offsets=o[95000:95501] - a,
                            cell=t["cell"][a:b], edep_mev=t["edep_mev"][a:b],
                            source=np.array("g4_belle2_train.npz events 95000..95499"))"""
    from eclreco.cnn_data import G4Sample

    sample = G4Sample(os.path.join(REPO, "tests", "data", "g4_belle2_heldout.npz"), "belle2-ecl")
    assert sample.n == 500 and sample.direction.shape == (500, 3)
    assert sample.cell.max() > 900  # (a cellId array30 has not: what the refusal above names)


def test_validate_refuses_a_model_it_cannot_use_naming_model(tmp_path, capsys):
    """`eclreco validate --model FILE` with a missing file, a file that is no ONNX model or a model of the other
    detector said `error: ModelError: ECLEnergyCorrection: ...`, naming no option; it is now the line reco.py
    prints for its --model, exit 2, and no -o folder is left behind."""
    for model, why in (("nofile.onnx", "model file 'nofile.onnx' does not exist"),
                       (__file__, f"cannot load model {__file__!r}: "),
                       (os.path.join(MODELS, "belle2-ecl.onnx"), "was trained for detector 'belle2-ecl'")):
        assert cli.main(["validate", "--detector", "array30", "-o", str(tmp_path / "v"), "--model", model]) == 2
        err = capsys.readouterr().err
        assert err.startswith("eclreco validate: error: --model: ECLEnergyCorrection: ") and why in err, err
        assert err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


def test_validate_refuses_belle2_sections_for_array30_with_exit_2(tmp_path, capsys):
    """`eclreco validate --detector array30 --pi0-events N` (or --fake-events) was refused by
    SystemExit(message): exit 1, the code of a failed run, where every other bad option exits 2."""
    for given in (["--pi0-events", "10"], ["--fake-events", "0"]):
        assert cli.main(["validate", "--detector", "array30", "-o", str(tmp_path / "v")] + given) == 2
        assert capsys.readouterr().err == (f"eclreco validate: error: {given[0]}: the pi0 peak and the clusters away "
                                           "from the photon are belle2-ecl's sections (fast simulation with beam "
                                           "background), not array30's\n")
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("argv,message", [
    (["hlt", "run", "-n", "3", "--metrics-base-port", "65532"], "P\\+1 \\.\\. P\\+4\\) must stay below 65536"),
    (["hlt", "run", "--model", "{tmp}/missing.onnx"], "is not a file"),
    (["hlt", "run", "--no-cnn", "--model", os.path.join(MODELS, "belle2-ecl.onnx")], "does nothing with --no-cnn"),
    (["hlt", "run", "--max-message-bytes", "100", "--refuse-message-bytes", "50"],
     "--refuse-message-bytes \\(50\\) must exceed --max-message-bytes \\(100\\)"),
    (["hlt", "run", "--conditions", "{tmp}/missing.json"], "--conditions .* is not a file"),
    (["hlt", "run", "--output", "{tmp}/no/such/dir/run.root"], "--output .*: no directory .*no/such/dir"),
    # the collector wrote DIR.2 beside it (it never overwrites: unused_filename)
    (["hlt", "run", "--output", "{tmp}"], "--output .* is a directory: name a file in it"),
    (["hlt", "run", "--filter-cluster-energy", "0.2"], "--filter-cluster-energy sets which clusters"),
    (["hlt", "run", "--filter-cluster-energy", "0.1"], "--filter-cluster-energy sets which clusters"),
    # the workers wrote one file together (interleaved records), a worker died at start-up in a typo
    (["hlt", "run", "--rejected", "{tmp}/q.msgpack"], "2 workers would write one file; put {worker}"),
    (["hlt", "run", "-n", "1", "--rejected", "{tmp}/typo/q.msgpack"], "--rejected .*: no directory .*typo"),
    (["hlt", "run", "--modules", "ECLUnpacker, Foo"], "unknown module\\(s\\) 'Foo'; available: .*ECLUnpacker"),
    (["hlt", "run", "--conditions", os.path.join(MODELS, "belle2-ecl.onnx"), "--modules", "none"],
     "has no ECLUnpacker"),
    # --no-cnn with an explicit chain was ignored without a word
    (["hlt", "run", "--modules", "ECLUnpacker,ECLClusterizer", "--no-cnn"],
     "--no-cnn is about the CNN of the standard chain: it does nothing with --modules"),
    (["hlt", "run", "--modules", "ECLUnpacker", "--model", os.path.join(MODELS, "belle2-ecl.onnx")],
     "--model is about the CNN of the standard chain"),
    # the second network's seed, 2**32, failed after the chain and the first network
    (["train", "--detector", "array30", "-o", "{tmp}/t", "--seed", "4294967295", "--restarts", "2", "--g4",
      os.path.join(REPO, "tests", "data", "g4_array30_subset.npz")],
     "--seed 4294967295 with --restarts 2 tries seeds up to 4294967296: at most 4294967295"),
    # a pacing option without the rate it paces: silently ignored before (the events went out as fast as possible)
    (["daq-emulator", "--input", __file__, "--connect", "tcp://127.0.0.1:1", "--tick-ms", "5"],
     r"--tick-ms 5 paces the bursts of --rate: it does nothing without a --rate > 0"),
    (["daq-emulator", "--input", __file__, "--connect", "tcp://127.0.0.1:1", "--rate", "0", "--tick-ms", "5"],
     r"--tick-ms 5 paces the bursts of --rate: it does nothing without a --rate > 0"),
    # the receiver's key name: with --bind the emulator is the CURVE server, and without keys there is no CURVE
    (["daq-emulator", "--input", __file__, "--bind", "tcp://127.0.0.1:1", "--curve-dir", "{tmp}/keys",
      "--curve-server", "reco"], r"--curve-server 'reco' names the peer's CURVE key when connecting: this socket "
                                 r"binds, and is the CURVE server itself"),
    (["daq-emulator", "--input", __file__, "--connect", "tcp://127.0.0.1:1", "--curve-server", "reco"],
     r"--curve-server: it names a CURVE key, which does nothing without --curve-dir"),
    # belle2-ecl's validation sections: ignored for array30, which has none
    (["validate", "--detector", "array30", "-o", "{tmp}/v", "--pi0-events", "5000", "--fake-events", "0"],
     "--pi0-events, --fake-events: the pi0 peak and the clusters away from the photon are belle2-ecl's sections"),
])
def test_eclreco_refused_before_any_work(argv, message, tmp_path, capsys):
    """hlt run's own checks of options (what takes two values or a file) are one line and exit 2, as
    argparse's checks of single values (they exited 1: a script could not tell them from a farm's failure)."""
    try:
        code = cli.main([a.format(tmp=tmp_path) for a in argv])  # a check after parsing: one line, exit 2
    except SystemExit as e:
        code = e.code  # argparse's, or the message itself
    if code == 2:
        err = capsys.readouterr().err
        command = " ".join(argv[:2] if argv[0] == "hlt" else argv[:1])
        assert err.startswith(f"eclreco {command}: error: ") and err.count("\n") == 1, err
        assert re.search(message, err), err
    else:
        assert argv[:2] != ["hlt", "run"] and re.search(message, str(code))


@pytest.mark.parametrize("argv,message", [
    # accepted before: a distributor that never dispatched (and whose stop hung), one that read nothing
    (["hlt", "distributor", "--chunk", "0"], "argument --chunk: must be >= 1, not 0"),
    (["hlt", "distributor", "--queue-size", "-5"], "argument --queue-size: must be >= 1, not -5"),
    (["hlt", "distributor", "--heartbeat-timeout", "nan"], "--heartbeat-timeout: must be a finite number > 0, not nan"),
    (["hlt", "distributor", "--cycle-ms", "inf"], "--cycle-ms: must be a finite number >= 0, not inf"),
    (["hlt", "distributor", "--max-message-bytes", "-5"], "--max-message-bytes: must be >= 0, not -5"),
    (["hlt", "distributor", "--metrics-port", "70000"], "must be -1..65535 (-1: none, 0: a free port), not 70000"),
    (["hlt", "collector", "--batch-size", "0"], "argument --batch-size: must be 1..1048576, not 0"),
    (["hlt", "collector", "--dedup-window", "0"], "argument --dedup-window: must be >= 1, not 0"),
    (["hlt", "collector", "--flush-interval", "-1"], "--flush-interval: must be a finite number >= 0, not -1"),
    (["hlt", "worker", "--heartbeat", "inf"], "argument --heartbeat: must be a finite number > 0, not inf"),
    (["hlt", "worker", "--capacity", "-5"], "argument --capacity: must be >= 0, not -5"),
    # exit 1 before, where `hlt run` refuses the same --rejected with 2
    (["hlt", "worker", "--rejected", "/proc/nonexistent/q.msgpack"],
     "eclreco hlt worker: error: --rejected '/proc/nonexistent/q.msgpack': no directory '/proc/nonexistent'"),
    (["hlt", "run", "-n", "0"], "argument -n/--workers: must be >= 1, not 0"),
    (["hlt", "run", "--threads", "300"], "argument --threads: must be 1..256, not 300"),
    (["hlt", "run", "--max-restarts", "-1"], "argument --max-restarts: must be >= 0, not -1"),
    (["hlt", "run", "--collector-restarts", "-1"], "argument --collector-restarts: must be >= 0, not -1"),
    (["hlt", "run", "--max-latency", "nan"], "argument --max-latency: must be a finite number >= 0, not nan"),
    # exit 1 with their own message, or the top level's usage, before
    (["train", "--detector", "array30", "-o", "unused", "--epochs", "0"], "argument --epochs: must be >= 1, not 0"),
    # numpy's error after the Geant4 file was read ("expected non-negative integer"), or after the whole
    # chain ("Seed must be between 0 and 2**32 - 1")
    (["train", "--detector", "array30", "-o", "unused", "--seed", "-1"], "argument --seed: must be 0..4294967295, not -1"),
    (["train", "--detector", "array30", "-o", "unused", "--seed", "4294967296"],
     "argument --seed: must be 0..4294967295, not 4294967296"),
    (["validate", "--detector", "array30", "-o", "unused", "--max-events", "-1"], "argument --max-events: must be >= 0"),
    (["hlt", "run", "--bogus"], "usage: eclreco hlt run"),
    # before any role starts (the distributor's error, then "the distributor failed to start"; or exit 2)
    (["hlt", "run", "--input", "foo"], "argument --input: ZeroMQ address 'foo' has no transport"),
    (["hlt", "run", "--control", "tcp://127.0.0.1:99999"], "argument --control: ZeroMQ address 'tcp://127.0.0.1:99999': "
                                                           "the port must be 0..65535"),
    # no command at all: the help, and exit 0 before (a script's typo passed as success)
    ([], "usage: eclreco [-h] [--version] COMMAND"),
    (["hlt"], "usage: eclreco hlt [-h] ROLE"),
    (["hlt", "control", "stop", "--timeout", "inf"], "argument --timeout: must be a finite number > 0, not inf"),
    (["hlt", "status", "--timeout", "nan"], "argument --timeout: must be a finite number > 0, not nan"),
    # (--input: a file that exists, which the parser checks first)
    (["daq-emulator", "--input", __file__, "--connect", "tcp://127.0.0.1:1", "--tick-ms", "0"],
     "argument --tick-ms: must be a finite number > 0, not 0"),
    (["daq-emulator", "--input", __file__, "--connect", "tcp://127.0.0.1:1", "--events", "-1"],
     "argument --events: must be >= 0, not -1"),
    # simulate checked these by hand after the parse, in words of its own ("error: --seed must be >= 0")
    (["simulate", "-o", "x.msgpack", "--events", "0"], "eclreco simulate: error: argument --events: must be >= 1, not 0"),
    (["simulate", "-o", "x.msgpack", "--seed", "-1"],
     "eclreco simulate: error: argument --seed: must be 0..9223372036854775807, not -1"),
    (["simulate", "-o", "x.msgpack", "--energy", "1000"],
     "eclreco simulate: error: argument --energy: must be a finite number > 0 and < 1000, not 1000"),
    (["simulate", "-o", "x.msgpack", "--energy-range", "0", "1"],
     "eclreco simulate: error: argument --energy-range: must be a finite number > 0 and < 1000, not 0"),
    (["simulate", "-o", "x.msgpack", "--energy-range", "5", "1"],
     "eclreco simulate: error: argument --energy-range: LO must be below HI, not 5 1"),
    (["simulate", "-o", "x.msgpack", "--background", "nan"],
     "eclreco simulate: error: argument --background: must be a finite number in 0..100, not nan"),
    (["simulate", "-o", "x.msgpack", "--run", str(2**64)],
     "eclreco simulate: error: argument --run: must be 0..18446744073709551615, not 18446744073709551616"),
    (["simulate", "-o", "x.msgpack", "--exp", "x"], "eclreco simulate: error: argument --exp: not an integer: 'x'"),
    (["bench", "--events", "0"], "argument --events: must be >= 100, not 0"),
    (["bench", "--farm-rate", "inf"], "argument --farm-rate: must be a finite number > 0, not inf"),
    (["bench", "--background", "101"], "argument --background: must be a finite number in 0..100, not 101"),
    (["bench", "--repeat", "x"], "argument --repeat: not an integer: 'x'"),
    # not a number, but the same kind of slip: libzmq said only "Invalid argument"
    # (--sched normal: this one gets past the parser, and the distributor's default would put this
    # pytest process, and every process it starts after, under SCHED_BATCH)
    (["hlt", "distributor", "--input", "127.0.0.1:5555", "--metrics-port", "-1", "--sched", "normal"],
     "ZeroMQ address '127.0.0.1:5555' has no transport: write tcp://HOST:PORT"),
])
def test_eclreco_numbers_out_of_range_exit_2_naming_the_option(argv, message, capsys):
    """Each numeric option refuses what it cannot mean (cli_types), one line and exit code 2, before
    any socket or file is opened."""
    try:
        rc = cli.main(argv)  # a worker's steering file parses its own options and returns the code
    except SystemExit as e:
        rc = e.code
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_every_background_option_takes_the_shared_range():
    """The beam-background level is one idea with one range (cli_types.SIM_BACKGROUND): bench defined its own
    number(0, 100), which a change of the shared range would have left behind. Every --background of the
    commands (and reco.py's) is that type."""
    import argparse

    from eclreco.cli_types import SIM_BACKGROUND

    def background_types(parser):
        for action in parser._actions:
            if "--background" in action.option_strings:
                yield parser.prog, action.type
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from background_types(sub)

    found = [*background_types(cli.build_parser()), *background_types(_reco().build_parser()[0])]
    assert {"eclreco simulate", "eclreco bench"} <= {prog for prog, _ in found} and len(found) == 3, found
    assert all(t is SIM_BACKGROUND for _, t in found), found


@pytest.mark.parametrize("argv,option", [
    (["hlt", "worker", "--distributor", "foo"], "--distributor"),
    (["hlt", "worker", "--collector", "tcp://127.0.0.1:99999"], "--collector"),
    (["hlt", "status", "--control", "foo"], "--control"),
    (["hlt", "control", "stop", "--control", "tcp://*:99999"], "--control"),
    (["hlt", "collector", "--collector-addr", "tcp://*:99999"], "--collector-addr"),
    (["hlt", "collector", "--control", "127.0.0.1:5557"], "--control"),
    (["hlt", "distributor", "--input", "foo"], "--input"),
    (["hlt", "distributor", "--workers-addr", "tcp://127.0.0.1:x"], "--workers-addr"),
    (["hlt", "run", "--collector-addr", "foo"], "--collector-addr"),
    (["daq-emulator", "--input", __file__, "--connect", "foo"], "--connect"),
    (["daq-emulator", "--input", __file__, "--bind", "tcp://*:99999"], "--bind"),
    # an address only connected to, with a wildcard: libzmq's bare 'ZMQError: Invalid argument'
    (["hlt", "status", "--control", "tcp://127.0.0.1:*"], "--control"),
    (["hlt", "control", "stop", "--control", "tcp://*:5557"], "--control"),
    (["hlt", "worker", "--distributor", "tcp://127.0.0.1:*"], "--distributor"),
    (["daq-emulator", "--input", __file__, "--connect", "tcp://*:5555"], "--connect"),
    (["hlt", "distributor", "--metrics-host", "999.1.1.1"], "--metrics-host"),
    (["hlt", "collector", "--metrics-host", "nosuch.invalid"], "--metrics-host"),
    (["hlt", "worker", "--metrics-host", "nosuch.invalid"], "--metrics-host"),
    (["hlt", "run", "--metrics-host", "nosuch.invalid"], "--metrics-host"),
])
def test_a_bad_address_is_refused_naming_its_option(argv, option, capsys):
    """`hlt status --control foo`, `hlt collector --collector-addr tcp://*:99999` or `daq-emulator --connect foo`
    said `error: ValueError: ZeroMQ address 'foo' has no transport` from the socket's attach, naming no option
    (daq-emulator after its first line), and a --metrics-host that does not resolve was an OSError of the
    exporter, in a role after its sockets. The parser refuses both (cli_types.ADDRESS, metrics_host): one
    line naming the option, exit 2, nothing started."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", out + err
    assert err.splitlines()[-1].startswith(f"eclreco {' '.join(argv[:2] if argv[0] == 'hlt' else argv[:1])}: "
                                           f"error: argument {option}: "), err
    assert "Traceback" not in err and "ValueError" not in err


def test_an_address_connected_to_may_not_be_a_wildcard(tmp_path):
    """hlt run's roles connect to its --control, --workers-addr and --collector-addr, and a collector to its
    --control: with port 0 or a wildcard (tcp://127.0.0.1:0, tcp://*:5556) the farm started and waited on a
    connection to nothing (the collector, alone, for ever). The parser refuses them (cli_types.CONNECT_ADDRESS),
    one line naming the option, exit 2, nothing started."""
    import subprocess

    for argv, option in ((["hlt", "collector", "--control", "tcp://127.0.0.1:0", "--metrics-port", "-1", "--sched",
                           "normal", "--collector-addr", "tcp://127.0.0.1:0"], "--control"),
                         (["hlt", "run", "--control", "tcp://127.0.0.1:0"], "--control"),
                         (["hlt", "run", "--workers-addr", "tcp://*:5556"], "--workers-addr"),
                         (["hlt", "run", "--collector-addr", "tcp://127.0.0.1:*"], "--collector-addr")):
        r = subprocess.run([sys.executable, "-m", "eclreco.cli", *argv, "--input" if argv[1] == "run" else "-o",
                            "tcp://127.0.0.1:0" if argv[1] == "run" else "x.root"], capture_output=True, text=True,
                           timeout=30, cwd=tmp_path)
        assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
        assert r.stderr.splitlines()[-1].startswith(f"eclreco hlt {argv[1]}: error: argument {option}: ZeroMQ address ")
        assert "is connected to: name its host and port" in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []


def test_reco_refuses_a_metrics_host_it_cannot_serve_on_naming_the_option(capsys):
    with pytest.raises(SystemExit) as e:
        _reco().parse_args(["--metrics-port", "9460", "--metrics-host", "nosuch.invalid"])
    assert e.value.code == 2
    assert "error: argument --metrics-host: cannot serve metrics on 'nosuch.invalid'" in capsys.readouterr().err


def test_an_output_file_in_a_folder_that_takes_no_file_is_refused_naming_its_option(tmp_path, capsys):
    """An output file in a folder where no file can be made (here /proc; a read-only file system, a folder of
    another user) passed the checks of the folder's existence: `reco.py -o` (or --rejected) failed at its
    module's initialize, exit 1, with 'RootOutput.initialize failed: RuntimeError: cannot create output file
    ... (at .../root_output.py:166 in initialize ...)', `hlt run -o` started a farm whose collector failed and
    was restarted until the workers gave up (exit 1, a minute later), `hlt collector -o` registered and hung,
    `hlt merge -o` and `quarantine --extract` said '[Errno 2] No such file or directory: /proc/.m.PID.partial.root'
    (a temporary name the user never gave). Each is now one line naming the option, exit 2, before any work."""
    import subprocess

    raw = tmp_path / "in.msgpack"
    write_raw_file(raw, encode_events("array30", 0, 1, [0], [0, 1], [100], [5000], [0], [0]))
    why = "cannot write into '/proc' (No such file or directory)"
    for argv, option in ((["-i", str(raw), "--no-cnn", "-o", "/proc/r.root"], "-o"),
                         (["-i", str(raw), "--no-cnn", "--rejected", "/proc/q.msgpack"], "--rejected")):
        with pytest.raises(SystemExit) as e:
            _reco().parse_args(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: {option} '{argv[-1]}': {why}")
    for argv, option in ((["hlt", "run", "-o", "/proc/r.root", "--input", "tcp://127.0.0.1:0", "--control",
                           free_address()], "--output"),
                         (["hlt", "merge", str(raw), "-o", "/proc/m.root"], "-o"),
                         (["quarantine", str(raw), "--extract", "/proc/x"], "--extract")):
        out = [a for a in argv if a.startswith("/proc")][0]
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # hlt run's refusals
            rc = e.code
        assert rc == 2
        assert capsys.readouterr().err == f"eclreco {' '.join(argv[:2] if argv[0] == 'hlt' else argv[:1])}: " \
                                          f"error: {option} '{out}': {why}\n"
    r = subprocess.run([sys.executable, "-m", "eclreco.cli", "hlt", "collector", "-o", "/proc/r.root",
                        "--metrics-port", "-1", "--collector-addr", "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:9"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr == f"eclreco hlt collector: error: --output '/proc/r.root': {why}\n", r.stderr
    assert os.listdir(tmp_path) == ["in.msgpack"]


def test_a_worker_steering_file_that_is_missing_or_no_python_is_refused(tmp_path, capsys):
    """`eclreco hlt worker typo.py` said `error: [Errno 2] No such file or directory: '/abs/typo.py'`, and
    `hlt run --worker-steering raw.msgpack` (or a .py with a syntax error) started the farm, whose every worker
    died on it and was restarted until --max-restarts ran out (exit 1). Both are now one line naming the file and
    what gave it, exit 2, before anything starts (the file is compiled, not run)."""
    import subprocess

    bad = tmp_path / "bad.py"
    bad.write_text("x = (\n")
    raw = tmp_path / "raw.py"  # a raw file under a .py name: hlt worker takes a first argument *.py as STEERING
    write_raw_file(raw, encode_events("array30", 0, 1, [0], [0, 1], [100], [5000], [0], [0]))
    for steering, why in (("typo.py", "no such file"), (str(bad), "not a Python steering file (SyntaxError: "),
                          (str(raw), "not a Python steering file (")):
        with pytest.raises(SystemExit) as e:
            cli.main(["hlt", "worker", steering, "--metrics-port", "-1"])
        assert e.value.code == 2
        assert capsys.readouterr().err.startswith(f"eclreco hlt worker: error: STEERING {steering!r}: {why}")
    r = subprocess.run([sys.executable, "-m", "eclreco.cli", "hlt", "run", "-n", "1", "--max-restarts", "0",
                        "--worker-steering", str(raw), "--input", "tcp://127.0.0.1:0", "--control", free_address(),
                        "--metrics-base-port", "-1", "-o", str(tmp_path / "farm.root")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.startswith(f"eclreco hlt run: error: --worker-steering {str(raw)!r}: not a Python steering file")
    assert r.stderr.count("\n") == 1, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.py", "raw.py"]


def test_hlt_control_without_a_farm_fails_in_seconds(capsys):
    """`hlt control stop` at an address where no farm answers: an error after the 5 s STATUS probe,
    not after the 180 s that STOP itself may take (found by a newcomer's walk-through)."""
    import time

    from eclreco.hlt.run import free_address

    t0 = time.monotonic()
    assert cli.main(["hlt", "control", "stop", "--control", free_address()]) == 1
    assert time.monotonic() - t0 < 60
    err = capsys.readouterr().err
    assert "no answer from tcp://127.0.0.1:" in err and "to STATUS within 5 s" in err, err  # the probe, not STOP


def test_reco_py_refuses_contradictions_and_an_output_over_its_input(tmp_path, capsys):
    reco = _reco()
    raw = tmp_path / "raw.msgpack"
    write_raw_file(raw, encode_events("array30", 0, 1, [0, 1], [0, 0, 0], [], [], [], []))
    before = raw.read_bytes()
    for argv in (["-i", str(raw), "--events", "10"], ["--no-cnn", "--model", "m.onnx"], ["-n", "-1"],
                 ["-i", str(raw), "--conditions", str(tmp_path / "missing.json")],
                 # a misspelt directory is no new directory tree (-o made one)
                 ["-i", str(raw), "-o", str(tmp_path / "typo" / "x.root")],
                 ["-i", str(raw), "--rejected", str(tmp_path / "typo" / "q.msgpack")],
                 # options of a part the job does not run (they were ignored)
                 ["-i", str(raw), "--detector", "array30"], ["-i", str(raw), "--connect"],
                 ["--cluster-columns", "energy"], ["--filter-cluster-energy", "0.2"],
                 ["--filter-cluster-energy", "0.1"],  # the default given: it passed unnoticed
                 ["-i", "tcp://127.0.0.1:5555", "--metrics-linger", "5"],
                 ["--detector", "array30", "--particle", "generic"]):  # exit 1 at initialize, outputs made
        with pytest.raises(SystemExit) as e:
            reco.main(argv)
        assert e.value.code == 2
    assert reco.main(["-i", str(raw), "-o", str(raw)]) == 2
    assert reco.main(["-i", str(raw), "--rejected", str(raw)]) == 2
    for argv in (["-i", str(raw), "--threads", "0"], ["--events", "-3"], ["--progress", "-1"],
                 ["-i", str(tmp_path / "missing.msgpack")]):  # exit 1 before, some with a module's message
        with pytest.raises(SystemExit) as e:
            reco.main(argv)
        assert e.value.code == 2, argv
    # libzmq would take port 99999 for 34463 and wait there for input nobody sends
    with pytest.raises(SystemExit) as e:
        reco.main(["-i", "tcp://127.0.0.1:99999", "--idle-timeout", "1"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert "use another file" in err and "--threads: must be 1..256, not 0" in err and "use -n N" in err
    assert "missing.msgpack' is not a file" in err
    assert "--detector: this option is for the embedded simulation, which --input replaces" in err
    assert "--connect: this option is for a ZeroMQ input" in err and "there is no -o" in err
    assert "--metrics-linger keeps the metrics served after the run: there is no --metrics-port" in err
    assert "--filter-cluster-energy sets which clusters --min-clusters and --min-energy-sum count" in err
    assert "'tcp://127.0.0.1:99999': the port must be 0..65535 or *" in err and "Module" not in out
    assert "--particle generic: generic events exist for belle2-ecl only (--detector array30: gamma or pi0)" in err
    assert raw.read_bytes() == before and not (tmp_path / "typo").exists()


@pytest.mark.parametrize("argv,message", [
    # SimulationInput's and ZMQInput's ranges, checked only at their initialize: exit 1 and a module's
    # message after the job had started ('SimulationInput.initialize failed: ...'), or (--background -1,
    # the module's "detector default") a job at nominal background and exit 0
    (["--energy", "-1"], "argument --energy: must be a finite number > 0 and < 1000, not -1"),
    (["--energy", "1000"], "argument --energy: must be a finite number > 0 and < 1000, not 1000"),
    (["--background", "-1"], "argument --background: must be a finite number in 0..100, not -1"),
    (["--seed", "-1"], "argument --seed: must be 0..9223372036854775807, not -1"),
    (["--seed", str(2**64)], "argument --seed: must be 0..9223372036854775807"),
    (["-i", "tcp://127.0.0.1:5555", "--idle-timeout", "-1"], "argument --idle-timeout: must be a finite number >= 0"),
    (["-i", "tcp://127.0.0.1:5555", "--idle-timeout", "inf"], "argument --idle-timeout: must be a finite number >= 0"),
    (["-i", "tcp://127.0.0.1:5555", "--max-latency", "60001"],
     "argument --max-latency: must be a finite number in 0..60000, not 60001"),
    (["-i", "tcp://127.0.0.1:5555", "--max-message-bytes", "-1"], "argument --max-message-bytes: must be >= 0, not -1"),
    (["-i", "tcp://127.0.0.1:5555", "--refuse-message-bytes", "-1"],
     "argument --refuse-message-bytes: must be >= 0, not -1"),
    (["-i", "tcp://127.0.0.1:5555", "--max-message-bytes", "100", "--refuse-message-bytes", "50"],
     "--refuse-message-bytes (50) must exceed --max-message-bytes (100) or be 0"),
])
def test_reco_py_numbers_out_of_range_exit_2_naming_the_option(argv, message, tmp_path, capsys):
    """Each number reco.py passes to a module is refused at the command line when the module would
    refuse it: one line naming the option, exit 2, before any module starts or file is written."""
    reco = _reco()
    out = tmp_path / "x.root"
    with pytest.raises(SystemExit) as e:
        reco.main(argv + ["--no-cnn", "-o", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_reco_py_refuses_files_and_addresses_its_modules_would_refuse(tmp_path, capsys):
    """A --model that is no file, an -o or --rejected that is a directory, a tcp:// port above 65535 and a
    ROOT file given as -i got past the command line: the first three exited 1 with the message of a
    module's initialize ('ECLEnergyCorrection.initialize failed: ModelError: ... (at .../x.py:65 in
    load_session ...)'), a ROOT file ran, rejected its every 'record' into a quarantine file as large as
    itself, wrote an empty -o and exited 1. Each is now one line naming the option, exit 2, nothing
    written. So is an input address with a wildcard port."""
    reco = _reco()
    raw = tmp_path / "raw.msgpack"
    write_raw_file(raw, encode_events("array30", 0, 1, [0], [0, 1], [100], [5000], [0], [0]))
    (tmp_path / "dir").mkdir()
    root = tmp_path / "reco.root"
    root.write_bytes(b"root\x00\x00\xf4\x4a" + bytes(200))  # how every ROOT file begins
    cases = [(["-i", str(raw), "--model", str(tmp_path / "missing.onnx")], "--model '%s' is not a file"
              % (tmp_path / "missing.onnx")),
             (["-i", str(raw), "--model", str(tmp_path / "dir")], "is not a file"),
             (["-i", str(raw), "-o", str(tmp_path / "dir")], "-o '%s' is a directory: name a file in it"
              % (tmp_path / "dir")),
             (["-i", str(raw), "--rejected", str(tmp_path / "dir")], "--rejected '%s' is a directory"
              % (tmp_path / "dir")),
             (["-i", str(root), "-o", str(tmp_path / "out.root")],
              "is a ROOT file (an output of reco.py): -i reads raw files (.msgpack)"),
             (["-i", "tcp://127.0.0.1", "--idle-timeout", "1"], "-i: ZeroMQ address 'tcp://127.0.0.1': the port must be"),
             # libzmq's 'ZMQError: No such file or directory for ipc path', exit 1 from ZMQInput's initialize
             (["-i", f"ipc://{tmp_path}/typo/sock", "--idle-timeout", "1"],
              f"-i 'ipc://{tmp_path}/typo/sock': no directory '{tmp_path}/typo' for the socket file")]
    # a port (or ipc path) libzmq picks at random: reco.py bound one and waited there, saying nothing, for
    # senders that could not know it (with --connect, libzmq's 'Invalid argument', exit 1)
    for address in ("tcp://127.0.0.1:*", "tcp://127.0.0.1:0", "tcp://*:00", "ipc://*"):
        for connect in ([], ["--connect"]):
            cases.append((["-i", address, "--idle-timeout", "1", *connect],
                          f"-i '{address}': name the port: a wildcard stands for one chosen at random"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            reco.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "raw.msgpack", "reco.root"]
    assert not os.listdir(tmp_path / "dir")


def test_reco_py_refuses_an_output_over_its_model_conditions_or_table(tmp_path, capsys):
    """`reco.py --model m.onnx -o m.onnx` loaded the network, then RootOutput replaced it by the ROOT file:
    a trained model lost and exit 0 (likewise --conditions c.json -o c.json, or a leakage table); the
    framework's check of an output over an input knew only RawFileInput's filename. It now knows every
    file parameter a module reads, and refuses before anything is opened."""
    import shutil

    import eclreco
    from eclreco import rawdata

    reco = _reco()
    raw = tmp_path / "raw.msgpack"
    write_raw_file(raw, encode_events("array30", 0, 1, [0], [0, 1], [100], [5000], [0], [0]))
    model = tmp_path / "m.onnx"
    shutil.copy(os.path.join(MODELS, "array30.onnx"), model)
    cond = tmp_path / "c.json"
    rawdata.write_conditions(cond, "array30")
    kept = {p: p.read_bytes() for p in (model, cond)}
    for argv, message in (
            (["--model", str(model), "-o", str(model)], f"RootOutput writes '{model}', which ECLEnergyCorrection reads"),
            (["--conditions", str(cond), "--rejected", str(cond)], f"RejectedOutput writes '{cond}', which "
                                                                    "ECLUnpacker reads")):
        assert reco.main(["-i", str(raw), "--threads", "1", *argv]) == 2, argv
        assert message in capsys.readouterr().err
    assert all(p.read_bytes() == b for p, b in kept.items())
    table = tmp_path / "table.npz"
    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=str(raw))
    path.add_module("ECLUnpacker")
    path.add_module("ECLClusterizer")
    path.add_module("ECLLeakageCorrection", table=str(table))
    path.add_module("RootOutput", filename=str(table))
    with pytest.raises(ValueError, match="which ECLLeakageCorrection reads in the same path"):
        eclreco.process(path, install_signal_handlers=False)
    assert not table.exists()


def test_reco_py_fails_when_every_event_fails(tmp_path, capsys):
    """--model of the other detector on a raw file (whose events say their detector): every event gets a
    module error; the job says so and exits 1 (it exited 0 with a module error on each event)."""
    from eclreco.sim import simulate

    reco = _reco()
    ev = simulate(detector="belle2-ecl", n_events=20, particle="generic", background=1.0, seed=3)
    raw = tmp_path / "raw.msgpack"
    write_raw_file(raw, encode_events("belle2-ecl", 0, 1, list(range(20)), ev.offsets, ev.cell, ev.amplitude,
                                      ev.time_ticks, ev.quality))
    rc = reco.main(["-i", str(raw), "--model", os.path.join(MODELS, "array30.onnx"), "--threads", "1", "--no-dqm",
                    "--rejected", ""])
    assert rc == 1 and "every event failed in a module" in capsys.readouterr().err


def test_reco_py_refuses_a_model_of_the_simulated_detector_s_other_at_initialize(capsys):
    """reco.py knows the detector it simulates, but did not tell ECLEnergyCorrection: a --model of the other
    detector (a physicist's new array30 network on belle2-ecl events) simulated and reconstructed the whole
    sample (20000 events by default), each event failing, before it said so. It is now an error at
    initialize that names the file, before the first event."""
    import eclreco

    reco = _reco()
    model = os.path.join(MODELS, "array30.onnx")
    rc = reco.main(["--events", "300", "--detector", "belle2-ecl", "--model", model, "--threads", "1", "--no-dqm"])
    err = capsys.readouterr().err
    assert rc == 1 and "ECLEnergyCorrection.initialize failed" in err, err
    assert f"model '{model}' was trained for detector 'array30', the events are 'belle2-ecl'" in err
    assert eclreco.statistics.summary()["received"] == 0
    assert reco.main(["--events", "20", "--detector", "array30", "--model", model, "--threads", "1", "--no-dqm"]) == 0


class _PassThrough:
    """a module of a steering file after the clusterizer: the columns of ECLClusters are not known before
    the first batch (it may add one), so RootOutput's cluster_columns are checked there"""


def test_reco_py_fails_when_every_event_the_filter_kept_fails(tmp_path, capsys):
    """A cluster column that ECLClusters lacks with an event filter: every kept event fails in RootOutput, the
    discarded ones never reach it; the job exited 0 with an empty file (errors < processed). (reco.py refuses a
    misspelt --cluster-columns before the job: here a steering file's module hides the columns until then.)"""
    import eclreco

    class PassThrough(eclreco.Module):
        __doc__ = _PassThrough.__doc__

    reco = _reco()
    args = reco.parse_args(["--events", "40", "--threads", "1", "--no-dqm", "--min-energy-sum", "1.0"])
    path = eclreco.create_path()
    for m in reco.build_path(args).modules[:-1]:  # without Progress
        path.add_module(m)
    path.add_module(PassThrough())
    path.add_module("RootOutput", filename=str(tmp_path / "x.root"), cluster_columns=["energy", "latt"])
    rc = reco.run(args, path)
    s = eclreco.statistics.summary()
    assert 0 < s["discarded"] < s["processed"] and s["errors"] == s["processed"] - s["discarded"], s
    assert rc == 1 and "every event failed in a module (of those the event filter kept)" in capsys.readouterr().err
    assert eclreco.job_failure({"processed": 10, "discarded": 10}) == ""  # a filter that kept nothing: no error


def test_a_misspelt_cluster_column_is_refused_before_the_job(tmp_path, capsys):
    """`reco.py -o x.root --cluster-columns energy,latt` failed in RootOutput on every batch (exit 1 after the
    run, an empty file); `hlt run` started a farm whose collector did the same, and `hlt worker` sent the columns
    it had (latt none). Each refuses the name now (exit 2), listing the clusterizer's columns; a valid list
    and a column the CNN rewrites (energy) pass."""
    import subprocess

    reco = _reco()
    out = tmp_path / "x.root"
    assert reco.main(["--events", "20", "-o", str(out), "--cluster-columns", "energy,latt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reco.py: error: --cluster-columns: 'latt' is not a column of ECLClusters; its columns "
                          "of one value per cluster are energy_raw, energy, "), err
    assert "second_moment, lat\n" in err and not out.exists()
    assert reco.main(["--events", "20", "--threads", "1", "-o", str(out), "--cluster-columns",
                      "energy,lat,n_maxima", "--progress", "0"]) == 0
    capsys.readouterr()
    eclreco = [sys.executable, "-m", "eclreco.cli"]
    for role, extra in (("run", ["-o", str(tmp_path / "farm.root"), "--input", "tcp://127.0.0.1:0",
                                 "--control", free_address()]),
                        ("worker", ["--metrics-port", "-1", "--rejected", "", "--distributor", free_address(),
                                    "--collector", free_address()])):
        r = subprocess.run(eclreco + ["hlt", role, *extra, "--cluster-columns", "energy,latt"], capture_output=True,
                           text=True, cwd=tmp_path, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith(f"eclreco hlt {role}: error: --cluster-columns: 'latt' is "
                                                         "not a column of ECLClusters"), (role, r.stderr)
        assert not os.path.exists(tmp_path / "farm.root")


def test_validate_on_a_small_sample_writes_strict_json(tmp_path):
    """`eclreco validate --max-events 40`: windows of a few photons have no defined width ratio; the
    report says null there (it wrote bare NaN tokens, which strict JSON parsers refuse, after a
    divide-by-zero warning) and keeps the numbers that are defined."""
    import json
    import warnings

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert cli.main(["validate", "--detector", "array30", "-o", str(tmp_path), "--max-events", "40",
                         "--g4", os.path.join(REPO, "tests", "data", "g4_array30_heldout.npz"), "--quiet"]) == 0
    report = json.loads((tmp_path / "validation_array30.json").read_text(), parse_constant=refuse)
    # the chain that made the sample (it named two of its five modules)
    assert report["chain"] == "wire+ECLUnpacker+ECLClusterizer+ECLLeakageCorrection+ECLEnergyCorrection"
    rows = report["tables"]["bg0"]
    assert any(r["sigma68_ratio"]["ratio"] is None for r in rows), rows  # windows of 0 or 1 photon
    assert any(isinstance(r["cnn"]["mean"], float) for r in rows), rows


def test_reco_py_fails_when_every_event_is_rejected(tmp_path, capsys, monkeypatch):
    """Raw data whose every record is rejected, nothing processed: the job says so and exits 1 (it exited 0
    with an empty output). A file that is not raw data of the wire format at all (a text: each byte some
    MessagePack) ran the same way, rejecting 13 'events' into a quarantine file beside an empty -o; it is
    refused before the job, as daq-emulator --input refuses it: one line naming -i, exit 2, nothing written."""
    import msgpack

    monkeypatch.chdir(tmp_path)  # without -o the job keeps what it rejects in ./rejected.msgpack
    reco = _reco()
    text = tmp_path / "notes.txt"
    text.write_text("not raw data\n")
    with pytest.raises(SystemExit) as e:
        reco.main(["-i", str(text), "--threads", "1", "-o", str(tmp_path / "t.root")])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: -i '{text}': not a raw file of the wire format: its first message is no envelope (the message is "
        "a MessagePack int, not a map)")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    wrong = tmp_path / "v2.msgpack"  # envelopes of another version: each rejected
    write_raw_file(wrong, [msgpack.packb({"v": 2})] * 3)
    assert reco.main(["-i", str(wrong), "--threads", "1"]) == 1
    assert "every event was rejected (bad_version 3)" in capsys.readouterr().err
    raw = tmp_path / "raw.msgpack"  # one good event with one bad: a job that did its work
    write_raw_file(raw, encode_events("array30", 0, 1, [0, 1], [0, 0, 0], [], [], [], []))
    with open(raw, "ab") as f:
        f.write(b"x")
    assert reco.main(["-i", str(raw), "--threads", "1", "--no-cnn"]) == 0
    empty = tmp_path / "empty.msgpack"  # an aborted run's file: no error, but said
    empty.write_bytes(b"")
    capsys.readouterr()
    assert reco.main(["-i", str(empty), "--threads", "1", "-o", str(tmp_path / "e.root")]) == 0
    assert "holds no events; " in capsys.readouterr().err


def test_reco_py_cut_short_by_a_signal_ends_by_it(tmp_path):
    """SIGTERM in the middle of a finite input (here the simulation): the output is closed and valid, the
    job says where it stopped and ends by the same signal, so that a batch system or a shell (143) sees a
    partial job (it exited 0 as if complete)."""
    import signal
    import subprocess
    import time

    import uproot

    out = tmp_path / "part.root"
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "steering", "reco.py"), "--events", "1000000",
                          "--threads", "1", "--batch-size", "64", "--no-cnn", "--progress", "0.2", "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not p.stdout.readline().startswith("[Progress]"):  # the event loop runs, its handlers installed
        assert p.poll() is None and time.monotonic() - t0 < 60
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGTERM, stdout + stderr
    assert "reco.py: stopped by SIGTERM after " in stderr and "before the end of the input" in stderr
    n = int(stderr.split("stopped by SIGTERM after ")[1].split()[0])
    with uproot.open(out) as f:
        assert 0 < f["events"].num_entries == n < 1000000


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
        above = (e_raw >= 0.05) & (e_raw <= 6.0)  # the CNN's domain (ECLEnergyCorrection min/max_energy_gev)
        assert above.sum() > 400 and np.mean(e[above] != e_raw[above]) > 0.9
        h = f["dqm/gg_mass"]
        counts, edges = h.values(), h.axis().edges()
        assert counts.sum() > 200
        peak = 0.5 * (edges[np.argmax(counts)] + edges[np.argmax(counts) + 1])
        assert 0.120 < peak < 0.150, peak  # GeV; m(pi0) = 0.135


def test_reco_py_conditions_channel_map_end_to_end(tmp_path):
    """--conditions: the same events written by a producer whose cables follow another channel map
    (a quarter of the crystals permuted among their addresses) give, with that map in the
    conditions file, exactly the ROOT file the linear map gives; without it, other clusters."""
    import numpy as np
    import uproot

    from eclreco import rawdata
    from eclreco.bench import make_raw_file

    reco = _reco()
    linear = tmp_path / "linear.msgpack"
    make_raw_file(str(linear), 300, background=1.0, seed=8)
    rng = np.random.default_rng(2)
    cmap = rawdata.linear_channel_map("belle2-ecl")
    moved = rng.choice(8736, 2184, replace=False)
    cmap[moved] = cmap[rng.permutation(moved)]
    mapped = []
    for m in rawdata.read_raw_file(linear):  # the same digits, under the other map
        env = rawdata.decode_envelope(m)
        d = rawdata.unpack_payload(env["ecl"], "belle2-ecl")
        ticks = np.rint(d["time"].astype(np.float64) / rawdata.TICK_NS).astype(np.int64)
        mapped += rawdata.encode_events("belle2-ecl", env["exp"], env["run"], [env["evt"]], [0, len(d["cell"])],
                                        d["cell"], d["amplitude"], ticks, d["quality"], channel_map=cmap)
    rawdata.write_raw_file(tmp_path / "mapped.msgpack", mapped)
    cond = tmp_path / "cond.json"
    rawdata.write_conditions(cond, "belle2-ecl", channel_map=cmap)
    common = ["--threads", "1", "--no-dqm", "--progress", "0"]
    assert reco.main(["-i", str(linear), "-o", str(tmp_path / "a.root"), *common]) == 0
    assert reco.main(["-i", str(tmp_path / "mapped.msgpack"), "--conditions", str(cond),
                      "-o", str(tmp_path / "b.root"), *common]) == 0
    assert reco.main(["-i", str(tmp_path / "mapped.msgpack"), "-o", str(tmp_path / "c.root"), *common]) == 0
    with uproot.open(tmp_path / "a.root") as a, uproot.open(tmp_path / "b.root") as b, \
            uproot.open(tmp_path / "c.root") as c:
        ta, tb, tc = a["events"], b["events"], c["events"]
        assert ta.num_entries == tb.num_entries == 300
        for name in ta.keys():
            np.testing.assert_array_equal(np.concatenate(ta[name].array(library="np")) if name.startswith("cluster_")
                                          else ta[name].array(library="np"),
                                          np.concatenate(tb[name].array(library="np")) if name.startswith("cluster_")
                                          else tb[name].array(library="np"), err_msg=name)
        assert np.concatenate(ta["cluster_seed_cell"].array(library="np")).size > 1000
        assert not np.array_equal(np.concatenate(ta["cluster_seed_cell"].array(library="np")),
                                  np.concatenate(tc["cluster_seed_cell"].array(library="np")))


def test_reco_py_metadata_records_the_conditions_file_s_digest(tmp_path):
    """The file's metadata gives the conditions file as ECLUnpacker read it, path and SHA-256, beside the CNN's
    model and its SHA-256: it gave the path only (the `conditions` parameter), and a file changed after the job
    could not be told apart."""
    import hashlib

    import uproot

    from eclreco import rawdata
    from eclreco.modules.root_output import read_metadata

    reco = _reco()
    raw = tmp_path / "raw.msgpack"
    write_raw_file(raw, encode_events("array30", 0, 1, [0, 1], [0, 1, 2], [100, 101], [5000, 4000], [0, 0], [0, 0]))
    cond = tmp_path / "c.json"
    rawdata.write_conditions(cond, "array30", gain=[1.05] * 900)
    sha = hashlib.sha256(cond.read_bytes()).hexdigest()
    out = tmp_path / "out.root"
    assert reco.main(["-i", str(raw), "--conditions", str(cond), "-o", str(out), "--threads", "1", "--no-dqm",
                      "--progress", "0", "--rejected", ""]) == 0
    cond.write_bytes(cond.read_bytes().replace(b"1.05", b"1.06"))  # changed after the job
    with uproot.open(out) as f:
        meta = read_metadata(f)
    modules = {m["module"]: m for m in meta["path"]}
    assert modules["ECLUnpacker"]["params"]["conditions"] == str(cond)
    assert modules["ECLUnpacker"]["conditions"] == {"path": str(cond), "sha256": sha}
    assert modules["ECLUnpacker"]["conditions"]["sha256"] != hashlib.sha256(cond.read_bytes()).hexdigest()
    assert set(modules["ECLEnergyCorrection"]["models"]["array30"]) == {"path", "sha256"}
    assert "conditions" not in modules["ECLClusterizer"]


def test_reco_py_metadata_records_the_raw_file_s_identity(tmp_path):
    """The file's metadata gives the raw file RawFileInput read: path, size, mtime and the SHA-256 of its first and
    last 64 KiB (not of the whole file: a GB would cost seconds at start-up). It gave the `filename` parameter only,
    and two raw files of one name made outputs that could not be told apart."""
    import datetime
    import hashlib

    import uproot

    from eclreco.modules.root_output import read_metadata

    reco = _reco()
    raw = tmp_path / "raw.msgpack"
    out = tmp_path / "out.root"
    identities = []
    for run in (1, 2):  # one name, two files
        n = 4000  # events without digits: ~200 kB, more than the 128 KiB hashed
        write_raw_file(raw, encode_events("array30", 0, run, list(range(n)), [0] * (n + 1), [], [], [], []))
        data, st = raw.read_bytes(), raw.stat()
        assert len(data) > 2 * 65536
        assert reco.main(["-i", str(raw), "-o", str(out), "--threads", "1", "--no-dqm", "--no-cnn", "--progress", "0",
                          "--rejected", ""]) == 0
        with uproot.open(out) as f:
            meta = read_metadata(f)
        entry = next(m for m in meta["path"] if m["module"] == "RawFileInput")
        assert entry["params"]["filename"] == str(raw)
        when = datetime.datetime.fromtimestamp(st.st_mtime_ns // 10**9, datetime.timezone.utc)
        assert entry["input"] == {
            "path": str(raw), "size": str(len(data)), "mtime_ns": str(st.st_mtime_ns),
            "mtime_utc": when.strftime("%Y-%m-%dT%H:%M:%S") + f".{st.st_mtime_ns % 10**9:09d}Z",
            "sha256_head_tail_64k": hashlib.sha256(data[:65536] + data[-65536:]).hexdigest()}
        assert entry["input"]["sha256_head_tail_64k"] != hashlib.sha256(data).hexdigest()
        identities.append(entry["input"])
    assert identities[0]["path"] == identities[1]["path"]
    assert identities[0]["sha256_head_tail_64k"] != identities[1]["sha256_head_tail_64k"]


def test_raw_file_identity_of_a_small_file_is_its_sha256(tmp_path):
    """A raw file of at most 128 KiB: its first and last 64 KiB do not overlap, the digest is the whole file's."""
    import hashlib

    import eclreco

    raw = tmp_path / "raw.msgpack"
    write_raw_file(raw, encode_events("array30", 0, 1, [0, 1], [0, 1, 2], [100, 101], [5000, 4000], [0, 0], [0, 0]))
    m = eclreco.create_module("RawFileInput")
    m.set_param("filename", str(tmp_path / "." / "raw.msgpack"))
    assert m.provenance() == {}
    m.initialize()
    m.terminate()  # kept: RootOutput writes the metadata after the modules before it have terminated
    ident = m.provenance()["input"]
    assert ident["path"] == str(raw) and ident["size"] == str(raw.stat().st_size)
    assert ident["sha256_head_tail_64k"] == hashlib.sha256(raw.read_bytes()).hexdigest()


@pytest.mark.parametrize("argv,default", [(["hlt", "control", "--help"], "control"),
                                          (["daq-emulator", "--help"], "daq")])
def test_help_shows_the_curve_name_default_once(argv, default, capsys):
    """The hlt roles' help formatter appends defaults; add_curve_arguments wrote it into the text
    too ('(default control) (default: control)'); the DAQ emulator's parser appends none."""
    import re

    with pytest.raises(SystemExit):
        cli.main(argv)
    line = " ".join(re.search(r"own key name in DIR/private[^-]*", capsys.readouterr().out).group(0).split())
    assert line.count("default") == 1 and default in line, line


def test_reco_py_simulation_defaults_follow_the_detector():
    """array30 has no generic events and its model was trained without background: `--detector array30`
    alone failed (generic) and, with --particle gamma, ran at nominal background (+20 % leading energy)."""
    reco = _reco()
    a = reco.parse_args(["--detector", "array30"])
    assert (a.particle, a.background) == ("gamma", 0.0)
    b = reco.parse_args([])
    assert (b.detector, b.particle, b.background) == ("belle2-ecl", "generic", 1.0)
    c = reco.parse_args(["--detector", "array30", "--background", "2", "--particle", "pi0"])
    assert (c.particle, c.background) == ("pi0", 2.0)


def test_reco_py_keeps_rejected_events_by_default(tmp_path, capsys, monkeypatch):
    """The wire format keeps every rejected message for inspection: reco.py -i ... counted them and
    kept none unless --rejected was given. Now OUTPUT.rejected.msgpack (rejected.msgpack without -o)
    holds them, made only when there is one (a stale one of an earlier job is removed); --rejected ''
    keeps none and says so."""
    import msgpack

    from _raw_helpers import two_digit_events

    reco = _reco()
    good = two_digit_events(6)
    bad = [msgpack.packb({"v": 2}), msgpack.packb([1, 2])]
    write_raw_file(tmp_path / "mixed.msgpack", good[:3] + bad + good[3:])
    write_raw_file(tmp_path / "clean.msgpack", good)
    out = tmp_path / "reco.root"
    quarantine = tmp_path / "reco.rejected.msgpack"
    assert reco.main(["-i", str(tmp_path / "mixed.msgpack"), "-o", str(out), "--no-cnn"]) == 0
    with open(quarantine, "rb") as f:
        records = list(msgpack.Unpacker(f, raw=False))
    assert [r["message"] for r in records] == bad
    assert f"2 rejected events kept in {quarantine}" in capsys.readouterr().out
    assert reco.main(["-i", str(tmp_path / "clean.msgpack"), "-o", str(out), "--no-cnn"]) == 0
    assert not quarantine.exists()  # the earlier job's records are not this one's
    monkeypatch.chdir(tmp_path)
    assert reco.main(["-i", "mixed.msgpack", "--no-cnn"]) == 0
    assert len(list(msgpack.Unpacker(open(tmp_path / "rejected.msgpack", "rb")))) == 2
    (tmp_path / "rejected.msgpack").unlink()
    capsys.readouterr()
    assert reco.main(["-i", "mixed.msgpack", "--no-cnn", "--rejected", ""]) == 0
    assert not (tmp_path / "rejected.msgpack").exists()
    assert "2 rejected events counted, not kept (--rejected '')" in capsys.readouterr().out


def test_eclreco_quarantine_lists_and_extracts_what_reco_py_rejected(tmp_path, capsys):
    """A quarantine file could only be read with a few lines of msgpack: `eclreco quarantine` counts its
    records per reason (with the first detail), lists them (--list, --reason), and writes the messages
    as sent back to back (--extract), a raw file that reco.py reads again, rejecting them again."""
    import json

    import msgpack

    from _raw_helpers import two_digit_events

    reco = _reco()
    good = two_digit_events(4)
    bad = [msgpack.packb({"v": 2}), msgpack.packb([1, 2]), msgpack.packb({"v": 2, "x": 1})]
    write_raw_file(tmp_path / "mixed.msgpack", good[:2] + bad + good[2:])
    assert reco.main(["-i", str(tmp_path / "mixed.msgpack"), "-o", str(tmp_path / "r.root"), "--no-cnn"]) == 0
    quarantine = str(tmp_path / "r.rejected.msgpack")
    capsys.readouterr()
    assert cli.main(["quarantine", quarantine, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 3 and summary["bytes"] == sum(map(len, bad))
    assert summary["by_reason"] == {"bad_version": 2, "not_a_map": 1}, summary
    assert cli.main(["quarantine", quarantine]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 rejected events") and "bad_version" in out and "not_a_map" in out, out
    assert cli.main(["quarantine", quarantine, "--list", "--reason", "bad_version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(" bad_version " in line for line in lines), lines
    extracted = tmp_path / "again.msgpack"
    assert cli.main(["quarantine", quarantine, "--extract", str(extracted)]) == 0
    from eclreco.rawdata import read_raw_file

    assert read_raw_file(extracted) == bad
    # a file cut short, or one that is no quarantine file, is an error that says where
    with open(quarantine, "rb") as f:
        data = f.read()
    (tmp_path / "cut.msgpack").write_bytes(data[:-3])
    capsys.readouterr()
    assert cli.main(["quarantine", str(tmp_path / "cut.msgpack")]) == 2
    assert "ends inside a record" in capsys.readouterr().err
    assert cli.main(["quarantine", str(tmp_path / "mixed.msgpack")]) == 2
    assert "is this a quarantine file?" in capsys.readouterr().err


def test_eclreco_quarantine_columns_line_up_for_long_reasons(tmp_path, capsys):
    """The summary and --list padded the reason to 16 characters: for duplicate_collector,
    payload_not_words, missing_hit_words or bad_shaper_marker (17-19) the count and the ids moved
    right, so the columns of one summary did not line up (independent-producer audit)."""
    import struct

    import msgpack

    def envelope(evt, words):
        payload = struct.pack(f"<{len(words)}I", *words)
        return msgpack.packb({"v": 1, "exp": 0, "run": 1, "evt": evt, "det": "array30", "ecl": payload},
                             use_bin_type=True)

    block, shaper = (lambda c, n: 0xEC << 24 | c << 16 | n), (lambda s, m: 0x10 << 24 | s << 16 | m)
    msgs = [envelope(0, [block(1, 0), block(1, 0)]),  # duplicate_collector (19 characters)
            envelope(1, [block(1, 1), shaper(1, 1)]),  # missing_hit_words (17)
            envelope(2, [block(0, 0)]),  # bad_collector_id (16)
            msgpack.packb([1])]  # not_a_map (9)
    write_raw_file(tmp_path / "bad.msgpack", msgs)
    quarantine = str(tmp_path / "r.rejected.msgpack")
    assert _reco().main(["-i", str(tmp_path / "bad.msgpack"), "-o", str(tmp_path / "r.root"), "--no-cnn"]) == 1
    capsys.readouterr()
    assert cli.main(["quarantine", quarantine]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == 4 and len({row.index("first:") for row in rows}) == 1, rows
    assert cli.main(["quarantine", quarantine, "--list"]) == 0
    rows = capsys.readouterr().out.splitlines()
    starts = {row.index(" exp 0 run 1") if "exp 0" in row else row.index(" (no exp/run/evt)") for row in rows}
    assert len(rows) == 4 and len(starts) == 1, rows


def test_eclreco_quarantine_extract_refuses_to_write_over_its_input(tmp_path, capsys):
    """`eclreco quarantine Q --extract Q` opened OUT for writing before reading the inputs: the quarantine
    file was emptied, '0 rejected events' printed and exit 0 (the rejected events were gone). Now an OUT
    that is one of the inputs (the same path, or another name of the same file) is refused, the file intact."""
    import msgpack

    q = tmp_path / "q.rejected.msgpack"
    records = [{"reason": "not_a_map", "detail": "d", "message": msgpack.packb([1, 2])},
               {"reason": "bad_version", "detail": "d", "message": msgpack.packb({"v": 2})}]
    q.write_bytes(b"".join(msgpack.packb(r) for r in records))
    before = q.read_bytes()
    os.link(q, tmp_path / "hardlink.msgpack")
    for out in (str(q), str(tmp_path / "." / q.name), str(tmp_path / "hardlink.msgpack")):
        capsys.readouterr()
        assert cli.main(["quarantine", str(q), "--extract", out]) == 2
        err = capsys.readouterr().err
        assert "is one of the quarantine files read" in err and "Traceback" not in err, err
        assert q.read_bytes() == before


def test_eclreco_quarantine_extract_names_a_directory_or_a_missing_one(tmp_path, capsys):
    """`--extract DIR` said 'IsADirectoryError: [Errno 21] Is a directory' without the option, and
    `--extract typo/out.msgpack` named a file the user never gave ('No such file or directory:
    .../typo/.out.PID.partial.msgpack', the temporary file). Both now name --extract, before any input is
    read, and write nothing."""
    import msgpack

    q = tmp_path / "q.rejected.msgpack"
    q.write_bytes(msgpack.packb({"reason": "not_a_map", "detail": "d", "message": msgpack.packb([1, 2])}))
    (tmp_path / "out").mkdir()
    for out, message in ((tmp_path / "out", f"--extract '{tmp_path / 'out'}' is a directory: name a file in it"),
                         (tmp_path / "typo" / "x.msgpack",
                          f"--extract '{tmp_path / 'typo' / 'x.msgpack'}': no directory '{tmp_path / 'typo'}'")):
        assert cli.main(["quarantine", str(q), "--extract", str(out)]) == 2
        out_, err = capsys.readouterr()
        assert message in err and "partial" not in err and not out_, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "q.rejected.msgpack"]
    assert not os.listdir(tmp_path / "out")
    # an empty OUT (an unset shell variable) extracted nothing and said only the count, exit 0
    with pytest.raises(SystemExit) as e:
        cli.main(["quarantine", str(q), "--extract", ""])
    assert e.value.code == 2 and "--extract: names no file" in capsys.readouterr().err


def test_eclreco_quarantine_json_is_one_json_object(tmp_path, capsys):
    """`--list --json` printed the list lines and then the JSON object on stdout, exit 0: `| jq` or
    json.loads failed on the first line. The two are now exclusive (argparse: exit 2 naming both)."""
    import json

    import msgpack

    q = tmp_path / "q.rejected.msgpack"
    q.write_bytes(msgpack.packb({"reason": "not_a_map", "detail": "d", "message": msgpack.packb([1, 2])}))
    with pytest.raises(SystemExit) as e:
        cli.main(["quarantine", str(q), "--list", "--json"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "argument --json: not allowed with argument --list" in err and not out, err
    assert cli.main(["quarantine", str(q), "--json", "--reason", "not_a_map"]) == 0
    assert json.loads(capsys.readouterr().out)["by_reason"] == {"not_a_map": 1}


def test_eclreco_quarantine_says_when_a_reason_matches_no_record(tmp_path, capsys):
    """`--reason oversized` (for oversize) said '0 rejected events, 0 bytes', as for a file without such
    records: a typo read as "none". A --reason that no record has is now said on stderr, with the
    reasons the files hold (the summary on stdout and exit 0 unchanged: none is an answer)."""
    import msgpack

    q = tmp_path / "q.rejected.msgpack"
    q.write_bytes(b"".join(msgpack.packb({"reason": r, "detail": "d", "message": b"x"})
                           for r in ("oversize", "truncated", "oversize")))
    assert cli.main(["quarantine", str(q), "--reason", "oversized", "--reason", "truncated"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("1 rejected event, 1 byte, in 1 file") and "truncated" in out, out
    assert "no record has reason 'oversized' (the files' reasons: oversize, truncated)" in err, err
    assert cli.main(["quarantine", str(q), "--reason", "oversize"]) == 0
    assert capsys.readouterr().err == ""


def test_eclreco_bench_removes_its_files_and_checks_plots_first(tmp_path, monkeypatch, capsys):
    """`eclreco bench` left its temporary folder behind, eclreco-bench-XXXX with the generated raw file
    (~5 kB/event: 100 MB a run at the default --events) and the ROOT output, in /tmp at every run; and
    a --plots that is a file failed at the very end, after every measurement ('FileExistsError'). The
    folder is now removed at the end (an error too), and --plots is checked before any work."""
    import json
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where this run's temporary folder goes
    (tmp_path / "tmp").mkdir()
    (tmp_path / "file").write_text("x")
    only_generate = ["--skip", "e2e", "grid", "stages", "cnn", "zmq", "farm", "plots"]
    assert cli.main(["bench", "--json", "--events", "200", "--repeat", "1", *only_generate]) == 0
    assert json.loads(capsys.readouterr().out)["input"]["events"] == 200
    assert os.listdir(tmp_path / "tmp") == []
    for plots, message in ((str(tmp_path / "file"), "is not a directory"), ("", "no directory named")):
        assert cli.main(["bench", "--events", "200", "--repeat", "1", "--plots", plots]) == 2
        out, err = capsys.readouterr()
        assert f"--plots {plots!r}" in err and message in err and "(or --skip plots)" in err and not out, err
    assert os.listdir(tmp_path / "tmp") == []


def _commands(parser, name="eclreco"):
    """(name, parser) of `eclreco` and of every command and subcommand under it."""
    import argparse

    yield name, parser
    for subs in (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)):
        for command, sub in subs.choices.items():
            yield from _commands(sub, f"{name} {command}")


def test_every_command_help_says_what_it_does_and_prints_its_defaults():
    """deployment.md: `--help` of each command prints every default, in the option's own help (`hlt keys`
    --names was in no help text; simulate's and bench's options showed none, simulate's and dqm's --help
    said nothing of what the command does). Once: a default written into the text too was shown twice.
    The steering files' too: `python steering/reco.py --help` showed none (its own formatter), and
    --detector, --seed and --metrics-host had no help text to show one in."""
    import argparse

    from eclreco.cli_types import HelpFormatter
    from eclreco.hlt.worker import add_worker_arguments

    # hlt worker's options are its steering file's (hlt_worker.py: add_worker_arguments, this formatter)
    worker = argparse.ArgumentParser(prog="eclreco hlt worker", description="a worker", formatter_class=HelpFormatter)
    add_worker_arguments(worker)
    parsers = [(n, p) for n, p in _commands(cli.build_parser()) if n != "eclreco hlt worker"]
    for name, parser in parsers + [("reco.py", _reco().build_parser()[0]), ("eclreco hlt worker", worker)]:
        assert parser.description, name
        formatter = parser._get_formatter()
        for action in parser._actions:
            if (action.default is None or action.default is False or action.default in ("", [])
                    or action.default == argparse.SUPPRESS or not action.option_strings):
                continue
            shown = str(action.default)
            assert action.help, (name, action.dest, shown)  # argparse prints no default without a help text
            text = " ".join(formatter._expand_help(action).split())
            assert re.search(rf"\bdefault:? {re.escape(shown)}", text) and text.count("default") == 1, (
                name, action.dest, text)


def test_every_option_of_every_command_has_a_help_text():
    """`eclreco train --help` and `eclreco validate --help` listed --detector and --quiet with nothing after them
    (the test above looks only at options with a default to show): what a flag does, or which detector's what,
    was nowhere in the help. Every option of every command says what it does."""
    import argparse

    missing = [(name, action.option_strings[0]) for name, parser in _commands(cli.build_parser())
               for action in parser._actions if action.option_strings and not action.help
               and action.help != argparse.SUPPRESS]
    assert missing == []


def test_eclreco_quarantine_extract_leaves_out_as_it_was_when_an_input_fails(tmp_path, capsys):
    """A missing or broken quarantine file among the inputs is an error (exit 2); OUT, written under a
    temporary name and renamed at the end, keeps what it held (before: emptied, or half-written)."""
    import msgpack

    good = tmp_path / "good.rejected.msgpack"
    good.write_bytes(msgpack.packb({"reason": "not_a_map", "detail": "d", "message": msgpack.packb([1, 2])}))
    broken = tmp_path / "broken.rejected.msgpack"
    broken.write_bytes(good.read_bytes()[:-3])  # ends inside a record
    out = tmp_path / "out.msgpack"
    for inputs in ([str(tmp_path / "missing.msgpack")], [str(good), str(broken)]):
        out.write_bytes(b"keep me")
        capsys.readouterr()
        try:
            code = cli.main(["quarantine", *inputs, "--extract", str(out)])
        except SystemExit as e:  # a missing file: refused by the parser
            code = e.code
        assert code == 2
        assert "Traceback" not in capsys.readouterr().err
        assert out.read_bytes() == b"keep me"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.rejected.msgpack", "good.rejected.msgpack",
                                                              "out.msgpack"]
    assert cli.main(["quarantine", str(good), "--extract", str(out)]) == 0
    assert out.read_bytes() == msgpack.packb([1, 2])


def test_eclreco_quarantine_extract_does_not_overwrite_a_file_that_appeared_while_it_read(tmp_path, monkeypatch,
                                                                                          capsys):
    """`quarantine --extract OUT` replaced OUT at its end with whatever was there: a file put under OUT while the inputs
    were read (a second extraction's, a user's) was lost without a word. OUT is checked again as it takes its name
    (paths.StagedOutputs.publish, as train's -o): exit 2 naming it, OUT left as it is, the extraction kept under its
    temporary name, named too. A file that was there when it began is replaced, as before."""
    import msgpack

    from eclreco import quarantine

    q = tmp_path / "q.rejected.msgpack"
    q.write_bytes(msgpack.packb({"reason": "not_a_map", "detail": "d", "message": msgpack.packb([1, 2])}))
    out = tmp_path / "out.msgpack"
    real, meanwhile = quarantine.read_records, []

    def reads(path):  # the records read, then what happens to OUT before the end
        yield from real(path)
        while meanwhile:
            meanwhile.pop()()
    monkeypatch.setattr(quarantine, "read_records", reads)

    for before in (None, b"the previous extraction"):  # OUT free at the start, or a file it may replace
        if before is not None:
            out.write_bytes(before)
        meanwhile.append(lambda: out.write_bytes(b"mine"))
        capsys.readouterr()
        assert cli.main(["quarantine", str(q), "--extract", str(out)]) == 2
        err = capsys.readouterr().err
        kept = [p.name for p in tmp_path.iterdir() if ".partial." in p.name]
        # (one file: no folder's set of files, no other command named; it said "another extraction into the folder?",
        # "nothing of this extraction published; its files are kept as ...")
        assert len(kept) == 1 and err == (f"eclreco quarantine: error: --extract {str(out)!r}: out.msgpack appeared or "
                                          "changed there since this extraction began (another extraction's output?): "
                                          f"not written over; this extraction's output is kept as {kept[0]} (rename it "
                                          "to use it)\n"), err
        assert out.read_bytes() == b"mine"
        (tmp_path / kept[0]).unlink()
    assert cli.main(["quarantine", str(q), "--extract", str(out)]) == 0  # nothing meanwhile: replaced, as before
    assert out.read_bytes() == msgpack.packb([1, 2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.msgpack", "q.rejected.msgpack"]


def test_a_metrics_address_that_cannot_be_served_is_named(tmp_path, capsys):
    """reco.py --metrics-port on a taken port said only `reco.py: error: [Errno 98] Address already in
    use` (with -i tcp://… it read like the input's address), and an HLT role with a --metrics-host that
    does not resolve printed 'metrics port 0 unavailable (...); using a free port', tried again on the same
    host and failed with `gaierror: [Errno -2] Name or service not known`. Both errors now name the
    metrics address; a role falls back to a free port only when the port is taken. reco.py's also names the
    option (--metrics-port N: ...; it said '[Errno 98] cannot serve ...'), and a --metrics-host that cannot be
    served is the parser's refusal naming --metrics-host (cli_types.metrics_host). reco.py's refusal is the
    only line: it printed the job's first line (`eclreco 0.1.0: [path]`) on stdout before it."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    raw = tmp_path / "in.msgpack"
    write_raw_file(raw, encode_events("array30", 0, 1, [0], [0, 1], [100], [5000], [0], [0]))
    try:
        assert _reco().main(["-i", str(raw), "--no-cnn", "--metrics-port", str(port)]) == 2
        out, err = capsys.readouterr()
        assert err == (f"reco.py: error: --metrics-port {port}: cannot serve metrics on 127.0.0.1:{port}: Address already "
                       "in use\n"), err
        assert out == "", out  # the job's `eclreco 0.1.0: [path]` line came first, as if it ran
        with pytest.raises(SystemExit) as e:  # the parser's refusal (cli_types.metrics_host), before any socket
            cli.main(["hlt", "distributor", "--input", "tcp://127.0.0.1:0", "--workers-addr", "tcp://127.0.0.1:0",
                      "--control", "tcp://127.0.0.1:0", "--sched", "normal", "--metrics-port", "0",
                      "--metrics-host", "nosuch.invalid"])
        assert e.value.code == 2
        out, err = capsys.readouterr()
        assert "using a free port" not in out, out
        assert "argument --metrics-host: cannot serve metrics on 'nosuch.invalid'" in err and "Traceback" not in err, err
    finally:
        taken.close()


def test_eclreco_quarantine_extract_writes_into_a_pipe_or_through_a_symlink(tmp_path):
    """`--extract OUT` wrote OUT.tmp-PID beside OUT and renamed it over OUT: a FIFO (as `--extract
    /dev/stdout` is when piped, `| ssh ...`) was replaced by a regular file and its reader got nothing
    (as root `--extract /dev/stdout` replaced the /dev/stdout link itself; as a user it failed on
    /dev/stdout.tmp-PID), and a symlink was replaced instead of its target written. Now a pipe or device
    is written directly (its own stdout through sys.stdout, the summary then on stderr: it was mixed into
    the messages), and a symlink's target is the file replaced."""
    import select
    import stat
    import subprocess

    import msgpack

    messages = [msgpack.packb({"v": 2, "pad": "x" * 3000, "i": i}) for i in range(100)]  # > a pipe's buffer
    q = tmp_path / "q.rejected.msgpack"
    q.write_bytes(b"".join(msgpack.packb({"reason": "bad_version", "detail": "d", "message": m}) for m in messages))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader is there: the writer's open does not block
    try:
        proc = subprocess.Popen([sys.executable, "-m", "eclreco.cli", "quarantine", str(q), "--extract", str(fifo)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        got = bytearray()
        while True:
            select.select([fd], [], [], 0.1)
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                chunk = None
            if chunk:
                got += chunk
            elif proc.poll() is not None:
                break
        _, err = proc.communicate(timeout=30)
    finally:
        os.close(fd)
    assert proc.returncode == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert bytes(got) == b"".join(messages), (len(got), err)
    # a symlink: its target is written, the link stays a link
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "extracted.msgpack"
    target.write_bytes(b"old")
    link = tmp_path / "link.msgpack"
    link.symlink_to(target)
    assert cli.main(["quarantine", str(q), "--extract", str(link)]) == 0
    assert link.is_symlink() and target.read_bytes() == b"".join(messages)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["extracted.msgpack"]
    # its own stdout, piped: the messages alone on stdout, the summary on stderr (/proc/self/fd/1 is where
    # /dev/stdout leads; named directly, the old code's rename could not replace a link under /dev)
    run = subprocess.run([sys.executable, "-m", "eclreco.cli", "quarantine", str(q), "--extract", "/proc/self/fd/1"],
                         capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == b"".join(messages), (len(run.stdout), run.stderr)
    assert b"100 rejected events" in run.stderr and b"100 messages written" in run.stderr


@pytest.mark.parametrize("extra,message", [
    (["--no-cnn"], "--no-cnn is about the CNN of the standard chain: it does nothing with --modules ECLClusterizer"),
    (["--model", os.path.join(MODELS, "belle2-ecl.onnx")], "--model is about the CNN of the standard chain"),
    (["--conditions", os.path.join(MODELS, "belle2-ecl.json")], "the chain (ECLClusterizer) has no ECLUnpacker"),
])
def test_a_standalone_worker_refuses_chain_options_its_chain_ignores(extra, message):
    """`eclreco hlt worker --modules ...` ran without a word with --no-cnn or --model (hlt run refused
    --model only): the same check as hlt run's now, before any event."""
    import subprocess

    cmd = [sys.executable, "-c", "import sys; from eclreco import cli; sys.exit(cli.main(sys.argv[1:]))",
           "hlt", "worker", "--modules", "ECLClusterizer", *extra,
           "--distributor", "tcp://127.0.0.1:9", "--metrics-port", "-1", "--rejected", ""]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_train_and_validate_refuse_a_geant4_file_that_is_not_the_detectors(tmp_path, capsys):
    """array30's Geant4 file given to --detector belle2-ecl: its cellIds (1..900) are belle2-ecl
    cellIds too, so it passed. `validate` wrote a report of NaN tables (no photon direction to match,
    exit 0) and `train` ran the whole chain, then died in a ZeroDivisionError (no matched cluster).
    A file that is not an .npz of arrays said only "File is not a zip file" or "pickled (object) data",
    without naming the file, and then numpy's advice to load it unsafely, with pickle. `train` left its new
    -o folder behind, empty. Each is now one line naming the file, exit 2, before any output, and no folder,
    and the option that gave it (`--g4 'raw.msgpack': not a readable ...`; the file alone was named)."""
    array30 = os.path.join(REPO, "tests", "data", "g4_array30_subset.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(open(array30, "rb").read()[:100000])
    text = tmp_path / "notes.npz"
    text.write_text("not a sample\n")
    raw = tmp_path / "raw.msgpack"  # a raw file of `eclreco simulate` given for the Geant4 file
    write_raw_file(raw, encode_events("array30", 0, 1, [0], [0, 1], [100], [5000], [0], [0]))
    cases = [(["validate", "--pi0-events", "0", "--fake-events", "0"], array30, "belle2-ecl",
              "has no 'photons' array (the photons' directions): not a Geant4 sample of belle2-ecl"),
             (["train", "--sizes", "tiny", "--epochs", "1"], array30, "belle2-ecl",
              "has no 'photons' array (the photons' directions): not a Geant4 sample of belle2-ecl"),
             (["train", "--sizes", "tiny", "--epochs", "1"], str(truncated), "array30", "not a readable Geant4 sample"),
             (["validate"], str(text), "array30", "not a readable Geant4 sample"),
             (["train", "--sizes", "tiny", "--epochs", "1"], str(text), "array30", "not an .npz file (it begins with b'not ')"),
             (["validate"], str(raw), "array30", "not an .npz file")]
    for i, (argv, g4, det, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert cli.main(argv + ["--detector", det, "-o", str(out), "--g4", g4, "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and "pickle" not in err, err
        assert err.startswith(f"eclreco {argv[0]}: error: --g4 {g4!r}: ") and err.count("\n") == 1, err
        assert not out.exists(), argv


def test_cluster_columns_default_is_shown_once_and_parses_to_the_list():
    """--cluster-columns' help showed its default twice in the hlt roles (its own text, cut mid-word as
    'e nergy_raw', then argparse's list): once now, wrapped between names; the parsed default is still
    RootOutput's list, and reco.py without -o still takes the default as no choice."""
    import argparse

    from eclreco.cli_types import add_cluster_columns_argument
    from eclreco.cli_types import HelpFormatter
    from eclreco.modules.root_output import DEFAULT_CLUSTER_COLUMNS

    for formatter in (HelpFormatter, argparse.HelpFormatter):
        ap = argparse.ArgumentParser(formatter_class=formatter)
        add_cluster_columns_argument(ap, "")
        text = " ".join(ap.format_help().split())
        assert text.count("energy_raw") == 1 and "default: energy_raw, energy, theta," in text, text
        assert ap.parse_args([]).cluster_columns == list(DEFAULT_CLUSTER_COLUMNS)
        assert ap.parse_args(["--cluster-columns", "energy,lat"]).cluster_columns == ["energy", "lat"]
    import subprocess

    reco = [sys.executable, os.path.join(REPO, "steering", "reco.py"), "--events", "5"]
    r = subprocess.run(reco + ["--cluster-columns", "energy"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "there is no -o" in r.stderr
    assert subprocess.run(reco, capture_output=True, cwd=REPO).returncode == 0


def test_eclreco_simulate_checks_its_output_before_simulating(tmp_path, capsys):
    """-o in a misspelt folder, or -o a folder: `eclreco simulate` simulated every event (minutes for a
    million), then failed to write them (FileNotFoundError, IsADirectoryError). Now one line before the
    first event (no progress bar), exit 2, nothing made. -o in a folder where no file can be made (/proc)
    simulated, then named the temporary .partial file, not -o; and its refusals lacked `error:`."""
    for output, message in ((tmp_path / "typo" / "raw.msgpack", f"no directory '{tmp_path / 'typo'}'"),
                            (tmp_path, "is a directory: name a file in it"),
                            ("/proc/x.msgpack", "cannot write into '/proc'")):
        assert cli.main(["simulate", "--events", "2", "-o", str(output)]) == 2
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.startswith(f"eclreco simulate: error: -o '{output}'") and message in err, err
        assert ".partial" not in err and not out, err
    assert os.listdir(tmp_path) == []


def test_eclreco_simulate_does_not_overwrite_a_file_that_appeared_while_it_simulated(tmp_path, monkeypatch, capsys):
    """`eclreco simulate -o OUT` took OUT's state only as write_raw_file began, after the whole simulation: a file put
    under OUT while it simulated (a second simulation's, a user's) was replaced without a word. OUT's state is taken at
    the command's start: exit 2 naming it, OUT left as it is, the events kept under their temporary name, named too. A
    file that was there when it began is replaced, as before. The refusal began with the bare path, where every other
    command's names the option (`-o 'OUT': ...`): now it does too."""
    import eclreco.sim

    out = tmp_path / "raw.msgpack"
    real, meanwhile = eclreco.sim.simulate, []

    def simulate(**kw):  # the events simulated, then what happens to OUT before the write
        ev = real(**kw)
        while meanwhile:
            meanwhile.pop()()
        return ev
    monkeypatch.setattr(eclreco.sim, "simulate", simulate)
    argv = ["simulate", "--events", "3", "-q", "-o", str(out)]

    for before in (None, b"the previous simulation"):  # OUT free at the start, or a file it may replace
        if before is not None:
            out.write_bytes(before)
        meanwhile.append(lambda: out.write_bytes(b"mine"))
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        kept = [p.name for p in tmp_path.iterdir() if ".partial." in p.name]
        # -o named as in every command's refusal (hlt merge's, dqm's), not the bare path
        assert len(kept) == 1 and err.startswith(f"eclreco simulate: error: -o {str(out)!r}: raw.msgpack appeared or "
                                                 "changed there since this simulation began") and kept[0] in err, err
        assert out.read_bytes() == b"mine"
        (tmp_path / kept[0]).unlink()
    assert cli.main(argv) == 0  # nothing meanwhile: replaced, as before
    assert out.read_bytes() != b"mine" and os.listdir(tmp_path) == ["raw.msgpack"]


def test_output_folders_are_made_in_a_folder_that_exists_only(tmp_path, capsys):
    """-o of train, validate and dqm, and bench's --plots, were made with every missing folder above them
    (os.makedirs): a typo in a folder above (/data/rnus/x) made /data/rnus without a word, where an output
    file in a misspelt folder is refused. Now the same as for a file: one line naming the option and the
    missing folder, exit 2, nothing made; the last component alone is made."""
    import numpy as np
    import uproot

    from eclreco.dqm import Histogram1D, _to_th1d

    root = tmp_path / "dqm.root"
    with uproot.recreate(root) as f:
        h = Histogram1D("h0", "a histogram", 10, 0.0, 1.0, "x")
        h.fill(np.array([0.5]))
        f["dqm/h0"] = _to_th1d(h)
    typo = tmp_path / "rnus" / "x"
    g4 = os.path.join(REPO, "tests", "data", "g4_array30_subset.npz")
    for argv, option in ((["train", "--detector", "array30", "--g4", g4, "-o", str(typo), "--sizes", "tiny",
                           "--epochs", "1", "--quiet"], "-o"),
                         (["validate", "--detector", "array30", "--g4", g4, "-o", str(typo), "--max-events", "30",
                           "--quiet"], "-o"),
                         (["dqm", str(root), "-o", str(typo)], "-o"),
                         # (with every measurement skipped but the plots, which need them: it ran, exit 0)
                         (["bench", "--events", "100", "--repeat", "1", "--plots", str(typo),
                           "--skip", "e2e", "grid", "stages", "cnn", "zmq", "farm"], "--plots")):
        assert cli.main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and f"{option} '{typo}': no directory '{typo.parent}'" in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dqm.root"], argv
    assert cli.main(["dqm", str(root), "-o", str(tmp_path / "png")]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["eclreco-dqm.json", "h0.png"]


def test_hlt_keys_output_folder_and_names_are_checked_in_one_line(tmp_path, capsys):
    """`eclreco hlt keys -o typo/keys` made typo/ and the keys in it, exit 0; -o under a file said
    'NotADirectoryError: [Errno 20] Not a directory', and a bad --names left public/ and private/ behind
    ('bad key name', without the option); `--names a,,b` dropped the empty name, exit 0. Each is now one line
    naming the option, exit 2, nothing made."""
    (tmp_path / "file").write_text("")
    for argv, message in (
            (["-o", str(tmp_path / "typo" / "keys")], f"-o '{tmp_path}/typo/keys': no directory '{tmp_path}/typo'"),
            (["-o", str(tmp_path / "file" / "keys")], f"-o '{tmp_path}/file/keys': no directory '{tmp_path}/file'"),
            (["-o", str(tmp_path / "file")], f"-o '{tmp_path}/file' is not a directory"),
            (["-o", str(tmp_path / "k"), "--names", "daq,a/b"], "--names: bad key name 'a/b'"),
            (["-o", str(tmp_path / "k"), "--names", " , "], "--names ' , ' names no party"),
            # the empty name was dropped, the repeated one made twice, exit 0
            (["-o", str(tmp_path / "k"), "--names", "daq,,reco"], "--names 'daq,,reco': an empty name"),
            (["-o", str(tmp_path / "k"), "--names", "daq,"], "--names 'daq,': an empty name"),
            (["-o", str(tmp_path / "k"), "--names", "daq, daq"], "--names 'daq, daq': a name given twice")):
        assert cli.main(["hlt", "keys", *argv]) == 2, argv
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.startswith("eclreco hlt keys: error: ") and message in err, err
        assert not out and sorted(p.name for p in tmp_path.iterdir()) == ["file"], argv
    assert cli.main(["hlt", "keys", "-o", str(tmp_path / "k"), "--names", "daq"]) == 0
    assert sorted(str(p.relative_to(tmp_path / "k")) for p in (tmp_path / "k").rglob("*")) == [
        "private", "private/daq.key_secret", "public", "public/daq.key"]


def test_input_files_that_cannot_be_read_are_named_with_their_option(tmp_path, capsys):
    """A directory or a missing file given where a file is read said open's error, naming neither the
    option nor what was expected: `train --g4 DIR` 'IsADirectoryError: [Errno 21] Is a directory: ...',
    `validate --g4 typo.npz` and `daq-emulator --input typo` 'FileNotFoundError: [Errno 2] ...', as did
    `eclreco quarantine` for its files, and `train --cache DIR`. Each is now one line naming the option
    and the path (argparse's, for what it reads as the value), exit 2, before any work."""
    g4 = os.path.join(REPO, "tests", "data", "g4_array30_subset.npz")
    missing = tmp_path / "missing.npz"
    for argv, message in (
            (["train", "--g4", str(tmp_path)], f"--g4 '{tmp_path}': a directory, not a Geant4 file"),
            (["validate", "--g4", str(missing)], f"--g4 '{missing}': no such file"),
            (["train", "--g4", g4, "--cache", str(tmp_path)], f"--cache '{tmp_path}' is a directory: name a file in it")):
        assert cli.main([*argv, "--detector", "array30", "-o", str(tmp_path / "out"), "--quiet"]) == 2, argv
        out, err = capsys.readouterr()
        assert err == f"eclreco {argv[0]}: error: {message}\n", err
        assert not (tmp_path / "out").exists()
    for argv, message in (
            (["quarantine", str(tmp_path)], f"argument FILE: '{tmp_path}': a directory, not a quarantine file"),
            (["quarantine", str(missing), "--list"], f"argument FILE: '{missing}': no such file"),
            (["daq-emulator", "--input", str(tmp_path), "--connect", "tcp://127.0.0.1:1"],
             f"argument --input: '{tmp_path}': a directory, not a raw file")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.endswith(f"eclreco {argv[0]}: error: {message}\n"), err
        assert "Errno" not in err


def test_daq_emulator_refuses_a_file_that_is_not_a_raw_file(tmp_path, capsys):
    """Read message by message, any bytes are some MessagePack (each ASCII byte is an int): `echo hello > t;
    daq-emulator --input t` said "6 events from t" and sent each byte as an event. A file whose first
    message is no envelope (text, a ROOT file, an empty file, a quarantine file) is now one line naming
    --input, exit 2, before any socket; a raw file whose first event is merely invalid is still replayed."""
    import msgpack

    files = {"text": (b"hello\n", "its first message is no envelope (the message is a MessagePack int, not a map)"),
             "root": (b"root\x00\x00\xf4\x4a", "its first message is no envelope"),
             "empty": (b"", "an empty file, not a raw file"),
             "garbage": (b"\xc1\xc1", "no MessagePack object at its start (not_msgpack)"),
             "quarantine": (msgpack.packb({"reason": "crc_mismatch", "detail": "", "message": b"x"}),
                            "a map with none of an envelope's keys")}
    for name, (data, message) in files.items():
        f = tmp_path / name
        f.write_bytes(data)
        rc = cli.main(["daq-emulator", "--input", str(f), "--connect", "tcp://127.0.0.1:1"])
        out, err = capsys.readouterr()
        assert rc == 2 and out == "" and err.count("\n") == 1, (name, out, err)
        assert err.startswith(f"eclreco daq-emulator: error: --input '{f}': ") and message in err, (name, err)
    # not the reconstruction's to judge here: a first event with a wrong CRC is an event to replay
    from eclreco import rawdata

    bad_first = msgpack.packb({"v": 1, "exp": 0, "run": 1, "evt": 0, "det": "array30", "ecl": b"", "crc32": 1})
    assert rawdata.not_a_raw_file(tmp_path / "text") and not rawdata.not_a_raw_file(_write(tmp_path / "r", bad_first))


def test_python_m_eclreco_daq_refuses_as_eclreco_daq_emulator_does(tmp_path):
    """`python -m eclreco.daq ... --curve-dir /nonexistent` showed a traceback (ValueError) and exited 1, where
    `eclreco daq-emulator` said one line and exited 2: its own parser called the command without the CLI's
    handling. Both entry points now say the same line with the same exit code."""
    import subprocess

    raw = tmp_path / "raw.msgpack"
    write_raw_file(raw, encode_events("array30", 0, 1, [0], [0, 1], [1], [1000], [0], [0]))
    for argv in (["--input", str(raw), "--connect", "tcp://127.0.0.1:9", "--curve-dir", str(tmp_path / "nokeys")],
                 ["--input", os.path.join(REPO, "README.md"), "--connect", "tcp://127.0.0.1:9"]):
        runs = [subprocess.run([sys.executable, "-m", *entry, *argv], capture_output=True, text=True, timeout=60)
                for entry in (["eclreco.daq"], ["eclreco.cli", "daq-emulator"])]
        for r in runs:
            assert r.returncode == 2 and r.stderr.startswith("eclreco daq-emulator: error: "), (argv, r.stderr)
            assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (argv, r.stderr)
        assert runs[0].stderr == runs[1].stderr


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_a_standalone_collector_refuses_an_output_it_cannot_write_before_it_registers(tmp_path):
    """`eclreco hlt collector -o typo/x.root` bound its sockets, waited for the distributor, registered,
    and only then failed to make its file (the distributor then held the farm's results for a replacement);
    with no distributor yet it waited forever. `-o DIR` wrote DIR.2 beside the folder. Both are now one
    line naming --output, exit 2, at once, as `hlt run` refuses them."""
    import subprocess

    for output, message in ((tmp_path / "typo" / "x.root", f"--output '{tmp_path}/typo/x.root': no directory "
                                                           f"'{tmp_path}/typo'"),
                            (tmp_path, f"--output '{tmp_path}' is a directory: name a file in it")):
        r = subprocess.run([sys.executable, "-m", "eclreco.cli", "hlt", "collector", "-o", str(output),
                            "--metrics-port", "-1", "--collector-addr", "tcp://127.0.0.1:0",
                            "--control", "tcp://127.0.0.1:9"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and r.stderr == f"eclreco hlt collector: error: {message}\n", r.stderr
    assert os.listdir(tmp_path) == []


def test_a_tcp_output_libzmq_would_misread_is_refused_naming_output(tmp_path):
    """`hlt collector -o tcp://host` (no port) or `hlt run -o tcp://host:99999` passed the output checks (only
    files were checked): the collector bound its sockets and waited for the distributor, and the address was
    only checked by its ZMQOutput at the run's start. Now one line naming --output, exit 2, before any socket
    or role."""
    import subprocess

    for argv, address in ((["hlt", "collector", "--metrics-port", "-1", "--sched", "normal", "--collector-addr",
                            "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:9"], "tcp://localhost"),
                          (["hlt", "run", "--input", "tcp://127.0.0.1:0", "--control", free_address(),
                            "--metrics-base-port", "-1"], "tcp://localhost:99999")):
        r = subprocess.run([sys.executable, "-m", "eclreco.cli", *argv, "-o", address], capture_output=True,
                           text=True, timeout=30, cwd=tmp_path)
        assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
        assert r.stderr == f"eclreco {' '.join(argv[:2])}: error: --output: ZeroMQ address {address!r}: the port " \
                           "must be 0..65535 or * (tcp://HOST:PORT)\n", r.stderr
    assert os.listdir(tmp_path) == []


def test_an_ipc_address_bound_in_a_missing_folder_is_refused_naming_its_option(tmp_path):
    """A role binding ipc:///typo/x said `error: ZMQError: No such file or directory for ipc path "/typo/x".`,
    naming no option (daq-emulator --bind after its first lines), and `hlt run --collector-addr ipc:///typo/x`
    started the farm, whose collector failed and was restarted. reco.py -i said which folder was missing; all now
    say it alike (raw_sockets.bind_error), one line naming the option, exit 2."""
    import subprocess

    from eclreco.rawdata import write_raw_file

    raw = tmp_path / "raw.msgpack"
    write_raw_file(raw, encode_events("array30", 0, 1, [0], [0, 1], [100], [5000], [0], [0]))
    address = f"ipc://{tmp_path}/typo/x"
    quiet = ["--metrics-port", "-1", "--sched", "normal"]
    for option, argv in (("--input", ["hlt", "distributor", "--input", address, "--workers-addr", "tcp://127.0.0.1:0",
                                      "--control", "tcp://127.0.0.1:0", *quiet]),
                         ("--collector-addr", ["hlt", "collector", "--collector-addr", address, "--control",
                                               "tcp://127.0.0.1:9", *quiet]),
                         ("--bind", ["daq-emulator", "--input", str(raw), "--bind", address, "--sched", "normal"]),
                         ("--collector-addr", ["hlt", "run", "--collector-addr", address, "--input", "tcp://127.0.0.1:0",
                                               "--control", free_address(), "--metrics-base-port", "-1",
                                               "-o", str(tmp_path / "farm.root")])):
        r = subprocess.run([sys.executable, "-m", "eclreco.cli", *argv], capture_output=True, text=True, timeout=30)
        command = " ".join(argv[:2] if argv[0] == "hlt" else argv[:1])
        assert r.returncode == 2 and r.stderr == (f"eclreco {command}: error: {option} {address!r}: no directory "
                                                  f"'{tmp_path}/typo' for the socket file\n"), r.stdout + r.stderr
    assert os.listdir(tmp_path) == ["raw.msgpack"]


def test_a_run_index_output_name_with_other_braces_is_taken_as_written(tmp_path):
    """`hlt run -o 'x_{run_index}_{shift}.root'` (or a '{' alone) failed with KeyError: 'shift' (ValueError for
    the lone brace) from str.format: only {run_index} is replaced, the rest of the name is the user's."""
    from eclreco.hlt.collector import output_error, output_filename

    assert output_filename("x_{run_index}_{shift}.root", 3) == "x_3_{shift}.root"
    assert output_filename("x_{run_index}_{.root", 1) == "x_1_{.root"
    assert output_error(str(tmp_path / "x_{run_index}_{shift}.root")) == ""


def test_a_worker_refuses_a_rejected_file_in_a_folder_it_cannot_write(capsys):
    """`hlt worker --rejected /sys/x.msgpack` started (os.access says yes to root there) and would have
    failed at its first rejected event, ending its run: the folder is now tried by making a file in it
    (paths.unwritable_folder, as every other output folder), one line naming --rejected, exit 2."""
    import argparse

    from eclreco.hlt.worker import default_quarantine
    from eclreco.paths import unwritable_folder

    if not os.access("/sys", os.W_OK) or not unwritable_folder("/sys"):
        pytest.skip("needs a folder that os.access calls writable and is not (/sys as root)")
    with pytest.raises(SystemExit) as e:
        default_quarantine(argparse.Namespace(rejected="/sys/x.msgpack"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("eclreco hlt worker: error: cannot keep rejected raw events: cannot write into '/sys'"), err
    assert "choose another --rejected FILE" in err


@pytest.mark.parametrize("option,message", [
    ("--conditions", "--conditions: conditions file '{file}': invalid JSON at character 0"),
    ("--model", "--model: ECLEnergyCorrection: cannot load model '{file}'"),
])
def test_a_conditions_or_model_file_its_module_cannot_read_is_refused_before_the_job(option, message, capsys):
    """`reco.py --conditions README.md` exited 1 with 'ECLUnpacker.initialize failed: ... invalid JSON' (for
    --model, with source locations too) after the other modules had started, and `hlt worker` exited 2 only
    once its link and metrics were up. The module reads the file before the job now: one line naming the
    option, exit 2, in both."""
    import subprocess

    readme = os.path.join(REPO, "README.md")
    expected = message.format(file=readme)
    with pytest.raises(SystemExit) as e:
        _reco().main([option, readme, "--events", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err and "(at " not in err, err
    assert f"error: {expected}" in err.splitlines()[-1], err  # argparse's usage, then the one line
    r = subprocess.run([sys.executable, "-m", "eclreco.cli", "hlt", "worker", option, readme,
                        "--distributor", "tcp://127.0.0.1:9", "--metrics-port", "-1", "--rejected", ""],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith(f"eclreco hlt worker: error: {expected}"), r.stderr
    assert r.stderr.count("\n") == 1 and not r.stdout, (r.stdout, r.stderr)


def test_every_command_with_curve_dir_checks_its_keys_first_naming_the_option(tmp_path, capsys):
    """`reco.py -i tcp://... --curve-dir /tmp/nokeys` exited 1 from ZMQInput's initialize with source
    locations ('(at .../curve.py:66 in __init__ ...)'), `hlt run --curve-dir /missing` said
    'FileNotFoundError: CURVE secret key ... not found' without the option. Every command that takes
    --curve-dir now checks the directory, its own key and its peers' public keys first: one line naming the
    option, exit 2."""
    import subprocess

    from eclreco.curve import generate_keys

    generate_keys(str(tmp_path / "k"), ["reco", "control"])  # no distributor, collector, worker or daq key
    missing, keys = str(tmp_path / "nokeys"), str(tmp_path / "k")
    no_dir = f"--curve-dir '{missing}': no such directory"
    commands = [["hlt", "distributor", "--metrics-port", "-1"],
                ["hlt", "collector", "--metrics-port", "-1", "-o", str(tmp_path / "c.root")],
                ["hlt", "run", "-o", str(tmp_path / "r.root")], ["hlt", "control", "stop"], ["hlt", "status"],
                ["hlt", "worker", "--metrics-port", "-1", "--rejected", ""],
                ["daq-emulator", "--input", os.path.join(REPO, "README.md"), "--connect", "tcp://127.0.0.1:9"]]
    for argv in commands:
        # the keys' directory without the own key or the distributor's public key
        for directory, message in ((missing, no_dir), (keys, f"--curve-dir '{keys}': CURVE ")):
            r = subprocess.run([sys.executable, "-m", "eclreco.cli", *argv, "--curve-dir", directory],
                               capture_output=True, text=True, timeout=60)
            command = " ".join(argv[:2] if argv[0] == "hlt" else argv[:1])
            assert r.returncode == 2 and r.stderr.startswith(f"eclreco {command}: error: "), (argv, r.stderr)
            assert message in r.stderr and r.stderr.count("\n") == 1, (argv, r.stderr)
    reco = _reco()
    for argv, message in ((["--curve-dir", missing], no_dir),
                          (["--curve-dir", keys, "--connect", "--curve-server", "daqq"],
                           "--curve-server 'daqq': CURVE public key of 'daqq' not found"),
                          (["--curve-dir", keys, "--curve-secret", os.path.join(REPO, "README.md")],
                           f"--curve-secret '{os.path.join(REPO, 'README.md')}': No public key found")):
        with pytest.raises(SystemExit) as e:
            reco.main(["-i", "tcp://127.0.0.1:5999", "--idle-timeout", "1", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"error: {message}" in err.splitlines()[-1] and "(at " not in err, err


def test_hlt_merge_refuses_a_file_that_is_not_root_in_one_line(tmp_path, capsys):
    """`hlt merge README.md -o m.root` printed uproot's message as it came, over two lines ('... b'# ec'\\nin
    file ...'): one line now, as every refusal."""
    assert cli.main(["hlt", "merge", os.path.join(REPO, "README.md"), "-o", str(tmp_path / "m.root")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "README.md: not a ROOT file (it begins with b'# ec')" in err, err
    assert not os.listdir(tmp_path)


def test_hlt_merge_and_dqm_word_an_input_that_is_not_root_alike(tmp_path, capsys):
    """`hlt merge README.md` said `README.md: not a readable ROOT file (ValueError: not a ROOT file: first four bytes
    are b'# ec' in file README.md)` and `dqm README.md` `README.md: not a ROOT file (it begins with b'# ec')`: two
    wordings of one error, each command opening its inputs its own way. Both open them with
    root_output.open_input_file now: one line, the same words, for a file that is not ROOT, empty or cut short."""
    import uproot

    good = tmp_path / "good.root"
    with uproot.recreate(good) as f:
        f["metadata"] = "{}"
    (tmp_path / "cut.root").write_bytes(good.read_bytes()[:200])
    (tmp_path / "empty.root").write_bytes(b"")
    for path, says in ((os.path.join(REPO, "README.md"), "not a ROOT file (it begins with b'# ec')"),
                       (str(tmp_path / "empty.root"), "not a ROOT file (empty)"),
                       (str(tmp_path / "cut.root"), "not a readable ROOT file, cut short or damaged? (")):
        errors = []
        for argv in (["hlt", "merge", path, "-o", str(tmp_path / "m.root")], ["dqm", path, "-o", str(tmp_path / "d")]):
            capsys.readouterr()
            assert cli.main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.count("\n") == 1, err
            errors.append(err.split(": error: ", 1)[1])
        assert errors[0] == errors[1] and errors[0].startswith(f"{path}: {says}"), errors
    assert sorted(os.listdir(tmp_path)) == ["cut.root", "empty.root", "good.root"]


def test_dqm_hlt_merge_and_quarantine_word_a_missing_input_file_alike(tmp_path, capsys):
    """`hlt merge nosuch.root` and `quarantine nosuch` were refused by the parser (cli_types.input_file: its usage,
    then `argument FILE: 'nosuch.root': no such file`), `dqm nosuch.root` after it, in words of its own
    (`nosuch.root: no such file`, no usage). dqm's FILE is an input_file too now: one wording of a missing input
    or a directory, the parser's, for every command that reads FILEs."""
    missing = str(tmp_path / "nosuch.root")
    for path, says in ((missing, "no such file"), (str(tmp_path), "a directory, not a {}")):
        for argv, what in ((["dqm", path, "-o", str(tmp_path / "d")], "ROOT file"),
                           (["hlt", "merge", path, "-o", str(tmp_path / "m.root")], "ROOT file"),
                           (["quarantine", path], "quarantine file")):
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                cli.main(argv)
            err = capsys.readouterr().err
            command = " ".join(argv[:2] if argv[0] == "hlt" else argv[:1])
            assert e.value.code == 2 and err.startswith(f"usage: eclreco {command} ") and err.endswith(
                f"\neclreco {command}: error: argument FILE: {path!r}: {says.format(what)}\n"), (argv, err)
    assert sorted(os.listdir(tmp_path)) == []


def test_reco_py_refuses_a_metrics_host_without_metrics_port(tmp_path, capsys):
    """`reco.py -i raw --metrics-host 0.0.0.0` ran without any exporter (--metrics-port 0 is none), the
    interface silently ignored, as --metrics-linger was before it was refused: a scrape found nothing."""
    reco = _reco()
    raw = tmp_path / "raw.msgpack"
    write_raw_file(raw, encode_events("array30", 0, 1, [0], [0, 1], [1], [1000], [0], [0]))
    with pytest.raises(SystemExit) as e:
        reco.main(["-i", str(raw), "--no-cnn", "--metrics-host", "0.0.0.0"])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and err[-1].endswith(
        "error: --metrics-host '0.0.0.0' is the interface of the metrics exporter: there is no --metrics-port"), err


@pytest.mark.parametrize("argv,message", [
    (["-i", "tcp://127.0.0.1:9", "--seed", "1"], "--seed: this option is for the embedded simulation"),
    (["-i", "tcp://127.0.0.1:9", "--detector", "belle2-ecl"], "--detector: this option is for the embedded simulation"),
    (["--max-latency", "20"], "--max-latency: this option is for a ZeroMQ input"),
    (["--curve-dir", ""], "--curve-dir: this option is for a ZeroMQ input"),
    (["--cluster-columns", DEFAULT_COLUMNS], "--cluster-columns chooses the branches of the -o file: there is no -o"),
    (["--metrics-linger", "0"], "--metrics-linger keeps the metrics served after the run: there is no --metrics-port"),
    (["--metrics-host", METRICS_HOST], f"--metrics-host '{METRICS_HOST}' is the interface of the metrics exporter"),
    (["--no-cnn", "--model", ""], "--model is the CNN's model: it does nothing with --no-cnn"),
])
def test_reco_py_refuses_an_option_that_does_not_apply_also_with_its_default_value(argv, message, capsys):
    """reco.py refused an option of a part the job does not run (-i tcp:// --seed, --max-latency without a stream,
    --cluster-columns without -o, ...) only when its value differed from the default: `-i tcp://... --seed 1` ran
    without a word, the user believing the seed set. An option given is refused whatever its value."""
    with pytest.raises(SystemExit) as e:
        _reco().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err.splitlines()[-1], err


def test_a_collector_refuses_output_bind_with_a_root_file(tmp_path):
    """`hlt collector -o run.root --output-bind` (meant: serve the results on a socket) waited for the distributor
    and wrote the file, the --output-bind silently ignored; it is one line naming both options now, exit 2."""
    import subprocess

    cmd = [sys.executable, "-m", "eclreco.cli", "hlt", "collector", "-o", str(tmp_path / "run.root"), "--output-bind",
           "--metrics-port", "-1", "--control", "tcp://127.0.0.1:9"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=15, cwd=str(tmp_path))
    except subprocess.TimeoutExpired:
        pytest.fail("the collector started, --output-bind ignored")
    assert r.returncode == 2 and r.stderr.startswith("eclreco hlt collector: error: "), r.stderr
    assert "--output-bind binds a tcp:// output: --output" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_an_hlt_role_refuses_a_metrics_host_without_an_exporter(tmp_path):
    """`hlt distributor|collector|worker --metrics-port -1 --metrics-host 0.0.0.0` (and `hlt run
    --metrics-base-port -1 --metrics-host ...`) started with no exporter at all, the interface silently ignored:
    a scrape found nothing. One line naming both options now, exit 2, before any socket, as reco.py's; also when
    the interface given is the default one (it was compared with the default: ignored without a word)."""
    import subprocess

    roles = [["hlt", "distributor", "--metrics-port", "-1", "--input", "tcp://127.0.0.1:0", "--workers-addr",
              "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0", "--sched", "normal"],
             ["hlt", "collector", "--metrics-port", "-1", "-o", str(tmp_path / "c.root"), "--control",
              "tcp://127.0.0.1:9", "--collector-addr", "tcp://127.0.0.1:0", "--sched", "normal"],
             ["hlt", "worker", "--metrics-port", "-1", "--distributor", "tcp://127.0.0.1:9", "--rejected", ""],
             ["hlt", "run", "--metrics-base-port", "-1", "-n", "1", "-o", str(tmp_path / "r.root"), "--input",
              free_address(), "--control", free_address()]]
    # given with the default interface too: it was compared with the default, and passed silently
    for argv, host in [(argv, "0.0.0.0") for argv in roles] + [(argv, METRICS_HOST) for argv in roles]:
        option = "--metrics-base-port" if argv[1] == "run" else "--metrics-port"
        try:
            r = subprocess.run([sys.executable, "-m", "eclreco.cli", *argv, "--metrics-host", host],
                               capture_output=True, text=True, timeout=20, cwd=tmp_path)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{argv[:2]} --metrics-host {host}: started without an exporter, --metrics-host ignored")
        assert r.returncode == 2 and not r.stdout, (argv, r.stdout, r.stderr)
        assert r.stderr == (f"eclreco hlt {argv[1]}: error: --metrics-host '{host}' is the interface of the metrics "
                            f"exporter: {option} -1 starts none\n"), r.stderr
    assert os.listdir(tmp_path) == []


def test_a_collector_output_that_is_a_device_or_a_fifo_is_refused_at_start(tmp_path):
    """`hlt collector -o /dev/null` (or a FIFO, or a link to either) started: the collector never writes over an
    existing name, so at the run's first result it made NAME.2 beside it, a regular file, /dev/null.2 in /dev
    (unused_filename). `hlt run -o` the same. One line naming --output, the path and its kind now, exit 2, before
    any socket, nothing made."""
    import signal
    import subprocess

    os.mkfifo(tmp_path / "pipe.root")
    os.symlink("/dev/null", tmp_path / "null.root")  # /dev/null itself, seen through a name in tmp_path
    before = sorted(os.listdir(tmp_path))
    collector = ["hlt", "collector", "--metrics-port", "-1", "--control", "tcp://127.0.0.1:9", "--collector-addr",
                 "tcp://127.0.0.1:0", "--sched", "normal", "-o"]
    farm = ["hlt", "run", "--metrics-base-port", "-1", "-n", "1", "--input", free_address(), "--control",
            free_address(), "-o"]
    for argv, name, kind in ((collector, "pipe.root", "a FIFO"), (collector, "null.root", "a character device"),
                             (farm, "pipe.root", "a FIFO")):
        p = subprocess.Popen([sys.executable, "-m", "eclreco.cli", *argv, name], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
        try:
            out, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # (hlt run's roles too)
            p.communicate()
            pytest.fail(f"{argv[:2]} -o {name}: started")
        assert p.returncode == 2 and not out, (argv, out, err)
        assert err == (f"eclreco hlt {argv[1]}: error: --output {name!r} is not a regular file ({kind}): the collector "
                       "makes a ROOT file of each run, never over an existing name; name a new file, or a tcp:// "
                       "address to send the results on\n"), err
    assert sorted(os.listdir(tmp_path)) == before


def test_root_file_options_of_the_collector_are_refused_with_a_tcp_output(tmp_path):
    """`hlt collector -o tcp://... --output-bind --flush-interval 9` (or --dqm-open-runs, --cluster-columns) started
    without a word: they are RootOutput's and ECLDQM's, which a tcp:// output does not have; so did `hlt run -o
    tcp://... --flush-interval 9`. One line naming them now, exit 2, before any socket. hlt run passes them to its
    collector with a ROOT file only: its --cluster-columns chooses what the workers send, and stays accepted."""
    import subprocess

    out = free_address()
    collector = ["hlt", "collector", "-o", out, "--output-bind", "--metrics-port", "-1", "--control",
                 "tcp://127.0.0.1:9", "--collector-addr", "tcp://127.0.0.1:0", "--sched", "normal"]
    farm = ["hlt", "run", "-o", out, "--metrics-base-port", "-1", "-n", "1", "--input", free_address(), "--control",
            free_address()]
    for argv, extra, named in ((collector, ["--flush-interval", "9"], "--flush-interval: this option is"),
                               (collector, ["--dqm-open-runs", "3", "--cluster-columns", "energy"],
                                "--dqm-open-runs, --cluster-columns: these options are"),
                               (farm, ["--flush-interval", "9", "--dqm-open-runs", "3"],
                                "--flush-interval, --dqm-open-runs: these options are"),
                               # given with their defaults' values: compared with the defaults, they passed
                               (collector, ["--flush-interval", "0.25"], "--flush-interval: this option is"),
                               (collector, ["--dqm-open-runs", "8", "--cluster-columns", DEFAULT_COLUMNS],
                                "--dqm-open-runs, --cluster-columns: these options are"),
                               (farm, ["--flush-interval", "0.25"], "--flush-interval: this option is")):
        try:
            r = subprocess.run([sys.executable, "-m", "eclreco.cli", *argv, *extra], capture_output=True, text=True,
                               timeout=20, cwd=tmp_path)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{argv[:2]} {extra}: started, the options ignored")
        assert r.returncode == 2 and not r.stdout, (extra, r.stdout, r.stderr)
        assert r.stderr == (f"eclreco hlt {argv[1]}: error: {named} for a ROOT file --output (its writes, DQM "
                            f"histograms and branches): --output {out!r} sends the results on as the workers made "
                            "them\n"), r.stderr
    assert os.listdir(tmp_path) == []
    # what hlt run gives its roles passes their own checks (it passed them all, defaults or not; and --metrics-host
    # with no exporter, now refused when given)
    from eclreco.cli_types import metrics_host_unused
    from eclreco.hlt.collector import root_output_options_unused
    from eclreco.hlt.run import Farm

    parser = cli.build_parser()
    for output, passed in ((out, False), (str(tmp_path / "f.root"), True)):
        for base in ("-1", "0"):
            args = parser.parse_args(["hlt", "run", "-o", output, "--cluster-columns", "energy",
                                      "--metrics-base-port", base])
            cmd = Farm(args).collector_cmd()
            assert ("--cluster-columns" in cmd) == passed and ("--flush-interval" in cmd) == passed, cmd
            assert ("--metrics-host" in cmd) == (base == "0"), cmd
            role = parser.parse_args(cmd[cmd.index("hlt"):])
            assert role.hlt_command == "collector" and root_output_options_unused(role) == "", cmd
            assert metrics_host_unused(role) == "", cmd


def test_hlt_run_says_its_option_errors_before_an_address_in_use(tmp_path, capsys):
    """With 5555 held by a farm already running, `hlt run --rejected x.msgpack -n 2` or a
    --filter-cluster-energy without a cut said "--input ...: another process listens there": the option error,
    which the operator must fix too, came only once the address was free. Every option check comes first now."""
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = f"tcp://127.0.0.1:{held.getsockname()[1]}"
    base = ["hlt", "run", "--input", taken, "-o", str(tmp_path / "farm.root"), "--metrics-base-port", "-1"]
    try:
        for extra, message in ((["-n", "2", "--rejected", str(tmp_path / "x.msgpack")],
                                f"--rejected '{tmp_path}/x.msgpack': 2 workers would write one file"),
                               (["--filter-cluster-energy", "0.1"], "--filter-cluster-energy sets which clusters"),
                               (["--metrics-base-port", "65535"], "--metrics-base-port 65535: the ports")):
            with pytest.raises(SystemExit) as e:
                cli.main([*base, *extra])
            out, err = capsys.readouterr()
            assert e.value.code == 2 and err.startswith(f"eclreco hlt run: error: {message}"), (extra, err)
        with pytest.raises(SystemExit) as e:  # the address is still checked, once the options are right
            cli.main(base)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"eclreco hlt run: error: --input {taken!r}: another process"), err
    finally:
        held.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("built_in", [False, True])
def test_hlt_worker_help_usage_shows_the_steering_file(built_in, monkeypatch, capsys):
    """`eclreco hlt worker --help` printed `usage: eclreco hlt worker [-h] [--distributor DISTRIBUTOR] ...`: the
    steering file's own parser (steering/hlt_worker.py, or the built-in one where the source tree is not found)
    cannot know of the optional STEERING.py that `hlt worker` takes before its options."""
    from eclreco.hlt import worker

    if built_in:
        monkeypatch.delenv("ECLRECO_HLT_WORKER_STEERING", raising=False)
        monkeypatch.setattr(worker, "default_steering", lambda: None)
    def run_worker(*argv):  # the steering file's exit is returned, the built-in parser's raised
        try:
            return cli.main(["hlt", "worker", *argv])
        except SystemExit as e:
            return e.code

    assert run_worker("--help") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("usage: eclreco hlt worker [STEERING.py] "), out
    # the error prefix is still the command's name alone
    assert run_worker("--threads", "0") == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: eclreco hlt worker [STEERING.py] "), err
    assert "\neclreco hlt worker: error: argument --threads" in err, err
