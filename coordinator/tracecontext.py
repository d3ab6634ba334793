"""W3C trace context for sagas, derived from the saga itself.

Every id is a hash of what the Saga Log already holds (the saga id, the vertex,
the attempt, the epoch), so any coordinator computes the same ones: the spans of
a new leader join the trace its predecessor started, and a participant's span
names its parent in `traceparent` without any state being shared or logged.
"""

from __future__ import annotations

import hashlib
import re

HEADER = "traceparent"
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def _id(bits: int, *parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    value = int.from_bytes(digest[: bits // 8], "big")
    return value or 1  # an all-zero id is invalid in W3C trace context


def saga_trace_id(saga_id: str) -> int:
    """The trace of a saga: one per saga id, whichever node emits a span of it."""
    return _id(128, "saga-trace", saga_id)


def saga_span_id(saga_id: str) -> int:
    """The saga's root span (StartSaga to EndSaga)."""
    return _id(64, "saga-span", saga_id)


def call_span_id(saga_id: str, vertex: str, compensation: bool, attempt: int, epoch: int) -> int:
    """One call to a participant: a request or compensation attempt sent in an epoch
    (a new leader that re-sends an attempt sends it in its own epoch: a new span)."""
    return _id(64, "call", saga_id, vertex, "C" if compensation else "T", attempt, epoch)


def traceparent(trace_id: int, span_id: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


def parse_traceparent(value: str) -> tuple[int, int] | None:
    """(trace id, parent span id) from a `traceparent` header; None if malformed."""
    match = _TRACEPARENT.match(value.strip().lower())
    if match is None:
        return None
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    return (trace_id, span_id) if trace_id and span_id else None


def call_traceparent(
    saga_id: str, vertex: str, compensation: bool, attempt: int, epoch: int
) -> str:
    span = call_span_id(saga_id, vertex, compensation, attempt, epoch)
    return traceparent(saga_trace_id(saga_id), span)
