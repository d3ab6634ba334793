"""A node's identity on disk: which node a data directory belongs to, and its incarnation.

The incarnation is random bytes chosen once, when the data directory is created.
The cluster registers each node's incarnation in the replicated log (a `Member`
record). A node that comes back with a new incarnation has lost its journal, and
with it the votes it cast: it is refused until an operator runs
`sagactl cluster forget-node`.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass

from sagalog.fsync import replace_durably

IDENTITY_FILE = "node.json"


class IdentityError(Exception):
    """The data directory belongs to another node or is unreadable."""


@dataclass(frozen=True)
class Identity:
    node_id: str
    incarnation: bytes
    created: bool  # True when this start created the data directory's identity


def open_data_dir(data_dir: str, node_id: str) -> Identity:
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, IDENTITY_FILE)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            stored_id, incarnation = doc["node_id"], bytes.fromhex(doc["incarnation"])
        except (OSError, ValueError, KeyError) as exc:
            raise IdentityError(f"{path} is unreadable: {exc}") from exc
        if stored_id != node_id:
            raise IdentityError(
                f"{data_dir} belongs to node {stored_id!r}, not {node_id!r}: "
                "give each node its own data directory"
            )
        return Identity(node_id, incarnation, created=False)
    leftovers = [n for n in os.listdir(data_dir) if n in ("journal", "db", "snapshot")]
    if leftovers:
        raise IdentityError(
            f"{data_dir} holds {leftovers} but no {IDENTITY_FILE}: it was not created by "
            "sagalog-node, or it is damaged; move it aside and re-add the node"
        )
    return Identity(node_id, secrets.token_bytes(16), created=True)


def persist(data_dir: str, identity: Identity) -> None:
    """Write the identity durably (temp file, fsync, rename, fsync the directory)."""
    path = os.path.join(data_dir, IDENTITY_FILE)
    doc = {"node_id": identity.node_id, "incarnation": identity.incarnation.hex()}
    replace_durably(path, path + ".tmp", [json.dumps(doc).encode()])
