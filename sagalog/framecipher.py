"""Authenticated encryption of Raft frames, in place of pysyncobj's Fernet.

pysyncobj encrypts each frame with Fernet (AES-128-CBC, HMAC-SHA256, base64) under a
key derived with a salt that is the same in every install. Fernet does its work in
Python around the primitives and grows each frame by a third; at concurrency 1 it
cost a travel saga about 6 ms of its latency (three nodes, some 45 frames each way
per saga). This cipher keeps pysyncobj's interface (`encrypt_at_time`,
`extract_timestamp`, `decrypt`) and uses AES-256-GCM:

    frame = process salt (16) | counter (8) | timestamp (8) | AES-GCM(payload), tag (16)

Nonces never repeat under one key: each process draws a random 16-byte salt at
start and derives its own sending key from the cluster key and that salt (HKDF),
then numbers its frames with a counter (the 12-byte nonce is 4 zero bytes and the
counter). A receiver derives the sender's key from the salt in the frame (a few
recent ones are cached). The timestamp is authenticated data: pysyncobj reads it
before decrypting to refuse frames older than the last one on the connection, and
a forged one fails the tag check, which closes the connection.

The cluster key comes from the password through PBKDF2-HMAC-SHA256 (200,000
iterations, once per process) with a fixed label as salt: every node must derive
the same key from the password file alone.
"""

from __future__ import annotations

import functools
import itertools
import os
import struct
import threading
from collections import OrderedDict

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

_SALT_LEN = 16
_HEADER = struct.Struct(">16sQQ")  # sender salt, counter, timestamp
KDF_ITERATIONS = 200_000
KEY_LABEL = b"sagacluster raft frames v1"
MAX_CACHED_SENDERS = 64  # peers' derived keys kept (each restart of a peer adds one)


@functools.lru_cache(maxsize=4)
def cluster_key(password: str) -> bytes:
    """The key every member derives from the Raft password (stretched: a stolen
    frame or credential does not make guessing the password cheap)."""
    return PBKDF2HMAC(hashes.SHA256(), 32, KEY_LABEL, KDF_ITERATIONS).derive(password.encode())


def derived_secret(password: str, purpose: bytes) -> bytes:
    """A secret for one purpose, from the cluster key (HKDF; one label a purpose)."""
    return HKDF(hashes.SHA256(), 32, None, purpose).derive(cluster_key(password))


class FrameCipher:
    def __init__(self, password: str) -> None:
        self._cluster_key = cluster_key(password)
        self._salt = os.urandom(_SALT_LEN)
        self._sending = AESGCM(self._derive(self._salt))
        self._counter = itertools.count(1)
        self._lock = threading.Lock()  # the counter and the cache; frames come from one thread
        self._receiving: OrderedDict[bytes, AESGCM] = OrderedDict()

    def _derive(self, salt: bytes) -> bytes:
        return HKDF(hashes.SHA256(), 32, salt, KEY_LABEL).derive(self._cluster_key)

    def encrypt_at_time(self, data: bytes, current_time: int) -> bytes:
        with self._lock:
            counter = next(self._counter)
        header = _HEADER.pack(self._salt, counter, current_time)
        nonce = b"\0\0\0\0" + header[_SALT_LEN : _SALT_LEN + 8]
        return header + self._sending.encrypt(nonce, data, header)

    def extract_timestamp(self, frame: bytes) -> int:
        if len(frame) < _HEADER.size:
            raise ValueError("frame shorter than its header")
        return int(_HEADER.unpack_from(frame)[2])

    def decrypt(self, frame: bytes) -> bytes:
        """The payload; raises (cryptography's InvalidTag, ValueError) for any frame
        not sealed with the cluster's key, which pysyncobj answers by disconnecting."""
        if len(frame) < _HEADER.size:
            raise ValueError("frame shorter than its header")
        header = frame[: _HEADER.size]
        salt = header[:_SALT_LEN]
        nonce = b"\0\0\0\0" + header[_SALT_LEN : _SALT_LEN + 8]

        with self._lock:
            key = self._receiving.get(salt)
            if key is not None:
                self._receiving.move_to_end(salt)
        if key is not None:
            return key.decrypt(nonce, frame[_HEADER.size :], header)
        key = AESGCM(self._derive(salt))
        payload = key.decrypt(nonce, frame[_HEADER.size :], header)
        with self._lock:  # cached only once a frame proved the sender holds the key
            self._receiving[salt] = key
            while len(self._receiving) > MAX_CACHED_SENDERS:
                self._receiving.popitem(last=False)
        return payload


class EncryptedFrames:
    """Mixin for a pysyncobj SyncObj: its transport seals frames with `_cipher`
    (a FrameCipher, or None for no encryption) instead of Fernet. Set `_cipher`
    before SyncObj.__init__ and leave SyncObjConf.password unset."""

    _cipher: FrameCipher | None = None

    @property
    def encryptor(self) -> FrameCipher | None:
        return self._cipher
