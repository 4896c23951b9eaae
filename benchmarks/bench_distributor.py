"""Where the HLT distributor's own thread spends its time per event: its phases driven one after
the other in this process on N queued raw events (belle2-ecl generic, nominal background), with
one registered worker (a DEALER here) and a registered collector. CPU time of the calling thread
only (time.thread_time: the scheduler's clock; getrusage counts in ticks of several ms, as long
as a whole phase of a small run): libzmq's I/O threads (receiving and sending the bytes) are not
in these figures, which is what they add to the distributor's CPU per event in the farm
(bench_farm.py).

    .venv/bin/python benchmarks/bench_distributor.py [--events 40000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import zmq


def measure(messages: list, n: int) -> dict:
    """µs per event of read_input, dispatch, confirm and SAVED for n events."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.distributor import Distributor
    from eclreco.hlt.run import free_address

    d = Distributor(free_address(), free_address(), free_address(), queue_size=10 ** 7, max_held=10 ** 7,
                    input_hwm=0)
    ctx = zmq.Context.instance()
    worker = ctx.socket(zmq.DEALER)
    worker.connect(d.addresses["workers"])
    worker.send_multipart([P.READY, P.pack({"pid": 1, "host": "bench", "credit": 10 ** 8})])
    src = ctx.socket(zmq.PUSH)
    src.setsockopt(zmq.SNDHWM, 0)
    src.connect(d.addresses["input"])
    t0 = time.monotonic()
    while not d.workers:
        d.handle_workers()
        if time.monotonic() - t0 > 10:
            raise RuntimeError("the worker did not register")
        time.sleep(0.01)
    for i in range(n):
        src.send(messages[i % len(messages)])
    while d.inp.poll(0) == 0:
        time.sleep(0.01)
    time.sleep(0.5 + n / 100000)  # the I/O thread has queued them all at the PULL side
    out = {}
    c0 = time.thread_time()
    t0 = time.monotonic()
    while d.c["received"] < n:
        d.read_input()
        if time.monotonic() - t0 > 60:
            raise RuntimeError(f"only {d.c['received']} of {n} events arrived")
    out["read_input (receive and hold)"] = time.thread_time() - c0
    c0 = time.thread_time()
    while d.pending:
        d.dispatch()
    out["dispatch (EV messages to the worker)"] = time.thread_time() - c0
    parts, got = [], 0
    while got < n:
        frames = worker.recv_multipart()
        if frames[0] == P.EV:
            parts.append(P.seqs_from_bytes(frames[1]))
            got += len(parts[-1])
    seqs = np.concatenate(parts)
    d.collector = {"ident": b"bench", "last_seen": time.monotonic(), "status": {"saves": True}, "run_ended": None}
    c0 = time.thread_time()
    for a in range(0, n, 256):
        d.confirm(seqs[a:a + 256], time.monotonic())
    out["confirm (CONFIRM of 256)"] = time.thread_time() - c0
    # SAVED as the control handler applies it (distributor._on_control_message)
    c0 = time.thread_time()
    pop = d.unsaved.pop
    for a in range(0, n, 256):
        for s in P.seqs_from_bytes(P.seqs_to_bytes(seqs[a:a + 256])).tolist():
            pop(s, None)
    out["SAVED (of 256)"] = time.thread_time() - c0
    assert d.c["confirmed"] == n and not d.events and not d.unsaved
    for s in (worker, src):
        s.close(0)
    d.close(0)
    return {k: v / n * 1e6 for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=40000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    from eclreco import bench
    from eclreco.rawdata import read_raw_file

    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "ev.raw")
        bench.make_raw_file(raw, 5000, 1.0)
        messages = read_raw_file(raw)
    runs = [measure(messages, a.events) for _ in range(a.repeat)]
    print(f"distributor thread, CPU µs per event ({a.events} events of {np.mean([len(m) for m in messages]):.0f} B, "
          f"median of {a.repeat}):")
    for k in runs[0]:
        vals = [r[k] for r in runs]
        print(f"  {k:38s} {statistics.median(vals):6.2f}   ({' '.join(f'{v:.2f}' for v in vals)})")
    print(f"  {'total':38s} {statistics.median(sum(r.values()) for r in runs):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
