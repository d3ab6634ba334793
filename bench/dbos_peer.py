"""The peer baseline: the travel saga as a DBOS Transact durable workflow (SQLite
system database), calling the same participants over gRPC.

Run as a process by bench/e2e.py:

    python bench/dbos_peer.py --endpoints JSON --rate R --seconds S --db PATH

It drives itself open-loop at R workflows per second for S seconds and prints one
JSON line: {"latencies_ms": [...], "ended": N, "errors": N, "window_s": S}.
Hotel, Car and Flight run as one step each in sequence, then Payment; on a refusal
the workflow compensates what it booked (the same saga, written the DBOS way).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from dbos import DBOS
from saga.v1 import participant_pb2, participant_pb2_grpc

STUBS: dict[str, participant_pb2_grpc.ParticipantStub] = {}
ACTIONS = {
    "Hotel": ("BookHotel", "CancelHotel"),
    "Car": ("BookCar", "CancelCar"),
    "Flight": ("BookFlight", "CancelFlight"),
    "Payment": ("Charge", "Refund"),
}


def _call(saga_id: str, vertex: str, compensate: bool) -> bool:
    request_key = f"{saga_id}/{vertex}/request"
    action = ACTIONS[vertex][1 if compensate else 0]
    req = participant_pb2.StepRequest(
        saga_id=saga_id,
        vertex=vertex,
        action=action,
        idempotency_key=f"{saga_id}/{vertex}/compensation" if compensate else request_key,
        request_key=request_key,
        attempt=1,
        epoch=1,
    )
    stub = STUBS[vertex]
    reply = (stub.Compensate if compensate else stub.Execute)(req, timeout=5)
    return bool(reply.ok)


@DBOS.step()
def book(saga_id: str, vertex: str) -> bool:
    return _call(saga_id, vertex, False)


@DBOS.step()
def cancel(saga_id: str, vertex: str) -> bool:
    return _call(saga_id, vertex, True)


@DBOS.workflow()
def travel(saga_id: str) -> bool:
    done = []
    for vertex in ("Hotel", "Car", "Flight", "Payment"):
        done.append(vertex)
        if not book(saga_id, vertex):
            for v in reversed(done):
                cancel(saga_id, v)
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoints", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--prefix", default="dbos")
    args = parser.parse_args()
    for name, endpoint in json.loads(args.endpoints).items():
        STUBS[name] = participant_pb2_grpc.ParticipantStub(grpc.insecure_channel(endpoint))
    DBOS(config={"name": "travel-peer", "system_database_url": f"sqlite:///{args.db}"})
    DBOS.launch()
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            travel(f"{args.prefix}-{i}")
            with lock:
                latencies.append((time.perf_counter() - t0) * 1000)
        except Exception:
            with lock:
                errors[0] += 1

    interval = 1.0 / args.rate
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=64) as pool:
        i = 0
        while time.perf_counter() - start < args.seconds:
            pool.submit(one, i)
            i += 1
            time.sleep(max(0.0, start + i * interval - time.perf_counter()))
    window = time.perf_counter() - start
    DBOS.destroy()
    print(
        json.dumps(
            {
                "latencies_ms": latencies,
                "ended": len(latencies),
                "errors": errors[0],
                "window_s": window,
                "submitted": i,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
