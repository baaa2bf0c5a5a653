"""The gRPC API for LMSs and dashboards: ``affectedge.v1.Coordinator`` plus health and reflection.

Authentication is a bearer token in the ``authorization`` metadata, checked by a server
interceptor before any handler runs (UNAUTHENTICATED otherwise). The standard health service is
exempt so load balancers and orchestrators can probe without a secret, and answers NOT_SERVING while
the coordinator is down (:mod:`coordinator.health`: the database refusing writes, aggregation
stopped); reflection is not exempt, since
it describes the API to whoever asks. With no tokens configured auth is off, which the service
logs as a warning at start.

Calls the coordinator cannot answer now end UNAVAILABLE, the code clients retry: a unary call while
the database is unreachable (:func:`_database_unavailable`; its words, which name hosts and paths,
stay in this log), and StreamAdaptations when the coordinator shuts down, so an LMS reconnects to
another instance or to this one restarted instead of taking the stream's end for a finish. It
reconnects with ``after_signal_id``, the last signal it got, and the new stream replays the stored
signals it missed before going on live.
"""

from __future__ import annotations

import hmac
import logging
import queue
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial, wraps
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy import Select, select
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from affectedge.errors import first_line
from affectedge.v1 import affectedge_pb2 as pb
from affectedge.v1 import affectedge_pb2_grpc as pb_grpc
from coordinator import aggregate
from coordinator.db import Classroom, Signal
from coordinator.policy import load_rules, state_windows
from coordinator.ratelimit import RateLimitedLog
from coordinator.store import signal_message, utcnow

if TYPE_CHECKING:
    from coordinator.service import Coordinator

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
#: open StreamAdaptations calls at most; each holds a worker thread for as long as it is open, so the
#: pool has this many plus 8 threads, and the 8 stay free for unary calls and health checks
MAX_STREAMS = 64
#: how far back, and how many signals, a resumed StreamAdaptations replays (the proto comment says so):
#: the replay is read whole before it is sent, and an LMS away longer back-fills over REST instead
REPLAY_WINDOW = timedelta(hours=24)
MAX_REPLAY = 10_000
#: a stream's details when it cannot be resumed: how to get what it would have replayed
BACK_FILL = ("back-fill with REST GET /api/v1/signals?since=<the last signal's created_at> and resume from "
             "the newest signal it returns")


class BearerAuth(grpc.ServerInterceptor):
    """Rejects every call without ``authorization: Bearer <one of tokens>`` (health excepted)."""

    def __init__(self, tokens: tuple[str, ...]):
        self._tokens = [t.encode() for t in tokens]

        def deny(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def _valid(self, metadata) -> bool:
        header = dict(metadata or ()).get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare against every token in constant time: which token matched must not leak
        matches = [hmac.compare_digest(token.encode(), t) for t in self._tokens]
        return scheme.lower() == "bearer" and any(matches)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(handler_call_details)
        if self._valid(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is not None and handler.response_streaming:
            return self._deny_stream
        return self._deny


def _database_unavailable(method: Callable) -> Callable:
    """A unary handler whose database errors are answered by ``_database_errors_answered``."""

    @wraps(method)
    def handler(self, request, context):
        with self._database_errors_answered(method.__name__, context):
            return method(self, request, context)

    return handler


@dataclass(frozen=True)
class _Wanted:
    """The signals a StreamAdaptations request asks for: one filter for both the replay's query and
    the live part, so a resumed stream replays exactly what it would have sent live."""

    classrooms: frozenset[str]
    courses: frozenset[str]

    @classmethod
    def of(cls, request: pb.StreamAdaptationsRequest) -> _Wanted:
        return cls(frozenset(request.classroom_ids), frozenset(request.course_ids))

    def __call__(self, signal: pb.AdaptationSignal) -> bool:
        return ((not self.classrooms or signal.classroom_id in self.classrooms)
                and (not self.courses or signal.course_id in self.courses))

    def where(self, query: Select) -> Select:
        if self.classrooms:
            query = query.where(Signal.classroom_id.in_(self.classrooms))
        if self.courses:
            query = query.where(Signal.course_id.in_(self.courses))
        return query


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator, stopping: threading.Event):
        self.coordinator = coordinator
        self.stopping = stopping
        config = coordinator.config
        self.windows = state_windows(config.aggregate.windows, load_rules(config.policy.rules))
        self._streams = threading.BoundedSemaphore(MAX_STREAMS)
        self._db_errors = RateLimitedLog(10.0, log)

    @contextmanager
    def _database_errors_answered(self, call: str, context) -> Iterator[None]:
        """Answer database errors UNAVAILABLE (down, locked, pool exhausted: retry) or INTERNAL
        (anything else) with a generic message, the database's own words logged here (at most every
        few seconds, by ``_db_errors``).

        gRPC would otherwise answer UNKNOWN with the exception text, database host and port included.
        """
        try:
            yield
        except (OperationalError, InterfaceError, PoolTimeout) as exc:
            self._db_errors.warning("unavailable", "gRPC %s: the database is unavailable: %s", call, first_line(exc))
            context.abort(grpc.StatusCode.UNAVAILABLE, "database unavailable; retry")
        except SQLAlchemyError as exc:
            self._db_errors.warning("internal", "gRPC %s: the database failed: %s", call, first_line(exc))
            context.abort(grpc.StatusCode.INTERNAL, "database error; the coordinator's log says which")

    def StreamAdaptations(self, request: pb.StreamAdaptationsRequest, context):
        """Every new signal matching the request's classrooms and courses, until the client leaves;
        UNAVAILABLE when the coordinator shuts down (never OK: the stream has no natural end).
        With ``after_signal_id``, the stored signals after that one first (:meth:`_replay`).

        The hub is subscribed to before the replay is read, so a signal fired meanwhile is in the
        replay, the live queue or both, never neither; one in both is sent once, from the replay.
        The live queue keeps the newest ``hub.maxsize`` messages: a stream that falls further behind
        (a long replay to a slow client) ends UNAVAILABLE, and its resume replays what it lost.

        Refused with RESOURCE_EXHAUSTED while MAX_STREAMS are open: waiting for a slot would hold a
        worker thread, and enough waiting streams would starve health checks and unary calls.
        """
        if not self._streams.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{MAX_STREAMS} StreamAdaptations are open, the most this coordinator serves: "
                          "retry later, or share one stream among clients")
        wanted = _Wanted.of(request)
        hub = self.coordinator.hub
        subscription = hub.subscribe()
        try:
            replay = self._replay(request.after_signal_id, wanted, context) if request.after_signal_id else []
            yield from replay
            replayed = {signal.id for signal in replay}
            while context.is_active() and not self.stopping.is_set():
                if subscription.dropped:  # the hub made room by dropping the oldest: maybe a signal
                    context.abort(grpc.StatusCode.UNAVAILABLE,
                                  f"this stream fell {hub.maxsize} messages behind and lost some; reconnect with "
                                  "after_signal_id = the last signal's id")
                try:
                    item = subscription.queue.get(timeout=0.5)
                except queue.Empty:
                    continue
                if isinstance(item, pb.AdaptationSignal) and wanted(item) and item.id not in replayed:
                    yield item
            if self.stopping.is_set():
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              "coordinator shutting down; reconnect with after_signal_id = the last signal's id")
        finally:  # the client cancelled, its deadline passed, or the server stops
            self._streams.release()
            hub.unsubscribe(subscription)

    def _replay(self, after_id: str, wanted: _Wanted, context) -> list[pb.AdaptationSignal]:
        """The stored signals ``wanted`` stamped at or after signal ``after_id``, itself excepted,
        oldest first (ties by id, as REST pages them).

        Ids are random, so the order is created_at's. Those stamped in the same instant as
        ``after_id`` (one tick's, in several classrooms) are all sent again: which of them the client
        already had depends on the order they were fired in, which is not stored, and re-sending one
        it has is better than losing one it has not. Refused, never cut short, past REPLAY_WINDOW
        or MAX_REPLAY: a shortened replay would be the silent gap it exists to close.
        """
        with self._database_errors_answered("StreamAdaptations", context), self.coordinator.sessions() as db:
            after = db.get(Signal, after_id)
            if after is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"after_signal_id {after_id!r} is no stored signal: {BACK_FILL}")
            if after.created_at < utcnow() - REPLAY_WINDOW:
                context.abort(grpc.StatusCode.OUT_OF_RANGE,
                              f"after_signal_id {after_id!r} is older than {REPLAY_WINDOW.total_seconds() / 3600:g} h, "
                              f"the furthest a stream replays: {BACK_FILL}")
            query = wanted.where(select(Signal).where(Signal.created_at >= after.created_at, Signal.id != after.id))
            rows = db.scalars(query.order_by(Signal.created_at, Signal.id).limit(MAX_REPLAY + 1)).all()
            if len(rows) > MAX_REPLAY:
                context.abort(grpc.StatusCode.OUT_OF_RANGE,
                              f"more than {MAX_REPLAY} signals follow after_signal_id {after_id!r}, the most a "
                              f"stream replays: {BACK_FILL}")
            return [signal_message(row) for row in rows]

    @_database_unavailable
    def GetClassroomState(self, request: pb.GetClassroomStateRequest, context) -> pb.ClassroomState:
        if not request.classroom_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "classroom_id is required: take one from ListClassrooms")
        config = self.coordinator.config.aggregate
        window = request.window_seconds or config.default_window
        if window not in self.windows:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"window_seconds must be 0 (the default) or one of {', '.join(map(str, self.windows))}")
        with self.coordinator.sessions() as db:
            if db.get(Classroom, request.classroom_id) is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no classroom {request.classroom_id!r}")
            return aggregate.classroom_state(
                db, request.classroom_id, window, utcnow(), config.k_anonymity, config.agent_offline_after_s
            )

    @_database_unavailable
    def ListClassrooms(self, request: pb.ListClassroomsRequest, context) -> pb.ListClassroomsResponse:
        offline_after = self.coordinator.config.aggregate.agent_offline_after_s
        now = utcnow()
        response = pb.ListClassroomsResponse()
        with self.coordinator.sessions() as db:
            rooms = db.scalars(select(Classroom).order_by(Classroom.id)).all()
            ids = [room.id for room in rooms]
            sessions = aggregate.open_sessions(db, ids)
            online = aggregate.agents_online_by_classroom(db, ids, now, offline_after)
            for room in rooms:
                response.classrooms.add(
                    classroom_id=room.id,
                    name=room.name,
                    course_id=room.course_id,
                    session_id=sessions[room.id].id if room.id in sessions else "",
                    agents_online=online.get(room.id, 0),
                )
        return response


class GrpcServer:
    def __init__(self, coordinator: Coordinator):
        self.config = coordinator.config.grpc
        self._stopping = threading.Event()
        interceptors = [BearerAuth(self.config.tokens)] if self.config.tokens else []
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=MAX_STREAMS + 8, thread_name_prefix="grpc"),
            interceptors=interceptors,
            maximum_concurrent_rpcs=MAX_STREAMS + 8,
        )
        pb_grpc.add_CoordinatorServicer_to_server(CoordinatorService(coordinator, self._stopping), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        host = self.config.host.strip("[]")  # "::1" and "[::1]" alike: IPv6 goes in [] once
        address = f"[{host}]:{self.config.port}" if ":" in host else f"{host}:{self.config.port}"
        if self.config.tls_cert:
            _check_tls(self.config.tls_cert, self.config.tls_key)
            key, cert = Path(self.config.tls_key).read_bytes(), Path(self.config.tls_cert).read_bytes()
            bind = partial(self.server.add_secure_port, address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            bind = partial(self.server.add_insecure_port, address)
        try:
            self.port = bind()
        except RuntimeError:
            raise OSError(f"cannot listen on {address} for gRPC ({_bind_failure(host, self.config.port)}): "
                          "change [grpc] host/port") from None
        if not self.config.tokens:
            log.warning("gRPC auth is disabled: set [grpc] tokens to require a bearer token")

    def start(self) -> None:
        self.server.start()
        self.set_serving(True)
        log.info(
            "gRPC listening on %s:%d (%s)", self.config.host, self.port, "TLS" if self.config.tls_cert else "plaintext"
        )

    def set_serving(self, serving: bool) -> None:
        """What the health service answers (ignored once shutting down, which answers NOT_SERVING)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self._stopping.set()
        self.server.stop(grace).wait()


def _check_tls(cert: str, key: str) -> None:
    """Raise a one-line :class:`OSError` unless ``cert`` and ``key`` are a PEM certificate and its
    unencrypted key: gRPC would only fail to bind, and say nothing of why."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as exc:
        mismatch = exc.reason == "KEY_VALUES_MISMATCH"
        why = "the key is not the certificate's" if mismatch else "not PEM, or the key is encrypted"
        raise OSError(f"[grpc] tls_cert {cert} and tls_key {key} cannot serve TLS ({why}): point them at a PEM "
                      "certificate and its unencrypted private key") from None


def _bind_failure(host: str, port: int) -> str:
    """Why gRPC could not bind ``host:port``, which its RuntimeError never says: what the OS answers
    a plain socket bound there."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(address)
    except OSError as exc:
        return exc.strerror or str(exc)
    return "refused by gRPC; GRPC_VERBOSITY=debug shows why"
