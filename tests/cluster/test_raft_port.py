"""The Raft port: bound to its configured address only, and deaf to anyone without
the cluster's password (pysyncobj unpickles every frame it accepts)."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import time
import zlib

import pytest

pytestmark = pytest.mark.cluster


class _Plant:
    """Unpickling this creates a file: proof that a frame's pickle ran in a node."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _frame(message: object) -> bytes:
    """A pysyncobj frame as a node without a password would send it."""
    data = zlib.compress(pickle.dumps(message))
    return struct.pack("i", len(data)) + data


def _closed_by_peer(sock: socket.socket, deadline_s: float) -> bool:
    sock.settimeout(0.2)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def test_raft_listens_only_on_its_own_address(make_cluster) -> None:
    h = make_cluster(3, host="127.0.0.2")
    for spec in h.cluster.specs.values():
        host, port = spec.raft_addr.rsplit(":", 1)
        assert host == "127.0.0.2"
        with socket.create_connection((host, int(port)), timeout=2):
            pass  # the configured address answers
        # Every 127/8 address reaches this machine's loopback; a socket bound to
        # 0.0.0.0 would accept on 127.0.0.3 too.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.3", int(port)), timeout=2)
    h.commit_saga("bound")
    h.wait_converged()
    h.check_nothing_lost()


def test_an_unauthenticated_frame_is_dropped_unread(make_cluster, tmp_path) -> None:
    h = make_cluster(3)
    planted = str(tmp_path / "planted-by-a-frame")
    for spec in h.cluster.specs.values():
        host, port = spec.raft_addr.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2) as sock:
            sock.sendall(_frame(_Plant(planted)) + _frame("status"))
            assert _closed_by_peer(sock, deadline_s=5), f"{spec.id} kept the connection"
    assert not os.path.exists(planted), "a node unpickled a frame sent without the password"
    h.commit_saga("after-forged-frames")
    h.wait_converged()
    h.check_nothing_lost()


class _Peer:
    """A Raft connection that knows the cluster's password and speaks pysyncobj's
    handshake: what a compromised or misconfigured host on the network could do."""

    def __init__(self, addr: str, password: str) -> None:
        from sagalog.framecipher import FrameCipher

        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.cipher = FrameCipher(password)
        self.node_key = b""
        my_key = os.urandom(32)
        self.send(my_key)
        self.node_key = self.receive()

    def send(self, message: object) -> None:
        if self.node_key:
            message = (self.node_key, message)
        data = self.cipher.encrypt_at_time(zlib.compress(pickle.dumps(message)), int(time.time()))
        self.sock.sendall(struct.pack("i", len(data)) + data)

    def receive(self) -> bytes:
        header = self._exactly(4)
        data = self._exactly(struct.unpack("i", header)[0])
        return pickle.loads(zlib.decompress(self.cipher.decrypt(data)))

    def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "closed"
            out += chunk
        return out


def _password(h) -> str:
    with open(h.cluster.password_file) as f:
        return f.read().strip()


@pytest.mark.parametrize("hello", ["readonly", ["status"], ["transfer_leadership", "x"]])
def test_read_only_peers_and_utility_commands_are_refused_even_with_the_password(
    make_cluster, hello
) -> None:
    h = make_cluster(3)
    leader = h.cluster.wait_for_leader(10)
    for spec in h.cluster.specs.values():
        peer = _Peer(spec.raft_addr, _password(h))
        peer.send(hello)
        assert _closed_by_peer(peer.sock, deadline_s=5), f"{spec.id} accepted {hello!r}"
        peer.sock.close()
    assert h.cluster.wait_for_leader(10).id == leader.id  # no leadership moved
    h.commit_saga("after-refused-peers")
    h.wait_converged()
    h.check_nothing_lost()


@pytest.mark.parametrize("length", [2**31 - 1, -5, 64 * 1024 * 1024])
def test_an_oversized_frame_is_refused_before_it_is_buffered(make_cluster, length) -> None:
    h = make_cluster(3)
    spec = next(iter(h.cluster.specs.values()))
    host, port = spec.raft_addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(struct.pack("i", length) + b"x" * 1024)
        assert _closed_by_peer(sock, deadline_s=5)
    h.commit_saga("after-oversized-frame")
    h.wait_converged()
    h.check_nothing_lost()


def test_a_connection_that_never_authenticates_is_closed(make_cluster) -> None:
    h = make_cluster(3)
    idle = []
    for spec in h.cluster.specs.values():
        host, port = spec.raft_addr.rsplit(":", 1)
        idle += [socket.create_connection((host, int(port)), timeout=2) for _ in range(50)]
    started = time.monotonic()
    try:
        for sock in idle:
            assert _closed_by_peer(sock, deadline_s=10), "a silent connection stayed open"
        assert time.monotonic() - started < 10
        h.commit_saga("after-idle-connections")
        h.wait_converged()
        h.check_nothing_lost()
    finally:
        for sock in idle:
            sock.close()
