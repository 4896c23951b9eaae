"""`eclreco hlt run`: a local farm (1 distributor, N workers, 1 collector) and its supervisor.

The supervisor starts each role as its own OS process (in its own session, so that a Ctrl-C on
the terminal reaches only the supervisor), restarts dead workers (up to --max-restarts, counted
and reported to the distributor) and a dead collector (up to --collector-restarts a minute: its
successor gets every event it had not saved and writes its own file; one stopped by SIGSTOP is killed
first), turns SIGINT/SIGTERM into
stop + terminate, and prints the achieved throughput and the p50/p99 latency at the end.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import NoReturn

import zmq

from eclreco.cli_types import metrics_host_unused
from eclreco.curve import Curve, curve_option_error, roles_key_options_error
from eclreco.hlt import protocol as P
from eclreco.hlt.control import (ControlError, distributor_row, farm_failure, lost_at_stop_text, output_line, request,
                                  status, summary_line, unread_lost_text)
from eclreco.hlt.worker import chain_option_unused, module_names, steering_file_error
from eclreco.log_lines import whole_lines
from eclreco.raw_sockets import attach, bind_error, check_message_limits, check_queue_bound, tcp_port


def _terminate_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass  # not Linux: roles outlive a killed supervisor, as before


def started_with_parent_death_signal() -> bool:
    """In a role: True when its supervisor asked for a signal at its death (above). The kernel sends
    that signal again each time it reparents the role while the supervisor's threads exit, within
    milliseconds: a role must take the repeats for one request to stop, not for a second signal
    (kill now). (The C++ event loop tells them by the sender's pid: cpp/framework/processor.cpp.)"""
    try:
        import ctypes

        pdeath = ctypes.c_int(0)
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(2, ctypes.byref(pdeath)) == 0 and pdeath.value != 0
    except OSError:  # PR_GET_PDEATHSIG = 2; not Linux
        return False


# The ports free_port has handed out in this process: it does not hand one out twice (they are
# bound later, by the process they are given to).
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1", exclude=()) -> int:
    """A port that nothing listens on now, chosen below the kernel's ephemeral range: a port the
    kernel hands out for bind(0) comes from the range it also gives outgoing connections, so
    between choosing it and binding it a connecting socket (a worker, a ZeroMQ reconnect) could
    take it ("Address already in use" at the bind). Neither a port this process chose before nor
    one of `exclude` (ports named to another process, not bound yet): a port is free until bound,
    and two independent choices met once in a farm test (the collector's on the workers')."""
    lo = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    avoid = _handed_out | set(exclude)
    rng = random.SystemRandom()
    for k in range(200):
        # no luck below the range after 100 tries: the kernel's choice
        port = rng.randrange(10000, lo) if lo > 11000 and k < 100 else 0
        if port in avoid:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in avoid:
            _handed_out.add(port)
            return port
    raise OSError(f"no free TCP port on {host}")


def free_address(host: str = "127.0.0.1", exclude=()) -> str:
    return f"tcp://{host}:{free_port(host, exclude)}"


def address_ports(*addresses) -> set[int]:
    """The TCP ports that ZeroMQ addresses name (tcp://HOST:PORT; other transports name none)."""
    return {int(p) for p in map(tcp_port, addresses) if p is not None and p.isdigit()}


# --collector-restarts counts the restarts within this many seconds: a collector that fails at its start
# (an output folder gone, a full disk) is not restarted in a loop; the exit after them ends the farm.
COLLECTOR_RESTART_WINDOW_S = 60.0


def exit_status(returncode: int) -> str:
    """A child's exit status as `hlt run` prints it: the code, and for a death by a signal (negative, as subprocess
    gives it) the signal's name too, '-9, SIGKILL': -9 alone left the reader to look the number up."""
    if returncode >= 0:
        return str(returncode)
    try:
        return f"{returncode}, {signal.Signals(-returncode).name}"
    except ValueError:  # a real-time signal other than SIGRTMIN/SIGRTMAX has no name
        return str(returncode)


def quarantine_hint(d: dict, names: list[str]) -> str:
    """Where the raw bytes of the events the workers rejected, and of the messages the distributor kept unread at
    terminate, are (the output line counts them only), and how to read them: the quarantine files that exist ('' when
    none was rejected or none is kept)."""
    rejected, unread = (d.get("output") or {}).get("rejected", 0), d.get("unread_kept", 0)
    files = [n for n in names if os.path.isfile(n) and os.path.getsize(n)]
    if not (rejected or unread) or not files:
        return ""
    what = " and the ".join(([f"{rejected} rejected events'"] if rejected else [])
                            + ([f"{unread} unread_at_terminate messages'"] if unread else []))
    return (f"the {what} raw bytes are in {len(files)} quarantine file(s): `eclreco quarantine "
            + " ".join(shlex.quote(f) for f in files) + "` lists them by reason (--extract OUT: a raw file to replay)")


def distributor_quarantine(rejected: str | None, stem: str) -> str:
    """hlt run's distributor's --rejected (its messages unread at terminate), beside the workers' files and never
    one of them: OUTPUT_unread_{pid}.msgpack by default; from a name of your own, {worker} as 'distributor', or
    '_distributor' before its extension; '' (keep none) for ''."""
    if rejected is None:
        return stem + "_unread_{pid}.msgpack"
    if not rejected or "{worker}" in rejected:
        return rejected.replace("{worker}", "distributor")
    root, ext = os.path.splitext(rejected)
    return root + "_distributor" + ext


class Farm:
    def __init__(self, args):
        self.args = args
        self.exe = [sys.executable, "-m", "eclreco.cli", "hlt"]
        # the ports chosen here avoid those the command line names (bound later, by the roles)
        named = address_ports(args.input, args.control, args.workers_addr, args.collector_addr)
        self.workers_addr = args.workers_addr or free_address(exclude=named)
        out = args.output
        stem = "hlt" if out.startswith("tcp://") else os.path.splitext(out.replace("{run_index}", "all"))[0]
        self.distributor_rejected = distributor_quarantine(args.rejected, stem)
        if args.rejected is None:  # default: each worker keeps the raw bytes of what it rejects beside the output
            args.rejected = stem + "_rejected_w{worker}_{pid}.msgpack"  # tcp://: in the working directory
        self.collector_addr = args.collector_addr or free_address(exclude=named)
        base = args.metrics_base_port
        self.mport = (lambda k: base + k) if base > 0 else (lambda k: base)
        self.workers: list[subprocess.Popen | None] = []
        self.quarantine_files: list[str] = []  # the distributor's and each worker's --rejected, {pid} its own (restarts too)
        self.restarts = 0
        self.collector_restarts = 0
        self.collector_restarts_failed = 0  # of them, collectors that exited before they made their output file
        self.collector_restart_times: collections.deque[float] = collections.deque()  # monotonic, of the window
        self.final: dict | None = None
        self.collector_stopped_since: float | None = None  # monotonic: since when the collector is stopped (SIGSTOP)
        self.killed_hung_collector = False
        self.fatal = ""  # why the farm was terminated (a collector exit with no restart left): its last line
        self.terminating = False
        self.curve = Curve.from_args(args, "control")
        # children use their own keys (role names) from the same directory
        self.curve_args = ["--curve-dir", args.curve_dir] if getattr(args, "curve_dir", "") else []

    def popen(self, cmd):
        # Own session: a Ctrl-C on the terminal reaches only the supervisor. Parent-death signal:
        # if the supervisor itself dies (SIGKILL), its roles get SIGTERM (drain and exit) instead
        # of living on as orphans.
        return subprocess.Popen(cmd, start_new_session=True, preexec_fn=_terminate_with_parent)

    def start_worker(self, i: int) -> subprocess.Popen:
        w = self.popen(self.worker_cmd(i))
        if name := self.args.rejected.replace("{worker}", str(i)).replace("{pid}", str(w.pid)):
            if name not in self.quarantine_files:
                self.quarantine_files.append(name)
        return w

    def start_distributor(self):
        a = self.args
        cmd = self.exe + ["distributor", "--input", a.input, "--workers-addr", self.workers_addr, "--control",
                          a.control, "--queue-size", str(a.queue_size), "--max-held", str(a.max_held),
                          "--max-held-bytes", str(a.max_held_bytes),
                          "--chunk", str(a.chunk), "--heartbeat-timeout", str(a.heartbeat_timeout),
                          "--input-hwm", str(a.input_hwm), "--max-queue-bytes", str(a.max_queue_bytes), "--stop-drain", str(a.stop_drain),
                          "--stop-drain-max", str(a.stop_drain_max),
                          "--stop-timeout", str(a.stop_timeout),
                          *self.metrics_args(0),
                          "--max-message-bytes", str(a.max_message_bytes),
                          "--refuse-message-bytes", str(a.refuse_message_bytes), "--cycle-ms", str(a.cycle_ms),
                          "--keep-unread-bytes", str(a.keep_unread_bytes), "--rejected", self.distributor_rejected,
                          "--sched", a.sched, *self.curve_args]
        if a.drop_when_busy:
            cmd.append("--drop-when-busy")
        if a.input_connect:
            cmd.append("--input-connect")
        name = self.distributor_rejected
        if name and "{pid}" not in name:  # this job's records only (the distributor appends)
            try:
                os.remove(name)
            except FileNotFoundError:
                pass
        self.distributor = self.popen(cmd)
        if name := name.replace("{pid}", str(self.distributor.pid)):
            self.quarantine_files.append(name)

    def metrics_args(self, k: int) -> list[str]:
        """Role k's exporter options; --metrics-host only where it has an exporter (a role refuses a --metrics-host
        given with --metrics-port -1)."""
        port = self.mport(k)
        return ["--metrics-port", str(port)] + (["--metrics-host", self.args.metrics_host] if port >= 0 else [])

    def start_collector(self):
        self.collector = self.popen(self.collector_cmd())

    def collector_cmd(self):
        a = self.args
        cmd = self.exe + ["collector", "--collector-addr", self.collector_addr, "--control", a.control, "--output",
                          a.output, *self.metrics_args(1),
                          "--max-latency", str(a.max_latency), "--dedup-window", str(a.dedup_window),
                          "--sched", a.sched, *self.curve_args]
        if not a.output.startswith("tcp://"):  # a ROOT file's (a tcp:// output refuses them)
            cmd += ["--flush-interval", str(a.flush_interval), "--dqm-open-runs", str(a.dqm_open_runs),
                    "--cluster-columns", ",".join(a.cluster_columns)]
        return cmd

    def worker_cmd(self, i: int):
        a = self.args
        cmd = self.exe + ["worker"]
        if a.worker_steering:
            cmd.append(a.worker_steering)
        cmd += ["--distributor", self.workers_addr, "--collector", self.collector_addr, "--threads", str(a.threads),
                "--batch-size", str(a.batch_size), "--modules", a.modules, *self.metrics_args(2 + i),
                "--heartbeat", str(min(0.5, a.heartbeat_timeout / 5)),
                "--max-latency", str(a.max_latency), *self.curve_args]
        if a.no_cnn:
            cmd.append("--no-cnn")
        if a.model:
            cmd += ["--model", os.path.abspath(a.model)]
        if a.conditions:
            cmd += ["--conditions", os.path.abspath(a.conditions)]
        cmd += ["--rejected", a.rejected.replace("{worker}", str(i))]  # '' too: a worker's own default is a file
        cmd += ["--cluster-columns", ",".join(a.cluster_columns)]
        if a.min_clusters or a.min_energy_sum:
            cmd += ["--min-clusters", str(a.min_clusters), "--min-energy-sum", repr(a.min_energy_sum)]
            if a.filter_cluster_energy is not None:
                cmd += ["--filter-cluster-energy", repr(a.filter_cluster_energy)]
        return cmd

    def report(self, sock):
        sock.send_multipart([P.STATUS, P.pack({"role": "supervisor", "pid": os.getpid(), "host": socket.gethostname(),
                                               "state": "terminating" if self.terminating else "running",
                                               "workers": len(self.workers), "workers_restarted": self.restarts,
                                               "collectors_restarted": self.collector_restarts,
                                               "collector_restarts_failed": self.collector_restarts_failed})])

    def restart_collector(self) -> bool:
        """Starts a new collector in place of the one that exited (True), unless --collector-restarts
        restarts were made within the last COLLECTOR_RESTART_WINDOW_S (False: the exit is fatal). The
        distributor kept every event the dead one had not SAVED and gives them to the new one, which
        writes them to a file of its own (a collector never overwrites one: NAME.2.root)."""
        now = time.monotonic()
        recent = self.collector_restart_times
        while recent and now - recent[0] > COLLECTOR_RESTART_WINDOW_S:
            recent.popleft()
        what = f"the collector exited ({exit_status(self.collector.returncode)})"
        if self.killed_hung_collector:
            what = f"the collector, stopped (SIGSTOP) and killed, exited ({exit_status(self.collector.returncode)})"
            self.killed_hung_collector = False
        if not self.collector_made_its_file():
            what += " before it made its output file"
            if self.collector_restarts:  # every collector after the first is a restart
                self.collector_restarts_failed += 1
                what += f" (restart {self.collector_restarts} failed)"
        if len(recent) >= self.args.collector_restarts:
            self.fatal = (f"{what}; {len(recent)} restart(s) within the last {COLLECTOR_RESTART_WINDOW_S:.0f} s "
                          f"(--collector-restarts {self.args.collector_restarts})")
            print(f"[hlt run] {self.fatal}: terminating the farm", file=sys.stderr, flush=True)
            return False
        recent.append(now)
        self.collector_restarts += 1
        print(f"[hlt run] {what}; restart {self.collector_restarts}: the events it had not "
              "saved go to the new one, into a file of its own", file=sys.stderr, flush=True)
        self.start_collector()
        return True

    def kill_hung_collector(self) -> None:
        """A collector stopped by a signal (SIGSTOP) for --heartbeat-timeout seconds reads nothing, confirms
        nothing and will not exit by itself: the workers' results wait for it, and the farm only looked
        alive (hlt status: 'silent'). It is killed, and its exit handled as any other (a restart, if
        --collector-restarts allows, else the farm terminates)."""
        if process_state(self.collector.pid) != "T":  # not 't': a debugger's stop is an operator's
            self.collector_stopped_since = None
            return
        now = time.monotonic()
        if self.collector_stopped_since is None:
            self.collector_stopped_since = now
        elif now - self.collector_stopped_since >= self.args.heartbeat_timeout:
            print(f"[hlt run] the collector {self.collector.pid} is stopped (SIGSTOP) and has not read results for "
                  f"{now - self.collector_stopped_since:.0f} s (--heartbeat-timeout): killing it", file=sys.stderr,
                  flush=True)
            self.collector.kill()
            self.collector.wait()
            self.collector_stopped_since = None
            self.killed_hung_collector = True

    def collector_made_its_file(self) -> bool:
        """Whether the collector that exited had made its output file, as the distributor last heard
        from it: False when it never registered there or its last report said output_made false (a
        failed start: an output folder gone, a crash at its start). No answer: True (not known)."""
        try:
            st = status(self.args.control, timeout_s=2.0, curve=self.curve)
        except ControlError:
            return True
        row = next((p for p in st.get("processes", []) if p.get("role") == "collector"), None)
        return row is not None and row.get("pid") == self.collector.pid and bool(row.get("output_made", True))

    def run(self) -> int:
        a = self.args
        # Before any role starts: a signal while the farm starts killed the supervisor outright (exit -15).
        signals = {"n": 0}

        def on_signal(sig, frame):
            signals["n"] += 1

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        self.start_distributor()
        t0 = time.monotonic()
        while True:  # the control address answers once the distributor is up
            if self.distributor.poll() is not None:
                print("[hlt run] the distributor failed to start", file=sys.stderr, flush=True)
                return 1
            if signals["n"]:
                return self.stop_before_up()
            try:
                status(a.control, timeout_s=1.0, curve=self.curve)
                break
            except ControlError:
                if time.monotonic() - t0 > 60:
                    print("[hlt run] the distributor does not answer", file=sys.stderr, flush=True)
                    self.kill_all()
                    return 1
        if signals["n"]:  # (during the last status request)
            return self.stop_before_up()
        self.start_collector()
        for i in range(a.workers):  # a worker appends (its restarts keep its file): this job's records only
            name = a.rejected.replace("{worker}", str(i))
            if name and "{pid}" not in name:
                try:  # made again at the worker's first rejected event (none: no file, not an empty one)
                    os.remove(name)
                except FileNotFoundError:
                    pass
        self.workers = [self.start_worker(i) for i in range(a.workers)]
        print(f"[hlt run] farm up: input {a.input} control {a.control} workers {a.workers} output {a.output}",
              flush=True)
        ctx = zmq.Context.instance()
        ctl = ctx.socket(zmq.DEALER)
        ctl.setsockopt(zmq.LINGER, 1000)
        if self.curve is not None:
            self.curve.client(ctl, "distributor")
        attach(ctl, a.control, bind=False)
        self.report(ctl)
        handled_signals = 0
        next_report = 0.0
        rc = 0
        while True:
            if signals["n"] > handled_signals:
                handled_signals = signals["n"]
                if handled_signals == 1:
                    print("[hlt run] signal: stop the run, then terminate the farm", flush=True)
                    self.terminating = True
                    ctl.send_multipart([P.TERMINATE])  # the distributor stops the run first
                else:
                    print("[hlt run] second signal: killing the farm", flush=True)
                    self.kill_all()
                    return 1
            self.read_final(ctl)
            if self.distributor.poll() is not None:
                if self.final is None and not self.terminating:
                    # The distributor died (crash, SIGKILL): nobody will say TERMINATE. The workers
                    # finish and send what they hold, then the collector closes its file cleanly.
                    print(f"[hlt run] the distributor exited ({exit_status(self.distributor.returncode)}); stopping the "
                          f"workers and the collector (SIGTERM)", file=sys.stderr, flush=True)
                    rc = 1
                    self.sigterm_rest()
                self.terminating = True
                break
            if self.collector.poll() is None and not self.terminating:
                self.kill_hung_collector()
            if self.collector.poll() is not None and not self.terminating:
                # one that exited on run control's terminate is no death: the distributor's FINAL follows at once
                self.read_final(ctl, 300)
            if self.collector.poll() is not None and not self.terminating:
                restarted = self.restart_collector()
                self.report(ctl)  # its counts (a failed restart's too) before the terminate below
                if not restarted:
                    rc = 1
                    self.terminating = True
                    ctl.send_multipart([P.TERMINATE])
                    # Workers blocked sending results to the dead collector would not read TERMINATE:
                    # SIGTERM makes their ZMQOutput give up (its stop_timeout_s) and them exit; what they
                    # held is counted as lost by the distributor.
                    for w in self.workers:
                        if w is not None and w.poll() is None:
                            w.send_signal(signal.SIGTERM)
            for i, w in enumerate(self.workers):
                if w is not None and w.poll() is not None and not self.terminating:
                    if self.restarts >= a.max_restarts:
                        print(f"[hlt run] worker {w.pid} exited ({exit_status(w.returncode)}); no restarts left",
                              flush=True)
                        self.workers[i] = None
                        continue
                    self.restarts += 1
                    print(f"[hlt run] worker {w.pid} exited ({exit_status(w.returncode)}); restart {self.restarts}",
                          flush=True)
                    self.workers[i] = self.start_worker(i)
                    self.report(ctl)
            if not self.terminating and all(w is None for w in self.workers):
                # Nothing would ever take the input again (e.g. a worker chain that fails at start):
                # the farm must not look alive. TERMINATE as for a dead collector.
                print(f"[hlt run] no worker left ({self.restarts} restarts used, --max-restarts {a.max_restarts}); "
                      f"terminating the farm", file=sys.stderr, flush=True)
                rc = 1
                self.terminating = True
                ctl.send_multipart([P.TERMINATE])
            now = time.monotonic()
            if now >= next_report:
                next_report = now + 1.0
                self.report(ctl)
            time.sleep(0.1)
        self.wait_roles_exit()
        self.read_final(ctl, 200)
        ctl.close(0)
        if self.distributor.returncode not in (0, None):
            rc = 1
        if self.final is not None:
            d = self.final["processes"][0]
            d["workers_restarted"], d["collectors_restarted"] = self.restarts, self.collector_restarts
            d["collector_restarts_failed"] = self.collector_restarts_failed
            print("[hlt run] " + summary_line(d), flush=True)
            print("[hlt run] " + output_line(d), flush=True)
            if hint := quarantine_hint(d, self.quarantine_files):
                print("[hlt run] " + hint, flush=True)
            failure, lost = farm_failure(d), lost_at_stop_text(d)
            if self.fatal:  # the last line says it, with what it cost
                print(f"[hlt run] error: the farm was terminated: {self.fatal}; {lost or 'no event given up'}",
                      file=sys.stderr, flush=True)
            if failure:
                print(f"[hlt run] error: {failure}", file=sys.stderr, flush=True)
                rc = 1
            if lost and not self.fatal:  # (the distributor exited 1 with it; e.g. a signal while the collector hung)
                print(f"[hlt run] error: {lost}", file=sys.stderr, flush=True)
                rc = 1
            if unread := unread_lost_text(d):  # (the distributor exited 1 with it)
                print(f"[hlt run] error: {unread}", file=sys.stderr, flush=True)
                rc = 1
        return rc

    def stop_before_up(self) -> int:
        """A signal before the collector and the workers started: nothing can have been processed, so the
        distributor alone ends (its SIGTERM: a terminate without a farm, which counts and says what it had read
        from a source already sending, exit 1) and nothing else starts."""
        print("[hlt run] signal before the farm was up: stopping the distributor", flush=True)
        self.distributor.send_signal(signal.SIGTERM)
        try:
            self.distributor.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill_all()
        return 0 if self.distributor.returncode in (0, -signal.SIGTERM) else 1

    def read_final(self, ctl, wait_ms: int = 0):
        """Takes what the control socket holds, waiting up to wait_ms for each message: the distributor's
        final status (FINAL, or the OK of a TERMINATE) means that the farm terminates."""
        while ctl.poll(wait_ms):
            frames = ctl.recv_multipart()
            if frames[0] in (P.FINAL, P.OK) and len(frames) > 1:
                body = P.unpack(frames[1])
                if "processes" in body:
                    self.final = body
                    self.terminating = True

    def wait_roles_exit(self, deadline_s: float = 60.0, sigterm_after_s: float = 5.0):
        """The distributor has gone (after terminate): the others follow it. One still there sigterm_after_s
        later gets SIGTERM (a collector started while the farm terminated waits for a distributor that has
        gone: it was killed after the whole deadline_s), and one still there after deadline_s is killed. One
        stopped by a signal (SIGSTOP: an operator, a debugger) can never exit by itself and is killed at once
        (the distributor gave its events to the others when it stopped answering); a wait is said, not silent."""
        t0 = time.monotonic()
        deadline = t0 + deadline_s
        for p in [self.collector, *[w for w in self.workers if w is not None]]:
            name = f"{'the collector' if p is self.collector else 'worker'} {p.pid}"
            signalled = False
            while p.poll() is None:
                left = deadline - time.monotonic()
                why = ("is stopped (SIGSTOP)" if process_state(p.pid) in ("T", "t")
                       else f"did not exit within {deadline_s:.0f} s" if left <= 0 else "")
                if why:
                    print(f"[hlt run] {name} {why}; killing it", flush=True)
                    p.kill()
                    break
                if not signalled and deadline_s - left >= sigterm_after_s:
                    print(f"[hlt run] {name} has not exited {sigterm_after_s:.0f} s after the distributor: SIGTERM "
                          f"(killed in {left:.0f} s)", flush=True)
                    p.send_signal(signal.SIGTERM)
                    signalled = True
                try:
                    p.wait(timeout=min(0.5, max(0.05, left)))
                except subprocess.TimeoutExpired:
                    pass
            p.wait()

    def sigterm_rest(self):
        workers = [w for w in self.workers if w is not None and w.poll() is None]
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self.collector.poll() is None:
            self.collector.send_signal(signal.SIGTERM)

    def kill_all(self):
        for p in [getattr(self, "distributor", None), getattr(self, "collector", None), *self.workers]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, D, T stopped, t traced, Z ...); "" where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return ""


def refuse(message: str) -> NoReturn:
    """A bad option or combination: one line, exit 2, as argparse's own checks (it was exit 1)."""
    print(f"eclreco hlt run: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(args) -> int:
    whole_lines()  # the roles it starts write to its stdout: each one's lines whole (they call it too)
    # single values are range-checked by their argparse types (cli_types); here what needs two
    if why := metrics_host_unused(args, "--metrics-base-port"):
        refuse(why)
    if args.metrics_base_port > 0 and args.metrics_base_port + 1 + args.workers > 65535:
        refuse(f"--metrics-base-port {args.metrics_base_port}: the ports of the collector "
               f"and {args.workers} workers (P+1 .. P+{1 + args.workers}) must stay below 65536")
    if args.metrics_base_port > 0:  # each role would refuse its port; a worker's, restarted, again up to --max-restarts
        from eclreco.metrics import metrics_port_error

        for k in range(2 + args.workers):
            if why := metrics_port_error(args.metrics_base_port + k, args.metrics_host):
                whose = ("the distributor's", "the collector's")[k] if k < 2 else f"worker {k - 2}'s"
                refuse(f"--metrics-base-port {args.metrics_base_port}: port {args.metrics_base_port + k} ({whose}): "
                       f"{why} (0: free ports, -1: no exporters)")
    if args.worker_steering and (why := steering_file_error(args.worker_steering, "--worker-steering")):
        refuse(why)
    if unused := chain_option_unused(args):
        refuse(unused)
    if args.model and not os.path.isfile(args.model):
        refuse(f"--model {args.model!r} is not a file")
    names = module_names(args.modules)
    if names:
        from eclreco.framework import available_modules

        known = available_modules()
        unknown = [n for n in names if n not in known]
        if unknown:
            refuse(f"--modules: unknown module(s) {', '.join(map(repr, unknown))}; "
                   f"available: {', '.join(known)}")
    if args.conditions and not os.path.isfile(args.conditions):
        refuse(f"--conditions {args.conditions!r} is not a file")
    from eclreco.reconstruction import chain_file_error

    if why := chain_file_error(args):  # each worker would fail at its start, and be restarted to fail again
        refuse(why)
    if not args.worker_steering:  # steering/hlt_worker.py's chain (--modules): its cluster columns are known
        import eclreco
        from eclreco.framework import unknown_columns_error
        from eclreco.hlt.worker import add_chosen_reconstruction

        chain = eclreco.create_path()
        add_chosen_reconstruction(chain, args)
        if why := unknown_columns_error(chain.modules, "ECLClusters", args.cluster_columns, "--cluster-columns"):
            refuse(why)  # each worker would refuse it at its start, and be restarted to refuse it again
    from eclreco.hlt.collector import output_error, root_output_options_unused
    from eclreco.paths import output_file_error
    from eclreco.reconstruction import event_filter_option_unused

    if unused := event_filter_option_unused(args):
        refuse(unused)
    if why := output_error(args.output):
        refuse(why)
    if why := root_output_options_unused(args, ("--flush-interval", "--dqm-open-runs")):  # --cluster-columns: workers'
        refuse(why)
    if args.rejected:
        if args.workers > 1 and "{worker}" not in args.rejected and "{pid}" not in args.rejected:
            refuse(f"--rejected {args.rejected!r}: {args.workers} workers would write "
                   "one file; put {worker} (their index) or {pid} in its name")
        if why := output_file_error(args.rejected, "--rejected"):
            refuse(why)
    try:
        check_message_limits("", args.max_message_bytes, args.refuse_message_bytes,
                             ("--max-message-bytes", "--refuse-message-bytes"))
        check_queue_bound("", args.max_queue_bytes, args.refuse_message_bytes,
                          ("--max-queue-bytes", "--refuse-message-bytes"))
    except ValueError as err:
        refuse(str(err))
    # its own key (control), and those the roles it starts take from --curve-dir by their names
    if why := roles_key_options_error(args):
        refuse(why)
    for role in P.CURVE_ROLES:
        own = args if role == "control" else argparse.Namespace(curve_dir=args.curve_dir)
        if why := curve_option_error(own, role, P.curve_servers(role, args)):
            refuse(why)
    # last, after every check of the options: a farm already on the host holds the default addresses, and its
    # "another process listens there" hid the option error the operator had to fix first
    for option, address in (("--input", args.input), ("--control", args.control), ("--workers-addr", args.workers_addr),
                            ("--collector-addr", args.collector_addr)):
        # (their form is checked by the parser: cli_types.ADDRESS) the roles bind them (the input unless
        # --input-connect): one another process holds, or an ipc:// one in a missing folder, the farm's role would
        # refuse at its start (a collector's, after the rest of the farm had started)
        if address and not (option == "--input" and args.input_connect) and (why := bind_error(address)):
            refuse(f"{option} {address!r}: {why}")
    farm = Farm(args)
    try:
        return farm.run()
    except BaseException:
        farm.kill_all()
        raise


def _cpu_and_faults(pid: int) -> tuple[float, int]:
    """User + system CPU seconds and minor page faults of a process (Linux /proc), all its
    threads; zeros when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # fields[0] is field 3 (state) of proc(5)
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])
    except (OSError, IndexError, ValueError):
        return 0.0, 0


def _children(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def benchmark_farm(raw: str, rate: float, seconds: float, workers: int = 2, timeout_s: float = 300.0,
                   modules: str = "standard", farm_args=()) -> dict:
    """Starts `eclreco hlt run` with the worker chain `modules` (hlt run --modules: 'standard' = the
    full reconstruction, 'none' = transport only, or a list), replays `raw` with the DAQ emulator
    at `rate` for about `seconds`, and returns the distributor's throughput and latency figures
    and, per role, the CPU time it spent per event (µs, from /proc: where a node's cores go).
    farm_args: further `eclreco hlt run` options (e.g. ["--max-latency", "5"])."""
    import tempfile

    from eclreco.rawdata import count_messages

    n = int(rate * seconds)
    # whether the replay must loop: counted a message at a time, up to n (the file is not held: at 30 kHz for
    # minutes it is gigabytes); a file that cannot be framed fails here, before the farm starts
    loop = count_messages(raw, n) < n
    tmp, failed = tempfile.mkdtemp(prefix="eclreco-farm-"), False
    addr_in, addr_ctl, addr_w = free_address(), free_address(), free_address()
    exe = [sys.executable, "-m", "eclreco.cli"]
    log = open(os.path.join(tmp, "farm.log"), "w+")
    farm = subprocess.Popen(exe + ["hlt", "run", "--workers", str(workers), "--input", addr_in, "--control", addr_ctl,
                                   "--workers-addr", addr_w, "--output", os.path.join(tmp, "farm.root"),
                                   "--metrics-base-port", "0", "--max-held", str(max(50000, n)), "--modules", modules, *farm_args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        t0 = time.monotonic()
        while True:  # wait for every role (the collector too: its CPU time is read from the pid listed here)
            try:
                st = status(addr_ctl, 2.0)
                roles_up = [p["role"] for p in st["processes"]]
                if roles_up.count("worker") == workers and "collector" in roles_up:
                    break
            except ControlError:
                pass
            if farm.poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError("the farm did not start; log in " + log.name)
            time.sleep(0.3)
        emu = [*exe, "daq-emulator", "--input", raw, "--connect", addr_in, "--rate", str(rate), "--events", str(n)]
        if loop:
            emu.append("--loop")
        roles = {p["pid"]: p["role"] for p in st["processes"] if "pid" in p}
        start = {pid: _cpu_and_faults(pid) for pid in roles}
        t_start = time.monotonic()
        proc = subprocess.Popen(emu, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        emu_cpu, emu_faults = 0.0, 0
        while proc.poll() is None:  # the emulator's CPU time, read while it still exists
            c, f = _cpu_and_faults(proc.pid)
            emu_cpu, emu_faults = max(emu_cpu, c), max(emu_faults, f)
            if time.monotonic() - t_start > timeout_s:
                proc.kill()
            time.sleep(0.05)
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError("daq-emulator failed: " + err[-2000:])
        # the emulator's own figure (its start-up, ~0.5 s of imports, is not sending time)
        import re

        m = re.search(r"sent (\d+) events in ([0-9.]+) s", out)
        offered_s = float(m.group(2)) if m else time.monotonic() - t_start
        while True:
            d = distributor_row(status(addr_ctl, 5.0))
            if d["confirmed"] >= n or time.monotonic() - t_start > timeout_s:
                break
            time.sleep(0.2)
        all_s = time.monotonic() - t_start
        cpu_us = {"daq-emulator (incl. start-up)": emu_cpu / n * 1e6}
        # page faults per event: a role that gives memory back to the kernel and faults it in again
        # shows here (the workers did, 4-5 per event, before eclreco.process kept its freed heap)
        faults = {"daq-emulator (incl. start-up)": emu_faults / n}
        for pid, role in roles.items():
            c, f = _cpu_and_faults(pid)
            cpu_us[role] = cpu_us.get(role, 0.0) + (c - start[pid][0]) / n * 1e6
            faults[role] = faults.get(role, 0.0) + (f - start[pid][1]) / n
        request(addr_ctl, P.TERMINATE, 120.0)
        farm.wait(timeout=120)
        # achieved: confirmed events over the time from the first event read to the last confirmed
        # (the distributor's throughput); wall: the same over the whole measurement incl. start-up
        return {"offered_rate_hz": rate, "events": n, "offered_events_per_s": n / offered_s,
                "confirmed": d["confirmed"], "achieved_events_per_s": d["throughput_hz"],
                "achieved_events_per_s_wall": d["confirmed"] / all_s,
                "latency_p50_ms": d["latency_p50_s"] * 1e3, "latency_p99_ms": d["latency_p99_s"] * 1e3,
                "cpu_us_per_event": cpu_us, "page_faults_per_event": faults,
                "cpu_cores_used": sum(cpu_us.values()) * 1e-6 * n / all_s}
    except BaseException:
        failed = True
        raise
    finally:
        if farm.poll() is None:
            farm.kill()
            farm.wait()
        log.close()
        if not failed:  # the farm's ROOT file (~6 kB/event) goes; after an error, its log stays for the message
            shutil.rmtree(tmp, ignore_errors=True)
