"""The HLT worker: a steering file whose path is  HLTWorkerInput -> reconstruction -> ZMQOutput.

:class:`WorkerLink` owns the DEALER socket to the distributor for the life of the process:
READY with the credit it can take, CREDIT as events leave the path, heartbeats with counters,
BYE when leaving. :class:`HLTWorkerInput` is the path's source; it only touches the socket
from the framework's reader thread, so a worker that hangs stops heartbeating and loses its
events to the others. :func:`run_worker` runs one eclreco.process() per run until TERMINATE.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import os
import runpy
import socket
import sys
import threading
import time
import uuid
from typing import NoReturn

import numpy as np
import zmq

import eclreco
from eclreco import Module, _core
from eclreco.cli_types import (BATCH_SIZE, CONNECT_ADDRESS, METRICS_HOST, METRICS_PORT, NON_NEGATIVE, NON_NEGATIVE_INT,
                               POSITIVE, THREADS, metrics_host, metrics_host_unused)
from eclreco.framework import RAW
from eclreco.hlt import protocol as P
from eclreco.log_lines import whole_lines
from eclreco.paths import missing_folder, unwritable_folder
from eclreco.raw_sockets import ConnectionMonitor, attach

SEQ_COLLECTION = "HLTSequence"


class WorkerLink:
    def __init__(self, distributor: str, capacity: int = 1024, heartbeat_s: float = 0.5, metrics_port: int = 0,
                 threads: int = 1, curve=None):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.ident = f"w-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}".encode()
        self.sock.setsockopt(zmq.IDENTITY, self.ident)
        self.sock.setsockopt(zmq.LINGER, 2000)
        if curve is not None:
            curve.client(self.sock, "distributor")
        # A DEALER takes READY and heartbeats whether or not the distributor is there (a wrong port, a
        # host name that does not resolve): until a handshake completes, the worker says that it waits.
        self.address = distributor
        self.handshake = ConnectionMonitor(self.sock)
        attach(self.sock, distributor, bind=False)
        self.capacity = capacity
        self.heartbeat_s = heartbeat_s
        self.metrics_port = metrics_port
        self.threads = threads
        self.buffer: collections.deque = collections.deque()  # (seqs, bytes, offsets): raw events back to back
        self.buffered = 0
        self.outstanding = 0      # credit the distributor holds for us
        self.received_run = 0     # events received in this process() run
        self.end_run = False
        self.terminate = False
        self.next_hb = 0.0
        self.registered = False
        self.state = "idle"
        self.events_received = 0
        # the socket is the reader thread's; the output's thread heartbeats on it while its sends block
        # (output_blocked), never at the same time
        self.lock = threading.Lock()

    def in_worker(self) -> int:
        s = eclreco.statistics.state
        done = (s.processed + s.rejected) if s is not None and s.running else self.received_run
        return self.received_run - done

    def register(self):
        self.outstanding = max(0, self.capacity - self.in_worker() - self.buffered)
        self.sock.send_multipart([P.READY, P.pack({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "credit": self.outstanding, "metrics_port": self.metrics_port,
                                                   "threads": self.threads, "capacity": self.capacity,
                                                   "state": self.state})])
        self.registered = True

    def status(self) -> dict:
        d = {"state": self.state, "buffered": self.buffered, "events_received": self.events_received}
        d.update(eclreco.statistics.counters())
        return d

    def service(self):
        """Non-blocking: read what the distributor sent, send credit and heartbeats when due."""
        with self.lock:
            self._service()

    def output_blocked(self, waited_s: float):
        """ZMQOutput's sends have waited waited_s for the collector (a hung, dead or slow one): this
        worker is alive, and says so with state "blocked" (it missed its heartbeats, and the
        distributor counted it lost and redelivered its events to workers as blocked as it). The
        distributor gives up on a blocked worker only while the collector is heard from and confirms
        none of its events. Skipped while the reader thread holds the socket: it heartbeats itself."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            now = time.monotonic()
            if now >= self.next_hb:
                self.next_hb = now + self.heartbeat_s
                self.sock.send_multipart([P.HB, P.pack({**self.status(), "state": "blocked",
                                                        "blocked_s": round(waited_s, 3)})])
        finally:
            self.lock.release()

    def _service(self):
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            cmd = frames[0]
            if cmd == P.EV:
                seqs = P.seqs_from_bytes(frames[1])
                # a malformed EV is a distributor bug: an error, never events paired with the wrong ids
                blob, off = P.envelopes_from_frames(frames[2:], len(seqs))
                self.buffer.append((seqs, blob, off))
                n = len(seqs)
                self.buffered += n
                self.outstanding -= n
                self.events_received += n
            elif cmd == P.END_RUN:
                self.end_run = True
            elif cmd == P.TERMINATE:
                self.end_run = self.terminate = True
            elif cmd == P.WHO:
                self.register()
        if not self.registered:
            self.register()
        if not self.end_run:
            in_worker = self.in_worker()
            grant = self.capacity - self.outstanding - in_worker - self.buffered
            # in steps of a quarter of the capacity (fewer messages), and the rest once idle: it stayed below
            # its capacity for good after a burst of fewer events than a step (eclreco_hlt_worker_credit)
            idle = not in_worker and not self.buffered
            if grant >= max(1, self.capacity // 4) or (grant > 0 and (self.outstanding == 0 or idle)):
                self.sock.send_multipart([P.CREDIT, str(grant).encode()])
                self.outstanding += grant
        now = time.monotonic()
        if now >= self.next_hb:
            self.next_hb = now + self.heartbeat_s
            self.sock.send_multipart([P.HB, P.pack(self.status())])
            if self.handshake is not None and self.handshake.say_while_unconnected(
                    f"[worker] pid {os.getpid()}", f"the distributor at {self.address}"):
                self.handshake.close()
                self.handshake = None

    def take(self, max_events: int):
        """(seqs, blocks) of up to max_events buffered events: blocks for _core.append_envelope_blocks,
        (bytes, offsets) of each received message or of the part of it that fits."""
        seqs, blocks, n = [], [], 0
        while self.buffer and n < max_events:
            s, blob, off = self.buffer[0]
            room = max_events - n
            if len(s) > room:
                self.buffer[0] = (s[room:], blob, off[room:])
                s, off = s[:room], off[:room + 1]
            else:
                self.buffer.popleft()
            seqs.append(s)
            blocks.append((blob, off))
            n += len(s)
        self.buffered -= n
        self.received_run += n
        return (np.concatenate(seqs) if seqs else np.zeros(0, "<u8")), blocks

    def wait(self, timeout_s: float):
        with self.lock:
            self.sock.poll(max(1, int(timeout_s * 1000)), zmq.POLLIN)

    def bye(self):
        if self.handshake is not None:
            self.handshake.close()
            self.handshake = None
        try:
            self.sock.send_multipart([P.BYE], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.sock.close(1000)


class HLTWorkerInput(Module):
    """HLT worker source: raw events from the distributor (credit-based), with their sequence ids."""

    def __init__(self, link: WorkerLink | None = None):
        super().__init__()
        self.add_param("max_latency_ms", 2.0, "longest wait for a batch to fill after its first event")
        self.add_param("poll_ms", 100.0, "longest time between returns to the framework")
        self.link = link

    def is_source(self):
        return True

    def makes(self):
        return (*RAW, SEQ_COLLECTION)

    def requires(self):
        return ()

    def initialize(self):
        if self.link is None:
            raise RuntimeError("HLTWorkerInput needs a WorkerLink (use eclreco.hlt.worker.run_worker)")
        link = self.link
        link.received_run = 0
        link.end_run = link.terminate
        link.state = "ready"
        link.register()

    def begin_run(self, exp, run):
        self.link.state = "running"

    def next_batch(self, batch, max_events):
        link = self.link
        latency = self.param("max_latency_ms") * 1e-3
        t0 = time.monotonic()
        t_first = None
        while True:
            link.service()
            if _core.stop_requested():
                return False
            now = time.monotonic()
            if link.buffered and t_first is None:
                t_first = now
            if link.buffered >= max_events or (t_first is not None and now - t_first >= latency):
                break
            if link.end_run:
                if link.buffered:
                    break
                return False
            wait = (t_first + latency - now) if t_first is not None else (self.param("poll_ms") * 1e-3 - (now - t0))
            if wait <= 0:
                break
            link.wait(min(wait, link.heartbeat_s))
        seqs, blocks = link.take(max_events)
        if len(seqs):
            _core.append_envelope_blocks(batch, blocks)
            batch.add_collection(SEQ_COLLECTION, np.arange(len(seqs) + 1, dtype=np.int64), {"seq": seqs})
        return True

    def end_run(self, exp, run):
        self.link.state = "ready"


def run_worker(path, link: WorkerLink, threads: int = 1, batch_size: int = 256, exporter=None) -> int:
    """One eclreco.process() per run until the distributor says TERMINATE or a signal arrives."""
    try:
        for runs in itertools.count():
            eclreco.process(path, threads=threads, batch_size=batch_size)
            # where this worker's time went in the run (module table, as basf2 prints it): of a run that had events
            # here or that END_RUN ended; not for the empty wait that a TERMINATE or a signal ends (a worker stopped
            # before any event said "run ended" with a table of zeros, of a run that never started)
            if link.received_run or (link.end_run and not link.terminate):
                print(f"[worker] pid {os.getpid()} run ended\n{eclreco.statistics}", flush=True)
            elif _core.stop_requested():
                print(f"[worker] pid {os.getpid()} stopped " + ("before its first run" if runs == 0 else "between runs")
                      + ": no event received", flush=True)
            if exporter is not None:
                exporter.checkpoint()
            if _core.stop_requested() or link.terminate:
                break
            link.state = "idle"
        return 0
    finally:
        link.state = "exiting"
        link.bye()


def add_worker_arguments(ap: argparse.ArgumentParser):
    """The worker's options, on the parser of a worker steering file (steering/hlt_worker.py) or the built-in one.
    `eclreco hlt worker` takes the optional steering file before them (hlt/cli.py), which this parser never sees:
    its usage says so (unless it has one of its own), with the prog (the `error:` prefix) left as it is."""
    if ap.usage is None:
        ap.usage = "%(prog)s [STEERING.py] [options]"
    ap.add_argument("--distributor", type=CONNECT_ADDRESS, default="tcp://127.0.0.1:5556", help="the distributor's workers address")
    ap.add_argument("--collector", type=CONNECT_ADDRESS, default="tcp://127.0.0.1:5558", help="the collector's input address")
    ap.add_argument("--threads", type=THREADS, default=1, help="processing threads of this worker")
    ap.add_argument("--batch-size", type=BATCH_SIZE, default=256, help="events per batch")
    ap.add_argument("--capacity", type=NON_NEGATIVE_INT, default=0,
                    help="events this worker holds at most (0: 4 batches/thread)")
    ap.add_argument("--heartbeat", type=POSITIVE, default=0.5, help="seconds between heartbeats")
    ap.add_argument("--max-latency", type=NON_NEGATIVE, default=2.0, help="ms to wait for a batch to fill")
    ap.add_argument("--metrics-port", type=METRICS_PORT, default=0, help="Prometheus port (0: a free port, -1: none)")
    ap.add_argument("--metrics-host", type=metrics_host, default=METRICS_HOST, help="interface of the exporter")
    ap.add_argument("--modules", default="standard",
                    help="'standard' (add_reconstruction), 'none', or a comma-separated list of modules")
    ap.add_argument("--no-cnn", action="store_true", help="classical leakage correction only")
    ap.add_argument("--model", default="", help="ONNX model of the CNN")
    ap.add_argument("--conditions", default="", help="ECLUnpacker's conditions file (gain, t0, channel map per "
                    "run range; docs/wire-format.md)")
    ap.add_argument("--rejected", default=None, help="quarantine file of the raw events this worker rejects "
                    "({pid} is replaced; '': none; default: " + DEFAULT_REJECTED + " in the working directory, "
                    "made at the first rejected event; hlt run gives each worker one beside its output)")
    from eclreco.cli_types import add_cluster_columns_argument
    from eclreco.curve import add_curve_arguments
    from eclreco.reconstruction import add_event_filter_arguments

    add_event_filter_arguments(ap)
    add_cluster_columns_argument(ap, "sent to the collector: ")
    add_curve_arguments(ap, "worker")


def default_quarantine(args) -> None:
    """A worker keeps the raw bytes of what it rejects unless told not to (--rejected ''), as reco.py -i
    does: by default in DEFAULT_REJECTED in its working directory. The file is made at the first rejected
    event, a given one too: a worker that rejects nothing leaves no file (hlt run names one per worker
    process, and each made it at its start: a farm that rejected nothing, restarts included, left a folder
    of empty files). A directory it cannot write in is an error now, not at the first rejection, which
    would stop the worker's run. Sets args.rejected to the file itself ({pid} replaced)."""
    args.rejected_when_needed = True
    given = args.rejected is not None
    if not given:
        args.rejected = DEFAULT_REJECTED
    why = ""
    if args.rejected:
        if folder := missing_folder(args.rejected):
            why = f"--rejected {args.rejected!r}: no directory {folder!r}"
        elif cannot := unwritable_folder(os.path.dirname(os.path.abspath(args.rejected))):
            why = (f"cannot keep rejected raw events: {cannot}: "
                   + ("choose another --rejected FILE" if given else "pass --rejected FILE (or --rejected '' to keep none)"))
    if why:  # a bad option: exit 2, as argparse's and as `hlt run`'s refusal of the same --rejected (it was 1)
        refuse(why)
    args.rejected = args.rejected.replace("{pid}", str(os.getpid()))


def refuse(why: str) -> NoReturn:
    """A bad option of a worker: one line, exit 2, before its link, metrics or path exist."""
    print(f"eclreco hlt worker: error: {why}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def start_worker(args, build_reconstruction) -> int:
    """Common body of worker steering files: link, path, metrics, run loop."""
    whole_lines()  # its lines whole in a log shared with the other roles (a steering file run directly too)
    from eclreco.reconstruction import chain_file_error

    # options its chain ignores first (a file of one is not read at all); a steering file's own parser may
    # have no --modules, --conditions or --model
    if hasattr(args, "modules") and (why := chain_option_unused(args)):
        refuse(why)
    if why := chain_file_error(args):
        refuse(why)
    from eclreco.curve import curve_option_error

    if why := curve_option_error(args, "worker", P.curve_servers("worker", args)):
        refuse(why)
    if hasattr(args, "metrics_host") and (why := metrics_host_unused(args)):  # (a steering file's may have none)
        refuse(why)
    default_quarantine(args)
    capacity = args.capacity or 4 * args.batch_size * max(1, args.threads)
    exporter = None
    path = eclreco.create_path()
    if args.metrics_port >= 0:
        from eclreco.metrics import serve_role_metrics

        exporter = serve_role_metrics("worker", args.metrics_port, args.metrics_host)
    from eclreco.curve import Curve

    link = WorkerLink(args.distributor, capacity=capacity, heartbeat_s=args.heartbeat,
                      metrics_port=exporter.port if exporter else 0, threads=args.threads,
                      curve=Curve.from_args(args, "worker"))
    path.add_module(HLTWorkerInput(link), max_latency_ms=args.max_latency)
    build_reconstruction(path)
    from eclreco.reconstruction import add_event_filter

    add_event_filter(path, args)  # after the chain that the steering file built: the selection of what is sent
    add_output(path, args).on_wait = link.output_blocked
    from eclreco.framework import unknown_columns_error

    # a misspelt column is not sent (ZMQOutput sends those the batch has): the collector's RootOutput failed on
    # every batch of the farm; refused here where the chain's columns are known (framework.columns_made)
    if why := unknown_columns_error(path.modules, "ECLClusters", getattr(args, "cluster_columns", ()),
                                    "--cluster-columns"):
        link.bye()
        if exporter is not None:
            exporter.close()
        refuse(why)
    if exporter is not None:
        exporter.set_path(path)
        # its next event loop starts right after a run, waiting for the next run's events: running in a run only
        exporter.collector.in_run = lambda: link.state == "running"
    print(f"[worker] pid {os.getpid()} {path} distributor {args.distributor} collector {args.collector} "
          f"metrics {exporter.port if exporter else '-'} rejected raw events "
          f"{os.path.abspath(args.rejected) if args.rejected else 'not kept'}", flush=True)
    try:
        return run_worker(path, link, threads=args.threads, batch_size=args.batch_size, exporter=exporter)
    finally:
        if exporter is not None:
            exporter.close()


def add_output(path, args):
    """ZMQOutput to the collector, with what RootOutput and ECLDQM there read: the cluster columns
    RootOutput writes (--cluster-columns, the collector's as well), the ones ECLDQM reads, and the event's
    out-of-time digit count (ECLUnpacker). With --rejected (the file, default_quarantine), a RejectedOutput
    first: the raw bytes of rejected events stay in this worker's quarantine file (the collector gets their
    reasons and counts). Returns the ZMQOutput."""
    from eclreco.modules.root_output import DEFAULT_CLUSTER_COLUMNS

    columns = list(getattr(args, "cluster_columns", DEFAULT_CLUSTER_COLUMNS))
    columns += [c for c in DQM_CLUSTER_COLUMNS if c not in columns]
    if getattr(args, "rejected", ""):
        # each record with its sequence id: a redelivered event's records are one (eclreco quarantine)
        path.add_module("RejectedOutput", filename=args.rejected, append=True,
                        when_needed=getattr(args, "rejected_when_needed", False), sequence_collection=SEQ_COLLECTION)

    # give_up_unconnected: stopped (SIGTERM) while its collector is dead, a worker exits at once (it waited
    # stop_timeout_s, 10 s); the distributor keeps what it could not send until a collector confirms it
    return path.add_module("ZMQOutput", address=args.collector, bind=False, give_up_unconnected=True,
                    collections=["ECLClusters", "ECLEventInformation"],
                    columns=columns + ["n_out_of_time_digits"],
                    **curve_params(args, "worker", "collector"))


# the standalone worker's quarantine (its working directory; {pid}: one per process)
DEFAULT_REJECTED = "rejected_{pid}.msgpack"

# what the collector's ECLDQM reads of the clusters, whatever RootOutput writes
DQM_CLUSTER_COLUMNS = ("energy", "time", "e1e9", "x", "y", "z")


def curve_params(args, name: str, server: str) -> dict:
    """ZMQInput/ZMQOutput parameters of the CURVE options (--curve-dir ...); {} without them."""
    if not getattr(args, "curve_dir", ""):
        return {}
    return {"curve_dir": args.curve_dir, "curve_name": getattr(args, "curve_name", "") or name,
            "curve_secret": getattr(args, "curve_secret", "") or "", "curve_server": server}


def module_names(modules: str) -> list[str]:
    """The modules of an explicit --modules list ('standard' and 'none' name none)."""
    return [] if modules in ("standard", "none", "") else [n.strip() for n in modules.split(",")]


def chain_option_unused(args) -> str:
    """Which of --model, --no-cnn and --conditions the chosen chain would ignore, as an error message
    ('' when none): --model and --no-cnn are about the CNN of the standard chain, --conditions is
    ECLUnpacker's (hlt run and the worker refuse them rather than run without them)."""
    if args.model and args.no_cnn:
        return "--model is the CNN's model: it does nothing with --no-cnn"
    if args.modules != "standard" and (args.model or args.no_cnn):
        option = "--model" if args.model else "--no-cnn"
        return f"{option} is about the CNN of the standard chain: it does nothing with --modules {args.modules}"
    if args.conditions and args.modules != "standard" and "ECLUnpacker" not in module_names(args.modules):
        return f"--conditions is ECLUnpacker's conditions file: the chain ({args.modules}) has no ECLUnpacker"
    return ""


def add_chosen_reconstruction(path, args):
    """--modules: 'standard' -> add_reconstruction, 'none', or an explicit comma-separated list."""
    if unused := chain_option_unused(args):
        raise ValueError(unused)
    if args.modules == "standard":
        from eclreco.reconstruction import add_reconstruction

        add_reconstruction(path, cnn=not args.no_cnn, model=args.model, conditions=args.conditions)
    else:
        for name in module_names(args.modules):
            conditions = {"conditions": args.conditions} if name == "ECLUnpacker" and args.conditions else {}
            path.add_module(name, **conditions)


def default_steering() -> str | None:
    """steering/hlt_worker.py of the source tree, if it can be found."""
    env = os.environ.get("ECLRECO_HLT_WORKER_STEERING")
    if env:
        return env
    from eclreco.paths import find_beside_package

    return find_beside_package(os.path.join("steering", "hlt_worker.py"))


def steering_file_error(path: str, what: str) -> str:
    """Why `path` cannot be a worker's steering file (a line naming `what`, the option or argument that gave it),
    '' when it can: a missing or unreadable file, or one that is no Python (compiled here, not run). `hlt worker`
    said '[Errno 2] No such file or directory: ...', and every worker of `hlt run --worker-steering` failed on
    it and was restarted until --max-restarts ran out (exit 1, a minute later)."""
    from eclreco.paths import unreadable_file

    if why := unreadable_file(path, "steering file"):
        return f"{what} {path!r}: {why}"
    try:
        with open(path, "rb") as f:
            compile(f.read(), path, "exec")
    except (SyntaxError, ValueError) as err:  # ValueError: null bytes, bytes that are no UTF-8 (a raw file)
        return f"{what} {path!r}: not a Python steering file ({type(err).__name__}: {err})"
    return ""


def main(args) -> int:
    """`eclreco hlt worker [STEERING.py] [args...]`: run the steering file as __main__."""
    whole_lines()  # (start_worker does it too: a steering file may be run alone) its refusals whole as well
    steering = args.steering or default_steering()
    argv = list(args.worker_args)
    if args.steering and (why := steering_file_error(args.steering, "STEERING")):
        refuse(why)
    if steering is None:  # installed without the source tree: the same path, built in
        from eclreco.cli_types import CommandParser

        ap = CommandParser(prog="eclreco hlt worker")
        add_worker_arguments(ap)
        wargs = ap.parse_args(argv)
        return start_worker(wargs, lambda path: add_chosen_reconstruction(path, wargs))
    sys.argv = [steering, *argv]
    try:
        runpy.run_path(steering, run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, str):  # an error message (a steering file's sys.exit("..."))
            print(e.code, file=sys.stderr, flush=True)
            return 1
        return int(e.code or 0)
    return 0
