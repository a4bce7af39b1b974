"""A loopback HTTP proxy in front of the test S3 server whose faults switch at run time.

Modes: ``pass`` (forward), ``stall`` (read the request, never answer), ``delay`` (answer after
`delay_s` seconds), ``refuse`` (reset the connection) and ``error`` (answer 503 SlowDown to a
seeded fraction `p` of requests, forward the rest). Every request is counted by method and
path, so tests can assert how many requests a read made. Threads and the standard library only.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import random
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MODES = ("pass", "stall", "delay", "refuse", "error")
# Headers that describe one connection, not the message: never forwarded.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy:
    """Forwards 127.0.0.1:`port` to `upstream` (http://host:port) with the current fault."""

    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.mode, self.delay_s, self.p = "pass", 0.0, 0.0
        self.only: re.Pattern[str] | None = None
        self.random = random.Random(seed)
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.statuses: collections.Counter[int] = collections.Counter()
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.closed = False
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.proxy = self
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def set(
        self, mode: str, *, delay_s: float = 0.0, p: float = 0.0, only: str | None = None
    ) -> None:
        """Switch to `mode` now, for the requests whose path matches the regex `only` (all
        when None; the others pass); requests held by a stall are released (unanswered)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; available: {', '.join(MODES)}")
        with self.changed:
            self.mode, self.delay_s, self.p = mode, float(delay_s), float(p)
            self.only = re.compile(only) if only else None
            self.changed.notify_all()

    def fault_for(self, seconds: float, mode: str, **params: Any) -> threading.Timer:
        """Switch to `mode` now and back to pass-through after `seconds` (an outage)."""
        self.set(mode, **params)
        timer = threading.Timer(seconds, self.set, args=("pass",))
        timer.daemon = True
        timer.start()
        return timer

    def reset_counts(self) -> None:
        with self.lock:
            self.counts.clear()
            self.statuses.clear()

    def num_requests(self, method: str | None = None, path_contains: str = "") -> int:
        """Requests seen (any fault), by method and a substring of the path."""
        with self.lock:
            return sum(
                n
                for (m, path), n in self.counts.items()
                if (method is None or m == method) and path_contains in path
            )

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def _decide(self, method: str, path: str) -> tuple[str, float]:
        """Count the request; the fault it gets: its mode and, for delay, the seconds."""
        with self.lock:
            self.counts[(method, path)] += 1
            mode = self.mode
            if self.only is not None and not self.only.search(path):
                mode = "pass"
            if mode == "error":
                mode = "error" if self.random.random() < self.p else "pass"
            return mode, self.delay_s

    def _stall(self) -> None:
        """Hold the request until the fault changes or the proxy closes."""
        with self.changed:
            while self.mode == "stall" and not self.closed:
                self.changed.wait()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that timed out and hung up is what the faults are for


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the tests read counts, not logs

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        path = urllib.parse.urlsplit(self.path).path
        mode, delay_s = proxy._decide(self.command, path)
        if mode == "stall":
            proxy._stall()
            self.close_connection = True
            return
        if mode == "refuse":
            self._reset()
            return
        if mode == "error":
            self._answer(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
            return
        if mode == "delay":
            time.sleep(delay_s)
        self._forward(body)

    def _forward(self, body: bytes | None) -> None:
        host, port = self.server.proxy.upstream
        connection = http.client.HTTPConnection(host, port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            kept = {k: v for k, v in response.getheaders() if k.lower() not in HOP_HEADERS}
            self._answer(response.status, kept, data)
        finally:
            connection.close()

    def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
        with self.server.proxy.lock:
            self.server.proxy.statuses[status] += 1
        self.send_response_only(status)
        for key, value in headers.items():
            if key.lower() not in ("content-length", "date", "server"):
                self.send_header(key, value)
        if self.command != "HEAD" or "content-length" not in {k.lower() for k in headers}:
            self.send_header("Content-Length", str(len(data)))
        else:
            self.send_header("Content-Length", headers[_key(headers, "content-length")])
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _reset(self) -> None:
        """Close with an RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()


def _key(headers: dict[str, str], name: str) -> str:
    return next(k for k in headers if k.lower() == name)


@contextmanager
def fault_proxy(upstream: str, *, seed: int = 0) -> Iterator[FaultProxy]:
    """A `FaultProxy` in front of `upstream` until the block ends."""
    proxy = FaultProxy(upstream, seed=seed)
    try:
        yield proxy
    finally:
        proxy.close()
