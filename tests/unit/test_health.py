"""When a node tells gRPC health it serves: a pure function of its Raft status."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cluster.runtime.health import MAX_APPLY_LAG, serving
from sagalog.raft import RaftStatus
from sagalog.raft.status import CANDIDATE, FOLLOWER, LEADER


def _status(role=FOLLOWER, leader="127.0.0.1:1", ready=True, commit=10, applied=10):
    return RaftStatus(role, 3, leader, commit, applied, ready)


def test_a_caught_up_follower_that_knows_its_leader_serves() -> None:
    assert serving(_status(), in_office=False)


def test_a_leader_serves_only_in_office() -> None:
    assert not serving(_status(role=LEADER), in_office=False)
    assert serving(_status(role=LEADER), in_office=True)


def test_starting_electing_or_behind_is_not_serving() -> None:
    assert not serving(None, in_office=False)
    assert not serving(_status(leader=None), in_office=False)
    assert not serving(_status(role=CANDIDATE), in_office=False)
    assert not serving(_status(ready=False), in_office=False)
    assert not serving(_status(commit=10 + MAX_APPLY_LAG + 1, applied=10), in_office=False)


@given(
    role=st.sampled_from([FOLLOWER, CANDIDATE, LEADER]),
    leader=st.none() | st.just("127.0.0.1:1"),
    ready=st.booleans(),
    lag=st.integers(0, 3 * MAX_APPLY_LAG),
    in_office=st.booleans(),
)
def test_serving_is_lost_by_any_one_missing_condition(role, leader, ready, lag, in_office) -> None:
    status = _status(role=role, leader=leader, ready=ready, commit=100 + lag, applied=100)
    if serving(status, in_office):
        assert leader is not None and ready and role != CANDIDATE and lag <= MAX_APPLY_LAG
        assert in_office or role == FOLLOWER
    # Catching up never turns a serving node into one that serves less well: a
    # smaller lag, other things equal, serves whenever the larger one did.
    caught_up = _status(role=role, leader=leader, ready=ready, commit=100, applied=100)
    assert serving(caught_up, in_office) or not serving(status, in_office)
