"""What an operator's stock tools see on a real cluster with auth on: gRPC health
(without a token, as load balancers probe), server reflection (with one), and
Prometheus metrics moving under load."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families
from saga.v1 import sagas_pb2

from cluster.auth import bearer
from cluster.client.saga_client import SagaClient
from cluster.grpcutil import channel_to
from cluster.testkit.launcher import LocalCluster
from cluster.testkit.travel import TravelParticipants, travel_definition

pytestmark = pytest.mark.cluster

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    base = str(tmp_path_factory.mktemp("ops"))
    cluster = LocalCluster(base, nodes=3, auth=True, http=True, extra_args=("--log-format", "json"))
    with cluster.running() as c:
        yield c


@pytest.fixture(scope="module")
def travel(tmp_path_factory, cluster) -> Iterator[TravelParticipants]:
    parts = TravelParticipants(
        str(tmp_path_factory.mktemp("ops-parts")),
        # Hotel takes 100 ms: sagas are still running when the test aborts one.
        extra_args={"Car": ["--refuse-saga-substring", "nocar"], "Hotel": ["--latency-ms", "100"]},
    )
    with parts:
        yield parts


def _health(addr: str, service: str = "", timeout_s: float = 2.0) -> int:
    with channel_to(addr) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
    return reply.status


def _wait_health(addr: str, service: str, want: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = _health(addr, service)
        except grpc.RpcError as exc:
            seen = exc.code()
        if seen == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"{addr} {service!r}: health {seen}, wanted {want}")


def test_every_node_reports_serving_to_a_health_probe_without_a_token(cluster) -> None:
    for spec in cluster.specs.values():
        for service in ("", "saga.v1.Sagas", "saga.v1.Cluster"):
            _wait_health(spec.grpc_addr, service, SERVING)
    with pytest.raises(grpc.RpcError) as unknown:
        _health(cluster.specs["n1"].grpc_addr, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_stock_reflection_client_lists_the_services_with_a_token_only(cluster) -> None:
    addr = cluster.specs["n2"].grpc_addr
    with channel_to(addr) as channel:
        anonymous = ProtoReflectionDescriptorDatabase(channel)
        with pytest.raises(grpc.RpcError) as refused:
            anonymous.get_services()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with channel_to(addr) as channel:
        intercepted = grpc.intercept_channel(channel, _Metadata(bearer(cluster.tokens["client"])))
        db = ProtoReflectionDescriptorDatabase(intercepted)
        services = set(db.get_services())
        assert {"saga.v1.Sagas", "saga.v1.Cluster", "grpc.health.v1.Health"} <= services
        # The schema itself comes through: a generic client can build a Submit.
        schema = db.FindFileContainingSymbol("saga.v1.Sagas")
        assert any(m.name == "Submit" for s in schema.service for m in s.method)
    # Tools that try reflection v1 first (grpcurl) must get UNIMPLEMENTED, on which
    # they fall back to v1alpha, not PERMISSION_DENIED, on which they give up.
    with channel_to(addr) as channel:
        v1 = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
        replies = v1(iter([b""]), timeout=5, metadata=bearer(cluster.tokens["client"]))
        with pytest.raises(grpc.RpcError) as v1_refused:
            next(replies)
        assert v1_refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_stopping_node_tells_its_health_watchers_it_no_longer_serves(cluster) -> None:
    """A draining node answers NOT_SERVING before it closes, so a balancer moves on;
    the other nodes go on serving once a leader is in office."""
    leader = cluster.leader_id()
    victim = next(n for n in cluster.specs if n != leader)
    addr = cluster.specs[victim].grpc_addr
    _wait_health(addr, "saga.v1.Sagas", SERVING)
    seen: list[int] = []
    request = health_pb2.HealthCheckRequest(service="saga.v1.Sagas")
    with channel_to(addr) as channel:
        anonymous = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=5)
        with pytest.raises(grpc.RpcError) as refused:  # a held stream needs a token
            next(anonymous)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            request, timeout=20, metadata=bearer(cluster.tokens["client"])
        )
        seen.append(next(stream).status)
        cluster.kill(victim, signal.SIGTERM)
        try:
            for reply in stream:
                seen.append(reply.status)
        except grpc.RpcError:
            pass  # the server closed the stream after it said NOT_SERVING
    assert seen[0] == SERVING and NOT_SERVING in seen[1:], seen
    cluster.start(victim)
    for spec in cluster.specs.values():
        _wait_health(spec.grpc_addr, "saga.v1.Sagas", SERVING, timeout_s=20)


def test_json_logs_are_one_object_a_line_with_the_sagas_fields(cluster, travel) -> None:
    """With --log-format json every line a node writes is a JSON object; an
    operator's Abort is logged with the saga's id and epoch."""
    definition = travel_definition(travel.endpoints)
    addrs = [s.grpc_addr for s in cluster.specs.values()]
    with SagaClient(addrs, token=cluster.tokens["operator"]) as client:
        client.submit(definition, b"{}", "json-logs")
        client.abort("json-logs", "checking the logs")
        assert client.wait_for_end("json-logs", 30).state == sagas_pb2.ABORTED
    leader = cluster.leader_id()
    lines = []
    for spec in cluster.specs.values():
        with open(spec.log_path) as f:
            lines += [(spec.id, line) for line in f if line.strip()]
    docs = []
    for node, line in lines:
        doc = json.loads(line)  # fails on any line that is not one JSON object
        assert {"time", "level", "node", "logger", "message"} <= set(doc), doc
        assert doc["node"] == node
        docs.append(doc)
    aborted = [d for d in docs if d.get("saga_id") == "json-logs" and "aborted" in d["message"]]
    assert aborted and aborted[0]["node"] == leader and aborted[0]["epoch"] >= 1, aborted


def _scrape(addr: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a node's /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _total(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_a_scrape_under_load_shows_the_counters_and_histograms_moving(cluster, travel) -> None:
    """Sagas run (some refused by Car) while the leader and a follower are scraped:
    both count the same applied sagas; only the leader times participant calls."""
    leader = cluster.leader_id()
    follower = next(n for n in cluster.specs if n != leader)
    leader_http = cluster.specs[leader].http_addr
    before = {n: _scrape(cluster.specs[n].http_addr) for n in (leader, follower)}
    definition = travel_definition(travel.endpoints)
    addrs = [s.grpc_addr for s in cluster.specs.values()]
    ids = [f"metrics-{i}" + ("-nocar" if i % 4 == 0 else "") for i in range(80)]
    during: list[dict] = []
    stop = threading.Event()

    def scrape_while_running() -> None:
        while not stop.wait(0.05) and len(during) < 200:
            during.append(_scrape(leader_http))

    scraper = threading.Thread(target=scrape_while_running)
    scraper.start()
    try:
        with SagaClient(addrs, token=cluster.tokens["client"]) as client:
            threads = [
                threading.Thread(
                    target=lambda chunk=ids[k::4]: [client.run(definition, b"{}", i) for i in chunk]
                )
                for k in range(4)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
    finally:
        stop.set()
        scraper.join(10)
    aborted = sum(1 for i in ids if "nocar" in i)
    deadline = time.monotonic() + 10
    while True:  # the follower applies the last EndSagas a moment after the client hears
        after = {n: _scrape(cluster.specs[n].http_addr) for n in (leader, follower)}
        done = _total(after[follower], "saga_sagas_completed_total", definition="travel")
        if done - _total(before[follower], "saga_sagas_completed_total") >= len(ids) - aborted:
            break
        assert time.monotonic() < deadline, "the follower's counters did not catch up"
        time.sleep(0.1)

    for node in (leader, follower):
        now, then = after[node], before[node]
        assert _moved(now, then, "saga_sagas_started_total", definition="travel") == len(ids)
        completed = _moved(now, then, "saga_sagas_completed_total", definition="travel")
        assert completed == len(ids) - aborted
        assert _moved(now, then, "saga_sagas_aborted_total", definition="travel") == aborted
        timed = _moved(now, then, "saga_duration_seconds_count", outcome="completed")
        assert timed == len(ids) - aborted
        assert _moved(now, then, "saga_duration_seconds_sum") > 0
        assert _moved(now, then, "saga_records_per_entry_count") > 0
        assert _total(now, "saga_raft_term") >= 1
    now, then = after[leader], before[leader]
    assert _total(now, "saga_raft_role", role="leader") == 1
    assert _total(now, "saga_in_office") == 1
    assert _total(after[follower], "saga_raft_role", role="follower") == 1
    calls = "saga_participant_call_seconds_count"
    assert _moved(now, then, calls, vertex="Car", outcome="refused") == aborted
    assert _moved(now, then, calls, kind="request", outcome="ok") >= 4 * (len(ids) - aborted)
    assert _moved(now, then, "saga_commit_seconds_count") > 0
    assert _total(now, "saga_journal_bytes") > 0
    # Only the leader's coordinator calls participants.
    assert _moved(after[follower], before[follower], calls) == 0
    # Scraped during the run: the started counter climbed between scrapes.
    started = [_total(s, "saga_sagas_started_total") for s in during]
    assert len(set(started)) >= 2, started


def _moved(now: dict, then: dict, name: str, **labels: str) -> float:
    return _total(now, name, **labels) - _total(then, name, **labels)


class _Metadata(grpc.StreamStreamClientInterceptor):
    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = metadata

    def intercept_stream_stream(self, continuation, details, requests):
        details = details._replace(metadata=list(details.metadata or []) + self._metadata)
        return continuation(details, requests)
