"""What one ZeroMQ hop with one message per event costs a sender and a receiver, in pyzmq (as the
DAQ emulator sends and the distributor receives) and in plain C against the same libzmq (the
one bundled with pyzmq; benchmarks/zmq_hop.c, compiled here). The difference is what Python
adds; the rest is libzmq's I/O thread and the kernel, which a C transport would pay as well.

    .venv/bin/python benchmarks/bench_zmq_hop.py [--rate 30000] [--messages 150000] [--repeat 3]
        [--size BYTES (default: the mean raw event of belle2-ecl generic events, nominal background)]
        [--transports tcp,ipc] [--json]

CPU per message of each process (its libzmq I/O thread included), median of --repeat runs.
Linux with a pyzmq wheel that bundles libzmq (pyzmq.libs/) and a C compiler; the C rows are
left out, with the reason, otherwise.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def py_send(address: str, n: int, size: int, rate: float) -> float:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 100000)
    s.setsockopt(zmq.LINGER, -1)
    s.connect(address)
    msg = b"\x5a" * size
    time.sleep(0.2)
    c0, t0, sent = time.process_time(), time.monotonic(), 0
    while sent < n:  # what is due every 1 ms, as eclreco.daq.emulate
        due = int((time.monotonic() - t0) * rate) + 1 - sent
        if due <= 0:
            time.sleep(0.001)
            continue
        for _ in range(min(due, n - sent)):
            s.send(msg, copy=False)  # as the emulator: pyzmq copies what is below its copy_threshold
            sent += 1
    cpu = time.process_time() - c0
    s.close()
    ctx.term()
    return cpu / n * 1e6


def py_recv(address: str, n: int) -> float:
    import zmq

    from eclreco.raw_sockets import recv_message

    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.bind(address)
    got, c0, last = 0, None, time.monotonic()
    while got < n:
        try:
            while True:  # drain, then sleep 0.5 ms (the distributor's cycle)
                recv_message(s)
                if c0 is None:
                    c0 = time.process_time()
                got += 1
                last = time.monotonic()
        except zmq.Again:
            pass
        if time.monotonic() - last > 10.0:
            raise SystemExit(f"only {got} of {n} messages arrived")
        time.sleep(0.0005)
    cpu = time.process_time() - c0
    s.close(0)
    ctx.term()
    return cpu / n * 1e6


def build_c(tmp: str) -> tuple[str | None, str]:
    """(path of the compiled zmq_hop, "") or (None, why not)."""
    import zmq

    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not cc:
        return None, "no C compiler"
    site = os.path.dirname(os.path.dirname(zmq.__file__))
    libs = sorted(glob.glob(os.path.join(site, "pyzmq.libs", "libzmq*.so*")))
    if not libs:
        return None, "this pyzmq has no bundled libzmq in pyzmq.libs/"
    exe = os.path.join(tmp, "zmq_hop")
    r = subprocess.run([cc, "-O2", os.path.join(HERE, "zmq_hop.c"), "-o", exe, libs[0],
                        "-Wl,-rpath," + os.path.dirname(libs[0])], capture_output=True, text=True)
    if r.returncode != 0:
        return None, "compilation failed: " + r.stderr[-500:]
    return exe, ""


def run_pair(lang: str, exe: str | None, address: str, n: int, size: int, rate: float) -> tuple[float, float]:
    """(send, recv) CPU µs per message of one sender/receiver pair started as two processes."""
    if lang == "c":
        recv_cmd = [exe, "recv", address, str(n)]
        send_cmd = [exe, "send", address, str(n), str(size), str(rate)]
    else:
        me = [sys.executable, os.path.abspath(__file__)]
        recv_cmd = me + ["--role", "recv", "--address", address, "--messages", str(n)]
        send_cmd = me + ["--role", "send", "--address", address, "--messages", str(n), "--size", str(size),
                         "--rate", str(rate)]
    recv = subprocess.Popen(recv_cmd, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    send = subprocess.run(send_cmd, stdout=subprocess.PIPE, text=True, check=True)
    out, _ = recv.communicate(timeout=120)
    if recv.returncode != 0:
        raise RuntimeError(f"{lang} receiver failed")

    def value(text):
        return float(text.split("cpu_us_per_msg")[-1].split()[0])

    return value(send.stdout), value(out)


def raw_event_size() -> int:
    from eclreco import bench
    from eclreco.rawdata import read_raw_file

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ev.raw")
        bench.make_raw_file(path, 1000, 1.0)
        msgs = read_raw_file(path)
    return int(round(sum(map(len, msgs)) / len(msgs)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=30000.0)
    ap.add_argument("--messages", type=int, default=150000)
    ap.add_argument("--size", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--transports", default="tcp,ipc")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--role", choices=["send", "recv"], help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "send":
        print(f"cpu_us_per_msg {py_send(a.address, a.messages, a.size, a.rate):.3f}")
        return 0
    if a.role == "recv":
        print(f"cpu_us_per_msg {py_recv(a.address, a.messages):.3f}")
        return 0

    from eclreco.hlt.run import free_address

    size = a.size or raw_event_size()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exe, why = build_c(tmp)
        for transport in a.transports.split(","):
            for lang in ("python", "c"):
                if lang == "c" and exe is None:
                    rows.append({"transport": transport, "sender/receiver": "C", "skipped": why})
                    continue
                runs = []
                for k in range(a.repeat):
                    addr = free_address() if transport == "tcp" else f"ipc://{tmp}/hop{k}-{lang}.ipc"
                    runs.append(run_pair(lang, exe, addr, a.messages, size, a.rate))
                rows.append({"transport": transport, "sender/receiver": "pyzmq" if lang == "python" else "C",
                             "send_us_per_msg": statistics.median(r[0] for r in runs),
                             "recv_us_per_msg": statistics.median(r[1] for r in runs),
                             "send_runs": [r[0] for r in runs], "recv_runs": [r[1] for r in runs]})
    result = {"rate_hz": a.rate, "messages": a.messages, "message_bytes": size, "repeat": a.repeat, "rows": rows}
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"one ZeroMQ hop, {size} B messages at {a.rate:,.0f} Hz, {a.messages} messages, CPU µs per message "
          f"(median of {a.repeat}; libzmq's I/O thread included)")
    print(f"{'transport':10s} {'code':6s} {'sender':>8s} {'receiver':>9s}  runs (send / recv)")
    for r in rows:
        if "skipped" in r:
            print(f"{r['transport']:10s} {'C':6s} skipped: {r['skipped']}")
            continue
        runs = " ".join(f"{s:.2f}/{v:.2f}" for s, v in zip(r["send_runs"], r["recv_runs"]))
        print(f"{r['transport']:10s} {r['sender/receiver']:6s} {r['send_us_per_msg']:8.2f} {r['recv_us_per_msg']:9.2f}  {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
