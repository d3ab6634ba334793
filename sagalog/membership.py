"""Who votes: the Raft configuration as a node's log says it (pure, bar unpickling
pysyncobj's own entries).

pysyncobj appends a membership change as an entry whose command is the byte 2
followed by pickle(['add' | 'rem', address, node]). A node uses the latest
configuration in its log, committed or not (Raft thesis 4.1): the configuration
its log starts from (`base`: as of its first entry, from its snapshot or its
command line) with every change in the log applied in order. Computing it again
from the log, rather than following pysyncobj's changes one by one, keeps it right
across the cases pysyncobj misses: a restart (it replays changes only as entries
are applied), a truncated suffix (this project's log matching drops entries
without undoing their changes), and a snapshot that was taken after a later change
was appended.

A node is a pysyncobj `TCPNode` whose id is its Raft address and which carries the
cluster's own names for it (`node_id`, `grpc_addr`): pysyncobj pickles the node
object into the entry that adds it, so every replica learns them with the change.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from typing import Any

from pysyncobj.node import Node, TCPNode

MEMBERSHIP = 2  # pysyncobj's _COMMAND_TYPE.MEMBERSHIP: an entry's first byte
ADD, REMOVE = "add", "rem"

Change = tuple[str, TCPNode]  # (ADD | REMOVE, the node)


def raft_node(raft_addr: str, node_id: str = "", grpc_addr: str = "") -> TCPNode:
    """The node at `raft_addr`, with the cluster's names for it."""
    return TCPNode(raft_addr, node_id=node_id, grpc_addr=grpc_addr)


def change_command(kind: str, node: TCPNode) -> bytes:
    """The entry pysyncobj appends for a change (what `addNodeToCluster` builds)."""
    return bytes([MEMBERSHIP]) + pickle.dumps([kind, node.id, node])


def change_in(command: bytes) -> Change | None:
    """The membership change an entry holds, or None for any other entry."""
    if not command or command[0] != MEMBERSHIP:
        return None
    kind, address, node = pickle.loads(command[1:])  # the cluster's own Raft entries
    if not isinstance(node, Node):
        node = TCPNode(address)
    return kind, node


def fold(base: Mapping[str, TCPNode], changes: Iterable[Change]) -> dict[str, TCPNode]:
    """The configuration after `changes`, applied in log order to `base` (Raft
    address -> node). Idempotent per node: the last change about a node decides,
    so a base that already reflects some of the changes gives the same answer."""
    members = dict(base)
    for kind, node in changes:
        if kind == ADD:
            members[node.id] = node
        elif kind == REMOVE:
            members.pop(node.id, None)
    return members


def names(node: Any) -> tuple[str, str]:
    """(node id, gRPC address) a node carries; empty for a node from before they did."""
    return getattr(node, "node_id", ""), getattr(node, "grpc_addr", "")
