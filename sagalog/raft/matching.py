"""Raft's log-matching rule (§5.3) as pure functions over a journal's entries
`(data, index, term)`, for the follower's side of AppendEntries. The replica applies
them to pysyncobj's messages; their properties are tested against the rule itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sagalog.journal import Entry


def align_append_entries(journal: Sequence[Entry], message: dict[str, Any]) -> int | None:
    """Rewrite an AppendEntries whose previous entry this follower holds, so that
    pysyncobj's handling of it follows Raft's rules (§5.3):

    * an entry already held with the same term is kept, not deleted and re-added;
    * an entry whose term differs conflicts: it and everything after it go;
    * entries after the message's last one stay, and the answer and the commit
      index cover only what the message proved (its last entry).

    pysyncobj deletes everything after `prevLogIdx` whenever the log extends past
    it, appends the message's entries, and answers "my log now ends at the last
    of them". So: move `prevLogIdx` to the last entry held in agreement and keep
    only the entries after it; cap `commit_index` at what the message proved.
    Returns the index of the first conflicting entry, the only deletion this
    message warrants, or None (then pysyncobj's deletion must be refused).
    Messages whose previous entry is missing or differs are left as they are:
    pysyncobj rejects them.
    """
    prev = message.get("prevLogIdx")
    if prev is None or "transmission" in message or not len(journal):
        return None
    first, last = journal[0][1], journal[-1][1]
    if not first <= prev <= last or journal[prev - first][2] != message["prevLogTerm"]:
        return None
    entries = message.get("entries") or []
    conflict = None
    keep = len(entries)  # entries[:keep] are held already, in agreement
    for i, (_, idx, term) in enumerate(entries):
        if idx > last:
            keep = i
            break
        if journal[idx - first][2] != term:
            keep, conflict = i, idx
            break
    proven = prev + len(entries)
    agreed = prev + keep
    message["prevLogIdx"] = agreed
    message["prevLogTerm"] = journal[agreed - first][2]
    message["entries"] = entries[keep:]
    message["commit_index"] = min(message["commit_index"], proven)
    return conflict


def stale_suffix(
    journal: Sequence[Entry], prev_idx: int, prev_term: int, committed: int
) -> int | None:
    """Where the journal's stale suffix starts, or None: the position (not the index)
    of the entry at `prev_idx` when its term differs from the leader's `prev_term`.
    That entry and all after it were never committed (the leader of a newer term has
    another entry there), so they may go at once; an entry at or below `committed`
    never does."""
    if not len(journal):
        return None
    pos = prev_idx - journal[0][1]
    if pos <= 0 or pos >= len(journal) or journal[pos][2] == prev_term:
        return None
    if prev_idx <= committed:
        return None
    return pos
