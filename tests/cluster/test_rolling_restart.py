"""A rolling restart under a steady saga load: every node restarted in turn, the
leader last after handing leadership over; not one saga fails. Ends with the saga
guarantee at the participants and identical replicas."""

from __future__ import annotations

import grpc
import pytest
from saga.v1 import cluster_pb2, sagas_pb2
from test_membership import steady_load
from test_sagas import check_guarantee

from cluster.client.saga_client import SagaClient
from cluster.testkit.launcher import LocalCluster
from cluster.testkit.rolling import InProcess, rolling_restart
from cluster.testkit.travel import TravelParticipants, travel_definition

pytestmark = pytest.mark.cluster


def test_a_rolling_restart_under_load_fails_no_saga(tmp_path) -> None:
    parts = TravelParticipants(str(tmp_path / "parts"))
    cluster = LocalCluster(str(tmp_path / "cluster"), nodes=3, auth=True)
    with parts, cluster.running():
        definition = travel_definition(parts.endpoints)
        addrs = [s.grpc_addr for s in cluster.specs.values()]
        with steady_load(addrs, cluster.tokens["client"], definition, "roll") as results:
            before = len(results)
            order = rolling_restart(InProcess(cluster), log=print)
            during = len(results) - before
        assert len(order) == 3 and order[-1] != order[0]
        failed = {s: r for s, r in results.items() if r != sagas_pb2.COMPLETED}
        assert not failed, failed
        assert during > 0, "no saga ran during the restart"
        print(f"{len(results)} sagas, {during} of them during the rolling restart")
        with SagaClient(addrs, token=cluster.tokens["operator"]) as c:
            check_guarantee(c, parts, sorted(results))
        cluster.wait_identical()


def test_only_the_leader_hands_over_leadership(tmp_path) -> None:
    with LocalCluster(str(tmp_path / "cluster"), nodes=3, auth=True).running() as cluster:
        leader = cluster.leader_id()
        follower = next(n for n in cluster.specs if n != leader)
        request = cluster_pb2.TransferLeadershipRequest(timeout_ms=5000)
        with pytest.raises(grpc.RpcError) as refused:
            cluster.stub(follower).TransferLeadership(
                request, timeout=10, metadata=cluster.metadata
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        client = [("authorization", "Bearer " + cluster.tokens["operator"])]
        with pytest.raises(grpc.RpcError) as refused:
            cluster.stub(leader).TransferLeadership(request, timeout=10, metadata=client)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # admin only
        to = cluster_pb2.TransferLeadershipRequest(to_node_id=follower, timeout_ms=5000)
        reply = cluster.stub(leader).TransferLeadership(to, timeout=10, metadata=cluster.metadata)
        assert reply.leader_id == follower
        assert cluster.wait_for_leader(10).id == follower
