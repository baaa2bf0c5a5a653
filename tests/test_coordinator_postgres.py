"""The store and aggregates against a real, temporary PostgreSQL (skipped where none is installed)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from coordinator import aggregate, db, retention
from coordinator.bench import CONFUSED, make_batch
from coordinator.policy import PolicyEngine, Rule
from coordinator.store import Received, Store, utcnow
from tests.conftest import free_port, wait_for_port


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the `postgres` user when we are root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres_url() -> Iterator[str]:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins or (os.geteuid() == 0 and shutil.which("runuser") is None):
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    bindir = os.path.dirname(bins[-1])
    # not under pytest's tmp_path: as root that is mode 700 and the postgres user cannot enter it
    root = Path(tempfile.mkdtemp(prefix="affectedge-pg-"))
    data = root / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
    port = free_port()
    subprocess.run(_as_postgres([f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"]),
                   check=True, capture_output=True)
    subprocess.run(
        _as_postgres([f"{bindir}/pg_ctl", "-D", str(data), "-l", str(data / "log"), "-w", "start",
                      "-o", f"-p {port} -k {data} -h 127.0.0.1"]),
        check=True, capture_output=True,
    )
    try:
        wait_for_port(port)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres([f"{bindir}/pg_ctl", "-D", str(data), "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_store_aggregates_lease_and_retention_on_postgres(postgres_url):
    sessions = db.connect(postgres_url)
    store = Store(sessions)
    now = utcnow()
    batches = [Received(make_batch(f"ag{i}", "room-pg", 3, CONFUSED, seq=1), now) for i in range(2)]
    assert store.write(batches, []) == 6
    assert Store(sessions).write([Received(make_batch("ag9", "room-pg", 1, seq=1), now)], []) == 1  # 2nd instance
    with sessions() as s:
        state = aggregate.classroom_state(s, "room-pg", 60, utcnow() + timedelta(seconds=1), k=3)
        points = aggregate.timeline(s, "room-pg", now - timedelta(seconds=30), now + timedelta(seconds=30), 10, k=3)
    assert state.learners == 7 and state.observations == 7 and state.session_id and not state.suppressed
    assert sum(p["observations"] for p in points) == 7 and points[0]["states"]["confused"] > 0.4

    # the policy lease: one holder at a time, taken over after expiry or resignation
    assert store.lead("a", now, 5) and not store.lead("b", now, 5) and store.lead("a", now, 5)
    assert store.lead("b", now + timedelta(seconds=6), 5)
    store.resign("b")
    assert store.lead("a", now + timedelta(seconds=7), 5)

    rule = Rule(name="pg", signal="REVIEW", states=("confused",), above=0.3, window_s=60, cooldown_s=60)
    engine = PolicyEngine((rule,), store.last_signal_at)
    fired = engine.evaluate("room-pg", now, {60: state}, {})
    assert len(fired) == 1
    store.add_signal(fired[0])
    assert store.last_signal_at("room-pg", "pg", now - timedelta(seconds=60)) is not None
    assert [s.id for s in store.signals_since(now - timedelta(seconds=1))] == [fired[0].id]

    deleted = retention.purge(sessions, now + timedelta(days=31), raw_days=30, aggregate_days=365)
    assert deleted["observations"] == 7 and deleted["camera_samples"] == 3
    assert deleted["observation_rollups"] >= 1
