"""The participant's ledger: what each request and compensation did, in SQLite.

Every decision the saga guarantee rests on is made here, inside the same write
transaction as the handler's own writes (`Step.db`), so a crash keeps both or neither:

* a request key that has an entry is answered with its first answer; its handler
  never runs again;
* a compensation that finds no entry for its request leaves a **tombstone**, and
  the request, if it comes later, is refused without running;
* a request's compensation handler runs at most once, whatever compensation key
  (or how many attempts) asks for it;
* a call whose epoch is older than one already seen for its saga is refused: a
  coordinator that lost office must not act after its successor did.

The ledger's tables are named `saga_*`; a handler's own tables live beside them in
the same database file. `read_ledger` reads them without writing (safe while the
participant runs: WAL gives a reader the last committed state).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any

EXECUTE = "execute"
COMPENSATE = "compensate"

# A request's state (`saga_requests.status`).
IN_EFFECT = "in_effect"
COMPENSATED = "compensated"
REFUSED = "refused"

# What a compensation found (`saga_compensations.outcome`, and its reply's output).
OUTCOME_COMPENSATED = "compensated"
OUTCOME_ALREADY_COMPENSATED = "already_compensated"  # under another compensation key
OUTCOME_TOMBSTONED = "tombstoned"  # the request had not arrived: it will be refused
OUTCOME_ALREADY_TOMBSTONED = "already_tombstoned"
OUTCOME_NOTHING_TO_UNDO = "nothing_to_undo"  # the request was refused

# How a call was answered (`saga_calls.answer`). Fault-injecting wrappers add their
# own (the test kit's booking service records hang, crash, unavailable).
ANSWER_OK = "ok"
ANSWER_REFUSED = "refused"  # StepReply.ok = false: a business failure
ANSWER_INVALID = "invalid"  # INVALID_ARGUMENT: no idempotency key, ...
ANSWER_STALE_EPOCH = "stale_epoch"  # FAILED_PRECONDITION: a newer coordinator was seen
ANSWER_ERROR = "error"  # INTERNAL: the handler raised; the coordinator retries

LATE_REQUEST_ERROR = "cancelled before it arrived"

LEDGER_VERSION = 2  # 1: the booking participant before the SDK (its own tables)

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS saga_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS saga_requests (
    request_key    TEXT PRIMARY KEY,                 -- the Execute's idempotency key
    saga_id        TEXT NOT NULL,
    vertex         TEXT NOT NULL,
    action         TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('in_effect', 'compensated', 'refused')),
    ok             INTEGER NOT NULL,                 -- the first answer, repeated to retries
    output         BLOB NOT NULL,
    error          TEXT NOT NULL,
    epoch          INTEGER NOT NULL,                 -- of the call that decided it
    attempt        INTEGER NOT NULL,
    decided_at     REAL NOT NULL,                    -- unix seconds
    compensated_at REAL,
    compensated_by TEXT                              -- the compensation's idempotency key
);
CREATE TABLE IF NOT EXISTS saga_tombstones (
    request_key      TEXT PRIMARY KEY,               -- a request compensated before it arrived
    saga_id          TEXT NOT NULL,
    vertex           TEXT NOT NULL,
    compensation_key TEXT NOT NULL,
    created_at       REAL NOT NULL,
    late_request_at  REAL                            -- when the late request came and was refused
);
CREATE TABLE IF NOT EXISTS saga_compensations (
    compensation_key TEXT PRIMARY KEY,               -- the Compensate's idempotency key
    request_key      TEXT NOT NULL,
    saga_id          TEXT NOT NULL,
    vertex           TEXT NOT NULL,
    outcome          TEXT NOT NULL,
    epoch            INTEGER NOT NULL,
    attempt          INTEGER NOT NULL,
    at               REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS saga_epochs (
    saga_id TEXT PRIMARY KEY,
    epoch   INTEGER NOT NULL                         -- the newest coordinator epoch seen
);
CREATE TABLE IF NOT EXISTS saga_calls (
    id              INTEGER PRIMARY KEY AUTOINCREMENT, -- the order calls were handled in
    at              REAL NOT NULL,
    saga_id         TEXT NOT NULL,
    vertex          TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('execute', 'compensate')),
    action          TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    request_key     TEXT NOT NULL,
    attempt         INTEGER NOT NULL,
    epoch           INTEGER NOT NULL,
    answer          TEXT NOT NULL,
    ok              INTEGER,                         -- NULL when no StepReply was sent
    output          BLOB NOT NULL,
    error           TEXT NOT NULL,
    sent_ms         INTEGER NOT NULL DEFAULT 0       -- StepRequest.sent_unix_ms
);
CREATE INDEX IF NOT EXISTS saga_calls_by_request ON saga_calls (request_key);
"""


@dataclass(frozen=True)
class Call:
    """One call as received (what `saga_calls` records)."""

    kind: str  # execute | compensate
    saga_id: str
    vertex: str
    action: str
    idempotency_key: str
    request_key: str  # on Execute, the request's own key (its idempotency key)
    attempt: int
    epoch: int
    sent_ms: int = 0  # when the coordinator sent it (StepRequest.sent_unix_ms)

    @staticmethod
    def of(kind: str, request: Any) -> Call:
        """From a `saga.v1.StepRequest`."""
        return Call(
            kind=kind,
            saga_id=request.saga_id,
            vertex=request.vertex,
            action=request.action,
            idempotency_key=request.idempotency_key,
            request_key=request.idempotency_key if kind == EXECUTE else request.request_key,
            attempt=request.attempt,
            epoch=request.epoch,
            sent_ms=request.sent_unix_ms,
        )

    def problem(self) -> str | None:
        """Why the call cannot be handled at all (INVALID_ARGUMENT), or None."""
        if not self.idempotency_key:
            return "idempotency_key is required"
        if self.kind == COMPENSATE and not self.request_key:
            return "request_key (the request to undo) is required on Compensate"
        return None


@dataclass(frozen=True)
class Reply:
    ok: bool
    output: bytes
    error: str


@dataclass(frozen=True)
class Outcome:
    """How a call ends: a StepReply, or (reply None) a gRPC error status that the
    coordinator takes for a transport failure and retries."""

    answer: str  # one of the ANSWER_* values
    reply: Reply | None
    detail: str = ""  # why there is no reply


@dataclass(frozen=True)
class Plan:
    """What the ledger decided before any handler ran: either the call's outcome,
    or that the handler must run (`booked`: the request's output, for a compensation
    of a request in effect; None for one that never arrived)."""

    outcome: Outcome | None
    booked: bytes | None = None


@dataclass(frozen=True)
class HandlerResult:
    """What a handler did: returned `output`, raised Refused (`refusal`), or failed."""

    output: bytes = b""
    refusal: str | None = None
    failure: str | None = None


class LedgerFormatError(sqlite3.DatabaseError):
    """The database was written by something this code does not understand."""


class Ledger:
    """One SQLite connection behind a lock. WAL with synchronous=FULL: a commit is on
    disk before the call is answered."""

    def __init__(self, db_path: str, app_schema: str = "") -> None:
        self.db_path = db_path
        self._lock = threading.Lock()
        directory = os.path.dirname(os.path.abspath(db_path))
        os.makedirs(directory, exist_ok=True)
        self._db = sqlite3.connect(
            db_path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        try:
            self._open(app_schema)
        except BaseException:
            self._db.close()
            raise

    def _open(self, app_schema: str) -> None:
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"{self.db_path}: cannot use WAL (journal_mode={mode})")
        self._db.execute("PRAGMA synchronous=FULL")  # WAL + FULL: fsync on every commit
        with self.transaction() as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            if {"bookings", "tombstones", "calls"} <= tables and "saga_meta" not in tables:
                raise LedgerFormatError(
                    f"{self.db_path}: written by the booking participant before the SDK "
                    "(ledger version 1); move it away to start afresh"
                )
            for statement in LEDGER_SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            row = db.execute("SELECT value FROM saga_meta WHERE key = 'version'").fetchone()
            if row is None:
                db.execute("INSERT INTO saga_meta VALUES ('version', ?)", (str(LEDGER_VERSION),))
            elif row[0] != str(LEDGER_VERSION):
                raise LedgerFormatError(
                    f"{self.db_path}: ledger version {row[0]}, this code knows {LEDGER_VERSION}"
                )
            for statement in app_schema.split(";"):
                if statement.strip():
                    db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back if anything raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:
                # A failed COMMIT (disk full, I/O error) may leave the transaction
                # open: every later BEGIN would fail until a restart.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # ---- decisions, inside a transaction ----------------------------------------------

    def plan(self, db: sqlite3.Connection, call: Call) -> Plan:
        """Decide what the ledger can without the handler; write what that decided."""
        seen = db.execute("SELECT epoch FROM saga_epochs WHERE saga_id = ?", (call.saga_id,))
        newest = seen.fetchone()
        if newest is not None and call.epoch < newest[0]:
            detail = f"epoch {call.epoch} is older than epoch {newest[0]}, already seen"
            return Plan(Outcome(ANSWER_STALE_EPOCH, None, detail))
        if newest is None or call.epoch > newest[0]:
            db.execute(
                "INSERT INTO saga_epochs VALUES (?, ?) "
                "ON CONFLICT (saga_id) DO UPDATE SET epoch = excluded.epoch",
                (call.saga_id, call.epoch),
            )
        if call.kind == EXECUTE:
            return self._plan_request(db, call)
        return self._plan_compensation(db, call)

    def _plan_request(self, db: sqlite3.Connection, call: Call) -> Plan:
        row = db.execute(
            "SELECT ok, output, error FROM saga_requests WHERE request_key = ?",
            (call.request_key,),
        ).fetchone()
        if row is not None:
            return Plan(_replied(Reply(bool(row[0]), bytes(row[1]), row[2])))
        tombstone = db.execute(
            "SELECT 1 FROM saga_tombstones WHERE request_key = ?", (call.request_key,)
        ).fetchone()
        if tombstone is not None:
            db.execute(
                "UPDATE saga_tombstones SET late_request_at = ? WHERE request_key = ?",
                (time.time(), call.request_key),
            )
            return Plan(self._decide_request(db, call, HandlerResult(refusal=LATE_REQUEST_ERROR)))
        return Plan(None)

    def _plan_compensation(self, db: sqlite3.Connection, call: Call) -> Plan:
        row = db.execute(
            "SELECT outcome FROM saga_compensations WHERE compensation_key = ?",
            (call.idempotency_key,),
        ).fetchone()
        if row is not None:
            return Plan(_replied(Reply(True, row[0].encode(), "")))
        request = db.execute(
            "SELECT status, output FROM saga_requests WHERE request_key = ?",
            (call.request_key,),
        ).fetchone()
        if request is None:
            tombstone = db.execute(
                "SELECT 1 FROM saga_tombstones WHERE request_key = ?", (call.request_key,)
            ).fetchone()
            if tombstone is None:
                return Plan(None, booked=None)  # the handler runs, then the tombstone
            return Plan(self._compensated(db, call, OUTCOME_ALREADY_TOMBSTONED))
        status, output = request
        if status == IN_EFFECT:
            return Plan(None, booked=bytes(output))
        if status == COMPENSATED:
            return Plan(self._compensated(db, call, OUTCOME_ALREADY_COMPENSATED))
        return Plan(self._compensated(db, call, OUTCOME_NOTHING_TO_UNDO))

    def settle(
        self, db: sqlite3.Connection, call: Call, plan: Plan, result: HandlerResult
    ) -> Outcome:
        """Record what the handler did (its writes are already in `db`'s transaction,
        or rolled back if it refused or failed)."""
        if result.failure is not None:
            return Outcome(ANSWER_ERROR, None, result.failure)
        if call.kind == EXECUTE:
            return self._decide_request(db, call, result)
        if result.refusal is not None:
            return Outcome(ANSWER_ERROR, None, f"a compensation must not refuse: {result.refusal}")
        now = time.time()
        if plan.booked is None:
            db.execute(
                "INSERT INTO saga_tombstones (request_key, saga_id, vertex, compensation_key, "
                "created_at) VALUES (?, ?, ?, ?, ?)",
                (call.request_key, call.saga_id, call.vertex, call.idempotency_key, now),
            )
            return self._compensated(db, call, OUTCOME_TOMBSTONED)
        db.execute(
            "UPDATE saga_requests SET status = ?, compensated_at = ?, compensated_by = ? "
            "WHERE request_key = ?",
            (COMPENSATED, now, call.idempotency_key, call.request_key),
        )
        return self._compensated(db, call, OUTCOME_COMPENSATED)

    @staticmethod
    def _decide_request(db: sqlite3.Connection, call: Call, result: HandlerResult) -> Outcome:
        reply = (
            Reply(False, b"", result.refusal)
            if result.refusal is not None
            else Reply(True, result.output, "")
        )
        db.execute(
            "INSERT INTO saga_requests (request_key, saga_id, vertex, action, status, ok, "
            "output, error, epoch, attempt, decided_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                call.request_key,
                call.saga_id,
                call.vertex,
                call.action,
                IN_EFFECT if reply.ok else REFUSED,
                int(reply.ok),
                reply.output,
                reply.error,
                call.epoch,
                call.attempt,
                time.time(),
            ),
        )
        return _replied(reply)

    @staticmethod
    def _compensated(db: sqlite3.Connection, call: Call, outcome: str) -> Outcome:
        db.execute(
            "INSERT INTO saga_compensations (compensation_key, request_key, saga_id, vertex, "
            "outcome, epoch, attempt, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                call.idempotency_key,
                call.request_key,
                call.saga_id,
                call.vertex,
                outcome,
                call.epoch,
                call.attempt,
                time.time(),
            ),
        )
        return _replied(Reply(True, outcome.encode(), ""))

    # ---- the calls log -----------------------------------------------------------------

    @staticmethod
    def log_call(db: sqlite3.Connection, call: Call, answer: str, reply: Reply | None) -> None:
        db.execute(
            "INSERT INTO saga_calls (at, saga_id, vertex, kind, action, idempotency_key, "
            "request_key, attempt, epoch, answer, ok, output, error, sent_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                time.time(),
                call.saga_id,
                call.vertex,
                call.kind,
                call.action,
                call.idempotency_key,
                call.request_key,
                call.attempt,
                call.epoch,
                answer,
                None if reply is None else int(reply.ok),
                b"" if reply is None else reply.output,
                "" if reply is None else reply.error,
                call.sent_ms,
            ),
        )


def _replied(reply: Reply) -> Outcome:
    return Outcome(ANSWER_OK if reply.ok else ANSWER_REFUSED, reply)


# ---- read-only inspection -----------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What one request did here (refused requests included: they were decided)."""

    request_key: str
    saga_id: str
    vertex: str
    action: str
    status: str  # in_effect | compensated | refused
    output: bytes
    error: str
    epoch: int
    attempt: int
    decided_at: float
    compensated_at: float | None
    compensated_by: str | None  # the compensation's idempotency key


@dataclass(frozen=True)
class Tombstone:
    """A compensation that arrived before its request."""

    request_key: str
    saga_id: str
    vertex: str
    compensation_key: str
    created_at: float
    late_request_at: float | None  # when the late request arrived and was refused


@dataclass(frozen=True)
class Compensation:
    compensation_key: str
    request_key: str
    saga_id: str
    vertex: str
    outcome: str
    epoch: int
    attempt: int
    at: float


@dataclass(frozen=True)
class CallRecord:
    id: int  # handling order
    at: float
    saga_id: str
    vertex: str
    kind: str  # execute | compensate
    action: str
    idempotency_key: str
    request_key: str
    attempt: int
    epoch: int
    answer: str
    ok: bool | None
    output: bytes
    error: str
    sent_ms: int  # when the coordinator sent it (0: unknown)


@dataclass
class LedgerState:
    """A snapshot of one participant's ledger."""

    db_path: str
    requests: dict[str, Request] = field(default_factory=dict)  # by request key
    tombstones: dict[str, Tombstone] = field(default_factory=dict)  # by request key
    compensations: dict[str, Compensation] = field(default_factory=dict)  # by their own key
    epochs: Mapping[str, int] = field(default_factory=dict)  # by saga id
    calls: list[CallRecord] = field(default_factory=list)  # in handling order

    def calls_for(self, request_key: str) -> list[CallRecord]:
        """Every Execute of this request and every Compensate that undid it."""
        return [c for c in self.calls if c.request_key == request_key]


def read_ledger_from(db: sqlite3.Connection, db_path: str) -> LedgerState:
    """The ledger as `db` sees it (call inside a read transaction to get one snapshot
    across the tables)."""
    state = LedgerState(db_path=db_path)
    for row in db.execute(
        "SELECT request_key, saga_id, vertex, action, status, output, error, epoch, attempt, "
        "decided_at, compensated_at, compensated_by FROM saga_requests ORDER BY decided_at"
    ):
        state.requests[row[0]] = Request(*row)
    for row in db.execute(
        "SELECT request_key, saga_id, vertex, compensation_key, created_at, late_request_at "
        "FROM saga_tombstones ORDER BY created_at"
    ):
        state.tombstones[row[0]] = Tombstone(*row)
    for row in db.execute(
        "SELECT compensation_key, request_key, saga_id, vertex, outcome, epoch, attempt, at "
        "FROM saga_compensations ORDER BY at"
    ):
        state.compensations[row[0]] = Compensation(*row)
    state.epochs = dict(db.execute("SELECT saga_id, epoch FROM saga_epochs").fetchall())
    for row in db.execute(
        "SELECT id, at, saga_id, vertex, kind, action, idempotency_key, request_key, attempt, "
        "epoch, answer, ok, output, error, sent_ms FROM saga_calls ORDER BY id"
    ):
        values = list(row)
        values[11] = None if row[11] is None else bool(row[11])  # ok: stored as 0/1
        values[12] = bytes(row[12])
        state.calls.append(CallRecord(*values))
    return state


@contextmanager
def read_only(db_path: str) -> Iterator[sqlite3.Connection]:
    """A read-only connection inside one read transaction (one consistent snapshot)."""
    if not os.path.exists(db_path):
        raise FileNotFoundError(db_path)
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30.0)) as db:
        db.execute("BEGIN")
        yield db
        db.execute("COMMIT")


def read_ledger(db_path: str) -> LedgerState:
    """Read a participant's ledger without writing to it."""
    with read_only(db_path) as db:
        return read_ledger_from(db, db_path)
