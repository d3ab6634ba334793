"""BackgroundSerializer: the snapshot is written on another thread and replaces the
dump only when pysyncobj's Raft thread next checks, never behind its back."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
from pysyncobj.config import SERIALIZER_STATE

from sagalog import snapshot
from sagalog.snapshot import BackgroundSerializer

NOT_SERIALIZING = SERIALIZER_STATE.NOT_SERIALIZING
SERIALIZING = SERIALIZER_STATE.SERIALIZING
SUCCESS = SERIALIZER_STATE.SUCCESS
FAILED = SERIALIZER_STATE.FAILED


class _Hook:
    """A start hook whose writer waits for `release`, then writes `content` (or raises)."""

    def __init__(self, content: bytes = b"new", fail: bool = False) -> None:
        self.content = content
        self.fail = fail
        self.release = threading.Event()
        self.started_with: list[Any] = []
        self.writer_threads: list[str] = []

    def __call__(self, raft_data: Any) -> Callable[[str], None]:
        self.started_with.append(raft_data)

        def write(path: str) -> None:
            self.writer_threads.append(threading.current_thread().name)
            assert self.release.wait(10)
            if self.fail:
                raise OSError("disk full")
            with open(path, "wb") as f:
                f.write(self.content)

        return write


def _serializer(tmp_path: Any, hook: _Hook) -> tuple[BackgroundSerializer, str]:
    dump = os.path.join(str(tmp_path), "snapshot")
    with open(dump, "wb") as f:
        f.write(b"old")
    return BackgroundSerializer(dump, 1024, True, hook, lambda _p: None, None), dump


def _wait_done(s: BackgroundSerializer) -> None:
    assert s.wait(10)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_snapshot_is_written_off_the_calling_thread_and_replaces_the_dump_on_check(
    tmp_path: Any,
) -> None:
    hook = _Hook()
    s, dump = _serializer(tmp_path, hook)
    assert s.checkSerializing() == (NOT_SERIALIZING, None)
    s.serialize((None, "last", "prev", "cluster"), 41)
    assert hook.started_with == [("last", "prev", "cluster")]  # pysyncobj's data[1:]
    assert s.checkSerializing() == (SERIALIZING, 41)
    s.serialize((None, "other", "x", "y"), 99)  # one at a time: ignored
    assert len(hook.started_with) == 1
    hook.release.set()
    _wait_done(s)
    assert _read(dump) == b"old"  # not replaced until the Raft thread checks
    assert s.checkSerializing() == (SUCCESS, 41)
    assert _read(dump) == b"new"
    assert hook.writer_threads == ["snapshot-writer"]
    assert not os.path.exists(dump + ".building")
    assert s.checkSerializing() == (NOT_SERIALIZING, None)


def test_failed_write_leaves_the_old_dump_and_backs_off(tmp_path: Any, monkeypatch) -> None:
    hook = _Hook(fail=True)
    s, dump = _serializer(tmp_path, hook)
    s.serialize((None, "l", "p", "c"), 7)
    hook.release.set()
    _wait_done(s)
    assert s.checkSerializing() == (FAILED, 7)
    assert _read(dump) == b"old"
    assert not os.path.exists(dump + ".building")
    s.serialize((None, "l", "p", "c"), 8)  # at once again: not yet
    assert len(hook.started_with) == 1 and not s.building
    monkeypatch.setattr(snapshot, "RETRY_AFTER_S", 0.0)
    s._retry_at = 0.0  # the back-off has passed
    s.serialize((None, "l", "p", "c"), 8)
    assert len(hook.started_with) == 2


def test_cancelled_snapshot_never_replaces_an_installed_one(tmp_path: Any) -> None:
    hook = _Hook()
    s, dump = _serializer(tmp_path, hook)
    s.serialize((None, "l", "p", "c"), 7)
    s.cancel()  # the leader's snapshot arrived meanwhile
    with open(dump, "wb") as f:
        f.write(b"leader's")
    hook.release.set()
    _wait_done(s)
    # Not SUCCESS: pysyncobj would compact the journal to the older snapshot's index.
    assert s.checkSerializing() == (NOT_SERIALIZING, None)
    assert _read(dump) == b"leader's"
    assert not os.path.exists(dump + ".building")


def test_a_start_hook_that_raises_starts_nothing(tmp_path: Any) -> None:
    def broken(_data: Any) -> Callable[[str], None]:
        raise OSError("checkpoint failed")

    dump = os.path.join(str(tmp_path), "snapshot")
    s = BackgroundSerializer(dump, 1024, True, broken, lambda _p: None, None)
    s.serialize((None, "l", "p", "c"), 3)
    assert s.checkSerializing() == (NOT_SERIALIZING, None)
    assert not s.building


@pytest.mark.parametrize("released", [True, False])
def test_wait_reports_whether_the_writer_finished(tmp_path: Any, released: bool) -> None:
    hook = _Hook()
    s, _dump = _serializer(tmp_path, hook)
    s.serialize((None, "l", "p", "c"), 3)
    if released:
        hook.release.set()
    assert s.wait(0.2 if not released else 10) is released
    hook.release.set()
    _wait_done(s)
