"""Small modules shared by the tests."""
import contextlib
import sys

import numpy as np

import eclreco


def kill_if_running(*procs):
    """Kills each subprocess that still runs and waits for it: the `finally:` of a test that starts one, so that a
    failed assertion leaves no process (nor a zombie) behind. One that has ended is left as it is."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@contextlib.contextmanager
def forced_thread_switches(interval_s=1e-6):
    """Python threads switch every `interval_s` (5 ms by default): a race on module state shows
    in nearly every run instead of now and then."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


class CountingSource(eclreco.Module):
    """Synthetic events: evt = 0..n-1, a run change every `run_length` events, i % 5 digits each."""

    def __init__(self, n=1000, run_length=0):
        super().__init__()
        self.add_param("n", n, "events")
        self.add_param("run_length", run_length, "events per run (0: one run)")
        self.next = 0

    def is_source(self):
        return True

    def next_batch(self, batch, max_events):
        n = min(max_events, self.param("n") - self.next)
        evt = np.arange(self.next, self.next + n)
        batch.resize(n)
        batch.evt[:] = evt
        batch.exp[:] = 1
        rl = self.param("run_length")
        batch.run[:] = evt // rl if rl else 0
        counts = evt % 5
        offsets = np.concatenate([[0], np.cumsum(counts)])
        cell = (np.arange(offsets[-1]) % 8736 + 1).astype(np.int32)
        batch.add_collection("ECLDigits", offsets, {"cell": cell, "energy": (cell * 1e-4).astype(np.float32)})
        self.next += n
        return self.next < self.param("n")


class Recorder(eclreco.Module):
    """Ordered sink that records what it sees."""

    def __init__(self):
        super().__init__()
        self.evt, self.digit_sums, self.runs, self.flags = [], [], [], []

    def ordered(self):
        return True

    def begin_run(self, exp, run):
        self.runs.append((exp, run))

    def event(self, batch):
        self.evt.extend(batch.evt.tolist())
        self.flags.extend(batch.error_flags.tolist())
        d = batch["ECLDigits"]
        sums = np.add.reduceat(np.append(d["energy"], 0), d.offsets[:-1]) * (np.diff(d.offsets) > 0)
        self.digit_sums.extend(sums.tolist())


def assert_checked_float(call, name):
    """`call(x)` takes x as one real-number argument `name` (checked_float in the bindings): an int or a float,
    Python's or numpy's, or a 0-d array of one, is read as that number; a bool (not 0.0 / 1.0), a string, None, a
    complex value or an array of several entries is a TypeError, an int past a double a ValueError, each naming
    `name` (pybind11's cast read True as 1.0 and refused the others with a message naming nothing)."""
    import re

    import pytest

    want = call(1.0)
    for same in (1, np.int64(1), np.uint8(1), np.float32(1.0), np.float16(1.0), np.longdouble(1.0), np.array(1.0),
                 np.array(1, np.int32)):
        np.testing.assert_equal(call(same), want, err_msg=f"{name} = {same!r}")
    for bad in (True, np.True_, False, "1", None, 1j, np.complex64(1), np.array(True), np.array([1.0, 2.0]),
                np.array([1, 2]), [1.0]):
        shown = re.escape(f"{type(bad).__name__} {bad!r}")
        with pytest.raises(TypeError, match=rf"^{name} must be a real number \(an int or a float\), not {shown}$"):
            call(bad)
    with pytest.raises(ValueError, match=rf"^{name} = {2**1100} is out of range of a float$"):
        call(2**1100)


def assert_checked_integer(call, name, value, digits, signed=True):
    """`call(x)` takes x as one integer argument `name` (checked_integer<T> in the bindings; T: `digits` value bits,
    signed or not, e.g. 31 / True for int, 32 / False for uint32): a Python or numpy int, or a 0-d integer array, is
    read as that number (`value`: one that T and uint8 hold); a bool (not 0 / 1), a float (not truncated), a string,
    None or an array of several entries is a TypeError, a value past T a ValueError, each naming `name` (pybind11's
    cast read True as 1 and refused the others with its several-line "incompatible function arguments")."""
    import re

    import pytest

    want = call(value)
    for same in (np.int64(value), np.uint8(value), np.array(value), np.array(value, np.int32)):
        np.testing.assert_equal(call(same), want, err_msg=f"{name} = {same!r}")
    for bad in (True, np.True_, False, float(value), np.float64(value), "1", None, np.array(True), np.array([1, 2])):
        shown = re.escape(f"{type(bad).__name__} {bad!r}")
        with pytest.raises(TypeError, match=rf"^{name} must be an int, not {shown}$"):
            call(bad)
    lo = -2**digits if signed else 0
    shown_range = re.escape(f"({'-2**' + str(digits) if signed else '0'} .. 2**{digits} - 1)")
    for bad in (lo - 1, 2**digits, 2**70):
        with pytest.raises(ValueError, match=rf"^{name} = {bad} is out of range {shown_range}$"):
            call(bad)
