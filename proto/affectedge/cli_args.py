"""Argument types shared by the command lines (``edge-agent``, ``model_export``, ``coordinator``).

They live here, in the one package every deployable already imports, so the edge agent can use
them without pulling in the training stack and a bad count reads the same in every CLI.
"""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """Parse a count such as ``--frames`` or ``--depth``: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def positive_float(text: str) -> float:
    """Parse a rate or a length in seconds: a finite number above 0 (0 divides by zero, and a negative or
    infinite one measures nothing or never ends, found only after the work has started)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0")
    return value
