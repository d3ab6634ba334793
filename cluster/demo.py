"""`make demo`: a local three-node Saga Log cluster doing real work, then stopped.

What it shows, with real processes and disks: a leader is elected; the records of
travel sagas are committed through any node; duplicates are answered once and
contradictions rejected; the leader is killed with SIGKILL, a new one takes
office with a new epoch and the old epoch is fenced; the old leader restarts and
catches up until every replica's digest is identical.

(The Saga Execution Coordinator, which writes these records itself while calling
the travel participants, is the next issue; here the demo plays its part.)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from saga.v1 import log_pb2

from cluster.launcher import LocalCluster
from cluster.logclient import LogClient
from cluster.sagactl import status_table
from sagalog import records as rec

VERDICT = {
    log_pb2.ACCEPTED: "accepted",
    log_pb2.DUPLICATE: "duplicate",
    log_pb2.REJECTED: "REJECTED",
}


def travel_definition() -> log_pb2.SagaDefinition:
    """Hotel, Car and Flight in parallel, then Payment."""

    def vertex(name: str, deps: list[str]) -> log_pb2.Vertex:
        return log_pb2.Vertex(
            name=name,
            endpoint="127.0.0.1:50061",
            request=f"Book{name}",
            compensation=f"Cancel{name}",
            depends_on=deps,
            timeout_ms=2000,
            max_attempts=3,
        )

    parallel = ["Hotel", "Car", "Flight"]
    return log_pb2.SagaDefinition(
        name="travel",
        vertices=[vertex(n, []) for n in parallel] + [vertex("Payment", parallel)],
    )


def travel_records(saga_id: str, epoch: int) -> list[log_pb2.Record]:
    records = [rec.start_saga(saga_id, epoch, travel_definition(), b'{"trip": "Lisbon"}')]
    for name in ("Hotel", "Car", "Flight", "Payment"):
        records.append(rec.start_t(saga_id, epoch, name, 1))
        records.append(rec.end_t(saga_id, epoch, name, f"{name[0]}-{saga_id}".encode()))
    records.append(rec.end_saga(saga_id, epoch, log_pb2.OUTCOME_COMPLETED))
    return records


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(base_dir: str) -> None:
    cluster = LocalCluster(base_dir, nodes=3)
    client = None
    try:
        say("starting three sagalog-node processes on loopback")
        t0 = time.monotonic()
        cluster.start_all()
        leader = cluster.wait_for_leader(timeout_s=15)
        print(
            f"leader {leader.id} took office (epoch {leader.epoch}) after "
            f"{time.monotonic() - t0:.2f}s"
        )
        print(status_table([s.grpc_addr for s in cluster.specs.values()]))
        addrs = {n: s.grpc_addr for n, s in cluster.specs.items()}
        client = LogClient(list(addrs.values()))

        say("committing 20 travel sagas, each through a different node")
        nodes = list(addrs)
        t0 = time.monotonic()
        for i in range(20):
            via = addrs[nodes[i % 3]]
            result = client.propose(travel_records(f"trip-{i}", leader.epoch), via=via)
            assert all(r.verdict == log_pb2.ACCEPTED for r in result.results), result
        print(f"20 sagas x 10 records committed in {time.monotonic() - t0:.2f}s")

        say("the same records again, and a contradiction")
        again = client.propose(travel_records("trip-0", leader.epoch)[:2])
        bad = client.propose([rec.end_t("trip-999", leader.epoch, "Hotel")])
        for r in list(again.results) + list(bad.results):
            print(f"  {VERDICT[r.verdict]:9} {r.reason}")

        say(f"SIGKILL the leader {leader.id}")
        old_leader, old_epoch = leader.id, leader.epoch
        t0 = time.monotonic()
        cluster.kill(old_leader)
        survivors = [n for n in nodes if n != old_leader]
        leader = cluster.wait_for_leader(timeout_s=15, among=survivors)
        print(
            f"new leader {leader.id} took office with epoch {leader.epoch} after "
            f"{time.monotonic() - t0:.2f}s"
        )
        fenced = client.propose(
            [rec.start_saga("late", old_epoch, travel_definition())], via=addrs[survivors[0]]
        )
        print(
            f"  a record decided in the old epoch {old_epoch}: "
            f"{VERDICT[fenced.results[0].verdict]} ({fenced.results[0].reason})"
        )
        for i in range(20, 30):
            client.propose(travel_records(f"trip-{i}", leader.epoch), via=addrs[survivors[i % 2]])
        print("10 more sagas committed by the two survivors")

        say(f"restart {old_leader} from its data directory; wait until replicas agree")
        cluster.start(old_leader)
        deadline = time.monotonic() + 20
        while True:
            digests = {
                n: client.digest(a) for n, a in addrs.items() if cluster.status(n) is not None
            }
            if (
                len(digests) == 3
                and len({d.sha256 for d in digests.values()}) == 1
                and len({d.applied_index for d in digests.values()}) == 1
            ):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas did not converge: {digests}")
            time.sleep(0.1)
        for node_id, d in digests.items():
            print(
                f"  {node_id}: applied {d.applied_index}, {d.sagas} sagas, "
                f"{d.records} records, sha256 {d.sha256[:16]}"
            )
        print(status_table([s.grpc_addr for s in cluster.specs.values()]))
        say("done: every replica holds the same log")
    except Exception:
        print(cluster.logs(30))
        raise
    finally:
        if client is not None:
            client.close()
        cluster.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", help="keep data and logs here (default: a temporary dir)")
    args = parser.parse_args()
    base = args.dir or tempfile.mkdtemp(prefix="sagademo-")
    try:
        run(base)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
