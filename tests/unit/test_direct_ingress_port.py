"""`imagegen serve`'s wait for a direct ingress's port (serve_app/cli.py `wait_until_bindable`):
Serve binds it without SO_REUSEADDR, so the closed connections of the last server on it must
have gone; a server listening there is refused at once. Real sockets on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from serve_app.cli import wait_until_bindable

HOST = "127.0.0.1"


def server_socket(port: int = 0) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((HOST, port))
    server.listen()
    return server


@pytest.fixture
def port_in_time_wait() -> Iterator[int]:
    """A port whose server closed a connection first, and then stopped: TIME_WAIT holds it."""
    server = server_socket()
    port = server.getsockname()[1]
    client = socket.create_connection((HOST, port))
    accepted, _ = server.accept()
    accepted.close()
    server.close()
    client.recv(1)  # the server's close has arrived
    client.close()
    with socket.socket() as plain, pytest.raises(OSError):  # as Serve's direct ingress binds
        plain.bind((HOST, port))
    yield port


def test_a_free_port_is_taken_at_once() -> None:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    wait_until_bindable(HOST, port, timeout_s=0)


def test_a_port_another_server_listens_on_is_refused_without_waiting() -> None:
    with server_socket() as server, pytest.raises(OSError, match="another server listens") as refused:
        wait_until_bindable(HOST, server.getsockname()[1], timeout_s=60)
    assert not isinstance(refused.value, TimeoutError)


def test_a_port_held_by_closed_connections_is_waited_for(port_in_time_wait: int) -> None:
    with pytest.raises(TimeoutError, match="closed connections"):
        wait_until_bindable(HOST, port_in_time_wait, timeout_s=0)
