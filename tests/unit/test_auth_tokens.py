"""Auth files, tokens and roles (cluster.auth), without a server."""

from __future__ import annotations

import os
import stat

import pytest

from cluster import auth
from sagalog.definition import check_endpoint, endpoint_allowed


def test_tokens_are_stored_as_hashes_in_a_private_file(tmp_path) -> None:
    path = str(tmp_path / "auth.toml")
    client = auth.add_token(path, "checkout", "client")
    admin = auth.add_token(path, "ops", "admin")
    text = open(path).read()
    assert client not in text and admin not in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    callers = auth.load(path)
    assert callers[auth.token_hash(client)] == auth.Caller("checkout", "client")
    assert callers[auth.token_hash(admin)].role == "admin"


def test_roles_nest() -> None:
    client, operator, admin = (auth.Caller("x", r) for r in auth.ROLES)
    assert client.may("client") and not client.may("operator") and not client.may("admin")
    assert operator.may("client") and operator.may("operator") and not operator.may("admin")
    assert admin.may("admin")
    assert auth.Caller("peer", auth.NODE).may("admin")


def test_every_method_of_the_services_has_a_role() -> None:
    from saga.v1 import cluster_pb2, sagas_pb2

    for service in (sagas_pb2.DESCRIPTOR.services_by_name["Sagas"],
                    cluster_pb2.DESCRIPTOR.services_by_name["Cluster"]):  # fmt: skip
        for method in service.methods:
            assert f"/{service.full_name}/{method.name}" in auth.METHOD_ROLES, method.name


@pytest.mark.parametrize(
    "content,needle",
    [
        ("[[token]]\nname = 'a'\nrole = 'root'\nsha256 = '" + "0" * 64 + "'\n", "role"),
        ("[[token]]\nname = 'a'\nrole = 'client'\nsha256 = 'abc'\n", "64 hex"),
        ("", "no \\[\\[token\\]\\]"),
        ("not toml [", "cannot read"),
    ],
)
def test_a_bad_auth_file_is_refused_with_a_reason(tmp_path, content, needle) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(content)
    with pytest.raises(auth.AuthError, match=needle):
        auth.load(str(path))


def test_the_authenticator_finds_callers_by_token() -> None:
    token = "s3cret-token"
    a = auth.Authenticator({auth.token_hash(token): auth.Caller("c", "client")}, "raft-pass")
    assert a.caller(auth.bearer(token)) == auth.Caller("c", "client")
    assert a.caller(auth.bearer("other")) is None
    assert a.caller([]) is None
    assert a.caller([("authorization", "Basic " + token)]) is None
    assert a.caller(auth.bearer(auth.node_credential("raft-pass"))).role == auth.NODE
    assert a.caller(auth.bearer(auth.node_credential("another cluster"))) is None


@pytest.mark.parametrize(
    "endpoint",
    [
        "unix:/var/run/x.sock",
        "unix:///tmp/a:80",
        "dns:///example.com:443",
        "vsock:3:5000",
        "host:0",
        "host:65536",
        "host:99999",
        "host",
        ":80",
        "a" * 254 + ":80",
        "bad_host:80",
        "[not-ipv6]:80",
        "host:80/path",
        "ho st:80",
        "host:-1",
    ],
)
def test_only_host_port_endpoints_are_accepted(endpoint) -> None:
    assert check_endpoint(endpoint)


@pytest.mark.parametrize(
    "endpoint", ["127.0.0.1:50061", "localhost:1", "hotel.internal:65535", "[::1]:8080"]
)
def test_host_port_endpoints_pass(endpoint) -> None:
    assert check_endpoint(endpoint) == ""


def test_the_allow_list_admits_exact_endpoints_and_whole_hosts() -> None:
    allowed = ("hotel:50061", "car:*")
    assert endpoint_allowed("hotel:50061", allowed)
    assert not endpoint_allowed("hotel:50062", allowed)
    assert endpoint_allowed("car:1", allowed)
    assert not endpoint_allowed("evil:1", allowed)
    assert endpoint_allowed("anything:1", ())
