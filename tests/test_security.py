"""Security (issue 9): loopback defaults, optional ZeroMQ CURVE between the roles, metrics without payloads."""
import ast
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import msgpack
import numpy as np
import pytest
import uproot
import zmq

import eclreco
from eclreco.curve import Curve, generate_keys
from eclreco.daq import emulate
from eclreco.hlt.protocol import CURVE_ROLES
from eclreco.rawdata import write_raw_file
from helpers import kill_if_running
from hlt_helpers import envelope, free_address, free_port

pytestmark = pytest.mark.timeout(120)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ECLRECO = [sys.executable, "-m", "eclreco.cli"]


# ------------------------------------------------------------------ loopback defaults
def _string_defaults(tree):
    """Every string constant that is the default of an argparse option or a module parameter."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "default" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                    yield kw.value.value
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "add_param" and len(node.args) >= 2:
                a = node.args[1]
                if isinstance(a, ast.Constant) and isinstance(a.value, str):
                    yield a.value
        if isinstance(node, ast.FunctionDef):  # keyword defaults of functions (host="127.0.0.1")
            for d in node.args.defaults + node.args.kw_defaults:
                if isinstance(d, ast.Constant) and isinstance(d.value, str):
                    yield d.value


def _networked_sources():
    files = glob.glob(os.path.join(REPO, "python", "eclreco", "hlt", "*.py"))
    files += glob.glob(os.path.join(REPO, "modules", "zmq_*.py"))
    files += [os.path.join(REPO, "python", "eclreco", f) for f in ("daq.py", "metrics.py", "curve.py")]
    files += [os.path.join(REPO, "steering", f) for f in ("reco.py", "hlt_worker.py")]
    return files


def test_every_default_address_is_loopback():
    """Audit: every default address/host of the networked code is 127.0.0.1; no wildcard binds."""
    seen = 0
    for f in _networked_sources():
        src = open(f).read()
        assert not re.search(r"""["']tcp://(\*|0\.0\.0\.0)""", src), f
        for value in _string_defaults(ast.parse(src)):
            if value.startswith("tcp://"):
                seen += 1
                assert value.startswith("tcp://127.0.0.1:"), (f, value)
            elif re.fullmatch(r"\d+\.\d+\.\d+\.\d+|localhost|\*|0\.0\.0\.0|::", value):
                seen += 1
                assert value == "127.0.0.1", (f, value)
    assert seen >= 10


def test_default_sockets_bind_loopback_only():
    """The real objects with their defaults: the exporter's listening socket (its address as the
    server bound it) and the ZeroMQ modules' addresses are on 127.0.0.1. (The CLI roles' address
    defaults are checked in the source by the test above.)"""
    from eclreco.metrics import serve_process_metrics

    exp = serve_process_metrics(0, role="reco", framework=False)  # the default host
    try:
        assert exp._server.socket.getsockname()[0] == "127.0.0.1"
    finally:
        exp.close()
    path = eclreco.create_path()
    inp = path.add_module("ZMQInput")
    assert inp.param("address").startswith("tcp://127.0.0.1:") and inp.param("bind")
    out = path.add_module("ZMQOutput")
    assert out.param("address").startswith("tcp://127.0.0.1:")


# ------------------------------------------------------------------ CURVE
@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "keys"
    r = subprocess.run(ECLRECO + ["hlt", "keys", "-o", str(d)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("distributor", "collector", "worker", "control", "daq", "reco"):
        assert (d / "public" / f"{name}.key").exists() and (d / "private" / f"{name}.key_secret").exists()
        assert oct((d / "private" / f"{name}.key_secret").stat().st_mode & 0o777) == "0o600"
    return str(d)


@pytest.fixture
def rogue_keys(tmp_path, keys):
    """A party with a key pair the servers do not know (it knows the servers' public keys: they are public)."""
    d = tmp_path / "rogue"
    generate_keys(str(d), ["daq", "worker"])
    for f in glob.glob(os.path.join(keys, "public", "*.key")):
        name = os.path.basename(f)
        if name not in ("daq.key", "worker.key"):
            shutil.copy(f, d / "public" / name)
    return str(d)


def test_keys_refuse_to_overwrite(keys):
    r = subprocess.run(ECLRECO + ["hlt", "keys", "-o", keys], capture_output=True, text=True)
    assert r.returncode != 0 and "exists" in r.stderr


def test_keys_refusal_makes_nothing_and_force_makes_a_matching_pair(tmp_path):
    """`hlt keys --names reco,daq` where daq's keys exist made reco's pair and then refused daq's: a refusal
    now makes nothing. --force (untested) replaces the pair: a new public key that matches its secret one,
    the secret file 0600 in a 0700 private/."""
    from eclreco import cli

    d = tmp_path / "k"
    generate_keys(str(d), ["daq"])
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert cli.main(["hlt", "keys", "-o", str(d), "--names", "reco,daq"]) == 2
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before  # no reco pair, daq's untouched
    assert cli.main(["hlt", "keys", "-o", str(d), "--names", "reco,daq", "--force"]) == 0
    pub, sec = d / "public" / "daq.key", d / "private" / "daq.key_secret"
    assert pub.read_bytes() != before[pub] and sec.read_bytes() != before[sec]
    public, secret = zmq.auth.load_certificate(str(sec))
    assert secret and public == zmq.auth.load_certificate(str(pub))[0]
    assert (sec.stat().st_mode & 0o777, (d / "private").stat().st_mode & 0o777) == (0o600, 0o700)
    assert (d / "public" / "reco.key").exists()


def _zmq_input_run(keys, senders, idle=1.5):
    """A ZMQInput (CURVE server 'reco') fed by `senders` (callables taking the address) in threads."""
    address = free_address()
    path = eclreco.create_path()
    inp = path.add_module("ZMQInput", address=address, idle_timeout_s=idle, curve_dir=keys, poll_ms=50.0)
    got = []

    class Collect(eclreco.Module):
        def event(self, batch):
            got.extend(batch.evt.tolist())

    path.add_module(Collect())
    threads = [threading.Thread(target=s, args=(address,)) for s in senders]
    for t in threads:
        t.start()
    eclreco.process(path, install_signal_handlers=False)
    for t in threads:
        t.join()
    return got, inp.counters()


def test_curve_authorized_peer_processed_unknown_key_refused(keys, rogue_keys, zmq_context):
    ctx = zmq_context
    res = {}

    def rogue(address):  # CURVE with a key the server does not know: its events never arrive
        res["rogue"] = emulate([envelope(e) for e in range(5000, 5100)], address, context=ctx, linger_ms=1500,
                               curve=Curve(rogue_keys, "daq"), curve_server="reco")

    def plain(address):  # no CURVE at all against a CURVE server: refused as well
        res["plain"] = emulate([envelope(e) for e in range(6000, 6100)], address, context=ctx, linger_ms=1500)

    def good(address):
        time.sleep(0.3)
        res["good"] = emulate([envelope(e) for e in range(300)], address, context=ctx, linger_ms=5000,
                              curve=Curve(keys, "daq"), curve_server="reco")

    got, counters = _zmq_input_run(keys, [rogue, plain, good])
    ctx.term()
    assert sorted(got) == list(range(300))  # the authorized sender's events, and only those
    assert counters["auth_failures"] >= 1
    # and each sender knows: the refused ones completed no handshake (the emulator's CLI then exits 1)
    assert res["good"]["handshakes"] >= 1
    assert res["rogue"]["handshakes"] == 0 and res["plain"]["handshakes"] == 0, res


def test_daq_emulator_says_when_nothing_was_delivered(tmp_path, keys):
    """The CURVE example fed to reco.py with the distributor's server key (the emulator's default):
    every event was queued, none delivered. The emulator says so and exits 1 (it said 'sent'
    and exited 0); with --curve-server reco the same run delivers and exits 0."""
    raw = tmp_path / "ev.msgpack"
    write_raw_file(raw, (envelope(e) for e in range(50)))
    address = free_address()
    pull = zmq.Context.instance().socket(zmq.PULL)
    Curve(keys, "reco").apply(pull, True, "")
    pull.bind(address)
    try:
        base = ECLRECO + ["daq-emulator", "--input", str(raw), "--connect", address, "--curve-dir", keys,
                          "--sched", "normal"]
        r = subprocess.run(base, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "no receiver completed a handshake" in r.stdout, r.stdout + r.stderr
        assert "--curve-server" in r.stdout
        r = subprocess.run(base + ["--curve-server", "reco"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        got = []
        while pull.poll(2000) and len(got) < 50:
            got.append(pull.recv())
        assert len(got) == 50
    finally:
        pull.close(0)


def test_curve_farm_end_to_end(tmp_path, keys, rogue_keys, zmq_context):
    """`hlt run --curve-dir`: every role authenticates; an authorized DAQ is processed, an unknown
    key never reaches the farm, and run control without a known key gets no answer."""
    from test_hlt import worker_modules

    inp, ctl, wrk = free_address(), free_address(), free_address()
    out = tmp_path / "farm.root"
    log = open(tmp_path / "farm.log", "w+")
    proc = subprocess.Popen(ECLRECO + ["hlt", "run", "--workers", "1", "--input", inp, "--control", ctl,
                                       "--workers-addr", wrk, "--output", str(out), "--modules", worker_modules(),
                                       "--metrics-base-port", "-1", "--stop-drain", "0.3",
                                       "--curve-dir", keys], stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp_path))

    def ctl_cmd(*args, curve=True, timeout=60):
        extra = ["--curve-dir", keys] if curve else []
        return subprocess.run(ECLRECO + ["hlt", *args, "--control", ctl, *extra], capture_output=True, text=True,
                              timeout=timeout)

    def logtext():
        log.flush()
        log.seek(0)
        return log.read()

    try:
        t0 = time.monotonic()
        while True:
            r = ctl_cmd("status", "--json", "--timeout", "2")
            if r.returncode == 0 and '"collector"' in r.stdout and '"worker"' in r.stdout:
                break
            assert proc.poll() is None and time.monotonic() - t0 < 60, logtext()
            time.sleep(0.3)
        # run control without keys: the handshake fails, no answer
        r = ctl_cmd("status", "--timeout", "1.5", curve=False)
        assert r.returncode == 1 and "no answer" in r.stderr
        ctx = zmq_context
        emulate([envelope(e) for e in range(5000, 5050)], inp, context=ctx, linger_ms=0,
                curve=Curve(rogue_keys, "daq"))
        n = 500
        emulate([envelope(e) for e in range(n)], inp, context=ctx, curve=Curve(keys, "daq"))
        ctx.term()
        t0 = time.monotonic()
        while True:
            st = json.loads(ctl_cmd("status", "--json").stdout)
            d = st["processes"][0]
            if d["confirmed"] >= n:
                break
            assert time.monotonic() - t0 < 60, logtext()
            time.sleep(0.3)
        assert d["received"] == n
        r = ctl_cmd("control", "terminate", timeout=90)
        assert r.returncode == 0, r.stderr + logtext()
        assert proc.wait(timeout=60) == 0, logtext()
    finally:
        kill_if_running(proc)
        log.close()
    with uproot.open(out) as f:
        evt = f["events"]["evt"].array(library="np")
    assert np.array_equal(np.sort(evt), np.arange(n))


# ------------------------------------------------------------------ metrics expose counts only
def test_metrics_expose_counts_never_payloads(tmp_path):
    """Scrape a running ZMQInput job fed with events carrying truth strings and recognisable payload
    bytes, malformed ones included: the exposition has numbers and labels, none of the bytes."""
    from eclreco.metrics import serve_process_metrics

    secret = "TRUTH-SECRET-7f3a9c"
    address, port = free_address(), free_port()
    path = eclreco.create_path()
    path.add_module("ZMQInput", address=address, idle_timeout_s=3.0)
    path.add_module("ECLUnpacker")
    exporter = serve_process_metrics(port, role="reco", path=path)
    marker = b"PAYLOADMARK!"
    msgs = []
    for e in range(200):
        m = msgpack.unpackb(envelope(e), raw=False)
        m["truth"] = {"label": secret, "blob": marker * 4}
        msgs.append(msgpack.packb(m, use_bin_type=True))
    msgs.append(marker + secret.encode())  # malformed: not msgpack... but printable
    msgs.append(msgpack.packb({"v": 1, "note": secret}))  # missing keys
    scraped = []

    def feed_and_scrape():
        emulate(msgs, address, linger_ms=5000)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
            if re.search(r"^eclreco_events_received_total 202\.0$", text, re.M):
                scraped.append(text)
                return
            time.sleep(0.1)

    t = threading.Thread(target=feed_and_scrape)
    t.start()
    try:
        eclreco.process(path, install_signal_handlers=False)
    finally:
        t.join()
        exporter.close()
    assert scraped, "the metrics never showed the 202 events"
    text = scraped[0]
    assert secret not in text and "PAYLOADMARK" not in text
    for line in text.splitlines():  # every sample line: name{labels} number
        if line and not line.startswith("#"):
            assert re.fullmatch(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? [-+0-9.eEinfNa]+', line), line
            labels = re.findall(r'="([^"]*)"', line)
            assert all(re.fullmatch(r"[A-Za-z0-9_.#:+\-]*", v) for v in labels), line


# ------------------------------------------------------------------ no telemetry from the CNN's runtime
def test_the_cnn_runtime_sends_no_telemetry_unless_the_user_asks(tmp_path):
    """onnxruntime 1.32's Linux wheel made, at the first session of every job and worker, a device id and
    an SQLite telemetry store in ~/.cache/Microsoft/DeveloperTools/.onnxruntime and a .ses file in the
    temporary directory, for uploads to events.data.microsoft.com. `import eclreco` now turns that off
    (ORT_DISABLE_TELEMETRY=1), unless the user set the variable: a reconstruction with the CNN leaves
    nothing in HOME or the temporary directory."""
    script = ("import os, eclreco\n"
              "from eclreco.reconstruction import add_reconstruction\n"
              "path = eclreco.create_path()\n"
              "path.add_module('SimulationInput', events=20)\n"
              "add_reconstruction(path)\n"
              "eclreco.process(path)\n"
              "assert 'ECLEnergyCorrection' in [m['name'] for m in eclreco.statistics.summary()['modules']]\n"
              "print(os.environ.get('ORT_DISABLE_TELEMETRY', 'unset'))\n")
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    for given, expected in ((None, "1"), ("0", "0")):
        home, tmp = tmp_path / f"home{expected}", tmp_path / f"tmp{expected}"
        home.mkdir()
        tmp.mkdir()
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           env={**env, "HOME": str(home), "TMPDIR": str(tmp),
                                **({"ORT_DISABLE_TELEMETRY": given} if given else {})})
        assert r.returncode == 0, r.stderr[-2000:]
        if given is None:
            assert sorted(os.listdir(home)) == [] and sorted(os.listdir(tmp)) == []
        assert r.stdout.split() == [expected]  # the user's own setting is kept


def test_curve_key_options_without_curve_dir_are_refused_not_ignored(tmp_path):
    """`daq-emulator --connect ... --curve-secret x` (and --curve-name, in every command that takes the CURVE
    options) started a plaintext link without a word: the operator believed it encrypted. Without --curve-dir
    they are now one line naming them, exit 2, before any socket."""
    raw = tmp_path / "ev.msgpack"
    write_raw_file(raw, (envelope(e) for e in range(3)))
    commands = [["daq-emulator", "--input", str(raw), "--connect", "tcp://127.0.0.1:9"],
                ["hlt", "distributor", "--metrics-port", "-1", "--input", free_address()],
                ["hlt", "collector", "--metrics-port", "-1", "-o", str(tmp_path / "c.root")],
                ["hlt", "worker", "--metrics-port", "-1", "--rejected", ""],
                ["hlt", "run", "-o", str(tmp_path / "r.root"), "--metrics-base-port", "-1"],
                ["hlt", "control", "stop", "--timeout", "1"], ["hlt", "status", "--timeout", "1"]]
    options = (["--curve-secret", str(tmp_path / "own.key_secret")], ["--curve-name", "daq2"])
    runs = [(ECLRECO + argv + opts, " ".join(argv[:2] if argv[0] == "hlt" else argv[:1]), "--curve-")
            for argv in commands for opts in options]
    runs += [([sys.executable, os.path.join(REPO, "steering", "reco.py"), "-i", free_address(), "--idle-timeout",
               "1", "--curve-name", "r", "--curve-secret", "s"], "reco.py", "--curve-name, --curve-secret: ")]
    for cmd, command, named in runs:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=str(tmp_path))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{cmd}: started without CURVE")
        err = r.stderr.strip().splitlines()  # reco.py's argparse shows its usage first
        assert r.returncode == 2 and (len(err) == 1 or command == "reco.py"), (cmd, r.stdout, r.stderr)
        assert f"{command}: error: " in err[-1] and named in err[-1] and "without --curve-dir" in err[-1], r.stderr


def test_empty_curve_key_options_without_curve_dir_are_refused_too(tmp_path):
    """`reco.py -i ... --curve-name ''` (or --curve-secret '', --connect --curve-server '': a shell variable
    left unset) started a plaintext link: the check tested the options' values for truth, so an empty one
    counted as not given. They are refused as any value is, one line naming them, exit 2, before any socket."""
    reco = [sys.executable, os.path.join(REPO, "steering", "reco.py"), "-i", free_address(), "--idle-timeout", "1"]
    runs = [(reco + ["--curve-name", ""], "reco.py", "--curve-name"),
            (reco + ["--curve-secret", ""], "reco.py", "--curve-secret"),
            (reco + ["--connect", "--curve-server", ""], "reco.py", "--curve-server"),
            (ECLRECO + ["hlt", "distributor", "--metrics-port", "-1", "--input", free_address(), "--curve-name", ""],
             "hlt distributor", "--curve-name"),
            (ECLRECO + ["hlt", "worker", "--metrics-port", "-1", "--rejected", "", "--curve-secret", ""],
             "hlt worker", "--curve-secret")]
    for cmd, command, named in runs:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=str(tmp_path))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{cmd}: started without CURVE")
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        assert r.returncode == 2 and f"{command}: error: {named}: it names a CURVE key, which does nothing without " \
            "--curve-dir" in last, (cmd, r.returncode, r.stdout[-2000:], r.stderr[-2000:])


def test_empty_curve_key_options_with_curve_dir_are_refused(tmp_path, keys):
    """`--curve-dir K --curve-name ''` (a shell variable left unset) took the role's default key in silence, as if the
    option were not given (`name or default`), where the operator meant another key; an empty --curve-secret the same.
    Refused, one line naming the option, exit 2, before any socket."""
    reco = [sys.executable, os.path.join(REPO, "steering", "reco.py"), "-i", free_address(), "--idle-timeout", "1",
            "--curve-dir", keys]
    runs = [(reco + ["--curve-name", ""], "reco.py", "--curve-name", "reco"),
            (reco + ["--curve-secret", ""], "reco.py", "--curve-secret", "reco"),
            (ECLRECO + ["hlt", "distributor", "--metrics-port", "-1", "--input", free_address(), "--curve-dir", keys,
                        "--curve-name", ""], "hlt distributor", "--curve-name", "distributor")]
    for cmd, command, named, default in runs:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=str(tmp_path))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{cmd}: started with the default key")
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        assert r.returncode == 2 and last.endswith(f"{command}: error: {named} '': names no key (leave it out for the "
                                                   f"default: private/{default}.key_secret in --curve-dir)"), \
            (cmd, r.returncode, r.stdout[-2000:], r.stderr[-2000:])


def test_reco_py_refuses_a_curve_server_it_would_not_use(tmp_path, keys):
    """`reco.py -i tcp://... --curve-dir K --curve-server x` binds: it is the CURVE server and asks no peer for a
    key, and the --curve-server was ignored (as one without --curve-dir was): it ran, the operator believing the
    sender checked. Both are refused now, as daq-emulator refuses them, one line naming the option, exit 2."""
    reco = [sys.executable, os.path.join(REPO, "steering", "reco.py"), "-i", free_address(), "--idle-timeout", "1"]
    for extra, message in ((["--curve-dir", keys, "--curve-server", "daq"], "--curve-server 'daq' names the peer's "
                            "CURVE key when connecting: this socket binds, and is the CURVE server itself"),
                           (["--connect", "--curve-server", "daq"],
                            "--curve-server: it names a CURVE key, which does nothing without --curve-dir")):
        try:
            r = subprocess.run(reco + extra, capture_output=True, text=True, timeout=20, cwd=str(tmp_path))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{extra}: reco.py started, the --curve-server ignored")
        assert r.returncode == 2 and f"reco.py: error: {message}" in r.stderr.splitlines()[-1], (extra, r.stderr)


def test_hlt_run_refuses_one_key_for_the_roles_it_starts(tmp_path, keys):
    """`hlt run --curve-dir K --curve-name ops` (or --curve-secret F) started the farm: the name or file applied
    to the supervisor's own control link only, every role it started used its role's key, and the operator
    believed the farm used ops's. One line naming the option now, exit 2, before any role; --help says it."""
    generate_keys(keys, ["ops"])
    farm = ECLRECO + ["hlt", "run", "-n", "1", "-o", str(tmp_path / "r.root"), "--metrics-base-port", "-1",
                      "--input", free_address(), "--control", free_address(), "--curve-dir", keys]
    for extra, named in ((["--curve-name", "ops"], "--curve-name"),
                         (["--curve-secret", os.path.join(keys, "private", "ops.key_secret")], "--curve-secret")):
        try:
            r = subprocess.run(farm + extra, capture_output=True, text=True, timeout=20, cwd=str(tmp_path))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{extra}: the farm started, its roles with their own keys")
        assert r.returncode == 2 and not r.stdout, (extra, r.stdout, r.stderr)
        assert r.stderr.startswith(f"eclreco hlt run: error: {named}: hlt run's roles use their own keys of "
                                   "--curve-dir") and r.stderr.count("\n") == 1, r.stderr
        # the roles named are those hlt run starts (hlt.protocol.CURVE_ROLES), not a list written out by hand
        assert f"DIR/private/ROLE.key_secret ({', '.join(CURVE_ROLES)})" in r.stderr, r.stderr
    r = subprocess.run(ECLRECO + ["hlt", "run", "--help"], capture_output=True, text=True, timeout=30)
    assert (f"refused: each role uses its own key, DIR/private/ROLE.key_secret ({', '.join(CURVE_ROLES)})"
            in " ".join(r.stdout.split())), r.stdout
    assert not os.path.exists(tmp_path / "r.root")
