"""``coordinator`` command line: serve, bench, and the sub-commands other modules register.

User-facing errors (a bad config, a port in use, a database that cannot be opened) are one line on
stderr and exit status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from coordinator import bench, demo, outbox, provision, users
from coordinator.commands import CommandFailed, with_config
from coordinator.config import CoordinatorConfig

log = logging.getLogger("coordinator")


def _serve(args: argparse.Namespace) -> int:
    from coordinator.service import Coordinator

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping = threading.Event()

    def request_stop(signum, _frame) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stopping.set()

    # installed before start-up, so a SIGTERM while starting still ends in a clean stop
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    def started(config: CoordinatorConfig) -> Coordinator:
        coordinator = Coordinator(config)
        coordinator.start()
        return coordinator

    coordinator = with_config(args.config, started, OSError)
    stopping.wait()
    coordinator.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coordinator", description="AffectEdge coordinator: classroom aggregates and adaptation signals."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the coordinator (ingest, policy, gRPC, web)")
    serve.add_argument("--config", help="coordinator TOML config (default: built-in localhost defaults)")
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    serve.set_defaults(func=_serve)
    bench.add_parser(sub)
    users.add_parser(sub)
    provision.add_parser(sub)
    demo.add_parser(sub)
    outbox.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CommandFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
