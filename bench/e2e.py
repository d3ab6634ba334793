"""End-to-end benchmark: the travel saga on a three-node cluster, beside baselines
measured in the same run against the same participant processes.

    python bench/e2e.py [--rates 25,50,100,200,300] [--step-s 8] [--quick] [--no-dbos]

For each offered rate (open loop: submits are started on a fixed schedule, whether
or not earlier ones finished) it reports sagas ended per second, end-to-end latency
p50/p90/p99 (from the client's submit to the EndSaga record's decision time, both
on this machine's clock) of the sagas admitted, how many Submits were refused
with RESOURCE_EXHAUSTED (back-pressure; not retried), log records per Raft entry,
CPU seconds per saga over the three nodes, and each node's peak RSS. Baselines at the same rates:

* "no coordinator": the same four participant calls made directly by this client
  (Hotel, Car and Flight in parallel, then Payment), no log;
* "dbos": DBOS Transact (SQLite system database) running the saga as a durable
  workflow against the same participants (bench/dbos_peer.py, its own process);
* "counter": a bare pysyncobj replicated counter with the same journal, fsync and
  timing (bench/counter_node.py) at concurrency 16, one call per record.

Results go to bench/results/e2e.json and, when matplotlib is installed, e2e.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from saga.v1 import cluster_pb2, participant_pb2, participant_pb2_grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import log_append  # noqa: E402
from cluster.client.saga_client import SagaClient  # noqa: E402
from cluster.testkit.launcher import LocalCluster  # noqa: E402
from cluster.testkit.travel import TravelParticipants, travel_definition  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGET_RATE = 300.0
TARGET_P50_C1_MS = 25.0
TARGET_P99_MS = 250.0


def pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(sorted(values), n=100, method="inclusive")[q - 1]


def proc_stats(pid: int) -> tuple[float, int]:
    """(cpu seconds, peak RSS bytes) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cpu, peak


def progress(text: str) -> None:
    print(f"\r{text:<100}", end="", flush=True)


def open_loop(rate: float, seconds: float, fn, workers: int = 128) -> int:
    """Call fn(i) at `rate` per second for `seconds`, each on a pool thread."""
    interval = 1.0 / rate
    start = time.perf_counter()
    i = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while time.perf_counter() - start < seconds:
            pool.submit(fn, i)
            i += 1
            if i % max(1, int(rate)) == 0:
                progress(f"  {i} started, {time.perf_counter() - start:.0f}/{seconds:.0f}s")
            time.sleep(max(0.0, start + i * interval - time.perf_counter()))
    return i


def saga_step(
    cluster: LocalCluster, client: SagaClient, definition, rate: float, seconds: float, tag: str
) -> dict:
    submitted: dict[str, float] = {}
    errors = [0]
    refused = [0]  # RESOURCE_EXHAUSTED: back-pressure, not retried here
    submit_ms: list[float] = []  # how long the admitted Submits took
    lock = threading.Lock()

    def one(i: int) -> None:
        saga_id = f"{tag}-{i}"
        t0 = time.time()
        try:
            client.submit(definition, b'{"to": "Lisbon"}', saga_id=saga_id)
            with lock:
                submitted[saga_id] = t0
                submit_ms.append((time.time() - t0) * 1000)
        except grpc.RpcError as exc:
            with lock:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused[0] += 1
                else:
                    errors[0] += 1

    leader = cluster.wait_for_leader(10)
    pids = [s.pid for s in cluster.specs.values()]
    cpu0 = sum(proc_stats(p)[0] for p in pids)
    digest0 = cluster.stub(leader.id).Digest(cluster_pb2.DigestRequest(), timeout=30)
    window_start = time.time()
    open_loop(rate, seconds, one)
    window_end = time.time()
    # Let the tail finish, then read each saga's end from the log.
    deadline = time.monotonic() + 60
    stub = cluster.stub(leader.id)
    latencies, ended_in_window, unfinished = [], 0, 0
    for saga_id, t0 in submitted.items():
        while True:
            records = stub.ReadSaga(
                cluster_pb2.ReadSagaRequest(saga_id=saga_id), timeout=10
            ).records
            end = next((r for r in records if r.HasField("end_saga")), None)
            if end is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if end is None:
            unfinished += 1
            continue
        latencies.append(end.time_unix_ms - t0 * 1000)
        if window_start <= end.time_unix_ms / 1000 <= window_end:
            ended_in_window += 1
    stats = [proc_stats(p) for p in pids]
    digest1 = cluster.stub(leader.id).Digest(cluster_pb2.DigestRequest(), timeout=30)
    entries = max(1, digest1.applied_index - digest0.applied_index)
    records = digest1.records - digest0.records
    return {
        "system": "saga",
        "rate": rate,
        "ended_per_s": ended_in_window / (window_end - window_start),
        "p50_ms": pct(latencies, 50),
        "p90_ms": pct(latencies, 90),
        "p99_ms": pct(latencies, 99),
        "submit_p50_ms": pct(submit_ms, 50),
        "submit_p99_ms": pct(submit_ms, 99),
        "submitted": len(submitted),
        "refused": refused[0],
        "errors": errors[0],
        "unfinished": unfinished,
        "records_per_entry": records / entries,
        "cpu_s_per_saga": (sum(s[0] for s in stats) - cpu0) / max(1, len(submitted)),
        "peak_rss_mb": [round(s[1] / 2**20, 1) for s in stats],
    }


def c1_latency(client: SagaClient, definition, tag: str, n: int = 100) -> dict:
    """Travel sagas one after another (concurrency 1): the latency users feel on an
    idle cluster. Measured to the EndSaga's decision time on the leader (the same
    machine's clock), as `saga_step` does: the client learns of the end by polling
    `Get` at doubling intervals, which would round each latency up to a poll.
    That polled figure is reported too, as `observed_*`."""
    decided, observed = [], []
    for i in range(n):
        saga_id = f"{tag}-{i}"
        t0, p0 = time.time(), time.perf_counter()
        client.submit(definition, b"{}", saga_id=saga_id)
        info = client.wait_for_end(saga_id, 30)  # raises if it does not end
        observed.append((time.perf_counter() - p0) * 1000)
        decided.append(info.ended_unix_ms - t0 * 1000)
    return {
        "p50_ms": pct(decided, 50),
        "p99_ms": pct(decided, 99),
        "observed_p50_ms": pct(observed, 50),
        "observed_p99_ms": pct(observed, 99),
    }


def direct_step(endpoints: dict[str, str], rate: float, seconds: float, tag: str) -> dict:
    """No coordinator: the client calls the participants itself."""
    stubs = {
        n: participant_pb2_grpc.ParticipantStub(grpc.insecure_channel(e))
        for n, e in endpoints.items()
    }
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def req(saga_id: str, vertex: str, action: str) -> participant_pb2.StepRequest:
        key = f"{saga_id}/{vertex}/request"
        return participant_pb2.StepRequest(
            saga_id=saga_id,
            vertex=vertex,
            action=action,
            idempotency_key=key,
            request_key=key,
            attempt=1,
        )

    def one(i: int) -> None:
        saga_id = f"{tag}-{i}"
        t0 = time.perf_counter()
        try:
            futures = [
                stubs[v].Execute.future(req(saga_id, v, f"Book{v}"), timeout=5)
                for v in ("Hotel", "Car", "Flight")
            ]
            for f in futures:
                f.result()
            stubs["Payment"].Execute(req(saga_id, "Payment", "Charge"), timeout=5)
            with lock:
                latencies.append((time.perf_counter() - t0) * 1000)
        except grpc.RpcError:
            with lock:
                errors[0] += 1

    start = time.perf_counter()
    open_loop(rate, seconds, one)
    window = time.perf_counter() - start
    return {
        "system": "no coordinator",
        "rate": rate,
        "ended_per_s": len(latencies) / window,
        "p50_ms": pct(latencies, 50),
        "p90_ms": pct(latencies, 90),
        "p99_ms": pct(latencies, 99),
        "errors": errors[0],
    }


def dbos_step(endpoints: dict[str, str], rate: float, seconds: float, tag: str, tmp: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(os.path.dirname(__file__), "dbos_peer.py"),
            "--endpoints",
            json.dumps(endpoints),
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
            "--db",
            os.path.join(tmp, f"{tag}.sqlite"),
            "--prefix",
            tag,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    if out.returncode != 0:
        return {"system": "dbos", "rate": rate, "error": out.stderr[-2000:]}
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    lat = doc["latencies_ms"]
    return {
        "system": "dbos",
        "rate": rate,
        "ended_per_s": doc["ended"] / doc["window_s"],
        "p50_ms": pct(lat, 50),
        "p90_ms": pct(lat, 90),
        "p99_ms": pct(lat, 99),
        "errors": doc["errors"],
    }


def fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="25,50,100,200,300,400")
    parser.add_argument("--step-s", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="rates 25,100 for 3 s each")
    parser.add_argument("--no-dbos", action="store_true")
    args = parser.parse_args(argv)
    rates = [25.0, 100.0] if args.quick else [float(r) for r in args.rates.split(",")]
    step_s = 3.0 if args.quick else args.step_s
    os.makedirs(RESULTS, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="e2e-")
    rows: list[dict] = []
    parts = TravelParticipants(os.path.join(tmp, "participants"))
    cluster = LocalCluster(os.path.join(tmp, "cluster"), nodes=3)
    counter = None
    try:
        parts.start_all()
        parts.wait_ready(15)
        cluster.start_all()
        cluster.wait_for_leader(20)
        definition = travel_definition(parts.endpoints)
        # The leader first, as a client that found it would: a follower forwards.
        leader = cluster.wait_for_leader(10).id
        addrs = sorted(
            (s.grpc_addr for s in cluster.specs.values()),
            key=lambda a: a != cluster.specs[leader].grpc_addr,
        )
        # Under load, a refused Submit (RESOURCE_EXHAUSTED, back-pressure) is counted,
        # not retried: latency is that of the sagas the cluster admitted.
        with SagaClient(addrs) as client, SagaClient(addrs, retry_deadline_s=0) as no_retry:
            # Concurrency 1 (closed loop): the latency users feel on an idle cluster.
            rows.append({"system": "saga", "rate": "c1", **c1_latency(client, definition, "c1")})
            for rate in rates:
                progress(f"saga @ {rate:.0f}/s")
                rows.append(saga_step(cluster, no_retry, definition, rate, step_s, f"r{rate:.0f}"))
                progress(f"no coordinator @ {rate:.0f}/s")
                rows.append(direct_step(parts.endpoints, rate, step_s, f"d{rate:.0f}"))
                if not args.no_dbos:
                    progress(f"dbos @ {rate:.0f}/s")
                    rows.append(dbos_step(parts.endpoints, rate, step_s, f"b{rate:.0f}", tmp))
        cluster.stop_all()
        progress("counter @ concurrency 16")
        counter = log_append.start_cluster("counter", tmp)
        point = log_append.run_point(counter, "counter", "entry", 16, 1.0, step_s)
        rows.append(
            {
                "system": "counter",
                "rate": "c16",
                "records_per_s": point.records_per_s,
                "p50_ms": point.p50_ms,
                "p99_ms": point.p99_ms,
            }
        )
    finally:
        print()
        cluster.stop_all()
        parts.stop_all()
        if counter is not None:
            counter.stop_all()
    print(
        f"{'system':16}{'offered':>9}{'ended/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
        f"{'refused':>8}{'submit p50/p99':>15}{'rec/entry':>10}{'cpu s/saga':>11}  peak RSS MB"
    )
    for r in rows:
        submit = (
            f"{fmt(r.get('submit_p50_ms'))}/{fmt(r.get('submit_p99_ms'))}"
            if "submit_p50_ms" in r
            else ""
        )
        print(
            f"{r['system']:16}{str(r['rate']):>9}{fmt(r.get('ended_per_s')):>10}"
            f"{fmt(r.get('p50_ms')):>9}{fmt(r.get('p90_ms')):>9}{fmt(r.get('p99_ms')):>9}"
            f"{str(r.get('refused', '')):>8}"
            f"{submit:>15}"
            f"{fmt(r.get('records_per_entry'), 2):>10}"
            f"{fmt(r.get('cpu_s_per_saga'), 4):>11}"
            f"  {r.get('peak_rss_mb', '')}{r.get('error', '')[:200]}"
        )
    best = {
        s: max((r.get("ended_per_s") or 0 for r in rows if r["system"] == s), default=0)
        for s in ("saga", "no coordinator", "dbos")
    }
    print(f"\npeak ended/s: {best}")
    if best["dbos"]:
        print(f"saga / dbos: {best['saga'] / best['dbos']:.2f} (target >= 4)")
    if best["no coordinator"]:
        print(f"saga / no coordinator: {best['saga'] / best['no coordinator']:.2f} (target >= 0.3)")
    print(
        f"saga peak {best['saga']:.0f}/s (target >= {TARGET_RATE:.0f}); concurrency-1 p50 "
        f"{fmt(rows[0]['p50_ms'])} ms (target < {TARGET_P50_C1_MS:.0f})"
    )
    with open(os.path.join(RESULTS, "e2e.json"), "w") as f:
        json.dump(
            {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows, "peak": best}, f, indent=2
        )
    _plot(rows)
    return 0


def _plot(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for system in ("saga", "no coordinator", "dbos"):
        pts = [
            r
            for r in rows
            if r["system"] == system
            and isinstance(r["rate"], float)
            and r.get("ended_per_s") is not None
        ]
        if not pts:
            continue
        a.plot([r["rate"] for r in pts], [r["ended_per_s"] for r in pts], marker="o", label=system)
        b.plot([r["rate"] for r in pts], [r["p99_ms"] for r in pts], marker="o", label=system)
    a.set(xlabel="offered sagas/s", ylabel="ended sagas/s", title="throughput")
    b.set(xlabel="offered sagas/s", ylabel="p99 ms", title="latency p99", yscale="log")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "e2e.png"))
    print(f"plot: {os.path.join(RESULTS, 'e2e.png')}")


if __name__ == "__main__":
    sys.exit(main())
