"""bench/serve.py's HTTP clients against a small stdlib server on 127.0.0.1: one keep-alive
connection for every request unless the server closes it, the reply's JSON parsed."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from _bench_helpers import ROOT  # noqa: F401  (puts the repository on sys.path)

from bench._serve_clients import CLIENTS, SO_TIMESTAMPNS

BODIES = [(b"--b\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b")]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    close_each = False
    connections = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def log_message(self, *args: object) -> None:  # quiet
        return

    def _reply(self, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.server.close_each:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        size = int(self.headers["Content-Length"])
        self._reply({"path": self.path, "received": len(self.rfile.read(size))})

    def do_GET(self) -> None:  # noqa: N802
        self._reply({"path": self.path})


@pytest.fixture()
def server() -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.mark.parametrize("client", sorted(CLIENTS))
@pytest.mark.parametrize("close_each", [False, True])
def test_clients_keep_one_connection_unless_closed(server: _Server, client: str,
                                                   close_each: bool) -> None:
    server.close_each = close_each
    session = CLIENTS[client](f"http://127.0.0.1:{server.server_address[1]}", BODIES)
    try:
        replies = [session.post(i) for i in range(3)]
        ping = session.ping()
    finally:
        session.close()
    for latency, status, body, at_socket in replies:
        assert status == 200 and latency > 0
        assert body == {"path": "/v1/segment", "received": len(BODIES[0][0])}
        if client == "lean" and SO_TIMESTAMPNS is not None:  # the kernel stamped the arrival
            assert at_socket is not None and 0 < at_socket <= latency + 1e-3
        else:
            assert at_socket is None
    assert ping > 0
    assert server.connections == (4 if close_each else 1)


def test_arrival_is_read_from_the_receive_timestamp() -> None:
    import socket
    import struct

    from bench._serve_clients import _arrival_ns

    stamp = struct.pack("qq", 1_700_000_000, 123_456_789)  # struct timespec
    assert _arrival_ns([(socket.SOL_SOCKET, SO_TIMESTAMPNS or 35, stamp)], None) == \
        1_700_000_000_123_456_789
    assert _arrival_ns([], 5) == 5  # a read without a stamp keeps the last one
    assert _arrival_ns([(socket.IPPROTO_TCP, 1, stamp)], None) is None


def test_after_one_times_the_call_right_after_an_untimed_one() -> None:
    from bench._serve_direct import after_one

    calls: list[int] = []

    def call(index: int) -> str:
        calls.append(index)
        return f"result {index}"

    assert after_one(call, 7) == "result 7"
    assert calls == [8, 7]
