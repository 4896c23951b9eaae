"""Reports as strict JSON (RFC 8259 has no NaN or Infinity, and strict parsers refuse Python's
bare NaN tokens): a number that is not defined, e.g. a width of too few events, is written null."""
from __future__ import annotations

import json
import math

import numpy as np


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj, **kw) -> str:
    return json.dumps(_plain(obj), allow_nan=False, default=float, **kw)


def dump(obj, f, **kw) -> None:
    f.write(dumps(obj, **kw))
