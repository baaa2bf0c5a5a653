"""REST JSON API under /api/v1: classrooms, their state, signals and acknowledging them.

Callers authenticate with ``Authorization: Bearer <token>`` (a token from ``web.api_tokens``,
which sees every classroom) or with a dashboard login cookie (which sees what that user sees).
A cookie-authenticated POST must carry the page's CSRF token in ``X-CSRFToken``, since a browser
would attach the cookie to a forged cross-site request too; a bearer token cannot be forged so.
"""

from __future__ import annotations

import base64
from datetime import datetime

from flask import Blueprint, g, request
from flask_wtf.csrf import validate_csrf
from werkzeug.exceptions import BadRequest, Conflict, NotFound, Unauthorized
from wtforms.validators import ValidationError

from coordinator import aggregate, db
from coordinator.store import naive_utc, utcnow
from coordinator.web import access, openapi, present, signals

bp = Blueprint("api", __name__, url_prefix="/api/v1")
MAX_LIMIT = 1000


@bp.before_request
def _authenticate() -> None:
    if request.endpoint == "api.openapi_document":
        return
    token = access.token_viewer()
    if token is not None:
        g.viewer = token
        return
    if access.viewer() is None:
        raise Unauthorized("log in to the dashboard or send Authorization: Bearer <token> (web.api_tokens)")
    if request.method == "POST":
        try:
            validate_csrf(request.headers.get("X-CSRFToken", ""))
        except ValidationError as exc:
            raise BadRequest(f"CSRF check failed ({exc}): send the page's token in X-CSRFToken") from None


@bp.get("/openapi.json")
def openapi_document():
    return openapi.document()


@bp.get("/classrooms")
def classrooms():
    session = access.dbs()
    now = utcnow()
    offline_after = access.coordinator().config.aggregate.agent_offline_after_s
    rooms = access.visible_classrooms(session, access.viewer())
    ids = [room.id for room in rooms]
    open_sessions = aggregate.open_sessions(session, ids)
    online = aggregate.agents_online_by_classroom(session, ids, now, offline_after)
    result = [
        {
            "id": room.id,
            "name": room.name,
            "course_id": room.course_id,
            "instructor": room.instructor,
            "session_id": open_sessions[room.id].id if room.id in open_sessions else None,
            "agents_online": online.get(room.id, 0),
        }
        for room in rooms
    ]
    return {"classrooms": result}


@bp.get("/classrooms/<classroom_id>/state")
def classroom_state(classroom_id: str):
    room = access.classroom_or_403(classroom_id)
    config = access.coordinator().config.aggregate
    window = _int_arg("window", config.default_window)
    if window not in config.windows:
        raise BadRequest(f"window must be one of {', '.join(map(str, config.windows))} seconds")
    state = aggregate.classroom_state(
        access.dbs(), room.id, window, utcnow(), config.k_anonymity, config.agent_offline_after_s
    )
    return present.state_json(state, config.k_anonymity)


def _int_arg(name: str, default: int) -> int:
    """A whole-number query argument; a typo is a 400, not silently the default."""
    value = request.args.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, e.g. {default}") from None


def _time_arg(name: str) -> datetime | None:
    """An ISO 8601 time as naive UTC; unreadable, or outside years 1-9999 once in UTC, is a 400."""
    value = request.args.get(name)
    if not value:
        return None
    try:
        return naive_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except (ValueError, OverflowError):  # OverflowError: e.g. 0001-01-01T00:00:00+01:00 is in year 0 UTC
        raise BadRequest(
            f"{name} must be an ISO 8601 time within years 1-9999 UTC, e.g. 2025-01-31T09:00:00Z"
        ) from None


@bp.get("/signals")
def list_signals():
    status = request.args.get("status") or None
    if status and status not in signals.STATUSES:
        raise BadRequest(f"status must be one of {', '.join(signals.STATUSES)}")
    kind = request.args.get("kind") or None
    if kind and kind not in signals.KINDS:
        raise BadRequest(f"kind must be one of {', '.join(signals.KINDS)}")
    limit = _int_arg("limit", 100)
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}")
    visible = access.visible_classroom_ids(access.viewer())
    wanted = request.args.get("classroom")
    if wanted:
        access.classroom_or_403(wanted)
        visible = {wanted}
    rows = signals.find(
        access.dbs(),
        visible,
        status=status,
        kind=kind,
        session_id=request.args.get("session") or None,
        since=_time_arg("since"),
        until=_time_arg("until"),
        before=_before_arg(),
        limit=limit,
    )
    return {
        "signals": [present.row_json(row) for row in rows],
        "next": _cursor(rows[-1]) if len(rows) == limit else None,
    }


def _cursor(row: db.Signal) -> str:
    """The ``before`` of the page after ``row``: its created_at to the microsecond and its id.

    ``until`` cannot page: created_at is shown to the second, and signals of one tick share it.
    Opaque (base64url) to callers, so its form may change.
    """
    raw = f"{row.created_at.isoformat(timespec='microseconds')} {row.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _before_arg() -> tuple[datetime, str] | None:
    value = request.args.get("before")
    if not value:
        return None
    try:
        at, signal_id = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode().split(" ", 1)
        parsed = datetime.fromisoformat(at)
        if parsed.tzinfo is not None:  # _cursor writes the schema's naive UTC
            raise ValueError(at)
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors too
        raise BadRequest("before must be the next value of an earlier /signals answer") from None
    return parsed, signal_id


@bp.post("/signals/<signal_id>/ack")
def ack_signal(signal_id: str):
    """Body ``{"status": "acknowledged" | "dismissed"}``; the default is acknowledged."""
    session = access.dbs()
    row = session.get(db.Signal, signal_id)
    if row is None:
        raise NotFound(f"there is no signal {signal_id!r}")
    access.classroom_or_403(row.classroom_id)
    try:
        signals.handle(row, _ack_status(), access.viewer().name, utcnow())
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    except signals.AlreadyHandled as exc:
        raise Conflict(str(exc)) from None
    session.commit()
    return present.row_json(row)


def _ack_status() -> str:
    """The status an ack asks for. Acknowledging cannot be undone, so only an empty body means the
    default; a body in another content type, malformed JSON or JSON other than an object is a 400
    rather than being taken for "no body"."""
    if not request.get_data(cache=True):
        return "acknowledged"
    body = request.get_json(silent=True) if request.is_json else None
    if not isinstance(body, dict):
        raise BadRequest(
            'send no body to acknowledge, or a JSON object such as {"status": "dismissed"} '
            "with Content-Type: application/json"
        )
    return body.get("status", "acknowledged")
