"""RootOutput: read back with uproot."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import uproot

import eclreco
from helpers import CountingSource


def test_root_output_roundtrip(tmp_path):
    out = tmp_path / "out.root"
    path = eclreco.create_path()
    path.add_module(CountingSource(2500, run_length=1000))
    path.add_module("RootOutput", filename=str(out), basket_events=1000)
    eclreco.process(path, threads=2, batch_size=100)
    with uproot.open(out) as f:
        t = f["events"]
        assert t.num_entries == 2500
        arr = t.arrays(["evt", "run", "n_digits"], library="np")
        assert arr["evt"].tolist() == list(range(2500))
        assert arr["run"].tolist() == [e // 1000 for e in range(2500)]
        assert arr["n_digits"].tolist() == [e % 5 for e in range(2500)]
        # No clusters were produced: no made-up cluster branches.
        assert not any(k.startswith("cluster") for k in t.keys())


def test_root_output_valid_after_sigint(tmp_path):
    out = tmp_path / "sig.root"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import eclreco
        from helpers import CountingSource
        class Slow(eclreco.Module):
            '''slows the run down so that the signal arrives mid-run'''
            def event(self, batch):
                time.sleep(0.01)
        path = eclreco.create_path()
        path.add_module(CountingSource(10**9))
        path.add_module(Slow())
        path.add_module("ECLDQM")
        path.add_module("RootOutput", filename={str(out)!r}, basket_events=500)
        print("started", flush=True)
        eclreco.process(path, batch_size=100)
        print(eclreco.statistics, flush=True)
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "started"
    import time

    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    stdout, _ = p.communicate(timeout=60)
    assert p.returncode == 0, stdout
    with uproot.open(out) as f:
        n = f["events"].num_entries
        evt = f["events"]["evt"].array(library="np")
        dqm_entries = f["dqm/digits_per_event"].to_numpy()[0].sum()
    assert n > 0 and evt.tolist() == list(range(n))
    assert dqm_entries == n  # DQM histograms written at the end of the interrupted run
