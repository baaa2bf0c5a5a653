"""At-least-once delivery of adaptation signals to outside systems (webhooks, an xAPI LRS).

The one retry implementation both outlets share. Every signal an outlet wants to send becomes a
:class:`coordinator.db.Delivery` row per target, stored in the same transaction as the signal
(:func:`record_signal`), so the table, not memory, is the queue: a coordinator restarted
mid-retry, or a new policy leader, resumes every ``pending`` row, and rows whose attempts ran out
stay behind as ``dead`` with the last error: the dead-letter table. The count of the last day is on the
health report (``/healthz``, the admin's page), and ``coordinator requeue-deliveries`` puts the
rows back to ``pending`` with their attempts reset (a running coordinator picks them up within a
minute).

A classroom's signals reach each target in the order they were stored: a delivery waits while an
earlier one (lower ``Delivery.id``, which follows the signal's creation because a signal and its
rows are stored together) for the same target and classroom is still ``pending``, so an LMS that
comes back after an outage gets them in order, not in the order of their jittered retry times. A
``dead`` delivery holds nothing back. While a receiver is down only the earliest delivery of each
classroom is retried; the later ones wait without spending attempts.

Each target gets its own sender thread and HTTP session, so one slow or unreachable LMS never
delays another. The payload is rebuilt from the stored :class:`coordinator.db.Signal` row on every
attempt, which makes retries byte-identical (the xAPI statement id is derived from the signal id,
so an LRS that already stored a statement whose response was lost drops the duplicate; so is a
webhook's dedup key, see :func:`coordinator.webhooks.delivery_key`).

Retry schedule after attempt *n* (1-based): ``backoff_s * 2**(n-1)``, stretched by a random
factor in [1, 1.5) so that many deliveries failing together do not retry in lock-step, capped at
five minutes: the earliest delivery of a classroom holds its later ones back, so the cap is also
how late a classroom's signals can be after its LMS comes back. An HTTP 4xx answer other than
408/425/429 means the receiver rejects this payload for good; retrying cannot help, so the delivery
goes ``dead`` at once.

Redirects are never followed, and no 3xx counts as delivered: ``requests`` would turn a 301/302/303
into a GET without the body (and report the page it lands on as a success), and re-send a 307/308,
signature and all, to whatever host the ``Location`` names. A 301 or 308 says the configured URL
moved for good, so the delivery goes ``dead`` at once and the admin must fix the URL; other 3xx are
temporary by definition (a maintenance or login page while the LMS is down) and are retried.

The error text stored in ``last_error`` and logged never shows a target's query, credentials or
the last segment of its path (see :func:`safe_url` and :func:`redact`): a webhook URL's ``?token=``
or ``/hooks/<key>`` often is its secret.

HTTP goes through ``requests``: a ``Session`` per target keeps the TLS connection alive between
deliveries and gives connect and read timeouts and clear exceptions, which ``urllib`` does not.
"""

from __future__ import annotations

import argparse
import logging
import random
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import urljoin, urlsplit

import requests
from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from affectedge.errors import first_line
from affectedge.v1 import affectedge_pb2 as pb
from coordinator import db
from coordinator.ratelimit import RateLimitedLog
from coordinator.store import Store, naive_utc, signal_message, utcnow

if TYPE_CHECKING:
    from coordinator.service import Coordinator

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0
#: how long a dead delivery counts on the health report (from when it died)
DEAD_REPORTED_S = 86400.0
#: 4xx answers that mean "not now" rather than "never"
RETRYABLE_CLIENT_ERRORS = frozenset({408, 425, 429})
#: redirects that say the configured URL is outdated for good, so every retry would get the same answer
PERMANENT_REDIRECTS = frozenset({301, 308})
#: how many due deliveries a sender reads per query
BATCH = 50
DB_RETRY_S = 2.0  # after a database error, before the sender looks at its rows again
USER_AGENT = "affectedge-coordinator"


@dataclass(frozen=True)
class Target:
    """One receiver: ``url`` is also the value stored in ``Delivery.target``."""

    url: str
    max_attempts: int
    backoff_s: float
    timeout_s: float


class DeliveryError(Exception):
    """One attempt failed; ``permanent`` when retrying the same payload cannot succeed."""

    def __init__(self, message: str, permanent: bool = False, status: int | None = None):
        super().__init__(message)
        self.permanent = permanent
        self.status = status  # the receiver's HTTP status, if it answered


def retry_delay(attempts: int, backoff_s: float) -> float:
    """Seconds to wait after ``attempts`` failed attempts (exponential, jittered, capped)."""
    # the exponent capped: 2**1024 does not fit a float, and 2**30 s is past any cap
    delay = backoff_s * 2 ** min(attempts - 1, 30) * random.uniform(1.0, 1.5)
    return min(delay, MAX_BACKOFF_S)


def safe_url(url: str) -> str:
    """``url`` fit for logs and ``last_error``: ``scheme://host[:port]`` and, where more follows, the
    first path segment, with "/…" for what was cut; never credentials, a query or the last segment.

    A webhook's secret is often its ``?token=`` or the end of its path (``/hooks/<key>``,
    ``https://webhook.site/<uuid>``); a first segment followed by others still tells an admin which
    of a host's endpoints it is. The host part is copied, not parsed, so that an odd port in a
    receiver's ``Location`` cannot raise.
    """
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{_safe_path(parts.path, parts.query)}"


def _safe_path(path: str, query: str) -> str:
    segments = path.strip("/").split("/")
    shown = f"/{segments[0]}" if len(segments) > 1 else ""
    cut = "/…" if segments != [""] or query else ""
    return shown + cut


def redact(text: str, *urls: str | None) -> str:
    """``text`` with each of ``urls`` cut by :func:`safe_url`, and with their path-and-query (as
    urllib3's "Max retries exceeded with url: /hook?token=..." shows it), path and query cut alike."""
    replacements: dict[str, str] = {}
    for url in filter(None, urls):
        parts = urlsplit(url)
        replacements[url] = safe_url(url)
        safe = _safe_path(parts.path, parts.query)
        replacements[parts.path + (f"?{parts.query}" if parts.query else "")] = safe
        replacements[parts.path] = _safe_path(parts.path, "")
        replacements[parts.query] = "…"
    for secret in sorted(replacements, key=len, reverse=True):  # a whole URL before its parts
        if secret not in ("", "/") and replacements[secret] != secret:
            text = text.replace(secret, replacements[secret])
    return text


def redirect_target(url: str, response: requests.Response) -> str:
    """Where a 3xx answer to ``url`` points, redacted: the ``Location`` may echo the token."""
    location = response.headers.get("Location")
    if not location:
        return "nowhere (no Location header)"
    try:
        return safe_url(urljoin(url, location))
    except ValueError:  # e.g. "http://[bad": a broken header must fail the attempt, not the sender
        return "an unparsable Location"


def post(http: requests.Session, url: str, body: bytes, headers: dict, timeout_s: float) -> None:
    """POST ``body``; raise :class:`DeliveryError` unless the answer is 2xx (redirects are not followed)."""
    try:
        response = http.post(url, data=body, headers=headers, timeout=timeout_s, allow_redirects=False)
    except requests.RequestException as exc:
        prepared = exc.request.url if exc.request is not None else None  # as the exception text spells it
        raise DeliveryError(redact(f"{type(exc).__name__}: {exc}", url, prepared)) from exc
    status = response.status_code
    if 200 <= status < 300:  # not response.ok, which is true for a 3xx as well
        return
    if 300 <= status < 400:
        raise DeliveryError(f"HTTP {status} redirect to {redirect_target(url, response)}, not followed: "
                            "configure the URL that answers itself", permanent=status in PERMANENT_REDIRECTS,
                            status=status)
    text = redact(response.text[:300].strip(), url)  # an error page may quote the request URL
    permanent = 400 <= status < 500 and status not in RETRYABLE_CLIENT_ERRORS
    raise DeliveryError(f"HTTP {status}: {text}", permanent=permanent, status=status)


def record_signal(store: Store, signal: pb.AdaptationSignal, outlets: Sequence[Outbox]) -> None:
    """Store a fired signal and its pending deliveries in one transaction, then wake the senders.

    A transactional outbox: a coordinator that dies after the commit leaves rows that the next
    policy leader's senders deliver; one that dies before leaves neither, never a stored signal
    that no outlet will send.
    """
    store.add_signal(signal, [row for outlet in outlets for row in outlet.deliveries_for(signal)])
    for outlet in outlets:
        outlet.wake()


class Outbox(ABC):
    """Base of the outlets: subclasses say which targets want a signal and how to send it."""

    #: ``Delivery.kind`` of this outlet's rows
    kind: ClassVar[str]

    def __init__(self, coordinator: Coordinator, targets: Sequence[Target]):
        self.coordinator = coordinator
        self.sessions = coordinator.sessions
        self.targets = {t.url: t for t in targets}
        self._stop = threading.Event()
        self._wake = {url: threading.Event() for url in self.targets}
        self._threads: list[threading.Thread] = []
        self._errors = RateLimitedLog(60.0, log)
        # target url -> its dead deliveries, as its sender last counted them (every key made here, so
        # the health monitor's thread never iterates over a dict that grows)
        self._dead = dict.fromkeys(self.targets, 0)

    # -- what subclasses provide ------------------------------------------------------------

    def targets_for(self, signal: pb.AdaptationSignal) -> list[Target]:
        """The targets that want ``signal`` (all of them unless a subclass filters)."""
        return list(self.targets.values())

    @abstractmethod
    def send(self, http: requests.Session, target: Target, signal: pb.AdaptationSignal) -> None:
        """Deliver ``signal`` to ``target`` once; raise :class:`DeliveryError` on failure."""

    def http_session(self, target: Target) -> requests.Session:
        """The HTTP session a target's sender uses (subclasses add authentication)."""
        http = requests.Session()
        http.headers["User-Agent"] = USER_AGENT
        return http

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Begin sending pending deliveries; nothing at all when no target is configured."""
        if not self.targets:
            return
        self._stop.clear()
        self._warn_orphans()
        for target in self.targets.values():
            self._spawn(self._sender, f"{self.kind}-{safe_url(target.url)}", target)

    def stop(self) -> None:
        """Stop sending; unsent deliveries stay ``pending`` for the next start."""
        self._stop.set()
        self.wake()
        for thread in self._threads:
            thread.join(max((t.timeout_s for t in self.targets.values()), default=0) + 5)
        self._threads.clear()

    def _spawn(self, fn, name: str, *args) -> None:
        thread = threading.Thread(target=fn, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _warn_orphans(self) -> None:
        """Pending rows for a target no longer configured would wait forever: say so."""
        with self.sessions() as s:
            rows = s.execute(
                select(db.Delivery.target, func.count())
                .where(db.Delivery.kind == self.kind, db.Delivery.status == "pending")
                .group_by(db.Delivery.target)
            ).all()
        for url, count in rows:
            if url not in self.targets:
                log.warning("%d pending %s deliveries to %s, which is no longer configured; they stay "
                            "pending until it is configured again", count, self.kind, safe_url(url))

    # -- intake: fired signal -> delivery rows (stored with the signal) ----------------------

    def deliveries_for(self, signal: pb.AdaptationSignal) -> list[dict]:
        """Pending :class:`coordinator.db.Delivery` rows, one per interested target."""
        now = utcnow()
        return [
            {"signal_id": signal.id, "target": t.url, "kind": self.kind, "status": "pending", "attempts": 0,
             "next_attempt_at": now}
            for t in self.targets_for(signal)
        ]

    def wake(self) -> None:
        """New rows are stored: send now rather than at the next idle check."""
        for event in self._wake.values():
            event.set()

    # -- senders: delivery rows -> HTTP ---------------------------------------------------

    def _sender(self, target: Target) -> None:
        """Send due rows until stopped; a database error pauses the loop, it never ends it."""
        http = self.http_session(target)
        wake = self._wake[target.url]
        try:
            while not self._stop.is_set():
                wake.clear()
                try:
                    for delivery_id in self._due(target):
                        if self._stop.is_set():
                            return
                        self._attempt(http, target, delivery_id)
                    idle = self._idle_seconds(target)
                    self._dead[target.url] = self._count_dead(target)
                except Exception as exc:  # a locked or lost database: the rows wait in it, retry soon
                    self._errors.warning(target.url, "%s sender for %s: %s; retrying in %.0f s", self.kind,
                                         safe_url(target.url), first_line(exc), DB_RETRY_S)
                    idle = DB_RETRY_S
                wake.wait(idle)
        finally:
            http.close()

    def _heads(self, target: Target) -> Select:
        """The ids of the earliest pending delivery of each classroom to ``target``: the only ones
        that may be sent, so that a classroom's signals arrive in the order they were stored."""
        return (
            select(func.min(db.Delivery.id))
            .join(db.Signal, db.Signal.id == db.Delivery.signal_id, isouter=True)
            .where(db.Delivery.kind == self.kind, db.Delivery.target == target.url, db.Delivery.status == "pending")
            .group_by(db.Signal.classroom_id)
        )

    def _due(self, target: Target) -> list[int]:
        with self.sessions() as s:
            return list(s.scalars(
                select(db.Delivery.id)
                .where(db.Delivery.id.in_(self._heads(target)),
                       or_(db.Delivery.next_attempt_at.is_(None), db.Delivery.next_attempt_at <= utcnow()))
                .order_by(db.Delivery.next_attempt_at, db.Delivery.id)
                .limit(BATCH)
            ))

    def _idle_seconds(self, target: Target) -> float:
        """Sleep until the earliest retry of a classroom's first pending delivery is due (at most a
        minute; new rows wake us). The later rows it holds back are due too, but waking for them would
        spin: they go once it has."""
        with self.sessions() as s:
            earliest = s.scalar(
                select(func.min(db.Delivery.next_attempt_at)).where(db.Delivery.id.in_(self._heads(target)))
            )
        if earliest is None:
            return 60.0
        return min(max((earliest - utcnow()).total_seconds(), 0.0), 60.0)

    def _count_dead(self, target: Target) -> int:
        """Deliveries that died in the last :data:`DEAD_REPORTED_S`, whatever their signal's age (one
        requeued into an LMS still down dies again): one a receiver refused for good stays dead when
        requeued, and must not keep the health report degraded for ever."""
        with self.sessions() as s:
            return s.scalar(
                select(func.count())
                .where(db.Delivery.kind == self.kind, db.Delivery.target == target.url, db.Delivery.status == "dead",
                       db.Delivery.next_attempt_at >= utcnow() - timedelta(seconds=DEAD_REPORTED_S))
            )

    def dead_deliveries(self) -> list[tuple[str, int]]:
        """``(kind, count)`` of recent dead deliveries over all targets, as of each sender's last pass (at
        most a minute old): for the health report, which must not query the database. It names no
        receiver: ``/healthz`` is public, and the log names each one."""
        count = sum(self._dead.values())
        return [(self.kind, count)] if count else []

    def _attempt(self, http: requests.Session, target: Target, delivery_id: int) -> None:
        with self.sessions() as s:
            delivery = s.get(db.Delivery, delivery_id)
            row = s.get(db.Signal, delivery.signal_id)
            delivery.attempts += 1
            try:
                if row is None:
                    raise DeliveryError(f"signal {delivery.signal_id} is not in the database (yet)")
                self.send(http, target, signal_message(row))
            except DeliveryError as exc:
                self._failed(delivery, target, exc)
            else:
                delivery.status, delivery.last_error, delivery.next_attempt_at = "delivered", "", None
                log.log(logging.INFO if delivery.attempts > 1 else logging.DEBUG,
                        "%s delivery %d of signal %s to %s succeeded on attempt %d", self.kind,
                        delivery.id, delivery.signal_id, safe_url(target.url), delivery.attempts)
            s.commit()

    def _failed(self, delivery: db.Delivery, target: Target, exc: DeliveryError) -> None:
        delivery.last_error = str(exc)[:1000]
        if exc.permanent or delivery.attempts >= target.max_attempts:
            delivery.status, delivery.next_attempt_at = "dead", utcnow()  # when it died, for the health report
            log.warning("%s delivery %d of signal %s to %s is dead after %d attempt(s): %s", self.kind,
                        delivery.id, delivery.signal_id, safe_url(target.url), delivery.attempts, exc)
            return
        delay = retry_delay(delivery.attempts, target.backoff_s)
        delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
        log.info("%s delivery %d to %s failed (attempt %d/%d, retry in %.1f s): %s", self.kind,
                 delivery.id, safe_url(target.url), delivery.attempts, target.max_attempts, delay, exc)


# -- the dead-letter table: `coordinator requeue-deliveries` ---------------------------------------


class RequeueError(Exception):
    """A requeue request that names its deliveries ambiguously."""


def requeue(sessions: sessionmaker, target: str | None = None, since: datetime | None = None) -> int:
    """Put dead deliveries back to ``pending`` with their attempts reset, and say how many.

    ``target`` is a receiver's URL, or its form in logs and the health report (:func:`safe_url`);
    ``since`` (naive UTC) keeps to signals created then or later. Idempotent: what it requeued is no
    longer dead, so a second run finds nothing to requeue.
    """
    with sessions.begin() as s:
        where = [db.Delivery.status == "dead"]
        if target is not None:
            where.append(db.Delivery.target.in_(_dead_targets_named(s, target)))
        if since is not None:
            where.append(db.Delivery.signal_id.in_(select(db.Signal.id).where(db.Signal.created_at >= since)))
        result = s.execute(update(db.Delivery).where(*where)
                           .values(status="pending", attempts=0, next_attempt_at=utcnow())
                           .execution_options(synchronize_session=False))
        return result.rowcount


def _dead_targets_named(s: Session, name: str) -> list[str]:
    """The URLs of dead deliveries that ``name`` stands for: the URL itself, or the one URL whose
    logged form it is (two URLs logged alike are refused: requeueing both may not be meant)."""
    urls = s.scalars(select(db.Delivery.target).where(db.Delivery.status == "dead").distinct()).all()
    if name in urls:
        return [name]
    shown = [url for url in urls if safe_url(url) == name]
    if len(shown) > 1:
        raise RequeueError(f"--target {name} stands for {len(shown)} receivers: give the full URL from the config")
    return shown


def _utc(text: str) -> datetime:
    """``--since``: an ISO date or time, UTC unless it names its offset (stored times are naive UTC)."""
    try:
        return naive_utc(datetime.fromisoformat(text))
    except (ValueError, OverflowError):  # OverflowError: an offset that moves it out of years 1-9999
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date or time; write e.g. 2026-01-31T09:00 "
                                         "(UTC) or 2026-01-31T10:00+01:00") from None


def _run_requeue(args: argparse.Namespace) -> int:
    from coordinator.commands import with_config

    count = with_config(args.config, lambda config: requeue(db.connect(config.database.url), args.target,
                                                            args.since), RequeueError)
    print(f"requeued {count} dead deliveries" + ("; a running coordinator sends them within a minute" if count else ""))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `requeue-deliveries [--target NAME] [--since ISO]`."""
    parser = subparsers.add_parser(
        "requeue-deliveries",
        help="send dead (given-up) webhook and xAPI deliveries again",
        description="Put dead webhook and xAPI deliveries back to pending with their attempts reset; the "
        "running coordinator sends them within a minute, each classroom's in order. Running it again "
        "requeues only what died since.",
    )
    parser.add_argument("--config", help="coordinator TOML config (for the database URL)")
    parser.add_argument("--target", metavar="NAME",
                        help="only this receiver: its URL, or its name as the health report shows it")
    parser.add_argument("--since", metavar="ISO", type=_utc,
                        help="only signals created at or after this time (UTC unless an offset is given)")
    parser.set_defaults(func=_run_requeue)
