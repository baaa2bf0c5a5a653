"""The OpenAPI 3 description of /api/v1, written by hand (a test checks it against the routes)."""

from __future__ import annotations

from affectedge.labels import EMOTIONS
from coordinator import states
from coordinator.web.access import SESSION_COOKIE
from coordinator.web.signals import ACTIONS, KINDS, STATUSES

_SHARES = {"type": "object", "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1}}


def _json(schema_ref: str, description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}},
    }


def _errors(*codes: int) -> dict:
    words = {
        400: "Bad parameter (the message says which and how to fix it)",
        401: "Not logged in and no valid bearer token",
        403: "The classroom is not assigned to this user",
        404: "No such classroom or signal",
        409: "The signal was already acknowledged or dismissed",
    }
    return {str(code): _json("Error", words[code]) for code in codes}


def _query(name: str, description: str, schema: dict) -> dict:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def _path(name: str, description: str) -> dict:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


_SCHEMAS = {
    "Error": {
        "type": "object",
        "required": ["error", "status"],
        "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
    },
    "Classroom": {
        "type": "object",
        "required": ["id", "name", "course_id", "agents_online"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "course_id": {"type": "string"},
            "instructor": {"type": "string", "nullable": True},
            "session_id": {"type": "string", "nullable": True, "description": "open session, if any"},
            "agents_online": {"type": "integer"},
        },
    },
    "ClassroomState": {
        "type": "object",
        "description": "A sliding-window aggregate. With fewer than k learners it is suppressed: "
        "distribution and states are null.",
        "required": ["classroom_id", "window_seconds", "learners", "suppressed", "k"],
        "properties": {
            "classroom_id": {"type": "string"},
            "session_id": {"type": "string"},
            "window_start": {"type": "string", "format": "date-time"},
            "window_end": {"type": "string", "format": "date-time"},
            "window_seconds": {"type": "integer"},
            "faces_present": {"type": "integer"},
            "learners": {"type": "integer",
                         "description": "distinct anonymous tracks, capped by the cameras' peak head counts"},
            "agents_online": {"type": "integer"},
            "observations": {"type": "integer"},
            "suppressed": {"type": "boolean"},
            "k": {"type": "integer", "description": "the k-anonymity threshold"},
            "distribution": {**_SHARES, "nullable": True, "description": f"keys: {', '.join(EMOTIONS)}"},
            "states": {**_SHARES, "nullable": True, "description": f"keys: {', '.join(states.STATES)}"},
        },
    },
    "Signal": {
        "type": "object",
        "required": ["id", "classroom_id", "kind", "strength", "reason", "created_at", "status"],
        "properties": {
            "id": {"type": "string"},
            "classroom_id": {"type": "string"},
            "session_id": {"type": "string"},
            "course_id": {"type": "string"},
            "kind": {"type": "string", "enum": list(KINDS)},
            "kind_label": {"type": "string", "example": "Slow down"},
            "strength": {
                "type": "number", "minimum": 0, "maximum": 1,
                "description": "0.5 exactly at the rule's threshold, rising to 1 at the far end of the 0..1 scale",
            },
            "reason": {"type": "string"},
            "evidence": {"type": "object", "description": "affectedge.v1.Evidence as JSON"},
            "evidence_text": {"type": "string", "description": "the evidence in one plain sentence (times in UTC)"},
            "evidence_pieces": {
                "type": "array",
                "description": "evidence_text as text and time pieces, for showing the times in the reader's zone",
                "items": {
                    "type": "object",
                    "properties": {"text": {"type": "string"}, "time": {"type": "string", "format": "date-time"}},
                },
            },
            "created_at": {"type": "string", "format": "date-time"},
            "status": {"type": "string", "enum": list(STATUSES)},
            "handled_by": {"type": "string", "nullable": True},
            "handled_at": {"type": "string", "format": "date-time", "nullable": True},
        },
    },
}

_PATHS = {
    "/classrooms": {
        "get": {
            "operationId": "listClassrooms",
            "summary": "Classrooms the caller may see",
            "responses": {
                "200": {
                    "description": "The classrooms",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "classrooms": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Classroom"},
                                    }
                                },
                            }
                        }
                    },
                },
                **_errors(401),
            },
        }
    },
    "/classrooms/{classroom_id}/state": {
        "get": {
            "operationId": "getClassroomState",
            "summary": "The classroom's state over a sliding window ending now",
            "parameters": [
                _path("classroom_id", "classroom id"),
                _query("window", "window length in seconds, one of aggregate.windows", {"type": "integer"}),
            ],
            "responses": {"200": _json("ClassroomState", "The state"), **_errors(400, 401, 403, 404)},
        }
    },
    "/signals": {
        "get": {
            "operationId": "listSignals",
            "summary": "Adaptation signals, newest first",
            "parameters": [
                _query("classroom", "only this classroom", {"type": "string"}),
                _query("status", "only this status", {"type": "string", "enum": list(STATUSES)}),
                _query("kind", "only this kind", {"type": "string", "enum": list(KINDS)}),
                _query("session", "only this session id", {"type": "string"}),
                _query("since", "created at or after (ISO 8601)", {"type": "string", "format": "date-time"}),
                _query("until", "created before (ISO 8601). To page, use before instead: created_at is "
                       "shown to the second, so paging by it skips signals of the same second",
                       {"type": "string", "format": "date-time"}),
                _query("before", "the next value of the previous page: returns the page after it",
                       {"type": "string"}),
                _query("limit", "at most this many", {"type": "integer", "minimum": 1, "maximum": 1000}),
            ],
            "responses": {
                "200": {
                    "description": "The signals",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["signals", "next"],
                                "properties": {
                                    "signals": {"type": "array", "items": {"$ref": "#/components/schemas/Signal"}},
                                    "next": {
                                        "type": "string",
                                        "nullable": True,
                                        "description": "an opaque cursor: send it as before, with the same "
                                        "filters, for the next page; null when this page was not full",
                                    },
                                },
                            }
                        }
                    },
                },
                **_errors(400, 401, 403, 404),
            },
        }
    },
    "/signals/{signal_id}/ack": {
        "post": {
            "operationId": "ackSignal",
            "summary": "Acknowledge or dismiss an open signal",
            "description": "With a login cookie instead of a bearer token, send the page's CSRF token "
            "in the X-CSRFToken header.",
            "parameters": [_path("signal_id", "signal id")],
            "requestBody": {
                "required": False,
                "description": "No body acknowledges. Any body must be a JSON object sent as "
                "application/json: anything else is a 400 and leaves the signal open.",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "status": {"type": "string", "enum": list(ACTIONS.values()), "default": "acknowledged"}
                            },
                        }
                    }
                },
            },
            "responses": {"200": _json("Signal", "The updated signal"), **_errors(400, 401, 403, 404, 409)},
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "getOpenApi",
            "summary": "This document",
            "security": [],
            "responses": {"200": {"description": "OpenAPI 3 document", "content": {"application/json": {}}}},
        }
    },
}


def document() -> dict:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "AffectEdge coordinator API",
            "version": "1",
            "description": "Classroom learning states and adaptation signals. Emotion labels only: the "
            "API has no images, identities or per-learner data.",
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearerAuth": []}, {"cookieAuth": []}],
        "paths": _PATHS,
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "a token from web.api_tokens"},
                "cookieAuth": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE},
            },
            "schemas": _SCHEMAS,
        },
    }
