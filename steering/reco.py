#!/usr/bin/env python3
"""Main reconstruction job: input -> ECLUnpacker -> ECLClusterizer -> ECLLeakageCorrection ->
ECLEnergyCorrection (CNN) -> ECLDQM -> RootOutput.

With no arguments it runs on the embedded default: simulated belle2-ecl generic events at
nominal beam background. With -i it reads a raw file (.msgpack, spec/wire-format.md) or, for a
tcp:// or ipc:// address, a ZeroMQ stream.

    python steering/reco.py                              # embedded default
    python steering/reco.py -i raw.msgpack -o reco.root  # a raw file
    python steering/reco.py -i tcp://127.0.0.1:5555 --idle-timeout 5 -o reco.root
"""
from __future__ import annotations

import os
import signal
import sys

import eclreco
from eclreco.cli_types import (BATCH_SIZE, METRICS_HOST, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE_INT, SIM_BACKGROUND,
                               SIM_ENERGY, SIM_SEED, THREADS, CommandParser, add_cluster_columns_argument, integer,
                               metrics_host, number, option_given)
from eclreco.curve import curve_option_error
from eclreco.framework import unknown_columns_error
from eclreco.paths import output_file_error
from eclreco.rawdata import not_a_raw_file
from eclreco.raw_sockets import (bind_error, check_address, check_message_limits, check_queue_bound,
                                 is_stream_address, tcp_port)
from eclreco.reconstruction import (add_event_filter, add_event_filter_arguments, add_reconstruction,
                                   chain_file_error, event_filter_option_unused)

# CURVE key names when not given: its own (--curve-name), and the sender's it connects to (--curve-server)
CURVE_NAME, CURVE_SERVER = "reco", "daq"


def build_parser():
    """The parser, and its groups of the embedded simulation and of a ZeroMQ input (parse_args refuses their
    options where the job does not run that part). --help shows every default, and the parser records which options
    were given (option_given), as the eclreco commands' do."""
    ap = CommandParser(description=__doc__)
    ap.add_argument("-n", "--max-events", type=NON_NEGATIVE_INT, default=0, help="stop after N events (0: all)")
    ap.add_argument("-i", "--input", help="raw file (.msgpack) or ZeroMQ address (tcp://HOST:PORT, ipc://PATH); "
                    "default: simulation")
    ap.add_argument("-o", "--output", help="output ROOT file")
    add_cluster_columns_argument(ap, "-o: ")
    ap.add_argument("--threads", type=THREADS, default=min(2, os.cpu_count() or 1), help="processing threads")
    ap.add_argument("--batch-size", type=BATCH_SIZE, default=256, help="events per batch")
    ap.add_argument("--rejected", help="quarantine file (.msgpack) for rejected raw events; default with -i: "
                    "OUTPUT.rejected.msgpack next to -o (else rejected.msgpack), made at the first rejected event; "
                    "'' keeps none (they are still counted)")
    sim = ap.add_argument_group("embedded simulation (no --input)")
    sim.add_argument("--events", type=POSITIVE_INT, default=None,
                     help="events to simulate (default 20000; with --input use -n)")
    sim.add_argument("--detector", default="belle2-ecl", choices=["belle2-ecl", "array30"],
                     help="the detector simulated")
    sim.add_argument("--particle", choices=["gamma", "pi0", "generic"],
                     help="default: generic for belle2-ecl, gamma for array30 (it has no generic events)")
    # the ranges of SimulationInput (checked at its initialize: exit 1 after the other modules had started)
    sim.add_argument("--energy", type=SIM_ENERGY, default=1.0,
                     help="GeV: the photon's energy; for pi0 its momentum (below 1000)")
    sim.add_argument("--background", type=SIM_BACKGROUND,
                     help="beam-background level (1 = nominal); default: 1 for belle2-ecl, 0 for array30 (the "
                          "test-beam array, whose model was trained without background)")
    sim.add_argument("--seed", type=SIM_SEED, default=1, help="seed of the simulation")
    stream = ap.add_argument_group("ZeroMQ input (-i tcp://... or ipc://...)")
    stream.add_argument("--connect", action="store_true", help="connect to the address instead of binding")
    stream.add_argument("--idle-timeout", type=NON_NEGATIVE, default=0.0,
                        help="end the run S seconds after the last message (0: never)")
    stream.add_argument("--max-latency", type=number(0.0, 60_000.0), default=20.0,
                        help="ms to wait for a batch to fill (at most a minute)")
    stream.add_argument("--max-message-bytes", type=NON_NEGATIVE_INT, default=1 << 20,
                        help="larger messages are rejected as oversize and kept (0: no limit)")
    stream.add_argument("--refuse-message-bytes", type=NON_NEGATIVE_INT, default=64 << 20,
                        help="larger messages are refused by the socket unread, with their connection (0: no limit)")
    stream.add_argument("--max-queue-bytes", type=NON_NEGATIVE_INT, default=1 << 30,
                        help="bytes a sender connection's receive queue holds at most (1 GiB; the sender blocks "
                             "beyond), and a batch ends at the message that reaches them (0: no bound; "
                             "docs/deployment.md)")
    stream.add_argument("--curve-dir", default="", help="CURVE key directory (eclreco hlt keys); default: no CURVE")
    # no default here (build_path applies it): given without --curve-dir, it is refused (curve_option_error)
    stream.add_argument("--curve-name", help=f"own key name in DIR/private (default {CURVE_NAME})")
    stream.add_argument("--curve-secret", default="", help="own key pair file (default DIR/private/NAME.key_secret)")
    # no default here: given without --connect or without --curve-dir, it is refused (curve_option_error)
    stream.add_argument("--curve-server", help=f"key name of the sender with --connect (default {CURVE_SERVER})")
    reco = ap.add_argument_group("reconstruction")
    reco.add_argument("--no-cnn", action="store_true", help="classical leakage correction only")
    reco.add_argument("--no-dqm", action="store_true", help="no DQM histograms")
    reco.add_argument("--model", default="", help="ONNX model (default: the shipped model of the detector)")
    reco.add_argument("--conditions", default="", help="ECLUnpacker's conditions file: gain, t0, channel map per "
                      "run range (JSON, docs/wire-format.md; default: the spec's defaults)")
    add_event_filter_arguments(ap)
    mon = ap.add_argument_group("monitoring")
    mon.add_argument("--metrics-port", type=integer(0, 65535, " (0: no metrics)"), default=0,
                     help="serve Prometheus metrics on this port (0: none)")
    mon.add_argument("--metrics-host", type=metrics_host, default=METRICS_HOST, help="interface of the exporter")
    mon.add_argument("--metrics-linger", type=NON_NEGATIVE, default=0.0,
                     help="after the run, serve the final counts until a scrape has read them, at most S seconds "
                          "(0: stop serving at once; unread_at_end is counted at the very end)")
    mon.add_argument("--progress", type=NON_NEGATIVE, default=10.0,
                     help="seconds between progress lines (0: one per batch)")
    return ap, sim, stream


def parse_args(argv=None):
    ap, sim, stream = build_parser()
    args = ap.parse_args(argv)
    if args.input and args.events is not None:
        ap.error("--events sets how many events to simulate; to stop after N events of --input use -n N")
    # an option of a part the job does not run is a mistake to point out, not to ignore: when given, whatever its
    # value (one equal to the default passed silently)
    args.stream = is_stream_address(args.input)
    for group, applies, why in ((sim, not args.input, "the embedded simulation, which --input replaces"),
                                (stream, args.stream, "a ZeroMQ input (-i tcp://... or ipc://...)")):
        given = [a.option_strings[-1] for a in group._group_actions if option_given(args, a.option_strings[-1])]
        if given and not applies:
            ap.error(f"{', '.join(given)}: {'this option is' if len(given) == 1 else 'these options are'} "
                     f"for {why}")
    if option_given(args, "--cluster-columns") and not args.output:
        ap.error("--cluster-columns chooses the branches of the -o file: there is no -o")
    if option_given(args, "--metrics-linger") and not args.metrics_port:
        ap.error("--metrics-linger keeps the metrics served after the run: there is no --metrics-port")
    if option_given(args, "--metrics-host") and not args.metrics_port:  # ran with no exporter at all
        ap.error(f"--metrics-host {args.metrics_host!r} is the interface of the metrics exporter: there is no "
                 "--metrics-port")
    if unused := event_filter_option_unused(args):
        ap.error(unused)
    try:
        check_message_limits("", args.max_message_bytes, args.refuse_message_bytes,
                             ("--max-message-bytes", "--refuse-message-bytes"))
        if args.stream:
            check_queue_bound("", args.max_queue_bytes, args.refuse_message_bytes,
                              ("--max-queue-bytes", "--refuse-message-bytes"))
    except ValueError as err:
        ap.error(str(err))
    if args.events is None:
        args.events = 20000
    if args.particle is None:
        args.particle = "generic" if args.detector == "belle2-ecl" else "gamma"
    elif args.particle == "generic" and args.detector != "belle2-ecl":
        ap.error(f"--particle generic: generic events exist for belle2-ecl only (--detector {args.detector}: "
                 "gamma or pi0)")
    if args.background is None:
        args.background = 1.0 if args.detector == "belle2-ecl" else 0.0
    if args.no_cnn and option_given(args, "--model"):
        ap.error("--model is the CNN's model: it does nothing with --no-cnn")
    # files and addresses the modules would refuse at initialize (exit 1, after the others had started)
    for option, name in (("--conditions", args.conditions), ("--model", args.model)):
        if name and not os.path.isfile(name):
            ap.error(f"{option} {name!r} is not a file")
    if why := chain_file_error(args):  # a file, but not one its module can read
        ap.error(why)
    if args.input and not args.stream and not os.path.isfile(args.input):
        ap.error(f"-i {args.input!r} is not a file (a raw file, or a tcp:// or ipc:// address)")
    if args.input and not args.stream:
        try:
            with open(args.input, "rb") as f:
                head = f.read(4)
        except OSError as err:
            ap.error(f"-i {args.input!r}: cannot read it ({err.strerror})")
        if head == b"root":  # the raw reader would reject its every record
            ap.error(f"-i {args.input!r} is a ROOT file (an output of reco.py): -i reads raw files (.msgpack)")
        # a file of another kind (any bytes are some MessagePack: a text ran as events, each rejected, and left an
        # empty -o and a quarantine file behind, exit 1), judged by its first message as daq-emulator --input is;
        # an empty file is a run with no events, said after it
        if head and (why := not_a_raw_file(args.input)):
            ap.error(f"-i {args.input!r}: {why}")
    if args.stream:
        try:
            check_address(args.input)
        except ValueError as err:
            ap.error(f"-i: {err}")
        # libzmq binds a free port (or ipc path) for these, and reco.py does not say which: no sender could know it
        port = tcp_port(args.input)
        if (port is not None and (port == "*" or (port.isdigit() and int(port) == 0))) or args.input == "ipc://*":
            ap.error(f"-i {args.input!r}: name the port: a wildcard stands for one chosen at random, which no "
                     "sender would know" + (" (nor can one connect to it)" if args.connect else ""))
        # an address it binds (the socket file of one it connects to may appear later)
        if not args.connect and (why := bind_error(args.input)):
            ap.error(f"-i {args.input!r}: {why}")
        if why := curve_option_error(args, CURVE_NAME, (args.curve_server or CURVE_SERVER,) if args.connect else (),
                                     "--curve-server"):
            ap.error(why)
    # the spec keeps every rejected message for inspection: a job that reads raw data keeps them by default
    args.rejected_when_needed = args.rejected is None and bool(args.input)
    if args.rejected_when_needed:
        args.rejected = os.path.splitext(args.output)[0] + ".rejected.msgpack" if args.output else "rejected.msgpack"
    for option, name in (("-o", args.output), ("--rejected", args.rejected)):
        if name and (why := output_file_error(name, option)):
            ap.error(why)
    return args


def build_path(args) -> eclreco.Path:
    path = eclreco.create_path()
    if not args.input:
        path.add_module("SimulationInput", events=args.events, detector=args.detector, particle=args.particle,
                        energy=args.energy, background=args.background, seed=args.seed)
    elif args.stream:
        if not args.connect:  # it accepts the senders' connections
            from eclreco import open_files

            open_files.raise_soft_limit("reco.py")
        path.add_module("ZMQInput", address=args.input, bind=not args.connect, idle_timeout_s=args.idle_timeout,
                        max_latency_ms=args.max_latency, max_message_bytes=args.max_message_bytes,
                        refuse_message_bytes=args.refuse_message_bytes, max_queue_bytes=args.max_queue_bytes,
                        curve_dir=args.curve_dir,
                        curve_name=args.curve_name or CURVE_NAME, curve_secret=args.curve_secret,
                        curve_server=args.curve_server or CURVE_SERVER)
    else:
        path.add_module("RawFileInput", filename=args.input)
    # the simulation's detector is known: a --model of the other one is an error at initialize, not one per event
    add_reconstruction(path, cnn=not args.no_cnn, model=args.model, conditions=args.conditions,
                       detector="" if args.input else args.detector)
    add_event_filter(path, args)  # the DQM after it, as in the farm (the collector's): it shows what is kept
    if not args.no_dqm:
        path.add_module("ECLDQM")
    if args.output:
        # a misspelt column: refused with the option's name before anything starts (RootOutput's initialize would)
        if why := unknown_columns_error(path.modules, "ECLClusters", args.cluster_columns, "--cluster-columns"):
            raise ValueError(why)
        path.add_module("RootOutput", filename=args.output, cluster_columns=args.cluster_columns)
    if args.rejected:
        path.add_module("RejectedOutput", filename=args.rejected, when_needed=args.rejected_when_needed)
    path.add_module("Progress", interval_s=args.progress)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # a module parameter out of range, an unusable file or port: one line, no traceback
        path = build_path(args)
    except (ValueError, TypeError, OSError) as err:
        print(f"reco.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    exporter = None
    if args.metrics_port:
        from eclreco.metrics import serve_process_metrics

        try:
            exporter = serve_process_metrics(args.metrics_port, args.metrics_host, role="reco", path=path)
        except OSError as err:  # refused before the run; the parser took the host (metrics_host): the port is taken
            print(f"reco.py: error: --metrics-port {args.metrics_port}: {err.strerror}", file=sys.stderr, flush=True)
            return 2
    # the job's first line once it runs: a refused --metrics-port is the only line, as any refusal
    print(f"eclreco {eclreco.__version__}: {path}", flush=True)
    try:
        return run(args, path)
    finally:
        if exporter is not None:
            if args.metrics_linger and eclreco.statistics.summary().get("received"):
                linger(exporter, args.metrics_linger)
            exporter.close()


def linger(exporter, seconds: float) -> None:
    """Serves the job's final counts until a scrape has read them, at most `seconds`: the exporter closes
    with the job, and what is counted at its end (ZMQInput's unread_at_end, when its socket closes; the events
    of a stopped run's drain) was never seen by a Prometheus scraping every few seconds. SIGINT/SIGTERM
    end the wait (the outputs are closed already)."""
    class Interrupted(Exception):
        pass

    def interrupt(sig, frame):
        raise Interrupted

    before = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"reco.py: serving the final metrics on {exporter.url} until they are scraped (at most "
              f"{seconds:g} s)", flush=True)
        if not exporter.wait_for_scrape(seconds):
            print(f"reco.py: warning: no scrape of {exporter.url} within {seconds:g} s after the run",
                  file=sys.stderr, flush=True)
    except Interrupted:
        pass
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def run(args, path) -> int:
    """Processes `path` and reports: the exit code."""
    try:
        eclreco.process(path, max_events=args.max_events, threads=args.threads, batch_size=args.batch_size)
    except (ValueError, OSError) as err:  # refused before the run: options, files
        print(f"reco.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as err:  # a fatal module error, e.g. an output that cannot be written
        if eclreco.statistics.summary()["received"]:  # not for a module that failed at initialize
            print(eclreco.statistics, flush=True)
        print(f"reco.py: error: {err}", file=sys.stderr, flush=True)
        return 1
    print(eclreco.statistics, flush=True)
    s = eclreco.statistics.summary()
    sig = eclreco._core.stop_signal()
    if sig and args.stream:  # how a stream's run ends: a service's clean stop
        print(f"reco.py: stopped by {signal.Signals(sig).name} after {s['received']} events", flush=True)
    elif sig:
        # A file or the simulation, cut short: the outputs are closed and valid but hold only what came
        # before the stop. Ending by the same signal tells the caller (a shell's 130/143, a batch system).
        print(f"reco.py: stopped by {signal.Signals(sig).name} after {s['received']} events, before the end of "
              f"the input", file=sys.stderr, flush=True)
        sys.stdout.flush()
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    if not s["received"] and args.input and not args.stream:
        print(f"reco.py: warning: {args.input} holds no events"
              + (f"; {args.output} has an empty tree and empty dqm/ histograms" if args.output else ""),
              file=sys.stderr, flush=True)
    if s["rejected"]:  # where they are: the summary counts them by reason, the file holds their bytes
        print(f"reco.py: {s['rejected']} rejected events " + (f"kept in {args.rejected}" if args.rejected else
                                                              "counted, not kept (--rejected '')"), flush=True)
    # every event rejected (not raw data of this format, no conditions for its runs), or every event
    # failed in a module (a misconfigured chain: its first message)
    if failure := eclreco.job_failure(s):
        first = eclreco.statistics.state.error_messages() if s["processed"] else []
        print(f"reco.py: error: {failure}" + (f", e.g. {first[0]}" if first else ""), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
