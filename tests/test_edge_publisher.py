"""The publisher against a real Mosquitto: store-and-forward across a broker restart, status, formats."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import free_port, start_mosquitto
from edge_support import Subscriber

from affectedge import codec, topics
from affectedge.v1 import affectedge_pb2 as pb
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


def test_batches_the_broker_acl_refuses_are_counted_as_dropped_with_one_warning(tmp_path, caplog):
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {topics.status('lab-a', 'pc-1')}\n")  # observations denied
    broker = start_mosquitto(tmp_path / "mosquitto", f"acl_file {acl}\nuser root")  # root: reads tmp_path
    spool = Spool(tmp_path / "spool.sqlite3", max_batches=10)
    publisher = Publisher(MqttSection(port=broker.port), AGENT, spool, "m1")
    publisher.start(status)
    try:
        assert publisher.connected.wait(10)
        with caplog.at_level("WARNING", logger="edge_agent.publisher"):
            for _ in range(3):
                publisher.publish_batch([observation()], [])
            wait(lambda: spool.depth == 0)
    finally:
        publisher.stop(status())
        broker.stop()
    assert spool.dropped == 3
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1
    assert topics.observations("lab-a", "pc-1") in refused[0]
    assert "Not authorized" in refused[0] and "provision-agent" in refused[0]


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
