"""eclreco: command-line tools of the ECL reconstruction (modules, simulate, train, bench, hlt, ...)."""
from __future__ import annotations

import argparse
import importlib
import os
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
    ("eclreco.quarantine", "add_quarantine_parser"),
]


def build_parser() -> argparse.ArgumentParser:
    from eclreco.cli_types import CommandParser
    from eclreco.framework import version_text

    parser = CommandParser(prog="eclreco", description=__doc__)
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, func_name in SUBCOMMANDS:
        getattr(importlib.import_module(module_name), func_name)(sub)
    _describe_commands(parser)
    return parser


def _describe_commands(parser: argparse.ArgumentParser) -> None:
    """A command without a description of its own says in its --help what the command list says of it
    (`eclreco simulate --help` said nothing of what simulate does)."""
    for subs in (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)):
        for listed in subs._choices_actions:
            command = subs.choices[listed.dest]
            if command.description is None:
                command.description = listed.help
            _describe_commands(command)


def command_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The (sub-)parser of the command that `args` runs (`eclreco hlt run`: hlt run's)."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[name]


def main(argv=None) -> int:
    try:
        parser = build_parser()  # it creates modules for their defaults
    except ValueError as err:  # two modules of one name (framework._python_module_classes): one line, exit 2
        if os.environ.get("ECLRECO_TRACEBACK"):
            raise
        print(f"eclreco: error: {err}", file=sys.stderr, flush=True)
        return 2
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # with the usage of the command that got them, not the top level's
        command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):  # no command: a mistake in a script, so not exit 0
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `eclreco modules | head`: the reader is gone, nothing to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 1
    except Exception as err:  # noqa: BLE001 - zmq.ZMQError, onnxruntime's, ... alike
        # bad options, a missing or unwritable file, a refused parameter: one line, not a traceback
        # (ECLRECO_TRACEBACK=1 shows it, for a bug report)
        if os.environ.get("ECLRECO_TRACEBACK"):
            raise
        command = " ".join(filter(None, [args.command, getattr(args, "hlt_command", None)]))
        # a ValueError or OSError is a refusal whose message says what is wrong (an option, a file): the line
        # argparse and the commands' own checks print; any other type is named (KeyError: 'x' says little alone)
        kind = "" if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: "
        print(f"eclreco {command}: error: {kind}{err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: say so (a job cut short is not a job that ended), 128 + SIGINT
        command = " ".join(filter(None, [args.command, getattr(args, "hlt_command", None)]))
        print(f"eclreco {command}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
