"""Checking a saga definition: what Submit refuses, and what apply refuses from log
format 3 on (STRICT_FORMAT in sagalog.log), so no path into the log bypasses it.
Pure. Messages name the problem. Zero means "the default" for timeout, attempts
and backoff fields.
"""

from __future__ import annotations

import ipaddress
import re

from saga.v1 import log_pb2

from sagalog import codec
from sagalog.transitions import Event, Kind, SagaState, decide

NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
ACTION_RE = re.compile(r"^[A-Za-z0-9_.\-:/]{1,128}$")
# A participant endpoint is HOST:PORT and nothing else gRPC could dial (unix:,
# vsock:, dns: and other URI schemes would let a caller aim the leader anywhere).
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.?)+$")
PORT_RE = re.compile(r"^[0-9]{1,5}$")
MAX_DEFINITION_NAME = 128
TIMEOUT_MS_RANGE = (10, 300_000)
MAX_ATTEMPTS_RANGE = (1, 100)
BACKOFF_MS_RANGE = (1, 300_000)
MULTIPLIER_RANGE = (1.0, 10.0)


def check_definition(definition: log_pb2.SagaDefinition) -> str:
    """ "" when the definition is acceptable, else what is wrong with it."""
    if len(definition.name) > MAX_DEFINITION_NAME:
        return f"the definition name exceeds {MAX_DEFINITION_NAME} characters"
    if not definition.vertices:
        return "the definition has no vertices"
    if len(definition.vertices) > codec.MAX_VERTICES:
        return f"{len(definition.vertices)} vertices; the limit is {codec.MAX_VERTICES}"
    for v in definition.vertices:
        error = _check_vertex(v)
        if error:
            return f"vertex {v.name!r}: {error}" if v.name else error
    # Names, duplicates, unknown dependencies and cycles: the log's own rules.
    dag: dict[str, tuple[str, ...]] = {}
    for v in definition.vertices:
        if v.name in dag:
            return f"duplicate vertex name {v.name!r}"
        if len(set(v.depends_on)) != len(v.depends_on):
            return f"vertex {v.name!r}: depends_on lists a vertex twice"
        dag[v.name] = tuple(v.depends_on)
    decision = decide(SagaState(), Event(Kind.START_SAGA, dag=dag))
    return decision.reason.removeprefix("StartSaga: ") if not decision.accepted else ""


def _check_vertex(v: log_pb2.Vertex) -> str:
    if not v.name:
        return "a vertex has an empty name"
    if not NAME_RE.fullmatch(v.name):
        return "the name may hold 1-128 letters, digits, _ . -"
    error = check_endpoint(v.endpoint)
    if error:
        return error
    for label, action in (("request", v.request), ("compensation", v.compensation)):
        if not ACTION_RE.fullmatch(action):
            return f"the {label} action {action!r} must be 1-128 of letters, digits, _ . - : /"
    if v.timeout_ms and not _within(v.timeout_ms, TIMEOUT_MS_RANGE):
        return f"timeout_ms {v.timeout_ms} is outside {TIMEOUT_MS_RANGE}"
    if v.max_attempts and not _within(v.max_attempts, MAX_ATTEMPTS_RANGE):
        return f"max_attempts {v.max_attempts} is outside {MAX_ATTEMPTS_RANGE}"
    b = v.backoff
    for label, ms in (("backoff.initial_ms", b.initial_ms), ("backoff.max_ms", b.max_ms)):
        if ms and not _within(ms, BACKOFF_MS_RANGE):
            return f"{label} {ms} is outside {BACKOFF_MS_RANGE}"
    if b.initial_ms and b.max_ms and b.max_ms < b.initial_ms:
        return "backoff.max_ms is below backoff.initial_ms"
    if b.multiplier and not _within(b.multiplier, MULTIPLIER_RANGE):
        return f"backoff.multiplier {b.multiplier} is outside {MULTIPLIER_RANGE}"
    return ""


def check_endpoint(endpoint: str) -> str:
    """ "" for HOST:PORT (a DNS name of at most 253 characters, an IPv4 address or
    a bracketed IPv6 address; port 1-65535), else what is wrong with it."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
        return f"endpoint {endpoint[:300]!r} is not HOST:PORT with a port in 1-65535"
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"endpoint {endpoint!r}: {host} is not an IPv6 address"
        return ""
    if not HOSTNAME_RE.fullmatch(host):
        return f"endpoint {endpoint[:300]!r}: the host must be a DNS name or an IP address"
    return ""


def endpoint_allowed(endpoint: str, allowed: tuple[str, ...]) -> bool:
    """Whether an allow-list admits the endpoint: entries are HOST:PORT or HOST:*
    (any port of that host); an empty list admits every endpoint."""
    if not allowed:
        return True
    host = endpoint.rpartition(":")[0]
    return endpoint in allowed or f"{host}:*" in allowed


def _within(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]
