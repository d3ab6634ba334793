"""Failover benchmark: how long in-flight sagas stand still when the leader dies.

    python bench/failover.py [--trials 20] [--in-flight 1000] [--quick]

A three-node cluster and the four travel participants run as real processes. Each
trial:

1. pauses the Payment participant (SIGSTOP), so that every saga submitted next
   runs Hotel, Car and Flight and then waits on its Payment call: `--in-flight`
   sagas are submitted (from 32 client threads) and all of them are in flight;
2. SIGKILLs the leader (t0) and resumes Payment (SIGCONT) right after: the
   participants are healthy again, but every saga's Payment reply was bound for
   the dead leader, so the saga stands still until the new leader takes office
   and re-sends it. Then it waits for every saga to end;
3. measures, for each saga in flight at t0, when it moved again under the new
   leader: the earliest of the first participant call sent in a newer epoch
   (participants record `StepRequest.sent_unix_ms`, the coordinator's send time,
   so a paused participant's queue does not count) and the first log record of a
   newer epoch (its decision time). Machine clock throughout (one host);
4. restarts the killed node and waits until it has caught up.

Reported per trial and over all trials: new leader in office after t0, and the
p50/p99/max of "moved again" over every in-flight saga (target: p99 under 2 s).
Also checks that every saga ended (none lost) and how they ended. Results go to
bench/results/failover.json.
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

from bench.e2e import pct, progress  # noqa: E402
from cluster.client.saga_client import SagaClient  # noqa: E402
from cluster.testkit.launcher import LocalCluster  # noqa: E402
from cluster.testkit.travel import TravelParticipants, travel_definition  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGET_P99_S = 2.0
SUBMITTERS = 32
CALL_TIMEOUT_MS = 60_000  # Payment stays paused for a while: no timeouts meanwhile


def read_records(cluster: LocalCluster, node: str, saga_id: str) -> list[log_pb2.Record]:
    reply = cluster.stub(node).ReadSaga(cluster_pb2.ReadSagaRequest(saga_id=saga_id), timeout=10)
    return list(reply.records)


def trial(
    n: int,
    cluster: LocalCluster,
    parts: TravelParticipants,
    client: SagaClient,
    definition: log_pb2.SagaDefinition,
    in_flight: int,
) -> dict:
    tag = f"t{n}"
    leader = cluster.wait_for_leader(20)
    old_epoch = leader.epoch
    payment = parts.pid("Payment")
    assert payment is not None
    os.kill(payment, signal.SIGSTOP)
    try:
        ids = [f"{tag}-{i}" for i in range(in_flight)]
        with ThreadPoolExecutor(SUBMITTERS) as pool:
            list(pool.map(lambda s: client.submit(definition, b"{}", saga_id=s), ids))
        # Every saga has its three parallel bookings done or going: wait until the
        # leader has sent (logged StartT for) every Payment, so all are in flight.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            waiting = sum(
                1
                for s in ids[-50:]
                if not any(
                    r.HasField("start_t") and r.start_t.vertex == "Payment"
                    for r in read_records(cluster, leader.id, s)
                )
            )
            if not waiting:
                break
            time.sleep(0.1)
        t0 = time.time()
        cluster.kill(leader.id)
    finally:
        # (A participant resumed here once answered some of the new leader's calls
        # CANCELLED: gRPC core dropped calls past 1,000 waiting; see
        # cluster.grpcutil.PENDING_REQUEST_OPTIONS, which the participants now set.)
        os.kill(payment, signal.SIGCONT)
    new = cluster.wait_for_leader(30)
    in_office_s = time.time() - t0
    ended: dict[str, int] = {}
    deadline = time.monotonic() + 180
    for s in ids:
        while time.monotonic() < deadline:
            records = read_records(cluster, new.id, s)
            end = next((r for r in records if r.HasField("end_saga")), None)
            if end is not None:
                ended[s] = end.end_saga.outcome
                break
            time.sleep(0.05)
    # When did each saga move again, under a newer epoch?
    moved: dict[str, float] = {}
    for s in ids:
        for r in read_records(cluster, new.id, s):
            if r.epoch > old_epoch and not r.HasField("epoch_start"):
                moved[s] = min(moved.get(s, float("inf")), r.time_unix_ms / 1000)
    for name in parts.services:
        for call in parts.state(name).calls:
            if call.saga_id.startswith(tag + "-") and call.epoch > old_epoch and call.sent_ms:
                s = call.saga_id
                moved[s] = min(moved.get(s, float("inf")), call.sent_ms / 1000)
    # In flight at t0: started before it, not ended before it (all of them, by design).
    delays = [moved[s] - t0 for s in ids if s in moved]
    cluster.restart(leader.id)
    wait_caught_up(cluster, leader.id, 60)
    return {
        "trial": n,
        "killed": leader.id,
        "new_leader": new.id,
        "in_flight": len(ids),
        "in_office_s": in_office_s,
        "moved": len(delays),
        "not_moved": len(ids) - len(delays),
        "ended": len(ended),
        "completed": sum(1 for o in ended.values() if o == log_pb2.OUTCOME_COMPLETED),
        "p50_s": pct(delays, 50),
        "p99_s": pct(delays, 99),
        "max_s": max(delays) if delays else None,
        "delays_s": delays,
    }


def wait_caught_up(cluster: LocalCluster, node: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leader = cluster.wait_for_leader(20)
        mine = cluster.status(node)
        if mine is not None and mine.ready and mine.applied_index >= leader.commit_index:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{node} did not catch up within {timeout_s}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--in-flight", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="3 trials of 200 sagas")
    args = parser.parse_args(argv)
    trials, in_flight = (3, 200) if args.quick else (args.trials, args.in_flight)
    os.makedirs(RESULTS, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="failover-")
    parts = TravelParticipants(os.path.join(tmp, "participants"))
    cluster = LocalCluster(os.path.join(tmp, "cluster"), nodes=3)
    rows: list[dict] = []
    try:
        parts.start_all()
        parts.wait_ready(15)
        cluster.start_all()
        cluster.wait_for_leader(20)
        definition = travel_definition(parts.endpoints, timeout_ms=CALL_TIMEOUT_MS)
        with SagaClient([s.grpc_addr for s in cluster.specs.values()]) as client:
            for n in range(1, trials + 1):
                progress(f"trial {n}/{trials}: {in_flight} sagas in flight, leader killed")
                rows.append(trial(n, cluster, parts, client, definition, in_flight))
                r = rows[-1]
                progress(
                    f"trial {n}/{trials}: in office {r['in_office_s']:.2f} s, moved p99 "
                    f"{r['p99_s']:.2f} s, ended {r['ended']}/{r['in_flight']}"
                )
    finally:
        print()
        cluster.stop_all()
        parts.stop_all()
    print(
        f"{'trial':>5} {'killed':>6} {'new':>4} {'in office s':>11} {'moved p50 s':>11} "
        f"{'p99 s':>6} {'max s':>6} {'not moved':>9} {'ended':>6} {'completed':>9}"
    )
    for r in rows:
        print(
            f"{r['trial']:>5} {r['killed']:>6} {r['new_leader']:>4} {r['in_office_s']:>11.2f} "
            f"{r['p50_s']:>11.2f} {r['p99_s']:>6.2f} {r['max_s']:>6.2f} {r['not_moved']:>9} "
            f"{r['ended']:>6} {r['completed']:>9}"
        )
    every = [d for r in rows for d in r["delays_s"]]
    per_trial_p99 = [r["p99_s"] for r in rows if r["p99_s"] is not None]
    summary = {
        "trials": len(rows),
        "in_flight_per_trial": in_flight,
        "in_office_p50_s": pct([r["in_office_s"] for r in rows], 50),
        "in_office_max_s": max(r["in_office_s"] for r in rows),
        "moved_p50_s": pct(every, 50),
        "moved_p99_s": pct(every, 99),
        "moved_max_s": max(every) if every else None,
        "worst_trial_p99_s": max(per_trial_p99) if per_trial_p99 else None,
        "not_moved": sum(r["not_moved"] for r in rows),
        "not_ended": sum(r["in_flight"] - r["ended"] for r in rows),
    }
    print(
        f"\nover {summary['trials']} trials x {in_flight} in-flight sagas: new leader in office "
        f"p50 {summary['in_office_p50_s']:.2f} s (max {summary['in_office_max_s']:.2f}); every "
        f"saga moving again p50 {summary['moved_p50_s']:.2f} s, p99 {summary['moved_p99_s']:.2f} "
        f"s, max {summary['moved_max_s']:.2f} s (target p99 < {TARGET_P99_S:.0f} s); worst "
        f"trial p99 {summary['worst_trial_p99_s']:.2f} s; sagas that never moved: "
        f"{summary['not_moved']}, never ended: {summary['not_ended']}"
    )
    with open(os.path.join(RESULTS, "failover.json"), "w") as f:
        json.dump(
            {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "summary": summary, "trials": rows},
            f,
            indent=2,
        )
    return 0 if summary["not_ended"] == 0 and summary["not_moved"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
