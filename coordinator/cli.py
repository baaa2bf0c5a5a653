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

from sqlalchemy.exc import SQLAlchemyError

from affectedge.settings import ConfigError
from coordinator import bench, db, demo, outbox, provision, users

log = logging.getLogger("coordinator")


def _serve(args: argparse.Namespace) -> int:
    from coordinator.config import load_config
    from coordinator.service import Coordinator

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping = threading.Event()

    def request_stop(signum, _frame) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stopping.set()

    # installed before start-up, so a SIGTERM while starting still ends in a clean stop
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        config = load_config(args.config)
        coordinator = Coordinator(config)
        coordinator.start()
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        print(f"error: {db.describe_error(exc, config.database.url)}", file=sys.stderr)
        return 2
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
    return args.func(args)
