"""The ordered key-value store under the Saga Log, and its in-memory fake.

`KV` is the contract; `MemoryKV` (tests, models) and `RocksKV` (nodes, in
`sagalog.rocks`) implement it, and one contract test suite runs against both.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Protocol


class StoreError(Exception):
    """A local storage failure (disk error, corrupt store). Not a rejection: the
    node must stop rather than skip an entry the other replicas applied."""


class KV(Protocol):
    """An ordered byte-string map with atomic multi-key writes.

    Keys and values are bytes; keys order bytewise. `write` applies every put
    and delete of one call atomically (all or none, also across a crash) and in
    order. Reads may run on other threads while one thread writes; a reader sees
    each `write` whole or not at all. Failures raise StoreError.
    """

    def get(self, key: bytes) -> bytes | None: ...

    def scan(self, prefix: bytes, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """(key, value) for keys starting with `prefix` and >= prefix + start, ascending."""
        ...

    def write(self, ops: Sequence[tuple[bytes, bytes | None]]) -> None:
        """Atomically put (value) or delete (None) each key, in order."""
        ...

    def close(self) -> None: ...


class MemoryKV:
    """KV in a Python dict plus a sorted key list. Not durable; for tests and models."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def scan(self, prefix: bytes, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        i = bisect.bisect_left(self._keys, prefix + start)
        keys = self._keys
        while i < len(keys) and keys[i].startswith(prefix):
            key = keys[i]
            yield key, self._data[key]
            i += 1

    def write(self, ops: Sequence[tuple[bytes, bytes | None]]) -> None:
        for key, value in ops:
            if value is None:
                if self._data.pop(key, None) is not None:
                    del self._keys[bisect.bisect_left(self._keys, key)]
            else:
                if key not in self._data:
                    bisect.insort(self._keys, key)
                self._data[key] = value

    def close(self) -> None:
        pass
