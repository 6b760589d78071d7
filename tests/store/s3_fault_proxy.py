"""A small HTTP proxy on 127.0.0.1 that sits in front of an S3 server and injects faults.

Rules are checked in order for each request; a rule that matches and is due fires once.
Faults: an S3 error response (500 InternalError, 503 SlowDown, 403 AccessDenied …), a
connection reset before forwarding, a reset after forwarding (the server applied the
request but the client never hears so: the case that tests idempotent retries), and a
stall before or after forwarding (a slow server; the client may time out and retry).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "expect",
}


@dataclass
class Fault:
    kind: str  # "error", "reset-before", "reset-after", "stall-before", "stall-after"
    status: int = 0
    code: str = ""
    message: str = ""
    seconds: float = 0.0

    @classmethod
    def error(cls, status: int, code: str, message: str = "injected fault") -> Fault:
        return cls("error", status=status, code=code, message=message)

    @classmethod
    def reset(cls, *, after_forward: bool = False) -> Fault:
        return cls("reset-after" if after_forward else "reset-before")

    @classmethod
    def stall(cls, seconds: float, *, after_forward: bool = True) -> Fault:
        return cls("stall-after" if after_forward else "stall-before", seconds=seconds)


@dataclass
class Rule:
    fault: Fault
    method: str | None = None
    path_contains: str | None = None
    query_contains: str | None = None
    every: int = 1  # fire on every n-th matching request …
    times: int | None = 1  # … at most this many times (None: without limit)
    matched: int = 0
    fired: int = 0

    def due(self, method: str, path: str) -> bool:
        target, _, query = path.partition("?")
        if self.method and method != self.method:
            return False
        if self.path_contains and self.path_contains not in target:
            return False
        if self.query_contains and self.query_contains not in query:
            return False
        self.matched += 1
        if self.times is not None and self.fired >= self.times:
            return False
        if self.matched % self.every:
            return False
        self.fired += 1
        return True


@dataclass
class FaultProxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, outcome)

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, fault: Fault, **match: object) -> Rule:
        rule = Rule(fault, **match)  # type: ignore[arg-type]
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def injected(self) -> int:
        with self._lock:
            return sum(rule.fired for rule in self.rules)

    def start(self) -> FaultProxy:
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
            self._server = None

    def _decide(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for rule in self.rules:
                if rule.due(method, path):
                    return rule.fault
        return None

    def _record(self, method: str, path: str, outcome: str) -> None:
        with self._lock:
            self.log.append((method, path, outcome))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, format: str, *args: object) -> None:
        """Silence the per-request access log."""

    def do_GET(self) -> None:
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET  # noqa: N815 - http.server's naming

    def _proxy(self) -> None:
        body = self._read_body()
        fault = self.owner._decide(self.command, self.path)
        kind = fault.kind if fault else "forward"
        self.owner._record(self.command, self.path, kind)
        if fault and fault.kind == "error":
            self._send_error(fault)
            return
        if fault and fault.kind == "reset-before":
            self._reset()
            return
        if fault and fault.kind == "stall-before":
            time.sleep(fault.seconds)
        try:
            status, reason, headers, data = self._forward(body)
        except OSError:
            self._reset()
            return
        if fault and fault.kind == "reset-after":
            self._reset()
            return
        if fault and fault.kind == "stall-after":
            time.sleep(fault.seconds)
        try:
            self.send_response_only(status, reason)
            for name, value in headers:
                lower = name.lower()
                if lower in _HOP_BY_HOP or (lower == "content-length" and self.command != "HEAD"):
                    continue
                self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client gave up (timed out) while we stalled

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    trailer = self.rfile.readline()
                    while trailer not in (b"\r\n", b"\n", b""):
                        trailer = self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self.owner._upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            return response.status, response.reason, response.getheaders(), data
        finally:
            connection.close()

    def _send_error(self, fault: Fault) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{fault.code}</Code><Message>{fault.message}</Message>"
            "<RequestId>FAULTPROXY</RequestId></Error>"
        ).encode()
        self.send_response_only(fault.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", "FAULTPROXY")
        if self.command == "HEAD":
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        self.wfile.flush()

    def _reset(self) -> None:
        """Abort the connection with a TCP RST, as a crashing load balancer would."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
