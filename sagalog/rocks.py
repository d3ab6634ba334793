"""RocksKV: the KV contract on RocksDB (rocksdict, raw mode)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import rocksdict

from sagalog.kv import StoreError


class RocksKV:
    """A RocksDB database in `path`, opened once per process.

    Writes go through the RocksDB WAL without fsync: the Raft journal is the
    durable copy, and a replica whose store lost its tail re-applies it from the
    journal (the applied index is written in the same batch as the records).
    """

    def __init__(self, path: str, sync: bool = False) -> None:
        self.path = path
        try:
            self._db = rocksdict.Rdict(path, rocksdict.Options(raw_mode=True))
        except Exception as exc:  # rocksdict raises plain Exception
            raise StoreError(f"cannot open the store at {path}: {exc}") from exc
        self._write_options = rocksdict.WriteOptions()
        self._write_options.sync = sync

    def get(self, key: bytes) -> bytes | None:
        try:
            return self._db.get(key)
        except Exception as exc:
            raise StoreError(f"read failed in {self.path}: {exc}") from exc

    def scan(self, prefix: bytes, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        it = self._db.iter()
        it.seek(prefix + start)
        while it.valid():
            key = it.key()
            if not key.startswith(prefix):
                break
            yield key, it.value()
            it.next()

    def write(self, ops: Sequence[tuple[bytes, bytes | None]]) -> None:
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key, value in ops:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        try:
            self._db.write(batch, self._write_options)
        except Exception as exc:
            raise StoreError(f"write failed in {self.path}: {exc}") from exc

    def checkpoint(self, directory: str) -> None:
        """A consistent copy of the database in `directory` (hard links where possible)."""
        try:
            rocksdict.Checkpoint(self._db).create_checkpoint(directory)
        except Exception as exc:
            raise StoreError(f"checkpoint to {directory} failed: {exc}") from exc

    def close(self) -> None:
        self._db.close()
