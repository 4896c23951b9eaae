"""`eclreco modules [NAME]`: list modules, or print one module's parameters (like `basf2 -m`)."""
from __future__ import annotations

import sys
import textwrap


def print_module_list() -> None:
    from eclreco.framework import available_modules

    modules = available_modules()
    width = max(len(n) for n in modules)
    for name, description in modules.items():
        print(f"{name:<{width}}  {description}")


DEFAULT_WIDTH = 30  # characters of the Default column


def print_module_help(name: str) -> None:
    from eclreco.framework import create_module

    module = create_module(name)
    print(f"{module.type}: {module.description}\n")
    # what the processor checks at initialize (docs/architecture.md, "Modules and paths")
    for what, names in (("Requires", module.requires()), ("Makes", module.makes())):
        print(f"{what}: {'(not said)' if names is None else ', '.join(names) or '(none)'}"
              f"{' (default parameters)' if names else ''}")
    print()
    params = module.param_list()
    if not params:
        print("(no parameters)")
        return
    # a long default (RootOutput's list of cluster columns) is wrapped in its column, as the description
    # is: the table stays ~100 characters wide
    rows = [(p["name"], p["type"], textwrap.wrap(p["default_repr"], DEFAULT_WIDTH, break_on_hyphens=False) or [""],
             textwrap.wrap(p["description"], 60) or [""]) for p in params]
    w = [max(len(r[0]) for r in rows + [("Parameter",)]), max(len(r[1]) for r in rows + [("", "Type")]),
         max([len("Default")] + [len(line) for r in rows for line in r[2]])]
    print(f"{'Parameter':<{w[0]}}  {'Type':<{w[1]}}  {'Default':<{w[2]}}  Description")
    print("-" * (sum(w) + 6 + 40))
    for n, t, default, desc in rows:
        for k in range(max(len(default), len(desc))):
            d = default[k] if k < len(default) else ""
            line = desc[k] if k < len(desc) else ""
            print(f"{n if k == 0 else '':<{w[0]}}  {t if k == 0 else '':<{w[1]}}  {d:<{w[2]}}  {line}".rstrip())


def _run(args) -> int:
    if args.name is not None:  # '' too: no module has that name (it printed the list)
        try:
            print_module_help(args.name)
        except ValueError as err:  # a bad argument: one line, exit 2 as argparse's
            print(f"eclreco modules: error: {err}", file=sys.stderr)
            return 2
    else:
        print_module_list()
    return 0


def add_modules_parser(subparsers) -> None:
    p = subparsers.add_parser("modules", help="list modules, or show the parameters of one")
    p.add_argument("name", nargs="?", help="module name")
    p.set_defaults(func=_run)
