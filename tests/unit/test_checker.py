"""The checker is itself tested: each planted bug must be caught, a clean run passes."""

from __future__ import annotations

import copy

import pytest

from cluster.testkit.checker import Booking, Observations, Received, check
from cluster.testkit.faults import Sample

V = ["Hotel", "Car", "Flight", "Payment"]


def clean() -> Observations:
    obs = Observations(acknowledged={"ok-1", "ab-1"})
    obs.sagas = {"ok-1": ("COMPLETED", V, 1), "ab-1": ("ABORTED", V, 1)}
    obs.bookings = [Booking(v, "ok-1", v, "in_effect") for v in V]
    obs.bookings += [
        Booking("Hotel", "ab-1", "Hotel", "cancelled"),
        Booking("Car", "ab-1", "Car", "refused"),
    ]
    obs.received = [
        Received("Hotel", "execute", 1, 1.0, 900),
        Received("Hotel", "execute", 2, 2.0, 1900),
        # Sent before epoch 2 existed, delivered late (a paused sender): allowed.
        Received("Hotel", "execute", 1, 2.5, 1500),
    ]
    obs.digests = {"n1": ("abc", 10), "n2": ("abc", 10), "n3": ("abc", 10)}
    obs.samples = [
        Sample(1.0, "n1", 100, 1, 5, "n1", 3),
        Sample(2.0, "n1", 100, 2, 9, "n2", 1),
        Sample(3.0, "n1", 101, 1, 3, "n2", 1),  # a new process lifetime may start lower
    ]
    return obs


def test_a_clean_run_passes() -> None:
    verdict = check(clean())
    assert verdict.ok, verdict.report()
    assert verdict.counts["completed"] == 1 and verdict.counts["aborted"] == 1
    assert verdict.counts["leader changes seen"] == 1


def plant_skipped_compensation(obs: Observations) -> None:
    obs.bookings[4] = Booking("Hotel", "ab-1", "Hotel", "in_effect")


def plant_duplicated_request(obs: Observations) -> None:
    obs.bookings.append(Booking("Hotel", "ok-1", "Hotel", "in_effect"))


def plant_lost_saga(obs: Observations) -> None:
    del obs.sagas["ok-1"]


def plant_diverged_replica(obs: Observations) -> None:
    obs.digests["n3"] = ("abd", 10)


def plant_missing_booking(obs: Observations) -> None:
    obs.bookings = [b for b in obs.bookings if (b.saga_id, b.vertex) != ("ok-1", "Payment")]


def plant_term_going_back(obs: Observations) -> None:
    obs.samples.append(Sample(2.5, "n1", 100, 1, 9, "n2", 1))


def plant_commit_going_back(obs: Observations) -> None:
    obs.samples.append(Sample(2.5, "n1", 100, 2, 8, "n2", 1))


def plant_old_epoch_after_new(obs: Observations) -> None:
    obs.received.append(Received("Hotel", "execute", 1, 3.0, 2900))


def plant_saga_twice(obs: Observations) -> None:
    obs.sagas["ok-1"] = ("COMPLETED", V, 2)


def plant_unended_saga(obs: Observations) -> None:
    obs.sagas["ab-1"] = ("ABORTING", V, 1)


@pytest.mark.parametrize(
    "plant,check_name",
    [
        (plant_skipped_compensation, "ABORTED: nothing in effect"),
        (plant_duplicated_request, "a request took effect twice"),
        (plant_lost_saga, "every acknowledged saga ended"),
        (plant_diverged_replica, "replicas identical"),
        (plant_missing_booking, "COMPLETED: every request in effect"),
        (plant_term_going_back, "term never goes back"),
        (plant_commit_going_back, "commit index never goes back"),
        (plant_old_epoch_after_new, "no older epoch after a newer one"),
        (plant_saga_twice, "one saga per saga id"),
        (plant_unended_saga, "every acknowledged saga ended"),
    ],
)
def test_each_planted_bug_is_caught(plant, check_name) -> None:
    obs = copy.deepcopy(clean())
    plant(obs)
    verdict = check(obs)
    assert not verdict.ok
    assert check_name in verdict.problems, verdict.report()
    assert "FAIL" in verdict.report()
