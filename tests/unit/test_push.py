"""Completion by push: the feed wakes a saga's subscribers, a slow subscriber falls
behind instead of growing without bound, and a Watch stream that fell behind
re-reads the store and still delivers every record once, in order."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager

from saga.v1 import log_pb2

from cluster.runtime import push
from cluster.runtime.push import AppliedFeed
from cluster.runtime.sagas_service import Call, SagasService
from sagalog import records as rec

CALL = Call(forwarded=False, deadline=None)


def _records(n: int, end: bool = True) -> list[log_pb2.Record]:
    out = [rec.start_saga("s", 1, rec.chain_definition("a"), b"", 0)]
    out += [rec.start_t("s", 1, "a", i + 1) for i in range(n - 2)]
    if end:
        out.append(rec.end_saga("s", 1, log_pb2.OUTCOME_COMPLETED, 0))
    return out


class _Log:
    """The store as the service reads it: a saga's records."""

    def __init__(self) -> None:
        self.records: list[log_pb2.Record] = []
        self.reads = 0
        self.after_read = None

    def records_from(self, saga_id: str, seq: int) -> list[log_pb2.Record]:
        self.reads += 1
        out = self.records[seq:]
        if self.after_read is not None:  # an entry applied right after this read
            self.after_read()
            self.after_read = None
        return out

    def saga_number(self, saga_id: str) -> int | None:
        return 1 if self.records else None

    def has_ended(self, saga_id: str) -> bool:
        return bool(self.records) and self.records[-1].HasField("end_saga")

    def tombstone(self, saga_id: str) -> None:
        return None


class _Raft:
    def __init__(self) -> None:
        self.log = _Log()

    @contextmanager
    def reading(self):
        yield self.log


class _Node:
    def __init__(self, feed: AppliedFeed) -> None:
        self.raft = _Raft()
        self.feed = feed
        self.proposer = None


def _apply(node: _Node, records: list[log_pb2.Record]) -> None:
    """What the Raft thread does: write to the store, then publish."""
    start = len(node.raft.log.records)
    node.raft.log.records.extend(records)
    node.feed.publish([("s", start + i, r) for i, r in enumerate(records)])


def test_a_subscription_is_bounded_and_says_when_it_fell_behind() -> None:
    async def scenario() -> None:
        feed = AppliedFeed(asyncio.get_running_loop())
        sub = feed.subscribe("s")
        other = feed.subscribe("t")
        records = _records(push.MAX_BUFFERED_RECORDS + 10)
        feed.publish([("s", i, r) for i, r in enumerate(records)])
        await sub.wait(1.0)
        held, fell_behind = sub.take()
        assert fell_behind and held == []  # dropped, not grown past the bound
        assert other.take() == ([], False)  # another saga's subscriber is not woken
        feed.publish([("s", 0, records[0])])
        await sub.wait(1.0)
        assert sub.take() == ([(0, records[0])], False)
        feed.unsubscribe(sub)
        feed.unsubscribe(other)
        assert feed.subscriptions == 0

    asyncio.run(scenario())


def test_watch_delivers_each_record_once_in_order_across_a_fall_behind() -> None:
    async def scenario() -> None:
        feed = AppliedFeed(asyncio.get_running_loop())
        node = _Node(feed)
        service = SagasService(node)  # type: ignore[arg-type]
        all_records = _records(3 * push.MAX_BUFFERED_RECORDS)
        _apply(node, all_records[:5])  # in the store before the stream starts
        sub = feed.subscribe("s")
        stream = service._watch("s", 0, sub, CALL)
        got = [await stream.__anext__() for _ in range(5)]
        # Now a burst larger than the buffer, applied while the reader is away.
        _apply(node, all_records[5:])
        await asyncio.sleep(0)  # the feed's delivery runs on the loop
        got += [event async for event in stream]
        assert [e.seq for e in got] == list(range(len(all_records)))
        assert [e.record for e in got] == all_records
        assert node.raft.log.reads == 2  # the first read and one re-read after the burst

    asyncio.run(scenario())


def test_watch_follows_pushed_records_without_reading_the_store_again() -> None:
    async def scenario() -> None:
        feed = AppliedFeed(asyncio.get_running_loop())
        node = _Node(feed)
        service = SagasService(node)  # type: ignore[arg-type]
        records = _records(6)
        sub = feed.subscribe("s")
        stream = service._watch("s", 0, sub, CALL)
        _apply(node, records[:1])
        got = [await stream.__anext__()]
        for record in records[1:]:
            _apply(node, [record])
            got.append(await asyncio.wait_for(stream.__anext__(), 1.0))
        assert [e.seq for e in got] == list(range(6))
        assert got[-1].record.HasField("end_saga")
        assert node.raft.log.reads == 1  # every later record came by push

    asyncio.run(scenario())


def test_a_snapshot_install_sends_every_stream_back_to_the_store() -> None:
    async def scenario() -> None:
        feed = AppliedFeed(asyncio.get_running_loop())
        node = _Node(feed)
        service = SagasService(node)  # type: ignore[arg-type]
        records = _records(8)
        _apply(node, records[:2])
        sub = feed.subscribe("s")
        stream = service._watch("s", 0, sub, CALL)
        got = [await stream.__anext__(), await stream.__anext__()]
        node.raft.log.records.extend(records[2:])  # installed wholesale: nothing published
        feed.reset()
        got += [event async for event in stream]
        assert [e.seq for e in got] == list(range(8))

    asyncio.run(scenario())


def test_an_end_applied_between_the_stores_reads_is_still_delivered() -> None:
    """The stream must not conclude "ended, nothing left to send" from a read of the
    records that missed the entry holding EndSaga (and the last EndT with it)."""

    async def scenario() -> None:
        feed = AppliedFeed(asyncio.get_running_loop())
        node = _Node(feed)
        service = SagasService(node)  # type: ignore[arg-type]
        records = _records(5)
        _apply(node, records[:3])
        sub = feed.subscribe("s")
        stream = service._watch("s", 3, sub, CALL)
        node.raft.log.after_read = lambda: _apply(node, records[3:])
        got = [e async for e in stream]
        assert [e.seq for e in got] == [3, 4]
        assert got[-1].record.HasField("end_saga")

    asyncio.run(scenario())
