"""Tokens and roles on a real cluster: no token, no call; a client cannot abort;
forwarding and ReadIndex carry the caller's own credential to the leader."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from saga.v1 import cluster_pb2, cluster_pb2_grpc, sagas_pb2, sagas_pb2_grpc

from cluster.auth import bearer
from cluster.client.saga_client import SagaClient
from cluster.grpcutil import channel_to
from cluster.testkit.launcher import LocalCluster
from cluster.testkit.travel import TravelParticipants, travel_definition

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    with LocalCluster(str(tmp_path_factory.mktemp("auth")), nodes=3, auth=True).running() as c:
        yield c


@pytest.fixture(scope="module")
def definition(tmp_path_factory, cluster) -> Iterator:
    parts = TravelParticipants(str(tmp_path_factory.mktemp("auth-parts")))
    parts.start_all()
    try:
        parts.wait_ready(15)
        yield travel_definition(parts.endpoints)
    finally:
        parts.stop_all()


def _follower(cluster: LocalCluster) -> str:
    leader = cluster.wait_for_leader(10).id
    return next(s.grpc_addr for n, s in cluster.specs.items() if n != leader)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value.code()


@pytest.mark.parametrize("token", [None, "not-a-token", "x" * 600])
def test_a_call_without_a_valid_token_is_unauthenticated(cluster, definition, token) -> None:
    addr = _follower(cluster)
    with channel_to(addr) as channel:
        sagas = sagas_pb2_grpc.SagasStub(channel)
        meta = bearer(token)
        submit = sagas_pb2.SubmitRequest(definition=definition, saga_id="anon")
        assert _code(lambda: sagas.Submit(submit, timeout=5, metadata=meta)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        get = sagas_pb2.GetRequest(saga_id="anon")
        assert _code(lambda: sagas.Get(get, timeout=5, metadata=meta)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        watch = sagas_pb2.WatchRequest(saga_id="anon")
        assert _code(lambda: list(sagas.Watch(watch, timeout=5, metadata=meta))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        status = cluster_pb2.StatusRequest()
        stub = cluster_pb2_grpc.ClusterStub(channel)
        assert _code(lambda: stub.Status(status, timeout=5, metadata=meta)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )


def test_roles_decide_who_may_do_what_and_followers_forward_the_callers_token(
    cluster, definition
) -> None:
    addr = _follower(cluster)
    tokens = cluster.tokens
    with SagaClient([addr], token=tokens["client"], retry_deadline_s=5) as client:
        # Forwarded to the leader with the client's token; waited for on the follower.
        info = client.run(definition, saga_id="authorized-trip", timeout_s=30)
        assert info.state == sagas_pb2.COMPLETED
        assert client.get("authorized-trip").state == sagas_pb2.COMPLETED  # ReadIndex
        assert [s.saga_id for s in client.list()] == ["authorized-trip"]
        saga_id = client.submit(definition, saga_id="to-abort")
        assert _code(lambda: client.abort(saga_id, "a client may not")) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
    with SagaClient([addr], token=tokens["operator"], retry_deadline_s=5) as operator:
        operator.wait_for_end("to-abort", 30)
        # Allowed to try: the saga has ended, so the answer is about the saga, not the role.
        assert _code(lambda: operator.abort("to-abort", "too late")) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
    with channel_to(addr) as channel:
        stub = cluster_pb2_grpc.ClusterStub(channel)
        forget = cluster_pb2.ForgetMemberRequest(node_id="n9")
        assert _code(
            lambda: stub.ForgetMember(forget, timeout=5, metadata=bearer(tokens["operator"]))
        ) == (grpc.StatusCode.PERMISSION_DENIED)
        reply = stub.ForgetMember(forget, timeout=10, metadata=bearer(tokens["admin"]))
        assert reply.result.verdict  # an admin may
    logs = cluster.logs(200)
    assert "test-operator (operator) calls /saga.v1.Sagas/Abort" in logs
    assert "test-client (client) may not call /saga.v1.Sagas/Abort" in logs
    assert "test-admin (admin) calls /saga.v1.Cluster/ForgetMember" in logs
