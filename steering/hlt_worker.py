#!/usr/bin/env python3
"""HLT worker steering: events from the distributor -> standard reconstruction -> collector.

    eclreco hlt worker [steering/hlt_worker.py] --distributor tcp://HOST:5556 --collector tcp://HOST:5558

The input (HLTWorkerInput) takes raw events from the distributor by credit, the chain is the
standard one of steering/reco.py (eclreco.reconstruction.add_reconstruction, or --modules for a
reduced one), and ZMQOutput sends each batch to the collector. One eclreco.process() runs per
run of the farm; the process exits when the distributor says TERMINATE or on SIGINT/SIGTERM
(in-flight batches are finished and sent first).
"""
import sys

import eclreco
from eclreco.cli_types import CommandParser
from eclreco.hlt.worker import add_chosen_reconstruction, add_worker_arguments, start_worker


def build_reconstruction(path: eclreco.Path, args) -> None:
    """The worker's chain between HLTWorkerInput and the output: edit here. --modules picks the
    standard chain (eclreco.reconstruction.add_reconstruction), 'none' or a list of modules."""
    add_chosen_reconstruction(path, args)


def main(argv=None) -> int:
    ap = CommandParser(prog="eclreco hlt worker", description=__doc__)  # it records the options given
    add_worker_arguments(ap)
    args = ap.parse_args(argv)
    # The path: HLTWorkerInput -> build_reconstruction(...) -> ECLEventFilter (with --min-clusters or
    # --min-energy-sum) -> add_output (ZMQOutput to the collector)
    return start_worker(args, lambda path: build_reconstruction(path, args))


if __name__ == "__main__":
    sys.exit(main())
