"""The Python client library for a saga cluster.

    client = SagaClient(["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"])
    saga_id = client.submit(definition, payload=b"...")
    info = client.wait_for_end(saga_id)

Any node answers any call (followers forward to the leader), so the client only
needs to reach one node; it tries the others when one is unavailable. Submit
always sends its own saga id, so a retry after a lost answer can never create a
second saga: the cluster answers the retry with the saga the first try created.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from saga.v1 import log_pb2, sagas_pb2, sagas_pb2_grpc

from cluster.grpcutil import channel_to

# Codes after which the same call may be sent again: nothing was done, or the
# call is idempotent (Submit carries its saga id; Abort and Resolve are idempotent).
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
ENDED = frozenset({sagas_pb2.COMPLETED, sagas_pb2.ABORTED})


class SagaClient:
    def __init__(
        self,
        addrs: Sequence[str],
        call_timeout_s: float = 10.0,
        retry_deadline_s: float = 30.0,
    ) -> None:
        if not addrs:
            raise ValueError("give at least one node address")
        self.addrs = list(addrs)
        self.call_timeout_s = call_timeout_s
        self.retry_deadline_s = retry_deadline_s
        self._channels = [channel_to(a) for a in self.addrs]
        self._stubs = [sagas_pb2_grpc.SagasStub(c) for c in self._channels]
        self._preferred = 0

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> SagaClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: str, request: Any) -> Any:
        deadline = time.monotonic() + self.retry_deadline_s
        backoff = 0.05
        i = self._preferred
        while True:
            stub = self._stubs[i % len(self._stubs)]
            try:
                reply = getattr(stub, method)(request, timeout=self.call_timeout_s)
                self._preferred = i % len(self._stubs)
                return reply
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or time.monotonic() + backoff > deadline:
                    raise
            i += 1
            time.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def submit(
        self,
        definition: log_pb2.SagaDefinition,
        payload: bytes = b"",
        saga_id: str | None = None,
    ) -> str:
        """Start a saga; returns its id once StartSaga is committed."""
        saga_id = saga_id or uuid.uuid4().hex
        request = sagas_pb2.SubmitRequest(definition=definition, payload=payload, saga_id=saga_id)
        return str(self._call("Submit", request).saga_id)

    def get(self, saga_id: str) -> sagas_pb2.SagaInfo:
        return self._call("Get", sagas_pb2.GetRequest(saga_id=saga_id))

    def list(self, state: int = 0, page_size: int = 100) -> Iterator[sagas_pb2.SagaSummary]:
        token = ""
        while True:
            reply = self._call(
                "List", sagas_pb2.ListRequest(state=state, page_size=page_size, page_token=token)
            )
            yield from reply.sagas
            token = reply.next_page_token
            if not token:
                return

    def abort(self, saga_id: str, reason: str = "") -> None:
        self._call("Abort", sagas_pb2.AbortRequest(saga_id=saga_id, reason=reason))

    def resolve(self, saga_id: str, vertex: str, reason: str) -> None:
        self._call(
            "Resolve", sagas_pb2.ResolveRequest(saga_id=saga_id, vertex=vertex, reason=reason)
        )

    def watch(self, saga_id: str, from_seq: int = 0) -> Iterator[sagas_pb2.WatchEvent]:
        """Every record of the saga from `from_seq`, live, until EndSaga. Reconnects
        to another node after a failure and resumes where it stopped."""
        seq = from_seq
        deadline = time.monotonic() + self.retry_deadline_s
        i = self._preferred
        while True:
            stub = self._stubs[i % len(self._stubs)]
            try:
                for event in stub.Watch(sagas_pb2.WatchRequest(saga_id=saga_id, from_seq=seq)):
                    yield event
                    seq = event.seq + 1
                    deadline = time.monotonic() + self.retry_deadline_s
                    if event.record.HasField("end_saga"):
                        return
                # The stream ended without EndSaga: the saga ended before `seq`, or the
                # server ended a long stream. Ask again; an ended saga's stream is empty.
                if self.get(saga_id).state in ENDED:
                    return
                continue
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE and exc.code() != grpc.StatusCode.CANCELLED:
                    raise
                if time.monotonic() > deadline:
                    raise
            i += 1
            time.sleep(0.1)

    def wait_for_end(self, saga_id: str, timeout_s: float = 60.0) -> sagas_pb2.SagaInfo:
        """Wait until the saga is COMPLETED or ABORTED; returns its final state."""
        deadline = time.monotonic() + timeout_s
        delay = 0.01
        while True:
            info = self.get(saga_id)
            if info.state in ENDED:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"saga {saga_id} still {sagas_pb2.SagaState.Name(info.state)} "
                    f"after {timeout_s}s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
