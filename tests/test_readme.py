"""The README's code examples run as printed, and give the right answer with threads > 1."""
import os
import re

import numpy as np

import eclreco
from eclreco.sources import ArraySource
from helpers import forced_thread_switches

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_block(marker: str) -> str:
    """The ```python block of the README that contains `marker`."""
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    block, = [b for b in blocks if marker in b]
    return block


def test_high_energy_count_counts_every_cluster_with_two_threads():
    """HighEnergyCount's `self.n += ...` ran on two batches at once and lost counts (408 of 455 in a
    newcomer's run); forced thread switches make that near certain, the lock makes it exact."""
    namespace = {}
    exec(readme_block("class HighEnergyCount"), namespace)
    n_events = 20000
    offsets = np.arange(n_events + 1) * 3
    energy = np.tile(np.array([0.5, 1.5, 2.5], np.float32), n_events)
    with forced_thread_switches():
        module = namespace["HighEnergyCount"]()
        path = eclreco.create_path()
        path.add_module(ArraySource("ECLClusters", offsets, {"energy": energy}))
        path.add_module(module)
        eclreco.process(path, threads=2, batch_size=1, install_signal_handlers=False)
    assert module.n == 2 * n_events
