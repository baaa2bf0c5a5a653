"""Argument types shared by the command lines (``edge-agent``, ``model_export``).

They live here, in the one package every deployable already imports, so the edge agent can use
them without pulling in the training stack and a bad count reads the same in every CLI.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """Parse a count such as ``--frames`` or ``--depth``: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)
