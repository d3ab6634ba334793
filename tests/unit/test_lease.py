"""The coordinator's permission to act after a pause (coordinator/lease.py), on a
clock the test moves.

A leader paused by SIGSTOP may have been replaced meanwhile. After a gap in its
own clock readings it must not call participants until an empty entry commits;
a barrier that committed before the pause proves nothing after it."""

from __future__ import annotations

from coordinator.lease import BARRIER_RETRY_S, Lease


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lease(clock: Clock, heard: bool = True, in_office: bool = True) -> tuple[Lease, list[int]]:
    barriers: list[int] = []
    return (
        Lease(
            0.2,
            clock,
            barriers.append,
            majority_heard_within=lambda s: heard,  # answers queued in a pause look fresh
            in_office=lambda: in_office,
        ),
        barriers,
    )


def test_a_barrier_sent_before_a_pause_does_not_count_after_it() -> None:
    clock = Clock()
    permit, barriers = lease(clock)
    assert permit.may_act()

    clock.now += 1.0  # paused
    assert not permit.may_act()
    assert barriers == [1]
    clock.now += 1.0  # paused again while it is in flight
    assert not permit.may_act()
    assert barriers == [1, 2]  # a new one: the first was sent before this pause

    permit.on_barrier(True, 1)  # committed before the second pause
    assert not permit.may_act()
    assert barriers == [1, 2]  # the second is still in flight: no third

    permit.on_barrier(True, 2)
    assert permit.may_act()


def test_a_failed_barrier_keeps_it_from_acting_and_is_sent_again() -> None:
    clock = Clock()
    permit, barriers = lease(clock)
    clock.now += 1.0
    assert not permit.may_act()
    permit.on_barrier(False, 1)
    assert not permit.may_act()
    assert barriers == [1, 1]  # asks again, for the same pause


def test_a_lost_barrier_answer_is_replaced_after_a_while() -> None:
    clock = Clock()
    permit, barriers = lease(clock)
    clock.now += 1.0
    assert not permit.may_act()
    for _ in range(int(BARRIER_RETRY_S / 0.1) - 1):
        clock.now += 0.1  # readings closer than the lease: no new pause
        assert not permit.may_act()
    assert barriers == [1]
    clock.now += 0.15
    assert not permit.may_act()
    assert barriers == [1, 1]


def test_waiting_for_events_is_not_a_pause() -> None:
    clock = Clock()
    permit, barriers = lease(clock)
    clock.now += 0.25
    permit.waited(clock.now, wait_s=0.05)  # 0.25 <= 0.05 + lease: a wait
    assert permit.may_act() and barriers == []
    clock.now += 0.5
    permit.waited(clock.now, wait_s=0.05)  # longer than the wait plus the lease
    assert not permit.may_act() and barriers == [1]


def test_out_of_office_or_unheard_it_may_not_act() -> None:
    clock = Clock()
    assert not lease(clock, in_office=False)[0].may_act()
    assert not lease(clock, heard=False)[0].may_act()


def test_a_pause_after_the_check_is_seen_before_the_call() -> None:
    clock = Clock()
    permit, _ = lease(clock)
    assert permit.may_act()
    assert not permit.paused_since_checked()
    clock.now += 0.3
    assert permit.paused_since_checked()
