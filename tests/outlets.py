"""What the webhook, xAPI and gRPC tests share: a coordinator's real parts, a stored signal, its gRPC
server on loopback."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from affectedge.settings import parse
from affectedge.v1 import affectedge_pb2 as pb
from coordinator import db, health
from coordinator.config import CoordinatorConfig
from coordinator.grpc_api import GrpcServer
from coordinator.hub import Hub
from coordinator.ingest import Counters
from coordinator.outbox import Outbox, record_signal
from coordinator.store import Store, utcnow


@dataclass
class Parts:
    """What outlets and the web app take from the Coordinator, and the outlets it runs."""

    config: CoordinatorConfig
    sessions: sessionmaker
    hub: Hub = field(default_factory=Hub)
    outlets: list[Outbox] = field(default_factory=list)

    def health(self) -> health.Health:
        """What the admin page shows of a coordinator whose ingest has not connected yet."""
        return health.assess(stalled_for_s=None, db_error=None, last_tick_age_s=0.0,
                             tick_seconds=self.config.aggregate.tick_seconds, broker_connected=False, backlog=0,
                             leader=False, counters=Counters().snapshot())


def parts(tmp_path: Path, **config) -> Parts:
    config.setdefault("database", {"url": f"sqlite:///{tmp_path / 'coordinator.db'}"})
    return Parts(parse(config, CoordinatorConfig, "test config"), db.connect(config["database"]["url"]))


def publish_signal(p: Parts, classroom: str = "room-1", course: str = "course-7") -> pb.AdaptationSignal:
    """Store a signal with its deliveries to ``p.outlets`` and publish it, as the policy leader does."""
    signal = pb.AdaptationSignal(
        id=str(uuid.uuid4()), classroom_id=classroom, session_id="session-1", course_id=course,
        kind=pb.SLOW_DOWN, strength=0.8, reason="confusion above 40% for 3 min",
        evidence=pb.Evidence(rule="confusion", distribution=[0.05, 0.0, 0.1, 0.1, 0.25, 0.1, 0.4],
                             observed=0.45, threshold=0.4, sustained_seconds=180, learners=12),
    )
    signal.created_at.FromDatetime(utcnow().replace(microsecond=0))
    record_signal(Store(p.sessions), signal, p.outlets)
    p.hub.publish(signal)
    return signal


def deliveries(p: Parts, kind: str) -> list[db.Delivery]:
    with p.sessions() as s:
        return list(s.scalars(select(db.Delivery).where(db.Delivery.kind == kind).order_by(db.Delivery.id)))


def wait_until(predicate: Callable[[], object], timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}: last saw {result!r}")


@contextmanager
def served(p: Parts) -> Iterator[tuple[GrpcServer, grpc.Channel]]:
    """``p``'s gRPC server started (config ``[grpc]`` on loopback) and a channel to it, both closed after."""
    server = GrpcServer(p)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, channel
    finally:
        channel.close()
        server.stop(0)
