"""`eclreco bench`: events/second of the reconstruction chain, where the time goes, how it scales.

All measurements of one invocation run on the same machine in the same process, so ratios are
comparable even on a noisy machine; absolute rates are medians of --repeat runs (min and max
alongside). Inputs are generated belle2-ecl `generic` events (fast simulation + electronics +
beam background) written to a raw file first, so that the timed chain starts from raw bytes.
"""
from __future__ import annotations

import os
import resource
import statistics as st
import sys
import tempfile
import time

import numpy as np

from eclreco import strict_json
from eclreco.cli_types import POSITIVE, POSITIVE_INT, SIM_BACKGROUND, integer

DEFAULT_BATCH = 256


def _peak_rss_mb() -> float:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return self_kb / 1024.0


def make_raw_file(path: str, events: int, background: float, seed: int = 7) -> dict:
    from eclreco.rawdata import encode_events, write_raw_file
    from eclreco.sim import simulate

    messages, digits = [], 0
    for start in range(0, events, 2000):
        n = min(2000, events - start)
        ev = simulate(detector="belle2-ecl", n_events=n, particle="generic", background=background,
                      seed=seed * 1_000_003 + start)
        messages += encode_events("belle2-ecl", 0, 1, np.arange(start, start + n), ev.offsets, ev.cell,
                                  ev.amplitude, ev.time_ticks, ev.quality, truth=ev.truth)
        digits += ev.cell.size
    write_raw_file(path, messages)
    return {"events": events, "digits_per_event": digits / events,
            "bytes_per_event": os.path.getsize(path) / events}


def run_chain(raw: str, out_root: str, threads: int, batch_size: int, max_events: int = 0,
              cnn: bool = True, dqm: bool = True, extra=None):
    """One timed run of the full chain; returns (events/s, statistics summary, path modules)."""
    import eclreco
    from eclreco.reconstruction import add_reconstruction

    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=raw)
    add_reconstruction(path, cnn=cnn)
    if dqm:
        path.add_module("ECLDQM")
    for m in extra or []:
        path.add_module(m)
    # Baskets of 2000 events: the writes (compression) happen inside the timed event loop, as in
    # a long run, and not only at terminate, which the loop time leaves out.
    path.add_module("RootOutput", filename=out_root, basket_events=2000)
    eclreco.process(path, threads=threads, batch_size=batch_size, max_events=max_events)
    summary = eclreco.statistics.summary()
    # The event loop's wall time, without initialize/terminate (loading the ONNX models, opening
    # and closing files): the steady-state rate of a long run.
    return summary["received"] / summary["loop_seconds"], summary, path.modules


def repeat_chain(raw, out_root, threads, batch_size, repeat, max_events=0, **kw):
    rates, last = [], None
    for _ in range(repeat):
        rate, summary, modules = run_chain(raw, out_root, threads, batch_size, max_events, **kw)
        rates.append(rate)
        last = (summary, modules)
    return {"median": st.median(rates), "min": min(rates), "max": max(rates), "runs": rates}, last


def stage_us_per_event(summary: dict, key: str = "seconds") -> dict:
    """µs per event of each module: wall time ("seconds") or the thread's CPU time ("cpu_seconds")."""
    return {m["name"]: m[key] / m["events"] * 1e6 for m in summary["modules"] if m["events"]}


def _up_to_cnn(raw: str):
    """RawFileInput → ECLUnpacker → ECLClusterizer → ECLLeakageCorrection: the chain before the CNN."""
    import eclreco

    path = eclreco.create_path()
    path.add_module("RawFileInput", filename=raw)
    path.add_module("ECLUnpacker")
    path.add_module("ECLClusterizer")
    path.add_module("ECLLeakageCorrection")  # the model refines the classical correction
    return path


def collect_cnn_inputs(raw: str, max_events: int, extra_features) -> list:
    """The CNN inputs (image, features) of every batch of the chain, as ECLEnergyCorrection forms them."""
    import eclreco
    from eclreco.modules.ecl_energy_correction import ECLEnergyCorrection

    defaults = ECLEnergyCorrection()  # the module's own selection
    threshold, max_t, max_e = (defaults.param(k) for k in ("min_energy_gev", "max_abs_time_ns", "max_energy_gev"))

    class CollectInputs(eclreco.Module):
        """keeps the CNN inputs of every batch"""

        def __init__(self):
            super().__init__()
            self.batches = []

        def makes(self):
            return ()

        def requires(self):
            return ("ECLClusters",)

        def event(self, batch):
            _, _, images, features, _ = ECLEnergyCorrection.inputs(batch, "ECLClusters", extra_features, None, threshold,
                                                                max_t, max_e)
            self.batches.append((images, features))

    path = _up_to_cnn(raw)
    col = path.add_module(CollectInputs())
    eclreco.process(path, threads=1, batch_size=DEFAULT_BATCH, max_events=max_events)
    return col.batches


def cnn_measurements(raw: str, tmp: str, repeat: int, max_events: int) -> dict:
    """CNN stage in the chain vs onnxruntime alone on the same inputs, and batched vs unbatched."""
    import eclreco
    from eclreco.modules.ecl_energy_correction import ECLEnergyCorrection, load_session, shipped_model

    sess, meta = load_session(shipped_model("belle2-ecl"), threads=1)
    batches = collect_cnn_inputs(raw, max_events, meta["extra_features"])

    def module_rate(batch_size, n_events):
        path = _up_to_cnn(raw)
        cnn = path.add_module("ECLEnergyCorrection", detector="belle2-ecl")
        eclreco.process(path, threads=1, batch_size=batch_size, max_events=n_events)
        mod = [m for m in eclreco.statistics.summary()["modules"] if m["name"] == "ECLEnergyCorrection"][0]
        c = cnn.counters()
        # the module's rate, and that of its own onnxruntime calls (inference_seconds), in the
        # clusters it ran the network on (those its x2 guard did not write included)
        inferred = c["clusters_corrected"] + c["clusters_guarded"]
        return inferred / mod["seconds"], inferred / c["inference_seconds"]

    n = sum(b[0].shape[0] for b in batches)
    step = ECLEnergyCorrection().param("max_clusters_per_batch")

    def ort_pass(call_size):
        t0 = time.perf_counter()
        for image, features in batches:
            for a, b in ECLEnergyCorrection.call_slices(image.shape[0], call_size):
                sess.run(["energy"], {"image": image[a:b], "features": features[a:b]})
        return n / (time.perf_counter() - t0)

    # Pairs measured back to back: the module in the chain, then onnxruntime alone with the same
    # calls as the module (ECLEnergyCorrection.call_slices of each batch's clusters) on the
    # collected inputs. The ratio is the median of the pairs' ratios: the machine's load drifts
    # within a run, and both members of a pair see the same.
    pairs = []
    for _ in range(repeat):
        module, ort_own = module_rate(DEFAULT_BATCH, max_events)
        pairs.append((module, ort_own, ort_pass(step)))
    in_chain = st.median(p[0] for p in pairs)
    ort_in_chain = st.median(p[1] for p in pairs)
    ort_alone = st.median(p[2] for p in pairs)
    ratios = [p[0] / p[2] for p in pairs]
    ort_whole = st.median(ort_pass(1 << 30) for _ in range(repeat))  # one call per batch, for scale
    unbatched = module_rate(1, min(max_events, 2000))[0]
    return {"cnn_clusters_per_s_in_chain": in_chain, "ort_calls_in_chain_clusters_per_s": ort_in_chain,
            "ort_alone_clusters_per_s": ort_alone,
            "ort_alone_one_call_per_batch_clusters_per_s": ort_whole, "cnn_max_clusters_per_call": step,
            "cnn_vs_ort_ratio": st.median(ratios), "cnn_vs_ort_ratio_min": min(ratios),
            "cnn_vs_ort_ratio_max": max(ratios), "cnn_clusters_per_s_batch1": unbatched,
            "batched_vs_unbatched_ratio": in_chain / unbatched,
            "cnn_clusters_per_event": n / max_events}


def push_raw_messages(raw: str, n: int, address: str) -> int:
    """Sends the first n messages of the raw file `raw` over a PUSH socket connected to `address` and returns when
    they are delivered; returns how many there were (fewer in a shorter file). Only those messages are read
    (the bench's file is ~100 MB, its zmq step sends 5000 of them; reading it all took memory and time)."""
    import itertools

    import zmq

    from eclreco.rawdata import iter_raw_file

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, n + 10)
    sock.connect(address)
    sent = 0
    for m in itertools.islice(iter_raw_file(raw), n):
        sock.send(m)
        sent += 1
    sock.close(linger=-1)  # term() blocks until every message is delivered (a bare exit lost some)
    ctx.term()
    return sent


def zmq_input_measurement(raw: str, n_events: int) -> dict:
    """ZMQInput (messages into a batch, envelopes decoded in C++) vs a bare pyzmq + msgpack receive
    loop. Both drain the same n messages already queued at the receiving socket, so the sender's
    speed does not enter."""
    import subprocess

    import msgpack
    import zmq

    import eclreco
    from eclreco.rawdata import count_messages

    n = count_messages(raw, n_events)  # the first n_events, not the whole file

    def send_all(port):
        code = f"from eclreco.bench import push_raw_messages\npush_raw_messages({raw!r}, {n}, 'tcp://127.0.0.1:{port}')"
        subprocess.run([sys.executable, "-c", code], check=True)

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, n + 10)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    send_all(port)
    t0 = time.perf_counter()
    got = 0
    while got < n and sock.poll(2000):
        msgpack.unpackb(sock.recv())
        got += 1
    bare = got / (time.perf_counter() - t0)
    sock.close()

    class SendAllFirst(eclreco.Module):
        """fills the input queue before the event loop starts"""

        def makes(self):
            return ()

        def requires(self):
            return ()

        def initialize(self):
            send_all(zmq_in.endpoint.rsplit(":", 1)[1])

    path = eclreco.create_path()
    # The idle timeout only bounds the run if messages went missing; the rate uses the events seen.
    # Port '*': the input binds a free port itself (a port probed by another socket and closed
    # could still be bound when the input binds it: ZeroMQ closes sockets asynchronously).
    # max_queue_bytes=0: the whole sample is queued before the loop reads (with the byte bound's high-water mark,
    # 16 messages at the defaults, the sender waited for a reader that starts only after it: the bench hung)
    zmq_in = path.add_module("ZMQInput", address="tcp://127.0.0.1:*", rcvhwm=n + 10, max_queue_bytes=0,
                             idle_timeout_s=2.0)
    path.add_module(SendAllFirst())
    eclreco.process(path, batch_size=DEFAULT_BATCH, max_events=n)
    mod = eclreco.statistics.summary()["modules"][0]
    zmq_input = mod["events"] / mod["seconds"] if mod["seconds"] > 0 else 0.0
    if got < n or mod["events"] < n:  # a rate over a partial sample would be meaningless
        raise RuntimeError(f"ZeroMQ comparison incomplete: bare loop received {got}, ZMQInput {mod['events']} "
                           f"of {n} messages")
    return {"zmq_input_events_per_s": zmq_input, "bare_pyzmq_msgpack_events_per_s": bare,
            "input_vs_zmq_ratio": zmq_input / bare, "zmq_events": n}


def farm_measurement(raw: str, rate: float, seconds: float, workers: int = 2) -> dict:
    from eclreco.hlt.run import benchmark_farm

    return benchmark_farm(raw, rate=rate, seconds=seconds, workers=workers)


def plot(results: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isdir(out_dir):  # its last component only: _run checked the folder above it
        os.mkdir(out_dir)
    grid = results["grid"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for threads in sorted({g["threads"] for g in grid}):
        rows = sorted((g for g in grid if g["threads"] == threads), key=lambda g: g["batch_size"])
        ax.errorbar([g["batch_size"] for g in rows], [g["median"] for g in rows],
                    yerr=[[g["median"] - g["min"] for g in rows], [g["max"] - g["median"] for g in rows]],
                    marker="o", capsize=3, label=f"threads={threads}")
    ax.axhline(30000, color="grey", ls="--", lw=1, label="30 kHz")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size [events]")
    ax.set_ylabel("events/s (median)")
    ax.set_title("eclreco end-to-end, belle2-ecl generic, bkg %.1f" % results["background"])
    ax.legend()
    fig.tight_layout()
    f1 = os.path.join(out_dir, "bench_batch_size.png")
    fig.savefig(f1, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    stages = results["stage_us_per_event"]
    ax.barh(list(stages), list(stages.values()))
    ax.set_xlabel("µs per event (threads=1)")
    ax.set_title("where the time goes")
    fig.tight_layout()
    f2 = os.path.join(out_dir, "bench_stages.png")
    fig.savefig(f2, dpi=100)
    plt.close(fig)
    return [f1, f2]


def run_benchmark(args) -> dict:
    steps = ["generate", "e2e", "grid", "stages", "cnn", "zmq", "farm", "plots"]
    skip = set(args.skip or [])
    res = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
           "background": args.background, "events": args.events, "repeat": args.repeat}
    # the raw file (~5 kB/event: 100 MB at the default --events) and the ROOT output are removed at the end
    with tempfile.TemporaryDirectory(prefix="eclreco-bench-") as tmp:
        _run_steps(args, steps, skip, res, tmp)
    res["peak_rss_mb"] = _peak_rss_mb()
    return res


def _run_steps(args, steps, skip, res: dict, tmp: str) -> None:
    from tqdm import tqdm

    raw = os.path.join(tmp, "generic.msgpack")
    out_root = os.path.join(tmp, "out.root")
    bar = tqdm(steps, desc="bench", disable=args.json and not sys.stderr.isatty(), file=sys.stderr)
    for step in bar:
        bar.set_postfix_str(step)
        if step in skip:
            continue
        if step == "generate":
            res["input"] = make_raw_file(raw, args.events, args.background)
        elif step == "e2e":
            r, (summary, _) = repeat_chain(raw, out_root, 2, DEFAULT_BATCH, args.repeat)
            res["e2e_events_per_s"] = r["median"]
            res["e2e_events_per_s_min"], res["e2e_events_per_s_max"] = r["min"], r["max"]
            r0, _ = repeat_chain(raw, out_root, 2, DEFAULT_BATCH, args.repeat, cnn=False)
            res["e2e_no_cnn_events_per_s"] = r0["median"]
            r1, _ = repeat_chain(raw, out_root, 2, DEFAULT_BATCH, args.repeat, dqm=False)
            res["e2e_no_dqm_events_per_s"] = r1["median"]
        elif step == "grid":
            grid = []
            for threads in (1, 2):
                for bs in (1, 64, 256, 1024):
                    n = min(args.events, 3000) if bs == 1 else 0
                    r, _ = repeat_chain(raw, out_root, threads, bs, max(1, args.repeat // 2), max_events=n)
                    grid.append({"threads": threads, "batch_size": bs, **{k: r[k] for k in ("median", "min", "max")}})
            res["grid"] = grid
        elif step == "stages":
            _, (summary, _) = repeat_chain(raw, out_root, 1, DEFAULT_BATCH, 1)
            res["stage_us_per_event"] = stage_us_per_event(summary)
            res["stage_cpu_us_per_event"] = stage_us_per_event(summary, "cpu_seconds")
            res["framework_overhead_us_per_event"] = framework_overhead()
        elif step == "cnn":
            res.update(cnn_measurements(raw, tmp, args.repeat, min(args.events, 10000)))
        elif step == "zmq":
            res.update(zmq_input_measurement(raw, min(args.events, 5000)))
        elif step == "farm":
            res["farm"] = farm_measurement(raw, args.farm_rate, args.farm_seconds)
        elif step == "plots" and "grid" in res and "stage_us_per_event" in res:
            res["plots"] = plot(res, args.plots)


def framework_run_seconds(events: int, n_modules: int = 5, batch_size: int = DEFAULT_BATCH, threads: int = 1,
                          python_module: bool = False) -> float:
    """Wall seconds of EventInfoSetter -> n_modules x NoOp [-> a Python no-op module]: the
    framework alone (also benchmarks/bench_framework.py)."""
    import eclreco

    class PyNoOp(eclreco.Module):
        """a Python module that does nothing (the cost of a Python call per batch)"""

        def makes(self):
            return ()

        def requires(self):
            return ()

        def event(self, batch):
            pass

    path = eclreco.create_path()
    path.add_module("EventInfoSetter", events=events)
    for _ in range(n_modules):
        path.add_module("NoOp")
    if python_module:
        path.add_module(PyNoOp())
    t0 = time.perf_counter()
    eclreco.process(path, threads=threads, batch_size=batch_size)
    return time.perf_counter() - t0


def framework_overhead() -> float:
    """µs/event of the framework alone: EventInfoSetter -> 5 NoOp, batch 256, 1 thread."""
    return framework_run_seconds(1_000_000) / 1_000_000 * 1e6


def print_table(res: dict) -> None:
    def row(name, value, unit=""):
        print(f"  {name:<38} {value:>14} {unit}")

    print(f"eclreco bench: belle2-ecl generic events, background {res['background']}, "
          f"{res['events']} events, {res['repeat']} repetitions, {res['machine']['cpus']} CPUs")
    if "input" in res:
        row("digits per event", f"{res['input']['digits_per_event']:.0f}")
    if "e2e_events_per_s" in res:
        row("e2e_events_per_s (threads=2, batch 256)", f"{res['e2e_events_per_s']:,.0f}",
            f"(min {res['e2e_events_per_s_min']:,.0f}, max {res['e2e_events_per_s_max']:,.0f})")
        row("  without CNN", f"{res['e2e_no_cnn_events_per_s']:,.0f}")
        row("  without DQM", f"{res['e2e_no_dqm_events_per_s']:,.0f}")
    for g in res.get("grid", []):
        row(f"threads={g['threads']} batch={g['batch_size']}", f"{g['median']:,.0f}", "events/s")
    cpu = res.get("stage_cpu_us_per_event", {})
    for name, us in res.get("stage_us_per_event", {}).items():
        row(f"stage {name}", f"{us:.2f}" + (f" (CPU {cpu[name]:.2f})" if name in cpu else ""), "µs/event")
    if "framework_overhead_us_per_event" in res:
        row("framework overhead", f"{res['framework_overhead_us_per_event']:.3f}", "µs/event")
    for key in ("cnn_clusters_per_event", "cnn_clusters_per_s_in_chain", "ort_calls_in_chain_clusters_per_s",
                "ort_alone_clusters_per_s",
                "ort_alone_one_call_per_batch_clusters_per_s",
                "cnn_vs_ort_ratio", "cnn_vs_ort_ratio_min", "cnn_vs_ort_ratio_max", "cnn_clusters_per_s_batch1",
                "batched_vs_unbatched_ratio",
                "zmq_input_events_per_s", "bare_pyzmq_msgpack_events_per_s", "input_vs_zmq_ratio"):
        if key in res:
            v = res[key]
            row(key, f"{v:,.2f}" if v < 100 else f"{v:,.0f}")
    if "farm" in res:
        per_role = {"cpu_us_per_event": ("CPU", "{:.1f}", "µs/event"),
                    "page_faults_per_event": ("page faults", "{:.2f}", "per event")}
        for k, v in res["farm"].items():
            if isinstance(v, dict):
                what, fmt, unit = per_role[k]
                for role, x in v.items():
                    row(f"farm {what} {role}", fmt.format(x), unit)
            else:
                row(f"farm {k}", f"{v:,.2f}" if isinstance(v, float) else str(v))
    row("peak RSS", f"{res['peak_rss_mb']:.0f}", "MB")
    for p in res.get("plots", []):
        print(f"  plot: {p}")


def _run(args) -> int:
    if "plots" not in (args.skip or []):  # not after minutes of measurements
        from eclreco.paths import output_folder_error

        if why := output_folder_error(args.plots, "--plots"):
            raise ValueError(f"{why} (or --skip plots)")
    res = run_benchmark(args)
    if args.json:
        print(strict_json.dumps(res, indent=1))
    else:
        print_table(res)
    return 0


def add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="events/second benchmark of the reconstruction chain")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument("--events", type=integer(100), default=20000, help="generated events")
    p.add_argument("--background", type=SIM_BACKGROUND, default=1.0, help="beam-background level of the generated events (1 = nominal, 0 = none, 2 = twice nominal)")
    p.add_argument("--repeat", type=POSITIVE_INT, default=5, help="repetitions per measurement (median)")
    p.add_argument("--farm-rate", type=POSITIVE, default=30000.0, help="offered rate for the farm, Hz")
    p.add_argument("--farm-seconds", type=POSITIVE, default=5.0, help="duration of the farm measurement")
    p.add_argument("--plots", default="bench-plots", help="directory for the PNG plots")
    p.add_argument("--skip", nargs="*", choices=["e2e", "grid", "stages", "cnn", "zmq", "farm", "plots"],
                   help="measurements to leave out")
    p.set_defaults(func=_run)
