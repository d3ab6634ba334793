"""An in-memory participant transport, for tests: calls go to functions in this
process instead of over gRPC.

Each endpoint maps to a handler `(compensation, request) -> Reply | None`; None
holds the call unanswered (a participant that hangs) until `release` answers it. An
endpoint without a handler fails the call as gRPC would (UNAVAILABLE). Answers are
given on the caller's thread, at once: the driver only posts them to its queue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from saga.v1 import participant_pb2

from coordinator import core
from coordinator.calls import AnswerFn, unreachable

Handler = Callable[[bool, participant_pb2.StepRequest], "core.Reply | None"]


@dataclass
class SentCall:
    endpoint: str
    request: participant_pb2.StepRequest
    compensation: bool
    timeout_s: float
    answer: AnswerFn


class InMemoryCalls:
    def __init__(self, handlers: dict[str, Handler] | None = None) -> None:
        self.handlers = dict(handlers or {})
        self.sent: list[SentCall] = []
        self.held: list[SentCall] = []  # calls a handler left unanswered
        self.closed = False

    def send(
        self,
        endpoint: str,
        request: participant_pb2.StepRequest,
        compensation: bool,
        timeout_s: float,
        answer: AnswerFn,
    ) -> None:
        call = SentCall(endpoint, request, compensation, timeout_s, answer)
        self.sent.append(call)
        if self.closed:
            answer(core.Reply(None, error=unreachable(request.vertex, "CANCELLED")))
            return
        handler = self.handlers.get(endpoint)
        if handler is None:
            answer(core.Reply(None, error=unreachable(request.vertex, "UNAVAILABLE")))
            return
        reply = handler(compensation, request)
        if reply is None:
            self.held.append(call)
        else:
            answer(reply)

    def release(self, reply: core.Reply | None = None) -> int:
        """Answer every held call (default: as a deadline would); how many."""
        held, self.held = self.held, []
        for call in held:
            call.answer(
                reply
                or core.Reply(None, error=unreachable(call.request.vertex, "DEADLINE_EXCEEDED"))
            )
        return len(held)

    def close(self) -> None:
        self.closed = True
        self.release(core.Reply(None, error="closed"))
