"""The web page every node serves at `--http-addr`: the cluster, a searchable saga
list, and a page per saga drawing its DAG, live.

The page is static files (`cluster/runtime/static/`, no build step) over a small
JSON API. The API is a gateway to this node's own gRPC services, called with the
browser's bearer token: the same methods, roles and checks as any gRPC client
(Abort and Resolve need the operator role when auth is on), and nothing a page
sends can reach the log another way. Live updates are server-sent events fed by
this node's Watch stream (the push path). POSTs must carry JSON, so that a form
on another site cannot post to a node on the operator's loopback.
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any
from urllib.parse import unquote

import grpc
from saga.v1 import cluster_pb2, cluster_pb2_grpc, log_pb2, sagas_pb2, sagas_pb2_grpc

from cluster.grpcutil import channel_to
from cluster.runtime.config import NodeConfig, is_loopback, node_tls
from cluster.runtime.httpserver import Handler, Request, Response, Routes
from sagalog.records import definition_in, fields_of

log = logging.getLogger("sagacluster.web")

CALL_TIMEOUT_S = 3.0
STATUS_TIMEOUT_S = 1.0
MAX_EVENT_STREAMS = 32  # pages following a saga live on this node at once
EVENT_HEARTBEAT_S = 5.0  # a comment line this often: finds pages that went away
MAX_LIST_SCAN = 5_000  # sagas a search reads through before it answers
MAX_LIST_RESULTS = 200
MAX_OUTPUT_CHARS = 200  # of a vertex's output, shown as text

STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
    "/static/common.js": ("common.js", "text/javascript; charset=utf-8"),
    "/static/index.js": ("index.js", "text/javascript; charset=utf-8"),
    "/static/saga.js": ("saga.js", "text/javascript; charset=utf-8"),
}
SAGA_ID = r"(?P<saga_id>[^/]{1,256})"

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def _json(value: Any, status: int = 200) -> Response:
    return Response(status, "application/json", json.dumps(value).encode())


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def record_json(seq: int, record: log_pb2.Record) -> dict[str, Any]:
    """A record for the timeline: its body's name and fields (bytes as a length)."""
    body, fields = fields_of(record)
    return {
        "seq": seq,
        "time_unix_ms": record.time_unix_ms,
        "epoch": record.epoch,
        "body": body,
        "fields": fields,
    }


def saga_json(info: sagas_pb2.SagaInfo) -> dict[str, Any]:
    """A saga for its page: state, the DAG with each vertex's state, the records."""
    definition = definition_in(info.records)
    shape = {v.name: v for v in definition.vertices}
    vertices = []
    for v in info.vertices:
        d = shape.get(v.name, log_pb2.Vertex())
        vertices.append(
            {
                "name": v.name,
                "state": sagas_pb2.VertexState.Name(v.state),
                "attempts": v.attempts,
                "compensation_attempts": v.compensation_attempts,
                "output": v.output[:MAX_OUTPUT_CHARS].decode(errors="replace"),
                "error": v.error,
                "depends_on": list(d.depends_on),
                "endpoint": d.endpoint,
                "request": d.request,
                "compensation": d.compensation,
            }
        )
    return {
        "saga_id": info.saga_id,
        "state": sagas_pb2.SagaState.Name(info.state),
        "name": info.name,
        "abort_reason": info.abort_reason,
        "started_unix_ms": info.started_unix_ms,
        "ended_unix_ms": info.ended_unix_ms,
        "purged": info.purged,
        "vertices": vertices,
        "records": [record_json(i + 1, r) for i, r in enumerate(info.records)],
    }


def http_tls(config: NodeConfig) -> ssl.SSLContext | None:
    """HTTPS with the node's own certificate, when it serves gRPC with TLS."""
    if not config.tls_cert or not config.tls_key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_require_client_cert:
        # The page reaches the gRPC API through this node's own certificate: it must
        # ask browsers for theirs, or it would be a way around mutual TLS.
        assert config.tls_ca is not None
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(config.tls_ca)
    return context


def allowed_hosts(addr: str) -> frozenset[str] | None:
    """On a loopback address, the Host headers that name it; elsewhere any (the
    operator chose the name, and auth and TLS are required there)."""
    if not is_loopback(addr):
        return None
    host, _, port = addr.rpartition(":")
    return frozenset({addr, f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", host})


class WebGateway:
    """The JSON API and static files, calling this node's gRPC server."""

    def __init__(self, config: NodeConfig) -> None:
        self._config = config
        self._channel = channel_to(config.grpc_addr, node_tls(config))
        self._sagas = sagas_pb2_grpc.SagasStub(self._channel)
        self._streams = threading.BoundedSemaphore(MAX_EVENT_STREAMS)
        # A channel per member's gRPC address, opened when the member is first seen
        # (membership changes at run time: the list comes from this node's Status).
        self._peer_channels = {config.grpc_addr: self._channel}
        self._channels_lock = threading.Lock()

    def routes(self) -> Routes:
        routes = Routes()
        for path in STATIC:
            routes.add("GET", path, self._static)
        routes.add("GET", "/sagas/" + SAGA_ID, self._static_saga)
        routes.add("GET", "/favicon.ico", lambda request: Response(204, "image/x-icon"))
        api = [
            ("GET", "/api/cluster", self._cluster),
            ("GET", "/api/sagas", self._list),
            ("GET", "/api/sagas/" + SAGA_ID, self._get),
            ("GET", "/api/sagas/" + SAGA_ID + "/events", self._events),
            ("POST", "/api/sagas/" + SAGA_ID + "/abort", self._abort),
            ("POST", "/api/sagas/" + SAGA_ID + "/resolve", self._resolve),
        ]
        for method, path, handler in api:
            routes.add(method, path, _answering_refusals(handler))
        return routes

    def close(self) -> None:
        for channel in self._peer_channels.values():
            channel.close()

    # ---- static files ----------------------------------------------------------------

    def _static(self, request: Request) -> Response:
        name, content_type = STATIC[request.path]
        return self._file(name, content_type)

    def _static_saga(self, request: Request) -> Response:
        return self._file("saga.html", "text/html; charset=utf-8")

    @staticmethod
    def _file(name: str, content_type: str) -> Response:
        body = resources.files("cluster.runtime").joinpath("static", name).read_bytes()
        return Response(200, content_type, body, {"Cache-Control": "no-cache"})

    # ---- the API ---------------------------------------------------------------------

    @staticmethod
    def _metadata(request: Request) -> list[tuple[str, str]]:
        auth = request.headers.get("Authorization")
        return [("authorization", auth)] if auth else []

    def _call(self, method: Any, message: Any, request: Request) -> Any:
        try:
            return method(message, timeout=CALL_TIMEOUT_S, metadata=self._metadata(request))
        except grpc.RpcError as exc:
            raise _Refused(exc) from None

    def _peer_channel(self, addr: str) -> grpc.Channel:
        with self._channels_lock:
            channel = self._peer_channels.get(addr)
            if channel is None:
                channel = self._peer_channels[addr] = channel_to(addr, node_tls(self._config))
            return channel

    def _cluster(self, request: Request) -> Response:
        # This node's Status names the members (they change at run time) and is its
        # own row; every other member is asked for its own.
        own = self._call(
            cluster_pb2_grpc.ClusterStub(self._channel).Status, cluster_pb2.StatusRequest(), request
        )
        nodes = [_node_row(own)]
        for member in own.members:
            if member.id == self._config.id or not member.grpc_addr:
                continue
            try:
                status = cluster_pb2_grpc.ClusterStub(self._peer_channel(member.grpc_addr)).Status(
                    cluster_pb2.StatusRequest(),
                    timeout=STATUS_TIMEOUT_S,
                    metadata=self._metadata(request),
                )
            except grpc.RpcError as exc:
                if exc.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                ):
                    return _error(_HTTP_STATUS[exc.code()], exc.details() or exc.code().name)
                nodes.append({"id": member.id, "reachable": False, "error": exc.code().name})
                continue
            nodes.append(_node_row(status))
        nodes.sort(key=lambda row: row["id"])
        return _json({"served_by": self._config.id, "nodes": nodes})

    def _list(self, request: Request) -> Response:
        state_name = request.params.get("state", "")
        try:
            state = sagas_pb2.SagaState.Value(state_name) if state_name else 0
        except ValueError:
            return _error(400, f"unknown state {state_name!r}")
        query = request.params.get("q", "").lower()
        token = request.params.get("page_token", "")
        found: list[dict[str, str]] = []
        scanned = 0
        while len(found) < MAX_LIST_RESULTS and scanned < MAX_LIST_SCAN:
            reply = self._call(
                self._sagas.List,
                sagas_pb2.ListRequest(state=state, page_size=1000, page_token=token),  # type: ignore[arg-type]
                request,
            )
            for summary in reply.sagas:
                if len(found) >= MAX_LIST_RESULTS:
                    break
                scanned += 1
                if query in summary.saga_id.lower() or query in summary.name.lower():
                    found.append(
                        {
                            "saga_id": summary.saga_id,
                            "state": sagas_pb2.SagaState.Name(summary.state),
                            "name": summary.name,
                        }
                    )
            token = reply.next_page_token
            if not token:
                break
        return _json({"sagas": found, "next_page_token": token, "scanned": scanned})

    def _get(self, request: Request) -> Response:
        saga_id = _saga_id(request)
        info = self._call(self._sagas.Get, sagas_pb2.GetRequest(saga_id=saga_id), request)
        return _json(saga_json(info))

    def _abort(self, request: Request) -> Response:
        body = _json_body(request)
        if isinstance(body, Response):
            return body
        saga_id = _saga_id(request)
        reason = str(body.get("reason") or "aborted from the web page")
        self._call(
            self._sagas.Abort, sagas_pb2.AbortRequest(saga_id=saga_id, reason=reason), request
        )
        return _json({})

    def _resolve(self, request: Request) -> Response:
        body = _json_body(request)
        if isinstance(body, Response):
            return body
        vertex, reason = str(body.get("vertex") or ""), str(body.get("reason") or "")
        if not vertex or not reason:
            return _error(400, "give the vertex and the reason (it is logged)")
        saga_id = _saga_id(request)
        message = sagas_pb2.ResolveRequest(saga_id=saga_id, vertex=vertex, reason=reason)
        self._call(self._sagas.Resolve, message, request)
        return _json({})

    def _events(self, request: Request) -> Response:
        """Server-sent events: each of the saga's records from `from` on, as this node
        applies them (its Watch stream), then an `end` event."""
        try:
            from_seq = max(0, int(request.params.get("from", "0")))
        except ValueError:
            return _error(400, "from: a record number")
        if not self._streams.acquire(blocking=False):
            return _error(429, f"{MAX_EVENT_STREAMS} pages already follow sagas on this node")
        watch = sagas_pb2.WatchRequest(saga_id=_saga_id(request), from_seq=from_seq)
        stream = EventStream(self._sagas, watch, self._metadata(request), self._streams.release)
        return Response(200, "text/event-stream", stream)


class EventStream:
    """One page following a saga: the node's Watch stream, read on a thread of its
    own into a bounded queue, written out as server-sent events with a heartbeat
    (which finds pages that went away). `close` (called however the connection
    ends, even before the first chunk) cancels the Watch and frees the page's slot."""

    def __init__(
        self,
        sagas: sagas_pb2_grpc.SagasStub,
        watch: sagas_pb2.WatchRequest,
        metadata: list[tuple[str, str]],
        release: Callable[[], None],
    ) -> None:
        self._events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(maxsize=1024)
        self._closed = threading.Event()
        self._release = release
        self._call: Any = None
        try:
            self._call = sagas.Watch(watch, metadata=metadata)
        except Exception:
            self.close()
            raise
        threading.Thread(target=self._pump, name="web-watch", daemon=True).start()

    def _put(self, kind: str, data: dict[str, Any]) -> bool:
        while not self._closed.is_set():
            try:
                self._events.put((kind, data), timeout=EVENT_HEARTBEAT_S)
                return True
            except queue.Full:
                continue  # a slow page: gRPC's flow control holds the node meanwhile
        return False

    def _pump(self) -> None:
        try:
            for event in self._call:
                if not self._put("record", record_json(event.seq, event.record)):
                    return
            self._put("end", {})
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                self._put("end", {})
            else:
                self._put("error", {"code": exc.code().name, "error": exc.details()})

    def __iter__(self) -> Iterator[bytes]:
        yield b"retry: 1000\n\n"
        while True:
            try:
                kind, data = self._events.get(timeout=EVENT_HEARTBEAT_S)
            except queue.Empty:
                yield b": heartbeat\n\n"
                continue
            yield f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
            if kind != "record":
                return

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._call is not None:
            self._call.cancel()
        self._release()


class _Refused(Exception):
    def __init__(self, exc: grpc.RpcError) -> None:
        self.status = _HTTP_STATUS.get(exc.code(), 502)
        self.message = exc.details() or exc.code().name
        super().__init__(self.message)


def _node_row(status: cluster_pb2.StatusReply) -> dict[str, Any]:
    """A node's row in the cluster table, from its own Status."""
    return {
        "id": status.id,
        "reachable": True,
        "role": cluster_pb2.Role.Name(status.role).lower(),
        "term": status.term,
        "epoch": status.epoch,
        "commit_index": status.commit_index,
        "applied_index": status.applied_index,
        "leader_id": status.leader_id,
        "in_office": status.in_office,
        "ready": status.ready,
    }


def _answering_refusals(handler: Handler) -> Handler:
    """A gRPC refusal becomes the HTTP status that says the same."""

    def answer(request: Request) -> Response:
        try:
            return handler(request)
        except _Refused as exc:
            return _error(exc.status, exc.message)

    return answer


def _saga_id(request: Request) -> str:
    """The saga id in the path, as the page encoded it (encodeURIComponent)."""
    assert request.match is not None
    return unquote(request.match["saga_id"])


def _json_body(request: Request) -> dict[str, Any] | Response:
    if not (request.headers.get("Content-Type") or "").startswith("application/json"):
        return _error(415, "send application/json")
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        return _error(400, "the body is not JSON")
    return body if isinstance(body, dict) else _error(400, "send a JSON object")
