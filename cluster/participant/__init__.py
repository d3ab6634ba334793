"""The participant SDK: saga participants whose guarantees hold by construction.

The saga guarantee holds only if every participant answers a repeated request with
its first answer, runs a compensation at most once, refuses a request that arrives
after its compensation, and ignores a coordinator that lost office. A `Participant`
does all of that in its ledger (SQLite, beside the handlers' own tables) so that a
handler only says what its action does:

    from cluster.participant import Participant, Refused, Step

    hotel = Participant("Hotel", db_path="hotel.db", schema=ROOMS_SCHEMA)

    @hotel.request("BookHotel")
    def book(step: Step) -> bytes:
        ...                                   # raise Refused("no rooms") to abort the saga

    @hotel.compensation("CancelHotel")
    def cancel(step: Step, booked: bytes | None) -> None:
        ...                                   # booked: the request's output, or None

    hotel.serve("127.0.0.1:50061")

A handler that writes only through `step.db` is exactly-once: its writes and the
ledger's entry commit in one transaction. A handler with effects outside the database
(an HTTP call, an email) is at-least-once: a crash between the effect and the commit
runs it again, so pass `step.idempotency_key` to the other system (and find the
effect to undo by `step.request_key`, since `booked` is None if the request's commit
was lost).
"""

from cluster.participant.ledger import (
    Call,
    LedgerState,
    Outcome,
    Reply,
    read_ledger,
)
from cluster.participant.sdk import Participant, Refused, RunningServer, Step, StepDB

__all__ = [
    "Call",
    "LedgerState",
    "Outcome",
    "Participant",
    "Refused",
    "Reply",
    "RunningServer",
    "Step",
    "StepDB",
    "read_ledger",
]
