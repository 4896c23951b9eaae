import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def repo_dir():
    return REPO


@pytest.fixture
def zmq_context():
    """A ZeroMQ context destroyed at teardown (linger 0), also when the test fails. A failed test
    leaves its context and open sockets to the garbage collector; collected in one cycle at the
    end of the session, the context's __del__ can run first and wait in term() for a socket that is
    closed only after it: pytest then hangs after printing its summary (seen with a failing
    test_daq_emulator_delivers_everything), outside any test and its pytest-timeout."""
    import zmq

    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)
