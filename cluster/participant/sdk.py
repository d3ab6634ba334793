"""`Participant`: handlers for a saga's requests and compensations, served over gRPC.

A handler only says what its action does; the `Ledger` decides whether it runs at
all (see `ledger.py` for the rules), and the handler's writes through `step.db`
commit in the ledger's transaction. Handlers run one at a time per participant:
SQLite has one writer, and a handler's writes and its ledger entry must be one
transaction.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import sqlite3
import threading
import weakref
from collections.abc import Awaitable, Callable, Generator, Mapping
from concurrent import futures
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from saga.v1 import participant_pb2, participant_pb2_grpc

from cluster.grpcutil import PENDING_REQUEST_OPTIONS
from cluster.participant.ledger import (
    ANSWER_ERROR,
    ANSWER_INVALID,
    ANSWER_STALE_EPOCH,
    COMPENSATE,
    EXECUTE,
    Call,
    HandlerResult,
    Ledger,
    Outcome,
    Plan,
    Reply,
)
from cluster.tls import TlsFiles
from cluster.tracing import continued_span

log = logging.getLogger("saga.participant")

MAX_OUTPUT_BYTES = 64 * 1024  # the Saga Log's bound on a vertex's output (sagalog.codec)
# A request carries the saga's payload and its completed outputs: up to
# 256 KiB + 64 x 64 KiB, above gRPC's 4 MiB default.
MAX_REQUEST_BYTES = 16 * 1024 * 1024
DEFAULT_WORKERS = 32

# Outcomes without a StepReply, as gRPC statuses: the coordinator retries every one.
STATUS_OF_ANSWER = {
    ANSWER_INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ANSWER_STALE_EPOCH: grpc.StatusCode.FAILED_PRECONDITION,
    ANSWER_ERROR: grpc.StatusCode.INTERNAL,
}


class Refused(Exception):
    """Raised by a request handler for a business failure ("no rooms"): the request is
    answered ok=false, the saga aborts, and nothing the handler wrote is kept."""


class StepDB:
    """The handler's view of the open transaction: it may read and write, not end it
    (a commit would keep the handler's writes without the ledger's entry)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any) -> sqlite3.Cursor:
        return self._db.executemany(sql, parameters)


@dataclass(frozen=True)
class Step:
    """One request or compensation, as a handler sees it."""

    saga_id: str
    vertex: str
    action: str
    payload: bytes  # the saga's payload, as submitted
    idempotency_key: str  # the same for every attempt of this request (or compensation)
    request_key: str  # the request's key (on a compensation: the request undone)
    attempt: int
    epoch: int
    outputs: Mapping[str, bytes]  # outputs of the saga's completed vertices, by vertex
    db: StepDB  # writes here commit with the ledger's entry, or not at all


RequestHandler = Callable[[Step], "bytes | None | Awaitable[bytes | None]"]
CompensationHandler = Callable[[Step, "bytes | None"], "None | Awaitable[None]"]


class Participant:
    """A saga participant: register handlers, then `serve` (or `start`, or add it to a
    server of your own). `schema` is SQL run once at start-up for the handlers' own
    tables (use CREATE ... IF NOT EXISTS). `record_calls` keeps a row per call
    received in `saga_calls` (an audit trail; it grows with every call)."""

    def __init__(
        self, name: str, db_path: str, *, schema: str = "", record_calls: bool = False
    ) -> None:
        self.name = name
        self.ledger = Ledger(db_path, schema)
        self.record_calls = record_calls
        self._requests: dict[str | None, RequestHandler] = {}
        self._compensations: dict[str | None, CompensationHandler] = {}
        # One turn per event loop. Serving one participant from several loops at once
        # works, but a loop then waits on the ledger's lock while another holds it.
        self._async_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    # ---- registration ------------------------------------------------------------------

    def request(self, action: str | None = None) -> Callable[[RequestHandler], RequestHandler]:
        """Register the handler of request `action` (None: of every action not named).
        It returns the output (bytes, at most 64 KiB; None for none) or raises
        Refused; any other exception is a failure that the coordinator retries."""

        def register(handler: RequestHandler) -> RequestHandler:
            self._requests[action] = handler
            return handler

        return register

    def compensation(
        self, action: str | None = None
    ) -> Callable[[CompensationHandler], CompensationHandler]:
        """Register the handler of compensation `action` (None: of every one not
        named). It gets the request's output, or None if the request never took
        effect here; it must not refuse: an exception is retried until it succeeds."""

        def register(handler: CompensationHandler) -> CompensationHandler:
            self._compensations[action] = handler
            return handler

        return register

    # ---- handling ----------------------------------------------------------------------

    def handle(self, kind: str, request: Any) -> Outcome:
        """Handle one `saga.v1.StepRequest` (kind: execute | compensate), blocking."""
        call, invalid = self._admit(kind, request)
        if invalid is not None:
            return invalid
        try:
            flow = self._flow(call, request)
            try:
                awaitable = flow.send(None)
                close = getattr(awaitable, "close", None)
                if close is not None:
                    close()  # a coroutine made by an async handler, never to be awaited
                flow.throw(TypeError("an async handler needs serve_async"))
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            finally:
                flow.close()  # on any escape: roll back and let go of the ledger
            raise AssertionError("the flow yields at most once")
        except sqlite3.Error as exc:
            return self._storage_error(call, exc)

    async def handle_async(self, kind: str, request: Any) -> Outcome:
        """`handle` on an event loop: an async handler is awaited inside the ledger's
        transaction, so calls take turns on the loop."""
        loop = asyncio.get_running_loop()
        turn = self._async_turns.get(loop)
        if turn is None:  # an asyncio lock belongs to one loop
            turn = self._async_turns[loop] = asyncio.Lock()
        # Everything that takes the ledger's lock happens in this turn: a coroutine
        # of this loop that holds it across an await never blocks the loop's thread.
        async with turn:
            call, invalid = self._admit(kind, request)
            if invalid is not None:
                return invalid
            try:
                flow = self._flow(call, request)
                try:
                    awaitable = flow.send(None)
                    try:
                        value = await awaitable
                    except Exception as exc:
                        flow.throw(exc)
                    else:
                        flow.send(value)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                finally:
                    # On any escape (a cancelled call, a crash): roll back and let go
                    # of the ledger now, not when the generator is collected.
                    flow.close()
                raise AssertionError("the flow yields at most once")
            except sqlite3.Error as exc:
                return self._storage_error(call, exc)

    def _flow(self, call: Call, request: Any) -> Generator[Any, Any, Outcome]:
        """One call in the ledger's transaction. Yields the awaitable an async handler
        returned, at most once, and takes its value (or its exception) back: the
        sync and async drivers above share every decision."""
        with self.ledger.transaction() as db:
            plan = self.ledger.plan(db, call)
            outcome = plan.outcome
            if outcome is None:
                handler, args = self._handler_call(call, request, db, plan)
                db.execute("SAVEPOINT step")
                try:
                    value = handler(*args)
                    if inspect.isawaitable(value):
                        value = yield value
                except Exception as exc:
                    result = self._failed(db, call, exc)
                else:
                    result = self._returned(db, call, value)
                outcome = self.ledger.settle(db, call, plan, result)
            self._log(db, call, outcome)
        return outcome

    def record_call(self, call: Call, answer: str, reply: Reply | None = None) -> None:
        """Record a call answered without the ledger (a fault-injecting wrapper's hang
        or crash), if this participant records calls."""
        if self.record_calls:
            with self.ledger.transaction() as db:
                Ledger.log_call(db, call, answer, reply)

    def close(self) -> None:
        self.ledger.close()

    def _admit(self, kind: str, request: Any) -> tuple[Call, Outcome | None]:
        call = Call.of(kind, request)
        problem = call.problem()
        if problem is None:
            return call, None
        outcome = Outcome(ANSWER_INVALID, None, problem)
        try:
            self.record_call(call, ANSWER_INVALID)
        except sqlite3.Error as exc:
            log.warning("cannot record an invalid call: %s", exc)
        return call, outcome

    def _handler_call(
        self, call: Call, request: Any, db: sqlite3.Connection, plan: Plan
    ) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        step = Step(
            saga_id=call.saga_id,
            vertex=call.vertex,
            action=call.action,
            payload=request.payload,
            idempotency_key=call.idempotency_key,
            request_key=call.request_key,
            attempt=call.attempt,
            epoch=call.epoch,
            outputs=dict(request.outputs),
            db=StepDB(db),
        )
        if call.kind == EXECUTE:
            handler = self._requests.get(call.action) or self._requests.get(None)
            return (handler or self._no_request_handler), (step,)
        compensate = self._compensations.get(call.action) or self._compensations.get(None)
        return (compensate or self._no_compensation_handler), (step, plan.booked)

    def _no_request_handler(self, step: Step) -> NoReturn:
        # Nothing was done, so refusing is safe: the saga aborts. The refusal is
        # stored, so a retry after a redeploy is answered the same.
        raise Refused(f"{self.name} has no handler for request {step.action!r}")

    def _no_compensation_handler(self, step: Step, booked: bytes | None) -> NoReturn:
        # Never refused: the coordinator retries until a handler is deployed.
        raise LookupError(f"{self.name} has no handler for compensation {step.action!r}")

    @staticmethod
    def _returned(db: sqlite3.Connection, call: Call, value: Any) -> HandlerResult:
        if not db.in_transaction:
            # Its writes are committed without the ledger's entry: a retry would run
            # it again. Loud, because nothing here can undo that.
            log.critical("the %s handler of %r ended the transaction", call.kind, call.action)
            return HandlerResult(failure="the handler ended the ledger's transaction")
        if call.kind != EXECUTE:  # a compensation's return value means nothing
            db.execute("RELEASE step")
            return HandlerResult()
        output = b"" if value is None else value
        if not isinstance(output, bytes):
            db.execute("ROLLBACK TO step")
            return HandlerResult(failure=f"the handler returned {type(value).__name__}, not bytes")
        if len(output) > MAX_OUTPUT_BYTES:
            db.execute("ROLLBACK TO step")
            return HandlerResult(
                failure=f"the output is {len(output)} bytes; the limit is {MAX_OUTPUT_BYTES}"
            )
        db.execute("RELEASE step")
        return HandlerResult(output=output)

    @staticmethod
    def _failed(db: sqlite3.Connection, call: Call, exc: Exception) -> HandlerResult:
        if db.in_transaction:
            db.execute("ROLLBACK TO step")  # nothing the handler wrote is kept
            db.execute("RELEASE step")
        if isinstance(exc, Refused):
            return HandlerResult(refusal=str(exc) or "refused")
        log.warning(
            "%s %s of saga %s failed: %r", call.kind, call.action, call.saga_id, exc, exc_info=exc
        )
        return HandlerResult(failure=f"{type(exc).__name__}: {exc}")

    def _log(self, db: sqlite3.Connection, call: Call, outcome: Outcome) -> None:
        if self.record_calls:
            Ledger.log_call(db, call, outcome.answer, outcome.reply)

    def _storage_error(self, call: Call, exc: sqlite3.Error) -> Outcome:
        # The transaction rolled back (or its outcome is unknown): a transport
        # failure, so that the coordinator retries and the retry finds out.
        log.error("storage error on %s %s: %s", call.kind, call.idempotency_key, exc)
        return Outcome(ANSWER_ERROR, None, f"{self.name}: storage error: {exc}")

    # ---- serving -----------------------------------------------------------------------

    def servicer(self) -> ParticipantServicer:
        return ParticipantServicer(self)

    def add_to_server(self, server: grpc.Server) -> None:
        participant_pb2_grpc.add_ParticipantServicer_to_server(self.servicer(), server)

    def add_to_aio_server(self, server: grpc.aio.Server) -> None:
        participant_pb2_grpc.add_ParticipantServicer_to_server(
            AsyncParticipantServicer(self), server
        )

    def start(
        self,
        addr: str,
        *,
        tls: TlsFiles | None = None,
        require_client_cert: bool = False,
        workers: int = DEFAULT_WORKERS,
        servicer: ParticipantServicer | None = None,
    ) -> RunningServer:
        """Listen on `addr` (port 0: any free port) and return at once."""
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers), options=server_options()
        )
        participant_pb2_grpc.add_ParticipantServicer_to_server(servicer or self.servicer(), server)
        port = _listen(server, addr, tls, require_client_cert)
        server.start()
        return RunningServer(self, server, f"{addr.rsplit(':', 1)[0]}:{port}")

    def serve(self, addr: str, **options: Any) -> None:
        """`start`, then block until SIGTERM or SIGINT (in the main thread) or until
        the process ends; then stop."""
        running = self.start(addr, **options)
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: stop.set())
        log.info("participant %s listening on %s", self.name, running.address)
        while not stop.wait(0.5):
            pass
        running.stop()

    async def serve_async(
        self, addr: str, *, tls: TlsFiles | None = None, require_client_cert: bool = False
    ) -> None:
        """Serve on the running event loop until cancelled (async handlers)."""
        server = grpc.aio.server(options=server_options())
        self.add_to_aio_server(server)
        port = _listen(server, addr, tls, require_client_cert)
        await server.start()
        log.info("participant %s listening on %s", self.name, f"{addr.rsplit(':', 1)[0]}:{port}")
        try:
            await server.wait_for_termination()
        finally:
            await server.stop(1.0)


class RunningServer:
    """A started participant server: its address, and how to stop it."""

    def __init__(self, participant: Participant, server: grpc.Server, address: str) -> None:
        self.participant = participant
        self.server = server
        self.address = address

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self, grace_s: float = 1.0) -> None:
        self.server.stop(grace=grace_s).wait(grace_s + 1.0)
        self.participant.close()


def _span_of(participant: Participant, kind: str, request: Any) -> tuple[str, dict[str, Any]]:
    """The name and attributes of a call's span (cluster.tracing.continued_span)."""
    attributes = {
        "saga.id": request.saga_id,
        "saga.vertex": request.vertex,
        "saga.action": request.action,
        "saga.attempt": request.attempt,
        "saga.epoch": request.epoch,
        "saga.participant": participant.name,
    }
    return f"{participant.name} {kind} {request.action}", attributes


class ParticipantServicer(participant_pb2_grpc.ParticipantServicer):
    """`saga.v1.Participant` over a Participant. Wrappers (fault injection) override
    `serve_call`."""

    def __init__(self, participant: Participant) -> None:
        self.participant = participant

    def Execute(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.serve_call(EXECUTE, request, context)

    def Compensate(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.serve_call(COMPENSATE, request, context)

    def serve_call(self, kind: str, request: Any, context: grpc.ServicerContext) -> Any:
        with continued_span(
            context.invocation_metadata(), *_span_of(self.participant, kind, request)
        ):
            outcome = self.participant.handle(kind, request)
        if outcome.reply is None:
            context.abort(STATUS_OF_ANSWER[outcome.answer], outcome.detail)
        return step_reply(outcome.reply)


class AsyncParticipantServicer(participant_pb2_grpc.ParticipantServicer):
    def __init__(self, participant: Participant) -> None:
        self.participant = participant

    async def Execute(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._serve(EXECUTE, request, context)

    async def Compensate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._serve(COMPENSATE, request, context)

    async def _serve(self, kind: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        with continued_span(
            context.invocation_metadata(), *_span_of(self.participant, kind, request)
        ):
            outcome = await self.participant.handle_async(kind, request)
        if outcome.reply is None:
            await context.abort(STATUS_OF_ANSWER[outcome.answer], outcome.detail)
        return step_reply(outcome.reply)


def step_reply(reply: Reply | None) -> Any:
    assert reply is not None
    return participant_pb2.StepReply(ok=reply.ok, output=reply.output, error=reply.error)


def server_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.so_reuseport", 0),  # a second participant on the port must fail
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        *PENDING_REQUEST_OPTIONS,
    ]


def _listen(server: Any, addr: str, tls: TlsFiles | None, require_client_cert: bool) -> int:
    try:
        if tls is not None:
            port = server.add_secure_port(addr, tls.server_credentials(require_client_cert))
        else:
            port = server.add_insecure_port(addr)
    except RuntimeError as exc:  # recent grpcio raises instead of returning 0
        raise OSError(f"cannot listen on {addr}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot listen on {addr}")
    return int(port)
