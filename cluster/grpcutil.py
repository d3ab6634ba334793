"""gRPC channels for talking to nodes."""

from __future__ import annotations

import grpc

from cluster.tls import TlsFiles

# gRPC waits up to 120 s between reconnects by default (starting at 1 s): a node
# restarted after a kill would look dead long after it is back.
#
# Keepalive: a node cut off by the network (packets dropped, not refused) leaves
# calls waiting on a connection that looks open; a Run or Watch waiting there
# would sit until its deadline. A ping unanswered within KEEPALIVE_TIMEOUT_MS
# closes the connection: the calls fail UNAVAILABLE and the client moves on.
KEEPALIVE_TIME_MS = 2_000
KEEPALIVE_TIMEOUT_MS = 3_000
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 0),  # only while calls wait
    ("grpc.http2.max_pings_without_data", 0),
]
# What a node's server accepts from such clients (its default refuses pings more
# often than every 5 minutes, and ends the connection with too_many_pings).
SERVER_KEEPALIVE_OPTIONS = [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
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
