"""The standard reconstruction chain, shared by steering/reco.py, the HLT worker and the benchmarks."""
from __future__ import annotations

from eclreco.framework import Path


def add_reconstruction(path: Path, cnn: bool = True, leakage: bool = True, model: str = "",
                       cnn_threads: int = 1, conditions: str = "") -> Path:
    """Unpacker -> clusterizer -> classical leakage correction -> CNN energy correction.
    conditions: ECLUnpacker's conditions file (docs/wire-format.md); '': the spec's defaults."""
    path.add_module("ECLUnpacker", **({"conditions": conditions} if conditions else {}))
    path.add_module("ECLClusterizer")
    if leakage:
        path.add_module("ECLLeakageCorrection")
    if cnn:
        params = {"threads": cnn_threads}
        if model:
            params["model"] = model
        path.add_module("ECLEnergyCorrection", **params)
    return path
