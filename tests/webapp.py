"""What the dashboard tests share: the app on a coordinator's real parts, logins, and real data.

Data goes in through the coordinator's own store (``Store.write`` of ObservationBatch messages),
the same path MQTT ingest takes, so sessions, classrooms and agents are created as in production.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient
from outlets import Parts, parts

from affectedge.labels import EMOTIONS
from affectedge.v1 import affectedge_pb2 as pb
from coordinator import db, users
from coordinator.store import Received, Store
from coordinator.web import create_app

ADMIN_PASSWORD = "admin-password-1"
PASSWORD = "teacher-password-1"
#: a confused class: 0.6 fear + 0.3 surprise + 0.1 neutral -> confused 0.51 (coordinator/states.py)
CONFUSED = (0.0, 0.0, 0.6, 0.0, 0.0, 0.3, 0.1)
HAPPY = (0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.1)


def web(tmp_path: Path, **config) -> tuple[Parts, Flask]:
    """The dashboard app over a temp SQLite database, with admin/admin-password-1."""
    config.setdefault("state_dir", str(tmp_path))
    config.setdefault("web", {})
    config["web"] = {"admin_password": ADMIN_PASSWORD, **config["web"]}
    p = parts(tmp_path, **config)
    app = create_app(p)
    app.config["TESTING"] = True
    return p, app


def add_user(p: Parts, name: str, role: str = "instructor", password: str = PASSWORD) -> None:
    with p.sessions() as session:
        users.create_user(session, name, password, role)
        session.commit()


def add_classroom(p: Parts, room: str, instructor: str | None, course: str = "") -> None:
    with p.sessions() as session:
        session.add(db.Classroom(id=room, name=f"Room {room}", course_id=course, instructor=instructor))
        session.commit()


def csrf_token(client: FlaskClient, path: str = "/login") -> str:
    page = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)


def login(client: FlaskClient, name: str, password: str = PASSWORD):
    token = csrf_token(client)
    return client.post("/login", data={"username": name, "password": password, "csrf_token": token})


def batch(
    room: str, agent: str, at: datetime, tracks: int, probabilities=CONFUSED, seq: int = 0, faces: int | None = None
) -> pb.ObservationBatch:
    """One second of ``tracks`` learners all showing ``probabilities``, as an edge agent sends it."""
    message = pb.ObservationBatch(agent_id=agent, classroom_id=room, model_version="test", seq=seq)
    message.sent_at.FromDatetime(at)
    label = max(range(len(EMOTIONS)), key=lambda i: probabilities[i]) + 1
    for track in range(tracks):
        obs = message.observations.add(
            camera_id="cam0", track_id=track, label=label, confidence=max(probabilities), frames=10
        )
        obs.probabilities.extend(probabilities)
        obs.window_start.FromDatetime(at - timedelta(seconds=1))
        obs.window_end.FromDatetime(at)
    summary = message.summaries.add(camera_id="cam0", faces_present=tracks if faces is None else faces)
    summary.timestamp.FromDatetime(at)
    summary.distribution.extend(probabilities)
    return message


def ingest(p: Parts, batches: list[pb.ObservationBatch], received_at: datetime) -> None:
    Store(p.sessions).write([Received(b, received_at) for b in batches], [])
