"""How every AffectEdge program shows an error it did not expect: its first line.

Database drivers, ONNX Runtime and TensorRT put the SQL, the parameters or a stack of C++ frames
after the line that says what happened; an admin's journal and a one-line CLI error want only that
line. One helper for the edge agent, the coordinator and the model tools.
"""

from __future__ import annotations


def first_line(exc: BaseException | None, limit: int = 300) -> str:
    """The first line of ``exc``'s message (at most ``limit`` characters), or its type for an empty one."""
    text = str(exc) if exc is not None else ""
    return text.strip().splitlines()[0][:limit] if text.strip() else type(exc).__name__
