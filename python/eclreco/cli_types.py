"""argparse types that refuse numbers out of an option's range, so that a bad value is one line and exit
code 2 at the command line, before any socket or file is opened.

Without them `--chunk 0` started a distributor that never dispatched (and whose stop hung),
`--heartbeat nan` a worker that never sent a heartbeat, `--timeout inf` an OverflowError.
"""
from __future__ import annotations

import argparse
import math

from eclreco import _core


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (where it has one: not for flags, empty strings and lists), and
    a command's description as written."""

    def _get_help_string(self, action):
        # identity, not ==: a default of 0 (== False) is a default to show
        if action.default is None or action.default is False or action.default in ("", []):
            return action.help
        return super()._get_help_string(action)


GIVEN = "options_given"  # the namespace attribute: the dests of the options on the command line


def _recording(action_class):
    """`action_class`, which also notes its dest in the namespace's GIVEN set when the command line gives it."""

    class Recording(action_class):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            namespace.__dict__.setdefault(GIVEN, set()).add(self.dest)

    Recording.__name__ = action_class.__name__
    return Recording


class CommandParser(argparse.ArgumentParser):
    """The parser of `eclreco`, of each of its commands (add_subparsers makes the parent's class) and of reco.py:
    one formatter for all, so that every --help shows the defaults (simulate's and bench's showed none); and
    each records which options the command line gave (option_given)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
        for name in (None, "store", "store_const", "store_true", "store_false", "append", "append_const", "count",
                     "extend"):
            self.register("action", name, _recording(self._registry_get("action", name)))

    def parse_known_args(self, args=None, namespace=None):
        # an empty record where nothing is given, so that option_given can tell "none" from "not recorded"
        # (a command's sub-parser records in its own namespace, which argparse copies over its parent's)
        return super().parse_known_args(args, argparse.Namespace(**{GIVEN: set()}) if namespace is None else namespace)


def option_dest(option: str) -> str:
    """argparse's attribute of `option`: '--metrics-port' -> 'metrics_port'."""
    return option.lstrip("-").replace("-", "_")


def option_given(args, option: str, default=None) -> bool:
    """Whether the command line gave `option` ('--flush-interval'), whatever its value: an option that does not
    apply is refused when given, also with its default's value (compared with the default, that one passed
    silently). Where the parser recorded nothing (a steering file's own argparse parser), a value other than
    `default`; an option `args` does not have is not given."""
    dest = option_dest(option)
    if hasattr(args, GIVEN):
        return dest in getattr(args, GIVEN)
    return getattr(args, dest, default) != default


def integer(lo: int, hi: int | None = None, meaning: str = ""):
    """An int in lo..hi (hi None: no upper bound); `meaning` names special values for the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bounds = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be {bounds}{meaning}, not {value}")
        return value

    parse.__name__ = "integer"  # argparse's message for a type error names it
    return parse


def number(lo: float = 0.0, hi: float | None = None, positive: bool = False, meaning: str = "",
           below: bool = False):
    """A finite float in lo..hi (> lo with positive, < hi with below): NaN and inf are refused, they would
    wait forever or overflow a timer."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if (not math.isfinite(value) or value < lo or (positive and value == lo)
                or (hi is not None and (value > hi or (below and value == hi)))):
            if hi is None:
                bounds = f"{'>' if positive else '>='} {lo:g}"
            elif positive or below:
                bounds = f"{'>' if positive else '>='} {lo:g} and {'<' if below else '<='} {hi:g}"
            else:
                bounds = f"in {lo:g}..{hi:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds}{meaning}, not {text}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE_INT = integer(1)
NON_NEGATIVE_INT = integer(0)
NON_NEGATIVE = number(0.0)  # seconds or ms where 0 means "none" or "at once"
POSITIVE = number(0.0, positive=True)
METRICS_PORT = integer(-1, 65535, " (-1: none, 0: a free port)")
THREADS = integer(1, _core.MAX_THREADS)  # the bounds of eclreco.process, checked before a farm starts
BATCH_SIZE = integer(1, _core.MAX_BATCH_SIZE)
# the simulation's numbers, as SimulationInput takes them (reco.py's embedded simulation) and `eclreco simulate`
SIM_ENERGY = number(0.0, 1e3, positive=True, below=True)  # GeV
SIM_BACKGROUND = number(0.0, 100.0)  # 1 = nominal
SIM_SEED = integer(0, 2**63 - 1)  # SimulationInput's int64 parameter: one seed means the same events in both
EXP_RUN = integer(0, 2**64 - 1)  # exp and run of the wire format: 64-bit unsigned


def zmq_address(free: bool = False, connect: bool = False):
    """A ZeroMQ address (argparse type) that libzmq would not misread (raw_sockets.check_address): a typo is the
    option's one line, exit 2, before any socket (a role's ValueError after the parse named no option).
    free: '' is taken too, for "a free local port" (hlt run's own addresses). connect: an address only connected
    to, where a wildcard (tcp://*:P, tcp://H:* or port 0, ipc://*) was libzmq's bare 'ZMQError: Invalid argument'
    (port 0: a connection to nothing, and a wait for an answer)."""

    def parse(text: str) -> str:
        from eclreco.raw_sockets import check_address, tcp_port

        if free and text == "":
            return text
        try:
            check_address(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        port = tcp_port(text)
        if connect and (text == "ipc://*" or (port is not None and (port in ("*", "0") or
                                                                    text[6:].startswith(("*:", ":"))))):
            raise argparse.ArgumentTypeError(f"ZeroMQ address {text!r} is connected to: name its host and port "
                                             "(a wildcard or port 0 is for an address that is bound)")
        return text

    parse.__name__ = "zmq_address"
    return parse


ADDRESS = zmq_address()
CONNECT_ADDRESS = zmq_address(connect=True)


METRICS_HOST = "127.0.0.1"  # the interface of every exporter unless --metrics-host says another


def metrics_host_unused(args, port_option: str = "--metrics-port") -> str:
    """Why an HLT role's --metrics-host does nothing, '' when it does: `port_option` (its value in `args`) is -1,
    no exporter, and --metrics-host is given (option_given; it was ignored: a scrape of it found nothing). reco.py,
    whose 'none' is port 0, refuses the same in its parser."""
    port = getattr(args, option_dest(port_option))
    if port < 0 and option_given(args, "--metrics-host", METRICS_HOST):
        return (f"--metrics-host {args.metrics_host!r} is the interface of the metrics exporter: {port_option} -1 "
                "starts none")
    return ""


def metrics_host(text: str) -> str:
    """An interface the Prometheus exporter can listen on (argparse type): the name resolves and is this machine's,
    tried by binding a free port of it, as prometheus_client binds (first address of getaddrinfo), and closing it.
    Found at the exporter's start, a typo was an OSError that named no option, in an HLT role after its sockets."""
    import socket

    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(text, 0, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            s.bind(sockaddr)
    except (OSError, UnicodeError) as err:  # gaierror (no such name), EADDRNOTAVAIL (another machine's address)
        why = getattr(err, "strerror", None) or str(err)
        raise argparse.ArgumentTypeError(f"cannot serve metrics on {text!r}: {why}") from None
    return text


def input_file(what: str):
    """A file that can be read (argparse type; `what` says what it should be): a missing path, a directory
    or an unreadable file is the option's one line naming it, exit 2, not open's OSError after the parse."""
    from eclreco.paths import unreadable_file

    def parse(text: str) -> str:
        if why := unreadable_file(text, what):
            raise argparse.ArgumentTypeError(f"{text!r}: {why}")
        return text

    parse.__name__ = "input_file"
    return parse


def name_list(text: str) -> list[str]:
    """A comma-separated list of distinct names (column names: identifiers), e.g. energy,theta,lat."""
    names = [n.strip() for n in text.split(",")]
    if not all(n.isidentifier() for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"must be distinct names separated by commas, not {text!r}")
    return names


def choice_list_error(names, choices, what: str) -> str:
    """Why `names` (a list) is not a list of distinct names of `choices` ('' when it is; `what` names one: 'size'):
    the refusal of choice_list at the command line and of the Python API the option feeds (train.run_training's
    sizes), so that both say the same. A string is refused as such: list('small') was five names ("unknown size
    's'")."""
    if isinstance(names, (str, bytes)):
        return f"a list of {what} names, not the string {names!r} (give [{names!r}])"
    names = list(names)
    if not names or names == [""]:
        return f"no {what} named (one or more of {', '.join(choices)}, separated by commas)"
    for k, name in enumerate(names):
        if name not in choices:
            return f"unknown {what} {name!r} ({', '.join(choices)})"
        if name in names[:k]:
            return f"{what} {name!r} is listed twice"
    return ""


def choice_list(choices, what: str):
    """A comma-separated list of distinct names of `choices` (argparse type; `what` names one: 'size'), checked by
    choice_list_error. An empty value is refused: `--sizes ''` was read as no list, and the default was used without
    a word."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",")]
        if why := choice_list_error(names, choices, what):
            raise argparse.ArgumentTypeError(why)
        return names

    parse.__name__ = "choice_list"
    return parse


def add_cluster_columns_argument(ap, who: str) -> None:
    """--cluster-columns: the ECLClusters columns RootOutput writes as cluster_<column> branches."""
    from eclreco.modules.root_output import DEFAULT_CLUSTER_COLUMNS

    # The default is a string, which argparse passes through name_list like a given value: shown once
    # as %(default)s, with spaces where --help may wrap it (a list was shown twice, cut mid-word).
    ap.add_argument("--cluster-columns", type=name_list, default=", ".join(DEFAULT_CLUSTER_COLUMNS),
                    help=f"{who}ECLClusters columns written as cluster_<column> branches (comma-separated; default: "
                         "%(default)s; e.g. add lat,second_moment,n_maxima)")
