"""Known-answer tests: published ESP packets and HMAC vectors, reproduced byte for byte.

Sources (hex copied from the documents, whitespace as printed):

* draft-mcgrew-gcm-test-01 §4 (test cases for GCM/GMAC in ESP, RFC 4106 / RFC 4543): spi, seq
  (4 octets, or 8 for an extended sequence number), nonce = salt | IV, the padded plaintext and the
  complete ESP packet. Their plaintexts end with next header 1, so each is checked through our
  transport mode too: an IPv4 packet of protocol 1 carrying the payload must encapsulate to an
  outer header followed by exactly the draft's ESP packet, and back.
* RFC 3602 §4 cases 5-8: AES-CBC ESP packets (transport: cases 5, 6; tunnel: 7, 8) without
  integrity. We do not allow confidentiality-only ESP (RFC 8221), so they run under
  aes-cbc-128 + hmac-sha1-96: the bytes up to the ICV must be the RFC's, and the ICV must be the
  HMAC of them computed here with the standard library.
* RFC 7634 Appendix A: the ChaCha20-Poly1305 ESP example (tunnel mode, next header 4).
* RFC 4868 §2.7.2 (HMAC-SHA-256/384/512 authentication test vectors, truncated) and RFC 2404 /
  RFC 2202 (HMAC-SHA1-96).

Outer IPv4 headers are rebuilt here with documentation addresses and a checksum computed the
RFC 1071 way (add 16-bit words, fold the carries), independently of nfq_ipsec.checksum. The
published payloads themselves contain the authors' private addresses; they are test data only.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any

import pytest

from nfq_ipsec import algorithms, esp
from nfq_ipsec.sa import SecurityAssociation


def hx(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def rfc1071_checksum(header: bytes) -> int:
    total = 0
    for i in range(0, len(header), 2):
        total += (header[i] << 8) | header[i + 1]
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(proto: int, payload: bytes, *, ident: int = 0x1234, ttl: int = 64, tos: int = 0,
         src: bytes = bytes((198, 51, 100, 3)), dst: bytes = bytes((198, 51, 100, 100))) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), ident, 0, ttl, proto, 0, src, dst)
    csum = rfc1071_checksum(head)
    return head[:10] + struct.pack("!H", csum) + head[12:] + payload


def make_sa(mode: str = "transport", *, spi: int, esn: bool = False, seq_start: int = 0,
            src: str = "198.51.100.3", dst: str = "198.51.100.100", **algs: Any) -> SecurityAssociation:
    return SecurityAssociation(name="kat", proto="esp", mode=mode, src=src, dst=dst, spi=spi, esn=esn,
                               seq_start=seq_start, replay_window=64, **algs)


# -- draft-mcgrew-gcm-test-01 ------------------------------------------------------------------------

# (aead, key, spi, seq, nonce, plaintext, packet); seq of 16 hex digits = extended sequence number
MCGREW: list[tuple[str, str, str, str, str, str, str]] = [
    ("aes-gcm-128", "4c80cdefbb5d10da906ac73c3613a634", "00004321", "8765432100000000",
     "2e443b684956ed7e3b244cfe",
     """45000048699a000080114db7c0a80102 c0a801010a9bf15638d3010000010000
        00000000045f736970045f7564700373 69700963796265726369747902646b00
        0021000101020201""",
     """00004321000000004956ed7e3b244cfe fecf537e729d5b07dc30df528dd22b76
        8d1b98736696a6fd348509fa13ceac34 cfa2436f14a3f3cf65925bf1f4a13c5d
        15b21e1884f5ff6247aeabb786b93bce 61bc17d768fd9732459018148f6cbe72
        2fd04796562dfdb4"""),
    ("aes-gcm-128", "feffe9928665731c6d6a8f9467308308", "0000a5f8", "0000000a",
     "cafebabefacedbaddecaf888",
     """4500003e698f000080114dccc0a80102 c0a801010a980035002a2343b2d00100
        00010000000000000373697009637962 65726369747902646b00000100010001""",
     """0000a5f80000000afacedbaddecaf888 deb22cd9b07c72c16e3a65beeb8df304
        a5a5897d33ae530f1ba76d5d114d2a5c 3de81827c10e9a4f51330d0eec416642
        cfbb85a5b47e48a4ec3b9ba95d918bd1 83b70d3aa8bc6ee4c309e9d85a41ad4a"""),
    ("aes-gcm-256", "abbccddef00112233445566778899aababbccddef00112233445566778899aab", "4a2cbfe3",
     "00000002", "112233440102030405060708",
     """4500003069a6400080062690c0a80102 9389155e0a9e008b2dc57ee000000000
        7002400020bf0000020405b401010402 01020201""",
     """4a2cbfe3000000020102030405060708 ff425c9b724599df7a3bcd510194e00d
        6a78107f1b0b1cbf06efae9d65a5d763 748a637985771d347f0545659f14e99d
        ef842d8eb335f4eecfdbf831824b4c49 15956c96"""),
    ("aes-gcm-128", "00000000000000000000000000000000", "00000000", "00000001",
     "000000000000000000000000",
     """4500003c99c500008001cb7a40679318 010101010800075c0200440061626364
        65666768696a6b6c6d6e6f7071727374 75767761626364656667686901020201""",
     """00000000000000010000000000000000 4688daf2f973a392732909c331d56d60
        f694abaa414b5e7ff5fdcdfff5e9a284 456476492719ffb64de7d9dca1e1d894
        bc3bd57873ed4d181d19d4d5c8c18af3 f821d496eeb096e98ad2b69e4799c71d"""),
    ("aes-gcm-128", "3de09874b388e6491988d0c3607eae1f", "42f67e3f", "1010101010101010",
     "57690e434e280000a2fca1a3",
     """4500003c99c300008001cb7c40679318 010101010800085c0200430061626364
        65666768696a6b6c6d6e6f7071727374 75767761626364656667686901020201""",
     """42f67e3f101010104e280000a2fca1a3 fba2caa4853cf9f0f22cb10d86dd83b0
        fec75691cf1a04b00d1138ec9c357917 65acbd8701ad79845bf9fe3fba487bc9
        1755e6662b4c8d0d1f5e22739530320a e0d731cc978ecafaeae88f00e80d6e48"""),
    ("aes-gcm-128", "3de09874b388e6491988d0c3607eae1f", "42f67e3f", "1010101010101010",
     "57690e434e280000a2fca1a3",
     """4500001c42a200008001441f406793b6 e00000020a00f5ff01020201""",
     """42f67e3f101010104e280000a2fca1a3 fba2ca845e5df9f0f22c3e6e86dd831e
        1fc65792cd1af9130e1379ed369f071f 35e034be95f112e4e7d05d35"""),
    ("aes-gcm-192", "feffe9928665731c6d6a8f9467308308feffe9928665731c", "0000a5f8", "0000000a",
     "cafebabefacedbaddecaf888",
     """45000028a4ad4000400678800a01038f 0a010612802306b8cb712602dd6bb03e
        501016d075680001""",
     """0000a5f80000000afacedbaddecaf888 a5b1f8066029aea40e598b8122de0242
        0938b3ab33f828e687b8858b5bfbdbd0 315b27452144cc7795457b9652037f53
        18027b5b4cd7a636"""),
    ("aes-gcm-128", "abbccddef00112233445566778899aab", "00000100", "0000000000000001",
     "decaf888cafedebaceface74",
     """4500004933ba00007f119106c3fb1d10 c2b1d326c02831ce0035dd7b800302d5
        00004e20001e8c18d75b81dc91baa047 6b91b924b280389d92c963bac046ec95
        9b6266c04722b14923010101""",
     """0000010000000001cafedebaceface74 18a6fd42f72cbf4ab2a2ea901f73d814
        e3e7f243d95412e1c349c1d2fbec168f 9190feebaf2cb01984e65863965d7472
        b79da345e0e780191f0d2f0e0f496c22 6f2127b27db35724e7845d68651f57e6
        5f354f75ff17015769623436"""),
    ("aes-gcm-256", "abbccddef00112233445566778899aababbccddef00112233445566778899aab", "17405e67",
     "156f3126dd0db99b", "73616c74616e640169766563",
     """45080028732c00004006e9f90a010612 0a01038f06b88023dd6bafbecb712602
        50101f646d540001""",
     """17405e67dd0db99b616e640169766563 f2d69ecdbd5a0d5b8d5ef38bad4da58d
        1f278fde98ef67549d524a3018d9a57f f4d3a31ce673119e451626c2415771e3
        b7eebca614c89b35"""),
    ("aes-gcm-128", "3de09874b388e6491988d0c3607eae1f", "42f67e3f", "1010101010101010",
     "57690e434e280000a2fca1a3",
     """45000049333e00007f119182c3fb1d10 c2b1d326c02831ce0035cb458003025b
        000001e0001e8c18d65759d52284a035 2c71475c8880391c764d6e5ee0496b32
        5ae270c03899493915010101""",
     """42f67e3f101010104e280000a2fca1a3 fba2cad12fc1f9f00d3cebf305410db8
        3d7784b607323d220f24b0a97d541828 00cadb0f68d99ef0e0c0c89ae9bea888
        4e52d65bc1afd0740f742444747b5b39 ab533163aad4550ee5160975cdb608c5
        769189609763b8e18caa81e2"""),
    ("aes-gcm-256", "abbccddef00112233445566778899aababbccddef00112233445566778899aab", "17405e67",
     "156f3126dd0db99b", "73616c74616e640169766563",
     """636973636f0172756c65730174686501 6e6574776501646566696e6501746865
        746563686e6f6c6f6769657301746861 7477696c6c01646566696e65746f6d6f
        72726f7701020201""",
     """17405e67dd0db99b616e640169766563 d4b7ed86a1777f2ea13d6973d324c69e
        7b43f826fb56831226508bebd2dceb18 d0a6df10e5487df074113e14c641024e
        3e6773d91a62ee429b043a10e3efe6b0 12a49363412364f8c0cac587f249e56b
        11e24f30e44ccc76"""),
    ("aes-gcm-128", "7d773d00c144c525ac619d18c84a3f47", "335467ae", "ffffffff",
     "d966426743457e9182443bc6",
     "01020201",
     """335467aeffffffff43457e9182443bc6 437f866bcb3f699fe9b0822bac961c45
        04bef270"""),
    ("aes-gcm-128", "abbccddef00112233445566778899aab", "00000100", "0000000000000001",
     "decaf888cafedebaceface74",
     """746f016265016f72016e6f7401746f01 62650001""",
     """0000010000000001cafedebaceface74 29c9fc69a197d038ccdd14e2ddfcaa05
        43332164412503524303ed3c6c5f2838 43af8c3e"""),
    ("aes-gcm-256", "6c6567616c697a656d6172696a75616e61616e64646f69746265666f72656961", "796b6963",
     "ffffffffffffffff", "7475726e333021696765746d",
     """45000030da3a00008001df3bc0a80005 c0a800010800c6cd0200070061626364
        65666768696a6b6c6d6e6f7071727374 01020201""",
     """796b6963ffffffff333021696765746d f97ab2aa356d8edce17644ac8c78e25d
        d24dedbb29ebf1b64a274b39b49c3a86 4cd3d78ca4ae68a32b42458fb57dbe82
        1dcc63b9d0937ba2945f669368661a32 9fb4c053"""),
    ("aes-gmac-128", "4c80cdefbb5d10da906ac73c3613a634", "00004321", "00000007",
     "22433c640000000000000000",
     """45000030da3a00008001df3bc0a80005 c0a800010800c6cd0200070061626364
        65666768696a6b6c6d6e6f7071727374 01020201""",
     """00004321000000070000000000000000 45000030da3a00008001df3bc0a80005
        c0a800010800c6cd0200070061626364 65666768696a6b6c6d6e6f7071727374
        01020201f2a9a836e155106aa8dcd618 e4099aaa"""),
    ("aes-gcm-128", "3de09874b388e6491988d0c3607eae1f", "3f7ef642", "1010101010101010",
     "57690e434e280000a2fca1a3",
     """45000030da3a00008001df3bc0a80005 c0a800010800c6cd0200070061626364
        65666768696a6b6c6d6e6f7071727374 01020201""",
     """3f7ef642101010104e280000a2fca1a3 fba2caa8c6c5f9f0f22ca54a061210ad
        3f6e5791cf1aca210d117cec9c357917 65acbd8701ad79845bf9fe3fba487bc9
        6321930684eecadb56912546e7a95c97 40d7cb05"""),
    ("aes-gcm-128", "4c80cdefbb5d10da906ac73c3613a634", "00004321", "8765432100000007",
     "22433c644855ec7d3a234bfd",
     """0800c6cd020007006162636465666768 696a6b6c6d6e6f707172737401020201""",
     """00004321000000074855ec7d3a234bfd 74752e8aeb5d873cd7c0f4acc36c4bff
        84b7d7b98f0ca8b6acda6894bc619069 ef9cbc28fe1b56a7c4e0d58c86cd2bc0"""),
]
MCGREW_IDS = [f"{c[0]}-spi{c[2]}-seq{c[3]}" for c in MCGREW]


def mcgrew_case(case: tuple[str, ...]) -> dict[str, Any]:
    aead, key, spi, seq, nonce, plaintext, packet = case
    nonce_b = hx(nonce)
    return {
        "aead": aead,
        "key": hx(key) + nonce_b[:4],  # as ip xfrm takes it: cipher key | 4-byte salt
        "spi": int(spi, 16),
        "seq": int(seq, 16),
        "esn": len(seq) == 16,
        "iv": nonce_b[4:],
        "plaintext": hx(plaintext),
        "packet": hx(packet),
    }


@pytest.mark.parametrize("case", MCGREW, ids=MCGREW_IDS)
def test_mcgrew_transform_seal_and_open(case: tuple[str, ...]) -> None:
    """The transform alone: SPI/seq/IV/padded plaintext -> the draft's ESP packet, and back."""
    c = mcgrew_case(case)
    t = algorithms.make_transform(aead=c["aead"], key=c["key"])
    esp_header = struct.pack("!II", c["spi"], c["seq"] & 0xFFFFFFFF)
    seq_hi = struct.pack("!I", c["seq"] >> 32) if c["esn"] else b""
    assert t.seal(b"", esp_header, seq_hi, c["iv"], c["plaintext"], c["seq"]) == c["packet"]
    assert t.open(memoryview(c["packet"]), seq_hi) == c["plaintext"]
    # the ESN high half really is authenticated: the wrong one fails
    wrong_hi = struct.pack("!I", (c["seq"] >> 32) ^ 1) if c["esn"] else struct.pack("!I", 1)
    assert t.open(memoryview(c["packet"]), wrong_hi) is None


@pytest.mark.parametrize("case", [c for c in MCGREW if int(c[2], 16) >= 256],
                         ids=[i for c, i in zip(MCGREW, MCGREW_IDS, strict=True) if int(c[2], 16) >= 256])
def test_mcgrew_full_packets_through_transport_mode(case: tuple[str, ...]) -> None:
    """A real SA in transport mode turns an IPv4 packet into outer header + the draft's packet."""
    c = mcgrew_case(case)
    plaintext = c["plaintext"]
    padlen, next_header = plaintext[-2], plaintext[-1]
    payload = plaintext[: len(plaintext) - 2 - padlen]
    clear = ipv4(next_header, payload)
    expected = ipv4(50, c["packet"])
    out = make_sa(spi=c["spi"], esn=c["esn"], aead=c["aead"], key=c["key"])
    assert esp.encapsulate_with_iv(out, clear, c["seq"], c["iv"]) == expected
    # the receiver's window sits just below the packet, so ESN inference finds the high half
    inbound = make_sa(spi=c["spi"], esn=c["esn"], seq_start=c["seq"] - 1 if c["esn"] else 0,
                      aead=c["aead"], key=c["key"])
    assert esp.decapsulate(inbound, expected) == clear
    assert inbound.replay.top == c["seq"]


def test_mcgrew_default_iv_is_the_sequence_number() -> None:
    """Without an explicit IV the AEAD IV is the 64-bit sequence number (RFC 4106 §3.1)."""
    c = mcgrew_case(MCGREW[1])
    out = make_sa(spi=c["spi"], aead=c["aead"], key=c["key"])
    clear = ipv4(1, c["plaintext"][:-2])
    packet = esp.encapsulate(out, clear, 10)
    assert packet[20 + 8 : 20 + 16] == (10).to_bytes(8, "big")
    # and it is what the draft would produce with that IV
    assert packet == esp.encapsulate_with_iv(out, clear, 10, (10).to_bytes(8, "big"))


# -- RFC 3602 ----------------------------------------------------------------------------------------

RFC3602_KEY_56 = hx("90d382b4 10eeba7a d938c46c ec1a82bf")
RFC3602_KEY_78 = hx("01234567 89abcdef 01234567 89abcdef")
SHA1_KEY = bytes(range(0x61, 0x61 + 20))



def cbc_sha1(key: bytes) -> dict[str, Any]:
    return {"enc": "aes-cbc-128", "enc_key": key, "auth": "hmac-sha1-96", "auth_key": SHA1_KEY}


# (case, key, mode, spi, seq, iv, payload or inner packet, next header, ESP packet without ICV)
RFC3602 = [
    (5, RFC3602_KEY_56, "transport", 0x4321, 1, "e96e8c08 ab465763 fd098d45 dd3ff893",
     """08000ebd a70a0000 8e9c083d b95b0700 08090a0b 0c0d0e0f 10111213 14151617
        18191a1b 1c1d1e1f 20212223 24252627 28292a2b 2c2d2e2f 30313233 34353637""", 1,
     """00004321 00000001 e96e8c08 ab465763 fd098d45 dd3ff893
        f663c25d 325c18c6 a9453e19 4e120849 a4870b66 cc6b9965 330013b4 898dc856
        a4699e52 3a55db08 0b59ec3a 8e4b7e52 775b07d1 db34ed9c 538ab50c 551b874a
        a269add0 47ad2d59 13ac19b7 cfbad4a6"""),
    (6, RFC3602_KEY_56, "transport", 0x4321, 8, "69d08df7 d203329d b093fc49 24e5bd80",
     "0800b5e8 a80a0500 a69c083d 0b660e00 77777777 77777777 77777777", 1,
     """00004321 00000008 69d08df7 d203329d b093fc49 24e5bd80
        f5199588 1ec4e0c4 488987ce 742e8109 689bb379 d2d750c0 d915dca3 46a89f75"""),
    (7, RFC3602_KEY_78, "tunnel", 0x8765, 2, "f4e76524 4f6407ad f13dc138 0f673f37",
     """45000054 09040000 4001f988 c0a87b03 c0a87bc8 08009f76 a90a0100 b49c083d
        02a20400 08090a0b 0c0d0e0f 10111213 14151617 18191a1b 1c1d1e1f 20212223
        24252627 28292a2b 2c2d2e2f 30313233 34353637""", 4,
     """00008765 00000002 f4e76524 4f6407ad f13dc138 0f673f37
        773b5241 a4c44922 5e4f3ce5 ed611b0c 237ca96c f74a9301 3c1b0ea1 a0cf70f8
        e4ecaec7 8ac53aad 7a0f022b 859243c6 47752e94 a859352b 8a4d4d2d ecd136e5
        c177f132 ad3fbfb2 201ac990 4c74ee0a 109e0ca1 e4dfe9d5 a100b842 f1c22f0d"""),
    (8, RFC3602_KEY_78, "tunnel", 0x8765, 5, "85d47224 b5f3dd5d 2101d4ea 8dffab22",
     """45000044 090c0000 4001f990 c0a87b03 c0a87bc8 0800d63c aa0a0200 c69c083d
        a3de0300 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff
        ffffffff""", 4,
     """00008765 00000005 85d47224 b5f3dd5d 2101d4ea 8dffab22
        15b92683 819596a8 047232cc 00f7048f e45318e1 1f8a0f62 ede3c3fc 61203bb5
        0f980a08 c9843fd3 a1b06d5c 07ff9639 b7eb7dfb 3512e5de 435e7207 ed971ef3
        d2726d9b 5ef6affc 6d17a0de cbb13892"""),
]


@pytest.mark.parametrize("case", RFC3602, ids=[f"case{c[0]}" for c in RFC3602])
def test_rfc3602_cbc_packets(case: tuple[Any, ...]) -> None:
    _, key, mode, spi, seq, iv, data, next_header, esp_no_icv = case
    data, esp_no_icv = hx(data), hx(esp_no_icv)
    sa_args = cbc_sha1(key)
    out = make_sa(mode, spi=spi, **sa_args)
    inbound = make_sa(mode, spi=spi, **sa_args)
    icv = hmac.new(SHA1_KEY, esp_no_icv, hashlib.sha1).digest()[:12]
    if mode == "transport":
        clear = ipv4(next_header, data, ident=0x08F2)
        expected = ipv4(50, esp_no_icv + icv, ident=0x08F2)
        assert esp.encapsulate_with_iv(out, clear, seq, hx(iv)) == expected
        assert esp.decapsulate(inbound, expected) == clear
    else:
        packet = esp.encapsulate_with_iv(out, data, seq, hx(iv))
        assert packet[20:] == esp_no_icv + icv
        assert packet[9] == 50 and packet[12:20] == bytes((198, 51, 100, 3, 198, 51, 100, 100))
        assert rfc1071_checksum(packet[:20]) == 0
        assert esp.decapsulate(inbound, packet) == data


def test_rfc3602_cbc_iv_handling_over_many_packets() -> None:
    """The reused CBC contexts must give standard CBC for every packet, whatever went before.

    Case 5 is encrypted, then unrelated traffic moves the contexts' chaining state on (both
    directions), then case 5 again: same bytes, and the receiver still decrypts it.
    """
    _, key, _, spi, seq, iv, data, next_header, esp_no_icv = RFC3602[0]
    sa_args = cbc_sha1(key)
    out = make_sa(spi=spi, **sa_args)
    inbound = make_sa(spi=spi, **sa_args)
    clear = ipv4(next_header, hx(data), ident=0x08F2)
    first = esp.encapsulate_with_iv(out, clear, seq, hx(iv))
    assert first[20 : 20 + len(hx(esp_no_icv))] == hx(esp_no_icv)
    for s in range(2, 40):
        other = ipv4(17, bytes(range(s)) * 3)
        assert esp.decapsulate(inbound, esp.encapsulate(out, other, s)) == other
    assert esp.encapsulate_with_iv(out, clear, seq, hx(iv)) == first
    fresh = make_sa(spi=spi, seq_start=40, **sa_args)
    assert esp.decapsulate(fresh, esp.encapsulate_with_iv(out, clear, 41, hx(iv))) == clear


# -- RFC 7634 Appendix A -------------------------------------------------------------------------------

RFC7634_KEY = hx("""80 81 82 83 84 85 86 87 88 89 8a 8b 8c 8d 8e 8f
                    90 91 92 93 94 95 96 97 98 99 9a 9b 9c 9d 9e 9f a0 a1 a2 a3""")
RFC7634_PLAINTEXT = hx("""45 00 00 54 a6 f2 00 00 40 01 e7 78 c6 33 64 05
                          c0 00 02 05 08 00 5b 7a 3a 08 00 00 55 3b ec 10
                          00 07 36 27 08 09 0a 0b 0c 0d 0e 0f 10 11 12 13
                          14 15 16 17 18 19 1a 1b 1c 1d 1e 1f 20 21 22 23
                          24 25 26 27 28 29 2a 2b 2c 2d 2e 2f 30 31 32 33
                          34 35 36 37 01 02 02 04""")
RFC7634_CIPHERTEXT_TAG = hx("""24 03 94 28 b9 7f 41 7e 3c 13 75 3a 4f 05 08 7b
                               67 c3 52 e6 a7 fa b1 b9 82 d4 66 ef 40 7a e5 c6
                               14 ee 80 99 d5 28 44 eb 61 aa 95 df ab 4c 02 f7
                               2a a7 1e 7c 4c 4f 64 c9 be fe 2f ac c6 38 e8 f3
                               cb ec 16 3f ac 46 9b 50 27 73 f6 fb 94 e6 64 da
                               91 65 b8 28 29 f6 41 e0
                               76 aa a8 26 6b 7f b0 f7 b1 1b 36 99 07 e1 ad 43""")


def test_rfc7634_chacha20_poly1305_esp_example() -> None:
    """SPI 0x01020304, seq 5, IV 1011121314151617: the inner ICMP echo (198.51.100.5 -> 192.0.2.5)."""
    inner = RFC7634_PLAINTEXT[:-4]
    assert inner[2:4] == (84).to_bytes(2, "big")
    sa_args: dict[str, Any] = {"aead": "chacha20-poly1305", "key": RFC7634_KEY}
    out = make_sa("tunnel", spi=0x01020304, src="203.0.113.153", dst="192.0.2.100", **sa_args)
    packet = esp.encapsulate_with_iv(out, inner, 5, hx("10 11 12 13 14 15 16 17"))
    assert packet[20:] == hx("01020304 00000005 1011121314151617") + RFC7634_CIPHERTEXT_TAG
    inbound = make_sa("tunnel", spi=0x01020304, src="203.0.113.153", dst="192.0.2.100", **sa_args)
    assert esp.decapsulate(inbound, packet) == inner


# -- HMAC: RFC 4868 §2.7.2, RFC 2202/2404 -----------------------------------------------------------------

JEFE = b"Jefe"
HI_THERE = b"Hi There"
WHAT = b"what do ya want for nothing?"
HMAC_VECTORS = [
    ("hmac-sha256-128", b"\x0b" * 32, HI_THERE, "198a607eb44bfbc69903a0f1cf2bbdc5"),
    ("hmac-sha256-128", JEFE * 8, WHAT, "167f928588c5cc2eef8e3093caa0e87c"),
    ("hmac-sha256-128", b"\xaa" * 32, b"\xdd" * 50, "cdcb1220d1ecccea91e53aba3092f962"),
    ("hmac-sha256-128", bytes(range(1, 33)), b"\xcd" * 50, "372efcf9b40b35c2115b1346903d2ef4"),
    ("hmac-sha384-192", b"\x0b" * 48, HI_THERE, "b6a8d5636f5c6a7224f9977dcf7ee6c7fb6d0c48cbdee973"),
    ("hmac-sha384-192", JEFE * 12, WHAT, "2c7353974f1842fd66d53c452ca42122b28c0b594cfb184d"),
    ("hmac-sha512-256", b"\x0b" * 64, HI_THERE,
     "637edc6e01dce7e6742a99451aae82df23da3e92439e590e43e761b33e910fb8"),
    ("hmac-sha1-96", b"\x0b" * 20, HI_THERE, "b617318655057264e28bc0b6"),
    ("hmac-sha1-96", b"\x0c" * 20, b"Test With Truncation", "4c1a03424b55e07fe7f27be1"),
]


@pytest.mark.parametrize("name,key,data,expected", HMAC_VECTORS)
def test_hmac_known_answers(name: str, key: bytes, data: bytes, expected: str) -> None:
    integrity = algorithms.make_integrity(name, key)
    assert integrity.compute(data) == bytes.fromhex(expected)
    assert integrity.icv_len == len(expected) // 2
    # hashing data + tail without concatenating gives the same ICV (used for ESN)
    assert integrity.compute(data[:3], data[3:]) == bytes.fromhex(expected)
    assert integrity.verify(data, bytes.fromhex(expected))
    flipped = bytearray.fromhex(expected)
    flipped[-1] ^= 1
    assert not integrity.verify(data, bytes(flipped))
    assert not integrity.verify(data, bytes.fromhex(expected)[:-1])
