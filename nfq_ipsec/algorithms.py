"""ESP/AH cryptographic transforms (RFC 8221 set, plus what Linux offers), built once per SA.

Names accepted by the configuration (`ALGORITHMS`):

* aead: ``aes-gcm-128/192/256`` (RFC 4106; ICV 8, 12 or 16 bytes, default 16),
  ``chacha20-poly1305`` (RFC 7634), ``aes-gmac-128/192/256`` (RFC 4543, ENCR_NULL_AUTH_AES_GMAC:
  integrity only, the whole ESP payload is AAD). Their keys carry the 4-byte salt at the end, as
  ``ip xfrm`` takes them: aes-gcm-128 wants 20 bytes, chacha20-poly1305 36.
* enc: ``aes-cbc-128/192/256`` (RFC 3602), ``null`` (RFC 2410).
* auth: ``hmac-sha256-128``, ``hmac-sha384-192``, ``hmac-sha512-256`` (RFC 4868; key = digest size),
  ``hmac-sha1-96`` (RFC 2404; 20-byte key).

Two entry points:

* ``make_transform(aead=, key=, enc=, enc_key=, auth=, auth_key=, icv_len=)`` -> a `Transform` for
  ESP. ``esp.py`` drives it through ``seal()``/``open()`` (for AES-GCM-16 / ChaCha20-Poly1305 over
  IPv4 the SA's C core calls the AEAD object, ``cipher``, itself); others only read ``name``,
  ``iv_len``, ``icv_len``, ``block_size`` and ``integrity`` (the HMAC, None for AEADs). With
  ``auth`` but no ``enc`` it is integrity only, which is what an AH SA gets.
* ``make_integrity(auth, auth_key, icv_len=None)`` -> an `HmacIntegrity` usable on its own (AH):
  ``.icv_len``, ``.compute(data, tail=b"") -> bytes`` (truncated ICV) and
  ``.verify(data, icv, tail=b"") -> bool`` (constant-time). ``tail`` is hashed after ``data``
  without concatenating them (the ESN high bits, RFC 4304).

Speed notes (measured, CPython 3.11, 1400-byte payloads): one AEAD object per SA is reused for
every packet; HMAC reuses pre-keyed inner/outer hash states (``copy()``), 35% faster than
``hmac.digest``; AES-CBC reuses one long-lived CBC context per direction instead of building a
cipher per packet (6 us -> 1.4 us). CBC chaining makes the context's state the previous
ciphertext block S, so a packet with a fresh random IV is produced by XOR-ing IV ^ S into its
first plaintext block (encrypt) or first decrypted block (decrypt) - the ciphertext is exactly
standard CBC under that IV. The contexts make a transform single-threaded, like the SA itself.

Keys never appear in ``repr()``; ICVs are checked in constant time (``hmac.compare_digest`` or
the AEAD's own tag check).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Any, ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

Buffer = bytes | bytearray | memoryview

SALT_LEN = 4  # RFC 4106 §8.1, RFC 4543 §3.2, RFC 7634 §2: the last 4 bytes of the keying material

# aead name -> (cipher key length without salt, allowed ICV lengths, default ICV length)
_AEAD: dict[str, tuple[int, tuple[int, ...], int]] = {
    "aes-gcm-128": (16, (8, 12, 16), 16),
    "aes-gcm-192": (24, (8, 12, 16), 16),
    "aes-gcm-256": (32, (8, 12, 16), 16),
    "chacha20-poly1305": (32, (16,), 16),
    "aes-gmac-128": (16, (16,), 16),
    "aes-gmac-192": (24, (16,), 16),
    "aes-gmac-256": (32, (16,), 16),
}
# enc name -> key length
_ENC: dict[str, int] = {"aes-cbc-128": 16, "aes-cbc-192": 24, "aes-cbc-256": 32, "null": 0}
# auth name -> (hashlib constructor name, key length, default ICV length)
_AUTH: dict[str, tuple[str, int, int]] = {
    "hmac-sha256-128": ("sha256", 32, 16),
    "hmac-sha384-192": ("sha384", 48, 24),
    "hmac-sha512-256": ("sha512", 64, 32),
    "hmac-sha1-96": ("sha1", 20, 12),
}

ALGORITHMS: dict[str, tuple[str, ...]] = {
    "aead": tuple(_AEAD),
    "enc": tuple(_ENC),
    "auth": tuple(_AUTH),
}


def _key_bytes(what: str, key: object) -> bytes:
    if not isinstance(key, bytes | bytearray | memoryview):
        raise ValueError(f"{what} must be bytes, got {type(key).__name__}")
    return bytes(key)


# -- integrity (HMAC) ------------------------------------------------------------------------------


class HmacIntegrity:
    """Keyed HMAC with a truncated output: the ESP/AH integrity algorithm on its own.

    The inner and outer hash states are keyed once (RFC 2104) and copied per packet.
    """

    __slots__ = ("_inner", "_outer", "icv_len", "name")

    def __init__(self, name: str, key: bytes, icv_len: int | None = None) -> None:
        if name not in _AUTH:
            raise ValueError(f"unknown auth algorithm {name!r}; choose one of {', '.join(_AUTH)}")
        digest, key_len, default_icv = _AUTH[name]
        key = _key_bytes(f"{name} key", key)
        if len(key) != key_len:
            raise ValueError(f"{name} needs a {key_len}-byte key, got {len(key)} bytes")
        full = hashlib.new(digest).digest_size
        if icv_len is None:
            icv_len = default_icv
        elif isinstance(icv_len, bool) or not isinstance(icv_len, int) or not (
            12 <= icv_len <= full and icv_len % 4 == 0
        ):
            raise ValueError(
                f"{name}: icv_len must be a multiple of 4 between 12 and {full} bytes "
                f"(default {default_icv}), got {icv_len!r}"
            )
        self.name = name
        self.icv_len = icv_len
        ctor: Callable[..., Any] = getattr(hashlib, digest)
        block = ctor().block_size
        if len(key) > block:
            key = ctor(key).digest()
        key = key.ljust(block, b"\x00")
        self._inner = ctor(bytes(b ^ 0x36 for b in key))
        self._outer = ctor(bytes(b ^ 0x5C for b in key))

    def compute(self, data: Buffer, tail: Buffer = b"") -> bytes:
        """The truncated ICV over ``data`` followed by ``tail``."""
        inner = self._inner.copy()
        inner.update(data)
        if tail:
            inner.update(tail)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[: self.icv_len]

    def verify(self, data: Buffer, icv: Buffer, tail: Buffer = b"") -> bool:
        """Constant-time comparison of ``icv`` with the ICV over ``data`` + ``tail``."""
        return hmac.compare_digest(self.compute(data, tail), bytes(icv))

    def __repr__(self) -> str:
        return f"HmacIntegrity({self.name}, icv_len={self.icv_len})"


def make_integrity(auth: str, auth_key: bytes, icv_len: int | None = None) -> HmacIntegrity:
    """An HMAC integrity algorithm by configuration name (for AH, or ESP's enc+auth)."""
    return HmacIntegrity(auth, auth_key, icv_len)


# -- ESP transforms ----------------------------------------------------------------------------------


class Transform:
    """One SA's ESP algorithm with its keys and cipher objects.

    ``seal(prefix, esp_header, seq_hi, iv, plaintext, seq)`` returns the finished packet
    ``prefix | esp_header | IV | ciphertext | ICV`` in one join (prefix: the IP header, already
    carrying the final length, which is ``overhead + len(plaintext)`` past it). ``plaintext`` is
    the padded payload (payload, padding, pad length, next header); ``seq_hi`` is the packed high
    32 bits of the sequence number with ESN, else ``b""``; ``iv`` is None except in tests.

    ``open(esp, seq_hi)`` takes the whole ESP part (header to ICV; its length already checked
    against ``min_len`` and ``block_size``) and returns the padded plaintext, or None when the
    ICV does not verify.

    For AES-GCM-16 and ChaCha20-Poly1305, ``cipher`` is the AEAD object and ``nonce_salt`` the
    nonce prefix (key material: never log either): the SA hands them to its C core
    (``_espcore.EspCore``), which frames ESP around that same object's encrypt()/decrypt().
    They are None / b"" otherwise.
    """

    __slots__ = ("block_size", "cipher", "icv_len", "integrity", "iv_len", "min_len", "name", "nonce_salt",
                 "overhead")
    aead: ClassVar[bool] = False

    def __init__(self, name: str, iv_len: int, icv_len: int, block_size: int,
                 integrity: HmacIntegrity | None = None) -> None:
        self.name = name
        self.iv_len = iv_len
        self.icv_len = icv_len
        self.block_size = block_size  # padding alignment of (payload + 2): 4, or the cipher block
        self.integrity = integrity
        # ESP header + IV + at least pad length and next header (one block for CBC) + ICV
        self.min_len = 8 + iv_len + (block_size if block_size > 4 else 2) + icv_len
        self.overhead = 8 + iv_len + icv_len  # ESP bytes besides the padded plaintext
        self.cipher: AESGCM | ChaCha20Poly1305 | None = None
        self.nonce_salt = b""

    def seal(self, prefix: Buffer, esp_header: bytes, seq_hi: bytes, iv: bytes | None, plaintext: bytes,
             seq: int) -> bytes:
        raise NotImplementedError

    def open(self, esp: memoryview, seq_hi: bytes) -> bytes | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, iv_len={self.iv_len}, icv_len={self.icv_len})"


def _aad(esp_header: bytes | memoryview, seq_hi: bytes) -> bytes:
    """RFC 4106 §5 / RFC 7634 §2.1: SPI | seq (32-bit), or SPI | seq_hi | seq_lo with ESN."""
    if seq_hi:
        return b"".join((esp_header[:4], seq_hi, esp_header[4:8]))
    return bytes(esp_header[:8])


class AeadTransform(Transform):
    """AES-GCM with a 16-byte ICV, or ChaCha20-Poly1305: nonce = salt | 8-byte IV (the seq)."""

    __slots__ = ()
    aead = True
    cipher: AESGCM | ChaCha20Poly1305  # never None here (the base's slot, shared with the SA's C core)

    def __init__(self, name: str, cipher: AESGCM | ChaCha20Poly1305, salt: bytes, icv_len: int) -> None:
        super().__init__(name, 8, icv_len, 4)
        self.cipher = cipher
        self.nonce_salt = salt

    def seal(self, prefix: Buffer, esp_header: bytes, seq_hi: bytes, iv: bytes | None, plaintext: bytes,
             seq: int) -> bytes:
        if iv is None:
            iv = seq.to_bytes(8, "big")  # RFC 4106 §3.1: a counter is a valid, never-repeating IV
        aad = b"".join((esp_header[:4], seq_hi, esp_header[4:])) if seq_hi else esp_header
        return b"".join((prefix, esp_header, iv, self.cipher.encrypt(self.nonce_salt + iv, plaintext, aad)))

    def open(self, esp: memoryview, seq_hi: bytes) -> bytes | None:
        try:
            return self.cipher.decrypt(self.nonce_salt + esp[8:16], esp[16:], _aad(esp, seq_hi))
        except InvalidTag:
            return None


class ShortTagGcmTransform(Transform):
    """AES-GCM with an 8- or 12-byte ICV (RFC 4106 §6): the GCM tag truncated to its first bytes.

    AESGCM only verifies full 16-byte tags and a GCM context per packet costs ~6 us, so opening
    recomputes the tag instead. GCM encryption XORs a keystream that depends only on key, nonce
    and position, so "encrypting" the received ciphertext yields the candidate plaintext, and
    encrypting that yields the received ciphertext again with its full tag; the tag's first bytes
    are compared with the ICV in constant time and nothing is returned unless they match. (Both
    outputs stay inside this method: the nonce is not reused for anything anyone sees.)
    """

    __slots__ = ("_aead", "_salt")
    aead = True

    def __init__(self, name: str, key: bytes, salt: bytes, icv_len: int) -> None:
        super().__init__(name, 8, icv_len, 4)
        self._aead = AESGCM(key)
        self._salt = salt

    def seal(self, prefix: Buffer, esp_header: bytes, seq_hi: bytes, iv: bytes | None, plaintext: bytes,
             seq: int) -> bytes:
        if iv is None:
            iv = seq.to_bytes(8, "big")
        sealed = self._aead.encrypt(self._salt + iv, plaintext, _aad(esp_header, seq_hi))
        return b"".join((prefix, esp_header, iv, memoryview(sealed)[: len(plaintext) + self.icv_len]))

    def open(self, esp: memoryview, seq_hi: bytes) -> bytes | None:
        end = len(esp) - self.icv_len
        n = end - 16
        nonce = self._salt + esp[8:16]
        aad = _aad(esp, seq_hi)
        plaintext = self._aead.encrypt(nonce, esp[16:end], aad)[:n]
        tag = self._aead.encrypt(nonce, plaintext, aad)[n:]
        return plaintext if hmac.compare_digest(tag[: self.icv_len], esp[end:]) else None


class GmacTransform(Transform):
    """ENCR_NULL_AUTH_AES_GMAC (RFC 4543 §3): nothing encrypted; AAD = SPI | seq | IV | payload.

    With ESN the AAD starts SPI | seq_hi | seq_lo (§3.3). The IV is carried and is part of the
    nonce, so it must still never repeat under one key.
    """

    __slots__ = ("_aead", "_salt")
    aead = True

    def __init__(self, name: str, key: bytes, salt: bytes) -> None:
        super().__init__(name, 8, 16, 4)
        self._aead = AESGCM(key)
        self._salt = salt

    def seal(self, prefix: Buffer, esp_header: bytes, seq_hi: bytes, iv: bytes | None, plaintext: bytes,
             seq: int) -> bytes:
        if iv is None:
            iv = seq.to_bytes(8, "big")
        aad = b"".join((_aad(esp_header, seq_hi), iv, plaintext))
        return b"".join((prefix, esp_header, iv, plaintext, self._aead.encrypt(self._salt + iv, b"", aad)))

    def open(self, esp: memoryview, seq_hi: bytes) -> bytes | None:
        end = len(esp) - 16
        aad = b"".join((_aad(esp, seq_hi), esp[8:end]))
        try:
            self._aead.decrypt(self._salt + esp[8:16], esp[end:], aad)
        except InvalidTag:
            return None
        return bytes(esp[16:end])


class CbcHmacTransform(Transform):
    """AES-CBC (RFC 3602, random 16-byte IV) then HMAC over ESP header | IV | ciphertext (| seq_hi).

    The ICV is verified before anything is decrypted (RFC 4303 §3.4.4).
    """

    __slots__ = ("_dec", "_dec_state", "_enc", "_enc_state", "_mac")

    def __init__(self, name: str, key: bytes, integrity: HmacIntegrity) -> None:
        super().__init__(name, 16, integrity.icv_len, 16, integrity)
        self._mac = integrity
        aes = algorithms.AES(key)
        zero = bytes(16)
        # long-lived contexts; their chaining state (the last ciphertext block) is tracked here
        self._enc = Cipher(aes, modes.CBC(zero)).encryptor()
        self._dec = Cipher(aes, modes.CBC(zero)).decryptor()
        self._enc_state = 0
        self._dec_state = 0

    def seal(self, prefix: Buffer, esp_header: bytes, seq_hi: bytes, iv: bytes | None, plaintext: bytes,
             seq: int) -> bytes:
        if len(plaintext) & 15 or not plaintext:
            raise ValueError("CBC plaintext must be whole 16-byte blocks")  # would desync the context
        if iv is None:
            iv = os.urandom(16)  # RFC 3602 §3: unpredictable IV
        # the context XORs its state S into block 1; pre-XOR IV ^ S so that block 1 sees P1 ^ IV
        first = int.from_bytes(plaintext[:16], "big") ^ int.from_bytes(iv, "big") ^ self._enc_state
        ciphertext = self._enc.update(first.to_bytes(16, "big") + plaintext[16:])
        self._enc_state = int.from_bytes(ciphertext[-16:], "big")
        esp = b"".join((esp_header, iv, ciphertext))
        return b"".join((prefix, esp, self._mac.compute(esp, seq_hi)))

    def open(self, esp: memoryview, seq_hi: bytes) -> bytes | None:
        end = len(esp) - self.icv_len
        ciphertext = esp[24:end]
        if len(ciphertext) & 15 or not ciphertext:
            raise ValueError("CBC ciphertext is not whole 16-byte blocks")  # esp.py checks first
        if not self._mac.verify(esp[:end], esp[end:], seq_hi):
            return None
        plaintext = self._dec.update(ciphertext)
        # the context XORed its state S into block 1; swap it for the packet's IV
        first = (int.from_bytes(plaintext[:16], "big") ^ self._dec_state
                 ^ int.from_bytes(esp[8:24], "big"))
        self._dec_state = int.from_bytes(ciphertext[-16:], "big")
        return first.to_bytes(16, "big") + plaintext[16:]


class NullHmacTransform(Transform):
    """NULL encryption (RFC 2410) with HMAC: integrity only, payload in clear, no IV."""

    __slots__ = ("_mac",)

    def __init__(self, name: str, integrity: HmacIntegrity) -> None:
        super().__init__(name, 0, integrity.icv_len, 4, integrity)
        self._mac = integrity

    def seal(self, prefix: Buffer, esp_header: bytes, seq_hi: bytes, iv: bytes | None, plaintext: bytes,
             seq: int) -> bytes:
        esp = esp_header + plaintext
        return b"".join((prefix, esp, self._mac.compute(esp, seq_hi)))

    def open(self, esp: memoryview, seq_hi: bytes) -> bytes | None:
        end = len(esp) - self.icv_len
        if not self._mac.verify(esp[:end], esp[end:], seq_hi):
            return None
        return bytes(esp[8:end])


def make_transform(*, aead: str | None = None, key: bytes = b"", enc: str | None = None,
                   enc_key: bytes = b"", auth: str | None = None, auth_key: bytes = b"",
                   icv_len: int | None = None) -> Transform:
    """Build the ESP transform for an SA; ValueError names the algorithm and what was expected.

    ``enc=None`` with an ``auth`` means integrity only (as ``null`` encryption): this is what AH
    callers get, with ``.integrity`` holding the HMAC.
    """
    if aead is not None:
        if enc is not None or auth is not None:
            raise ValueError(f"aead {aead!r} excludes enc and auth (an AEAD encrypts and authenticates)")
        if aead not in _AEAD:
            raise ValueError(f"unknown aead algorithm {aead!r}; choose one of {', '.join(_AEAD)}")
        key_len, icv_lens, default_icv = _AEAD[aead]
        key = _key_bytes(f"{aead} key", key)
        if len(key) != key_len + SALT_LEN:
            raise ValueError(
                f"{aead} needs a {key_len + SALT_LEN}-byte key ({key_len}-byte cipher key + "
                f"{SALT_LEN}-byte salt), got {len(key)} bytes"
            )
        if icv_len is None:
            icv_len = default_icv
        if isinstance(icv_len, bool) or icv_len not in icv_lens:
            allowed = " or ".join(str(n) for n in icv_lens)
            raise ValueError(f"{aead}: icv_len must be {allowed} bytes, got {icv_len!r}")
        cipher_key, salt = key[:key_len], key[key_len:]
        if aead.startswith("aes-gmac"):
            return GmacTransform(aead, cipher_key, salt)
        if aead == "chacha20-poly1305":
            return AeadTransform(aead, ChaCha20Poly1305(cipher_key), salt, 16)
        if icv_len == 16:
            return AeadTransform(aead, AESGCM(cipher_key), salt, 16)
        return ShortTagGcmTransform(aead, cipher_key, salt, icv_len)

    if key:
        raise ValueError("'key' is only for aead algorithms; give enc_key and auth_key")
    if auth is None:
        if enc is None:
            raise ValueError("no algorithm given: set aead, or enc and auth")
        raise ValueError(
            f"enc {enc!r} without auth is not allowed (confidentiality-only ESP, RFC 8221 §5); "
            f"add auth or use an aead"
        )
    integrity = HmacIntegrity(auth, auth_key, icv_len)
    if enc is None or enc == "null":
        if enc_key:
            raise ValueError("null encryption takes no enc_key")
        return NullHmacTransform(f"null+{auth}", integrity)
    if enc not in _ENC:
        raise ValueError(f"unknown enc algorithm {enc!r}; choose one of {', '.join(_ENC)}")
    enc_key = _key_bytes(f"{enc} key", enc_key)
    if len(enc_key) != _ENC[enc]:
        raise ValueError(f"{enc} needs a {_ENC[enc]}-byte key, got {len(enc_key)} bytes")
    return CbcHmacTransform(f"{enc}+{auth}", enc_key, integrity)


__all__ = [
    "ALGORITHMS",
    "SALT_LEN",
    "AeadTransform",
    "CbcHmacTransform",
    "GmacTransform",
    "HmacIntegrity",
    "NullHmacTransform",
    "ShortTagGcmTransform",
    "Transform",
    "make_integrity",
    "make_transform",
]
