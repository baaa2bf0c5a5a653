"""The loopback port helpers the demo picks its ports with."""

from __future__ import annotations

import socket

from affectedge.loopback import HOST, free_port, listening


def test_a_free_preferred_port_is_kept_and_a_listening_one_is_not() -> None:
    port = free_port()
    assert free_port(port) == port
    with socket.socket() as server:
        server.bind((HOST, port))
        server.listen()
        assert free_port(port) != port


def test_a_port_held_by_an_outgoing_connection_is_not_offered() -> None:
    """The demo's gRPC server once failed to bind 50051: the local end of another program's
    loopback connection held it, and nothing listened there for a connect() probe to find."""
    with socket.socket() as server, socket.socket() as client:
        server.bind((HOST, 0))
        server.listen()
        client.connect(server.getsockname())
        held = client.getsockname()[1]
        assert not listening(held)
        assert free_port(held) != held
