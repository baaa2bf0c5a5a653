"""Signed webhooks: every adaptation signal POSTed as JSON to the LMS endpoints in ``[[webhooks]]``.

What a receiver gets, per signal and per matching webhook (``classrooms = []`` matches all)::

    POST <url>
    Content-Type: application/json; proto=affectedge.v1.AdaptationSignal
    X-AffectEdge-Delivery: <signal id>:<hex>   (this signal to this webhook: dedup key, see below)
    X-AffectEdge-Timestamp: 1767225600         (Unix seconds when this attempt was signed)
    X-AffectEdge-Signature: sha256=<hex>       (absent only if the webhook has no secret)

    {"id": "...", "classroomId": "room-1", "kind": "SLOW_DOWN", "strength": 0.8, ...}

The body is the protobuf JSON mapping of ``affectedge.v1.AdaptationSignal`` (camelCase names,
enums as names). ``X-AffectEdge-Delivery`` is the same on every retry and requeue of a delivery
and never reused: the signal's id (a UUID, also the body's ``id``), a colon and 16 hex digits that
stand for the webhook's URL (a hash: the URL may hold its secret), so a receiver can drop a
repeat by it even after the coordinator's database is restored or moved. A classroom's signals
arrive in the order they fired, also after the receiver was down (see :mod:`coordinator.outbox`).

The signature is ``HMAC-SHA256(secret, "<timestamp>.<body>")`` in hex: signing the timestamp with
the body lets a receiver reject replays of an old, captured request.

Verifying in an LMS (Python; the same four steps port to any language)::

    from coordinator.webhooks import verify_signature

    ok = verify_signature(secret, request.headers["X-AffectEdge-Timestamp"], request.get_data(),
                          request.headers["X-AffectEdge-Signature"])
    if not ok:
        return "", 401

i.e. recompute the HMAC over the *raw* body bytes (not re-serialised JSON), compare in constant
time, and refuse timestamps more than five minutes from your clock. Answer 2xx quickly (queue the
work); anything else is retried with exponential back-off (see :mod:`coordinator.outbox`) and a
4xx other than 408/425/429 is taken as a final "no" for that delivery. Redirects are not followed:
a 301 or 308 is final too (configure the new URL), other 3xx are retried at the same URL.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import TYPE_CHECKING

import requests

from affectedge.codec import content_type, encode
from affectedge.v1 import affectedge_pb2 as pb
from coordinator.outbox import Outbox, Target, post, safe_url

if TYPE_CHECKING:
    from coordinator.service import Coordinator

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-AffectEdge-Timestamp"
SIGNATURE_HEADER = "X-AffectEdge-Signature"
DELIVERY_HEADER = "X-AffectEdge-Delivery"
SCHEME = "sha256="


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-AffectEdge-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return SCHEME + mac.hexdigest()


def verify_signature(secret: str, timestamp: str, body: bytes, header: str,
                     tolerance_s: float = 300, now: float | None = None) -> bool:
    """True if ``header`` signs ``body`` at ``timestamp`` with ``secret``, within ``tolerance_s``.

    ``body`` must be the raw request bytes. ``now`` (Unix seconds) defaults to the local clock.
    """
    try:
        sent = int(timestamp)
    except (TypeError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - sent) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header or "")


def delivery_key(signal_id: str, url: str) -> str:
    """The ``X-AffectEdge-Delivery`` value of ``signal_id`` sent to ``url``.

    Built from the signal and the target, not from a database row id: row ids start again in a
    restored or new database, and a receiver deduplicating on them would drop new signals.
    """
    return f"{signal_id}:{hashlib.sha256(url.encode()).hexdigest()[:16]}"


class WebhookDispatcher(Outbox):
    """Delivers signals to every configured webhook whose classroom filter matches."""

    kind = "webhook"

    def __init__(self, coordinator: Coordinator):
        hooks = coordinator.config.webhooks
        super().__init__(coordinator, [
            Target(h.url, h.max_attempts, h.backoff_s, h.timeout_s) for h in hooks
        ])
        self.hooks = {h.url: h for h in hooks}
        for hook in hooks:
            if not hook.secret:
                log.warning("webhook %s has no secret: its requests are unsigned, so the receiver "
                            "cannot tell them from forgeries; set `secret`", safe_url(hook.url))

    def targets_for(self, signal: pb.AdaptationSignal) -> list[Target]:
        return [self.targets[url] for url, hook in self.hooks.items()
                if not hook.classrooms or signal.classroom_id in hook.classrooms]

    def send(self, http: requests.Session, target: Target, signal: pb.AdaptationSignal) -> None:
        body = encode(signal, "json")
        timestamp = str(int(time.time()))
        headers = {"Content-Type": content_type(signal, "json"), TIMESTAMP_HEADER: timestamp,
                   DELIVERY_HEADER: delivery_key(signal.id, target.url)}
        secret = self.hooks[target.url].secret
        if secret:
            headers[SIGNATURE_HEADER] = sign(secret, timestamp, body)
        post(http, target.url, body, headers, target.timeout_s)
