"""One description of an IPsec peering with a Linux kernel, from which both peers' configurations are generated.

Used by the interoperability tests (tests/interop, one `Cell` per matrix cell) and by
`nfq-ipsec demo --peer kernel`; the kernel runs in user-mode-linux (umlpeer.py).

A `Cell` says what is tested (protocol, mode, families, algorithm, ESN, replay window, traffic);
`Cell.materialize()` draws fresh random keys and SPIs and returns a `Keyed` cell, which renders
the Linux side (`ip -batch` lines for `ip xfrm state/policy`) and our side (TOML for
`nfq-ipsec run`) from the same values, so the two can never drift apart.

Topology (documentation addresses only):

    our namespace: tap 198.51.100.1/24 2001:db8:100::1/64   <== ethernet ==>   UML vec0 .2 / ::2
    tunnel inner:  ours 192.0.2.1, 2001:db8:2::1 (on lo)      UML 203.0.113.2, 2001:db8:3::2 (on lo)

SA names: "k2o" carries kernel -> ours, "o2k" ours -> kernel.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field, replace
from typing import Any

OURS_LINK4, UML_LINK4 = "198.51.100.1", "198.51.100.2"
OURS_LINK6, UML_LINK6 = "2001:db8:100::1", "2001:db8:100::2"
OURS_INNER4, UML_INNER4 = "192.0.2.1", "203.0.113.2"
OURS_INNER6, UML_INNER6 = "2001:db8:2::1", "2001:db8:3::2"

ND_TYPES = (133, 134, 135, 136, 137)  # router/neighbour solicitation/advertisement, redirect


@dataclass(frozen=True)
class Alg:
    """One algorithm suite in both vocabularies: our config names and the kernel's crypto API names."""

    aead: str | None = None
    enc: str | None = None
    auth: str | None = None
    key_len: int = 0  # AEAD: cipher key + 4-byte salt (as ip xfrm takes it); else the cipher key
    auth_key_len: int = 0
    icv_len: int = 16  # bytes (default of the suite)
    kernel_aead: str = ""  # e.g. rfc4106(gcm(aes))
    kernel_enc: str = ""
    kernel_auth: str = ""
    scapy_crypt: str = "NULL"
    scapy_auth: str | None = None


ALGS: dict[str, Alg] = {
    "aes-gcm-128": Alg(aead="aes-gcm-128", key_len=20, kernel_aead="rfc4106(gcm(aes))", scapy_crypt="AES-GCM"),
    "aes-gcm-256": Alg(aead="aes-gcm-256", key_len=36, kernel_aead="rfc4106(gcm(aes))", scapy_crypt="AES-GCM"),
    "chacha20-poly1305": Alg(aead="chacha20-poly1305", key_len=36, kernel_aead="rfc7539esp(chacha20,poly1305)",
                             scapy_crypt="CHACHA20-POLY1305"),
    "aes-gmac-128": Alg(aead="aes-gmac-128", key_len=20, kernel_aead="rfc4543(gcm(aes))",
                        scapy_crypt="AES-NULL-GMAC"),
    "aes-cbc-128+hmac-sha256-128": Alg(enc="aes-cbc-128", auth="hmac-sha256-128", key_len=16, auth_key_len=32,
                                       kernel_enc="cbc(aes)", kernel_auth="hmac(sha256)",
                                       scapy_crypt="AES-CBC", scapy_auth="SHA2-256-128"),
    "aes-cbc-256+hmac-sha512-256": Alg(enc="aes-cbc-256", auth="hmac-sha512-256", key_len=32, auth_key_len=64,
                                       icv_len=32, kernel_enc="cbc(aes)", kernel_auth="hmac(sha512)",
                                       scapy_crypt="AES-CBC", scapy_auth="SHA2-512-256"),
    "null+hmac-sha256-128": Alg(enc="null", auth="hmac-sha256-128", key_len=0, auth_key_len=32,
                                kernel_enc="ecb(cipher_null)", kernel_auth="hmac(sha256)",
                                scapy_crypt="NULL", scapy_auth="SHA2-256-128"),
    "ah-hmac-sha256-128": Alg(auth="hmac-sha256-128", auth_key_len=32, kernel_auth="hmac(sha256)",
                              scapy_auth="SHA2-256-128"),
}

TRAFFIC_KINDS = frozenset({"ping", "udp", "tcp", "big", "replay"})


@dataclass(frozen=True)
class Cell:
    """What one interop cell tests. `traffic` picks from TRAFFIC_KINDS."""

    name: str
    alg: str = "aes-gcm-128"
    proto: str = "esp"
    mode: str = "transport"
    outer: int = 4  # family of the SA endpoints
    inner: int | None = None  # tunnel mode: family of the protected traffic (None: same as outer)
    icv_len: int | None = None  # bytes; None: the suite's default
    esn: bool = False
    seq_start: int = 0
    replay_window: int = 32
    traffic: frozenset[str] = frozenset({"ping", "udp"})
    # Linux pads IPv4 AH to 8 bytes and insists on it on input unless the SA has `flag align4`
    # (RFC 4302 §2.6 asks for 4); we keep the RFC behaviour unless a cell says otherwise
    ah_align4: bool = True

    def __post_init__(self) -> None:
        if self.alg not in ALGS:
            raise ValueError(f"unknown algorithm suite {self.alg!r}")
        if (self.proto == "ah") != (self.alg.startswith("ah-")):
            raise ValueError(f"{self.name}: proto {self.proto} does not fit suite {self.alg}")
        if self.inner not in (None, self.outer) and self.mode != "tunnel":
            raise ValueError(f"{self.name}: mixed families need tunnel mode")
        if not self.traffic <= TRAFFIC_KINDS:
            raise ValueError(f"{self.name}: unknown traffic {sorted(self.traffic - TRAFFIC_KINDS)}")

    @property
    def inner_family(self) -> int:
        return self.inner or self.outer

    @property
    def icv_bytes(self) -> int:
        return self.icv_len or ALGS[self.alg].icv_len

    def materialize(self, rng: random.Random | None = None) -> Keyed:
        """Fresh random keys and SPIs (distinct per direction) for one run of this cell."""
        alg = ALGS[self.alg]
        sysrng = rng or random.SystemRandom()
        spis: set[int] = set()
        while len(spis) < 2:
            spis.add(sysrng.randrange(0x1000, 0xFFFFFFFF))
        spi_k2o, spi_o2k = sorted(spis)
        if sysrng.random() < 0.5:
            spi_k2o, spi_o2k = spi_o2k, spi_k2o

        def draw(n: int) -> bytes:
            return bytes(sysrng.randrange(256) for _ in range(n)) if rng else os.urandom(n)

        return Keyed(
            cell=self,
            k2o=SaKeys(spi=spi_k2o, key=draw(alg.key_len), auth_key=draw(alg.auth_key_len)),
            o2k=SaKeys(spi=spi_o2k, key=draw(alg.key_len), auth_key=draw(alg.auth_key_len)),
        )

    def with_(self, **kw: Any) -> Cell:
        return replace(self, **kw)


@dataclass(frozen=True)
class SaKeys:
    spi: int
    key: bytes = field(repr=False)
    auth_key: bytes = field(repr=False)


def _hex(b: bytes) -> str:
    return "0x" + b.hex() if b else '""'


@dataclass(frozen=True)
class Endpoints:
    """Addresses of one cell: SA endpoints (outer) and the traffic's addresses (inner)."""

    ours_outer: str
    uml_outer: str
    ours_inner: str
    uml_inner: str

    @property
    def host_bits_outer(self) -> int:
        return 128 if ":" in self.ours_outer else 32

    @property
    def host_bits_inner(self) -> int:
        return 128 if ":" in self.ours_inner else 32


@dataclass(frozen=True, repr=False)
class Keyed:
    """A cell with its keys and SPIs: renders both peers' configurations."""

    cell: Cell
    k2o: SaKeys
    o2k: SaKeys

    def __repr__(self) -> str:  # never show keys (pytest prints reprs of failing parameters)
        return f"Keyed({self.cell.name}, spi k2o=0x{self.k2o.spi:08x} o2k=0x{self.o2k.spi:08x})"

    @property
    def alg(self) -> Alg:
        return ALGS[self.cell.alg]

    @property
    def endpoints(self) -> Endpoints:
        c = self.cell
        ours_o, uml_o = (OURS_LINK4, UML_LINK4) if c.outer == 4 else (OURS_LINK6, UML_LINK6)
        if c.mode == "transport":
            return Endpoints(ours_o, uml_o, ours_o, uml_o)
        ours_i, uml_i = (OURS_INNER4, UML_INNER4) if c.inner_family == 4 else (OURS_INNER6, UML_INNER6)
        return Endpoints(ours_o, uml_o, ours_i, uml_i)

    def secrets(self) -> list[str]:
        """Hex of every key, to check that no log or message ever shows one."""
        return [k.hex() for sk in (self.k2o, self.o2k) for k in (sk.key, sk.auth_key) if len(k) >= 8]

    # -- the Linux side -------------------------------------------------------------------------
    def _kernel_algo(self, sk: SaKeys) -> str:
        a, icv_bits = self.alg, self.cell.icv_bytes * 8
        if a.kernel_aead:
            return f"aead '{a.kernel_aead}' {_hex(sk.key)} {icv_bits}"
        auth = f"auth-trunc '{a.kernel_auth}' {_hex(sk.auth_key)} {icv_bits}"
        if self.cell.proto == "ah":
            return auth
        return f"enc '{a.kernel_enc}' {_hex(sk.key)} {auth}"

    def kernel_batch(self) -> list[str]:
        """`ip -batch` lines configuring the UML kernel (its point of view: out = UML -> ours)."""
        c, e = self.cell, self.endpoints
        lines = []
        for sk, src, dst, reqid, seq_kw in ((self.k2o, e.uml_outer, e.ours_outer, 1, "replay-oseq"),
                                            (self.o2k, e.ours_outer, e.uml_outer, 2, "replay-seq")):
            opts = f"replay-window {c.replay_window}"
            ah_align4 = c.proto == "ah" and c.outer == 4 and c.ah_align4
            flags = [f for f, on in (("esn", c.esn), ("align4", ah_align4)) if on]
            if flags:
                opts += " flag " + " ".join(flags)
            if c.seq_start:
                opts += f" {seq_kw} 0x{c.seq_start & 0xFFFFFFFF:x}"
                if c.esn:
                    opts += f" {seq_kw}-hi 0x{c.seq_start >> 32:x}"
            if c.inner_family != c.outer:  # the state's selector family is the inner one (else: outer's)
                opts += " sel src ::/0 dst ::/0" if c.inner_family == 6 else " sel src 0.0.0.0/0 dst 0.0.0.0/0"
            lines.append(f"xfrm state add src {src} dst {dst} proto {c.proto} spi 0x{sk.spi:08x} reqid {reqid} "
                         f"mode {c.mode} {opts} {self._kernel_algo(sk)}")
        if c.outer == 6 and c.mode == "transport":
            # neighbour discovery between the link addresses must not depend on the SAs
            for t in ND_TYPES:
                for d in ("in", "out", "fwd"):
                    lines.append(f"xfrm policy add dir {d} src ::/0 dst ::/0 proto ipv6-icmp type {t} priority 10")
        hb = e.host_bits_inner
        lsel, rsel = f"{e.uml_inner}/{hb}", f"{e.ours_inner}/{hb}"
        tmpl_out = f"tmpl src {e.uml_outer} dst {e.ours_outer} proto {c.proto} reqid 1 mode {c.mode}"
        tmpl_in = f"tmpl src {e.ours_outer} dst {e.uml_outer} proto {c.proto} reqid 2 mode {c.mode}"
        lines.append(f"xfrm policy add dir out src {lsel} dst {rsel} priority 1000 {tmpl_out}")
        lines.append(f"xfrm policy add dir in src {rsel} dst {lsel} priority 1000 {tmpl_in}")
        lines.append(f"xfrm policy add dir fwd src {rsel} dst {lsel} priority 1000 {tmpl_in}")
        return lines

    # -- our side ---------------------------------------------------------------------------------
    def _toml_sa(self, name: str, sk: SaKeys, src: str, dst: str) -> list[str]:
        c, a = self.cell, self.alg
        out = ["[[sa]]", f'name = "{name}"', f'proto = "{c.proto}"', f'mode = "{c.mode}"', f'src = "{src}"',
               f'dst = "{dst}"', f"spi = 0x{sk.spi:08x}"]
        if a.aead:
            out += [f'aead = "{a.aead}"', f'key = "{_hex(sk.key)}"']
        else:
            if c.proto == "esp":
                out.append(f'enc = "{a.enc}"')
                if sk.key:
                    out.append(f'enc_key = "{_hex(sk.key)}"')
            out += [f'auth = "{a.auth}"', f'auth_key = "{_hex(sk.auth_key)}"']
        if c.icv_len is not None:
            out.append(f"icv_len = {c.icv_len}")
        if c.proto == "ah" and c.outer == 4 and not c.ah_align4:
            out.append("ah_align = 8")  # as stock Linux (no `flag align4`) sends and expects
        out.append(f"replay_window = {c.replay_window}")
        if c.esn:
            out.append("esn = true")
        if c.seq_start:
            out.append(f"seq_start = 0x{c.seq_start:x}")
        return [*out, ""]

    def our_toml(self, control_socket: str | None = None) -> str:
        """`nfq-ipsec run` configuration mirroring kernel_batch() (our point of view: out = ours -> UML)."""
        c, e = self.cell, self.endpoints
        lines = [f"# interop cell {c.name} (generated; random keys for this run only)", "[engine]",
                 'default_policy = "bypass"']
        if control_socket:
            lines.append(f'control_socket = "{control_socket}"')
        lines.append("")
        lines += self._toml_sa("o2k", self.o2k, e.ours_outer, e.uml_outer)
        lines += self._toml_sa("k2o", self.k2o, e.uml_outer, e.ours_outer)
        if c.outer == 6 and c.mode == "transport":
            hb = e.host_bits_outer
            for t in ND_TYPES:
                for d, src, dst in (("out", e.ours_outer, e.uml_outer), ("in", e.uml_outer, e.ours_outer)):
                    lines += ["[[policy]]", f'name = "{d}-nd-{t}"', f'dir = "{d}"', f'src = "{src}/{hb}"',
                              f'dst = "{dst}/{hb}"', 'proto = "ipv6-icmp"', f"icmp_type = {t}",
                              'action = "bypass"', "priority = 10", ""]
        hb = e.host_bits_inner
        for d, src, dst, sa in (("out", e.ours_inner, e.uml_inner, "o2k"), ("in", e.uml_inner, e.ours_inner, "k2o"),
                                ("fwd", e.uml_inner, e.ours_inner, "k2o")):
            lines += ["[[policy]]", f'name = "{d}-protect"', f'dir = "{d}"', f'src = "{src}/{hb}"',
                      f'dst = "{dst}/{hb}"', 'proto = "any"', 'action = "protect"', f'sa = "{sa}"',
                      "priority = 1000", ""]
        return "\n".join(lines)

    # -- an independent third implementation, to check the generated keys ---------------------------
    def scapy_sa(self, direction: str) -> Any:
        """scapy's SecurityAssociation for "k2o" or "o2k" (used to prove keys/SPIs without our engine)."""
        from scapy.layers.inet import IP
        from scapy.layers.inet6 import IPv6
        from scapy.layers.ipsec import AH, ESP, SecurityAssociation

        c, a, e = self.cell, self.alg, self.endpoints
        sk = self.k2o if direction == "k2o" else self.o2k
        kw: dict[str, Any] = {"spi": sk.spi, "seq_num": (c.seq_start + 1) & 0xFFFFFFFF}
        if c.esn:
            kw["esn_en"] = True
            kw["esn"] = (c.seq_start + 1) >> 32
        if c.proto == "esp":
            kw["crypt_algo"] = a.scapy_crypt
            kw["crypt_key"] = sk.key
            if a.aead:
                kw["crypt_icv_size"] = c.icv_bytes
        if a.scapy_auth:
            kw["auth_algo"] = a.scapy_auth
            kw["auth_key"] = sk.auth_key
        if c.mode == "tunnel":
            src, dst = (e.uml_outer, e.ours_outer) if direction == "k2o" else (e.ours_outer, e.uml_outer)
            kw["tunnel_header"] = (IP if c.outer == 4 else IPv6)(src=src, dst=dst)
        return SecurityAssociation(ESP if c.proto == "esp" else AH, **kw)
