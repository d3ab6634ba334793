"""The address file of a local cluster: `cluster.json` in its base directory.

The test kit's launcher writes it; `sagactl` reads it so that commands find a local
cluster's nodes without `--addr`.
"""

from __future__ import annotations

import json
import os

STATE_FILE = "cluster.json"


def group_dirs(base_dir: str) -> list[str]:
    """The directories whose state files list the local cluster's nodes: each
    group's, for a cluster of several Raft groups (`sagactl cluster up --groups`);
    [base_dir] itself for a cluster of one."""
    with open(os.path.join(base_dir, STATE_FILE)) as f:
        groups = json.load(f).get("groups")
    return [os.path.join(base_dir, g) for g in groups] if groups else [base_dir]


def grpc_addresses(base_dir: str) -> list[str]:
    """Every node's gRPC address, in node order. FileNotFoundError if no cluster."""
    addrs = []
    for directory in group_dirs(base_dir):
        with open(os.path.join(directory, STATE_FILE)) as f:
            addrs += [node["grpc_addr"] for node in json.load(f)["nodes"]]
    return addrs
