"""Loopback port helpers shared by the demo, the benches and the tests (one place, not four)."""

from __future__ import annotations

import socket
import time

HOST = "127.0.0.1"


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when nothing listens on it, else any free loopback port."""
    if preferred and not listening(preferred):
        return preferred
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Return once something listens on ``port``; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {HOST}:{port} after {timeout:.0f} s")
