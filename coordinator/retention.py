"""Deleting raw data past its retention, keeping the (smaller, anonymised) aggregates longer.

Raw observations (with their rollups, which name tracks too) and camera samples are per-track
and per-camera, so they are the privacy-sensitive part and are kept ``database.retention_days``,
and so are the identities of the batches that brought them (:class:`StoredBatch`, by arrival:
a redelivery older than that is stored again, its rows already past retention);
stored :class:`Aggregate` snapshots are k-anonymised and kept ``database.aggregate_retention_days``.
An admin may override either in the ``settings`` table (``retention.days`` /
``retention.aggregate_days``, a number of days).
Deletes run in chunks so a large purge never holds the database's write lock for long.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import sessionmaker

from coordinator.db import Aggregate, CameraSample, Observation, ObservationRollup, StoredBatch

log = logging.getLogger(__name__)

RAW_KEY = "retention.days"
AGGREGATE_KEY = "retention.aggregate_days"
CHUNK = 5000


def _purge(sessions: sessionmaker, table, column, before: datetime, progress: Callable[[], None]) -> int:
    total = 0
    while True:
        with sessions.begin() as db:
            ids = db.scalars(select(table.id).where(column < before).limit(CHUNK)).all()
            if not ids:
                return total
            db.execute(delete(table).where(table.id.in_(ids)))
        total += len(ids)
        progress()


def purge(sessions: sessionmaker, now: datetime, raw_days: float, aggregate_days: float,
          progress: Callable[[], None] = lambda: None) -> dict[str, int]:
    """Delete what is past retention; rows deleted per table. ``progress`` is called after each chunk
    (the coordinator's health counts it: a long purge is work, not a stuck ticker)."""
    raw_before = now - timedelta(days=raw_days)
    deleted = {
        "observations": _purge(sessions, Observation, Observation.window_end, raw_before, progress),
        "observation_rollups": _purge(sessions, ObservationRollup, ObservationRollup.window_end, raw_before,
                                      progress),
        "camera_samples": _purge(sessions, CameraSample, CameraSample.ts, raw_before, progress),
        "stored_batches": _purge(sessions, StoredBatch, StoredBatch.received_at, raw_before, progress),
        "aggregates": _purge(sessions, Aggregate, Aggregate.window_end, now - timedelta(days=aggregate_days),
                             progress),
    }
    if any(deleted.values()):
        log.info("retention: deleted %s (raw before %s)", deleted, raw_before.isoformat(timespec="seconds"))
    return deleted
