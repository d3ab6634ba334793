"""A small client for the Saga Log's low-level `Cluster.Propose`, with safe retries.

Retrying is safe because a record proposed twice is applied once (DUPLICATE).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
from saga.v1 import cluster_pb2, cluster_pb2_grpc, log_pb2

from cluster.grpcutil import channel_to
from sagalog import codec

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class LogClient:
    def __init__(self, addrs: Sequence[str]) -> None:
        self.addrs = list(addrs)
        self._channels = {a: channel_to(a) for a in self.addrs}

    def stub(self, addr: str) -> cluster_pb2_grpc.ClusterStub:
        return cluster_pb2_grpc.ClusterStub(self._channels[addr])

    def propose(
        self,
        records: Sequence[log_pb2.Record],
        via: str | None = None,
        deadline_s: float = 10.0,
        attempt_timeout_s: float = 2.0,
    ) -> log_pb2.BatchResult:
        """Propose through `via` (or each node in turn) until a result or the deadline."""
        batch = codec.encode_batch(list(records))
        order = [via] if via else self.addrs
        deadline = time.monotonic() + deadline_s
        i = 0
        last: grpc.RpcError | None = None
        while time.monotonic() < deadline:
            addr = order[i % len(order)]
            i += 1
            try:
                reply = self.stub(addr).Propose(
                    cluster_pb2.ProposeRequest(
                        batch=batch, timeout_ms=int(attempt_timeout_s * 1000)
                    ),
                    timeout=attempt_timeout_s + 1,
                )
                return reply.result
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
                last = exc
                time.sleep(0.05)
        raise TimeoutError(f"no node committed the batch within {deadline_s}s: {last}")

    def digest(self, addr: str, timeout_s: float = 5.0) -> cluster_pb2.DigestReply:
        return self.stub(addr).Digest(cluster_pb2.DigestRequest(), timeout=timeout_s)

    def __enter__(self) -> LogClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
