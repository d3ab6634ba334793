"""Which Raft group a saga belongs to: the shard map (pure).

A cluster may run several independent Raft groups on the same machines, each
with its own leader, coordinator and Saga Log. A saga belongs to exactly one
group, chosen by its id: the first four bytes of SHA-256 of the id's UTF-8
bytes, read big-endian, fall in one group's hash range [hash_start, hash_end).
The ranges cover [0, 2**32) with no gap and no overlap. Any client in any
language can route with this rule and the map every node serves
(`Cluster.ShardMap`).

Ranges rather than `hash mod N`: a group's range can later be split in two and
handed to a new group without moving any other group's sagas (see
docs/groups.md). The map is fixed when the cluster is created and given to every
node in a JSON file (`--shard-map`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from saga.v1 import cluster_pb2

HASH_SPACE = 1 << 32
MAX_GROUPS = 64
_ADDR_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


def saga_hash(saga_id: str) -> int:
    """The saga's place in [0, 2**32): the first four bytes of SHA-256, big-endian."""
    return int.from_bytes(hashlib.sha256(saga_id.encode()).digest()[:4], "big")


@dataclass(frozen=True)
class Group:
    index: int
    hash_start: int
    hash_end: int  # exclusive
    nodes: tuple[str, ...]  # the gRPC address of each of its nodes

    def owns(self, saga_id: str) -> bool:
        return self.hash_start <= saga_hash(saga_id) < self.hash_end


@dataclass(frozen=True)
class ShardMap:
    groups: tuple[Group, ...]

    def __post_init__(self) -> None:
        error = _map_error(self.groups)
        if error:
            raise ValueError(f"shard map: {error}")

    def group_of(self, saga_id: str) -> Group:
        starts = [g.hash_start for g in self.groups]
        return self.groups[bisect.bisect_right(starts, saga_hash(saga_id)) - 1]

    def group_with(self, grpc_addr: str) -> Group | None:
        return next((g for g in self.groups if grpc_addr in g.nodes), None)

    @staticmethod
    def single(nodes: Sequence[str]) -> ShardMap:
        """A cluster of one group: every saga is its."""
        return ShardMap((Group(0, 0, HASH_SPACE, tuple(nodes)),))

    @staticmethod
    def even(groups: Sequence[Sequence[str]]) -> ShardMap:
        """One group per list of node addresses, the hash space cut in equal ranges."""
        n = len(groups)
        if not 0 < n <= MAX_GROUPS:
            raise ValueError(f"shard map: 1 to {MAX_GROUPS} groups, got {n}")
        bounds = [i * HASH_SPACE // n for i in range(n + 1)]
        cut = [Group(i, bounds[i], bounds[i + 1], tuple(nodes)) for i, nodes in enumerate(groups)]
        return ShardMap(tuple(cut))

    def to_json(self) -> str:
        doc = {
            "groups": [
                {
                    "group": g.index,
                    "hash_start": g.hash_start,
                    "hash_end": g.hash_end,
                    "nodes": list(g.nodes),
                }
                for g in self.groups
            ]
        }
        return json.dumps(doc, indent=2) + "\n"

    @staticmethod
    def from_json(text: str) -> ShardMap:
        try:
            doc = json.loads(text)
            groups = tuple(
                Group(
                    index=_int(g["group"]),
                    hash_start=_int(g["hash_start"]),
                    hash_end=_int(g["hash_end"]),
                    nodes=tuple(str(a) for a in g["nodes"]),
                )
                for g in doc["groups"]
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"shard map: not a map of groups ({exc!r})") from None
        return ShardMap(groups)

    def to_reply(self, own: Group) -> cluster_pb2.ShardMapReply:
        reply = cluster_pb2.ShardMapReply(group=own.index)
        for g in self.groups:
            reply.groups.add(
                group=g.index, hash_start=g.hash_start, hash_end=g.hash_end, grpc_addrs=g.nodes
            )
        return reply

    @staticmethod
    def from_reply(reply: cluster_pb2.ShardMapReply) -> ShardMap:
        return ShardMap(
            tuple(
                Group(g.group, g.hash_start, g.hash_end, tuple(g.grpc_addrs)) for g in reply.groups
            )
        )

    @staticmethod
    def load(path: str) -> ShardMap:
        with open(path, encoding="utf-8") as f:
            return ShardMap.from_json(f.read())


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _map_error(groups: Sequence[Group]) -> str:
    """Why these groups are not a shard map ("" when they are)."""
    if not 0 < len(groups) <= MAX_GROUPS:
        return f"1 to {MAX_GROUPS} groups, got {len(groups)}"
    expected_start = 0
    seen: set[str] = set()
    for i, g in enumerate(groups):
        if g.index != i:
            return f"groups must be numbered 0, 1, ... in order; found {g.index} at {i}"
        if g.hash_start != expected_start or not g.hash_start < g.hash_end <= HASH_SPACE:
            return (
                f"group {i}: hash range [{g.hash_start}, {g.hash_end}) must start at "
                f"{expected_start} and be non-empty within [0, {HASH_SPACE})"
            )
        expected_start = g.hash_end
        if not g.nodes:
            return f"group {i} has no nodes"
        for addr in g.nodes:
            if not _ADDR_RE.match(addr):
                return f"group {i}: node address {addr!r} is not HOST:PORT"
            if addr in seen:
                return f"node address {addr} is in two groups"
            seen.add(addr)
    if expected_start != HASH_SPACE:
        return f"the ranges end at {expected_start}, not {HASH_SPACE}: some sagas have no group"
    return ""
