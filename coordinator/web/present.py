"""How states and signals look to people and to JSON clients: one shape for pages, SSE and REST.

Database signal rows are turned back into :class:`AdaptationSignal` messages first (by the store's
``signal_message``), so a signal read from the database and one fresh from the hub are described
by the same code.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from google.protobuf import json_format

from affectedge.labels import EMOTIONS
from affectedge.v1 import affectedge_pb2 as pb
from coordinator import db, states
from coordinator.store import iso, signal_message

#: the four learning states the dashboard shows as gauges ("neutral" is the rest)
GAUGES = ("engaged", "confused", "frustrated", "bored")


def state_json(state: pb.ClassroomState, k: int) -> dict:
    """A ClassroomState for the browser; a suppressed state carries no distribution or states."""
    shown = not state.suppressed
    return {
        "classroom_id": state.classroom_id,
        "session_id": state.session_id,
        "window_start": iso(state.window_start.ToDatetime()),
        "window_end": iso(state.window_end.ToDatetime()),
        "window_seconds": state.window_seconds,
        "faces_present": state.faces_present,
        "learners": state.learners,
        "agents_online": state.agents_online,
        "observations": state.observations,
        "suppressed": state.suppressed,
        "k": k,
        "distribution": dict(zip(EMOTIONS, state.distribution, strict=True)) if shown else None,
        "states": states.from_messages(state.states) if shown else None,
    }


def agent_json(agent: db.Agent, now: datetime, offline_after_s: float) -> dict:
    """An agent as ONLINE / DEGRADED / OFFLINE (:meth:`coordinator.db.Agent.online` decides offline)."""
    if not agent.online(now - timedelta(seconds=offline_after_s)):
        status = "OFFLINE"
    else:
        status = "DEGRADED" if agent.state == "DEGRADED" else "ONLINE"
    return {
        "id": agent.id,
        "classroom_id": agent.classroom_id,
        "status": status,
        "last_seen": iso(agent.last_seen),
        "version": agent.version,
        "backend": agent.backend,
        "model_version": agent.model_version,
        "spool_depth": agent.spool_depth,
        "detail": agent.detail,
    }


def _evidence_parts(evidence: pb.Evidence) -> list[str | datetime]:
    """The evidence of a signal in plain words an instructor can check against the chart: text, and
    the window's bounds as naive UTC datetimes for each reader to show in its own way.

    Every rule tests a share of learners' states (0..1), so numbers are shown as percentages.
    """
    parts: list[str | datetime] = [f"Measured {evidence.observed:.0%} against a threshold of {evidence.threshold:.0%}"]
    if evidence.HasField("window_start") and evidence.HasField("window_end"):
        parts += [" over ", evidence.window_start.ToDatetime(), "–", evidence.window_end.ToDatetime()]
    rest = ""
    if evidence.learners:
        rest += f" with {evidence.learners} learner{'s' if evidence.learners != 1 else ''} in view"
    rest += f" (rule {evidence.rule})."
    mix = sorted(states.from_messages(evidence.states).items(), key=lambda kv: -kv[1])
    mix_words = [f"{name} {score:.0%}" for name, score in mix[:3] if score >= 0.005]
    if mix_words:
        rest += f" Class mix then: {', '.join(mix_words)}."
    return [*parts, rest]


def evidence_pieces(evidence: pb.Evidence) -> list[dict]:
    """The evidence as ``{"text": ...}`` and ``{"time": ISO 8601 UTC}`` pieces: the dashboard shows the
    times in the reader's zone, like every other time on its pages."""
    return [{"time": iso(part)} if isinstance(part, datetime) else {"text": part} for part in _evidence_parts(evidence)]


def evidence_text(evidence: pb.Evidence) -> str:
    """The evidence as one sentence for CSV and API readers, its times in UTC and saying so."""
    return "".join(f"{part:%H:%M:%S} UTC" if isinstance(part, datetime) else part for part in _evidence_parts(evidence))


def kind_label(kind: int) -> str:
    """SLOW_DOWN -> "Slow down"."""
    return pb.SignalKind.Name(kind).replace("_", " ").capitalize()


def signal_json(signal: pb.AdaptationSignal, row: db.Signal | None = None) -> dict:
    """A signal for the browser and the REST API; ``row`` adds its handling status."""
    return {
        "id": signal.id,
        "classroom_id": signal.classroom_id,
        "session_id": signal.session_id,
        "course_id": signal.course_id,
        "kind": pb.SignalKind.Name(signal.kind),
        "kind_label": kind_label(signal.kind),
        "strength": round(signal.strength, 3),
        "reason": signal.reason,
        "evidence": json_format.MessageToDict(signal.evidence, preserving_proto_field_name=True),
        "evidence_text": evidence_text(signal.evidence),
        "evidence_pieces": evidence_pieces(signal.evidence),
        "created_at": iso(signal.created_at.ToDatetime()),
        "status": row.status if row else "open",
        "handled_by": row.handled_by if row else None,
        "handled_at": iso(row.handled_at) if row else None,
    }


def row_json(row: db.Signal) -> dict:
    return signal_json(signal_message(row), row)
