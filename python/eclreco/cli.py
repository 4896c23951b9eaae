"""eclreco: command-line tools of the ECL reconstruction (modules, simulate, train, bench, hlt, ...)."""
from __future__ import annotations

import argparse
import importlib
import sys

# Sub-commands live next to the code they drive; each module exposes add_<name>_parser(subparsers)
# which registers the sub-command with `func` set (heavy imports, e.g. torch, happen inside the
# commands, so that building the parser stays fast).
SUBCOMMANDS = [
    ("eclreco.cli_modules", "add_modules_parser"),
    ("eclreco.sim.cli", "add_simulate_parser"),
    ("eclreco.daq", "add_daq_emulator_parser"),
    ("eclreco.train", "add_train_parser"),
    ("eclreco.validate", "add_validate_parser"),
    ("eclreco.bench", "add_bench_parser"),
    ("eclreco.hlt.cli", "add_hlt_parser"),
    ("eclreco.dqm", "add_dqm_parser"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eclreco", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, func_name in SUBCOMMANDS:
        getattr(importlib.import_module(module_name), func_name)(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
