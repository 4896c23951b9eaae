"""The standard reconstruction chain, shared by steering/reco.py, the HLT worker and the benchmarks."""
from __future__ import annotations

from eclreco.framework import Path


def add_reconstruction(path: Path, cnn: bool = True, leakage: bool = True, model: str = "",
                       cnn_threads: int = 1, conditions: str = "", detector: str = "") -> Path:
    """Unpacker -> clusterizer -> classical leakage correction -> CNN energy correction.
    conditions: ECLUnpacker's conditions file (docs/wire-format.md); '': the spec's defaults.
    detector: the events' detector when the job knows it (its own simulation): ECLEnergyCorrection then
    refuses a model of another detector at initialize ('': each event's, checked per event)."""
    path.add_module("ECLUnpacker", **({"conditions": conditions} if conditions else {}))
    path.add_module("ECLClusterizer")
    if leakage:
        path.add_module("ECLLeakageCorrection")
    if cnn:
        params = {"threads": cnn_threads}
        if model:
            params["model"] = model
        if detector:
            params["detector"] = detector
        path.add_module("ECLEnergyCorrection", **params)
    return path


# The files that options of the standard chain give to its modules: (option, module, parameter, args attribute)
CHAIN_FILE_OPTIONS = (("--conditions", "ECLUnpacker", "conditions", "conditions"),
                      ("--model", "ECLEnergyCorrection", "model", "model"))


def chain_file_error(args) -> str:
    """Why a file of --conditions or --model cannot be used (one line naming the option), '' when each can:
    the module that reads it is initialized with it, so that its own checks (JSON, payloads; an ONNX model)
    refuse it before the job, not at the job's initialize (reco.py: exit 1, after the other modules had
    started, with source locations; a worker: once its link and metrics were up)."""
    from eclreco.framework import create_module

    for option, module_name, param, dest in CHAIN_FILE_OPTIONS:
        path = getattr(args, dest, "")
        if not path:
            continue
        module = create_module(module_name)
        module.set_param(param, path)
        try:
            module.initialize()
        except RuntimeError as err:  # the message names the file (and the module, for the model)
            return f"{option}: {err}"
        module.terminate()
    return ""


def add_event_filter_arguments(ap) -> None:
    """The event filter options of steering/reco.py and the HLT worker (off by default)."""
    from eclreco.cli_types import NON_NEGATIVE, NON_NEGATIVE_INT
    from eclreco.framework import create_module

    g = ap.add_argument_group("event filter (ECLEventFilter: off unless a cut is set)")
    g.add_argument("--min-clusters", type=NON_NEGATIVE_INT, default=0,
                   help="keep events with at least N in-time clusters above --filter-cluster-energy")
    g.add_argument("--min-energy-sum", type=NON_NEGATIVE, default=0.0,
                   help="keep events whose in-time clusters above --filter-cluster-energy sum to at least GEV")
    # None when not given: the module's own default applies (one place for it), and a value given
    # without a cut is noticed even when it equals that default
    default = create_module("ECLEventFilter").param("cluster_energy_gev")
    g.add_argument("--filter-cluster-energy", type=NON_NEGATIVE, default=None,
                   help=f"GeV: the clusters counted (default: {default:g}, ECLEventFilter's cluster_energy_gev)")


def event_filter_option_unused(args) -> str:
    """The complaint when --filter-cluster-energy is set without a cut (the filter is then off); '' if not."""
    if getattr(args, "filter_cluster_energy", None) is not None and not (args.min_clusters or args.min_energy_sum):
        return "--filter-cluster-energy sets which clusters --min-clusters and --min-energy-sum count: neither is set"
    return ""


def add_event_filter(path: Path, args) -> bool:
    """ECLEventFilter with the options of add_event_filter_arguments, when a cut is set; True if added.
    (An `args` without them, from a worker steering file's own parser: no filter.)"""
    min_clusters, min_energy_sum = getattr(args, "min_clusters", 0), getattr(args, "min_energy_sum", 0.0)
    if not (min_clusters or min_energy_sum):
        return False
    threshold = getattr(args, "filter_cluster_energy", None)
    path.add_module("ECLEventFilter", min_clusters=min_clusters, min_energy_sum_gev=min_energy_sum,
                    **({} if threshold is None else {"cluster_energy_gev": threshold}))
    return True
