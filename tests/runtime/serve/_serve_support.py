"""Helpers of the segclip-serve tests: a real server process on 127.0.0.1, images, problems."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

STARTUP_S = 90.0  # bound on a server's start + warm-up on a loaded machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc status")


@contextmanager
def serve(bundle: Path, tmp: Path, *options: str, wait_ready: bool = True,
          program: Sequence[str] = (sys.executable, "-m", "segclip.runtime.serve.cli"),
          ) -> Iterator[Server]:
    """`segclip-serve --engine bundle` on a free port; stopped (and waited for) on exit.

    `program`: how to start segclip-serve (default: this interpreter's module; another
    environment's `bin/segclip-serve` tests that install)."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*program, "--engine", str(bundle),
               "--host", "127.0.0.1", "--port", str(port), "--threads", "1", *options]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + STARTUP_S
        path = "/readyz" if wait_ready else "/healthz"
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}:\n"
                                     f"{log.read_text()}")
            try:
                if httpx.get(server.url + path, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready after {STARTUP_S} s:\n{log.read_text()}")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


def image_bytes(height: int, width: int, seed: int, fmt: str = "PNG") -> bytes:
    """A blocky random RGB image (a few flat rectangles), encoded."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = rng.integers(0, 255, 3)
    for _ in range(3):
        y, x = rng.integers(0, height), rng.integers(0, width)
        pixels[y:y + height // 2, x:x + width // 2] = rng.integers(0, 255, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def segment_multipart(client: httpx.Client, data: bytes, labels: Sequence[str] | None = None,
                      **fields: str) -> httpx.Response:
    form = dict(fields)
    if labels is not None:
        form["labels"] = "\n".join(labels)
    return client.post("/v1/segment", files={"image": ("image.png", data, "image/png")},
                       data=form)


def assert_problem(response: httpx.Response, status: int, *fragments: str) -> dict:
    """The response is an RFC 9457 problem with `status`, its detail naming `fragments`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["type"].startswith("urn:segclip:problem:")
    assert body["title"] and isinstance(body["detail"], str) and body["detail"]
    for fragment in fragments:
        assert fragment in body["detail"], body
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body
