"""The asyncio client: `SagaClient`'s methods as coroutines (grpc.aio).

    async with AsyncSagaClient(["127.0.0.1:8001", "127.0.0.1:8002"]) as client:
        info = await client.run(definition, payload=b"...")
        saga_id = await client.submit(definition)
        async for event in client.watch(saga_id):
            ...

Same retry rules as `cluster.client.SagaClient` (`Attempts`): a call goes to
another node after UNAVAILABLE, RESOURCE_EXHAUSTED or a deadline, with a growing
pause; Submit and Run carry their saga id, so a retry never starts a second saga.
Thousands of `run` or `watch` calls can wait at once on one client: each is a
coroutine on a shared channel, not a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from saga.v1 import log_pb2, sagas_pb2, sagas_pb2_grpc

from cluster.auth import bearer
from cluster.client.saga_client import (
    DEFAULT_RUN_TIMEOUT_S,
    ENDED,
    RETRYABLE,
    Attempts,
    client_tls,
    retryable_codes,
    submit_request,
    timed_out,
)
from cluster.grpcutil import CHANNEL_OPTIONS


class AsyncSagaClient:
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
        """As SagaClient's."""
        if not addrs:
            raise ValueError("give at least one node address")
        self.addrs = list(addrs)
        self.call_timeout_s = call_timeout_s
        self.retry_deadline_s = retry_deadline_s
        self._retryable = retryable_codes(retry_when_busy)
        self._metadata = bearer(token)
        tls = client_tls(tls_ca, tls_cert, tls_key)
        self._channels = [
            grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS)
            if tls is None
            else grpc.aio.secure_channel(a, tls.channel_credentials(), options=CHANNEL_OPTIONS)
            for a in addrs
        ]
        self._stubs = [sagas_pb2_grpc.SagasStub(c) for c in self._channels]
        self._preferred = 0

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> AsyncSagaClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _call(self, method: str, request: Any, deadline_s: float | None = None) -> Any:
        attempts = Attempts(len(self._stubs), self._preferred, deadline_s or self.retry_deadline_s)
        while True:
            stub = self._stubs[attempts.node]
            timeout = attempts.remaining_s() if deadline_s else self.call_timeout_s
            try:
                reply = await getattr(stub, method)(
                    request, timeout=max(timeout, 0.001), metadata=self._metadata
                )
                self._preferred = attempts.node
                return reply
            except grpc.RpcError as exc:
                pause = attempts.again(exc.code(), self._retryable)
                if pause is None:
                    raise
            await asyncio.sleep(pause)

    async def submit(
        self,
        definition: log_pb2.SagaDefinition,
        payload: bytes = b"",
        saga_id: str | None = None,
    ) -> str:
        """Start a saga; returns its id once StartSaga is committed."""
        request = submit_request(definition, payload, saga_id)
        return str((await self._call("Submit", request)).saga_id)

    async def run(
        self,
        definition: log_pb2.SagaDefinition,
        payload: bytes = b"",
        saga_id: str | None = None,
        timeout_s: float = DEFAULT_RUN_TIMEOUT_S,
    ) -> sagas_pb2.SagaInfo:
        """As SagaClient.run."""
        request = submit_request(definition, payload, saga_id)
        try:
            return await self._call("Run", request, deadline_s=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise timed_out(request.saga_id, timeout_s, "did not end") from exc
            raise

    async def get(self, saga_id: str) -> sagas_pb2.SagaInfo:
        return await self._call("Get", sagas_pb2.GetRequest(saga_id=saga_id))

    async def list(self, state: int = 0, page_size: int = 100) -> AsyncIterator[Any]:
        token = ""
        while True:
            request = sagas_pb2.ListRequest(state=state, page_size=page_size, page_token=token)
            reply = await self._call("List", request)
            for summary in reply.sagas:
                yield summary
            token = reply.next_page_token
            if not token:
                return

    async def abort(self, saga_id: str, reason: str = "") -> None:
        await self._call("Abort", sagas_pb2.AbortRequest(saga_id=saga_id, reason=reason))

    async def resolve(self, saga_id: str, vertex: str, reason: str) -> None:
        request = sagas_pb2.ResolveRequest(saga_id=saga_id, vertex=vertex, reason=reason)
        await self._call("Resolve", request)

    async def watch(
        self, saga_id: str, from_seq: int = 0, timeout_s: float | None = None
    ) -> AsyncIterator[sagas_pb2.WatchEvent]:
        """As SagaClient.watch."""
        seq = from_seq
        window = self.retry_deadline_s if timeout_s is None else timeout_s
        attempts = Attempts(len(self._stubs), self._preferred, window)
        while True:
            stub = self._stubs[attempts.node]
            request = sagas_pb2.WatchRequest(saga_id=saga_id, from_seq=seq)
            try:
                stream = stub.Watch(
                    request,
                    timeout=timeout_s and max(attempts.remaining_s(), 0),
                    metadata=self._metadata,
                )
                async for event in stream:
                    yield event
                    seq = event.seq + 1
                    if timeout_s is None:
                        attempts.progressed(window)
                    if event.record.HasField("end_saga"):
                        return
                if (await self.get(saga_id)).state in ENDED:
                    return
                continue
            except grpc.RpcError as exc:
                pause = attempts.again(exc.code(), RETRYABLE)
                if pause is None:
                    if timeout_s is not None and attempts.remaining_s() <= 0:
                        raise timed_out(saga_id, timeout_s, "did not end") from exc
                    raise
            await asyncio.sleep(pause)

    async def wait_for_end(self, saga_id: str, timeout_s: float = 60.0) -> sagas_pb2.SagaInfo:
        """As SagaClient.wait_for_end."""
        try:
            async for _ in self.watch(saga_id, timeout_s=timeout_s):
                pass
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
        return await self.get(saga_id)
