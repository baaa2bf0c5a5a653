"""The publisher against a real Mosquitto: store-and-forward across a broker restart, status, formats."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import free_port, start_mosquitto
from edge_support import Subscriber
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from test_edge_spool import fill_disk, free_disk

from affectedge import codec, topics
from affectedge.v1 import affectedge_pb2 as pb
from coordinator.embedded_broker import EmbeddedBroker
from edge_agent.config import AgentSection, MqttSection
from edge_agent.publisher import Publisher
from edge_agent.spool import Spool

AGENT = AgentSection(id="pc-1", classroom="lab-a")


def observation() -> pb.EmotionObservation:
    return pb.EmotionObservation(camera_id="cam0", track_id=1, label=pb.HAPPY, confidence=0.7,
                                 probabilities=[0.05, 0.05, 0.05, 0.7, 0.05, 0.05, 0.05], frames=8)


def status() -> pb.AgentStatus:
    return pb.AgentStatus(agent_id=AGENT.id, classroom_id=AGENT.classroom, state=pb.AgentStatus.ONLINE)


def wait(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


def seqs(subscriber: Subscriber) -> list[int]:
    return [codec.decode(m.payload, pb.ObservationBatch).seq for m in subscriber.received()]


def test_store_and_forward_across_broker_restart_keeps_order_and_drops_oldest_at_bound(mosquitto, tmp_path):
    spool = Spool(tmp_path / "spool.sqlite3", max_batches=10)
    publisher = Publisher(MqttSection(port=mosquitto.port, max_backoff_s=1), AGENT, spool, "m1")
    subscriber = Subscriber(mosquitto.port, topics.observations("lab-a", "pc-1"), session="edge-test")
    publisher.start(status)
    restarted = None
    try:
        assert publisher.connected.wait(10)
        for _ in range(3):
            publisher.publish_batch([observation()], [])
        subscriber.wait_for(lambda m: len(m) == 3)
        wait(lambda: spool.depth == 0)

        mosquitto.stop()  # persists the subscriber's session
        wait(lambda: not publisher.connected.is_set())
        for _ in range(12):  # 2 over the bound: seqs 4 and 5 must go
            publisher.publish_batch([observation()], [])
        assert spool.depth == 10
        assert spool.dropped == 2

        restarted = start_mosquitto(tmp_path / "mosquitto", port=mosquitto.port)
        subscriber.wait_for(lambda m: len(m) >= 13, timeout=30)
        wait(lambda: spool.depth == 0)
        assert seqs(subscriber) == [1, 2, 3, *range(6, 16)]
        first = subscriber.received()[0]
        assert first.content_type == "application/x-protobuf; proto=affectedge.v1.ObservationBatch"
    finally:
        publisher.stop(status())
        subscriber.close()
        if restarted is not None:
            restarted.stop()
    assert Spool(tmp_path / "spool.sqlite3", 10).dropped == 2  # the count survives a restart


def test_status_is_retained_online_then_offline_on_clean_stop(mosquitto, tmp_path):
    publisher = Publisher(MqttSection(port=mosquitto.port), AGENT, Spool(tmp_path / "s.sqlite3", 10), "m1")
    publisher.start(status)
    assert publisher.connected.wait(10)
    # the ONLINE status is published just after connecting: once one subscriber has seen it (live or
    # retained), the broker holds it, and a subscriber arriving later must get it as retained
    first = Subscriber(mosquitto.port, topics.status("lab-a", "pc-1"))
    first.wait_for(lambda m: len(m) >= 1)
    first.close()
    late = Subscriber(mosquitto.port, topics.status("lab-a", "pc-1"))
    retained = late.wait_for(lambda m: len(m) >= 1)[0]
    assert retained.retain
    assert codec.decode(retained.payload, pb.AgentStatus).state == pb.AgentStatus.ONLINE
    late.close()

    final = status()
    final.state, final.detail = pb.AgentStatus.OFFLINE, "stopped"
    publisher.stop(final)
    after = Subscriber(mosquitto.port, topics.status("lab-a", "pc-1"))
    message = after.wait_for(lambda m: len(m) >= 1)[0]
    after.close()
    assert message.retain
    assert codec.decode(message.payload, pb.AgentStatus).state == pb.AgentStatus.OFFLINE


def test_a_status_detail_longer_than_the_contract_allows_is_cut_not_refused(mosquitto, tmp_path):
    """The detail names every camera delivering no frames, so with long camera ids it can pass the contract's
    limit: the agent sends it cut, instead of failing on its own status."""
    publisher = Publisher(MqttSection(port=mosquitto.port), AGENT, Spool(tmp_path / "s.sqlite3", 10), "m1")
    publisher.start(status)
    assert publisher.connected.wait(10)
    subscriber = Subscriber(mosquitto.port, topics.status("lab-a", "pc-1"))
    try:
        degraded = status()
        degraded.state = pb.AgentStatus.DEGRADED
        degraded.detail = "camera not delivering frames: " + ", ".join(f"{'c' * 60}{i}" for i in range(16))
        publisher.publish_status(degraded).wait_for_publish(5)
        messages = subscriber.wait_for(lambda m: any(codec.decode(x.payload, pb.AgentStatus).state ==
                                                     pb.AgentStatus.DEGRADED for x in m))
        detail = codec.decode(messages[-1].payload, pb.AgentStatus).detail
        assert len(detail) == 256 and detail.startswith("camera not delivering frames: ccc") and detail[-1] == "…"
    finally:
        subscriber.close()
        publisher.stop(status())


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_json_on_request_over_either_protocol(mosquitto, tmp_path: Path, protocol):
    config = MqttSection(port=mosquitto.port, protocol=protocol, format="json")
    publisher = Publisher(config, AGENT, Spool(tmp_path / "s.sqlite3", 10), "m1")
    subscriber = Subscriber(mosquitto.port, topics.observations("lab-a", "pc-1"))
    publisher.start(status)
    try:
        assert publisher.connected.wait(10)
        publisher.publish_batch([observation()], [])
        message = subscriber.wait_for(lambda m: len(m) == 1)[0]
    finally:
        publisher.stop(status())
        subscriber.close()
    assert json.loads(message.payload)["agentId"] == "pc-1"
    assert codec.decode(message.payload, pb.ObservationBatch).observations[0].label == pb.HAPPY
    # MQTT 3.1.1 has no properties; MQTT 5 says what the payload is
    expected = None if protocol == "3.1.1" else "application/json; proto=affectedge.v1.ObservationBatch"
    assert message.content_type == expected


def test_batches_the_broker_acl_refuses_wait_in_the_spool_and_go_in_order_once_it_allows_them(tmp_path, caplog):
    observations = topics.observations("lab-a", "pc-1")
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {topics.status('lab-a', 'pc-1')}\ntopic read {observations}\n")
    broker = start_mosquitto(tmp_path / "mosquitto", f"acl_file {acl}\nuser root")  # root: reads tmp_path
    spool = Spool(tmp_path / "spool.sqlite3", max_batches=100)
    publisher = Publisher(MqttSection(port=broker.port, max_backoff_s=1), AGENT, spool, "m1")
    subscriber = Subscriber(broker.port, observations)
    publisher.start(status)
    try:
        assert publisher.connected.wait(10)
        with caplog.at_level("INFO", logger="edge_agent.publisher"):
            for _ in range(11):
                publisher.publish_batch([observation()], [])
            time.sleep(3.5)  # refused, then sent again after 1 s back-offs: still refused
            assert (spool.depth, spool.dropped, subscriber.received()) == (11, 0, [])

            acl.write_text(f"topic readwrite {topics.status('lab-a', 'pc-1')}\ntopic readwrite {observations}\n")
            broker.process.send_signal(signal.SIGHUP)  # the admin fixes the ACL: mosquitto reloads it
            publisher.publish_batch([observation()], [])
            subscriber.wait_for(lambda m: len(m) >= 12)
            wait(lambda: spool.depth == 0)
    finally:
        publisher.stop(status())
        subscriber.close()
        broker.stop()
    assert seqs(subscriber) == list(range(1, 13))
    assert spool.dropped == 0
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1, refused
    assert observations in refused[0] and "Not authorized" in refused[0] and "keeping the batches" in refused[0]
    assert "broker ACL" in refused[0] and "provision-agent" in refused[0]
    assert any(r.getMessage() == f"the broker accepts batches on {observations} again" for r in caplog.records)


@pytest.mark.parametrize("code, dropped", [(0x90, 1), (0x99, 1), (0x80, 0), (0x87, 0), (0x97, 0)])
def test_only_a_refusal_no_retry_can_change_drops_the_batch(tmp_path, code, dropped):
    # mosquitto answers a malformed PUBLISH by disconnecting, not with a PUBACK code, so each answer
    # is handed to the publisher as paho's thread hands it over
    spool = Spool(tmp_path / "s.sqlite3", max_batches=10)
    publisher = Publisher(MqttSection(), AGENT, spool, "m1")
    publisher.publish_batch([observation()], [])
    [row] = spool.take(1)
    publisher._inflight[1] = row
    publisher._settle(1, ReasonCode(PacketTypes.PUBACK, identifier=code))
    assert (spool.depth, spool.dropped) == (1 - dropped, dropped)


class DeletesMeetAFullDisk:
    """The spool's connection where a DELETE needs disk space there is none of (as a WAL append can)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        scratch = sqlite3.connect(":memory:")  # SQLite's own error for a full disk, to replay
        scratch.execute("PRAGMA max_page_count = 1")
        with pytest.raises(sqlite3.OperationalError) as full:
            scratch.execute("CREATE TABLE t (x)")
        self._full = full.value

    def execute(self, sql: str, *args) -> sqlite3.Cursor:
        if sql.startswith("DELETE"):
            raise self._full
        return self.db.execute(sql, *args)

    def __enter__(self) -> sqlite3.Connection:
        return self.db.__enter__()

    def __exit__(self, *exc) -> bool:
        return self.db.__exit__(*exc)


def test_a_full_disk_drops_new_batches_with_one_warning_and_keeps_sending_until_space_is_back(
        mosquitto, tmp_path, caplog):
    spool = Spool(tmp_path / "spool.sqlite3", max_batches=100)
    publisher = Publisher(MqttSection(port=mosquitto.port), AGENT, spool, "m1")
    subscriber = Subscriber(mosquitto.port, topics.observations("lab-a", "pc-1"))
    with caplog.at_level("INFO", logger="edge_agent.publisher"):
        publisher.publish_batch([observation()], [])  # spooled before the broker is connected
        fill_disk(spool)
        spool._db = DeletesMeetAFullDisk(spool._db)
        publisher.start(status)
        try:
            assert publisher.connected.wait(10)
            # delivered, but its row cannot be deleted: it stays, sent again after a restart (consumers skip it)
            wait(lambda: any("disk is full" in m for m in caplog.messages))
            for _ in range(3):
                publisher.publish_batch([observation()] * 200, [])  # over a page: it needs a new one
            assert (spool.depth, spool.dropped) == (1, 3)

            spool._db = spool._db.db
            free_disk(spool)
            publisher.publish_batch([observation()], [])
            subscriber.wait_for(lambda m: len(m) >= 2)
            wait(lambda: spool.depth == 1)
        finally:
            publisher.stop(status(), flush_timeout=0)
            subscriber.close()
    assert seqs(subscriber) == [1, 5]  # 2 to 4 dropped, and counted
    assert spool.dropped == 3
    full = [m for m in caplog.messages if "disk is full" in m]
    assert full == [f"the spool's disk is full ({spool.path}): dropping new batches (counted in spool_dropped) "
                    "until space is freed there"]
    assert "the spool's disk has space again: spooling batches again" in caplog.messages


def test_a_spool_error_pauses_sending_with_one_error_and_sending_resumes_once_it_works(mosquitto, tmp_path, caplog):
    """An SQLite I/O error in the sender thread (a failing disk, a -shm file that cannot grow) must not
    end the thread: before, it died and the agent spooled on without ever sending again."""
    spool = Spool(tmp_path / "spool.sqlite3", max_batches=100)
    publisher = Publisher(MqttSection(port=mosquitto.port), AGENT, spool, "m1")
    subscriber = Subscriber(mosquitto.port, topics.observations("lab-a", "pc-1"))
    take, failures = spool.take, []

    def failing_take(limit: int):
        if len(failures) < 3:
            failures.append(limit)
            raise sqlite3.OperationalError("disk I/O error")
        return take(limit)

    spool.take = failing_take
    with caplog.at_level("INFO", logger="edge_agent.publisher"):
        publisher.publish_batch([observation()], [])
        publisher.start(status)
        try:
            subscriber.wait_for(lambda m: len(m) >= 1)
            publisher.publish_batch([observation()], [])
            subscriber.wait_for(lambda m: len(m) >= 2)
        finally:
            publisher.stop(status(), flush_timeout=0)
            subscriber.close()
    assert len(failures) == 3 and seqs(subscriber) == [1, 2]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"the spool {spool.path} failed (disk I/O error): sending stops until it works again "
                      "(retried every second; batches answered meanwhile are sent again after a restart)"]
    assert f"the spool {spool.path} works again: sending batches" in caplog.messages


def test_an_unreachable_broker_is_named_with_the_reason_once_per_outage(tmp_path, caplog):
    port = free_port()  # nothing listens there
    config = MqttSection(host="127.0.0.1", port=port, max_backoff_s=1)
    publisher = Publisher(config, AGENT, Spool(tmp_path / "s.sqlite3", 10), "m1")
    with caplog.at_level("WARNING", logger="edge_agent.publisher"):
        publisher.start(status)
        time.sleep(3.5)  # several reconnect attempts, 1 s apart
        publisher.stop(status(), flush_timeout=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"cannot reach 127.0.0.1:{port} (Connection refused): check mqtt.host/port/tls")
    assert "edge-agent check" in warnings[0]


def crowded_summary() -> pb.CameraSummary:
    """One camera summary of about 3 kB: over a 2000-byte packet limit however its batch is split."""
    return pb.CameraSummary(camera_id="cam0", rejected={f"reason-{i}": i for i in range(200)})


def observations_received(subscriber: Subscriber) -> int:
    return sum(len(codec.decode(m.payload, pb.ObservationBatch).observations) for m in subscriber.received())


def connects(caplog) -> int:
    return sum(m.startswith("connected to broker") for m in caplog.messages)


@pytest.fixture
def small_packet_broker(tmp_path):
    """A real Mosquitto taking packets of at most 2000 bytes (advertised in CONNACK), an agent's spool
    and publisher for it (the test starts it), and a subscriber to the agent's observations."""
    broker = start_mosquitto(tmp_path / "mosquitto", "max_packet_size 2000")
    spool = Spool(tmp_path / "spool.sqlite3", max_batches=100)
    publisher = Publisher(MqttSection(port=broker.port, max_backoff_s=1), AGENT, spool, "m1")
    subscriber = Subscriber(broker.port, topics.observations("lab-a", "pc-1"))
    try:
        yield spool, publisher, subscriber
    finally:
        publisher.stop(status())
        subscriber.close()
        broker.stop()


def test_a_batch_over_the_brokers_packet_limit_is_split_and_the_batches_behind_it_arrive(
        small_packet_broker, caplog):
    """Mosquitto closes the connection on a packet over its max_packet_size. Before, the spool sent that
    batch again after every reconnect, once a second for ever, and no batch behind it ever arrived."""
    spool, publisher, subscriber = small_packet_broker
    with caplog.at_level("INFO", logger="edge_agent.publisher"):
        publisher.start(status)
        assert publisher.connected.wait(10)
        publisher.publish_batch([observation()], [])
        publisher.publish_batch([observation()] * 100, [])  # about 5 kB
        publisher.publish_batch([observation()], [crowded_summary()])  # cannot be split to fit
        publisher.publish_batch([observation()], [])
        wait(lambda: observations_received(subscriber) == 102, timeout=10)
        wait(lambda: spool.depth == 0)
    assert seqs(subscriber) == list(range(1, 7))  # 1, the 4 parts of the large batch, then the last
    assert spool.dropped == 1
    assert connects(caplog) == 1 and not any("lost the broker" in m for m in caplog.messages)
    size = [re.sub(r"is \d+ bytes", "is N bytes", m) for m in caplog.messages if "more than the broker takes" in m]
    assert size == [
        "a new batch of 100 observations and 0 camera summaries is N bytes as an MQTT packet, more than the "
        "broker takes (maximum packet size 2000 bytes, from the broker's CONNACK): sending it as 4 smaller "
        "batches (said once per connection)",
        "a new batch of 1 observations and 1 camera summaries is N bytes as an MQTT packet, more than the "
        "broker takes (maximum packet size 2000 bytes, from the broker's CONNACK): dropping it, as one of its "
        "observations or summaries alone is larger (counted in spool_dropped) (said once per connection)"]


def test_a_spooled_batch_too_large_for_the_broker_is_split_or_dropped_when_sent_and_the_queue_moves_on(
        small_packet_broker, caplog):
    """Batches spooled before the agent learnt the broker's limit (offline since its start) are checked
    again when sent: one that fits no more goes as smaller batches behind the queue, or is dropped."""
    spool, publisher, subscriber = small_packet_broker
    with caplog.at_level("INFO", logger="edge_agent.publisher"):
        publisher.publish_batch([observation()] * 100, [])  # under the 1 MiB assumed until connected
        publisher.publish_batch([observation()], [crowded_summary()])
        publisher.publish_batch([observation()], [])
        assert (spool.depth, caplog.messages) == (3, [])
        publisher.start(status)
        wait(lambda: observations_received(subscriber) == 101, timeout=10)
        wait(lambda: spool.depth == 0)
    assert seqs(subscriber) == [3, 4, 5, 6, 7]  # the batch behind first, then the parts with new seqs
    assert spool.dropped == 1
    assert connects(caplog) == 1 and not any("lost the broker" in m for m in caplog.messages)
    size = [m for m in caplog.messages if "more than the broker takes" in m]
    assert [m.split(" is ")[0] for m in size] == [
        "spooled batch seq 1 of 100 observations and 0 camera summaries",
        "spooled batch seq 2 of 1 observations and 1 camera summaries"]
    assert "sending it as 4 smaller batches" in size[0] and "dropping it, as one of its" in size[1]


def test_a_broker_closing_each_connection_at_once_is_redialled_with_a_growing_back_off(tmp_path, caplog):
    """paho starts its reconnect delay again at 1 s after every CONNACK, so a broker that drops the agent
    right after it connects was redialled every second for ever. Here: MQTT 3.1.1, whose CONNACK advertises
    no packet limit, and a batch over the broker's (a cause the agent cannot see)."""
    broker = start_mosquitto(tmp_path / "mosquitto", "max_packet_size 2000")
    spool = Spool(tmp_path / "spool.sqlite3", max_batches=100)
    publisher = Publisher(MqttSection(port=broker.port, protocol="3.1.1", max_backoff_s=4), AGENT, spool, "m1")
    with caplog.at_level("INFO", logger="edge_agent.publisher"):
        publisher.publish_batch([observation()] * 100, [])
        publisher.start(status)
        try:
            time.sleep(7.5)  # connects at 0, 2 and 6 s; before, every second
        finally:
            publisher.stop(status(), flush_timeout=0)
            broker.stop()
    assert 2 <= connects(caplog) <= 3, caplog.messages
    lost = [m for m in caplog.messages if m.startswith("lost the broker")]
    assert "s after connecting; spooling batches and reconnecting in 2 s" in lost[0]
    assert "reconnecting in 4 s (backing off up to mqtt.max_backoff_s" in lost[1]


def test_a_broker_without_mqtt_5_is_named_with_the_protocol_fix(tmp_path, caplog):
    """amqtt (the demo's broker) speaks MQTT 3.1.1 only; it never answers an MQTT 5 CONNECT with a Last Will."""
    broker = EmbeddedBroker(port=free_port())
    broker.start()
    publisher = Publisher(MqttSection(host="127.0.0.1", port=broker.port, keepalive_s=5, max_backoff_s=1), AGENT,
                          Spool(tmp_path / "s.sqlite3", 10), "m1")
    with caplog.at_level("WARNING", logger="edge_agent.publisher"):
        publisher.start(status)
        try:
            wait(lambda: any(r.name == "edge_agent.publisher" for r in caplog.records), timeout=30)
        finally:
            publisher.stop(status(), flush_timeout=0)
            broker.stop()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "edge_agent.publisher"]
    assert warning.startswith(f"127.0.0.1:{broker.port} sent no CONNACK in 5 s: ")
    assert 'if the broker speaks MQTT 3.1.1 only, set mqtt.protocol = "3.1.1"' in warning
