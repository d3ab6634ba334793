"""Node configuration: flags, TOML file, validation messages."""

from __future__ import annotations

import pytest

from cluster.runtime.config import from_args

INSECURE = ["--insecure-raft"]  # loopback addresses: allowed without a password
BASE = [
    "--id", "n1",
    "--raft-addr", "127.0.0.1:7001",
    "--grpc-addr", "127.0.0.1:8001",
    "--data-dir", "/tmp/x",
    "--peer", "n2=127.0.0.1:7002,127.0.0.1:8002",
    "--peer", "n3=127.0.0.1:7003,127.0.0.1:8003",
    *INSECURE,
]  # fmt: skip


def _node(raft_addr: str, *peers: str) -> list[str]:
    argv = ["--id", "n1", "--raft-addr", raft_addr, "--grpc-addr", "127.0.0.1:8001"]
    argv += ["--data-dir", "/tmp/x"]
    for peer in peers:
        argv += ["--peer", peer]
    return argv


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
        from_args(BASE[:8] + ["--peer", "n2=127.0.0.1:7002,127.0.0.1:8002"] + INSECURE)


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


def test_a_node_refuses_to_start_without_a_raft_password() -> None:
    without = [a for a in BASE if a not in INSECURE]
    with pytest.raises(ValueError, match="--raft-password-file"):
        from_args(without)


@pytest.mark.parametrize(
    "addr,peer",
    [
        ("10.0.0.1:7001", "n2=127.0.0.1:7002,127.0.0.1:8002"),  # this node exposed
        ("127.0.0.1:7001", "n2=192.168.1.2:7002,127.0.0.1:8002"),  # a peer exposed
        ("127.0.0.1:7001", "n2=db.example.com:7002,127.0.0.1:8002"),  # a name, not loopback
    ],
)
def test_insecure_raft_only_on_loopback(addr, peer) -> None:
    with pytest.raises(ValueError, match="loopback"):
        from_args(_node(addr, peer, "n3=127.0.0.1:7003,10.0.0.3:8003") + INSECURE)


def test_insecure_raft_accepts_every_loopback_form() -> None:
    argv = _node(
        "localhost:7001", "n2=127.0.0.2:7002,127.0.0.1:8002", "n3=[::1]:7003,127.0.0.1:8003"
    )
    config, _ = from_args(argv + INSECURE)
    assert config.insecure_raft and config.raft_password is None


def test_a_password_file_allows_any_address(tmp_path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("a long enough secret\n")
    argv = _node("10.0.0.1:7001", "n2=10.0.0.2:7002,10.0.0.2:8002", "n3=10.0.0.3:7003,x:1")
    config, _ = from_args(argv + ["--raft-password-file", str(secret)])
    assert config.raft_password == "a long enough secret" and not config.insecure_raft


def test_a_non_loopback_grpc_address_needs_tls_and_auth_or_insecure_grpc(tmp_path) -> None:
    argv = BASE + ["--grpc-addr", "10.0.0.1:8001"]
    with pytest.raises(ValueError, match="--tls-cert/--tls-key and --auth-file"):
        from_args(argv)
    tls = ["--tls-cert", "n.pem", "--tls-key", "n.key"]
    with pytest.raises(ValueError, match="give --auth-file"):
        from_args(argv + tls)
    secret = tmp_path / "raft.secret"
    secret.write_text("a long enough secret")
    auth = ["--auth-file", str(tmp_path / "auth.toml"), "--raft-password-file", str(secret)]
    config, _ = from_args(argv + tls + auth)
    assert config.tls_cert == "n.pem" and not config.insecure_grpc
    config, _ = from_args(argv + ["--insecure-grpc"])
    assert config.insecure_grpc


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--tls-cert", "n.pem"], "together"),
        (["--tls-key", "n.key"], "together"),
        (["--tls-require-client-cert", "--tls-cert", "a", "--tls-key", "b"], "--tls-ca"),
    ],
)
def test_tls_flags_come_in_working_sets(flags, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        from_args(BASE + flags)


def test_participant_allow_list_from_flags() -> None:
    config, _ = from_args(BASE + ["--participant-allow", "h:1", "--participant-allow", "h2:*"])
    assert config.participant_allow == ("h:1", "h2:*")


def test_an_auth_file_needs_a_raft_password(tmp_path) -> None:
    with pytest.raises(ValueError, match="--auth-file needs --raft-password-file"):
        from_args(BASE + ["--auth-file", str(tmp_path / "auth.toml")])


def test_the_web_page_on_a_public_address_needs_tls_and_auth_as_grpc_does(tmp_path) -> None:
    secret = tmp_path / "raft.secret"
    secret.write_text("a-long-enough-secret")
    base = [
        "--id", "n1", "--raft-addr", "127.0.0.1:7001", "--grpc-addr", "127.0.0.1:8001",
        "--data-dir", str(tmp_path / "n1"), "--raft-password-file", str(secret),
        "--peer", "n2=127.0.0.1:7002,127.0.0.1:8002", "--peer", "n3=127.0.0.1:7003,127.0.0.1:8003",
    ]  # fmt: skip
    config, _ = from_args(
        [*base, "--http-addr", "127.0.0.1:9001", "--metrics-addr", "0.0.0.0:9100"]
    )
    assert config.http_addr == "127.0.0.1:9001" and config.metrics_addr == "0.0.0.0:9100"
    with pytest.raises(ValueError, match="not loopback"):
        from_args([*base, "--http-addr", "0.0.0.0:9001"])
    assert from_args([*base, "--http-addr", "0.0.0.0:9001", "--insecure-grpc"])[0].insecure_grpc
    with pytest.raises(ValueError, match="--metrics-addr"):
        from_args([*base, "--metrics-addr", "nowhere"])
    with pytest.raises(SystemExit):  # argparse: an unknown choice
        from_args([*base, "--log-format", "xml"])
