"""One status per failure: every RejectCode and every propose failure is in the table."""

from __future__ import annotations

import grpc
from saga.v1 import log_pb2

from cluster.runtime import statuses
from sagalog.proposer import _REASON_NAMES


def test_every_reject_code_and_propose_failure_has_one_status() -> None:
    codes = {number for name, number in log_pb2.RejectCode.items() if number}
    assert set(statuses.REJECT_STATUS) == codes
    unspecified = log_pb2.RecordResult(verdict=log_pb2.REJECTED)
    assert statuses.rejected(unspecified) == grpc.StatusCode.INVALID_ARGUMENT
    # Every pysyncobj fail reason the proposer can name is in the table.
    named = set(_REASON_NAMES.values()) - {"SUCCESS"}
    assert named <= set(statuses.PROPOSE_STATUS), named - set(statuses.PROPOSE_STATUS)
    assert statuses.propose_failed("TIMEOUT") == grpc.StatusCode.DEADLINE_EXCEEDED
    assert statuses.propose_failed("TIMEOUT", for_clients=True) == grpc.StatusCode.UNAVAILABLE
    assert statuses.propose_failed("QUEUE_FULL", True) == grpc.StatusCode.RESOURCE_EXHAUSTED
