"""OpenTelemetry traces, optional (the `otel` extra: pip install 'sagacluster[otel]').

Nodes export a trace per saga and a span per participant call; participants built
on the SDK continue the trace from the `traceparent` the coordinator sends
(coordinator.tracecontext). Without the packages nothing here costs anything: the
participant's span is a no-op, and a node asked to export refuses to start.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from coordinator.tracecontext import HEADER, parse_traceparent

try:  # the API alone is enough to continue a trace in a participant
    from opentelemetry import trace as otel_trace
except ImportError:  # pragma: no cover - the otel extra is not installed
    otel_trace = None  # type: ignore[assignment]

EXPORT_DELAY_MS = 500  # how long a finished span may wait to be exported
MAX_QUEUED_SPANS = 20_000  # past it spans are dropped (the exporter's bound)
EXPORT_TIMEOUT_MS = 5_000
SHUTDOWN_WAIT_S = 2.0  # a process stopping waits this long for queued spans to leave
INSTALL_HINT = "pip install 'sagacluster[otel]' (opentelemetry-sdk and its OTLP exporter)"


class TracingUnavailable(RuntimeError):
    pass


class ChosenIds:
    """An id generator that hands out ids chosen by the caller for the next span
    made on this thread (`choose`), and random ones otherwise: a saga's spans get
    ids derived from the saga, so that every node emits the same trace."""

    def __init__(self) -> None:
        self._next = threading.local()

    def choose(self, trace_id: int | None, span_id: int) -> None:
        self._next.trace_id, self._next.span_id = trace_id, span_id

    def generate_span_id(self) -> int:
        chosen = getattr(self._next, "span_id", None)
        self._next.span_id = None
        return chosen or random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        chosen = getattr(self._next, "trace_id", None)
        self._next.trace_id = None
        return chosen or random.getrandbits(128) or 1


def export_to(endpoint: str, service: str, instance: str) -> tuple[Any, ChosenIds]:
    """A tracer provider exporting to the OTLP/gRPC collector at `endpoint`, set as
    this process's global one (handlers' own spans nest under the saga's)."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.id_generator import IdGenerator
    except ImportError as exc:
        raise TracingUnavailable(f"--otlp-endpoint needs OpenTelemetry: {INSTALL_HINT}") from exc

    class _Ids(ChosenIds, IdGenerator):
        pass

    ids = _Ids()
    resource = Resource.create({"service.name": service, "service.instance.id": instance})
    provider = TracerProvider(resource=resource, id_generator=ids)
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=EXPORT_TIMEOUT_MS / 1000)
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter, max_queue_size=MAX_QUEUED_SPANS, schedule_delay_millis=EXPORT_DELAY_MS
        )
    )
    assert otel_trace is not None
    otel_trace.set_tracer_provider(provider)
    # The SDK logs a warning per span dropped from a full queue, on the thread that
    # ended the span (a node's Raft thread): a collector that is down must not turn
    # into a flood of log lines there. Export failures are still logged.
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
    return provider, ids


def shut_down(provider: Any) -> None:
    """Export what is queued, waiting at most SHUTDOWN_WAIT_S (a collector that is
    down must not hold up a stopping process)."""
    done = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
    done.start()
    done.join(SHUTDOWN_WAIT_S)


def parent_context(trace_id: int, span_id: int, remote: bool) -> Any:
    """A context whose current span is (trace_id, span_id), sampled: what a span
    made under it names as its parent (the OpenTelemetry API must be installed)."""
    assert otel_trace is not None
    return otel_trace.set_span_in_context(
        otel_trace.NonRecordingSpan(
            otel_trace.SpanContext(
                trace_id=trace_id,
                span_id=span_id,
                is_remote=remote,
                trace_flags=otel_trace.TraceFlags(otel_trace.TraceFlags.SAMPLED),
            )
        )
    )


@contextlib.contextmanager
def continued_span(
    metadata: Sequence[tuple[str, Any]] | None, name: str, attributes: dict[str, Any]
) -> Iterator[None]:
    """A server span for one participant call, child of the coordinator's call span
    named in `traceparent`; the handler runs inside it. A no-op without the
    OpenTelemetry API, without a configured provider, or without a traceparent."""
    parent = None
    for key, value in metadata or ():
        if key == HEADER and isinstance(value, str):
            parent = parse_traceparent(value)
    if otel_trace is None or parent is None:
        yield
        return
    context = parent_context(parent[0], parent[1], remote=True)
    tracer = otel_trace.get_tracer("sagacluster.participant")
    with tracer.start_as_current_span(
        name, context=context, kind=otel_trace.SpanKind.SERVER, attributes=attributes
    ):
        yield
