"""Fault scenarios under a steady saga load, each ending with the global checker.

Marked `faults` (run apart with `pytest -m faults`; `make test` includes them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from cluster.testkit.chaos import REFUSE_MARK, Load
from cluster.testkit.checker import Verdict, check, collect
from cluster.testkit.faults import FaultHarness
from cluster.testkit.travel import travel_definition

pytestmark = [pytest.mark.cluster, pytest.mark.faults]

PARTICIPANTS = {"Car": ["--refuse-saga-substring", REFUSE_MARK]}


@pytest.fixture
def harness(tmp_path, request) -> Iterator[Callable[..., FaultHarness]]:
    made: list[FaultHarness] = []

    def make(nodes: int = 3, node_env: dict[str, str] | None = None) -> FaultHarness:
        h = FaultHarness(str(tmp_path / f"h{len(made)}"), nodes, participant_args=PARTICIPANTS)
        made.append(h)
        h.start(node_env=node_env)
        return h

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for h in made:
        if failed:
            print(h.logs())
        h.stop()


def under_load(
    h: FaultHarness, fault: Callable[[], None], rate: float = 30.0
) -> tuple[Verdict, Load]:
    """Run `fault` while clients submit sagas, heal everything, check."""
    load = Load(
        h.grpc_addrs,
        travel_definition(h.participants.endpoints, timeout_ms=1000, max_attempts=4),
        clients=2,
        rate_per_s=rate,
        seed=7,
    )
    load.start()
    try:
        time.sleep(1.0)
        fault()
        time.sleep(1.0)
    finally:
        load.stop()
    h.heal_all()
    verdict = check(collect(h, load.acknowledged, timeout_s=90))
    assert verdict.ok, verdict.report()
    assert verdict.counts["acknowledged"] > 20, verdict.report()
    return verdict, load


def test_leader_killed_under_load(harness) -> None:
    h = harness()

    def fault() -> None:
        h.kill(h.leader())
        time.sleep(2)

    under_load(h, fault)


def test_follower_killed_and_restarted(harness) -> None:
    h = harness()

    def fault() -> None:
        victim = h.followers()[0]
        h.kill(victim)
        time.sleep(2)
        h.restart(victim)

    under_load(h, fault)


def test_all_nodes_killed_at_once_and_restarted_twice(harness) -> None:
    h = harness()

    def fault() -> None:
        for _ in range(2):
            for n in h.nodes:
                h.kill(n)
            for n in h.nodes:
                h.restart(n)
            h.leader(timeout_s=20)
            time.sleep(1)

    under_load(h, fault)


def test_minority_killed_repeatedly(harness) -> None:
    h = harness()

    def fault() -> None:
        for i in range(3):
            victim = h.nodes[i % len(h.nodes)]
            h.kill(victim)
            time.sleep(1)
            h.restart(victim)
            h.leader(timeout_s=20)

    under_load(h, fault)


def test_majority_killed_nothing_acknowledged_until_it_returns(harness) -> None:
    h = harness()
    window: list[float] = []

    def fault() -> None:
        leader = h.leader()
        victims = [leader, h.followers()[0]]
        for v in victims:
            h.kill(v)
        window.append(time.monotonic())
        time.sleep(3)
        window.append(time.monotonic())
        for v in victims:
            h.restart(v)
        h.leader(timeout_s=20)
        time.sleep(1)

    _, load = under_load(h, fault)
    # Proposals already in flight at the kill may still be answered for a moment.
    during = [t for t in load.ack_times if window[0] + 0.5 < t < window[1]]
    assert during == [], f"{len(during)} sagas acknowledged without a majority"
    assert any(t > window[1] for t in load.ack_times), "no recovery after the majority returned"


def test_isolated_leader_stops_driving_sagas_within_an_election_timeout(harness) -> None:
    h = harness()
    marks: dict[str, float] = {}

    def fault() -> None:
        leader = h.leader()
        marks["epoch"] = float(h.cluster.status(leader).epoch)
        h.isolate(leader)
        marks["isolated"] = time.time()
        time.sleep(3)
        h.heal()

    under_load(h, fault)
    old = int(marks["epoch"])
    late = [
        c.at - marks["isolated"]
        for name in h.participants.services
        for c in h.participants.state(name).calls
        if c.epoch == old and c.at > marks["isolated"]
    ]
    print(f"isolated leader's last call {max(late, default=0):.3f}s after the isolation")
    # The election timeout is 0.4-0.8 s; the old leader steps down after 0.3 s.
    assert max(late, default=0.0) < 1.0


def test_two_three_split_on_five_nodes(harness) -> None:
    h = harness(nodes=5)

    def fault() -> None:
        leader = h.leader()
        others = [n for n in h.nodes if n != leader]
        h.partition([leader, others[0]], others[1:])  # the leader is in the minority
        time.sleep(3)
        h.heal()

    under_load(h, fault)


def test_leader_paused_and_resumed(harness) -> None:
    h = harness()

    def fault() -> None:
        leader = h.leader()
        h.pause(leader)
        time.sleep(2.5)
        h.resume(leader)

    under_load(h, fault)


def test_a_slow_lossy_link(harness) -> None:
    h = harness()

    def fault() -> None:
        leader, follower = h.leader(), h.followers()[0]
        for a, b in ((leader, follower), (follower, leader)):
            h.lossy(a, b, 0.3)
            h.slow(a, b, 60)
        time.sleep(3)
        h.heal()

    under_load(h, fault)


def test_a_participant_down_during_requests_and_compensations(harness) -> None:
    h = harness()

    def fault() -> None:
        h.participant_down("Hotel")  # the load holds refusals: compensations too
        time.sleep(2.5)
        h.participant_up("Hotel")

    under_load(h, fault)


@pytest.mark.parametrize("point", ["before_request", "before_end_t", "mid_compensation"])
def test_leader_dies_at_a_crash_point(harness, point) -> None:
    """Every node's first lifetime dies at `point` (StartT committed but request not
    sent; reply received but EndT not proposed; StartC committed, compensation not
    sent); restarted nodes run clean. The new leaders finish every saga."""
    h = harness(node_env={"SAGA_CRASH_POINT": point})

    def fault() -> None:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            for n in h.nodes:
                if not h.cluster.alive(n):
                    h.cluster.start(n)
            time.sleep(0.2)

    under_load(h, fault)
    logs = "".join(open(s.log_path).read() for s in h.cluster.specs.values())
    assert f"crash point {point} reached" in logs


@pytest.mark.parametrize("torn", [False, True])
def test_power_loss_on_one_node_then_on_a_majority(harness, torn) -> None:
    h = harness()

    def fault() -> None:
        h.power_loss([h.followers()[0]], torn_tail=torn)
        h.leader(timeout_s=20)
        time.sleep(1)
        leader = h.leader()
        h.power_loss([leader, h.followers()[0]], torn_tail=torn)
        h.leader(timeout_s=20)

    under_load(h, fault)
    if torn:
        logs = "".join(open(s.log_path).read() for s in h.cluster.specs.values())
        assert "cut" in logs.lower()
