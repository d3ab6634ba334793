"""Trace ids derived from the saga: the same on every node, valid W3C trace context."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from coordinator import tracecontext as tc


@given(trace_id=st.integers(1, 2**128 - 1), span_id=st.integers(1, 2**64 - 1))
def test_traceparent_round_trips(trace_id: int, span_id: int) -> None:
    header = tc.traceparent(trace_id, span_id)
    assert len(header) == 55 and header.startswith("00-") and header.endswith("-01")
    assert tc.parse_traceparent(header) == (trace_id, span_id)


def test_malformed_or_zero_ids_are_refused() -> None:
    a, b, zero_trace, zero_span = "a" * 32, "b" * 16, "0" * 32, "0" * 16
    for bad in (
        "",
        "00-xyz",
        f"01-{a}-{b}-01",
        f"00-{zero_trace}-{b}-01",
        f"00-{a}-{zero_span}-01",
    ):
        assert tc.parse_traceparent(bad) is None, bad


@given(
    saga=st.text(min_size=1, max_size=40), vertex=st.text(max_size=10), attempt=st.integers(1, 9)
)
def test_ids_depend_only_on_the_saga_and_differ_between_calls(saga, vertex, attempt) -> None:
    assert tc.saga_trace_id(saga) == tc.saga_trace_id(saga) > 0
    call = tc.call_span_id(saga, vertex, False, attempt, 1)
    assert call == tc.call_span_id(saga, vertex, False, attempt, 1)
    others = {
        tc.call_span_id(saga, vertex, True, attempt, 1),  # its compensation
        tc.call_span_id(saga, vertex, False, attempt + 1, 1),  # the next attempt
        tc.call_span_id(saga, vertex, False, attempt, 2),  # re-sent by a new leader
        tc.saga_span_id(saga),
    }
    assert call not in others and len(others) == 4
    parsed = tc.parse_traceparent(tc.call_traceparent(saga, vertex, False, attempt, 1))
    assert parsed == (tc.saga_trace_id(saga), call)
