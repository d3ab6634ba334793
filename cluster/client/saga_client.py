"""The Python client library for a saga cluster.

    with SagaClient(["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"]) as client:
        info = client.run(definition, payload=b"...")      # submit, wait for the end
        saga_id = client.submit(definition, payload=b"...")  # or in two steps
        info = client.wait_for_end(saga_id)

Any node answers any call (followers forward writes to the leader and answer
reads and waits themselves), so the client only needs to reach one node; it
tries the others when one is unavailable. On a cluster of several Raft groups it
reads the shard map from those nodes once and sends each saga's calls to the
nodes of its group (`cluster.client.routing`). Submit and Run always send their own
saga id, so a retry after a lost answer can never create a second saga: the
cluster answers the retry with the saga the first try created. Waiting is pushed
by the node (Run, Watch), never polled. `cluster.client.aio.AsyncSagaClient` has
the same methods for asyncio code.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from saga.v1 import cluster_pb2, cluster_pb2_grpc, log_pb2, sagas_pb2, sagas_pb2_grpc

from cluster.auth import bearer
from cluster.client.routing import Routes
from cluster.grpcutil import channel_to
from cluster.tls import TlsFiles

# Codes after which the same call may be sent again: nothing was done, or the
# call is idempotent (Submit and Run carry their saga id; Abort and Resolve are
# idempotent). CANCELLED is what a call gets when the node serving it stops (a
# rolling restart ends a waiting Run that way) or when gRPC core drops a call
# past its pending-request bound (cluster.grpcutil); this client never cancels
# its own calls, so it is never the caller's wish.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)


def retryable_codes(retry_when_busy: bool) -> frozenset[grpc.StatusCode]:
    return RETRYABLE if retry_when_busy else RETRYABLE - {grpc.StatusCode.RESOURCE_EXHAUSTED}


ENDED = frozenset({sagas_pb2.COMPLETED, sagas_pb2.ABORTED})
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0
DEFAULT_RUN_TIMEOUT_S = 60.0


class Attempts:
    """Where and when to send a call again: the next node, after a growing pause,
    until a deadline. Shared by the blocking and the asyncio client."""

    def __init__(self, nodes: int, first: int, deadline_s: float) -> None:
        self.nodes = nodes
        self.node = first
        self.deadline = time.monotonic() + deadline_s
        self.backoff_s = FIRST_BACKOFF_S

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def again(self, code: grpc.StatusCode, retryable: frozenset = RETRYABLE) -> float | None:
        """After a failure with `code`: the pause before the next attempt, or None
        when the call must fail now.

        RESOURCE_EXHAUSTED is the leader shedding load: the same node is asked
        again (another would only forward to it, at a cost to both), after a
        jittered pause so that refused callers do not return in step. Any other
        retryable code moves on to the next node."""
        if code not in retryable or self.remaining_s() < self.backoff_s:
            return None
        pause, self.backoff_s = self.backoff_s, min(self.backoff_s * 2, MAX_BACKOFF_S)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return pause * random.uniform(0.5, 1.5)
        self.node = (self.node + 1) % self.nodes
        return pause

    def progressed(self, window_s: float) -> None:
        """A stream delivered: give it a fresh window and a short first pause."""
        self.deadline = max(self.deadline, time.monotonic() + window_s)
        self.backoff_s = FIRST_BACKOFF_S


def client_tls(ca: str | None, cert: str | None, key: str | None) -> TlsFiles | None:
    """TLS files of a client: None (plaintext) unless a CA or a certificate is given."""
    if not (ca or cert):
        return None
    if bool(cert) != bool(key):
        raise ValueError("give a client certificate and its key together")
    return TlsFiles(ca=ca, cert=cert, key=key)


def new_saga_id() -> str:
    return uuid.uuid4().hex


def submit_request(
    definition: log_pb2.SagaDefinition, payload: bytes, saga_id: str | None
) -> sagas_pb2.SubmitRequest:
    return sagas_pb2.SubmitRequest(
        definition=definition, payload=payload, saga_id=saga_id or new_saga_id()
    )


def timed_out(saga_id: str, timeout_s: float, what: str) -> TimeoutError:
    return TimeoutError(
        f"saga {saga_id} {what} within {timeout_s}s; it goes on: run it again with "
        "the same saga_id, or wait_for_end, to learn its outcome"
    )


class SagaClient:
    def __init__(
        self,
        addrs: Sequence[str],
        call_timeout_s: float = 10.0,
        retry_deadline_s: float = 30.0,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        retry_when_busy: bool = True,
    ) -> None:
        """`token`: the bearer token of a cluster that runs with --auth-file.
        `tls_ca`: talk TLS, trusting this PEM CA (with a client certificate and key
        where the nodes require one). `retry_when_busy=False`: a Submit or Run the
        leader refuses for load (RESOURCE_EXHAUSTED) fails at once instead of
        being retried, for callers that shed load themselves."""
        if not addrs:
            raise ValueError("give at least one node address")
        self.addrs = list(addrs)
        self.call_timeout_s = call_timeout_s
        self.retry_deadline_s = retry_deadline_s
        self._retryable = retryable_codes(retry_when_busy)
        self._metadata = bearer(token)
        self._tls = client_tls(tls_ca, tls_cert, tls_key)
        self._routes = Routes(self.addrs)
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, sagas_pb2_grpc.SagasStub] = {}

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()

    def _stub(self, addr: str) -> sagas_pb2_grpc.SagasStub:
        with self._lock:
            stub = self._stubs.get(addr)
            if stub is None:
                channel = self._channels[addr] = channel_to(addr, self._tls)
                stub = self._stubs[addr] = sagas_pb2_grpc.SagasStub(channel)
            return stub

    def _nodes_for(self, saga_id: str | None) -> tuple[str, ...]:
        """The nodes to ask about a saga: its group's once the shard map is known."""
        if saga_id is not None and self._routes.should_ask():
            self._routes.learned(self._ask_shard_map())
        return self._routes.nodes_for(saga_id)

    def _ask_shard_map(self) -> cluster_pb2.ShardMapReply | None:
        for addr in self.addrs:
            self._stub(addr)  # opens the channel
            cluster = cluster_pb2_grpc.ClusterStub(self._channels[addr])
            try:
                return cluster.ShardMap(
                    cluster_pb2.ShardMapRequest(),
                    timeout=self.call_timeout_s,
                    metadata=self._metadata,
                )
            except grpc.RpcError:
                continue
        return None

    def __enter__(self) -> SagaClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(
        self,
        method: str,
        request: Any,
        saga_id: str | None,
        deadline_s: float | None = None,
    ) -> Any:
        """A unary call about `saga_id` (None: about no saga), retried on another
        node of its group while the code allows. With `deadline_s`, each attempt
        may last until that overall deadline."""
        nodes = self._nodes_for(saga_id)
        first = self._routes.first(nodes)
        attempts = Attempts(len(nodes), first, deadline_s or self.retry_deadline_s)
        while True:
            stub = self._stub(nodes[attempts.node])
            timeout = attempts.remaining_s() if deadline_s else self.call_timeout_s
            try:
                reply = getattr(stub, method)(
                    request, timeout=max(timeout, 0.001), metadata=self._metadata
                )
                self._routes.answered(nodes, attempts.node)
                return reply
            except grpc.RpcError as exc:
                pause = attempts.again(exc.code(), self._retryable)
                if pause is None:
                    raise
            time.sleep(pause)

    def submit(
        self,
        definition: log_pb2.SagaDefinition,
        payload: bytes = b"",
        saga_id: str | None = None,
    ) -> str:
        """Start a saga; returns its id once StartSaga is committed."""
        request = submit_request(definition, payload, saga_id)
        return str(self._call("Submit", request, request.saga_id).saga_id)

    def run(
        self,
        definition: log_pb2.SagaDefinition,
        payload: bytes = b"",
        saga_id: str | None = None,
        timeout_s: float = DEFAULT_RUN_TIMEOUT_S,
    ) -> sagas_pb2.SagaInfo:
        """Start a saga and return once it has ended (COMPLETED or ABORTED), with
        what `get` answers. One call; the node pushes the end. TimeoutError after
        `timeout_s` (the saga goes on; `run` again with its id re-attaches)."""
        request = submit_request(definition, payload, saga_id)
        try:
            return self._call("Run", request, request.saga_id, deadline_s=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise timed_out(request.saga_id, timeout_s, "did not end") from exc
            raise

    def get(self, saga_id: str) -> sagas_pb2.SagaInfo:
        return self._call("Get", sagas_pb2.GetRequest(saga_id=saga_id), saga_id)

    def list(self, state: int = 0, page_size: int = 100) -> Iterator[sagas_pb2.SagaSummary]:
        token = ""
        while True:
            request = sagas_pb2.ListRequest(state=state, page_size=page_size, page_token=token)
            reply = self._call("List", request, None)  # any node merges every group's page
            yield from reply.sagas
            token = reply.next_page_token
            if not token:
                return

    def abort(self, saga_id: str, reason: str = "") -> None:
        self._call("Abort", sagas_pb2.AbortRequest(saga_id=saga_id, reason=reason), saga_id)

    def resolve(self, saga_id: str, vertex: str, reason: str) -> None:
        request = sagas_pb2.ResolveRequest(saga_id=saga_id, vertex=vertex, reason=reason)
        self._call("Resolve", request, saga_id)

    def watch(
        self, saga_id: str, from_seq: int = 0, timeout_s: float | None = None
    ) -> Iterator[sagas_pb2.WatchEvent]:
        """Every record of the saga from `from_seq`, pushed as it is applied, until
        EndSaga. Resumes on another node after a failure, from the record after the
        last one delivered. With `timeout_s`, TimeoutError once that has passed."""
        seq = from_seq
        window = self.retry_deadline_s if timeout_s is None else timeout_s
        nodes = self._nodes_for(saga_id)
        attempts = Attempts(len(nodes), self._routes.first(nodes), window)
        while True:
            stub = self._stub(nodes[attempts.node])
            request = sagas_pb2.WatchRequest(saga_id=saga_id, from_seq=seq)
            try:
                stream = stub.Watch(
                    request,
                    timeout=timeout_s and max(attempts.remaining_s(), 0),
                    metadata=self._metadata,
                )
                for event in stream:
                    yield event
                    seq = event.seq + 1
                    if timeout_s is None:
                        attempts.progressed(window)
                    if event.record.HasField("end_saga"):
                        return
                # The stream ended without EndSaga: the saga ended before `seq`, or the
                # server ended a long stream. Ask again; an ended saga's stream is empty.
                if self.get(saga_id).state in ENDED:
                    return
                continue
            except grpc.RpcError as exc:
                pause = attempts.again(exc.code(), RETRYABLE)
                if pause is None:
                    if timeout_s is not None and attempts.remaining_s() <= 0:
                        raise timed_out(saga_id, timeout_s, "did not end") from exc
                    raise
            time.sleep(pause)

    def wait_for_end(self, saga_id: str, timeout_s: float = 60.0) -> sagas_pb2.SagaInfo:
        """Wait until the saga is COMPLETED or ABORTED (pushed: follows Watch to
        EndSaga); returns its final state as `get` answers it."""
        try:
            for _ in self.watch(saga_id, timeout_s=timeout_s):
                pass
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise  # FAILED_PRECONDITION: ended and purged by retention; Get answers
        return self.get(saga_id)
