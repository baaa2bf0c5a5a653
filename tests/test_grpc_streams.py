"""The gRPC API over real gRPC on 127.0.0.1: StreamAdaptations is capped at MAX_STREAMS, so that open
streams cannot take the worker threads that health checks and unary calls need; calls the coordinator
cannot answer (shutting down, the database gone) end UNAVAILABLE, which clients retry; a stream
resumed with after_signal_id replays the signals its client missed."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from datetime import timedelta

import grpc
import outlets
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
        assert ended.value.details() == ("coordinator shutting down; reconnect with after_signal_id = the last "
                                         "signal's id")
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


def _stamps(monkeypatch, *offsets_s: float) -> None:
    """The next signals ``publish_signal`` fires are stamped these seconds after a whole second of now:
    it stamps to the second, so signals fired together would otherwise share an instant or not by chance."""
    start = outlets.utcnow().replace(microsecond=0)
    times = iter(start + timedelta(seconds=offset) for offset in offsets_s)
    monkeypatch.setattr(outlets, "utcnow", lambda: next(times))


def _firing_once_after(monkeypatch, owner: object, name: str, fire: Callable[[], object]) -> None:
    """``fire`` runs right after the first call of ``owner.name``: a signal fired at that step of a
    stream's start."""
    original, fired = getattr(owner, name), []

    def call_then_fire(*args, **kwargs):
        result = original(*args, **kwargs)
        if not fired:
            fired.append(fire())
        return result

    monkeypatch.setattr(owner, name, call_then_fire)


def _received(stream, count: int) -> list[str]:
    return [next(stream).classroom_id for _ in range(count)]


def _received_then_dropped(p, stub, request: pb.StreamAdaptationsRequest, *rooms: str) -> list[pb.AdaptationSignal]:
    """A stream that got a signal of each of ``rooms``, fired after it opened, then dropped (the network
    went): the signals, for the client to resume after."""
    stream = stub.StreamAdaptations(request, timeout=30)
    wait_until(lambda: len(p.hub._subs) == 1, 5, "the stream to open")
    fired = [publish_signal(p, room) for room in rooms]
    assert [next(stream).id for _ in fired] == [signal.id for signal in fired]
    stream.cancel()
    wait_until(lambda: p.hub._subs == [], 5, "the dropped stream to close")
    return fired


def test_a_resumed_stream_replays_the_signals_missed_then_goes_on_live_each_once(tmp_path, monkeypatch):
    """A stream started at its subscription: reconnecting after a drop got room-A, then room-C, and
    never room-B, which had fired while the client was away."""
    p = parts(tmp_path, grpc={"host": "127.0.0.1", "port": free_port()})
    _stamps(monkeypatch, 0, 1, 2, 3, 4, 5, 6, 7)
    wanted = pb.StreamAdaptationsRequest(classroom_ids=[f"room-{c}" for c in "ABCDEF"])
    with served(p) as (_, channel):
        stub = pb_grpc.CoordinatorStub(channel)
        [last] = _received_then_dropped(p, stub, wanted, "room-A")

        publish_signal(p, "room-B")
        publish_signal(p, "room-X")  # not a classroom the stream asks for
        publish_signal(p, "room-C")
        # the resumed stream's start: subscribed to live signals (room-D then reaches it stored and
        # live), then its replay read from the database (room-E then reaches it live only)
        _firing_once_after(monkeypatch, p.hub, "subscribe", lambda: publish_signal(p, "room-D"))
        _firing_once_after(monkeypatch, grpc_api, "signal_message", lambda: publish_signal(p, "room-E"))
        wanted.after_signal_id = last.id
        resumed = stub.StreamAdaptations(wanted, timeout=30)
        assert _received(resumed, 4) == ["room-B", "room-C", "room-D", "room-E"]
        publish_signal(p, "room-F")  # room-D came once if room-F comes next
        assert _received(resumed, 1) == ["room-F"]
        resumed.cancel()


def test_a_stream_that_falls_behind_ends_unavailable_and_its_resume_loses_nothing(tmp_path, monkeypatch):
    """The live queue keeps the newest messages only: a stream that fell further behind (a long replay
    to a slow client) lost the signals the hub dropped without a word, and waited on for them."""
    p = parts(tmp_path, grpc={"host": "127.0.0.1", "port": free_port()})
    _stamps(monkeypatch, 0, 1, 2, 3, 4, 5, 6)
    p.hub.maxsize = 3
    wanted = pb.StreamAdaptationsRequest(classroom_ids=[f"room-{c}" for c in "ABCDEF"])
    with served(p) as (_, channel):
        stub = pb_grpc.CoordinatorStub(channel)
        [last] = _received_then_dropped(p, stub, wanted, "room-A")

        missed = publish_signal(p, "room-B")
        # while the resumed stream reads its replay, four signals fire into its live queue of three
        _firing_once_after(monkeypatch, grpc_api, "signal_message",
                           lambda: [publish_signal(p, f"room-{c}") for c in "CDEF"])
        wanted.after_signal_id = last.id
        resumed = stub.StreamAdaptations(wanted, timeout=30)
        assert _received(resumed, 1) == ["room-B"]
        with pytest.raises(grpc.RpcError) as ended:
            next(resumed)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ended.value.details() == ("this stream fell 3 messages behind and lost some; reconnect with "
                                         "after_signal_id = the last signal's id")
        wanted.after_signal_id = missed.id
        again = stub.StreamAdaptations(wanted, timeout=30)
        assert _received(again, 4) == ["room-C", "room-D", "room-E", "room-F"]
        again.cancel()


def test_signals_stamped_in_the_resumed_one_s_instant_are_sent_again_rather_than_lost(tmp_path, monkeypatch):
    """One tick stamps its signals alike and fires them in an order that is not stored: the stream
    cannot tell which of them its client had, so it re-sends them all, as the proto comment says."""
    p = parts(tmp_path, grpc={"host": "127.0.0.1", "port": free_port()})
    _stamps(monkeypatch, 0, 0, 1)
    with served(p) as (_, channel):
        stub = pb_grpc.CoordinatorStub(channel)
        tick = _received_then_dropped(p, stub, EVERYTHING, "room-A", "room-B")
        later = publish_signal(p, "room-C")

        # resumed after the tick-mate with the greater id: ordered (created_at, id), the other one
        # sorts before it, and would be lost if the client had not had it
        before, after = sorted(signal.id for signal in tick)
        resumed = stub.StreamAdaptations(pb.StreamAdaptationsRequest(after_signal_id=after), timeout=30)
        assert [next(resumed).id for _ in range(2)] == [before, later.id]
        resumed.cancel()


def test_a_resume_the_coordinator_cannot_replay_is_refused_saying_how_to_back_fill(tmp_path, monkeypatch):
    """An unknown id, one older than REPLAY_WINDOW or with more than MAX_REPLAY signals after it is
    refused, never answered with a partial replay: that would be a silent gap."""
    monkeypatch.setattr(grpc_api, "MAX_REPLAY", 1)
    p = parts(tmp_path, grpc={"host": "127.0.0.1", "port": free_port()})
    _stamps(monkeypatch, -25 * 3600, 0, 1, 2)
    stale, busy, *_ = [publish_signal(p) for _ in range(4)]
    back_fill = ("back-fill with REST GET /api/v1/signals?since=<the last signal's created_at> and resume from "
                 "the newest signal it returns")

    with served(p) as (_, channel):
        stub = pb_grpc.CoordinatorStub(channel)

        def refusal(after_id: str) -> tuple[grpc.StatusCode, str]:
            stream = stub.StreamAdaptations(pb.StreamAdaptationsRequest(after_signal_id=after_id), timeout=10)
            with pytest.raises(grpc.RpcError) as refused:
                next(stream)
            return refused.value.code(), refused.value.details()

        assert refusal("no-such-signal") == (
            grpc.StatusCode.INVALID_ARGUMENT, f"after_signal_id 'no-such-signal' is no stored signal: {back_fill}")
        assert refusal(stale.id) == (
            grpc.StatusCode.OUT_OF_RANGE,
            f"after_signal_id {stale.id!r} is older than 24 h, the furthest a stream replays: {back_fill}")
        assert refusal(busy.id) == (
            grpc.StatusCode.OUT_OF_RANGE,
            f"more than 1 signals follow after_signal_id {busy.id!r}, the most a stream replays: {back_fill}")
        wait_until(lambda: p.hub._subs == [], 5, "the refused streams to let go of the hub")
