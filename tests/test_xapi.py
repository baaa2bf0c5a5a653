"""xAPI forwarding against a real LRS: Ralph (ralph-malph) on 127.0.0.1 with a filesystem backend.

Each test gets a fresh LRS and stores at most one statement in it: Ralph 5.1's filesystem backend
writes every POST with the "create" operation into the same file, so a second *new* statement is
refused with HTTP 500 ("already exists and overwrite is not allowed"). Its other backends need
MongoDB, Elasticsearch or ClickHouse servers, which are not available here.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from conftest import free_port, wait_for_port
from outlets import Parts, deliveries, parts, publish_signal, wait_until

from coordinator import db
from coordinator.xapi import STATEMENT_NAMESPACE, VERB_EXPERIENCED, XapiForwarder, ext

bcrypt = pytest.importorskip("bcrypt", reason="the dev extra (ralph-malph[lrs]) is not installed")
pytest.importorskip("ralph", reason="the dev extra (ralph-malph[lrs]) is not installed")
rfc3987 = pytest.importorskip("rfc3987", reason="the dev extra (ralph-malph[lrs]) is not installed")

USER, PASSWORD = "coordinator", "lrs-password-for-tests"
HOME = "https://affectedge.school.example"  # [xapi] home_page


@dataclass
class Lrs:
    url: str

    def get(self, **params) -> dict:
        response = requests.get(f"{self.url}/statements", params=params, auth=(USER, PASSWORD),
                                headers={"X-Experience-API-Version": "1.0.3"}, timeout=10)
        response.raise_for_status()
        return response.json()

    def about(self, activity_id: str) -> list[dict]:
        """Statements whose object is ``activity_id``, filtered here: Ralph 5.1's filesystem backend
        never matches its own ``activity``/``verb`` filters (it compares a str with its IRI model)."""
        return [s for s in self.get(limit=1000)["statements"] if s["object"]["id"] == activity_id]


@pytest.fixture
def lrs(tmp_path) -> Iterator[Lrs]:
    """Ralph's LRS API under uvicorn (what ``ralph runserver`` starts), with a generated auth file."""
    home = tmp_path / "ralph"
    home.mkdir()
    (home / "auth.json").write_text(json.dumps([{
        "username": USER,
        "hash": bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt()).decode(),
        "scopes": ["all"],
        "agent": {"account": {"homePage": "http://127.0.0.1", "name": USER}},
    }]))
    (home / "statements").mkdir()
    port = free_port()
    env = {**os.environ, "RALPH_APP_DIR": str(home), "RALPH_AUTH_FILE": str(home / "auth.json"),
           "RALPH_RUNSERVER_BACKEND": "fs",
           "RALPH_BACKENDS__LRS__FS__DEFAULT_DIRECTORY_PATH": str(home / "statements")}
    log = (home / "ralph.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "ralph.api:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=60)
        yield Lrs(f"http://127.0.0.1:{port}/xAPI")
    finally:
        process.terminate()
        process.wait(10)


def forwarder_for(p: Parts) -> XapiForwarder:
    forwarder = XapiForwarder(p)
    forwarder.start()
    p.outlets.append(forwarder)
    return forwarder


def delivered(p: Parts, count: int = 1) -> list[db.Delivery]:
    return wait_until(lambda: (rows := deliveries(p, "xapi")) and len(rows) == count
                      and all(r.status != "pending" for r in rows) and rows, what="xapi deliveries")


def xapi(lrs: Lrs, **extra) -> dict:
    return {"endpoint": lrs.url + "/", "home_page": HOME, "username": USER, "password": PASSWORD, "backoff_s": 0.05,
            **extra}


def test_each_signal_is_stored_in_the_lrs_as_a_classroom_statement(tmp_path, lrs):
    """Identifiers come from [xapi] home_page: they were built from [web] host:port, the listening address
    (this machine's name for 0.0.0.0, or 127.0.0.1:8080 at every school), which split a classroom across
    policy leaders on different hosts and merged the classrooms of schools sharing an LRS."""
    room = "room-1"
    p = parts(tmp_path, xapi=xapi(lrs), web={"host": "0.0.0.0", "port": 8080})
    forwarder = forwarder_for(p)
    try:
        signal = publish_signal(p, classroom=room, course="course-7")
        rows = delivered(p)
    finally:
        forwarder.stop()
    assert [(r.status, r.attempts) for r in rows] == [("delivered", 1)]

    home = HOME
    assert [s["object"]["id"] for s in lrs.get(limit=1000)["statements"]] == [f"{home}/classrooms/{room}"]
    found = lrs.about(f"{home}/classrooms/{room}")
    assert len(found) == 1
    st = found[0]
    assert st["id"] == str(uuid.uuid5(STATEMENT_NAMESPACE, signal.id))
    # the actor is the classroom, never a learner: an identified Group with no members
    assert st["actor"] == {"objectType": "Group", "name": f"Classroom {room}",
                           "account": {"homePage": home, "name": room}}
    assert st["verb"] == VERB_EXPERIENCED
    result = st["result"]["extensions"]
    assert result[ext("signal-kind")] == "SLOW_DOWN"
    assert result[ext("strength")] == 0.8
    assert result[ext("reason")] == signal.reason
    assert result[ext("evidence")]["rule"] == "confusion"
    assert result[ext("evidence")]["sustained_seconds"] == 180
    assert st["context"]["extensions"][ext("session-id")] == "session-1"
    assert st["context"]["contextActivities"]["grouping"][0]["id"] == f"{home}/courses/course-7"
    assert st["timestamp"].startswith(signal.created_at.ToDatetime().isoformat())


def test_a_redelivered_signal_does_not_duplicate_the_statement(tmp_path, lrs):
    room = "room-1"
    p = parts(tmp_path, xapi=xapi(lrs))
    forwarder = forwarder_for(p)
    signal = publish_signal(p, classroom=room)
    first = delivered(p)[0]
    forwarder.stop()
    # an admin re-queues the delivery (as after a response lost on the way back): the LRS drops the copy
    with p.sessions.begin() as s:
        s.get(db.Delivery, first.id).status = "pending"
    forwarder = forwarder_for(p)
    try:
        again = wait_until(lambda: (r := deliveries(p, "xapi")[0]).status == "delivered" and r.attempts == 2
                           and r, what="redelivery")
    finally:
        forwarder.stop()
    assert again.last_error == ""
    found = lrs.about(f"{HOME}/classrooms/{room}")
    assert [s["id"] for s in found] == [str(uuid.uuid5(STATEMENT_NAMESPACE, signal.id))]


def test_a_statement_the_lrs_holds_in_another_version_counts_as_delivered(tmp_path, lrs, caplog):
    """Redelivering after [xapi] home_page changed sends the same statement id with other content: the LRS
    answers 409 Conflict, which made the delivery dead although the LRS holds the statement."""
    p = parts(tmp_path, xapi=xapi(lrs, home_page="https://old-name.school.example"))
    forwarder = forwarder_for(p)
    signal = publish_signal(p, classroom="room-1")
    first = delivered(p)[0]
    forwarder.stop()
    with p.sessions.begin() as s:  # an admin re-queues it after moving the installation to its new name
        s.get(db.Delivery, first.id).status = "pending"
    moved = parts(tmp_path, xapi=xapi(lrs))
    forwarder = forwarder_for(moved)
    try:
        with caplog.at_level(logging.WARNING, logger="coordinator.xapi"):
            again = wait_until(lambda: (r := deliveries(moved, "xapi")[0]).status != "pending" and r.attempts == 2
                               and r, what="redelivery")
    finally:
        forwarder.stop()
    statement_id = str(uuid.uuid5(STATEMENT_NAMESPACE, signal.id))
    assert (again.status, again.last_error) == ("delivered", "")
    warnings = [r.getMessage() for r in caplog.records if r.name == "coordinator.xapi"]
    assert len(warnings) == 1 and statement_id in warnings[0] and "different version" in warnings[0], warnings
    kept = lrs.get(limit=1000)["statements"]  # the LRS keeps the version it had
    assert [(s["id"], s["actor"]["account"]["homePage"]) for s in kept] == [
        (statement_id, "https://old-name.school.example")]


def test_wrong_lrs_credentials_go_to_the_dead_letter_table_at_once(tmp_path, lrs):
    p = parts(tmp_path, xapi={**xapi(lrs), "password": "wrong", "max_attempts": 5})
    forwarder = forwarder_for(p)
    try:
        publish_signal(p)
        row = delivered(p)[0]
    finally:
        forwarder.stop()
    assert (row.status, row.attempts) == ("dead", 1)
    assert row.last_error.startswith("HTTP 401")


def test_a_course_id_with_spaces_and_a_hash_still_makes_a_valid_statement(tmp_path, lrs):
    """The course IRI carried the admin's free text as is: no IRI, which a validating LRS refuses for good
    (400; Ralph does not check grouping ids, so the IRI is checked here)."""
    p = parts(tmp_path, xapi=xapi(lrs))
    forwarder = forwarder_for(p)
    try:
        publish_signal(p, classroom="room-1", course="MATH 101 #2")
        rows = delivered(p)
    finally:
        forwarder.stop()
    assert [(r.status, r.last_error) for r in rows] == [("delivered", "")]
    st = lrs.about(f"{HOME}/classrooms/room-1")[0]
    course = st["context"]["contextActivities"]["grouping"][0]["id"]
    assert rfc3987.match(course, rule="absolute_IRI"), course
    assert course == f"{HOME}/courses/MATH%20101%20%232"
