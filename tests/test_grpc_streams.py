"""The gRPC API over real gRPC on 127.0.0.1: StreamAdaptations is capped at MAX_STREAMS, so that open
streams cannot take the worker threads that health checks and unary calls need; calls the coordinator
cannot answer (shutting down, the database gone) end UNAVAILABLE, which clients retry."""

from __future__ import annotations

import logging
import shutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from outlets import parts, publish_signal, served, wait_until

from affectedge.loopback import free_port
from affectedge.v1 import affectedge_pb2 as pb
from affectedge.v1 import affectedge_pb2_grpc as pb_grpc
from coordinator import grpc_api, policy

EVERYTHING = pb.StreamAdaptationsRequest()


def test_streams_past_the_cap_are_refused_and_a_closed_stream_frees_its_slot(tmp_path, monkeypatch):
    """72 open streams used to fill every worker: health checks got RESOURCE_EXHAUSTED instead."""
    monkeypatch.setattr(grpc_api, "MAX_STREAMS", 2)  # a pool of 2 + 8 workers
    p = parts(tmp_path, grpc={"host": "127.0.0.1", "port": free_port()})

    def open_streams() -> int:
        return len(p.hub._subs)  # each open stream holds one hub subscription

    with served(p) as (_, channel):
        stub = pb_grpc.CoordinatorStub(channel)
        held = stub.StreamAdaptations(EVERYTHING)
        expiring = stub.StreamAdaptations(EVERYTHING, timeout=2)
        wait_until(lambda: open_streams() == 2, 5, "two open streams")
        extra = [stub.StreamAdaptations(EVERYTHING) for _ in range(8)]  # as many as the spare workers
        wait_until(lambda: all(call.done() for call in extra), 5, "the streams past the cap to end")
        assert {call.code() for call in extra} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert extra[0].details().startswith("2 StreamAdaptations are open")

        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=3).status == health_pb2.HealthCheckResponse.SERVING
        assert stub.ListClassrooms(pb.ListClassroomsRequest(), timeout=3).classrooms == []

        # a stream past its deadline, then a cancelled one, gives its slot to the next
        wait_until(lambda: expiring.done() and open_streams() == 1, 5, "the expired stream to close")
        assert expiring.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        after_deadline = stub.StreamAdaptations(EVERYTHING)
        wait_until(lambda: open_streams() == 2, 5, "a stream in the expired one's slot")
        held.cancel()
        wait_until(lambda: open_streams() == 1, 5, "the cancelled stream to close")
        after_cancel = stub.StreamAdaptations(EVERYTHING)
        wait_until(lambda: open_streams() == 2, 5, "a stream in the cancelled one's slot")
        assert not after_deadline.done() and not after_cancel.done()
        after_deadline.cancel()
        after_cancel.cancel()


def test_a_stream_ends_unavailable_when_the_coordinator_stops(tmp_path):
    """It used to end OK: an LMS's ``for signal in stream`` ended as if finished, and no retry policy
    retries OK, so it never reconnected to the restarted coordinator."""
    p = parts(tmp_path, grpc={"host": "127.0.0.1", "port": free_port()})
    with served(p) as (server, channel):
        stream = pb_grpc.CoordinatorStub(channel).StreamAdaptations(EVERYTHING)
        wait_until(lambda: len(p.hub._subs) == 1, 5, "the stream to open")
        signal = publish_signal(p)
        assert next(stream).id == signal.id
        server.stop()
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ended.value.details() == "coordinator shutting down; reconnect"
        assert p.hub._subs == []


def test_unary_calls_answer_unavailable_without_the_database_s_words_while_it_is_gone(tmp_path, caplog):
    """They answered UNKNOWN with the database's error text (PostgreSQL's names its host and port)."""
    data = tmp_path / "data"
    data.mkdir()
    p = parts(tmp_path, database={"url": f"sqlite:///{data / 'coordinator.db'}"},
              grpc={"host": "127.0.0.1", "port": free_port()})
    with served(p) as (_, channel):
        stub = pb_grpc.CoordinatorStub(channel)
        assert stub.ListClassrooms(pb.ListClassroomsRequest(), timeout=5).classrooms == []
        shutil.rmtree(data)
        p.sessions.kw["bind"].dispose()  # the open connections closed: each new one finds no database
        calls = (lambda: stub.ListClassrooms(pb.ListClassroomsRequest(), timeout=5),
                 lambda: stub.GetClassroomState(pb.GetClassroomStateRequest(classroom_id="room-1"), timeout=5))
        for call in calls:
            with caplog.at_level(logging.WARNING, "coordinator.grpc_api"), pytest.raises(grpc.RpcError) as failed:
                call()
            assert (failed.value.code(), failed.value.details()) == (grpc.StatusCode.UNAVAILABLE,
                                                                     "database unavailable; retry")
        logged = [message for r in caplog.records if "database is unavailable" in (message := r.getMessage())]
        assert logged == ["gRPC ListClassrooms: the database is unavailable: (sqlite3.OperationalError) unable "
                          "to open database file"]  # GetClassroomState's within the same 10 s: not repeated


def test_state_windows_are_the_configured_ones_and_any_other_is_refused_naming_them(tmp_path):
    """Any length up to a day let a caller difference two windows ending together and read the few
    seconds between them; only the [aggregate] windows and the policy rules' are answered."""
    rules = tmp_path / "rules.toml"
    rules.write_text(policy.DEFAULT_RULES.read_text().replace("window_s = 60", "window_s = 120", 1))
    p = parts(tmp_path, grpc={"host": "127.0.0.1", "port": free_port()}, policy={"rules": str(rules)})

    def code(window: int) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as failed:
            stub.GetClassroomState(pb.GetClassroomStateRequest(classroom_id="nowhere", window_seconds=window),
                                   timeout=5)
        return failed.value.code(), failed.value.details()

    with served(p) as (_, channel):
        stub = pb_grpc.CoordinatorStub(channel)
        allowed = "window_seconds must be 0 (the default) or one of 10, 60, 120, 300"
        refused = (grpc.StatusCode.INVALID_ARGUMENT, allowed)
        assert code(7) == code(59) == code(86400) == refused
        for window in (0, 10, 120, 300):  # answered: the classroom is what is missing
            assert code(window) == (grpc.StatusCode.NOT_FOUND, "no classroom 'nowhere'")
