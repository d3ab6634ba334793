"""When each saga started and ended, as the applied records say: what metrics
(durations) and traces (the saga's span) are measured from.

Every node applies the same records, so every node knows the same lifetimes
(of the sagas it saw start: a node that installed a snapshot forgets those in
flight, `forget`). Bounded: past MAX_TRACKED_STARTS sagas in flight, a new one's
lifetime is not tracked.
"""

from __future__ import annotations

from dataclasses import dataclass

from saga.v1 import log_pb2

MAX_TRACKED_STARTS = 200_000
OUTCOMES = {log_pb2.OUTCOME_COMPLETED: "completed", log_pb2.OUTCOME_ABORTED: "aborted"}


@dataclass(frozen=True)
class Lifetime:
    saga_id: str
    definition: str
    started_unix_ms: int
    ended_unix_ms: int
    outcome: str  # completed | aborted


class Lifetimes:
    def __init__(self, limit: int = MAX_TRACKED_STARTS) -> None:
        self._limit = limit
        self._started: dict[str, tuple[str, int]] = {}  # saga id -> (definition, ms)

    def observe(self, records: list[tuple[str, int, log_pb2.Record]]) -> list[Lifetime]:
        """Fold applied records (Raft thread); return the lifetimes they ended."""
        ended = []
        for saga_id, _seq, record in records:
            body = record.WhichOneof("body")
            if body == "start_saga":
                if len(self._started) < self._limit:
                    name = record.start_saga.definition.name
                    self._started[saga_id] = (name, record.time_unix_ms)
            elif body == "end_saga":
                start = self._started.pop(saga_id, None)
                outcome = OUTCOMES.get(record.end_saga.outcome)
                if start is not None and outcome is not None:
                    name, started_ms = start
                    ended.append(Lifetime(saga_id, name, started_ms, record.time_unix_ms, outcome))
        return ended

    def definition(self, saga_id: str) -> str | None:
        start = self._started.get(saga_id)
        return start[0] if start is not None else None

    def forget(self) -> None:
        """A snapshot replaced the store: sagas seen starting may have ended unseen."""
        self._started.clear()
