"""SagaLog: the replicated state machine's logic, over any KV.

`apply_batch` is what every replica runs for every committed Raft entry. It
validates the whole batch in order (each record against the state the records
before it left), then writes once: the accepted records, the indexes, and the
applied Raft index, in one atomic KV write. A record that breaks a rule is a
REJECTED result, never an exception. A KV failure raises StoreError, which the
caller turns into a fail-stop.

Key layout (raw bytes, big-endian fixed-width numbers, so RocksDB's bytewise
order is numeric order and the records of one saga are contiguous and in order):

    M<name>                  meta: applied index, newest epoch, next saga number, clock
    I<saga id>               -> saga number (8 bytes): client ids map to fixed-width keys
    S<saga no>               -> saga id (reverse map, for listing)
    R<saga no><seq:4>        -> encoded Record, seq = 0, 1, 2, ... within the saga
    F<saga no>               in-flight index: present from StartSaga until EndSaga
    E<end ms><saga no>       ended index, oldest EndSaga first (for retention)
    T<saga no>               -> Tombstone of a purged saga (its R records are gone)
    N<node id>               -> incarnation of a registered node

Retention: a PurgeEnded record replaces the oldest ended sagas' records by a
Tombstone (outcome, name, times, the StartSaga's fingerprint). The saga id keeps
its number, so a purged saga is still known: Get answers from the tombstone, and
the same Submit again is still a DUPLICATE rather than a second run.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from saga.v1 import log_pb2

from sagalog import codec
from sagalog.definition import check_definition
from sagalog.kv import KV
from sagalog.transitions import (
    Phase,
    Reject,
    SagaState,
    apply,
    decide,
    purged_state,
    start_fingerprint,
)

META = b"M"
IDS = b"I"
NAMES = b"S"
RECORDS = b"R"
IN_FLIGHT = b"F"
NODES = b"N"
ENDED = b"E"
TOMBSTONES = b"T"

APPLIED_KEY = META + b"applied"
EPOCH_KEY = META + b"epoch"
NEXT_SAGA_KEY = META + b"next_saga"
# The log's clock: the latest time_unix_ms of any accepted record. An EndSaga
# proposed without a time ends, for retention, at this time, not in 1970 (which
# would purge it at once).
CLOCK_KEY = META + b"clock"
FORMAT_KEY = META + b"format"
# The newest log format this code applies (see LogFormat in log.proto).
# 2: the ended index (E keys), the log clock and PurgeEnded.
# 3: apply refuses what Submit refuses (a StartSaga whose definition fails
#    sagalog.definition.check_definition) and an Epoch other than the current + 1.
#    A journal written before holds entries under the old rules: every replica
#    applies those alike, whatever code it runs.
LOG_FORMAT = 3
RETENTION_FORMAT = 2
STRICT_FORMAT = 3

MAX_INCARNATION_BYTES = 64
# Sagas one PurgeEnded record may purge: bounds the work of one apply.
MAX_PURGE_PER_RECORD = 1000
# Saga states kept decoded in memory, so that validating a record does not
# re-read its saga from the store. Evicted states are re-folded from the store.
STATE_CACHE_SIZE = 20_000

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")

ACCEPTED = log_pb2.ACCEPTED
DUPLICATE = log_pb2.DUPLICATE
REJECTED = log_pb2.REJECTED


def _u64(n: int) -> bytes:
    return _U64.pack(n)


@dataclass
class _Saga:
    number: int
    state: SagaState


class LogFormatTooNew(Exception):
    """The log asks for rules this code does not know: the node must stop, not
    apply (a replica that applied a record differently would diverge)."""


class SagaLog:
    """The Saga Log over a KV. Not thread-safe for writers: one thread applies
    (pysyncobj's); readers on other threads see each batch whole or not at all."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self._cache: OrderedDict[str, _Saga] = OrderedDict()
        self._clock_ms = 0  # CLOCK_KEY while a batch is validated
        self._format = 0  # FORMAT_KEY while a batch is validated
        # Called after each applied entry with (saga id, seq, record) of every saga
        # record it accepted. Runs on the applying thread: it must not block.
        self.listener: Callable[[list[tuple[str, int, log_pb2.Record]]], None] | None = None

    # ---- the replicated entry point ------------------------------------------------

    def apply_batch(self, data: bytes, raft_index: int) -> bytes:
        """Apply one committed Raft entry. Returns an encoded BatchResult."""
        result = log_pb2.BatchResult(raft_index=raft_index)
        if raft_index <= self.applied_index():
            # Journal replay after a restart: the store already holds this entry.
            result.error = "already applied"
            return result.SerializeToString()
        records, error = codec.decode_batch(data)
        ops: list[tuple[bytes, bytes | None]] = []
        if error:
            result.error = error
        else:
            self._validate(records, result, ops)
        ops.append((APPLIED_KEY, _u64(raft_index)))
        self.kv.write(ops)
        if self.listener is not None and not error:
            accepted = [
                (record.saga_id, res.seq, record)
                for record, res in zip(records, result.results, strict=True)
                if res.verdict == ACCEPTED and record.saga_id
            ]
            if accepted:
                self.listener(accepted)
        return result.SerializeToString()

    def _validate(
        self,
        records: list[log_pb2.Record],
        result: log_pb2.BatchResult,
        ops: list[tuple[bytes, bytes | None]],
    ) -> None:
        epoch = self.epoch()
        next_saga = self._next_saga_number()
        raw = self.kv.get(CLOCK_KEY)
        clock = self._clock_ms = _U64.unpack(raw)[0] if raw else 0
        self._format = self.log_format()
        members: dict[str, bytes | None] = {}  # registry changes within this batch
        purged: set[bytes] = set()  # saga numbers purged within this batch
        for record in records:
            body = codec.body_name(record)
            if body == "epoch_start":
                res, epoch = self._epoch(record, epoch, ops)
            elif body in ("member", "forget_member"):
                res = self._member(record, members, ops)
            elif body == "purge_ended":
                res = self._purge(record, purged, ops)
            elif body == "log_format":
                res = self._log_format(record, ops)
            else:
                res, next_saga = self._saga_record(record, epoch.number, next_saga, ops)
            if res.verdict == ACCEPTED:
                self._clock_ms = max(self._clock_ms, record.time_unix_ms)
            result.results.append(res)
        ops.append((NEXT_SAGA_KEY, _u64(next_saga)))
        if self._clock_ms != clock and self._format >= RETENTION_FORMAT:
            ops.append((CLOCK_KEY, _u64(self._clock_ms)))

    def _log_format(
        self, record: log_pb2.Record, ops: list[tuple[bytes, bytes | None]]
    ) -> log_pb2.RecordResult:
        version = record.log_format.version
        if version > LOG_FORMAT:
            raise LogFormatTooNew(
                f"the log moves to format {version}; this node's code applies formats up "
                f"to {LOG_FORMAT}: upgrade it"
            )
        if record.saga_id:
            return _reject("LogFormat is a cluster record: the saga id must be empty")
        if version == self._format:
            return log_pb2.RecordResult(verdict=DUPLICATE)
        if version < self._format:
            return _reject(
                f"LogFormat {version}: the log is at format {self._format} already",
                Reject.OUT_OF_ORDER,
            )
        self._format = version
        ops.append((FORMAT_KEY, _u64(version)))
        return log_pb2.RecordResult(verdict=ACCEPTED)

    def _epoch(
        self, record: log_pb2.Record, current: log_pb2.Epoch, ops: list[tuple[bytes, bytes | None]]
    ) -> tuple[log_pb2.RecordResult, log_pb2.Epoch]:
        new = record.epoch_start
        if new.number == current.number and new.node_id == current.node_id:
            return log_pb2.RecordResult(verdict=DUPLICATE), current
        if new.number <= current.number:
            return _reject(
                f"Epoch {new.number}: not newer than the current epoch {current.number}",
                Reject.STALE_EPOCH,  # another leader took office first
            ), current
        if self._format >= STRICT_FORMAT and new.number != current.number + 1:
            return _reject(
                f"Epoch {new.number}: the next epoch is {current.number + 1}", Reject.STALE_EPOCH
            ), current
        if record.epoch != new.number:
            return _reject(
                f"Epoch {new.number}: the record's epoch field says {record.epoch}"
            ), current
        if not new.node_id or len(new.node_id) > codec.MAX_NODE_ID_LEN:
            return _reject("Epoch: the node id is empty or too long"), current
        ops.append((EPOCH_KEY, new.SerializeToString(deterministic=True)))
        return log_pb2.RecordResult(verdict=ACCEPTED), new

    def _member(
        self,
        record: log_pb2.Record,
        changes: dict[str, bytes | None],
        ops: list[tuple[bytes, bytes | None]],
    ) -> log_pb2.RecordResult:
        if record.HasField("forget_member"):
            node_id = record.forget_member.node_id
            if not node_id or len(node_id) > codec.MAX_NODE_ID_LEN:
                return _reject("ForgetMember: the node id is empty or too long")
            changes[node_id] = None
            ops.append((NODES + node_id.encode(), None))
            return log_pb2.RecordResult(verdict=ACCEPTED)
        node_id, incarnation = record.member.node_id, record.member.incarnation
        if not node_id or len(node_id) > codec.MAX_NODE_ID_LEN:
            return _reject("Member: the node id is empty or too long")
        if not incarnation or len(incarnation) > MAX_INCARNATION_BYTES:
            return _reject(f"Member: the incarnation must be 1..{MAX_INCARNATION_BYTES} bytes")
        known = changes[node_id] if node_id in changes else self.kv.get(NODES + node_id.encode())
        if known == incarnation:
            return log_pb2.RecordResult(verdict=DUPLICATE)
        if known is not None:
            return _reject(
                f"Member {node_id}: registered with incarnation {known.hex()}, not "
                f"{incarnation.hex()}: its data directory was wiped or replaced. "
                f"Run `sagactl cluster forget-node --id {node_id}` before re-adding it",
                Reject.CONFLICT,
            )
        changes[node_id] = incarnation
        ops.append((NODES + node_id.encode(), incarnation))
        return log_pb2.RecordResult(verdict=ACCEPTED)

    def _saga_record(
        self,
        record: log_pb2.Record,
        epoch: int,
        next_saga: int,
        ops: list[tuple[bytes, bytes | None]],
    ) -> tuple[log_pb2.RecordResult, int]:
        id_error = codec.check_saga_id(record.saga_id)
        if id_error:
            return _reject(id_error), next_saga
        decoded = codec.to_event(record)
        if decoded.event is None:
            return _reject(decoded.error), next_saga
        event = decoded.event
        saga = self._load(record.saga_id)
        decision = decide(saga.state, event)
        if decision.duplicate_of is not None:
            return log_pb2.RecordResult(verdict=DUPLICATE, seq=decision.duplicate_of), next_saga
        if self._format >= STRICT_FORMAT and record.HasField("start_saga"):
            error = check_definition(record.start_saga.definition)
            if error:
                return _reject(f"StartSaga: {error}"), next_saga
        # Fencing: a deposed leader's records are refused once a newer epoch committed.
        if record.epoch < epoch:
            return _reject(
                f"stale epoch {record.epoch}: epoch {epoch} has taken office (fenced)",
                Reject.STALE_EPOCH,
            ), next_saga
        if record.epoch > epoch:
            return _reject(
                f"epoch {record.epoch} was never committed (current {epoch})", Reject.STALE_EPOCH
            ), next_saga
        if not decision.accepted:
            assert decision.code is not None, decision
            return _reject(decision.reason, decision.code), next_saga
        if saga.state.phase is Phase.NEW:
            saga.number = next_saga
            next_saga += 1
            number = _u64(saga.number)
            ops.append((IDS + record.saga_id.encode(), number))
            ops.append((NAMES + number, record.saga_id.encode()))
            ops.append((IN_FLIGHT + number, b""))
        seq = saga.state.next_seq
        apply(saga.state, event)
        self._clock_ms = max(self._clock_ms, record.time_unix_ms)
        number = _u64(saga.number)
        ops.append((RECORDS + number + _U32.pack(seq), codec.encode_record(record)))
        if saga.state.phase is Phase.ENDED:
            ops.append((IN_FLIGHT + number, None))
        if saga.state.phase is Phase.ENDED and self._format >= RETENTION_FORMAT:
            # Its own time; the log's clock only when the proposer left it at 0 (a
            # single far-future time must not hold retention up for every saga).
            ended_ms = record.time_unix_ms if record.time_unix_ms > 0 else self._clock_ms
            ops.append((ENDED + _u64(ended_ms) + number, b""))
        return log_pb2.RecordResult(verdict=ACCEPTED, seq=seq), next_saga

    def _purge(
        self, record: log_pb2.Record, purged: set[bytes], ops: list[tuple[bytes, bytes | None]]
    ) -> log_pb2.RecordResult:
        """Replace the records of the oldest ended sagas by tombstones (see PurgeEnded).

        Reads the store as of the batch's start, like every replica does: a saga
        that ended in this same batch is not in the ended index yet."""
        purge = record.purge_ended
        if self._format < RETENTION_FORMAT:
            return _reject(
                f"PurgeEnded needs log format {RETENTION_FORMAT} (the log is at {self._format})"
            )
        if record.saga_id:
            return _reject("PurgeEnded is a cluster record: the saga id must be empty")
        if not 0 < purge.max_sagas <= MAX_PURGE_PER_RECORD:
            return _reject(f"PurgeEnded: max_sagas must be 1..{MAX_PURGE_PER_RECORD}")
        count = 0
        for key, _ in self.kv.scan(ENDED):
            if count >= purge.max_sagas or _U64.unpack_from(key, 1)[0] >= max(
                0, purge.ended_before_unix_ms
            ):
                break
            number = key[9:17]
            ops.append((key, None))
            if number in purged:
                continue
            purged.add(number)
            name = self.kv.get(NAMES + number)
            assert name is not None, "an ended saga has no id"
            saga_id = name.decode()
            stone = self._tombstone_of(number, record.time_unix_ms, ops)
            ops.append((TOMBSTONES + number, stone.SerializeToString(deterministic=True)))
            # Cached as purged now: a later record of this batch must see the saga as
            # a replica that re-reads it from the store after this batch would.
            self._remember(saga_id, _Saga(_U64.unpack(number)[0], _tombstone_state(stone)))
            count += 1
        return log_pb2.RecordResult(verdict=ACCEPTED, purged=count)

    def _tombstone_of(
        self, number: bytes, purged_ms: int, ops: list[tuple[bytes, bytes | None]]
    ) -> log_pb2.Tombstone:
        """The saga's tombstone, folded from its records; their deletions go to `ops`."""
        stone = log_pb2.Tombstone(purged_unix_ms=purged_ms)
        state = SagaState()
        for key, value in self.kv.scan(RECORDS + number):
            ops.append((key, None))
            record = codec.decode_record(value)
            event = codec.to_event(record).event
            assert event is not None, "a stored record failed to decode"
            apply(state, event)
            body = codec.body_name(record)
            if body == "start_saga":
                stone.name = record.start_saga.definition.name
                stone.started_unix_ms = record.time_unix_ms
            elif body == "abort_saga":
                stone.abort_reason = record.abort_saga.reason
            elif body == "end_saga":
                stone.outcome = record.end_saga.outcome
                stone.ended_unix_ms = record.time_unix_ms
        stone.records = state.next_seq
        stone.start_fingerprint = start_fingerprint(state)
        return stone

    def _load(self, saga_id: str) -> _Saga:
        saga = self._cache.get(saga_id)
        if saga is not None:
            self._cache.move_to_end(saga_id)
            return saga
        number = self.saga_number(saga_id)
        state = SagaState()
        if number is not None:
            for _, value in self.kv.scan(RECORDS + _u64(number)):
                event = codec.to_event(codec.decode_record(value)).event
                assert event is not None, "a stored record failed to decode"
                apply(state, event)
            if state.next_seq == 0:
                stone = self._tombstone(number)
                if stone is not None:
                    state = _tombstone_state(stone)
        saga = _Saga(number if number is not None else -1, state)
        self._remember(saga_id, saga)
        return saga

    def _remember(self, saga_id: str, saga: _Saga) -> None:
        self._cache[saga_id] = saga
        self._cache.move_to_end(saga_id)
        if len(self._cache) > STATE_CACHE_SIZE:
            self._cache.popitem(last=False)

    # ---- reads ---------------------------------------------------------------------

    def log_format(self) -> int:
        raw = self.kv.get(FORMAT_KEY)
        return _U64.unpack(raw)[0] if raw else 1

    def applied_index(self) -> int:
        raw = self.kv.get(APPLIED_KEY)
        return _U64.unpack(raw)[0] if raw else 0

    def epoch(self) -> log_pb2.Epoch:
        epoch = log_pb2.Epoch()
        raw = self.kv.get(EPOCH_KEY)
        if raw:
            epoch.ParseFromString(raw)
        return epoch

    def _next_saga_number(self) -> int:
        raw = self.kv.get(NEXT_SAGA_KEY)
        return _U64.unpack(raw)[0] if raw else 1

    def saga_number(self, saga_id: str) -> int | None:
        raw = self.kv.get(IDS + saga_id.encode())
        return _U64.unpack(raw)[0] if raw else None

    def _tombstone(self, number: int) -> log_pb2.Tombstone | None:
        raw = self.kv.get(TOMBSTONES + _u64(number))
        if raw is None:
            return None
        stone = log_pb2.Tombstone()
        stone.ParseFromString(raw)
        return stone

    def tombstone(self, saga_id: str) -> log_pb2.Tombstone | None:
        """What is kept of a saga the retention policy purged (None: not purged)."""
        number = self.saga_number(saga_id)
        return None if number is None else self._tombstone(number)

    def oldest_ended_ms(self) -> int | None:
        """The EndSaga time of the oldest ended saga not purged yet (None: none)."""
        for key, _ in self.kv.scan(ENDED):
            return int(_U64.unpack_from(key, 1)[0])
        return None

    def records(self, saga_id: str) -> list[log_pb2.Record]:
        """Every accepted record of the saga, in log order ([] for an unknown id)."""
        number = self.saga_number(saga_id)
        if number is None:
            return []
        return [codec.decode_record(v) for _, v in self.kv.scan(RECORDS + _u64(number))]

    def records_from(self, saga_id: str, seq: int) -> list[log_pb2.Record]:
        """The saga's records from position `seq` on ([] for an unknown id)."""
        number = self.saga_number(saga_id)
        if number is None:
            return []
        prefix = RECORDS + _u64(number)
        return [codec.decode_record(v) for _, v in self.kv.scan(prefix, _U32.pack(seq))]

    def has_ended(self, saga_id: str) -> bool:
        """The saga exists and is out of the in-flight index (EndSaga applied)."""
        number = self.saga_number(saga_id)
        return number is not None and self.kv.get(IN_FLIGHT + _u64(number)) is None

    def saga_ids(self, after: str = "") -> Iterator[str]:
        """Every saga id in byte order, starting after `after`."""
        start = after.encode() + b"\x00" if after else b""
        for key, _ in self.kv.scan(IDS, start):
            yield key[1:].decode()

    def in_flight(self) -> Iterator[str]:
        """Ids of sagas with a StartSaga and no EndSaga: a range scan, not a full scan."""
        for key, _ in self.kv.scan(IN_FLIGHT):
            name = self.kv.get(NAMES + key[1:])
            if name is not None:
                yield name.decode()

    def members(self) -> dict[str, bytes]:
        return {k[1:].decode(): v for k, v in self.kv.scan(NODES)}

    def digest(self) -> Digest:
        """A hash of everything but the applied index, with the applied index it covers.

        Two replicas that applied the same entries have equal digests. One scan,
        which reads one point in time (a RocksDB iterator is a snapshot), so the
        applied index is the one the hash covers even while entries are applied."""
        h = hashlib.sha256()
        records = sagas = applied = 0
        for key, value in self.kv.scan(b""):
            if key == APPLIED_KEY:
                applied = _U64.unpack(value)[0]
                continue
            h.update(_U32.pack(len(key)) + key + _U32.pack(len(value)) + value)
            if key[:1] == RECORDS:
                records += 1
            elif key[:1] == IDS:
                sagas += 1
        return Digest(h.hexdigest(), records, sagas, applied)


@dataclass(frozen=True)
class Digest:
    sha256: str
    records: int
    sagas: int
    applied_index: int


def _tombstone_state(stone: log_pb2.Tombstone) -> SagaState:
    """What the rules know of a purged saga (see transitions.purged_state)."""
    return purged_state(stone.start_fingerprint, codec.OUTCOMES[stone.outcome], stone.records)


def _reject(reason: str, code: Reject = Reject.INVALID) -> log_pb2.RecordResult:
    return log_pb2.RecordResult(verdict=REJECTED, reason=reason, code=int(code))
