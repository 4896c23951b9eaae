"""Files of the source tree (steering files) and beside it (../shared), found from an installed package;
the folder check of output files."""
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
