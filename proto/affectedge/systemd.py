"""systemd's ``sd_notify`` datagram protocol, shared by the edge agent and the coordinator.

Written out here (a few lines, no libsystemd, which would need a C build on every PC): a unit with
``Type=notify`` waits for READY=1 before it counts the service as started, shows the latest
STATUS= line in ``systemctl status``, and with ``WatchdogSec=`` restarts a service whose
WATCHDOG=1 pings stop.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)
_warned: set[str] = set()


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to systemd if it started us with Type=notify.

    Best effort: a socket that cannot be reached is logged, not raised, so a service never stops
    working over its status line (systemd, missing READY=1, times the start out and says so)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        kind = message.split("=")[0]
        if kind not in _warned:  # once per kind: STATUS and WATCHDOG are sent every few seconds
            _warned.add(kind)
            log.warning("cannot tell systemd %s through NOTIFY_SOCKET=%s: %s", kind, os.environ.get("NOTIFY_SOCKET"),
                        exc.strerror or exc)
        return False
    return True


def watchdog_period() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
