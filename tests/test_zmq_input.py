"""ZMQInput: a reco-like path fed by a real PUSH socket on a random local port."""
import itertools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import uproot
import zmq

import eclreco
from helpers import kill_if_running
from hlt_helpers import (big_envelope, bind_send_and_close, envelope, free_address, push_events, push_messages,
                         read_quarantine, send_until_blocked)

pytestmark = pytest.mark.timeout(60)


def zmq_input_path(address, output=None, quarantine=None, **params):
    """ZMQInput with `params` → ECLUnpacker (the rest of the chain is not needed here), then
    RootOutput and RejectedOutput where files are given; the path and the input module."""
    path = eclreco.create_path()
    inp = path.add_module("ZMQInput", address=address, **params)
    path.add_module("ECLUnpacker")
    if output is not None:
        path.add_module("RootOutput", filename=str(output))
    if quarantine is not None:
        path.add_module("RejectedOutput", filename=str(quarantine))
    return path, inp


def process_fed(path, feed) -> dict:
    """Runs `path` while feed() sends from a thread; the run's statistics summary."""
    t = threading.Thread(target=feed)
    t.start()
    eclreco.process(path, install_signal_handlers=False)
    t.join()
    return eclreco.statistics.summary()


def test_zmq_input_all_events_and_idle_timeout(tmp_path):
    address = free_address()
    out = tmp_path / "zmq.root"
    path, inp = zmq_input_path(address, output=out, idle_timeout_s=0.5, max_latency_ms=5.0)
    n = 3000
    feeder = threading.Thread(target=push_events, args=(address, range(n)))
    t0 = time.monotonic()
    feeder.start()
    eclreco.process(path, batch_size=256, install_signal_handlers=False)
    feeder.join()
    elapsed = time.monotonic() - t0
    s = eclreco.statistics.summary()
    assert s["received"] == n and s["processed"] == n and s["rejected"] == 0
    # idle timeout: the run ended shortly after the last message, not before it
    assert elapsed < 20
    c = inp.counters()
    assert c["messages_received"] == n
    assert c["bytes_received"] == sum(len(envelope(e)) for e in range(n))
    with uproot.open(out) as f:
        evt = f["events"]["evt"].array(library="np")
    assert sorted(evt.tolist()) == list(range(n))


def test_zmq_input_idle_timeout_counts_from_first_message():
    """No message at all: the idle timeout does not end the run (it starts at the first message)."""
    address = free_address()
    path, _ = zmq_input_path(address, idle_timeout_s=0.3, poll_ms=50.0)
    stopper = threading.Timer(1.5, lambda: push_events(address, [7]))
    t0 = time.monotonic()
    stopper.start()
    eclreco.process(path, install_signal_handlers=False)
    elapsed = time.monotonic() - t0
    stopper.join()
    assert eclreco.statistics.summary()["received"] == 1
    assert 1.5 + 0.3 - 0.1 < elapsed < 10


def test_zmq_input_rejects_and_keeps_oversized_messages(tmp_path):
    """A message over max_message_bytes is rejected as oversize, counted and kept, with the
    identifiers it has; the valid events sent right behind it on the same connection all arrive.
    (When the socket refused it, ZMQ_MAXMSGSIZE, libzmq dropped the connection and with it the
    events in flight behind it: 7 of 2000 in a measurement, counted nowhere.)"""
    address = free_address()
    quarantine = tmp_path / "rejected.msgpack"
    path, inp = zmq_input_path(address, quarantine=quarantine, idle_timeout_s=1.0, max_message_bytes=4096)
    big = [big_envelope(100, 20_000), b"\x00" * 100_000]
    # back to back with the rest, on one connection
    messages = [envelope(e) for e in range(100)] + big + [envelope(e) for e in range(101, 2000)]

    s = process_fed(path, lambda: push_messages(address, messages))
    assert (s["received"], s["processed"], s["rejected"]) == (2001, 1999, 2)
    assert s["rejected_by_reason"] == {"oversize": 2}
    kept = read_quarantine(quarantine)
    # as the producer sent it: the receiver's mark is taken off (the record kept the mark before)
    assert [(r["reason"], r["message"]) for r in kept] == [("oversize", m) for m in big]
    assert all("over the receiver's limit of 4096 bytes" in r["detail"] for r in kept)
    assert kept[0]["evt"] == 100 and "evt" not in kept[1]
    assert kept[1]["detail"] == "a message of 100000 bytes, over the receiver's limit of 4096 bytes (max_message_bytes)"
    assert inp.counters()["disconnects"] <= 1  # at most the sender closing: no refusal


def test_zmq_input_socket_refuses_messages_over_its_own_limit():
    """Above refuse_message_bytes (the memory guard) libzmq refuses a message unread and drops its
    connection: counted as a disconnect; the stream goes on when the sender reconnects."""
    address = free_address()
    # idle_timeout_s well above the sender's pauses (0.8 s): a stall of the loaded machine must not end the run early
    path, inp = zmq_input_path(address, idle_timeout_s=5.0, max_message_bytes=4096, refuse_message_bytes=16384)

    def feed():
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 5000)
        s.connect(address)
        for e in range(100):
            s.send(envelope(e))
        time.sleep(0.3)
        s.send(b"\x00" * 100_000)  # refused by the receiving socket
        time.sleep(0.5)  # the sender reconnects by itself
        for e in range(100, 200):
            s.send(envelope(e))
        s.close()

    s = process_fed(path, feed)
    # the refused message never reached the chain; the stream went on after it
    assert s["received"] == 200 and s["rejected"] == 0
    assert inp.counters()["disconnects"] >= 1
    assert inp.counters()["bytes_received"] < 100_000


@pytest.mark.parametrize("param", ["poll_ms", "max_latency_ms"])
def test_zmq_input_waits_are_bounded_at_initialize(param):
    """poll_ms=1e12 passed initialize and failed at the first batch ('OverflowError: value too large to
    convert to int' in the socket's poll): the waits are now at most a minute, checked at initialize."""
    path, _ = zmq_input_path(free_address(), **{param: 1e12})
    with pytest.raises(RuntimeError, match=f"ZMQInput: {param} must be .*<= 60000"):
        eclreco.process(path, install_signal_handlers=False)


def test_reco_connecting_to_an_absent_sender_says_that_it_waits(tmp_path, repo_dir):
    """reco.py -i ADDR --connect to a sender that is not there (a wrong port, a host name that does not
    resolve) waited without a word: after 5 s without a handshake it says where it waits."""
    address = free_address()
    p = subprocess.Popen([sys.executable, os.path.join(repo_dir, "steering", "reco.py"), "-i", address, "--connect",
                          "--threads", "1", "-o", str(tmp_path / "out.root")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        out = []
        t0 = time.monotonic()
        while not any(f"waiting for {address}: no connection after" in line for line in out):
            line = p.stdout.readline()
            assert line and time.monotonic() - t0 < 60, "".join(out)
            out.append(line)
        p.send_signal(signal.SIGINT)
        rest, _ = p.communicate(timeout=60)
    finally:
        kill_if_running(p)
    assert "[ZMQInput] waiting for" in "".join(out), "".join(out)


def test_reco_refuses_to_take_over_an_ipc_address_a_live_process_listens_on(repo_dir):
    """A second `reco.py -i ipc://PATH` (one still running there) made libzmq unlink the socket file and bind
    its own: the first job stayed up with no sender able to reach it (0 events, waiting until stopped) and the
    second took the stream. reco.py now refuses, exit 2; a socket file that nobody listens on is free."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="eclreco-")  # short: an ipc path has at most ~107 bytes
    address = f"ipc://{folder}/daq"
    ctx = zmq.Context.instance()
    live = ctx.socket(zmq.PULL)
    live.bind(address)
    reco = [sys.executable, os.path.join(repo_dir, "steering", "reco.py"), "-i", address, "--idle-timeout", "1",
            "--threads", "1", "--no-cnn", "--no-dqm"]
    try:
        r = subprocess.run(reco, capture_output=True, text=True, timeout=30)  # it waited for a sender before
        assert r.returncode == 2 and "another process listens there" in r.stderr, r.stdout + r.stderr
        push = ctx.socket(zmq.PUSH)  # the live listener still has its address
        push.connect(address)
        push.send(envelope(1))
        assert live.poll(10_000) and live.recv() == envelope(1)
        push.close(0)
        # the socket file of a process that died (bound, never listened, not unlinked) is free
        import socket
        stale = f"ipc://{folder}/stale"
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(stale[len("ipc://"):])
        dead.close()
        reco[reco.index(address)] = stale
        p = subprocess.Popen(reco, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        push_events(stale, range(5))
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0 and "events received 5, processed 5" in out, out
    finally:
        live.close(0)
        shutil.rmtree(folder, ignore_errors=True)


def test_reco_refuses_a_taken_tcp_port_before_any_work(repo_dir, tmp_path):
    """`reco.py -i tcp://127.0.0.1:P` with P taken by another process exited 1 after the chain had started:
    'ZMQInput.initialize failed: ZMQError: Address already in use (addr=...) (at zmq/backend/...)'. It is now
    refused as a taken --metrics-port is: one line naming the address and what to do, exit 2, before any module
    is made; a port in TIME_WAIT only (the closed connections of a job that ended) is free."""
    ctx = zmq.Context.instance()
    live = ctx.socket(zmq.PULL)
    live.bind("tcp://127.0.0.1:*")
    address = live.getsockopt_string(zmq.LAST_ENDPOINT)
    reco = [sys.executable, os.path.join(repo_dir, "steering", "reco.py"), "-i", address, "--idle-timeout", "1",
            "--threads", "1", "--no-cnn", "--no-dqm", "-o", str(tmp_path / "out.root")]
    try:
        r = subprocess.run(reco, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.splitlines()[-1] == f"reco.py: error: -i {address!r}: another process listens there (one " \
            "already running?); stop it, or choose another port", r.stderr
        assert "eclreco" not in r.stdout and not os.path.exists(tmp_path / "out.root"), r.stdout  # no path made
        push_events(address, [3])  # the listener keeps its port; then a connection of it closes (TIME_WAIT)
        assert live.poll(10_000) and live.recv() == envelope(3)
    finally:
        live.close(0)
    p = subprocess.Popen(reco, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    push_events(address, range(5))
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and "events received 5, processed 5" in out, out


@pytest.mark.parametrize("limits", [(4096, 4096), (4096, 1000), (-1, 0), (0, -1)])
def test_zmq_input_message_limits_are_checked(limits):
    path, _ = zmq_input_path(free_address(), max_message_bytes=limits[0], refuse_message_bytes=limits[1])
    with pytest.raises(RuntimeError, match="ZMQInput: .*(must exceed max_message_bytes|must be >= 0)"):
        eclreco.process(path, install_signal_handlers=False)


def test_zmq_input_rejects_and_keeps_multipart_messages(tmp_path):
    """Spec, Transport: one event per message, a single frame. A multipart message (an envelope
    split over two frames, beside an empty frame, two envelopes) is rejected as multi_frame,
    counted and quarantined with its frames; the joined frames used to pass for a valid event.
    A single frame forged to look like that mark (or the oversize one) is rejected as not_msgpack
    and kept as sent (the receiver's escape taken off)."""

    from eclreco.raw_sockets import mark_multi_frame, mark_oversize

    address = free_address()
    quarantine = tmp_path / "rejected.msgpack"
    path, _ = zmq_input_path(address, quarantine=quarantine, idle_timeout_s=1.0, max_latency_ms=5.0)
    m = envelope(42)
    multipart = [[m[:10], m[10:]], [m, b""], [b"", m], [m, envelope(43)]]
    forged = [mark_multi_frame([m, m]), mark_oversize(m, 1)]

    s = process_fed(path, lambda: push_messages(address, [envelope(1), *multipart, *forged, envelope(2)]))
    assert (s["received"], s["processed"], s["rejected"]) == (8, 2, 6)
    assert s["rejected_by_reason"] == {"multi_frame": 4, "not_msgpack": 2}
    kept = read_quarantine(quarantine)
    assert [(r["reason"], r["message"]) for r in kept] == (
        [("multi_frame", mark_multi_frame(fr)) for fr in multipart] + [("not_msgpack", f) for f in forged])
    assert all(r["detail"].startswith("a ZeroMQ message of 2 frames") for r in kept[:4])
    assert all(r["detail"].startswith("as sent (escaped by the receiver)") for r in kept[4:])


def test_reco_steering_zmq_sigint(tmp_path, repo_dir):
    """steering/reco.py -i tcp://... ends cleanly on SIGINT with a readable output."""
    import urllib.request

    from hlt_helpers import free_port

    address, port = free_address(), free_port()
    out = tmp_path / "reco.root"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(repo_dir, "steering")!r})
        import reco
        reco.add_reconstruction = lambda path, **kw: path.add_module("ECLUnpacker")  # the rest is not needed here
        sys.exit(reco.main(["-i", {address!r}, "-o", {str(out)!r}, "--threads", "1",
                            "--metrics-port", "{port}"]))
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    push_events(address, range(500))

    def processed():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("eclreco_events_processed_total "):
                        return float(line.split()[1])
        except OSError:
            return -1

    t0 = time.monotonic()
    while processed() != 500:  # the run is under way (signal handlers installed) and has everything
        assert p.poll() is None and time.monotonic() - t0 < 30
        time.sleep(0.1)
    p.send_signal(2)
    stdout, _ = p.communicate(timeout=30)
    assert p.returncode == 0, stdout
    with uproot.open(out) as f:
        assert np.sort(f["events"]["evt"].array(library="np")).tolist() == list(range(500))


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_emulator_binds_and_reco_connects(tmp_path, repo_dir, transport):
    """The other direction of the link: `daq-emulator --bind` and `steering/reco.py -i ADDR
    --connect` (ZMQInput with bind=False): every event arrives and is written. Over ipc:// as well
    (reco.py took an ipc:// address for a file name and refused it)."""
    import tempfile

    from eclreco.rawdata import write_raw_file

    raw, out = tmp_path / "ev.msgpack", tmp_path / "out.root"
    write_raw_file(raw, (envelope(e) for e in range(300)))
    ipc_dir = tempfile.mkdtemp(prefix="eclreco-")  # short: an ipc path has at most ~107 bytes
    address = free_address() if transport == "tcp" else f"ipc://{ipc_dir}/daq"
    daq = subprocess.Popen([sys.executable, "-m", "eclreco.cli", "daq-emulator", "--input", str(raw), "--bind",
                            address, "--sched", "normal"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        r = subprocess.run([sys.executable, os.path.join(repo_dir, "steering", "reco.py"), "-i", address, "--connect",
                            "--idle-timeout", "3", "--threads", "1", "-o", str(out)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        log, _ = daq.communicate(timeout=60)
        assert daq.returncode == 0, log
    finally:
        kill_if_running(daq)
        shutil.rmtree(ipc_dir, ignore_errors=True)
    with uproot.open(out) as f:
        assert np.array_equal(np.sort(f["events"]["evt"].array(library="np")), np.arange(300))


class SlowChain(eclreco.Module):
    """Holds each batch for a while: a busy chain, behind which messages queue up in the input."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def event(self, batch):
        time.sleep(self.seconds)


@pytest.mark.parametrize("params,drained", [({}, True), ({"stop_timeout_s": 0.0}, False),
                                            ({"stop_drain_ms": 0.0}, False)])
def test_zmq_input_reads_what_is_queued_when_the_run_is_stopped(params, drained, capfd):
    """SIGINT/SIGTERM (request_stop) while 1000 messages wait in the input's queue: by default
    the input reads on until it is quiet and the chain processes every one (they were lost with
    the socket before); with the drain cut short (stop_timeout_s 0) or off (stop_drain_ms 0) the
    ones left are counted as unread_at_end and reported, and received + unread is every message."""
    n = 1000
    # one address per case: the two cut-short cases shared one ("1-0"), and a PUSH that connected while
    # the previous case's PULL was still being closed sent its 1000 messages there (received 0, unread 0)
    address = f"inproc://stop-drain-{'-'.join(params) or 'default'}-{os.getpid()}"
    ctx = zmq.Context.instance()  # inproc: the one context of ZMQInput; every message sits in its queue
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.connect(address)
    for e in range(n):
        push.send(envelope(e))
    path = eclreco.create_path()
    inp = path.add_module("ZMQInput", address=address, **params)
    path.add_module(SlowChain(0.01))
    stopper = threading.Timer(0.3, eclreco._core.request_stop)
    stopper.start()
    eclreco.process(path, batch_size=16, threads=1, install_signal_handlers=False)
    stopper.join()
    push.close(0)
    s = eclreco.statistics.summary()
    unread = inp.counters()["unread_at_end"]
    assert s["received"] == s["processed"] and s["received"] + unread == n, (s, unread)
    if drained:
        assert unread == 0
    else:
        assert 0 < s["received"] < n / 2 and f"ZMQInput: warning: {int(unread)} messages were still queued" in capfd.readouterr().err


def test_the_drain_after_a_stop_fills_its_batches_as_the_run_does():
    """A source that goes on sending after SIGINT/SIGTERM (one message every 2 ms): the drain returned
    each batch at its first empty poll, so the chain ran batches of one event (1.0 on average; the full
    chain then spent ~10x the CPU per event, its CNN call being per batch). It now fills them as the
    run does, until max_latency_ms after their first message, and still reads every message."""
    address = f"inproc://drain-batches-{os.getpid()}"
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.connect(address)
    n = 600
    sizes = []

    class DrainBatchSizes(eclreco.Module):
        def event(self, batch):
            if eclreco._core.stop_requested():
                sizes.append(len(batch))

    path = eclreco.create_path()
    # a long latency and quiet time: a loaded machine's late feeder still fills batches, never ends the drain
    inp = path.add_module("ZMQInput", address=address, max_latency_ms=200.0, stop_drain_ms=1000.0)
    path.add_module(DrainBatchSizes())

    def feed():
        for e in range(n):
            push.send(envelope(e))
            time.sleep(0.002)

    feeder = threading.Thread(target=feed)
    feeder.start()
    stopper = threading.Timer(0.3, eclreco._core.request_stop)
    stopper.start()
    eclreco.process(path, threads=1, install_signal_handlers=False)
    stopper.join()
    feeder.join()
    push.close(0)
    s = eclreco.statistics.summary()
    assert s["received"] == s["processed"] == n and inp.counters()["unread_at_end"] == 0, s
    assert sizes and sum(sizes) / len(sizes) >= 4, sizes


def test_messages_left_by_an_event_count_are_reported_as_such(capfd):
    """`-n` (max_events) ends the run with messages still queued: counted as unread_at_end, and the
    warning says why (it said they "arrived after the run had ended", which they had not)."""
    address = f"inproc://max-events-{os.getpid()}"
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.connect(address)
    path = eclreco.create_path()
    inp = path.add_module("ZMQInput", address=address)
    for e in range(200):
        push.send(envelope(e))
    eclreco.process(path, max_events=50, batch_size=16, threads=1, install_signal_handlers=False)
    push.close(0)
    s = eclreco.statistics.summary()
    unread = inp.counters()["unread_at_end"]
    assert s["received"] + unread == 200 and unread > 0, (s, unread)
    assert "the run had ended before they were read: its event count (-n) reached" in capfd.readouterr().err


def test_reco_reports_the_messages_left_unread_in_its_summary_and_file(repo_dir, tmp_path):
    """Messages still queued at the input when a job ends (-n reached here; a stop's drain cut short, or sent after
    the idle timeout) were counted as unread_at_end but said only in a `ZMQInput: warning` line on stderr: not in
    the job's summary lines, nor in the ROOT file's metadata, where a DAQ engineer reading the file later looks
    for what became of the stream. Both now say how many."""
    import json
    import re

    address = free_address()
    out = tmp_path / "out.root"
    p = subprocess.Popen([sys.executable, os.path.join(repo_dir, "steering", "reco.py"), "-i", address, "-n", "50",
                          "--batch-size", "16", "--threads", "1", "--no-cnn", "--no-dqm", "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    push_events(address, range(400), timeout_s=5)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stdout + stderr
    m = re.search(r"ZMQInput: warning: (\d+) messages were still queued", stderr)
    assert m and int(m.group(1)) > 0, stderr
    unread = int(m.group(1))
    assert "events received 50, processed 50" in stdout, stdout
    assert f"  unread at end: {unread} messages still queued at the input when the run ended" in stdout, stdout
    with uproot.open(out) as f:
        job = json.loads(str(f["metadata"]))["job"]
    assert job["received"] == 50 and job["unread_at_end"] == unread, job


@pytest.mark.parametrize("reads", [True, False])
def test_emulator_holds_its_ipc_connection_until_the_receiver_has_read_it(reads):
    """libzmq stops reading an ipc:// connection while the receiver's pipe is full (ZMQ_RCVHWM) and drops
    it, with the bytes still unread in the kernel, when told that the sender closed it: the emulator
    binding ipc:// and exiting lost up to ~200 kB of events (here 28 of 50 1-kB messages, all written
    to the kernel before the receiver read any) and said it sent them all. It now keeps the connection
    open until the receiver has read it, or the linger runs out, and then says how many bytes were left
    unread."""
    import tempfile

    from eclreco.daq import emulate

    ipc_dir = tempfile.mkdtemp(prefix="eclreco-")  # short: an ipc path has at most ~107 bytes
    address, n = f"ipc://{ipc_dir}/daq", 50  # 50 kB: the pipe, libzmq's and the kernel's buffers hold them
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 16)
    pull.setsockopt(zmq.LINGER, 0)
    res, said, waiting = {}, [], threading.Event()

    def report(line):
        said.append(line)
        if "to read the" in line:
            waiting.set()

    sender = threading.Thread(target=lambda: res.update(emulate([b"x" * 1000] * n, address, bind=True,
                                                                linger_ms=3000 if reads else 500, report=report)))
    try:
        sender.start()
        while not os.path.exists(address[len("ipc://"):]):
            time.sleep(0.01)
        pull.connect(address)
        # nothing read until the sender closed its socket (before the fix: returned) or waits for us to read
        while sender.is_alive() and not waiting.is_set():
            time.sleep(0.01)
        received = 0
        while reads and pull.poll(1000):
            pull.recv()
            received += 1
        sender.join(10)
    finally:
        pull.close()
        ctx.term()
        shutil.rmtree(ipc_dir, ignore_errors=True)
    if reads:
        assert received == n, said
        assert res["undelivered_at_close"] is False and res["unread_bytes_at_close"] == 0, res
    else:  # the receiver took nothing: what it did not read is said, not passed over
        assert res["undelivered_at_close"] and res["unread_bytes_at_close"] > 0, res
        assert any("written to it and still unread: " in s for s in said), said


def test_zmq_input_counts_what_libzmq_drops_unread_with_a_closed_ipc_connection(capfd):
    """A sender that binds ipc://, writes and closes while ZMQInput's queue is full (rcvhwm) loses what
    the kernel still held for the connection: libzmq drops it unread (see the test above; a DAQ's own
    sender cannot be fixed from here). That loss was silent, a disconnect like any other; the bytes left
    unread are now counted (lost_bytes_at_disconnect) and said."""
    import tempfile

    ipc_dir = tempfile.mkdtemp(prefix="eclreco-")
    address, n, size = f"ipc://{ipc_dir}/daq", 50, 1000
    closed = threading.Event()

    def send():  # plain pyzmq: a sender that exits once libzmq has written everything
        bind_send_and_close(address, [b"x" * size] * n)
        closed.set()

    class WaitForTheSender(eclreco.Module):  # the chain holds the first event until the sender is gone
        def event(self, batch):
            closed.wait(10)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        path = eclreco.create_path()
        inp = path.add_module("ZMQInput", address=address, bind=False, rcvhwm=16, idle_timeout_s=1.0)
        path.add_module(WaitForTheSender())
        eclreco.process(path, batch_size=1, install_signal_handlers=False)
    finally:
        sender.join(10)
        shutil.rmtree(ipc_dir, ignore_errors=True)
    received, lost = inp.messages_received, int(inp.counters()["lost_bytes_at_disconnect"])
    assert 0 < received < n and lost > 0, (received, lost)
    assert received + -(-lost // (size + 9)) == n  # 9: ZMTP's header of a long frame; a message cut counts once
    assert f"{lost} bytes of events sent to {address} were lost unread" in capfd.readouterr().err


def test_the_input_holds_at_most_max_queue_bytes_and_the_sender_blocks_beyond():
    """The input's memory is bounded in bytes with back-pressure: libzmq's receive queue of a connection holds at
    most max_queue_bytes // refuse_message_bytes messages (rcvhwm lowered), a batch ends at the message that reaches
    max_queue_bytes, and a sender beyond them blocks; nothing is dropped. Before, rcvhwm alone (10,000 messages of up to 64 MiB: 640 GiB)
    bounded the queue: here a stalled chain let the sender put all 2000 messages of 64 kB (128 MB) into it, and
    batches took up to batch_size messages whatever their size."""
    address = free_address()
    n, size = 2000, 64 * 1024
    messages = [big_envelope(e, size) for e in range(n)]
    size = len(messages[0])
    release = threading.Event()
    sizes, stalled_at = [], []

    class StallsOnTheFirstBatch(eclreco.Module):
        def event(self, batch):
            sizes.append(sum(np.diff(batch["RawEnvelopes"].offsets)))
            release.wait(60)  # the chain stalls: the input's socket is read no more meanwhile

    path = eclreco.create_path()
    inp = path.add_module("ZMQInput", address=address, idle_timeout_s=2.0, max_message_bytes=100_000,
                          refuse_message_bytes=128 * 1024, max_queue_bytes=1 << 20)
    path.add_module(StallsOnTheFirstBatch())
    assert inp.queue_hwm == 8  # 1 MiB // 128 kiB

    def feed():
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 1)
        push.setsockopt(zmq.LINGER, 30_000)
        push.connect(address)
        sent = 0
        try:
            push.setsockopt(zmq.SNDTIMEO, 2000)
            for m in messages:
                try:
                    push.send(m)
                except zmq.Again:  # the receiver's queue and the TCP buffers are full: the sender blocks
                    stalled_at.append(sent)
                    break
                sent += 1
            release.set()
            push.setsockopt(zmq.SNDTIMEO, 30_000)
            for m in messages[sent:]:  # the rest, once the chain goes on: all arrive
                push.send(m)
        finally:
            release.set()
            push.close()

    s = process_fed(path, feed)
    # the loopback's socket buffers hold some MB besides the 8 messages queued: far fewer than the 2000
    assert stalled_at and stalled_at[0] < n // 2, stalled_at
    assert s["received"] == s["processed"] == n and inp.counters()["unread_at_end"] == 0, s
    assert (1 << 20) <= max(sizes) < (1 << 20) + size, sizes  # a batch ends at the message that reaches the bound


def test_zmq_output_that_cannot_attach_its_monitored_socket_fails_without_hanging():
    """ZMQOutput with give_up_unconnected (as the HLT worker's) on an address it cannot bind: its failed
    initialize terminated its own context while the monitor's socket was still open, and the context's term
    waited for it for ever (the job hung instead of failing). The monitor is closed first now."""
    address = free_address()
    job = textwrap.dedent(f"""
        import zmq
        import eclreco
        taken = zmq.Context.instance().socket(zmq.PULL)
        taken.bind({address!r})
        path = eclreco.create_path()
        path.add_module("SimulationInput", events=5, detector="array30", particle="gamma", seed=3)
        path.add_module("ZMQOutput", address={address!r}, bind=True, give_up_unconnected=True)
        try:
            eclreco.process(path, install_signal_handlers=False)
        except RuntimeError as err:
            print("FAILED", err, flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", job], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "FAILED ZMQOutput.initialize failed: AddressInUse" in proc.stdout, (
        proc.stdout, proc.stderr)


def test_zmq_output_delivers_its_queue_to_a_receiver_that_binds_after_the_last_send():
    """ZMQOutput to a receiver that binds late: the job exited after its last send and the batches in
    the socket's queue went with it (50 of 50 here, counted as sent): its socket lingered in the shared
    Context.instance(), which nothing terminates, so no linger was kept. It now terminates a context
    of its own at terminate(), which waits up to stop_timeout_s for the receiver."""
    address = free_address()
    job = textwrap.dedent(f"""
        import threading, time
        import eclreco
        path = eclreco.create_path()
        path.add_module("SimulationInput", events=400, detector="array30", particle="gamma", seed=3)
        out = path.add_module("ZMQOutput", address={address!r}, stop_timeout_s=30.0)
        def say_sent():  # every send returned (the queue holds them, below sndhwm): the receiver may bind
            while out.batches_sent < 50:
                time.sleep(0.01)
            print("SENT", flush=True)
        threading.Thread(target=say_sent, daemon=True).start()
        eclreco.process(path, batch_size=8, install_signal_handlers=False)
        print("batches_sent", out.batches_sent, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", job], stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline().strip()  # or the job's last line: it ended before its thread spoke
        assert first in ("SENT", "batches_sent 50"), first
        try:  # the job closes and exits at once when nothing waits for the linger (as before)
            proc.wait(3)
        except subprocess.TimeoutExpired:
            pass
        pull = zmq.Context.instance().socket(zmq.PULL)
        pull.bind(address)
        n = 0
        while pull.poll(3000):
            pull.recv()
            n += 1
        pull.close(0)
        out, _ = proc.communicate(timeout=30)
    finally:
        kill_if_running(proc)
    out = first + "\n" + out
    assert proc.returncode == 0 and "batches_sent 50" in out, out
    assert n == 50, (n, out)


@pytest.mark.parametrize("stop_drain_ms", [200.0, 0.0])
def test_an_end_with_a_backlog_in_a_tcp_input_connection_loses_nothing_uncounted(stop_drain_ms):
    """`-n` ends the run while a tcp:// sender's queue is full: the input's queue, the kernels' buffers of
    the connection and the sender's queue hold its events. ZMQInput's close tore the connection down with
    what the kernels held: lost, in no counter (the sender's libzmq had them sent). The connection is now
    ended first (the sender closes its side after what it wrote, which is counted unread_at_end); the rest
    stays queued at the sender, for the next receiver. stop_drain_ms 0 stands for a reader slower than the
    backlog (a loaded host): ended at stop_drain_ms with the backlog still coming, the connection was dropped
    by libzmq with about 900 events; a source that sends on is now ended once what it had sent is read."""
    address = free_address()
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDTIMEO, 200)
    push.connect(address)
    sent = [0]

    def feed():  # until the sender's queue is full (the run reads one batch, waits, and ends)
        sent[0] = send_until_blocked(push, (envelope(i) for i in itertools.count()))

    class WaitForTheFeed(eclreco.Module):  # meanwhile the input is not read: the kernels' buffers fill
        def event(self, batch):
            t.join(30)

    path = eclreco.create_path()
    inp = path.add_module("ZMQInput", address=address, rcvhwm=1000, stop_drain_ms=stop_drain_ms)
    path.add_module("ECLUnpacker")
    path.add_module(WaitForTheFeed())

    t = threading.Thread(target=feed)
    t.start()
    try:
        eclreco.process(path, max_events=16, batch_size=16, threads=1, install_signal_handlers=False)
        pull = ctx.socket(zmq.PULL)  # the next receiver: what the sender still holds comes to it
        for _ in range(50):  # once the closed socket's I/O thread has let the port go
            try:
                pull.bind(address)
                break
            except zmq.ZMQError:
                time.sleep(0.1)
        later = 0
        while pull.poll(1000):
            pull.recv()
            later += 1
        pull.close(0)
    finally:
        push.close(0)
    s = eclreco.statistics.summary()
    c = inp.counters()
    assert c["unread_at_end"] > 0, c
    assert (s["received"] + c["unread_at_end"] + later, c["lost_bytes_at_disconnect"]) == (sent[0], 0), (s, c, later, sent)


def test_what_an_ended_tcp_connection_leaves_unread_is_counted_in_bytes():
    """A tcp:// connection ended (end_tcp_input) while the receiver's queue is full and the kernel holds the
    rest: the sender closes its side at once, libzmq does not read on, and the socket's close leaves those
    bytes unread. unread_tcp_input is to count them (lost_bytes: what the terminates report as
    lost_bytes_at_disconnect and input_lost_bytes), but its second shutdown of a connection that both sides had
    closed raised ENOTCONN, and it skipped the read: 0 bytes counted for about 47,000 lost (all but the queue's
    and what libzmq had read into its own buffer, up to 8 kB)."""
    from eclreco.raw_sockets import ConnectionMonitor, count_queued

    address = free_address()
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 16)
    pull.setsockopt(zmq.LINGER, 0)
    monitor = ConnectionMonitor(pull, track_tcp=True)
    pull.bind(address)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(address)
    n, size = 500, 102  # on the wire: a flags byte, a size byte and 100 bytes
    try:
        for _ in range(n):
            push.send(b"\x01" * 100)
        time.sleep(0.5)  # written: 16 in the queue, the rest in the kernel's buffers
        monitor.poll()
        assert monitor.end_tcp_input(end=True) == 1
        time.sleep(0.2)  # the sender closes its side
        pull.unbind(pull.getsockopt_string(zmq.LAST_ENDPOINT))
        time.sleep(0.1)
        read = count_queued(pull)
        lost = monitor.unread_tcp_input(2.0)
    finally:
        monitor.close()
        pull.close(0)
        push.close(0)
    assert read < n and 0 < lost <= (n - read) * size <= lost + 8192 + size, (read, lost)


def _sent_clusters_path(*after, **params):
    """Simulated belle2-ecl gammas -> ECLUnpacker -> ECLClusterizer -> `after` -> ZMQOutput(**params)."""
    path = eclreco.create_path()
    path.add_module("SimulationInput", events=20, detector="belle2-ecl", particle="gamma", background=0.0, seed=3)
    path.add_module("ECLUnpacker")
    path.add_module("ECLClusterizer")
    for m in after:
        path.add_module(m)
    return path, path.add_module("ZMQOutput", **params)


def test_zmq_output_refuses_a_misspelt_column_at_initialize():
    """ZMQOutput(columns=['energy', 'latt']) after the clusterizer sent every batch without 'latt', without a
    word (the receiver found the column missing). As RootOutput's cluster_columns, a name that the sent
    collections will not have is refused at initialize where their columns are known, naming it and the valid
    ones; no socket is made and no event read."""
    address = free_address()
    path, _ = _sent_clusters_path("ECLLeakageCorrection", address=address, columns=["energy", "latt"])
    with pytest.raises(RuntimeError) as err:
        eclreco.process(path, install_signal_handlers=False)
    message = str(err.value)
    assert "ZMQOutput: columns: 'latt' is not a column of ECLClusters; its columns of one value per cluster are " in (
        message), message
    assert "e1e9" in message and eclreco.statistics.summary()["received"] == 0


class MarksHighEnergy(eclreco.Module):
    """A steering file's module after the clusterizer that adds a column, `high`, to ECLClusters."""

    def event(self, batch):
        c = batch["ECLClusters"]
        c["high"] = c["energy"] > 0.5


def test_zmq_output_sends_a_column_a_users_module_adds():
    """A module of a steering file after the clusterizer may add a column (Module.makes names collections, not
    columns): its name is not refused at initialize, and is sent; so is a second collection's column, where the
    columns are restricted across both."""
    from eclreco.hlt.protocol import DecodedBatch, unpack

    address = free_address()
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.bind(address)
    try:
        path, out = _sent_clusters_path(MarksHighEnergy(), address=address, columns=["energy", "high"])
        eclreco.process(path, install_signal_handlers=False)
        assert pull.poll(10000)
        batch = DecodedBatch(unpack(pull.recv()))
        path, out = _sent_clusters_path(address=address, collections=["ECLClusters", "ECLEventInformation"],
                                        columns=["energy", "n_out_of_time_digits"])
        eclreco.process(path, install_signal_handlers=False)
        assert pull.poll(10000)
        both = DecodedBatch(unpack(pull.recv()))
    finally:
        pull.close(0)
    assert sorted(batch.collections["ECLClusters"][1]) == ["energy", "high"]
    assert sorted(both.collections["ECLClusters"][1]) == ["energy"]
    assert sorted(both.collections["ECLEventInformation"][1]) == ["n_out_of_time_digits"]


def test_zmq_output_warns_once_of_a_column_no_sent_collection_has(capsys):
    """Where ZMQOutput's `columns` cannot be checked at initialize (a user's module after the clusterizer, or several
    `collections`), a misspelt name was not sent without a word. Refusing at a batch would leave a farm worker's
    events unsent (docs/deployment.md); it is now said once on stderr, at the first batch that holds every
    collection, naming the names no sent collection has; the batches are sent as before. A batch without one of the
    collections cannot tell: nothing is said."""
    from eclreco.hlt.protocol import DecodedBatch, unpack

    address = free_address()
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.bind(address)

    def sent(path, batches):
        capsys.readouterr()
        eclreco.process(path, batch_size=5, install_signal_handlers=False)
        got = []
        for _ in range(batches):
            assert pull.poll(10000)
            got.append(DecodedBatch(unpack(pull.recv())))
        return got, capsys.readouterr().err

    try:
        path, _ = _sent_clusters_path(MarksHighEnergy(), address=address, columns=["energy", "high", "latt"])
        got, err = sent(path, 4)
        assert [sorted(b.collections["ECLClusters"][1]) for b in got] == [["energy", "high"]] * 4
        assert err.count("ZMQOutput: warning") == 1, err
        assert ("ZMQOutput: warning: columns: 'latt' is a column of none of the collections sent, so not sent (its "
                "receiver lacks it); their columns: ECLClusters: ") in err and "e1e9" in err and "high" in err, err
        path, _ = _sent_clusters_path(address=address, collections=["ECLClusters", "ECLEventInformation"],
                                      columns=["energy", "n_out_of_time_digit", "latt"])
        got, err = sent(path, 4)
        assert err.count("ZMQOutput: warning") == 1 and "columns: 'n_out_of_time_digit', 'latt' are columns of none" \
            in err and "; ECLEventInformation: n_out_of_time_digits" in err, err
        path, _ = _sent_clusters_path(address=address, collections=["ECLClusters", "ECLEventInformation"],
                                      columns=["energy", "n_out_of_time_digits"])
        assert "warning" not in sent(path, 4)[1]
        path, _ = _sent_clusters_path(MarksHighEnergy(), address=address, collections=["ECLClusters", "NotMade"],
                                      columns=["energy", "latt"])
        assert "warning" not in sent(path, 4)[1]  # no batch holds NotMade: the names cannot be checked
    finally:
        pull.close(0)
