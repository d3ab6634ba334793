"""The Saga Log's transition rules: which record may follow which.

Theory of operation
-------------------
A saga's log is a sequence of records. Its state is a fold over those records;
this module holds the fold and the rules, as tables, and nothing else (no IO, no
clock, no protobuf). The state machine (`sagalog.machine`) asks `decide` about
each proposed record, in order, against the state left by the records before it.

A saga is in one of four phases:

    NEW --StartSaga--> RUNNING --AbortSaga--> ABORTING
    RUNNING  --EndSaga(COMPLETED)--> ENDED   (every vertex's request ended with EndT)
    ABORTING --EndSaga(ABORTED)-->   ENDED   (every started vertex compensated)

Each vertex has two independent sub-states, one for its request and one for its
compensation, so that a reply arriving after AbortSaga (a late EndT) can still be
logged while the vertex is being compensated:

    request:       PENDING --StartT--> STARTED --EndT--> DONE
                                       STARTED --FailT-> FAILED
                   STARTED --StartT(attempt+1)--> STARTED   (a transport retry)
    compensation:  NONE --StartC--> STARTED --EndC--> DONE
                   STARTED --Stuck--> STUCK --EndC--> DONE
                   STARTED/STUCK --StartC(attempt+1)--> same

Guards beyond the tables: StartT needs every dependency DONE; StartC needs the
request STARTED, DONE or FAILED (a StartT was logged: its effect may exist) and
every started dependent already compensated (reverse dependency order).

Identity: each record has a deterministic identity (kind, vertex, attempt). A
record whose identity is already in the log is a DUPLICATE when its content is
the same (the first result is returned; proposals are retried after lost
callbacks) and REJECTED as a conflict otherwise. Duplicates are recognised
before any other rule, so a retried record is answered the same way even after
the saga moved on.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace


class _Member(enum.Enum):
    """An enum hashed by identity: enum.Enum hashes a member by its name in Python
    code, and every rule below looks members up in tables keyed by pairs, for every
    record on every replica. Members are singletons compared by identity already,
    and a str hash differs between processes anyway (nothing may depend on it)."""

    __hash__ = object.__hash__


class Kind(_Member):
    START_SAGA = "StartSaga"
    START_T = "StartT"
    END_T = "EndT"
    FAIL_T = "FailT"
    ABORT_SAGA = "AbortSaga"
    START_C = "StartC"
    END_C = "EndC"
    STUCK = "Stuck"
    END_SAGA = "EndSaga"


class Phase(_Member):
    NEW = "NEW"
    RUNNING = "RUNNING"
    ABORTING = "ABORTING"
    ENDED = "ENDED"


class Req(_Member):
    PENDING = "PENDING"
    STARTED = "STARTED"
    DONE = "DONE"
    FAILED = "FAILED"


class Comp(_Member):
    NONE = "NONE"
    STARTED = "STARTED"
    STUCK = "STUCK"
    DONE = "DONE"


class Outcome(_Member):
    COMPLETED = "COMPLETED"
    ABORTED = "ABORTED"


# Which record kinds each saga phase admits at all (before per-vertex rules).
# Missing pairs are rejected with the reason in SAGA_REJECT.
SAGA_TABLE: Mapping[tuple[Phase, Kind], Phase] = {
    (Phase.NEW, Kind.START_SAGA): Phase.RUNNING,
    (Phase.RUNNING, Kind.START_T): Phase.RUNNING,
    (Phase.RUNNING, Kind.END_T): Phase.RUNNING,
    (Phase.RUNNING, Kind.FAIL_T): Phase.RUNNING,
    (Phase.RUNNING, Kind.ABORT_SAGA): Phase.ABORTING,
    (Phase.RUNNING, Kind.END_SAGA): Phase.ENDED,
    # A reply that arrives after AbortSaga is still logged, so that the
    # compensation can use its output.
    (Phase.ABORTING, Kind.END_T): Phase.ABORTING,
    (Phase.ABORTING, Kind.FAIL_T): Phase.ABORTING,
    (Phase.ABORTING, Kind.START_C): Phase.ABORTING,
    (Phase.ABORTING, Kind.END_C): Phase.ABORTING,
    (Phase.ABORTING, Kind.STUCK): Phase.ABORTING,
    (Phase.ABORTING, Kind.END_SAGA): Phase.ENDED,
}

SAGA_REJECT: Mapping[Phase, str] = {
    Phase.NEW: "unknown saga: no StartSaga was logged for it",
    Phase.RUNNING: "the saga is running, not aborting",
    Phase.ABORTING: "the saga is aborting: no new requests may start",
    Phase.ENDED: "the saga has ended (EndSaga was logged)",
}

# Per-vertex request transitions: (state, kind) -> state.
REQ_TABLE: Mapping[tuple[Req, Kind], Req] = {
    (Req.PENDING, Kind.START_T): Req.STARTED,
    (Req.STARTED, Kind.START_T): Req.STARTED,  # a retry: attempt must grow by one
    (Req.STARTED, Kind.END_T): Req.DONE,
    (Req.STARTED, Kind.FAIL_T): Req.FAILED,
}

REQ_REJECT: Mapping[Req, str] = {
    Req.PENDING: "the request was never started (no StartT)",
    Req.STARTED: "the request is in progress",
    Req.DONE: "the request already ended (EndT)",
    Req.FAILED: "the request already failed (FailT)",
}

# Per-vertex compensation transitions.
COMP_TABLE: Mapping[tuple[Comp, Kind], Comp] = {
    (Comp.NONE, Kind.START_C): Comp.STARTED,
    (Comp.STARTED, Kind.START_C): Comp.STARTED,  # a retry
    (Comp.STARTED, Kind.END_C): Comp.DONE,
    (Comp.STARTED, Kind.STUCK): Comp.STUCK,
    (Comp.STUCK, Kind.START_C): Comp.STUCK,  # still retried while stuck
    (Comp.STUCK, Kind.END_C): Comp.DONE,
}

COMP_REJECT: Mapping[Comp, str] = {
    Comp.NONE: "the compensation was never started (no StartC)",
    Comp.STARTED: "the compensation is in progress",
    Comp.STUCK: "the compensation is already marked stuck",
    Comp.DONE: "the compensation already ended (EndC)",
}

REQUEST_KINDS = frozenset({Kind.START_T, Kind.END_T, Kind.FAIL_T})
COMPENSATION_KINDS = frozenset({Kind.START_C, Kind.END_C, Kind.STUCK})
ATTEMPT_KINDS = frozenset({Kind.START_T, Kind.START_C})


@dataclass(frozen=True)
class Event:
    """One proposed saga record, reduced to what the rules need.

    `content` is the record's canonical bytes without epoch and time; two records
    with the same identity and the same content are the same record.
    """

    kind: Kind
    vertex: str = ""
    attempt: int = 0
    outcome: Outcome | None = None
    content: bytes = b""
    # For StartSaga only: vertex name -> names it depends on.
    dag: Mapping[str, tuple[str, ...]] | None = None

    @property
    def identity(self) -> tuple[Kind, str, int]:
        return (self.kind, self.vertex, self.attempt if self.kind in ATTEMPT_KINDS else 0)


@dataclass
class VertexState:
    req: Req = Req.PENDING
    req_attempt: int = 0
    comp: Comp = Comp.NONE
    comp_attempt: int = 0


@dataclass
class SagaState:
    """The fold of one saga's accepted records."""

    phase: Phase = Phase.NEW
    deps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dependents: dict[str, list[str]] = field(default_factory=dict)
    vertices: dict[str, VertexState] = field(default_factory=dict)
    outcome: Outcome | None = None
    # identity -> (fingerprint of the content, seq) of every accepted record. A
    # fingerprint, not the content: a StartSaga's content holds the definition and
    # up to 256 KiB of payload, and the Saga Log keeps thousands of states cached.
    seen: dict[tuple[Kind, str, int], tuple[bytes, int]] = field(default_factory=dict)
    # invariant: next_seq == number of accepted records
    next_seq: int = 0
    stuck: bool = False

    def copy(self) -> SagaState:
        """An independent copy to fold records into (the DAG itself is shared: no
        record changes it after StartSaga)."""
        return SagaState(
            phase=self.phase,
            deps=self.deps,
            dependents=self.dependents,
            vertices={name: replace(v) for name, v in self.vertices.items()},
            outcome=self.outcome,
            seen=dict(self.seen),
            next_seq=self.next_seq,
            stuck=self.stuck,
        )


class Reject(enum.IntEnum):
    """Why a record is refused, for programs (`reason` is for people). The numbers
    are `saga.v1.RejectCode`'s."""

    CONFLICT = 1  # a different record with the same identity is logged
    STALE_EPOCH = 2  # not the epoch in office (decided by the log, not these rules)
    OUT_OF_ORDER = 3  # the saga's state does not allow it now
    INVALID = 4  # malformed for this saga (its DAG, an unknown vertex, an outcome)


@dataclass(frozen=True)
class Decision:
    accepted: bool
    duplicate_of: int | None = None  # seq of the identical record already logged
    reason: str = ""
    code: Reject | None = None  # set when refused


def _refused(code: Reject, reason: str) -> Decision:
    return Decision(False, reason=reason, code=code)


def _fingerprint(content: bytes) -> bytes:
    """Equal for equal contents; 128-bit BLAKE2b, so unequal contents never collide
    in practice (the DUPLICATE-or-conflict verdict rests on it)."""
    return hashlib.blake2b(content, digest_size=16).digest()


START_IDENTITY = (Kind.START_SAGA, "", 0)


def start_fingerprint(state: SagaState) -> bytes:
    """The fingerprint of the saga's StartSaga (b"" before one is logged)."""
    seen = state.seen.get(START_IDENTITY)
    return seen[0] if seen is not None else b""


def purged_state(start_fp: bytes, outcome: Outcome, records: int) -> SagaState:
    """What the rules know of an ended saga whose records retention removed: it has
    ended (so nothing more is accepted), and the same StartSaga again is a
    DUPLICATE of position 0, a different one a conflict, as before the purge."""
    return SagaState(
        phase=Phase.ENDED, outcome=outcome, seen={START_IDENTITY: (start_fp, 0)}, next_seq=records
    )


def decide(state: SagaState, event: Event) -> Decision:
    """Whether `event` may follow `state`. Pure; never raises on bad input."""
    seen = state.seen.get(event.identity)
    if seen is not None:
        fingerprint, seq = seen
        if fingerprint == _fingerprint(event.content):
            return Decision(accepted=False, duplicate_of=seq)
        return _refused(
            Reject.CONFLICT,
            f"conflict: a different {event.kind.value} record"
            f"{_of(event)} is already logged at position {seq}",
        )
    if (state.phase, event.kind) not in SAGA_TABLE:
        return _refused(
            Reject.OUT_OF_ORDER, f"{event.kind.value}{_of(event)}: {SAGA_REJECT[state.phase]}"
        )
    if event.kind is Kind.START_SAGA:
        return _check_dag(event)
    if event.kind is Kind.ABORT_SAGA:
        return Decision(True)
    if event.kind is Kind.END_SAGA:
        return _check_end(state, event)
    vertex = state.vertices.get(event.vertex)
    if vertex is None:
        return _refused(Reject.INVALID, f"{event.kind.value}: unknown vertex {event.vertex!r}")
    if event.kind in REQUEST_KINDS:
        return _check_request(state, vertex, event)
    return _check_compensation(state, vertex, event)


def apply(state: SagaState, event: Event) -> None:
    """Fold an accepted event into `state` (call only after `decide` accepted it)."""
    state.phase = SAGA_TABLE[(state.phase, event.kind)]
    state.seen[event.identity] = (_fingerprint(event.content), state.next_seq)
    state.next_seq += 1
    if event.kind is Kind.START_SAGA:
        assert event.dag is not None
        state.deps = {name: tuple(deps) for name, deps in event.dag.items()}
        state.dependents = {name: [] for name in event.dag}
        for name, deps in event.dag.items():
            for dep in deps:
                state.dependents[dep].append(name)
        state.vertices = {name: VertexState() for name in event.dag}
    elif event.kind is Kind.END_SAGA:
        state.outcome = event.outcome
    elif event.kind in REQUEST_KINDS:
        v = state.vertices[event.vertex]
        v.req = REQ_TABLE[(v.req, event.kind)]
        if event.kind is Kind.START_T:
            v.req_attempt = event.attempt
    elif event.kind in COMPENSATION_KINDS:
        v = state.vertices[event.vertex]
        v.comp = COMP_TABLE[(v.comp, event.kind)]
        if event.kind is Kind.START_C:
            v.comp_attempt = event.attempt
        if event.kind is Kind.STUCK:
            state.stuck = True
        if event.kind is Kind.END_C:
            state.stuck = any(x.comp is Comp.STUCK for x in state.vertices.values())


def started(vertex: VertexState) -> bool:
    """A StartT was logged: the request may have taken effect."""
    return vertex.req is not Req.PENDING


def _of(event: Event) -> str:
    return f"({event.vertex})" if event.vertex else ""


def _check_dag(event: Event) -> Decision:
    dag = event.dag or {}
    if not dag:
        return _refused(Reject.INVALID, "StartSaga: the definition has no vertices")
    for name, deps in dag.items():
        for dep in deps:
            if dep not in dag:
                return _refused(
                    Reject.INVALID, f"StartSaga: vertex {name!r} depends on unknown {dep!r}"
                )
    # Kahn's algorithm: a cycle leaves vertices that never reach in-degree zero.
    indegree = {name: len(deps) for name, deps in dag.items()}
    dependents: dict[str, list[str]] = {name: [] for name in dag}
    for name, deps in dag.items():
        for dep in deps:
            dependents[dep].append(name)
    ready = [name for name, n in indegree.items() if n == 0]
    visited = 0
    while ready:
        name = ready.pop()
        visited += 1
        for child in dependents[name]:
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    if visited != len(dag):
        cyclic = sorted(name for name, n in indegree.items() if n > 0)
        return _refused(
            Reject.INVALID, f"StartSaga: the dependencies form a cycle through {cyclic}"
        )
    return Decision(True)


def _check_end(state: SagaState, event: Event) -> Decision:
    if event.outcome is Outcome.COMPLETED:
        if state.phase is not Phase.RUNNING:
            return _refused(Reject.OUT_OF_ORDER, "EndSaga(COMPLETED): the saga is aborting")
        pending = sorted(n for n, v in state.vertices.items() if v.req is not Req.DONE)
        if pending:
            return _refused(
                Reject.OUT_OF_ORDER, f"EndSaga(COMPLETED): requests not done: {pending}"
            )
        return Decision(True)
    if event.outcome is Outcome.ABORTED:
        if state.phase is not Phase.ABORTING:
            return _refused(
                Reject.OUT_OF_ORDER, "EndSaga(ABORTED): the saga was not aborted (no AbortSaga)"
            )
        open_ = sorted(
            n for n, v in state.vertices.items() if started(v) and v.comp is not Comp.DONE
        )
        if open_:
            return _refused(
                Reject.OUT_OF_ORDER, f"EndSaga(ABORTED): started vertices not compensated: {open_}"
            )
        return Decision(True)
    return _refused(Reject.INVALID, "EndSaga: the outcome must be COMPLETED or ABORTED")


def _check_request(state: SagaState, vertex: VertexState, event: Event) -> Decision:
    name = event.vertex
    if (vertex.req, event.kind) not in REQ_TABLE:
        return _refused(
            Reject.OUT_OF_ORDER, f"{event.kind.value}({name}): {REQ_REJECT[vertex.req]}"
        )
    if event.kind is Kind.START_T:
        if event.attempt != vertex.req_attempt + 1:
            return _refused(
                Reject.OUT_OF_ORDER,
                f"StartT({name}): attempt {event.attempt} does not follow "
                f"attempt {vertex.req_attempt}",
            )
        waiting = [d for d in state.deps[name] if state.vertices[d].req is not Req.DONE]
        if waiting:
            return _refused(
                Reject.OUT_OF_ORDER, f"StartT({name}): dependencies not done: {waiting}"
            )
    return Decision(True)


def _check_compensation(state: SagaState, vertex: VertexState, event: Event) -> Decision:
    name = event.vertex
    if not started(vertex):
        return _refused(
            Reject.OUT_OF_ORDER,
            f"{event.kind.value}({name}): the request was never started (no StartT)",
        )
    if (vertex.comp, event.kind) not in COMP_TABLE:
        return _refused(
            Reject.OUT_OF_ORDER, f"{event.kind.value}({name}): {COMP_REJECT[vertex.comp]}"
        )
    if event.kind is Kind.START_C:
        if event.attempt != vertex.comp_attempt + 1:
            return _refused(
                Reject.OUT_OF_ORDER,
                f"StartC({name}): attempt {event.attempt} does not follow "
                f"attempt {vertex.comp_attempt}",
            )
        blocking = [
            d
            for d in state.dependents[name]
            if started(state.vertices[d]) and state.vertices[d].comp is not Comp.DONE
        ]
        if blocking:
            return _refused(
                Reject.OUT_OF_ORDER,
                f"StartC({name}): started dependents not yet compensated: {blocking}",
            )
    return Decision(True)
