"""Faults (issue 9): SIGKILL of the collector and of the distributor, a slow consumer (bounded memory),
a full disk on the output. The worker SIGKILL (no loss) and SIGTERM (valid output) are in test_hlt.py;
an exception inside a module (only that event flagged) is in test_framework.py."""
import contextlib
import glob
import json
import re
import os
import resource
import signal
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import uproot

from helpers import kill_if_running
from hlt_helpers import envelope, push_events, read_quarantine
from test_hlt import ECLRECO, farm_factory, read_evt  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(180)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECO = os.path.join(REPO, "steering", "reco.py")


def test_collector_sigkill_ends_the_farm_promptly(farm_factory):
    """Promise: a dead collector that is not restarted (--collector-restarts 0, or none left) is fatal for
    `hlt run`: it says so, the farm exits with 1 within seconds (no stop timeout of 120 s), and every event is
    accounted for. The workers blocked sending to the dead collector took 10 s (their ZMQOutput's stop_timeout_s)
    to exit after the SIGTERM, and were counted lost by the distributor meanwhile (workers lost 2): they now give
    up at once (give_up_unconnected) and leave with BYE."""
    import re

    farm = farm_factory(heartbeat_timeout=2, workers=2, extra=("--collector-restarts", "0"))
    n = 2000
    push_events(farm.input, range(n))
    farm.wait_confirmed(n)
    collector = farm.process("collector")
    # events keep coming: the workers end up blocked sending results to the dead collector (they
    # then missed TERMINATE, and the farm waited 60 s before killing them)
    import threading

    def feed_until_the_farm_is_gone():
        import zmq

        try:
            push_events(farm.input, range(n, n + 6000), rate_hz=2000, timeout_s=20)
        except zmq.Again:  # the farm exited under the feed (the send timed out): expected, not a thread's error
            pass

    feed = threading.Thread(target=feed_until_the_farm_is_gone, daemon=True)
    feed.start()
    time.sleep(1.0)
    os.kill(collector["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    rc, log = farm.wait_exit(timeout=60)
    elapsed = time.monotonic() - t0
    feed.join(30)
    assert rc == 1, log
    assert "the collector exited (-9, SIGKILL)" in log
    # (the feed goes on ~2 s after the kill, and the stop reads it; the workers' wait alone was 10 s)
    assert elapsed < 8, log
    # the workers leave by themselves at once: none lost (no heartbeat), none SIGTERMed again or killed by hlt run
    # (wait_roles_exit says so). Their BYE is in the log only where it came before the distributor's exit, which
    # does not wait for it: a loaded machine (a worker 1.5 s slow) made that 0 of 2
    assert "no heartbeat" not in log and "has not exited" not in log and "killing it" not in log, log
    assert log.count("left (bye)") <= 2, log
    summary = next(x for x in log.splitlines() if x.startswith("[hlt run] ") and " events confirmed of " in x)
    confirmed, received, lost, unsaved, workers_lost = map(int, re.search(
        r"(\d+) events confirmed of (\d+) received.*lost at stop (\d+)(?: \((\d+) of them confirmed)?.*workers lost (\d+)",
        summary).groups(default="0"))
    assert received == confirmed - unsaved + lost and lost > 0 and workers_lost == 0, summary  # saved + given up
    assert log.rstrip().splitlines()[-1] == (
        "[hlt run] error: the farm was terminated: the collector exited (-9, SIGKILL); 0 restart(s) within the last 60 s "
        f"(--collector-restarts 0); {lost} events given up at a stop (lost_at_stop): lost"), log
    # the dead collector's file, which holds what it saved, is named (the line said "0 events written", no file)
    line = next(x for x in log.splitlines() if x.startswith("[hlt run] output: "))
    m = re.search(r"; (\d+) more saved by 1 collector\(s\) that did not report the run's end \(dead or hung\), in "
                  r"their own file\(s\): (\S+)$", line)
    assert m and m.group(2) == farm.output and confirmed - unsaved <= int(m.group(1)) <= len(read_evt(farm.output)[0]), \
        line
    print(f"\ncollector SIGKILL: farm exited with {rc} after {elapsed:.1f} s")


def signal_the_collector_mid_stream(farm, n: int, sig) -> tuple[int, float]:
    """Events 0..n-1 at 2 kHz; once 300 are in the collector's file (its tree written) and more are taken and not
    saved, `sig` to the collector, in the middle of the stream (results at the workers and in the collector).
    Returns its pid and when the stream began (time.monotonic), once every event is sent."""
    import threading

    from eclreco.hlt.control import status

    first = farm.process("collector")["pid"]
    feed = threading.Thread(target=lambda: push_events(farm.input, range(n), rate_hz=2000, timeout_s=60), daemon=True)
    feed.start()
    t0 = time.monotonic()
    while (d := status(farm.control)["processes"][0])["confirmed"] - d["unsaved"] < 300:  # (the CLI: ~0.5 s a call)
        assert time.monotonic() - t0 < 30, farm.logtext()
        time.sleep(0.02)
    os.kill(first, sig)
    feed.join(60)
    return first, t0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_hlt_run_restarts_a_collector_and_loses_no_event(farm_factory, tmp_path, sig):
    """Promise: `hlt run` restarts a collector that exited (killed, or stopped by SIGTERM) in the middle of a
    stream; the distributor gives the new one every event the dead one had not saved, which it writes to a file
    of its own (farm.2.root: the dead one's farm.root stays). Every event is in the union of the two files,
    exactly once after a SIGTERM (the dead collector closed its file and said SAVED for all it wrote), at least
    once after a SIGKILL; nothing is lost and the farm exits 0. The output line names the dead one's file.
    Before, a collector exit ended the farm: an audit saw 1206 of 5000 events counted lost_at_stop."""
    import glob

    farm = farm_factory(heartbeat_timeout=2, workers=2)
    n = 4000
    first, t0 = signal_the_collector_mid_stream(farm, n, sig)
    while (c := farm.process("collector"))["pid"] == first or c["state"] == "silent":  # the new one registered
        assert time.monotonic() - t0 < 60, farm.logtext()
        time.sleep(0.2)
    farm.wait_confirmed(n)
    final = farm.command("terminate")["processes"][0]
    rc, log = farm.wait_exit()
    assert rc == 0, log
    # SIGTERM: it closed its file and exited 0
    assert f"[hlt run] the collector exited ({'-9, SIGKILL' if sig == signal.SIGKILL else 0}); restart 1" in log, log
    assert final["lost_at_stop"] == 0 and final["collectors_restarted"] == 1, final
    files = sorted(glob.glob(str(tmp_path / "farm*.root")))
    assert files == [str(tmp_path / "farm.2.root"), farm.output], files
    in_file = {f: read_evt(f)[0] for f in files}  # the killed collector's too: uproot files are valid after each write
    assert 0 < len(in_file[farm.output]) < n and len(in_file[files[0]]) > 0, log  # each wrote part of the stream
    evts = np.concatenate(list(in_file.values()))
    assert set(evts.tolist()) == set(range(n)), f"missing {sorted(set(range(n)) - set(evts.tolist()))[:10]}"
    if sig == signal.SIGTERM:
        assert np.array_equal(np.sort(evts), np.arange(n)), log
        assert f"{len(in_file[farm.output])} of them by 1 collector(s) stopped in the middle of a run, in their own " \
               f"file(s): {farm.output}" in log, log
    else:  # the count its last SAVED gave: events written after it are in the file, and produced again
        saved = final["output"]["saved_by_replaced"]
        assert 0 < saved <= len(in_file[farm.output]), final
        assert f"{saved} more saved by 1 replaced collector(s) in their own file(s): {farm.output}" in log, log
    print(f"\ncollector {sig.name}: restarted; {', '.join(f'{len(e)} events in {os.path.basename(f)}' for f, e in in_file.items())}")
    # one file with every event once (deployment.md: the files' union held the events of a SIGKILL twice, and
    # there was no tool to write them once)
    merged = tmp_path / "merged.root"
    r = subprocess.run(ECLRECO + ["hlt", "merge", farm.output, files[0], "-o", str(merged)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert np.array_equal(np.sort(read_evt(merged)[0]), np.arange(n))
    assert f"{n} events written to {merged} from 2 file(s), detector belle2-ecl; {len(evts) - n} duplicate(s) dropped" in r.stdout, r.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_run_in_two_collectors_files_is_named_with_both_for_eclreco_dqm(farm_factory, tmp_path, sig):
    """A collector stopped (SIGTERM) in the middle of a run wrote the run's first events and their DQM to its file,
    its replacement the rest to its own: the output line said how many each wrote, but its `eclreco dqm` advice
    (if any) named one file, whose DQM alone looks like the whole run's. It now names both files in one
    `eclreco dqm` command, which sums the run's DQM across them: the run's events, each once. A killed (SIGKILL)
    collector wrote no DQM of the run: its file is named apart, `eclreco dqm` is given the other (given both, it
    skips the killed one's, saying so)."""
    from eclreco.dqm import by_run, read_files

    farm = farm_factory(heartbeat_timeout=2, workers=2)
    n = 3000
    signal_the_collector_mid_stream(farm, n, sig)
    farm.wait_confirmed(n)
    farm.command("terminate")
    rc, log = farm.wait_exit()
    assert rc == 0, log
    second = str(tmp_path / "farm.2.root")
    line = next(x for x in log.splitlines() if x.startswith("[hlt run] output: "))
    advised = re.search(r"`eclreco dqm ([^`]*)`", line).group(1).split()
    if sig == signal.SIGKILL:
        assert f"; farm run 1's events are in 2 files (`eclreco dqm {second}` draws its DQM; {farm.output}: its " \
               "collector failed or died mid-run, the DQM of the runs open then is in no file)" in line, line
        r = subprocess.run(ECLRECO + ["dqm", second, farm.output, "-o", str(tmp_path / "png")], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and f"warning: {farm.output} has no dqm directory, skipped" in r.stderr, r.stderr
        return
    assert f"; farm run 1's events are in 2 files (`eclreco dqm {farm.output} {second}` draws its DQM summed " \
           "across them)" in line, line
    runs = {h["run"]: h for h in by_run(read_files(advised)) if h["name"] == "digits_per_event"}
    assert list(runs) == [(1, 1)] and runs[(1, 1)]["counts"].sum() == n, runs
    for f in advised:  # each holds part of the run's DQM: neither alone is the run's
        assert 0 < sum(h["counts"].sum() for h in by_run(read_files([f])) if h["name"] == "digits_per_event") < n, f
    r = subprocess.run(ECLRECO + ["dqm", *advised, "-o", str(tmp_path / "png")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and (tmp_path / "png" / "digits_per_event.png").exists(), r.stderr


def fail_the_collectors_write_midway(farm, first: int, n: int, room_bytes: int):
    """Once every event so far is SAVED, a file-size limit on the collector alone, `room_bytes` beyond its file now
    (Python ignores SIGXFSZ: write() fails, EFBIG), while events first..n-1 come at 3 kHz: its write fails in the
    middle of the run. Returns when the restarted collector has registered and the events are sent."""
    import threading

    while farm.distributor()["unsaved"]:  # every one said SAVED
        time.sleep(0.1)
    failing = farm.process("collector")["pid"]
    limit = os.path.getsize(farm.output) + room_bytes
    resource.prlimit(failing, resource.RLIMIT_FSIZE, (limit, limit))
    feed = threading.Thread(target=lambda: push_events(farm.input, range(first, n), rate_hz=3000, timeout_s=60),
                            daemon=True)
    feed.start()
    t0 = time.monotonic()
    while (c := farm.process("collector"))["pid"] == failing or c["state"] == "silent":  # the new one registered
        assert time.monotonic() - t0 < 60, farm.logtext()
        time.sleep(0.2)
    feed.join(60)


def test_a_collector_that_cannot_write_its_file_keeps_its_events_and_the_report_names_them(farm_factory, tmp_path):
    """A collector whose output cannot be written (here a file-size limit set on it alone, EFBIG; a full disk
    gives ENOSPC the same way) in the middle of a stream: its file keeps the events written before the error,
    as farm.root.incomplete, it says SAVED for exactly those and exits 1, `hlt run` restarts it, the new one
    writes the rest (farm.root), and the output line names the kept file, its count and the error; exit 0, no
    event lost. Before, the file was removed with every event it had said SAVED for, which the distributor had
    forgotten: 19877 of 30000 events in no file and counted nowhere, the report naming the new collector's file
    as the dead one's, exit 0."""
    from test_hlt import scrape

    from eclreco.dqm import by_run, read_files

    farm = farm_factory(heartbeat_timeout=2, workers=2)
    push_events(farm.input, range(3000))
    farm.wait_confirmed(3000)
    n = 15_000
    fail_the_collectors_write_midway(farm, 3000, n, room_bytes=50_000)  # ~5000 more events (8 B each)
    farm.wait_confirmed(n)
    metrics = scrape(farm.distributor()["metrics_port"])
    final = farm.command("terminate")["processes"][0]
    rc, log = farm.wait_exit()
    assert rc == 0 and final["lost_at_stop"] == 0, log
    kept = farm.output + ".incomplete"
    assert sorted(glob.glob(str(tmp_path / "farm*.root*"))) == [farm.output, kept], log
    in_kept, in_new = read_evt(kept)[0], read_evt(farm.output)[0]
    assert 3000 < len(in_kept) < n and set(np.concatenate([in_kept, in_new]).tolist()) == set(range(n)), log
    error = (f"cannot write output file '{farm.output}': [Errno 27] File too large; the {len(in_kept)} events "
             f"written before it are kept in '{kept}' (readable, incomplete)")
    assert f"[collector] error: {error}" in log, log
    line = next(x for x in log.splitlines() if x.startswith("[hlt run] output: "))
    # its report counts what the kept file holds (its last SAVED), and the line names that file and why
    assert f"; {len(in_kept)} of them by 1 collector(s) whose write failed in the middle of a run, in their own " \
           f"file(s): {kept}; 1 collector(s) could not write their file: {error}" in line, line
    assert_output_adds_up(line)
    assert "eclreco_hlt_collector_output_errors_total 1.0" in metrics, metrics
    # the advice names the file that holds the run's DQM: the kept file holds none of the run (open at the failure)
    assert f"; farm run 1's events are in 2 files (`eclreco dqm {farm.output}` draws its DQM; {kept}: its " \
           "collector failed or died mid-run, the DQM of the runs open then is in no file)" in line, line
    r = subprocess.run(ECLRECO + ["dqm", kept, "-o", str(tmp_path / "png")], capture_output=True, text=True)
    assert r.returncode == 2 and "has no dqm directory" in r.stderr, r.stderr
    runs = {h["run"]: h for h in by_run(read_files([farm.output])) if h["name"] == "digits_per_event"}
    assert runs[(1, 1)]["counts"].sum() == len(in_new), runs


def test_a_collector_whose_write_fails_in_the_middle_of_a_run_reports_what_it_saved(farm_factory, tmp_path):
    """A collector whose write fails in the middle of a run (not at the stop) sent no RUN_ENDED: the 100 events
    the workers rejected, which it had received and said SAVED before the failure (the distributor forgot them),
    were in no count ("... of 5000 received; rejected 0"). It now reports what it saved, counted as the report
    of a collector that left the run: the line counts every event once and names its kept file, the stop's reply
    lists it."""
    from hlt_helpers import push_messages

    farm = farm_factory(heartbeat_timeout=2, workers=1)
    push_messages(farm.input, [envelope(k) for k in range(1000)] + [b"\xc1"] * 100)  # (100 rejected: not msgpack)
    farm.wait_confirmed(1100)
    n = 6000
    fail_the_collectors_write_midway(farm, 1000, n, room_bytes=20_000)  # ~2000 more events
    farm.wait_confirmed(n + 100)
    reply = farm.command("stop")
    final = farm.command("terminate")["processes"][0]
    rc, log = farm.wait_exit()
    kept = farm.output + ".incomplete"
    assert rc == 0 and final["lost_at_stop"] == 0, log
    in_kept = len(read_evt(kept)[0])
    assert [(r["output"], r["saved"]) for r in reply["replaced_collectors"]] == [(kept, in_kept)], reply
    assert final["output"]["output_errors"] == [reply["replaced_collectors"][0]["error"]], final
    line = next(x for x in log.splitlines() if x.startswith("[hlt run] output: "))
    assert line.startswith(f"[hlt run] output: {n} events written in 1 farm run(s) of {n + 100} received; "
                           "rejected 100,"), line
    assert f"; {in_kept} of them by 1 collector(s) whose write failed in the middle of a run, in their own " \
           f"file(s): {kept}; 1 collector(s) could not write their file: " in line, line
    assert_output_adds_up(line)


def test_a_stop_whose_last_write_fails_names_the_error_and_the_kept_file(farm_factory, tmp_path):
    """The collector's last write of a run (at the stop: the DQM histograms, the metadata) fails (a file-size
    limit here; a full disk the same): `hlt control stop` said that the collector did not report the run's end
    within 30 s (is it alive?), exit 1, and the error and the kept file were only in replaced_collectors, as if
    another collector had written them. The collector's RUN_ENDED now names them: the reply's `collector` has the
    kept file, its count and `output_error`, and the command says the error (exit 1)."""
    import json
    import resource

    farm = farm_factory(heartbeat_timeout=2, workers=1)
    push_events(farm.input, range(3000))
    farm.wait_confirmed(3000)
    t0 = time.monotonic()
    while farm.distributor()["unsaved"]:  # every event in the file: only the close writes more
        assert time.monotonic() - t0 < 30, farm.logtext()
        time.sleep(0.1)
    size = os.path.getsize(farm.output)
    first = farm.process("collector")["pid"]
    resource.prlimit(first, resource.RLIMIT_FSIZE, (size, size))
    r = subprocess.run(ECLRECO + ["hlt", "control", "stop", "--control", farm.control], capture_output=True,
                       text=True, timeout=90)
    reply = json.loads(r.stdout)
    kept = farm.output + ".incomplete"
    error = (f"cannot write output file '{farm.output}': [Errno 27] File too large; the 3000 events written before "
             f"it are kept in '{kept}' (readable, incomplete)")
    assert r.returncode == 1 and not reply["timeout"] and reply["replaced_collectors"] == [], r.stdout
    assert reply["collector"]["filename"] == kept and reply["collector"]["events_written"] == 3000, reply
    assert reply["collector"]["output_error"] == error and reply["unsaved"] == 0, reply
    assert r.stderr == f"eclreco hlt control: the collector could not write the run's file: {error}\n", r.stderr
    assert len(read_evt(kept)[0]) == 3000
    while (c := farm.process("collector"))["pid"] == first or c["state"] == "silent":  # hlt run restarted it
        assert time.monotonic() - t0 < 60, farm.logtext()
        time.sleep(0.2)
    final = farm.command("terminate")["processes"][0]
    rc, log = farm.wait_exit()
    assert final["output"]["output_errors"] == [error] and final["lost_at_stop"] == 0, final
    assert "3000 events written in 1 farm run(s) of 3000 received" in log, log
    assert_output_adds_up(next(x for x in log.splitlines() if x.startswith("[hlt run] output: ")))


def assert_output_adds_up(line: str):
    """The farm's output line counts each event once: written + rejected + module errors in the collector's output
    + discarded (+ late results a failed write lost) = received (those are the events an output raised on, in no
    file; the events a chain's module failed on are written, flagged, and were counted twice)."""
    import re

    m = re.search(r"output: (\d+) events written in \d+ farm run\(s\) of (\d+) received; rejected (\d+), module "
                  r"errors (\d+)(?: \((\d+) of them in the collector's output)?.*?, discarded (\d+)", line)
    assert m, line
    written, received, rejected, errors, in_output, discarded = (int(x or 0) for x in m.groups())
    lost = re.search(r"; (\d+) late results of events of a distributor that died lost", line)
    lost = int(lost.group(1)) if lost else 0
    assert in_output <= errors and written + rejected + in_output + discarded + lost == received, line


FAILING_WORKER = '''
import sys
import numpy as np
import eclreco
from eclreco.hlt.worker import add_chosen_reconstruction, add_worker_arguments, start_worker

class FailOnSome(eclreco.Module):
    """Raises on a batch with an event whose evt ends in 3: re-run event by event, only those fail."""
    def event(self, batch):
        if (np.asarray(batch.evt)[batch.active()] % 10 == 3).any():
            raise RuntimeError("injected failure")

def main():
    import argparse
    ap = argparse.ArgumentParser()
    add_worker_arguments(ap)
    args = ap.parse_args()
    return start_worker(args, lambda path: (add_chosen_reconstruction(path, args), path.add_module(FailOnSome())))

sys.exit(main())
'''


def test_the_output_line_adds_up_when_a_workers_module_fails_on_some_events(farm_factory, tmp_path):
    """A worker's module raises on 20 of 200 events: they are written with their error flags (RootOutput keeps
    every event neither rejected nor discarded), and the output line's "written + rejected + module errors +
    discarded = received" counted them twice (240 of 220). The sum takes the module errors that kept an event
    out of the file (the collector's output's), and the line says that the others are written."""
    import eclreco
    from hlt_helpers import push_messages

    steering = tmp_path / "failing_worker.py"
    steering.write_text(FAILING_WORKER)
    farm = farm_factory(workers=1, extra=("--worker-steering", str(steering)))
    push_messages(farm.input, [envelope(k) for k in range(200)] + [b"\xc1"] * 20)  # (20 rejected: not msgpack)
    farm.wait_confirmed(220)
    farm.command("terminate")
    rc, log = farm.wait_exit()
    with uproot.open(farm.output) as f:
        flags = f["events"]["error_flags"].array(library="np")
    assert len(flags) == 200 and ((flags & eclreco.ERROR_MODULE) != 0).sum() == 20, log
    line = next(x for x in log.splitlines() if x.startswith("[hlt run] output: "))
    assert line.startswith("[hlt run] output: 200 events written in 1 farm run(s) of 220 received; rejected 20, "
                           "module errors 20 (written with their error flags), discarded 0"), line
    assert_output_adds_up(line)


def stop_with_the_collectors_write_failing(farm):
    """`hlt control stop` while the collector's file can grow no more (RLIMIT_FSIZE at its size: its last write
    fails). Returns the collector's pid and the command's result."""
    first = farm.process("collector")["pid"]
    size = os.path.getsize(farm.output)
    resource.prlimit(first, resource.RLIMIT_FSIZE, (size, size))
    return first, subprocess.run(ECLRECO + ["hlt", "control", "stop", "--control", farm.control], capture_output=True,
                                 text=True, timeout=90)


def test_the_events_a_failed_stop_left_unsaved_go_to_a_file_of_their_run(farm_factory, tmp_path):
    """The collector's write at the stop fails with the run's events still unwritten (--flush-interval long: all
    of them): the distributor keeps them for the next collector, which hlt run starts between the runs. It
    joined the next run: it wrote run 1's events to farm_run2.root, a file of a run that never started. It now
    joins run 1 for them and writes them to a file of run 1 (farm.root: the failed one held no event and was
    removed; else farm.2.root beside farm.root.incomplete), is told END_RUN when they are confirmed, and makes
    no file for run 2, which never starts. The failed collector's report counts only what it said SAVED: the
    events it handed on that a worker rejected were counted as rejected by it and by its replacement ("1000
    events written ... of 1050 received; rejected 100")."""
    import glob

    from hlt_helpers import push_messages

    farm = farm_factory(heartbeat_timeout=2, workers=1, extra=("--flush-interval", "600"))
    push_messages(farm.input, [envelope(k) for k in range(1000)] + [b"\xc1"] * 50)  # (50 rejected: not msgpack)
    farm.wait_confirmed(1050)
    first, r = stop_with_the_collectors_write_failing(farm)
    reply = json.loads(r.stdout)
    assert r.returncode == 1 and reply["unsaved"] == 1050 and reply["lost_at_stop"] == 0, r.stdout
    t0 = time.monotonic()
    while farm.distributor()["held"] or farm.process("collector")["pid"] == first:  # all confirmed again
        assert time.monotonic() - t0 < 60, farm.logtext()
        time.sleep(0.2)
    final = farm.command("terminate")["processes"][0]
    rc, log = farm.wait_exit()
    # the failed file held no event and was removed: run 1's file is the new collector's
    assert "it held no event and was removed" in log, log
    assert f"[collector] run 1 ended: 1000 events written to {farm.output}" in log, log
    assert sorted(glob.glob(str(tmp_path / "farm*.root*"))) == [farm.output], log
    assert sorted(read_evt(farm.output)[0].tolist()) == list(range(1000)), log
    assert final["lost_at_stop"] == 0 and final["output"]["runs"] == 1, final
    assert final["output"]["events_written"] == 1000, final
    # each event received once (the failed collector's 1000 were counted again with its replacement's)
    line = next(x for x in log.splitlines() if x.startswith("[hlt run] output: "))
    assert line.startswith("[hlt run] output: 1000 events written in 1 farm run(s) of 1050 received; rejected 50,"), line
    assert_output_adds_up(line)


def test_a_failed_stops_leftovers_file_is_named_by_the_next_stop_and_the_output_line(farm_factory, tmp_path):
    """The stop's last write fails with the run's 500 events unwritten; the next collector writes them to a file of
    run 1 after the stop's reply (which could only say that the distributor holds them). That file was named
    nowhere: its counts were added to the output line, and no stop reply, `hlt control` line or output line said
    where run 1's events are. The next stop's reply lists it (leftovers_written), `hlt control stop` says it, and
    the output line names it."""
    farm = farm_factory(heartbeat_timeout=2, workers=1, extra=("--flush-interval", "600"))
    push_events(farm.input, range(500))
    farm.wait_confirmed(500)
    first, r = stop_with_the_collectors_write_failing(farm)
    assert r.returncode == 1 and json.loads(r.stdout)["unsaved"] == 500, r.stdout + r.stderr
    farm.command("start")  # run 2 reads its input once run 1's events are in their file
    push_events(farm.input, range(500, 600))
    t0 = time.monotonic()
    while (d := farm.distributor())["confirmed"] < 600 or d["held"]:  # (run 2's: unsaved until the stop)
        assert time.monotonic() - t0 < 60, farm.logtext()
        time.sleep(0.2)
    r = subprocess.run(ECLRECO + ["hlt", "control", "stop", "--control", farm.control], capture_output=True,
                       text=True, timeout=90)
    reply = json.loads(r.stdout)
    assert r.returncode == 0 and reply["run_index"] == 2, r.stdout + r.stderr
    [rec] = reply["leftovers_written"]
    leftovers = rec["output"]
    assert rec["run_index"] == 1 and rec["events_written"] == 500 and leftovers.startswith(str(tmp_path)), reply
    assert sorted(read_evt(leftovers)[0].tolist()) == list(range(500)), leftovers
    assert (f"eclreco hlt control: note: 500 events of run 1 that a failed stop left unsaved were written after it "
            f"to {leftovers}\n") in r.stderr, r.stderr
    farm.command("terminate")
    rc, log = farm.wait_exit()
    assert rc == 0, log
    line = next(x for x in log.splitlines() if x.startswith("[hlt run] output: "))
    assert line.startswith("[hlt run] output: 600 events written in 2 farm run(s) of 600 received;"), line
    assert (f"; 500 of them left unsaved by a failed stop, written after it by 1 collector(s) to a file of their run: "
            f"{leftovers}") in line, line
    assert_output_adds_up(line)


def test_a_collector_restarted_between_runs_makes_no_file_for_a_run_that_never_starts(farm_factory, tmp_path):
    """A collector that registers while the farm is stopped (hlt run restarted it after a crash between the runs)
    made its file of the next run at once: an empty farm_run2.root stayed when the farm then terminated. The
    distributor's answer to its HELLO now says that the run has not started, and the file is made at its first
    result, as between the runs of one collector."""
    import glob

    farm = farm_factory(heartbeat_timeout=2, workers=1)
    push_events(farm.input, range(200))
    farm.wait_confirmed(200)
    farm.command("stop")
    first = farm.process("collector")["pid"]
    os.kill(first, signal.SIGKILL)
    t0 = time.monotonic()
    while not ((c := farm.process("collector"))["pid"] != first and c["state"] != "silent"):  # restarted, registered
        assert time.monotonic() - t0 < 60, farm.logtext()
        time.sleep(0.2)
    time.sleep(1.0)  # (where it made its file, it did within this)
    assert not (c := farm.process("collector"))["output_made"], c
    farm.command("terminate")
    rc, log = farm.wait_exit()
    assert sorted(glob.glob(str(tmp_path / "farm*.root*"))) == [farm.output], log
    assert len(read_evt(farm.output)[0]) == 200


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_hlt_run_kills_and_restarts_a_hung_collector(farm_factory, tmp_path, transport):
    """A collector stopped by SIGSTOP (hung: it reads no result, confirms nothing and never exits) left the farm
    looking alive: no word from `hlt run`, the collector 'silent' in hlt status, the events held until --max-held
    and then the input blocked, for ever; a terminate then gave up every held event (lost_at_stop) and the file of
    the stopped collector was named nowhere. `hlt run` now says that the collector is stopped, kills it after
    --heartbeat-timeout (2 s here) and restarts it: every event is in the union of the files, no worker is
    counted lost, the farm exits 0."""
    import glob
    import threading

    # over ipc:// the workers' sends block sooner than over TCP (a unix socket buffers less)
    addr = ("--collector-addr", f"ipc://{tmp_path}/collector.ipc") if transport == "ipc" else ()
    farm = farm_factory(heartbeat_timeout=2, workers=2, extra=("--collector-restarts", "1", *addr))
    push_events(farm.input, range(2000))
    farm.wait_confirmed(2000)
    # stopped before the feed, so that its events come while it hangs (stopped 0.5 s into the feed, it had
    # confirmed the whole feed first where the status request that gave its pid was slow: a flaky test)
    pid = farm.process("collector")["pid"]
    os.kill(pid, signal.SIGSTOP)
    feed = threading.Thread(target=lambda: push_events(farm.input, range(2000, 10000), rate_hz=4000, timeout_s=30),
                            daemon=True)
    feed.start()
    try:
        feed.join(40)
        farm.wait_confirmed(10000, timeout=30)
        final = farm.command("terminate")["processes"][0]
        rc, log = farm.wait_exit()
    finally:  # (not killed: the parent-death SIGTERM of the farm's close must reach it)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert rc == 0, log
    assert f"[hlt run] the collector {pid} is stopped (SIGSTOP) and has not read results for 2 s " \
           "(--heartbeat-timeout): killing it" in log, log
    assert "[hlt run] the collector, stopped (SIGSTOP) and killed, exited (-9, SIGKILL); restart 1:" in log, log
    assert final["lost_at_stop"] == 0 and final["workers_lost"] == 0 and final["collectors_restarted"] == 1, final
    files = sorted(glob.glob(str(tmp_path / "farm*.root")))
    assert files == [str(tmp_path / "farm.2.root"), farm.output], files
    evts = np.concatenate([read_evt(f)[0] for f in files])
    assert set(evts.tolist()) == set(range(10000)), log


def test_a_collector_restarted_in_run_2_names_its_file_after_run_2(farm_factory, tmp_path):
    """A collector started while the farm is in run N counted its runs from 1: restarted in run 2 it wrote that
    run's events to farm.2.root (named as a second file of run 1, farm.root being there) beside the dead one's
    farm_run2.root. The distributor's answer to its HELLO now gives the run it joins: farm_run2.2.root."""
    from eclreco.hlt.control import output_line

    farm = farm_factory(heartbeat_timeout=2, workers=1)
    push_events(farm.input, range(200))
    farm.wait_confirmed(200)
    farm.command("stop")
    farm.command("start")
    push_events(farm.input, range(200, 400))
    farm.wait_confirmed(400)
    t0 = time.monotonic()
    while farm.distributor()["unsaved"]:  # its file holds them (a tree to read)
        assert time.monotonic() - t0 < 60, farm.logtext()
        time.sleep(0.1)
    first = farm.process("collector")["pid"]
    os.kill(first, signal.SIGKILL)
    t0 = time.monotonic()
    # (the new one is registered once the old one's reconnect grace is over, and names its file in the report after
    # the distributor's answer: a row of its pid may say no file for a moment)
    while (c := farm.process("collector"))["pid"] == first or c["state"] == "silent" or not c.get("output"):
        assert time.monotonic() - t0 < 60, farm.logtext()
        time.sleep(0.2)
    assert c["run_index"] == 2 and c["output"] == str(tmp_path / "farm_run2.2.root"), c
    push_events(farm.input, range(400, 600))
    farm.wait_confirmed(600)
    reply = farm.command("stop")
    assert reply["collector"]["filename"] == str(tmp_path / "farm_run2.2.root"), reply
    assert [r["output"] for r in reply["replaced_collectors"]] == [str(tmp_path / "farm_run2.root")], reply
    line = output_line(farm.command("terminate")["processes"][0])
    assert f"replaced collector(s) in their own file(s): {tmp_path / 'farm_run2.root'}" in line, line
    assert farm.wait_exit()[0] == 0, farm.logtext()
    assert sorted(os.listdir(tmp_path)) == ["farm.log", "farm.root", "farm_run2.2.root", "farm_run2.root"]
    assert np.array_equal(np.sort(read_evt(tmp_path / "farm.root")[0]), np.arange(200))
    run2 = np.concatenate([read_evt(tmp_path / f)[0] for f in ("farm_run2.root", "farm_run2.2.root")])
    assert set(run2.tolist()) == set(range(200, 600))


def test_hlt_run_does_not_restart_a_failing_collector_in_a_loop(farm_factory, tmp_path):
    """Promise: collector restarts are bounded (--collector-restarts within a minute): a collector that fails at
    its start (here its output folder is gone: exit 2) is restarted that many times, then its exit ends the farm
    (exit 1)."""
    import shutil

    out = tmp_path / "out"
    out.mkdir()
    farm = farm_factory(heartbeat_timeout=2, workers=1, output=out / "farm.root", extra=("--collector-restarts", "2"))
    push_events(farm.input, range(100))
    farm.wait_confirmed(100)
    shutil.rmtree(out)
    os.kill(farm.process("collector")["pid"], signal.SIGKILL)
    rc, log = farm.wait_exit(timeout=90)
    assert rc == 1, log
    assert "[hlt run] the collector exited (-9, SIGKILL); restart 1" in log, log
    assert "restart 2" in log and "restart 3" not in log, log
    assert "[hlt run] the collector exited (2) before it made its output file (restart 2 failed); 2 restart(s) " \
           "within the last 60 s (--collector-restarts 2): terminating the farm" in log, log


def test_a_failed_collector_restart_names_no_file_and_is_reported_as_failed(farm_factory, tmp_path):
    """A restarted collector that cannot make its file (here its output folder was moved away after the first
    collector made farm.root there: exit 2) was listed in the report as a replaced collector with that file, which
    was never made (replaced_files named it, saved 0), and counted as a plain restart. Now the report names only
    the killed collector's file, which holds what it saved; both restarts are reported as failed (the supervisor's
    lines, the distributor's and its final status) and count against --collector-restarts. (It used a dangling
    symlink at the next name, farm.2.root, which the restart followed: now the name is taken by creating it, O_EXCL,
    and a symlink there is skipped.)"""
    import re

    out = tmp_path / "out"
    out.mkdir()
    farm = farm_factory(heartbeat_timeout=2, workers=1, extra=("--collector-restarts", "2"), output=out / "farm.root")
    push_events(farm.input, range(300))
    farm.wait_confirmed(300)
    t0 = time.monotonic()
    while farm.distributor()["unsaved"]:  # all 300 in farm.root
        assert time.monotonic() - t0 < 60, farm.logtext()
        time.sleep(0.1)
    out.rename(tmp_path / "moved")  # (the killed collector's open file moves with it)
    os.kill(farm.process("collector")["pid"], signal.SIGKILL)
    rc, log = farm.wait_exit(timeout=90)
    assert rc == 1, log
    assert "[hlt run] the collector exited (-9, SIGKILL); restart 1:" in log, log
    assert "[hlt run] the collector exited (2) before it made its output file (restart 1 failed); restart 2:" in log
    assert "[hlt run] the collector exited (2) before it made its output file (restart 2 failed); 2 restart(s)" in log
    for who in (r"\[distributor\] terminated: ", r"\[hlt run\] 300 events"):  # the summary lines
        assert re.search(who + r".*collector restarted 2 \(2 of them failed: no output file made\)", log), log
    line = next(x for x in log.splitlines() if x.startswith("[hlt run] output: "))
    # (no restart registered: the killed one is named as the collector that did not report the run's end)
    assert line.endswith("; 300 more saved by 1 collector(s) that did not report the run's end (dead or hung), in "
                         f"their own file(s): {farm.output}"), line
    assert len(read_evt(tmp_path / "moved" / "farm.root")[0]) == 300 and not out.exists(), log


def test_distributor_sigkill_workers_and_collector_close_cleanly(farm_factory):
    """Promise: when the distributor dies, `hlt run` stops the workers and the collector with SIGTERM:
    the output file is valid and holds every event confirmed before the kill; the farm exits with 1."""
    farm = farm_factory(heartbeat_timeout=2, workers=2)
    n = 2500
    push_events(farm.input, range(n))
    farm.wait_confirmed(n)
    d = farm.distributor()
    os.kill(d["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    rc, log = farm.wait_exit(timeout=90)
    elapsed = time.monotonic() - t0
    assert rc == 1, log
    assert "the distributor exited (-9, SIGKILL)" in log
    evt, _ = read_evt(farm.output)  # readable: the collector closed it
    assert np.array_equal(np.sort(evt), np.arange(n)), log
    print(f"\ndistributor SIGKILL: farm exited with {rc} after {elapsed:.1f} s, {len(evt)} events in the file")


def test_supervisor_sigkill_roles_drain_once(farm_factory):
    """Promise: when `hlt run` itself is killed, its roles get SIGTERM (parent-death signal), drain and
    exit. The kernel repeats that signal each time it reparents a role while the supervisor's threads
    exit; the roles took the repeat for a second signal and died at once (distributor: no final line,
    its held events not counted; collector: a ROOT file without keys)."""
    farm = farm_factory(heartbeat_timeout=2, workers=1)
    n = 3000
    push_events(farm.input, range(n))
    farm.wait_confirmed(n)
    pids = {p["role"]: p["pid"] for p in farm.status()["processes"] if p["role"] in ("distributor", "collector")}
    os.kill(farm.proc.pid, signal.SIGKILL)
    farm.proc.wait(timeout=10)
    t0 = time.monotonic()
    while any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
              for pid in pids.values()):
        assert time.monotonic() - t0 < 60, farm.logtext()
        time.sleep(0.2)
    log = farm.logtext()
    assert "[distributor] terminated: 3000 events confirmed of 3000 received" in log, log
    assert "[collector] run 1 ended: 3000 events written" in log, log
    evt, _ = read_evt(farm.output)
    assert np.array_equal(np.sort(evt), np.arange(n)), log


SLOW_WORKER = '''
import sys, time
import eclreco
from eclreco.hlt.worker import add_worker_arguments, start_worker

class Sleep(eclreco.Module):
    """A deliberately slow consumer: {ms} ms per batch."""
    def event(self, batch):
        time.sleep({ms} / 1000)

def main():
    import argparse
    ap = argparse.ArgumentParser()
    add_worker_arguments(ap)
    args = ap.parse_args()
    return start_worker(args, lambda path: path.add_module(Sleep()))

sys.exit(main())
'''


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.mark.timeout(240)
def test_slow_consumer_keeps_distributor_memory_bounded(farm_factory, tmp_path):
    """A worker chain that sleeps 50 ms per batch of <= 64 events (~1 kHz) while the DAQ emulator
    offers as fast as it can (looping a file): the distributor's RSS plateaus (backpressure)."""
    from eclreco.rawdata import write_raw_file

    steering = tmp_path / "slow_worker.py"
    steering.write_text(SLOW_WORKER.replace("{ms}", "50"))
    raw = tmp_path / "run.msgpack"
    write_raw_file(raw, (envelope(e) for e in range(5000)))
    farm = farm_factory(heartbeat_timeout=2, workers=1, extra=("--worker-steering", str(steering), "--batch-size", "64",
                                          "--max-held", "5000", "--queue-size", "2000"))
    pid = farm.distributor()["pid"]
    daq = subprocess.Popen(ECLRECO + ["daq-emulator", "--input", str(raw), "--connect", farm.input, "--loop"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    samples = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 24:
            samples.append((time.monotonic() - t0, rss_kb(pid)))
            time.sleep(0.5)
        d = farm.distributor()
    finally:
        kill_if_running(daq)
    rss = np.array([s[1] for s in samples]) / 1024
    first, second = rss[: len(rss) // 2].max(), rss[len(rss) // 2:].max()
    print(f"\nslow consumer: distributor RSS peak {rss.max():.1f} MiB (first half {first:.1f}, second half "
          f"{second:.1f}); received {d['received']}, confirmed {d['confirmed']}, held {d['held']}")
    assert d["held"] <= 5000 and d["confirmed"] > 0
    assert d["received"] <= d["confirmed"] + 5000 + 2000  # read ahead is bounded; the rest waits at the sender
    assert second <= first * 1.10 + 5, rss.tolist()  # plateau: no growth in the second half


# ------------------------------------------------------------------ full disk
def _limit_fsize(limit):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.fixture(params=["rlimit_fsize", "tmpfs"])
def small_disk(request, tmp_path):
    """(output dir, preexec_fn): a 500 kB file size limit (EFBIG), or a 500 kB tmpfs (ENOSPC, root only): room
    for RootOutput's first basket of the test's events (~360 kB), not for the second."""
    if request.param == "rlimit_fsize":
        yield str(tmp_path), _limit_fsize(500_000), "File too large"
        return
    d = tmp_path / "tmpfs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=500k", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (not root?): {r.stderr.strip()}")
    try:
        yield str(d), None, "No space left on device"
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_full_disk_on_output_clear_error_no_corrupt_file(tmp_path, small_disk):
    """A full disk under reco.py: exit 1, one clear line, never a truncated file under the output's name, and
    the events written before the error kept, readable, in OUT.incomplete (the line says how many and where).
    Before, the file was removed, with every event in it (a stream's exist nowhere else)."""
    import re

    out_dir, preexec, errtext = small_disk
    raw = tmp_path / "in.msgpack"
    from eclreco.rawdata import write_raw_file

    write_raw_file(raw, (envelope(e) for e in range(40_000)))  # ~4 MB of output at least
    out = os.path.join(out_dir, "out.root")
    r = subprocess.run([sys.executable, RECO, "-i", str(raw), "-o", out, "--threads", "1", "--no-cnn",
                        "--no-dqm", "--progress", "0"], capture_output=True, text=True, timeout=150,
                       preexec_fn=preexec, cwd=str(tmp_path))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"cannot write output file '{out}'" in r.stderr and errtext in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    m = re.search(r"the (\d+) events written before it are kept in '([^']+)' \(readable, incomplete\)", r.stderr)
    assert not os.path.exists(out) and m and m.group(2) == out + ".incomplete", r.stderr
    # every event written before the error, in input order (one thread), readable
    assert np.array_equal(read_evt(m.group(2))[0], np.arange(int(m.group(1)))) and int(m.group(1)) > 0, r.stderr
    # the summary says where the processed events are: in the file, lost with it (taken into its buffer when it
    # failed), or module errors (the output raised on them). The lost ones counted as processed, said nowhere.
    assert _output_accounting(r.stdout) == int(m.group(1)), r.stdout[-800:]


def _output_accounting(stdout: str) -> int:
    """Checks reco.py's summary after its RootOutput failed: processed = in its file + lost with it + module errors,
    some lost; returns the events in the file."""
    import re

    processed, errors = map(int, re.search(r"events received \d+, processed (\d+), rejected 0, with module errors (\d+)",
                                           stdout).groups())
    lost, written = map(int, re.search(r"  lost with the failed output RootOutput: (\d+) processed events that it had "
                                       r"taken are in no file \((\d+) events are in its file\)", stdout).groups())
    assert lost > 0 and processed == written + lost + errors, (processed, written, lost, errors)
    return written


def test_a_stream_job_whose_output_fails_reads_its_input_no_more(tmp_path):
    """reco.py -i tcp:// whose ROOT output cannot be written (RLIMIT_FSIZE 500 kB): the job ends at once, exit 1,
    and the messages still queued at its input are counted as not processed (unread_at_end, said), not read into
    a chain that can keep nothing. Before, the stop's drain (meant for SIGINT/SIGTERM) read on for up to 10 s:
    every message the sender had (18240 of 40000) was processed into no file, flagged as module errors."""
    import re
    import threading

    import zmq

    from hlt_helpers import free_address

    address = free_address()
    proc = subprocess.Popen([sys.executable, RECO, "-i", address, "--idle-timeout", "3", "-o", str(tmp_path / "o.root"),
                             "--threads", "1", "--no-cnn", "--no-dqm", "--progress", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_limit_fsize(500_000), cwd=str(tmp_path))
    sent = [0]

    def feed():
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.SNDTIMEO, 3000)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(address)
        try:
            for e in range(40_000):
                push.send(envelope(e))
                sent[0] += 1
        except zmq.Again:  # the job has gone: what is left stays here
            pass
        push.close()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    out, err = proc.communicate(timeout=120)
    feeder.join(30)
    assert proc.returncode == 1 and "cannot write output file" in err, out + err[-3000:]
    received, errors = map(int, re.search(r"events received (\d+), processed \d+, rejected 0, with module errors (\d+)",
                                          out).groups())
    m = re.search(r"ZMQInput: warning: (\d+) messages were still queued at the input when the run ended and were not "
                  r"processed \(an output could not write, which ended the run\)", err)
    assert m and received + int(m.group(1)) <= sent[0], (sent, out[-500:], err[-2000:])
    assert errors <= 512, out[-500:]  # the batches in flight when the write failed (batch size 256), no more
    # the stream's events are nowhere else: the summary says how many are in the kept file, how many were lost
    kept = re.search(r"the (\d+) events written before it are kept in '[^']+\.incomplete'", err)
    assert kept and _output_accounting(out) == int(kept.group(1)), out[-800:]


def test_an_output_that_cannot_be_created_leaves_no_file(tmp_path):
    """A disk too full for the ROOT file's header: reco.py fails at the start with 'cannot create output file',
    exit 1, and leaves no file. Before, an empty file stayed under the output's name, unreadable ('not a ROOT
    file'); in the farm each failed collector restart left one more (farm.root, farm.2.root, farm.3.root)."""
    raw = tmp_path / "in.msgpack"
    from eclreco.rawdata import write_raw_file

    write_raw_file(raw, (envelope(e) for e in range(100)))
    out = tmp_path / "out.root"
    r = subprocess.run([sys.executable, RECO, "-i", str(raw), "-o", str(out), "--threads", "1", "--no-cnn", "--no-dqm",
                        "--progress", "0"], capture_output=True, text=True, timeout=150, preexec_fn=_limit_fsize(200))
    assert r.returncode == 1 and f"cannot create output file '{out}': [Errno 27] File too large" in r.stderr, r.stderr
    assert not out.exists()


def test_full_disk_on_quarantine_keeps_complete_records(tmp_path):
    """The quarantine file under a size limit: clear error, exit 1, only complete records left. The
    good events of the batch on which the write failed are no module errors: only the rejected events
    whose record could not be kept are (every event of the batch was, through the event-by-event re-run)."""
    from eclreco.rawdata import encode_events, write_raw_file

    raw = tmp_path / "in.msgpack"
    bad = msgpack.packb({"v": 2, "pad": b"x" * 1000})  # bad_version, ~1 kB each
    good = encode_events("array30", 0, 1, np.arange(3000), np.zeros(3001, int), [], [], [], [])
    write_raw_file(raw, [e for pair in zip(good, [bad] * 3000) for e in pair])  # good, bad, good, bad, ...
    q = tmp_path / "bad.msgpack"
    r = subprocess.run([sys.executable, RECO, "-i", str(raw), "--rejected", str(q), "--threads", "1",
                        "--no-cnn", "--no-dqm", "--progress", "0", "--batch-size", "100"],
                       capture_output=True, text=True, timeout=150, preexec_fn=_limit_fsize(300_000))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"cannot write quarantine file '{q}'" in r.stderr, r.stderr
    recs = read_quarantine(q)
    assert 0 < len(recs) < 3000 and all(rec["reason"] == "bad_version" for rec in recs)
    assert "with module errors 50;" in r.stdout, r.stdout  # the 50 rejected events of that batch of 100


class SeparateRoles:
    """The farm's roles as separate services (as on several hosts): distributor, collectors and
    workers started, killed and restarted one by one."""

    def __init__(self, tmp_path):
        from hlt_helpers import free_address

        self.tmp = tmp_path
        self.inp, self.wrk, self.ctl, self.col = free_address(), free_address(), free_address(), free_address()
        self.procs = []

    def start(self, *args, log, cwd=None):
        # in the test's folder: what a worker keeps by default (rejected_{pid}.msgpack) goes there
        p = subprocess.Popen(ECLRECO + ["hlt", *args], stdout=open(self.tmp / log, "w"), stderr=subprocess.STDOUT,
                             cwd=cwd or self.tmp)
        self.procs.append(p)
        return p

    def distributor(self, *extra, log="distributor.log"):
        return self.start("distributor", "--input", self.inp, "--workers-addr", self.wrk, "--control", self.ctl,
                          "--metrics-port", "-1", *extra, log=log)

    def collector(self, output, log, *extra, address=None):
        """A collector on the farm's results address (the workers send there), or on `address`."""
        return self.start("collector", "--collector-addr", address or self.col, "--control", self.ctl,
                          "--metrics-port", "-1", "-o", str(output), *extra, log=log)

    def worker(self, *extra, log="worker.log", cwd=None):
        from test_hlt import worker_modules

        return self.start("worker", "--distributor", self.wrk, "--collector", self.col, "--modules", worker_modules(),
                          "--metrics-port", "-1", *extra, log=log, cwd=cwd)

    def status(self):
        from eclreco.hlt.control import status

        return status(self.ctl)["processes"]

    def dist(self):
        return next(p for p in self.status() if p["role"] == "distributor")

    def wait_up(self, roles=("distributor", "collector", "worker")):
        from eclreco.hlt.control import status

        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            try:
                if {p["role"] for p in status(self.ctl, 2.0)["processes"]} >= set(roles):
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.2)
        raise AssertionError("the roles did not register: " + (self.tmp / "distributor.log").read_text())

    def wait_confirmed(self, n, timeout=60):
        t0 = time.monotonic()
        while (d := self.dist())["confirmed"] < n:
            assert time.monotonic() - t0 < timeout, d
            time.sleep(0.1)
        return d

    def close(self):
        kill_if_running(*self.procs)


@pytest.fixture
def roles(tmp_path):
    r = SeparateRoles(tmp_path)
    yield r
    r.close()


def test_replaced_collector_gets_the_events_the_killed_one_had_not_saved(tmp_path, roles):
    """Promise: an event leaves the distributor only when the collector has it in its FILE (SAVED),
    not when the collector has merely taken it (CONFIRM; RootOutput buffers up to --flush-interval).
    Roles run as separate services; collector A is SIGKILLed with confirmed but unwritten results;
    collector B takes its place: every event is in a.root (readable: uproot files are valid after
    each write) or b.root. Before SAVED, the events of A's unwritten buffer were lost."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import request

    n = 3000
    roles.distributor()
    a = roles.collector(tmp_path / "a.root", "a.log", "--flush-interval", "60")
    roles.worker()
    roles.wait_up()
    push_events(roles.inp, range(n // 2))
    d = roles.wait_confirmed(n // 2)
    # A has taken every event but written none of them (flush interval 60 s): all unsaved
    assert d["unsaved"] == n // 2 and d["held"] == 0, d
    a.kill()
    a.wait()
    roles.collector(tmp_path / "b.root", "b.log", "--flush-interval", "60")
    push_events(roles.inp, range(n // 2, n))
    d = roles.wait_confirmed(n)
    assert d["redelivered"] >= n // 2, d
    assert d["confirmed"] == d["received"] == n, d  # A's confirmations of what it never saved are withdrawn
    reply = request(roles.ctl, P.STOP, 60.0)  # B closes b.root, says SAVED for all, then RUN_ENDED
    assert reply["state"] == "stopped", reply
    assert roles.dist()["unsaved"] == 0
    request(roles.ctl, P.TERMINATE, 60.0)
    for p in roles.procs:
        if p is not a:
            assert p.wait(timeout=60) == 0, (tmp_path / "distributor.log").read_text()
    got = []
    for name in ("a.root", "b.root"):
        try:
            got.append(read_evt(tmp_path / name)[0])
        except Exception:  # noqa: BLE001 - A died before its first write: no readable tree
            assert name == "a.root"
    evts = np.concatenate(got)
    assert set(evts.tolist()) == set(range(n)), f"missing {sorted(set(range(n)) - set(evts.tolist()))[:10]}"


def test_a_killed_collectors_count_is_what_its_file_holds(tmp_path, roles):
    """A collector SIGKILLed in the middle of a run is listed in the stop's reply (replaced_collectors) with
    the events in its file. That count was the sequence ids it had said SAVED for, which include the events
    it did not write: those the workers rejected and the producer's repeats it dropped (farm audit: 1000
    reported for a file of 882). Its SAVED now carries its file's count of the run."""
    from hlt_helpers import push_messages

    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import output_line, request

    roles.distributor("--heartbeat-timeout", "1")
    a = roles.collector(tmp_path / "a.root", "a.log", "--flush-interval", "0.05")
    roles.worker()
    roles.wait_up()
    time.sleep(1.0)  # a's reports name its file
    # 300 messages: 10 that are no envelope (rejected), 29 repeats of an (exp, run, evt) already sent
    push_messages(roles.inp, [envelope(k % 270) if k % 30 else b"junk %d" % k for k in range(300)])
    t0 = time.monotonic()
    while (d := roles.dist())["confirmed"] < 300 or d["unsaved"]:
        assert time.monotonic() - t0 < 60, d
        time.sleep(0.1)
    a.kill()
    a.wait()
    in_a = len(read_evt(tmp_path / "a.root")[0])
    assert in_a == 261  # 300 - 10 - 29
    roles.collector(tmp_path / "b.root", "b.log", "--flush-interval", "0.05")
    push_events(roles.inp, range(1000, 1200))
    roles.wait_confirmed(500)
    reply = request(roles.ctl, P.STOP, 60.0)
    assert [(r["output"], r["saved"]) for r in reply["replaced_collectors"]] == [(str(tmp_path / "a.root"), in_a)], reply
    assert reply["collector"]["events_written"] == len(read_evt(tmp_path / "b.root")[0]) == 200, reply
    line = output_line(request(roles.ctl, P.TERMINATE, 60.0)["processes"][0])
    assert f"{in_a} more saved by 1 replaced collector(s)" in line, line


def test_a_collector_killed_right_after_naming_its_file_is_reported_with_it(tmp_path, roles):
    """A collector killed within ~0.5 s of registering was listed in replaced_collectors with output '': it named
    its file in its next periodic report only. It now reports at once when it has made its file (output_made):
    killed as soon as a.root exists, it is listed with a.root, or, killed before that report left, not at all (a
    file it did not say it made is never named: a failed start makes none)."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import request

    roles.distributor()
    a = roles.collector(tmp_path / "a.root", "a.log")
    t0 = time.monotonic()
    while not (tmp_path / "a.root").exists():
        assert a.poll() is None and time.monotonic() - t0 < 60, (tmp_path / "a.log").read_text()
        time.sleep(0.002)
    a.kill()
    a.wait()
    roles.collector(tmp_path / "b.root", "b.log")
    roles.worker()
    roles.wait_up()
    push_events(roles.inp, range(100))
    roles.wait_confirmed(100)
    reply = request(roles.ctl, P.STOP, 60.0)
    assert [(r["output"], r["saved"]) for r in reply["replaced_collectors"]] in ([(str(tmp_path / "a.root"), 0)], []), \
        reply
    request(roles.ctl, P.TERMINATE, 60.0)


def kill_collector_after_300_saved(roles, tmp_path, *distributor_args):
    """A farm (heartbeat timeout 1 s) whose collector is SIGKILLed once 300 events are confirmed and
    saved (nothing is held any more)."""
    roles.distributor("--heartbeat-timeout", "1", *distributor_args)
    c = roles.collector(tmp_path / "a.root", "a.log", "--flush-interval", "0.05")
    roles.worker()
    roles.wait_up()
    push_events(roles.inp, range(300))
    t0 = time.monotonic()
    while (d := roles.dist())["confirmed"] < 300 or d["unsaved"]:
        assert time.monotonic() - t0 < 60, d
        time.sleep(0.1)
    c.kill()
    c.wait()


def test_stop_without_a_live_collector_says_so(tmp_path, roles, capsys):
    """A collector killed after it saved everything: `hlt status` shows it silent (it showed the state of
    its last report, running), `hlt control stop` stops the run but exits 1 saying that no collector
    reported the run's end (exit 0 after 30 s, as if the output were closed), and `start` warns that
    nothing will take the events."""
    from eclreco import cli
    from eclreco.hlt.control import format_table, status

    kill_collector_after_300_saved(roles, tmp_path)
    time.sleep(1.5)  # past the heartbeat timeout
    row = next(line for line in format_table(status(roles.ctl)).splitlines() if line.startswith("collector"))
    assert " silent " in row, row
    # (--timeout 20: the answer must come well before the 30 s the distributor waited for a report)
    assert cli.main(["hlt", "control", "stop", "--control", roles.ctl, "--timeout", "20"]) == 1
    out, err = capsys.readouterr()
    assert '"state": "stopped"' in out and "the collector did not report its end" in err, out + err
    assert cli.main(["hlt", "control", "start", "--control", roles.ctl]) == 0
    assert "warning: no live collector" in capsys.readouterr().err


def test_the_stop_time_out_is_an_option(tmp_path, roles, capsys):
    """Events sent after the collector died are never confirmed: the stop waits for a replacement
    collector up to the distributor's --stop-timeout (fixed at 120 s before), then counts them as
    lost_at_stop and `hlt control stop` exits 1."""
    from eclreco import cli

    kill_collector_after_300_saved(roles, tmp_path, "--stop-timeout", "4")
    push_events(roles.inp, range(300, 400))
    time.sleep(1.0)
    t0 = time.monotonic()
    assert cli.main(["hlt", "control", "stop", "--control", roles.ctl, "--timeout", "60"]) == 1
    took = time.monotonic() - t0
    out = capsys.readouterr().out
    assert 2.5 < took < 30 and '"lost_at_stop": 100' in out, (took, out)


def test_a_collector_stopped_between_runs_exits_cleanly(tmp_path, roles):
    """SIGTERM to a collector waiting for the next run (a service stop after `hlt control stop`): it ends
    with exit 0 (it was killed by the signal: the default action outside a run)."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import request

    roles.distributor()
    c = roles.collector(tmp_path / "a.root", "a.log")
    roles.worker()
    roles.wait_up()
    push_events(roles.inp, range(200))
    assert request(roles.ctl, P.STOP, 60.0)["collector"]["events_written"] == 200
    time.sleep(0.5)
    c.send_signal(signal.SIGTERM)
    assert c.wait(timeout=30) == 0, (tmp_path / "a.log").read_text()
    assert np.array_equal(np.sort(read_evt(tmp_path / "a.root")[0]), np.arange(200))


def test_a_service_restart_of_the_distributor_leaves_the_farm_up(tmp_path, roles):
    """SIGTERM to a distributor run as its own service (systemctl stop/restart) ended the whole farm, every
    role with exit 0, so Restart=on-failure restarted none of them. Now its run ends, it exits, and the
    workers and the collector stay and re-register with the next distributor; run control's terminate
    still ends them all."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import request

    d = roles.distributor()
    c = roles.collector(tmp_path / "a.root", "a.log")
    w = roles.worker()
    roles.wait_up()
    push_events(roles.inp, range(200))
    roles.wait_confirmed(200)
    d.send_signal(signal.SIGTERM)
    assert d.wait(timeout=60) == 0
    assert "exiting alone" in (tmp_path / "distributor.log").read_text()
    time.sleep(1.0)
    assert c.poll() is None and w.poll() is None  # they exited 0 with it
    roles.distributor(log="distributor2.log")
    roles.wait_up()
    push_events(roles.inp, range(200, 300))
    roles.wait_confirmed(100)
    request(roles.ctl, P.TERMINATE, 60.0)
    assert c.wait(timeout=60) == 0 and w.wait(timeout=60) == 0
    files = sorted(tmp_path.glob("a*.root"))
    evt = np.concatenate([read_evt(f)[0] for f in files])
    assert np.array_equal(np.sort(evt), np.arange(300)), files


def test_a_distributor_that_gave_up_events_exits_1(tmp_path, roles):
    """A distributor with events and nobody to process them, terminated: they are counted as lost, its
    final line says how many it received, and its exit code says that events were lost (it exited 0)."""
    d = roles.distributor("--heartbeat-timeout", "1")
    roles.wait_up(("distributor",))
    push_events(roles.inp, range(300))
    t0 = time.monotonic()
    while roles.dist()["received"] < 300:
        assert time.monotonic() - t0 < 30
        time.sleep(0.1)
    d.send_signal(signal.SIGTERM)
    assert d.wait(timeout=60) == 1
    log = (tmp_path / "distributor.log").read_text()
    assert "terminated: 0 events confirmed of 300 received" in log and "lost at stop 300" in log, log


def test_run_control_exit_codes_say_lost_events_and_a_start_that_did_nothing(tmp_path, roles, capsys):
    """`hlt control terminate` printed a final status with lost_at_stop 300 and exited 0 while the
    distributor exited 1; `start` on a running farm changed nothing and said nothing."""
    from eclreco import cli

    d = roles.distributor("--heartbeat-timeout", "1")
    roles.wait_up(("distributor",))
    assert cli.main(["hlt", "control", "start", "--control", roles.ctl]) == 0
    assert "run 1 was already running" in capsys.readouterr().err
    push_events(roles.inp, range(300))
    t0 = time.monotonic()
    while roles.dist()["received"] < 300:
        assert time.monotonic() - t0 < 30
        time.sleep(0.1)
    assert cli.main(["hlt", "control", "terminate", "--control", roles.ctl, "--timeout", "60"]) == 1
    assert ("eclreco hlt control: 300 events given up at a stop (lost_at_stop): lost (no live collector, or a stop "
            "that timed out)") in capsys.readouterr().err
    assert d.wait(timeout=60) == 1


def test_second_collector_is_refused_and_leaves_the_running_ones_file_alone(tmp_path, roles):
    """Two collectors on one control address used to take the registration from each other in
    turn (the one left out registered again on its next report), each time with every unconfirmed
    event produced again; and the second recreated its output file at start, over the first one's
    when the path was the same. Now the second is refused before it opens a file: it says why and
    exits 1, and the first writes every event into an intact file."""
    from hlt_helpers import free_address

    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import request

    out = tmp_path / "out.root"
    roles.distributor()
    first = roles.collector(out, "a.log", "--flush-interval", "0.1")
    roles.worker()
    roles.wait_up()
    push_events(roles.inp, range(500))
    roles.wait_confirmed(500)
    second = roles.collector(out, "b.log", address=free_address())
    assert second.wait(timeout=60) == 1
    log = (tmp_path / "b.log").read_text()
    assert f"refused this collector: another collector is registered and alive: pid {first.pid} " in log, log
    push_events(roles.inp, range(500, 1000))
    d = roles.wait_confirmed(1000)
    assert d["redelivered"] == 0 and d["collectors_refused"] == 1, d
    assert [p["pid"] for p in roles.status() if p["role"] == "collector"] == [first.pid]
    assert request(roles.ctl, P.STOP, 60.0)["state"] == "stopped"
    request(roles.ctl, P.TERMINATE, 60.0)
    assert first.wait(timeout=60) == 0
    evt, _ = read_evt(out)
    assert np.array_equal(np.sort(evt), np.arange(1000))


def test_collector_refused_after_a_distributor_restart_ends_cleanly(tmp_path, roles):
    """The distributor restarts; collector A (paused meanwhile) comes back after a second collector
    B registered with the new distributor: A is refused in the middle of its run. It closes its
    file (readable, with every event it had) and exits 1 with the reason; B keeps the farm."""
    from hlt_helpers import free_address

    first = roles.distributor()
    a = roles.collector(tmp_path / "a.root", "a.log", "--flush-interval", "0.1")
    roles.worker()
    roles.wait_up()
    push_events(roles.inp, range(300))
    roles.wait_confirmed(300)
    time.sleep(0.5)  # A has written them (flush interval)
    first.kill()
    first.wait()
    os.kill(a.pid, signal.SIGSTOP)
    try:
        roles.distributor(log="distributor2.log")
        b = roles.collector(tmp_path / "b.root", "b.log", address=free_address())
        t0 = time.monotonic()
        while not any(p["role"] == "collector" and p["pid"] == b.pid for p in roles.status()):
            assert time.monotonic() - t0 < 60, "B did not register"
            time.sleep(0.2)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    assert a.wait(timeout=60) == 1
    log = (tmp_path / "a.log").read_text()
    assert "refused this collector: another collector is registered and alive: pid " + str(b.pid) in log, log
    evt, _ = read_evt(tmp_path / "a.root")
    assert np.array_equal(np.sort(evt), np.arange(300))
    assert b.poll() is None
    assert [p["pid"] for p in roles.status() if p["role"] == "collector"] == [b.pid]


def test_collector_registration_refuses_only_a_live_other_process():
    """The distributor's decision on a collector's HELLO, in process: another collector while the
    registered one is connected is refused; the registered process reconnecting under a new
    ZeroMQ identity (same instance token) is taken; so is any collector once the registered
    one's connection is gone (the probe fails under ROUTER_MANDATORY)."""
    import zmq
    from hlt_helpers import free_address

    from eclreco.hlt import protocol as P
    from eclreco.hlt.distributor import Distributor

    d = Distributor(free_address(), free_address(), free_address())
    ctx = zmq.Context.instance()

    def hello(instance, pid):
        s = ctx.socket(zmq.DEALER)
        s.connect(d.addresses["control"])
        s.send_multipart([P.HELLO, P.pack({"role": "collector", "pid": pid, "host": "h", "instance": instance})])
        assert d.ctl.poll(5000)
        d.handle_control()
        assert s.poll(5000)
        return s, s.recv_multipart()[0]

    try:
        a, reply = hello("A", 1)
        assert reply == P.LOW and d.collector["status"]["instance"] == "A"
        b, reply = hello("B", 2)
        assert reply == P.REFUSED and d.collector["status"]["instance"] == "A"
        assert d.c["collectors_refused"] == 1
        a2, reply = hello("A", 1)  # process A on a new connection
        assert reply == P.LOW and d.collector["status"]["instance"] == "A"
        a2.close(0)
        # once libzmq has seen the connection go (a few ms; polled, not assumed), C is taken
        t0, refused = time.monotonic(), []
        while True:
            c, reply = hello("C", 3)
            if reply == P.LOW:
                break
            assert reply == P.REFUSED and time.monotonic() - t0 < 10
            refused.append(c)
            time.sleep(0.05)
        assert d.collector["status"]["instance"] == "C"
        assert d.c["collectors_refused"] == 1 + len(refused)
        for s in (a, b, c, *refused):
            s.close(0)
    finally:
        d.close(0)


def test_the_collectors_reconnection_is_said_as_one_not_as_a_new_collector(capsys):
    """The registered collector on a new connection (same instance token: its control connection broke) is taken
    back; the distributor said `a new collector registered` of it, and an operator looked for a second process.
    It says that the collector reconnected; another process is still a new collector."""
    import zmq
    from hlt_helpers import free_address

    from eclreco.hlt import protocol as P
    from eclreco.hlt.distributor import Distributor

    d = Distributor(free_address(), free_address(), free_address())
    ctx = zmq.Context.instance()
    socks = []

    def hello(instance, pid):
        s = ctx.socket(zmq.DEALER)
        socks.append(s)
        s.connect(d.addresses["control"])
        s.send_multipart([P.HELLO, P.pack({"role": "collector", "pid": pid, "host": "h", "instance": instance})])
        assert d.ctl.poll(5000)
        d.handle_control()
        assert s.poll(5000) and s.recv_multipart()[0] == P.LOW

    try:
        hello("A", 1)
        socks[0].close(0)
        hello("A", 1)  # process A on a new connection
        out = capsys.readouterr().out
        assert "[distributor] the collector pid 1 on h reconnected; 0 unconfirmed events are processed again" in out, out
        assert "a new collector registered" not in out, out
        socks[1].close(0)
        t0 = time.monotonic()
        while d.collector_connected():  # (libzmq sees the connection go within ms)
            assert time.monotonic() - t0 < 10
            time.sleep(0.05)
        hello("B", 2)
        assert "[distributor] a new collector registered; 0 unconfirmed" in capsys.readouterr().out
    finally:
        for s in socks:
            s.close(0)
        d.close(0)


class InProcessFarm:
    """A Distributor driven in process, and DEALER peers that speak its protocol: each step of the
    distributor runs when the test says so (no timing to wait for)."""

    def __init__(self, **settings):
        import zmq
        from hlt_helpers import free_address

        from eclreco.hlt.distributor import Distributor

        self.d = Distributor(free_address(), free_address(), free_address(), **settings)
        self.ctx = zmq.Context.instance()
        self.peers = []

    def peer(self, address="control"):
        import zmq

        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.d.addresses[address])
        self.peers.append(s)
        return s

    def send(self, peer, *frames, address="control"):
        """One message from the peer, handled by the distributor; the replies it got."""
        peer.send_multipart(list(frames))
        sock = self.d.ctl if address == "control" else self.d.wrk
        assert sock.poll(5000)
        (self.d.handle_control if address == "control" else self.d.handle_workers)()
        replies = []
        while peer.poll(200):
            replies.append(peer.recv_multipart())
        return replies

    def read_events(self, n):
        """n events into the distributor (held, as if at workers): their sequence ids."""
        push_events(self.d.addresses["input"], range(n))
        t0 = time.monotonic()
        while len(self.d.events) < n:
            assert time.monotonic() - t0 < 10
            self.d.inp.poll(100)
            self.d.read_input()
        return np.array(sorted(self.d.events), dtype="<u8")

    def close(self):
        for s in self.peers:
            s.close(0)
        self.d.close(0)


def collector_hello(farm, peer, **status):
    from eclreco.hlt import protocol as P

    info = {"role": "collector", "pid": 7, "host": "h", "instance": "i7", "saves": True, "output": "a.root"}
    return farm.send(peer, P.HELLO, P.pack({**info, **status}))


def next_collector(farm, **status):
    """A new collector's HELLO (collector_hello's `status`), repeated until the distributor takes it (LOW): libzmq
    sees the previous collector's connection go a few ms after its close. Returns its peer and the replies."""
    from eclreco.hlt import protocol as P

    t0 = time.monotonic()
    while True:
        peer = farm.peer()
        replies = collector_hello(farm, peer, **status)
        if replies[-1][0] == P.LOW:
            return peer, replies
        assert time.monotonic() - t0 < 10, replies
        time.sleep(0.05)


def test_confirmations_sent_before_a_restarted_distributor_took_the_collector_count():
    """A collector that outlived its distributor confirms the new one's events before its HELLO (the
    answer to WHO) arrives. Those CONFIRM/SAVED were dropped: the events stayed held until the stop
    timed out and were counted lost_at_stop although they were in the file (soak audit, distributor
    restart under load). Now they are kept and taken when that process registers; the output line
    says how many of the run's events the collector had before this distributor took it. A stray
    peer's confirmations that no HELLO follows are dropped as bad messages."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import output_line

    farm = InProcessFarm(heartbeat_timeout_s=1.0)
    d = farm.d
    try:
        seqs = farm.read_events(100)
        col = farm.peer()
        assert farm.send(col, P.CONFIRM, P.seqs_to_bytes(seqs[:60])) == [[P.WHO]]
        farm.send(col, P.SAVED, P.seqs_to_bytes(seqs[:50]))
        assert d.c["confirmed"] == 0 and len(d.events) == 100  # not the registered collector (yet)
        assert collector_hello(farm, col, state="running", received=700)[-1][0] == P.LOW
        assert d.c["confirmed"] == 60 and len(d.events) == 40 and len(d.unsaved) == 10
        assert d.c["bad_messages"] == 0 and not d.unregistered
        farm.send(col, P.CONFIRM, P.seqs_to_bytes(seqs[60:]))
        farm.send(col, P.SAVED, P.seqs_to_bytes(seqs[50:]))
        assert not d.events and not d.unsaved and d.collector["saved"] == 100
        farm.send(col, P.RUN_ENDED, P.pack({"received": 800, "events_written": 800}))
        line = output_line(d.own_status())
        assert "800 events written in 1 farm run(s) of 800 received (700 of them before this distributor took " \
               "the collector)" in line, line

        more = farm.read_events(5)
        stray = farm.peer()
        farm.send(stray, P.CONFIRM, P.seqs_to_bytes(more))
        d.housekeeping(time.monotonic())
        assert stray.identity in d.unregistered or len(d.unregistered) == 1
        d.housekeeping(time.monotonic() + 2.0)  # past the heartbeat time-out: no HELLO came
        assert not d.unregistered and d.c["bad_messages"] == 1 and len(d.events) == 5
    finally:
        farm.close()


def test_a_run_end_reported_before_the_reconnecting_collectors_hello_is_taken():
    """The collector told END_RUN reports its run's end (RUN_ENDED) as its control connection breaks: its DEALER
    queues the report and sends it on the new connection, from a new identity, before its HELLO. The distributor
    dropped it (only the registered identity's RUN_ENDED was read): the stop waited 30 s and replied `timeout: true`
    although the collector had reported. It is held as CONFIRM/SAVED are, in order with them, and taken when that
    identity registers; one that never registers counts as a bad message."""
    from eclreco.hlt import protocol as P

    farm = InProcessFarm(heartbeat_timeout_s=5.0, stop_drain_s=0.0)
    d = farm.d
    try:
        seqs = farm.read_events(100)
        a = farm.peer()
        collector_hello(farm, a)
        farm.send(a, P.CONFIRM, P.seqs_to_bytes(seqs))
        farm.send(a, P.SAVED, P.seqs_to_bytes(seqs), b"100")
        d.pending.clear()  # (no worker here to take the ids off the queue)
        control = farm.peer()
        assert farm.send(control, P.STOP) == []  # answered once the collector has reported
        d.housekeeping(time.monotonic())
        assert d.state == "stopped" and a.poll(5000) and a.recv_multipart()[0] == P.END_RUN
        a.close(0)  # its connection breaks as it reports
        t0 = time.monotonic()
        while d.collector_connected():
            assert time.monotonic() - t0 < 10
            time.sleep(0.05)
        report = {"received": 100, "events_written": 100, "run_index": 1}
        b = farm.peer()  # the same process (instance i7) on its new connection: the queued report first
        replies = farm.send(b, P.RUN_ENDED, P.pack(report))
        assert collector_hello(farm, b)[-1][0] == P.LOW
        d.housekeeping(time.monotonic())
        assert control.poll(2000), "the stop waits for a report that came (it replied timeout: true after 30 s)"
        reply = P.unpack(control.recv_multipart()[1])
        assert reply["timeout"] is False and reply["collector"] == report, reply
        assert d.output["runs"] == 1 and d.output["events_written"] == 100
        assert d.c["bad_messages"] == 0 and not d.unregistered
        assert replies == [[P.WHO]]  # (its HELLO asked for at once, as after CONFIRM)

        stray = farm.peer()  # a report no HELLO follows: counted, not taken
        farm.send(stray, P.RUN_ENDED, P.pack({"received": 5, "events_written": 5}))
        d.housekeeping(time.monotonic() + 6.0)  # past the heartbeat time-out
        assert not d.unregistered and d.c["bad_messages"] == 1 and d.output["events_written"] == 100
    finally:
        farm.close()


def test_the_distributor_says_when_its_collector_falls_silent_and_when_it_is_back(capsys):
    """A collector SIGKILLed (or hung) under a standalone distributor: the workers blocked on their results, nothing
    was confirmed, and the distributor's log said nothing until a new collector registered (operator's drill: 10 s
    of silence; only `hlt status` said `silent`). It now says so once, with what to do, and when it is heard again."""
    from eclreco.hlt import protocol as P

    farm = InProcessFarm(heartbeat_timeout_s=0.3)
    d = farm.d
    try:
        col = farm.peer()
        collector_hello(farm, col, state="ready")
        d.housekeeping(time.monotonic())
        assert "collector" not in capsys.readouterr().err
        for _ in range(2):  # said once
            d.housekeeping(time.monotonic() + 1.0)
        err = capsys.readouterr().err
        assert err.count("[distributor] warning: the collector pid 7 on h has not been heard from for 1 s (dead or "
                         "hung; `hlt status`: silent): the workers block on their results and no event is confirmed; "
                         "restart it with the same --collector-addr") == 1, err
        farm.send(col, P.STATUS, P.pack({"role": "collector", "pid": 7, "host": "h", "state": "ready"}))
        d.housekeeping(time.monotonic())
        assert capsys.readouterr().err == "[distributor] the collector pid 7 on h is heard from again\n"
    finally:
        farm.close()


def stop_reply_after_run_ended(farm, collector, control, report: dict) -> dict:
    """The collector's RUN_ENDED (`report`), then the reply to the STOP that `control` sent (it waits for that
    report)."""
    from eclreco.hlt import protocol as P

    farm.send(collector, P.RUN_ENDED, P.pack(report))
    farm.d.housekeeping(time.monotonic())
    assert control.poll(5000)
    return P.unpack(control.recv_multipart()[1])


def test_a_replaced_collectors_saved_events_are_in_the_report():
    """A collector replaced in the middle of a run holds that run's first events in its own file. The
    stop's report and the output line counted only the new collector's file (soak audit: 38,520 of
    60,000 reported, the other 21,480 in a file no report named)."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import output_line

    farm = InProcessFarm(heartbeat_timeout_s=0.3)
    d = farm.d
    try:
        seqs = farm.read_events(100)
        a = farm.peer()
        collector_hello(farm, a, output="/data/a.root")
        farm.send(a, P.CONFIRM, P.seqs_to_bytes(seqs))
        farm.send(a, P.SAVED, P.seqs_to_bytes(seqs[:70]))  # 30 confirmed, not in a's file
        # the same process on a new connection (same instance token) is no replaced collector
        collector_hello(farm, farm.peer(), output="/data/a.root")
        assert d.output["replaced_collectors"] == 0 and d.collector["saved"] == 70
        time.sleep(0.4)  # a is silent: the next collector is taken
        b = farm.peer()
        collector_hello(farm, b, instance="i8", pid=8, output="/data/a.2.root")
        assert d.c["redelivered"] == 30
        farm.send(b, P.CONFIRM, P.seqs_to_bytes(seqs[70:]))
        farm.send(b, P.SAVED, P.seqs_to_bytes(seqs[70:]))
        d.pending.clear()  # (no worker here to take the redelivered ids off the queue)
        d.stop_drain_s = 0.0
        control = farm.peer()
        assert farm.send(control, P.STOP) == []  # answered once the run has ended
        d.housekeeping(time.monotonic())
        reply = stop_reply_after_run_ended(farm, b, control, {"received": 30, "events_written": 30})
        assert reply["replaced_collectors"] == [{"pid": 7, "host": "h", "output": "/data/a.root", "saved": 70}]
        assert d.state == "stopped" and d.output["saved_by_replaced"] == 70
        assert d.output["replaced_files"] == ["/data/a.root"]
        line = output_line(d.own_status())
        assert "30 events written in 1 farm run(s) of 30 received" in line
        assert "70 more saved by 1 replaced collector(s) in their own file(s): /data/a.root" in line, line
        # the next run starts afresh: nothing replaced in it
        farm.send(farm.peer(), P.START)
        assert d.replaced_run == [] and d.collector["saved"] == 0
    finally:
        farm.close()


@pytest.mark.parametrize("b_output", ["/data/b.root", "/data/run_run4.root"])
def test_a_replaced_collectors_file_without_events_is_said_to_hold_none(b_output):
    """A collector killed before its first write leaves a file with no `events` tree; the output line named it as
    any replaced collector's, "0 more saved by 1 replaced collector(s) in their own file(s): run_run4.root", as if it
    held part of the run. A file its collector saved no event in is said to hold none; the others as before. The
    next collector's file of the same name (another host, the same output path: /data/run_run4.root) holds its 70
    events: it was said to hold none too (matched by name)."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import output_line

    farm = InProcessFarm(heartbeat_timeout_s=0.3)
    d = farm.d
    try:
        seqs = farm.read_events(100)
        collector_hello(farm, farm.peer(), output="/data/run_run4.root")  # killed before it saved an event
        time.sleep(0.4)
        b = farm.peer()
        collector_hello(farm, b, instance="i8", pid=8, host="h2", output=b_output)
        farm.send(b, P.CONFIRM, P.seqs_to_bytes(seqs))
        farm.send(b, P.SAVED, P.seqs_to_bytes(seqs[:70]))
        time.sleep(0.4)  # b is silent too, after 70 saved
        c = farm.peer()
        collector_hello(farm, c, instance="i9", pid=9, output="/data/c.root")
        farm.send(c, P.CONFIRM, P.seqs_to_bytes(seqs[70:]))
        farm.send(c, P.SAVED, P.seqs_to_bytes(seqs[70:]))
        d.pending.clear()  # (no worker here to take the redelivered ids off the queue)
        d.stop_drain_s = 0.0
        control = farm.peer()
        assert farm.send(control, P.STOP) == []
        d.housekeeping(time.monotonic())
        reply = stop_reply_after_run_ended(farm, c, control, {"received": 30, "events_written": 30})
        assert [(r["output"], r["saved"]) for r in reply["replaced_collectors"]] == [("/data/run_run4.root", 0),
                                                                                    (b_output, 70)], reply
        line = output_line(d.own_status())
        assert ("; 70 more saved by 2 replaced collector(s) in their own file(s): /data/run_run4.root (no events: "
                f"replaced before its first write), {b_output}; farm run 1's events are in 2 files (`eclreco dqm "
                f"/data/c.root` draws its DQM; {b_output}: ") in line, line  # run_run4.root holds none of them
        assert d.output["files_without_events"] == [{"files": "replaced_files", "index": 0,
                                                     "output": "/data/run_run4.root"}]
    finally:
        farm.close()


def replace_a_collector_that_saved_70_of_100(farm):
    """Collector a (/data/a.root) confirms 100 events and says SAVED for 70, then falls silent; b (pid 8,
    /data/a.2.root) registers and is given the other 30 again. Returns the events' ids and b."""
    from eclreco.hlt import protocol as P

    seqs = farm.read_events(100)
    a = farm.peer()
    collector_hello(farm, a, output="/data/a.root")
    farm.send(a, P.CONFIRM, P.seqs_to_bytes(seqs))
    farm.send(a, P.SAVED, P.seqs_to_bytes(seqs[:70]))  # 30 confirmed, not in a's file
    time.sleep(0.4)  # a is silent (heartbeat_timeout_s 0.3): the next collector is taken
    b = farm.peer()
    collector_hello(farm, b, instance="i8", pid=8, output="/data/a.2.root")
    return seqs, b


def test_events_a_replaced_collector_confirmed_count_once_in_the_latency_histogram():
    """A collector killed mid-run had confirmed events it had not saved; its replacement confirms them again.
    `confirmed` counted them once, eclreco_hlt_event_latency_seconds twice, the second time from their redelivery
    (operator's drill: a collector SIGKILLed under 1 kHz, the histogram's count 267 above the events confirmed,
    its quantiles and le="0.02" share mixing in the copies). Now each event is in it once."""
    from eclreco.hlt import protocol as P

    farm = InProcessFarm(heartbeat_timeout_s=0.3)
    d = farm.d
    try:
        seqs, b = replace_a_collector_that_saved_70_of_100(farm)
        assert d.c["redelivered"] == 30
        farm.send(b, P.CONFIRM, P.seqs_to_bytes(seqs[70:]))
        assert d.c["confirmed"] == 100 and d.latency.n == 100, (d.c["confirmed"], d.latency.n)
        h = next(f for f in d.metrics_families() if f.name == "eclreco_hlt_event_latency_seconds")
        count = next(smp.value for smp in h.samples if smp.name.endswith("_count"))
        assert count == 100, count
    finally:
        farm.close()


def test_hlt_control_stop_names_every_file_of_a_run_in_several_for_eclreco_dqm():
    """A run split across collectors' files (one died mid-run, its replacement wrote the rest) got its `eclreco dqm`
    advice only in `hlt run`'s final output line: `hlt control stop` said it only for a run with DQM parts, so an
    operator who drew the stopped run's file saw part of the run as the whole. The stop's reply now names the run's
    files (in_several_files) and `hlt control stop` (a real one, against the distributor driven here) prints the
    output line's advice: the replacement's file, and the dead one's apart (it holds no DQM of the run)."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import output_line

    farm = InProcessFarm(heartbeat_timeout_s=0.3)
    d = farm.d
    try:
        seqs, b = replace_a_collector_that_saved_70_of_100(farm)
        d.heartbeat_timeout_s = 60.0  # b stays alive while the stop is answered
        farm.send(b, P.CONFIRM, P.seqs_to_bytes(seqs[70:]))
        farm.send(b, P.SAVED, P.seqs_to_bytes(seqs[70:]))
        d.pending.clear()  # (no worker here to take the redelivered ids off the queue)
        d.stop_drain_s = 0.0
        stop = subprocess.Popen(ECLRECO + ["hlt", "control", "stop", "--control", d.addresses["control"],
                                           "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def serve_until(done):
            t0 = time.monotonic()
            while not done():
                assert time.monotonic() - t0 < 60 and stop.poll() is None, stop.communicate()
                if d.ctl.poll(20):
                    d.handle_control()
                d.housekeeping(time.monotonic())

        serve_until(lambda: d.state == "stopped")
        # (b wrote run (0, 1)'s DQM in 2 parts: the note of its parts names the files that hold DQM of the run)
        farm.send(b, P.RUN_ENDED, P.pack({"received": 30, "events_written": 30, "filename": "/data/a.2.root",
                                          "dqm_parts": [[0, 1, 2]]}))
        serve_until(lambda: not d.stop_requesters)
        out, err = stop.communicate(timeout=60)
        assert stop.returncode == 0, err
        advice = ("farm run 1's events are in 2 files (`eclreco dqm /data/a.2.root` draws its DQM; /data/a.root: its "
                  "collector failed or died mid-run, the DQM of the runs open then is in no file)")
        assert f"eclreco hlt control: note: {advice}\n" in err, err
        assert ("eclreco hlt control: note: run (0, 1) written in 2 DQM parts in /data/a.2.root (a run's totals are the "
                "sum of its parts: `eclreco dqm /data/a.2.root` draws them summed)\n") in err, err
        assert json.loads(out)["in_several_files"] == {"run_index": 1, "files": ["/data/a.root", "/data/a.2.root"],
                                                       "without_dqm": ["/data/a.root"]}, out
        assert f"; {advice}" in output_line(d.own_status())  # the final output line's words
    finally:
        farm.close()


def test_a_collector_replaced_in_a_later_run_is_in_that_runs_report():
    """A collector replaced in run 2 (or later) was not listed in replaced_collectors, and the events in its file
    were in no count of the output line: its report of run 1 (RUN_ENDED) stayed with it at START and was taken
    for a report of run 2. START now clears it, as it clears saved and written."""
    from eclreco.hlt import protocol as P

    farm = InProcessFarm(heartbeat_timeout_s=0.3)
    d = farm.d
    d.stop_drain_s = 0.0
    try:
        a = farm.peer()
        collector_hello(farm, a, output="/data/a.root")
        seqs = farm.read_events(10)
        farm.send(a, P.CONFIRM, P.seqs_to_bytes(seqs))
        farm.send(a, P.SAVED, P.seqs_to_bytes(seqs), b"10")
        d.pending.clear()  # (no worker here to take the ids off the queue)
        farm.send(farm.peer(), P.STOP)
        d.housekeeping(time.monotonic())
        farm.send(a, P.RUN_ENDED, P.pack({"run_index": 1, "received": 10, "events_written": 10}))
        farm.send(farm.peer(), P.START)
        assert d.run_index == 2 and d.state == "running"
        seqs = farm.read_events(20)  # run 2: a saves 15 of them, then dies
        farm.send(a, P.CONFIRM, P.seqs_to_bytes(seqs))
        farm.send(a, P.SAVED, P.seqs_to_bytes(seqs[:15]), b"15")
        time.sleep(0.4)  # a is silent: the next collector is taken
        collector_hello(farm, farm.peer(), instance="i8", pid=8, output="/data/a_run2.root")
        assert d.replaced_run == [{"pid": 7, "host": "h", "output": "/data/a.root", "saved": 15}], d.replaced_run
        assert d.output["replaced_collectors"] == 1 and d.output["saved_by_replaced"] == 15, d.output
        assert d.c["redelivered"] == 5
    finally:
        farm.close()


def test_a_collector_registered_after_the_stop_is_no_report_of_the_run():
    """The collector dies as its run stops (no RUN_ENDED) and a replacement registers before the stop is
    answered: the stop's reply gave the replacement's placeholder, `collector: {}` with `timeout: false`, as
    the run's report (`hlt control stop` exited 0: an empty report for a file nobody said was closed). Now
    the reply says that no collector reported the run (collector null, timeout true: exit 1) and lists the
    dead one in replaced_collectors; a collector registered between runs still holds no stop or
    terminate up, and reports the next run."""
    from eclreco.hlt import protocol as P

    farm = InProcessFarm(heartbeat_timeout_s=5.0, stop_drain_s=0.0)
    d = farm.d
    try:
        a = farm.peer()
        collector_hello(farm, a, output="/data/a.root")
        control = farm.peer()
        assert farm.send(control, P.STOP) == []
        d.housekeeping(time.monotonic())
        assert d.state == "stopped" and not control.poll(100)  # waits for a's RUN_ENDED
        a.close(0)  # a dies before its report
        next_collector(farm, instance="i8", pid=8, output="/data/a.2.root")
        d.housekeeping(time.monotonic())
        assert control.poll(5000)
        reply = P.unpack(control.recv_multipart()[1])
        assert reply["collector"] is None and reply["timeout"] is True, reply
        assert [r["pid"] for r in reply["replaced_collectors"]] == [7], reply
        # b registered between runs: the next run's stop gets its report; a terminate is not held up
        farm.send(control, P.START)
        farm.send(control, P.STOP)
        d.housekeeping(time.monotonic())
        assert d.state == "stopped" and not control.poll(100)
        b = farm.peers[-1]
        reply = stop_reply_after_run_ended(farm, b, control, {"run_index": 2, "filename": "/data/a.2.root",
                                                             "received": 0, "events_written": 0})
        assert reply["collector"]["filename"] == "/data/a.2.root" and reply["timeout"] is False, reply
        # b dies between runs; the next run starts and stops without a collector; c registers after it: b took no
        # part in run 3 and is no replaced collector of it (it was: '0 more saved by 2 replaced collector(s)')
        b.close(0)
        d.collector["last_seen"] -= 10  # silent
        farm.send(control, P.START)
        farm.send(control, P.STOP)
        d.housekeeping(time.monotonic())
        assert control.poll(5000)
        reply = P.unpack(control.recv_multipart()[1])
        assert reply["collector"] is None and reply["replaced_collectors"] == [], reply
        t0 = time.monotonic()
        while collector_hello(farm, farm.peer(), instance="i9", pid=9)[-1][0] != P.LOW:
            assert time.monotonic() - t0 < 10
            time.sleep(0.05)
        assert d.output["replaced_collectors"] == 1, d.output  # a, in run 1
        # c registered between runs has nothing to report: a terminate does not wait for it
        assert d.collector["status"]["pid"] == 9 and d.run_reported(time.monotonic())
    finally:
        farm.close()


def run_split_between_two_collectors(farm, first_output, second):
    """Run 1 of 100 events: collector a (pid 7 on host h, `first_output`) saves the first 70 and is stopped
    (SIGTERM: RUN_ENDED) mid-run; collector b (collector_hello's `second`) saves the other 30; then STOP. Returns the
    stop's reply."""
    from eclreco.hlt import protocol as P

    d = farm.d
    seqs = farm.read_events(100)
    a = farm.peer()
    collector_hello(farm, a, output=first_output)
    farm.send(a, P.CONFIRM, P.seqs_to_bytes(seqs[:70]))
    farm.send(a, P.SAVED, P.seqs_to_bytes(seqs[:70]))
    farm.send(a, P.RUN_ENDED, P.pack({"run_index": 1, "filename": first_output, "received": 70,
                                      "events_written": 70}))
    time.sleep(0.4)  # a is gone: the next collector is taken
    b = farm.peer()
    collector_hello(farm, b, instance="i8", pid=8, **second)
    d.heartbeat_timeout_s = 60.0  # b stays alive while the stop is answered
    farm.send(b, P.CONFIRM, P.seqs_to_bytes(seqs[70:]))
    farm.send(b, P.SAVED, P.seqs_to_bytes(seqs[70:]))
    d.pending.clear()  # (no worker here to take the ids off the queue)
    d.stop_drain_s = 0.0
    control = farm.peer()
    assert farm.send(control, P.STOP) == []
    d.housekeeping(time.monotonic())
    return stop_reply_after_run_ended(farm, b, control, {"run_index": 1, "filename": second["output"],
                                                         "received": 30, "events_written": 30})


def test_a_collector_stopped_in_the_middle_of_a_run_is_in_the_report():
    """A collector stopped by SIGINT/SIGTERM in the middle of a run (a service stop or restart) closes its
    file and reports RUN_ENDED; a new collector writes the rest of the run in its own file. The first
    report was taken for a run of its own: the output line said '3000 events written in 2 farm run(s)'
    of one run, and the stop's reply named only the new collector's file (its replaced_collectors
    empty), not the one that held the run's first 1257 events (audit, separate services)."""
    from eclreco.hlt.control import output_line

    farm = InProcessFarm(heartbeat_timeout_s=0.3)
    d = farm.d
    try:
        reply = run_split_between_two_collectors(farm, "/data/a.root", {"output": "/data/a.2.root"})
        assert reply["replaced_collectors"] == [{"pid": 7, "host": "h", "output": "/data/a.root", "saved": 70}], reply
        line = output_line(d.own_status())
        assert "100 events written in 1 farm run(s) of 100 received" in line, line
        assert "70 of them by 1 collector(s) stopped in the middle of a run, in their own file(s): /data/a.root" \
            in line, line
        assert "more saved by" not in line, line  # a's events are in the count: not a second time
    finally:
        farm.close()


def test_a_run_in_two_collectors_files_of_one_path_on_two_hosts_is_in_two_files():
    """Two collectors on two hosts with the same -o (/data/run.root) each wrote part of run 1: the first stopped
    (SIGTERM) mid-run, the second wrote the rest. The run's files were keyed by path only: one file, so the output
    line and the stop's reply said nothing of a run in several files, and `eclreco dqm` would have been given one of
    them. Each collector's file counts (its host and pid with its path), named HOST:PATH where the path is shared
    (`eclreco dqm` takes a path once)."""
    from eclreco.hlt.control import output_line

    farm = InProcessFarm(heartbeat_timeout_s=0.3)
    d = farm.d
    try:
        reply = run_split_between_two_collectors(farm, "/data/run.root", {"host": "h2", "output": "/data/run.root"})
        assert reply["in_several_files"] == {"run_index": 1, "files": ["h:/data/run.root", "h2:/data/run.root"],
                                             "without_dqm": [], "shared_paths": ["/data/run.root"]}, reply
        line = output_line(d.own_status())
        assert ("; farm run 1's events are in 2 files (`eclreco dqm h:/data/run.root h2:/data/run.root` draws its DQM "
                "summed across them; /data/run.root: the path of several collectors' files (HOST:PATH), copy them "
                "under distinct names for `eclreco dqm`)") in line, line
    finally:
        farm.close()


def test_a_farm_run_without_events_is_counted_and_said_to_have_none():
    """A START ... STOP in which no event came is a farm run: the output line counted only the runs whose
    collector received an event and said '0 events written in 0 farm run(s)' of a farm that had run twice."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import output_line

    farm = InProcessFarm(heartbeat_timeout_s=30.0, stop_drain_s=0.0)
    d = farm.d
    try:
        col, control = farm.peer(), farm.peer()
        collector_hello(farm, col)

        def run(received):
            farm.send(control, P.STOP)
            d.housekeeping(time.monotonic())
            farm.send(col, P.RUN_ENDED, P.pack({"run_index": d.run_index, "filename": "a.root",
                                                "received": received, "events_written": received}))
            d.housekeeping(time.monotonic())
            assert control.poll(5000) and P.unpack(control.recv_multipart()[1])["state"] == "stopped"
            line = output_line(d.own_status())
            farm.send(control, P.START)
            return line

        assert run(0).startswith("output: 0 events written in 1 farm run(s) of 0 received; the farm run had no "
                                 "events; rejected 0")
        assert run(0).startswith("output: 0 events written in 2 farm run(s) of 0 received; none of the 2 farm runs "
                                 "had events;")
        assert run(50).startswith("output: 50 events written in 3 farm run(s) of 50 received; 2 of the 3 farm runs "
                                  "had no events;")
    finally:
        farm.close()


def test_a_worker_back_from_a_hang_ends_the_run_it_missed():
    """A worker hung (SIGSTOP) past the heartbeat time-out is given up on; if the run ends meanwhile,
    it missed END_RUN, stayed `running` after it resumed, and merged that run with the next (soak
    audit: its summary and status counted both). Its READY now says its state: a worker given up on
    in a run that has ended is told END_RUN; one that comes back in the same run is not."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.worker import WorkerLink

    farm = InProcessFarm(heartbeat_timeout_s=0.5, stop_drain_s=0.0)
    d = farm.d
    links = []
    try:
        def come_back(link):
            """The link's READY (a real WorkerLink: what a resumed worker sends after WHO), handled."""
            link.state = "running"
            link.register()
            assert d.wrk.poll(5000)
            d.handle_workers()
            got = []
            while link.sock.poll(300):
                got.append(link.sock.recv_multipart()[0])
            return got

        def lose(link):
            link.register()
            assert d.wrk.poll(5000)
            d.handle_workers()
            d.housekeeping(time.monotonic() + 1.0)  # no heartbeat: given up on
            assert link.ident not in d.workers

        same_run = WorkerLink(d.addresses["workers"])
        links.append(same_run)
        lose(same_run)
        assert come_back(same_run) == []  # the run goes on: it carries on with it

        missed = WorkerLink(d.addresses["workers"])
        links.append(missed)
        lose(missed)
        d.begin_stop()
        d.housekeeping(time.monotonic())
        assert d.state == "stopped"
        assert come_back(missed) == [P.END_RUN]
        assert come_back(missed) == []  # once: its next READY starts a run
    finally:
        for link in links:
            link.sock.close(0)
        farm.close()


def test_a_worker_blocked_on_its_results_is_given_up_only_while_the_collector_is_heard_from():
    """A worker whose results wait for the collector (ZMQOutput blocked) heartbeats with state "blocked".
    Behind a silent (hung or dead) collector it stays: every worker is blocked there, and counting them lost
    (workers_lost 2 behind a stopped collector on ipc://) redelivered their events to workers as blocked.
    One that stays blocked while the collector is heard from and confirms none of its events (a broken link
    to it) is given up after twice the heartbeat time-out, its events going to the others."""
    from eclreco.hlt import protocol as P

    farm = InProcessFarm(heartbeat_timeout_s=0.3)
    d = farm.d
    try:
        col = farm.peer()
        collector_hello(farm, col, state="running")
        w = farm.peer("workers")
        farm.send(w, P.READY, P.pack({"pid": 1, "host": "h", "credit": 0}), address="workers")

        def blocked_for(seconds, collector_reports):
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds and d.workers:
                w.send_multipart([P.HB, P.pack({"state": "blocked"})])
                assert d.wrk.poll(5000)
                d.handle_workers()
                if collector_reports:
                    col.send_multipart([P.STATUS, P.pack({"role": "collector", "state": "running"})])
                    assert d.ctl.poll(5000)
                    d.handle_control()
                d.housekeeping(time.monotonic())
                time.sleep(0.05)
            return time.monotonic() - t0

        blocked_for(2.0, collector_reports=False)  # the collector silent: its wait, not the worker's
        assert len(d.workers) == 1 and d.workers_lost == 0
        took = blocked_for(3.0, collector_reports=True)
        assert not d.workers and d.workers_lost == 1 and 0.6 <= took < 1.5, took
    finally:
        farm.close()


def test_a_worker_says_that_it_waits_for_its_distributor(tmp_path, roles):
    """A worker whose distributor is not there (not started yet, a wrong port, a host name that does not
    resolve) waited without a word: its DEALER takes READY and heartbeats either way. After 5 s without a
    handshake it now says where it waits, and says so again when the distributor comes."""
    w = roles.worker(log="worker.log")
    log = tmp_path / "worker.log"
    t0 = time.monotonic()
    while f"waiting for the distributor at {roles.wrk}" not in log.read_text():
        assert w.poll() is None and time.monotonic() - t0 < 30, log.read_text()
        time.sleep(0.2)
    assert time.monotonic() - t0 >= 4.0  # not at once: a distributor that starts a moment later is normal
    roles.distributor()
    roles.collector(tmp_path / "out.root", "collector.log")
    roles.wait_up()
    t0 = time.monotonic()
    while f"connected to the distributor at {roles.wrk}" not in log.read_text():
        assert time.monotonic() - t0 < 30, log.read_text()
        time.sleep(0.2)
    assert log.read_text().count("waiting for the distributor") == 1
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import request

    request(roles.ctl, P.TERMINATE, 60.0)
    for p in roles.procs:
        assert p.wait(timeout=60) == 0, log.read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_worker_stopped_before_its_first_run_says_so(tmp_path, roles, sig):
    """A standalone worker stopped (SIGINT/SIGTERM) before any event came said 'run ended' with a module table of
    zeros, of a run that never started. It now says that it stopped before its first run."""
    w = roles.worker(log="worker.log")
    log = tmp_path / "worker.log"
    t0 = time.monotonic()
    while "waiting for the distributor" not in log.read_text():  # said from within its event loop
        assert w.poll() is None and time.monotonic() - t0 < 30, log.read_text()
        time.sleep(0.2)
    w.send_signal(sig)
    assert w.wait(timeout=30) == 0, log.read_text()
    text = log.read_text()
    assert "run ended" not in text and "Module" not in text, text
    assert f"[worker] pid {w.pid} stopped before its first run: no event received" in text, text


def test_a_standalone_worker_keeps_what_it_rejects_by_default(tmp_path, roles):
    """`hlt worker` without --rejected kept no raw bytes of what it rejected (only `hlt run` gave its
    workers a file). Now it keeps them in rejected_{pid}.msgpack in its working directory, made at the
    first rejected event; its first line says where; a --rejected in a missing folder is refused at
    the start."""
    bad = subprocess.run(ECLRECO + ["hlt", "worker", "--distributor", roles.wrk, "--collector", roles.col,
                                    "--rejected", str(tmp_path / "nowhere" / "r.msgpack")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error: --rejected" in bad.stderr and "no directory" in bad.stderr, bad.stderr
    (tmp_path / "w").mkdir()
    roles.distributor()
    roles.collector(tmp_path / "out.root", "collector.log")
    w = roles.worker(cwd=tmp_path / "w")
    roles.wait_up()
    assert list((tmp_path / "w").iterdir()) == []  # nothing rejected yet: no file
    from hlt_helpers import push_messages

    push_messages(roles.inp, [envelope(i) for i in range(20)] + [b"not an envelope %d" % i for i in range(5)])
    roles.wait_confirmed(25)
    quarantine = tmp_path / "w" / f"rejected_{w.pid}.msgpack"

    def records():
        try:
            return read_quarantine(quarantine) if quarantine.exists() else []
        except ValueError:  # read while the worker was writing a record: read again
            return []

    t0 = time.monotonic()
    while len(recs := records()) < 5:
        assert time.monotonic() - t0 < 30, recs
        time.sleep(0.1)
    assert [r["message"] for r in recs] == [b"not an envelope %d" % i for i in range(5)]
    assert {r["reason"] for r in recs} == {"trailing_bytes"}, recs
    assert f"rejected raw events {quarantine}" in (tmp_path / "worker.log").read_text()


def test_restarted_distributor_events_are_not_taken_for_duplicates(tmp_path, roles):
    """A distributor restarted beside a collector that outlived it: the new events are written.
    Its sequence ids used to start at 0 again, below the collector's watermark of the first
    distributor's ids, so the collector dropped them as redeliveries (and confirmed them)."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import request

    first = roles.distributor()
    roles.collector(tmp_path / "out.root", "collector.log")
    roles.worker()
    roles.wait_up()
    push_events(roles.inp, range(1000))
    roles.wait_confirmed(1000)
    # wait until the collector has the first distributor's watermark (LOW) above all 1000 events:
    # without it the old ids would not be taken for duplicates and the test would pass regardless
    t0 = time.monotonic()
    while True:
        d = roles.dist()
        col = next(p for p in roles.status() if p["role"] == "collector")
        if d["held"] == d["unsaved"] == 0 and col["low_watermark"] >= d["low_watermark"]:
            break
        assert time.monotonic() - t0 < 20, (d, col)
        time.sleep(0.1)
    first.kill()
    first.wait()
    roles.distributor(log="distributor2.log")
    roles.wait_up()
    push_events(roles.inp, range(1000, 2000))
    roles.wait_confirmed(1000)
    assert request(roles.ctl, P.STOP, 60.0)["state"] == "stopped"
    col = next(p for p in roles.status() if p["role"] == "collector")
    request(roles.ctl, P.TERMINATE, 60.0)
    evt, _ = read_evt(tmp_path / "out.root")
    assert np.array_equal(np.sort(evt), np.arange(2000)) and col["duplicates"] == 0, col


@pytest.mark.parametrize("how", ["sigkill", "sigstop_then_hlt_run_sigterm"])
def test_collector_sigkill_with_unwritten_results_counts_them_lost(farm_factory, how):
    """Promise: events the collector had confirmed but not yet written (its flush interval is long)
    are not forgotten when it dies: the distributor holds them as unsaved, and when the farm ends
    without a live collector (one not restarted) they are counted as lost_at_stop (not silently gone).
    `hlt run`'s last line says it: after a fatal collector exit, and after a signal to `hlt run` while its
    collector hung (SIGSTOP: no fatal exit, the distributor's stop gives up on it), where `hlt run` exited 1
    with no word of why (only the summary's `lost at stop N`)."""
    farm = farm_factory(heartbeat_timeout=2, workers=1, extra=("--flush-interval", "60", "--collector-restarts", "0"))
    n = 1000
    push_events(farm.input, range(n))
    farm.wait_confirmed(n)
    d = farm.distributor()
    assert d["unsaved"] == n and d["held"] == 0, d
    collector = farm.process("collector")
    if how == "sigkill":
        os.kill(collector["pid"], signal.SIGKILL)
    else:  # (before --heartbeat-timeout: hlt run does not kill it as hung, the terminate gives up on it)
        os.kill(collector["pid"], signal.SIGSTOP)
        farm.proc.send_signal(signal.SIGTERM)
    rc, log = farm.wait_exit(timeout=60)
    assert rc == 1, log
    assert f"{n} confirmed events that were not in its file are lost" in log, log
    assert f"lost at stop {n} ({n} of them confirmed, not known to be saved)," in log, log
    last = log.rstrip().splitlines()[-1]
    assert last == (f"[hlt run] error: the farm was terminated: the collector exited (-9, SIGKILL); 0 restart(s) "
                    f"within the last 60 s (--collector-restarts 0); {n} events given up at a stop (lost_at_stop): lost"
                    if how == "sigkill" else f"[hlt run] error: {n} events given up at a stop (lost_at_stop): lost"), log


def test_malformed_messages_to_the_farm_are_counted_not_fatal(farm_factory, zmq_context):
    """Garbage on the distributor's control and workers sockets and on the collector's results
    socket (a stray peer, a bug): each used to kill the process it reached, losing every event it
    held. Now: counted (status bad_messages), and the farm writes every event exactly once."""
    import msgpack
    import zmq

    from eclreco.hlt import protocol as P

    farm = farm_factory(heartbeat_timeout=2, workers=2)
    collector = farm.process("collector")
    workers_addr = farm.distributor()["addresses"]["workers"]
    ctx = zmq_context
    bad_control = [[P.CONFIRM], [P.CONFIRM, b"abc"], [P.HELLO, b"\xc1"], [P.HELLO, msgpack.packb(5)], [P.SAVED],
                   [P.STATUS, b"\xc1"], [P.RUN_ENDED, b"\xc1"], [P.CONFIRM, P.seqs_to_bytes([1, 2])],
                   # reports of no role the farm has, an unknown command: they left status rows that never went
                   # away, and the last was answered but not counted
                   [P.HELLO, msgpack.packb({"role": "x"})],
                   [P.STATUS, msgpack.packb({"role": "supervisor", "workers_restarted": "x"})], [b"FOO"]]
    bad_workers = [[P.READY], [P.READY, b"\xc1"], [P.READY, msgpack.packb([1, 2])],
                   [P.READY, msgpack.packb({"credit": "x"})], [P.READY, msgpack.packb({"credit": 1})],
                   [P.CREDIT, b"lots"]]
    for address, messages in ((farm.control, bad_control), (workers_addr, bad_workers)):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 5000)  # every message delivered before the socket goes
        s.connect(address)
        for m in messages:
            s.send_multipart(m)
        time.sleep(0.3)
        s.close()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(collector["address"])
    push.send(b"\xc1garbage")
    push.send(msgpack.packb({"v": 1, "type": P.BATCH_TYPE, "n": 5, "meta": {}}))
    push.send_multipart([b"x", b"y"])  # one message: it counted as two
    push.close()
    n = 2000
    push_events(farm.input, range(n))
    farm.wait_confirmed(n)
    # the valid READY registers a worker; the stray CONFIRM of ids 1, 2 is held for a HELLO of its sender
    # (a collector that outlived a distributor) and counts once the heartbeat time-out passed without one
    t0 = time.monotonic()
    while (d := farm.distributor())["bad_messages"] < len(bad_control) + len(bad_workers) - 1:
        assert time.monotonic() - t0 < 20, d
        time.sleep(0.2)
    c = farm.process("collector")
    assert [p["role"] for p in farm.status()["processes"]].count("supervisor") == 1  # hlt run's own
    assert c["bad_messages"] == 3 and c["pid"] == collector["pid"], c
    farm.command("stop")
    evt, _ = read_evt(farm.output)
    assert np.array_equal(np.sort(evt), np.arange(n))


def test_collector_duplicate_key_holds_32_bit_exp_run_evt(farm_factory):
    """(exp, run, evt) with run >= 2^16 or exp >= 2^16: distinct events (the 64-bit key
    exp << 48 | run << 32 | evt made (0, 65536, e) the same as (1, 0, e))."""
    farm = farm_factory(workers=1)
    for exp, run in ((1, 0), (0, 65536), (65536, 7), (0, 7)):
        push_events(farm.input, range(100), exp=exp, run=run)
    farm.wait_confirmed(400)
    farm.command("stop")
    assert farm.process("collector")["duplicates"] == 0
    with uproot.open(farm.output) as f:
        t = f["events"].arrays(["exp", "run", "evt"], library="np")
    assert len({(int(e), int(r), int(v)) for e, r, v in zip(t["exp"], t["run"], t["evt"])}) == 400


@pytest.mark.parametrize("setting,value,message", [
    ("chunk", 0, "chunk must be an int >= 1, not 0"),
    ("queue_size", 2.5, "queue_size must be an int >= 1"),
    ("input_hwm", -1, "input_hwm must be an int >= 0"),
    ("heartbeat_timeout_s", float("nan"), "heartbeat_timeout_s must be a finite number > 0"),
    ("heartbeat_timeout_s", 0.0, "heartbeat_timeout_s must be a finite number > 0"),
    ("stop_timeout_s", float("inf"), "stop_timeout_s must be a finite number >= 0"),
])
def test_a_distributor_built_in_python_refuses_what_its_command_line_refuses(setting, value, message):
    """The bounds of `eclreco hlt distributor`'s options hold for Distributor(...) too (chunk=0
    dispatched nothing, and its stop hung), and nothing is bound before the refusal."""
    from hlt_helpers import free_address

    from eclreco.hlt.distributor import Distributor

    addresses = [free_address(), free_address(), free_address()]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Distributor(*addresses, **{setting: value})
    d = Distributor(*addresses)  # the addresses are still free
    d.inp.close(0), d.wrk.close(0), d.ctl.close(0)


# A worker chain that dies (SIGKILL) right after its RejectedOutput has kept the first batch with a rejected event,
# before ZMQOutput sends that batch's results: the distributor redelivers the batch to another worker, which
# rejects and keeps it again. (The marker file lets one worker die, once.)
DIES_AFTER_QUARANTINE = '''
import os, signal, sys
import eclreco
from eclreco.framework import Path
from eclreco.hlt.worker import add_worker_arguments, add_chosen_reconstruction, start_worker

MARK = {mark!r}

class DieAfterQuarantine(eclreco.Module):
    def event(self, batch):
        if (batch.error_flags & eclreco.ERROR_REJECTED).any() and not os.path.exists(MARK):
            open(MARK, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

add_module = Path.add_module
def add_before_the_results(self, module, **params):  # between RejectedOutput and ZMQOutput
    if module == "ZMQOutput":
        add_module(self, DieAfterQuarantine())
    return add_module(self, module, **params)
Path.add_module = add_before_the_results

import argparse
ap = argparse.ArgumentParser()
add_worker_arguments(ap)
args = ap.parse_args()
sys.exit(start_worker(args, lambda path: add_chosen_reconstruction(path, args)))
'''


def test_a_redelivered_rejected_event_is_one_rejected_event_in_the_quarantine(farm_factory, tmp_path, capsys):
    """A worker died after it had kept a rejected event and before its results reached the collector: the
    distributor redelivered the event, and the worker that took it rejected and kept it again. The collector
    counted it once, but the quarantine files held two records and `eclreco quarantine` counted (and
    --extract wrote) both. The workers' records now carry the distributor's sequence id, and `eclreco
    quarantine` counts the records of one id and message once, the others as repeats."""
    from eclreco import cli

    mark = tmp_path / "died"
    steering = tmp_path / "dies_after_quarantine.py"
    steering.write_text(DIES_AFTER_QUARANTINE.replace("{mark!r}", repr(str(mark))))
    farm = farm_factory(heartbeat_timeout=2, workers=2, extra=("--worker-steering", str(steering)))
    from hlt_helpers import push_messages

    bad = [b"not an envelope %d" % i for i in range(5)]
    push_messages(farm.input, [envelope(i) for i in range(100)] + bad + [envelope(i) for i in range(100, 200)])
    farm.wait_confirmed(205, timeout=90)
    ended = farm.command("stop")["collector"]
    assert mark.exists() and ended["rejected"] == 5, ended  # the collector counts each once
    d = farm.distributor()
    assert d["redelivered"] >= 1 and d["workers_lost"] >= 1, d
    farm.command("terminate")
    rc, log = farm.wait_exit()
    assert rc == 0, log
    files = sorted(glob.glob(str(tmp_path / "farm_rejected_w*_*.msgpack")))
    recs = [r for f in files for r in read_quarantine(f)]
    assert len(recs) > 5 and all("seq" in r for r in recs), recs  # the dead worker's records and the repeats
    assert len({r["seq"] for r in recs}) == 5
    out = tmp_path / "extracted.msgpack"
    capsys.readouterr()
    assert cli.main(["quarantine", *files, "--json", "--extract", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 5 and summary["repeats"] == len(recs) - 5, summary
    extracted = out.read_bytes()  # each message once
    assert len(extracted) == sum(map(len, bad)) and all(b in extracted for b in bad)


def test_a_collector_restarted_during_the_terminate_does_not_hold_the_farm(farm_factory):
    """A collector that `hlt run` restarts while a terminate is under way (here: the old one killed between
    runs, the terminate sent as soon as the restart is said; the same after a stop whose last write failed) starts after the distributor has gone: nobody answers its
    HELLO. It waited for the distributor ("[collector] waiting for the distributor") and `hlt run` killed it
    after 60 s. Roles still alive a few seconds after the distributor's exit now get SIGTERM, and a collector
    that no distributor took leaves on it: the farm exits within seconds. (The distributor now waits out the killed
    collector's reconnect grace at the terminate, ~2 s: a restart that registers in it is told to terminate.)"""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import request

    farm = farm_factory(heartbeat_timeout=2, workers=1)
    push_events(farm.input, range(200))
    farm.wait_confirmed(200)
    farm.command("stop")  # between runs the terminate waits for no collector
    os.kill(farm.process("collector")["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    while "restart 1:" not in farm.logtext():
        assert time.monotonic() - t0 < 20, farm.logtext()
        time.sleep(0.01)
    request(farm.control, P.TERMINATE, 60.0)  # from this process: before the new collector's imports are done
    t1 = time.monotonic()
    rc, log = farm.wait_exit(timeout=90)
    assert time.monotonic() - t1 < 20, log
    assert rc == 0 and "did not exit within" not in log, log
    # Either the new collector came up after the distributor had gone (it leaves on the SIGTERM), or it registered
    # while the distributor still waited out the killed one's reconnect grace (it is told to terminate): both in seconds
    assert ("after the distributor: SIGTERM" in log and "[collector] stopped before a distributor took it" in log) or (
        "[distributor] a new collector registered" in log and "[collector] stopped before a distributor took it"
        not in log), log


def test_a_worker_gets_no_events_of_the_next_run_before_its_ready():
    """A worker ends its run on END_RUN and registers again (READY) for the next. The distributor kept the credit it
    had left from the run that ended: a START right after the stop sent it events of the new run before its READY
    came, and the READY then gave them to other workers ("re-registered"; redelivered though no worker was lost)
    while the worker kept them in its buffer and processed them too (each result twice, one dropped as a duplicate).
    A worker's credit now ends with its run: it gets the new run's events once its READY has said its credit."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.worker import WorkerLink

    farm = InProcessFarm(heartbeat_timeout_s=5.0, stop_drain_s=0.0)
    d = farm.d
    link = WorkerLink(d.addresses["workers"], capacity=100)
    try:
        link.register()
        assert d.wrk.poll(5000)
        d.handle_workers()
        assert d.workers[link.ident].credit == 100
        d.begin_stop()
        d.housekeeping(time.monotonic())
        assert d.state == "stopped"
        assert farm.send(farm.peer(), P.START)[0][0] == P.OK
        farm.read_events(10)
        d.dispatch()  # the worker's READY for run 2 is not there yet
        assert link.sock.poll(2000)
        link.service()  # END_RUN
        if link.sock.poll(300):
            link.service()  # anything sent with it
        assert link.end_run and link.buffered == 0, link.buffered
        link.received_run, link.end_run = 0, False  # the next run of the worker: HLTWorkerInput.initialize
        link.register()
        t0 = time.monotonic()
        while d.workers[link.ident].ended:  # its READY (a CREDIT it sent at the END_RUN may come first: ignored)
            assert time.monotonic() - t0 < 5 and d.wrk.poll(5000)
            d.handle_workers()
        d.dispatch()
        assert link.sock.poll(2000)
        link.service()
        assert link.buffered == 10 and d.c["redelivered"] == 0 and d.c["dispatched"] == 10, (link.buffered, d.c)
    finally:
        link.sock.close(0)
        farm.close()


@contextlib.contextmanager
def collector_link_by_hand(zmq_context):
    """A CollectorLink whose distributor is driven by the test (a ROUTER on its control address), and a worker's
    PUSH to its results address: yields (control address, the distributor's socket, link, push)."""
    import zmq

    from eclreco.hlt.collector import CollectorLink
    from hlt_helpers import free_address

    ctl = free_address()
    distributor = zmq_context.socket(zmq.ROUTER)
    distributor.setsockopt(zmq.LINGER, 0)
    distributor.bind(ctl)
    link = CollectorLink(free_address(), ctl)
    push = zmq_context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(link.address)
    try:
        yield ctl, distributor, link, push
    finally:
        push.close(0)
        link.close()
        distributor.close(0)


class CollectorByHand:
    """A real `hlt collector` process writing `output` whose distributor (a ROUTER on its control address) and
    worker (a PUSH to its results address, connected by the test when it wants) are the test."""

    def __init__(self, zmq_context, output, flush_interval: str):
        import zmq

        from hlt_helpers import free_address

        ctl, self.results = free_address(), free_address()
        self.distributor = zmq_context.socket(zmq.ROUTER)
        self.distributor.setsockopt(zmq.LINGER, 0)
        self.distributor.bind(ctl)
        self.push = zmq_context.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.proc = subprocess.Popen(ECLRECO + ["hlt", "collector", "--collector-addr", self.results, "--control", ctl,
                                                "-o", str(output), "--flush-interval", flush_interval,
                                                "--metrics-port", "-1"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def until(self, what, t=30.0):
        """The collector's next message whose command is `what` (answering nothing else)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < t:
            if self.distributor.poll(200):
                frames = self.distributor.recv_multipart()
                if frames[1] == what:
                    return frames
        raise AssertionError(f"no {what} from the collector")

    def until_status(self, key, value):
        """Waits (10 s at most) for a STATUS of the collector whose `key` is `value`."""
        from eclreco.hlt import protocol as P

        t0 = time.monotonic()
        while (st := P.unpack(self.until(P.STATUS)[2]))[key] != value:
            assert time.monotonic() - t0 < 10, st

    def close(self) -> str:
        """Kills the collector if it still runs; returns what it printed."""
        kill_if_running(self.proc)
        out = self.proc.communicate()[0]
        self.push.close(0)
        self.distributor.close(0)
        return out


def output_line_of_report(report: dict) -> str:
    """The farm's output line of a distributor whose collector sent `report` (RUN_ENDED)."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import output_line

    farm = InProcessFarm()
    try:
        peer = farm.peer()
        collector_hello(farm, peer)
        farm.send(peer, P.RUN_ENDED, P.pack(report))
        return output_line(farm.d.own_status())
    finally:
        farm.close()


def answer_hello(distributor, link, low: int, *frames: bytes) -> bytes:
    """The distributor's answer to the link's HELLO (LOW, its first id, "1": its generation, and `frames`);
    the link is serviced meanwhile (a HELLO after a WHO). Returns the collector's identity."""
    from eclreco.hlt import protocol as P

    t0 = time.monotonic()
    while True:
        assert time.monotonic() - t0 < 5
        if distributor.poll(10):
            ident, cmd, *_ = distributor.recv_multipart()
            if cmd == P.HELLO:
                distributor.send_multipart([ident, P.LOW, str(low).encode(), b"1", *frames])
                return ident
        else:
            link.service()


def results_message(seqs, evt, run: int = 1) -> bytes:
    """A worker's results message: events `evt` of exp 1, `run`, with HLT sequence ids `seqs`, digits only."""
    import eclreco
    from eclreco.hlt import protocol as P

    n = len(seqs)
    b = eclreco.EventBatch(n)
    b.exp[:], b.run[:], b.evt[:] = 1, run, np.asarray(evt)
    b.add_collection("ECLDigits", np.arange(n + 1), {})
    b.add_collection("HLTSequence", np.arange(n + 1), {"seq": np.asarray(seqs, "<u8")})
    return P.pack(P.batch_to_message(b))


def test_late_results_of_a_dead_distributors_events_are_not_duplicates(zmq_context):
    """A collector that outlives its distributor registers with the restarted one, whose LOW (its first id) is above
    every id of its predecessor. Results of the predecessor's events that the workers still held arrive late: the
    collector dropped every one as a duplicate (`m.seq >= link.low`), also those it had never taken, which were
    lost with the dead distributor and said nowhere. A copy of one it took is still a duplicate; a first result
    is counted apart, as orphaned (status, the run's report, eclreco_hlt_orphaned_results_total), and written: no
    distributor holds the event any more, and it was dropped (the only copy of a processed event). The collector
    remembered only the last handover: after a second distributor restart, the first one's late results were
    counted as duplicates and dropped; every handover's ids are now remembered (the last 16)."""
    import eclreco
    from eclreco.hlt import protocol as P
    from eclreco.hlt.collector import HLTCollectorInput

    def results(seqs):
        n = len(seqs)
        push.send(results_message(seqs, seqs))
        out = eclreco.EventBatch(0)
        t0, dropped = time.monotonic(), link.duplicates + link.orphaned
        while not len(out) and link.duplicates + link.orphaned - dropped < n:
            assert time.monotonic() - t0 < 5
            source.next_batch(out, 1000)
        return len(out)

    with collector_link_by_hand(zmq_context) as (ctl, distributor, link, push):
        ident = answer_hello(distributor, link, 100, b"0", b"token-1")  # (the distributor's instance token)
        assert link.wait_registered(ctl)
        source = HLTCollectorInput(link)
        source.initialize()
        assert results(list(range(100, 110))) == 10
        distributor.send_multipart([ident, P.WHO])  # the distributor restarted: the new one does not know it
        # the new one's first id (its start time in µs), above every old one; another token
        answer_hello(distributor, link, 10**15, b"0", b"token-2")
        t0 = time.monotonic()
        while link.low < 10**15:
            link.service()
            assert time.monotonic() - t0 < 5
        assert results(list(range(105, 115))) == 5  # 5 copies of results taken, 5 first results of old events
        assert link.duplicates == 5 and link.orphaned == 5, (link.duplicates, link.orphaned)
        assert results(list(range(110, 115))) == 0 and link.duplicates == 10 and link.orphaned == 5
        assert source.dropped_in_run() == {"duplicates": 10, "repeated_keys": 0, "orphaned": 5}
        distributor.send_multipart([ident, P.WHO])  # and again: a third distributor, above the second's ids
        answer_hello(distributor, link, 2 * 10**15)  # (one that sends no token: a handover too)
        t0 = time.monotonic()
        while link.low < 2 * 10**15:
            link.service()
            assert time.monotonic() - t0 < 5
        assert results(list(range(115, 120))) == 5  # the first one's, late: first copies still
        assert results([10**15, 10**15 + 1]) == 2  # the second one's
        assert results(list(range(115, 120))) == 0 and link.duplicates == 15 and link.orphaned == 12


def test_the_farms_output_counts_the_errors_of_the_collectors_output_apart():
    """The collector's RUN_ENDED, summed by the distributor into the farm's output counts, had the module
    errors but not, of them, those of the collector's output (summary()'s errors_in_outputs: the events its
    output raised on, e.g. after its write failed), which reco.py's summary tells apart: in the farm a failing
    output looked like a failing chain. The report carries it, the distributor sums it over the runs and the
    output line says it."""
    from eclreco.hlt.collector import CollectorLink, run_report
    from eclreco.hlt.control import output_line
    import eclreco
    from helpers import CountingSource
    from hlt_helpers import free_address

    class FailingOutput(eclreco.Module):  # an output that raises on some events, as one whose write failed
        def writes_events(self):
            return True

        def event(self, batch):
            if set(np.asarray(batch.evt).tolist()) & {2, 9}:
                raise OSError("no space left on device")

    class FailingStep(eclreco.Module):
        def event(self, batch):
            if 4 in np.asarray(batch.evt).tolist():
                raise RuntimeError("a chain error")

    path = eclreco.create_path()
    path.add_module(CountingSource(n=20))
    path.add_module(FailingStep())
    path.add_module(FailingOutput())
    eclreco.process(path, batch_size=8, install_signal_handlers=False)
    s = eclreco.statistics.summary()
    assert (s["errors"], s["errors_in_outputs"]) == (3, 2), s

    farm = InProcessFarm()
    link = CollectorLink(free_address(), farm.d.addresses["control"])
    try:
        assert farm.d.ctl.poll(5000)
        farm.d.handle_control()  # its HELLO: the distributor takes it
        assert farm.d.collector is not None
        for run, name in ((1, "a.root"), (2, "b.root")):
            link.run_ended(run_report(link, run, name, 17, s))
            assert farm.d.ctl.poll(5000)
            farm.d.handle_control()
        o = farm.d.output
        assert (o["errors"], o["errors_in_outputs"]) == (6, 4), o
        line = output_line(farm.d.own_status())
        assert "module errors 6 (4 of them in the collector's output" in line, line
    finally:
        link.ctl.close(0)
        link.close()
        farm.close()


def failed_stop_with_leftovers(farm, n=100, saved=30, start_first=False, before_next=None):
    """Collector a confirms n events and saves `saved` of them; the stop's last write fails (its RUN_ENDED has
    output_error and, as the collector's, counts only the events it said SAVED) and a dies; b registers between the
    runs for the rest (leftovers of run 1; start_first: after a START of run 2, and before_next(control) is called
    before b registers). Returns (seqs, control peer, b)."""
    from eclreco.hlt import protocol as P

    d = farm.d
    a = farm.peer()
    collector_hello(farm, a, output="/data/a.root")
    seqs = farm.read_events(n)
    farm.send(a, P.CONFIRM, P.seqs_to_bytes(seqs))
    farm.send(a, P.SAVED, P.seqs_to_bytes(seqs[:saved]), str(saved).encode())
    d.pending.clear()  # (no worker here to take the ids off the queue)
    control = farm.peer()
    farm.send(control, P.STOP)
    d.housekeeping(time.monotonic())
    assert d.state == "stopped" and len(d.unsaved) == n - saved
    farm.send(a, P.RUN_ENDED, P.pack({"run_index": 1, "filename": "/data/a.root.incomplete", "received": saved,
                                      "events_written": saved, "output_error": "cannot write output file"}))
    d.housekeeping(time.monotonic())
    assert control.poll(5000) and P.unpack(control.recv_multipart()[1])["collector"]["output_error"]
    a.close(0)
    if start_first:  # the operator starts run 2 before hlt run's replacement collector registers
        reply = P.unpack(farm.send(control, P.START)[-1][1])
        assert reply["run_index"] == 2 and reply["leftovers_of"] == 1 and not d.accepting_input(), reply
        if before_next is not None:
            before_next(control)
    b, replies = next_collector(farm, instance="i8", pid=8, output="/data/a.2.root")
    assert replies[-1][2:] == [b"1", b"0", d.instance.encode()] and d.collector["leftovers_run"] == 1  # joins run 1, started
    assert len(d.events) == n - saved
    return seqs, control, b


def test_a_run_whose_input_waits_for_a_failed_stops_leftovers_says_so_in_the_status():
    """A START while a failed stop's leftovers wait for the next collector holds the new run's input until one has
    written them; when none registers (hlt run's restarts spent, a collector service down) the run reads nothing for
    ever, and only a line of the distributor's log and the START's reply said so: the status showed a running farm.
    The status says what holds the input and since when (`input_waits`, `hlt status`'s distributor row, the gauge
    eclreco_hlt_input_wait_seconds), until the leftovers are written."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import format_table

    farm = InProcessFarm(heartbeat_timeout_s=30.0, stop_drain_s=0.0)
    d = farm.d

    def input_waits(control):
        status = P.unpack(farm.send(control, P.STATUS)[-1][1])
        gauge = next(f for f in d.metrics_families() if f.name == "eclreco_hlt_input_wait_seconds").samples[0].value
        return status["processes"][0]["input_waits"], format_table(status), gauge

    def no_collector(control):
        d.run_started_at -= 5  # the run started 5 s ago and has read nothing since
        wait, table, gauge = input_waits(control)
        assert wait is not None and wait["leftovers_of"] == 1 and wait["events"] == 70, wait
        assert not wait["collector_writing"] and 5 <= wait["waited_s"] <= gauge < 30, (wait, gauge)
        assert "input held 5 s: 70 events of run 1 wait for a collector to register" in table, table

    try:
        assert d.own_status()["input_waits"] is None
        seqs, control, b = failed_stop_with_leftovers(farm, start_first=True, before_next=no_collector)
        wait, table, _ = input_waits(control)  # b registered: it writes them
        assert wait["collector_writing"] and "70 events of run 1 being written" in table, (wait, table)
        d.pending.clear()  # (no worker here to take the ids off the queue)
        farm.send(b, P.CONFIRM, P.seqs_to_bytes(seqs[30:]))
        d.housekeeping(time.monotonic())
        assert input_waits(control)[0]["collector_writing"]  # confirmed, not yet in its file
        farm.send(b, P.SAVED, P.seqs_to_bytes(seqs[30:]), b"70")
        farm.send(b, P.RUN_ENDED, P.pack({"run_index": 1, "filename": "/data/a.2.root", "received": 70,
                                          "events_written": 70}))
        wait, table, gauge = input_waits(control)
        assert wait is None and gauge == 0 and "input held" not in table and d.accepting_input(), (wait, table)
    finally:
        farm.close()


def test_the_start_after_a_failed_stop_does_not_call_the_failed_collector_alive():
    """A START just after a stop whose last write failed: the reply said "collector_alive": true for the
    collector that had reported its error and was exiting (heard from within the heartbeat time-out), and
    `hlt control start` did not warn that the run's events wait for the next collector. It says false now."""
    from eclreco.hlt import protocol as P

    farm = InProcessFarm(heartbeat_timeout_s=30.0, stop_drain_s=0.0)
    d = farm.d
    try:
        a = farm.peer()
        collector_hello(farm, a, output="/data/a.root")
        seqs = farm.read_events(10)
        farm.send(a, P.CONFIRM, P.seqs_to_bytes(seqs))
        d.pending.clear()  # (no worker here to take the ids off the queue)
        control = farm.peer()
        farm.send(control, P.STOP)
        d.housekeeping(time.monotonic())
        farm.send(a, P.RUN_ENDED, P.pack({"run_index": 1, "filename": "", "received": 0, "events_written": 0,
                                          "output_error": "cannot write output file"}))
        d.housekeeping(time.monotonic())
        assert control.poll(5000) and P.unpack(control.recv_multipart()[1])["collector"]["output_error"]
        reply = P.unpack(farm.send(control, P.START)[-1][1])
        assert reply["run_index"] == 2 and reply["leftovers_of"] == 1, reply
        assert reply["collector_alive"] is False, reply
    finally:
        farm.close()


def test_a_terminate_during_the_leftovers_of_a_failed_stop_counts_what_it_gives_up():
    """A terminate more than 30 s after a failed stop, while the next collector still writes the run's leftovers
    (a worker hung): the distributor took the stop's 30 s for the end of the run's report and exited with the
    leftovers held, counted nowhere (lost_at_stop 0). The terminate now waits for the leftovers (their run's
    RUN_ENDED) up to the stop's time-out, and counts what is still held then as lost_at_stop."""
    from eclreco.hlt import protocol as P

    farm = InProcessFarm(heartbeat_timeout_s=30.0, stop_drain_s=0.0, stop_timeout_s=1.0)
    d = farm.d
    try:
        seqs, control, b = failed_stop_with_leftovers(farm)
        d.stopped_at -= 31  # the terminate comes more than 30 s after the stop
        t0 = time.monotonic()
        farm.send(control, P.TERMINATE)
        d.serve()  # returns once the terminate is done
        waited = time.monotonic() - t0
        assert control.poll(5000)
        final = P.unpack(control.recv_multipart()[1])["processes"][0]
        assert final["lost_at_stop"] == 70 and final["held"] == 0, final
        assert waited >= 1.0, waited  # it waited for the leftovers, up to the stop's time-out
    finally:
        farm.close()


def test_a_terminate_waits_for_the_leftovers_of_a_failed_stop_to_be_written():
    """The other side of the above: leftovers written during the terminate are not given up."""
    from eclreco.hlt import protocol as P

    farm = InProcessFarm(heartbeat_timeout_s=30.0, stop_drain_s=0.0, stop_timeout_s=60.0)
    d = farm.d
    try:
        seqs, control, b = failed_stop_with_leftovers(farm)
        d.stopped_at -= 31
        farm.send(control, P.TERMINATE)
        d.pending.clear()
        b.send_multipart([P.CONFIRM, P.seqs_to_bytes(seqs[30:])])  # b writes them; its report ends their run
        b.send_multipart([P.SAVED, P.seqs_to_bytes(seqs[30:]), b"70"])
        b.send_multipart([P.RUN_ENDED, P.pack({"run_index": 1, "filename": "/data/a.2.root", "received": 70,
                                               "events_written": 70})])
        d.serve()
        assert control.poll(5000)
        final = P.unpack(control.recv_multipart()[1])["processes"][0]
        assert final["lost_at_stop"] == 0 and final["output"]["events_written"] == 100, final
    finally:
        farm.close()


def test_a_stop_as_the_leftovers_of_a_failed_stop_end_gets_its_own_runs_report():
    """A START, then a STOP while the next collector writes the leftovers of a failed stop of run 1: once they are
    confirmed, END_RUN 1 (the leftovers) and END_RUN 2 (the stop) go out together. The leftovers' RUN_ENDED came
    first and, the farm being stopped again, was taken as run 2's report: the stop's reply named run 1's file as
    run 2's. Only run 2's report answers the stop of run 2."""
    from eclreco.hlt import protocol as P

    farm = InProcessFarm(heartbeat_timeout_s=30.0, stop_drain_s=0.0)
    d = farm.d
    try:
        seqs, control, b = failed_stop_with_leftovers(farm)
        farm.send(control, P.START)
        assert d.run_index == 2 and not d.accepting_input()  # no input before the leftovers are written
        farm.send(control, P.STOP)
        d.pending.clear()  # (no worker here to take the ids off the queue)
        farm.send(b, P.CONFIRM, P.seqs_to_bytes(seqs[30:]))
        d.housekeeping(time.monotonic())
        assert d.state == "stopped"
        got = []
        while b.poll(200):
            got.append(b.recv_multipart())
        assert [f for f in got if f[0] == P.END_RUN] == [[P.END_RUN, b"1"], [P.END_RUN, b"2"]], got
        farm.send(b, P.SAVED, P.seqs_to_bytes(seqs[30:]), b"70")
        farm.send(b, P.RUN_ENDED, P.pack({"run_index": 1, "filename": "/data/a.2.root", "received": 70,
                                          "events_written": 70}))
        d.housekeeping(time.monotonic())
        assert not control.poll(300), P.unpack(control.recv_multipart()[1])  # run 1's report answers no stop of run 2
        reply = stop_reply_after_run_ended(farm, b, control, {"run_index": 2, "filename": "", "received": 0,
                                                             "events_written": 0})
        assert reply["run_index"] == 2 and reply["collector"]["run_index"] == 2 and not reply["timeout"], reply
        # run 1's leftovers came after run 1's reply: run 2's names their file (test_a_failed_stops_leftovers_file_...)
        assert reply["leftovers_written"] == [{"run_index": 1, "pid": 8, "host": "h", "output": "/data/a.2.root",
                                               "events_written": 70}], reply
        # run 2 was started and stopped without events: a farm run of its own, one without events
        assert (d.output["events_written"], d.output["runs"], d.output["runs_without_events"]) == (100, 2, 1), d.output
    finally:
        farm.close()


def test_a_collector_ends_one_run_per_end_run_read_together(zmq_context):
    """END_RUN N and N+1 read in one go (a stop just as the leftovers of a failed stop end): the collector took N+1
    as the index of the run that ended and never reported N+1 (its stop waited 30 s: "did not report the run's
    end"). Each END_RUN now ends one run: N the one in progress, N+1 the wait (or run) that follows."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.collector import HLTCollectorInput

    with collector_link_by_hand(zmq_context) as (ctl, distributor, link, _):
        ident = answer_hello(distributor, link, 100, b"0")  # joins run 1 (leftovers)
        assert link.wait_registered(ctl) and link.run_index == 1
        source = HLTCollectorInput(link)
        source.initialize()
        distributor.send_multipart([ident, P.END_RUN, b"1"])
        distributor.send_multipart([ident, P.END_RUN, b"2"])
        assert link.ctl.poll(5000)
        time.sleep(0.3)  # both arrived: read in one service()
        link.service()
        assert link.end_run and link.ended_run_index == 1, link.ended_run_index
        source.initialize()  # the next run (or wait) begins: ended by the second END_RUN
        assert link.end_run and link.ended_run_index == 2, link.ended_run_index
        source.initialize()
        assert not link.end_run


def test_the_events_a_failed_stop_hands_on_are_received_once_in_the_output():
    """The collector whose last write failed at the stop reported every event it received, and so did its
    replacement for the events it wrote again: "100 events written in 1 farm run(s) of 170 received". The failed
    one's report counts only the events it did not hand on (those it said SAVED: the collector's side is
    test_the_events_a_failed_stop_left_unsaved_go_to_a_file_of_their_run)."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import output_line

    farm = InProcessFarm(heartbeat_timeout_s=30.0, stop_drain_s=0.0)
    d = farm.d
    try:
        seqs, control, b = failed_stop_with_leftovers(farm)
        d.pending.clear()  # (no worker here to take the ids off the queue)
        farm.send(b, P.CONFIRM, P.seqs_to_bytes(seqs[30:]))
        farm.send(b, P.SAVED, P.seqs_to_bytes(seqs[30:]), b"70")
        farm.send(b, P.RUN_ENDED, P.pack({"run_index": 1, "filename": "/data/a.2.root", "received": 70,
                                          "events_written": 70}))
        line = output_line(d.own_status())
        assert line.startswith("output: 100 events written in 1 farm run(s) of 100 received;"), line
        assert_output_adds_up(line)
    finally:
        farm.close()


def test_a_start_before_the_next_collector_registers_waits_for_the_failed_stops_leftovers():
    """A START after a failed stop, before hlt run's replacement collector registers: the new collector joined
    run 2 and wrote run 1's events to farm_run2.root, mixed with run 2's input, and the failed collector was
    listed as a replaced collector of run 2 (its error counted twice). The next collector now joins run 1 for
    them, run 2 reads no input until they are written, and the output line adds up."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import output_line

    farm = InProcessFarm(heartbeat_timeout_s=30.0, stop_drain_s=0.0)
    d = farm.d
    try:
        seqs, control, b = failed_stop_with_leftovers(farm, start_first=True)
        assert d.run_index == 2 and d.state == "running" and not d.accepting_input()
        d.pending.clear()  # (no worker here to take the ids off the queue)
        farm.send(b, P.CONFIRM, P.seqs_to_bytes(seqs[30:]))
        d.housekeeping(time.monotonic())
        got = []
        while b.poll(200):
            got.append(b.recv_multipart())
        assert [f for f in got if f[0] == P.END_RUN] == [[P.END_RUN, b"1"]], got
        assert not d.accepting_input()  # confirmed, not yet in the file
        farm.send(b, P.SAVED, P.seqs_to_bytes(seqs[30:]), b"70")
        farm.send(b, P.RUN_ENDED, P.pack({"run_index": 1, "filename": "/data/a.2.root", "received": 70,
                                          "events_written": 70}))
        assert d.accepting_input()  # run 2's input, once run 1's leftovers are in their file
        o = d.output
        assert o["replaced_collectors"] == 0 and len(o["output_errors"]) == 1, o
        line = output_line(d.own_status())
        assert line.startswith("output: 100 events written in 1 farm run(s) of 100 received;"), line
        assert_output_adds_up(line)
    finally:
        farm.close()


def test_a_collector_takes_no_result_read_after_the_end_run_into_the_run_that_ended(zmq_context):
    """END_RUN N and the first results of run N+1 waiting together (a START came while the leftovers of a failed
    stop were written: their END_RUN opens the next run's input at once): the collector, woken by the results, read
    END_RUN and then took the results into run N's file, counted in run N's report (and a write of that batch that
    failed counted them as run N's). Every result of run N is confirmed before its END_RUN: what is read after it
    is the next run's, taken by the next run."""
    import eclreco
    from eclreco.hlt import protocol as P
    from eclreco.hlt.collector import HLTCollectorInput

    with collector_link_by_hand(zmq_context) as (ctl, distributor, link, push):
        ident = answer_hello(distributor, link, 100, b"0")  # joins run 1 (the leftovers)
        assert link.wait_registered(ctl)
        source = HLTCollectorInput(link)
        source.initialize()
        distributor.send_multipart([ident, P.END_RUN, b"1"])
        push.send(results_message(np.arange(200, 205), np.arange(5), run=2))
        assert link.ctl.poll(5000) and link.pull.poll(5000)
        time.sleep(0.2)
        out = eclreco.EventBatch(0)
        assert source.next_batch(out, 1000) is False and len(out) == 0, len(out)  # run 1 ends with none of them
        source.initialize()  # the next run takes them
        t0 = time.monotonic()
        while not len(out):
            assert time.monotonic() - t0 < 5
            source.next_batch(out, 1000)
        assert len(out) == 5 and set(np.asarray(out.run).tolist()) == {2}


def test_a_collector_stopped_while_the_run_stops_is_in_the_report_not_the_runs_report():
    """A collector stopped by SIGINT/SIGTERM while the distributor is stopping the run (draining its input, or
    waiting for the last confirmations): its RUN_ENDED came before any END_RUN and counts only its part of the run,
    but it was taken as the run's report. Its file was then named nowhere: not in the stop's replaced_collectors,
    not in the output line (as it is for one stopped while the run goes on), and the next collector's file,
    which holds the rest of the run, was the only one `hlt control stop` named. It is now a collector that left
    the run, as in a running one."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import output_line

    farm = InProcessFarm(heartbeat_timeout_s=30.0, stop_drain_s=0.0)
    d = farm.d
    try:
        seqs = farm.read_events(100)
        a = farm.peer()
        collector_hello(farm, a, output="/data/a.root")
        farm.send(a, P.CONFIRM, P.seqs_to_bytes(seqs[:70]))
        farm.send(a, P.SAVED, P.seqs_to_bytes(seqs[:70]), b"70")
        control = farm.peer()
        assert farm.send(control, P.STOP) == []
        d.housekeeping(time.monotonic())
        assert d.state == "stopping"  # 30 events held: it waits for their confirmation
        # SIGINT: a closes its file and reports, no END_RUN having asked for it
        farm.send(a, P.RUN_ENDED, P.pack({"run_index": 1, "filename": "/data/a.root", "received": 70,
                                          "events_written": 70}))
        d.housekeeping(time.monotonic())
        assert not control.poll(200)  # no answer to the stop: 30 events are not written
        a.close(0)
        b, _ = next_collector(farm, instance="i8", pid=8, output="/data/a.2.root")
        d.pending.clear()  # (no worker here to take the ids off the queue)
        farm.send(b, P.CONFIRM, P.seqs_to_bytes(seqs[70:]))
        farm.send(b, P.SAVED, P.seqs_to_bytes(seqs[70:]), b"30")
        d.housekeeping(time.monotonic())
        assert d.state == "stopped"
        reply = stop_reply_after_run_ended(farm, b, control, {"run_index": 1, "filename": "/data/a.2.root",
                                                             "received": 30, "events_written": 30})
        assert reply["collector"]["filename"] == "/data/a.2.root" and not reply["timeout"], reply
        assert reply["replaced_collectors"] == [{"pid": 7, "host": "h", "output": "/data/a.root", "saved": 70}], reply
        line = output_line(d.own_status())
        assert "100 events written in 1 farm run(s) of 100 received" in line, line
        assert "70 of them by 1 collector(s) stopped in the middle of a run, in their own file(s): /data/a.root" \
            in line, line
    finally:
        farm.close()


@pytest.mark.parametrize("confirmed", [20, 70], ids=["some_confirmed", "all_confirmed_none_saved"])
def test_a_collector_that_dies_writing_a_failed_stops_leftovers_hands_them_to_the_next_for_their_run(confirmed):
    """A START came after a failed stop of run 1; collector b registered and joined run 1 for its leftovers, and died
    (SIGKILL) before it had them in its file. The next collector c joined run 2 (the farm's run now): the leftovers
    went back to the queue and into c's file of run 2 (farm_run2.root), mixed with run 2's input, which was no longer
    held for them. c now joins run 1 for them as b did, and run 2's input waits again until they are written."""
    from eclreco.hlt import protocol as P

    farm = InProcessFarm(heartbeat_timeout_s=30.0, stop_drain_s=0.0)
    d = farm.d
    try:
        seqs, control, b = failed_stop_with_leftovers(farm, start_first=True)
        d.pending.clear()  # (no worker here to take the ids off the queue)
        farm.send(b, P.CONFIRM, P.seqs_to_bytes(seqs[30:30 + confirmed]))
        d.housekeeping(time.monotonic())
        b.close(0)  # SIGKILL: nothing of them said SAVED
        c, replies = next_collector(farm, instance="i9", pid=9, output="/data/a.3.root")
        assert replies[-1][2:] == [b"1", b"0", d.instance.encode()], replies  # joins run 1, not run 2
        assert d.collector["leftovers_run"] == 1 and d.input_waits_for_leftovers() == 1, d.collector
        assert not d.accepting_input() and len(d.events) == 70
        d.pending.clear()
        farm.send(c, P.CONFIRM, P.seqs_to_bytes(seqs[30:]))
        d.housekeeping(time.monotonic())
        got = []
        while c.poll(200):
            got.append(c.recv_multipart())
        assert [f for f in got if f[0] == P.END_RUN] == [[P.END_RUN, b"1"]], got
        farm.send(c, P.SAVED, P.seqs_to_bytes(seqs[30:]), b"70")
        farm.send(c, P.RUN_ENDED, P.pack({"run_index": 1, "filename": "/data/a.3.root", "received": 70,
                                          "events_written": 70}))
        assert d.accepting_input()
    finally:
        farm.close()


def test_late_results_a_failed_write_leaves_unsaved_are_counted_lost_not_dropped_silently(tmp_path, zmq_context):
    """A collector that outlived its distributor takes the late first results of the dead one's events (orphaned:
    no distributor holds them any more) and its write fails before they are in its file. The events of the
    distributor now go to the next collector; these go nowhere, and the collector's failure report (RUN_ENDED,
    output_error) counted them nowhere: received, rejected and the output line left them out, as if they had
    never arrived. The report counts them as received (the rejected ones as rejected) and the others as
    orphaned_lost, so that written + rejected + ... + orphaned_lost = received. A real collector process; the test
    is its distributor (ROUTER) and a worker (PUSH)."""
    from eclreco.hlt import protocol as P

    output = tmp_path / "farm.root"
    c = CollectorByHand(zmq_context, output, "600")
    proc, distributor, push, until = c.proc, c.distributor, c.push, c.until
    try:
        ident = until(P.HELLO)[0]
        distributor.send_multipart([ident, P.LOW, b"100", b"1", b"0"])  # registered, in run 1
        push.connect(c.results)
        push.send(results_message(np.arange(100, 110), np.arange(10)))
        assert P.seqs_from_bytes(until(P.CONFIRM)[2]).tolist() == list(range(100, 110))
        distributor.send_multipart([ident, P.WHO])  # the distributor restarted: the new one's ids start far above
        ident = until(P.HELLO)[0]
        distributor.send_multipart([ident, P.LOW, str(10**15).encode(), b"1", b"0"])
        c.until_status("low_watermark", 10**15)
        # late first results of the dead one's events, 3 of them rejected by the worker
        m = P.unpack(results_message(np.arange(110, 120), np.arange(10, 20)))
        m["rejections"] = [[i, "not_msgpack", "bad"] for i in (0, 1, 2)]
        m["meta"]["error_flags"]["data"] = np.array([1, 1, 1] + [0] * 7, "<u4").tobytes()
        push.send(P.pack(m))
        assert P.seqs_from_bytes(until(P.CONFIRM)[2]).tolist() == list(range(110, 120))
        size = os.path.getsize(output)  # the file's header: the results wait for the flush interval
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (size, size))
        distributor.send_multipart([ident, P.END_RUN, b"1"])  # the close writes them: it fails
        report = P.unpack(until(P.RUN_ENDED)[2])
        assert proc.wait(30) == 1
        assert "File too large" in report["output_error"] and report["events_written"] == 0, report
        # the 10 events of the distributor now are handed on (unsaved, the distributor has them); the 10 orphans
        # are in no file and held by no distributor: received, 3 rejected (in the worker's quarantine), 7 lost
        assert (report["received"], report["rejected"], report.get("orphaned_lost")) == (10, 3, 7), report
        assert report["rejected_by_reason"] == {"not_msgpack": 3}, report
        # the distributor sums them into the farm's output line, which adds up
        line = output_line_of_report(report)
        assert "output: 0 events written in 1 farm run(s) of 10 received; rejected 3," in line, line
        assert "; 7 late results of events of a distributor that died lost: a collector's write failed" in line, line
        assert_output_adds_up(line)
    finally:
        out = c.close()
    assert "; 7 late results of events of a distributor that died are lost with it (none holds them)" in out, out


def test_the_status_tables_collector_row_shows_the_runs_duplicates(tmp_path, zmq_context):
    """`hlt status`'s collector row shows the run's counts (received, processed, rejected), but its `dup` was the
    process's life's: after a collector SIGKILL in run 4 the next runs' rows said `dup 1486` while their stop replies
    said duplicates_run 0 (operator's drill). The row now shows the run's; `duplicates` (the life's) stays in the
    status. A real collector process; the test is its distributor (ROUTER) and a worker (PUSH)."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import format_table

    c = CollectorByHand(zmq_context, tmp_path / "farm.root", "0.01")
    try:
        ident = c.until(P.HELLO)[0]
        c.distributor.send_multipart([ident, P.LOW, b"100", b"1", b"0"])  # registered, in run 1
        c.push.connect(c.results)
        c.push.send(results_message(np.arange(100, 110), np.arange(10)))
        c.push.send(results_message([105, 106, 107], [5, 6, 7]))  # 3 copies (by sequence id)
        c.until_status("duplicates", 3)
        c.distributor.send_multipart([ident, P.END_RUN, b"1"])
        assert P.unpack(c.until(P.RUN_ENDED)[2])["duplicates_run"] == 3
        c.push.send(results_message(np.arange(110, 115), np.arange(5), run=2))  # run 2: no copy
        t0 = time.monotonic()
        while not ((st := P.unpack(c.until(P.STATUS)[2]))["run_index"] == 2 and st["received"] == 5):
            assert time.monotonic() - t0 < 10, st
        assert st["duplicates"] == 3 and st["duplicates_run"] == 0, st
        row = format_table({"processes": [st]}).splitlines()[-1]
        assert " dup 0 out farm" in row, row
    finally:
        c.close()


def test_a_failed_writes_report_counts_the_duplicates_and_orphans_of_what_it_saved(tmp_path, zmq_context):
    """A collector whose write fails in the middle of a run reports what it said SAVED (_output_failed); its
    duplicates_run, repeated_keys_run and orphaned_run were 0: the copies it dropped and the late results of a dead
    distributor's events that are in its kept file were missing from the output line ("duplicates dropped", "late
    results ... written"). They are those of the batches in its file, and every copy it dropped by sequence id; a
    producer's repeat in the batch it could not write is not counted (that batch goes to the next collector, which
    takes or drops it). A real collector process; the test is its distributor (ROUTER) and a worker (PUSH)."""
    from eclreco.hlt import protocol as P

    output = tmp_path / "farm.root"
    c = CollectorByHand(zmq_context, output, "0.01")
    proc, distributor, push, until, until_status = c.proc, c.distributor, c.push, c.until, c.until_status

    low = 10**15
    try:
        ident = until(P.HELLO)[0]
        distributor.send_multipart([ident, P.LOW, b"100", b"1", b"0"])  # registered, in run 1
        push.connect(c.results)
        push.send(results_message(np.arange(100, 110), np.arange(10)))
        until_status("saved", 10)
        distributor.send_multipart([ident, P.WHO])  # the distributor restarted: the new one's ids start far above
        ident = until(P.HELLO)[0]
        distributor.send_multipart([ident, P.LOW, str(low).encode(), b"1", b"0"])
        until_status("low_watermark", low)
        push.send(results_message(np.arange(110, 120), np.arange(10, 20)))  # 10 orphans, written and SAVED
        push.send(results_message([105, 106, 107], [5, 6, 7]))  # 3 copies (by sequence id)
        push.send(results_message([low], [0]))  # a producer's repeat of evt 0
        until_status("saved", 24)
        size = os.path.getsize(output)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (size, size))
        # its write fails: 5 new events, a repeat of evt 1 (handed on with the batch) and a copy of 108
        push.send(results_message([low + 1, low + 2, low + 3, low + 4, low + 5, low + 6, 108], [100, 101, 102, 103,
                                                                                               104, 1, 8]))
        report = P.unpack(until(P.RUN_ENDED)[2])
        assert proc.wait(30) == 1
        assert "File too large" in report["output_error"] and report["events_written"] == 20, report
        assert (report["received"], report["orphaned_run"], report["duplicates_run"],
                report["repeated_keys_run"]) == (20, 10, 5, 1), report
        line = output_line_of_report(report)
        assert "; duplicates dropped 5 (of them 1 with the exp/run/evt" in line, line
        assert "; 10 late results of events of a distributor that died written" in line, line
        assert_output_adds_up(line)
    finally:
        c.close()


def test_a_failed_writes_report_names_the_runs_its_kept_file_holds_in_dqm_parts(tmp_path, zmq_context):
    """Run 1's DQM is written, its late events go to a written 'part 2' and a 'part 3' still open, and the write
    fails (_output_failed): the report (RUN_ENDED with output_error) had no dqm_parts, so the output line and the
    stop's reply of such a run could not say that its DQM was in parts, as a successful one's do. It now names the
    parts in the kept file: 2 (part 3, open at the failure, is in no file). A real collector process; the test is
    its distributor (ROUTER) and a worker (PUSH)."""
    from eclreco.dqm import by_run, read_histograms
    from eclreco.hlt import protocol as P

    output = tmp_path / "farm.root"
    kept = str(output) + ".incomplete"
    c = CollectorByHand(zmq_context, output, "0.01")
    proc, distributor, push, until, until_status = c.proc, c.distributor, c.push, c.until, c.until_status

    def send(first, run, low=None):  # 5 results of `run` from sequence id `first`; then LOW (closes earlier runs)
        push.send(results_message(np.arange(first, first + 5), np.arange(first, first + 5), run=run))
        until_status("saved", first - 95)
        if low is not None:
            distributor.send_multipart([ident, P.LOW, str(low).encode()])

    def run1_cycles_in_file(n):  # the file, read while written (uproot: readable after every write)
        t0 = time.monotonic()
        while True:
            try:
                if len([h for h in read_histograms(str(output)) if h["name"] == "digits_per_event"
                        and "run 1" in h["title"]]) == n:
                    return
            except ValueError:
                pass
            assert time.monotonic() - t0 < 10
            time.sleep(0.1)

    try:
        ident = until(P.HELLO)[0]
        distributor.send_multipart([ident, P.LOW, b"100", b"1", b"0"])  # registered, in run 1
        push.connect(c.results)
        send(100, 1)
        send(105, 2, low=105)  # run 1 complete (its events all before run 2's first): written
        until_status("dqm_open_runs", [[1, 2]])
        send(110, 1)  # late: part 2
        send(115, 3, low=115)  # run 1's part 2 (and run 2) complete: written
        until_status("dqm_open_runs", [[1, 3]])
        run1_cycles_in_file(2)
        send(120, 1)  # late again: part 3, open
        until_status("dqm_runs_in_parts", [[1, 1, 3]])
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (os.path.getsize(output),) * 2)
        # its write fails (more than the space the file's rewritten metadata left free inside it)
        push.send(results_message(np.arange(125, 5125), np.arange(125, 5125), run=3))
        report = P.unpack(until(P.RUN_ENDED)[2])
        assert proc.wait(30) == 1
        assert "File too large" in report["output_error"] and report["filename"] == kept, report
        assert report["dqm_parts"] == [[1, 1, 2]], report
        line = output_line_of_report(report)
        assert f"; run (1, 1) written in 2 DQM parts in {kept} (a run's totals are the sum" in line, line
    finally:
        c.close()
    runs = {h["run"]: h for h in by_run(read_histograms(kept)) if h["name"] == "digits_per_event"}
    assert len(runs[(1, 1)]["cycles"]) == 2 and runs[(1, 1)]["counts"].sum() == 10, runs


def test_the_runs_written_in_dqm_parts_are_counted_in_a_prometheus_metric():
    """The runs a collector wrote in DQM parts were said in the output line, the stop's reply and `hlt status`,
    but no metric counted them: an alert could not see a farm whose runs' DQM is split (senders that interleave).
    eclreco_hlt_dqm_runs_in_parts_total counts each run of each RUN_ENDED's dqm_parts (dqm_runs_in_parts_total),
    read from the distributor's real exporter."""
    from test_hlt import scrape

    from eclreco.hlt import protocol as P
    from eclreco.metrics import serve_role_metrics

    farm = InProcessFarm()
    exporter = serve_role_metrics("distributor", 0, extra=farm.d.metrics_families, framework=False)
    try:
        assert "eclreco_hlt_dqm_runs_in_parts_total 0.0" in scrape(exporter.port)
        peer = farm.peer()
        collector_hello(farm, peer)
        farm.send(peer, P.RUN_ENDED, P.pack({"run_index": 1, "filename": "a.root", "received": 30,
                                             "events_written": 30, "dqm_parts": [[1, 1, 2], [1, 3, 3]]}))
        assert "eclreco_hlt_dqm_runs_in_parts_total 2.0" in scrape(exporter.port)
        assert farm.d.own_status()["output"]["dqm_runs_in_parts_total"] == 2
    finally:
        exporter.close()
        farm.close()


@pytest.mark.parametrize("how", ["killed", "write_failed"])
def test_a_collector_that_went_writing_a_failed_stops_leftovers_is_no_collector_of_the_next_run(how):
    """After a failed stop of run 1 and a START, collector b joined run 1 for its leftovers and went (SIGKILL, or its
    write failed) before they were all in its file; c wrote the rest. b was listed in run 2's stop reply
    (replaced_collectors), although its file holds run 1's events only. It is counted in the farm's output (its file
    named in the output line), not in run 2's reply."""
    from eclreco.hlt import protocol as P

    farm = InProcessFarm(heartbeat_timeout_s=30.0, stop_drain_s=0.0)
    d = farm.d
    try:
        seqs, control, b = failed_stop_with_leftovers(farm, start_first=True)
        d.pending.clear()  # (no worker here to take the ids off the queue)
        farm.send(b, P.CONFIRM, P.seqs_to_bytes(seqs[30:50]))
        farm.send(b, P.SAVED, P.seqs_to_bytes(seqs[30:50]), b"20")
        if how == "write_failed":
            farm.send(b, P.RUN_ENDED, P.pack({"run_index": 1, "filename": "/data/a.2.root.incomplete", "received": 20,
                                              "events_written": 20, "output_error": "cannot write output file"}))
        b.close(0)
        c, replies = next_collector(farm, instance="i9", pid=9, output="/data/a.3.root")
        assert replies[-1][2:] == [b"1", b"0", d.instance.encode()], replies  # joins run 1 for the leftovers
        d.pending.clear()
        farm.send(c, P.CONFIRM, P.seqs_to_bytes(seqs[50:]))
        d.housekeeping(time.monotonic())
        farm.send(c, P.SAVED, P.seqs_to_bytes(seqs[50:]), b"50")
        farm.send(c, P.RUN_ENDED, P.pack({"run_index": 1, "filename": "/data/a.3.root", "received": 50,
                                          "events_written": 50}))
        farm.send(control, P.STOP)
        d.housekeeping(time.monotonic())
        assert d.state == "stopped"
        reply = stop_reply_after_run_ended(farm, c, control, {"run_index": 2, "filename": "", "received": 0,
                                                             "events_written": 0})
        assert reply["run_index"] == 2 and reply["replaced_collectors"] == [], reply
        o = d.output
        if how == "write_failed":  # its report counts the 20 in its kept file
            assert o["failed_files"] == ["/data/a.2.root.incomplete"] and o["events_written"] == 100, o
        else:  # the 20 in its file, as its last SAVED said: "20 more saved by 1 replaced collector(s) ..."
            assert o["replaced_files"] == ["/data/a.2.root"] and (o["events_written"], o["saved_by_replaced"]) == (80, 20), o
    finally:
        farm.close()


def test_a_collector_that_dies_after_confirming_a_failed_stops_leftovers_keeps_the_next_runs_events_apart():
    """After a failed stop of run 1 and a START, collector b confirms every leftover of run 1: END_RUN 1 went out and
    run 2's input opened at once. b died before SAVED: c joined run 1 for the leftovers and got run 2's events read
    meanwhile with them, all written to run 1's file. Run 2's input now opens only once the leftovers are in their
    file (b's report of run 1): c gets the 70 leftovers of run 1 and nothing of run 2. The test reads the input
    whenever the distributor's loop would (accepting_input)."""
    from eclreco.hlt import protocol as P

    farm = InProcessFarm(heartbeat_timeout_s=30.0, stop_drain_s=0.0)
    d = farm.d
    try:
        seqs, control, b = failed_stop_with_leftovers(farm, start_first=True)
        d.pending.clear()  # (no worker here to take the ids off the queue)
        farm.send(b, P.CONFIRM, P.seqs_to_bytes(seqs[30:]))
        d.housekeeping(time.monotonic())
        if d.accepting_input():  # as serve() does: run 2's events come in
            farm.read_events(20)
        b.close(0)  # SIGKILL: nothing of the leftovers said SAVED
        c, replies = next_collector(farm, instance="i9", pid=9, output="/data/a.3.root")
        assert replies[-1][2:] == [b"1", b"0", d.instance.encode()], replies  # joins run 1
        assert sorted(d.events) == seqs[30:].tolist() and not d.accepting_input(), len(d.events)
        d.pending.clear()
        farm.send(c, P.CONFIRM, P.seqs_to_bytes(seqs[30:]))
        d.housekeeping(time.monotonic())
        assert not d.accepting_input()
        farm.send(c, P.SAVED, P.seqs_to_bytes(seqs[30:]), b"70")
        farm.send(c, P.RUN_ENDED, P.pack({"run_index": 1, "filename": "/data/a.3.root", "received": 70,
                                          "events_written": 70}))
        assert d.accepting_input() and d.input_waits_for_leftovers() is None  # run 2's input, now
    finally:
        farm.close()


def test_a_failed_stops_leftovers_whose_close_fails_go_to_a_file_of_their_run():
    """After a failed stop of run 1 and a START, collector b confirms every leftover of run 1 (END_RUN 1) and its write
    fails at the file's close: its RUN_ENDED (output_error) cleared the leftovers' run, run 2's input opened with the
    70 events held unsaved, and the next collector c joined run 2 with them (run 1's events in run 2's file). c now
    joins run 1 for them and run 2's input waits again."""
    from eclreco.hlt import protocol as P

    farm = InProcessFarm(heartbeat_timeout_s=30.0, stop_drain_s=0.0)
    d = farm.d
    try:
        seqs, control, b = failed_stop_with_leftovers(farm, start_first=True)
        d.pending.clear()  # (no worker here to take the ids off the queue)
        farm.send(b, P.CONFIRM, P.seqs_to_bytes(seqs[30:]))
        d.housekeeping(time.monotonic())
        farm.send(b, P.RUN_ENDED, P.pack({"run_index": 1, "filename": "/data/a.2.root.incomplete", "received": 0,
                                          "events_written": 0, "output_error": "cannot write output file"}))
        assert not d.accepting_input() and len(d.unsaved) == 70
        b.close(0)
        _, replies = next_collector(farm, instance="i9", pid=9, output="/data/a.3.root")
        assert replies[-1][2:] == [b"1", b"0", d.instance.encode()] and len(d.events) == 70, replies  # joins run 1, not run 2
    finally:
        farm.close()


def test_a_failed_stops_leftovers_all_saved_are_said_to_be_in_their_file_while_the_input_waits(capsys):
    """After a failed stop of run 1, collector b wrote its 70 leftovers, said SAVED for all of them and died before
    its report of run 1 (no new collector yet, the heartbeat time-out not reached). `hlt control start` warned that
    run 2 reads no input until they are in a file (they were), and `hlt status` said "0 events of run 1 being
    written". Both now say that they are in b's file and that the input waits for its report of run 1 (or a new
    collector); the START's reply and `input_waits` carry the file (leftovers_saved_in, saved_in)."""
    import threading

    from eclreco.cli import main
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import format_table

    farm = InProcessFarm(heartbeat_timeout_s=30.0, stop_drain_s=0.0)
    d = farm.d
    try:
        seqs, control, b = failed_stop_with_leftovers(farm)
        d.pending.clear()  # (no worker here to take the ids off the queue)
        farm.send(b, P.CONFIRM, P.seqs_to_bytes(seqs[30:]))
        d.housekeeping(time.monotonic())  # END_RUN 1 to b
        st = P.unpack(farm.send(control, P.STATUS)[-1][1])
        assert st["processes"][0]["input_waits"] is None  # stopped: no run's input to hold
        farm.send(b, P.SAVED, P.seqs_to_bytes(seqs[30:]), b"70")
        b.close(0)  # dies before its RUN_ENDED of run 1
        rc = []
        cli = threading.Thread(target=lambda: rc.append(main(["hlt", "control", "start", "--control",
                                                                d.addresses["control"], "--timeout", "10"])))
        cli.start()
        while cli.is_alive():  # the distributor answers the CLI's STATUS and START
            if d.ctl.poll(50):
                d.handle_control()
        cli.join()
        out, err = capsys.readouterr()
        reply = json.loads(out.strip().splitlines()[-1])
        assert "that its collector could not write are in a file of that run" not in err, err  # (they are)
        assert ("warning: run 2 reads no input yet: the events of run 1 that a failed stop left unsaved are in "
                "/data/a.2.root; the input waits for the collector's report of run 1 (or, if it died, for a new "
                "collector to register)") in err, err
        assert rc == [0] and reply["leftovers_of"] == 1 and reply["leftovers_saved_in"] == "/data/a.2.root", reply
        st = P.unpack(farm.send(control, P.STATUS)[-1][1])
        wait = st["processes"][0]["input_waits"]
        assert wait["events"] == 0 and wait["saved_in"] == "/data/a.2.root", wait
        table = format_table(st)
        assert "being written" not in table and ("input held 0 s: the events of run 1 that a failed stop left "
                                                 "unsaved are in /data/a.2.root; the input waits for") in table, table
    finally:
        farm.close()



@pytest.mark.parametrize("start", ["before", "after", "after_silent"],
                         ids=["start_before_it_registered", "start_after_it_died", "start_after_it_went_silent"])
def test_a_collector_that_dies_after_saving_a_failed_stops_leftovers_before_its_report_loses_none_of_them(start):
    """After a failed stop of run 1, collector b joined run 1 for its 70 leftovers, confirmed them (END_RUN 1), said
    SAVED for all of them and died (SIGKILL) before its RUN_ENDED of run 1. Its file holds them: none is produced
    again, the next collector c joins run 2 (nothing of run 1 is left to write), run 2's input opens once c is there,
    and the 70 are counted in the farm's output with b's file named (as a replaced collector's, of run 1: no part of
    run 2's stop reply). A START that came after b died reset b's counts as for the new run: its file was then
    counted with 0 events (named, "0 more saved"), the 70 in it counted nowhere; once b was silent at the START, its
    file was named nowhere either."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import output_line

    farm = InProcessFarm(heartbeat_timeout_s=30.0, stop_drain_s=0.0)
    d = farm.d
    try:
        seqs, control, b = failed_stop_with_leftovers(farm, start_first=start == "before")
        d.pending.clear()  # (no worker here to take the ids off the queue)
        farm.send(b, P.CONFIRM, P.seqs_to_bytes(seqs[30:]))
        d.housekeeping(time.monotonic())  # END_RUN 1 to b
        farm.send(b, P.SAVED, P.seqs_to_bytes(seqs[30:]), b"70")
        b.close(0)  # SIGKILL before its RUN_ENDED of run 1
        if start == "after_silent":
            d.collector["last_seen"] -= 31  # the START comes after the heartbeat time-out
        if start != "before":
            reply = P.unpack(farm.send(control, P.START)[-1][1])
            assert reply["run_index"] == 2, reply
        assert d.run_index == 2 and not d.events and not d.unsaved
        redelivered = d.c["redelivered"]
        c, replies = next_collector(farm, instance="i9", pid=9, output="/data/a_run2.root")
        assert replies[-1][2:] == [b"2", b"0", d.instance.encode()], replies  # joins run 2: run 1 has nothing left to write
        assert d.c["redelivered"] == redelivered and not d.events and not d.unsaved  # none produced again
        assert d.accepting_input() and d.input_waits_for_leftovers() is None  # run 2 proceeds
        run2 = farm.read_events(10)
        d.pending.clear()
        farm.send(c, P.CONFIRM, P.seqs_to_bytes(run2))
        farm.send(c, P.SAVED, P.seqs_to_bytes(run2), b"10")
        farm.send(control, P.STOP)
        d.housekeeping(time.monotonic())
        assert d.state == "stopped"
        reply = stop_reply_after_run_ended(farm, c, control, {"run_index": 2, "filename": "/data/a_run2.root",
                                                             "received": 10, "events_written": 10})
        assert reply["run_index"] == 2 and reply["replaced_collectors"] == [] and reply["lost_at_stop"] == 0, reply
        o = d.output
        assert (o["replaced_files"], o["saved_by_replaced"]) == (["/data/a.2.root"], 70), o
        line = output_line(d.own_status())
        assert line.startswith("output: 40 events written in 2 farm run(s) of 40 received;"), line
        assert "; 70 more saved by 1 replaced collector(s) in their own file(s): /data/a.2.root" in line, line
        assert d.c["lost_at_stop"] == 0 and d.c["confirmed"] == 110, dict(d.c)
    finally:
        farm.close()


def test_the_advice_for_a_run_in_several_files_names_the_files_without_dqm_in_the_plural():
    """Two files without the run's DQM (two collectors died mid-run) were 'A, B: its collector failed ...'."""
    from eclreco.hlt.control import several_files_text

    one = several_files_text({"run_index": 1, "files": ["a.root", "b.root"], "without_dqm": ["a.root"]})
    two = several_files_text({"run_index": 1, "files": ["a.root", "b.root", "c.root"], "without_dqm": ["a.root", "b.root"]})
    assert one == ("farm run 1's events are in 2 files (`eclreco dqm b.root` draws its DQM; a.root: its collector "
                   "failed or died mid-run, the DQM of the runs open then is in no file)"), one
    assert "a.root, b.root: their collectors failed or died mid-run" in two and "3 files" in two, two


class ControlProxy:
    """tests/_tcp_proxy.py between a collector and the distributor's control address: kill() breaks the
    collector's control connection (both ends see it closed, as after `ss -K` or a network glitch) while
    both processes live on; start() again takes the collector's reconnection."""

    def __init__(self, upstream: str):
        from hlt_helpers import free_port

        self.upstream = upstream.split("//", 1)[1]
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.p = None
        self.start()

    def start(self):
        self.p = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "_tcp_proxy.py"),
                                   str(self.port), self.upstream], stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "ready"

    def kill(self):
        self.p.kill()
        self.p.wait()

    def start_after(self, seconds: float):
        """The broken connection comes back in `seconds` (the glitch's end), from a thread."""
        import threading

        self.timer = threading.Timer(seconds, self.start)
        self.timer.start()

    def close(self):
        """At a test's end: after the pending start_after, if any, the proxy is killed."""
        if getattr(self, "timer", None) is not None:
            self.timer.join()
        self.kill()


def test_the_collectors_reconnection_to_the_same_distributor_is_no_handover():
    """The collector's control connection breaks (a network glitch) while its distributor lives, and gives up the
    events it held at a stop's time-out; the collector registers again with the same distributor, whose LOW has moved
    past them. The collector took every HELLO answer with a LOW above its own for a restarted distributor: it noted
    the ids in between as a dead distributor's, and a late result of a given-up event (counted lost_at_stop) was
    written and counted `orphaned` instead of dropped as a duplicate; each reconnect took one of the 16 handovers it
    remembers. The distributor now says who it is (a token made at its start) in that answer: the same one's is no
    handover. A real Distributor in process, a real CollectorLink through a TCP proxy (tests/_tcp_proxy.py)."""
    import zmq

    import eclreco
    from eclreco.hlt import protocol as P
    from eclreco.hlt.collector import CollectorLink, HLTCollectorInput
    from eclreco.hlt.distributor import Distributor
    from hlt_helpers import free_address

    d = Distributor(free_address(), free_address(), free_address(), stop_drain_s=0.0, stop_timeout_s=0.5)
    proxy = ControlProxy(d.addresses["control"])
    link = CollectorLink(free_address(), proxy.address)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(link.address)
    control = zmq.Context.instance().socket(zmq.DEALER)
    control.setsockopt(zmq.LINGER, 0)
    control.connect(d.addresses["control"])

    def pump(done, what):
        t0 = time.monotonic()
        while not done():
            assert time.monotonic() - t0 < 10, what
            d.read_input()
            d.handle_control()
            d.housekeeping(time.monotonic())
            link.service()
            time.sleep(0.01)

    def results(seqs, evts):
        """The collector's batch of a worker's results (the events it took)."""
        push.send(results_message(seqs, evts))
        out = eclreco.EventBatch(0)
        t0, dropped = time.monotonic(), link.duplicates + link.orphaned
        while not len(out) and link.duplicates + link.orphaned - dropped < len(seqs):
            assert time.monotonic() - t0 < 5
            source.next_batch(out, 1000)
        return len(out)

    try:
        push_events(d.addresses["input"], range(10))
        pump(lambda: len(d.events) == 10, "the distributor reads 10 events")
        seqs = sorted(d.events)
        pump(lambda: link.registered, "the collector registers")
        source = HLTCollectorInput(link)
        source.initialize()
        assert results(seqs[:5], range(5)) == 5
        source._confirm_previous()  # CONFIRM, and SAVED (no file here)
        pump(lambda: link.low == seqs[5], "the first 5 saved")
        proxy.kill()  # the glitch: the control connection breaks, both processes live on
        pump(lambda: not d.collector_connected(), "the distributor sees the connection go")
        control.send_multipart([P.STOP])
        pump(lambda: d.state == "stopped", "the stop times out")
        assert d.c["lost_at_stop"] == 5  # the 5 held by a worker, given up
        proxy.start()  # the glitch ends: the collector registers again with the same distributor, told END_RUN
        pump(lambda: link.low == d.low_watermark() > seqs[-1] and link.end_run, "the collector is back")
        assert not link.previous_ids, link.previous_ids  # no handover: the distributor lived
        source.initialize()  # the next run
        # a late result of a given-up event (the worker that held it sends it now): below LOW, a duplicate
        assert results([seqs[7]], [7]) == 0
        assert (link.duplicates, link.status()["orphaned"], source.dropped_in_run()["orphaned"]) == (1, 0, 0)
    finally:
        proxy.close()
        for s in (push, control):
            s.close(0)
        link.close()
        d.close(0)


def test_a_terminate_while_the_collectors_control_connection_is_broken_waits_for_it(tmp_path, roles):
    """A live collector whose control connection breaks reconnects under a new ZeroMQ identity and registers
    again with its next report. A terminate in that window gave up the events the collector had not yet
    confirmed (`terminating without a live collector: N unconfirmed events lost`, lost_at_stop N) although
    it wrote them: a closed connection was taken for a dead collector. Now the distributor waits for it a
    reconnect grace; the collector confirms them, closes its file and exits 0, nothing lost, each event once."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import request

    proxy = ControlProxy(roles.ctl)
    try:
        dist = roles.distributor()
        col = roles.start("collector", "--collector-addr", roles.col, "--control", proxy.address, "--metrics-port",
                          "-1", "-o", str(tmp_path / "out.root"), log="collector.log")
        roles.worker()
        roles.wait_up()
        push_events(roles.inp, range(300))
        roles.wait_confirmed(300)
        proxy.kill()  # the collector's control connection breaks; the glitch lasts 1 s
        push_events(roles.inp, range(300, 600))
        proxy.start_after(1.0)
        final = request(roles.ctl, P.TERMINATE, 60.0)
        d = final["processes"][0]
        log = (tmp_path / "distributor.log").read_text()
        assert d["lost_at_stop"] == 0 and d["confirmed"] == 600, (d, log)
        assert dist.wait(timeout=30) == 0 and col.wait(timeout=30) == 0, log
        evts = read_evt(tmp_path / "out.root")[0]
        assert sorted(evts.tolist()) == list(range(600)), log
    finally:
        proxy.close()


def _saved_then_control_broken(tmp_path, roles):
    """distributor, collector (its control link through a ControlProxy), worker: 300 events confirmed and in the
    file (none held), then the collector's control connection broken. Returns (proxy, distributor, collector)."""
    proxy = ControlProxy(roles.ctl)
    dist = roles.distributor()
    col = roles.start("collector", "--collector-addr", roles.col, "--control", proxy.address, "--metrics-port",
                      "-1", "--flush-interval", "0.2", "-o", str(tmp_path / "out.root"), log="collector.log")
    roles.worker()
    roles.wait_up()
    push_events(roles.inp, range(300))
    roles.wait_confirmed(300)
    t0 = time.monotonic()
    while (d := roles.dist())["unsaved"] or d["held"]:
        assert time.monotonic() - t0 < 30, d
        time.sleep(0.1)
    proxy.kill()
    return proxy, dist, col


def test_hlt_status_shows_a_collector_whose_control_connection_broke_as_reconnecting(tmp_path, roles):
    """In the reconnect grace (its control connection closed, not yet registered again) `hlt status` showed the
    collector in the state of its last report, `running`, as if nothing had happened. It says `reconnecting` now,
    in --json and in the table (its state column is wide enough), and the collector's own state once it is back."""
    from eclreco.hlt.control import format_table

    proxy = None
    try:
        proxy, dist, col = _saved_then_control_broken(tmp_path, roles)
        t0, states = time.monotonic(), []
        while time.monotonic() - t0 < 2.0:  # the grace: 2 s at the default --heartbeat-timeout
            st = {"processes": roles.status()}
            row = next(p for p in st["processes"] if p["role"] == "collector")
            states.append(row["state"])
            if row["state"] == "reconnecting":
                break
            time.sleep(0.05)
        assert states[-1] == "reconnecting", (states, (tmp_path / "distributor.log").read_text())
        line = next(x for x in format_table(st).splitlines() if x.startswith("collector"))
        assert " reconnecting " in line, line
        proxy.start()
        t0 = time.monotonic()
        while (row := next(p for p in roles.status() if p["role"] == "collector"))["state"] == "reconnecting":
            assert time.monotonic() - t0 < 10, row
            time.sleep(0.1)
        assert row["state"] not in ("reconnecting", "silent"), row  # its own report's again
    finally:
        if proxy is not None:
            proxy.close()


def test_hlt_status_shows_a_killed_collector_silent_once_the_reconnect_grace_is_over(tmp_path, roles, capsys):
    """Separate services, default time-outs (--heartbeat-timeout 5 s, a reconnect grace of 2 s): a SIGKILLed
    collector was `reconnecting` for the grace, then in its last report's state (`ready`/`running`) again until it was
    `silent` at 5 s, although the distributor gives it up (collector_lost) once the grace is over. Its row says
    `silent` from then on."""
    from eclreco import cli

    _kill_the_collector(tmp_path, roles, capsys, between_runs=False)
    t_kill, seen = time.monotonic(), []
    while (t := time.monotonic() - t_kill) < 4.5:  # short of the heartbeat time-out
        assert cli.main(["hlt", "status", "--control", roles.ctl, "--json"]) == 0
        row = next(p for p in json.loads(capsys.readouterr().out)["processes"] if p["role"] == "collector")
        seen.append((round(t, 2), row["state"], row["last_seen_s"]))
        time.sleep(0.1)
    # past the grace since it was last heard from (last_seen_s): what the distributor gives up
    late = [s for s in seen if s[2] > 2.0 + 0.2]
    assert late and all(s[1] == "silent" for s in late), seen
    assert all(s[1] in ("reconnecting", "silent") for s in seen if s[0] > 1.0), seen
    assert cli.main(["hlt", "status", "--control", roles.ctl]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("collector"))
    assert " silent " in row, row


def _collector_row(roles) -> dict:
    return next(p for p in roles.status() if p["role"] == "collector")


def _kill_the_collector(tmp_path, roles, capsys, between_runs: bool = True, distributor_args=()):
    """Separate services, default time-outs (--heartbeat-timeout 5 s, a reconnect grace of 2 s) unless
    distributor_args says otherwise: a run of 100 events confirmed and saved (and stopped with `hlt control stop`:
    between_runs), then its collector SIGKILLed."""
    from eclreco import cli

    roles.distributor(*distributor_args)
    col = roles.collector(tmp_path / "a.root", "a.log", "--flush-interval", "0.05")
    roles.worker()
    roles.wait_up()
    push_events(roles.inp, range(100))
    roles.wait_confirmed(100)
    t0 = time.monotonic()
    while roles.dist()["unsaved"]:
        assert time.monotonic() - t0 < 30, roles.dist()
        time.sleep(0.1)
    if between_runs:
        assert cli.main(["hlt", "control", "stop", "--control", roles.ctl, "--timeout", "60"]) == 0
        capsys.readouterr()
    col.kill()
    col.wait()


def test_a_start_after_the_reconnect_grace_of_a_killed_collector_warns_that_none_is_alive(tmp_path, roles, capsys):
    """A START 2-5 s after the collector was SIGKILLed (its connection closed past the reconnect grace: given up,
    `hlt status` says silent) said `collector_alive: true` until the heartbeat time-out: `hlt control start` did not
    warn "no live collector", and the dead one, taken for a collector of the new run, was listed in that run's
    `replaced_collectors` (saved 0, its earlier run's file) once the next collector registered."""
    from eclreco import cli
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import request

    _kill_the_collector(tmp_path, roles, capsys)
    t0 = time.monotonic()
    while (row := _collector_row(roles))["state"] != "silent":  # given up: past the grace, connection closed
        assert time.monotonic() - t0 < 30, row
        time.sleep(0.1)
    assert cli.main(["hlt", "control", "start", "--control", roles.ctl]) == 0
    err = capsys.readouterr().err
    # (the START came before the heartbeat time-out, after which it said no live collector already)
    assert _collector_row(roles)["last_seen_s"] < 5.0 - 0.2, "too slow to test the window: " + err
    assert "warning: no live collector" in err, err
    roles.collector(tmp_path / "b.root", "b.log", "--flush-interval", "0.05")
    push_events(roles.inp, range(100, 200))
    roles.wait_confirmed(200)
    reply = request(roles.ctl, P.STOP, 60.0)
    assert reply["collector"]["events_written"] == 100 and reply["replaced_collectors"] == [], reply


def test_the_distributor_warns_of_a_killed_collector_once_the_reconnect_grace_is_over(tmp_path, roles, capsys):
    """The distributor's stderr warning about a dead collector came only at the heartbeat time-out (5 s), although
    it gives up one whose connection stayed closed past the reconnect grace (2 s) at once (`hlt status`: silent).
    It comes then, saying that the connection is closed."""
    _kill_the_collector(tmp_path, roles, capsys)
    log, found = tmp_path / "distributor.log", None
    while True:
        text = log.read_text()  # (read before the status: said before a time not yet past the heartbeat time-out)
        row = _collector_row(roles)
        if "warning: the collector pid" in text:
            found = text
            break
        if row["last_seen_s"] > 5.0 - 0.2:
            break
        time.sleep(0.1)
    assert found is not None, text
    line = next(x for x in found.splitlines() if "warning: the collector pid" in x)
    assert "control connection" in line and "dead" in line, line


def test_a_start_and_stop_after_the_reconnect_grace_of_a_killed_collector_do_not_take_it_into_the_run(
        tmp_path, roles, capsys):
    """A STOP 2-5 s after the collector was SIGKILLed (given up: its connection closed past the reconnect grace,
    `hlt status` silent) took it for alive until the heartbeat time-out, as the START before it did: the START said
    it was no part of the new run, the STOP made it one again. The stop then waited for a report it could not send,
    and the next collector's HELLO listed it as a replaced collector of that run (`saved` 0, the file of its earlier
    run, said to hold no events: counted in `output`'s replaced_collectors and named in the farm's output line)."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import output_line, request

    _kill_the_collector(tmp_path, roles, capsys)
    t0 = time.monotonic()
    while (row := _collector_row(roles))["state"] != "silent":  # given up: past the grace, connection closed
        assert time.monotonic() - t0 < 30, row
        time.sleep(0.1)
    last_heard = time.monotonic() - row["last_seen_s"]
    assert request(roles.ctl, P.START, 10.0)["collector_alive"] is False
    t_stop = time.monotonic()
    reply = request(roles.ctl, P.STOP, 60.0)
    # (the STOP came before the heartbeat time-out, after which the collector was silent for it too)
    assert t_stop - last_heard < 5.0 - 0.3, "too slow to test the window"
    assert reply["collector"] is None and reply["timeout"] and reply["replaced_collectors"] == [], reply
    assert time.monotonic() - t_stop < 2.0, "the stop waited for the dead collector's report"
    b = roles.collector(tmp_path / "b.root", "b.log", "--flush-interval", "0.05")
    t0 = time.monotonic()
    while _collector_row(roles)["pid"] != b.pid:  # registered: the dead one is replaced
        assert time.monotonic() - t0 < 30, _collector_row(roles)
        time.sleep(0.1)
    assert roles.dist()["output"]["replaced_collectors"] == 0, roles.dist()["output"]
    final = request(roles.ctl, P.TERMINATE, 60.0)["processes"][0]
    assert "replaced collector" not in output_line(final), output_line(final)


def test_a_stop_whose_collector_was_killed_replies_once_the_reconnect_grace_is_over(tmp_path, roles):
    """A collector SIGKILLed in a run, everything saved, then `hlt control stop`: the stop waited for its report of
    the run's end until the heartbeat time-out (5 s after its last report), although the distributor gives it up
    once its connection stayed closed past the reconnect grace (2 s; `hlt status`: silent). It replies then, saying
    that no collector reported the run's end. With a heartbeat time-out of 60 s the two are far apart: the old
    stop replied at its 30 s fall-back, the new one at the grace."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import request

    _kill_the_collector(tmp_path, roles, None, between_runs=False, distributor_args=("--heartbeat-timeout", "60"))
    t_kill = time.monotonic()
    reply = request(roles.ctl, P.STOP, 60.0)
    waited = time.monotonic() - t_kill
    assert reply["timeout"] and reply["collector"] is None and reply["lost_at_stop"] == 0, reply
    # given up at the grace (2 s after its last report), not at the 30 s fall-back for a collector still alive
    assert waited < 20, (waited, (tmp_path / "distributor.log").read_text())


def test_a_stop_while_the_collectors_control_connection_is_broken_tells_it_the_run_ended_when_it_is_back(
        tmp_path, roles):
    """The END_RUN of a stop in the window in which the collector's control connection is broken went to its
    old ZeroMQ identity (dropped), and nothing told the collector again when it registered back: the stop waited
    30 s and replied `timeout: true` (the collector did not report the run's end) although it was alive and
    every event was in its file. Now the END_RUN goes again on its re-registration: the report comes."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import request

    proxy = None
    try:
        proxy, dist, col = _saved_then_control_broken(tmp_path, roles)
        proxy.start_after(1.0)
        t0 = time.monotonic()
        reply = request(roles.ctl, P.STOP, 60.0)
        waited = time.monotonic() - t0
        log = (tmp_path / "distributor.log").read_text()
        assert not reply["timeout"] and reply["collector"]["events_written"] == 300, (reply, log)
        assert waited < 15, (waited, log)
        assert reply["lost_at_stop"] == 0, reply
        assert sorted(read_evt(tmp_path / "out.root")[0].tolist()) == list(range(300)), log
    finally:
        if proxy is not None:
            proxy.close()


def test_a_terminate_while_the_collectors_control_connection_is_broken_gets_its_report_of_the_run(tmp_path, roles):
    """TERMINATE in a run, in the window in which the collector's control connection is broken: the run's END_RUN
    went to the collector's old ZeroMQ identity (dropped), the terminate waited 30 s for a report that could not
    come, and the final status said 0 events written in 0 runs. Now the END_RUN goes again when the collector is
    back: its report is in the final status, both exit 0, each event once in the file."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import request

    proxy = None
    try:
        proxy, dist, col = _saved_then_control_broken(tmp_path, roles)
        proxy.start_after(1.0)
        t0 = time.monotonic()
        final = request(roles.ctl, P.TERMINATE, 60.0)
        waited = time.monotonic() - t0
        d = final["processes"][0]
        log = (tmp_path / "distributor.log").read_text()
        assert d["lost_at_stop"] == 0 and d["output"]["events_written"] == 300 and waited < 15, (waited, d, log)
        assert dist.wait(timeout=30) == 0, log
        assert col.wait(timeout=15) == 0, log + (tmp_path / "collector.log").read_text()
        assert sorted(read_evt(tmp_path / "out.root")[0].tolist()) == list(range(300)), log
    finally:
        if proxy is not None:
            proxy.close()


def test_a_terminate_after_the_stop_waits_for_the_collector_to_be_back_to_tell_it(tmp_path, roles):
    """The run stopped and reported, then the collector's control connection breaks and TERMINATE comes: the
    distributor finished at once and sent TERMINATE to the collector's old ZeroMQ identity (dropped); the
    collector registered again with nobody and never exited. Now the terminate finishes once the collector is
    back (told TERMINATE: it exits 0) or lost (the reconnect grace)."""
    from eclreco.hlt import protocol as P
    from eclreco.hlt.control import request

    proxy = None
    try:
        proxy, dist, col = _saved_then_control_broken(tmp_path, roles)
        proxy.start()
        reply = request(roles.ctl, P.STOP, 60.0)
        assert not reply["timeout"] and reply["collector"]["events_written"] == 300, reply
        proxy.kill()
        proxy.start_after(1.0)
        final = request(roles.ctl, P.TERMINATE, 60.0)
        log = (tmp_path / "distributor.log").read_text()
        assert final["processes"][0]["lost_at_stop"] == 0, (final, log)
        assert dist.wait(timeout=30) == 0, log
        assert col.wait(timeout=15) == 0, log + (tmp_path / "collector.log").read_text()
        assert sorted(read_evt(tmp_path / "out.root")[0].tolist()) == list(range(300)), log
    finally:
        if proxy is not None:
            proxy.close()
