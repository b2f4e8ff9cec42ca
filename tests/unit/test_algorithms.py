"""algorithms.py: validation messages, key secrecy, and each transform cross-checked against a
straightforward use of `cryptography` / `hmac` (fresh objects per packet, textbook AAD layouts)."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from cryptography.hazmat.primitives.ciphers import algorithms as c_algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from nfq_ipsec import algorithms
from nfq_ipsec.algorithms import make_integrity, make_transform

ESP_HEADER = struct.pack("!II", 0x12345678, 0x9ABCDEF0)
SEQ_HI = struct.pack("!I", 0x00000007)
AEAD_KEYS = {"aes-gcm-128": 16, "aes-gcm-192": 24, "aes-gcm-256": 32, "chacha20-poly1305": 32,
             "aes-gmac-128": 16, "aes-gmac-192": 24, "aes-gmac-256": 32}
AUTH = {"hmac-sha256-128": ("sha256", 32, 16), "hmac-sha384-192": ("sha384", 48, 24),
        "hmac-sha512-256": ("sha512", 64, 32), "hmac-sha1-96": ("sha1", 20, 12)}


def key_of(n: int, start: int = 0x20) -> bytes:
    return bytes((start + i) & 0xFF for i in range(n))


def test_algorithm_names() -> None:
    assert set(algorithms.ALGORITHMS["aead"]) == set(AEAD_KEYS)
    assert set(algorithms.ALGORITHMS["enc"]) == {"aes-cbc-128", "aes-cbc-192", "aes-cbc-256", "null"}
    assert set(algorithms.ALGORITHMS["auth"]) == set(AUTH)


@pytest.mark.parametrize("aead,key_len", AEAD_KEYS.items())
def test_aead_key_length_is_enforced_with_a_clear_message(aead: str, key_len: int) -> None:
    assert make_transform(aead=aead, key=key_of(key_len + 4)).name == aead
    for bad in (key_len, key_len + 3, key_len + 5, 0):
        with pytest.raises(ValueError, match=rf"{re.escape(aead)} needs a {key_len + 4}-byte key "
                                             rf"\({key_len}-byte cipher key \+ 4-byte salt\), got {bad}"):
            make_transform(aead=aead, key=key_of(bad))


@pytest.mark.parametrize("enc,key_len", [("aes-cbc-128", 16), ("aes-cbc-192", 24), ("aes-cbc-256", 32)])
def test_enc_key_length(enc: str, key_len: int) -> None:
    auth: dict[str, Any] = {"auth": "hmac-sha256-128", "auth_key": key_of(32)}
    assert make_transform(enc=enc, enc_key=key_of(key_len), **auth).name == f"{enc}+hmac-sha256-128"
    with pytest.raises(ValueError, match=rf"{enc} needs a {key_len}-byte key, got {key_len - 1} bytes"):
        make_transform(enc=enc, enc_key=key_of(key_len - 1), **auth)


@pytest.mark.parametrize("auth,spec", AUTH.items())
def test_auth_key_length_and_icv(auth: str, spec: tuple[str, int, int]) -> None:
    _, key_len, icv = spec
    integrity = make_integrity(auth, key_of(key_len))
    assert integrity.icv_len == icv
    with pytest.raises(ValueError, match=rf"{auth} needs a {key_len}-byte key, got {key_len + 1} bytes"):
        make_integrity(auth, key_of(key_len + 1))
    t = make_transform(enc="null", auth=auth, auth_key=key_of(key_len))
    assert (t.iv_len, t.icv_len, t.block_size, t.integrity is not None) == (0, icv, 4, True)


def test_configuration_errors_name_the_problem() -> None:
    gcm = key_of(20)
    cases = [
        ({"aead": "aes-gcm-128", "key": gcm, "enc": "aes-cbc-128"}, "excludes enc and auth"),
        ({"aead": "aes-gcm-128", "key": gcm, "auth": "hmac-sha1-96"}, "excludes enc and auth"),
        ({"aead": "aes-ccm-128", "key": gcm}, "unknown aead algorithm 'aes-ccm-128'"),
        ({"enc": "aes-cbc-128", "enc_key": key_of(16)}, "without auth is not allowed"),
        ({"enc": "des", "enc_key": key_of(8), "auth": "hmac-sha1-96", "auth_key": key_of(20)},
         "unknown enc algorithm 'des'"),
        ({"enc": "null", "auth": "hmac-md5-96", "auth_key": key_of(16)},
         "unknown auth algorithm 'hmac-md5-96'"),
        ({"enc": "null", "enc_key": b"x", "auth": "hmac-sha1-96", "auth_key": key_of(20)}, "null encryption"),
        ({"key": gcm, "enc": "null", "auth": "hmac-sha1-96", "auth_key": key_of(20)}, "only for aead"),
        ({}, "no algorithm given"),
        ({"aead": "chacha20-poly1305", "key": key_of(36), "icv_len": 8}, "icv_len must be 16 bytes"),
        ({"aead": "aes-gcm-128", "key": gcm, "icv_len": 10}, "icv_len must be 8 or 12 or 16 bytes"),
        ({"aead": "aes-gmac-128", "key": gcm, "icv_len": 12}, "icv_len must be 16 bytes"),
        ({"enc": "null", "auth": "hmac-sha256-128", "auth_key": key_of(32), "icv_len": 10},
         "multiple of 4 between 12 and 32"),
        ({"enc": "null", "auth": "hmac-sha1-96", "auth_key": key_of(20), "icv_len": 24},
         "multiple of 4 between 12 and 20"),
        ({"aead": "aes-gcm-128", "key": "not bytes"}, "must be bytes"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            make_transform(**kwargs)  # type: ignore[arg-type]


def test_integrity_only_transform_for_ah() -> None:
    """enc=None with auth: what AH gets; .integrity is usable on its own."""
    t = make_transform(auth="hmac-sha256-128", auth_key=key_of(32), icv_len=12)
    assert t.integrity is not None and t.integrity.icv_len == 12 == t.icv_len
    expected = hmac.new(key_of(32), b"data", hashlib.sha256).digest()[:12]
    assert t.integrity.compute(b"data") == expected
    assert make_integrity("hmac-sha256-128", key_of(32), 24).compute(b"data") == \
        hmac.new(key_of(32), b"data", hashlib.sha256).digest()[:24]


@pytest.mark.parametrize("kwargs", [
    {"aead": "aes-gcm-256", "key": key_of(36, 0x90)},
    {"aead": "aes-gcm-128", "key": key_of(20, 0x90), "icv_len": 8},
    {"aead": "chacha20-poly1305", "key": key_of(36, 0x90)},
    {"aead": "aes-gmac-192", "key": key_of(28, 0x90)},
    {"enc": "aes-cbc-256", "enc_key": key_of(32, 0x90), "auth": "hmac-sha512-256",
     "auth_key": key_of(64, 0xB0)},
    {"enc": "null", "auth": "hmac-sha1-96", "auth_key": key_of(20, 0xB0)},
])
def test_repr_never_shows_key_material(kwargs: dict[str, object]) -> None:
    t = make_transform(**kwargs)  # type: ignore[arg-type]
    text = repr(t) + str(t) + repr(t.integrity)
    for secret in (kwargs.get("key"), kwargs.get("enc_key"), kwargs.get("auth_key")):
        if isinstance(secret, bytes):
            for window in range(0, len(secret) - 3, 2):
                chunk = secret[window : window + 4]
                assert chunk.hex() not in text and repr(chunk)[2:-1] not in text


# -- AEADs against cryptography used directly --------------------------------------------------------------


def aad_for(seq_hi: bytes) -> bytes:
    return ESP_HEADER[:4] + seq_hi + ESP_HEADER[4:] if seq_hi else ESP_HEADER


@pytest.mark.parametrize("aead,icv", [("aes-gcm-128", 16), ("aes-gcm-192", 12), ("aes-gcm-256", 8),
                                       ("chacha20-poly1305", 16)])
@pytest.mark.parametrize("seq_hi", [b"", SEQ_HI], ids=["32bit", "esn"])
def test_aead_matches_rfc4106_rfc7634_layout(aead: str, icv: int, seq_hi: bytes) -> None:
    key_len = AEAD_KEYS[aead]
    key = key_of(key_len + 4, 0x41)
    cipher_key, salt = key[:key_len], key[key_len:]
    t = make_transform(aead=aead, key=key, icv_len=icv)
    assert (t.iv_len, t.icv_len, t.block_size) == (8, icv, 4)
    iv = bytes.fromhex("0001020304050607")
    plaintext = os.urandom(61) + b"\x01\x02\x02\x06"
    sealed = t.seal(b"PREFIX", ESP_HEADER, seq_hi, iv, plaintext, 0)
    reference = (ChaCha20Poly1305(cipher_key) if aead.startswith("chacha") else AESGCM(cipher_key))
    expected_ct = reference.encrypt(salt + iv, plaintext, aad_for(seq_hi))
    assert sealed == b"PREFIX" + ESP_HEADER + iv + expected_ct[: len(plaintext) + icv]
    esp_part = sealed[6:]
    assert t.open(memoryview(esp_part), seq_hi) == plaintext
    for pos in (0, 5, 9, 20, len(esp_part) - 7, len(esp_part) - 1):  # header, IV, ciphertext, ICV
        broken = bytearray(esp_part)
        broken[pos] ^= 0x80
        assert t.open(memoryview(bytes(broken)), seq_hi) is None, pos


def test_default_aead_iv_is_the_sequence_number() -> None:
    t = make_transform(aead="aes-gcm-128", key=key_of(20))
    sealed = t.seal(b"", ESP_HEADER, b"", None, b"\x01\x02\x02\x04", 0x0102030405060708)
    assert sealed[8:16] == bytes.fromhex("0102030405060708")


@pytest.mark.parametrize("seq_hi", [b"", SEQ_HI], ids=["32bit", "esn"])
def test_gmac_matches_rfc4543_layout(seq_hi: bytes) -> None:
    """GMAC: nothing encrypted; the tag covers SPI | (seq_hi) | seq | IV | payload (RFC 4543 §3.3)."""
    key = key_of(20, 0x11)
    t = make_transform(aead="aes-gmac-128", key=key)
    iv = bytes(range(8))
    plaintext = b"payload!" * 5 + b"\x01\x02\x02\x04"
    sealed = t.seal(b"", ESP_HEADER, seq_hi, iv, plaintext, 0)
    tag = AESGCM(key[:16]).encrypt(key[16:] + iv, b"", aad_for(seq_hi) + iv + plaintext)
    assert sealed == ESP_HEADER + iv + plaintext + tag
    assert t.open(memoryview(sealed), seq_hi) == plaintext
    for pos in range(0, len(sealed), 7):
        broken = bytearray(sealed)
        broken[pos] ^= 1
        assert t.open(memoryview(bytes(broken)), seq_hi) is None


# -- CBC + HMAC and NULL + HMAC ------------------------------------------------------------------------


def reference_cbc_esp(key: bytes, auth_key: bytes, digest: str, icv_len: int, iv: bytes, plaintext: bytes,
                      seq_hi: bytes) -> bytes:
    encryptor = Cipher(c_algorithms.AES(key), modes.CBC(iv)).encryptor()
    body = ESP_HEADER + iv + encryptor.update(plaintext) + encryptor.finalize()
    return body + hmac.new(auth_key, body + seq_hi, digest).digest()[:icv_len]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.binary(min_size=16, max_size=16), st.booleans(),
                          st.booleans()), min_size=1, max_size=12))
def test_cbc_with_reused_contexts_is_textbook_cbc(packets: list[tuple[int, bytes, bool, bool]]) -> None:
    """Any sequence of seals and opens, with any IVs, equals a fresh CBC cipher per packet."""
    key, auth_key = key_of(16, 0x70), key_of(32, 0x30)
    sender = make_transform(enc="aes-cbc-128", enc_key=key, auth="hmac-sha256-128", auth_key=auth_key)
    receiver = make_transform(enc="aes-cbc-128", enc_key=key, auth="hmac-sha256-128", auth_key=auth_key)
    for blocks, iv, esn, also_open in packets:
        seq_hi = SEQ_HI if esn else b""
        plaintext = os.urandom(16 * blocks)
        sealed = sender.seal(b"", ESP_HEADER, seq_hi, iv, plaintext, 0)
        assert sealed == reference_cbc_esp(key, auth_key, "sha256", 16, iv, plaintext, seq_hi)
        if also_open:
            assert receiver.open(memoryview(sealed), seq_hi) == plaintext
            other = reference_cbc_esp(key, auth_key, "sha256", 16, os.urandom(16), plaintext[::-1], seq_hi)
            assert receiver.open(memoryview(other), seq_hi) == plaintext[::-1]


@pytest.mark.parametrize("auth", list(AUTH))
def test_cbc_icv_is_checked_before_decrypting(auth: str) -> None:
    digest, key_len, icv_len = AUTH[auth]
    key, auth_key = key_of(32, 0x05), key_of(key_len, 0x50)
    t = make_transform(enc="aes-cbc-256", enc_key=key, auth=auth, auth_key=auth_key)
    assert (t.iv_len, t.icv_len, t.block_size, t.min_len) == (16, icv_len, 16, 8 + 16 + 16 + icv_len)
    plaintext = bytes(range(32))
    sealed = t.seal(b"", ESP_HEADER, b"", None, plaintext, 0)
    assert len(sealed) == 8 + 16 + 32 + icv_len
    assert sealed[8:24] != bytes(16)  # a random IV
    assert sealed == reference_cbc_esp(key, auth_key, digest, icv_len, sealed[8:24], plaintext, b"")
    for pos in range(len(sealed)):
        broken = bytearray(sealed)
        broken[pos] ^= 0x10
        assert t.open(memoryview(bytes(broken)), b"") is None
    assert t.open(memoryview(sealed), b"") == plaintext  # the failures left the context in sync
    with pytest.raises(ValueError, match="whole 16-byte blocks"):
        t.open(memoryview(sealed[:-icv_len - 1] + sealed[-icv_len:]), b"")
    with pytest.raises(ValueError, match="whole 16-byte blocks"):
        t.seal(b"", ESP_HEADER, b"", None, plaintext[:-1], 0)


def test_cbc_random_ivs_differ() -> None:
    t = make_transform(enc="aes-cbc-128", enc_key=key_of(16), auth="hmac-sha1-96", auth_key=key_of(20))
    ivs = {t.seal(b"", ESP_HEADER, b"", None, bytes(16), 0)[8:24] for _ in range(50)}
    assert len(ivs) == 50


@pytest.mark.parametrize("seq_hi", [b"", SEQ_HI], ids=["32bit", "esn"])
def test_null_encryption_layout(seq_hi: bytes) -> None:
    auth_key = key_of(48, 0x99)
    t = make_transform(enc="null", auth="hmac-sha384-192", auth_key=auth_key)
    plaintext = b"clear text\x01\x02\x02\x11"
    sealed = t.seal(b"P", ESP_HEADER, seq_hi, None, plaintext, 0)
    icv = hmac.new(auth_key, ESP_HEADER + plaintext + seq_hi, hashlib.sha384).digest()[:24]
    assert sealed == b"P" + ESP_HEADER + plaintext + icv
    assert t.open(memoryview(sealed[1:]), seq_hi) == plaintext
    assert t.open(memoryview(sealed[1:]), b"\x00\x00\x00\x08") is None
