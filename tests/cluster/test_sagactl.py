"""`sagactl` as a user runs it: cluster up, travel up, submit a YAML file, get, down."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster.testkit.commands import local_nodes
from cluster.testkit.launcher import LocalCluster
from cluster.testkit.rolling import pid_alive

pytestmark = pytest.mark.cluster


def sagactl(cwd, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.client.sagactl", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_a_user_session(tmp_path) -> None:
    try:
        up = sagactl(tmp_path, "cluster", "up", "--nodes", "3")
        assert "leader" in up.stdout and up.stdout.count("follower") == 2
        assert up.stdout.count("web page http://127.0.0.1:") == 3
        sagactl(tmp_path, "travel", "up")
        definition = os.path.join("sagacluster-data", "travel.yaml")
        done = sagactl(tmp_path, "saga", "submit", definition, "--id", "t1", "--watch")
        assert "COMPLETED" in done.stdout and "end_saga" in done.stdout
        got = sagactl(tmp_path, "saga", "get", "t1")
        assert got.stdout.count("DONE") == 4
        bulk = sagactl(tmp_path, "saga", "submit", definition, "--id", "bulk", "--count", "5")
        assert "submitted 5 sagas bulk-1 .. bulk-5" in bulk.stdout
        listed = sagactl(tmp_path, "saga", "list")
        again = sagactl(tmp_path, "saga", "submit", definition, "--id", "bulk", "--count", "5")
        assert again.returncode == 0  # the same ids: idempotent
        assert sagactl(tmp_path, "saga", "list").stdout.count("bulk-") == 5  # nothing new
        assert "t1" in listed.stdout
        assert sum(f"bulk-{i} " in listed.stdout for i in range(1, 6)) == 5
        late = sagactl(tmp_path, "saga", "abort", "t1", check=False)
        assert late.returncode == 1 and "FAILED_PRECONDITION" in late.stderr
        bad = tmp_path / "bad.yaml"
        bad.write_text("name: x\nvertices: []\n")
        refused = sagactl(tmp_path, "saga", "submit", str(bad), check=False)
        assert refused.returncode == 1 and "no vertices" in refused.stderr
        status = sagactl(tmp_path, "cluster", "status")
        assert status.stdout.count("leader") >= 1
        rolled = sagactl(tmp_path, "cluster", "rolling-restart")
        assert rolled.stdout.count("restarted and serving") == 3, rolled.stdout
        assert "handed leadership to" in rolled.stdout
        after = sagactl(tmp_path, "saga", "submit", definition, "--id", "t2", "--watch")
        assert "COMPLETED" in after.stdout
    finally:
        sagactl(tmp_path, "travel", "down", check=False)
        sagactl(tmp_path, "cluster", "down", check=False)


def test_sagactl_adds_a_started_node_and_removes_the_leader(tmp_path) -> None:
    with LocalCluster(str(tmp_path / "c"), nodes=3).running() as cluster:
        spec = cluster.start_joining("n4")
        addr = ",".join(cluster.specs[n].grpc_addr for n in cluster.members)
        added = sagactl(
            tmp_path,
            *("cluster", "add-node", "--addr", addr, "--id", "n4"),
            *("--raft-addr", spec.raft_addr, "--grpc-addr", spec.grpc_addr),
        )
        assert added.stdout.count("raft 127.0.0.1:") == 4 and "n4 " in added.stdout
        cluster.members.append("n4")
        leader = cluster.leader_id()
        removed = sagactl(tmp_path, "cluster", "remove-node", "--addr", addr, "--id", leader)
        assert removed.stdout.count("raft 127.0.0.1:") == 3
        listed = [line.split()[0] for line in removed.stdout.splitlines() if " raft " in line]
        assert leader not in listed and f"{leader} no longer votes" in removed.stdout
        cluster.members.remove(leader)
        assert cluster.wait_for_leader(15).id != leader
        refused = sagactl(
            tmp_path, "cluster", "remove-node", "--addr", addr, "--id", "n4", check=False
        )
        assert refused.returncode != 0 and "at least 3 members" in refused.stderr


def test_a_cluster_of_two_groups_goes_up_restarts_and_comes_down_whole(tmp_path) -> None:
    data = str(tmp_path / "g")
    try:
        up = sagactl(tmp_path, "cluster", "up", "--groups", "2", "--dir", data)
        assert "group 0: leader" in up.stdout and "group 1: leader" in up.stdout
        status = sagactl(tmp_path, "cluster", "status", "--dir", data)
        assert "group 0 (hash 0x00000000-0x7fffffff)" in status.stdout
        assert status.stdout.count("in office") == 2
        rolled = sagactl(tmp_path, "cluster", "rolling-restart", "--dir", data)
        assert rolled.stdout.count("restarted and serving") == 6, rolled.stdout
    finally:
        down = sagactl(tmp_path, "cluster", "down", "--dir", data, check=False)
    assert "stopped 6 nodes" in down.stdout, down.stdout + down.stderr
    # The restarted processes too: each group's state file has their pids.
    running = [s.pid for s in local_nodes(data) if pid_alive(s.pid)]
    assert running == []
