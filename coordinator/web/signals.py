"""Finding adaptation signals and recording what an instructor did with them (pages and API alike)."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from affectedge.v1 import affectedge_pb2 as pb
from coordinator import db

#: what an instructor can do with an open signal -> the status it gets
ACTIONS = {"acknowledge": "acknowledged", "dismiss": "dismissed"}
STATUSES = ("open", *ACTIONS.values())
#: the kinds a signal can have (what ``?kind=`` accepts: a misspelt kind is a 400, not an empty list)
KINDS = tuple(value.name for value in pb.SignalKind.DESCRIPTOR.values if value.number)


class AlreadyHandled(Exception):
    """The signal was acknowledged or dismissed before (perhaps by a colleague)."""


def find(
    session: Session,
    classroom_ids: Collection[str] | None,
    *,
    status: str | None = None,
    kind: str | None = None,
    session_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before: tuple[datetime, str] | None = None,
    limit: int = 100,
) -> list[db.Signal]:
    """Newest first; ``classroom_ids`` None means every classroom.

    Ties on ``created_at`` (one tick can raise signals in many classrooms) are ordered by id, so
    ``before`` = (created_at, id) of the last row of a page starts the next page exactly after it.
    """
    query = select(db.Signal).order_by(db.Signal.created_at.desc(), db.Signal.id.desc()).limit(limit)
    if classroom_ids is not None:
        query = query.where(db.Signal.classroom_id.in_(list(classroom_ids)))
    if status:
        query = query.where(db.Signal.status == status)
    if kind:
        query = query.where(db.Signal.kind == kind)
    if session_id:
        query = query.where(db.Signal.session_id == session_id)
    if since:
        query = query.where(db.Signal.created_at >= since)
    if until:
        query = query.where(db.Signal.created_at < until)
    if before:
        at, signal_id = before
        query = query.where(
            or_(db.Signal.created_at < at, and_(db.Signal.created_at == at, db.Signal.id < signal_id))
        )
    return list(session.scalars(query))


def handle(row: db.Signal, status: str, by: str, now: datetime) -> None:
    """Mark an open signal acknowledged or dismissed (caller commits)."""
    if status not in ACTIONS.values():
        raise ValueError(f"status {status!r} is not valid: use one of {', '.join(ACTIONS.values())}")
    if row.status != "open":
        raise AlreadyHandled(f"this signal was already {row.status} by {row.handled_by or 'someone'}")
    row.status, row.handled_by, row.handled_at = status, by, now
