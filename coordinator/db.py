"""The coordinator's storage schema (SQLAlchemy 2.0): SQLite by default, PostgreSQL by URL.

Times are naive UTC ``datetime``s everywhere. Probabilities are stored as seven float columns
(``p_angry`` … ``p_neutral`` in :data:`affectedge.labels.EMOTIONS` order) so aggregates are
plain SQL sums on any backend.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    event,
    insert,
    inspect,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.hybrid import hybrid_method
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.schema import CreateIndex
from sqlalchemy.sql import ColumnElement

from affectedge.errors import first_line
from affectedge.labels import EMOTIONS

log = logging.getLogger(__name__)

PROB_COLUMNS = tuple(f"p_{name}" for name in EMOTIONS)
#: confidence-weighted probability sums of a rollup, in the same order
SUM_COLUMNS = tuple(f"w_{name}" for name in EMOTIONS)


class Base(DeclarativeBase):
    pass


class Classroom(Base):
    __tablename__ = "classrooms"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    course_id: Mapped[str] = mapped_column(String(64), default="")
    instructor: Mapped[str | None] = mapped_column(String(64), nullable=True)  # users.username


class Agent(Base):
    __tablename__ = "agents"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    classroom_id: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), default="UNKNOWN")  # ONLINE / OFFLINE / DEGRADED
    last_seen: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    version: Mapped[str] = mapped_column(String(64), default="")
    backend: Mapped[str] = mapped_column(String(32), default="")
    model_version: Mapped[str] = mapped_column(String(64), default="")
    cameras: Mapped[list] = mapped_column(JSON, default=list)
    spool_depth: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[str] = mapped_column(Text, default="")
    provisioned_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    @hybrid_method
    def online(self, cutoff: datetime) -> bool:
        """Heard from since ``cutoff`` and not reported OFFLINE (by itself or by its Last Will).

        The one rule for "online", in Python for a loaded agent and in SQL for counting.
        """
        return self.state != "OFFLINE" and self.last_seen is not None and self.last_seen >= cutoff

    @online.inplace.expression
    @classmethod
    def _online_expression(cls, cutoff: datetime) -> ColumnElement[bool]:
        return and_(cls.state != "OFFLINE", cls.last_seen >= cutoff)


class ClassSession(Base):
    """A class meeting: observations attach to the open session of their classroom."""

    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    classroom_id: Mapped[str] = mapped_column(String(64), index=True)
    course_id: Mapped[str] = mapped_column(String(64), default="")
    instructor: Mapped[str | None] = mapped_column(String(64), nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Observation(Base):
    """One per-track label over one window, as published by an edge agent (raw; retention applies)."""

    __tablename__ = "observations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    classroom_id: Mapped[str] = mapped_column(String(64))
    session_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    agent_id: Mapped[str] = mapped_column(String(64))
    camera_id: Mapped[str] = mapped_column(String(64))
    track_id: Mapped[int] = mapped_column(Integer)
    window_start: Mapped[datetime] = mapped_column(DateTime)
    window_end: Mapped[datetime] = mapped_column(DateTime)
    label: Mapped[int] = mapped_column(Integer)  # index into EMOTIONS
    confidence: Mapped[float] = mapped_column(Float)
    quality: Mapped[float] = mapped_column(Float, default=0.0)
    p_angry: Mapped[float] = mapped_column(Float)
    p_disgust: Mapped[float] = mapped_column(Float)
    p_fear: Mapped[float] = mapped_column(Float)
    p_happy: Mapped[float] = mapped_column(Float)
    p_sad: Mapped[float] = mapped_column(Float)
    p_surprise: Mapped[float] = mapped_column(Float)
    p_neutral: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_obs_classroom_end", "classroom_id", "window_end"),)


class ObservationRollup(Base):
    """The sums the aggregates need over the observations of one agent that end at one instant.

    An agent publishes all its tracks' windows together, so a rollup stands for one batch: a
    window is summed over a few rows per agent instead of one row per track and period, which is
    what keeps the policy tick short at tens of thousands of observations per second. Rollups are
    written in the same transaction as their raw rows (:func:`insert_observations`)
    and purged with them, so the two never disagree.
    """

    __tablename__ = "observation_rollups"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    classroom_id: Mapped[str] = mapped_column(String(64))
    agent_id: Mapped[str] = mapped_column(String(64))
    window_end: Mapped[datetime] = mapped_column(DateTime)
    observations: Mapped[int] = mapped_column(Integer)
    confidence: Mapped[float] = mapped_column(Float)  # sum of the observations' confidences
    w_angry: Mapped[float] = mapped_column(Float)
    w_disgust: Mapped[float] = mapped_column(Float)
    w_fear: Mapped[float] = mapped_column(Float)
    w_happy: Mapped[float] = mapped_column(Float)
    w_sad: Mapped[float] = mapped_column(Float)
    w_surprise: Mapped[float] = mapped_column(Float)
    w_neutral: Mapped[float] = mapped_column(Float)
    tracks: Mapped[str] = mapped_column(Text)  # "camera:track,..." for counting distinct learners

    __table_args__ = (
        Index("ix_rollup_classroom_end", "classroom_id", "window_end"),
        # which classrooms had observations lately, asked every tick (aggregate.active_classrooms)
        Index("ix_rollup_end", "window_end"),
    )


def rollup_rows(observations: Iterable[Mapping]) -> list[dict]:
    """:class:`ObservationRollup` rows for observation rows (dicts or row mappings)."""
    groups: dict[tuple, dict] = {}
    tracks: dict[tuple, set[str]] = {}
    for obs in observations:
        key = (obs["classroom_id"], obs["agent_id"], obs["window_end"])
        group = groups.get(key)
        if group is None:
            group = groups[key] = dict(zip(("classroom_id", "agent_id", "window_end"), key, strict=True))
            group.update(observations=0, confidence=0.0, **dict.fromkeys(SUM_COLUMNS, 0.0))
            tracks[key] = set()
        confidence = obs["confidence"]
        group["observations"] += 1
        group["confidence"] += confidence
        for total, prob in zip(SUM_COLUMNS, PROB_COLUMNS, strict=True):
            group[total] += confidence * obs[prob]
        tracks[key].add(f"{obs['camera_id']}:{obs['track_id']}")
    for key, group in groups.items():
        group["tracks"] = ",".join(sorted(tracks[key]))
    return list(groups.values())


class StoredBatch(Base):
    """The identity of each numbered batch stored, so a redelivered copy is recognised and skipped.

    Written in the transaction that stores the batch's rows (:meth:`coordinator.store.Store.write`),
    so it survives restarts and is shared by every coordinator on the database. ``seq`` alone
    is not an identity: it starts at 1 again when an agent's spool is wiped (a reinstall), and the
    edge's ``sent_at``, set once when the batch is made, tells those new batches from redeliveries.
    Purged with the raw observations, by ``received_at``.
    """

    __tablename__ = "stored_batches"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    agent_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    sent_at: Mapped[datetime] = mapped_column(DateTime)
    received_at: Mapped[datetime] = mapped_column(DateTime, index=True)

    __table_args__ = (UniqueConstraint("agent_id", "seq", "sent_at", name="uq_stored_batch"),)


class CameraSample(Base):
    """Faces present per camera per publishing period (from CameraSummary)."""

    __tablename__ = "camera_samples"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    classroom_id: Mapped[str] = mapped_column(String(64))
    agent_id: Mapped[str] = mapped_column(String(64))
    camera_id: Mapped[str] = mapped_column(String(64))
    ts: Mapped[datetime] = mapped_column(DateTime)
    faces_present: Mapped[int] = mapped_column(Integer)

    __table_args__ = (Index("ix_cam_classroom_ts", "classroom_id", "ts"),)


class Aggregate(Base):
    """A stored ClassroomState snapshot (kept longer than raw observations)."""

    __tablename__ = "aggregates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    classroom_id: Mapped[str] = mapped_column(String(64))
    session_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    window_end: Mapped[datetime] = mapped_column(DateTime)
    window_seconds: Mapped[int] = mapped_column(Integer)
    faces_present: Mapped[int] = mapped_column(Integer)
    learners: Mapped[int] = mapped_column(Integer)
    agents_online: Mapped[int] = mapped_column(Integer)
    distribution: Mapped[list] = mapped_column(JSON)  # 7 floats
    states: Mapped[dict] = mapped_column(JSON)  # {"engaged": 0.4, ...}
    observations: Mapped[int] = mapped_column(Integer)

    __table_args__ = (Index("ix_agg_classroom_end", "classroom_id", "window_end"),)


class Signal(Base):
    __tablename__ = "signals"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    classroom_id: Mapped[str] = mapped_column(String(64), index=True)
    session_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    course_id: Mapped[str] = mapped_column(String(64), default="")
    kind: Mapped[str] = mapped_column(String(32))  # SignalKind name, e.g. "SLOW_DOWN"
    strength: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(Text)
    evidence: Mapped[dict] = mapped_column(JSON)  # Evidence as protobuf JSON (MessageToDict)
    created_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    status: Mapped[str] = mapped_column(String(16), default="open")  # open / acknowledged / dismissed
    handled_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    handled_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))  # "admin" | "instructor"
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Delivery(Base):
    """One signal to one outlet (webhook URL or xAPI LRS); status 'dead' is the dead-letter table."""

    __tablename__ = "deliveries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    signal_id: Mapped[str] = mapped_column(String(64), ForeignKey("signals.id"), index=True)
    target: Mapped[str] = mapped_column(String(500))
    kind: Mapped[str] = mapped_column(String(16))  # "webhook" | "xapi"
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending / delivered / dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    # pending: when the next attempt is due; dead: when it died (the health report counts the last day's)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    # each sender's passes filter on these: without it, every pass scanned all delivered history
    __table_args__ = (Index("ix_delivery_queue", "kind", "status", "target"),)


class Setting(Base):
    """Admin-editable settings (policy thresholds, retention) that override the config file."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[dict] = mapped_column(JSON)


class EndedLogin(Base):
    """A dashboard login ended by logging out: its cookie, or a copy of it, is refused from then on.

    In the database so that every coordinator sharing it refuses the login, including the live
    streams it holds open. Rows older than a login's maximum age are purged (such logins have expired).
    """

    __tablename__ = "ended_logins"
    login_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    ended_at: Mapped[datetime] = mapped_column(DateTime, index=True)


def describe_error(exc: SQLAlchemyError, url: str) -> str:
    """One line for an admin: which database (password hidden), what it said, where to fix it."""
    where = make_url(url).render_as_string(hide_password=True)
    reason = first_line(getattr(exc, "orig", None) or exc)
    return f"cannot use the database {where}: {reason}; check [database] url and that the database runs"


def connect(url: str) -> sessionmaker:
    """Engine + session factory for ``url``; creates the schema if it is missing."""
    engine = create_engine(url, future=True, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    had_rollups = inspect(engine).has_table(ObservationRollup.__tablename__)
    Base.metadata.create_all(engine)
    _create_missing_indexes(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    if not had_rollups:
        _backfill_rollups(sessions)
    return sessions


def _create_missing_indexes(engine: Engine) -> None:
    """Every declared index a table lacks, made once: ``create_all`` creates only missing tables,
    so an index added to a table that existed before (an upgraded database) is made here.

    ``IF NOT EXISTS``, so coordinators starting together on one database do not trip on each other.
    """
    inspector = inspect(engine)
    for table in Base.metadata.sorted_tables:
        present = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in sorted(table.indexes, key=lambda ix: ix.name):
            if index.name not in present:
                log.info("creating index %s on %s (once; a large table takes a while)", index.name, table.name)
                with engine.begin() as conn:
                    conn.execute(CreateIndex(index, if_not_exists=True))


def _backfill_rollups(sessions: sessionmaker, chunk: int = 20_000) -> None:
    """A database from before rollups existed: derive them once from the raw rows it still holds.

    Chunks may split one agent's instant into two rollups; sums and track sets add up the same.
    """
    with sessions.begin() as db:
        result = db.execute(select(Observation.__table__).order_by(Observation.id).execution_options(
            yield_per=chunk)).mappings()
        for rows in result.partitions():
            _insert_rollups(db, rows)


def insert_observations(db: Session, rows: list[dict]) -> None:
    """Raw observation rows and their rollups, in the caller's transaction.

    The one way observations are written, so the two tables never disagree.
    """
    bulk_insert(db, Observation.__table__, rows)
    _insert_rollups(db, rows)


def _insert_rollups(db: Session, observations: Iterable[Mapping]) -> None:
    bulk_insert(db, ObservationRollup.__table__, rollup_rows(observations))


def bulk_insert(db: Session, table: Table, rows: list[dict]) -> None:
    """Insert many rows with the same keys in the caller's transaction.

    PostgreSQL gets ``COPY``: psycopg's executemany sends one INSERT per row, and COPY measured
    several times faster on ingest's batches. Elsewhere a Core executemany (~1.4x faster than ORM).
    """
    if not rows:
        return
    if db.get_bind().dialect.name != "postgresql":
        db.execute(insert(table), rows)
        return
    columns = list(rows[0])
    names = ", ".join(table.c[column].name for column in columns)  # KeyError on a column not in the table
    cursor = db.connection().connection.driver_connection.cursor()
    with cursor, cursor.copy(f"COPY {table.name} ({names}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([row[column] for column in columns])


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL lets the dashboard read while ingest writes; NORMAL sync is safe with WAL.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


__all__ = ["PROB_COLUMNS", "SUM_COLUMNS", "Engine", "connect", "insert_observations", "rollup_rows"]

