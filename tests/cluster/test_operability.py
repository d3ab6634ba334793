"""What an operator's stock tools see on a real cluster with auth on: gRPC health
(without a token, as load balancers probe) and server reflection (with one)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from cluster.auth import bearer
from cluster.grpcutil import channel_to
from cluster.testkit.launcher import LocalCluster

pytestmark = pytest.mark.cluster

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    with LocalCluster(str(tmp_path_factory.mktemp("ops")), nodes=3, auth=True).running() as c:
        yield c


def _health(addr: str, service: str = "", timeout_s: float = 2.0) -> int:
    with channel_to(addr) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
    return reply.status


def _wait_health(addr: str, service: str, want: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = _health(addr, service)
        except grpc.RpcError as exc:
            seen = exc.code()
        if seen == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"{addr} {service!r}: health {seen}, wanted {want}")


def test_every_node_reports_serving_to_a_health_probe_without_a_token(cluster) -> None:
    for spec in cluster.specs.values():
        for service in ("", "saga.v1.Sagas", "saga.v1.Cluster"):
            _wait_health(spec.grpc_addr, service, SERVING)
    with pytest.raises(grpc.RpcError) as unknown:
        _health(cluster.specs["n1"].grpc_addr, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_stock_reflection_client_lists_the_services_with_a_token_only(cluster) -> None:
    addr = cluster.specs["n2"].grpc_addr
    with channel_to(addr) as channel:
        anonymous = ProtoReflectionDescriptorDatabase(channel)
        with pytest.raises(grpc.RpcError) as refused:
            anonymous.get_services()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with channel_to(addr) as channel:
        intercepted = grpc.intercept_channel(channel, _Metadata(bearer(cluster.tokens["client"])))
        db = ProtoReflectionDescriptorDatabase(intercepted)
        services = set(db.get_services())
        assert {"saga.v1.Sagas", "saga.v1.Cluster", "grpc.health.v1.Health"} <= services
        # The schema itself comes through: a generic client can build a Submit.
        schema = db.FindFileContainingSymbol("saga.v1.Sagas")
        assert any(m.name == "Submit" for s in schema.service for m in s.method)


def test_a_stopping_node_tells_its_health_watchers_it_no_longer_serves(cluster) -> None:
    """A draining node answers NOT_SERVING before it closes, so a balancer moves on;
    the other nodes go on serving once a leader is in office."""
    leader = cluster.leader_id()
    victim = next(n for n in cluster.specs if n != leader)
    addr = cluster.specs[victim].grpc_addr
    _wait_health(addr, "saga.v1.Sagas", SERVING)
    seen: list[int] = []
    with channel_to(addr) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="saga.v1.Sagas"), timeout=20
        )
        seen.append(next(stream).status)
        cluster.kill(victim, signal.SIGTERM)
        try:
            for reply in stream:
                seen.append(reply.status)
        except grpc.RpcError:
            pass  # the server closed the stream after it said NOT_SERVING
    assert seen[0] == SERVING and NOT_SERVING in seen[1:], seen
    cluster.start(victim)
    for spec in cluster.specs.values():
        _wait_health(spec.grpc_addr, "saga.v1.Sagas", SERVING, timeout_s=20)


class _Metadata(grpc.StreamStreamClientInterceptor):
    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = metadata

    def intercept_stream_stream(self, continuation, details, requests):
        details = details._replace(metadata=list(details.metadata or []) + self._metadata)
        return continuation(details, requests)
