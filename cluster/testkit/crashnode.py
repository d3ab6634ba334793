"""`sagalog-node` that dies at a crash point: the fault tests' node program.

`SAGA_CRASH_POINT` (in the environment of a node's first lifetime) names where its
coordinator dies, as by SIGKILL, the first time it gets there:

* `before_request`: a StartT is committed; the request is not sent;
* `before_end_t`: a request's ok reply arrived; its EndT is not proposed;
* `mid_compensation`: a StartC is committed; the compensation is not sent.

The points are kept here, around the driver's participant transport, so production
code carries no testing hook. Without the variable this is `sagalog-node` itself.
"""

from __future__ import annotations

import logging
import os
import sys

from saga.v1 import participant_pb2

from cluster.runtime import node
from coordinator import core
from coordinator.calls import AnswerFn, ParticipantTransport

CRASH_POINTS = ("before_request", "before_end_t", "mid_compensation")
PROGRAM = ("-m", "cluster.testkit.crashnode")  # for LocalCluster.program

log = logging.getLogger(__name__)


def crash(point: str) -> None:
    log.critical("crash point %s reached: exiting as if killed", point)
    logging.shutdown()
    os._exit(137)


class CrashingCalls:
    """A participant transport that dies at `point`."""

    def __init__(self, inner: ParticipantTransport, point: str) -> None:
        if point not in CRASH_POINTS:
            raise ValueError(f"SAGA_CRASH_POINT must be one of {CRASH_POINTS}, got {point!r}")
        self._inner = inner
        self._point = point

    def send(
        self,
        endpoint: str,
        request: participant_pb2.StepRequest,
        compensation: bool,
        timeout_s: float,
        answer: AnswerFn,
    ) -> None:
        if self._point == ("mid_compensation" if compensation else "before_request"):
            crash(self._point)
        if self._point == "before_end_t" and not compensation:
            answer = self._dying_on_ok(answer)
        self._inner.send(endpoint, request, compensation, timeout_s, answer)

    @staticmethod
    def _dying_on_ok(answer: AnswerFn) -> AnswerFn:
        def on_reply(reply: core.Reply) -> None:
            if reply.ok:  # before the driver hears of it: its EndT is never proposed
                crash("before_end_t")
            answer(reply)

        return on_reply

    def close(self) -> None:
        self._inner.close()


def main() -> int:
    point = os.environ.get("SAGA_CRASH_POINT", "")
    if not point:
        return node.main(sys.argv[1:])
    if point not in CRASH_POINTS:
        print(f"crashnode: SAGA_CRASH_POINT must be one of {CRASH_POINTS}", file=sys.stderr)
        return node.EXIT_USAGE
    return node.main(sys.argv[1:], wrap_participants=lambda calls: CrashingCalls(calls, point))


if __name__ == "__main__":
    sys.exit(main())
