"""The store and aggregates against a real, temporary PostgreSQL (skipped where none is installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from coordinator import aggregate, db, retention
from coordinator.bench import CONFUSED, make_batch, spawned_postgres
from coordinator.policy import PolicyEngine, Rule
from coordinator.store import Received, Store, utcnow


@pytest.fixture
def postgres_url() -> Iterator[str]:
    try:
        with spawned_postgres() as url:
            yield url
    except SystemExit as missing:  # not installed here
        pytest.skip(str(missing))


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

    chunks = []
    deleted = retention.purge(sessions, now + timedelta(days=31), raw_days=30, aggregate_days=365,
                              progress=lambda: chunks.append(1))
    assert deleted["observations"] == 7 and deleted["camera_samples"] == 3
    assert deleted["observation_rollups"] >= 1
    assert len(chunks) == 3  # one chunk deleted from each table holding rows past retention: health sees work


@pytest.mark.slow
def test_bench_two_instances_on_postgres_store_everything_and_signal_each_probe_once(tmp_path):
    """`coordinator bench` at small scale: two coordinator processes, one Mosquitto, one PostgreSQL."""
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed")
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "coordinator", "bench", "--database", "postgres", "--instances", "2",
         "--agents", "8", "--tracks", "10", "--rate", "4", "--seconds", "3", "--probes", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    if "PostgreSQL is not installed" in done.stderr:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["database"] == "postgresql" and result["instances"] == 2
    assert result["drained_observations"] == result["backlog_observations"] == 12 * 8 * 10
    assert result["live_stored_observations"] >= 12 * 8 * 10
    assert result["probes_sent"] >= 5 and result["signals_received"] == result["probes_sent"]
    assert result["lost_signals"] == 0 and result["duplicate_signals"] == 0
    assert result["latency_p95_ms"] > 0
