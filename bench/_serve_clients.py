"""The HTTP clients of bench/serve.py: one keep-alive connection each, `post(index)` timing one
`POST /v1/segment` (its body prepared before timing) and `ping()` one `GET /healthz`.

A latency runs from the request's first byte sent to the response's last byte received, as
wrk's or k6's do; the JSON body is parsed after the clock stops (the client's work, not the
server's: ~0.05 ms for a demo reply here)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit


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

    def post(self, index: int) -> tuple[float, int, dict[str, Any]]:
        """Request `index` (its body: bodies[index % len]): (latency s, status, JSON or {})."""
        start = time.perf_counter()
        status, body = self._exchange(self.requests[index % len(self.requests)])
        latency = time.perf_counter() - start
        return latency, status, json.loads(body) if status == 200 else {}

    def ping(self) -> float:
        """Seconds for one `GET /healthz`: the round trip of a request that does no work."""
        start = time.perf_counter()
        status, _ = self._exchange(self.ping_request)
        if status != 200:
            raise ConnectionError(f"GET /healthz answered {status}")
        return time.perf_counter() - start

    def _exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send `request` on the connection (opened if need be); the response's status, body."""
        import httptools

        if self.socket is None:
            self.socket = socket.create_connection((self.address.hostname, self.address.port),
                                                   timeout=300)
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        response = _Response()
        parser = response.parser = httptools.HttpResponseParser(response)
        self.socket.sendall(request)
        while not response.complete:
            data = self.socket.recv(1 << 20)
            if not data:
                raise ConnectionError("the server closed the connection mid-response")
            parser.feed_data(data)
        if not response.keep_alive:
            self.close()
        return parser.get_status_code(), b"".join(response.body)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None


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

    def post(self, index: int) -> tuple[float, int, dict[str, Any]]:
        body, content_type = self.bodies[index % len(self.bodies)]
        start = time.perf_counter()
        self.connection.request("POST", self.root + "/v1/segment", body=body,
                                headers={"Content-Type": content_type})
        response = self.connection.getresponse()
        data = response.read()
        latency = time.perf_counter() - start
        return latency, response.status, json.loads(data) if response.status == 200 else {}

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
