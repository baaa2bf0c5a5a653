"""MQTT ingest through a real Mosquitto into a real SQLite database."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text

from affectedge import codec, topics
from affectedge.v1 import affectedge_pb2 as pb
from coordinator import db, retention
from coordinator import ingest as ingest_module
from coordinator.bench import make_batch, mqtt_client, publish, stamp
from coordinator.config import MqttConfig
from coordinator.ingest import ClockWatch, Ingest
from coordinator.store import Received, Store, Written, utcnow


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def observations(sessions) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(db.Observation))


@pytest.fixture
def sessions(tmp_path):
    return db.connect(f"sqlite:///{tmp_path / 'ingest.db'}")


def rolled_up(sessions) -> int:
    """Observations as the aggregates count them."""
    with sessions() as s:
        return s.scalar(select(func.coalesce(func.sum(db.ObservationRollup.observations), 0)))


def same_database(sessions):
    """A second engine on ``sessions``' database, as another coordinator process would have."""
    return db.connect(sessions.kw["bind"].url.render_as_string(hide_password=False))


def start_ingest(broker, sessions, client_id: str = "coord-test") -> Ingest:
    ingest = Ingest(MqttConfig(url=broker.url, client_id=client_id), Store(sessions))
    ingest.start()
    assert ingest.connected.wait(10)
    time.sleep(0.2)  # SUBACK
    return ingest


def test_batches_statuses_and_bad_payloads_end_to_end(mosquitto, sessions):
    publisher = mqtt_client(mosquitto.url, "test-agent-pub")
    # a retained ONLINE status published before the coordinator starts still reaches it
    status = pb.AgentStatus(agent_id="ag1", classroom_id="room-1", state=pb.AgentStatus.ONLINE, version="1.0",
                            backend="onnxruntime")
    publisher.publish(topics.status("room-1", "ag1"), codec.encode(status), qos=1, retain=True).wait_for_publish(5)
    ingest = start_ingest(mosquitto, sessions)
    try:
        first = make_batch("ag1", "room-1", 5, seq=1)
        publish(publisher, first).wait_for_publish(5)
        # JSON (debug format) is accepted too
        as_json = codec.encode(make_batch("ag1", "room-1", 3, seq=2), "json")
        publisher.publish(topics.observations("room-1", "ag1"), as_json, qos=1).wait_for_publish(5)
        # a redelivered batch (same agent, seq and sent_at) is stored once
        publish(publisher, first).wait_for_publish(5)
        # garbage, a wrong-length distribution, and a payload claiming another agent than its topic
        publisher.publish(topics.observations("room-1", "ag1"), b"\xff\x00garbage", qos=1)
        bad = make_batch("ag1", "room-1", 1, seq=3)
        del bad.observations[0].probabilities[3:]
        publisher.publish(topics.observations("room-1", "ag1"), bad.SerializeToString(), qos=1)
        publish(publisher, make_batch("ag1", "room-1", 2, seq=4)).wait_for_publish(5)  # still alive afterwards
        spoof = make_batch("ag2", "room-1", 4, seq=1)
        publisher.publish(topics.observations("room-1", "ag1"), codec.encode(spoof), qos=1).wait_for_publish(5)
        wait_until(lambda: ingest.counters.unauthorised == 1 and ingest.counters.malformed == 2)
        wait_until(lambda: observations(sessions) == 10)
        counts = ingest.counters.snapshot()
        assert counts["duplicates"] == 1 and counts["observations"] == 10 and counts["statuses"] >= 1
        with sessions() as s:
            agent = s.get(db.Agent, "ag1")
            assert agent.state == "ONLINE" and agent.backend == "onnxruntime" and agent.last_seen is not None
            assert s.get(db.Agent, "ag2") is None
            assert s.scalar(select(func.count()).select_from(db.CameraSample)) == 3
            assert s.get(db.Classroom, "room-1").name == "room-1"
        # the Last Will / an explicit OFFLINE updates the agent
        status.state = pb.AgentStatus.OFFLINE
        publisher.publish(topics.status("room-1", "ag1"), codec.encode(status), qos=1, retain=True)

        def offline() -> bool:
            with sessions() as s:
                return s.get(db.Agent, "ag1").state == "OFFLINE"

        wait_until(offline)
    finally:
        ingest.stop()
        publisher.loop_stop()


def test_restart_loses_no_qos1_observation_published_while_down(mosquitto, sessions):
    publisher = mqtt_client(mosquitto.url, "test-agent-restart")
    first = start_ingest(mosquitto, sessions)
    for seq in range(1, 21):
        publish(publisher, make_batch("ag1", "room-1", 7, seq=seq))
    wait_until(lambda: observations(sessions) == 140)
    first.stop()
    # down: these wait in the broker for the persistent session
    last = None
    for seq in range(21, 221):
        last = publish(publisher, make_batch(f"ag{seq % 3}", "room-1", 7, seq=seq))
    last.wait_for_publish(10)
    second = start_ingest(mosquitto, sessions)
    try:
        wait_until(lambda: observations(sessions) >= 1540)
        time.sleep(0.5)  # nothing more (no duplicates) arrives
        assert observations(sessions) == 140 + 200 * 7
        assert second.counters.malformed == 0
    finally:
        second.stop()
        publisher.loop_stop()


def test_rows_the_database_refuses_are_dropped_alone_and_ingest_goes_on(mosquitto, sessions):
    """A batch that passes the wire checks but that the database refuses must not stall ingest.

    A real SQLite trigger plays the refusing database: every observation from agent 'refused'.
    Its batch shares transactions with good ones; only it is dropped, the rest are stored and all
    are acknowledged, and the classroom it would have created is created by the next message.
    """
    with sessions.kw["bind"].begin() as conn:
        conn.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON observations WHEN NEW.agent_id = 'refused' "
                          "BEGIN SELECT RAISE(ABORT, 'refused by policy'); END"))
    publisher = mqtt_client(mosquitto.url, "test-agent-refused")
    ingest = start_ingest(mosquitto, sessions)
    try:
        publish(publisher, make_batch("refused", "room-9", 3, seq=1))
        for seq in range(1, 6):
            publish(publisher, make_batch("ag1", "room-1", 2, seq=seq))
        wait_until(lambda: ingest.counters.malformed == 1 and observations(sessions) == 10)
        status = pb.AgentStatus(agent_id="ag9", classroom_id="room-9", state=pb.AgentStatus.ONLINE)
        publisher.publish(topics.status("room-9", "ag9"), codec.encode(status), qos=1).wait_for_publish(5)

        def room9() -> bool:
            with sessions() as s:
                return s.get(db.Classroom, "room-9") is not None

        wait_until(room9)
        assert ingest.counters.messages == 7 and ingest.counters.db_errors == 0
    finally:
        ingest.stop()
        publisher.loop_stop()


def test_a_batch_delivered_again_after_a_restart_is_stored_once(mosquitto, sessions):
    """A coordinator commits a batch and goes before its ack reaches the broker (a crash): the broker
    delivers it again to the next coordinator process, and the agent, whose PUBACK was lost as well,
    sends it again too. The batch is in the database once, with its rollup, and both copies count."""
    publisher = mqtt_client(mosquitto.url, "test-agent-lost-ack")
    batch = make_batch("ag1", "room-1", 5, seq=1)
    first = start_ingest(mosquitto, sessions)
    first.client.ack = lambda mid, qos: None  # committed but never acknowledged
    try:
        publish(publisher, batch).wait_for_publish(5)
        wait_until(lambda: observations(sessions) == 5)
    finally:
        first.stop()
    second = start_ingest(mosquitto, same_database(sessions))
    try:
        wait_until(lambda: second.counters.messages == 1)  # the broker's redelivery
        publish(publisher, batch).wait_for_publish(5)  # the agent's
        wait_until(lambda: second.counters.messages == 2)
        assert observations(sessions) == rolled_up(sessions) == 5
        assert second.counters.duplicates == 2 and second.counters.malformed == 0
    finally:
        second.stop()
        publisher.loop_stop()


def test_coordinators_sharing_the_stream_store_a_batch_sent_again_once(mosquitto, sessions):
    """The shared subscription hands the copies of a resent batch to different instances."""
    publisher = mqtt_client(mosquitto.url, "test-agent-resend")
    ingests = [start_ingest(mosquitto, same_database(sessions), f"coord-{i}") for i in range(2)]
    try:
        batch = make_batch("ag1", "room-1", 4, seq=7)
        for _ in range(6):
            publish(publisher, batch).wait_for_publish(5)
        wait_until(lambda: sum(i.counters.messages for i in ingests) == 6)
        assert all(i.counters.messages for i in ingests)  # each instance got copies
        assert sum(i.counters.duplicates for i in ingests) == 5
        assert observations(sessions) == rolled_up(sessions) == 4
    finally:
        for ingest in ingests:
            ingest.stop()
        publisher.loop_stop()


def test_a_reinstalled_agent_reusing_a_seq_is_not_taken_for_a_redelivery(mosquitto, sessions):
    """A wiped spool numbers batches from 1 again; their own ``sent_at`` tells them from the old ones."""
    publisher = mqtt_client(mosquitto.url, "test-agent-reinstalled")
    ingest = start_ingest(mosquitto, sessions)
    try:
        old = make_batch("ag1", "room-1", 5, seq=1)
        publish(publisher, old).wait_for_publish(5)
        wait_until(lambda: observations(sessions) == 5)
        new = make_batch("ag1", "room-1", 3, seq=1)
        new.sent_at.FromSeconds(old.sent_at.seconds + 60)
        publish(publisher, new).wait_for_publish(5)
        wait_until(lambda: ingest.counters.messages == 2)
        assert observations(sessions) == 8 and ingest.counters.duplicates == 0
    finally:
        ingest.stop()
        publisher.loop_stop()


def test_store_keeps_each_batch_once_and_its_identity_as_long_as_raw_data(sessions):
    """Two coordinators' stores on one database, a copy within one write, and the batches that are
    never taken for copies: unnumbered, or numbered without the ``sent_at`` that tells a reinstall."""
    now = utcnow()
    batch = make_batch("ag1", "room-1", 3, seq=1)
    one, two = Store(sessions), Store(same_database(sessions))
    assert one.write([Received(batch, now), Received(batch, now)], []) == Written(3, 1)
    assert two.write([Received(batch, now)], []) == Written(0, 1)
    unnumbered = make_batch("ag1", "room-1", 1)
    unstamped = make_batch("ag1", "room-1", 1, seq=2)
    unstamped.ClearField("sent_at")
    assert two.write([Received(b, now) for b in (unnumbered, unnumbered, unstamped, unstamped)], []) == Written(4, 0)
    deleted = retention.purge(sessions, now + timedelta(days=31), raw_days=30, aggregate_days=365)
    assert deleted["stored_batches"] == 1 and deleted["observations"] == 7
    assert one.write([Received(batch, now)], []) == Written(3, 0)  # known no longer: its rows are gone too


def test_clock_watch_tells_a_wrong_clock_from_a_backlog():
    watch = ClockWatch(tolerance_s=5, period_s=60)
    # a backlog: large gaps while it drains, then fresh batches arrive on time -> no warning
    gaps = [300, 200, 100, 0.3] + [0.2] * 60
    assert [watch.gap("drained", g, t) for t, g in enumerate(gaps)] == [None] * len(gaps)
    # a clock 20 s behind: every batch 20 s late -> one warning per minute, with the gap
    warned = [w for t in range(130) if (w := watch.gap("behind", 20 + (t % 3) * 0.1, t)) is not None]
    assert warned == [20.0, 20.0]
    # ahead: batches "sent" in the future
    ahead = [watch.gap("ahead", -12, t) for t in range(61)]
    assert [w for w in ahead if w is not None] == [-12]


def test_an_agent_with_a_wrong_clock_is_logged(mosquitto, sessions, caplog):
    publisher = mqtt_client(mosquitto.url, "test-agent-clock")
    ingest = start_ingest(mosquitto, sessions)
    ingest._clocks = ClockWatch(period_s=0)  # judge each batch at once
    try:
        late = make_batch("ag1", "room-1", 1, seq=1)
        late.sent_at.FromSeconds(late.sent_at.seconds - 40)
        publish(publisher, late).wait_for_publish(5)
        wait_until(lambda: observations(sessions) == 1)
    finally:
        ingest.stop()
        publisher.loop_stop()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("agent ag1: every batch")]
    assert len(said) == 1 and re.search(r"arrived 4[0-2] s after its own clock", said[0]), said


DAY_S = 86400


def test_a_batch_from_an_agent_whose_clock_is_a_day_ahead_is_refused_and_counted(mosquitto, sessions, caplog):
    """Stored, it kept roomB's session open (and the classroom active) for the whole day ahead, and
    every other agent's batches in roomB went into that session."""
    publisher = mqtt_client(mosquitto.url, "test-agent-ahead")
    ingest = start_ingest(mosquitto, sessions)
    try:
        ahead = make_batch("ag-ahead", "roomB", 3, seq=1)
        stamp(ahead, time.time() + DAY_S)
        publish(publisher, ahead)
        publish(publisher, make_batch("ag1", "room-1", 2, seq=1)).wait_for_publish(5)
        wait_until(lambda: ingest.counters.messages == 2)
    finally:
        ingest.stop()
        publisher.loop_stop()
    assert ingest.counters.clock_ahead == 1 and ingest.counters.malformed == 0 and observations(sessions) == 2
    with sessions() as s:
        assert s.get(db.Classroom, "roomB") is None
    closed = Store(sessions).close_idle_sessions(utcnow() + timedelta(hours=1), 900)
    assert len(closed) == 1  # room-1's: nothing else was opened
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("agent ag-ahead: dropped")]
    assert len(said) == 1 and re.search(r"timed (1 day, 0:00:00|23:59:59) ahead of this coordinator's clock", said[0])
    assert "timedatectl set-ntp true" in said[0]


def test_labels_timed_in_the_future_keep_no_session_open(sessions):
    """Rows a day ahead already in the database (stored before ingest refused them) do not count as
    activity until their time comes."""
    now = utcnow()
    ahead = make_batch("ag-ahead", "roomB", 3, seq=1)
    stamp(ahead, time.time() + DAY_S)
    store = Store(sessions)
    assert store.write([Received(ahead, now)], []) == Written(3, 0)
    with sessions() as s:
        [opened] = s.scalars(select(db.ClassSession)).all()
    assert store.close_idle_sessions(now + timedelta(hours=1), 900) == [opened.id]
    with sessions() as s:
        assert s.get(db.ClassSession, opened.id).ended_at == opened.started_at


def test_the_agents_model_is_the_one_its_status_names_while_older_batches_drain(sessions):
    """After a model upgrade the agent's spool still holds batches labelled by the release before; the
    Agents page must show the model the agent now runs (its status), not the latest drained batch's."""
    store, now = Store(sessions), utcnow()
    old = make_batch("ag-up", "room-up", 2, seq=1)
    old.model_version = "release-8"
    store.write([Received(old, now)], [])
    status = pb.AgentStatus(agent_id="ag-up", classroom_id="room-up", state=pb.AgentStatus.ONLINE,
                            model_version="release-9")
    store.write([], [(status, now)])
    drained = make_batch("ag-up", "room-up", 2, seq=2)
    drained.model_version = "release-8"
    store.write([Received(drained, now + timedelta(seconds=1))], [])
    with sessions() as s:
        agent = s.get(db.Agent, "ag-up")
        assert (agent.model_version, agent.last_seen) == ("release-9", now + timedelta(seconds=1))


def test_a_held_database_keeps_the_backlog_within_its_bound_and_every_batch_is_stored_after(
        mosquitto, sessions, monkeypatch):
    """While the database will not take a write, arriving batches waited in memory without limit (300
    large batches took a coordinator from 115 MiB to 2.1 GiB). Now a full backlog makes paho's network
    thread wait, the broker keeps the rest, and nothing is acknowledged before it is stored."""
    batches = [make_batch("ag1", "room-1", 200, seq=seq) for seq in range(1, 41)]
    size = len(codec.encode(batches[0]))  # about 15 kB
    bound = 5 * size
    monkeypatch.setattr(ingest_module, "BACKLOG_BYTES", bound, raising=False)
    publisher = mqtt_client(mosquitto.url, "test-agent-held-db")
    ingest = start_ingest(mosquitto, sessions)
    lock = sqlite3.connect(sessions.kw["bind"].url.database, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # another process writing: the writer retries its first transaction
        for batch in batches:
            publish(publisher, batch).wait_for_publish(5)
        wait_until(lambda: ingest.stalled is not None and ingest.backlog > 0, timeout=30)
        largest = 0
        for _ in range(20):  # the writer keeps retrying meanwhile
            largest = max(largest, ingest.backlog * size)
            time.sleep(0.05)
        assert 0 < largest <= bound
        lock.execute("ROLLBACK")
        wait_until(lambda: observations(sessions) == 40 * 200, timeout=30)
        assert ingest.counters.messages == 40 and ingest.counters.duplicates == 0
    finally:
        lock.close()
        ingest.stop()
        publisher.loop_stop()
