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
