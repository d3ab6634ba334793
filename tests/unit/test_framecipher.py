"""The Raft frame cipher: round trips between nodes holding the same password,
and refuses every frame it did not seal under that password."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidTag

from sagalog.framecipher import MAX_CACHED_SENDERS, FrameCipher

PASSWORD = "a long enough cluster password"


def test_nodes_with_the_same_password_read_each_others_frames() -> None:
    a, b = FrameCipher(PASSWORD), FrameCipher(PASSWORD)
    frame = a.encrypt_at_time(b"append entries", 1234)
    assert b.extract_timestamp(frame) == 1234
    assert b.decrypt(frame) == b"append entries"
    assert a.decrypt(b.encrypt_at_time(b"ok", 5)) == b"ok"


def test_nonces_never_repeat_within_a_process_or_across_processes() -> None:
    a, b = FrameCipher(PASSWORD), FrameCipher(PASSWORD)
    headers = {f[:24] for f in (a.encrypt_at_time(b"x", 1) for _ in range(1000))}
    headers |= {f[:24] for f in (b.encrypt_at_time(b"x", 1) for _ in range(1000))}
    assert len(headers) == 2000  # salt + counter: a fresh nonce per frame


@pytest.mark.parametrize("where", [0, 17, 26, 40, -1])
def test_a_changed_byte_anywhere_is_refused(where: int) -> None:
    a = FrameCipher(PASSWORD)
    frame = bytearray(a.encrypt_at_time(b"payload bytes here", 7))
    frame[where] ^= 0x01
    with pytest.raises((InvalidTag, ValueError)):
        FrameCipher(PASSWORD).decrypt(bytes(frame))


def test_another_password_or_a_short_frame_is_refused() -> None:
    frame = FrameCipher("another cluster's password").encrypt_at_time(b"x", 1)
    with pytest.raises(InvalidTag):
        FrameCipher(PASSWORD).decrypt(frame)
    with pytest.raises(ValueError):
        FrameCipher(PASSWORD).decrypt(b"short")
    with pytest.raises(ValueError):
        FrameCipher(PASSWORD).extract_timestamp(b"short")


def test_forged_senders_do_not_evict_real_ones() -> None:
    receiver, peer = FrameCipher(PASSWORD), FrameCipher(PASSWORD)
    receiver.decrypt(peer.encrypt_at_time(b"hello", 1))
    for _ in range(MAX_CACHED_SENDERS + 10):
        forged = FrameCipher("not the password").encrypt_at_time(b"x", 1)
        with pytest.raises(InvalidTag):
            receiver.decrypt(forged)
    assert len(receiver._receiving) == 1  # only senders that proved the key are kept
