"""Snapshots written off the Raft thread.

pysyncobj writes a snapshot either in a fork (which gRPC does not survive) or on
its Raft thread. With a million ended sagas the store is hundreds of megabytes:
tarring it on the Raft thread silenced the node for seconds, and a leader that
hears from no majority for 300 ms steps down.

`BackgroundSerializer` takes pysyncobj's Serializer and splits `serialize` in
two. On the Raft thread, where nothing else applies, the start hook takes a
RocksDB checkpoint (hard links: milliseconds) and returns a writer. The writer
runs on a thread of its own and writes `<dump>.building`, fsynced. The finished
file replaces the dump back on the Raft thread, in `checkSerializing`: pysyncobj
receives a leader's snapshot into the dump on that thread too, so the two never
race, and a snapshot started before an install is dropped (`cancel`).

Crash safety is pysyncobj's order, unchanged: the dump is replaced (and the
directory fsynced) before the journal is compacted. A crash while building
leaves the old dump and the whole journal.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.serializer import Serializer

from sagalog.fsync import fsync_dir

log = logging.getLogger(__name__)

# After a failed snapshot (disk full, say), wait this long before the next attempt:
# each attempt takes a checkpoint on the Raft thread.
RETRY_AFTER_S = 30.0

# What the start hook returns: writes the snapshot, durably, to the path it is given.
Writer = Callable[[str], None]
# The start hook: pysyncobj's snapshot data (last entry, previous entry, cluster) -> Writer.
StartHook = Callable[[Any], Writer]


@dataclass
class _Job:
    id: int  # pysyncobj's serialize id: the index of the entry before the snapshot's last
    path: str
    thread: threading.Thread | None = None
    error: BaseException | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def run(self, write: Writer) -> None:
        try:
            write(self.path)
        except BaseException as exc:  # reported through checkSerializing
            self.error = exc
        finally:
            self.done.set()


class BackgroundSerializer(Serializer):  # type: ignore[misc]
    """pysyncobj's Serializer with the snapshot written on a background thread.

    Constructed by pysyncobj with its own arguments; `serializer` is a StartHook."""

    def __init__(
        self,
        fileName: str,  # noqa: N803 (pysyncobj's names)
        transmissionBatchSize: int,  # noqa: N803
        tryUseFork: bool,  # noqa: N803
        serializer: StartHook,
        deserializer: Callable[[str], Any],
        serializeChecker: Any,  # noqa: N803
    ) -> None:
        super().__init__(fileName, transmissionBatchSize, False, serializer, deserializer, None)
        self._dump = fileName
        self._start = serializer
        self._job: _Job | None = None
        self._retry_at = 0.0  # time.monotonic() before which no snapshot starts

    @property
    def building(self) -> bool:
        return self._job is not None

    def serialize(self, data: Any, id: int) -> None:  # noqa: A002 (pysyncobj's name)
        if self._job is not None or time.monotonic() < self._retry_at:
            return
        job = _Job(id=id, path=self._dump + ".building")
        try:
            write = self._start(data[1:])
            job.thread = threading.Thread(
                target=job.run, args=(write,), name="snapshot-writer", daemon=True
            )
            job.thread.start()
        except Exception:
            log.exception("snapshot at entry %d: could not start", id)
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            return
        self._job = job

    def checkSerializing(self) -> tuple[int, int | None]:
        job = self._job
        if job is None:
            return SERIALIZER_STATE.NOT_SERIALIZING, None
        if not job.done.is_set():
            return SERIALIZER_STATE.SERIALIZING, job.id
        self._job = None
        if job.cancelled:
            _remove(job.path)
            log.info("snapshot at entry %d dropped: a newer one was installed", job.id)
            return SERIALIZER_STATE.NOT_SERIALIZING, None
        if job.error is not None:
            _remove(job.path)
            log.error("snapshot at entry %d failed: %s", job.id, job.error)
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            return SERIALIZER_STATE.FAILED, job.id
        os.replace(job.path, self._dump)
        fsync_dir(os.path.dirname(os.path.abspath(self._dump)))
        log.info("snapshot at entry %d written", job.id)
        return SERIALIZER_STATE.SUCCESS, job.id

    def cancel(self) -> None:
        """A snapshot from the leader is being installed: the one being built is older."""
        if self._job is not None:
            self._job.cancelled = True

    def wait(self, timeout: float) -> bool:
        """Wait for the writer thread (at shutdown). True if none is running."""
        job = self._job
        return job is None or job.done.wait(timeout)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
