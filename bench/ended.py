"""Ended-sagas benchmark: start-up time, memory and latency with N ended sagas in the log.

    python bench/ended.py [--sagas 1000000]

On a fresh three-node cluster of real processes, with the travel participants:

1. baseline: 100 travel sagas one after another (concurrency 1), end-to-end latency
   on the empty log;
2. seed: the nodes run with `--no-coordinator` (the log alone) and N ended sagas
   are written in bulk through the replicated method (`Cluster.Propose`, 250
   sagas per entry). Each has one vertex (Hotel) and four records: StartSaga,
   StartT, EndT, EndSaga. The journal is snapshotted and compacted as it grows;
3. the replicas' digests are compared (same applied index, same content);
4. every node is stopped (SIGTERM) and started again with the coordinator:
   start-up until a leader is in office, and each node's peak RSS since it
   started (VmHWM of the new process);
5. again 100 travel sagas at concurrency 1 with the N ended sagas in the log,
   beside the baseline of step 1.

Results go to bench/results/ended.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from saga.v1 import cluster_pb2, log_pb2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.e2e import c1_latency, proc_stats, progress  # noqa: E402
from cluster.client.saga_client import SagaClient  # noqa: E402
from cluster.testkit.launcher import LocalCluster  # noqa: E402
from cluster.testkit.travel import TravelParticipants, travel_definition  # noqa: E402
from sagalog import codec  # noqa: E402
from sagalog import records as rec  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SEED_SAGAS_PER_ENTRY = 250
SEED_CONCURRENCY = 3
C1_SAGAS = 100


def one_vertex_definition(endpoint: str) -> log_pb2.SagaDefinition:
    return log_pb2.SagaDefinition(
        vertices=[
            log_pb2.Vertex(
                name="Hotel",
                endpoint=endpoint,
                request="BookHotel",
                compensation="CancelHotel",
                timeout_ms=2000,
                max_attempts=3,
                backoff=log_pb2.Backoff(initial_ms=50, max_ms=1000),
            )
        ]
    )


def seed(cluster: LocalCluster, n: int, endpoint: str) -> int:
    """Write n ended sagas; returns how many batches had to be re-sent (a leader
    change fences the old epoch's records: the batch goes again, with the new
    leader's epoch, and what was already accepted comes back DUPLICATE)."""
    definition = one_vertex_definition(endpoint)
    office = [cluster.wait_for_leader(30)]
    lock = threading.Lock()
    resent = [0]

    def batch_of(start: int, epoch: int) -> list[log_pb2.Record]:
        now = int(time.time() * 1000)
        batch: list[log_pb2.Record] = []
        for i in range(start, min(n, start + SEED_SAGAS_PER_ENTRY)):
            saga_id = f"e{i:08d}"
            batch += [
                rec.start_saga(saga_id, epoch, definition, b"{}", now),
                rec.start_t(saga_id, epoch, "Hotel", 1, now),
                rec.end_t(saga_id, epoch, "Hotel", f"H-{i}".encode(), now),
                log_pb2.Record(
                    saga_id=saga_id,
                    epoch=epoch,
                    time_unix_ms=now,
                    end_saga=log_pb2.EndSaga(outcome=log_pb2.OUTCOME_COMPLETED),
                ),
            ]
        return batch

    def one(start: int) -> None:
        deadline = time.monotonic() + 120
        while True:
            leader = office[0]
            request = cluster_pb2.ProposeRequest(
                batch=codec.encode_batch(batch_of(start, leader.epoch)), timeout_ms=30_000
            )
            try:
                result = cluster.stub(leader.id).Propose(request, timeout=60).result
                bad = [r for r in result.results if r.verdict == log_pb2.REJECTED]
                if not result.error and not bad:
                    return
                problem = result.error or bad[0].reason
            except grpc.RpcError as exc:
                problem = f"{exc.code()}: {exc.details()}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"seeding failed: {problem}")
            with lock:
                resent[0] += 1
                if office[0] is leader:
                    office[0] = cluster.wait_for_leader(30)

    t0 = time.monotonic()
    with ThreadPoolExecutor(SEED_CONCURRENCY) as pool:
        starts = range(0, n, SEED_SAGAS_PER_ENTRY)
        for done, _ in enumerate(pool.map(one, starts), start=1):
            seeded = min(n, done * SEED_SAGAS_PER_ENTRY)
            rate = seeded / max(1e-9, time.monotonic() - t0)
            if done % 10 == 0 or seeded == n:
                progress(f"  seeded {seeded:,}/{n:,} ended sagas ({rate:,.0f}/s)")
    print()
    return resent[0]


def c1(cluster: LocalCluster, definition: log_pb2.SagaDefinition, tag: str) -> dict:
    with SagaClient([s.grpc_addr for s in cluster.specs.values()]) as client:
        return c1_latency(client, definition, tag, C1_SAGAS)


def same_applied_index_digests(
    cluster: LocalCluster, timeout_s: float
) -> dict[str, cluster_pb2.DigestReply]:
    """Every node's digest, once all of them have applied the same entries (followers
    may still be applying the last entries when seeding returns)."""
    deadline = time.monotonic() + timeout_s
    while True:
        digests = {
            nid: cluster.stub(nid).Digest(cluster_pb2.DigestRequest(), timeout=300)
            for nid in cluster.specs
        }
        if len({d.applied_index for d in digests.values()}) == 1 or time.monotonic() > deadline:
            return digests
        time.sleep(1)


def dir_mb(path: str) -> float:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except FileNotFoundError:
                pass
    return round(total / 2**20, 1)


def run(n: int, base: str) -> dict:
    parts = TravelParticipants(os.path.join(base, "participants"))
    cluster = LocalCluster(os.path.join(base, "cluster"), nodes=3, test_propose=True)
    try:
        parts.start_all()
        parts.wait_ready(15)
        cluster.start_all()
        cluster.wait_for_leader(20)
        definition = travel_definition(parts.endpoints)
        progress("  baseline: concurrency-1 travel sagas on an empty log")
        baseline = c1(cluster, definition, "before")
        print()

        cluster.stop_all()
        cluster.extra_args = ("--no-coordinator",)
        cluster.start_all()
        t = time.monotonic()
        resent = seed(cluster, n, parts.endpoints["Hotel"])
        seed_s = time.monotonic() - t
        seeding_rss = {
            nid: round(proc_stats(spec.pid)[1] / 2**20, 1) for nid, spec in cluster.specs.items()
        }
        progress("  comparing the replicas' digests")
        digests = same_applied_index_digests(cluster, timeout_s=300)
        print()
        identical = (
            len({(d.applied_index, d.sha256) for d in digests.values()}) == 1
            and min(d.sagas for d in digests.values()) >= n
        )

        cluster.stop_all()
        cluster.extra_args = ()
        t_start = time.monotonic()
        cluster.start_all()
        cluster.wait_for_leader(120)
        startup_s = time.monotonic() - t_start
        startup_rss = {
            nid: round(proc_stats(spec.pid)[1] / 2**20, 1) for nid, spec in cluster.specs.items()
        }
        progress(f"  concurrency-1 travel sagas with {n:,} ended sagas in the log")
        after = c1(cluster, definition, "after")
        print()
        stats = {nid: proc_stats(spec.pid) for nid, spec in cluster.specs.items()}
        return {
            "ended_sagas": n,
            "records_seeded": max(d.records for d in digests.values()),
            "seed_s": seed_s,
            "seed_batches_resent": resent,
            "replicas_identical": identical,
            "peak_rss_mb_while_seeding": seeding_rss,
            "startup_to_office_s": startup_s,
            "peak_rss_mb_after_restart": startup_rss,
            "peak_rss_mb_after_c1": {nid: round(s[1] / 2**20, 1) for nid, s in stats.items()},
            "disk_mb": {nid: dir_mb(spec.data_dir) for nid, spec in cluster.specs.items()},
            "c1_empty_log": baseline,
            "c1_with_ended": after,
        }
    finally:
        print()
        cluster.stop_all()
        parts.stop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sagas", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    os.makedirs(RESULTS, exist_ok=True)
    print(f"{args.sagas:,} ended sagas")
    r = run(args.sagas, tempfile.mkdtemp(prefix="ended-"))
    print(json.dumps(r, indent=2))
    with open(os.path.join(RESULTS, "ended.json"), "w") as f:
        json.dump({"when": time.strftime("%Y-%m-%d %H:%M:%S"), **r}, f, indent=2)
    return 0 if r["replicas_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
