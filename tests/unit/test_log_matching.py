"""Raft's log-matching rule on the follower's side (§5.3), as `sagalog.raft.matching`
applies it to pysyncobj's AppendEntries, against the rule itself.

Hypothesis builds a leader's log and a follower's log that agrees with it up to a
point and then holds a suffix from older terms (a crashed leader's), and an
AppendEntries the leader could send (any previous entry, any number of entries).
pysyncobj's handling is simulated as pysyncobj does it: after the rewrite, delete from
`prevLogIdx + 1` if the log goes past it (only where the rewrite approved it), then
append. Whatever the message, afterwards:

* every entry the message carried is in the follower's log, as the leader has it;
* no entry the follower held in agreement with the leader was deleted;
* the commit index never passes what the message proved;
* a message whose previous entry the follower lacks or holds with another term is
  left alone (pysyncobj rejects it).
"""

from __future__ import annotations

import copy

from hypothesis import given
from hypothesis import strategies as st

from sagalog.raft.matching import align_append_entries, stale_suffix

FIRST = 5  # the journal's first index (a compacted prefix before it)


@st.composite
def logs(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """(leader terms, follower terms), index FIRST first. The follower agrees with
    the leader on a prefix; after it, its terms are older than the leader's there."""
    steps = draw(st.lists(st.integers(0, 2), min_size=1, max_size=14))
    leader, term = [], 1
    for step in steps:
        term += step
        leader.append(term)
    agree = draw(st.integers(1, len(leader)))
    follower = leader[:agree]
    extra = draw(st.integers(0, 6))
    term = follower[-1]
    for i in range(extra):
        at = agree + i
        ceiling = leader[at] - 1 if at < len(leader) else term + 1
        if ceiling < term:
            break
        term = draw(st.integers(term, ceiling))
        follower.append(term)
    return leader, follower


def journal_of(terms: list[int]) -> list[tuple[bytes, int, int]]:
    return [(f"{i}@{t}".encode(), FIRST + i, t) for i, t in enumerate(terms)]


def pysyncobj(journal: list, message: dict, approved: int | None) -> list:
    """What pysyncobj's follower does with the (rewritten) message."""
    prev = message["prevLogIdx"]
    out = list(journal)
    if out and out[-1][1] > prev and approved == prev + 1:
        del out[prev + 1 - FIRST :]
    elif out and out[-1][1] > prev and message["entries"]:
        raise AssertionError("entries appended after a suffix that was kept: a hole")
    out.extend(message["entries"])
    return out


@given(logs(), st.data())
def test_after_any_append_entries_the_follower_matches_the_leader(pair, data) -> None:
    leader_terms, follower_terms = pair
    leader, follower = journal_of(leader_terms), journal_of(follower_terms)
    prev = data.draw(st.integers(FIRST, FIRST + len(leader) - 1), label="prevLogIdx")
    count = data.draw(st.integers(0, FIRST + len(leader) - 1 - prev), label="entries")
    commit = data.draw(st.integers(0, FIRST + len(leader) - 1), label="leader commit")
    entries = leader[prev + 1 - FIRST : prev + 1 - FIRST + count]
    message = {
        "prevLogIdx": prev,
        "prevLogTerm": leader[prev - FIRST][2],
        "entries": list(entries),
        "commit_index": commit,
    }
    original = copy.deepcopy(message)
    approved = align_append_entries(follower, message)
    held = prev - FIRST < len(follower) and follower[prev - FIRST][2] == leader[prev - FIRST][2]
    if not held:
        assert message == original and approved is None  # pysyncobj rejects it
        return
    after = pysyncobj(follower, message, approved)
    by_index = {e[1]: e for e in after}
    for entry in entries:  # everything the message carried is there, as sent
        assert by_index.get(entry[1]) == entry
    for entry in follower:  # nothing held in agreement was deleted
        if entry[1] - FIRST < len(leader) and leader[entry[1] - FIRST] == entry:
            assert by_index.get(entry[1]) == entry
    indexes = [e[1] for e in after]
    assert indexes == list(range(FIRST, FIRST + len(after)))  # no holes
    assert message["commit_index"] <= prev + count  # only what the message proved
    if approved is not None:  # a deletion only where the terms really differ
        assert follower[approved - FIRST][2] != leader[approved - FIRST][2]


@given(logs(), st.data())
def test_a_stale_suffix_is_one_that_conflicts_and_was_never_committed(pair, data) -> None:
    leader_terms, follower_terms = pair
    leader, follower = journal_of(leader_terms), journal_of(follower_terms)
    prev = data.draw(st.integers(FIRST, FIRST + len(leader) - 1))
    committed = data.draw(st.integers(0, FIRST + len(follower)))
    pos = stale_suffix(follower, prev, leader[prev - FIRST][2], committed)
    conflicts = 0 < prev - FIRST < len(follower) and follower[prev - FIRST] != leader[prev - FIRST]
    if pos is None:
        assert not conflicts or prev <= committed
    else:
        assert conflicts and prev > committed and pos == prev - FIRST
        # Everything it would drop differs from the leader's log or goes past it.
        assert all(e[1] - FIRST >= len(leader) or leader[e[1] - FIRST] != e for e in follower[pos:])
