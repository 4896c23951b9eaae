#!/usr/bin/env python3
"""HLT worker steering: events from the distributor -> standard reconstruction -> collector.

    eclreco hlt worker [steering/hlt_worker.py] --distributor tcp://HOST:5556 --collector tcp://HOST:5558

The input (HLTWorkerInput) takes raw events from the distributor by credit, the chain is the
standard one of steering/reco.py (eclreco.reconstruction.add_reconstruction, or --modules for a
reduced one), and ZMQOutput sends each batch to the collector. One eclreco.process() runs per
run of the farm; the process exits when the distributor says TERMINATE or on SIGINT/SIGTERM
(in-flight batches are finished and sent first).
"""
import argparse
import sys

import eclreco
from eclreco.hlt.worker import HLTWorkerInput, WorkerLink, add_worker_arguments, run_worker  # noqa: F401
from eclreco.hlt.cli import HelpFormatter
from eclreco.hlt.worker import add_output, start_worker
from eclreco.reconstruction import add_reconstruction


def build_reconstruction(path: eclreco.Path, args) -> None:
    if args.modules == "standard":
        add_reconstruction(path, cnn=not args.no_cnn, model=args.model)
    elif args.modules != "none":
        for name in args.modules.split(","):
            path.add_module(name.strip())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="eclreco hlt worker", description=__doc__, formatter_class=HelpFormatter)
    add_worker_arguments(ap)
    args = ap.parse_args(argv)
    # The path: HLTWorkerInput -> build_reconstruction(...) -> add_output (ZMQOutput to the collector)
    return start_worker(args, lambda path: build_reconstruction(path, args))


if __name__ == "__main__":
    sys.exit(main())
