"""Past sessions of a classroom: timeline with its signals, CSV export and a printable summary.

Timelines come from ``aggregate.timeline``, which already applies k-anonymity per bucket, so a
suppressed bucket is exported and printed as "fewer than k learners", never as numbers.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter

from flask import Blueprint, Response, render_template
from sqlalchemy import func, select
from werkzeug.exceptions import NotFound

from affectedge.labels import EMOTIONS
from coordinator import aggregate, db, states
from coordinator.store import utcnow
from coordinator.web import access, present, signals

bp = Blueprint("history", __name__)

#: a session timeline has at most about this many points, whatever its length
MAX_POINTS = 240


def bucket_seconds(duration_s: float) -> int:
    """A round bucket (multiple of 10 s, at least 10 s) that keeps the timeline readable."""
    return max(10, math.ceil(duration_s / MAX_POINTS / 10) * 10)


def _session_or_404(classroom_id: str, session_id: str) -> tuple[db.Classroom, db.ClassSession]:
    room = access.classroom_or_403(classroom_id)
    class_session = access.dbs().get(db.ClassSession, session_id)
    if class_session is None or class_session.classroom_id != room.id:
        raise NotFound(f"classroom {room.id!r} has no session {session_id!r}")
    return room, class_session


def _session_data(classroom_id: str, session_id: str) -> dict:
    room, class_session = _session_or_404(classroom_id, session_id)
    k = access.coordinator().config.aggregate.k_anonymity
    end = class_session.ended_at or utcnow()
    bucket = bucket_seconds((end - class_session.started_at).total_seconds())
    points = aggregate.timeline(access.dbs(), room.id, class_session.started_at, end, bucket, k)
    rows = signals.find(access.dbs(), [room.id], session_id=class_session.id, limit=10_000)
    return {
        "room": room,
        "class_session": class_session,
        "end": end,
        "bucket_s": bucket,
        "emotions": list(EMOTIONS),
        "points": points,
        "signals": [present.row_json(row) for row in reversed(rows)],
    }


def summarise(points: list[dict], signal_list: list[dict]) -> dict:
    """Observation-weighted mean learning states over the shown buckets, peaks, and signal counts."""
    shown = [p for p in points if not p["suppressed"] and p["observations"]]
    weight = sum(p["observations"] for p in shown)
    means = {
        state: sum(p["states"][state] * p["observations"] for p in shown) / weight if weight else None
        for state in states.STATES
    }
    peaks = {
        state: max(shown, key=lambda p, s=state: p["states"][s], default=None) for state in present.GAUGES
    }
    return {
        "means": means,
        "peaks": {s: {"t": p["t"], "score": p["states"][s]} for s, p in peaks.items() if p},
        "max_learners": max((p["learners"] for p in points), default=0),
        "max_faces": max((p["faces"] for p in points), default=0),
        "suppressed_buckets": sum(1 for p in points if p["suppressed"]),
        "signals_by_kind": Counter(s["kind_label"] for s in signal_list),
        "signals_by_status": Counter(s["status"] for s in signal_list),
    }


@bp.get("/classrooms/<classroom_id>/sessions")
@access.login_required
def sessions(classroom_id: str):
    room = access.classroom_or_403(classroom_id)
    session = access.dbs()
    rows = session.scalars(
        select(db.ClassSession)
        .where(db.ClassSession.classroom_id == room.id)
        .order_by(db.ClassSession.started_at.desc())
        .limit(200)
    ).all()
    counts = dict(
        session.execute(
            select(db.Signal.session_id, func.count())
            .where(db.Signal.classroom_id == room.id)
            .group_by(db.Signal.session_id)
        ).all()
    )
    return render_template("sessions.html", room=room, rows=rows, counts=counts)


@bp.get("/classrooms/<classroom_id>/sessions/<session_id>")
@access.login_required
def session_view(classroom_id: str, session_id: str):
    return render_template("session.html", **_session_data(classroom_id, session_id))


@bp.get("/classrooms/<classroom_id>/sessions/<session_id>/summary")
@access.login_required
def summary(classroom_id: str, session_id: str):
    data = _session_data(classroom_id, session_id)
    return render_template("summary.html", summary=summarise(data["points"], data["signals"]), **data)


def _csv(filename: str, header: list[str], rows: list[list]) -> Response:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return Response(
        buffer.getvalue(),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@bp.get("/classrooms/<classroom_id>/sessions/<session_id>/timeline.csv")
@access.login_required
def timeline_csv(classroom_id: str, session_id: str):
    """One row per bucket; suppressed buckets keep their counts and leave the shares empty."""
    data = _session_data(classroom_id, session_id)
    header = ["time_utc", "faces", "learners", "observations", "suppressed", *EMOTIONS, *states.STATES]
    rows = []
    for p in data["points"]:
        shares = [""] * (len(EMOTIONS) + len(states.STATES)) if p["suppressed"] else [
            *(f"{v:.4f}" for v in p["distribution"]),
            *(f"{p['states'][s]:.4f}" for s in states.STATES),
        ]
        rows.append([p["t"], p["faces"], p["learners"], p["observations"], int(p["suppressed"]), *shares])
    return _csv(f"{data['room'].id}-{session_id}-timeline.csv", header, rows)


@bp.get("/classrooms/<classroom_id>/sessions/<session_id>/signals.csv")
@access.login_required
def signals_csv(classroom_id: str, session_id: str):
    data = _session_data(classroom_id, session_id)
    header = ["created_at_utc", "kind", "strength", "reason", "evidence", "status", "handled_by", "handled_at_utc"]
    rows = [
        [s["created_at"], s["kind"], s["strength"], s["reason"], s["evidence_text"], s["status"],
         s["handled_by"] or "", s["handled_at"] or ""]
        for s in data["signals"]
    ]
    return _csv(f"{data['room'].id}-{session_id}-signals.csv", header, rows)
