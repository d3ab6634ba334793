"""Back-pressure: Submit refuses new sagas while the coordinator is behind."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from saga.v1 import sagas_pb2

from cluster.sagas_service import MAX_COORDINATOR_LAG_S, SagasService
from coordinator.driver import Driver
from sagalog import records as rec


class _Raft:
    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def apply_batch(self, batch: bytes, callback: Any) -> None:
        self.callbacks.append(callback)

    def majority_heard_within(self, seconds: float) -> bool:
        return True


def test_the_driver_reports_how_long_events_waited_for_it() -> None:
    driver = Driver(_Raft(), epoch=1, node_id="n1")
    driver._next_sweep = float("inf")  # no store behind this fake
    assert driver.lag_s() == 0.0
    driver._events.put((time.monotonic() - 0.8, ("wake",)))  # posted 0.8 s ago
    driver._turn()
    assert 0.8 <= driver.lag_s() < 2.0
    driver._post(("wake",))
    driver._turn()
    assert driver.lag_s() < 0.5  # caught up


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted

    def invocation_metadata(self) -> list:
        return []


class _Node:
    def __init__(self, lag_s: float) -> None:
        self.lag = lag_s
        self.raft = SimpleNamespace()
        self.proposer = None  # a Submit that got past admission would fail here

    def office_epoch(self) -> int:
        return 1

    def sagas_in_flight(self) -> int:
        return 0

    def coordinator_lag_s(self) -> float:
        return self.lag

    def leader_grpc_addr(self) -> str:
        return "127.0.0.1:1"

    def is_leader(self) -> bool:
        return True


@pytest.mark.parametrize("lag_s", [MAX_COORDINATOR_LAG_S + 0.1, 0.0])
def test_submit_is_resource_exhausted_only_while_the_coordinator_lags(lag_s: float) -> None:
    service = SagasService(_Node(lag_s))  # type: ignore[arg-type]
    context = _Context()
    request = sagas_pb2.SubmitRequest(definition=rec.chain_definition("a"), saga_id="s1")
    with pytest.raises(_Aborted):
        service.Submit(request, context)
    if lag_s > MAX_COORDINATOR_LAG_S:
        assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "behind" in context.details
    else:  # admitted: it went on to propose (no proposer here: "starting")
        assert context.code == grpc.StatusCode.UNAVAILABLE
