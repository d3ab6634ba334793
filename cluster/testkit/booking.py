"""`saga-participant`: the travel booking service (hotel, car, flight, payment), built
on the participant SDK, with fault knobs.

The SDK (`cluster.participant`) makes it idempotent, tombstones early compensations
and refuses stale epochs; this module adds only what a booking is, and misbehaviour
on demand, so that the coordinator's failure paths can be tested against a real,
separate process rather than a mock:

* A booking is a row in its own `bookings` table, written through `step.db`. The
  table deliberately has no unique key on the request: if a request ever took effect
  twice, the checker would see two rows.
* Every call received is recorded (the SDK's `saga_calls`, with its epoch and
  attempt), so a checker can verify from the database alone that epochs never went
  backwards.
* Fault knobs (refusals, latency, hangs, transport errors, crashes) are repeatable
  with `--seed`.

Run: `saga-participant --name Hotel --addr 127.0.0.1:PORT --data-dir DIR`.
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
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from cluster.participant import Call, Participant, Refused, Step
from cluster.participant.ledger import (
    EXECUTE,
    IN_EFFECT,
    LedgerState,
    read_ledger_from,
    read_only,
)
from cluster.participant.sdk import ParticipantServicer, RunningServer
from cluster.tls import TlsFiles
from cluster.tracing import TracingUnavailable, export_to, shut_down

log = logging.getLogger("saga.participant")

EXIT_USAGE = 2
EXIT_START_FAILED = 1

CANCELLED = "cancelled"  # a booking's status once compensated

# What a fault answered (`saga_calls.answer`, beside the SDK's own answers).
ANSWER_UNAVAILABLE = "unavailable"  # injected transport error
ANSWER_HANG = "hang"  # injected hang: the caller's deadline answers for us
ANSWER_CRASH = "crash"  # injected crash: the process exited before answering

# Where an injected hang or crash happens: before anything is done, or after the
# effect is durable but before the answer is sent (the reply is lost).
FAULT_POINTS = ("received", "after-effect")

BOOKINGS_SCHEMA = """
CREATE TABLE IF NOT EXISTS bookings (
    id           INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: numbers the booking ids
    request_key  TEXT NOT NULL,                     -- not UNIQUE: a double booking must show
    saga_id      TEXT NOT NULL,
    vertex       TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('in_effect', 'cancelled')),
    booked_at    REAL NOT NULL,
    cancelled_at REAL
);
CREATE INDEX IF NOT EXISTS bookings_by_request ON bookings (request_key);
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
class BookingConfig:
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
    otlp_endpoint: str | None = None
    """HOST:PORT of an OpenTelemetry collector: each call's span, continuing the
    saga's trace (needs the otel extra)."""

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


def parse_args(argv: list[str] | None = None) -> BookingConfig:
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
    p.add_argument("--otlp-endpoint", metavar="HOST:PORT", help="export traces (the otel extra)")
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
    config = BookingConfig(
        name=args.name,
        addr=args.addr,
        data_dir=args.data_dir,
        workers=args.workers,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        tls_require_client_cert=args.tls_require_client_cert,
        otlp_endpoint=args.otlp_endpoint,
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


# ---- fault decisions ------------------------------------------------------------------------


class FaultDecider:
    """Turns the fault knobs into per-call decisions (see `Faults`)."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.seed = faults.seed if faults.seed is not None else secrets.randbits(63)
        self._calls = 0
        self._lock = threading.Lock()

    def draw(self, knob: str, kind: str, key: str, attempt: int = 0) -> float:
        """A number in [0, 1) fixed by the seed and the call's identity."""
        text = f"{self.seed}|{knob}|{kind}|{key}|{attempt}"
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def count_call(self) -> bool:
        """Count a received call; True if it is the one to crash on."""
        with self._lock:
            self._calls += 1
            return self._calls == self.faults.crash_after_calls

    def transport_error(self, call: Call) -> bool:
        rate = self.faults.transport_error_rate
        if call.kind == "compensate":
            rate = max(rate, self.faults.compensate_error_rate)
        return self.draw("transport", call.kind, call.idempotency_key, call.attempt) < rate

    def hang(self, call: Call) -> bool:
        return (
            self.draw("hang", call.kind, call.idempotency_key, call.attempt) < self.faults.hang_rate
        )

    def refusal(self, service: str, step: Step) -> str | None:
        """Why a new request is refused, or None. Per request, not per attempt: the
        first decision is stored and repeated anyway."""
        substring = self.faults.refuse_saga_substring
        if substring and substring in step.saga_id:
            return f"{service} refused {step.action}: saga {step.saga_id!r} contains {substring!r}"
        if self.draw("refuse", EXECUTE, step.idempotency_key) < self.faults.refuse_rate:
            return f"{service} refused {step.action}: no availability"
        return None


# ---- the booking service ----------------------------------------------------------------


def booking_participant(name: str, db_path: str, decider: FaultDecider) -> Participant:
    """A Participant that books any request action (a row in `bookings`, answered with
    a booking id such as HOTEL-000042) and cancels it on any compensation action."""
    participant = Participant(name, db_path, schema=BOOKINGS_SCHEMA, record_calls=True)
    prefix = name.upper()

    @participant.request()
    def book(step: Step) -> bytes:
        refusal = decider.refusal(name, step)
        if refusal is not None:
            raise Refused(refusal)
        cursor = step.db.execute(
            "INSERT INTO bookings (request_key, saga_id, vertex, status, booked_at) "
            "VALUES (?, ?, ?, 'in_effect', ?)",
            (step.request_key, step.saga_id, step.vertex, time.time()),
        )
        return f"{prefix}-{cursor.lastrowid:06d}".encode()

    @participant.compensation()
    def cancel(step: Step, booked: bytes | None) -> None:
        if booked is None:
            return  # never booked here: the SDK leaves the tombstone
        step.db.execute(
            "UPDATE bookings SET status = 'cancelled', cancelled_at = ? "
            "WHERE request_key = ? AND status = 'in_effect'",
            (time.time(), step.request_key),
        )

    return participant


class FaultyServicer(ParticipantServicer):
    """The SDK's servicer with the fault knobs applied in this order: crash on
    receipt, latency, transport error, hang on receipt, the call itself, then a hang
    or crash after the effect (the reply is lost)."""

    def __init__(self, participant: Participant, decider: FaultDecider) -> None:
        super().__init__(participant)
        self.decider = decider
        self.faults = decider.faults
        self.stopping = threading.Event()

    def serve_call(self, kind: str, request: Any, context: grpc.ServicerContext) -> Any:
        call = Call.of(kind, request)
        crash = self.decider.count_call()
        after_effect = self.faults.fault_point == "after-effect"
        if crash and not after_effect:
            self._crash(call)
        if self.faults.latency_ms:
            self.stopping.wait(self.faults.latency_ms / 1000)
        if self.decider.transport_error(call):
            self._record(call, ANSWER_UNAVAILABLE)
            context.abort(
                grpc.StatusCode.UNAVAILABLE, f"{self.participant.name}: injected transport error"
            )
        hang = self.decider.hang(call)
        if hang and not after_effect:
            self._record(call, ANSWER_HANG)
            self._hang(context)
        reply = super().serve_call(kind, request, context)
        if crash:
            self._crash(call)
        if hang:
            self._record(call, ANSWER_HANG)
            self._hang(context)
        return reply

    def _record(self, call: Call, answer: str) -> None:
        try:
            self.participant.record_call(call, answer)
        except sqlite3.Error as exc:
            log.warning("cannot record the %s of %s: %s", answer, call.idempotency_key, exc)

    def _crash(self, call: Call) -> NoReturn:
        """Simulate a crash: the call is on record, then the process dies without
        answering and without any clean-up."""
        self._record(call, ANSWER_CRASH)
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
        context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.participant.name}: hung (injected)")
        raise AssertionError("unreachable: ServicerContext.abort raises")


class BookingServer:
    """A booking participant inside this process: `main` runs one per process; tests
    may run one in-process on port 0."""

    def __init__(self, config: BookingConfig) -> None:
        config.validate()
        self.config = config
        os.makedirs(config.data_dir, exist_ok=True)
        self.decider = FaultDecider(config.faults)
        self.participant = booking_participant(config.name, config.db_path, self.decider)
        self.servicer = FaultyServicer(self.participant, self.decider)
        self.running: RunningServer | None = None

    @property
    def address(self) -> str:
        assert self.running is not None, "not started"
        return self.running.address

    def start(self) -> None:
        tls = None
        if self.config.tls_cert and self.config.tls_key:
            tls = TlsFiles(
                ca=self.config.tls_ca, cert=self.config.tls_cert, key=self.config.tls_key
            )
        try:
            self.running = self.participant.start(
                self.config.addr,
                tls=tls,
                require_client_cert=self.config.tls_require_client_cert,
                workers=self.config.workers,
                servicer=self.servicer,
            )
        except OSError as exc:
            raise OSError(f"--addr: {exc}") from exc

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop answering: hanging calls end at once, others get `grace_s` to finish."""
        self.servicer.stopping.set()
        if self.running is not None:
            self.running.stop(grace_s)
        else:
            self.participant.close()


# ---- read-only inspection ---------------------------------------------------------------


@dataclass(frozen=True)
class Booking:
    """One row of the service's `bookings` table: an effect."""

    id: int
    request_key: str
    saga_id: str
    vertex: str
    status: str  # in_effect | cancelled
    booked_at: float
    cancelled_at: float | None


@dataclass
class ParticipantState:
    """A snapshot of one booking participant: its ledger (what each request and
    compensation was answered) and its bookings (what took effect)."""

    db_path: str
    ledger: LedgerState
    bookings: list[Booking] = field(default_factory=list)  # in booking order

    @property
    def requests(self) -> dict[str, Any]:
        return self.ledger.requests

    @property
    def tombstones(self) -> dict[str, Any]:
        return self.ledger.tombstones

    @property
    def compensations(self) -> dict[str, Any]:
        return self.ledger.compensations

    @property
    def calls(self) -> list[Any]:
        return self.ledger.calls

    def calls_for(self, request_key: str) -> list[Any]:
        return self.ledger.calls_for(request_key)

    def in_effect(self) -> list[Booking]:
        return [b for b in self.bookings if b.status == IN_EFFECT]

    def bookings_for(self, request_key: str) -> list[Booking]:
        return [b for b in self.bookings if b.request_key == request_key]


def read_state(db_path: str) -> ParticipantState:
    """Read a booking participant's database without writing to it (one snapshot)."""
    with read_only(db_path) as db:
        ledger = read_ledger_from(db, db_path)
        rows = db.execute(
            "SELECT id, request_key, saga_id, vertex, status, booked_at, cancelled_at "
            "FROM bookings ORDER BY id"
        ).fetchall()
    return ParticipantState(db_path, ledger, [Booking(*row) for row in rows])


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
        tracer = (
            export_to(config.otlp_endpoint, config.name, config.name)[0]
            if (config.otlp_endpoint)
            else None
        )
        server = BookingServer(config)
        server.start()
    except TracingUnavailable as exc:
        log.critical("participant %s: %s", config.name, exc)
        return EXIT_USAGE
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
        server.decider.seed,
    )
    print(f"participant {config.name} listening on {server.address}", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop()
    if tracer is not None:
        shut_down(tracer)  # exports what is queued
    log.info("participant %s stopped", config.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
