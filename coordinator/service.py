"""The running coordinator: ingest, the aggregation/policy ticker, gRPC, the web app and outlets.

Several instances may run against one broker and one database (PostgreSQL, or SQLite on one host).
MQTT shared subscriptions split the observation stream between them by message, so no instance
sees all of any classroom's data; what keeps the signals right and unique is this division:

* **ingest** runs everywhere and writes to the shared database;
* **aggregates are computed from the database**, so every instance sees the whole classroom;
* **policy, stored snapshots, idle-session closing and retention run on one instance**: the
  holder of a lease row renewed every tick (:meth:`coordinator.store.Store.lead`). If it dies,
  another takes over when the lease expires; cooldowns are read from the stored signals, so the
  successor does not repeat a signal the old leader just sent;
* **every instance announces every signal** on its own hub (the leader as it fires them, the others
  by reading new rows each tick) so a gRPC stream or dashboard on any instance sees all of them;
* **outlets (webhooks, xAPI) run on the leader only**: it stores each signal together with its
  delivery rows in one transaction, so they are written once, and a leader that dies right after
  leaves its successor's senders rows to deliver, never a signal nobody sends.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import insert
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.serving import (
    LISTEN_QUEUE,
    BaseWSGIServer,
    WSGIRequestHandler,
    get_sockaddr,
    make_server,
    select_address_family,
)

from affectedge import systemd
from affectedge.errors import first_line
from affectedge.v1 import affectedge_pb2 as pb
from coordinator import aggregate, db, health, retention
from coordinator.config import CoordinatorConfig
from coordinator.grpc_api import GrpcServer
from coordinator.hub import Hub
from coordinator.ingest import Ingest
from coordinator.outbox import record_signal
from coordinator.policy import PolicyEngine, load_rules, state_windows, threshold_key
from coordinator.ratelimit import RateLimitedLog
from coordinator.store import Store, utcnow
from coordinator.web import create_app
from coordinator.webhooks import WebhookDispatcher
from coordinator.xapi import XapiForwarder

log = logging.getLogger(__name__)

#: a window of w seconds is recomputed at most every w / REFRESH_DIVISOR seconds (and every tick
#: for short ones), which bounds how many rows long windows rescan each second
REFRESH_DIVISOR = 30
RETENTION_EVERY = timedelta(hours=1)
SIGNAL_FEED_MARGIN = timedelta(seconds=10)  # re-read signals this far back (commit lag, clock skew)


class Outlet(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def dead_deliveries(self) -> list[tuple[str, int]]: ...


class Coordinator:
    def __init__(self, config: CoordinatorConfig):
        self.config = config
        self.instance_id = f"{config.mqtt.client_id}-{uuid.uuid4().hex[:8]}"
        self.sessions = db.connect(config.database.url)
        self.hub = Hub()
        self.store = Store(self.sessions)
        self.policy = PolicyEngine(load_rules(config.policy.rules), self.store.last_signal_at)
        self.ingest = Ingest(config.mqtt, self.store)
        self.grpc = GrpcServer(self)
        self.web = self._web_server()
        self.is_leader = False
        self.live_window = min(config.aggregate.windows)
        self._outlets: list[Outlet] = []
        # signals already out before this start are not news: remember them without announcing
        self._feed_from = utcnow()
        self._announced = {
            s.id: s.created_at.ToDatetime() for s in self.store.signals_since(self._feed_from - SIGNAL_FEED_MARGIN)
        }
        self._cache: dict[tuple[str, int], pb.ClassroomState] = {}
        self._last_tick: datetime | None = None
        self._last_retention = datetime.min
        self._stop = threading.Event()
        self._slow = RateLimitedLog(60.0, log)
        self._ticker = threading.Thread(target=self._tick_loop, name="coordinator-ticker", daemon=True)
        self._last_progress = time.monotonic()  # the ticker's last progress (start-up counts as one)
        self._monitor = threading.Thread(target=self._monitor_loop, name="coordinator-health", daemon=True)

    def _web_server(self) -> BaseWSGIServer:
        web = self.config.web
        try:
            app = create_app(self)
        except OSError as exc:  # the generated session key cannot be kept in state_dir
            raise OSError(f"cannot keep the dashboard session key in state_dir {self.config.state_dir!r} "
                          f"({exc.strerror or exc}): make it a writable folder or set [web] secret_key") from None
        try:
            listener = _listen(web.host, web.port)
        except OSError as exc:
            raise OSError(f"cannot listen on {web.host}:{web.port} for the web app ({exc.strerror or exc}): "
                          "change [web] host/port") from None
        with listener:  # make_server works on a duplicate of it
            return make_server(web.host, web.port, app, threaded=True, request_handler=_RequestHandler,
                               fd=listener.fileno())

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.grpc.start()
        threading.Thread(target=self.web.serve_forever, name="web", daemon=True).start()
        log.info("web app on http://%s:%d", self.config.web.host, self.web.port)
        self.ingest.start()
        self._ticker_progress()
        self._ticker.start()
        self._monitor.start()
        systemd.notify("READY=1")
        log.info("coordinator %s started", self.instance_id)

    def stop(self) -> None:
        """Stop taking work, finish what was taken, hand the policy lease over."""
        systemd.notify("STOPPING=1")
        self._stop.set()
        self._ticker.join(10)
        self._monitor.join(10)
        self.ingest.stop()
        self.grpc.stop()
        self.web.shutdown()
        self._set_leader(False)
        self.store.resign(self.instance_id)
        log.info("coordinator %s stopped", self.instance_id)

    def _outlets_configured(self) -> list[Outlet]:
        outlets: list[Outlet] = []
        if self.config.webhooks:
            outlets.append(WebhookDispatcher(self))
        if self.config.xapi.endpoint:
            outlets.append(XapiForwarder(self))
        return outlets

    def _set_leader(self, leader: bool) -> None:
        if leader == self.is_leader:
            return
        if leader:  # outlets first: if they cannot be built, this instance must not lead without them
            self._outlets = self._outlets_configured()
            self.is_leader = True
            log.info("%s now evaluates policy (lease taken)", self.instance_id)
            for outlet in self._outlets:
                outlet.start()
        else:
            self.is_leader = False
            log.info("%s no longer evaluates policy", self.instance_id)
            self.policy.reset()
            for outlet in self._outlets:
                outlet.stop()
            self._outlets = []

    # -- health -------------------------------------------------------------------------------

    def health(self) -> health.Health:
        """This instance's status now (:mod:`coordinator.health`); reads no database."""
        now = time.monotonic()
        stalled = self.ingest.stalled
        return health.assess(
            stalled_for_s=now - stalled[0] if stalled else None,
            db_error=stalled[1] if stalled else None,
            last_tick_age_s=now - self._last_progress,
            tick_seconds=self.config.aggregate.tick_seconds,
            broker_connected=self.ingest.connected.is_set(),
            backlog=self.ingest.backlog,
            leader=self.is_leader,
            counters=self.ingest.counters.snapshot(),
            dead_deliveries=[dead for outlet in self._outlets for dead in outlet.dead_deliveries()],
        )

    def _ticker_progress(self) -> None:
        """The ticker is working, not stuck (called after each tick and each chunk a purge deletes)."""
        self._last_progress = time.monotonic()

    def _monitor_loop(self) -> None:
        """Every few seconds: gRPC health follows the status, systemd shows it, and a change is logged
        once (with what is wrong), so an admin reading the journal sees when and why it went down."""
        last = health.OK
        while not self._stop.wait(health.PERIOD_S):
            try:
                now = self.health()
                if now.status != last:
                    (log.info if now.status == health.OK else log.warning)("health %s -> %s: %s", last, now.status,
                                                                          "; ".join(now.problems) or "all clear")
                    last = now.status
                self.grpc.set_serving(now.status != health.DOWN)
                systemd.notify(f"STATUS={now.status_line()}")
            except Exception:  # the monitor must outlive any one failure, or gRPC health freezes
                self._slow.warning("health", "health check failed; retrying in %.0f s", health.PERIOD_S, exc_info=True)

    # -- the ticker ---------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        """Tick at a fixed rate (a slow tick shortens the next wait; a late one skips, never bursts)."""
        interval = self.config.aggregate.tick_seconds
        due = time.monotonic() + interval
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            started = time.monotonic()
            try:
                self.tick(utcnow())
                self._ticker_progress()
            except Exception:  # a database hiccup must not end aggregation for good
                log.exception("coordinator tick failed; retrying next tick")
            took = time.monotonic() - started
            if took > interval:
                self._slow.warning(
                    "tick", "a tick took %.2f s, longer than [aggregate] tick_seconds = %.2f: signals come late; "
                    "give the coordinator more CPU, a faster database, or fewer/shorter windows", took, interval)
            due = max(due + interval, time.monotonic())

    def tick(self, now: datetime) -> None:
        """One step: the signal feed, the lease, live states, then (leader only) sessions, snapshots,
        policy and retention. The feed runs first so an instance that takes the lease over has
        already seen the old leader's signals and its outlets do not deliver them a second time."""
        self._feed(now)
        lease_s = max(5.0, 5 * self.config.aggregate.tick_seconds)
        self._set_leader(self.store.lead(self.instance_id, now, lease_s))
        longest = state_windows(self.config.aggregate.windows, self.policy.rules)[-1]
        with self.sessions() as session:
            active = aggregate.active_classrooms(session, now - timedelta(seconds=longest))
            self._cache = {key: s for key, s in self._cache.items() if key[0] in active}
            for state in self._states(session, active, self.live_window, now).values():
                self.hub.publish(state)
        if self.is_leader:
            self._lead(now, active)
        self._last_tick = now

    def _states(
        self, session, classroom_ids: list[str], window: int, now: datetime, fresh: bool = False
    ) -> dict[str, pb.ClassroomState]:
        """The classrooms' states over ``window``, recomputing (together) only those that have
        moved far enough since they were last computed or whose class session has changed."""
        refresh = max(self.config.aggregate.tick_seconds, window / REFRESH_DIVISOR)
        open_sessions = aggregate.open_sessions(session, classroom_ids)
        open_now = {cid: s.id for cid, s in open_sessions.items()}
        stale = [
            classroom_id
            for classroom_id in classroom_ids
            if fresh
            or (cached := self._cache.get((classroom_id, window))) is None
            or (now - cached.window_end.ToDatetime()).total_seconds() >= refresh * 0.999
            or cached.session_id != open_now.get(classroom_id, "")
        ]
        if stale:
            agg = self.config.aggregate
            computed = aggregate.classroom_states(session, stale, window, now, agg.k_anonymity,
                                                  agg.agent_offline_after_s, open_sessions)
            self._cache.update(((classroom_id, window), state) for classroom_id, state in computed.items())
        return {classroom_id: self._cache[(classroom_id, window)] for classroom_id in classroom_ids}

    def _lead(self, now: datetime, active: list[str]) -> None:
        idle_s = self.config.aggregate.session_idle_minutes * 60
        for session_id in self.store.close_idle_sessions(now, idle_s):
            log.info("closed session %s after %.0f min without observations", session_id, idle_s / 60)
        overrides = self._threshold_overrides()
        pending: list[pb.AdaptationSignal] = []  # fired and not yet stored
        try:
            with self.sessions() as session:
                snapshots = self._snapshots(session, active, now)
                by_window = {w: self._states(session, active, w, now) for w in self.policy.windows}
                for classroom_id in active:
                    states = {w: by_window[w][classroom_id] for w in self.policy.windows}
                    pending.extend(self.policy.evaluate(classroom_id, now, states, overrides))
            self.policy.forget_except(set(active))
            if snapshots:
                with self.sessions.begin() as session:
                    session.execute(insert(db.Aggregate), snapshots)
            while pending:  # each leaves the list only once handled: a raise leaves it pending
                self._store_signal(pending[0])
                pending.pop(0)
        except BaseException:
            # a fired rule waits for its clear level before it fires again: one whose signal was
            # never stored would stay silent, so each is taken back to fire again on the next tick
            for signal in pending:
                self.policy.unfire(signal)
            raise
        if now - self._last_retention >= RETENTION_EVERY:
            self._last_retention = now
            raw = self.store.setting(retention.RAW_KEY) or self.config.database.retention_days
            kept = self.store.setting(retention.AGGREGATE_KEY) or self.config.database.aggregate_retention_days
            retention.purge(self.sessions, now, float(raw), float(kept), progress=self._ticker_progress)

    def _snapshots(self, session, active: list[str], now: datetime) -> list[dict]:
        """Aggregate rows of each window whose period ended since the last tick."""
        snapshots = []
        for window in self.config.aggregate.windows:
            if self._last_tick and int(_epoch(now) // window) != int(_epoch(self._last_tick) // window):
                snaps = self._states(session, active, window, now, fresh=True)
                snapshots.extend(aggregate.to_aggregate_row(snap) for snap in snaps.values())
        return snapshots

    def _store_signal(self, signal: pb.AdaptationSignal) -> None:
        """Store and announce one fired signal; one the database refuses is taken back to fire again."""
        try:
            record_signal(self.store, signal, self._outlets)
        except SQLAlchemyError as exc:
            self.policy.unfire(signal)
            log.warning("could not store signal %s %s in %s (%s); it fires again on the next tick",
                        signal.id, pb.SignalKind.Name(signal.kind), signal.classroom_id, first_line(exc, 200))
            return
        log.info("signal %s %s in %s: %s", signal.id, pb.SignalKind.Name(signal.kind),
                 signal.classroom_id, signal.reason)
        self._announce(signal)

    def _threshold_overrides(self) -> dict[str, float]:
        overrides = {}
        for rule in self.policy.rules:
            value = self.store.setting(threshold_key(rule.name))
            if value is None:
                continue
            if (problem := rule.override_problem(value)) is None:
                overrides[rule.name] = float(value)
            else:
                self._slow.warning(f"override {rule.name}", "ignoring setting %s = %r: %s",
                                   threshold_key(rule.name), value, problem)
        return overrides

    def _feed(self, now: datetime) -> None:
        """Announce signals other instances stored (and forget ones too old to be re-read)."""
        for signal in self.store.signals_since(self._feed_from - SIGNAL_FEED_MARGIN):
            self._announce(signal)
        self._feed_from = now
        horizon = now - 2 * SIGNAL_FEED_MARGIN
        self._announced = {k: t for k, t in self._announced.items() if t >= horizon}

    def _announce(self, signal: pb.AdaptationSignal) -> None:
        if signal.id not in self._announced:
            self._announced[signal.id] = signal.created_at.ToDatetime()
            self.hub.publish(signal)


class _RequestHandler(WSGIRequestHandler):
    """werkzeug's access log without the health probes a load balancer sends every few seconds."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.path != "/healthz":
            super().log_request(code, size)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket for the web app, bound here rather than by werkzeug: werkzeug answers a port
    in use with a message of its own and ``sys.exit(1)``, which systemd restarts over and over, where
    an :class:`OSError` becomes the coordinator's one-line error and exit status 2."""
    family = select_address_family(host, port)
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as werkzeug's own bind does
        listener.bind(get_sockaddr(host, port, family))
        listener.listen(LISTEN_QUEUE)
    except OSError:
        listener.close()
        raise
    return listener


def _epoch(value: datetime) -> float:
    return (value - datetime(1970, 1, 1)).total_seconds()
