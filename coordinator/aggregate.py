"""Sliding-window aggregates of a classroom: what the dashboard shows and the policy rules test.

Everything is computed from the database, never from what one process happened to ingest, so
several coordinators sharing one database (each ingesting part of the stream through an MQTT
shared subscription) all see the same classroom. Windows are summed over
:class:`coordinator.db.ObservationRollup` rows (one per agent and instant, written with the raw
observations), so a window of tens of thousands of observations is a few hundred small rows.

Privacy (k-anonymity): a window mixes many instants, and an instant with fewer than ``k``
learners in view *is* those learners' emotions however many others the rest of the window holds
(one learner alone for most of a minute dominates the minute, and two windows ending together
differ by exactly those instants). So ``k`` is judged per instant (:func:`instant_of`): only the
instants with at least ``k`` learners enter a distribution and its ``observations``, and a state
with no such instant is ``suppressed``: its distribution and learning states are zeros. Faces and
learners over the whole window stay, as a camera's head count does.
Learners are the distinct anonymous tracks, capped by the cameras' peak head counts
(:func:`learners`): the edge gives a face a new track id each time it comes back into view, so
one learner looking away twice would otherwise count as three and lift the suppression.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import DateTime, and_, func, select, union
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement

from affectedge.labels import EMOTIONS
from affectedge.v1 import affectedge_pb2 as pb
from coordinator import states
from coordinator.db import SUM_COLUMNS, Agent, Aggregate, CameraSample, Classroom, ClassSession, ObservationRollup

ZEROS = [0.0] * len(EMOTIONS)
#: a rollup's confidence-weighted probability sums, in EMOTIONS order
_WEIGHTED = [ObservationRollup.__table__.c[column] for column in SUM_COLUMNS]


class instant_of(FunctionElement):
    """The instant of a rollup's ``window_end``: its whole second, on every backend.

    An agent publishes about once a second, each track's window ending at the frame it was last
    seen in, so the tracks in view together fall in one second; across agents, their rollups of
    that second. A batch split over two seconds counts fewer learners in each: never more.
    """

    type = DateTime()
    inherit_cache = True


@compiles(instant_of, "sqlite")
def _instant_sqlite(element, compiler, **kw) -> str:
    return f"substr({compiler.process(element.clauses, **kw)}, 1, 19)"  # 'YYYY-MM-DD HH:MM:SS'


@compiles(instant_of, "postgresql")
def _instant_postgresql(element, compiler, **kw) -> str:
    return f"date_trunc('second', {compiler.process(element.clauses, **kw)})"


@dataclass
class Tally:
    """Observations summed from rollups: counts, confidence-weighted sums and distinct learners."""

    observations: int = 0
    confidence: float = 0.0
    weighted: list[float] = field(default_factory=lambda: list(ZEROS))
    learner_keys: set[str] = field(default_factory=set)

    def add_sums(self, observations: int, confidence: float, weighted: Sequence[float]) -> None:
        self.observations += observations
        self.confidence += confidence
        self.weighted = [a + b for a, b in zip(self.weighted, weighted, strict=True)]

    @property
    def distinct_tracks(self) -> int:
        return len(self.learner_keys)

    def distribution(self) -> list[float]:
        """Confidence-weighted mean distribution (zeros when there is nothing to weigh)."""
        if self.confidence <= 0:
            return list(ZEROS)
        return [s / self.confidence for s in self.weighted]


@dataclass
class Instants:
    """A window's rollups by instant: which learners each instant saw, and its sums.

    :meth:`kept` leaves out every instant with fewer than ``k`` learners, so no distribution
    is built from fewer than ``k`` learners at any moment of it.
    """

    instants: dict[datetime, Tally] = field(default_factory=lambda: defaultdict(Tally))
    learner_keys: set[str] = field(default_factory=set)
    _parsed: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict, repr=False)

    def add(self, instant: datetime, agent_id: str, tracks: str, observations: int, confidence: float,
            weighted: Sequence[float]) -> None:
        """One agent's rollups of one instant; an agent sends the same track list batch after
        batch, so each list is split once per window."""
        keys = self._parsed.get((agent_id, tracks))
        if keys is None:
            # one anonymous learner: track ids are only unique per agent and camera
            keys = self._parsed[agent_id, tracks] = frozenset(f"{agent_id}:{track}" for track in tracks.split(","))
            self.learner_keys |= keys
        tally = self.instants[instant]
        tally.learner_keys |= keys
        tally.add_sums(observations, confidence, weighted)

    def kept(self, k: int, peak_faces: int) -> Tally:
        """The window's learners, with the sums of its instants that have at least ``k`` learners
        (each instant's tracks capped, like the window's, by the cameras' peak head counts)."""
        result = Tally(learner_keys=self.learner_keys)
        for tally in self.instants.values():
            if learners(tally.distinct_tracks, peak_faces) >= k:
                result.add_sums(tally.observations, tally.confidence, tally.weighted)
        return result


def learners(distinct_tracks: int, peak_faces: int) -> int:
    """Learners in a window: its distinct track ids, but never more than the sum over cameras of
    each camera's largest head count in it. Track ids overcount one face re-tracked after leaving
    the view; head counts undercount learners who take turns in front of a camera; for
    k-anonymity the smaller is the safe one."""
    return min(distinct_tracks, peak_faces)


def whole_seconds(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """The whole seconds within ``(start, end]``, as ``[first, last)``: a window is judged on whole
    instants only. A second cut by a window's fractional start held only its rows after the cut, so
    two windows ending together differed by the rows before it, one agent's lone learner perhaps;
    the second still running at ``end`` is cut the same way by the next tick's window."""
    first = start.replace(microsecond=0) + timedelta(seconds=1 if start.microsecond else 0)
    return first, end.replace(microsecond=0)


def _window_instants(db: Session, ids: Sequence[str], start: datetime, end: datetime) -> dict[str, Instants]:
    """Each classroom's observations in the whole seconds of ``(start, end]`` (:func:`whole_seconds`),
    summed in SQL per instant, agent and track list: a row per agent and second however many batches
    a second holds."""
    R = ObservationRollup
    instant = instant_of(R.window_end)
    first, last = whole_seconds(start, end)
    rows = db.execute(
        select(
            R.classroom_id,
            instant,
            R.agent_id,
            R.tracks,
            func.sum(R.observations),
            func.sum(R.confidence),
            *(func.sum(column) for column in _WEIGHTED),
        )
        .where(R.classroom_id.in_(ids), R.window_end >= first, R.window_end < last)
        .group_by(R.classroom_id, instant, R.agent_id, R.tracks)
    )
    windows = {classroom_id: Instants() for classroom_id in ids}
    for classroom_id, when, agent_id, tracks, observations, confidence, *weighted in rows:
        windows[classroom_id].add(when, agent_id, tracks, observations, confidence, weighted)
    return windows


def open_sessions(db: Session, ids: Sequence[str]) -> dict[str, ClassSession]:
    """The open session of each classroom that has one (the latest, should there be two)."""
    rows = db.scalars(
        select(ClassSession)
        .where(ClassSession.classroom_id.in_(ids), ClassSession.ended_at.is_(None))
        .order_by(ClassSession.started_at)
    )
    return {row.classroom_id: row for row in rows}


def agents_online_by_classroom(
    db: Session, ids: Sequence[str], now: datetime, offline_after_s: float
) -> dict[str, int]:
    """Per classroom, its agents online by :meth:`coordinator.db.Agent.online`."""
    rows = db.execute(
        select(Agent.classroom_id, func.count())
        .where(Agent.classroom_id.in_(ids), Agent.online(now - timedelta(seconds=offline_after_s)))
        .group_by(Agent.classroom_id)
    )
    return dict(rows.all())


def _faces_present(db: Session, ids: Sequence[str], start: datetime, end: datetime) -> dict[str, int]:
    """Per classroom, the sum over its cameras of each camera's latest head count in the window
    (its whole seconds, as the labels': :func:`whole_seconds`)."""
    C = CameraSample
    first, last = whole_seconds(start, end)
    latest = (
        select(C.classroom_id, C.agent_id, C.camera_id, func.max(C.ts).label("ts"))
        .where(C.classroom_id.in_(ids), C.ts >= first, C.ts < last)
        .group_by(C.classroom_id, C.agent_id, C.camera_id)
        .subquery()
    )
    rows = db.execute(
        select(C.classroom_id, func.sum(C.faces_present))
        .join(
            latest,
            and_(
                C.classroom_id == latest.c.classroom_id,
                C.agent_id == latest.c.agent_id,
                C.camera_id == latest.c.camera_id,
                C.ts == latest.c.ts,
            ),
        )
        .group_by(C.classroom_id)
    )
    return dict(rows.all())


def _peak_faces(db: Session, ids: Sequence[str], start: datetime, end: datetime) -> dict[str, int]:
    """Per classroom, the sum over its cameras of each camera's largest head count in the window
    (its whole seconds, as the labels')."""
    C = CameraSample
    first, last = whole_seconds(start, end)
    peaks = (
        select(C.classroom_id, func.max(C.faces_present).label("peak"))
        .where(C.classroom_id.in_(ids), C.ts >= first, C.ts < last)
        .group_by(C.classroom_id, C.agent_id, C.camera_id)
        .subquery()
    )
    return dict(db.execute(select(peaks.c.classroom_id, func.sum(peaks.c.peak)).group_by(peaks.c.classroom_id)).all())


def classroom_states(
    db: Session,
    ids: Sequence[str],
    window_s: int,
    now: datetime,
    k: int,
    offline_after_s: float = 30.0,
    sessions: dict[str, ClassSession] | None = None,
) -> dict[str, pb.ClassroomState]:
    """Each classroom over ``(now - window_s, now]`` (by observation window end, naive UTC), or
    from the end of its last closed session if that is later: a lesson begun a minute ago is
    judged on its own minute, not on the end of the one before it. (The end, not the start of the
    open session: a session opened by the first observations of a day starts when they arrive,
    just after they were made.)

    One query per quantity for all the classrooms that share a window start, which is what keeps
    a tick over many classrooms short. ``sessions`` is :func:`open_sessions` of ``ids`` when
    the caller has just read it (the ticker does, to see which cached states are stale).
    """
    ids = list(ids)
    if sessions is None:
        sessions = open_sessions(db, ids)
    earliest = now - timedelta(seconds=window_s)
    ended = dict(db.execute(
        select(ClassSession.classroom_id, func.max(ClassSession.ended_at))
        .where(ClassSession.classroom_id.in_(ids), ClassSession.ended_at.is_not(None))
        .group_by(ClassSession.classroom_id)
    ).all())
    starts = {cid: max(earliest, ended[cid]) if cid in ended else earliest for cid in ids}
    windows: dict[str, Instants] = {}
    faces: dict[str, int] = {}
    peaks: dict[str, int] = {}
    for start in set(starts.values()):
        group = [cid for cid in ids if starts[cid] == start]
        windows |= _window_instants(db, group, start, now)
        faces |= _faces_present(db, group, start, now)
        peaks |= _peak_faces(db, group, start, now)
    courses = dict(db.execute(select(Classroom.id, Classroom.course_id).where(Classroom.id.in_(ids))).all())
    online = agents_online_by_classroom(db, ids, now, offline_after_s)
    result = {}
    for classroom_id in ids:
        peak, session = peaks.get(classroom_id, 0), sessions.get(classroom_id)
        tally = windows[classroom_id].kept(k, peak)
        count = learners(tally.distinct_tracks, peak)
        state = pb.ClassroomState(
            classroom_id=classroom_id,
            session_id=session.id if session else "",
            course_id=(session.course_id if session else "") or courses.get(classroom_id) or "",
            window_seconds=window_s,
            faces_present=faces.get(classroom_id, 0),
            learners=count,
            agents_online=online.get(classroom_id, 0),
            observations=tally.observations,
            suppressed=not tally.observations,  # no instant with k learners (so also fewer than k in all)
        )
        state.window_start.FromDatetime(starts[classroom_id])
        state.window_end.FromDatetime(now)
        distribution = ZEROS if state.suppressed else tally.distribution()
        state.distribution.extend(distribution)
        state.states.extend(states.to_messages(states.from_distribution(distribution)))
        result[classroom_id] = state
    return result


def classroom_state(
    db: Session,
    classroom_id: str,
    window_s: int,
    now: datetime,
    k: int,
    offline_after_s: float = 30.0,
) -> pb.ClassroomState:
    """One classroom's state (see :func:`classroom_states`)."""
    return classroom_states(db, [classroom_id], window_s, now, k, offline_after_s)[classroom_id]


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
    recent = select(ObservationRollup.classroom_id).where(ObservationRollup.window_end > since).distinct()
    opened = select(ClassSession.classroom_id).where(ClassSession.ended_at.is_(None))
    return sorted(db.scalars(union(recent, opened)))


def _bucket(when: datetime, start: datetime, bucket_s: int) -> int:
    return int((when - start).total_seconds() // bucket_s)


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
    start = start.replace(microsecond=0)  # bucket edges on whole seconds: each instant in one bucket, whole
    end = end.replace(microsecond=0)
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
    """Buckets summed from the rollups of the raw observations still kept, k judged per instant
    as in a state (:class:`Instants`)."""
    R = ObservationRollup
    buckets: dict[int, Instants] = defaultdict(Instants)
    rows = db.execute(
        select(R.window_end, instant_of(R.window_end), R.agent_id, R.tracks, R.observations, R.confidence,
               *_WEIGHTED)
        .where(R.classroom_id == classroom_id, R.window_end >= start, R.window_end < end)
    )
    for window_end, instant, agent_id, tracks, observations, confidence, *weighted in rows:
        buckets[_bucket(window_end, start, bucket_s)].add(instant, agent_id, tracks, observations, confidence,
                                                           weighted)
    faces = _raw_faces(db, classroom_id, start, end, bucket_s)
    result = {}
    for index, instants in buckets.items():
        tally = instants.kept(k, faces.get(index, 0))
        result[index] = {"observations": tally.observations, "suppressed": not tally.observations,
                         "learners": learners(tally.distinct_tracks, faces.get(index, 0)),
                         "distribution": tally.distribution(), "faces": faces.get(index, 0)}
    return result


def _raw_faces(db: Session, classroom_id: str, start: datetime, end: datetime, bucket_s: int) -> dict:
    """Per bucket, the sum over cameras of each camera's largest head count in that bucket."""
    largest: dict[tuple[int, str, str], int] = defaultdict(int)
    rows = db.execute(
        select(CameraSample.ts, CameraSample.agent_id, CameraSample.camera_id, CameraSample.faces_present).where(
            CameraSample.classroom_id == classroom_id, CameraSample.ts >= start, CameraSample.ts < end
        )
    )
    for ts, agent_id, camera_id, faces in rows:
        key = (_bucket(ts, start, bucket_s), agent_id, camera_id)
        largest[key] = max(largest[key], faces)
    per_bucket: dict[int, int] = defaultdict(int)
    for (index, _agent, _camera), faces in largest.items():
        per_bucket[index] += faces
    return dict(per_bucket)


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
        index = _bucket(snap.window_end - timedelta(microseconds=1), start, bucket_s)
        if index not in skip:
            grouped[index].append(snap)
    buckets = {}
    for index, snaps in grouped.items():
        # suppressed snapshots were stored as zeros: they carry no distribution to combine
        usable = [s for s in snaps if s.learners >= k and s.observations]
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
