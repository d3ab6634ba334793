"""Who may do what on a node: bearer tokens, each with a role.

Roles nest: `client` may Submit, Run, Get, List and Watch; `operator` may also
Abort and Resolve and read a saga's raw log; `admin` may also make the Cluster
service's changing calls. A caller sends `authorization: Bearer <token>`; a
missing or unknown token is UNAUTHENTICATED, a role too weak for the method
PERMISSION_DENIED. Every operator and admin call is logged with the caller's name.

The auth file (`--auth-file`, TOML) holds only hashes, never tokens:

    [[token]]
    name = "checkout-service"   # who, for the logs
    role = "client"
    sha256 = "9f86d0..."        # sha256 of the token, hex

`sagactl auth add-token` makes a token, prints it once and appends its hash.
Nodes authenticate to each other (forwarding carries the caller's own token;
a starting node's wipe check asks its peers' Status) with a node credential
derived from the Raft password, which only cluster members hold.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from sagalog.framecipher import derived_secret

log = logging.getLogger("sagacluster.auth")

ROLES = ("client", "operator", "admin")  # each role may do what the ones before it may
NODE = "node"  # the role of another node of this cluster (as admin)
HEADER = "authorization"
MAX_TOKENS = 10_000
MAX_TOKEN_LEN = 512

_SAGAS = "/saga.v1.Sagas/"
_CLUSTER = "/saga.v1.Cluster/"
_REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/"
# Served by grpcio-reflection only as v1alpha: a v1 call must reach the server to be
# answered UNIMPLEMENTED, on which grpcurl and other tools fall back to v1alpha.
_REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/"
METHOD_ROLES = {
    _SAGAS + "Submit": "client",
    _SAGAS + "Run": "client",
    _SAGAS + "Get": "client",
    _SAGAS + "List": "client",
    _SAGAS + "Watch": "client",
    _SAGAS + "Abort": "operator",
    _SAGAS + "Resolve": "operator",
    _CLUSTER + "Status": "client",
    _CLUSTER + "ReadIndex": "client",  # a follower asks it for a client's read
    _CLUSTER + "ShardMap": "client",  # clients route by it
    _CLUSTER + "Digest": "operator",
    _CLUSTER + "ReadSaga": "operator",
    _CLUSTER + "Propose": "admin",
    _CLUSTER + "ForgetMember": "admin",
    _CLUSTER + "TransferLeadership": "admin",
    _CLUSTER + "AddNode": "admin",
    _CLUSTER + "RemoveNode": "admin",
    _REFLECTION + "ServerReflectionInfo": "client",  # lists services and their schemas
    _REFLECTION_V1 + "ServerReflectionInfo": "client",
    "/grpc.health.v1.Health/Watch": "client",  # a held stream: not for anyone
}
# Load balancers and orchestrators probe health without credentials; the answer
# says only whether the node serves. (Watch holds a stream: it needs a token.)
PUBLIC = frozenset({"/grpc.health.v1.Health/Check"})
STREAMING = frozenset({_SAGAS + "Watch", "/grpc.health.v1.Health/Watch"})
BIDI_STREAMING = frozenset(
    {_REFLECTION + "ServerReflectionInfo", _REFLECTION_V1 + "ServerReflectionInfo"}
)


class AuthError(ValueError):
    """The auth file is missing, malformed or names an unknown role."""


@dataclass(frozen=True)
class Caller:
    name: str
    role: str

    def may(self, needed: str) -> bool:
        if self.role == NODE:
            return True
        return ROLES.index(self.role) >= ROLES.index(needed)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def node_credential(raft_password: str) -> str:
    """The token nodes of one cluster present to each other: only holders of the
    Raft password can compute it, and it is derived from the stretched cluster key,
    so a captured credential does not make guessing the password cheap."""
    return derived_secret(raft_password, b"sagacluster grpc node credential").hex()


def bearer(token: str | None) -> list[tuple[str, str]]:
    """Call metadata carrying `token` (none without one)."""
    return [(HEADER, f"Bearer {token}")] if token else []


def load(path: str) -> dict[str, Caller]:
    """token sha256 -> caller, from an auth file."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise AuthError(f"cannot read the auth file {path}: {exc}") from exc
    entries = doc.get("token", [])
    if not isinstance(entries, list) or len(entries) > MAX_TOKENS:
        raise AuthError(f"{path}: expected at most {MAX_TOKENS} [[token]] tables")
    callers: dict[str, Caller] = {}
    for i, entry in enumerate(entries):
        name, role, digest = entry.get("name"), entry.get("role"), entry.get("sha256")
        if not isinstance(name, str) or not name or role not in ROLES:
            raise AuthError(f"{path}: token {i}: give a name and a role in {ROLES}")
        if not isinstance(digest, str) or len(digest) != 64:
            raise AuthError(f"{path}: token {name!r}: sha256 must be 64 hex digits")
        callers[digest.lower()] = Caller(name, role)
    if not callers:
        raise AuthError(f"{path}: no [[token]] entries: no one could call this node")
    return callers


def add_token(path: str, name: str, role: str) -> str:
    """A new random token for `name` with `role`; its hash is appended to `path`
    (created with mode 0600). Returns the token, which is stored nowhere."""
    if role not in ROLES:
        raise AuthError(f"role {role!r}: choose one of {ROLES}")
    if not name or any(c in name for c in '"\\\n'):
        raise AuthError(f"name {name!r}: give a plain name")
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f'\n[[token]]\nname = "{name}"\nrole = "{role}"\nsha256 = "{token_hash(token)}"\n')
    return token


class Authenticator(grpc.aio.ServerInterceptor):
    """Checks every call's token against the method's role before any handler runs."""

    def __init__(self, callers: dict[str, Caller], raft_password: str | None) -> None:
        self._callers = dict(callers)
        if raft_password:
            self._callers[token_hash(node_credential(raft_password))] = Caller("node", NODE)

    def caller(self, metadata: Any) -> Caller | None:
        for key, value in metadata or ():
            if key == HEADER and isinstance(value, str) and value.startswith("Bearer "):
                token = value[len("Bearer ") :]
                if len(token) <= MAX_TOKEN_LEN:
                    return self._callers.get(token_hash(token))
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if method in PUBLIC:
            return await continuation(details)
        needed = METHOD_ROLES.get(method, "admin")  # a method not listed: admins only
        caller = self.caller(details.invocation_metadata)
        if caller is None:
            return _deny(
                method, grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required"
            )
        if not caller.may(needed):
            log.warning("%s (%s) may not call %s", caller.name, caller.role, method)
            return _deny(
                method,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method.rsplit('/', 1)[-1]} needs the {needed} role; {caller.name} is "
                f"{caller.role}",
            )
        if needed != "client":
            log.info("%s (%s) calls %s", caller.name, caller.role, method)
        return await continuation(details)


def _deny(method: str, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    if method in BIDI_STREAMING:

        async def refuse_bidi(requests: Any, context: Any) -> Any:
            await context.abort(code, message)
            yield

        return grpc.stream_stream_rpc_method_handler(refuse_bidi)
    if method in STREAMING:

        async def refuse_stream(request: Any, context: Any) -> Any:
            await context.abort(code, message)
            yield  # an async generator, as the method's own handler is

        return grpc.unary_stream_rpc_method_handler(refuse_stream)

    async def refuse(request: Any, context: Any) -> Any:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(refuse)
