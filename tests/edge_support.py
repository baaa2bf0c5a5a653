"""Helpers for the edge agent tests: a real MQTT subscriber, agent configs, the agent as a process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import MODELS, ROOT
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SAMPLE = ROOT / "edge_agent" / "sample" / "classroom.mp4"
AGENT_CMD = [sys.executable, "-m", "edge_agent"]

needs_models = pytest.mark.skipif(
    not (MODELS / "manifest.json").exists() or not (MODELS / "mtcnn" / "onet.onnx").exists(),
    reason="models/ has no exported model (run model_export export)")


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    content_type: str | None


class Subscriber:
    """A real MQTT 5 client collecting everything on ``topic_filter``.

    ``session`` keeps a persistent session (fixed client id, 1 h expiry), so QoS 1 messages
    published while it is away - even across a broker restart - are queued for it.
    """

    def __init__(self, port: int, topic_filter: str = "#", session: str | None = None):
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=session or "",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.reconnect_delay_set(0.2, 0.5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if session else 0
        self.client.connect("127.0.0.1", port, clean_start=not session, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("subscription was not acknowledged")

    def _on_message(self, client, userdata, msg) -> None:
        content_type = getattr(msg.properties, "ContentType", None) if msg.properties else None
        with self._lock:
            self.messages.append(Message(msg.topic, msg.payload, msg.retain, content_type))

    def received(self, predicate: Callable[[Message], bool] = lambda m: True) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if predicate(m)]

    def wait_for(self, predicate: Callable[[list[Message]], bool], timeout: float = 20.0) -> list[Message]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            messages = self.received()
            if predicate(messages):
                return messages
            time.sleep(0.05)
        raise TimeoutError(f"condition not met in {timeout} s; got {len(self.received())} messages")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def write_config(path: Path, port: int, source: Path | str = SAMPLE, spool: Path | None = None,
                 extra: str = "") -> Path:
    """An agent config for tests: the sample video as camera, the repo's models, a temp spool."""
    spool = spool or path.parent / "spool.sqlite3"
    path.write_text(f"""
[agent]
id = "pc-1"
classroom = "lab-a"

[[cameras]]
id = "cam0"
source = "{source}"
fps = 10

[model]
dir = "{MODELS}"
backend = "onnxruntime"

[output]
interval_s = 0.5
status_interval_s = 1.0

[mqtt]
host = "127.0.0.1"
port = {port}
max_backoff_s = 1

[spool]
path = "{spool}"
{extra}
""")
    return path


def edge_agent(*args: str, cwd: Path | None = None, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """``python -m edge_agent ARGS`` as a real process."""
    return subprocess.Popen([*AGENT_CMD, *args], cwd=cwd or ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
