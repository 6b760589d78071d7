"""`tokenmill serve` in a child process, and a fault proxy in front of it for the OpenAI engine.

The proxy decides per sample (numbered by the request body, which a retry repeats) and per
attempt, so a test knows how many samples meet which fault: 429 with
Retry-After, 500, a stall past the client's timeout, a connection reset, or a 500 forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.fixtures.s3 import free_port

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}


class ServeProcess:
    """`python -m tokenmill.cli serve MODEL_URI` on a free port of 127.0.0.1."""

    def __init__(self, model_uri: str, *, name: str = "tiny", api_key: str | None = None,
                 delay_ms: float = 0.0) -> None:
        self.port = free_port()
        self.name = name
        env = dict(os.environ)
        env.pop("TOKENMILL_SERVE_API_KEY", None)
        if api_key is not None:
            env["TOKENMILL_SERVE_API_KEY"] = api_key
        command = [sys.executable, "-m", "tokenmill.cli", "serve", model_uri, "--port", str(self.port),
                   "--served-model-name", name, "--device", "cpu"]
        if delay_ms:
            command += ["--delay-ms", str(delay_ms)]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 180.0) -> ServeProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read().decode(errors="replace") if self.process.stdout else ""
                raise RuntimeError(f"tokenmill serve exited with {self.process.returncode}:\n{output}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            time.sleep(0.2)
        raise TimeoutError("tokenmill serve did not become ready")

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include `labels`, scraped now."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as response:
            text = response.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@dataclass
class OpenAIFaultProxy:
    """Forwards to `upstream`; `plan(sample, attempt)` names the fault for a generation
    request: None, "429", "500", "stall", "reset"."""

    upstream_port: int
    plan: Callable[[int, int], str | None]
    stall_seconds: float = 3.0
    retry_after: str = "1"
    attempts: Counter = field(default_factory=Counter)
    log: list[tuple[int, int, str, float]] = field(default_factory=list)  # sample, attempt, outcome, time

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._numbers: dict[str, int] = {}
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> OpenAIFaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def decide(self, body: bytes) -> tuple[int, int, str | None]:
        """The sample's number (bodies in order of first arrival; a retry repeats its body),
        its attempt, and the fault the plan gives them."""
        digest = hashlib.sha256(body).hexdigest()
        with self._lock:
            sample = self._numbers.setdefault(digest, len(self._numbers))
            attempt = self.attempts[sample]
            self.attempts[sample] += 1
        return sample, attempt, self.plan(sample, attempt)

    def record(self, sample: int, attempt: int, outcome: str) -> None:
        with self._lock:
            self.log.append((sample, attempt, outcome, time.monotonic()))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: OpenAIFaultProxy

    def log_message(self, format: str, *args: object) -> None:
        """No access log."""

    def do_GET(self) -> None:
        self._forward(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        sample, attempt, fault = self.owner.decide(body)
        self.owner.record(sample, attempt, fault or "forward")
        if fault == "429":
            self._reply(429, {"error": {"message": "slow down", "type": "rate_limit"}},
                        {"Retry-After": self.owner.retry_after})
        elif fault == "500":
            self._reply(500, {"error": {"message": "injected", "type": "server_error"}})
        elif fault == "reset":
            self._reset()
        elif fault == "stall":
            time.sleep(self.owner.stall_seconds)  # the client times out; nothing is forwarded
            self._reset()
        else:
            self._forward(body)

    def _forward(self, body: bytes) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.owner.upstream_port, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
            status, reply_headers = response.status, response.getheaders()
        except OSError:
            self._reset()
            return
        finally:
            connection.close()
        try:
            self.send_response_only(status)
            for name, value in reply_headers:
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _reply(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _reset(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
