"""`sagactl` as a user runs it: cluster up, travel up, submit a YAML file, get, down."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
