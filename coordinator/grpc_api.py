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
another instance or to this one restarted instead of taking the stream's end for a finish.
"""

from __future__ import annotations

import hmac
import logging
import queue
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent import futures
from functools import partial, wraps
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from affectedge.errors import first_line
from affectedge.v1 import affectedge_pb2 as pb
from affectedge.v1 import affectedge_pb2_grpc as pb_grpc
from coordinator import aggregate
from coordinator.db import Classroom
from coordinator.policy import load_rules, state_windows
from coordinator.ratelimit import RateLimitedLog
from coordinator.store import utcnow

if TYPE_CHECKING:
    from coordinator.service import Coordinator

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
#: open StreamAdaptations calls at most; each holds a worker thread for as long as it is open, so the
#: pool has this many plus 8 threads, and the 8 stay free for unary calls and health checks
MAX_STREAMS = 64


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
    """A unary handler whose database errors answer UNAVAILABLE (down, locked, pool exhausted: retry)
    or INTERNAL (anything else) with a generic message, the database's own words logged here
    (at most every few seconds, by the servicer's ``_db_errors``).

    gRPC would otherwise answer UNKNOWN with the exception text, database host and port included.
    """

    @wraps(method)
    def handler(self, request, context):
        try:
            return method(self, request, context)
        except (OperationalError, InterfaceError, PoolTimeout) as exc:
            self._db_errors.warning("unavailable", "gRPC %s: the database is unavailable: %s", method.__name__,
                                    first_line(exc))
            context.abort(grpc.StatusCode.UNAVAILABLE, "database unavailable; retry")
        except SQLAlchemyError as exc:
            self._db_errors.warning("internal", "gRPC %s: the database failed: %s", method.__name__, first_line(exc))
            context.abort(grpc.StatusCode.INTERNAL, "database error; the coordinator's log says which")

    return handler


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator, stopping: threading.Event):
        self.coordinator = coordinator
        self.stopping = stopping
        config = coordinator.config
        self.windows = state_windows(config.aggregate.windows, load_rules(config.policy.rules))
        self._streams = threading.BoundedSemaphore(MAX_STREAMS)
        self._db_errors = RateLimitedLog(10.0, log)

    def StreamAdaptations(self, request: pb.StreamAdaptationsRequest, context):
        """Every new signal matching the request's classrooms and courses, until the client leaves;
        UNAVAILABLE when the coordinator shuts down (never OK: the stream has no natural end).

        Refused with RESOURCE_EXHAUSTED while MAX_STREAMS are open: waiting for a slot would hold a
        worker thread, and enough waiting streams would starve health checks and unary calls.
        """
        if not self._streams.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{MAX_STREAMS} StreamAdaptations are open, the most this coordinator serves: "
                          "retry later, or share one stream among clients")
        classrooms, courses = set(request.classroom_ids), set(request.course_ids)
        hub = self.coordinator.hub
        subscription = hub.subscribe()
        try:
            while context.is_active() and not self.stopping.is_set():
                try:
                    item = subscription.queue.get(timeout=0.5)
                except queue.Empty:
                    continue
                if not isinstance(item, pb.AdaptationSignal):
                    continue
                if classrooms and item.classroom_id not in classrooms:
                    continue
                if courses and item.course_id not in courses:
                    continue
                yield item
            if self.stopping.is_set():
                context.abort(grpc.StatusCode.UNAVAILABLE, "coordinator shutting down; reconnect")
        finally:  # the client cancelled, its deadline passed, or the server stops
            self._streams.release()
            hub.unsubscribe(subscription)

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
