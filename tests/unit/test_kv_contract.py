"""One contract suite for every KV: the in-memory fake and RocksDB."""

from __future__ import annotations

import pytest

from sagalog.kv import KV, MemoryKV
from sagalog.rocks import RocksKV


@pytest.fixture(params=["memory", "rocks"])
def kv(request, tmp_path):
    store: KV = MemoryKV() if request.param == "memory" else RocksKV(str(tmp_path / "db"))
    yield store
    store.close()


def test_get_missing_is_none(kv: KV) -> None:
    assert kv.get(b"nope") is None


def test_write_put_and_delete_in_order(kv: KV) -> None:
    kv.write([(b"a", b"1"), (b"b", b"2"), (b"a", None), (b"c", b"3"), (b"c", b"4")])
    assert kv.get(b"a") is None
    assert kv.get(b"b") == b"2"
    assert kv.get(b"c") == b"4"


def test_scan_is_prefix_bounded_and_bytewise_ordered(kv: KV) -> None:
    keys = [b"R\x00\x02", b"R\x00\x01", b"R\xff", b"Q", b"S", b"R"]
    kv.write([(k, k) for k in keys])
    assert [k for k, _ in kv.scan(b"R")] == [b"R", b"R\x00\x01", b"R\x00\x02", b"R\xff"]
    assert [k for k, _ in kv.scan(b"R", b"\x00\x02")] == [b"R\x00\x02", b"R\xff"]
    assert list(kv.scan(b"Z")) == []


def test_empty_values_are_values(kv: KV) -> None:
    kv.write([(b"k", b"")])
    assert kv.get(b"k") == b""
    assert list(kv.scan(b"k")) == [(b"k", b"")]
