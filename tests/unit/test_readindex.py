"""ReadIndex rounds: a read is confirmed only by a majority's answers to
AppendEntries sent after it arrived, in the term it arrived in."""

from __future__ import annotations

import threading

import pytest

from sagalog.readindex import ReadRefused, ReadRounds

PEERS3 = ["b", "c"]
PEERS5 = ["b", "c", "d", "e"]


def _confirmed(read) -> bool:
    try:
        read.wait(0)
    except TimeoutError:
        return False
    return True


def test_a_read_waits_for_a_round_sent_after_it_arrived() -> None:
    rounds = ReadRounds()
    rounds.start_round()  # round 1 is on the wire before the read arrives
    read = rounds.request(commit_index=42, term=3)
    assert read.round == 2 and rounds.round_wanted()
    # An answer to round 1 (sent before the read, delivered late: a paused leader's
    # buffered answers) confirms nothing.
    rounds.answered("b", 1, PEERS3, term=3)
    assert not _confirmed(read)
    assert rounds.start_round() == 2
    assert not rounds.round_wanted()
    rounds.answered("b", 2, PEERS3, term=3)
    assert read.wait(0) == 42  # leader + b: a majority of three


def test_five_voters_need_two_answers_and_one_round_serves_every_waiting_read() -> None:
    rounds = ReadRounds()
    reads = [rounds.request(commit_index=i, term=1) for i in range(10)]
    rounds.start_round()
    rounds.answered("b", 1, PEERS5, term=1)
    assert not any(_confirmed(r) for r in reads)
    rounds.answered("b", 1, PEERS5, term=1)  # the same voter twice is still one
    assert not any(_confirmed(r) for r in reads)
    rounds.answered("d", 1, PEERS5, term=1)
    assert [r.wait(0) for r in reads] == list(range(10))


def test_answers_from_peers_that_are_not_voters_do_not_count() -> None:
    rounds = ReadRounds()
    read = rounds.request(commit_index=1, term=1)
    rounds.start_round()
    rounds.answered("readonly-peer", 1, PEERS3, term=1)
    assert not _confirmed(read)


def test_a_term_change_or_a_lost_leadership_refuses_the_read() -> None:
    rounds = ReadRounds()
    old = rounds.request(commit_index=5, term=1)
    rounds.start_round()
    rounds.answered("b", 1, PEERS3, term=2)  # the node is leader again, in a newer term
    with pytest.raises(ReadRefused, match="term"):
        old.wait(0)
    lost = rounds.request(commit_index=6, term=2)
    rounds.refuse_all("this node is not the leader")
    with pytest.raises(ReadRefused, match="not the leader"):
        lost.wait(0)


def test_wait_times_out_without_answers() -> None:
    read = ReadRounds().request(commit_index=1, term=1)
    with pytest.raises(TimeoutError):
        read.wait(0.01)


def test_requests_from_many_threads_all_get_a_round_after_their_arrival() -> None:
    rounds = ReadRounds()
    reads = []
    lock = threading.Lock()

    def reader() -> None:
        for _ in range(100):
            r = rounds.request(commit_index=1, term=1)
            with lock:
                reads.append(r)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    sent_before = rounds.sent
    for t in threads:
        t.join()
    assert all(r.round >= sent_before + 1 for r in reads)
    top = rounds.start_round()
    rounds.answered("c", top, PEERS3, term=1)
    assert all(_confirmed(r) for r in reads)
