"""``shared.transport.corked``: a batch's frames leave in full TCP segments.

Checked on real sockets (the option is read back from the kernel); publishing through the
corked socket to RabbitMQ is covered by the runtime and ingest integration tests.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from kombu import Connection

from shared.transport import corked

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_CORK"), reason="Linux only")


@pytest.fixture
def tcp_socket() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as client:
        yield client


def cork_of(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)


def amqp_like(sock: object) -> SimpleNamespace:
    """What kombu's Connection exposes: ``connection.transport.sock``."""
    return SimpleNamespace(connection=SimpleNamespace(transport=SimpleNamespace(sock=sock)))


def test_corks_while_writing_and_uncorks_after(tcp_socket: socket.socket) -> None:
    with corked(amqp_like(tcp_socket)):
        assert cork_of(tcp_socket) == 1
        tcp_socket.sendall(b"x" * 100)
    assert cork_of(tcp_socket) == 0


def test_uncorks_when_the_block_fails(tcp_socket: socket.socket) -> None:
    with pytest.raises(ConnectionError), corked(amqp_like(tcp_socket)):
        raise ConnectionError("broker went away mid-batch")
    assert cork_of(tcp_socket) == 0


def test_a_socket_closed_inside_the_block_does_not_hide_the_error(
        tcp_socket: socket.socket) -> None:
    with pytest.raises(ConnectionError), corked(amqp_like(tcp_socket)):
        tcp_socket.close()
        raise ConnectionError("publish failed")


def test_no_tcp_socket_is_a_no_op() -> None:
    left, right = socket.socketpair()  # AF_UNIX: no TCP options
    with left, right, corked(amqp_like(left)):
        left.sendall(b"x")
    with corked(amqp_like(None)):
        pass
    with Connection("memory://") as memory, corked(memory):
        memory.default_channel  # noqa: B018  the memory transport has no socket
