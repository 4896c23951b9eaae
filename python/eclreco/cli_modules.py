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


def print_module_help(name: str) -> None:
    from eclreco.framework import create_module

    module = create_module(name)
    print(f"{module.type}: {module.description}\n")
    params = module.param_list()
    if not params:
        print("(no parameters)")
        return
    rows = [(p["name"], p["type"], p["default_repr"], p["description"]) for p in params]
    w = [max(len(r[i]) for r in rows + [("Parameter", "Type", "Default", "")]) for i in range(3)]
    print(f"{'Parameter':<{w[0]}}  {'Type':<{w[1]}}  {'Default':<{w[2]}}  Description")
    print("-" * (sum(w) + 6 + 40))
    for n, t, d, desc in rows:
        wrapped = textwrap.wrap(desc, 60) or [""]
        print(f"{n:<{w[0]}}  {t:<{w[1]}}  {d:<{w[2]}}  {wrapped[0]}")
        for line in wrapped[1:]:
            print(" " * (sum(w) + 6) + line)


def _run(args) -> int:
    if args.name:
        try:
            print_module_help(args.name)
        except ValueError as err:
            print(f"eclreco modules: {err}", file=sys.stderr)
            return 1
    else:
        print_module_list()
    return 0


def add_modules_parser(subparsers) -> None:
    p = subparsers.add_parser("modules", help="list modules, or show the parameters of one")
    p.add_argument("name", nargs="?", help="module name")
    p.set_defaults(func=_run)
