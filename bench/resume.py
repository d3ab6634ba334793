"""Resume benchmark: how long a new leader takes to pick up N in-flight sagas.

    python bench/resume.py [--sagas 10000,100000]

For each N, on a fresh three-node cluster of real processes:

1. seed: the nodes run with `--no-coordinator` (the log alone), and N travel
   sagas are written in bulk through the replicated method (`Cluster.Propose`,
   StartSaga records, 500 per entry): N sagas in flight, none started;
2. the four travel participants are paused (SIGSTOP): a saga's first step is
   logged, its calls then wait, so no saga gets further than "moved";
3. every node is stopped (SIGTERM) and started again with the coordinator:
   start-up, election, and the new leader resumes the N sagas. Each resumed saga
   logs StartT for Hotel, Car and Flight (3 records) before calling them;
4. the leader's record count (`Cluster.Digest`) is polled until all 3N StartT
   records are committed.

Reported: node start-up until a leader is in office; then, from the moment the
leader took office, the time until 50 %, 99 % and 100 % of the sagas moved (from
the record count: a saga's three StartT are decided together); the sagas'
StartT records per Raft entry; peak RSS per node and CPU seconds of the leader.
Results go to bench/results/resume.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from saga.v1 import cluster_pb2, log_pb2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.e2e import proc_stats, progress  # noqa: E402
from cluster.testkit.launcher import LocalCluster  # noqa: E402
from cluster.testkit.travel import TravelParticipants, travel_definition  # noqa: E402
from sagalog import codec  # noqa: E402
from sagalog import records as rec  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SEED_BATCH = 500
SEED_CONCURRENCY = 4
STARTS_PER_SAGA = 3  # Hotel, Car and Flight have no dependencies


def seed(cluster: LocalCluster, leader_id: str, epoch: int, n: int, definition) -> None:
    stub = cluster.stub(leader_id)

    def one(start: int) -> None:
        batch = [
            rec.start_saga(f"s{i:07d}", epoch, definition, b"{}", int(time.time() * 1000))
            for i in range(start, min(n, start + SEED_BATCH))
        ]
        request = cluster_pb2.ProposeRequest(batch=codec.encode_batch(batch), timeout_ms=30_000)
        reply = stub.Propose(request, timeout=60)
        bad = [r for r in reply.result.results if r.verdict != log_pb2.ACCEPTED]
        if reply.result.error or bad:
            raise RuntimeError(f"seeding failed: {reply.result.error or bad[0].reason}")

    with ThreadPoolExecutor(SEED_CONCURRENCY) as pool:
        for done, _ in enumerate(pool.map(one, range(0, n, SEED_BATCH)), start=1):
            if done % 20 == 0:
                progress(f"  seeded {min(n, done * SEED_BATCH):,}/{n:,} sagas")


def digest(cluster: LocalCluster, node: str) -> cluster_pb2.DigestReply:
    return cluster.stub(node).Digest(cluster_pb2.DigestRequest(), timeout=60)


def run(n: int, base: str, timeout_s: float) -> dict:
    parts = TravelParticipants(os.path.join(base, "participants"))
    cluster = LocalCluster(
        os.path.join(base, "cluster"),
        nodes=3,
        extra_args=("--no-coordinator",),
        test_propose=True,
    )
    try:
        parts.start_all()
        parts.wait_ready(15)
        cluster.start_all()
        leader = cluster.wait_for_leader(20)
        definition = travel_definition(parts.endpoints, timeout_ms=60_000)
        t = time.monotonic()
        seed(cluster, leader.id, leader.epoch, n, definition)
        seed_s = time.monotonic() - t
        before = digest(cluster, leader.id)
        for name in parts.services:
            os.kill(parts.pid(name), signal.SIGSTOP)  # type: ignore[arg-type]
        cluster.stop_all()
        cluster.extra_args = ()
        t_start = time.monotonic()
        cluster.start_all()
        leader = cluster.wait_for_leader(120)
        t_office = time.monotonic()
        base_records = digest(cluster, next(nid for nid in cluster.specs if nid != leader.id))
        target = before.records + STARTS_PER_SAGA * n
        samples: list[tuple[float, int, int]] = []  # (s since office, records, applied)
        deadline = t_office + timeout_s
        # A digest reads the whole store: ask a follower, and not too often, so that
        # the measurement does not load the leader it measures.
        follower = next(nid for nid in cluster.specs if nid != leader.id)
        while time.monotonic() < deadline:
            d = digest(cluster, follower)
            samples.append((time.monotonic() - t_office, d.records, d.applied_index))
            moved = (d.records - before.records) // STARTS_PER_SAGA
            progress(f"  {moved:,}/{n:,} sagas moved, {samples[-1][0]:.1f} s after office")
            if d.records >= target:
                break
            time.sleep(0.25 if n <= 10_000 else 1.0)
        stats = {nid: proc_stats(spec.pid) for nid, spec in cluster.specs.items()}

        def moved_by(share: float) -> float | None:
            need = before.records + STARTS_PER_SAGA * n * share
            return next((s for s, records, _ in samples if records >= need), None)

        last = samples[-1]
        return {
            "sagas": n,
            "seed_s": seed_s,
            "records_seeded": before.records,
            "startup_to_office_s": t_office - t_start,
            "moved_50_s": moved_by(0.5),
            "moved_99_s": moved_by(0.99),
            "moved_all_s": moved_by(1.0),
            "moved": (last[1] - before.records) // STARTS_PER_SAGA,
            "records_per_entry": (last[1] - base_records.records)
            / max(1, last[2] - base_records.applied_index),
            "leader": leader.id,
            "leader_cpu_s": stats[leader.id][0],
            "peak_rss_mb": {nid: round(s[1] / 2**20, 1) for nid, s in stats.items()},
        }
    finally:
        print()
        for name in parts.services:
            pid = parts.pid(name)
            if pid is not None and parts.alive(name):
                os.kill(pid, signal.SIGCONT)
        cluster.stop_all()
        parts.stop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sagas", default="10000,100000", help="comma-separated N")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    os.makedirs(RESULTS, exist_ok=True)
    rows = []
    for n in [int(x) for x in args.sagas.split(",")]:
        print(f"{n:,} in-flight sagas")
        rows.append(run(n, tempfile.mkdtemp(prefix=f"resume-{n}-"), args.timeout_s))
        r = rows[-1]
        print(
            f"  seeded in {r['seed_s']:.1f} s; start-up to leader in office "
            f"{r['startup_to_office_s']:.2f} s; after office, moved: 50 % {r['moved_50_s']} s, "
            f"99 % {r['moved_99_s']} s, all {r['moved_all_s']} s ({r['moved']:,}/{n:,}); "
            f"{r['records_per_entry']:.0f} records/entry; leader CPU {r['leader_cpu_s']:.1f} s; "
            f"peak RSS MB {r['peak_rss_mb']}"
        )
    with open(os.path.join(RESULTS, "resume.json"), "w") as f:
        json.dump({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}, f, indent=2)
    return 0 if all(r["moved"] >= r["sagas"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
