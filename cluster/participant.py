"""`saga-participant`: a booking service (hotel, car, flight, payment) that a saga calls.

It implements `saga.v1.Participant` the way the contract in `participant.proto`
asks, so that the coordinator's guarantees can be tested against a real, separate
process rather than a mock:

* Every effect is keyed by the request's idempotency key and stored in SQLite
  (WAL, synchronous=FULL) before it is answered, so a retry after a timeout, a
  failover or a kill -9 of this process is answered with the first answer and never
  books twice.
* A compensation that arrives before its request leaves a **tombstone**; the late
  request is then refused, so the saga never ends with a booking nobody will undo.
* Every call received is logged (with its epoch and attempt) so that a checker can
  verify, from the database alone, that no request took effect twice, that every
  compensated request is cancelled, and that epochs never went backwards.
* Fault knobs (refusals, latency, hangs, transport errors, crashes) make the
  coordinator's failure paths reachable on demand, repeatably with `--seed`.

Run: `python -m cluster.participant --name Hotel --addr 127.0.0.1:PORT --data-dir DIR`.
Read a participant's state (even while it runs): `read_state(DIR/Hotel.sqlite)`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import secrets
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn

import grpc
from saga.v1 import participant_pb2, participant_pb2_grpc

from cluster.grpcutil import PENDING_REQUEST_OPTIONS
from cluster.tls import TlsFiles

log = logging.getLogger("saga.participant")

EXIT_USAGE = 2
EXIT_START_FAILED = 1

# Booking states (the `bookings.status` column).
IN_EFFECT = "in_effect"
CANCELLED = "cancelled"
REFUSED = "refused"

# What a compensation found (the `compensations.outcome` column; also its reply's output).
OUTCOME_CANCELLED = "cancelled"
OUTCOME_ALREADY_CANCELLED = "already_cancelled"  # another compensation key cancelled it
OUTCOME_TOMBSTONED = "tombstoned"  # the request had not arrived: it will be refused
OUTCOME_ALREADY_TOMBSTONED = "already_tombstoned"
OUTCOME_NOTHING_TO_UNDO = "nothing_to_undo"  # the request was refused

# What a call was answered (the `calls.answer` column).
ANSWER_OK = "ok"
ANSWER_REFUSED = "refused"  # StepReply.ok = false
ANSWER_UNAVAILABLE = "unavailable"  # injected transport error, or a storage error
ANSWER_HANG = "hang"  # injected hang: the caller's deadline answers for us
ANSWER_CRASH = "crash"  # injected crash: the process exited before answering
ANSWER_INVALID = "invalid"  # INVALID_ARGUMENT (no idempotency key, ...)

LATE_REQUEST_ERROR = "cancelled before it arrived"

# Where an injected hang or crash happens: before anything is done, or after the
# effect is durable but before the answer is sent (the reply is lost).
FAULT_POINTS = ("received", "after-effect")

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS bookings (
    id            INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: numbers the booking ids
    request_key   TEXT NOT NULL UNIQUE,              -- the Execute's idempotency key
    saga_id       TEXT NOT NULL,
    vertex        TEXT NOT NULL,
    action        TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('in_effect', 'cancelled', 'refused')),
    ok            INTEGER NOT NULL,                  -- the first answer, repeated to retries
    output        BLOB NOT NULL,
    error         TEXT NOT NULL,
    epoch         INTEGER NOT NULL,                  -- of the call that decided it
    attempt       INTEGER NOT NULL,
    decided_at    REAL NOT NULL,                     -- unix seconds
    cancelled_at  REAL,
    cancelled_by  TEXT                               -- the compensation's idempotency key
);
CREATE TABLE IF NOT EXISTS tombstones (
    request_key      TEXT PRIMARY KEY,               -- a request compensated before it arrived
    saga_id          TEXT NOT NULL,
    vertex           TEXT NOT NULL,
    compensation_key TEXT NOT NULL,
    created_at       REAL NOT NULL,
    late_request_at  REAL                            -- when the late request came and was refused
);
CREATE TABLE IF NOT EXISTS compensations (
    compensation_key TEXT PRIMARY KEY,               -- the Compensate's idempotency key
    request_key      TEXT NOT NULL,
    saga_id          TEXT NOT NULL,
    vertex           TEXT NOT NULL,
    outcome          TEXT NOT NULL,
    epoch            INTEGER NOT NULL,
    attempt          INTEGER NOT NULL,
    at               REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS calls (
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
    ok              INTEGER,                         -- NULL when no StepReply was decided
    output          BLOB NOT NULL,
    error           TEXT NOT NULL,
    sent_ms         INTEGER NOT NULL DEFAULT 0      -- StepRequest.sent_unix_ms
);
CREATE INDEX IF NOT EXISTS calls_by_request ON calls (request_key);
"""

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_ADDR_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:(\d{1,5})$")
MAX_LATENCY_MS = 60_000
MAX_HANG_S = 600.0
MAX_CRASH_AFTER_CALLS = 1_000_000_000
MAX_SUBSTRING_LEN = 128
MAX_WORKERS = 256


def db_path_for(data_dir: str, name: str) -> str:
    """Where participant `name` keeps its state inside `data_dir`."""
    return os.path.join(data_dir, f"{name}.sqlite")


# ---- configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class Faults:
    """Injected misbehaviour; everything off by default.

    Decisions are a hash of (seed, knob, call kind, idempotency key, attempt), not a
    shared random stream, so that a given seed gives the same decisions whatever
    order concurrent calls arrive in, and a retry (a new attempt) gets a fresh draw."""

    refuse_rate: float = 0.0
    """Probability that a new Execute is refused (StepReply.ok = false)."""
    refuse_saga_substring: str = ""
    """Refuse every new Execute whose saga id contains this (empty: never)."""
    latency_ms: int = 0
    """Added to every call before it is handled."""
    hang_rate: float = 0.0
    """Probability that a call hangs (until hang_s, the caller gives up, or stop)."""
    hang_s: float = 60.0
    """How long a hanging call sleeps at most."""
    transport_error_rate: float = 0.0
    """Probability that a call is aborted with UNAVAILABLE before anything is done."""
    compensate_error_rate: float = 0.0
    """The same, for Compensate only: a compensation that keeps failing."""
    crash_after_calls: int = 0
    """os._exit(1) on receiving the N-th call of this process's life (0: never)."""
    fault_point: str = "received"
    """When the hang or crash happens: 'received' (nothing done) or 'after-effect'
    (the effect is durable, the answer is lost)."""
    seed: int | None = None
    """Makes the probabilistic knobs repeatable; None draws a random seed."""

    def validate(self) -> None:
        for flag, rate in [
            ("--refuse-rate", self.refuse_rate),
            ("--hang-rate", self.hang_rate),
            ("--transport-error-rate", self.transport_error_rate),
            ("--compensate-error-rate", self.compensate_error_rate),
        ]:
            if not 0.0 <= rate <= 1.0:  # also rejects NaN
                raise ValueError(f"{flag} must be a probability in [0, 1], got {rate}")
        if len(self.refuse_saga_substring) > MAX_SUBSTRING_LEN:
            raise ValueError(f"--refuse-saga-substring is longer than {MAX_SUBSTRING_LEN}")
        if not 0 <= self.latency_ms <= MAX_LATENCY_MS:
            raise ValueError(
                f"--latency-ms must be in [0, {MAX_LATENCY_MS}], got {self.latency_ms}"
            )
        if not 0.0 < self.hang_s <= MAX_HANG_S:
            raise ValueError(f"--hang-s must be in (0, {MAX_HANG_S:g}], got {self.hang_s}")
        if not 0 <= self.crash_after_calls <= MAX_CRASH_AFTER_CALLS:
            raise ValueError(
                f"--crash-after-calls must be in [0, {MAX_CRASH_AFTER_CALLS}] (0: never), "
                f"got {self.crash_after_calls}"
            )
        if self.fault_point not in FAULT_POINTS:
            raise ValueError(
                f"--fault-point must be one of {FAULT_POINTS}, got {self.fault_point!r}"
            )
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be in [0, 2**63), got {self.seed}")


@dataclass(frozen=True)
class ParticipantConfig:
    name: str
    """Service name, e.g. Hotel: names the database file and prefixes booking ids."""
    addr: str
    """HOST:PORT to listen on (port 0: any free port, for in-process tests)."""
    data_dir: str
    """Directory of <name>.sqlite. Created if absent."""
    faults: Faults = field(default_factory=Faults)
    workers: int = 32
    """gRPC server threads. A hanging call holds one until its caller gives up."""
    tls_cert: str | None = None
    """Serve with TLS: PEM certificate (and `tls_key`); plaintext without."""
    tls_key: str | None = None
    tls_ca: str | None = None
    """With `tls_require_client_cert`: the CA whose client certificates may call."""
    tls_require_client_cert: bool = False
    """Only callers with a client certificate signed by `tls_ca` (the nodes' own)."""

    def validate(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(
                f"--name {self.name!r}: start with a letter; then letters, digits, _ or -; "
                "at most 64"
            )
        match = _ADDR_RE.match(self.addr or "")
        if not match or int(match.group(1)) > 65535:
            raise ValueError(f"--addr {self.addr!r}: expected HOST:PORT")
        if not self.data_dir:
            raise ValueError("--data-dir is required")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("give --tls-cert and --tls-key together")
        if self.tls_require_client_cert and not (self.tls_cert and self.tls_ca):
            raise ValueError("--tls-require-client-cert needs --tls-cert, --tls-key, --tls-ca")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"--workers must be in [1, {MAX_WORKERS}], got {self.workers}")
        self.faults.validate()

    @property
    def db_path(self) -> str:
        return db_path_for(self.data_dir, self.name)


def parse_args(argv: list[str] | None = None) -> ParticipantConfig:
    """Flags -> a validated config. Raises ValueError with the offending flag named."""
    p = argparse.ArgumentParser(
        prog="saga-participant", description="A saga participant (booking service) over gRPC."
    )
    p.add_argument("--name", required=True, help="service name, e.g. Hotel")
    p.add_argument("--addr", required=True, help="HOST:PORT to listen on")
    p.add_argument("--data-dir", required=True, help="directory of NAME.sqlite")
    p.add_argument("--workers", type=int, default=32, help="gRPC server threads")
    p.add_argument("--tls-cert", help="serve with TLS: PEM certificate")
    p.add_argument("--tls-key", help="the certificate's PEM key")
    p.add_argument("--tls-ca", help="CA of the client certificates that may call")
    p.add_argument(
        "--tls-require-client-cert",
        action="store_true",
        help="only callers with a client certificate signed by --tls-ca (the nodes)",
    )
    f = p.add_argument_group("fault knobs (all off by default)")
    f.add_argument("--refuse-rate", type=float, default=0.0, metavar="P")
    f.add_argument("--refuse-saga-substring", default="", metavar="S")
    f.add_argument("--latency-ms", type=int, default=0, metavar="N")
    f.add_argument("--hang-rate", type=float, default=0.0, metavar="P")
    f.add_argument("--hang-s", type=float, default=60.0, metavar="S")
    f.add_argument("--transport-error-rate", type=float, default=0.0, metavar="P")
    f.add_argument("--compensate-error-rate", type=float, default=0.0, metavar="P")
    f.add_argument("--crash-after-calls", type=int, default=0, metavar="N")
    f.add_argument("--fault-point", default="received", metavar="|".join(FAULT_POINTS))
    f.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    config = ParticipantConfig(
        name=args.name,
        addr=args.addr,
        data_dir=args.data_dir,
        workers=args.workers,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        tls_require_client_cert=args.tls_require_client_cert,
        faults=Faults(
            refuse_rate=args.refuse_rate,
            refuse_saga_substring=args.refuse_saga_substring,
            latency_ms=args.latency_ms,
            hang_rate=args.hang_rate,
            hang_s=args.hang_s,
            transport_error_rate=args.transport_error_rate,
            compensate_error_rate=args.compensate_error_rate,
            crash_after_calls=args.crash_after_calls,
            fault_point=args.fault_point,
            seed=args.seed,
        ),
    )
    config.validate()
    return config


# ---- durable state --------------------------------------------------------------------


@dataclass(frozen=True)
class CallInfo:
    """One call as received: what the calls table records."""

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
    def of(kind: str, request: Any) -> CallInfo:
        request_key = request.request_key
        if kind == "execute":
            request_key = request.idempotency_key
        return CallInfo(
            kind=kind,
            saga_id=request.saga_id,
            vertex=request.vertex,
            action=request.action,
            idempotency_key=request.idempotency_key,
            request_key=request_key,
            attempt=request.attempt,
            epoch=request.epoch,
            sent_ms=request.sent_unix_ms,
        )


class Reply(NamedTuple):
    ok: bool
    output: bytes
    error: str


class BookingStore:
    """The participant's SQLite database. One connection behind a lock: each call's
    state transition and its calls row commit together in one `BEGIN IMMEDIATE`
    transaction, so a crash leaves either both or neither."""

    def __init__(self, db_path: str, service: str) -> None:
        self.db_path = db_path
        self.prefix = service.upper()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            db_path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"{db_path}: cannot use WAL (journal_mode={mode})")
        self._db.execute("PRAGMA synchronous=FULL")  # WAL + FULL: fsync on every commit
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(
                    f"{db_path}: schema version {version}, this code knows {SCHEMA_VERSION}"
                )
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def log_call(self, call: CallInfo, answer: str, reply: Reply | None = None) -> None:
        """A call that ended without a state transition (fault, invalid)."""
        with self._transaction() as db:
            self._insert_call(db, call, answer, reply)

    def execute(self, call: CallInfo, refusal: str | None, fault: str | None) -> Reply:
        """Decide the request once: a repeat gets the stored answer; a request whose
        compensation came first is refused; else refuse with `refusal` or book.
        `fault` (hang/crash after the effect) is only recorded as the answer."""
        key = call.request_key
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                "SELECT ok, output, error FROM bookings WHERE request_key = ?", (key,)
            ).fetchone()
            if row is not None:
                reply = Reply(bool(row[0]), bytes(row[1]), row[2])
            elif db.execute("SELECT 1 FROM tombstones WHERE request_key = ?", (key,)).fetchone():
                reply = Reply(False, b"", LATE_REQUEST_ERROR)
                self._insert_booking(db, call, REFUSED, reply, now)
                db.execute(
                    "UPDATE tombstones SET late_request_at = ? "
                    "WHERE request_key = ? AND late_request_at IS NULL",
                    (now, key),
                )
            elif refusal is not None:
                reply = Reply(False, b"", refusal)
                self._insert_booking(db, call, REFUSED, reply, now)
            else:
                booking_id = self._insert_booking(db, call, IN_EFFECT, Reply(True, b"", ""), now)
                reply = Reply(True, f"{self.prefix}-{booking_id:06d}".encode(), "")
                db.execute(
                    "UPDATE bookings SET output = ? WHERE id = ?", (reply.output, booking_id)
                )
            answer = fault or (ANSWER_OK if reply.ok else ANSWER_REFUSED)
            self._insert_call(db, call, answer, reply)
        return reply

    def compensate(self, call: CallInfo, fault: str | None) -> Reply:
        """Undo the request `call.request_key` once per compensation key: cancel its
        booking, or leave a tombstone if it has not arrived. Always ok."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                "SELECT outcome FROM compensations WHERE compensation_key = ?",
                (call.idempotency_key,),
            ).fetchone()
            if row is not None:
                outcome = row[0]
            else:
                outcome = self._undo(db, call, now)
                db.execute(
                    "INSERT INTO compensations (compensation_key, request_key, saga_id, vertex, "
                    "outcome, epoch, attempt, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        call.idempotency_key,
                        call.request_key,
                        call.saga_id,
                        call.vertex,
                        outcome,
                        call.epoch,
                        call.attempt,
                        now,
                    ),
                )
            reply = Reply(True, outcome.encode(), "")
            self._insert_call(db, call, fault or ANSWER_OK, reply)
        return reply

    @staticmethod
    def _undo(db: sqlite3.Connection, call: CallInfo, now: float) -> str:
        booking = db.execute(
            "SELECT status FROM bookings WHERE request_key = ?", (call.request_key,)
        ).fetchone()
        if booking is None:
            if db.execute(
                "SELECT 1 FROM tombstones WHERE request_key = ?", (call.request_key,)
            ).fetchone():
                return OUTCOME_ALREADY_TOMBSTONED
            db.execute(
                "INSERT INTO tombstones (request_key, saga_id, vertex, compensation_key, "
                "created_at) VALUES (?, ?, ?, ?, ?)",
                (call.request_key, call.saga_id, call.vertex, call.idempotency_key, now),
            )
            return OUTCOME_TOMBSTONED
        status = booking[0]
        if status == IN_EFFECT:
            db.execute(
                "UPDATE bookings SET status = ?, cancelled_at = ?, cancelled_by = ? "
                "WHERE request_key = ?",
                (CANCELLED, now, call.idempotency_key, call.request_key),
            )
            return OUTCOME_CANCELLED
        if status == CANCELLED:
            return OUTCOME_ALREADY_CANCELLED
        return OUTCOME_NOTHING_TO_UNDO

    @staticmethod
    def _insert_booking(
        db: sqlite3.Connection, call: CallInfo, status: str, reply: Reply, now: float
    ) -> int:
        cursor = db.execute(
            "INSERT INTO bookings (request_key, saga_id, vertex, action, status, ok, output, "
            "error, epoch, attempt, decided_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                call.request_key,
                call.saga_id,
                call.vertex,
                call.action,
                status,
                int(reply.ok),
                reply.output,
                reply.error,
                call.epoch,
                call.attempt,
                now,
            ),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    @staticmethod
    def _insert_call(
        db: sqlite3.Connection, call: CallInfo, answer: str, reply: Reply | None
    ) -> None:
        db.execute(
            "INSERT INTO calls (at, saga_id, vertex, kind, action, idempotency_key, request_key, "
            "attempt, epoch, answer, ok, output, error, sent_ms) "
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


# ---- read-only inspection ---------------------------------------------------------------


@dataclass(frozen=True)
class Booking:
    """What one request did here (refused requests included: they were decided)."""

    request_key: str
    saga_id: str
    vertex: str
    action: str
    status: str  # in_effect | cancelled | refused
    output: bytes
    error: str
    epoch: int
    attempt: int
    decided_at: float
    cancelled_at: float | None
    cancelled_by: str | None  # the compensation's idempotency key


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
class Call:
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
    answer: str  # ok | refused | unavailable | hang | crash | invalid
    ok: bool | None
    output: bytes
    error: str
    sent_ms: int  # when the coordinator sent it (0: unknown)


@dataclass
class ParticipantState:
    """A snapshot of one participant's database."""

    db_path: str
    bookings: dict[str, Booking] = field(default_factory=dict)  # by request key
    tombstones: dict[str, Tombstone] = field(default_factory=dict)  # by request key
    compensations: dict[str, Compensation] = field(default_factory=dict)  # by their own key
    calls: list[Call] = field(default_factory=list)  # in handling order

    def in_effect(self) -> list[Booking]:
        return [b for b in self.bookings.values() if b.status == IN_EFFECT]

    def calls_for(self, request_key: str) -> list[Call]:
        """Every Execute of this request and every Compensate that undid it."""
        return [c for c in self.calls if c.request_key == request_key]


def read_state(db_path: str) -> ParticipantState:
    """Read a participant's database without writing to it (safe while it runs: WAL
    lets this reader see the last committed state without blocking the writer)."""
    if not os.path.exists(db_path):
        raise FileNotFoundError(db_path)
    uri = f"file:{db_path}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=30.0)) as db:
        db.execute("BEGIN")  # one consistent snapshot across the four tables
        state = ParticipantState(db_path=db_path)
        for row in db.execute(
            "SELECT request_key, saga_id, vertex, action, status, output, error, epoch, "
            "attempt, decided_at, cancelled_at, cancelled_by FROM bookings ORDER BY id"
        ):
            state.bookings[row[0]] = Booking(*row)
        for row in db.execute(
            "SELECT request_key, saga_id, vertex, compensation_key, created_at, "
            "late_request_at FROM tombstones ORDER BY created_at"
        ):
            state.tombstones[row[0]] = Tombstone(*row)
        for row in db.execute(
            "SELECT compensation_key, request_key, saga_id, vertex, outcome, epoch, attempt, "
            "at FROM compensations ORDER BY at"
        ):
            state.compensations[row[0]] = Compensation(*row)
        for row in db.execute(
            "SELECT id, at, saga_id, vertex, kind, action, idempotency_key, request_key, "
            "attempt, epoch, answer, ok, output, error, sent_ms FROM calls ORDER BY id"
        ):
            values = list(row)
            values[11] = None if row[11] is None else bool(row[11])  # ok: stored as 0/1
            state.calls.append(Call(*values))
        db.execute("COMMIT")
    return state


# ---- the gRPC service --------------------------------------------------------------------


class FaultDecider:
    """Turns the fault knobs into per-call decisions (see `Faults`)."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.seed = faults.seed if faults.seed is not None else secrets.randbits(63)
        self._calls = 0
        self._lock = threading.Lock()

    def draw(self, knob: str, call: CallInfo, per_attempt: bool = True) -> float:
        """A number in [0, 1) fixed by the seed and the call's identity."""
        attempt = call.attempt if per_attempt else 0
        text = f"{self.seed}|{knob}|{call.kind}|{call.idempotency_key}|{attempt}"
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def count_call(self) -> bool:
        """Count a received call; True if it is the one to crash on."""
        with self._lock:
            self._calls += 1
            return self._calls == self.faults.crash_after_calls

    def transport_error(self, call: CallInfo) -> bool:
        rate = self.faults.transport_error_rate
        if call.kind == "compensate":
            rate = max(rate, self.faults.compensate_error_rate)
        return self.draw("transport", call) < rate

    def hang(self, call: CallInfo) -> bool:
        return self.draw("hang", call) < self.faults.hang_rate

    def refusal(self, service: str, call: CallInfo) -> str | None:
        """Why a new request is refused, or None. Per request, not per attempt: the
        first decision is stored and repeated anyway."""
        substring = self.faults.refuse_saga_substring
        if substring and substring in call.saga_id:
            return f"{service} refused {call.action}: saga {call.saga_id!r} contains {substring!r}"
        if self.draw("refuse", call, per_attempt=False) < self.faults.refuse_rate:
            return f"{service} refused {call.action}: no availability"
        return None


class ParticipantService(participant_pb2_grpc.ParticipantServicer):
    """Execute/Compensate over a BookingStore, with the fault knobs applied in this
    order: crash on receipt, latency, transport error, hang on receipt, the state
    transition, then a hang or crash after the effect."""

    def __init__(self, name: str, store: BookingStore, faults: Faults) -> None:
        self.name = name
        self.store = store
        self.faults = faults
        self.decider = FaultDecider(faults)
        self.stopping = threading.Event()

    def Execute(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._handle(CallInfo.of("execute", request), context)

    def Compensate(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._handle(CallInfo.of("compensate", request), context)

    def _handle(self, call: CallInfo, context: grpc.ServicerContext) -> Any:
        crash = self.decider.count_call()
        after_effect = self.faults.fault_point == "after-effect"
        if crash and not after_effect:
            self._crash(call, None)
        if self.faults.latency_ms:
            self.stopping.wait(self.faults.latency_ms / 1000)
        try:
            problem = _invalid(call)
            if problem:
                self.store.log_call(call, ANSWER_INVALID)
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
            if self.decider.transport_error(call):
                self.store.log_call(call, ANSWER_UNAVAILABLE)
                _abort(
                    context, grpc.StatusCode.UNAVAILABLE, f"{self.name}: injected transport error"
                )
            hang = self.decider.hang(call)
            if hang and not after_effect:
                self.store.log_call(call, ANSWER_HANG)
                self._hang(context)
            fault = ANSWER_CRASH if crash else ANSWER_HANG if hang else None
            if call.kind == "execute":
                refusal = self.decider.refusal(self.name, call)
                reply = self.store.execute(call, refusal, fault)
            else:
                reply = self.store.compensate(call, fault)
        except sqlite3.Error as exc:
            # The transaction rolled back (or its outcome is unknown): a transport
            # failure, so that the caller retries and the retry finds out.
            log.exception("storage error on %s %s", call.kind, call.idempotency_key)
            _abort(context, grpc.StatusCode.UNAVAILABLE, f"{self.name}: storage error: {exc}")
        if crash:
            self._crash(call, reply)
        if hang:
            self._hang(context)
        return participant_pb2.StepReply(ok=reply.ok, output=reply.output, error=reply.error)

    def _crash(self, call: CallInfo, reply: Reply | None) -> NoReturn:
        """Simulate a crash: the call is on record (with the effect, if after-effect),
        then the process dies without answering and without any clean-up."""
        if reply is None:
            try:
                self.store.log_call(call, ANSWER_CRASH)
            except sqlite3.Error:
                pass
        log.warning(
            "injected crash on call %d (%s %s)",
            self.faults.crash_after_calls,
            call.kind,
            call.idempotency_key,
        )
        logging.shutdown()
        os._exit(1)

    def _hang(self, context: grpc.ServicerContext) -> NoReturn:
        """Sleep until hang_s passes, the caller gives up (its deadline) or the server
        stops; then fail the call as a transport failure."""
        deadline = time.monotonic() + self.faults.hang_s
        while context.is_active() and not self.stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.stopping.wait(min(0.05, remaining))
        _abort(context, grpc.StatusCode.UNAVAILABLE, f"{self.name}: hung (injected)")


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """End the RPC with an error status (a transport failure to the caller)."""
    context.abort(code, details)
    raise AssertionError("unreachable: ServicerContext.abort raises")


def _invalid(call: CallInfo) -> str | None:
    if not call.idempotency_key:
        return "idempotency_key is required"
    if call.kind == "compensate" and not call.request_key:
        return "request_key (the request to undo) is required on Compensate"
    return None


class ParticipantServer:
    """A participant inside this process: the store, the service and a gRPC server.
    `main` runs one per process; tests may run one in-process on port 0."""

    def __init__(self, config: ParticipantConfig) -> None:
        config.validate()
        self.config = config
        os.makedirs(config.data_dir, exist_ok=True)
        self.store = BookingStore(config.db_path, config.name)
        self.service = ParticipantService(config.name, self.store, config.faults)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers),
            options=[
                ("grpc.so_reuseport", 0),  # a second participant on the port must fail
                # A request carries the saga's payload and its completed outputs:
                # up to 256 KiB + 64 x 64 KiB, above gRPC's 4 MiB default.
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                *PENDING_REQUEST_OPTIONS,
            ],
        )
        participant_pb2_grpc.add_ParticipantServicer_to_server(self.service, self.server)
        self.port = 0

    @property
    def address(self) -> str:
        host = self.config.addr.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def start(self) -> None:
        try:
            if self.config.tls_cert and self.config.tls_key:
                files = TlsFiles(
                    ca=self.config.tls_ca, cert=self.config.tls_cert, key=self.config.tls_key
                )
                credentials = files.server_credentials(self.config.tls_require_client_cert)
                port = self.server.add_secure_port(self.config.addr, credentials)
            else:
                port = self.server.add_insecure_port(self.config.addr)
        except RuntimeError as exc:  # recent grpcio raises instead of returning 0
            raise OSError(f"cannot listen on --addr {self.config.addr}: {exc}") from exc
        if port == 0:
            raise OSError(f"cannot listen on --addr {self.config.addr}")
        self.port = port
        self.server.start()

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop answering: hanging calls end at once, others get `grace_s` to finish."""
        self.service.stopping.set()
        self.server.stop(grace=grace_s).wait(grace_s + 1.0)
        self.store.close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        config = parse_args(argv)
    except ValueError as exc:
        print(f"saga-participant: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        server = ParticipantServer(config)
        server.start()
    except (OSError, sqlite3.Error) as exc:
        log.critical("participant %s cannot start: %s", config.name, exc)
        return EXIT_START_FAILED
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "participant %s: data %s, faults %s, seed %d",
        config.name,
        config.db_path,
        config.faults,
        server.service.decider.seed,
    )
    print(f"participant {config.name} listening on {server.address}", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop()
    log.info("participant %s stopped", config.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
