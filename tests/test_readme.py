"""The README's code examples run as printed, and give the right answer with threads > 1; the tests the docs cite exist."""
import os
import re

import numpy as np

import eclreco
from eclreco.sources import ArraySource
from helpers import forced_thread_switches

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_block(marker: str) -> str:
    """The ```python block of the README that contains `marker`."""
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    block, = [b for b in blocks if marker in b]
    return block


def test_high_energy_count_counts_every_cluster_with_two_threads():
    """HighEnergyCount's `self.n += ...` ran on two batches at once and lost counts (408 of 455 in a
    newcomer's run); forced thread switches make that near certain, the lock makes it exact."""
    namespace = {}
    exec(readme_block("class HighEnergyCount"), namespace)
    n_events = 20000
    offsets = np.arange(n_events + 1) * 3
    energy = np.tile(np.array([0.5, 1.5, 2.5], np.float32), n_events)
    with forced_thread_switches():
        module = namespace["HighEnergyCount"]()
        path = eclreco.create_path()
        path.add_module(ArraySource("ECLClusters", offsets, {"energy": energy}))
        path.add_module(module)
        eclreco.process(path, threads=2, batch_size=1, install_signal_handlers=False)
    assert module.n == 2 * n_events


def test_every_test_the_docs_cite_exists():
    """The docs back their promises with `test_file.py::test_name`: a renamed or removed test left a
    promise citing nothing, unnoticed. Every such citation of README.md and docs/*.md names a test
    function defined in that file of tests/."""
    import glob

    repo = os.path.dirname(README)
    tests = os.path.join(repo, "tests")
    cited = 0
    for doc in [README] + sorted(glob.glob(os.path.join(repo, "docs", "*.md"))):
        text = open(doc).read()
        for file, name in re.findall(r"(test_\w+\.py)::\s*(test_\w+)", text):
            source = os.path.join(tests, file)
            assert os.path.exists(source), f"{os.path.basename(doc)} cites {file}::{name}: no tests/{file}"
            assert re.search(rf"^\s*def {name}\(", open(source).read(), re.M), \
                f"{os.path.basename(doc)} cites {file}::{name}, which tests/{file} does not define"
            cited += 1
    assert cited >= 50, cited


def test_make_install_rebuilds_when_a_source_is_removed(tmp_path):
    """`make install` rebuilds when a source changed, and nothing when none did (README, "The two
    commands"). A source removed (a module deleted, or renamed into another folder) left no newer file,
    so the installed package kept it: its C++ module registered, its Python module importable. The
    repository's Makefile runs here on a tree of two sources and a stand-in python that logs the install."""
    import shutil
    import subprocess

    repo = os.path.dirname(README)
    shutil.copy(os.path.join(repo, "Makefile"), tmp_path)
    for name in ("cpp/a.cpp", "modules/b.cpp", "CMakeLists.txt", "pyproject.toml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    python = tmp_path / ".venv" / "bin" / "python"
    python.write_text('#!/bin/sh\necho "$*" >> "$(dirname "$0")/../installs"\n')
    python.chmod(0o755)
    os.utime(tmp_path / "pyproject.toml", (1, 1))  # older than .deps: the dependencies are in place
    (tmp_path / ".venv" / ".deps").write_text("")

    def installs():
        subprocess.run(["make", "install"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
        log = tmp_path / ".venv" / "installs"
        return log.read_text().count("install") if log.exists() else 0

    assert installs() == 1
    assert installs() == 1  # nothing changed: nothing rebuilt
    (tmp_path / "modules" / "b.cpp").unlink()
    assert installs() == 2
    assert installs() == 2


def test_the_command_table_names_every_command():
    """README's "Command line" table is where a newcomer learns the commands: `eclreco hlt merge` (the files
    of a killed collector and its replacement, docs/deployment.md) was missing from its `hlt` row. Every
    command of `eclreco --help` and every role of `eclreco hlt --help` is named in the table."""
    import argparse

    from eclreco.cli import build_parser

    def choices(parser):
        action, = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return action.choices

    text = open(README).read()
    table = text[text.index("## Command line"):text.index("## Documentation")]
    rows = [line for line in table.splitlines() if line.startswith("| `eclreco ")]
    commands = choices(build_parser())
    for command in commands:
        assert any(line.startswith(f"| `eclreco {command}") or f"`eclreco {command}`" in line for line in rows), \
            f"README.md's command table does not name `eclreco {command}`"
    hlt_row, = [line for line in rows if line.startswith("| `eclreco hlt ")]
    named = re.match(r"\| `eclreco hlt ([\w/-]+)`", hlt_row).group(1).split("/")
    assert sorted(named) == sorted(choices(commands["hlt"])), \
        f"README.md's `eclreco hlt` row names {named}, the command has {sorted(choices(commands['hlt']))}"


def test_the_farms_output_line_of_docs_deployment_is_the_one_hlt_run_prints():
    """docs/deployment.md shows `hlt run`'s output line for a misconfigured chain (`--cluster-columns
    energy,latt`: the collector's RootOutput raises on all 100 events). The farm prints, and has since the
    errors of the collector's output were counted apart, `module errors 100 (100 of them in the collector's
    output: ...)`; the doc's example lacked that part. The line is rebuilt here from the `output` report such
    a farm gives (its counts as an audit's run printed them) and must match the doc's, `…` standing for any text."""
    from eclreco.hlt.control import output_line

    text = open(os.path.join(os.path.dirname(README), "docs", "deployment.md")).read()
    quoted, = re.findall(r"`\[hlt run\] (output: 0 events written in 1 farm run\(s\).*?)`", text, re.S)
    quoted = " ".join(quoted.split())
    line = "[hlt run] " + output_line({"output": {
        "runs": 1, "received": 100, "events_written": 0, "errors": 100, "errors_in_outputs": 100, "rejected": 0,
        "discarded": 0, "first_error": "RootOutput raised on exp 0 run 1 evt 0: ValueError: RootOutput: "
                                       "cluster_columns latt not in ECLClusters, whose columns are e1e9, energy"}})
    pattern = ".*".join(re.escape(part) for part in ("[hlt run] " + quoted).split("…"))
    assert re.fullmatch(pattern, line), f"docs/deployment.md shows\n{'[hlt run] ' + quoted}\nhlt run prints\n{line}"


def test_the_readme_names_every_switch_that_ci_sets():
    """README's "The two commands" says what `.ci/run` runs beyond `make test`: it named
    `ECLRECO_FUZZ_SANITIZED=1` and "that one test" that `make test` alone skips, while `.ci/run` also sets
    `ECLRECO_TSAN=1` (the ThreadSanitizer test, 2-4 min). Every ECLRECO_* variable `.ci/run` exports is named."""
    repo = os.path.dirname(README)
    ci = open(os.path.join(repo, ".ci", "run")).read()
    exported = set(re.findall(r"\b(ECLRECO_\w+)=1", ci))
    assert exported, ".ci/run sets no ECLRECO_* switch: this test reads it wrong"
    text = open(README).read()
    section = text[text.index("## The two commands"):text.index("### What gets installed")]
    for name in sorted(exported):
        assert f"`{name}=1`" in section, f"README.md's \"The two commands\" does not say that .ci/run sets {name}=1"


def test_what_gets_installed_names_every_package_make_installs():
    """README's "What gets installed, and why" lists what `make` puts into .venv; xxhash (the checksum of
    RootOutput's zstd frames, imported by modules/root_output.py) and pytest-timeout (the suite's 5-min
    limit per test) were installed without a word there. Every package of the Makefile's pip installs is named."""
    repo = os.path.dirname(README)
    makefile = open(os.path.join(repo, "Makefile")).read()
    installs = re.findall(r"\$\(PIP\) install -q ((?:[^\n\\|]|\\\n)*)", makefile)  # up to a `|| echo`
    packages = {re.split(r"[<>=\[]", p.strip('"'))[0] for line in installs for p in line.replace("\\\n", " ").split()
                if not p.startswith("-") and p != "."} - {"pip"}
    assert {"numpy", "torch", "xxhash"} <= packages, packages  # the parse found the install lines
    text = open(README).read()
    section = text[text.index("### What gets installed"):text.index("## A steering file")]
    named = {"torch": "PyTorch"}
    for package in sorted(packages):
        assert re.search(rf"(?<![\w-]){re.escape(named.get(package, package))}(?![\w-])", section), \
            f"README.md's \"What gets installed, and why\" does not name {package}, which the Makefile installs"
