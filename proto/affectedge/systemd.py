"""systemd's ``sd_notify`` datagram protocol, shared by the edge agent and the coordinator.

Written out here (a few lines, no libsystemd, which would need a C build on every PC): a unit with
``Type=notify`` waits for READY=1 before it counts the service as started, shows the latest
STATUS= line in ``systemctl status``, and with ``WatchdogSec=`` restarts a service whose
WATCHDOG=1 pings stop.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to systemd if it started us with Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


def watchdog_period() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
