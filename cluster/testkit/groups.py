"""A local cluster of several Raft groups: a `LocalCluster` per group.

Group i lives in `<base>/g<i>` with node ids `g<i>-n1`, `g<i>-n2`, ... All groups
share one Raft password, one auth file and one set of TLS certificates (a node
sends a call about another group's saga on to that group with the caller's token,
over TLS), and one shard map, `<base>/shards.json`, cutting the hash space in
equal ranges. `<base>/cluster.json` names the groups' directories, whose own
state files list their nodes (`cluster.localstate.group_dirs`), so `sagactl` finds
them all and `sagactl cluster down` stops them all.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from saga.v1 import cluster_pb2

from cluster.localstate import STATE_FILE
from cluster.shardmap import ShardMap
from cluster.testkit.launcher import LocalCluster

SHARD_MAP_FILE = "shards.json"


class ShardedCluster:
    def __init__(self, base_dir: str, groups: int, nodes: int = 3, **options: Any) -> None:
        """`options`: LocalCluster's (auth, tls, http, timing, ...), for every group."""
        if groups < 2:
            raise ValueError("a sharded cluster has at least 2 groups (1 is a LocalCluster)")
        self.base_dir = os.path.abspath(base_dir)
        os.makedirs(self.base_dir, exist_ok=True)
        password = options.pop("password", None) or secrets.token_urlsafe(32)
        first = LocalCluster(
            os.path.join(self.base_dir, "g0"), nodes, password=password, id_prefix="g0-", **options
        )
        self.groups = [first]
        # The others reuse the first group's auth file and certificates (its
        # extra_args name them), so that tokens and TLS hold across groups.
        shared = {k: v for k, v in options.items() if k not in ("auth", "tls", "extra_args")}
        shared["test_propose"] = False  # already among the first group's extra_args
        for i in range(1, groups):
            group = LocalCluster(
                os.path.join(self.base_dir, f"g{i}"),
                nodes,
                password=password,
                id_prefix=f"g{i}-",
                extra_args=first.extra_args,
                **shared,
            )
            group.tokens, group.metadata = first.tokens, first.metadata
            group.client_tls, group.tls_dir = first.client_tls, first.tls_dir
            self.groups.append(group)
        self.shard_map = ShardMap.even(
            [[s.grpc_addr for s in g.specs.values()] for g in self.groups]
        )
        self.shard_map_file = os.path.join(self.base_dir, SHARD_MAP_FILE)
        with open(self.shard_map_file, "w") as f:
            f.write(self.shard_map.to_json())
        for group in self.groups:
            group.extra_args = (*group.extra_args, "--shard-map", self.shard_map_file)

    @property
    def tokens(self) -> dict[str, str]:
        return self.groups[0].tokens

    @property
    def client_tls(self) -> Any:
        return self.groups[0].client_tls

    def grpc_addrs(self) -> list[str]:
        return [s.grpc_addr for g in self.groups for s in g.specs.values()]

    def start_all(self, detach: bool = False) -> None:
        for group in self.groups:
            group.start_all(detach)
        self.save_state()

    def save_state(self) -> None:
        """Where each group's own state file is: the nodes are recorded there only
        (a rolling restart updates a group's file; a copy here would go stale)."""
        groups = [os.path.basename(g.base_dir) for g in self.groups]
        with open(os.path.join(self.base_dir, STATE_FILE), "w") as f:
            json.dump({"groups": groups}, f, indent=2)

    def wait_for_leaders(self, timeout_s: float = 15.0) -> list[cluster_pb2.StatusReply]:
        """Each group's leader, once in office."""
        return [g.wait_for_leader(timeout_s) for g in self.groups]

    def stop_all(self) -> None:
        for group in self.groups:
            group.stop_all()

    def logs(self, tail_lines: int = 60) -> str:
        return "\n".join(g.logs(tail_lines) for g in self.groups)

    @contextmanager
    def running(self, timeout_s: float = 20.0) -> Iterator[ShardedCluster]:
        """As LocalCluster.running, for every group."""
        self.start_all()
        try:
            self.wait_for_leaders(timeout_s)
            yield self
        except BaseException:
            print(self.logs(80))
            raise
        finally:
            self.stop_all()
