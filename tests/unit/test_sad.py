"""SAD: unique names and (proto, SPI, dst), RFC 4301 §4.1 inbound lookup."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from nfq_ipsec.sa import SecurityAssociation
from nfq_ipsec.sad import Sad

KEY = bytes(range(32))


def ah(name: str, spi: int = 0x1000, src: str = "192.0.2.1", dst: str = "198.51.100.2",
       **kw: Any) -> SecurityAssociation:
    return SecurityAssociation(name=name, proto="ah", mode="transport", src=src, dst=dst, spi=spi,
                               auth="hmac-sha256-128", auth_key=KEY, **kw)


def esp(name: str, spi: int = 0x1000, src: str = "192.0.2.1",
        dst: str = "198.51.100.2") -> SecurityAssociation:
    return SecurityAssociation(name=name, proto="esp", mode="tunnel", src=src, dst=dst, spi=spi,
                               aead="aes-gcm-128", key=KEY[:20])


def packed(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def test_add_get_list_remove() -> None:
    sad = Sad()
    a, b = ah("a"), ah("b", spi=0x2000)
    sad.add(a)
    sad.add(b)
    assert sad.get("a") is a and sad.get("zz") is None
    assert sad.list() == [a, b] and len(sad) == 2 and "b" in sad
    assert sad.remove("a") is a
    assert sad.list() == [b]
    with pytest.raises(KeyError):
        sad.remove("a")
    sad.add(ah("a"))  # the name and the SPI are free again


def test_duplicates_rejected() -> None:
    sad = Sad()
    sad.add(ah("a"))
    with pytest.raises(ValueError, match="'a' already exists"):
        sad.add(ah("a", spi=0x2000))
    with pytest.raises(ValueError, match=r"SPI 0x00001000 to 198\.51\.100\.2 is already used by SA 'a'"):
        sad.add(ah("b", src="203.0.113.9"))
    # same SPI: fine for another protocol or another destination
    sad.add(esp("c"))
    sad.add(ah("d", dst="198.51.100.3"))
    assert len(sad) == 3
    assert sad.get("b") is None  # the failed add left nothing behind


def test_lookup_inbound() -> None:
    sad = Sad()
    a = ah("a", spi=0x1000)
    e = esp("e", spi=0x1000)
    v6 = esp("v6", spi=0x1000, src="2001:db8::1", dst="2001:db8:1::2")
    for sa in (a, e, v6):
        sad.add(sa)
    dst, src = packed("198.51.100.2"), packed("192.0.2.1")
    assert sad.lookup_inbound(51, 0x1000, dst, src) is a
    assert sad.lookup_inbound(50, 0x1000, dst, src) is e
    # SPI + dst match even from another source (RFC 4301 §4.1, as Linux keys unicast SAs)
    assert sad.lookup_inbound(50, 0x1000, dst, packed("203.0.113.7")) is e
    assert sad.lookup_inbound(50, 0x1000, packed("2001:db8:1::2"), packed("2001:db8::1")) is v6
    assert sad.lookup_inbound(50, 0x1001, dst, src) is None
    assert sad.lookup_inbound(50, 0x1000, packed("198.51.100.3"), src) is None
    assert sad.lookup_inbound(41, 0x1000, dst, src) is None
    sad.remove("e")
    assert sad.lookup_inbound(50, 0x1000, dst, src) is None
    assert sad.lookup_inbound(51, 0x1000, dst, src) is a

