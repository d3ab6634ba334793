"""The one table from our failures to gRPC status codes.

Two kinds of failure reach a caller: a record the Saga Log REJECTED (its
`RejectCode`: the rules said no) and a proposal that never got a verdict
(`ProposeError.code`: Raft said no, or said nothing in time). Callers decide retries
from the status code, so every service maps through here and no one reads the text.
"""

from __future__ import annotations

import grpc
from saga.v1 import log_pb2

REJECT_STATUS = {
    log_pb2.REJECT_CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    # Leadership changed under the call: the client retries, on the new leader.
    log_pb2.REJECT_STALE_EPOCH: grpc.StatusCode.UNAVAILABLE,
    log_pb2.REJECT_OUT_OF_ORDER: grpc.StatusCode.FAILED_PRECONDITION,
    log_pb2.REJECT_INVALID: grpc.StatusCode.INVALID_ARGUMENT,
}

PROPOSE_STATUS = {
    "OVERLOADED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "QUEUE_FULL": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "TIMEOUT": grpc.StatusCode.DEADLINE_EXCEEDED,
    "MISSING_LEADER": grpc.StatusCode.UNAVAILABLE,
    "NOT_LEADER": grpc.StatusCode.UNAVAILABLE,
    "LEADER_CHANGED": grpc.StatusCode.UNAVAILABLE,
    "DISCARDED": grpc.StatusCode.UNAVAILABLE,
    "UNKNOWN_OUTCOME": grpc.StatusCode.UNAVAILABLE,
    "REQUEST_DENIED": grpc.StatusCode.FAILED_PRECONDITION,
    "TOO_LARGE": grpc.StatusCode.INVALID_ARGUMENT,
}

# The Sagas service's clients retry UNAVAILABLE (the same call is idempotent), so a
# failed proposal is UNAVAILABLE to them unless it says "slow down" or "never retry".
CLIENT_PROPOSE_STATUSES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)


def rejected(result: log_pb2.RecordResult) -> grpc.StatusCode:
    """A REJECTED record's status (a result without a code: INVALID_ARGUMENT)."""
    return REJECT_STATUS.get(result.code, grpc.StatusCode.INVALID_ARGUMENT)


def propose_failed(code: str, for_clients: bool = False) -> grpc.StatusCode:
    """A failed proposal's status; `for_clients`: as the Sagas service answers it."""
    status = PROPOSE_STATUS.get(code, grpc.StatusCode.UNAVAILABLE)
    if for_clients and status not in CLIENT_PROPOSE_STATUSES:
        return grpc.StatusCode.UNAVAILABLE
    return status
