"""Two Raft groups on one set of machines: each saga lives in the group its id
hashes to, clients route by the shard map any node serves, a node asked about
another group's saga sends the call on, List merges the groups, and a leader's
death in one group leaves the other untouched. Ends with the saga guarantee at
the participants and identical replicas in each group."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from saga.v1 import cluster_pb2, cluster_pb2_grpc, sagas_pb2, sagas_pb2_grpc
from test_sagas import check_guarantee

from cluster.client.aio import AsyncSagaClient
from cluster.client.saga_client import SagaClient
from cluster.grpcutil import channel_to
from cluster.runtime.groups import GROUP_HOP
from cluster.shardmap import ShardMap
from cluster.testkit.groups import ShardedCluster
from cluster.testkit.travel import TravelParticipants, travel_definition

pytestmark = pytest.mark.cluster

SAGAS = 40
CLIENTS = 4
LOAD_DEADLINE_S = 90.0


def _owner(cluster: ShardedCluster, saga_id: str) -> int:
    return cluster.shard_map.group_of(saga_id).index


def _held_by(cluster: ShardedCluster, saga_id: str) -> list[int]:
    """The groups whose first live node has applied records of the saga (ReadSaga
    is never forwarded: it reads the node's own store)."""
    held = []
    for i, group in enumerate(cluster.groups):
        node = next(n for n in group.specs if group.alive(n))
        try:
            group.stub(node).ReadSaga(
                cluster_pb2.ReadSagaRequest(saga_id=saga_id), timeout=5, metadata=group.metadata
            )
            held.append(i)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
    return held


def test_sagas_spread_over_two_groups_and_survive_a_leader_death_in_one(tmp_path) -> None:
    parts = TravelParticipants(str(tmp_path / "parts"), {"Car": ["--refuse-saga-substring", "x"]})
    cluster = ShardedCluster(str(tmp_path / "cluster"), groups=2, auth=True, tls=True)
    with parts, cluster.running():
        definition = travel_definition(parts.endpoints)
        client_token = cluster.tokens["client"]
        addrs = cluster.grpc_addrs()

        # Every node serves the same map: the one the nodes were started with.
        for addr in addrs:
            with channel_to(addr, cluster.client_tls) as channel:
                reply = cluster_pb2_grpc.ClusterStub(channel).ShardMap(
                    cluster_pb2.ShardMapRequest(), timeout=5, metadata=cluster.groups[0].metadata
                )
                status = cluster_pb2_grpc.ClusterStub(channel).Status(
                    cluster_pb2.StatusRequest(), timeout=5, metadata=cluster.groups[0].metadata
                )
            assert ShardMap.from_reply(reply) == cluster.shard_map
            assert reply.group == status.group == cluster.shard_map.group_with(addr).index
            assert status.groups == 2

        # A steady load through the routing client; group 1's leader is killed in it.
        ids = [f"trip-{k}" if k % 5 else f"trip-x-{k}" for k in range(SAGAS)]
        assert {_owner(cluster, s) for s in ids} == {0, 1}
        results: dict[str, int | str] = {}
        queue = list(ids)
        lock = threading.Lock()

        def load() -> None:
            deadline = time.monotonic() + LOAD_DEADLINE_S
            tls = cluster.client_tls
            with SagaClient(
                addrs[:1], token=client_token, tls_ca=tls.ca, tls_cert=tls.cert, tls_key=tls.key
            ) as c:
                while time.monotonic() < deadline:
                    with lock:
                        if not queue:
                            return
                        saga_id = queue.pop(0)
                    try:
                        results[saga_id] = c.run(definition, b"{}", saga_id, timeout_s=30).state
                    except (grpc.RpcError, TimeoutError) as exc:
                        results[saga_id] = f"failed: {exc}"

        threads = [threading.Thread(target=load) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        victim_group = cluster.groups[1]
        survivor_leader = cluster.groups[0].leader_id()
        while len(results) < SAGAS // 4 and any(t.is_alive() for t in threads):
            time.sleep(0.05)
        victim = victim_group.leader_id()
        victim_group.kill(victim)
        for t in threads:
            t.join(LOAD_DEADLINE_S + 30)
        assert len(results) == SAGAS
        failed = {s: r for s, r in results.items() if isinstance(r, str)}
        assert not failed, failed
        for saga_id, state in results.items():
            expected = sagas_pb2.ABORTED if "-x-" in saga_id else sagas_pb2.COMPLETED
            assert state == expected, (saga_id, state)
        # Group 1 elected a new leader; group 0's leader never changed.
        assert victim_group.wait_for_leader(15).id != victim
        assert cluster.groups[0].leader_id() == survivor_leader

        # Each saga is logged in its own group only.
        for saga_id in ids:
            assert _held_by(cluster, saga_id) == [_owner(cluster, saga_id)], saga_id

        _a_node_answers_for_every_group(cluster, definition, ids)
        _list_merges_the_groups(cluster, ids)
        _the_asyncio_client_routes_too(cluster, definition)

        tls = cluster.client_tls
        with SagaClient(
            addrs,
            token=cluster.tokens["operator"],
            tls_ca=tls.ca,
            tls_cert=tls.cert,
            tls_key=tls.key,
        ) as c:
            check_guarantee(c, parts, ids)
        for group in cluster.groups:
            group.wait_identical(nodes=[n for n in group.specs if group.alive(n)])


def _live_node_of_each_group(cluster: ShardedCluster) -> list[str]:
    return [
        next(s.grpc_addr for n, s in group.specs.items() if group.alive(n))
        for group in cluster.groups
    ]


def _stub(cluster: ShardedCluster, addr: str) -> sagas_pb2_grpc.SagasStub:
    return sagas_pb2_grpc.SagasStub(channel_to(addr, cluster.client_tls))


def _a_node_answers_for_every_group(cluster: ShardedCluster, definition, ids) -> None:
    """A client that knows nothing of groups (a raw stub on one node of group 0)
    still gets every call about a saga of group 1 answered: the node sends it on."""
    meta = [("authorization", "Bearer " + cluster.tokens["operator"])]
    node = next(iter(cluster.groups[0].specs.values())).grpc_addr
    stub = _stub(cluster, node)
    foreign = next(s for s in ids if _owner(cluster, s) == 1 and "-x-" not in s)
    info = stub.Get(sagas_pb2.GetRequest(saga_id=foreign), timeout=10, metadata=meta)
    assert info.state == sagas_pb2.COMPLETED and info.saga_id == foreign
    events = list(stub.Watch(sagas_pb2.WatchRequest(saga_id=foreign), timeout=10, metadata=meta))
    assert [e.seq for e in events] == list(range(len(info.records)))
    assert events[-1].record.HasField("end_saga")

    # Run and Submit of new sagas of group 1, through group 0's node.
    new = next(f"relay-{k}" for k in range(1000) if _owner(cluster, f"relay-{k}") == 1)
    request = sagas_pb2.SubmitRequest(definition=definition, payload=b"{}", saga_id=new)
    ran = stub.Run(request, timeout=30, metadata=meta)
    assert ran.state == sagas_pb2.COMPLETED
    again = stub.Submit(request, timeout=10, metadata=meta)
    assert again.saga_id == new and not again.created  # idempotent across the hop
    assert _held_by(cluster, new) == [1]
    ids.append(new)

    # Abort of a finished saga of group 1 gets group 1's answer.
    with pytest.raises(grpc.RpcError) as refused:
        stub.Abort(sagas_pb2.AbortRequest(saga_id=foreign), timeout=10, metadata=meta)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already ended" in (refused.value.details() or "")

    # An unknown saga of group 1: NOT_FOUND from its group, not a guess.
    unknown = next(f"none-{k}" for k in range(1000) if _owner(cluster, f"none-{k}") == 1)
    with pytest.raises(grpc.RpcError) as missing:
        stub.Get(sagas_pb2.GetRequest(saga_id=unknown), timeout=10, metadata=meta)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    # A hop that reaches the wrong group (nodes given different maps) is refused,
    # never sent on again.
    with pytest.raises(grpc.RpcError) as wrong:
        stub.Get(
            sagas_pb2.GetRequest(saga_id=foreign),
            timeout=10,
            metadata=[*meta, (GROUP_HOP, "0")],
        )
    assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "shard map" in (wrong.value.details() or "")


def _list_merges_the_groups(cluster: ShardedCluster, ids: list[str]) -> None:
    """Pages from any node cover both groups, in id byte order, each saga once."""
    meta = [("authorization", "Bearer " + cluster.tokens["client"])]
    for addr in _live_node_of_each_group(cluster):
        stub = _stub(cluster, addr)
        seen: list[str] = []
        token = ""
        for _ in range(100):  # bounded: 41 sagas in pages of 7
            reply = stub.List(
                sagas_pb2.ListRequest(page_size=7, page_token=token), timeout=10, metadata=meta
            )
            assert len(reply.sagas) <= 7
            seen += [s.saga_id for s in reply.sagas]
            token = reply.next_page_token
            if not token:
                break
        assert seen == sorted(ids, key=str.encode)
        aborted = stub.List(
            sagas_pb2.ListRequest(state=sagas_pb2.ABORTED, page_size=1000),
            timeout=10,
            metadata=meta,
        )
        assert sorted(s.saga_id for s in aborted.sagas) == sorted(s for s in ids if "-x-" in s)


def _the_asyncio_client_routes_too(cluster: ShardedCluster, definition) -> None:
    import asyncio

    tls = cluster.client_tls

    async def run() -> list[int]:
        async with AsyncSagaClient(
            _live_node_of_each_group(cluster)[-1:],
            token=cluster.tokens["client"],
            tls_ca=tls.ca,
            tls_cert=tls.cert,
            tls_key=tls.key,
        ) as c:
            infos = await asyncio.gather(
                *(c.run(definition, b"{}", f"aio-{k}", timeout_s=30) for k in range(6))
            )
            return [i.state for i in infos]

    assert asyncio.run(run()) == [sagas_pb2.COMPLETED] * 6
    for k in range(6):
        assert _held_by(cluster, f"aio-{k}") == [_owner(cluster, f"aio-{k}")]
