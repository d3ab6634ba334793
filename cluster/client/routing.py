"""Which nodes a client asks about a saga: those of the Raft group that holds it.

A cluster of several Raft groups serves its shard map from every node
(`Cluster.ShardMap`). A client reads it once from the nodes it was given and then
sends each saga's calls to its group's nodes. Until the map is known (or when no
node could give it) every call goes to the given nodes: any node sends a call
about another group's saga on to that group, so routing only saves that hop.
Shared by the blocking and the asyncio client.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from saga.v1 import cluster_pb2

from cluster.shardmap import ShardMap

# After no given node could answer ShardMap, ask again only after this long: calls
# meanwhile go to the given nodes (correct, one hop longer).
MAP_RETRY_S = 5.0


class Routes:
    def __init__(self, addrs: Sequence[str]) -> None:
        self.given = tuple(addrs)
        self.shard_map: ShardMap | None = None
        self._failed_at: float | None = None
        self._preferred: dict[tuple[str, ...], int] = {}  # node list -> index answering last

    def should_ask(self) -> bool:
        """Whether to ask for the shard map before the next call."""
        if self.shard_map is not None:
            return False
        return self._failed_at is None or time.monotonic() - self._failed_at >= MAP_RETRY_S

    def learned(self, reply: cluster_pb2.ShardMapReply | None) -> None:
        """The map a node answered, or None when none could."""
        if reply is None:
            self._failed_at = time.monotonic()
            return
        self.shard_map = ShardMap.from_reply(reply)

    def nodes_for(self, saga_id: str | None) -> tuple[str, ...]:
        """The nodes to ask about `saga_id` (None: a call about no saga, as List)."""
        if saga_id is None or self.shard_map is None or len(self.shard_map.groups) == 1:
            return self.given
        return self.shard_map.group_of(saga_id).nodes

    def first(self, nodes: tuple[str, ...]) -> int:
        return self._preferred.get(nodes, 0)

    def answered(self, nodes: tuple[str, ...], index: int) -> None:
        self._preferred[nodes] = index
