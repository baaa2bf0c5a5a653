"""MQTT packet sizes: what a PUBLISH weighs, and cutting a batch into parts that each fit the broker.

A broker closes the connection on a packet over its limit (MQTT 5 advertises the limit in CONNACK as
Maximum Packet Size; Mosquitto's ``max_packet_size``). A spooled batch is sent again after every
reconnect, so one that is too large would block every batch behind it: the publisher checks each
packet against the limit before paho sees it, and sends a batch too large as several smaller ones.
"""

from __future__ import annotations

from collections.abc import Callable

from paho.mqtt.properties import Properties

from affectedge.v1 import affectedge_pb2 as pb

#: the limit assumed when the broker does not advertise one (MQTT 3.1.1, or MQTT 5 without the
#: property): the production broker's max_packet_size (deploy/mosquitto/mosquitto.conf)
FALLBACK_MAX_PACKET = 1_048_576
#: the widest ``seq`` (10 bytes in protobuf, 20 digits in JSON): parts are sized with it before they are
#: numbered, so a part that fits still fits with the seq it gets
WIDEST_SEQ = 2**64 - 1


def publish_size(topic: str, payload: bytes, properties: Properties | None) -> int:
    """Bytes of the QoS 1 PUBLISH packet paho builds for ``payload``, as the broker measures it.

    ``properties`` is None for MQTT 3.1.1, which has no property section.
    """
    remaining = (2 + len(topic.encode()) + 2  # topic (length-prefixed), packet id
                 + (len(properties.pack()) if properties is not None else 0) + len(payload))
    length_bytes = 1 if remaining < 2**7 else 2 if remaining < 2**14 else 3 if remaining < 2**21 else 4
    return 1 + length_bytes + remaining


def split(batch: pb.ObservationBatch,
          fits: Callable[[pb.ObservationBatch], bool]) -> list[pb.ObservationBatch] | None:
    """``batch`` as parts that each ``fits``, observations and summaries in their order, by halving.

    Each part keeps the batch's other fields (the caller numbers them). None when a single observation
    or camera summary does not fit alone: no split can send that batch.
    """
    if fits(batch):
        return [batch]
    observations = len(batch.observations)
    items = observations + len(batch.summaries)
    if items <= 1:
        return None
    cut = items // 2  # over observations, then summaries
    first, second = pb.ObservationBatch(), pb.ObservationBatch()
    first.CopyFrom(batch)
    second.CopyFrom(batch)
    del first.observations[cut:], first.summaries[max(0, cut - observations):]
    del second.observations[:cut], second.summaries[:max(0, cut - observations)]
    head, tail = split(first, fits), split(second, fits)
    return None if head is None or tail is None else head + tail
