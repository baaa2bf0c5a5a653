"""Every write the coordinator makes to its database, in batches, on SQLite or PostgreSQL alike.

Several coordinator instances may share one database (MQTT shared subscriptions split the stream
between them), so each write here is safe to race with another instance's:

* entities that appear on first sight (classrooms, agents) are written with "insert, or ignore /
  update on conflict", never read-then-insert;
* a classroom's next session has a deterministic id (derived from the session before it), so two
  instances that both find no open session create the *same* one and the second insert is a no-op;
* a batch is stored once, however many times and to whichever instances it is delivered: its
  identity is inserted into :class:`~coordinator.db.StoredBatch` in the transaction that stores it,
  with "on conflict do nothing", and only the batches whose identity went in are written;
* policy evaluation runs on one instance at a time, the holder of a lease row (:meth:`Store.lead`)
  that is taken and renewed by compare-and-set.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf import json_format
from sqlalchemy import Text, cast, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from affectedge.v1 import affectedge_pb2 as pb
from coordinator.db import (
    PROB_COLUMNS,
    Agent,
    CameraSample,
    Classroom,
    ClassSession,
    Delivery,
    ObservationRollup,
    Setting,
    Signal,
    StoredBatch,
    bulk_insert,
    insert_observations,
)

#: namespace of the deterministic session ids
SESSION_NAMESPACE = uuid.UUID("5b0e7a52-6c1d-4f3e-9a55-8a1f0c2d7e41")
LEADER_KEY = "coordinator.leader"


def utcnow() -> datetime:
    """Now as the naive UTC datetime the schema stores everywhere."""
    return datetime.now(UTC).replace(tzinfo=None)


def naive_utc(value: datetime) -> datetime:
    """The schema's form of a time: naive UTC (an aware time is converted, a naive one kept)."""
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


def iso(value: datetime | None) -> str | None:
    """Naive-UTC datetime as ISO 8601 with a Z, so browsers read it as UTC."""
    return None if value is None else naive_utc(value).isoformat(timespec="seconds") + "Z"


@dataclass(frozen=True)
class Received:
    """One decoded ObservationBatch and when the coordinator received it (naive UTC)."""

    batch: pb.ObservationBatch
    at: datetime


@dataclass(frozen=True)
class Written:
    """What one :meth:`Store.write` did with its batches."""

    observations: int  # rows stored
    duplicates: int  # batches skipped: stored before (by any instance) or twice in this write

    def __add__(self, other: Written) -> Written:
        return Written(self.observations + other.observations, self.duplicates + other.duplicates)


BatchKey = tuple[str, int, datetime]


def batch_key(batch: pb.ObservationBatch) -> BatchKey | None:
    """A batch's identity across redeliveries: agent, ``seq`` and ``sent_at`` (see :class:`StoredBatch`).

    None for a batch without ``seq`` or ``sent_at``: unnumbered, or numbered without the stamp that
    tells a reinstalled agent's new batch from an old one. Those are always stored: a duplicate
    stored is a lesser harm than a new batch dropped.
    """
    if not batch.seq or not batch.HasField("sent_at"):
        return None
    return batch.agent_id, batch.seq, batch.sent_at.ToDatetime()


def observation_rows(batch: pb.ObservationBatch, session_id: str | None) -> list[dict]:
    rows = []
    times: dict[tuple[int, int], datetime] = {}  # the tracks of one batch share their window times

    def when(ts) -> datetime:
        key = (ts.seconds, ts.nanos)
        if key not in times:
            times[key] = ts.ToDatetime()
        return times[key]

    for obs in batch.observations:
        row = {
            "classroom_id": batch.classroom_id,
            "session_id": session_id,
            "agent_id": batch.agent_id,
            "camera_id": obs.camera_id,
            "track_id": obs.track_id,
            "window_start": when(obs.window_start),
            "window_end": when(obs.window_end),
            "label": obs.label - 1,
            "confidence": obs.confidence,
            "quality": obs.quality.score,
        }
        row.update(zip(PROB_COLUMNS, obs.probabilities, strict=True))
        rows.append(row)
    return rows


def signal_message(row: Signal) -> pb.AdaptationSignal:
    """The wire form of a stored signal."""
    message = pb.AdaptationSignal(
        id=row.id,
        classroom_id=row.classroom_id,
        session_id=row.session_id or "",
        course_id=row.course_id,
        kind=pb.SignalKind.Value(row.kind),
        strength=row.strength,
        reason=row.reason,
    )
    json_format.ParseDict(row.evidence, message.evidence)
    message.created_at.FromDatetime(row.created_at)
    return message


class Store:
    def __init__(self, sessions: sessionmaker):
        self.sessions = sessions
        dialect = sessions.kw["bind"].dialect.name
        self._insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self._known_classrooms: set[str] = set()

    # -- ingest ---------------------------------------------------------------------------------

    def write(self, received: list[Received], statuses: list[tuple[pb.AgentStatus, datetime]]) -> Written:
        """Store batches and agent statuses in one transaction, skipping batches stored before."""
        if not received and not statuses:
            return Written(0, 0)
        with self.sessions.begin() as db:
            delivered = len(received)
            received = self._first_deliveries(db, received)
            new_classrooms = self._ensure_classrooms(
                db, {r.batch.classroom_id for r in received} | {s.classroom_id for s, _ in statuses}
            )
            open_sessions = self._open_sessions(
                db, {r.batch.classroom_id for r in received if r.batch.observations}
            )
            rows, samples, seen = [], [], {}
            for item in received:
                batch = item.batch
                rows.extend(observation_rows(batch, open_sessions.get(batch.classroom_id)))
                samples.extend(
                    {
                        "classroom_id": batch.classroom_id,
                        "agent_id": batch.agent_id,
                        "camera_id": s.camera_id,
                        "ts": s.timestamp.ToDatetime() if s.HasField("timestamp") else item.at,
                        "faces_present": s.faces_present,
                    }
                    for s in batch.summaries
                )
                seen[batch.agent_id] = {
                    "id": batch.agent_id,
                    "classroom_id": batch.classroom_id,
                    "last_seen": item.at,
                    "model_version": batch.model_version,
                }
            insert_observations(db, rows)
            if samples:
                bulk_insert(db, CameraSample.__table__, samples)
            if seen:
                stmt = self._insert(Agent)
                db.execute(
                    # a batch's model version is the one it was spooled under, maybe a release ago: it
                    # names a new agent's model, and from then on only the agent's status says what runs
                    stmt.on_conflict_do_update(
                        index_elements=[Agent.id],
                        set_={c: stmt.excluded[c] for c in ("classroom_id", "last_seen")},
                    ),
                    list(seen.values()),
                )
            for status, at in statuses:
                self._apply_status(db, status, at)
        self._known_classrooms |= new_classrooms  # only once committed: a rollback must insert them again
        return Written(len(rows), delivered - len(received))

    def _first_deliveries(self, db: Session, received: list[Received]) -> list[Received]:
        """The batches not stored before, in order; their identities are recorded in ``db``'s transaction.

        One INSERT … ON CONFLICT DO NOTHING RETURNING for the whole write: the identities it returns
        went in, the others were already there. Racing another instance over the same batch is safe:
        PostgreSQL makes the second insert wait for the first transaction and then do nothing (or
        insert, if the first rolled back); SQLite lets one writer in at a time. The keys go in sorted,
        so two instances inserting overlapping keys lock them in the same order instead of deadlocking.
        """
        keys = [batch_key(r.batch) for r in received]
        received_at = {key: item.at for key, item in zip(keys, received, strict=True) if key}
        if not received_at:
            return received
        table = StoredBatch.__table__
        identity = (table.c.agent_id, table.c.seq, table.c.sent_at)
        rows = [
            {"agent_id": agent_id, "seq": seq, "sent_at": sent_at, "received_at": at}
            for (agent_id, seq, sent_at), at in sorted(received_at.items())
        ]
        inserted = db.execute(
            self._insert(table).on_conflict_do_nothing(index_elements=identity).returning(*identity), rows
        )
        new = {tuple(row) for row in inserted}
        fresh = []
        for key, item in zip(keys, received, strict=True):
            if key is None or key in new:
                new.discard(key)  # a second copy in this same write is a duplicate too
                fresh.append(item)
        return fresh

    def _ensure_classrooms(self, db: Session, ids: set[str]) -> set[str]:
        """Classrooms are created on first sight, named after their id until an admin renames them.

        Returns the ids inserted, for the caller to remember once the transaction commits.
        """
        new = ids - self._known_classrooms
        if new:
            db.execute(
                self._insert(Classroom).on_conflict_do_nothing(index_elements=[Classroom.id]),
                [{"id": c, "name": c, "course_id": ""} for c in sorted(new)],
            )
        return new

    def _apply_status(self, db: Session, status: pb.AgentStatus, at: datetime) -> None:
        values = {
            "classroom_id": status.classroom_id,
            "state": pb.AgentStatus.State.Name(status.state).removeprefix("STATE_"),
            "version": status.version,
            "backend": status.backend,
            "model_version": status.model_version,
            "cameras": [json_format.MessageToDict(c) for c in status.cameras],
            "spool_depth": status.spool_depth,
            "detail": status.detail,
        }
        if status.state != pb.AgentStatus.OFFLINE:
            values["last_seen"] = at
        stmt = self._insert(Agent).values(id=status.agent_id, **values)
        db.execute(stmt.on_conflict_do_update(index_elements=[Agent.id], set_=values))

    # -- sessions -------------------------------------------------------------------------------

    def _open_sessions(self, db: Session, classroom_ids: Iterable[str]) -> dict[str, str]:
        """The open session of each classroom, opening one where there is none."""
        wanted = set(classroom_ids)
        if not wanted:
            return {}
        found = self._open_session_ids(db, wanted)
        for classroom_id in sorted(wanted - found.keys()):
            found[classroom_id] = self._open_next(db, classroom_id, utcnow())
        return found

    @staticmethod
    def _open_session_ids(db: Session, classroom_ids: set[str]) -> dict[str, str]:
        rows = db.execute(
            select(ClassSession.classroom_id, ClassSession.id)
            .where(ClassSession.classroom_id.in_(classroom_ids), ClassSession.ended_at.is_(None))
            .order_by(ClassSession.started_at)
        )
        return {classroom_id: session_id for classroom_id, session_id in rows}

    def _open_next(
        self, db: Session, classroom_id: str, now: datetime, course_id: str = "", instructor: str | None = None
    ) -> str:
        """Open the successor of the classroom's latest session (same id whoever opens it)."""
        latest = db.scalar(
            select(ClassSession.id)
            .where(ClassSession.classroom_id == classroom_id)
            .order_by(ClassSession.started_at.desc())
            .limit(1)
        )
        session_id = uuid.uuid5(SESSION_NAMESPACE, f"{classroom_id}/{latest or ''}").hex
        if not course_id:
            course_id = db.scalar(select(Classroom.course_id).where(Classroom.id == classroom_id)) or ""
        db.execute(
            self._insert(ClassSession)
            .values(
                id=session_id,
                classroom_id=classroom_id,
                course_id=course_id,
                instructor=instructor,
                started_at=now,
            )
            .on_conflict_do_nothing(index_elements=[ClassSession.id])
        )
        return session_id

    def start_session(
        self, classroom_id: str, now: datetime, course_id: str = "", instructor: str | None = None
    ) -> str:
        """Explicitly start a class: close the open session (if any) and open a new one."""
        with self.sessions.begin() as db:
            new_classrooms = self._ensure_classrooms(db, {classroom_id})
            self._close(db, classroom_id, now)
            session_id = self._open_next(db, classroom_id, now, course_id, instructor)
        self._known_classrooms |= new_classrooms
        return session_id

    def end_session(self, classroom_id: str, now: datetime) -> int:
        """Explicitly end the classroom's open session; returns sessions closed (0 or 1)."""
        with self.sessions.begin() as db:
            return self._close(db, classroom_id, now)

    @staticmethod
    def _close(db: Session, classroom_id: str, now: datetime) -> int:
        return db.execute(
            update(ClassSession)
            .where(ClassSession.classroom_id == classroom_id, ClassSession.ended_at.is_(None))
            .values(ended_at=now)
        ).rowcount

    def close_idle_sessions(self, now: datetime, idle_s: float) -> list[str]:
        """Close open sessions whose classroom has had no observation for ``idle_s``; their ids.

        Observations timed after ``now`` do not count: one batch from a PC whose clock is a year
        ahead would otherwise keep its classroom's session open for that year.
        """
        closed = []
        with self.sessions.begin() as db:
            for session in db.scalars(select(ClassSession).where(ClassSession.ended_at.is_(None))).all():
                last = db.scalar(
                    select(func.max(ObservationRollup.window_end)).where(
                        ObservationRollup.classroom_id == session.classroom_id,
                        ObservationRollup.window_end >= session.started_at,
                        ObservationRollup.window_end <= now,
                    )
                )
                quiet_since = last or session.started_at
                if quiet_since < now - timedelta(seconds=idle_s):
                    session.ended_at = quiet_since
                    closed.append(session.id)
        return closed

    # -- signals --------------------------------------------------------------------------------

    def add_signal(self, signal: pb.AdaptationSignal, deliveries: Sequence[dict] = ()) -> None:
        """Store a signal and, in the same transaction, its outlets' delivery rows."""
        with self.sessions.begin() as db:
            db.add(
                Signal(
                    id=signal.id,
                    classroom_id=signal.classroom_id,
                    session_id=signal.session_id or None,
                    course_id=signal.course_id,
                    kind=pb.SignalKind.Name(signal.kind),
                    strength=signal.strength,
                    reason=signal.reason,
                    evidence=json_format.MessageToDict(signal.evidence),
                    created_at=signal.created_at.ToDatetime(),
                )
            )
            if deliveries:
                db.flush()  # the signal row first: deliveries reference it
                db.execute(insert(Delivery), list(deliveries))

    def last_signal_at(self, classroom_id: str, rule: str, since: datetime) -> datetime | None:
        """When ``rule`` last fired for the classroom after ``since`` (by any instance)."""
        with self.sessions() as db:
            rows = db.execute(
                select(Signal.created_at, Signal.evidence)
                .where(Signal.classroom_id == classroom_id, Signal.created_at >= since)
                .order_by(Signal.created_at.desc())
            )
            return next((at for at, evidence in rows if evidence.get("rule") == rule), None)

    def signals_since(self, since: datetime) -> list[pb.AdaptationSignal]:
        with self.sessions() as db:
            rows = db.scalars(select(Signal).where(Signal.created_at >= since).order_by(Signal.created_at))
            return [signal_message(r) for r in rows]

    # -- settings and leadership ----------------------------------------------------------------

    def setting(self, key: str):
        with self.sessions() as db:
            return db.scalar(select(Setting.value).where(Setting.key == key))

    def lead(self, owner: str, now: datetime, lease_s: float) -> bool:
        """Take or renew the policy lease; True while this ``owner`` holds it.

        Compare-and-set on the lease row's text: of two instances racing for an expired lease,
        only one UPDATE matches the old value.
        """
        value = json.dumps({"owner": owner, "expires": (now + timedelta(seconds=lease_s)).isoformat()})
        with self.sessions.begin() as db:
            current = db.scalar(select(cast(Setting.value, Text)).where(Setting.key == LEADER_KEY))
            if current is None:
                # whoever inserted first holds it (drivers disagree on rowcount here, so read it back)
                db.execute(
                    self._insert(Setting)
                    .values(key=LEADER_KEY, value=json.loads(value))
                    .on_conflict_do_nothing(index_elements=[Setting.key])
                )
                holder = db.scalar(select(cast(Setting.value, Text)).where(Setting.key == LEADER_KEY))
                return holder is not None and json.loads(holder).get("owner") == owner
            holder = json.loads(current)
            if holder.get("owner") != owner and datetime.fromisoformat(holder["expires"]) > now:
                return False
            swapped = db.execute(
                update(Setting)
                .where(Setting.key == LEADER_KEY, cast(Setting.value, Text) == current)
                .values(value=json.loads(value))
            )
            return swapped.rowcount == 1

    def resign(self, owner: str) -> None:
        """Give the lease up at shutdown so another instance takes over at once."""
        with self.sessions.begin() as db:
            current = db.scalar(select(cast(Setting.value, Text)).where(Setting.key == LEADER_KEY))
            if current and json.loads(current).get("owner") == owner:
                db.execute(delete(Setting).where(Setting.key == LEADER_KEY, cast(Setting.value, Text) == current))


__all__ = ["Received", "Store", "Written", "batch_key", "signal_message", "utcnow"]
