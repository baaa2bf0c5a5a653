"""MQTT topic scheme (part of the wire contract).

    affectedge/v1/<classroom>/<agent>/observations   ObservationBatch, QoS 1
    affectedge/v1/<classroom>/<agent>/status         AgentStatus, QoS 1, retained; also the Last Will

Ids are 1-64 characters of ``A-Z a-z 0-9 _ -`` so they can never contain MQTT wildcards or
separators, which is what lets a broker ACL pin each agent to its own topic.
"""

from __future__ import annotations

import re
from typing import NamedTuple

PREFIX = "affectedge/v1"
OBSERVATIONS = "observations"
STATUS = "status"
ALL = f"{PREFIX}/+/+/+"
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Topic(NamedTuple):
    classroom: str
    agent: str
    kind: str


def check_id(value: str, what: str) -> str:
    """Return ``value`` if it is a valid id, else raise ValueError saying how to fix it."""
    if not ID_PATTERN.match(value):
        raise ValueError(f"{what} {value!r} is not a valid id: use 1-64 letters, digits, '_' or '-'")
    return value


def observations(classroom: str, agent: str) -> str:
    return f"{PREFIX}/{check_id(classroom, 'classroom')}/{check_id(agent, 'agent')}/{OBSERVATIONS}"


def status(classroom: str, agent: str) -> str:
    return f"{PREFIX}/{check_id(classroom, 'classroom')}/{check_id(agent, 'agent')}/{STATUS}"


def shared(topic_filter: str, group: str) -> str:
    """MQTT shared subscription so several coordinators split one stream."""
    return f"$share/{check_id(group, 'group')}/{topic_filter}"


def parse(topic: str) -> Topic | None:
    """Split an AffectEdge topic; None for anything else (including bad ids)."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != PREFIX or parts[4] not in (OBSERVATIONS, STATUS):
        return None
    if not (ID_PATTERN.match(parts[2]) and ID_PATTERN.match(parts[3])):
        return None
    return Topic(parts[2], parts[3], parts[4])
