"""The address file of a local cluster: `cluster.json` in its base directory.

The test kit's launcher writes it; `sagactl` reads it so that commands find a local
cluster's nodes without `--addr`.
"""

from __future__ import annotations

import json
import os

STATE_FILE = "cluster.json"


def grpc_addresses(base_dir: str) -> list[str]:
    """Every node's gRPC address, in node order. FileNotFoundError if no cluster."""
    with open(os.path.join(base_dir, STATE_FILE)) as f:
        return [node["grpc_addr"] for node in json.load(f)["nodes"]]
