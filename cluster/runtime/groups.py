"""Calls about another Raft group's sagas, sent on to that group.

With more than one group (`cluster.shardmap`), a node still answers every call of
the Sagas service: a call about a saga of another group goes to one of that
group's nodes (one hop, marked so that it is never sent on across groups again),
and List merges every group's page. Clients that route by the shard map skip the
hop; those that do not (grpcurl, a client of another language) still work.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from saga.v1 import sagas_pb2, sagas_pb2_grpc

from cluster.grpcutil import CHANNEL_OPTIONS, channel_to
from cluster.shardmap import Group, ShardMap
from cluster.tls import TlsFiles

# Metadata of a call a node of another group sent on: answer for this group only.
GROUP_HOP = "x-saga-group-hop"


class GroupRouter:
    """This node's group, the others, and a channel to each of their nodes."""

    def __init__(self, shard_map: ShardMap, own: Group, tls: TlsFiles | None) -> None:
        self.shard_map = shard_map
        self.own = own
        self._tls = tls
        # One blocking and one asyncio channel per node, opened on first use and
        # kept (a stub builds a callable per method: once per node, not per call).
        self._stubs: dict[str, sagas_pb2_grpc.SagasStub] = {}
        self._astubs: dict[str, sagas_pb2_grpc.SagasStub] = {}
        self._preferred: dict[int, str] = {}  # group -> the node that answered last

    def foreign(self, saga_id: str) -> Group | None:
        """The group that holds the saga when it is not this node's; None when it is."""
        group = self.shard_map.group_of(saga_id)
        return None if group.index == self.own.index else group

    def others(self) -> list[Group]:
        return [g for g in self.shard_map.groups if g.index != self.own.index]

    def _order(self, group: Group) -> list[str]:
        """The group's nodes, the one that answered last first."""
        first = self._preferred.get(group.index)
        return sorted(group.nodes, key=lambda addr: addr != first)

    def _stub(self, addr: str) -> sagas_pb2_grpc.SagasStub:
        stub = self._stubs.get(addr)
        if stub is None:  # a race opens a second channel at worst; one is kept
            stub = self._stubs.setdefault(
                addr, sagas_pb2_grpc.SagasStub(channel_to(addr, self._tls))
            )
        return stub

    def _astub(self, addr: str) -> sagas_pb2_grpc.SagasStub:
        """An asyncio stub: used only on the gRPC server's event loop."""
        stub = self._astubs.get(addr)
        if stub is None:
            if self._tls is None:
                channel = grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)
            else:
                credentials = self._tls.channel_credentials()
                channel = grpc.aio.secure_channel(addr, credentials, options=CHANNEL_OPTIONS)
            stub = self._astubs[addr] = sagas_pb2_grpc.SagasStub(channel)
        return stub

    def forward(
        self,
        group: Group,
        method: str,
        request: Any,
        metadata: Sequence[tuple[str, str]],
        timeout_s: float | None,
    ) -> Any:
        """The group's answer (blocking). A node that is down (UNAVAILABLE) passes the
        call to the next; any other error is the caller's answer."""
        hop = [*metadata, (GROUP_HOP, str(group.index))]
        left = _budget(timeout_s)
        error: grpc.RpcError | None = None
        for addr in self._order(group):
            try:
                reply = getattr(self._stub(addr), method)(request, timeout=left(), metadata=hop)
                self._preferred[group.index] = addr
                return reply
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                error = exc
        assert error is not None
        raise error

    async def aforward(
        self,
        group: Group,
        method: str,
        request: Any,
        metadata: Sequence[tuple[str, str]],
        timeout_s: float | None,
    ) -> Any:
        """As `forward`, on the event loop (Submit and Run wait there)."""
        hop = [*metadata, (GROUP_HOP, str(group.index))]
        left = _budget(timeout_s)
        error: grpc.RpcError | None = None
        for addr in self._order(group):
            try:
                reply = await getattr(self._astub(addr), method)(
                    request, timeout=left(), metadata=hop
                )
                self._preferred[group.index] = addr
                return reply
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                error = exc
        assert error is not None
        raise error

    async def watch(
        self,
        group: Group,
        request: sagas_pb2.WatchRequest,
        metadata: Sequence[tuple[str, str]],
        timeout_s: float | None,
    ) -> AsyncIterator[sagas_pb2.WatchEvent]:
        """The group's Watch stream, event by event. Moves to the group's next node
        only while nothing was delivered: after that the caller resumes from the
        last sequence number it saw, as after any failover."""
        hop = [*metadata, (GROUP_HOP, str(group.index))]
        left = _budget(timeout_s)
        error: grpc.RpcError | None = None
        for addr in self._order(group):
            delivered = False
            try:
                stream = self._astub(addr).Watch(request, timeout=left(), metadata=hop)
                async for event in stream:
                    delivered = True
                    yield event
                self._preferred[group.index] = addr
                return
            except grpc.RpcError as exc:
                if delivered or exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                error = exc
        assert error is not None
        raise error


def _budget(timeout_s: float | None) -> Callable[[], float | None]:
    """What is left of `timeout_s` at each attempt (None: no deadline)."""
    if timeout_s is None:
        return lambda: None
    deadline = time.monotonic() + timeout_s
    return lambda: max(0.001, deadline - time.monotonic())


def merge_pages(
    pages: Sequence[tuple[Sequence[sagas_pb2.SagaSummary], str]], page_size: int
) -> tuple[list[sagas_pb2.SagaSummary], str]:
    """One List page over every group from each group's page after the same token:
    (sagas in id byte order, next page token).

    Groups hold disjoint ids, each page in byte order. A group whose page has a
    next token has listed everything up to that token and nothing past it, so the
    merged page is complete only up to the smallest such token."""
    key = _id_bytes
    more = [token for _, token in pages if token]
    bound = min(more, key=str.encode) if more else None
    merged = sorted((s for sagas, _ in pages for s in sagas), key=key)
    if bound is not None:
        merged = [s for s in merged if key(s) <= bound.encode()]
    if len(merged) >= page_size:
        merged = merged[:page_size]
        return merged, merged[-1].saga_id
    return merged, bound or ""


def _id_bytes(summary: sagas_pb2.SagaSummary) -> bytes:
    return summary.saga_id.encode()
