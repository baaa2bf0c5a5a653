"""StreamAdaptations is capped at MAX_STREAMS, over real gRPC on 127.0.0.1, so that open streams
cannot take the worker threads that health checks and unary calls need."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from outlets import parts, wait_until

from affectedge.loopback import free_port
from affectedge.v1 import affectedge_pb2 as pb
from affectedge.v1 import affectedge_pb2_grpc as pb_grpc
from coordinator import grpc_api
from coordinator.grpc_api import GrpcServer

EVERYTHING = pb.StreamAdaptationsRequest()


def test_streams_past_the_cap_are_refused_and_a_closed_stream_frees_its_slot(tmp_path, monkeypatch):
    """72 open streams used to fill every worker: health checks got RESOURCE_EXHAUSTED instead."""
    monkeypatch.setattr(grpc_api, "MAX_STREAMS", 2)  # a pool of 2 + 8 workers
    p = parts(tmp_path, grpc={"host": "127.0.0.1", "port": free_port()})
    server = GrpcServer(p)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.CoordinatorStub(channel)

    def open_streams() -> int:
        return len(p.hub._subs)  # each open stream holds one hub subscription

    try:
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
    finally:
        channel.close()
        server.stop(0)
