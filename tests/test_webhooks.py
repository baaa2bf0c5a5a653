"""Webhooks against a real HTTP receiver on 127.0.0.1: signatures, filters, retries, dead letters, restarts."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import free_port
from outlets import Parts, deliveries, parts, publish_signal, wait_until
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from affectedge.codec import decode
from affectedge.settings import ConfigError
from affectedge.v1 import affectedge_pb2 as pb
from coordinator import cli, db, health, outbox
from coordinator.config import WebhookConfig, XapiConfig
from coordinator.outbox import MAX_BACKOFF_S, redact, retry_delay, safe_url
from coordinator.webhooks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookDispatcher,
    delivery_key,
    sign,
    verify_signature,
)

SECRET = "s3cret-for-room-1"


@dataclass
class Received:
    headers: dict
    body: bytes
    method: str = "POST"
    status: int = 200  # what the receiver answered

    @property
    def signal_id(self) -> str:
        return decode(self.body, pb.AdaptationSignal).id


@dataclass
class Receiver:
    """An LMS endpoint: answers ``statuses`` in turn (then 200) and records every request.

    ``location`` goes out as a ``Location`` header with every answer to a POST; a GET (what a
    client following a 301/302/303 sends) is answered 200, as a login page would be.
    """

    statuses: list[int] = field(default_factory=list)
    always: int | None = None
    location: str | None = None
    requests: list[Received] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/affectedge?token=not-logged"

    def serve(self, port: int = 0) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.always or (receiver.statuses.pop(0) if receiver.statuses else 200)
                receiver.requests.append(Received(dict(self.headers), body, status=status))
                self.send_response(status)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.end_headers()
                self.wfile.write(b"receiver says %d" % status)

            def do_GET(self):
                receiver.requests.append(Received(dict(self.headers), b"", "GET"))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"<html>login page</html>")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().serve()
    yield r
    r.close()


def dispatcher_for(p: Parts) -> WebhookDispatcher:
    dispatcher = WebhookDispatcher(p)
    dispatcher.start()
    p.outlets.append(dispatcher)
    return dispatcher


def publish_until(p: Parts, status: str) -> tuple[pb.AdaptationSignal, db.Delivery]:
    """Publish one signal with a running dispatcher and return it with its first webhook delivery in `status`."""
    dispatcher = dispatcher_for(p)
    try:
        signal = publish_signal(p)
        row = wait_until(lambda: [r for r in deliveries(p, "webhook") if r.status == status], what=status)[0]
    finally:
        dispatcher.stop()
    return signal, row


def hook(url: str, **extra) -> dict:
    return {"url": url, "secret": SECRET, "backoff_s": 0.05, **extra}


def test_signed_json_reaches_matching_webhooks_only(tmp_path):
    everything, room2_only = Receiver().serve(), Receiver().serve()
    p = parts(tmp_path, webhooks=[hook(everything.url), {**hook(room2_only.url), "secret": "other",
                                                          "classrooms": ["room-2"]}])
    dispatcher = dispatcher_for(p)
    try:
        first = publish_signal(p, classroom="room-1")
        second = publish_signal(p, classroom="room-2")
        wait_until(lambda: len(everything.requests) == 2 and len(room2_only.requests) == 1, what="deliveries")
    finally:
        dispatcher.stop()
        everything.close()
        room2_only.close()

    got = everything.requests[0]
    assert verify_signature(SECRET, got.headers[TIMESTAMP_HEADER], got.body, got.headers[SIGNATURE_HEADER])
    # the documented wire format, computed independently: HMAC-SHA256 over "<timestamp>.<body>"
    expected = hmac.new(SECRET.encode(), f"{got.headers[TIMESTAMP_HEADER]}.".encode() + got.body, hashlib.sha256)
    assert got.headers[SIGNATURE_HEADER] == f"sha256={expected.hexdigest()}"
    assert got.headers["Content-Type"] == "application/json; proto=affectedge.v1.AdaptationSignal"
    assert decode(got.body, pb.AdaptationSignal, got.headers["Content-Type"]) == first
    # the filtered webhook saw only room-2's signal, signed with its own secret
    other = room2_only.requests[0]
    assert decode(other.body, pb.AdaptationSignal) == second
    assert verify_signature("other", other.headers[TIMESTAMP_HEADER], other.body, other.headers[SIGNATURE_HEADER])
    rows = deliveries(p, "webhook")
    assert [(r.status, r.attempts) for r in rows] == [("delivered", 1)] * 3
    assert {r.headers[DELIVERY_HEADER] for r in everything.requests} == {
        delivery_key(first.id, everything.url), delivery_key(second.id, everything.url)}


def test_two_webhooks_with_one_url_are_refused(tmp_path):
    """Deliveries are keyed by URL, so the second entry used to replace the first without a word."""
    url = "https://lms:password@lms.example/hook"
    with pytest.raises(ConfigError, match=r"^test config: key `webhooks`: .*webhooks 1 and 3 have the same url") as e:
        parts(tmp_path, webhooks=[hook(url), hook("https://other.example/hook"), hook(url, classrooms=["room-2"])])
    assert "password" not in str(e.value) and "\n" not in str(e.value)


def test_verify_signature_rejects_tampering_wrong_secret_and_replays():
    body, ts = b'{"id": "x"}', str(int(time.time()))
    header = sign(SECRET, ts, body)
    assert verify_signature(SECRET, ts, body, header)
    assert not verify_signature(SECRET, ts, body + b" ", header)
    assert not verify_signature("wrong", ts, body, header)
    assert not verify_signature(SECRET, str(int(ts) + 1), body, header)  # timestamp is signed too
    assert not verify_signature(SECRET, ts, body, header, now=int(ts) + 301)  # a replay 5 min later
    assert verify_signature(SECRET, ts, body, header, now=int(ts) + 299)
    assert not verify_signature(SECRET, "not-a-number", body, header)
    assert not verify_signature(SECRET, ts, body, "")


def test_failures_are_retried_until_the_receiver_accepts(tmp_path, receiver):
    receiver.statuses = [503, 500]
    p = parts(tmp_path, webhooks=[hook(receiver.url, max_attempts=5)])
    signal, row = publish_until(p, "delivered")
    assert (row.attempts, row.last_error, len(receiver.requests)) == (3, "", 3)
    # every retry carries the same delivery key and byte-identical body
    assert {r.headers[DELIVERY_HEADER] for r in receiver.requests} == {delivery_key(signal.id, receiver.url)}
    assert {r.body for r in receiver.requests} == {receiver.requests[0].body}
    assert decode(receiver.requests[0].body, pb.AdaptationSignal) == signal


def test_a_receiver_that_keeps_failing_ends_in_the_dead_letter_table(tmp_path, receiver):
    receiver.always = 500
    p = parts(tmp_path, webhooks=[hook(receiver.url, max_attempts=3)])
    _, row = publish_until(p, "dead")
    assert row.attempts == 3 and len(receiver.requests) == 3
    assert row.last_error == "HTTP 500: receiver says 500"
    assert row.next_attempt_at is not None  # when it died: the health report counts the last day's


def test_a_rejected_payload_is_not_retried(tmp_path, receiver):
    receiver.always = 400
    p = parts(tmp_path, webhooks=[hook(receiver.url, max_attempts=5)])
    _, row = publish_until(p, "dead")
    assert (row.attempts, len(receiver.requests)) == (1, 1)
    assert row.last_error.startswith("HTTP 400")


def settled(p: Parts) -> db.Delivery:
    """Publish one signal with a running dispatcher and return its delivery once no longer pending."""
    dispatcher = dispatcher_for(p)
    try:
        publish_signal(p)
        return wait_until(lambda: (r := deliveries(p, "webhook")[0]).status != "pending" and r, what="settled")
    finally:
        dispatcher.stop()


def test_a_moved_webhook_is_dead_at_once_and_its_redirect_not_followed(tmp_path, receiver):
    """Following a 301 turned the POST into a body-less GET whose 200 counted as delivered."""
    receiver.always, receiver.location = 301, "/login?next=/hooks/affectedge?token=not-logged"
    p = parts(tmp_path, webhooks=[hook(receiver.url, max_attempts=5)])
    row = settled(p)
    assert [r.method for r in receiver.requests] == ["POST"]
    assert (row.status, row.attempts) == ("dead", 1)
    port = receiver.server.server_address[1]
    assert row.last_error == (f"HTTP 301 redirect to http://127.0.0.1:{port}/…, not followed: "
                              "configure the URL that answers itself")


def test_a_temporary_redirect_is_retried_and_never_sends_the_signed_body_elsewhere(tmp_path, receiver):
    """Following a 307 re-sent the signed body to whatever host the Location named."""
    elsewhere = Receiver().serve()
    try:
        receiver.always, receiver.location = 307, elsewhere.url
        p = parts(tmp_path, webhooks=[hook(receiver.url, max_attempts=2)])
        row = settled(p)
    finally:
        elsewhere.close()
    assert elsewhere.requests == []
    assert (row.status, row.attempts, len(receiver.requests)) == ("dead", 2, 2)
    assert row.last_error.startswith(f"HTTP 307 redirect to http://127.0.0.1:{elsewhere.server.server_address[1]}/hooks/…,")


def test_an_unreachable_webhook_error_shows_neither_its_key_nor_its_query(tmp_path, caplog):
    url = f"http://127.0.0.1:{free_port()}/hooks/key-in-path?token=token-in-query"  # nothing listens
    p = parts(tmp_path, webhooks=[hook(url, max_attempts=1)])
    row = settled(p)
    assert row.status == "dead"
    assert row.last_error.startswith("ConnectionError: ") and "url: /hooks/… (Caused by" in row.last_error
    assert "key-in-path" not in row.last_error and "token-in-query" not in row.last_error
    assert "is dead after 1 attempt(s): ConnectionError" in caplog.text and "token-in-query" not in caplog.text


def test_pending_deliveries_survive_a_restart(tmp_path):
    port = free_port()  # nothing listens here yet: every attempt is refused
    url = f"http://127.0.0.1:{port}/hook"
    config = {"webhooks": [hook(url, max_attempts=50, backoff_s=0.1)]}
    p = parts(tmp_path, **config)
    dispatcher = dispatcher_for(p)
    try:
        publish_signal(p)
        wait_until(lambda: deliveries(p, "webhook") and deliveries(p, "webhook")[0].attempts >= 1,
                   what="a failed attempt")
    finally:
        dispatcher.stop()
    before = deliveries(p, "webhook")[0]
    assert before.status == "pending" and "Connection" in before.last_error

    receiver = Receiver().serve(port)
    restarted = parts(tmp_path, **config)  # a new process: fresh hub, same database
    dispatcher = dispatcher_for(restarted)
    try:
        wait_until(lambda: deliveries(restarted, "webhook")[0].status == "delivered", what="resumed delivery")
    finally:
        dispatcher.stop()
        receiver.close()
    assert len(deliveries(restarted, "webhook")) == 1
    assert [r.headers[DELIVERY_HEADER] for r in receiver.requests] == [delivery_key(before.signal_id, url)]


def test_a_database_error_pauses_the_sender_and_it_delivers_afterwards(tmp_path, receiver):
    """A locked or lost database must not end a sender thread: the rows it holds still go out."""
    p = parts(tmp_path, webhooks=[hook(receiver.url)])
    dispatcher = dispatcher_for(p)
    try:
        with p.sessions.kw["bind"].begin() as conn:  # the sender's next query fails: no such table
            conn.execute(text("ALTER TABLE deliveries RENAME TO deliveries_away"))
        dispatcher.wake()
        time.sleep(0.5)
        with p.sessions.kw["bind"].begin() as conn:
            conn.execute(text("ALTER TABLE deliveries_away RENAME TO deliveries"))
        publish_signal(p)
        wait_until(lambda: [r for r in deliveries(p, "webhook") if r.status == "delivered"], what="delivery")
    finally:
        dispatcher.stop()
    assert len(receiver.requests) == 1


def test_a_signal_is_stored_with_its_deliveries_or_not_at_all(tmp_path, monkeypatch):
    p = parts(tmp_path, webhooks=[hook("http://127.0.0.1:9/a"), hook("http://127.0.0.1:9/b")])
    p.outlets.append(WebhookDispatcher(p))  # not started: only the rows are looked at
    stored = publish_signal(p)
    assert sorted(r.target for r in deliveries(p, "webhook")) == ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]
    assert all(r.signal_id == stored.id and r.status == "pending" for r in deliveries(p, "webhook"))

    # the delivery rows cannot be written (here: a row the schema refuses): the signal is not kept
    monkeypatch.setattr(WebhookDispatcher, "deliveries_for", lambda self, signal: [{"signal_id": signal.id}])
    with pytest.raises(IntegrityError):
        publish_signal(p, classroom="room-2")
    with p.sessions() as s:
        assert s.scalars(select(db.Signal.classroom_id)).all() == ["room-1"]
    assert len(deliveries(p, "webhook")) == 2


def test_retry_delay_grows_exponentially_with_bounded_jitter():
    for attempts in range(1, 8):
        nominal = 2.0 * 2 ** (attempts - 1)
        delays = [retry_delay(attempts, 2.0) for _ in range(200)]
        assert all(nominal <= d < 1.5 * nominal for d in delays)
        assert len(set(delays)) > 1  # jittered, not lock-step
    assert retry_delay(30, 2.0) == MAX_BACKOFF_S
    assert retry_delay(2000, 2.0) == MAX_BACKOFF_S  # 2**1999 does not fit a float: the exponent is capped


@pytest.mark.parametrize(("url", "text", "shown"), [
    ("https://lms.example/hooks/SECRETKEY?v=2", "Cannot POST /hooks/SECRETKEY (404)", "Cannot POST /hooks/… (404)"),
    ("https://webhook.site/3f2a-secret-uuid", "POST https://webhook.site/3f2a-secret-uuid failed",
     "POST https://webhook.site/… failed"),
    ("http://u:pw@127.0.0.1:1/a/b?token=t", "url: /a/b?token=t (refused)", "url: /a/… (refused)"),
])
def test_an_error_text_keeps_no_secret_of_the_url(url: str, text: str, shown: str):
    """The path alone (an error page quoting it) and a one-segment path (the whole secret) leaked."""
    assert redact(text, url) == shown
    assert "SECRET" not in safe_url(url) and "secret" not in safe_url(url) and "pw" not in safe_url(url)


def test_the_default_retries_ride_out_a_two_hour_outage(monkeypatch):
    """10 attempts 2 s apart and doubling gave up 17-26 minutes after the first, so an LMS down for
    an hour lost most of that hour's signals; and a 1-hour cap left it unvisited for up to an hour."""
    monkeypatch.setattr(outbox.random, "uniform", lambda low, _high: low)  # the shortest jitter
    for target in (WebhookConfig(url="https://lms.example/hook"), XapiConfig()):
        delays = [retry_delay(n, target.backoff_s) for n in range(1, target.max_attempts)]
        assert sum(delays) >= 2 * 3600  # the last attempt comes two hours or more after the first
        assert max(delays) <= 5 * 60  # and the receiver is tried again within 5 minutes of coming back


def test_a_classrooms_signals_arrive_in_order_after_an_outage(tmp_path, receiver):
    """Each delivery retried on its own jittered schedule, so an LMS back from an outage got a
    classroom's signals shuffled (a reviewer saw [5, 1, 0, 2, 4, 3])."""
    receiver.always = 503
    p = parts(tmp_path, webhooks=[hook(receiver.url, max_attempts=1000, backoff_s=0.01)])
    dispatcher = dispatcher_for(p)
    try:
        room1 = [publish_signal(p, classroom="room-1").id for _ in range(6)]
        room2 = [publish_signal(p, classroom="room-2").id for _ in range(3)]
        wait_until(lambda: len(receiver.requests) >= 8, what="attempts while the receiver is down")
        receiver.always = None
        wait_until(lambda: {r.status for r in deliveries(p, "webhook")} == {"delivered"}, what="deliveries")
    finally:
        dispatcher.stop()
    sent = [r.signal_id for r in receiver.requests if r.status == 200]
    assert [i for i in sent if i in room1] == room1
    assert [i for i in sent if i in room2] == room2
    # while it was down only each classroom's first signal was tried; the others spent no attempts
    assert {r.signal_id for r in receiver.requests if r.status == 503} == {room1[0], room2[0]}


def test_a_dead_delivery_does_not_hold_back_the_later_ones(tmp_path, receiver):
    receiver.statuses = [400]  # the first signal is refused for good
    p = parts(tmp_path, webhooks=[hook(receiver.url, max_attempts=5)])
    dispatcher = dispatcher_for(p)
    try:
        signals = [publish_signal(p).id for _ in range(3)]
        wait_until(lambda: [r.status for r in deliveries(p, "webhook")] == ["dead", "delivered", "delivered"],
                   what="the later deliveries")
    finally:
        dispatcher.stop()
    assert [(r.signal_id, r.status) for r in receiver.requests] == [
        (signals[0], 400), (signals[1], 200), (signals[2], 200)]


def delivered(p: Parts) -> pb.AdaptationSignal:
    """Publish one signal with a running dispatcher and return it once every delivery of it is delivered."""
    dispatcher = dispatcher_for(p)
    try:
        signal = publish_signal(p)
        wait_until(lambda: {r.status for r in deliveries(p, "webhook")} == {"delivered"}, what="deliveries")
    finally:
        dispatcher.stop()
    return signal


def test_the_delivery_key_is_unique_across_databases_and_targets(tmp_path, receiver):
    """The key was the delivery's row id: a restored or new database numbered from 1 again, and a
    receiver deduplicating on it dropped the new signals as repeats."""
    second_url = receiver.url.replace("/affectedge", "/second")
    keys = []
    for database in ("restored.db", "moved.db"):
        signal = delivered(parts(tmp_path, database={"url": f"sqlite:///{tmp_path / database}"},
                                 webhooks=[hook(receiver.url), hook(second_url)]))
        keys += [r.headers[DELIVERY_HEADER] for r in receiver.requests[-2:]]
        assert all(key.startswith(f"{signal.id}:") for key in keys[-2:])
    assert len(set(keys)) == 4  # two signals, each to two webhooks: four deliveries, four keys


def requeue_cli(tmp_path, capsys, *args: str) -> tuple[int, str, str]:
    """`coordinator requeue-deliveries ARGS` against the test database: exit status, stdout, stderr."""
    config = tmp_path / "coordinator.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "coordinator.db"}"\n')
    status = cli.main(["requeue-deliveries", "--config", str(config), *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_dead_deliveries_are_on_the_health_report_until_requeued(tmp_path, receiver, capsys):
    """Dead deliveries showed in one log line only, and sending them again took hand-written SQL."""
    healthy = Receiver().serve()
    receiver.always = 400  # refused for good: dead at the first attempt
    p = parts(tmp_path, webhooks=[hook(receiver.url), hook(healthy.url)])
    shown = safe_url(receiver.url)
    dispatcher = dispatcher_for(p)

    def report() -> health.Health:
        return health.assess(stalled_for_s=None, db_error=None, last_tick_age_s=0.0, tick_seconds=1.0,
                             broker_connected=True, backlog=0, leader=True, counters={},
                             dead_deliveries=dispatcher.dead_deliveries())

    try:
        publish_signal(p)
        publish_signal(p, classroom="room-2")
        wait_until(lambda: dispatcher.dead_deliveries() == [("webhook", 2)], what="the dead count")
        assert report().public() == {"status": "degraded", "problems": [
            "2 webhook deliveries of the last day are dead (retries ran out, or the receiver refused them): an "
            "LMS missed those signals; the coordinator log names the receiver; once it answers, run "
            "`coordinator requeue-deliveries`"]}

        receiver.always = None  # the LMS is fixed
        assert requeue_cli(tmp_path, capsys, "--target", shown) == (
            0, "requeued 2 dead deliveries; a running coordinator sends them within a minute\n", "")
        dispatcher.wake()  # as the sender's next look within a minute would
        wait_until(lambda: dispatcher.dead_deliveries() == [], what="the dead count back to none")
    finally:
        dispatcher.stop()
        healthy.close()
    assert report().public() == {"status": "ok", "problems": []}
    assert [(r.status, r.attempts) for r in deliveries(p, "webhook")] == [("delivered", 1)] * 4
    assert requeue_cli(tmp_path, capsys, "--target", shown) == (0, "requeued 0 dead deliveries\n", "")


def test_a_dead_delivery_leaves_the_health_report_a_day_after_it_died(tmp_path, receiver):
    """A receiver that refuses a payload for good refuses it again when requeued: that dead row must not
    keep /healthz degraded for ever. A delivery of an old signal that dies now counts (one requeued
    into an LMS still down, or held back behind its classroom's earlier ones for a day)."""
    receiver.always = 400
    p = parts(tmp_path, webhooks=[hook(receiver.url)])
    dispatcher = dispatcher_for(p)
    try:
        first, second = publish_signal(p), publish_signal(p, classroom="room-2")
        with p.sessions.begin() as s:
            s.get(db.Signal, first.id).created_at -= timedelta(days=2)
        wait_until(lambda: dispatcher.dead_deliveries() == [("webhook", 2)], what="both dead, the old signal's too")
        with p.sessions.begin() as s:
            died = s.scalars(select(db.Delivery).where(db.Delivery.signal_id == first.id)).one()
            died.next_attempt_at -= timedelta(days=1, minutes=1)
        dispatcher.wake()
        wait_until(lambda: dispatcher.dead_deliveries() == [("webhook", 1)], what="the day-old death left out")
    finally:
        dispatcher.stop()
    assert second.id in {r.signal_id for r in deliveries(p, "webhook") if r.status == "dead"}


def test_requeue_deliveries_by_target_and_time(tmp_path, receiver, capsys):
    receiver.always = 400
    second_url = receiver.url.replace("/affectedge", "/second")  # logged as the same http://127.0.0.1:port/hooks/…
    p = parts(tmp_path, webhooks=[hook(receiver.url), hook(second_url)])
    dispatcher = dispatcher_for(p)
    try:
        old, new = publish_signal(p), publish_signal(p)
        wait_until(lambda: {r.status for r in deliveries(p, "webhook")} == {"dead"}, what="dead deliveries")
    finally:
        dispatcher.stop()
    with p.sessions.begin() as s:
        s.get(db.Signal, old.id).created_at = datetime(2000, 1, 1, 9, 30)  # UTC, as stored

    status, out, err = requeue_cli(tmp_path, capsys, "--target", safe_url(receiver.url))
    assert (status, out) == (2, "")
    assert err == (f"error: --target {safe_url(receiver.url)} stands for 2 receivers: give the full URL from the "
                   "config\n")

    # 10:00 at UTC+1 is 09:00 UTC: both of this target's signals are since then
    assert requeue_cli(tmp_path, capsys, "--target", receiver.url, "--since", "2000-01-01T10:00+01:00")[:2] == (
        0, "requeued 2 dead deliveries; a running coordinator sends them within a minute\n")
    assert {(r.target, r.status, r.attempts) for r in deliveries(p, "webhook")} == {
        (receiver.url, "pending", 0), (second_url, "dead", 1)}
    assert requeue_cli(tmp_path, capsys, "--since", "2000-01-01T09:45")[:2] == (  # the new signal's only
        0, "requeued 1 dead deliveries; a running coordinator sends them within a minute\n")
    assert [(r.signal_id, r.status) for r in deliveries(p, "webhook") if r.target == second_url] == [
        (old.id, "dead"), (new.id, "pending")]
    assert requeue_cli(tmp_path, capsys)[:2] == (
        0, "requeued 1 dead deliveries; a running coordinator sends them within a minute\n")
    assert requeue_cli(tmp_path, capsys)[:2] == (0, "requeued 0 dead deliveries\n")
    assert {(r.status, r.attempts) for r in deliveries(p, "webhook")} == {("pending", 0)}
