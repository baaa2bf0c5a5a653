"""The store and aggregates against a real, temporary PostgreSQL (skipped where none is installed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from outlets import parts, served
from sqlalchemy import create_engine, func, insert, select

from affectedge.loopback import free_port
from affectedge.v1 import affectedge_pb2 as pb
from affectedge.v1 import affectedge_pb2_grpc as pb_grpc
from coordinator import aggregate, db, retention
from coordinator.bench import CONFUSED, make_batch, spawned_postgres
from coordinator.policy import PolicyEngine, Rule
from coordinator.store import Received, Store, Written, batch_key, utcnow


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
    assert store.write(batches, []) == Written(6, 0)
    again = Received(make_batch("ag9", "room-pg", 1, seq=1), now)
    assert Store(sessions).write([again, again], []) == Written(1, 1)  # 2nd instance
    assert store.write([again], []) == Written(0, 1)
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
    assert deleted["observation_rollups"] >= 1 and deleted["stored_batches"] == 3
    assert len(chunks) == 4  # one chunk deleted from each table holding rows past retention: health sees work


def test_a_batch_racing_into_two_instances_is_stored_once_on_postgres(postgres_url):
    """Another instance has inserted the batch's identity in a transaction not yet committed: this
    write waits for it, then stores the batch (the other rolled back) or counts it as a duplicate
    (the other committed); neither way is it an error that would drop the batch as malformed."""
    sessions = db.connect(postgres_url)
    for seq, other_commits, expected in ((1, False, Written(2, 0)), (2, True, Written(0, 1))):
        batch = make_batch("ag1", "room-pg", 2, seq=seq)
        agent_id, _, sent_at = batch_key(batch)
        with sessions() as other, ThreadPoolExecutor(1) as pool:
            other.execute(insert(db.StoredBatch).values(agent_id=agent_id, seq=seq, sent_at=sent_at,
                                                        received_at=utcnow()))
            written = pool.submit(Store(sessions).write, [Received(batch, utcnow())], [])
            with pytest.raises(TimeoutError):
                written.result(timeout=1.0)  # waiting for the other transaction
            if other_commits:
                other.commit()
            else:
                other.rollback()
            assert written.result(timeout=10) == expected
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(db.Observation)) == 2


def stop_postgres(url: str) -> None:
    """Shut the server down (fast), as an admin's ``systemctl stop postgresql`` does."""
    engine = create_engine(url)
    with engine.connect() as conn:
        data = Path(conn.exec_driver_sql("SHOW data_directory").scalar())
    engine.dispose()
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGINT)
    deadline = time.monotonic() + 30
    while (data / "postmaster.pid").exists():
        assert time.monotonic() < deadline, "PostgreSQL did not stop"
        time.sleep(0.1)


def test_unary_grpc_calls_answer_unavailable_while_postgres_is_down(postgres_url, tmp_path):
    """They answered UNKNOWN with psycopg's words: 'connection to server at "127.0.0.1", port … failed'."""
    p = parts(tmp_path, database={"url": postgres_url}, grpc={"host": "127.0.0.1", "port": free_port()})
    with served(p) as (_, channel):
        stub = pb_grpc.CoordinatorStub(channel)
        assert stub.ListClassrooms(pb.ListClassroomsRequest(), timeout=5).classrooms == []
        stop_postgres(postgres_url)
        for call, request in ((stub.ListClassrooms, pb.ListClassroomsRequest()),
                              (stub.GetClassroomState, pb.GetClassroomStateRequest(classroom_id="room-pg"))):
            with pytest.raises(grpc.RpcError) as failed:
                call(request, timeout=10)
            assert (failed.value.code(), failed.value.details()) == (grpc.StatusCode.UNAVAILABLE,
                                                                     "database unavailable; retry")


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
