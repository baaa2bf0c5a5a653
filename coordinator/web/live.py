"""The classroom list, the live classroom view and its server-sent event stream, signal handling.

The live view is pushed, not polled: the coordinator publishes every classroom's 10 s state each
tick and every new signal once on its hub; each open page holds one SSE connection that
subscribes to the hub and forwards the items of its classroom, so the page is at most one tick
behind and the database is read once per tick per page (for the agent list), not per poll.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from datetime import datetime, timedelta

from flask import Blueprint, Response, redirect, render_template, request, url_for
from sqlalchemy import func, select
from werkzeug.exceptions import BadRequest, Conflict, NotFound

from affectedge.labels import EMOTIONS
from affectedge.v1 import affectedge_pb2 as pb
from coordinator import aggregate, db
from coordinator.store import Store, utcnow
from coordinator.web import access, present, signals

bp = Blueprint("live", __name__)

#: how much history the live chart starts with
HISTORY = timedelta(minutes=15)
#: a comment line this often lets the server notice a closed page (and proxies keep the stream)
KEEPALIVE_S = 15.0
#: what a page is sent from the hub
FORWARDED = (pb.ClassroomState, pb.AdaptationSignal)


def agent_rows(session, classroom_id: str | None, now: datetime, offline_after_s: float) -> list[dict]:
    """Agents with the status an admin should believe: silent too long counts as offline."""
    query = select(db.Agent).order_by(db.Agent.classroom_id, db.Agent.id)
    if classroom_id is not None:
        query = query.where(db.Agent.classroom_id == classroom_id)
    return [present.agent_json(agent, now, offline_after_s) for agent in session.scalars(query)]


@bp.get("/")
@access.login_required
def index():
    session = access.dbs()
    rooms = access.visible_classrooms(session, access.viewer())
    ids = [room.id for room in rooms]
    open_counts = dict(
        session.execute(
            select(db.Signal.classroom_id, func.count())
            .where(db.Signal.classroom_id.in_(ids), db.Signal.status == "open")
            .group_by(db.Signal.classroom_id)
        ).all()
    )
    config = access.coordinator().config
    now = utcnow()
    online = aggregate.agents_online_by_classroom(session, ids, now, config.aggregate.agent_offline_after_s)
    sessions = aggregate.open_sessions(session, ids)
    return render_template("index.html", rooms=rooms, open_counts=open_counts, online=online, sessions=sessions)


@bp.get("/classrooms/<classroom_id>")
@access.login_required
def classroom(classroom_id: str):
    room = access.classroom_or_403(classroom_id)
    session = access.dbs()
    config = access.coordinator().config
    k = config.aggregate.k_anonymity
    now = utcnow()
    window = min(config.aggregate.windows)  # what the coordinator publishes each tick (live_window)
    state = aggregate.classroom_state(session, room.id, window, now, k, config.aggregate.agent_offline_after_s)
    history = aggregate.timeline(session, room.id, now - HISTORY, now, window, k)
    open_signals = signals.find(session, [room.id], status="open", limit=50)
    data = {
        "events_url": url_for("live.events", classroom_id=room.id),
        "state_url": url_for("api.classroom_state", classroom_id=room.id),  # asked why, if the stream closes
        "emotions": list(EMOTIONS),
        "gauges": list(present.GAUGES),
        "history_s": int(HISTORY.total_seconds()),
        "history": history,
        "state": present.state_json(state, k),
        "agents": agent_rows(session, room.id, now, config.aggregate.agent_offline_after_s),
        "signals": [present.row_json(row) for row in open_signals],
    }
    return render_template("classroom.html", room=room, data=data, state=data["state"])


@bp.get("/classrooms/<classroom_id>/events")
@access.login_required
def events(classroom_id: str):
    """text/event-stream of ``state`` and ``signal`` events for one classroom."""
    room = access.classroom_or_403(classroom_id)
    coordinator = access.coordinator()
    return Response(
        _stream(coordinator, room.id, access.login()),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _stream(coordinator, classroom_id: str, login: access.Login) -> Iterator[str]:
    """Runs after the request context is gone, so it opens its own database sessions.

    Access is checked again before everything it sends: once a user is deactivated, unassigned
    from the classroom or given a new password (which ends their sessions), nothing more is sent
    and the stream ends at the next state, signal or keep-alive. The keep-alive is due
    :data:`KEEPALIVE_S` after the last thing sent, however busy the hub is with other classrooms,
    so a quiet classroom's page is checked (and a closed one noticed) on time.
    """
    config = coordinator.config
    subscription = coordinator.hub.subscribe()
    try:
        yield "retry: 2000\n\n"
        due = time.monotonic() + KEEPALIVE_S
        while True:
            try:
                item = subscription.queue.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                item = None
            if item is not None and (item.classroom_id != classroom_id or not isinstance(item, FORWARDED)):
                if time.monotonic() < due:
                    continue
                item = None
            with coordinator.sessions() as db_session:
                if not access.still_may_see(db_session, login, classroom_id):
                    return
                if isinstance(item, pb.ClassroomState):
                    payload = present.state_json(item, config.aggregate.k_anonymity)
                    payload["agents"] = agent_rows(
                        db_session, classroom_id, utcnow(), config.aggregate.agent_offline_after_s
                    )
                    message = _sse("state", payload)
                elif isinstance(item, pb.AdaptationSignal):
                    message = _sse("signal", present.signal_json(item))
                else:
                    message = ": keep-alive\n\n"
            yield message
            due = time.monotonic() + KEEPALIVE_S
    finally:
        coordinator.hub.unsubscribe(subscription)


@bp.post("/classrooms/<classroom_id>/signals/<signal_id>")
@access.login_required
def handle_signal(classroom_id: str, signal_id: str):
    """Acknowledge or dismiss; JSON for the page's script, a redirect for a plain form post."""
    room = access.classroom_or_403(classroom_id)
    session = access.dbs()
    row = session.get(db.Signal, signal_id)
    if row is None or row.classroom_id != room.id:
        raise NotFound(f"there is no signal {signal_id!r} in classroom {room.id!r}")
    decision = request.form.get("decision", "")
    if decision not in signals.ACTIONS:
        raise BadRequest(f"decision {decision!r} is not valid: use {' or '.join(signals.ACTIONS)}")
    try:
        signals.handle(row, signals.ACTIONS[decision], access.viewer().name, utcnow())
    except signals.AlreadyHandled as exc:
        raise Conflict(str(exc)) from None
    session.commit()
    if request.accept_mimetypes.best == "application/json":
        return present.row_json(row)
    return redirect(url_for("live.classroom", classroom_id=room.id))


@bp.post("/classrooms/<classroom_id>/session")
@access.login_required
def change_session(classroom_id: str):
    """Start a new class session (closing the open one) or end it, e.g. between two lessons.

    Without this a session only ends after the room has been quiet for a while, so two classes
    back to back in one room would share one session and one history.
    """
    room = access.classroom_or_403(classroom_id)
    store = Store(access.coordinator().sessions)
    action = request.form.get("action", "")
    if action == "start":
        store.start_session(room.id, utcnow(), room.course_id, access.viewer().name)
    elif action == "end":
        store.end_session(room.id, utcnow())
    else:
        raise BadRequest(f"action {action!r} is not valid: use start or end")
    return redirect(url_for("live.classroom", classroom_id=room.id))
