"""`sagactl chaos`: a seeded, randomized fault schedule against a local cluster under
a steady saga load, then heal, wait, check, and print the verdict and a summary.

The same seed gives the same schedule (fault types, targets by role, timings).
Every fault is held for a while and then healed before the next one; the run is
bounded by its duration and every wait by a deadline.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.client.saga_client import SagaClient
from cluster.testkit.checker import Verdict, check, collect
from cluster.testkit.faults import FaultHarness
from cluster.testkit.travel import travel_definition

REFUSE_MARK = "refuse"  # Car refuses sagas whose id holds this
REFUSE_SHARE = 0.1

COMMON_FAULTS = [
    "kill_leader",
    "kill_follower",
    "pause_leader",
    "isolate_leader",
    "isolate_follower",
    "one_way_from_leader",
    "lossy_link",
    "slow_link",
    "power_loss_follower",
    "power_loss_majority",
    "kill_all",
    "participant_down",
    "participant_hang",
]
FIVE_NODE_FAULTS = ["split_2_3", "bridge"]


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str
    hold_s: float
    pick: float  # chooses among candidate targets, in [0, 1)


def schedule(seed: int, duration_s: float, nodes: int) -> list[Fault]:
    """Every fault type twice (then more at random), in a seeded order."""
    rng = random.Random(seed)
    kinds = COMMON_FAULTS + (FIVE_NODE_FAULTS if nodes == 5 else [])
    order = kinds * 2
    rng.shuffle(order)
    start_s, end_s = 2.0, duration_s - 3.0
    slot = (end_s - start_s) / len(order)
    faults = []
    for i, kind in enumerate(order):
        hold = slot * rng.uniform(0.45, 0.7)
        faults.append(Fault(start_s + i * slot, kind, hold, rng.random()))
    return faults


@dataclass
class Load:
    """Clients submitting travel sagas at a steady rate; acknowledged ids recorded."""

    addrs: list[str]
    definition: object
    clients: int
    rate_per_s: float
    seed: int
    acknowledged: set[str] = field(default_factory=set)
    ack_times: list[float] = field(default_factory=list)
    failed_submits: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(k,), daemon=True)
            for k in range(self.clients)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _client(self, k: int) -> None:
        rng = random.Random(self.seed * 1000 + k)
        interval = self.clients / self.rate_per_s
        next_at = time.monotonic()
        with SagaClient(self.addrs, call_timeout_s=5, retry_deadline_s=10) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                mark = f"-{REFUSE_MARK}" if rng.random() < REFUSE_SHARE else ""
                saga_id = f"s{self.seed}-c{k}-{i}{mark}"
                try:
                    client.submit(self.definition, b'{"trip": 1}', saga_id=saga_id)  # type: ignore[arg-type]
                    with self._lock:
                        self.acknowledged.add(saga_id)
                        self.ack_times.append(time.monotonic())
                except Exception:
                    with self._lock:
                        self.failed_submits += 1
                next_at += interval
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def longest_gap_s(self, since: float, until: float) -> float:
        times = sorted([since] + [t for t in self.ack_times if since <= t <= until] + [until])
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


class Chaos:
    def __init__(self, harness: FaultHarness, seed: int, log=print) -> None:
        self.h = harness
        self.rng = random.Random(seed ^ 0x5A5A)
        self.log = log
        self.injected: Counter[str] = Counter()

    def _choose(self, candidates: list[str], pick: float) -> str:
        return candidates[int(pick * len(candidates)) % len(candidates)]

    def inject(self, fault: Fault) -> None:
        """Apply `fault`, hold it, heal it. Targets are chosen by role at the time."""
        h = self.h
        kind = fault.kind
        try:
            leader = h.leader(timeout_s=10)
        except TimeoutError:
            leader = self._choose(h.nodes, fault.pick)
        followers = [n for n in h.nodes if n != leader]
        target = self._choose(followers, fault.pick)
        self.log(
            f"  t+{fault.at_s:6.1f}s {kind} (leader {leader}, target {target}) "
            f"for {fault.hold_s:.1f}s"
        )
        heal: Callable[[], None] | None = None
        if kind == "kill_leader":
            h.kill(leader)
            heal = lambda: h.restart(leader)  # noqa: E731
        elif kind == "kill_follower":
            h.kill(target)
            heal = lambda: h.restart(target)  # noqa: E731
        elif kind == "pause_leader":
            h.pause(leader)
            heal = lambda: h.resume(leader)  # noqa: E731
        elif kind == "isolate_leader":
            h.isolate(leader)
            heal = h.heal
        elif kind == "isolate_follower":
            h.isolate(target)
            heal = h.heal
        elif kind == "one_way_from_leader":
            h.one_way(leader, target)
            heal = h.heal
        elif kind == "lossy_link":
            h.lossy(leader, target, 0.3)
            h.lossy(target, leader, 0.3)
            heal = h.heal
        elif kind == "slow_link":
            h.slow(leader, target, 80)
            h.slow(target, leader, 80)
            heal = h.heal
        elif kind == "split_2_3":
            nodes = list(h.nodes)
            self.rng.shuffle(nodes)
            h.partition(nodes[:2], nodes[2:])
            heal = h.heal
        elif kind == "bridge":
            h.bridge(self._choose(h.nodes, fault.pick))
            heal = h.heal
        elif kind == "power_loss_follower":
            h.power_loss([target], torn_tail=fault.pick < 0.5)
        elif kind == "power_loss_majority":
            majority = ([leader] + followers)[: len(h.nodes) // 2 + 1]
            h.power_loss(majority, torn_tail=fault.pick < 0.5)
        elif kind == "kill_all":
            for n in h.nodes:
                h.kill(n)

            def heal_all() -> None:
                for n in h.nodes:
                    h.restart(n)

            heal = heal_all
        elif kind == "participant_down":
            name = self._choose(list(h.participants.services), fault.pick)
            h.participant_down(name)
            heal = lambda: h.participant_up(name)  # noqa: E731  (its original knobs)
        elif kind == "participant_hang":
            name = self._choose(list(h.participants.services), fault.pick)
            knobs = ["--hang-rate", "0.3", "--hang-s", "3"]
            if name == "Car":
                knobs += ["--refuse-saga-substring", REFUSE_MARK]
            h.participant_up(name, knobs)
            heal = lambda: h.participant_up(name)  # noqa: E731
        else:
            raise ValueError(f"unknown fault {kind}")
        self.injected[kind] += 1
        time.sleep(fault.hold_s)
        if heal is not None:
            heal()


def _default_knobs(name: str) -> list[str]:
    return ["--refuse-saga-substring", REFUSE_MARK] if name == "Car" else []


def run(
    base_dir: str,
    duration_s: float,
    seed: int,
    nodes: int = 3,
    clients: int = 4,
    rate_per_s: float = 60.0,
    log=print,
) -> tuple[Verdict, dict]:
    harness = FaultHarness(
        base_dir,
        nodes=nodes,
        participant_args={"Car": _default_knobs("Car")},
    )
    plan = schedule(seed, duration_s, nodes)
    chaos = Chaos(harness, seed, log)
    harness.start()
    load = Load(
        harness.grpc_addrs,
        travel_definition(harness.participants.endpoints, timeout_ms=1000, max_attempts=4),
        clients,
        rate_per_s,
        seed,
    )
    started = time.monotonic()
    try:
        log(
            f"chaos: seed {seed}, {nodes} nodes, {duration_s:.0f}s, {len(plan)} faults, "
            f"{clients} clients at {rate_per_s:.0f} sagas/s"
        )
        load.start()
        for fault in plan:
            wait = started + fault.at_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            chaos.inject(fault)
        time.sleep(max(0.0, started + duration_s - time.monotonic()))
        load.stop()
        ended = time.monotonic()
        log("chaos: healing, waiting for every saga to end, checking")
        harness.heal_all()
        obs = collect(harness, load.acknowledged, timeout_s=180)
        verdict = check(obs)
        summary = {
            "seed": seed,
            "nodes": nodes,
            "duration_s": duration_s,
            "faults": dict(sorted(chaos.injected.items())),
            "acknowledged": len(load.acknowledged),
            "submits_given_up": load.failed_submits,
            "completed": verdict.counts["completed"],
            "aborted": verdict.counts["aborted"],
            "leader_changes": verdict.counts["leader changes seen"],
            "longest_unavailability_s": round(load.longest_gap_s(started + 1, ended), 2),
        }
        return verdict, summary
    except BaseException:
        log(harness.logs())
        raise
    finally:
        load.stop()
        harness.stop()
