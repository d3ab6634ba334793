"""The global checks that end every fault run.

`collect` gathers the observations (IO: the cluster's answers, every node's log,
the participants' own databases, the monitor's samples); `check` is a pure
function of them, so planted bugs can be fed to it directly. What is checked:

1. every acknowledged saga reached EndSaga (once the faults healed);
2. a COMPLETED saga has every request in effect and no compensation in effect;
3. an ABORTED saga has nothing left in effect;
4. no saga exists twice for one client saga id (one StartSaga per id);
5. no request took effect twice (one booking per request, one effect per booking);
6. every node's log holds the same records in the same order (digests, applied index);
7. within each process lifetime, term and commit index never went backwards;
8. once a participant saw a request of epoch e, it never saw a request of an older
   epoch afterwards (a deposed leader stopped driving sagas).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from saga.v1 import sagas_pb2

from cluster.testkit.faults import FaultHarness, Sample


@dataclass(frozen=True)
class Booking:
    participant: str
    saga_id: str
    vertex: str
    status: str  # in_effect | cancelled | refused


@dataclass(frozen=True)
class Received:
    participant: str
    kind: str  # execute | compensate
    epoch: int
    at: float  # when the participant handled it
    sent_ms: int = 0  # when the coordinator sent it (0: unknown)


@dataclass
class Observations:
    acknowledged: set[str]
    # saga id -> (final state name, vertex names, number of StartSaga records)
    sagas: dict[str, tuple[str, list[str], int]] = field(default_factory=dict)
    bookings: list[Booking] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)  # in each participant's order
    digests: dict[str, tuple[str, int]] = field(default_factory=dict)  # node -> (sha, applied)
    samples: list[Sample] = field(default_factory=list)


@dataclass
class Verdict:
    ok: bool
    counts: dict[str, int]
    problems: dict[str, list[str]]  # check name -> what is wrong (saga ids first)

    def report(self) -> str:
        lines = [f"verdict: {'PASS' if self.ok else 'FAIL'}"]
        lines += [f"  {k}: {v}" for k, v in self.counts.items()]
        for check, problems in self.problems.items():
            lines.append(f"  FAILED {check}: {len(problems)}")
            lines += [f"    {p}" for p in problems[:20]]
        return "\n".join(lines)


def check(obs: Observations) -> Verdict:
    problems: dict[str, list[str]] = defaultdict(list)
    effects: dict[tuple[str, str], list[Booking]] = defaultdict(list)
    for b in obs.bookings:
        # A stable idempotency key gives one booking per (saga, vertex); a second
        # one means the same request took effect twice.
        effects[(b.saga_id, b.vertex)].append(b)
    for key, bookings in effects.items():
        if len(bookings) > 1:
            problems["a request took effect twice"].append(
                f"{key[0]}/{key[1]} booked {len(bookings)}x"
            )

    completed = aborted = 0
    for saga_id in sorted(obs.acknowledged):
        if saga_id not in obs.sagas:
            problems["every acknowledged saga ended"].append(f"{saga_id}: lost")
            continue
        state, vertices, starts = obs.sagas[saga_id]
        if starts != 1:
            problems["one saga per saga id"].append(f"{saga_id}: {starts} StartSaga records")
        in_effect = [
            v for v in vertices for b in effects.get((saga_id, v), []) if b.status == "in_effect"
        ]
        if state == "COMPLETED":
            completed += 1
            missing = sorted(set(vertices) - set(in_effect))
            if missing:
                problems["COMPLETED: every request in effect"].append(f"{saga_id}: {missing}")
        elif state == "ABORTED":
            aborted += 1
            if in_effect:
                problems["ABORTED: nothing in effect"].append(f"{saga_id}: {sorted(in_effect)}")
        else:
            problems["every acknowledged saga ended"].append(f"{saga_id}: still {state}")
    for saga_id, (state, vertices, _) in obs.sagas.items():
        if saga_id in obs.acknowledged:
            continue
        # Not acknowledged (the client gave up), yet it may exist: then it must be right.
        in_effect = [
            v for v in vertices for b in effects.get((saga_id, v), []) if b.status == "in_effect"
        ]
        if state == "ABORTED" and in_effect:
            problems["ABORTED: nothing in effect"].append(f"{saga_id}: {sorted(in_effect)}")
        if state == "COMPLETED" and sorted(in_effect) != sorted(vertices):
            problems["COMPLETED: every request in effect"].append(saga_id)

    if len({d for d in obs.digests.values()}) > 1:
        problems["replicas identical"] = [
            f"{n}: {d[0][:16]} at {d[1]}" for n, d in obs.digests.items()
        ]

    last: dict[tuple[str, int], Sample] = {}
    for s in sorted(obs.samples, key=lambda s: s.at):
        prev = last.get((s.node, s.pid))
        if prev is not None:
            if s.term < prev.term:
                problems["term never goes back"].append(
                    f"{s.node} pid {s.pid}: {prev.term}->{s.term}"
                )
            if s.commit_index < prev.commit_index:
                problems["commit index never goes back"].append(
                    f"{s.node} pid {s.pid}: {prev.commit_index}->{s.commit_index}"
                )
        last[(s.node, s.pid)] = s

    # A request of an older epoch may still *arrive* after a newer epoch's first one
    # (it was queued in a process that was then paused); what must not happen is
    # that it was *sent* after the newer epoch's first request reached the participant.
    newest: dict[str, tuple[int, float]] = {}  # participant -> (epoch, first seen at)
    for r in obs.received:
        if r.kind != "execute":
            continue
        epoch, first_at = newest.get(r.participant, (0, 0.0))
        if r.epoch < epoch and (r.sent_ms == 0 or r.sent_ms / 1000 > first_at):
            problems["no older epoch after a newer one"].append(
                f"{r.participant}: epoch {r.epoch} sent after epoch {epoch} arrived"
            )
        if r.epoch > epoch:
            newest[r.participant] = (r.epoch, r.at)

    leaders = [s.leader for s in sorted(obs.samples, key=lambda s: s.at) if s.leader]
    changes = sum(1 for a, b in zip(leaders, leaders[1:], strict=False) if a != b)
    counts = {
        "acknowledged": len(obs.acknowledged),
        "completed": completed,
        "aborted": aborted,
        "sagas in the log": len(obs.sagas),
        "bookings": len(obs.bookings),
        "replicas compared": len(obs.digests),
        "status samples": len(obs.samples),
        "leader changes seen": changes,
    }
    return Verdict(ok=not problems, counts=counts, problems=dict(problems))


def collect(
    harness: FaultHarness, acknowledged: set[str], timeout_s: float = 120.0
) -> Observations:
    """After the faults healed: wait for every acknowledged saga to end (or the
    deadline), wait for the replicas to converge, then read everything."""
    from cluster.client.logclient import LogClient
    from cluster.client.saga_client import SagaClient

    obs = Observations(acknowledged=set(acknowledged), samples=list(harness.samples))
    deadline = time.monotonic() + timeout_s
    with SagaClient(harness.grpc_addrs, retry_deadline_s=30) as client:
        ids = {s.saga_id for s in client.list(page_size=1000)}
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            for saga_id in sorted(pending):
                info = client.get(saga_id)
                if info.state in (sagas_pb2.COMPLETED, sagas_pb2.ABORTED):
                    pending.discard(saga_id)
            if pending:
                time.sleep(0.2)
        for saga_id in ids:
            info = client.get(saga_id)
            starts = sum(1 for r in info.records if r.HasField("start_saga"))
            obs.sagas[saga_id] = (
                sagas_pb2.SagaState.Name(info.state),
                [v.name for v in info.vertices],
                starts,
            )
    with LogClient(harness.grpc_addrs) as log_client:
        while True:
            obs.digests = {}
            for node, spec in harness.cluster.specs.items():
                try:
                    d = log_client.digest(spec.grpc_addr)
                    obs.digests[node] = (d.sha256, d.applied_index)
                except Exception:
                    obs.digests[node] = ("unreachable", -1)
            if len(set(obs.digests.values())) == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    for name in harness.participants.services:
        state = harness.participants.state(name)
        for booking in state.bookings:
            obs.bookings.append(Booking(name, booking.saga_id, booking.vertex, booking.status))
        for call in state.calls:
            obs.received.append(Received(name, call.kind, call.epoch, call.at, call.sent_ms))
    return obs
