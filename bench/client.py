"""The headline benchmark, from the client's side, closed loop: the travel saga as a
caller of the public client library sees it, beside the same work done with no
coordinator and by DBOS Transact, all measured in one run.

    python bench/client.py [--concurrency 1,16,64,256] [--seconds 10] [--quick]
                           [--no-dbos] [--watchers 1000]

--quick: concurrency 1 and 16, 3 s windows, no DBOS (a smoke run).

One run starts, in a temporary directory, a three-node cluster
(`cluster.testkit.launcher.LocalCluster`), the four travel participants
(`cluster.testkit.travel.TravelParticipants`) and, for the watchers measurement, a fifth
participant process: a second Payment. All are real processes; a `finally` block
stops them (only them, by PID) whatever happens.

Closed loop. At concurrency c, c workers each start one travel saga, wait until
the client knows that it has ended, then start the next one, for a warm-up (2 s;
1 s with --quick; --warmup) and then a window of --seconds. Every worker is an
asyncio task in this process, at every c, with `cluster.client.aio.AsyncSagaClient`
(a thread per worker does not scale to c = 256, and one code path keeps the modes
comparable). The client is given every node's address, leader first, so it talks
to the leader; a client whose first node is a follower pays one forwarding hop per
Submit and waits for the follower's apply.

Modes, at each c, one after another (so that background load falls on all alike):

* run: `AsyncSagaClient.run(definition, payload, saga_id=...)`, one call per saga;
  its reply (a SagaInfo, COMPLETED or ABORTED) is the end.
* submit+watch: `submit(...)`, then `watch(saga_id)` until the event whose record
  is the EndSaga.
* direct (baseline): no coordinator, no log. The client makes the same four
  participant calls itself: Hotel, Car and Flight in parallel, then Payment
  (grpc.aio; bench/e2e.py's `direct_step`, closed loop). A refusal would count as
  ABORTED without compensating (the participants refuse nothing here).
* dbos (baseline): DBOS Transact with a SQLite system database, running
  bench/dbos_peer.py's `travel` workflow (Hotel, Car and Flight in sequence, then
  Payment) against the same participants. dbos_peer.py drives itself open loop
  only (--rate), so this file runs itself as a child process (`--dbos-worker`)
  that imports that workflow and drives it closed loop with c threads (a DBOS
  workflow is a synchronous function), printing when its window starts and ends.
  Skipped with --no-dbos, --quick, or when dbos is not installed.

Per (mode, c), over the window: sagas ended per second (COMPLETED or ABORTED, the
end learned by the client inside the window); latency p50/p90/p99 from just before
the call to the moment the client knows the end (and, for run and submit+watch, the
p50 to the EndSaga record's decision time, stamped by the leader on the same
clock: the difference is EndSaga's commit, apply and push); COMPLETED, ABORTED and
error counts; CPU milliseconds per ended saga of each process group, read from
/proc/<pid>/stat (bench.e2e.proc_stats): the three nodes summed, the participants
summed (the four, plus the watchers' second Payment, idle elsewhere), and the
client (this process, `os.times()`; for dbos, the DBOS process, its own client);
and Raft entries committed per ended saga (the leader's `commit_index` from
Cluster.Status, before and after the window).

Then two more measurements:

* watchers: --watchers N travel sagas whose Payment is the second Payment process,
  paused with SIGSTOP (as bench/failover.py does): each runs Hotel, Car and Flight,
  then waits on Payment, so all N are in flight at once. As each Submit returns, a
  task opens Watch on that saga on ONE follower (`AsyncSagaClient([follower],
  retry_deadline_s=0)`: a refusal, RESOURCE_EXHAUSTED, is seen and counted, not
  retried elsewhere). Once the leader has sent every Payment and every stream has
  delivered that record, the run-mode closed loop at c = 16 is measured; as its
  window opens the Payment is resumed (SIGCONT), so the N watched sagas end, and
  their records are pushed to the N streams, during the window. The same is done
  first without the watchers (the same number of held sagas, released the same
  way): the ratio of the two c = 16 rates is the watchers' cost. (Both rates are
  below the plain c = 16 rate of the table: the released sagas are work too, and
  their seconds-long latency makes the coordinator's admission limit shrink. On a
  shared machine, short windows make this ratio noisy: compare the nodes' CPU per
  saga, printed per node, the watched follower beside the others.)
* reads: the leader's commit_index before and after 10,000 `SagaClient.get` calls
  (4 threads: two on the leader, one on each follower; sagas that ended above)
  and 100 one-page `list` calls. Expected: 0 entries added (Get and List use
  ReadIndex, no log entry), measured, not assumed; an idle interval just before
  shows the background. Reads per second for Get and for List.

Output: a table on stdout with the ratios the project targets (printed, not
asserted), and bench/results/client.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from rich.progress import Progress, TimeElapsedColumn
from saga.v1 import log_pb2, participant_pb2, participant_pb2_grpc, sagas_pb2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.e2e import fmt, pct, proc_stats, progress  # noqa: E402
from cluster.client.aio import AsyncSagaClient  # noqa: E402
from cluster.client.saga_client import SagaClient  # noqa: E402
from cluster.testkit.launcher import LocalCluster  # noqa: E402
from cluster.testkit.travel import TRAVEL_ACTIONS, TravelParticipants, travel_definition  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PAYLOAD = b'{"to": "Lisbon"}'
MODES = ("run", "submit+watch", "direct", "dbos")
TAGS = {"run": "run", "submit+watch": "sw", "direct": "d", "dbos": "b"}
SAGA_TIMEOUT_S = 30.0  # one run or watch; a worker stops at most this long after its window
STEP_TIMEOUT_S = 5.0  # one participant call (direct)
MAX_SAGAS_PER_WORKER = 1_000_000  # every loop is bounded in count as well as in time
ERROR_PAUSE_S = 0.01
WATCHERS_C = 16
HELD_TIMEOUT_MS = 120_000  # a held saga's Payment call waits this long before it times out
SUBMITTERS = 32  # concurrent Submits of the held sagas
READY_WAIT_S = 30.0
END_WAIT_S = 60.0
READS = 10_000
LISTS = 100
READ_THREADS = 4
READS_BUDGET_S = 120.0
IDLE_CONTROL_S = 2.0
KEEP_IDS = 2_000
OUTCOMES = {log_pb2.OUTCOME_COMPLETED: "COMPLETED", log_pb2.OUTCOME_ABORTED: "ABORTED"}

# What the project targets (printed beside the measured ratios, never asserted).
TARGET_C1_P50_VS_DIRECT = 6.0  # at most
TARGET_C1_P50_VS_DBOS = 1.0  # below
TARGET_RATE_VS_DIRECT = 0.3  # at least
TARGET_RATE_VS_DBOS = 5.0  # at least
TARGET_WATCH_RATE_RATIO = 0.9  # at least


# ---- measuring ---------------------------------------------------------------------------


@dataclass
class Snapshot:
    t: float  # perf_counter
    cpu_s: dict[str, float]  # "nodes", "participants", "client", and each node id
    leader: str  # as the leader asked says
    commit_index: int | None


@dataclass
class Sample:
    saga_id: str
    start: float  # perf_counter, just before the call
    end: float  # perf_counter, when the client knows the end
    outcome: str  # COMPLETED, ABORTED or error:<what>
    decided_ms: float | None = None  # from just before the call to the EndSaga's time stamp


# A saga's outcome (COMPLETED, ABORTED or error:<what>) and, when the client learns
# it, the EndSaga record's decision time (unix ms, stamped by the leader: same clock).
Ended = tuple[str, int | None]


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Bench:
    cluster: LocalCluster
    parts: TravelParticipants
    held: TravelParticipants | None  # the watchers' second Payment
    definition: log_pb2.SagaDefinition
    addrs: list[str]  # every node's Sagas address, leader first
    warmup_s: float
    seconds: float
    tmp: str

    def participant_pids(self) -> list[int]:
        groups = [self.parts] + ([self.held] if self.held else [])
        return [p for g in groups for n in g.services if (p := g.pid(n)) is not None]

    def snapshot(self, leader: str) -> Snapshot:
        t = time.perf_counter()
        per_node = {n: proc_stats(p.pid)[0] for n, p in self.cluster.procs.items()}
        cpu = {
            "nodes": sum(per_node.values()),
            "participants": sum(proc_stats(p)[0] for p in self.participant_pids()),
            "client": own_cpu_s(),
            **per_node,
        }
        status = self.cluster.status(leader)
        if status is None:
            return Snapshot(t, cpu, "", None)
        return Snapshot(t, cpu, status.leader_id, status.commit_index)

    async def snapshotter(self) -> Callable[[], Snapshot]:
        leader = await asyncio.to_thread(self.cluster.wait_for_leader, 10)
        return functools.partial(self.snapshot, leader.id)


async def outcome_of(call: Awaitable[Ended]) -> Ended:
    try:
        return await call
    except grpc.RpcError as exc:
        return f"error:{exc.code().name}", None
    except TimeoutError:
        return "error:TIMEOUT", None
    except Exception as exc:
        return f"error:{type(exc).__name__}", None


async def closed_loop(
    c: int,
    tag: str,
    one: Callable[[str], Awaitable[Ended]],
    warmup_s: float,
    seconds: float,
    take_snapshot: Callable[[], Snapshot],
    at_window_start: Callable[[], None] | None = None,
) -> tuple[list[Sample], Snapshot, Snapshot]:
    """c asyncio workers, each: one(saga_id), then the next, until the window ends.
    Returns every saga's sample and the snapshots that open and close the window."""
    samples: list[Sample] = []
    stop_at = time.perf_counter() + warmup_s + seconds

    async def worker(w: int) -> None:
        for i in range(MAX_SAGAS_PER_WORKER):
            if time.perf_counter() >= stop_at:
                return
            saga_id = f"{tag}-{w}-{i}"
            wall0, t0 = time.time(), time.perf_counter()
            outcome, end_ms = await outcome_of(one(saga_id))
            decided = None if end_ms is None else end_ms - wall0 * 1000
            samples.append(Sample(saga_id, t0, time.perf_counter(), outcome, decided))
            if outcome.startswith("error"):
                await asyncio.sleep(ERROR_PAUSE_S)  # a call failing at once must not spin

    tasks = [asyncio.create_task(worker(w)) for w in range(c)]
    try:
        await asyncio.sleep(warmup_s)
        before = await asyncio.to_thread(take_snapshot)
        if at_window_start is not None:
            at_window_start()
        await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
        after = await asyncio.to_thread(take_snapshot)
        # Each worker's last saga is bounded by SAGA_TIMEOUT_S (or STEP_TIMEOUT_S).
        await asyncio.wait(tasks, timeout=SAGA_TIMEOUT_S + 10)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return samples, before, after


def make_row(
    mode: str,
    c: int,
    window_s: float,
    inside: list[tuple[float, str]],  # (latency ms, outcome) of sagas ended in the window
    errors_by_kind: Counter[str],
    cpu_s: dict[str, float],
    entries: int | None,
    started: int,
    decided: list[float] | None = None,
) -> dict[str, Any]:
    ended = [ms for ms, outcome in inside if not outcome.startswith("error")]
    n = len(ended)
    outcomes = Counter(outcome for _, outcome in inside)

    def per_saga(cpu_seconds: float) -> float | None:
        return cpu_seconds * 1000 / n if n else None

    return {
        "mode": mode,
        "c": c,
        "window_s": window_s,
        "ended_per_s": n / window_s if window_s > 0 else None,
        "p50_ms": pct(ended, 50),
        "p90_ms": pct(ended, 90),
        "p99_ms": pct(ended, 99),
        # To the EndSaga's decision time instead of the client learning it (run and
        # submit+watch): the difference is the commit of EndSaga, apply and the push.
        "decided_p50_ms": pct(decided or [], 50),
        "decided_p99_ms": pct(decided or [], 99),
        "completed": outcomes["COMPLETED"],
        "aborted": outcomes["ABORTED"],
        "errors": sum(v for k, v in outcomes.items() if k.startswith("error")),
        "errors_by_kind": dict(errors_by_kind),  # the whole step, warm-up and tail included
        "sagas_started": started,
        "cpu_ms_per_saga": {
            g: per_saga(cpu_s[g]) for g in ("nodes", "participants", "client") if g in cpu_s
        },
        "node_cpu_ms_per_saga": {
            g: per_saga(v) for g, v in cpu_s.items() if g not in ("nodes", "participants", "client")
        },
        "entries_per_saga": entries / n if entries is not None and n else None,
    }


def summarize(
    mode: str, c: int, samples: list[Sample], before: Snapshot, after: Snapshot, log: bool = True
) -> dict[str, Any]:
    """A row from a closed loop's samples: what ended inside [before, after]."""
    window = [s for s in samples if before.t <= s.end <= after.t]
    inside = [((s.end - s.start) * 1000, s.outcome) for s in window]
    decided = [s.decided_ms for s in window if s.decided_ms is not None]
    errors = Counter(s.outcome for s in samples if s.outcome.startswith("error"))
    cpu = {g: after.cpu_s[g] - before.cpu_s[g] for g in before.cpu_s}
    entries = None
    if log and before.commit_index is not None and after.commit_index is not None:
        entries = after.commit_index - before.commit_index
    row = make_row(mode, c, after.t - before.t, inside, errors, cpu, entries, len(samples), decided)
    row["leader_changed"] = before.leader != after.leader
    return row


# ---- the modes ---------------------------------------------------------------------------


async def run_saga(client: AsyncSagaClient, definition: Any, saga_id: str) -> Ended:
    info = await client.run(definition, PAYLOAD, saga_id=saga_id, timeout_s=SAGA_TIMEOUT_S)
    return sagas_pb2.SagaState.Name(info.state), info.ended_unix_ms or None


async def submit_watch_saga(client: AsyncSagaClient, definition: Any, saga_id: str) -> Ended:
    await client.submit(definition, PAYLOAD, saga_id=saga_id)
    events = client.watch(saga_id, timeout_s=SAGA_TIMEOUT_S)
    async with contextlib.aclosing(events):
        async for event in events:
            record = event.record
            if record.HasField("end_saga"):
                outcome = OUTCOMES.get(record.end_saga.outcome, "error:OUTCOME_UNSPECIFIED")
                return outcome, record.time_unix_ms
    return "error:watch ended without EndSaga", None


def step_request(saga_id: str, vertex: str) -> participant_pb2.StepRequest:
    key = f"{saga_id}/{vertex}/request"
    return participant_pb2.StepRequest(
        saga_id=saga_id,
        vertex=vertex,
        action=TRAVEL_ACTIONS[vertex][0],
        idempotency_key=key,
        request_key=key,
        attempt=1,
        epoch=1,
    )


async def direct_saga(stubs: dict[str, Any], saga_id: str) -> Ended:
    """The travel saga with no coordinator: Hotel, Car, Flight in parallel, then Payment."""
    first = await asyncio.gather(
        *(
            stubs[v].Execute(step_request(saga_id, v), timeout=STEP_TIMEOUT_S)
            for v in ("Hotel", "Car", "Flight")
        )
    )
    if not all(reply.ok for reply in first):
        return "ABORTED", None
    pay = await stubs["Payment"].Execute(step_request(saga_id, "Payment"), timeout=STEP_TIMEOUT_S)
    return ("COMPLETED" if pay.ok else "ABORTED"), None


async def saga_step(b: Bench, mode: str, c: int, ended_ids: list[str]) -> dict[str, Any]:
    take = await b.snapshotter()
    tag = f"{TAGS[mode]}{c}"
    if mode == "dbos":
        return await asyncio.to_thread(dbos_step, b, c, tag, take)
    if mode == "direct":
        channels = {n: grpc.aio.insecure_channel(e) for n, e in b.parts.endpoints.items()}
        stubs = {n: participant_pb2_grpc.ParticipantStub(ch) for n, ch in channels.items()}
        try:
            samples, before, after = await closed_loop(
                c, tag, lambda s: direct_saga(stubs, s), b.warmup_s, b.seconds, take
            )
        finally:
            for channel in channels.values():
                await channel.close()
        return summarize(mode, c, samples, before, after, log=False)
    saga = run_saga if mode == "run" else submit_watch_saga
    async with AsyncSagaClient(b.addrs) as client:
        samples, before, after = await closed_loop(
            c, tag, lambda s: saga(client, b.definition, s), b.warmup_s, b.seconds, take
        )
    room = KEEP_IDS - len(ended_ids)
    ended_ids.extend([s.saga_id for s in samples if s.outcome == "COMPLETED"][: max(0, room)])
    return summarize(mode, c, samples, before, after)


# ---- DBOS, closed loop, in its own process -----------------------------------------------


def dbos_step(b: Bench, c: int, tag: str, take: Callable[[], Snapshot]) -> dict[str, Any]:
    """Run this file as a DBOS worker at concurrency c; snapshot the other processes
    when it says its window starts and ends. Blocking (run it in a thread)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--dbos-worker",
        "--endpoints",
        json.dumps(b.parts.endpoints),
        "--concurrency",
        str(c),
        "--warmup",
        str(b.warmup_s),
        "--seconds",
        str(b.seconds),
        "--db",
        os.path.join(b.tmp, f"{tag}.sqlite"),
        "--prefix",
        tag,
    ]
    stderr_path = os.path.join(b.tmp, f"{tag}.stderr")
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    # DBOS launches in a few seconds; the worker stops SAGA_TIMEOUT_S after its window.
    watchdog = threading.Timer(b.warmup_s + b.seconds + SAGA_TIMEOUT_S + 120, proc.kill)
    watchdog.start()
    before = after = None
    last = ""
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if line == "WINDOW_START":
                before = take()
            elif line == "WINDOW_END":
                after = take()
            elif line.startswith("{"):
                last = line
        proc.wait(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    if before is None or after is None or not last:
        with open(stderr_path, errors="replace") as f:
            tail = f.read()[-2000:]
        return {"mode": "dbos", "c": c, "error": f"exit {proc.returncode}: {tail}"}
    doc = json.loads(last)  # printed before DBOS.destroy(): a hang there loses nothing
    cpu = {g: after.cpu_s[g] - before.cpu_s[g] for g in before.cpu_s}
    cpu["client"] = doc["cpu_s"]  # the DBOS process: workflow engine and its own client
    inside = list(zip(doc["latencies_ms"], doc["outcomes"], strict=True))
    errors = Counter(doc["errors_by_kind"])
    row = make_row("dbos", c, doc["window_s"], inside, errors, cpu, None, doc["started"])
    row["leader_changed"] = False
    row["exit_code"] = proc.returncode
    row["threads_still_running"] = doc["threads_still_running"]
    return row


def dbos_worker(args: argparse.Namespace) -> int:
    """The child process of `dbos_step`: bench/dbos_peer.py's workflow, closed loop."""
    from dbos import DBOS

    from bench import dbos_peer

    for name, endpoint in json.loads(args.endpoints).items():
        channel = grpc.insecure_channel(endpoint)
        dbos_peer.STUBS[name] = participant_pb2_grpc.ParticipantStub(channel)
    DBOS(config={"name": "travel-peer", "system_database_url": f"sqlite:///{args.db}"})
    DBOS.launch()
    c = int(args.concurrency)
    samples: list[Sample] = []
    stop_at = time.perf_counter() + args.warmup + args.seconds

    def worker(w: int) -> None:
        for i in range(MAX_SAGAS_PER_WORKER):
            if time.perf_counter() >= stop_at:
                return
            saga_id = f"{args.prefix}-{w}-{i}"
            t0 = time.perf_counter()
            try:
                outcome = "COMPLETED" if dbos_peer.travel(saga_id) else "ABORTED"
            except Exception as exc:
                outcome = f"error:{type(exc).__name__}"
            samples.append(Sample(saga_id, t0, time.perf_counter(), outcome))

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(c)]
    for thread in threads:
        thread.start()
    time.sleep(args.warmup)
    cpu0, t0 = own_cpu_s(), time.perf_counter()
    print("WINDOW_START", flush=True)
    time.sleep(max(0.0, stop_at - time.perf_counter()))
    cpu1, t1 = own_cpu_s(), time.perf_counter()
    print("WINDOW_END", flush=True)
    join_by = time.monotonic() + SAGA_TIMEOUT_S
    for thread in threads:
        thread.join(timeout=max(0.1, join_by - time.monotonic()))
    inside = [s for s in list(samples) if t0 <= s.end <= t1]
    doc = {
        "latencies_ms": [(s.end - s.start) * 1000 for s in inside],
        "outcomes": [s.outcome for s in inside],
        "errors_by_kind": Counter(s.outcome for s in samples if s.outcome.startswith("error")),
        "window_s": t1 - t0,
        "cpu_s": cpu1 - cpu0,
        "started": len(samples),
        "threads_still_running": sum(t.is_alive() for t in threads),
    }
    print(json.dumps(doc), flush=True)
    DBOS.destroy()
    return 0


# ---- watchers ----------------------------------------------------------------------------


@dataclass
class Watcher:
    """One Watch stream on the follower, on one held saga."""

    saga_id: str
    at_payment: asyncio.Event  # the stream delivered the Payment StartT (or is over)
    first_event: float | None = None
    end: float | None = None  # perf_counter when the EndSaga event arrived
    outcome: str = "open"  # end, ended without EndSaga event, refused, error:<code>

    async def run(self, client: AsyncSagaClient) -> None:
        try:
            events = client.watch(self.saga_id)
            async with contextlib.aclosing(events):
                async for event in events:
                    now = time.perf_counter()
                    self.first_event = self.first_event or now
                    record = event.record
                    if record.HasField("start_t") and record.start_t.vertex == "Payment":
                        self.at_payment.set()
                    if record.HasField("end_saga"):
                        self.end, self.outcome = now, "end"
                        return
            self.outcome = "ended without EndSaga event"
        except grpc.RpcError as exc:
            code = exc.code()
            self.outcome = (
                "refused" if code == grpc.StatusCode.RESOURCE_EXHAUSTED else f"error:{code.name}"
            )
        finally:
            self.at_payment.set()


async def wait_payments_sent(client: AsyncSagaClient, ids: list[str]) -> bool:
    """Until the leader has logged StartT Payment for the last sagas submitted."""
    deadline = time.monotonic() + READY_WAIT_S
    last = ids[-20:]
    while time.monotonic() < deadline:
        infos = await asyncio.gather(*(client.get(s) for s in last), return_exceptions=True)
        if all(
            not isinstance(info, BaseException)
            and any(r.HasField("start_t") and r.start_t.vertex == "Payment" for r in info.records)
            for info in infos
        ):
            return True
        await asyncio.sleep(0.1)
    return False


async def wait_ended(client: AsyncSagaClient, ids: list[str]) -> int:
    """How many of the sagas have ended, waiting for them up to END_WAIT_S."""
    deadline = time.monotonic() + END_WAIT_S
    ended = 0
    for saga_id in ids:
        while time.monotonic() < deadline:
            try:
                if (await client.get(saga_id)).state in (sagas_pb2.COMPLETED, sagas_pb2.ABORTED):
                    ended += 1
                    break
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.1)
    return ended


async def held_phase(
    b: Bench, client: AsyncSagaClient, held_def: Any, n: int, follower: str, watch: bool
) -> dict[str, Any]:
    """N sagas held at their paused Payment (watched on the follower, or not); then the
    run-mode closed loop at c = 16, whose window opening releases them."""
    held = b.held
    assert held is not None
    tag = "hw" if watch else "hn"
    ids = [f"{tag}-{i}" for i in range(n)]
    submitted: list[str] = []
    watchers: dict[str, Watcher] = {}
    tasks: list[asyncio.Task[None]] = []
    at_window: dict[str, int] = {}
    sem = asyncio.Semaphore(SUBMITTERS)
    held.kill("Payment", signal.SIGSTOP)
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            held.kill("Payment", signal.SIGCONT)
            released = True
            at_window["open"] = sum(w.outcome == "open" for w in watchers.values())
            at_window["at_payment"] = sum(w.at_payment.is_set() for w in watchers.values())

    try:
        async with AsyncSagaClient([follower], retry_deadline_s=0) as wclient:

            async def submit(saga_id: str) -> Ended:
                async with sem:
                    await client.submit(held_def, PAYLOAD, saga_id=saga_id)
                submitted.append(saga_id)
                if watch:
                    w = watchers[saga_id] = Watcher(saga_id, asyncio.Event())
                    tasks.append(asyncio.create_task(w.run(wclient)))
                return "ok", None

            progress(f"watchers: submitting {n} held sagas ({'watched' if watch else 'unwatched'})")
            done = await asyncio.gather(*(outcome_of(submit(s)) for s in ids))
            submits = Counter(outcome for outcome, _ in done)
            ready = bool(submitted) and await wait_payments_sent(client, submitted)
            if watch:
                waits = [w.at_payment.wait() for w in watchers.values()]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*waits), READY_WAIT_S)
            progress(f"watchers: c={WATCHERS_C} closed loop, {len(watchers)} watchers")
            take = await b.snapshotter()
            samples, before, after = await closed_loop(
                WATCHERS_C,
                f"{tag}r",
                lambda s: run_saga(client, b.definition, s),
                b.warmup_s,
                b.seconds,
                take,
                at_window_start=release,
            )
            mode = f"run, {'with' if watch else 'without'} watchers"
            row = summarize(mode, WATCHERS_C, samples, before, after)
            if watch and tasks:
                progress(f"watchers: waiting for {len(tasks)} streams to end")
                await asyncio.wait(tasks, timeout=END_WAIT_S)
                for task in tasks:
                    task.cancel()  # those still open after END_WAIT_S: counted as "open"
                await asyncio.gather(*tasks, return_exceptions=True)
            if watch:
                ended = sum(w.outcome == "end" for w in watchers.values())
            else:
                ended = await wait_ended(client, submitted)
    finally:
        release()
    outcomes = Counter(w.outcome for w in watchers.values())
    return {
        "row": row,
        "held": n,
        "submitted": submits["ok"],
        "submit_errors": {k: v for k, v in submits.items() if k != "ok"},
        "payments_sent_before_window": ready,
        "ended": ended,
        "watchers": len(watchers),
        "open_at_window_start": at_window.get("open"),
        "at_payment_at_window_start": at_window.get("at_payment"),
        "saw_end_saga": outcomes["end"],
        "saw_end_in_window": sum(
            1 for w in watchers.values() if w.end is not None and before.t <= w.end <= after.t
        ),
        "refused": outcomes["refused"],
        "watch_outcomes": dict(outcomes),
    }


async def watchers_experiment(b: Bench, n: int) -> dict[str, Any]:
    assert b.held is not None
    leader = await asyncio.to_thread(b.cluster.wait_for_leader, 10)
    follower_id = next(i for i in b.cluster.specs if i != leader.id)
    follower = b.cluster.specs[follower_id].grpc_addr
    endpoints = {**b.parts.endpoints, "Payment": b.held.endpoints["Payment"]}
    held_def = travel_definition(endpoints, timeout_ms=HELD_TIMEOUT_MS)
    async with AsyncSagaClient(b.addrs) as client:
        # One saga through the second Payment while it runs: the leader connects to it.
        await client.run(held_def, PAYLOAD, saga_id="held-warm", timeout_s=SAGA_TIMEOUT_S)
        without = await held_phase(b, client, held_def, n, follower, watch=False)
        with_ = await held_phase(b, client, held_def, n, follower, watch=True)
    rate0, rate1 = without["row"]["ended_per_s"], with_["row"]["ended_per_s"]
    return {
        "follower": follower_id,
        "n": n,
        "without": without,
        "with": with_,
        "rate_without": rate0,
        "rate_with": rate1,
        "rate_ratio": rate1 / rate0 if rate0 and rate1 is not None else None,
    }


# ---- reads -------------------------------------------------------------------------------


def reads_experiment(b: Bench, ids: list[str], reads: int) -> dict[str, Any]:
    """Raft entries added by `reads` Gets and LISTS Lists (expected: none). Blocking."""
    leader = b.cluster.wait_for_leader(10)
    followers = [s.grpc_addr for i, s in b.cluster.specs.items() if i != leader.id]
    mine = b.cluster.specs[leader.id].grpc_addr
    addrs = [mine, followers[0], mine, followers[1]]
    ids = ids or ["no-such-saga"]

    def commit() -> int | None:
        status = b.cluster.status(leader.id)
        return status.commit_index if status is not None else None

    idle0 = commit()
    time.sleep(IDLE_CONTROL_S)
    idle1 = commit()
    deadline = time.monotonic() + READS_BUDGET_S
    errors: Counter[str] = Counter()
    lock = threading.Lock()

    def reader(k: int) -> tuple[int, float, float, int, float]:
        done_gets = done_lists = 0
        with SagaClient([addrs[k]]) as client:
            t0 = time.perf_counter()
            for i in range(k, reads, READ_THREADS):
                if time.monotonic() > deadline:
                    break
                try:
                    client.get(ids[i % len(ids)])
                    done_gets += 1
                except grpc.RpcError as exc:
                    with lock:
                        errors[f"get:{exc.code().name}"] += 1
            t1 = time.perf_counter()
            for _ in range(k, LISTS, READ_THREADS):
                if time.monotonic() > deadline:
                    break
                try:
                    list(itertools.islice(client.list(page_size=100), 100))  # one page: one call
                    done_lists += 1
                except grpc.RpcError as exc:
                    with lock:
                        errors[f"list:{exc.code().name}"] += 1
            return done_gets, t0, t1, done_lists, time.perf_counter() - t1

    before = commit()
    with ThreadPoolExecutor(READ_THREADS) as pool:
        results = list(pool.map(reader, range(READ_THREADS)))
    after = commit()
    gets = sum(r[0] for r in results)
    get_s = max(r[2] for r in results) - min(r[1] for r in results)
    lists = sum(r[3] for r in results)
    list_s = max(r[4] for r in results)
    return {
        "leader": leader.id,
        "gets": gets,
        "lists": lists,
        "errors": dict(errors),
        "entries_added": after - before if after is not None and before is not None else None,
        "idle_entries": idle1 - idle0 if idle1 is not None and idle0 is not None else None,
        "idle_s": IDLE_CONTROL_S,
        "gets_per_s": gets / get_s if get_s > 0 else None,
        "lists_per_s": lists / list_s if list_s > 0 else None,
        "commit_index_before": before,
        "commit_index_after": after,
    }


# ---- the run -----------------------------------------------------------------------------


async def guarded(what: dict[str, Any], coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """A step's result, or what went wrong in it (the other steps still run)."""
    try:
        return await coro
    except Exception as exc:
        return {**what, "error": f"{type(exc).__name__}: {exc}"}


async def measure(b: Bench, cs: list[int], dbos: bool, watchers: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    ended_ids: list[str] = []
    steps = [(c, mode) for c in cs for mode in MODES if mode != "dbos" or dbos]
    columns = (*Progress.get_default_columns(), TimeElapsedColumn())
    with Progress(*columns) as bar:
        task = bar.add_task("client bench", total=len(steps) + 2)
        for c, mode in steps:
            bar.update(task, description=f"{mode} c={c}")
            row = await guarded({"mode": mode, "c": c}, saga_step(b, mode, c, ended_ids))
            rows.append(row)
            bar.console.print(
                f"{mode} c={c}: {fmt(row.get('ended_per_s'))}/s, p50 {fmt(row.get('p50_ms'))} ms"
                + (f", error {row['error'][:80]}" if "error" in row else ""),
                markup=False,
            )
            bar.advance(task)
        watch: dict[str, Any] = {"skipped": "--watchers 0"}
        if watchers > 0:
            bar.update(task, description=f"{watchers} watchers")
            watch = await guarded({"n": watchers}, watchers_experiment(b, watchers))
        bar.advance(task)
        bar.update(task, description=f"reads: {READS} gets, {LISTS} lists")
        reads = await guarded({}, asyncio.to_thread(reads_experiment, b, ended_ids, READS))
        bar.advance(task)
    return {"rows": rows, "watchers": watch, "reads": reads}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(result: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in result["rows"] if "error" not in r]

    def at(mode: str, c: int) -> dict[str, Any]:
        return next((r for r in rows if r["mode"] == mode and r["c"] == c), {})

    def best(mode: str) -> float | None:
        rates = [r["ended_per_s"] for r in rows if r["mode"] == mode and r.get("ended_per_s")]
        return max(rates) if rates else None

    w, reads = result["watchers"], result["reads"]
    wi = w.get("with", {})
    return {
        "c1_p50_run_vs_direct": ratio(at("run", 1).get("p50_ms"), at("direct", 1).get("p50_ms")),
        "c1_p50_run_vs_dbos": ratio(at("run", 1).get("p50_ms"), at("dbos", 1).get("p50_ms")),
        "c1_p50_submit_watch_vs_direct": ratio(
            at("submit+watch", 1).get("p50_ms"), at("direct", 1).get("p50_ms")
        ),
        "best_rate": {m: best(m) for m in MODES},
        "best_run_vs_best_direct": ratio(best("run"), best("direct")),
        "best_run_vs_best_dbos": ratio(best("run"), best("dbos")),
        "watchers_n": w.get("n"),
        "watchers_saw_end_saga": wi.get("saw_end_saga"),
        "watchers_refused": wi.get("refused"),
        "watchers_rate_ratio": w.get("rate_ratio"),
        "reads_entries_added": reads.get("entries_added"),
    }


def print_report(result: dict[str, Any]) -> None:
    rows = result["rows"]
    ok = [r for r in rows if "error" not in r]
    best_direct = max((r["ended_per_s"] or 0 for r in ok if r["mode"] == "direct"), default=0)
    dbos_at = {r["c"]: r.get("ended_per_s") for r in ok if r["mode"] == "dbos"}
    print(
        f"{'mode':14}{'c':>5}{'ended/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'dec p50':>9}"
        f"{'done/abrt/err':>15}  {'cpu ms/saga nodes/parts/client':>30}{'entries':>8}"
        f"{'x direct':>9}{'x dbos':>8}"
    )
    for r in rows:
        head = f"{r['mode']:14}{r['c']:>5}"
        if "error" in r:
            print(f"{head}  ERROR {r['error'][:300]}")
            continue
        cpu = r["cpu_ms_per_saga"]
        cpu_text = "/".join(fmt(cpu.get(g), 2) for g in ("nodes", "participants", "client"))
        counts = f"{r['completed']}/{r['aborted']}/{r['errors']}"
        print(
            f"{head}{fmt(r['ended_per_s']):>9}{fmt(r['p50_ms']):>9}{fmt(r['p90_ms']):>9}"
            f"{fmt(r['p99_ms']):>9}{fmt(r['decided_p50_ms']):>9}{counts:>15}  {cpu_text:>30}"
            f"{fmt(r['entries_per_saga'], 2):>8}"
            f"{fmt(ratio(r['ended_per_s'], best_direct), 2):>9}"
            f"{fmt(ratio(r['ended_per_s'], dbos_at.get(r['c'])), 2):>8}"
            + ("  LEADER CHANGED" if r.get("leader_changed") else "")
        )
        if r.get("errors_by_kind"):
            print(f"{'':19}errors: {r['errors_by_kind']}")
    print(
        "(dec p50: to the EndSaga's decision time, not to the client learning it; entries: "
        "Raft entries per saga;\n x direct: ended/s / the direct chain's best ended/s; "
        "x dbos: / DBOS at the same c)"
    )

    t = result["targets"]
    print("\nTargets (reported, not asserted):")
    print(f"  c=1 p50, run / direct:              {fmt(t['c1_p50_run_vs_direct'], 2)} (<= 6)")
    print(f"  c=1 p50, run / dbos:                {fmt(t['c1_p50_run_vs_dbos'], 2)} (< 1)")
    print(f"  c=1 p50, submit+watch / direct:     {fmt(t['c1_p50_submit_watch_vs_direct'], 2)}")
    print(f"  best rate, run / direct:            {fmt(t['best_run_vs_best_direct'], 2)} (>= 0.3)")
    print(f"  best rate, run / dbos:              {fmt(t['best_run_vs_best_dbos'], 2)} (>= 5)")
    print(f"  best ended/s by mode:               {_rates(t['best_rate'])}")

    w = result["watchers"]
    print("\nWatchers:")
    if "error" in w or "skipped" in w:
        print(f"  {w.get('error') or 'skipped: ' + w['skipped']}")
    else:
        wi, wo = w["with"], w["without"]
        print(
            f"  {w['n']} held sagas watched on follower {w['follower']}: "
            f"{wi['open_at_window_start']} streams open as the window opened "
            f"({wi['at_payment_at_window_start']} had delivered the Payment StartT)"
        )
        print(
            f"  saw EndSaga: {wi['saw_end_saga']}/{w['n']} (target all; "
            f"{wi['saw_end_in_window']} inside the window); refused: {wi['refused']} "
            f"(target 0); outcomes {wi['watch_outcomes']}"
        )
        print(
            f"  c={WATCHERS_C} run rate: {fmt(w['rate_with'])}/s with the watchers, "
            f"{fmt(w['rate_without'])}/s without; ratio {fmt(w['rate_ratio'], 2)} (target >= 0.9)"
        )
        for phase in (wo, wi):
            r = phase["row"]
            cpu = r.get("node_cpu_ms_per_saga", {})
            print(
                f"  {r['mode']:22} p50 {fmt(r.get('p50_ms'))} ms, p99 {fmt(r.get('p99_ms'))} ms, "
                f"errors {r.get('errors_by_kind')}, node cpu ms/saga "
                + ", ".join(f"{k} {fmt(v, 2)}" for k, v in cpu.items())
                + f"; held sagas submitted {phase['submitted']}/{phase['held']}"
                f" {phase['submit_errors'] or ''}, ended {phase['ended']}"
            )

    rd = result["reads"]
    print("\nReads:")
    if "error" in rd:
        print(f"  {rd['error']}")
    else:
        print(
            f"  {rd['gets']} Get + {rd['lists']} List: Raft entries added "
            f"{rd['entries_added']} (target 0; {rd['idle_entries']} in {rd['idle_s']:.0f} s "
            f"idle just before); {fmt(rd['gets_per_s'], 0)} Get/s, "
            f"{fmt(rd['lists_per_s'], 0)} List/s; errors {rd['errors'] or 'none'}"
        )


def _rates(best: dict[str, float | None]) -> str:
    return ", ".join(f"{m} {fmt(v)}" for m, v in best.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--seconds", type=float, default=10.0, help="window per step")
    parser.add_argument("--warmup", type=float, default=None, help="s; default 2 (quick: 1)")
    parser.add_argument("--quick", action="store_true", help="c = 1,16, 3 s steps, no DBOS")
    parser.add_argument("--no-dbos", action="store_true")
    parser.add_argument("--watchers", type=int, default=1000, help="0: skip")
    # The DBOS child process (dbos_step): not for use by hand.
    parser.add_argument("--dbos-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--endpoints", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="b", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dbos_worker:
        return dbos_worker(args)
    cs = [1, 16] if args.quick else [int(c) for c in args.concurrency.split(",")]
    seconds = 3.0 if args.quick else args.seconds
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    dbos = not (args.quick or args.no_dbos)
    if dbos and importlib.util.find_spec("dbos") is None:
        print("dbos is not installed: the DBOS baseline is skipped (make bench-client installs it)")
        dbos = False
    elif not dbos:
        print("the DBOS baseline is skipped (--quick or --no-dbos)")
    os.makedirs(RESULTS, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bench-client-")
    parts = TravelParticipants(os.path.join(tmp, "participants"))
    held = None
    if args.watchers > 0:
        held = TravelParticipants(os.path.join(tmp, "held"), services=("Payment",))
    cluster = LocalCluster(os.path.join(tmp, "cluster"), nodes=3)
    started = time.time()
    try:
        for group in (parts, held):
            if group is not None:
                group.start_all()
        for group in (parts, held):
            if group is not None:
                group.wait_ready(15)
        cluster.start_all()
        leader = cluster.wait_for_leader(timeout_s=30)
        # Leader first: the client stays on the first node that answers.
        addrs = [cluster.specs[leader.id].grpc_addr] + [
            s.grpc_addr for i, s in cluster.specs.items() if i != leader.id
        ]
        bench = Bench(
            cluster, parts, held, travel_definition(parts.endpoints), addrs, warmup, seconds, tmp
        )
        result = asyncio.run(measure(bench, cs, dbos, args.watchers))
    finally:
        print()
        cluster.stop_all()
        parts.stop_all()
        if held is not None:
            held.stop_all()
    result["targets"] = targets(result)
    result["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    result["duration_s"] = time.time() - started
    result["settings"] = {
        "concurrency": cs,
        "seconds": seconds,
        "warmup_s": warmup,
        "dbos": dbos,
        "watchers": args.watchers,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "data_dir": tmp,
    }
    print_report(result)
    path = os.path.join(RESULTS, "client.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
