"""What a client sees: Run, pushed Watch and linearizable reads without log entries,
on a real cluster with real participants, across a leader kill and a paused leader.

Every test that runs sagas ends with the saga guarantee checked against the
participants' own databases (test_sagas.check_guarantee)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from saga.v1 import sagas_pb2, sagas_pb2_grpc
from test_sagas import check_guarantee

from cluster.client.aio import AsyncSagaClient
from cluster.client.saga_client import SagaClient
from cluster.grpcutil import channel_to
from cluster.testkit.launcher import LocalCluster
from cluster.testkit.travel import TravelParticipants, travel_definition

pytestmark = pytest.mark.cluster

SLOW_PAYMENT_MS = 300  # long enough for a Run's deadline to pass mid-saga


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    with LocalCluster(str(tmp_path_factory.mktemp("client-path")), nodes=3).running() as c:
        yield c


@pytest.fixture(scope="module")
def parts(tmp_path_factory, cluster) -> Iterator[TravelParticipants]:
    p = TravelParticipants(
        str(tmp_path_factory.mktemp("client-path-parts")),
        extra_args={
            "Car": ["--refuse-saga-substring", "refuse"],
            "Payment": ["--latency-ms", str(SLOW_PAYMENT_MS)],
        },
    )
    p.start_all()
    try:
        p.wait_ready(15)
        yield p
    except BaseException:
        print(p.logs())
        raise
    finally:
        p.stop_all()


@pytest.fixture
def client(cluster) -> Iterator[SagaClient]:
    with SagaClient([s.grpc_addr for s in cluster.specs.values()]) as c:
        yield c


def followers(cluster: LocalCluster) -> list[str]:
    leader = cluster.wait_for_leader(10).id
    return [n for n in cluster.specs if n != leader]


def test_run_answers_when_the_saga_has_ended_and_is_idempotent(cluster, parts, client) -> None:
    definition = travel_definition(parts.endpoints)
    ids = []
    for node_id, spec in cluster.specs.items():
        with SagaClient([spec.grpc_addr]) as one_node:
            for outcome in ("ok", "refuse"):
                saga_id = f"run-{outcome}-via-{node_id}"
                info = one_node.run(definition, b'{"to": "Porto"}', saga_id=saga_id, timeout_s=30)
                ids.append(saga_id)
                expected = sagas_pb2.ABORTED if outcome == "refuse" else sagas_pb2.COMPLETED
                assert info.state == expected, info
                assert info.records[-1].HasField("end_saga")
                assert info == client.get(saga_id)  # what Get answers
    # Again with the same id: the same saga, answered at once, not a second run.
    again = client.run(definition, b'{"to": "Porto"}', saga_id=ids[0], timeout_s=30)
    assert again == client.get(ids[0])
    with pytest.raises(grpc.RpcError) as refused:
        client.run(definition, b"another payload", saga_id=ids[0], timeout_s=30)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as bad:
        client.run(definition, saga_id="bad id!", timeout_s=30)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    check_guarantee(client, parts, ids)


def test_run_reattaches_after_its_deadline(cluster, parts, client) -> None:
    definition = travel_definition(parts.endpoints)
    with pytest.raises(TimeoutError, match="run it again"):
        client.run(definition, saga_id="run-late", timeout_s=SLOW_PAYMENT_MS / 3000)
    # The saga went on without the caller; a second Run re-attaches to it.
    info = client.run(definition, saga_id="run-late", timeout_s=30)
    assert info.state == sagas_pb2.COMPLETED
    assert sum(r.HasField("start_saga") for r in info.records) == 1
    # Once it has ended, Run answers at once: well within a participant call.
    started = time.monotonic()
    client.run(definition, saga_id="run-late", timeout_s=30)
    assert time.monotonic() - started < 5
    check_guarantee(client, parts, ["run-late"])


def test_reads_add_no_raft_entry_and_see_writes_made_through_other_nodes(
    cluster, parts, client
) -> None:
    definition = travel_definition(parts.endpoints)
    nodes = list(cluster.specs.values())
    clients = [SagaClient([s.grpc_addr]) for s in nodes]
    try:
        # Linearizable from every node: a Submit acknowledged by one node is seen by
        # a Get on any other right after, followers included.
        for i, writer in enumerate(clients):
            reader = clients[(i + 1) % len(clients)]
            saga_id = writer.submit(definition, saga_id=f"read-your-write-{i}")
            assert reader.get(saga_id).saga_id == saga_id
            writer.wait_for_end(saga_id, 30)
        leader = cluster.wait_for_leader(10).id
        before = cluster.status(leader).commit_index
        for _ in range(100):
            for c in clients:
                c.get("read-your-write-0")
        for c in clients:
            assert "read-your-write-0" in {s.saga_id for s in c.list()}
        assert cluster.wait_for_leader(10).id == leader
        assert cluster.status(leader).commit_index == before, "a read added a Raft entry"
    finally:
        for c in clients:
            c.close()


def test_many_watch_streams_on_a_follower_all_see_the_end(cluster, parts, client) -> None:
    definition = travel_definition(parts.endpoints)
    follower = cluster.specs[followers(cluster)[0]].grpc_addr
    sagas = [f"watched-{i}" for i in range(20)]
    per_saga = 25  # 500 streams on one node at once

    async def watch_all() -> list[list[int]]:
        async with AsyncSagaClient([follower]) as watcher:

            async def one(saga_id: str) -> list[int]:
                return [e.seq async for e in watcher.watch(saga_id, timeout_s=60)]

            tasks = [asyncio.create_task(one(s)) for s in sagas for _ in range(per_saga)]
            await asyncio.sleep(0.5)  # every stream is open before the sagas start
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: [client.submit(definition, saga_id=s) for s in sagas]
            )
            return await asyncio.gather(*tasks)

    seen = asyncio.run(watch_all())
    ends = [client.get(s) for s in sagas]
    expected = [list(range(len(info.records))) for info in ends for _ in range(per_saga)]
    for i, (seqs, want) in enumerate(zip(seen, expected, strict=True)):
        assert seqs == want, (i, seqs)
    check_guarantee(client, parts, sagas)


def test_a_watch_with_an_unknown_or_bad_id_is_refused(cluster) -> None:
    spec = next(iter(cluster.specs.values()))
    with channel_to(spec.grpc_addr) as channel:
        stub = sagas_pb2_grpc.SagasStub(channel)
        with pytest.raises(grpc.RpcError) as bad:
            list(stub.Watch(sagas_pb2.WatchRequest(saga_id="bad id!"), timeout=10))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as unknown:
            list(stub.Watch(sagas_pb2.WatchRequest(saga_id="never-submitted"), timeout=15))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_run_on_a_follower_and_watch_on_the_leader_survive_a_leader_kill(tmp_path, parts) -> None:
    with LocalCluster(str(tmp_path / "own"), nodes=3).running() as own:
        leader = own.wait_for_leader(15).id
        follower = own.specs[next(n for n in own.specs if n != leader)].grpc_addr
        everyone = [s.grpc_addr for s in own.specs.values()]
        leader_first = [own.specs[leader].grpc_addr] + [a for a in everyone if a != follower]
        definition = travel_definition(parts.endpoints)
        ids = [f"kill-{'refuse-' if i % 4 == 0 else ''}{i}" for i in range(24)]
        watched: dict[str, list[int]] = {}

        def run_one(saga_id: str) -> sagas_pb2.SagaInfo:
            with SagaClient([follower]) as via_follower:
                return via_follower.run(definition, saga_id=saga_id, timeout_s=60)

        def watch_one(saga_id: str) -> None:
            with SagaClient(leader_first) as via_leader:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        watched[saga_id] = [e.seq for e in via_leader.watch(saga_id, timeout_s=60)]
                        return
                    except grpc.RpcError as exc:  # not yet submitted when asked
                        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                        time.sleep(0.05)

        with ThreadPoolExecutor(max_workers=2 * len(ids)) as pool:
            watches = [pool.submit(watch_one, s) for s in ids[:8]]
            runs = [pool.submit(run_one, s) for s in ids]
            time.sleep(SLOW_PAYMENT_MS / 1000)  # sagas in flight, Payment mid-call
            own.kill(leader, signal.SIGKILL)
            infos = [r.result(timeout=90) for r in runs]
            for w in watches:
                w.result(timeout=90)
        with SagaClient(everyone) as client:
            for saga_id, info in zip(ids, infos, strict=True):
                expected = sagas_pb2.ABORTED if "refuse" in saga_id else sagas_pb2.COMPLETED
                assert info.state == expected, (saga_id, info.state)
            for saga_id, seqs in watched.items():
                assert seqs == list(range(len(client.get(saga_id).records))), saga_id
            assert len(watched) == 8
            check_guarantee(client, parts, ids)


def _get_into(stub: sagas_pb2_grpc.SagasStub, request: Any, outcomes: list[object]) -> None:
    """A Get's saga id, or its error code, appended to `outcomes`."""
    try:
        outcomes.append(stub.Get(request, timeout=10).saga_id)
    except grpc.RpcError as exc:
        outcomes.append(exc.code())


def test_a_paused_leader_never_answers_a_read_that_misses_a_newer_write(tmp_path, parts) -> None:
    """ReadIndex under SIGSTOP: the old leader, resumed after a new leader committed
    a write, must not answer a read from its stale store. Its buffered answers from
    before the pause carry older read rounds and confirm nothing."""
    with LocalCluster(str(tmp_path / "own"), nodes=3).running() as own:
        definition = travel_definition(parts.endpoints)
        for trial in range(3):
            old = own.wait_for_leader(15).id
            others = [n for n in own.specs if n != old]
            with channel_to(own.specs[old].grpc_addr) as channel:
                stale = sagas_pb2_grpc.SagasStub(channel)
                stale.List(sagas_pb2.ListRequest(), timeout=5)  # connected before the pause
                own.kill(old, signal.SIGSTOP)
                try:
                    own.wait_for_leader(15, among=others)
                    saga_id = f"written-while-paused-{trial}"
                    with SagaClient([own.specs[n].grpc_addr for n in others]) as client:
                        client.submit(definition, saga_id=saga_id)  # acknowledged: committed
                    outcomes: list[object] = []

                    request = sagas_pb2.GetRequest(saga_id=saga_id)
                    readers = [
                        threading.Thread(target=_get_into, args=(stale, request, outcomes))
                        for _ in range(4)
                    ]
                    for r in readers:
                        r.start()
                    time.sleep(0.3)  # the reads wait in the paused node's socket
                finally:
                    own.kill(old, signal.SIGCONT)
                for r in readers:
                    r.join(timeout=20)
            assert len(outcomes) == 4
            for outcome in outcomes:
                # Either it answers with the write, or it refuses; never NOT_FOUND.
                assert outcome in (saga_id, grpc.StatusCode.UNAVAILABLE), outcome
            with SagaClient([s.grpc_addr for s in own.specs.values()]) as client:
                client.wait_for_end(saga_id, 30)
