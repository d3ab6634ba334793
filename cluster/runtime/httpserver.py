"""A small HTTP server for /metrics and the web page: routes to plain functions.

Each connection runs on a thread of its own (http.server); their number is bounded
(MAX_HTTP_CONNECTIONS: past it a connection gets 503 at once), and so is a
request body (MAX_HTTP_BODY_BYTES). A handler returns a Response, whose body is
bytes or, for server-sent events, an iterator of chunks written as they come.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("sagacluster.http")

MAX_HTTP_CONNECTIONS = 64
MAX_HTTP_BODY_BYTES = 64 * 1024
HTTP_TIMEOUT_S = 30.0  # an idle connection's socket timeout


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]  # the query string, first value of each
    headers: Any  # email.message.Message: case-insensitive .get
    body: bytes
    match: re.Match[str] | None = None


@dataclass
class Response:
    status: int = 200
    content_type: str = "application/json"
    body: bytes | Iterator[bytes] = b""
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Response]


class Routes:
    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, re.compile(pattern + r"\Z"), handler))

    def extend(self, other: Routes) -> None:
        self._routes.extend(other._routes)

    def find(self, method: str, path: str) -> tuple[Handler | None, re.Match[str] | None, bool]:
        """(handler, match, whether the path exists under another method)."""
        other_method = False
        for m, pattern, handler in self._routes:
            match = pattern.match(path)
            if match is not None:
                if m == method:
                    return handler, match, False
                other_method = True
        return None, None, other_method


class HttpServer:
    def __init__(
        self,
        addr: str,
        routes: Routes,
        tls: ssl.SSLContext | None = None,
        allowed_hosts: frozenset[str] | None = None,
    ) -> None:
        """`allowed_hosts`: the Host headers served (None: any). A page on another
        site whose name resolves to a loopback address (DNS rebinding) sends its own
        name, and is refused."""
        host, _, port = addr.rpartition(":")
        self._slots = threading.BoundedSemaphore(MAX_HTTP_CONNECTIONS)
        handler = _handler_class(routes, self._slots, allowed_hosts)
        self._server = ThreadingHTTPServer((host.strip("[]"), int(port)), handler)
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="http"
        )
        self._thread.daemon = True

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_class(
    routes: Routes, slots: threading.BoundedSemaphore, allowed_hosts: frozenset[str] | None
) -> type:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "sagacluster"
        timeout = HTTP_TIMEOUT_S

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
            log.debug("%s " + format, self.client_address[0], *args)

        def do_GET(self) -> None:  # noqa: N802 (http.server's names)
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def _serve(self, method: str) -> None:
            if not slots.acquire(blocking=False):
                self._send(Response(503, "text/plain", b"too many connections; retry later"))
                return
            try:
                self._send(self._answer(method))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away (a closed page ending its event stream)
            except Exception:
                log.exception("HTTP %s %s", method, self.path)
                self._send(Response(500, "text/plain", b"internal error"))
            finally:
                slots.release()

        def _answer(self, method: str) -> Response:
            if allowed_hosts is not None and self.headers.get("Host") not in allowed_hosts:
                return Response(421, "text/plain", b"this node does not serve that host name")
            url = urlsplit(self.path)
            handler, match, other_method = routes.find(method, url.path)
            if handler is None:
                status = HTTPStatus.METHOD_NOT_ALLOWED if other_method else HTTPStatus.NOT_FOUND
                return Response(status, "text/plain", status.phrase.encode())
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_HTTP_BODY_BYTES:
                self.close_connection = True
                return Response(413, "text/plain", b"the body is too large")
            body = self.rfile.read(length) if length > 0 else b""
            params = {k: v[0] for k, v in parse_qs(url.query).items()}
            return handler(Request(method, url.path, params, self.headers, body, match))

        def _send(self, response: Response) -> None:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("X-Content-Type-Options", "nosniff")
            for name, value in response.headers.items():
                self.send_header(name, value)
            if isinstance(response.body, bytes):
                self.send_header("Content-Length", str(len(response.body)))
                self.end_headers()
                self.wfile.write(response.body)
                return
            self.send_header("Cache-Control", "no-cache")
            self.close_connection = True  # a stream ends with the connection
            self.end_headers()
            stream = response.body
            try:
                for chunk in stream:
                    self.wfile.write(chunk)
                    self.wfile.flush()
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()

    return _Handler
