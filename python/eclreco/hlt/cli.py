"""`eclreco hlt ...`: the HLT roles, a local farm, run control and status."""
from __future__ import annotations

import argparse
import sys

from eclreco.cli_types import (ADDRESS, BATCH_SIZE, CONNECT_ADDRESS, METRICS_HOST, METRICS_PORT, NON_NEGATIVE,
                               NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, THREADS, add_cluster_columns_argument,
                               input_file, metrics_host, zmq_address)
from eclreco.curve import add_curve_arguments
from eclreco.reconstruction import add_event_filter_arguments
from eclreco.scheduling import add_scheduling_argument

FARM_ADDRESS_OR_FREE = zmq_address(free=True, connect=True)  # hlt run's --workers-addr, --collector-addr

# the collector's options of a ROOT file output (hlt collector's and hlt run's): a tcp:// output refuses them
# when not these (collector.root_output_options_unused)
FLUSH_INTERVAL_S = 0.25
DQM_OPEN_RUNS = 8
# A stop reads the input until it is quiet for --stop-drain, at most this long (--stop-drain-max): a run stop
# under a source that never pauses took half the stop's time-out, 60 s, with no word to the operator.
STOP_DRAIN_MAX_S = 10.0


def _add_metrics(p, default_port: int):
    p.add_argument("--metrics-port", type=METRICS_PORT, default=default_port,
                   help="Prometheus exporter port (0: a free port; -1: none)")
    p.add_argument("--metrics-host", type=metrics_host, default=METRICS_HOST, help="interface of the exporter")


def add_distributor_arguments(p, local_farm: bool = False):
    p.add_argument("--input", type=ADDRESS, default="tcp://127.0.0.1:5555", help="PULL address that event builders push to")
    p.add_argument("--input-connect", action="store_true", help="connect the input instead of binding it")
    # hlt run's roles connect to the addresses its distributor and collector bind: no wildcard, no port 0
    if local_farm:  # hlt run: its own workers, so any free port (a second farm on the host does not clash)
        p.add_argument("--workers-addr", type=FARM_ADDRESS_OR_FREE, default="", help="ROUTER address workers connect to (default: a free local port)")
    else:
        p.add_argument("--workers-addr", type=ADDRESS, default="tcp://127.0.0.1:5556", help="ROUTER address workers connect to")
    p.add_argument("--control", type=CONNECT_ADDRESS if local_farm else ADDRESS, default="tcp://127.0.0.1:5557",
                   help="ROUTER address of run control")
    p.add_argument("--queue-size", type=POSITIVE_INT, default=4000, help="events read ahead of the workers")
    p.add_argument("--max-held", type=POSITIVE_INT, default=20000,
                   help="events held, at most: read and not yet in the collector's file (unconfirmed, or "
                        "confirmed and waiting for the collector's SAVED)")
    p.add_argument("--max-held-bytes", type=NON_NEGATIVE_INT, default=4 << 30,
                   help="bytes of the events held, at most (--max-held of them, each up to --refuse-message-bytes, "
                        "were 1.25 TiB): the input is read no further beyond (0: no bound; docs/deployment.md)")
    p.add_argument("--chunk", type=POSITIVE_INT, default=256, help="events per message to a worker, at most")
    p.add_argument("--heartbeat-timeout", type=POSITIVE, default=5.0, help="a silent worker is lost after S s")
    p.add_argument("--drop-when-busy", action="store_true", help="drop (and count) instead of backpressure")
    p.add_argument("--input-hwm", type=NON_NEGATIVE_INT, default=1000,
                   help="high-water mark of the input socket, in messages per sender connection (0: no limit); "
                        "lowered to --max-queue-bytes // --refuse-message-bytes")
    # off by default: the 16-message queue of a 1 GiB bound (64 MiB messages) made every role wake per few events,
    # and the farm sustained 12.9k of 30k events/s offered against 22.1k without it (docs/deployment.md)
    p.add_argument("--max-queue-bytes", type=NON_NEGATIVE_INT, default=0,
                   help="bytes a sender connection's input queue holds at most (the sender blocks beyond; lowers the "
                        "high-water mark to N // --refuse-message-bytes messages; 0: no bound, "
                        "--input-hwm messages; docs/deployment.md)")
    p.add_argument("--stop-drain", type=NON_NEGATIVE, default=0.5,
                   help="at stop, keep reading the input until it is quiet for S s (at most --stop-drain-max)")
    p.add_argument("--stop-drain-max", type=NON_NEGATIVE, default=STOP_DRAIN_MAX_S,
                   help="at stop, read a source that never pauses for at most S s (and at most half of "
                        "--stop-timeout); what it sends later waits for the next run")
    p.add_argument("--stop-timeout", type=POSITIVE, default=120.0,
                   help="a stop gives up the events still held after S s and counts them as lost_at_stop (a dead "
                        "collector with events not yet in its file: the time a replacement has to take them); "
                        "`hlt control stop` waits --timeout (180 s) for the answer")
    p.add_argument("--cycle-ms", type=NON_NEGATIVE, default=0.5,
                   help="under load, at most one read/dispatch cycle per CYCLE ms (fewer wake-ups; 0: none)")
    p.add_argument("--max-message-bytes", type=NON_NEGATIVE_INT, default=1 << 20,
                   help="input messages above this size are rejected as oversize and kept (0: no limit)")
    p.add_argument("--refuse-message-bytes", type=NON_NEGATIVE_INT, default=64 << 20,
                   help="input messages above this size are refused by the socket unread, with their connection "
                        "(ZMQ_MAXMSGSIZE, a memory guard; 0: no limit)")
    p.add_argument("--keep-unread-bytes", type=NON_NEGATIVE_INT, default=1 << 30,
                   help="bytes of the messages unread at terminate (sent after the last stop) kept in the quarantine "
                        "file, at most (the terminate writes them; beyond: counted unread_not_kept and said, "
                        "lost: exit 1; 0: no bound)")
    add_scheduling_argument(p)


def add_hlt_parser(subparsers):
    hlt = subparsers.add_parser("hlt", help="HLT-style farm: distributor, workers, collector, run control",
                                description=__doc__)
    sub = hlt.add_subparsers(dest="hlt_command", metavar="ROLE")

    p = sub.add_parser("distributor", help="event source -> workers (credit-based), run control")
    add_distributor_arguments(p)
    p.add_argument("--rejected", default=None,
                   help="quarantine file of the messages read at terminate and not processed (unread_at_terminate: "
                        "sent after the last stop), as sent ({pid} is replaced; '': none; default: "
                        "distributor_unread_{pid}.msgpack in the working directory, made at the first one; appended "
                        "to when it exists)")
    _add_metrics(p, 9460)
    add_curve_arguments(p, "distributor")
    p.set_defaults(func=lambda a: __import__("eclreco.hlt.distributor", fromlist=["main"]).main(a))

    p = sub.add_parser("worker", prefix_chars="+", add_help=False,
                       help="a worker: [STEERING.py] [--distributor ADDR --collector ADDR ...] "
                            "(default steering/hlt_worker.py; --help lists its options)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_worker)

    p = sub.add_parser("collector", help="results of all workers -> output file, confirmations")
    p.add_argument("--collector-addr", type=ADDRESS, default="tcp://127.0.0.1:5558", help="PULL address workers push to")
    p.add_argument("--control", type=CONNECT_ADDRESS, default="tcp://127.0.0.1:5557", help="the distributor's control address")
    p.add_argument("-o", "--output", default="hlt.root",
                   help="ROOT file ({run_index} is replaced; else runs after the first get _runN; an existing one is "
                        "kept and NAME.2 written; not a device or a FIFO) or tcp://")
    p.add_argument("--output-bind", action="store_true", help="bind a tcp:// output instead of connecting")
    p.add_argument("--batch-size", type=BATCH_SIZE, default=1024, help="events per batch of the output path")
    p.add_argument("--max-latency", type=NON_NEGATIVE, default=2.0, help="ms to wait for more results after the first")
    p.add_argument("--dedup-window", type=POSITIVE_INT, default=1_000_000,
                   help="events: a repeated (exp, run, evt) of a detector within this many events is dropped as a "
                        "duplicate")
    p.add_argument("--flush-interval", type=NON_NEGATIVE, default=FLUSH_INTERVAL_S,
                   help="s: results are written to the ROOT file at least this often; only then are they SAVED "
                        "(until then the distributor keeps them for a replacement collector)")
    p.add_argument("--dqm-open-runs", type=POSITIVE_INT, default=DQM_OPEN_RUNS,
                   help="runs whose DQM histograms are kept apart at once (each run is one cycle of dqm/, written "
                        "once no more of its events can come); with more, the oldest is written")
    add_cluster_columns_argument(p, "ROOT file output; the workers must send them (their --cluster-columns): ")
    add_scheduling_argument(p)
    _add_metrics(p, 9461)
    add_curve_arguments(p, "collector")
    p.set_defaults(func=lambda a: __import__("eclreco.hlt.collector", fromlist=["main"]).main(a))

    p = sub.add_parser("run", help="a local farm: 1 distributor, N workers, 1 collector")
    add_distributor_arguments(p, local_farm=True)
    p.add_argument("-n", "--workers", type=POSITIVE_INT, default=2, help="worker processes")
    p.add_argument("--collector-addr", type=FARM_ADDRESS_OR_FREE, default="", help="default: a free local port")
    p.add_argument("-o", "--output", default="hlt.root", help="output of the collector (ROOT file or tcp://)")
    p.add_argument("--worker-steering", default="", help="default: steering/hlt_worker.py")
    p.add_argument("--rejected", default=None,
                   help="quarantine file of each worker's rejected raw events ({worker} = its index, {pid}; "
                        "default: OUTPUT_rejected_w{worker}_{pid}.msgpack beside a ROOT output, hlt_rejected_w{worker}_{pid}.msgpack "
                        "in the working directory with a tcp:// output; '': none). "
                        "A name without {pid} is emptied at the start; a restarted worker appends to it. "
                        "The distributor keeps the messages unread at terminate in OUTPUT_unread_{pid}.msgpack "
                        "(a name of your own: {worker} = 'distributor', else '_distributor' before its extension)")
    p.add_argument("--modules", default="standard", help="worker chain: standard, none, or a list")
    p.add_argument("--no-cnn", action="store_true", help="workers: classical leakage correction only")
    p.add_argument("--conditions", default="", help="workers: ECLUnpacker's conditions file (gain, t0, channel map "
                   "per run range; docs/wire-format.md)")
    p.add_argument("--model", default="", help="workers: ONNX model of the CNN (default: the shipped model of "
                   "the events' detector)")
    p.add_argument("--threads", type=THREADS, default=1, help="threads per worker")
    p.add_argument("--batch-size", type=BATCH_SIZE, default=256, help="events per batch in a worker")
    add_event_filter_arguments(p)
    add_cluster_columns_argument(p, "workers and collector: ")
    p.add_argument("--max-latency", type=NON_NEGATIVE, default=2.0,
                   help="ms a worker waits for its batch to fill, and the collector for more results")
    p.add_argument("--flush-interval", type=NON_NEGATIVE, default=FLUSH_INTERVAL_S,
                   help="s between writes of the collector's ROOT file")
    p.add_argument("--dedup-window", type=POSITIVE_INT, default=1_000_000,
                   help="events over which the collector drops a repeated (exp, run, evt) of a detector")
    p.add_argument("--dqm-open-runs", type=POSITIVE_INT, default=DQM_OPEN_RUNS,
                   help="runs whose DQM histograms the collector keeps apart at once (one cycle per run; ROOT file "
                        "output)")
    p.add_argument("--max-restarts", type=NON_NEGATIVE_INT, default=10, help="worker restarts allowed in total")
    p.add_argument("--collector-restarts", type=NON_NEGATIVE_INT, default=3,
                   help="collector restarts allowed within a minute (the new one writes its own file and gets the "
                        "events the dead one had not saved); the exit after them ends the farm (0: the first does)")
    p.add_argument("--metrics-base-port", type=METRICS_PORT, default=9460,
                   help="distributor P, collector P+1, worker i P+2+i (0: free ports, -1: none)")
    p.add_argument("--metrics-host", type=metrics_host, default=METRICS_HOST, help="interface of the exporters")
    add_curve_arguments(p, "control", roles_own_keys=True)
    p.set_defaults(func=lambda a: __import__("eclreco.hlt.run", fromlist=["main"]).main(a))

    p = sub.add_parser("control", help="run control: stop (end of run), start (new run), terminate")
    p.add_argument("action", choices=["stop", "start", "terminate"])
    p.add_argument("--control", type=CONNECT_ADDRESS, default="tcp://127.0.0.1:5557", help="the distributor's control address")
    p.add_argument("--timeout", type=POSITIVE, default=180.0,
                   help="seconds to wait for the answer (a farm that does not answer STATUS within 5 s: at once)")
    add_curve_arguments(p, "control")
    p.set_defaults(func=lambda a: __import__("eclreco.hlt.control", fromlist=["control_main"]).control_main(a))

    p = sub.add_parser("status", help="every process of the farm: role, pid, state, counters")
    p.add_argument("--control", type=CONNECT_ADDRESS, default="tcp://127.0.0.1:5557", help="the distributor's control address")
    p.add_argument("--json", action="store_true", help='{"processes": [{"role": ..., "pid": ...}, ...]}')
    p.add_argument("--watch", type=NON_NEGATIVE, nargs="?", const=1.0, default=0.0,
                   help="refresh every S s (a bare --watch: 1 s; 0: once)")
    p.add_argument("--timeout", type=POSITIVE, default=5.0, help="seconds to wait for the answer")
    add_curve_arguments(p, "control")
    p.set_defaults(func=lambda a: __import__("eclreco.hlt.control", fromlist=["status_main"]).status_main(a))

    p = sub.add_parser("merge", help="the events of a farm's files (a killed collector's and its replacement's), "
                                     "each (exp, run, evt) of a detector once, into one file",
                       description=__import__("eclreco.hlt.merge", fromlist=["merge"]).__doc__)
    p.add_argument("files", nargs="+", type=input_file("ROOT file"), metavar="FILE",
                   help="ROOT files of the farm, the killed collector's first (its copy is kept)")
    p.add_argument("-o", "--output", required=True, help="the merged ROOT file (not overwritten)")
    p.add_argument("--tree", default="events", help="the TTree to merge")
    p.set_defaults(func=lambda a: __import__("eclreco.hlt.merge", fromlist=["main"]).main(a))

    p = sub.add_parser("keys", help="generate CURVE key pairs (zmq.auth certificates) for --curve-dir")
    p.add_argument("-o", "--output", required=True, help="key directory (public/ and private/ are made in it)")
    p.add_argument("--names", default="distributor,collector,worker,control,daq,reco",
                   help="comma-separated parties, one key pair each")
    p.add_argument("--force", action="store_true", help="replace existing keys")
    p.set_defaults(func=lambda a: __import__("eclreco.curve", fromlist=["keys_main"]).keys_main(a))

    hlt.set_defaults(func=lambda a: hlt.print_help(sys.stderr) or 2)  # `eclreco hlt` alone: no role


def _worker(args) -> int:
    from eclreco.hlt import worker

    rest = list(args.args)
    steering = None
    if rest and rest[0].endswith(".py"):
        steering = rest.pop(0)
    return worker.main(argparse.Namespace(steering=steering, worker_args=rest))
