"""Participant calls for the driver, on one grpc.aio event loop.

The driver's thread decides; this module sends. Each call crosses to the loop in
one thread-safe hand-off and runs there as a task; its answer comes back through
the callback the driver gave (which must be thread-safe: it posts to the driver's
queue). The blocking API's `future()` costs, per call, a future, a callback thread
and, whenever a channel goes from idle to busy, a new channel-polling thread; with
thousands of calls out at once after a failover that was a large share of the
leader's CPU.

The node lends its gRPC server's loop (one loop per process: grpc.aio objects
belong to the loop that made them); without one, the transport runs a loop thread
of its own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import grpc
from saga.v1 import participant_pb2, participant_pb2_grpc

from coordinator import core
from coordinator.tracecontext import HEADER, call_traceparent
from sagalog import codec

log = logging.getLogger(__name__)

STEP_REQUEST_MAX_BYTES = (
    codec.MAX_PAYLOAD_BYTES + codec.MAX_VERTICES * codec.MAX_OUTPUT_BYTES + (1 << 20)
)
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # A request carries the payload and every completed vertex's output.
    ("grpc.max_send_message_length", STEP_REQUEST_MAX_BYTES),
]
CLOSE_TIMEOUT_S = 2.0


def unreachable(vertex: str, code: str) -> str:
    """What the log (and so a client's Get) says of a transport failure: which vertex,
    and gRPC's code; never the transport's text."""
    return f"{code}: participant {vertex!r} could not be reached"


AnswerFn = Callable[[core.Reply], None]


class ParticipantTransport(Protocol):
    """How the driver calls participants: `send` starts a call and returns at once;
    `answer` later gets the participant's reply or the transport failure (on any
    thread: the driver's answer only posts to its queue)."""

    def send(
        self,
        endpoint: str,
        request: participant_pb2.StepRequest,
        compensation: bool,
        timeout_s: float,
        answer: AnswerFn,
    ) -> None: ...

    def close(self) -> None: ...


def outcome_of(reply: core.Reply) -> str:
    """ok, refused (the participant said no) or unreachable (a transport failure)."""
    return "unreachable" if reply.ok is None else ("ok" if reply.ok else "refused")


CallObserver = Callable[[participant_pb2.StepRequest, bool, core.Reply, int, int], None]


class ObservedTransport:
    """A ParticipantTransport that tells `observe` of each call once it is answered:
    (request, compensation, reply, sent and answered, in ns since the epoch). For
    metrics and traces, at the edge; the driver knows nothing of them."""

    def __init__(self, inner: ParticipantTransport, observe: CallObserver) -> None:
        self._inner = inner
        self._observe = observe

    def send(
        self,
        endpoint: str,
        request: participant_pb2.StepRequest,
        compensation: bool,
        timeout_s: float,
        answer: AnswerFn,
    ) -> None:
        sent_ns = time.time_ns()

        def observed(reply: core.Reply) -> None:
            try:
                self._observe(request, compensation, reply, sent_ns, time.time_ns())
            except Exception:
                log.exception("observing a participant call failed")
            answer(reply)

        self._inner.send(endpoint, request, compensation, timeout_s, observed)

    def close(self) -> None:
        self._inner.close()


class ParticipantCalls:
    """The gRPC transport."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        credentials: grpc.ChannelCredentials | None = None,  # None: plaintext
    ) -> None:
        self._credentials = credentials
        self._own_loop = loop is None
        self._loop = loop if loop is not None else asyncio.new_event_loop()
        if self._own_loop:
            threading.Thread(
                target=self._loop.run_forever, name="participant-calls", daemon=True
            ).start()
        # Touched on the loop only.
        self._stubs: dict[str, participant_pb2_grpc.ParticipantStub] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def send(
        self,
        endpoint: str,
        request: participant_pb2.StepRequest,
        compensation: bool,
        timeout_s: float,
        answer: Callable[[core.Reply], None],
    ) -> None:
        """Start the call (from any thread); `answer` gets the participant's reply or
        the transport failure, on the loop's thread."""
        call = self._call(endpoint, request, compensation, timeout_s, answer)
        self._loop.call_soon_threadsafe(self._start, call)

    def close(self) -> None:
        """Close every channel (outstanding calls end CANCELLED); from any thread."""
        if not self._loop.is_running():
            return  # the node stopped its loop first: the channels went with it
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        done = asyncio.run_coroutine_threadsafe(self._close(), self._loop)
        if not on_loop:  # waiting there would block the loop that must do the work
            try:
                done.result(CLOSE_TIMEOUT_S)
            except Exception as exc:
                log.debug("participant channels not closed: %s", exc)
        if self._own_loop:
            self._loop.call_soon_threadsafe(self._loop.stop)

    # ---- on the loop -----------------------------------------------------------------

    def _start(self, call: Coroutine[Any, Any, None]) -> None:
        if self._closed:
            call.close()  # never started: nothing to await
            return
        task = self._loop.create_task(call)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(
        self,
        endpoint: str,
        request: participant_pb2.StepRequest,
        compensation: bool,
        timeout_s: float,
        answer: Callable[[core.Reply], None],
    ) -> None:
        vertex = request.vertex
        # The fields a JSON log line carries (cluster.logformat.SAGA_FIELDS).
        about = {
            "saga_id": request.saga_id,
            "vertex": vertex,
            "epoch": request.epoch,
            "attempt": request.attempt,
        }
        try:
            stub = self._stub(endpoint)
            method = stub.Compensate if compensation else stub.Execute
            # W3C trace context: the participant's span joins the saga's trace
            # (coordinator.tracecontext), whichever leader sent the call.
            parent = call_traceparent(
                request.saga_id, vertex, compensation, request.attempt, request.epoch
            )
            reply = await method(request, timeout=timeout_s, metadata=((HEADER, parent),))
            result = core.Reply(bool(reply.ok), reply.output, reply.error)
        except grpc.aio.AioRpcError as exc:
            # The transport's own text stays in this node's log: it can name hosts
            # and addresses inside the cluster's network.
            log.info(
                "saga %s: %s unreachable: %s", request.saga_id, vertex, exc.details(), extra=about
            )
            result = core.Reply(None, error=unreachable(vertex, exc.code().name))
        except Exception as exc:  # e.g. an endpoint gRPC cannot parse
            log.info("saga %s: cannot call %s: %s", request.saga_id, vertex, exc, extra=about)
            result = core.Reply(None, error=unreachable(vertex, "ERROR"))
        answer(result)

    def _stub(self, endpoint: str) -> participant_pb2_grpc.ParticipantStub:
        stub = self._stubs.get(endpoint)
        if stub is None:
            channel = (
                grpc.aio.secure_channel(endpoint, self._credentials, options=CHANNEL_OPTIONS)
                if self._credentials is not None
                else grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
            )
            self._channels.append(channel)
            stub = self._stubs[endpoint] = participant_pb2_grpc.ParticipantStub(channel)
        return stub

    async def _close(self) -> None:
        self._closed = True
        channels, self._channels, self._stubs = self._channels, [], {}
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
