"""Proposing record batches through Raft, with a deadline and a bound on in-flight calls.

pysyncobj drops some callbacks (a write forwarded to a dead leader) and its queue
can wedge a node under overload, so every proposal here has its own deadline and
the number in flight is capped before pysyncobj's queue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from pysyncobj import FAIL_REASON
from saga.v1 import log_pb2

from sagalog.codec import MAX_BATCH_BYTES

DEFAULT_MAX_IN_FLIGHT = 10_000

# pysyncobj fail reasons after which the entry may still have been committed: a
# retry must carry the same records (the log answers DUPLICATE for those applied).
MAYBE_COMMITTED = frozenset(
    {FAIL_REASON.NOT_LEADER, FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME}
)
_REASON_NAMES = {getattr(FAIL_REASON, n): n for n in dir(FAIL_REASON) if n.isupper()}


class ProposeError(Exception):
    """A proposal that did not return a result.

    `code` is one of: OVERLOADED (too many in flight; nothing was proposed),
    TIMEOUT (no answer before the deadline), or a pysyncobj fail reason name
    (QUEUE_FULL, MISSING_LEADER, DISCARDED, NOT_LEADER, LEADER_CHANGED,
    UNKNOWN_OUTCOME). `maybe_committed` says whether the records may be in the log.
    """

    def __init__(self, code: str, maybe_committed: bool, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.maybe_committed = maybe_committed


class Proposer:
    def __init__(
        self,
        raft: Any,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        observe_commit: Callable[[float], None] | None = None,
    ) -> None:
        """`observe_commit` gets each committed proposal's seconds until applied."""
        self._raft = raft
        self._observe_commit = observe_commit
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self.max_in_flight = max_in_flight

    def propose(self, batch: bytes, timeout_s: float) -> log_pb2.BatchResult:
        """Propose an encoded RecordBatch and wait until it is applied (blocking)."""
        if len(batch) > MAX_BATCH_BYTES:
            # Larger entries would take pysyncobj's chunked path (see raft_conf).
            raise ProposeError(
                "TOO_LARGE",
                False,
                f"the batch is {len(batch)} bytes; the limit is {MAX_BATCH_BYTES}",
            )
        if not self._slots.acquire(blocking=False):
            raise ProposeError(
                "OVERLOADED",
                False,
                f"{self.max_in_flight} proposals are in flight on this node; retry later",
            )
        try:
            done = threading.Event()
            outcome: list[Any] = []

            def on_result(result: Any, reason: int) -> None:
                outcome.append((result, reason))
                done.set()

            sent = time.monotonic()
            self._raft.apply_batch(batch, callback=on_result)
            if not done.wait(timeout_s):
                raise ProposeError(
                    "TIMEOUT",
                    True,
                    f"no answer within {timeout_s:.3f}s: the records may or may not be "
                    "committed; retry the same records",
                )
            result, reason = outcome[0]
            if reason == FAIL_REASON.SUCCESS and self._observe_commit is not None:
                self._observe_commit(time.monotonic() - sent)
        finally:
            self._slots.release()
        if reason != FAIL_REASON.SUCCESS:
            name = _REASON_NAMES.get(reason, str(reason))
            maybe = reason in MAYBE_COMMITTED
            hint = "may or may not be committed" if maybe else "were not committed"
            raise ProposeError(name, maybe, f"proposal failed ({name}): the records {hint}")
        parsed = log_pb2.BatchResult()
        parsed.ParseFromString(result)
        return parsed
