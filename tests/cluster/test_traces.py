"""OpenTelemetry traces on a real cluster: nodes and SDK participants export to a
collector (a real OTLP/gRPC server in this process). A saga is one trace; each
participant call is a span, and the participant's own span is its child through
`traceparent`; a leader killed in mid-saga leaves a trace that the new leader's
spans complete. Ends with the saga guarantee and identical replicas."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from saga.v1 import sagas_pb2

from cluster.client.saga_client import SagaClient
from cluster.testkit.launcher import LocalCluster, free_ports
from cluster.testkit.travel import TRAVEL_SERVICES, TravelParticipants, travel_definition
from coordinator.core import request_key
from coordinator.tracecontext import call_span_id, saga_span_id, saga_trace_id

pytestmark = pytest.mark.cluster


@dataclass(frozen=True)
class Span:
    service: str  # the resource's service.name: "sagacluster" or a participant's name
    instance: str
    name: str
    trace_id: int
    span_id: int
    parent_id: int
    attributes: dict
    error: bool


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (the service's name)
        got = []
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attributes = {a.key: _value(a.value) for a in s.attributes}
                    got.append(
                        Span(
                            resource.get("service.name", ""),
                            resource.get("service.instance.id", ""),
                            s.name,
                            int.from_bytes(s.trace_id, "big"),
                            int.from_bytes(s.span_id, "big"),
                            int.from_bytes(s.parent_span_id, "big") if s.parent_span_id else 0,
                            attributes,
                            s.status.code == 2,  # STATUS_CODE_ERROR
                        )
                    )
        with self._lock:
            self.spans.extend(got)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of(self, saga_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.attributes.get("saga.id") == saga_id]


def _value(v) -> object:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, str]]:
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    server.add_insecure_port(addr)
    server.start()
    try:
        yield servicer, addr
    finally:
        server.stop(0)


def test_a_saga_is_one_trace_across_participants_and_a_leader_kill(collector, tmp_path) -> None:
    spans, endpoint = collector
    export = ["--otlp-endpoint", endpoint]
    parts = TravelParticipants(
        str(tmp_path / "parts"),
        extra_args={
            **{name: list(export) for name in TRAVEL_SERVICES},
            "Car": [*export, "--refuse-saga-substring", "nocar"],
            "Payment": [*export, "--latency-ms", "1500"],  # the leader dies meanwhile
        },
    )
    cluster = LocalCluster(str(tmp_path / "cluster"), nodes=3, extra_args=tuple(export))
    with parts, cluster.running():
        definition = travel_definition(parts.endpoints, timeout_ms=10_000)
        addrs = [s.grpc_addr for s in cluster.specs.values()]
        old_leader = cluster.leader_id()
        with SagaClient(addrs) as client:
            client.submit(definition, b"{}", "traced")
            for event in client.watch("traced"):
                if event.record.HasField("start_t") and event.record.start_t.vertex == "Payment":
                    break
            # Kill it once its first spans have reached the collector (exported
            # every 0.5 s), so that the trace holds spans of both leaders.
            deadline = time.monotonic() + 10
            while not any(s.instance == old_leader for s in spans.of("traced")):
                assert time.monotonic() < deadline, "the leader exported no span"
                time.sleep(0.05)
            cluster.kill(old_leader, signal.SIGKILL)
            assert client.wait_for_end("traced", 60).state == sagas_pb2.COMPLETED
            new_leader = cluster.wait_for_leader(20).id
            assert client.run(definition, b"{}", "traced-nocar").state == sagas_pb2.ABORTED
        cluster.start(old_leader)

        def exported() -> bool:
            """Both saga spans, and a Payment handler's span under a call span that
            reached the collector (the participant exports on its own schedule)."""
            roots = [
                s for s in spans.of("traced") + spans.of("traced-nocar") if s.name == "saga travel"
            ]
            traced = spans.of("traced")
            call_ids = {s.span_id for s in traced if s.service == "sagacluster"}
            payment = [s for s in traced if s.service == "Payment"]
            return len(roots) == 2 and any(s.parent_id in call_ids for s in payment)

        deadline = time.monotonic() + 20
        while not exported() and time.monotonic() < deadline:
            time.sleep(0.2)

        traced = spans.of("traced")
        # One trace, whoever emitted the span.
        assert {s.trace_id for s in traced} == {saga_trace_id("traced")}
        root = [s for s in traced if s.name == "saga travel"]
        assert root and root[0].span_id == saga_span_id("traced") and root[0].parent_id == 0
        assert root[0].instance == new_leader  # the node in office when it ended
        calls = [s for s in traced if s.service == "sagacluster" and s is not root[0]]
        assert {s.instance for s in calls} == {old_leader, new_leader}, calls
        assert all(s.parent_id == saga_span_id("traced") for s in calls)
        for s in calls:  # the span id is the one the participant was sent as its parent
            a = s.attributes
            assert s.span_id == call_span_id(
                "traced",
                a["saga.vertex"],
                a["saga.compensation"],
                a["saga.attempt"],
                a["saga.epoch"],
            )
        # Each participant's span continues the call that reached it.
        by_id = {s.span_id for s in calls}
        handled = [s for s in traced if s.service in TRAVEL_SERVICES]
        assert {s.service for s in handled} == set(TRAVEL_SERVICES)
        assert all(s.parent_id in by_id for s in handled if s.service != "Payment")
        # Payment was called by both leaders: the second call's span is exported
        # (the first's may have died with the old leader), and both handler spans
        # name a call span of the saga's trace.
        payments = [s for s in handled if s.service == "Payment"]
        assert any(s.parent_id in by_id for s in payments), (payments, calls)

        refused = spans.of("traced-nocar")
        assert {s.trace_id for s in refused} == {saga_trace_id("traced-nocar")}
        names = {s.name for s in refused}
        assert {"compensate Hotel CancelHotel", "compensate Flight CancelFlight"} <= names, names
        car = [s for s in refused if s.name == "request Car BookCar"]
        assert car and car[0].error and car[0].attributes["saga.outcome"] == "refused"
        assert [s.error for s in refused if s.name == "saga travel"] == [True]

        # The saga guarantee at the participants, and identical replicas.
        for name in TRAVEL_SERVICES:
            booked = parts.state(name).bookings_for(request_key("traced", name))
            assert [b.status for b in booked] == ["in_effect"], (name, booked)
            undone = parts.state(name).bookings_for(request_key("traced-nocar", name))
            assert all(b.status != "in_effect" for b in undone), (name, undone)
        cluster.wait_identical()
