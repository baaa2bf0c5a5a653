"""Loopback port helpers shared by the demo, the benches and the tests (one place, not four)."""

from __future__ import annotations

import socket
import time

HOST = "127.0.0.1"


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when a server could bind it now, else any free loopback port.

    Binding is the test, not connecting: a port can be taken with nothing listening on it, as the
    local end of another program's outgoing connection (Linux hands out ephemeral ports from
    32768-60999, which holds gRPC's 50051), and a server's bind would then fail.
    """
    if preferred:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no obstacle
            try:
                s.bind((HOST, preferred))
                return preferred
            except OSError:
                pass
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
