"""Sliding-window aggregates of a classroom: what the dashboard shows and the policy rules test.

Everything is computed from the database, never from what one process happened to ingest, so
several coordinators sharing one database (each ingesting part of the stream through an MQTT
shared subscription) all see the same classroom. Sums run in SQL on the seven probability columns
of :class:`coordinator.db.Observation`, so a window of thousands of observations is one query.

Privacy: below ``k`` distinct learners in a window (k-anonymity), a state is ``suppressed``: its
distribution and learning states are zeros, because with one or two learners they *are* those
learners' emotions. Counts (faces, learners, observations) stay, as a camera's head count does.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

from sqlalchemy import BigInteger, Integer, String, and_, cast, distinct, func, select, union
from sqlalchemy.orm import Session

from affectedge.labels import EMOTIONS
from affectedge.v1 import affectedge_pb2 as pb
from coordinator import states
from coordinator.db import PROB_COLUMNS, Agent, Aggregate, CameraSample, Classroom, ClassSession, Observation

ZEROS = [0.0] * len(EMOTIONS)


def _track_key():
    """One anonymous learner: track ids are only unique per agent and camera."""
    return Observation.agent_id + ":" + Observation.camera_id + ":" + cast(Observation.track_id, String)


def _weighted_sums():
    conf = Observation.confidence
    return [func.coalesce(func.sum(conf * getattr(Observation, col)), 0.0) for col in PROB_COLUMNS]


def _normalise(sums: list[float], total: float) -> list[float]:
    return [s / total for s in sums] if total > 0 else list(ZEROS)


def open_session(db: Session, classroom_id: str) -> ClassSession | None:
    return db.scalars(
        select(ClassSession)
        .where(ClassSession.classroom_id == classroom_id, ClassSession.ended_at.is_(None))
        .order_by(ClassSession.started_at.desc())
        .limit(1)
    ).first()


def agents_online(db: Session, classroom_id: str, now: datetime, offline_after_s: float) -> int:
    """Agents heard from recently that have not said (or had their Last Will say) OFFLINE."""
    return db.scalar(
        select(func.count())
        .select_from(Agent)
        .where(
            Agent.classroom_id == classroom_id,
            Agent.state != "OFFLINE",
            Agent.last_seen >= now - timedelta(seconds=offline_after_s),
        )
    )


def _faces_present(db: Session, classroom_id: str, start: datetime, end: datetime) -> int:
    """Sum over cameras of each camera's latest head count in the window."""
    latest = (
        select(CameraSample.agent_id, CameraSample.camera_id, func.max(CameraSample.ts).label("ts"))
        .where(CameraSample.classroom_id == classroom_id, CameraSample.ts > start, CameraSample.ts <= end)
        .group_by(CameraSample.agent_id, CameraSample.camera_id)
        .subquery()
    )
    return db.scalar(
        select(func.coalesce(func.sum(CameraSample.faces_present), 0)).join(
            latest,
            and_(
                CameraSample.classroom_id == classroom_id,
                CameraSample.agent_id == latest.c.agent_id,
                CameraSample.camera_id == latest.c.camera_id,
                CameraSample.ts == latest.c.ts,
            ),
        )
    )


def classroom_state(
    db: Session,
    classroom_id: str,
    window_s: int,
    now: datetime,
    k: int,
    offline_after_s: float = 30.0,
) -> pb.ClassroomState:
    """The classroom over ``(now - window_s, now]`` (by observation window end, naive UTC)."""
    start = now - timedelta(seconds=window_s)
    row = db.execute(
        select(
            func.count(),
            func.coalesce(func.sum(Observation.confidence), 0.0),
            func.count(distinct(_track_key())),
            *_weighted_sums(),
        ).where(
            Observation.classroom_id == classroom_id,
            Observation.window_end > start,
            Observation.window_end <= now,
        )
    ).one()
    count, total, learners, sums = row[0], row[1], row[2], list(row[3:])
    session = open_session(db, classroom_id)
    course = session.course_id if session and session.course_id else db.scalar(
        select(Classroom.course_id).where(Classroom.id == classroom_id)
    )
    state = pb.ClassroomState(
        classroom_id=classroom_id,
        session_id=session.id if session else "",
        course_id=course or "",
        window_seconds=window_s,
        faces_present=_faces_present(db, classroom_id, start, now),
        learners=learners,
        agents_online=agents_online(db, classroom_id, now, offline_after_s),
        observations=count,
        suppressed=learners < k,
    )
    state.window_start.FromDatetime(start)
    state.window_end.FromDatetime(now)
    distribution = ZEROS if state.suppressed else _normalise(sums, total)
    state.distribution.extend(distribution)
    state.states.extend(states.to_messages(states.from_distribution(distribution)))
    return state


def to_aggregate_row(state: pb.ClassroomState) -> dict:
    """A :class:`coordinator.db.Aggregate` row for a state (already k-anonymised)."""
    return {
        "classroom_id": state.classroom_id,
        "session_id": state.session_id or None,
        "window_end": state.window_end.ToDatetime(),
        "window_seconds": state.window_seconds,
        "faces_present": state.faces_present,
        "learners": state.learners,
        "agents_online": state.agents_online,
        "distribution": list(state.distribution),
        "states": states.from_messages(state.states),
        "observations": state.observations,
    }


def active_classrooms(db: Session, since: datetime) -> list[str]:
    """Classrooms with an open session or observations after ``since``."""
    recent = select(Observation.classroom_id).where(Observation.window_end > since).distinct()
    opened = select(ClassSession.classroom_id).where(ClassSession.ended_at.is_(None))
    return sorted(db.scalars(union(recent, opened)))


def _epoch_seconds(db: Session, column):
    if db.get_bind().dialect.name == "postgresql":
        return cast(func.extract("epoch", column), BigInteger)
    return cast(func.strftime("%s", column), Integer)


def _bucket(db: Session, column, start: datetime, bucket_s: int):
    return (_epoch_seconds(db, column) - int(_utc_epoch(start))) // bucket_s


def _utc_epoch(value: datetime) -> float:
    return (value - datetime(1970, 1, 1)).total_seconds()


def timeline(
    db: Session, classroom_id: str, start: datetime, end: datetime, bucket_s: int, k: int = 3
) -> list[dict]:
    """Per-bucket aggregates over ``[start, end)``, oldest first, buckets without data left out.

    Raw observations are used where they still exist; older buckets (raw deleted by retention)
    come from the stored :class:`Aggregate` snapshots. ``k`` is the k-anonymity threshold
    (pass ``config.aggregate.k_anonymity``; the default is the shipped one).
    """
    if bucket_s < 1:
        raise ValueError("bucket_s must be at least 1 second")
    raw = _raw_buckets(db, classroom_id, start, end, bucket_s, k)
    stored = _stored_buckets(db, classroom_id, start, end, bucket_s, k, skip=set(raw))
    points = []
    for index, bucket in sorted({**stored, **raw}.items()):
        suppressed = bucket["suppressed"]
        distribution = ZEROS if suppressed else bucket["distribution"]
        points.append(
            {
                "t": (start + timedelta(seconds=index * bucket_s)).isoformat() + "Z",
                "distribution": list(distribution),
                "states": states.from_distribution(distribution),
                "faces": bucket["faces"],
                "learners": bucket["learners"],
                "observations": bucket["observations"],
                "suppressed": suppressed,
            }
        )
    return points


def _raw_buckets(
    db: Session, classroom_id: str, start: datetime, end: datetime, bucket_s: int, k: int
) -> dict:
    in_range = (
        Observation.classroom_id == classroom_id,
        Observation.window_end >= start,
        Observation.window_end < end,
    )
    bucket = _bucket(db, Observation.window_end, start, bucket_s).label("bucket")
    rows = db.execute(
        select(
            bucket,
            func.count(),
            func.sum(Observation.confidence),
            func.count(distinct(_track_key())),
            *_weighted_sums(),
        )
        .where(*in_range)
        .group_by(bucket)
    ).all()
    faces = _raw_faces(db, classroom_id, start, end, bucket_s)
    return {
        int(r[0]): {
            "observations": r[1],
            "learners": r[3],
            "suppressed": r[3] < k,
            "distribution": _normalise(list(r[4:]), r[2] or 0.0),
            "faces": faces.get(int(r[0]), 0),
        }
        for r in rows
    }


def _raw_faces(db: Session, classroom_id: str, start: datetime, end: datetime, bucket_s: int) -> dict:
    """Per bucket, the sum over cameras of each camera's largest head count in that bucket."""
    bucket = _bucket(db, CameraSample.ts, start, bucket_s).label("bucket")
    per_camera = (
        select(bucket, func.max(CameraSample.faces_present).label("faces"))
        .where(CameraSample.classroom_id == classroom_id, CameraSample.ts >= start, CameraSample.ts < end)
        .group_by(bucket, CameraSample.agent_id, CameraSample.camera_id)
        .subquery()
    )
    rows = db.execute(select(per_camera.c.bucket, func.sum(per_camera.c.faces)).group_by(per_camera.c.bucket))
    return {int(b): int(f) for b, f in rows}


def _stored_buckets(
    db: Session, classroom_id: str, start: datetime, end: datetime, bucket_s: int, k: int, skip: set[int]
) -> dict:
    """Buckets rebuilt from snapshots of the longest stored window that fits in one bucket."""
    in_range = (
        Aggregate.classroom_id == classroom_id,
        Aggregate.window_end > start,
        Aggregate.window_end <= end,
    )
    lengths = db.scalars(select(Aggregate.window_seconds).where(*in_range).distinct()).all()
    if not lengths:
        return {}
    fitting = [w for w in lengths if w <= bucket_s]
    window = max(fitting) if fitting else min(lengths)
    snapshots = db.scalars(select(Aggregate).where(*in_range, Aggregate.window_seconds == window))
    grouped: dict[int, list[Aggregate]] = defaultdict(list)
    for snap in snapshots:
        index = int(_utc_epoch(snap.window_end - timedelta(microseconds=1)) - _utc_epoch(start)) // bucket_s
        if index not in skip:
            grouped[index].append(snap)
    buckets = {}
    for index, snaps in grouped.items():
        # snapshots below k were stored as zeros: they carry no distribution to combine
        usable = [s for s in snaps if s.learners >= k]
        weight = sum(s.observations for s in usable)
        distribution = [
            sum(s.distribution[i] * s.observations for s in usable) / weight if weight else 0.0
            for i in range(len(EMOTIONS))
        ]
        buckets[index] = {
            "observations": sum(s.observations for s in snaps),
            "learners": max(s.learners for s in snaps),
            "suppressed": not usable,
            "distribution": distribution,
            "faces": max(s.faces_present for s in snaps),
        }
    return buckets
