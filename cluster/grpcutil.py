"""gRPC channels for talking to nodes."""

from __future__ import annotations

import grpc

from cluster.tls import TlsFiles

# gRPC waits up to 120 s between reconnects by default (starting at 1 s): a node
# restarted after a kill would look dead long after it is back.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]


# gRPC core's server drops calls at random once more than `max_pending_requests`
# (default 1,000) wait to be handed to Python, and in grpcio 1.85 (experiment
# optimization_04) a dropped call reaches its client as a bare CANCELLED. A
# participant resumed from SIGSTOP after a failover held the old leader's ~1,000
# calls and the new leader's ~1,000: 142 of 1,000 came back CANCELLED. Servers
# queue up to the coordinators' own bound (two leaders' MAX_CALLS_IN_FLIGHT).
PENDING_REQUEST_OPTIONS = [
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 40_000),
]


def channel_to(addr: str, tls: TlsFiles | None = None) -> grpc.Channel:
    """A channel to a node (or participant): TLS when `tls` is given."""
    if tls is None:
        return grpc.insecure_channel(addr, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(addr, tls.channel_credentials(), options=CHANNEL_OPTIONS)
