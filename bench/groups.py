"""More than one Raft group: sagas per second with 1, 2 and 3 groups, as a client
of the public library sees it (closed loop), beside the direct-call baseline, in
one run.

    python bench/groups.py [--groups 1,2,3] [--concurrency 16,64] [--seconds 8]
                           [--rounds 2] [--quick]

--quick: groups 1 and 2, c = 16, 3 s windows, one round (a smoke run).

The four travel participants start once. Then, round after round, for each
number of groups G: a cluster of G groups of three node processes each
(`LocalCluster` for one, `cluster.testkit.groups.ShardedCluster` otherwise) is
started in a temporary directory, every group's leader is awaited, and at each
concurrency c the closed loop of bench/client.py runs the travel saga with
`AsyncSagaClient.run` (the client is given every node; it reads the shard map and
sends each saga to its group). The cluster is stopped before the next G. The
direct baseline (the same four participant calls made by the client itself, no
coordinator, no log) runs at each c in every round, while no cluster runs.

Per (G, c, round): sagas ended per second, p50/p99 latency, CPU milliseconds per
ended saga of all node processes together, of the participants and of this
client, Raft entries per saga (every group's leader's commit index, summed), and
how busy the machine's CPUs were during the window (/proc/stat: 1 - idle share,
over all cores). The ratios printed are each G's rate over one group's rate at
the same c in the same round, and each rate over the direct baseline's.

Output: a table on stdout and bench/results/groups.json. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import tempfile
import time
from typing import Any

import grpc
from saga.v1 import participant_pb2_grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.client import (  # noqa: E402
    Snapshot,
    closed_loop,
    direct_saga,
    own_cpu_s,
    run_saga,
    summarize,
)
from bench.e2e import proc_stats  # noqa: E402
from cluster.client.aio import AsyncSagaClient  # noqa: E402
from cluster.testkit.groups import ShardedCluster  # noqa: E402
from cluster.testkit.launcher import LocalCluster  # noqa: E402
from cluster.testkit.travel import TravelParticipants, travel_definition  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LEADER_WAIT_S = 30.0
IDLE_S = 3.0  # the cluster's own cost with no saga: heartbeats, timers, health polls
MAX_GROUPS = 4  # each group is three node processes on this machine


def cpu_ticks() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return idle, sum(fields)


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    idle, total = after[0] - before[0], after[1] - before[1]
    return 1 - idle / total if total > 0 else None


class Run:
    """One cluster of G groups and what the closed loop reads from it."""

    def __init__(self, tmp: str, groups: int, parts: TravelParticipants) -> None:
        base = os.path.join(tmp, f"g{groups}-{time.monotonic_ns()}")
        self.sharded = ShardedCluster(base, groups) if groups > 1 else None
        self.groups = self.sharded.groups if self.sharded else [LocalCluster(base)]
        self.parts = parts

    def start(self) -> None:
        if self.sharded is not None:
            self.sharded.start_all()
        else:
            self.groups[0].start_all()
        for group in self.groups:
            group.wait_for_leader(LEADER_WAIT_S)

    def stop(self) -> None:
        for group in self.groups:
            group.stop_all()

    def addrs(self) -> list[str]:
        return [s.grpc_addr for g in self.groups for s in g.specs.values()]

    def idle_cost(self, seconds: float) -> dict[str, Any]:
        """How busy the CPUs are, and the node processes' share, with no load."""
        nodes = [p.pid for g in self.groups for p in g.procs.values()]
        ticks, cpu = cpu_ticks(), sum(proc_stats(pid)[0] for pid in nodes)
        time.sleep(seconds)
        node_cores = (sum(proc_stats(pid)[0] for pid in nodes) - cpu) / seconds
        return {"cpu_busy": busy_share(ticks, cpu_ticks()), "idle_node_cores": node_cores}

    def snapshot(self, ticks: list[tuple[int, int]]) -> Snapshot:
        t = time.perf_counter()
        ticks.append(cpu_ticks())
        pids = [p.pid for g in self.groups for p in g.procs.values()]
        cpu = {
            "nodes": sum(proc_stats(pid)[0] for pid in pids),
            "participants": sum(
                proc_stats(pid)[0] for n in self.parts.services if (pid := self.parts.pid(n))
            ),
            "client": own_cpu_s(),
        }
        leaders, commits = [], 0
        for group in self.groups:
            try:
                status = group.wait_for_leader(5)
            except TimeoutError:
                return Snapshot(t, cpu, "", None)
            leaders.append(status.id)
            commits += status.commit_index
        return Snapshot(t, cpu, ",".join(leaders), commits)


async def measure_cluster(run: Run, c: int, warmup_s: float, seconds: float) -> dict[str, Any]:
    definition = travel_definition(run.parts.endpoints)
    ticks: list[tuple[int, int]] = []
    take = functools.partial(run.snapshot, ticks)
    tag = f"g{len(run.groups)}c{c}-{time.monotonic_ns()}"
    async with AsyncSagaClient(run.addrs()) as client:
        samples, before, after = await closed_loop(
            c, tag, lambda s: run_saga(client, definition, s), warmup_s, seconds, take
        )
    row = summarize("run", c, samples, before, after)
    row["cpu_busy"] = busy_share(ticks[0], ticks[1])
    return row


async def measure_direct(
    parts: TravelParticipants, c: int, warmup_s: float, seconds: float
) -> dict[str, Any]:
    channels = {n: grpc.aio.insecure_channel(e) for n, e in parts.endpoints.items()}
    stubs = {n: participant_pb2_grpc.ParticipantStub(ch) for n, ch in channels.items()}
    ticks: list[tuple[int, int]] = []

    def take() -> Snapshot:
        ticks.append(cpu_ticks())
        participants = sum(proc_stats(p)[0] for n in parts.services if (p := parts.pid(n)))
        cpu = {"participants": participants, "client": own_cpu_s()}
        return Snapshot(time.perf_counter(), cpu, "", None)

    try:
        tag = f"d{c}-{time.monotonic_ns()}"
        samples, before, after = await closed_loop(
            c, tag, lambda s: direct_saga(stubs, s), warmup_s, seconds, take
        )
    finally:
        for channel in channels.values():
            await channel.close()
    row = summarize("direct", c, samples, before, after, log=False)
    row["cpu_busy"] = busy_share(ticks[0], ticks[1])
    return row


def print_report(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'round':>5} {'groups':>6} {'c':>4} {'sagas/s':>8} {'vs 1 group':>10} "
        f"{'vs direct':>9} {'p50 ms':>7} {'p99 ms':>7} {'nodes ms/saga':>13} "
        f"{'entries/saga':>12} {'cpu busy':>8} {'errors':>6}"
    )
    for r in rows:
        num = functools.partial(_cell, r)
        if r["c"] == 0:
            print(
                f"{r['round']:>5} {r['groups']:>6} idle: the CPUs {num('cpu_busy', '.0%')} busy, "
                f"the nodes using {num('idle_node_cores', '.2f')} of a core with no saga"
            )
            continue
        nodes_ms = r["cpu_ms_per_saga"].get("nodes")
        print(
            f"{r['round']:>5} {r['groups'] or 'direct':>6} {r['c']:>4} "
            f"{num('ended_per_s', '.1f'):>8} "
            f"{num('vs_one_group', '.2f'):>10} {num('vs_direct', '.2f'):>9} "
            f"{num('p50_ms', '.1f'):>7} {num('p99_ms', '.1f'):>7} "
            f"{format(nodes_ms, '.1f') if nodes_ms else '-':>13} "
            f"{num('entries_per_saga', '.2f'):>12} {num('cpu_busy', '.0%'):>8} {r['errors']:>6}"
        )


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return format(value, fmt) if value is not None else "-"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


async def measure(
    parts: TravelParticipants,
    tmp: str,
    groups: list[int],
    cs: list[int],
    rounds: int,
    warmup_s: float,
    seconds: float,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for k in range(1, rounds + 1):
        direct = {}
        for c in cs:
            print(f"round {k}: direct, c = {c}", flush=True)
            row = await measure_direct(parts, c, warmup_s, seconds)
            direct[c] = row["ended_per_s"]
            rows.append({**row, "round": k, "groups": 0, "vs_direct": 1.0})
        one_group: dict[int, float | None] = {}
        for g in groups:
            run = Run(tmp, g, parts)
            try:
                await asyncio.to_thread(run.start)
                idle = await asyncio.to_thread(run.idle_cost, IDLE_S)
                rows.append({"round": k, "groups": g, "c": 0, "errors": 0, **idle})
                for c in cs:
                    print(f"round {k}: {g} group(s), c = {c}", flush=True)
                    row = await measure_cluster(run, c, warmup_s, seconds)
                    if g == 1:
                        one_group[c] = row["ended_per_s"]
                    rows.append(
                        {
                            **row,
                            "round": k,
                            "groups": g,
                            "vs_one_group": ratio(row["ended_per_s"], one_group.get(c)),
                            "vs_direct": ratio(row["ended_per_s"], direct[c]),
                        }
                    )
            except BaseException:
                for group in run.groups:
                    print(group.logs(40))
                raise
            finally:
                await asyncio.to_thread(run.stop)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--groups", default="1,2,3")
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--seconds", type=float, default=8.0, help="window per step")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="groups 1,2; c = 16; 3 s; 1 round")
    args = parser.parse_args(argv)
    groups = [1, 2] if args.quick else [int(g) for g in args.groups.split(",")]
    cs = [16] if args.quick else [int(c) for c in args.concurrency.split(",")]
    seconds = 3.0 if args.quick else args.seconds
    warmup = 1.0 if args.quick else args.warmup
    rounds = 1 if args.quick else args.rounds
    if not all(1 <= g <= MAX_GROUPS for g in groups) or not 1 <= rounds <= 10:
        parser.error(f"--groups: 1..{MAX_GROUPS} each; --rounds: 1..10")
    os.makedirs(RESULTS, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bench-groups-")
    parts = TravelParticipants(os.path.join(tmp, "participants"))
    started = time.time()
    try:
        parts.start_all()
        parts.wait_ready(15)
        rows = asyncio.run(measure(parts, tmp, groups, cs, rounds, warmup, seconds))
    finally:
        parts.stop_all()
    print_report(rows)
    result = {
        "rows": rows,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "duration_s": time.time() - started,
        "settings": {
            "groups": groups,
            "concurrency": cs,
            "seconds": seconds,
            "warmup_s": warmup,
            "rounds": rounds,
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "data_dir": tmp,
        },
    }
    path = os.path.join(RESULTS, "groups.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
