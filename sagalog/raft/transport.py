"""The Raft links: pysyncobj's TCP transport, made durable, bounded and kept alive."""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from pysyncobj.transport import TCPTransport

from sagalog.codec import MAX_BATCH_BYTES
from sagalog.raft.linkfaults import LinkFaults

log = logging.getLogger(__name__)

KEEPALIVE_S = 0.25  # well below connection_timeout_ms
_KEEPALIVE = {"type": "keepalive"}  # a type pysyncobj does not know; never passed to it
READ_ROUND = "read_round"  # our field in AppendEntries and their answers; pysyncobj ignores it
# The largest frame a peer may send: one AppendEntries holds at most one batch's worth
# of entries (raft_conf), pickled, compressed and, with the password, Fernet-encoded
# (base64: 4/3). pysyncobj itself buffers whatever a 32-bit length prefix announces.
MAX_FRAME_BYTES = 2 * (MAX_BATCH_BYTES + 64 * 1024) + (1 << 20)
# An incoming connection that has not said which peer it is by then is closed
# (pysyncobj keeps a silent connection open for good).
AUTH_TIMEOUT_S = 3.0


class SyncingTransport(TCPTransport):
    """TCP transport that makes the journal durable before any message that
    vouches for its entries leaves, and by the end of every tick.

    A leader's AppendEntries are the exception: they go before the leader's own
    fsync, which then overlaps the network round trip and the followers' fsyncs
    (Raft thesis 10.2.1) instead of coming before them, and covers every entry
    proposed in the tick at once. The transport's tick is the last thing the Raft
    loop does before it polls its sockets (pysyncobj runs the tick callbacks just
    before `poll`), so the fsync overlaps the answers' way back; and
    `SagaLogRaft._onTick` syncs again before pysyncobj computes the commit index
    (a cheap no-op unless a new leader's no-op entry was added inside the poll),
    so that index never covers an entry that is not on the leader's own disk.
    Answers, votes and everything else still fsync first.

    It keeps every link busy: pysyncobj checks a connection's read timeout when it
    next sends on it, so the first message on an idle link (followers never talk
    to each other while a leader lives) closes the link and is lost. That message
    is a candidate's vote request, right after a leader died: the election failed
    and took another timeout (terms went up by two per failover). A keepalive to
    every peer each KEEPALIVE_S keeps links fresh, and a silent peer still trips
    the read timeout.

    It also applies the link faults of a fault file when the node was started
    with one (a testing aid; off by default): see `LinkFaults`."""

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        super().__init__(syncObj, selfNode, otherNodes)
        self._unknown_since: dict[Any, float] = {}  # incoming connection -> when accepted
        path = getattr(syncObj, "_fault_file", None)
        self._faults = LinkFaults(path) if path else None
        self._next_keepalive = 0.0
        self._echo_round: dict[Any, int] = {}  # peer -> round of its last AppendEntries

    def send(self, node: Any, message: Any) -> bool:
        kind = message.get("type")
        if kind != "append_entries":  # those are synced at the end of the tick
            self._syncObj._journal.sync()
        reads = getattr(self._syncObj, "_reads", None)  # SagaLogRaft's (not the bench's)
        if kind == "append_entries" and reads is not None:
            message[READ_ROUND] = reads.sent
        elif kind == "next_node_idx":
            # The answer to the AppendEntries being handled: echo its round.
            message[READ_ROUND] = self._echo_round.get(node, 0)
        if self._faults is not None and not self._faults.outgoing(node, message):
            return True  # dropped or delayed: to the sender it looks sent
        return bool(super().send(node, message))

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        if self._faults is not None and self._faults.blocks_from(node):
            return
        kind = message.get("type")
        if kind == "keepalive":
            return
        if kind == "append_entries":
            self._echo_round[node] = message.get(READ_ROUND, 0)
            align = getattr(self._syncObj, "_align_append_entries", None)  # SagaLogRaft's
            if align is not None:
                align(message)
        elif kind == "next_node_idx" and READ_ROUND in message:
            answered = getattr(self._syncObj, "_read_round_answered", None)
            if answered is not None:
                answered(node, message[READ_ROUND])
        super()._onMessageReceived(node, message)

    # ---- who may talk to this node -------------------------------------------------

    def _onNewIncomingConnection(self, conn: Any) -> None:
        super()._onNewIncomingConnection(conn)
        self._unknown_since[conn] = time.monotonic()
        read = conn._TcpConnection__processRead
        conn._TcpConnection__processRead = lambda: _read_capped(conn, read)

    def _onIncomingMessageReceived(self, conn: Any, message: Any) -> None:
        # Utility commands (status, leadership transfer, membership) and read-only
        # peers are pysyncobj features this cluster does not use: refused outright.
        handshake = bool(self._syncObj.encryptor) and not conn.sendRandKey
        if not handshake and (isinstance(message, list) or message == "readonly"):
            log.warning("refused a Raft connection that sent %.40r", message)
            self._unknown_since.pop(conn, None)
            self._unknownConnections.discard(conn)
            conn.disconnect()
            return
        super()._onIncomingMessageReceived(conn, message)
        if conn not in self._unknownConnections:
            self._unknown_since.pop(conn, None)

    def _close_silent_connections(self, now: float) -> None:
        for conn, since in list(self._unknown_since.items()):
            if conn not in self._unknownConnections:
                del self._unknown_since[conn]
            elif now - since > AUTH_TIMEOUT_S:
                del self._unknown_since[conn]
                self._unknownConnections.discard(conn)
                conn.disconnect()

    def _onTick(self) -> None:
        super()._onTick()
        now = time.monotonic()
        self._close_silent_connections(now)
        if now >= self._next_keepalive:
            self._next_keepalive = now + KEEPALIVE_S
            for peer in list(self._connections):
                self.send(peer, _KEEPALIVE)
        if self._faults is not None:
            for node, message in self._faults.due():
                super().send(node, message)
        # Last before the poll that reads answers: see the class docstring.
        self._syncObj._journal.sync()


def _read_capped(conn: Any, read: Callable[[], bool]) -> bool:
    """pysyncobj's read of a connection's socket, closing it on an oversized frame
    (or a negative length) before the frame is buffered."""
    more = read()
    buffer = conn._TcpConnection__readBuffer
    if len(buffer) >= 4:
        (length,) = struct.unpack("i", buffer[:4])
        if not 0 <= length <= MAX_FRAME_BYTES:
            log.warning("closed a Raft connection announcing a %d-byte frame", length)
            conn.disconnect()
            return False
    if len(buffer) > 2 * (MAX_FRAME_BYTES + 4):  # frames queued behind a small one
        log.warning("closed a Raft connection holding %d unread bytes", len(buffer))
        conn.disconnect()
        return False
    return more
