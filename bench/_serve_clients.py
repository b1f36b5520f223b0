"""The HTTP clients of bench/serve.py: one keep-alive connection each, `post(index)` timing one
`POST /v1/segment` (its body prepared before timing) and `ping()` one `GET /healthz`.

A latency runs from the request's first byte sent to the response's last byte received, as
wrk's or k6's do; the JSON body is parsed after the clock stops (the client's work, not the
server's: ~0.05 ms for a demo reply here). On Linux the lean client also reads when the reply's
last byte reached its socket: the kernel's receive timestamp (`SO_TIMESTAMPNS`), taken as the
server's write is delivered, before the client's CPU wakes and reads it (`Reply.at_socket_s`).
"""

from __future__ import annotations

import http.client
import json
import platform
import socket
import struct
import sys
import time
from typing import Any, NamedTuple
from urllib.parse import urlsplit

# SO_TIMESTAMPNS: Python < 3.14 lacks the name; 35 on Linux x86-64 and arm64 (asm-generic)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform == "linux" and
                         platform.machine() in ("x86_64", "aarch64") else None)
TIMESTAMP_SPACE = socket.CMSG_SPACE(16) if hasattr(socket, "CMSG_SPACE") else 0  # a timespec


class Reply(NamedTuple):
    """One timed request: seconds to the last byte in the client, status, JSON (or {}), and
    seconds to the last byte at the client's socket (None where the kernel does not say)."""

    latency_s: float
    status: int
    body: dict[str, Any]
    at_socket_s: float | None = None


class LeanClient:
    """One keep-alive connection to the server with each request serialized once, before timing
    (h11), and each response parsed by httptools: the client's own work per request stays a few
    microseconds, so the latency it measures is the server's and the network's. (On a 2-core
    machine the client shares the CPUs with the server it measures; `--client stdlib` uses
    `http.client`, whose response parsing alone adds ~0.2 ms per request there.)"""

    def __init__(self, url: str, bodies: list[tuple[bytes, str]]) -> None:
        self.address = urlsplit(url)
        root = self.address.path.rstrip("/")  # a Ray Serve route prefix kept
        self.requests = [self._serialize("POST", root + "/v1/segment", body, content_type)
                         for body, content_type in bodies]
        self.ping_request = self._serialize("GET", root + "/healthz")
        self.socket: socket.socket | None = None
        self.timestamps = False  # the socket delivers receive timestamps (set on connecting)

    def _serialize(self, method: str, target: str, body: bytes = b"",
                   content_type: str | None = None) -> bytes:
        import h11

        writer = h11.Connection(h11.CLIENT)
        headers = [("Host", self.address.netloc), ("Content-Length", str(len(body)))]
        if content_type is not None:
            headers.append(("Content-Type", content_type))
        return b"".join((writer.send(h11.Request(method=method, target=target, headers=headers)),
                         writer.send(h11.Data(data=body)) if body else b"",
                         writer.send(h11.EndOfMessage())))

    def post(self, index: int) -> Reply:
        """Request `index` (its body: bodies[index % len]), timed."""
        start = time.perf_counter()
        status, body, at_socket = self._exchange(self.requests[index % len(self.requests)])
        latency = time.perf_counter() - start
        return Reply(latency, status, json.loads(body) if status == 200 else {}, at_socket)

    def ping(self) -> float:
        """Seconds for one `GET /healthz`: the round trip of a request that does no work."""
        start = time.perf_counter()
        status, _, _ = self._exchange(self.ping_request)
        if status != 200:
            raise ConnectionError(f"GET /healthz answered {status}")
        return time.perf_counter() - start

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.address.hostname, self.address.port), timeout=300)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timestamps = _receive_timestamps(sock)
        return sock

    def _exchange(self, request: bytes) -> tuple[int, bytes, float | None]:
        """Send `request` on the connection (opened if need be): the response's status, body,
        and seconds from the send to its last byte's arrival at the socket (None: unknown)."""
        import httptools

        if self.socket is None:
            self.socket = self._connect()
        response = _Response()
        parser = response.parser = httptools.HttpResponseParser(response)
        sent_ns = time.time_ns()  # the kernel stamps arrivals on this clock (CLOCK_REALTIME)
        self.socket.sendall(request)
        arrived_ns = None
        while not response.complete:
            if self.timestamps:
                data, ancillary, _, _ = self.socket.recvmsg(1 << 20, TIMESTAMP_SPACE)
                arrived_ns = _arrival_ns(ancillary, arrived_ns)
            else:
                data = self.socket.recv(1 << 20)
            if not data:
                raise ConnectionError("the server closed the connection mid-response")
            parser.feed_data(data)
        if not response.keep_alive:
            self.close()
        at_socket = (arrived_ns - sent_ns) / 1e9 if arrived_ns is not None else None
        return parser.get_status_code(), b"".join(response.body), at_socket

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None


def _receive_timestamps(sock: socket.socket) -> bool:
    """Ask the kernel to stamp each segment `sock` receives; whether it will."""
    if SO_TIMESTAMPNS is None or not TIMESTAMP_SPACE:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:  # a kernel without it: latencies in the client only
        return False
    return True


def _arrival_ns(ancillary: list[tuple[int, int, bytes]], previous: int | None) -> int | None:
    """The receive timestamp (ns) in one `recvmsg`'s ancillary data: that of the last segment
    it read; `previous` when it holds none."""
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= 16:
            seconds, nanos = struct.unpack("qq", payload[:16])  # struct timespec
            return seconds * 1_000_000_000 + nanos
    return previous


class _Response:
    """What httptools' response parser calls back: the body's chunks, and the end (with
    whether the connection stays open, which the parser forgets once the message is over)."""

    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.complete = False
        self.keep_alive = False
        self.parser: Any = None

    def on_body(self, chunk: bytes) -> None:
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()


class StdlibClient:
    """`--client stdlib`: the same requests through `http.client` (one keep-alive connection),
    whose parsing is part of every latency it measures."""

    def __init__(self, url: str, bodies: list[tuple[bytes, str]]) -> None:
        address = urlsplit(url)
        self.connection = http.client.HTTPConnection(address.hostname, address.port, timeout=300)
        self.root = address.path.rstrip("/")
        self.bodies = bodies

    def post(self, index: int) -> Reply:
        body, content_type = self.bodies[index % len(self.bodies)]
        start = time.perf_counter()
        self.connection.request("POST", self.root + "/v1/segment", body=body,
                                headers={"Content-Type": content_type})
        response = self.connection.getresponse()
        data = response.read()
        latency = time.perf_counter() - start
        return Reply(latency, response.status, json.loads(data) if response.status == 200 else {})

    def ping(self) -> float:
        start = time.perf_counter()
        self.connection.request("GET", self.root + "/healthz")
        response = self.connection.getresponse()
        response.read()
        if response.status != 200:
            raise ConnectionError(f"GET /healthz answered {response.status}")
        return time.perf_counter() - start

    def close(self) -> None:
        self.connection.close()


CLIENTS = {"lean": LeanClient, "stdlib": StdlibClient}
