"""Run control client: status, stop, start, terminate, talking to the distributor's control address."""
from __future__ import annotations

import json
import os
import sys
import time

import zmq

from eclreco.curve import Curve, curve_option_error
from eclreco.framework import job_failure
from eclreco.hlt import protocol as P
from eclreco.raw_sockets import attach


class ControlError(RuntimeError):
    pass


def ms(seconds, digits: int = 2) -> str:
    """A latency in ms for the logs and the status table; '-' before the first confirmed event."""
    return "-" if seconds is None or seconds != seconds else f"{seconds * 1e3:.{digits}f} ms"


def unread_note(d: dict) -> str:
    """Where the messages unread at terminate are: ' (kept in FILE)', ' (N kept in FILE, M in no file)'."""
    kept, not_kept = d.get("unread_kept", 0), d.get("unread_not_kept", 0)
    if not (kept or not_kept):
        return ""  # (a status of an earlier version)
    where = f"kept in {d.get('unread_file')}" if kept else ""
    if not not_kept:
        return f" ({where})"
    return f" ({kept} {where}, {not_kept} in no file)" if kept else " (in no file)"


def lost_at_stop_text(d: dict) -> str:
    """The events given up at a stop or terminate (lost_at_stop: no live collector, or a stop that timed out): lost,
    so an exit 1 of the distributor, `hlt run` and `hlt control stop`/`terminate` ('' when none)."""
    n = d.get("lost_at_stop", 0)
    return f"{n} events given up at a stop (lost_at_stop): lost" if n else ""


def unread_lost_text(d: dict) -> str:
    """The messages unread at terminate that are in no file (unread_not_kept: counted, nothing to replay): lost, as
    the events given up at a stop are, so an exit 1 of the distributor, `hlt run` and `hlt control terminate`
    ('' when none)."""
    n = d.get("unread_not_kept", 0)
    return f"{n} messages unread at terminate are in no file (unread_not_kept): lost" if n else ""


def summary_line(d: dict) -> str:
    """The distributor's status in one line (its final log line, and `hlt run`'s)."""
    return (f"{d['confirmed']} events confirmed of {d['received']} received, {d['throughput_hz']:,.0f} events/s, "
            f"latency p50 {ms(d['latency_p50_s'])}, p99 {ms(d['latency_p99_s'])}; redelivered "
            f"{d['redelivered']}, dropped {d['dropped']}, lost at stop {d['lost_at_stop']}"
            + (f" ({d['lost_unsaved']} of them confirmed, not known to be saved)" if d.get("lost_unsaved") else "")
            + (f", unread at terminate {d['unread_at_terminate']}{unread_note(d)}" if d.get("unread_at_terminate") else "")
            + f", workers lost {d['workers_lost']}, restarted {d['workers_restarted']}"
            + (f", collector restarted {d['collectors_restarted']}" if d.get("collectors_restarted") else "")
            + (f" ({d['collector_restarts_failed']} of them failed: no output file made)"
               if d.get("collector_restarts_failed") else ""))


def dqm_command(files: list[str]) -> str:
    """`eclreco dqm F1 F2`: every file holding part of a run (it sums the run's parts across them)."""
    return "`eclreco dqm " + (" ".join(files) or "FILE") + "`"


def dqm_parts_text(entries: list[dict], total: int | None = None, run_files: dict | None = None) -> str:
    """The runs whose DQM a collector wrote in several cycles ({exp, run, parts, file[, run_index]} each): 'run
    (1, 1) written in 2 DQM parts in FILE, ...'; a run's totals are the sum of its parts, which `eclreco dqm` draws
    given every file of the run: run_files (farm run index -> files) names the others of a run in several files."""
    text = ", ".join(f"run ({e['exp']}, {e['run']}) written in {e['parts']} DQM parts"
                     + (f" in {e['file']}" if e.get("file") else "") for e in entries)
    if total is not None and total > len(entries):
        text += f" and {total - len(entries)} more run(s)"
    files: list[str] = []
    for e in entries:
        for f in (run_files or {}).get(e.get("run_index"), []) or [e.get("file")]:
            if f and f not in files:
                files.append(f)
    return text + f" (a run's totals are the sum of its parts: {dqm_command(files)} draws them summed)"


def files_with_dqm(entry: dict) -> list[str]:
    """The files of a run in several files (the distributor's several_files_entry) that hold its DQM."""
    without = entry.get("without_dqm") or []
    return [f for f in entry["files"] if f not in without]


def several_files_text(entry: dict) -> str:
    """'farm run 1's events are in 2 files (`eclreco dqm A B` draws its DQM summed across them)': what to give
    `eclreco dqm` for a run in several collectors' files (several_files_entry), and those that hold no DQM of it."""
    with_dqm, without = files_with_dqm(entry), entry.get("without_dqm") or []
    advice = [f"{dqm_command(with_dqm)} draws its DQM" + (" summed across them" if len(with_dqm) > 1 else "")] \
        if with_dqm else []
    if entry.get("shared_paths"):  # files of one path on several hosts, named HOST:PATH (run_file_names)
        advice.append(f"{', '.join(entry['shared_paths'])}: the path of several collectors' files (HOST:PATH), copy "
                      "them under distinct names for `eclreco dqm`")
    if without:
        advice.append(f"{', '.join(without)}: {'its collector' if len(without) == 1 else 'their collectors'} failed "
                      "or died mid-run, the DQM of the runs open "
                      "then is in no file")
    return f"farm run {entry['run_index']}'s events are in {len(entry['files'])} files ({'; '.join(advice)})"


def leftovers_saved_text(run: int, path: str) -> str:
    """A failed stop's leftovers of `run`, all said SAVED: where they are, and what the next run's input waits for."""
    return (f"the events of run {run} that a failed stop left unsaved are in {path or 'its file'}; the input waits for "
            f"the collector's report of run {run} (or, if it died, for a new collector to register)")


def output_line(d: dict) -> str:
    """What the collector reported at the ends of the runs (the distributor's `output`): the file
    side of the farm, which the confirmations do not show (a confirmed event may have been
    rejected by a worker, failed in a module, or been discarded by a filter)."""
    o = d.get("output") or {}
    line = (f"output: {o.get('events_written', 0)} events written in {o.get('runs', 0)} farm run(s) of "
            f"{o.get('received', 0)} received")
    if o.get("received_before"):  # a collector that outlived the previous distributor counts the whole run
        line += f" ({o['received_before']} of them before this distributor took the collector)"
    runs, empty = o.get("runs", 0), o.get("runs_without_events", 0)
    if empty:  # a START ... STOP without input is a run too (it was left out, and the line said "0 farm run(s)")
        line += ("; the farm run had no events" if runs == empty == 1 else
                 f"; none of the {runs} farm runs had events" if runs == empty else
                 f"; {empty} of the {runs} farm runs had no events")
    # A module error of the chain flags its event, which is written all the same (or discarded by a filter); only
    # the events the collector's output raised on are in no file: written + rejected + those + discarded = received
    # (+ orphaned_lost, below).
    errors, in_output = o.get("errors", 0), o.get("errors_in_outputs", 0)
    notes = []
    if in_output:
        notes.append(f"{in_output} of them in the collector's output: events it raised on, e.g. after its write failed")
    if errors > in_output:
        notes.append(f"{'the others ' if in_output else ''}written with their error flags")
    line += (f"; rejected {o.get('rejected', 0)}, module errors {errors}" + (f" ({'; '.join(notes)})" if notes else "")
             + f", discarded {o.get('discarded', 0)}")
    # (the entry of its collector's list, not its name: another collector's file may have the same name)
    no_events = {(e.get("files"), e.get("index")) for e in o.get("files_without_events", []) if isinstance(e, dict)}

    def named(key: str, why: str) -> str:
        """The files of `key` (a kind of collector), each one its collector saved no event in said so, with `why`:
        it holds no `events` tree, no part of the run."""
        return ", ".join(f + (f" (no events: {why})" if (key, i) in no_events else "")
                         for i, f in enumerate(o.get(key, [])) if f) or "-"

    if o.get("left_collectors"):  # stopped (SIGINT/SIGTERM) in a run that went on: their reports are counted
        files = named("left_files", "stopped before its first write")
        line += (f"; {o.get('written_by_left', 0)} of them by {o['left_collectors']} collector(s) stopped in the "
                 f"middle of a run, in their own file(s): {files}")
    if o.get("failed_collectors"):  # their write failed in the middle of a run: reports of what they saved
        files = named("failed_files", "its first write failed")
        line += (f"; {o.get('written_by_failed', 0)} of them by {o['failed_collectors']} collector(s) whose write "
                 f"failed in the middle of a run, in their own file(s): {files}")
    if o.get("leftovers_collectors"):  # written after the failed stop's reply, which could not name their file
        files = ", ".join(f for f in o.get("leftovers_files", []) if f) or "-"
        line += (f"; {o.get('written_as_leftovers', 0)} of them left unsaved by a failed stop, written after it by "
                 f"{o['leftovers_collectors']} collector(s) to a file of their run: {files}")
    if o.get("replaced_collectors"):
        files = named("replaced_files", "replaced before its first write")
        line += (f"; {o.get('saved_by_replaced', 0)} more saved by {o['replaced_collectors']} replaced "
                 f"collector(s) in their own file(s): {files}")
    if o.get("unreported_collectors"):  # dead or hung at the terminate, not replaced
        files = named("unreported_files", "dead or hung before its first write")
        line += (f"; {o.get('saved_by_unreported', 0)} more saved by {o['unreported_collectors']} collector(s) that "
                 f"did not report the run's end (dead or hung), in their own file(s): {files}")
    if o.get("output_errors"):  # a collector's full disk: what it wrote is in the file named above, kept
        line += f"; {len(o['output_errors'])} collector(s) could not write their file: " + " | ".join(o["output_errors"])
    if o.get("duplicates"):  # not in `received`: dropped before the collector's chain
        line += (f"; duplicates dropped {o['duplicates']} (of them {o.get('repeated_keys', 0)} with the exp/run/evt "
                 f"of an event already taken: a producer's repeat)")
    if o.get("orphaned"):  # in `received` and written: late results of events whose distributor died
        line += (f"; {o['orphaned']} late results of events of a distributor that died written (no distributor "
                 "held them any more)")
    if o.get("orphaned_lost"):  # in `received`, in no file: the collector's write failed before they were in it
        line += (f"; {o['orphaned_lost']} late results of events of a distributor that died lost: a collector's write "
                 "failed before they were in its file, and no distributor held them to hand on")
    split = {}  # farm run index -> the files holding its DQM
    for e in o.get("runs_in_several_files", []):  # a collector replaced mid-run: each file holds part of the run
        split[e["run_index"]] = files_with_dqm(e)
        line += "; " + several_files_text(e)
    if o.get("dqm_runs_in_parts"):  # events of a run that came after its DQM was written (docs/architecture.md)
        line += "; " + dqm_parts_text(o["dqm_runs_in_parts"], o.get("dqm_runs_in_parts_total"), split)
    return line + (f" (first error: {o['first_error']})" if o.get("first_error") else "")


def farm_failure(d: dict) -> str:
    """Why the farm made nothing of its input ('' when it did): reco.py's rule (eclreco.job_failure)
    on what the collector reported (the distributor's `output`; its `received` counts the events the
    workers rejected too)."""
    o = dict(d.get("output") or {})
    if not o.get("received"):
        return ""
    o["processed"] = int(o["received"]) - int(o.get("rejected", 0) or 0)
    return job_failure(o)


def request(control: str, cmd: bytes, timeout_s: float = 10.0, curve=None, waiting=None) -> dict:
    """Send a command to the distributor and wait for its reply (OK body as a dict). waiting (S, CALL): CALL()
    once when no reply came within S s (an operator waiting on a stop is told what for)."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.client(s, "distributor")
    attach(s, control, bind=False)
    try:
        s.send_multipart([cmd])
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if waiting is not None and left > 0 and not s.poll(int(min(left, waiting[0]) * 1000) + 1, zmq.POLLIN):
                waiting[1]()
                waiting = None
                continue
            if left <= 0 or not s.poll(int(left * 1000) + 1, zmq.POLLIN):
                hint = "" if curve is not None else " (is it a farm with CURVE? then pass its --curve-dir)"
                raise ControlError(f"no answer from {control} to {cmd.decode()} within {timeout_s:g} s{hint}")
            frames = s.recv_multipart()
            if frames[0] == P.OK:
                return P.unpack(frames[1]) if len(frames) > 1 else {}
            if frames[0] == P.ERR:
                raise ControlError(frames[1].decode() if len(frames) > 1 else "error")
            # anything else (e.g. a LOW meant for a collector): ignore
    finally:
        s.close(0)


def status(control: str, timeout_s: float = 5.0, curve=None) -> dict:
    return request(control, P.STATUS, timeout_s, curve)


# state: 12 characters, a collector's `reconnecting` (the distributor's status)
COLUMNS = [("role", 12), ("pid", 8), ("host", 14), ("state", 13), ("received", 11), ("processed", 11),
           ("rejected", 10), ("in_flight", 10), ("extra", 40)]


def format_table(st: dict) -> str:
    lines = ["".join(f"{name:>{w - 1}} " if name not in ("role", "host", "state", "extra") else f"{name:<{w - 1}} "
                     for name, w in COLUMNS)]
    lines.append("-" * sum(w for _, w in COLUMNS))
    for p in st.get("processes", []):
        role = p.get("role", "?")
        if role == "distributor":
            received, processed, rejected = p.get("received", 0), p.get("confirmed", 0), "-"
            in_flight = p.get("held", 0)
            extra = (f"workers {p.get('workers_alive', 0)} restarted {p.get('workers_restarted', 0)} "
                     f"p50 {ms(p.get('latency_p50_s'), 1)} p99 {ms(p.get('latency_p99_s'), 1)}")
            if wait := p.get("input_waits"):  # the run reads nothing until the ended run's leftovers are written
                extra += f" input held {wait['waited_s']:.0f} s: " + (
                    leftovers_saved_text(wait["leftovers_of"], wait["saved_in"]) if wait.get("saved_in") is not None
                    else f"{wait['events']} events of run {wait['leftovers_of']} "
                    + ("being written" if wait["collector_writing"] else "wait for a collector to register"))
        elif role == "worker":
            # the run's counts, as the collector's row (events_received: since the worker started)
            received, processed, rejected = p.get("received", 0), p.get("processed", 0), p.get("rejected", 0)
            in_flight = p.get("assigned", 0)
            extra = (f"credit {p.get('credit', 0)} seen {p.get('last_seen_s', 0):.1f}s ago "
                     f"all runs {p.get('events_received', 0)}")
        elif role == "collector":
            received, processed, rejected = p.get("received", 0), p.get("processed", 0), p.get("rejected", 0)
            in_flight = "-"
            # the run's duplicates, as the row's other counts (`duplicates`: the process's life; a collector
            # without `duplicates_run`, an earlier version's, shows that)
            dup = p.get("duplicates_run", p.get("duplicates", 0))
            extra = f"dup {dup} out {os.path.basename(str(p.get('output', '')))}"
            if p.get("dqm_runs_in_parts"):  # [exp, run, parts]: its DQM in several cycles (--json lists them)
                extra += " dqm parts " + " ".join(f"({e},{r})x{n}" for e, r, n in p["dqm_runs_in_parts"][:3])
        else:
            received = processed = rejected = in_flight = "-"
            extra = (f"restarted {p.get('workers_restarted', 0)}"
                     + (f" collector restarted {p['collectors_restarted']}" if p.get("collectors_restarted") else "")
                     + (f" ({p['collector_restarts_failed']} failed)" if p.get("collector_restarts_failed") else ""))
        if role in ("worker", "collector"):  # what the run's modules failed on, or a filter did not keep
            extra += "".join(f" {k} {p[k]}" for k in ("errors", "discarded") if p.get(k))
        row = [role, p.get("pid", "?"), str(p.get("host", ""))[:13], p.get("state", "?"), received, processed,
               rejected, in_flight, extra]
        lines.append("".join(f"{str(v):>{w - 1}} " if name not in ("role", "host", "state", "extra") else f"{str(v):<{w - 1}} "
                             for (name, w), v in zip(COLUMNS, row)))
    return "\n".join(lines)


def status_main(args) -> int:
    if why := curve_option_error(args, "control", P.curve_servers("control", args)):
        raise ValueError(why)  # a bad option: one line, exit 2 (cli.main); a farm that does not answer: 1
    while True:
        try:
            st = status(args.control, timeout_s=args.timeout, curve=Curve.from_args(args, "control"))
        except ControlError as err:
            print(f"eclreco hlt status: {err}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(st, indent=None if args.watch else 2), flush=True)
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            print(time.strftime("%H:%M:%S") + f"  farm at {args.control}")
            print(format_table(st), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


# a stop not answered within this while its input still delivers is said (a quick one stays silent)
STOP_NOTICE_S = 1.0


def distributor_row(st: dict) -> dict:
    """The distributor's row of a farm status ({} without one)."""
    return next((p for p in st.get("processes", []) if p.get("role") == "distributor"), {})


def control_main(args) -> int:
    cmd = {"stop": P.STOP, "start": P.START, "terminate": P.TERMINATE}[args.action]
    if why := curve_option_error(args, "control", P.curve_servers("control", args)):
        raise ValueError(why)
    curve = Curve.from_args(args, "control")
    try:
        # STOP may take minutes (in-flight events are finished): first make sure a farm answers, so
        # that a wrong address or a farm that is not running fails in seconds, not after --timeout.
        status(args.control, timeout_s=min(5.0, args.timeout), curve=curve)

        def still_reading():  # a stop under a source that sends on takes seconds: said, with its bound
            try:
                d = distributor_row(status(args.control, timeout_s=min(5.0, args.timeout), curve=curve))
            except ControlError:
                return  # the stop's own answer (or its time-out) says the rest
            if d.get("draining"):
                print(f"eclreco hlt control: stopping run {d.get('run_index')}: the input still delivers; the farm reads "
                      f"it until it is quiet for {d['stop_drain_s']:g} s (at most {d['stop_drain_max_s']:g} s, "
                      "--stop-drain-max), then finishes the events it holds", file=sys.stderr, flush=True)

        waiting = (STOP_NOTICE_S, still_reading) if args.action == "stop" else None
        reply = request(args.control, cmd, timeout_s=args.timeout, curve=curve, waiting=waiting)
    except ControlError as err:
        print(f"eclreco hlt control: {err}", file=sys.stderr)
        return 1
    print(json.dumps(reply, default=str), flush=True)
    for rec in reply.get("leftovers_written") or ():  # an earlier run's failed stop: where its events went since
        print(f"eclreco hlt control: note: {rec.get('events_written')} events of run {rec.get('run_index')} that a "
              f"failed stop left unsaved were written after it to {rec.get('output') or '-'}", file=sys.stderr)
    error = (reply.get("collector") or {}).get("output_error")
    if error:  # the run's file could not be written at its close: what it keeps, and where the rest goes
        unsaved = reply.get("unsaved") or 0
        print(f"eclreco hlt control: the collector could not write the run's file: {error}"
              + (f"; {unsaved} events of the run are not in it: the distributor holds them for the next collector"
                 if unsaved else ""), file=sys.stderr)
        return 1
    collector = reply.get("collector") or {}
    several = reply.get("in_several_files")
    if several:  # said, the run is fine: its DQM is drawn from all its files together (the output line says so too)
        print("eclreco hlt control: note: " + several_files_text(several), file=sys.stderr)
    if collector.get("dqm_parts"):  # said, the run is fine: late events of a run went to a further DQM cycle
        run = reply.get("run_index")  # (a run in several files: `eclreco dqm` is given those holding its DQM)
        print("eclreco hlt control: note: " + dqm_parts_text(
            [{"exp": e, "run": r, "parts": n, "file": collector.get("filename"), "run_index": run}
             for e, r, n in collector["dqm_parts"]], run_files={run: files_with_dqm(several)} if several else None),
            file=sys.stderr)
    if reply.get("timeout"):  # stopped, but nobody said that the run's file is closed
        print("eclreco hlt control: the run stopped, but the collector did not report its end within 30 s (is it "
              "alive? `hlt status`): its output may not be closed", file=sys.stderr)
        return 1
    final = (reply.get("processes") or [{}])[0]  # terminate's reply: the final status
    if lost := lost_at_stop_text({"lost_at_stop": reply.get("lost_at_stop") or final.get("lost_at_stop")}):
        # the distributor's own exit code says the same
        print(f"eclreco hlt control: {lost} (no live collector, or a stop that timed out)", file=sys.stderr)
        return 1
    if unread := unread_lost_text(final):  # the distributor's own exit code says the same
        print(f"eclreco hlt control: {unread}", file=sys.stderr)
        return 1
    if args.action == "start" and reply.get("already"):
        print(f"eclreco hlt control: run {reply.get('run_index')} was already running", file=sys.stderr)
    if reply.get("leftovers_saved_in") is not None:  # a failed stop's events all in a file: its report is awaited
        print(f"eclreco hlt control: warning: run {reply.get('run_index')} reads no input yet: "
              + leftovers_saved_text(reply["leftovers_of"], reply["leftovers_saved_in"]), file=sys.stderr)
    elif reply.get("leftovers_of") is not None:  # a failed stop's events still to write: the new run waits for them
        print(f"eclreco hlt control: warning: run {reply.get('run_index')} reads no input until the events of run "
              f"{reply['leftovers_of']} that its collector could not write are in a file of that run (the next "
              "collector writes them)", file=sys.stderr)
    if reply.get("collector_alive") is False:
        print("eclreco hlt control: warning: no live collector: the run's events wait at the distributor until one "
              "registers", file=sys.stderr)
    return 0
