"""A small HTTP server for /metrics and the web page: routes to plain functions.

Each connection runs on a thread of its own (http.server). Bounds: at most
MAX_HTTP_CONNECTIONS connections at once (past it a new one is closed at once,
before it costs a thread), an idle connection is dropped after HTTP_IDLE_S, and a
request body is at most MAX_HTTP_BODY_BYTES. With TLS the handshake runs on the
connection's own thread under the same timeout, so a client that connects and
says nothing holds only its own thread, never the listener. A handler returns a
Response, whose body is bytes or, for server-sent events, an iterator of chunks
written as they come (closed however the connection ends).
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("sagacluster.http")

MAX_HTTP_CONNECTIONS = 64
MAX_HTTP_BODY_BYTES = 64 * 1024
HTTP_IDLE_S = 10.0  # a connection that sends nothing this long is closed


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
    body: bytes | Iterable[bytes] = b""
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], handler: type, tls: ssl.SSLContext | None) -> None:
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        self.tls = tls
        self._connections = threading.BoundedSemaphore(MAX_HTTP_CONNECTIONS)
        super().__init__(addr, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connections.acquire(blocking=False):
            self.shutdown_request(request)  # full: closed before it costs a thread
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A failed handshake, a reset or a timeout: the client's problem, not ours.
        log.debug("HTTP connection from %s failed", client_address, exc_info=True)


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
        handler = _handler_class(routes, allowed_hosts)
        self._server = _Server((host.strip("[]"), int(port)), handler, tls)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="http"
        )
        self._thread.daemon = True
        self._started = False

    def start(self) -> None:
        self._thread.start()
        self._started = True

    def stop(self) -> None:
        if self._started:  # shutdown() waits for a serve_forever that never ran
            self._server.shutdown()
        self._server.server_close()


def _handler_class(routes: Routes, allowed_hosts: frozenset[str] | None) -> type:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "sagacluster"
        timeout = HTTP_IDLE_S

        def setup(self) -> None:
            tls = self.server.tls  # type: ignore[attr-defined]
            if tls is not None:
                self.request.settimeout(self.timeout)
                self.request = tls.wrap_socket(self.request, server_side=True)
            super().setup()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
            log.debug("%s " + format, self.client_address[0], *args)

        def do_GET(self) -> None:  # noqa: N802 (http.server's names)
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def _serve(self, method: str) -> None:
            try:
                self._send(self._answer(method))
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                self.close_connection = True  # the client went away
            except Exception:
                log.exception("HTTP %s %s", method, self.path)
                self.close_connection = True
                self._send(Response(500, "text/plain", b"internal error"))

        def _answer(self, method: str) -> Response:
            # Until the body is read the connection cannot carry another request.
            self.close_connection = True
            if self.headers.get("Transfer-Encoding"):
                return Response(501, "text/plain", b"send a Content-Length, not chunks")
            if allowed_hosts is not None and self.headers.get("Host") not in allowed_hosts:
                return Response(421, "text/plain", b"this node does not serve that host name")
            url = urlsplit(self.path)
            handler, match, other_method = routes.find(method, url.path)
            if handler is None:
                status = HTTPStatus.METHOD_NOT_ALLOWED if other_method else HTTPStatus.NOT_FOUND
                return Response(status, "text/plain", status.phrase.encode())
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return Response(400, "text/plain", b"a bad Content-Length")
            if not 0 <= length <= MAX_HTTP_BODY_BYTES:
                return Response(413, "text/plain", b"the body is too large")
            body = self.rfile.read(length) if length > 0 else b""
            self.close_connection = False
            params = {k: v[0] for k, v in parse_qs(url.query).items()}
            return handler(Request(method, url.path, params, self.headers, body, match))

        def _send(self, response: Response) -> None:
            body = response.body
            try:
                self.send_response(response.status)
                self.send_header("Content-Type", response.content_type)
                self.send_header("X-Content-Type-Options", "nosniff")
                for name, value in response.headers.items():
                    self.send_header(name, value)
                if isinstance(body, bytes):
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_header("Cache-Control", "no-cache")
                self.close_connection = True  # a stream ends with the connection
                self.end_headers()
                for chunk in body:
                    self.wfile.write(chunk)
                    self.wfile.flush()
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()  # a stream's resources, however the connection ended

    return _Handler
