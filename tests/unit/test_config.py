"""Node configuration: flags, TOML file, validation messages."""

from __future__ import annotations

import pytest

from cluster.config import from_args

BASE = [
    "--id", "n1",
    "--raft-addr", "127.0.0.1:7001",
    "--grpc-addr", "127.0.0.1:8001",
    "--data-dir", "/tmp/x",
    "--peer", "n2=127.0.0.1:7002,127.0.0.1:8002",
    "--peer", "n3=127.0.0.1:7003,127.0.0.1:8003",
]  # fmt: skip


def test_flags_make_a_valid_config() -> None:
    config, level = from_args(BASE)
    assert config.id == "n1" and [p.id for p in config.peers] == ["n2", "n3"]
    assert level == "INFO"


@pytest.mark.parametrize(
    "change,needle",
    [
        (["--id", "bad id"], "--id"),
        (["--raft-addr", "nowhere"], "HOST:PORT"),
        (["--peer", "n4"], "expected ID="),
    ],
)
def test_bad_flags_get_clear_errors(change, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        from_args(BASE + change)


def test_cluster_size_is_three_or_five() -> None:
    with pytest.raises(ValueError, match="3 or 5"):
        from_args(BASE[:8] + ["--peer", "n2=127.0.0.1:7002,127.0.0.1:8002"])


def test_config_file_with_timing_and_flags_override(tmp_path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("a long enough secret\n")
    conf = tmp_path / "node.toml"
    conf.write_text(
        f"""
id = "n9"
raft_addr = "127.0.0.1:7001"
grpc_addr = "127.0.0.1:8001"
data_dir = "/tmp/y"
raft_password_file = "{secret}"
propose_timeout_ms = 1234
[[peers]]
id = "n2"
raft_addr = "127.0.0.1:7002"
grpc_addr = "127.0.0.1:8002"
[[peers]]
id = "n3"
raft_addr = "127.0.0.1:7003"
grpc_addr = "127.0.0.1:8003"
[timing]
election_min_ms = 500
election_max_ms = 900
"""
    )
    config, _ = from_args(["--config", str(conf), "--id", "n1"])
    assert config.id == "n1" and config.data_dir == "/tmp/y"
    assert config.raft_password == "a long enough secret"
    assert config.propose_timeout_ms == 1234
    assert config.timing.election_min_ms == 500


def test_timing_that_pysyncobj_would_reject_is_refused_early(tmp_path) -> None:
    conf = tmp_path / "node.toml"
    conf.write_text("[timing]\nelection_min_ms = 50\nappend_period_ms = 25\n")
    with pytest.raises(ValueError, match="3 x append_period_ms"):
        from_args(["--config", str(conf)] + BASE)
