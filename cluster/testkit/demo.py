"""`make demo`: the travel-booking saga on a local three-node cluster.

Real processes throughout: three `sagalog-node`s (Raft + RocksDB + coordinator on
the leader) and four participants (Hotel, Car, Flight, Payment), each with its own
SQLite database. Three sagas, as a user would see them:

1. a trip that books everything: Hotel, Car and Flight in parallel, then Payment;
2. a trip where Car refuses: the saga aborts and Hotel and Flight are cancelled;
3. a trip during which the leader is killed with SIGKILL while Payment is in
   flight: a new leader takes office, re-sends Payment (same idempotency key) and
   finishes the saga; Payment charged once.

Then the replicas' digests are compared: every node holds the same log.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import ssl
import tempfile
import time
import urllib.request

from saga.v1 import sagas_pb2

from cluster.client.saga_client import SagaClient
from cluster.client.sagactl import CONSOLE, status_table
from cluster.testkit.launcher import LocalCluster
from cluster.testkit.travel import TravelParticipants, travel_definition


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(info: sagas_pb2.SagaInfo, elapsed_s: float | None = None) -> None:
    took = f" in {elapsed_s * 1000:.0f} ms" if elapsed_s is not None else ""
    print(f"saga {info.saga_id}: {sagas_pb2.SagaState.Name(info.state)}{took}")
    if info.abort_reason:
        print(f"  why: {info.abort_reason}")
    for v in info.vertices:
        out = f" -> {v.output.decode()}" if v.output else ""
        print(f"  {v.name:8} {sagas_pb2.VertexState.Name(v.state):12}{out}")


def print_bookings(participants: TravelParticipants) -> None:
    """What each participant's own database says: the ground truth of the guarantee."""
    rows = []
    for name in participants.services:
        state = participants.state(name)
        for request in state.requests.values():
            # The ledger's answer beside the booking table's row: the effect itself.
            booked = state.bookings_for(request.request_key)
            status = booked[0].status if booked else request.status
            rows.append((request.saga_id, name, status, request.output.decode() or "-"))
    rows.sort()
    width = max(len(r[0]) for r in rows)
    for saga_id, name, status, output in rows:
        print(f"  {saga_id:{width}}  {name:8} {status:10} {output}")


def run(base_dir: str) -> None:
    # Secure as a deployment would be: TLS on every gRPC link (development
    # certificates), a token per caller, a Raft password.
    cluster = LocalCluster(
        f"{base_dir}/cluster", nodes=3, auth=True, tls=True, participant_tls=True, http=True
    )
    participants = TravelParticipants(
        f"{base_dir}/participants",
        extra_args={
            "Car": ["--refuse-saga-substring", "no-cars-left"],
            # Slow enough that the leader can be killed while Payment is in flight.
            "Payment": ["--latency-ms", "400"],
        },
        tls_dir=cluster.tls_dir,
    )
    try:
        say("starting the Hotel, Car, Flight and Payment participants and three nodes")
        participants.start_all()
        participants.wait_ready(timeout_s=15)
        cluster.start_all()
        leader = cluster.wait_for_leader(timeout_s=15)
        addrs = [s.grpc_addr for s in cluster.specs.values()]
        CONSOLE.print(status_table(addrs, cluster.client_tls, cluster.metadata))
        print("(TLS on every gRPC link, bearer tokens with roles, Raft password)")
        for spec in cluster.specs.values():
            print(f"{spec.id}: web page and /metrics at https://{spec.http_addr}/")
        assert cluster.client_tls is not None
        client = SagaClient(addrs, token=cluster.tokens["client"], tls_ca=cluster.client_tls.ca)
        definition = travel_definition(participants.endpoints)

        say("1. a trip to Lisbon: everything available")
        t0 = time.monotonic()
        # One call: Run submits and answers when the saga has ended.
        show(
            client.run(definition, b'{"to": "Lisbon"}', saga_id="trip-lisbon"),
            time.monotonic() - t0,
        )

        say("2. a trip to Oslo: no cars left, so the whole trip is undone")
        t0 = time.monotonic()
        oslo = client.run(definition, b'{"to": "Oslo"}', saga_id="trip-oslo-no-cars-left")
        show(oslo, time.monotonic() - t0)

        say(f"3. a trip to Rome; the leader {leader.id} is killed while Payment is in flight")
        client.submit(definition, b'{"to": "Rome"}', saga_id="trip-rome")
        for event in client.watch("trip-rome"):
            if event.record.HasField("start_t") and event.record.start_t.vertex == "Payment":
                break
        cluster.kill(leader.id, signal.SIGKILL)
        killed = time.monotonic()
        print(f"StartT(Payment) is committed; SIGKILL {leader.id}")
        new = cluster.wait_for_leader(15, among=[n for n in cluster.specs if n != leader.id])
        print(
            f"{new.id} took office with epoch {new.epoch} "
            f"{time.monotonic() - killed:.2f}s after the kill"
        )
        show(client.wait_for_end("trip-rome"))
        payments = [c for c in participants.state("Payment").calls if c.saga_id == "trip-rome"]
        payment = participants.state("Payment")
        charges = [b for b in payment.bookings if b.saga_id == "trip-rome"]
        print(
            f"Payment received {len(payments)} call(s) for trip-rome "
            f"(epochs {sorted({c.epoch for c in payments})}) and charged {len(charges)} time(s)"
        )

        say("the participants' final bookings")
        print_bookings(participants)

        say(f"restarting {leader.id}; every replica must hold the same log")
        cluster.start(leader.id)
        digests = cluster.wait_identical(20)
        for node_id, d in digests.items():
            print(
                f"  {node_id}: applied {d.applied_index}, {d.sagas} sagas, {d.records} records,"
                f" sha256 {d.sha256[:16]}"
            )
        client.close()

        say("what Prometheus scrapes from the new leader (/metrics)")
        print_metrics(cluster, new.id)
        say("done")
    except Exception:
        print(cluster.logs(30))
        print(participants.logs())
        raise
    finally:
        cluster.stop_all()
        participants.stop_all()


SHOWN_METRICS = (
    "saga_sagas_started_total",
    "saga_sagas_completed_total",
    "saga_sagas_aborted_total",
    "saga_duration_seconds_count",
    "saga_raft_term",
    "saga_leader_changes_total",
)


def print_metrics(cluster: LocalCluster, node_id: str) -> None:
    """A few lines of a node's /metrics (served over HTTPS with its certificate)."""
    assert cluster.client_tls is not None and cluster.client_tls.ca is not None
    context = ssl.create_default_context(cafile=str(cluster.client_tls.ca))
    url = f"https://{cluster.specs[node_id].http_addr}/metrics"
    with urllib.request.urlopen(url, timeout=5, context=context) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(SHOWN_METRICS):
                print(f"  {line}")


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
