"""The REST API under /api/v1: auth by token or login, filters, acknowledging, and its OpenAPI document."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from openapi_spec_validator import validate
from outlets import publish_signal
from webapp import add_classroom, add_user, batch, csrf_token, ingest, login, web

from affectedge.v1 import affectedge_pb2 as pb
from coordinator.outbox import record_signal
from coordinator.store import Store, utcnow

TOKEN = "lms-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def _api(tmp_path):
    p, app = web(tmp_path, web={"api_tokens": [TOKEN]})
    add_user(p, "alice")
    add_classroom(p, "room-a", "alice", course="c-1")
    add_classroom(p, "room-b", None)
    return p, app


def test_api_needs_a_token_or_a_login(tmp_path):
    _, app = _api(tmp_path)
    client = app.test_client()
    anonymous = client.get("/api/v1/classrooms")
    assert anonymous.status_code == 401 and "Bearer" in anonymous.json["error"]
    wrong = client.get("/api/v1/classrooms", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "web.api_tokens" in wrong.json["error"]
    everything = client.get("/api/v1/classrooms", headers=BEARER)
    assert [c["id"] for c in everything.json["classrooms"]] == ["room-a", "room-b"]

    login(client, "alice")
    mine = client.get("/api/v1/classrooms").json["classrooms"]
    assert mine == [{"id": "room-a", "name": "Room room-a", "course_id": "c-1", "instructor": "alice",
                     "session_id": None, "agents_online": 0}]
    assert client.get("/api/v1/classrooms/room-b/state").status_code == 403
    assert client.get("/api/v1/signals?classroom=room-b").status_code == 403


def test_state_with_window_and_k_anonymity(tmp_path):
    p, app = _api(tmp_path)
    now = utcnow()
    ingest(p, [batch("room-a", "agent-1", now - timedelta(seconds=30), tracks=4)], now)
    ingest(p, [batch("room-b", "agent-2", now, tracks=2)], now)
    client = app.test_client()
    state = client.get("/api/v1/classrooms/room-a/state?window=60", headers=BEARER).json
    assert state["window_seconds"] == 60 and state["learners"] == 4 and state["agents_online"] == 1
    assert abs(sum(state["distribution"].values()) - 1) < 1e-6 and state["states"]["confused"] > 0.4
    short = client.get("/api/v1/classrooms/room-a/state?window=10", headers=BEARER).json
    assert short["learners"] == 0 and short["suppressed"]  # the batch is 30 s old
    small = client.get("/api/v1/classrooms/room-b/state", headers=BEARER).json
    assert small["window_seconds"] == 60 and small["suppressed"] and small["distribution"] is None
    bad = client.get("/api/v1/classrooms/room-a/state?window=7", headers=BEARER)
    assert bad.status_code == 400 and "10, 60, 300" in bad.json["error"]
    typo = client.get("/api/v1/classrooms/room-a/state?window=6O", headers=BEARER)  # not the default window
    assert typo.status_code == 400 and "whole number" in typo.json["error"]
    assert client.get("/api/v1/classrooms/nowhere/state", headers=BEARER).status_code == 404


def test_one_learner_alone_for_most_of_a_minute_is_in_no_window_an_instructor_can_ask_for(tmp_path):
    """The reviewer's scenario as an instructor asks it: A (sad .9, neutral .1) alone for 48 s, then
    with two happy learners for 8 s. The 60 s state was 70 % A, and differencing it with the 10 s
    state gave A's distribution exactly; only instants of at least k learners count now."""
    p, app = _api(tmp_path)
    now = utcnow().replace(microsecond=0)  # the labels' seconds all complete when the API asks
    alone, happy = (0.0, 0.0, 0.0, 0.0, 0.9, 0.0, 0.1), (0.0, 0.0, 0.0, 0.9, 0.05, 0.0, 0.05)
    batches = []
    for seq, ago in enumerate(range(55, -1, -1), start=1):
        at = now - timedelta(seconds=ago + 0.5)
        batches.append(batch("room-a", "agent-a", at, tracks=1, probabilities=alone, seq=seq))
        if ago < 8:
            batches.append(batch("room-a", "agent-b", at, tracks=2, probabilities=happy, seq=seq))
    ingest(p, batches, now)
    client = app.test_client()
    short, long = (client.get(f"/api/v1/classrooms/room-a/state?window={window}", headers=BEARER).json
                   for window in (10, 60))
    assert long["learners"] == short["learners"] == 3 and not long["suppressed"]
    assert abs(long["distribution"]["sad"] - (8 * 0.9 + 16 * 0.05) / 24) < 1e-6  # not A's 0.9 taking over
    assert long["observations"] == short["observations"] == 24  # the same instants: nothing to difference
    assert all(abs(long["distribution"][e] - short["distribution"][e]) < 1e-6 for e in long["distribution"])
    between = client.get("/api/v1/classrooms/room-a/state?window=59", headers=BEARER)
    assert between.status_code == 400 and between.json["error"] == "window must be one of 10, 60, 300 seconds"


def test_signal_filters(tmp_path):
    p, app = _api(tmp_path)
    a1, b1, a2 = publish_signal(p, "room-a"), publish_signal(p, "room-b"), publish_signal(p, "room-a")
    client = app.test_client()

    def ids(query: str, **kw) -> set[str]:
        answer = client.get(f"/api/v1/signals{query}", headers=kw.get("headers", BEARER))
        assert answer.status_code == 200, answer.json
        return {s["id"] for s in answer.json["signals"]}

    assert ids("") == {a1.id, b1.id, a2.id}
    assert ids("?classroom=room-b") == {b1.id}
    assert ids("?kind=SLOW_DOWN&status=open") == {a1.id, b1.id, a2.id}
    assert ids("?kind=TAKE_BREAK") == set()
    assert len(ids("?limit=2")) == 2
    later = (utcnow() + timedelta(minutes=1)).isoformat() + "Z"
    assert ids(f"?since={later}") == set() and len(ids(f"?until={later}")) == 3
    assert client.get("/api/v1/signals?status=maybe", headers=BEARER).status_code == 400
    bogus = client.get("/api/v1/signals?kind=BOGUS", headers=BEARER)  # was 200 and [], as if none had fired
    assert bogus.status_code == 400 and bogus.json["error"] == (
        "kind must be one of SLOW_DOWN, REVIEW, OFFER_HINT, INCREASE_CHALLENGE, TAKE_BREAK, SWITCH_MODALITY")
    assert client.get("/api/v1/signals?since=yesterday", headers=BEARER).status_code == 400
    assert client.get("/api/v1/signals?limit=0", headers=BEARER).status_code == 400
    assert client.get("/api/v1/signals?limit=ten", headers=BEARER).status_code == 400
    login(client, "alice")
    assert ids("", headers={}) == {a1.id, a2.id}  # alice's classroom only


def test_ack_by_token_and_by_login_with_csrf(tmp_path):
    p, app = _api(tmp_path)
    first, second = publish_signal(p, "room-a"), publish_signal(p, "room-a")
    client = app.test_client()
    acked = client.post(f"/api/v1/signals/{first.id}/ack", headers=BEARER)
    assert acked.status_code == 200 and acked.json["status"] == "acknowledged"
    assert acked.json["handled_by"] == "api-token"
    assert client.post(f"/api/v1/signals/{first.id}/ack", headers=BEARER).status_code == 409
    bad = client.post(f"/api/v1/signals/{second.id}/ack", json={"status": "ignored"}, headers=BEARER)
    assert bad.status_code == 400
    not_object = client.post(f"/api/v1/signals/{second.id}/ack", json=["dismissed"], headers=BEARER)
    assert not_object.status_code == 400 and "JSON object" in not_object.json["error"]
    assert client.post("/api/v1/signals/nope/ack", headers=BEARER).status_code == 404

    login(client, "alice")
    no_csrf = client.post(f"/api/v1/signals/{second.id}/ack", json={"status": "dismissed"})
    assert no_csrf.status_code == 400 and "X-CSRFToken" in no_csrf.json["error"]
    token = csrf_token(client, "/")
    dismissed = client.post(f"/api/v1/signals/{second.id}/ack", json={"status": "dismissed"},
                            headers={"X-CSRFToken": token})
    assert dismissed.status_code == 200 and dismissed.json["handled_by"] == "alice"
    listed = client.get("/api/v1/signals?status=dismissed").json["signals"]
    assert [s["id"] for s in listed] == [second.id]


def _routes(app) -> set[tuple[str, str]]:
    """(OpenAPI path, method) of every /api/v1 route the app serves."""
    found = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("api."):
            path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule).removeprefix("/api/v1")
            found |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    return found


def test_openapi_document_is_valid_and_matches_the_routes(tmp_path):
    p, app = _api(tmp_path)
    signal = publish_signal(p, "room-a")
    client = app.test_client()
    doc = client.get("/api/v1/openapi.json").json  # public: it holds no data
    validate(doc)
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented == _routes(app)
    for path, ops in doc["paths"].items():
        in_path = set(re.findall(r"{(\w+)}", path))
        for op in ops.values():
            declared = {prm["name"] for prm in op.get("parameters", []) if prm["in"] == "path"}
            assert declared == in_path, path

    # every documented response shape is what the API really returns
    schemas = doc["components"]["schemas"]
    classroom = client.get("/api/v1/classrooms", headers=BEARER).json["classrooms"][0]
    state = client.get("/api/v1/classrooms/room-a/state", headers=BEARER).json
    listed = client.get("/api/v1/signals", headers=BEARER).json["signals"][0]
    assert listed["id"] == signal.id
    for name, value in (("Classroom", classroom), ("ClassroomState", state), ("Signal", listed)):
        assert set(value) == set(schemas[name]["properties"]), name
        assert set(schemas[name]["required"]) <= set(value), name



def test_ack_with_a_body_that_is_not_a_json_object_changes_nothing(tmp_path):
    """Acknowledging cannot be undone: `curl -d '{"status": "dismissed"}'` (a form content type),
    truncated JSON or a JSON array must not be read as "no body" and acknowledge the signal."""
    p, app = _api(tmp_path)
    signal = publish_signal(p, "room-a")
    client = app.test_client()
    for data, content_type in [
        ('{"status": "dismissed"}', "application/x-www-form-urlencoded"),
        ('{"status": "dismissed"}', "text/plain"),
        ('{"status": "dismissed"', "application/json"),
        ("[]", "application/json"),
        ("false", "application/json"),
    ]:
        answer = client.post(f"/api/v1/signals/{signal.id}/ack", data=data, content_type=content_type, headers=BEARER)
        assert answer.status_code == 400, (data, content_type)
        assert answer.json["error"] == ('send no body to acknowledge, or a JSON object such as '
                                        '{"status": "dismissed"} with Content-Type: application/json')
    assert client.get("/api/v1/signals?status=open", headers=BEARER).json["signals"][0]["id"] == signal.id
    dismissed = client.post(f"/api/v1/signals/{signal.id}/ack", json={"status": "dismissed"}, headers=BEARER)
    assert dismissed.status_code == 200 and dismissed.json["status"] == "dismissed"
    defaulted = publish_signal(p, "room-a")
    answer = client.post(f"/api/v1/signals/{defaulted.id}/ack", json={}, headers=BEARER)
    assert answer.status_code == 200 and answer.json["status"] == "acknowledged"


def test_times_beyond_the_calendar_in_utc_are_a_400(tmp_path):
    _, app = _api(tmp_path)
    client = app.test_client()
    for query in ("since=0001-01-01T00:00:00%2B01:00", "until=9999-12-31T23:59:59-14:00"):
        answer = client.get(f"/api/v1/signals?{query}", headers=BEARER)
        assert answer.status_code == 400 and "within years 1-9999 UTC" in answer.json["error"], query


def test_paging_with_next_returns_every_signal_once(tmp_path):
    """One policy tick can raise signals in many classrooms in one second (created_at is shown to the
    second), even at the very same microsecond: paging by ``until`` skipped them, ``next`` does not."""
    p, app = _api(tmp_path)
    add_classroom(p, "room-c", None)
    second = datetime(2026, 3, 2, 10, 0, 5)
    times = [second.replace(microsecond=250_000), second.replace(microsecond=500_000),
             second.replace(microsecond=500_000), second.replace(microsecond=750_000), second - timedelta(seconds=1)]
    for i, at in enumerate(times):
        signal = pb.AdaptationSignal(id=f"signal-{i}", classroom_id=("room-a", "room-b", "room-c")[i % 3],
                                     kind=pb.SLOW_DOWN, strength=0.5, reason="r", evidence=pb.Evidence(rule="r"))
        signal.created_at.FromDatetime(at)
        record_signal(Store(p.sessions), signal, [])
    client = app.test_client()
    pages, query = [], "limit=2"
    while True:
        answer = client.get(f"/api/v1/signals?{query}", headers=BEARER)
        assert answer.status_code == 200, answer.json
        pages.append([s["id"] for s in answer.json["signals"]])
        if answer.json["next"] is None:
            break
        query = f"limit=2&before={answer.json['next']}"
    assert pages == [["signal-3", "signal-2"], ["signal-1", "signal-0"], ["signal-4"]]  # newest first, ties by id

    until = client.get("/api/v1/signals?until=2026-03-02T10:00:05Z", headers=BEARER).json
    assert [s["id"] for s in until["signals"]] == ["signal-4"] and until["next"] is None  # as before
    bad = client.get("/api/v1/signals?before=not-a-cursor", headers=BEARER)
    assert bad.status_code == 400 and "before must be the next value" in bad.json["error"]
