"""Dashboard pages on real data: live view, its event stream, signals, history, CSV, admin pages."""

from __future__ import annotations

import csv
import io
import json
import re
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from outlets import publish_signal
from sqlalchemy import select
from webapp import HAPPY, add_classroom, add_user, batch, csrf_token, ingest, login, web

from affectedge.labels import EMOTIONS
from coordinator import aggregate, db, policy, retention, users
from coordinator.store import Store, utcnow
from coordinator.web import access, history, live, present


def _page_data(html: str, element_id: str) -> dict:
    return json.loads(re.search(rf'id="{element_id}">(.*?)</script>', html, re.S).group(1))


def _teacher(tmp_path, room: str = "room-1"):
    p, app = web(tmp_path)
    add_user(p, "alice")
    add_classroom(p, room, "alice", course="course-7")
    client = app.test_client()
    login(client, "alice")
    return p, client


def test_live_view_shows_the_current_state(tmp_path):
    p, client = _teacher(tmp_path)
    now = utcnow()
    ingest(p, [batch("room-1", "agent-1", now - timedelta(seconds=s), tracks=4, seq=s) for s in range(3)], now)
    html = client.get("/classrooms/room-1").get_data(as_text=True)
    data = _page_data(html, "live-data")
    state = data["state"]
    assert state["learners"] == 4 and state["faces_present"] == 4 and not state["suppressed"]
    assert state["distribution"]["fear"] > 0.5 and state["states"]["confused"] > 0.4
    assert data["history"] and not data["history"][-1]["suppressed"]
    assert [a["id"] for a in data["agents"]] == ["agent-1"] and data["agents"][0]["status"] == "ONLINE"
    assert "vendor/chart.umd.js" in html and "cdn" not in html.lower()


def test_live_view_below_k_shows_no_detail(tmp_path):
    p, client = _teacher(tmp_path)
    now = utcnow()
    ingest(p, [batch("room-1", "agent-1", now, tracks=2)], now)  # k = 3 by default
    html = client.get("/classrooms/room-1").get_data(as_text=True)
    data = _page_data(html, "live-data")
    assert data["state"]["suppressed"] and data["state"]["distribution"] is None
    assert data["state"]["states"] is None
    assert all(p_["suppressed"] and not any(p_["distribution"]) for p_ in data["history"])
    assert "Fewer than 3 learners in view" in html
    assert re.search(r'<ul id="gauges" class="gauges"\s+hidden', html)


def test_event_stream_forwards_only_this_classroom(tmp_path):
    p, client = _teacher(tmp_path)
    add_classroom(p, "room-2", "alice")
    now = utcnow()
    labelled = now - timedelta(seconds=1)  # a second complete at `now` (a state takes whole seconds)
    ingest(p, [batch("room-1", "agent-1", labelled, tracks=4), batch("room-2", "agent-2", labelled, tracks=4)], now)
    response = client.get("/classrooms/room-1/events", buffered=False)
    assert response.mimetype == "text/event-stream"
    chunks = response.response
    assert next(chunks).startswith(b"retry:")  # the stream is now subscribed to the hub
    with p.sessions() as session:
        other = aggregate.classroom_state(session, "room-2", 10, now, 3)
        mine = aggregate.classroom_state(session, "room-1", 10, now, 3)
    p.hub.publish(other)
    p.hub.publish(mine)
    signal = publish_signal(p, classroom="room-1")
    state_event = next(chunks).decode()
    assert state_event.startswith("event: state\n")
    payload = json.loads(state_event.split("data: ", 1)[1])
    assert payload["classroom_id"] == "room-1" and payload["learners"] == 4
    assert payload["agents"][0]["id"] == "agent-1"
    signal_event = next(chunks).decode()
    assert signal_event.startswith("event: signal\n")
    sent = json.loads(signal_event.split("data: ", 1)[1])
    assert sent["id"] == signal.id and sent["reason"] == "confusion above 40% for 3 min"
    assert "Measured 45% against a threshold of 40%" in sent["evidence_text"]
    assert "with 12 learners in view" in sent["evidence_text"]
    response.close()
    assert not p.hub._subs  # closing the page unsubscribes


def _next_within(chunks, seconds: float):
    """The stream's next chunk (None at its end), or a failure if none comes within ``seconds``."""
    got = []
    reader = threading.Thread(target=lambda: got.append(next(chunks, None)), daemon=True)
    reader.start()
    reader.join(seconds)
    assert got, f"the stream sent nothing and did not end within {seconds} s"
    return got[0]


@pytest.mark.parametrize("loss", ["unassigned", "new password", "login too old", "logged out"])
@pytest.mark.parametrize("next_item", ["state", "signal"])
def test_event_stream_ends_when_the_user_loses_access(tmp_path, monkeypatch, next_item, loss):
    """An open page must not keep streaming a classroom its user was unassigned from, or whose
    session a new password, its age or a logout (in another tab) ended: no state, and no signal
    either. The stream ends *at* that item: no keep-alive is due for an hour, so a stream that
    dropped the item without ending would fail here instead of ending later."""
    monkeypatch.setattr(live, "KEEPALIVE_S", 3600.0)
    p, client = _teacher(tmp_path)
    now = utcnow()
    ingest(p, [batch("room-1", "agent-1", now, tracks=4)], now)
    response = client.get("/classrooms/room-1/events", buffered=False)
    chunks = response.response
    assert next(chunks).startswith(b"retry:")
    with p.sessions() as session:
        state = aggregate.classroom_state(session, "room-1", 10, now, 3)
    p.hub.publish(state)
    assert next(chunks).startswith(b"event: state\n")  # still assigned: streamed
    with p.sessions.begin() as session:
        if loss == "unassigned":
            session.get(db.Classroom, "room-1").instructor = None
        elif loss == "new password":
            users.set_password(session.scalar(select(db.User).where(db.User.username == "alice")), "new-password-22")
        elif loss == "logged out":
            client.post("/logout", data={"csrf_token": csrf_token(client, "/")})
        else:
            aged = time.time() + access.SESSION_MAX_AGE.total_seconds() + 60
            monkeypatch.setattr(access, "clock", lambda: aged)
    if next_item == "state":
        p.hub.publish(state)
    else:
        publish_signal(p, classroom="room-1")
    assert _next_within(chunks, 10) is None  # unassigned: the stream ends instead
    response.close()
    assert not p.hub._subs


def test_other_classrooms_traffic_does_not_hold_off_the_keep_alive(tmp_path, monkeypatch):
    """A quiet classroom's page gets its keep-alive (and access check) on time while other
    classrooms' states flow through the hub every tick."""
    monkeypatch.setattr(live, "KEEPALIVE_S", 0.5)
    p, client = _teacher(tmp_path)
    add_classroom(p, "room-2", "alice")
    now = utcnow()
    ingest(p, [batch("room-2", "agent-2", now, tracks=4)], now)
    with p.sessions() as session:
        other = aggregate.classroom_state(session, "room-2", 10, now, 3)
    response = client.get("/classrooms/room-1/events", buffered=False)
    chunks = response.response
    assert next(chunks).startswith(b"retry:")
    stop = threading.Event()

    def busy_hub() -> None:
        deadline = time.monotonic() + 20  # ends the test's wait on a stream that would never send
        while not stop.is_set() and time.monotonic() < deadline:
            p.hub.publish(other)
            stop.wait(0.05)

    publisher = threading.Thread(target=busy_hub, daemon=True)
    publisher.start()
    try:
        assert next(chunks) == b": keep-alive\n\n"
        assert publisher.is_alive()  # sent while the hub was still busy, not after it went quiet
        with p.sessions.begin() as session:
            session.get(db.Classroom, "room-1").instructor = None
        assert next(chunks, None) is None  # unassigned: ended at the next keep-alive
        assert publisher.is_alive()
    finally:
        stop.set()
        publisher.join()
    response.close()
    assert not p.hub._subs


def test_acknowledge_and_dismiss_signals(tmp_path):
    p, client = _teacher(tmp_path)
    first, second = publish_signal(p, classroom="room-1"), publish_signal(p, classroom="room-1")
    html = client.get("/classrooms/room-1").get_data(as_text=True)
    assert first.id in html and "confusion above 40% for 3 min" in html
    token = csrf_token(client, "/classrooms/room-1")
    url = f"/classrooms/room-1/signals/{first.id}"

    assert client.post(url, data={"decision": "acknowledge"}).status_code == 400  # no CSRF token
    answer = client.post(url, data={"decision": "acknowledge", "csrf_token": token},
                         headers={"Accept": "application/json"})
    assert answer.status_code == 200
    assert answer.json["status"] == "acknowledged" and answer.json["handled_by"] == "alice"
    again = client.post(url, data={"decision": "dismiss", "csrf_token": token}, headers={"Accept": "application/json"})
    assert again.status_code == 409 and "already acknowledged by alice" in again.json["error"]

    plain = client.post(f"/classrooms/room-1/signals/{second.id}", data={"decision": "dismiss", "csrf_token": token})
    assert plain.status_code == 302
    with p.sessions() as session:
        statuses = {s.id: (s.status, s.handled_by) for s in session.scalars(select(db.Signal))}
    assert statuses == {first.id: ("acknowledged", "alice"), second.id: ("dismissed", "alice")}
    assert first.id not in client.get("/classrooms/room-1").get_data(as_text=True)  # only open ones are shown


def test_instructor_starts_and_ends_class_sessions(tmp_path):
    """Two lessons back to back in one room get two sessions when the instructor says so."""
    p, client = _teacher(tmp_path)
    add_user(p, "bob")
    add_classroom(p, "room-b", "bob")
    now = utcnow()
    ingest(p, [batch("room-1", "agent-1", now, tracks=4)], now)

    def sessions() -> list[db.ClassSession]:
        with p.sessions() as session:
            return list(session.scalars(select(db.ClassSession).where(db.ClassSession.classroom_id == "room-1")
                                        .order_by(db.ClassSession.started_at)))

    first = sessions()[0]
    assert "Start a new session" in client.get("/classrooms/room-1").get_data(as_text=True)
    token = csrf_token(client, "/classrooms/room-1")
    url = "/classrooms/room-1/session"
    assert client.post(url, data={"action": "start"}).status_code == 400  # no CSRF token
    assert client.post(url, data={"action": "start", "csrf_token": token}).status_code == 302
    old, new = sessions()
    assert old.id == first.id and old.ended_at is not None
    assert new.ended_at is None and new.instructor == "alice" and new.course_id == "course-7"
    assert client.post(url, data={"action": "end", "csrf_token": token}).status_code == 302
    assert all(s.ended_at is not None for s in sessions())
    assert client.post(url, data={"action": "pause", "csrf_token": token}).status_code == 400
    assert client.post("/classrooms/room-b/session", data={"action": "end", "csrf_token": token}).status_code == 403


def test_cannot_handle_a_signal_of_another_classroom(tmp_path):
    p, client = _teacher(tmp_path)
    add_user(p, "bob")
    add_classroom(p, "room-b", "bob")
    theirs = publish_signal(p, classroom="room-b")
    token = csrf_token(client, "/")
    for url in (f"/classrooms/room-b/signals/{theirs.id}", f"/classrooms/room-1/signals/{theirs.id}"):
        answer = client.post(url, data={"decision": "acknowledge", "csrf_token": token})
        assert answer.status_code in (403, 404), url
    with p.sessions() as session:
        assert session.get(db.Signal, theirs.id).status == "open"


def _past_session(p, room: str = "room-1"):
    """Two minutes of class: 4 confused learners, then 2 (below k), ended by the store."""
    start = utcnow().replace(microsecond=0)  # timeline buckets start on whole seconds
    batches = [batch(room, "agent-1", start + timedelta(seconds=s), tracks=4, seq=s) for s in range(0, 60, 2)]
    batches += [
        batch(room, "agent-1", start + timedelta(seconds=s), tracks=2, probabilities=HAPPY, seq=s)
        for s in range(62, 120, 2)  # clear of the confused minute's last 10 s bucket; in 12 buckets
    ]
    ingest(p, batches, start)
    Store(p.sessions).end_session(room, start + timedelta(seconds=123))
    signal = publish_signal(p, classroom=room)
    with p.sessions() as session:
        class_session = session.scalars(select(db.ClassSession)).one()
        session.get(db.Signal, signal.id).session_id = class_session.id
        session.commit()
    return class_session, signal


def test_session_history_csv_and_printable_summary(tmp_path):
    p, client = _teacher(tmp_path)
    class_session, signal = _past_session(p)
    base = f"/classrooms/room-1/sessions/{class_session.id}"
    listing = client.get("/classrooms/room-1/sessions").get_data(as_text=True)
    assert base in listing

    page = client.get(base).get_data(as_text=True)
    points = _page_data(page, "session-data")["history"]
    assert len(points) == 12  # 10 s buckets from the session's start; data spans 0–118 s
    assert not points[0]["suppressed"] and points[-2]["suppressed"]
    assert signal.reason in page and "Timeline CSV" in page

    timeline = client.get(f"{base}/timeline.csv")
    assert timeline.mimetype == "text/csv" and "attachment" in timeline.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(timeline.get_data(as_text=True))))
    assert len(rows) == len(points)
    assert rows[0]["learners"] == "4" and float(rows[0]["fear"]) > 0.5 and float(rows[0]["confused"]) > 0.4
    hidden = [r for r in rows if r["suppressed"] == "1"]
    assert hidden and all(r["happy"] == "" and r["engaged"] == "" for r in hidden)
    assert list(rows[0])[5:12] == list(EMOTIONS)

    signals_csv = list(csv.DictReader(io.StringIO(client.get(f"{base}/signals.csv").get_data(as_text=True))))
    assert [r["reason"] for r in signals_csv] == [signal.reason] and signals_csv[0]["status"] == "open"

    summary = client.get(f"{base}/summary").get_data(as_text=True)
    assert "Session summary" in summary and "Most learners in view" in summary
    assert "had fewer than 3 learners in view and are left out" in summary
    assert re.search(r"<td>Confused</td>\s*<td class=\"num\">51%</td>", summary)
    assert "@media print" in client.get("/static/app.css").get_data(as_text=True)


def test_summary_statistics_skip_suppressed_buckets():
    points = [
        {"t": "a", "suppressed": False, "observations": 10, "learners": 4, "faces": 4,
         "states": {"engaged": 0.2, "confused": 0.6, "frustrated": 0.1, "bored": 0.1, "neutral": 0.0}},
        {"t": "b", "suppressed": False, "observations": 30, "learners": 5, "faces": 6,
         "states": {"engaged": 0.6, "confused": 0.2, "frustrated": 0.1, "bored": 0.1, "neutral": 0.0}},
        {"t": "c", "suppressed": True, "observations": 50, "learners": 2, "faces": 2,
         "states": {"engaged": 0.0, "confused": 0.0, "frustrated": 0.0, "bored": 0.0, "neutral": 0.0}},
    ]
    result = history.summarise(points, [{"kind_label": "Slow down", "status": "open"}])
    assert abs(result["means"]["engaged"] - 0.5) < 1e-9 and abs(result["means"]["confused"] - 0.3) < 1e-9
    assert result["peaks"]["confused"] == {"t": "a", "score": 0.6}
    assert result["max_learners"] == 5 and result["max_faces"] == 6 and result["suppressed_buckets"] == 1
    assert history.bucket_seconds(60) == 10 and history.bucket_seconds(3 * 3600) == 50


def test_admin_manages_classrooms_users_and_settings(tmp_path):
    p, app = web(tmp_path)
    add_user(p, "alice")
    client = app.test_client()
    login(client, "admin", "admin-password-1")
    token = csrf_token(client, "/admin/classrooms")

    client.post("/admin/classrooms", data={"id": "lab-3", "name": "Lab 3", "course_id": "c-1",
                                           "instructor": "", "csrf_token": token})
    client.post("/admin/classrooms/lab-3", data={"name": "Lab three", "course_id": "c-1",
                                                 "instructor": "alice", "csrf_token": token})
    bad = client.post("/admin/classrooms", data={"id": "bad id", "csrf_token": token}, follow_redirects=True)
    assert "Classroom id must be" in bad.get_data(as_text=True)
    with p.sessions() as session:
        room = session.get(db.Classroom, "lab-3")
        assert (room.name, room.instructor) == ("Lab three", "alice")

    created = client.post("/admin/users", data={"username": "bob", "password": "bob-password-1",
                                                "role": "instructor", "csrf_token": token})
    assert created.status_code == 302
    short = client.post("/admin/users", data={"username": "eve", "password": "short", "role": "instructor",
                                              "csrf_token": token})
    assert "password is too short" in short.get_data(as_text=True)
    last_admin = client.post("/admin/users/admin", data={"role": "instructor", "active": "on", "csrf_token": token},
                             follow_redirects=True)
    assert "last active admin" in last_admin.get_data(as_text=True)

    rule = policy.load_rules()[0].name
    saved = client.post("/admin/settings", data={f"threshold.{rule}": "45", retention.RAW_KEY: "7",
                                                 "csrf_token": token}, follow_redirects=True)
    assert "Settings saved" in saved.get_data(as_text=True)
    refused = client.post("/admin/settings", data={f"threshold.{rule}": "140", "csrf_token": token},
                          follow_redirects=True)
    assert "outside 0–100" in refused.get_data(as_text=True)
    never_clears = client.post("/admin/settings", data={f"threshold.{rule}": "0", "csrf_token": token},
                               follow_redirects=True)  # the first rule fires above its threshold
    assert f"threshold of {rule}: 0 %: it must be above 0" in never_clears.get_data(as_text=True)
    store = Store(p.sessions)
    assert store.setting(policy.threshold_key(rule)) == 0.45 and store.setting(retention.RAW_KEY) == 7
    client.post("/admin/settings", data={f"threshold.{rule}": "", "csrf_token": token})
    assert store.setting(policy.threshold_key(rule)) is None  # empty = back to the rules file

    now = utcnow()
    ingest(p, [batch("lab-3", "agent-9", now, tracks=3)], now - timedelta(minutes=5))
    agents = client.get("/admin/agents").get_data(as_text=True)
    assert "agent-9" in agents and "○ offline" in agents  # silent for 5 min > agent_offline_after_s
    assert 'data-counter="clock_ahead"' in agents  # batches refused for a clock ahead are shown
    assert 'data-status="degraded"' in agents and "the MQTT broker is unreachable" in agents  # no ingest here


def test_saving_a_classroom_keeps_its_deactivated_instructor(tmp_path):
    """The instructor list offers active users only, so the row of a room whose instructor is on
    leave selected nothing, and saving it (say, to fix the course id) silently unassigned them."""
    p, app = web(tmp_path)
    add_user(p, "alice")
    add_user(p, "bob")
    add_classroom(p, "room-a", "alice", course="c-1")
    client = app.test_client()
    login(client, "admin", "admin-password-1")
    token = csrf_token(client, "/admin/classrooms")
    for name in ("alice", "bob"):  # on leave: "active" unticked
        client.post(f"/admin/users/{name}", data={"role": "instructor", "csrf_token": token})

    page = client.get("/admin/classrooms").get_data(as_text=True)
    row = re.search(r'action="/admin/classrooms/room-a".*?</form>', page, re.S).group(0)
    assert re.findall(r"<option [^>]*selected[^>]*>([^<]*)<", row) == ["alice (inactive)"]
    assert "bob" not in row  # other inactive users are not offered
    saved = client.post("/admin/classrooms/room-a", data={"name": "Room A", "course_id": "c-2", "instructor": "alice",
                                                          "csrf_token": token}, follow_redirects=True)
    assert "Classroom &#39;room-a&#39; saved." in saved.get_data(as_text=True)

    for name in ("bob", "ghost"):  # another inactive user, or none at all: a message, not a 404 page
        refused = client.post("/admin/classrooms/room-a", data={"name": "Room A", "course_id": "c-3",
                                                                "instructor": name, "csrf_token": token})
        assert refused.status_code == 302
        assert f"there is no active user &#39;{name}&#39;" in client.get("/admin/classrooms").get_data(as_text=True)
    created = client.post("/admin/classrooms", data={"id": "room-n", "instructor": "ghost", "csrf_token": token})
    assert created.status_code == 200 and "Classroom &#39;room-n&#39; not created" in created.get_data(as_text=True)
    with p.sessions() as session:
        room = session.get(db.Classroom, "room-a")
        assert (room.name, room.course_id, room.instructor) == ("Room A", "c-2", "alice")
        assert session.get(db.Classroom, "room-n") is None


def test_admin_provisions_an_agent(tmp_path):
    broker = {"passwd_file": str(tmp_path / "passwd"), "acl_file": str(tmp_path / "acl")}
    p, app = web(tmp_path, broker=broker, mqtt={"username": "coordinator", "password": "coord-password-1"})
    client = app.test_client()
    login(client, "admin", "admin-password-1")
    token = csrf_token(client, "/admin/agents")
    page = client.post("/admin/agents/provision", data={"name": "lab3-pc07", "classroom": "lab-3",
                                                        "csrf_token": token})
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and page.headers["Cache-Control"] == "no-store"
    password = re.search(r'password = &#34;([^&]+)&#34;', html).group(1)
    assert 'id = &#34;lab3-pc07&#34;' in html and len(password) >= 24
    assert "lab3-pc07:" in (tmp_path / "passwd").read_text()
    assert "topic write affectedge/v1/lab-3/lab3-pc07/#" in (tmp_path / "acl").read_text()
    with p.sessions() as session:
        assert session.get(db.Agent, "lab3-pc07").provisioned_at is not None

    bad = client.post("/admin/agents/provision", data={"name": "bad name", "classroom": "lab-3",
                                                       "csrf_token": token}, follow_redirects=True)
    assert "Not provisioned: agent name" in bad.get_data(as_text=True)


def test_provisioning_without_broker_files_says_what_to_set(tmp_path):
    _, app = web(tmp_path)
    client = app.test_client()
    login(client, "admin", "admin-password-1")
    answer = client.post("/admin/agents/provision", data={"name": "pc-1", "classroom": "lab-3",
                                                          "csrf_token": csrf_token(client, "/admin/agents")},
                         follow_redirects=True)
    assert "set [broker] passwd_file and acl_file" in answer.get_data(as_text=True)


def test_signal_cards_explain_strength_and_give_times_to_localize(tmp_path):
    """The tooltip said "how far past the threshold, 0–100%", yet a signal exactly at its threshold
    reads 50% (policy.strength); the evidence window was printed in UTC next to local times."""
    p, client = _teacher(tmp_path)
    signal = publish_signal(p, classroom="room-1")
    html = client.get("/classrooms/room-1").get_data(as_text=True)
    card = re.search(rf'<li class="signal" data-signal-id="{signal.id}".*?</li>', html, re.S).group(0)
    title = re.search(r'class="signal-strength" title="([^"]+)"', card).group(1)
    assert "50% exactly at its threshold" in title and "100%" in title
    assert re.search(r'<time class="signal-time" datetime="[^"]+Z" data-local>', card)

    signal.evidence.window_start.FromDatetime(datetime(2026, 12, 3, 19, 45, 17))
    signal.evidence.window_end.FromDatetime(datetime(2026, 12, 3, 19, 45, 27))
    row = present.signal_json(signal)
    assert row["evidence_pieces"][1:5] == [{"text": " over "}, {"time": "2026-12-03T19:45:17Z"}, {"text": "–"},
                                           {"time": "2026-12-03T19:45:27Z"}]
    assert " over 19:45:17 UTC–19:45:27 UTC with 12 learners" in row["evidence_text"]  # CSV and API: UTC, said so


def _luminance(color: str) -> float:
    channels = [int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(one: str, other: str) -> float:
    """The WCAG 2 contrast ratio of two #rrggbb colours."""
    light, dark = sorted((_luminance(one), _luminance(other)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def test_focus_ring_and_handled_signals_meet_wcag_aa():
    """The orange focus ring was 2.25:1 on white (3:1 needed), and handled cards' muted text at 75%
    opacity 3.51:1 (4.5:1 needed)."""
    css = (Path(live.__file__).parent / "static" / "app.css").read_text()
    colours = dict(re.findall(r"--([\w-]+): (#[0-9a-fA-F]{6})", css))

    def colour(value: str) -> str:
        return colours[value[6:-1]] if value.startswith("var(--") else value

    ring = colour(re.search(r"^:focus-visible \{ outline: 3px solid ([^;]+);", css, re.M).group(1))
    assert min(_contrast(ring, "#ffffff"), _contrast(ring, colours["bg"])) >= 3
    handled = re.search(r"^\.signal\.handled \{([^}]*)\}", css, re.M).group(1)
    assert "opacity" not in handled
    background = colour(re.search(r"background: ([^;]+);", handled).group(1))
    assert _contrast(colours["muted"], background) >= 4.5
