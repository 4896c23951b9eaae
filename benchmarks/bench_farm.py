"""The streaming farm at several offered rates and worker chains: sustained rate, latency and the
CPU per event of each role (eclreco.hlt.run.benchmark_farm), plus a bare pyzmq relay of the same
messages for scale (what one ZeroMQ hop costs a Python process on this machine).

    .venv/bin/python benchmarks/bench_farm.py [--rates 10000,15000,20000,25000,30000]
        [--modules standard,none,ECLUnpacker] [--seconds 5] [--events 10000] [--farm-args '--max-latency 5']
        [--no-relay] [--json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from eclreco.bench import make_raw_file
from eclreco.hlt.run import benchmark_farm


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def relay(raw: str, n: int, rate: float, transport: str) -> dict:
    """DAQ emulator -> this process (PULL, recv, PUSH of chunks of up to 256 messages) -> a receiver
    process (PULL): CPU µs per event of the relay (io thread included) and of the receiver."""
    import zmq

    ctx = zmq.Context()
    inp, out = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    tmp = os.path.dirname(raw)  # the caller's temporary folder, for the ipc endpoints
    if transport == "ipc":
        a_in, a_out = f"ipc://{tmp}/in", f"ipc://{tmp}/out"
        inp.bind(a_in)
        out.bind(a_out)
    else:
        a_in = f"tcp://127.0.0.1:{inp.bind_to_random_port('tcp://127.0.0.1')}"
        a_out = f"tcp://127.0.0.1:{out.bind_to_random_port('tcp://127.0.0.1')}"
    sink = subprocess.Popen([sys.executable, "-c", (
        "import os, zmq\n"
        f"s = zmq.Context().socket(zmq.PULL); s.connect({a_out!r}); got = 0\n"
        f"while got < {n}: got += len(s.recv_multipart())\n"
        f"t = os.times(); print((t.user + t.system) / {n} * 1e6)\n")], stdout=subprocess.PIPE, text=True)
    emu = subprocess.Popen([sys.executable, "-m", "eclreco.cli", "daq-emulator", "--input", raw, "--connect", a_in,
                            "--rate", str(rate), "--events", str(n), "--loop"], stdout=subprocess.DEVNULL)
    c0, got = cpu_seconds(), 0
    poller = zmq.Poller()
    poller.register(inp, zmq.POLLIN)
    while got < n:
        poller.poll(1000)
        t = time.monotonic()
        msgs = []
        try:
            while len(msgs) < 2000:
                msgs.append(inp.recv(zmq.NOBLOCK))
        except zmq.Again:
            pass
        for a in range(0, len(msgs), 256):
            out.send_multipart(msgs[a: a + 256])
        got += len(msgs)
        dt = time.monotonic() - t
        if dt < 5e-4:  # the distributor's cycle: at most one read per 0.5 ms
            time.sleep(5e-4 - dt)
    relay_us = (cpu_seconds() - c0) / n * 1e6
    sink_us = float(sink.communicate()[0])
    emu.wait()
    ctx.destroy(linger=0)
    return {"transport": transport, "events": n, "relay_cpu_us_per_event": relay_us,
            "receiver_cpu_us_per_event": sink_us}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="10000,15000,20000,25000,30000")
    ap.add_argument("--modules", default="standard,none,ECLUnpacker",
                    help="worker chains (hlt run --modules); non-standard chains run at the highest rate only")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--events", type=int, default=10000, help="events in the replayed file (belle2-ecl generic)")
    ap.add_argument("--farm-args", default="", help="further `eclreco hlt run` options, e.g. '--max-latency 5'")
    ap.add_argument("--no-relay", action="store_true", help="leave out the bare relay measurements")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="eclreco-bench-farm-") as tmp:  # the raw file: ~5 kB/event
        raw = os.path.join(tmp, "generic.msgpack")
        make_raw_file(raw, args.events, 1.0)
        for modules in args.modules.split(","):
            for rate in rates if modules == "standard" else rates[-1:]:
                rows.append({"modules": modules, **benchmark_farm(raw, rate, args.seconds, modules=modules,
                                                                  farm_args=args.farm_args.split())})
        relays = [] if args.no_relay else [relay(raw, int(rates[-1] * args.seconds), rates[-1], t)
                                           for t in ("tcp", "ipc")]
    if args.json:
        print(json.dumps({"farm": rows, "relay": relays}, indent=1))
        return
    print(f"{'chain':<12} {'offered':>8} {'sustained':>10} {'p50 ms':>7} {'p99 ms':>7}  CPU µs/event per role "
          "[page faults/event]")
    for r in rows:
        faults = r["page_faults_per_event"]
        cpu = ", ".join(f"{k.split(' ')[0]} {v:.1f} [{faults.get(k, 0):.2f}]" for k, v in r["cpu_us_per_event"].items() if v)
        print(f"{r['modules']:<12} {r['offered_events_per_s']:>8,.0f} {r['achieved_events_per_s']:>10,.0f} "
              f"{r['latency_p50_ms']:>7.1f} {r['latency_p99_ms']:>7.1f}  {cpu}")
    for r in relays:
        print(f"bare relay over {r['transport']}: relay {r['relay_cpu_us_per_event']:.1f} µs/event, "
              f"receiver {r['receiver_cpu_us_per_event']:.1f} µs/event ({r['events']} events)")


if __name__ == "__main__":
    main()
