"""`eclreco simulate`: fast-simulated events written as a raw file of the wire format."""
from __future__ import annotations

import argparse
import os
import sys
import time


def _run(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from eclreco.paths import output_file_error, output_states
    from eclreco.rawdata import encode_events, write_raw_file
    from eclreco.sim import simulate

    # the numbers are checked by the parser (cli_types); the output before the simulation, not after its minutes
    # (the file is written at the end, through a temporary name beside it, which write_raw_file's error named)
    if why := output_file_error(args.output, "-o"):
        print(f"eclreco simulate: error: {why}", file=sys.stderr)  # one line, exit 2, as every command's refusal
        return 2
    # -o as it is before the simulation: the write at the end replaces only that, not a file put there meanwhile
    unchanged = output_states([os.path.realpath(args.output)])
    messages = []
    chunk = 2000
    t0 = time.perf_counter()
    digits = 0
    with tqdm(total=args.events, unit="ev", desc="simulate", disable=args.quiet) as bar:
        for start in range(0, args.events, chunk):
            n = min(chunk, args.events - start)
            ev = simulate(detector=args.detector, n_events=n, particle=args.particle, energy=args.energy,
                          energy_range=tuple(args.energy_range) if args.energy_range else None,
                          background=args.background, seed=args.seed * 1_000_003 + start)
            evt = np.arange(start, start + n)
            messages += encode_events(args.detector, args.exp, args.run, evt, ev.offsets, ev.cell, ev.amplitude,
                                      ev.time_ticks, ev.quality, truth=ev.truth)
            digits += ev.cell.size
            bar.update(n)
    write_raw_file(args.output, messages, unchanged, "simulation", option="-o")
    nbytes = os.path.getsize(args.output)
    dt = time.perf_counter() - t0
    size = f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"
    print(f"wrote {len(messages)} events ({digits / max(len(messages), 1):.0f} digits/event, "
          f"{size}) to {args.output} in {dt:.1f} s ({len(messages) / dt:,.0f} events/s)")
    return 0


class _EnergyRange(argparse.Action):
    """--energy-range LO HI: each an energy of the simulation, and LO below HI (argparse's one line naming it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not values[0] < values[1]:
            raise argparse.ArgumentError(self, f"LO must be below HI, not {values[0]:g} {values[1]:g}")
        setattr(namespace, self.dest, values)


def add_simulate_parser(subparsers) -> None:
    from eclreco.cli_types import EXP_RUN, POSITIVE_INT, SIM_BACKGROUND, SIM_ENERGY, SIM_SEED

    p = subparsers.add_parser("simulate", help="simulate events into a raw file (.msgpack)")
    p.add_argument("--detector", default="belle2-ecl", choices=["belle2-ecl", "array30"], help="detector geometry")
    p.add_argument("--events", type=POSITIVE_INT, default=1000, help="events to simulate")
    p.add_argument("--particle", default="gamma", choices=["gamma", "pi0", "generic"],
                   help="what each event holds (generic: several photons and e+e- pairs, belle2-ecl only)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--energy", type=SIM_ENERGY, default=1.0, help="GeV (below 1000)")
    g.add_argument("--energy-range", type=SIM_ENERGY, nargs=2, action=_EnergyRange, metavar=("LO", "HI"),
                   help="GeV, log-uniform (0 < LO < HI < 1000)")
    p.add_argument("--background", type=SIM_BACKGROUND, default=None,
                   help="beam-background level (default: 1 for belle2-ecl, 0 for array30)")
    p.add_argument("--seed", type=SIM_SEED, default=1, help="random seed (the same seed: the same events)")
    p.add_argument("--exp", type=EXP_RUN, default=0, help="experiment number written in each event")
    p.add_argument("--run", type=EXP_RUN, default=1, help="run number written in each event")
    p.add_argument("-o", "--output", required=True, help="raw file to write (.msgpack)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
