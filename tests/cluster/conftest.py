"""Fixtures for real multi-process cluster tests: free ports, temp dirs, and every
node's log printed when a test fails."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from saga.v1 import log_pb2

from cluster.client.logclient import LogClient
from cluster.testkit.launcher import LocalCluster
from sagalog.records import completed_saga as travel_records


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


class Harness:
    """A LocalCluster plus a LogClient and the global checks every test ends with."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.addrs = {n: s.grpc_addr for n, s in cluster.specs.items()}
        self.client = LogClient(list(self.addrs.values()))
        self.acknowledged: dict[str, list[bytes]] = {}  # saga id -> records acked ACCEPTED

    def commit_saga(self, saga_id: str, via: str | None = None, deadline_s: float = 10.0) -> None:
        """Commit a whole travel saga's records; remember them as acknowledged.

        Like a coordinator, it decides records in the current leader's epoch and,
        when a newer leader fenced them, decides them again in the new epoch (the
        records already applied come back DUPLICATE)."""
        deadline = time.monotonic() + deadline_s
        while True:
            epoch = self.cluster.wait_for_leader(deadline_s).epoch
            records = travel_records(saga_id, epoch)
            result = self.client.propose(
                records, via=self.addrs[via] if via else None, deadline_s=deadline_s
            )
            assert not result.error, result.error
            fenced = [r for r in result.results if r.code == log_pb2.REJECT_STALE_EPOCH]
            if fenced and time.monotonic() < deadline:
                continue
            verdicts = {r.verdict for r in result.results}
            # A retried proposal may come back DUPLICATE: it was applied by the first try.
            assert verdicts <= {log_pb2.ACCEPTED, log_pb2.DUPLICATE}, result
            break
        self.acknowledged[saga_id] = [self._identity(r) for r in records]

    @staticmethod
    def _identity(record: log_pb2.Record) -> bytes:
        """A record without the epoch it was decided in (a retry may decide it anew)."""
        bare = log_pb2.Record()
        bare.CopyFrom(record)
        bare.ClearField("epoch")
        return bare.SerializeToString(deterministic=True)

    def wait_converged(self, nodes: list[str] | None = None, timeout_s: float = 20.0) -> str:
        """Wait until the nodes' digests and applied indexes agree; return the digest."""
        nodes = nodes or [n for n in self.addrs if self.cluster.alive(n)]
        try:
            digests = self.cluster.wait_identical(timeout_s, nodes)
        except TimeoutError as exc:
            raise AssertionError(str(exc)) from exc
        return next(iter(digests.values())).sha256

    def check_nothing_lost(self, nodes: list[str] | None = None) -> None:
        """Every acknowledged record is in every node's log, once and in order."""
        from saga.v1 import cluster_pb2

        nodes = nodes or [n for n in self.addrs if self.cluster.alive(n)]
        for node in nodes:
            stub = self.client.stub(self.addrs[node])
            for saga_id, expected in self.acknowledged.items():
                reply = stub.ReadSaga(cluster_pb2.ReadSagaRequest(saga_id=saga_id), timeout=5)
                got = [self._identity(r) for r in reply.records]
                assert got == expected, f"{node}: saga {saga_id} differs from what was acked"


@pytest.fixture
def make_cluster(tmp_path, request) -> Iterator[Callable[..., Harness]]:
    harnesses: list[Harness] = []

    def make(nodes: int = 3, **kwargs) -> Harness:
        kwargs.setdefault("test_propose", True)  # the harness appends raw records
        cluster = LocalCluster(str(tmp_path / f"c{len(harnesses)}"), nodes=nodes, **kwargs)
        harness = Harness(cluster)
        harnesses.append(harness)
        cluster.start_all()
        cluster.wait_for_leader(timeout_s=15)
        return harness

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for harness in harnesses:
        if failed:
            print(harness.cluster.logs(80))
        harness.client.close()
        harness.cluster.stop_all()


@pytest.fixture
def harness(make_cluster) -> Harness:
    return make_cluster(3)
