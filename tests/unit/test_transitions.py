"""Every (state, event) pair of the transition tables, legal and illegal."""

from __future__ import annotations

import ast
import itertools
import pathlib

import pytest
from saga.v1 import log_pb2

from sagalog.transitions import (
    COMP_TABLE,
    REQ_TABLE,
    SAGA_TABLE,
    Comp,
    Event,
    Kind,
    Outcome,
    Phase,
    Reject,
    Req,
    SagaState,
    apply,
    decide,
)

# a -> b (b depends on a); c independent.
DAG = {"a": (), "b": ("a",), "c": ()}


def ev(kind: Kind, vertex: str = "", attempt: int = 0, **kw) -> Event:
    content = f"{kind.value}|{vertex}|{attempt}|{kw.get('tag', '')}".encode()
    kw.pop("tag", None)
    if kind is Kind.START_SAGA and "dag" not in kw:
        kw["dag"] = DAG
    return Event(kind, vertex=vertex, attempt=attempt, content=content, **kw)


def run(*events: Event) -> SagaState:
    state = SagaState()
    for e in events:
        d = decide(state, e)
        assert d.accepted, (e, d)
        apply(state, e)
    return state


START = ev(Kind.START_SAGA)


def state_in(phase: Phase) -> SagaState:
    if phase is Phase.NEW:
        return SagaState()
    if phase is Phase.RUNNING:
        return run(START, ev(Kind.START_T, "a", 1))
    if phase is Phase.ABORTING:
        return run(START, ev(Kind.START_T, "a", 1), ev(Kind.ABORT_SAGA))
    return run(START, ev(Kind.ABORT_SAGA), ev(Kind.END_SAGA, outcome=Outcome.ABORTED))


# For each kind, an event that passes the per-vertex rules in the states of state_in.
def candidate(kind: Kind, phase: Phase) -> Event:
    return {
        Kind.START_SAGA: ev(Kind.START_SAGA, tag="other"),
        Kind.START_T: ev(Kind.START_T, "c", 1),
        Kind.END_T: ev(Kind.END_T, "a"),
        Kind.FAIL_T: ev(Kind.FAIL_T, "a"),
        Kind.ABORT_SAGA: ev(Kind.ABORT_SAGA, tag="again"),
        Kind.START_C: ev(Kind.START_C, "a", 1),
        Kind.END_C: ev(Kind.END_C, "a"),
        Kind.STUCK: ev(Kind.STUCK, "a"),
        Kind.END_SAGA: ev(
            Kind.END_SAGA,
            tag="again",
            outcome=Outcome.ABORTED if phase is Phase.ABORTING else Outcome.COMPLETED,
        ),
    }[kind]


@pytest.mark.parametrize("phase,kind", list(itertools.product(Phase, Kind)))
def test_saga_table_every_pair(phase: Phase, kind: Kind) -> None:
    state = state_in(phase)
    decision = decide(state, candidate(kind, phase))
    if (phase, kind) not in SAGA_TABLE:
        assert not decision.accepted
        assert decision.duplicate_of is None
        assert decision.reason
        return
    # Legal at the saga level; per-vertex guards may still refuse, with a reason
    # that names the vertex rule, not the saga phase.
    if not decision.accepted:
        assert kind in (Kind.END_C, Kind.STUCK, Kind.END_SAGA, Kind.START_SAGA), decision
        assert "saga has ended" not in decision.reason


def vertex_state(req: Req, comp: Comp) -> SagaState:
    """A saga whose vertex 'a' is in (req, comp); aborting iff comp is not NONE."""
    events = [START]
    if req is not Req.PENDING:
        events.append(ev(Kind.START_T, "a", 1))
    if req is Req.DONE:
        events.append(ev(Kind.END_T, "a"))
    if req is Req.FAILED:
        events.append(ev(Kind.FAIL_T, "a"))
    if comp is not Comp.NONE:
        events += [ev(Kind.ABORT_SAGA), ev(Kind.START_C, "a", 1)]
    if comp is Comp.STUCK:
        events.append(ev(Kind.STUCK, "a"))
    if comp is Comp.DONE:
        events.append(ev(Kind.END_C, "a"))
    return run(*events)


REQ_EVENTS = {
    Kind.START_T: lambda s: ev(Kind.START_T, "a", s.vertices["a"].req_attempt + 1),
    Kind.END_T: lambda s: ev(Kind.END_T, "a", tag="x"),
    Kind.FAIL_T: lambda s: ev(Kind.FAIL_T, "a", tag="x"),
}


@pytest.mark.parametrize("req,kind", list(itertools.product(Req, REQ_EVENTS)))
def test_request_table_every_pair(req: Req, kind: Kind) -> None:
    state = vertex_state(req, Comp.NONE)
    decision = decide(state, REQ_EVENTS[kind](state))
    assert decision.accepted == ((req, kind) in REQ_TABLE), decision


COMP_EVENTS = {
    Kind.START_C: lambda s: ev(Kind.START_C, "a", s.vertices["a"].comp_attempt + 1),
    Kind.END_C: lambda s: ev(Kind.END_C, "a", tag="x"),
    Kind.STUCK: lambda s: ev(Kind.STUCK, "a", tag="x"),
}


@pytest.mark.parametrize("comp,kind", list(itertools.product(Comp, COMP_EVENTS)))
def test_compensation_table_every_pair(comp: Comp, kind: Kind) -> None:
    state = vertex_state(Req.STARTED, comp)
    if comp is Comp.NONE:
        apply(state, ev(Kind.ABORT_SAGA))
    decision = decide(state, COMP_EVENTS[kind](state))
    assert decision.accepted == ((comp, kind) in COMP_TABLE), decision


def test_end_t_after_abort_is_legal() -> None:
    state = run(START, ev(Kind.START_T, "a", 1), ev(Kind.ABORT_SAGA), ev(Kind.START_C, "a", 1))
    assert decide(state, ev(Kind.END_T, "a")).accepted


def test_end_t_without_start_t_is_rejected() -> None:
    d = decide(run(START), ev(Kind.END_T, "a"))
    assert not d.accepted and "never started" in d.reason


def test_start_t_needs_dependencies_done() -> None:
    state = run(START, ev(Kind.START_T, "a", 1))
    d = decide(state, ev(Kind.START_T, "b", 1))
    assert not d.accepted and "dependencies not done" in d.reason
    apply(state, ev(Kind.END_T, "a"))
    assert decide(state, ev(Kind.START_T, "b", 1)).accepted


def test_attempts_must_follow_each_other() -> None:
    state = run(START, ev(Kind.START_T, "a", 1))
    assert not decide(state, ev(Kind.START_T, "a", 3)).accepted
    assert decide(state, ev(Kind.START_T, "a", 2)).accepted


def test_compensation_waits_for_started_dependents() -> None:
    state = run(
        START,
        ev(Kind.START_T, "a", 1),
        ev(Kind.END_T, "a"),
        ev(Kind.START_T, "b", 1),
        ev(Kind.ABORT_SAGA),
    )
    d = decide(state, ev(Kind.START_C, "a", 1))
    assert not d.accepted and "dependents" in d.reason
    apply(state, ev(Kind.START_C, "b", 1))
    apply(state, ev(Kind.END_C, "b"))
    assert decide(state, ev(Kind.START_C, "a", 1)).accepted


def test_compensation_of_never_started_vertex_is_rejected() -> None:
    state = run(START, ev(Kind.ABORT_SAGA))
    assert not decide(state, ev(Kind.START_C, "c", 1)).accepted


def test_end_saga_completed_needs_every_request_done() -> None:
    state = run(START, ev(Kind.START_T, "a", 1), ev(Kind.END_T, "a"))
    assert not decide(state, ev(Kind.END_SAGA, outcome=Outcome.COMPLETED)).accepted
    for name in ("c", "b"):
        apply(state, ev(Kind.START_T, name, 1))
        apply(state, ev(Kind.END_T, name))
    assert decide(state, ev(Kind.END_SAGA, outcome=Outcome.COMPLETED)).accepted
    assert not decide(state, ev(Kind.END_SAGA, outcome=Outcome.ABORTED)).accepted


def test_end_saga_aborted_needs_every_started_vertex_compensated() -> None:
    state = run(START, ev(Kind.START_T, "a", 1), ev(Kind.ABORT_SAGA))
    assert not decide(state, ev(Kind.END_SAGA, outcome=Outcome.ABORTED)).accepted
    apply(state, ev(Kind.START_C, "a", 1))
    apply(state, ev(Kind.STUCK, "a"))
    assert state.stuck
    apply(state, ev(Kind.END_C, "a"))
    assert not state.stuck
    assert decide(state, ev(Kind.END_SAGA, outcome=Outcome.ABORTED)).accepted


def test_same_record_twice_is_a_duplicate_with_the_first_position() -> None:
    state = run(START, ev(Kind.START_T, "a", 1))
    d = decide(state, ev(Kind.START_T, "a", 1))
    assert not d.accepted and d.duplicate_of == 1


def test_different_record_same_identity_is_a_conflict() -> None:
    state = run(START)
    d = decide(state, ev(Kind.START_SAGA, tag="other definition"))
    assert not d.accepted and d.duplicate_of is None and d.code is Reject.CONFLICT


def test_refusals_carry_a_code_for_programs() -> None:
    state = run(START)
    assert decide(state, ev(Kind.END_T, "a")).code is Reject.OUT_OF_ORDER  # never started
    assert decide(state, ev(Kind.START_T, "nowhere", 1)).code is Reject.INVALID
    assert decide(state, ev(Kind.START_T, "a", 1)).code is None  # accepted


def test_reject_codes_are_the_protos() -> None:
    assert {r.name: r.value for r in Reject} == {
        name.removeprefix("REJECT_"): number
        for name, number in log_pb2.RejectCode.items()
        if number
    }


def test_duplicate_recognised_after_the_saga_ended() -> None:
    end = ev(Kind.END_SAGA, outcome=Outcome.ABORTED)
    state = run(START, ev(Kind.ABORT_SAGA), end)
    assert decide(state, end).duplicate_of == 2


@pytest.mark.parametrize(
    "dag,needle",
    [
        ({}, "no vertices"),
        ({"a": ("zz",)}, "unknown"),
        ({"a": ("b",), "b": ("a",)}, "cycle"),
        ({"a": ("a",)}, "cycle"),
    ],
)
def test_bad_definitions_are_rejected(dag, needle) -> None:
    d = decide(SagaState(), ev(Kind.START_SAGA, dag=dag))
    assert not d.accepted and needle in d.reason


def test_pure_core_imports_no_io() -> None:
    """The rules are plain functions over plain data (PRACTICES 1)."""
    import sagalog.transitions as mod

    tree = ast.parse(pathlib.Path(mod.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    forbidden = {"grpc", "pysyncobj", "rocksdict", "time", "random", "uuid", "os", "saga"}
    assert not imported & forbidden, imported & forbidden
