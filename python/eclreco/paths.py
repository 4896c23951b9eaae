"""Files of the source tree (steering files) and beside it (../shared), found from an installed package;
the folder check of output files; outputs written whole (a temporary name, then the file's own)."""
from __future__ import annotations

import os


def find_beside_package(relative: str) -> str | None:
    """The first existing `base/relative` with base the working directory, then every ancestor of
    this package's directory (nearest first): finds the source tree of an in-tree .venv, where
    `make` installs the package (not editable). None if there is none."""
    bases = [os.getcwd()]
    d = os.path.dirname(os.path.abspath(__file__))
    while os.path.dirname(d) != d:
        bases.append(d)
        d = os.path.dirname(d)
    for base in bases:
        cand = os.path.normpath(os.path.join(base, relative))
        if os.path.exists(cand):
            return cand
    return None


def missing_folder(path: str) -> str:
    """The folder of an output file when it does not exist ('' when it does): a misspelt one is an
    error (RootOutput's at initialize, reco.py's and hlt run's at the command line), not a new
    directory tree."""
    folder = os.path.dirname(os.path.abspath(path))
    return "" if os.path.isdir(folder) else folder


def partial_name(final: str) -> str:
    """A new file beside `final` for its content, which then takes the name with os.replace: so that an
    interrupted or failed run never leaves a half-written file, or one that does not belong with the files
    beside it, under an output's name. It keeps final's extension (matplotlib takes the format from it).
    (Not tempfile.mkstemp: its files are 0600, and a model, a cache or a plot is for others to read too.)"""
    folder, name = os.path.split(os.path.abspath(final))
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.{os.getpid()}.partial{ext}")


def write_whole(path: str, text: str) -> None:
    """`text` into `path` through partial_name: the old file until the new one is complete."""
    tmp = partial_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
