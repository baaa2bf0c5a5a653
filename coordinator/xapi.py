"""Adaptation signals as xAPI 1.0.3 statements, POSTed to a Learning Record Store (``[xapi]``).

One statement per signal, with the same retry and dead-letter behaviour as webhooks (rows in
``deliveries`` with ``kind = 'xapi'``, see :mod:`coordinator.outbox`). Shape, and why::

    actor   Group {account: {homePage: <installation>, name: <classroom id>}}
            The classroom as an anonymous group: AffectEdge never knows who a learner is, so no
            statement may name one. The account IFI lets an LRS query "everything about room-1".
    verb    http://adlnet.gov/expapi/verbs/experienced   (ADL: "only encountered the object ...
            where a specific achievement or completion is not required"): the class went through
            a stretch of the lesson in the affective state the result describes. No ADL verb means
            "showed confusion", and a made-up verb would be opaque to every LRS report tool.
    object  Activity <installation>/classrooms/<classroom id>, type .../activities/meeting
    result  extensions (keys under VOCAB): signal-kind ("SLOW_DOWN" ...), strength (0..1),
            reason (plain words), evidence (the Evidence message as protobuf JSON)
    context platform "AffectEdge"; extensions signal-id, session-id; contextActivities.grouping
            the course activity <installation>/courses/<course id> when the signal has a course
            (ids percent-encoded in activity IRIs: a course id is an admin's free text, and a
            validating LRS answers an invalid IRI such as ".../courses/MATH 101 #2" with a final 400)
    id      UUIDv5 of the signal id, so a retry after a lost response is a duplicate the LRS
            drops instead of a second statement

``<installation>`` is ``[xapi] home_page``, this coordinator's public base URL: the system on which
the classroom "account" and the activities live. It is configured, not derived from ``[web]
host``/``port`` (a listening address such as 127.0.0.1:8080 behind the HTTPS proxy): that address
is the same at every school, so a shared LRS merged their "room-101"s, and it changed with a port or
a policy leader on another host, splitting one classroom across actors. Extension keys are fixed
IRIs under :data:`VOCAB` so LRS queries keep working when an installation moves.

A statement id the LRS already holds with other content (HTTP 409 Conflict) is one this
coordinator sent before, in an earlier version (say before ``home_page`` changed): retrying cannot
change what the LRS keeps, so the delivery counts as done and a warning names the statement.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import TYPE_CHECKING
from urllib.parse import quote

import requests
from google.protobuf import json_format

from affectedge.v1 import affectedge_pb2 as pb
from coordinator.outbox import DeliveryError, Outbox, Target, post, safe_url
from coordinator.store import iso

if TYPE_CHECKING:
    from coordinator.service import Coordinator

XAPI_VERSION = "1.0.3"
#: namespace of the AffectEdge xAPI extension keys (identifiers only; nothing fetches them)
VOCAB = "https://w3id.org/xapi/affectedge"
VERB_EXPERIENCED = {"id": "http://adlnet.gov/expapi/verbs/experienced", "display": {"en-US": "experienced"}}
MEETING = "http://adlnet.gov/expapi/activities/meeting"
COURSE = "http://adlnet.gov/expapi/activities/course"
#: UUIDv5 namespace for statement ids (uuid5(NAMESPACE_URL, VOCAB + "/statements"))
STATEMENT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, f"{VOCAB}/statements")
TIMEOUT_S = 10.0
#: the LRS holds a different statement with this id (xAPI 1.0.3, Communication 2.1.2)
CONFLICT = 409

log = logging.getLogger(__name__)


def ext(name: str) -> str:
    return f"{VOCAB}/extensions/{name}"


def activity_id(home: str, collection: str, ident: str) -> str:
    """The activity IRI of classroom or course ``ident``, a valid IRI whatever characters it holds.

    Classroom ids are ``[A-Za-z0-9_-]`` (checked where they enter), so quoting leaves them as they
    are; course ids are free text and need it.
    """
    return f"{home}/{collection}/{quote(ident, safe='')}"


def statement(signal: pb.AdaptationSignal, home: str) -> dict:
    """The xAPI statement for ``signal`` (see the module docstring for the mapping)."""
    room = signal.classroom_id
    context: dict = {
        "platform": "AffectEdge",
        "extensions": {ext("signal-id"): signal.id, ext("session-id"): signal.session_id},
    }
    if signal.course_id:
        context["contextActivities"] = {"grouping": [{
            "objectType": "Activity", "id": activity_id(home, "courses", signal.course_id),
            "definition": {"type": COURSE},
        }]}
    return {
        "id": str(uuid.uuid5(STATEMENT_NAMESPACE, signal.id)),
        "actor": {"objectType": "Group", "name": f"Classroom {room}",
                  "account": {"homePage": home, "name": room}},
        "verb": VERB_EXPERIENCED,
        "object": {"objectType": "Activity", "id": activity_id(home, "classrooms", room),
                   "definition": {"type": MEETING, "name": {"en-US": f"Classroom {room}"}}},
        "result": {"extensions": {
            ext("signal-kind"): pb.SignalKind.Name(signal.kind),
            ext("strength"): round(signal.strength, 4),
            ext("reason"): signal.reason,
            ext("evidence"): json_format.MessageToDict(signal.evidence, preserving_proto_field_name=True),
        }},
        "context": context,
        "timestamp": iso(signal.created_at.ToDatetime()),
    }


class XapiForwarder(Outbox):
    """Forwards every signal to the LRS at ``[xapi] endpoint`` (off when it is empty)."""

    kind = "xapi"

    def __init__(self, coordinator: Coordinator):
        cfg = coordinator.config.xapi
        targets = []
        if cfg.endpoint:  # an http(s) URL: checked when the configuration is loaded
            targets.append(Target(self.statements_url(cfg.endpoint), cfg.max_attempts, cfg.backoff_s,
                                  TIMEOUT_S))
        super().__init__(coordinator, targets)
        self.home = cfg.home_page  # required with an endpoint: checked when the configuration is loaded

    @staticmethod
    def statements_url(endpoint: str) -> str:
        """The LRS's Statements resource under ``endpoint`` (e.g. https://lrs.example/xAPI/)."""
        return endpoint.rstrip("/") + "/statements"

    def http_session(self, target: Target) -> requests.Session:
        http = super().http_session(target)
        cfg = self.coordinator.config.xapi
        if cfg.username:
            http.auth = (cfg.username, cfg.password)
        http.headers["X-Experience-API-Version"] = XAPI_VERSION
        return http

    def send(self, http: requests.Session, target: Target, signal: pb.AdaptationSignal) -> None:
        """POST the signal's statement; a 409 Conflict counts as delivered (see the module docstring)."""
        st = statement(signal, self.home)
        try:
            post(http, target.url, json.dumps(st).encode(), {"Content-Type": "application/json"}, target.timeout_s)
        except DeliveryError as exc:
            if exc.status != CONFLICT:
                raise
            log.warning("the LRS at %s already holds statement %s (signal %s) in a different version, e.g. one "
                        "sent before [xapi] home_page changed: counted as delivered, the LRS keeps its version",
                        safe_url(target.url), st["id"], signal.id)

