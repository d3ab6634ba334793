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
from saga.v1 import cluster_pb2, cluster_pb2_grpc, log_pb2, sagas_pb2, sagas_pb2_grpc

from cluster.auth import bearer
from cluster.client.routing import Routes
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
from cluster.tls import TlsFiles


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
        self._tls = client_tls(tls_ca, tls_cert, tls_key)
        self._routes = Routes(self.addrs)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, sagas_pb2_grpc.SagasStub] = {}

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    def _stub(self, addr: str) -> sagas_pb2_grpc.SagasStub:
        stub = self._stubs.get(addr)
        if stub is None:  # one event loop: no other coroutine runs in between
            channel = self._channels[addr] = _channel(addr, self._tls)
            stub = self._stubs[addr] = sagas_pb2_grpc.SagasStub(channel)
        return stub

    async def _nodes_for(self, saga_id: str | None) -> tuple[str, ...]:
        """As SagaClient's."""
        if saga_id is not None and self._routes.should_ask():
            self._routes.learned(await self._ask_shard_map())
        return self._routes.nodes_for(saga_id)

    async def _ask_shard_map(self) -> cluster_pb2.ShardMapReply | None:
        for addr in self.addrs:
            self._stub(addr)  # opens the channel
            cluster = cluster_pb2_grpc.ClusterStub(self._channels[addr])
            try:
                return await cluster.ShardMap(
                    cluster_pb2.ShardMapRequest(),
                    timeout=self.call_timeout_s,
                    metadata=self._metadata,
                )
            except grpc.RpcError:
                continue
        return None

    async def __aenter__(self) -> AsyncSagaClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _call(
        self,
        method: str,
        request: Any,
        saga_id: str | None,
        deadline_s: float | None = None,
    ) -> Any:
        nodes = await self._nodes_for(saga_id)
        first = self._routes.first(nodes)
        attempts = Attempts(len(nodes), first, deadline_s or self.retry_deadline_s)
        while True:
            stub = self._stub(nodes[attempts.node])
            timeout = attempts.remaining_s() if deadline_s else self.call_timeout_s
            try:
                reply = await getattr(stub, method)(
                    request, timeout=max(timeout, 0.001), metadata=self._metadata
                )
                self._routes.answered(nodes, attempts.node)
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
        return str((await self._call("Submit", request, request.saga_id)).saga_id)

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
            return await self._call("Run", request, request.saga_id, deadline_s=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise timed_out(request.saga_id, timeout_s, "did not end") from exc
            raise

    async def get(self, saga_id: str) -> sagas_pb2.SagaInfo:
        return await self._call("Get", sagas_pb2.GetRequest(saga_id=saga_id), saga_id)

    async def list(self, state: int = 0, page_size: int = 100) -> AsyncIterator[Any]:
        token = ""
        while True:
            request = sagas_pb2.ListRequest(state=state, page_size=page_size, page_token=token)
            reply = await self._call("List", request, None)  # any node merges the groups
            for summary in reply.sagas:
                yield summary
            token = reply.next_page_token
            if not token:
                return

    async def abort(self, saga_id: str, reason: str = "") -> None:
        request = sagas_pb2.AbortRequest(saga_id=saga_id, reason=reason)
        await self._call("Abort", request, saga_id)

    async def resolve(self, saga_id: str, vertex: str, reason: str) -> None:
        request = sagas_pb2.ResolveRequest(saga_id=saga_id, vertex=vertex, reason=reason)
        await self._call("Resolve", request, saga_id)

    async def watch(
        self, saga_id: str, from_seq: int = 0, timeout_s: float | None = None
    ) -> AsyncIterator[sagas_pb2.WatchEvent]:
        """As SagaClient.watch."""
        seq = from_seq
        window = self.retry_deadline_s if timeout_s is None else timeout_s
        nodes = await self._nodes_for(saga_id)
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


def _channel(addr: str, tls: TlsFiles | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(addr, tls.channel_credentials(), options=CHANNEL_OPTIONS)
