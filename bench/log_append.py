"""Committed records per second and commit latency of the Saga Log, against a bare
replicated counter: `make bench`, or `.venv/bin/python bench/log_append.py [--quick]`.

Two three-node clusters of real processes on loopback, each in its own temporary
directory, both with the default RaftTiming:

* saga:    `sagalog-node` processes (cluster.testkit.launcher.LocalCluster);
* counter: `bench/counter_node.py` processes: the same journal, transport, Raft
  configuration and gRPC server, with a counter instead of the Saga Log.

The client proposes through gRPC `Cluster.Propose` to the leader, with N calls in
flight (N = 1, 16, 256), in two modes: one record per Raft entry, and batches of
32 records per entry. The records are travel sagas (sagalog.records.completed_saga:
StartSaga with a 4-vertex definition, StartT/EndT per vertex, EndSaga) under
distinct saga ids, decided in the leader's current epoch. Every saga-log result is
checked: only ACCEPTED records count; rejections, duplicates and RPC errors are
counted and printed, never measured as throughput.

Both clusters run side by side and the points alternate saga, counter, saga, ...,
so that load from other work on a shared machine falls on both alike; the idle
cluster only heartbeats. The ratio saga/counter is therefore the Saga Log's own
cost (decode, validation, RocksDB write) on top of Raft, fsync and gRPC.

Results: a table on stdout and bench/results/log_append.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import grpc
from saga.v1 import cluster_pb2, cluster_pb2_grpc, log_pb2

from cluster.grpcutil import CHANNEL_OPTIONS
from cluster.testkit.launcher import LocalCluster
from sagalog import codec
from sagalog.records import completed_saga as travel_records

BENCH_DIR = Path(__file__).resolve().parent
COUNTER_NODE = BENCH_DIR / "counter_node.py"
RESULTS_FILE = BENCH_DIR / "results" / "log_append.json"

CONCURRENCY = (1, 16, 256)
BATCH_RECORDS = 32
PROPOSE_TIMEOUT_MS = 5000  # the node's own deadline for one proposal
RPC_TIMEOUT_S = 10.0  # the client's: longer, so that the node's answer arrives
STREAMS_PER_CHANNEL = 32  # calls in flight per gRPC channel (each its own TCP connection)
ERROR_PAUSE_S = 0.05  # after an RPC error, so that a dead leader is not hammered
START_TIMEOUT_S = 20.0

# The targets: printed beside the numbers, never asserted.
TARGET_P50_MS = 5.0  # commit latency p50 at concurrency 1
TARGET_RATIO = 0.8  # one record per entry, concurrency 256: saga rate / counter rate

SYSTEMS = ("saga", "counter")


@dataclass(frozen=True)
class Mode:
    name: str
    records_per_entry: int


MODES = {"entry": Mode("1/entry", 1), "batch": Mode(f"{BATCH_RECORDS}/entry", BATCH_RECORDS)}


# ---- the counter cluster ---------------------------------------------------------------


class CounterCluster(LocalCluster):
    """Three bench/counter_node.py processes. LocalCluster does the rest as it does for
    sagalog-node: free ports (cluster.testkit.launcher.free_ports), one log file per node, and
    stop_all ends exactly the processes it started, by PID."""

    program = (str(COUNTER_NODE),)

    def wait_for_leader(
        self, timeout_s: float = 10.0, among: list[str] | None = None
    ) -> cluster_pb2.StatusReply:
        """Every live node agrees on one leader and term (a counter has no epoch)."""
        nodes = among if among is not None else [n for n in self.specs if self.alive(n)]
        deadline = time.monotonic() + timeout_s
        replies: list[cluster_pb2.StatusReply | None] = []
        while time.monotonic() < deadline:
            replies = [self.status(n, 0.5) for n in nodes]
            views = {(r.leader_id, r.term) for r in replies if r is not None}
            if None not in replies and len(views) == 1:
                leader_id, _ = views.pop()
                leader = self.status(leader_id, 0.5) if leader_id in nodes else None
                if leader is not None and leader.role == cluster_pb2.LEADER:
                    return leader
            time.sleep(0.02)
        raise TimeoutError(f"no agreed leader among {nodes} within {timeout_s}s: {replies}")


# ---- load --------------------------------------------------------------------------------


class SagaStream:
    """One client's records: whole travel sagas in order, under ids of its own.

    A batch may end inside a saga; the next batch carries on with it. The client
    waits for each answer before sending the next, so a saga's records arrive in
    order, as a coordinator would write them."""

    def __init__(self, prefix: str, epoch: int) -> None:
        self._prefix = prefix
        self._epoch = epoch
        self._sagas = 0
        self._pending: list[log_pb2.Record] = []

    def take(self, n: int) -> list[log_pb2.Record]:
        while len(self._pending) < n:
            self._pending.extend(travel_records(f"{self._prefix}-{self._sagas}", self._epoch))
            self._sagas += 1
        records, self._pending = self._pending[:n], self._pending[n:]
        return records

    def abandon(self) -> None:
        """After a failed call the sagas in progress are in an unknown state: drop them
        rather than send records that would be rejected as out of order."""
        self._pending = []


@dataclass
class Tally:
    """What the clients of one point saw. Calls, verdicts and errors are counted over
    warm-up and window; throughput and latency over the window only."""

    checks_verdicts: bool
    latencies_s: list[float] = field(default_factory=list)
    window_entries: int = 0
    window_records: int = 0
    calls: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicate: int = 0
    batch_errors: int = 0
    rpc_errors: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)

    def sample(self, text: str) -> None:
        if len(self.samples) < 5:
            self.samples.append(text)

    def verdicts(self, reply: cluster_pb2.ProposeReply, sent: int) -> int:
        """Count the verdicts of one reply; returns how many records were ACCEPTED."""
        if not self.checks_verdicts:
            self.accepted += sent  # the counter applies whatever it is given
            return sent
        result = reply.result
        if result.error or len(result.results) != sent:
            self.batch_errors += 1
            self.sample(f"batch error: {result.error!r}, {len(result.results)}/{sent} results")
            return 0
        ok = 0
        for r in result.results:
            if r.verdict == log_pb2.ACCEPTED:
                ok += 1
            elif r.verdict == log_pb2.DUPLICATE:
                self.duplicate += 1
                self.sample(f"DUPLICATE seq {r.seq}")
            else:
                self.rejected += 1
                self.sample(f"{log_pb2.Verdict.Name(r.verdict)}: {r.reason}")
        self.accepted += ok
        return ok


async def _client(
    stub: cluster_pb2_grpc.ClusterStub,
    stream: SagaStream,
    records_per_entry: int,
    window: tuple[float, float],
    tally: Tally,
) -> None:
    """One call in flight at a time until the window closes (the last call is awaited,
    and counted only if it completes inside the window)."""
    begin, end = window
    while time.perf_counter() < end:
        records = stream.take(records_per_entry)
        request = cluster_pb2.ProposeRequest(
            batch=codec.encode_batch(records), timeout_ms=PROPOSE_TIMEOUT_MS
        )
        tally.calls += 1
        t0 = time.perf_counter()
        try:
            reply = await stub.Propose(request, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            tally.rpc_errors[exc.code().name] += 1
            tally.sample(f"{exc.code().name}: {exc.details()}")
            stream.abandon()
            await asyncio.sleep(ERROR_PAUSE_S)
            continue
        t1 = time.perf_counter()
        ok = tally.verdicts(reply, len(records))
        if ok < len(records):
            stream.abandon()
        if begin <= t1 < end:
            tally.latencies_s.append(t1 - t0)
            tally.window_entries += 1
            tally.window_records += ok


async def _drive(
    addr: str,
    concurrency: int,
    mode: Mode,
    epoch: int,
    prefix: str,
    warmup_s: float,
    duration_s: float,
    tally: Tally,
) -> None:
    n_channels = max(1, math.ceil(concurrency / STREAMS_PER_CHANNEL))
    # A local subchannel pool gives each channel its own connection.
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(addr, options=options) for _ in range(n_channels)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 5.0)
        stubs = [cluster_pb2_grpc.ClusterStub(c) for c in channels]
        start = time.perf_counter()
        window = (start + warmup_s, start + warmup_s + duration_s)
        await asyncio.gather(
            *(
                _client(
                    stubs[i % n_channels],
                    SagaStream(f"{prefix}-w{i}", epoch),
                    mode.records_per_entry,
                    window,
                    tally,
                )
                for i in range(concurrency)
            )
        )
    finally:
        for channel in channels:
            await channel.close()


# ---- one point -----------------------------------------------------------------------------


@dataclass
class Point:
    system: str
    mode: str
    records_per_entry: int
    concurrency: int
    duration_s: float
    records_per_s: float
    entries_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    calls: int
    accepted: int
    rejected: int
    duplicate: int
    batch_errors: int
    rpc_errors: dict[str, int]
    samples: list[str]
    leader: str
    term: int
    epoch: int
    leader_changed: bool
    leader_cpu: float | None  # cores used by the leader process during the point
    followers_cpu: float | None  # cores used by both followers together
    client_cpu: float  # cores used by this process (the load generator)

    @property
    def problems(self) -> int:
        return self.rejected + self.duplicate + self.batch_errors + sum(self.rpc_errors.values())


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0] * 1000
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(q) - 1] * 1000


def run_point(
    cluster: LocalCluster,
    system: str,
    mode_key: str,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    attempt: int = 1,
) -> Point:
    """Measure one (system, mode, concurrency) against the current leader."""
    mode = MODES[mode_key]
    leader = cluster.wait_for_leader(timeout_s=10)
    leader_pid = cluster.specs[leader.id].pid
    follower_pids = [s.pid for n, s in cluster.specs.items() if n != leader.id]
    cpu0 = [_cpu_seconds(leader_pid), *(_cpu_seconds(p) for p in follower_pids)]
    client0, wall0 = time.process_time(), time.perf_counter()

    tally = Tally(checks_verdicts=system == "saga")
    prefix = f"{mode_key}-c{concurrency}-a{attempt}"
    asyncio.run(
        _drive(
            leader.leader_grpc_addr,
            concurrency,
            mode,
            leader.epoch,
            prefix,
            warmup_s,
            duration_s,
            tally,
        )
    )

    wall = time.perf_counter() - wall0
    cpu1 = [_cpu_seconds(leader_pid), *(_cpu_seconds(p) for p in follower_pids)]
    used = [
        b - a if a is not None and b is not None else None for a, b in zip(cpu0, cpu1, strict=True)
    ]
    after = cluster.status(leader.id)
    changed = after is None or after.role != cluster_pb2.LEADER or after.term != leader.term
    lat = sorted(tally.latencies_s)
    followers = None if None in used[1:] else sum(u for u in used[1:] if u is not None) / wall
    return Point(
        system=system,
        mode=mode.name,
        records_per_entry=mode.records_per_entry,
        concurrency=concurrency,
        duration_s=duration_s,
        records_per_s=tally.window_records / duration_s,
        entries_per_s=tally.window_entries / duration_s,
        p50_ms=_percentile(lat, 50),
        p99_ms=_percentile(lat, 99),
        mean_ms=statistics.fmean(lat) * 1000 if lat else None,
        max_ms=lat[-1] * 1000 if lat else None,
        calls=tally.calls,
        accepted=tally.accepted,
        rejected=tally.rejected,
        duplicate=tally.duplicate,
        batch_errors=tally.batch_errors,
        rpc_errors=dict(tally.rpc_errors),
        samples=tally.samples,
        leader=leader.id,
        term=leader.term,
        epoch=leader.epoch,
        leader_changed=changed,
        leader_cpu=used[0] / wall if used[0] is not None else None,
        followers_cpu=followers,
        client_cpu=(time.process_time() - client0) / wall,
    )


# ---- clusters ----------------------------------------------------------------------------


def start_cluster(system: str, base_dir: str) -> LocalCluster:
    """Start three nodes and wait for an agreed leader (and, for the Saga Log, its
    epoch). On failure the node logs are printed and every process is stopped."""
    cls = LocalCluster if system == "saga" else CounterCluster
    # The Saga Log alone: its coordinator would otherwise start running the bench's
    # sagas (their participants do not exist) and race the bench's own records.
    extra = ("--no-coordinator",) if system == "saga" else ()
    cluster = cls(
        os.path.join(base_dir, system), nodes=3, extra_args=extra, test_propose=system == "saga"
    )
    try:
        cluster.start_all()
        leader = cluster.wait_for_leader(timeout_s=START_TIMEOUT_S)
    except Exception:
        print(f"\n{system} cluster failed to start; node logs:\n{cluster.logs()}", flush=True)
        cluster.stop_all()
        raise
    except BaseException:  # Ctrl-C
        cluster.stop_all()
        raise
    print(f"{system}: leader {leader.id} (term {leader.term}, epoch {leader.epoch})", flush=True)
    return cluster


def check_alive(cluster: LocalCluster, system: str) -> None:
    dead = [n for n in cluster.specs if not cluster.alive(n)]
    if dead:
        raise RuntimeError(f"{system} node(s) {dead} exited; node logs:\n{cluster.logs()}")


# ---- report ------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


HEADER = (
    f"{'mode':<9}{'conc':>5}  {'system':<8}{'records/s':>10}{'entries/s':>10}"
    f"{'p50 ms':>9}{'p99 ms':>9}{'calls':>8}{'rej/dup':>9}{'errors':>7}"
    f"{'cpu L/F/C':>17}"
)


def _row(p: Point) -> str:
    cpu = "/".join(_num(c, 2) for c in (p.leader_cpu, p.followers_cpu, p.client_cpu))
    errors = p.batch_errors + sum(p.rpc_errors.values())
    rej = f"{p.rejected}/{p.duplicate}" if p.system == "saga" else "-"
    churn = "  LEADER CHANGED" if p.leader_changed else ""
    return (
        f"{p.mode:<9}{p.concurrency:>5}  {p.system:<8}{_num(p.records_per_s):>10}"
        f"{_num(p.entries_per_s):>10}{_num(p.p50_ms, 2):>9}{_num(p.p99_ms, 2):>9}"
        f"{p.calls:>8}{rej:>9}{errors:>7}{cpu:>17}{churn}"
    )


@dataclass(frozen=True)
class Ratio:
    """saga / counter at one (mode, concurrency)."""

    mode: str
    concurrency: int
    records_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None


def comparisons(points: list[Point]) -> list[Ratio]:
    """saga/counter for every (mode, concurrency) measured on both systems."""
    by_key = {(p.system, p.mode, p.concurrency): p for p in points}
    out = []
    for p in points:
        other = by_key.get(("counter", p.mode, p.concurrency))
        if p.system == "saga" and other is not None:
            out.append(
                Ratio(
                    mode=p.mode,
                    concurrency=p.concurrency,
                    records_per_s=_ratio(p.records_per_s, other.records_per_s),
                    p50_ms=_ratio(p.p50_ms, other.p50_ms),
                    p99_ms=_ratio(p.p99_ms, other.p99_ms),
                )
            )
    return out


def targets(points: list[Point], ratios: list[Ratio]) -> list[str]:
    """The issue's targets beside what was measured."""
    lines = []
    for p in points:
        if p.system == "saga" and p.concurrency == 1:
            met = p.p50_ms is not None and p.p50_ms < TARGET_P50_MS
            lines.append(
                f"commit latency p50 < {TARGET_P50_MS:g} ms at concurrency 1, {p.mode}: "
                f"{_num(p.p50_ms, 2)} ms ({'met' if met else 'NOT met'})"
            )
    for r in ratios:
        if r.mode == MODES["entry"].name and r.concurrency == 256:
            met = r.records_per_s is not None and r.records_per_s >= TARGET_RATIO
            lines.append(
                f"1 record/entry at concurrency 256, saga >= {TARGET_RATIO:g} x counter: "
                f"{_num(r.records_per_s, 2)} ({'met' if met else 'NOT met'})"
            )
    return lines


def report(
    points: list[Point], discarded: list[Point], meta: dict[str, object]
) -> dict[str, object]:
    """Print the table, the targets and any problem; return the JSON document."""
    ratios = comparisons(points)
    ratio_by_key = {(r.mode, r.concurrency): r for r in ratios}
    lines = [HEADER, "-" * len(HEADER)]
    for key in dict.fromkeys((p.mode, p.concurrency) for p in points):
        lines += [_row(p) for p in points if (p.mode, p.concurrency) == key]
        r = ratio_by_key.get(key)
        if r is not None:
            lines.append(
                f"{'':<16}{'ratio':<8}{_num(r.records_per_s, 2):>10}{'':>10}"
                f"{_num(r.p50_ms, 2):>9}{_num(r.p99_ms, 2):>9}"
            )
        lines.append("")
    goal_lines = targets(points, ratios)
    print("\n" + "\n".join(lines))
    print(
        "ratio = saga / counter. rej/dup: REJECTED/DUPLICATE verdicts; errors: RPC errors and\n"
        "undecodable batches (both over warm-up and window). cpu L/F/C: cores used by the\n"
        "leader, both followers together, and the client.\n"
    )
    print("targets (from the issue, not asserted):")
    for line in goal_lines:
        print(f"  {line}")
    for p in discarded:
        print(f"\ndiscarded after a leader change, then measured again:\n{_row(p)}")
    for p in [*discarded, *points]:
        if p.problems:
            print(f"\n{p.system} {p.mode} c={p.concurrency}: problems, e.g. {p.samples}")
    return {
        **meta,
        "points": [asdict(p) for p in points],
        "discarded_points": [asdict(p) for p in discarded],
        "ratios": [asdict(r) for r in ratios],
        "targets": goal_lines,
        "table": "\n".join(lines),
    }


# ---- main --------------------------------------------------------------------------------


def _plan(modes: list[str], concurrency: list[int]) -> Iterator[tuple[str, int]]:
    for mode in modes:
        for n in concurrency:
            yield mode, n


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the finally blocks that stop the nodes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: ~30 s in all")
    parser.add_argument("--duration", type=float, help="measured seconds per point (5; quick 2)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per point (1; quick 0.5)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--dir", help="keep data and node logs here (default: a temp dir)")
    parser.add_argument("--no-save", action="store_true", help=f"do not write {RESULTS_FILE}")
    args = parser.parse_args(argv)
    duration = args.duration or (2.0 if args.quick else 5.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)

    signal.signal(signal.SIGTERM, _on_sigterm)
    base = args.dir or tempfile.mkdtemp(prefix="sagabench-")
    clusters: dict[str, LocalCluster] = {}
    points: list[Point] = []
    discarded: list[Point] = []
    load_before = os.getloadavg()
    started = datetime.now(UTC)
    try:
        for system in args.systems:
            clusters[system] = start_cluster(system, base)
        for mode, concurrency in _plan(args.modes, args.concurrency):
            for system in args.systems:
                cluster = clusters[system]
                check_alive(cluster, system)
                point = run_point(cluster, system, mode, concurrency, warmup, duration)
                print(_row(point), flush=True)
                if point.leader_changed:
                    # A point that spans an election measures the election (and, for the
                    # Saga Log, records fenced by the new epoch): keep it aside, run again.
                    discarded.append(point)
                    print("  (leader changed: discarded, measuring again)", flush=True)
                    point = run_point(cluster, system, mode, concurrency, warmup, duration, 2)
                    print(_row(point), flush=True)
                points.append(point)
                check_alive(cluster, system)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the nodes", file=sys.stderr)
        return 130
    finally:
        for cluster in clusters.values():
            cluster.stop_all()
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)

    meta: dict[str, object] = {
        "date": started.isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "settings": {
            "quick": args.quick,
            "warmup_s": warmup,
            "duration_s": duration,
            "propose_timeout_ms": PROPOSE_TIMEOUT_MS,
            "records": "sagalog.records.completed_saga (10 records per saga)",
        },
    }
    print(
        f"\n{started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cpus, load average before "
        f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
        f"{duration:g} s per point after {warmup:g} s warm-up"
    )
    result = report(points, discarded, meta)
    if not args.no_save:
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_FILE.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
