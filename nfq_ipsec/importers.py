"""Import the Linux kernel's IPsec configuration as an nfq-ipsec configuration.

Two inputs are understood:

* the output of ``ip xfrm state`` and ``ip xfrm policy`` (also ``ip -s``), as iproute2 prints
  it (ip/ipxfrm.c): states are blocks starting ``src A dst B`` at column 0, policies blocks
  starting ``src A/N dst B/N``. Keys appear only when ``ip xfrm state`` ran with the rights to
  see them and without ``nokeys``;
* an ipsec-tools ``setkey`` file: ``add SRC DST esp SPI -m MODE -E ALG KEY -A ALG KEY;`` and
  ``spdadd SRC DST UPPERSPEC -P DIR ... ipsec esp/MODE/A-B/LEVEL;`` statements.

Both become SecurityAssociation keyword arguments and `Policy` objects (`ImportResult`),
written out by `config.config_to_toml` and checked again by `config.parse_config`, so what is
printed is a configuration `nfq-ipsec check` accepts.

A policy's template names no SA, so it is tied to the state with the same protocol, mode and
(when not 0) reqid/SPI whose endpoints are the template's (tunnel mode) or lie inside the
policy's selector (transport mode, whose templates usually carry no addresses) - what the
kernel's own lookup does. No match, or several (e.g. the old and new SA of a rekey), is an
error naming the policy's line.

Linux quirk kept on purpose: an HMAC-SHA-256 SA added without an explicit truncation (plain
``auth`` in ip xfrm, any setkey/PF_KEY SA) uses a 96-bit ICV (net/xfrm/xfrm_algo.c), not
RFC 4868's 128; the import says ``icv_len = 12`` so both ends still agree.

Everything that nfq-ipsec cannot do (other algorithms, NAT-T encapsulation, IPComp, bundles,
security contexts, interface-bound selectors) is an error naming the line. Harmless extras
(marks, interface ids, offload, flags) become warnings. Error messages never contain keys.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import AUTH_ICV, AUTH_KEYS, PROTOCOLS, config_to_toml, parse_config
from .errors import ConfigError
from .sa import Lifetime, SecurityAssociation
from .spd import ICMP_PROTOCOLS, PORT_PROTOCOLS, Action, Direction, Policy, Selector

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SALT = 4  # RFC 4106/4543/7634: the last 4 bytes of an AEAD key are the salt
XFRM_INF = (1 << 64) - 1

# --- algorithms -------------------------------------------------------------------------------------------
# kernel (crypto API) names, as `ip xfrm state` prints them, and the compat aliases it accepts
XFRM_AEAD = {"rfc4106(gcm(aes))": "gcm", "rfc7539esp(chacha20,poly1305)": "chacha20",
             "rfc4543(gcm(aes))": "gmac"}
XFRM_ENC = {"cbc(aes)": "aes-cbc", "aes": "aes-cbc", "ecb(cipher_null)": "null", "cipher_null": "null"}
XFRM_AUTH: dict[str, str | None] = {
    "hmac(sha1)": "hmac-sha1-96", "sha1": "hmac-sha1-96",
    "hmac(sha256)": "hmac-sha256-128", "sha256": "hmac-sha256-128",
    "hmac(sha384)": "hmac-sha384-192", "sha384": "hmac-sha384-192",
    "hmac(sha512)": "hmac-sha512-256", "sha512": "hmac-sha512-256",
    "digest_null": None,
}
# net/xfrm/xfrm_algo.c icv_truncbits: the ICV Linux uses when no truncation is given
LINUX_TRUNC_BITS = {"hmac-sha1-96": 96, "hmac-sha256-128": 96, "hmac-sha384-192": 192, "hmac-sha512-256": 256}

SETKEY_ENC = {"aes-cbc": "aes-cbc", "rijndael-cbc": "aes-cbc", "null": "null"}
SETKEY_AEAD: dict[str, tuple[str, int]] = {  # name -> (kind, ICV bits)
    "aes-gcm-16": ("gcm", 128), "aes-gcm": ("gcm", 128), "aes-gcm-12": ("gcm", 96), "aes-gcm-8": ("gcm", 64),
    "chacha20-poly1305": ("chacha20", 128), "null-aes-gmac": ("gmac", 128), "aes-gmac": ("gmac", 128),
}
SETKEY_AUTH: dict[str, str | None] = {
    "hmac-sha1": "hmac-sha1-96", "hmac-sha256": "hmac-sha256-128", "hmac-sha2-256": "hmac-sha256-128",
    "hmac-sha384": "hmac-sha384-192", "hmac-sha2-384": "hmac-sha384-192",
    "hmac-sha512": "hmac-sha512-256", "hmac-sha2-512": "hmac-sha512-256", "null": None,
}
SUPPORTED_TEXT = ("supported: aead aes-gcm (rfc4106), chacha20-poly1305 (rfc7539esp), aes-gmac (rfc4543); "
                  "enc aes-cbc, null; auth hmac sha1/sha256/sha384/sha512")


def _err(where: str, reason: str) -> ConfigError:
    return ConfigError(where, reason)


def aead_params(kind: str, key: bytes, icv_bits: int, where: str, label: str) -> dict[str, Any]:
    """aead/key/icv_len for an AEAD given by family ("gcm", "chacha20", "gmac"), key||salt and ICV bits."""
    klen = len(key) - SALT
    if kind == "chacha20":
        if len(key) != 32 + SALT:
            raise _err(where, f"{label}: key has {len(key)} bytes, chacha20-poly1305 needs 36 "
                              "(32-byte key + 4-byte salt)")
        name = "chacha20-poly1305"
    else:
        if klen not in (16, 24, 32):
            raise _err(where, f"{label}: key has {len(key)} bytes; AES-{kind.upper()} needs 20, 28 or 36 "
                              "(16/24/32-byte AES key + 4-byte salt)")
        name = f"aes-{kind}-{klen * 8}"
    allowed = (64, 96, 128) if kind == "gcm" else (128,)
    if icv_bits not in allowed:
        raise _err(where, f"{label}: {icv_bits}-bit ICV is not possible with {name} (allowed: "
                          f"{', '.join(str(b) for b in allowed)})")
    out: dict[str, Any] = {"aead": name, "key": key}
    if icv_bits != 128:
        out["icv_len"] = icv_bits // 8
    return out


def enc_params(kind: str, key: bytes, where: str, label: str) -> dict[str, Any]:
    if kind == "null":
        if key:
            raise _err(where, f"{label}: null encryption takes no key, got {len(key)} bytes")
        return {"enc": "null", "enc_key": b""}
    if len(key) not in (16, 24, 32):
        raise _err(where, f"{label}: key has {len(key)} bytes, AES-CBC needs 16, 24 or 32")
    return {"enc": f"aes-cbc-{len(key) * 8}", "enc_key": key}


def auth_params(name: str, key: bytes, trunc_bits: int, where: str, label: str) -> dict[str, Any]:
    want = AUTH_KEYS[name]
    if len(key) != want:
        raise _err(where, f"{label}: key has {len(key)} bytes; nfq-ipsec's {name} needs {want} (the digest "
                          "size, RFC 4868 / RFC 2404)")
    if trunc_bits % 32 or not 96 <= trunc_bits <= want * 8:
        raise _err(where, f"{label}: {trunc_bits}-bit truncation is not possible with {name} "
                          f"(multiples of 32 from 96 to {want * 8})")
    out: dict[str, Any] = {"auth": name, "auth_key": key}
    if trunc_bits // 8 != AUTH_ICV[name]:
        out["icv_len"] = trunc_bits // 8
    return out


def _hex_key(token: str, where: str, label: str) -> bytes:
    s = token[2:] if token[:2].lower() == "0x" else token
    if len(s) % 2 or not re.fullmatch(r"[0-9a-fA-F]*", s):
        raise _err(where, f"{label}: the key is not an even number of hex digits")
    return bytes.fromhex(s)


# --- what an import produces ----------------------------------------------------------------------------


@dataclass
class Template:
    """Which SA a protect policy applies (an ``ip xfrm`` tmpl, a setkey ipsec rule)."""

    proto: str  # esp | ah
    mode: str  # transport | tunnel
    src: IpAddress | None = None  # None: not given (transport templates)
    dst: IpAddress | None = None
    reqid: int = 0
    spi: int = 0


@dataclass
class ImportedSa:
    where: str
    params: dict[str, Any]  # SecurityAssociation keyword arguments (name set by `resolve`)
    reqid: int = 0

    def __repr__(self) -> str:  # params hold keys
        p = self.params
        return (f"ImportedSa({self.where}, {p.get('proto')} spi 0x{p.get('spi', 0):x} "
                f"{p.get('src')}->{p.get('dst')})")


@dataclass
class ImportedPolicy:
    where: str
    dir: Direction
    selector: Selector
    action: Action
    priority: int = 0
    template: Template | None = None


@dataclass
class ImportResult:
    """SAs (keyword arguments, with keys) and policies ready for `config_to_toml`."""

    sas: list[dict[str, Any]]
    policies: list[Policy]
    warnings: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"ImportResult({len(self.sas)} SAs, {len(self.policies)} policies)"

    def to_toml(self, origin: str = "") -> str:
        """The configuration text; parsed back once so that it is known to pass `nfq-ipsec check`."""
        text = config_to_toml(self.sas, self.policies, None)
        if origin:
            text = f"# Imported from {origin} by nfq-ipsec import.\n" + text
        cfg = parse_config(text, "<import>")
        self.warnings += [w for w in cfg.warnings if w not in self.warnings]
        return text


# --- tying policies to SAs and naming ----------------------------------------------------------------------


def _unique(base: str, used: set[str]) -> str:
    name, n = base, 2
    while name in used:
        name = f"{base}-{n}"
        n += 1
    used.add(name)
    return name


def _candidates(tm: Template, sel: Selector, sas: Sequence[ImportedSa]) -> list[ImportedSa]:
    out = []
    for s in sas:
        p = s.params
        if p["proto"] != tm.proto or p["mode"] != tm.mode:
            continue
        if tm.spi and p["spi"] != tm.spi:
            continue
        if tm.reqid and s.reqid != tm.reqid:
            continue
        src, dst = ipaddress.ip_address(p["src"]), ipaddress.ip_address(p["dst"])
        if tm.src is not None and tm.dst is not None:
            if (src, dst) != (tm.src, tm.dst):
                continue
        else:  # no endpoints in the template: the SA's must be the packets' (transport) addresses
            if (sel.src is not None and src not in sel.src) or (sel.dst is not None and dst not in sel.dst):
                continue
        out.append(s)
    return out


def resolve(sas: Sequence[ImportedSa], policies: Sequence[ImportedPolicy],
            warnings: Iterable[str] = ()) -> ImportResult:
    """Name the SAs (``esp-0x1001``), tie each protect policy to its SA and name the policies."""
    used: set[str] = set()
    seen: dict[tuple[str, int, str], ImportedSa] = {}
    for s in sas:
        kw = s.params
        kw["name"] = _unique(f"{kw['proto']}-0x{kw['spi']:x}", used)
        try:  # every per-SA check of the engine, reported at the SA's own line
            SecurityAssociation(**kw)
        except ValueError as e:
            raise _err(s.where, str(e).removeprefix(f"SA {kw['name']}: ")) from None
        ident = (kw["proto"], kw["spi"], str(ipaddress.ip_address(kw["dst"])))
        if ident in seen:
            raise _err(s.where, f"{kw['proto']} spi 0x{kw['spi']:08x} to {kw['dst']} is also the SA at "
                                f"{seen[ident].where}: inbound packets could not tell them apart")
        seen[ident] = s
    out: list[Policy] = []
    pol_names: set[str] = set()
    for p in policies:
        sa_name: str | None = None
        if p.action is Action.PROTECT:
            tm = p.template
            assert tm is not None
            found = _candidates(tm, p.selector, sas)
            ends = f" {tm.src} -> {tm.dst}" if tm.src is not None else ""
            want = f"{tm.proto} {tm.mode}{ends}" + (f" reqid {tm.reqid}" if tm.reqid else "") + (
                f" spi 0x{tm.spi:08x}" if tm.spi else "")
            if not found:
                raise _err(p.where, f"policy dir {p.dir.value} ({p.selector}) needs an SA {want}, but no "
                                    "imported state matches (add the states to the input)")
            if len(found) > 1:
                names = ", ".join(f"{s.params['name']} ({s.where})" for s in found)
                raise _err(p.where, f"policy dir {p.dir.value} ({p.selector}): several states match {want}: "
                                    f"{names}; keep only the one to use (e.g. the newest after a rekey)")
            sa_name = found[0].params["name"]
        base = f"{p.dir.value}-{sa_name}" if sa_name else f"{p.dir.value}-{p.action.value}"
        try:
            out.append(Policy(name=_unique(base, pol_names), dir=p.dir, selector=p.selector, action=p.action,
                              sa=sa_name, priority=p.priority))
        except ValueError as e:
            raise _err(p.where, str(e)) from None
    return ImportResult([s.params for s in sas], out, list(warnings))


# --- shared helpers ---------------------------------------------------------------------------------------


def _address(text: str, where: str, what: str) -> IpAddress:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        raise _err(where, f"{what} {text!r} is not an IP address") from None


def _network(text: str, where: str, what: str) -> IpNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise _err(where, f"{what} {text!r} is not an address or prefix") from None


def proto_number(name: str, where: str) -> int | None:
    """Upper-layer protocol from a name (/etc/protocols style) or number; None = any."""
    s = name.lower()
    if s in ("any", "0"):
        return None
    if s.isdigit():
        n = int(s)
        if n > 255:
            raise _err(where, f"protocol {name} is out of range 0..255")
        return n
    aliases = {"icmp6": 58, "ipv6-icmp": 58, "ip4": 4, "ipencap": 4, "ipip": 4, "ipv6": 41}
    if s in aliases:
        return aliases[s]
    if s in PROTOCOLS:
        return PROTOCOLS[s]
    try:
        return socket.getprotobyname(s)
    except OSError:
        raise _err(where, f"unknown protocol {name!r}") from None


def _selector(where: str, src: IpNetwork, dst: IpNetwork, proto: int | None, sport: int | None,
              dport: int | None, icmp_type: int | None, icmp_code: int | None) -> Selector:
    if (sport is not None or dport is not None) and proto not in PORT_PROTOCOLS:
        raise _err(where, f"ports with protocol {proto}: nfq-ipsec selects ports only for tcp, udp, sctp, "
                          "dccp and udplite")
    if (icmp_type is not None or icmp_code is not None) and proto not in ICMP_PROTOCOLS:
        raise _err(where, f"ICMP type/code with protocol {proto}")
    if icmp_code is not None and icmp_type is None:
        raise _err(where, "an ICMP code without a type cannot be expressed (give the type too)")
    try:
        return Selector(src=src, dst=dst, proto=proto, sport=None if sport is None else (sport, sport),
                        dport=None if dport is None else (dport, dport), icmp_type=icmp_type,
                        icmp_code=icmp_code)
    except ValueError as e:
        raise _err(where, str(e)) from None


def _finish_sa(where: str, p: dict[str, Any], label: str) -> None:
    """Checks shared by both importers: the algorithm combination nfq-ipsec accepts."""
    if p["proto"] == "ah":
        if "aead" in p or "enc" in p:
            raise _err(where, f"{label}: AH only authenticates; it takes no encryption")
        if "auth" not in p:
            raise _err(where, f"{label}: AH without an authentication algorithm")
        return
    if "aead" in p:
        if "enc" in p or "auth" in p:
            raise _err(where, f"{label}: an AEAD excludes separate enc/auth algorithms")
        return
    if "enc" not in p:
        raise _err(where, f"{label}: ESP without an encryption algorithm (use null encryption for "
                          "integrity only)")
    if "auth" not in p:
        raise _err(where, f"{label}: ESP {p['enc']} without integrity is not allowed by nfq-ipsec "
                          "(RFC 8221): add an auth algorithm or use an AEAD")


# --- ip xfrm state / ip xfrm policy -------------------------------------------------------------------------

_SPI_RE = re.compile(r"(0x[0-9a-fA-F]+|\d+)")
_LIMIT_RE = re.compile(r"limit:\s*soft\s+(\S+)\((bytes|packets)\),\s*hard\s+(\S+)\((bytes|packets)\)")
_EXPIRE_RE = re.compile(r"expire\s+(add|use):\s*soft\s+(\d+)\(sec\),\s*hard\s+(\d+)\(sec\)")
_HEXLINE_RE = re.compile(r"(?:[0-9a-fA-F]{8}\s*)+")
_XFRM_IGNORED = {"sel", "lastused", "coa", "stats:", "lifetime", "add", "use", "dir", "security",
                 "crypto", "enc-mask", "auth-mask", "comp-mask"}
_XFRM_WARN = {"mark", "output-mark", "set-mark", "if_id", "offload", "encap-dport"}
_STATE_FLAGS = {"noecn", "decap-dscp", "nopmtudisc", "wildrecv", "icmp", "af-unspec", "align4", "esn"}


def _int(text: str, where: str, what: str) -> int:
    m = _SPI_RE.match(text)
    if not m:
        raise _err(where, f"{what} {text!r} is not a number")
    return int(m.group(1), 0)


def _blocks(text: str, source: str) -> list[list[tuple[int, str]]]:
    """Blocks of (line number, line): a block starts at a line that is not indented."""
    blocks: list[list[tuple[int, str]]] = []
    for no, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if not raw[0].isspace():
            blocks.append([(no, raw)])
        elif blocks:
            blocks[-1].append((no, raw))
        else:
            raise _err(f"{source}:{no}", "indented line before any 'src ... dst ...' line")
    return blocks


def _pairs(tokens: Sequence[str]) -> dict[str, str]:
    """``key value key value ...`` (values may carry ip -s decorations like ``0x1001(4097)``)."""
    out = {}
    for i in range(0, len(tokens) - 1, 2):
        out[tokens[i]] = tokens[i + 1]
    return out


def _xfrm_alg(kind: str, tokens: list[str], where: str) -> tuple[str, bytes, int | None]:
    """``NAME 0xKEY [(N bits)] [BITS]`` -> (name, key, trailing number)."""
    if len(tokens) < 2:
        raise _err(where, f"'{kind}' without an algorithm name")
    name, rest = tokens[1], tokens[2:]
    if rest and rest[0].startswith("<<"):
        raise _err(where, f"{kind} {name}: the key is hidden; run `ip xfrm state` as root and without "
                          "'nokeys'")
    key = b""
    if rest and rest[0][:2].lower() == "0x":
        key = _hex_key(rest[0], where, f"{kind} {name}")
        rest = rest[1:]
    elif kind != "enc" or XFRM_ENC.get(name) != "null":
        raise _err(where, f"{kind} {name}: no key shown; run `ip xfrm state` as root and without 'nokeys'")
    if len(rest) >= 2 and rest[0].startswith("(") and rest[1].startswith("bits)"):
        rest = rest[2:]
    number = _int(rest[0], where, f"{kind} {name} length") if rest else None
    return name, key, number


def _xfrm_state(block: list[tuple[int, str]], source: str, warnings: list[str]) -> ImportedSa | None:
    no0, head = block[0]
    where0 = f"{source}:{no0}"
    t = head.split()
    if len(t) < 4 or t[0] != "src" or t[2] != "dst":
        raise _err(where0, "expected 'src ADDRESS dst ADDRESS'")
    src = _address(t[1], where0, "src")
    dst = _address(t[3], where0, "dst")
    p: dict[str, Any] = {"src": str(src), "dst": str(dst)}
    reqid = 0
    flags: set[str] = set()
    window = 0
    seq = oseq = 0
    lifetime: dict[str, Any] = {}
    label = f"state {src} -> {dst}"
    in_stats = False
    for no, raw in block[1:]:
        where = f"{source}:{no}"
        tok = raw.split()
        k = tok[0]
        if k == "proto":
            kv = _pairs(tok)
            proto = kv.get("proto", "")
            if proto in ("route2", "hao"):
                warnings.append(f"{where0}: skipped {proto} state (Mobile IPv6, not IPsec)")
                return None
            if proto not in ("esp", "ah"):
                raise _err(where, f"{label}: proto {proto} is not supported (esp and ah only; IPComp is not)")
            p["proto"] = proto
            if "spi" not in kv:
                raise _err(where, f"{label}: no spi")
            p["spi"] = _int(kv["spi"], where, "spi")
            reqid = _int(kv.get("reqid", "0"), where, "reqid")
            mode = kv.get("mode", "transport")
            if mode not in ("transport", "tunnel"):
                raise _err(where, f"{label}: mode {mode} is not supported (transport and tunnel only)")
            p["mode"] = mode
            label = f"{proto} spi 0x{p['spi']:08x} ({src} -> {dst})"
        elif k == "replay-window":
            if in_stats or "failed" in tok:
                continue  # statistics: "replay-window N replay N failed N"
            window = max(window, _int(tok[1], where, "replay-window") if len(tok) > 1 else 0)
            if "flag" in tok:
                for f in tok[tok.index("flag") + 1:]:
                    if f.startswith("("):
                        break
                    flags.add(f)
        elif k in ("aead", "enc", "auth", "auth-trunc"):
            name, key, number = _xfrm_alg(k, tok, where)
            what = f"{label}: {k} {name}"
            if k == "aead":
                kind = XFRM_AEAD.get(name)
                if kind is None:
                    raise _err(where, f"{what} is not supported ({SUPPORTED_TEXT})")
                p.update(aead_params(kind, key, number if number is not None else 128, where, what))
            elif k == "enc":
                enc = XFRM_ENC.get(name)
                if enc is None:
                    raise _err(where, f"{what} is not supported ({SUPPORTED_TEXT})")
                p.update(enc_params(enc, key, where, what))
            else:
                if name not in XFRM_AUTH:
                    raise _err(where, f"{what} is not supported ({SUPPORTED_TEXT})")
                auth = XFRM_AUTH[name]
                if auth is None:  # digest_null: no integrity
                    continue
                bits = number if k == "auth-trunc" and number is not None else LINUX_TRUNC_BITS[auth]
                p.update(auth_params(auth, key, bits, where, what))
        elif k == "comp":
            raise _err(where, f"{label}: IPComp is not supported")
        elif k == "encap":
            raise _err(where, f"{label}: UDP encapsulation (NAT traversal, {' '.join(tok[1:3])}) is not "
                              "supported")
        elif k == "tfcpad":
            p["tfc_pad"] = _int(tok[1], where, "tfcpad") if len(tok) > 1 else 0
        elif k == "anti-replay":
            kv = _pairs([x.rstrip(",") for x in tok if x not in ("esn", "context:", "anti-replay")])
            seq = _int(kv.get("seq", "0"), where, "seq")
            oseq = _int(kv.get("oseq", "0"), where, "oseq")
        elif k == "seq-hi":  # ESN replay state: seq-hi H, seq L, oseq-hi H, oseq L
            kv = _pairs([x.rstrip(",") for x in tok])
            seq = _int(kv.get("seq-hi", "0"), where, "seq-hi") << 32 | _int(kv.get("seq", "0"), where, "seq")
            oseq = (_int(kv.get("oseq-hi", "0"), where, "oseq-hi") << 32
                    | _int(kv.get("oseq", "0"), where, "oseq"))
        elif k == "replay_window":  # ESN/large window: "replay_window 128, bitmap-length 4"
            window = max(window, _int(tok[1].rstrip(","), where, "replay_window"))
        elif k == "limit:":
            m = _LIMIT_RE.search(raw)
            if m:
                unit = m.group(2)
                for which, value in (("soft", m.group(1)), ("hard", m.group(3))):
                    if value != "(INF)" and int(value) not in (0, XFRM_INF):
                        lifetime[f"{which}_{unit}"] = int(value)
        elif k == "expire":
            m = _EXPIRE_RE.search(raw)
            if m:
                soft, hard = int(m.group(2)), int(m.group(3))
                if m.group(1) == "add":
                    if soft:
                        lifetime["soft_seconds"] = soft
                    if hard:
                        lifetime["hard_seconds"] = hard
                elif soft or hard:
                    warnings.append(f"{where}: {label}: use-time expiry (time-use-soft/hard) is not "
                                    "supported, ignored")
        elif k == "stats:":
            in_stats = True
        elif k == "security":
            raise _err(where, f"{label}: security contexts (SELinux labels) are not supported")
        elif k in _XFRM_WARN:
            warnings.append(f"{where}: {label}: '{k}' ignored (nfq-ipsec has no equivalent)")
        elif k in _XFRM_IGNORED or _HEXLINE_RE.fullmatch(raw.strip()) or re.match(r"\d+\(bytes\)", k):
            continue
        else:
            warnings.append(f"{where}: {label}: line ignored: {raw.strip()[:60]}")
    if "proto" not in p:
        raise _err(where0, "state without a 'proto ... spi ... mode ...' line")
    if "esn" in flags:
        p["esn"] = True
    if p.get("proto") == "ah" and ":" not in str(p.get("dst", "")) and "align4" not in flags:
        p["ah_align"] = 8  # Linux's IPv4 AH is 64-bit aligned unless the state has `flag align4`
    p["replay_window"] = window
    start = oseq or seq
    if start:
        p["seq_start"] = start
    if lifetime:
        try:
            p["lifetime"] = Lifetime(**lifetime)
        except ValueError as e:
            raise _err(where0, f"{label}: {e}") from None
    _finish_sa(where0, p, label)
    return ImportedSa(where0, p, reqid)


def _xfrm_policy(block: list[tuple[int, str]], source: str, warnings: list[str]) -> ImportedPolicy | None:
    no0, head = block[0]
    where0 = f"{source}:{no0}"
    t = head.split()
    if len(t) < 4 or t[0] != "src" or t[2] != "dst":
        raise _err(where0, "expected 'src PREFIX dst PREFIX'")
    src = _network(t[1], where0, "src")
    dst = _network(t[3], where0, "dst")
    proto: int | None = None
    ports: dict[str, int] = {}
    i = 4
    while i < len(t):
        k = t[i]
        v = t[i + 1] if i + 1 < len(t) else ""
        if k == "proto":
            proto = proto_number(v, where0)
        elif k in ("sport", "dport", "type", "code"):
            ports[k] = _int(v, where0, k)
        elif k == "uid":
            pass
        elif k == "dev":
            raise _err(where0, f"selector bound to interface {v} (dev): nfq-ipsec policies cannot select by "
                               "interface")
        elif k == "key":
            raise _err(where0, "GRE key selectors are not supported")
        else:
            raise _err(where0, f"unknown selector field {k!r}")
        i += 2
    direction: Direction | None = None
    action = "allow"
    priority = 0
    template: Template | None = None
    pending_tmpl: tuple[str, IpAddress, IpAddress] | None = None
    for no, raw in block[1:]:
        where = f"{source}:{no}"
        tok = raw.split()
        k = tok[0]
        if k == "socket":
            warnings.append(f"{where0}: skipped a per-socket policy (set by an IKE daemon on its own socket)")
            return None
        if k == "dir":
            if len(tok) < 2 or tok[1] not in ("in", "out", "fwd"):
                raise _err(where, f"unknown policy direction {' '.join(tok[1:2])!r}")
            direction = Direction(tok[1])
            j = 2
            while j < len(tok):
                key = tok[j]
                val = tok[j + 1] if j + 1 < len(tok) else ""
                if key == "action":
                    action = val
                elif key == "priority":
                    priority = _int(val, where, "priority")
                elif key == "ptype" and val == "sub":
                    raise _err(where, "sub policies (ptype sub, Mobile IPv6 migration) are not supported")
                elif key == "flag":
                    break
                j += 2
        elif k == "tmpl":
            if pending_tmpl is not None or template is not None:
                raise _err(where, "several templates (an SA bundle, e.g. AH + ESP) are not supported: "
                                  "use one SA")
            kv = _pairs(tok[1:])
            pending_tmpl = ("", _address(kv.get("src", "0.0.0.0"), where, "tmpl src"),
                            _address(kv.get("dst", "0.0.0.0"), where, "tmpl dst"))
        elif k == "proto" and pending_tmpl is not None:
            kv = _pairs(tok)
            tproto = kv.get("proto", "")
            if tproto not in ("esp", "ah"):
                raise _err(where, f"template proto {tproto} is not supported (esp and ah only)")
            mode = kv.get("mode", "transport")
            if mode not in ("transport", "tunnel"):
                raise _err(where, f"template mode {mode} is not supported (transport and tunnel only)")
            _, tsrc, tdst = pending_tmpl
            given = not (tsrc.is_unspecified and tdst.is_unspecified)
            template = Template(tproto, mode, tsrc if given else None, tdst if given else None,
                                _int(kv.get("reqid", "0"), where, "reqid"),
                                _int(kv.get("spi", "0"), where, "spi"))
            pending_tmpl = None
        elif k == "level":
            if len(tok) > 1 and tok[1] == "use":
                warnings.append(f"{where}: optional template (level use): nfq-ipsec requires the SA")
        elif k == "security":
            raise _err(where, "security contexts (SELinux labels) are not supported")
        elif k in _XFRM_WARN:
            warnings.append(f"{where}: policy '{k}' ignored (nfq-ipsec has no equivalent)")
        elif k in _XFRM_IGNORED or k in ("limit:", "expire", "lifetime") or re.match(r"\d+\(bytes\)", k):
            continue
        else:
            warnings.append(f"{where}: policy line ignored: {raw.strip()[:60]}")
    if direction is None:
        raise _err(where0, "policy without a 'dir in|out|fwd' line")
    if pending_tmpl is not None:
        raise _err(where0, "template without its 'proto ... mode ...' line")
    if action == "block":
        act = Action.DISCARD
        template = None
    elif action == "allow":
        act = Action.PROTECT if template is not None else Action.BYPASS
    else:
        raise _err(where0, f"unknown policy action {action!r}")
    icmp = proto in ICMP_PROTOCOLS
    sel = _selector(where0, src, dst, proto,
                    None if icmp else ports.get("sport"), None if icmp else ports.get("dport"),
                    ports.get("type", ports.get("sport")) if icmp else None,
                    ports.get("code", ports.get("dport")) if icmp else None)
    return ImportedPolicy(where0, direction, sel, act, priority, template)


def parse_xfrm(text: str, source: str = "<input>"
               ) -> tuple[list[ImportedSa], list[ImportedPolicy], list[str]]:
    """States and policies from ``ip xfrm state`` / ``ip xfrm policy`` output (in any order, mixed)."""
    sas: list[ImportedSa] = []
    policies: list[ImportedPolicy] = []
    warnings: list[str] = []
    for block in _blocks(text, source):
        no, head = block[0]
        t = head.split()
        if len(t) < 4 or t[0] != "src" or t[2] != "dst":
            raise _err(f"{source}:{no}", f"expected 'src ... dst ...' (ip xfrm state/policy output), got "
                                         f"{head.strip()[:40]!r}")
        if "/" in t[1] or "/" in t[3]:
            pol = _xfrm_policy(block, source, warnings)
            if pol is not None:
                policies.append(pol)
        else:
            sa = _xfrm_state(block, source, warnings)
            if sa is not None:
                sas.append(sa)
    return sas, policies, warnings


def import_xfrm(texts: Iterable[tuple[str, str]]) -> ImportResult:
    """(text, source name) pieces of ``ip xfrm state``/``policy`` output -> one configuration."""
    sas: list[ImportedSa] = []
    policies: list[ImportedPolicy] = []
    warnings: list[str] = []
    for text, source in texts:
        s, p, w = parse_xfrm(text, source)
        sas += s
        policies += p
        warnings += w
    if not sas and not policies:
        raise ConfigError("input", "no 'ip xfrm state' or 'ip xfrm policy' entries found")
    return resolve(sas, policies, warnings)


# --- setkey ---------------------------------------------------------------------------------------------

PRIORITY_HIGH, PRIORITY_DEFAULT, PRIORITY_LOW = 0x40000000, 0x80000000, 0xC0000000  # ipsec-tools libpfkey.h
_RANGE_RE = re.compile(r"(?P<addr>[^\[\]/]+)(?:/(?P<plen>\d+))?(?:\[(?P<port>any|\d+)\])?")


def _statements(text: str, source: str) -> list[tuple[str, list[str]]]:
    """setkey statements (``...;``) as (where, tokens); quoted strings stay one token with their quotes."""
    out: list[tuple[str, list[str]]] = []
    tokens: list[str] = []
    start = 0
    cur = ""
    i, line = 0, 1
    n = len(text)

    def flush_word() -> None:
        nonlocal cur
        if cur:
            tokens.append(cur)
            cur = ""

    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
        if ch == "#":
            flush_word()
            while i < n and text[i] != "\n":
                i += 1
            continue
        if ch == '"':
            j = text.find('"', i + 1)
            if j < 0:
                raise _err(f"{source}:{line}", "unterminated quoted string")
            flush_word()
            if not tokens:
                start = line
            tokens.append(text[i : j + 1])
            line += text.count("\n", i, j)
            i = j + 1
            continue
        if ch == ";":
            flush_word()
            if tokens:
                out.append((f"{source}:{start}", tokens))
            tokens = []
        elif ch.isspace():
            flush_word()
        else:
            if not cur and not tokens:
                start = line
            cur += ch
        i += 1
    flush_word()
    if tokens:
        raise _err(f"{source}:{start}", f"statement '{' '.join(tokens)[:40]}' does not end with ';'")
    return out


def _skip_flags(tok: list[str], i: int) -> int:
    while i < len(tok) and re.fullmatch(r"-[46n]+", tok[i]):
        i += 1
    return i


def _setkey_key(tok: list[str], i: int, where: str, label: str) -> tuple[bytes, int]:
    if i >= len(tok):
        raise _err(where, f"{label}: missing key")
    k = tok[i]
    if k.startswith('"'):
        return k[1:-1].encode(), i + 1
    if k[:2].lower() == "0x":
        return _hex_key(k, where, label), i + 1
    raise _err(where, f"{label}: the key must be 0x-hex or a \"quoted string\"")


def _setkey_add(tok: list[str], where: str, auth_sha256_bits: int, warnings: list[str]) -> ImportedSa:
    i = _skip_flags(tok, 1)
    if len(tok) < i + 4:
        raise _err(where, "add needs: add SRC DST PROTOCOL SPI [options] ALGORITHMS;")
    src = _address(tok[i], where, "src")
    dst = _address(tok[i + 1], where, "dst")
    proto = tok[i + 2]
    if proto not in ("esp", "ah"):
        raise _err(where, f"protocol {proto} is not supported (esp and ah only)")
    spi = _int(tok[i + 3], where, "spi")
    label = f"{proto} spi 0x{spi:08x} ({src} -> {dst})"
    p: dict[str, Any] = {"proto": proto, "mode": "transport", "src": str(src), "dst": str(dst), "spi": spi,
                         "replay_window": 0}
    reqid = 0
    lifetime: dict[str, Any] = {}
    replay_given = False
    i += 4
    while i < len(tok):
        opt = tok[i]
        arg = tok[i + 1] if i + 1 < len(tok) else ""
        if opt == "-m":
            if arg == "any":  # Linux's af_key turns IPSEC_MODE_ANY into transport
                arg = "transport"
            if arg not in ("transport", "tunnel"):
                raise _err(where, f"{label}: mode {arg} is not supported (transport and tunnel only)")
            p["mode"] = arg
            i += 2
        elif opt == "-r":
            p["replay_window"] = _int(arg, where, "-r")  # Linux's PF_KEY reads it as packets
            replay_given = True
            i += 2
        elif opt == "-u":
            reqid = _int(arg, where, "-u")
            i += 2
        elif opt == "-f":
            i += 2  # padding / cyclic-seq options: nothing to keep
        elif opt in ("-lh", "-ls", "-bh", "-bs"):
            which = "hard" if opt[2] == "h" else "soft"
            unit = "seconds" if opt[1] == "l" else "bytes"
            value = _int(arg, where, opt)
            if value:
                lifetime[f"{which}_{unit}"] = value
            i += 2
        elif opt in ("-E", "-e"):
            alg = arg.lower()
            what = f"{label}: -E {arg}"
            if alg in SETKEY_AEAD:
                kind, bits = SETKEY_AEAD[alg]
                key, i = _setkey_key(tok, i + 2, where, what)
                p.update(aead_params(kind, key, bits, where, what))
            elif alg in SETKEY_ENC:
                if SETKEY_ENC[alg] == "null" and (i + 2 >= len(tok) or tok[i + 2].startswith("-")):
                    key, i = b"", i + 2
                else:
                    key, i = _setkey_key(tok, i + 2, where, what)
                p.update(enc_params(SETKEY_ENC[alg], key, where, what))
            else:
                raise _err(where, f"{what} is not supported ({SUPPORTED_TEXT})")
        elif opt == "-A":
            alg = arg.lower()
            what = f"{label}: -A {arg}"
            if alg not in SETKEY_AUTH:
                raise _err(where, f"{what} is not supported ({SUPPORTED_TEXT})")
            auth = SETKEY_AUTH[alg]
            if auth is None:
                i += 2
                continue
            key, i = _setkey_key(tok, i + 2, where, what)
            bits = auth_sha256_bits if auth == "hmac-sha256-128" else LINUX_TRUNC_BITS[auth]
            p.update(auth_params(auth, key, bits, where, what))
        elif opt == "-C":
            raise _err(where, f"{label}: IPComp (-C) is not supported")
        elif opt == "-ctx":
            raise _err(where, f"{label}: security contexts (-ctx) are not supported")
        else:
            raise _err(where, f"{label}: unknown option {opt!r}")
    if lifetime:
        try:
            p["lifetime"] = Lifetime(**lifetime)
        except ValueError as e:
            raise _err(where, f"{label}: {e}") from None
    _finish_sa(where, p, label)
    if not replay_given:
        warnings.append(f"{where}: {label}: no -r, so no replay protection (as in the kernel); consider "
                        "replay_window = 64 or more on both ends")
    return ImportedSa(where, p, reqid)


def _setkey_range(text: str, where: str, what: str) -> tuple[IpNetwork, int | None]:
    m = _RANGE_RE.fullmatch(text)
    if not m:
        raise _err(where, f"{what} {text!r} is not ADDRESS[/PREFIXLEN][[PORT]]")
    addr = _address(m.group("addr"), where, what)
    plen = int(m.group("plen")) if m.group("plen") else addr.max_prefixlen
    net = _network(f"{addr}/{plen}", where, what)
    port = m.group("port")
    return net, None if port in (None, "any") else int(port)


def _setkey_priority(tok: list[str], i: int, where: str) -> tuple[int, int]:
    """``prio N`` / ``prio -N`` / ``prio low|def|high [+|- N]`` as libipsec computes it."""
    v = tok[i] if i < len(tok) else ""
    bases = {"low": PRIORITY_LOW, "def": PRIORITY_DEFAULT, "default": PRIORITY_DEFAULT, "high": PRIORITY_HIGH}
    if v in bases:
        base = bases[v]
        if i + 2 < len(tok) and tok[i + 1] in ("+", "-") and tok[i + 2].isdigit():
            off = int(tok[i + 2])
            return (base - off if tok[i + 1] == "+" else base + off), i + 3
        return base, i + 1
    m = re.fullmatch(r"([+-]?)(\d+)", v)
    if m:
        off = int(m.group(2))
        return (PRIORITY_DEFAULT + off if m.group(1) == "-" else PRIORITY_DEFAULT - off), i + 1
    if v == "-" and i + 1 < len(tok) and tok[i + 1].isdigit():
        return PRIORITY_DEFAULT + int(tok[i + 1]), i + 2
    raise _err(where, f"priority {v!r} is not a number or low/def/high [+|- N]")


def _setkey_spdadd(tok: list[str], where: str, warnings: list[str]) -> ImportedPolicy:
    i = _skip_flags(tok, 1)
    if len(tok) < i + 5:
        raise _err(where, "spdadd needs: spdadd SRC DST UPPERSPEC -P DIRECTION ACTION;")
    src, sport = _setkey_range(tok[i], where, "src")
    dst, dport = _setkey_range(tok[i + 1], where, "dst")
    if src.version != dst.version:
        raise _err(where, f"src {src} and dst {dst} are of different address families")
    proto = proto_number(tok[i + 2], where)
    i += 3
    icmp_type = icmp_code = None
    if i < len(tok) and re.fullmatch(r"\d+(,\d+)?", tok[i]):
        if proto not in ICMP_PROTOCOLS:
            raise _err(where, f"'{tok[i]}' after the protocol is only valid for icmp/icmp6 (type[,code])")
        parts = tok[i].split(",")
        icmp_type = int(parts[0])
        icmp_code = int(parts[1]) if len(parts) > 1 else None
        i += 1
    if i < len(tok) and tok[i] == "-ctx":
        raise _err(where, "security contexts (-ctx) are not supported")
    if i >= len(tok) or tok[i] != "-P":
        raise _err(where, "expected '-P DIRECTION ...' after the upper-layer protocol")
    i += 1
    d = tok[i] if i < len(tok) else ""
    if d not in ("in", "out", "fwd"):
        raise _err(where, f"direction {d!r} is not in, out or fwd")
    direction = Direction(d)
    i += 1
    priority = PRIORITY_DEFAULT
    if i < len(tok) and tok[i] in ("prio", "priority"):
        priority, i = _setkey_priority(tok, i + 1, where)
    action = tok[i] if i < len(tok) else ""
    rules = tok[i + 1:]
    template = None
    if action == "discard":
        act = Action.DISCARD
    elif action in ("none", "bypass"):
        act = Action.BYPASS
    elif action == "ipsec":
        if len(rules) != 1:
            raise _err(where, "an ipsec policy with several rules (an SA bundle, e.g. AH + ESP) is not "
                              "supported" if rules else "'ipsec' needs a rule like esp/transport//require")
        template = _setkey_rule(rules[0], where, warnings)
        act = Action.PROTECT
    else:
        raise _err(where, f"action {action!r} is not supported (discard, none, ipsec)")
    if action != "ipsec" and rules:
        raise _err(where, f"unexpected {' '.join(rules)[:30]!r} after {action}")
    icmp = proto in ICMP_PROTOCOLS
    if icmp and (sport is not None or dport is not None):
        raise _err(where, "ports with icmp: give the ICMP type after the protocol instead")
    sel = _selector(where, src, dst, proto, sport, dport, icmp_type, icmp_code)
    return ImportedPolicy(where, direction, sel, act, priority, template)


def _setkey_rule(rule: str, where: str, warnings: list[str]) -> Template:
    parts = rule.split("/")
    if len(parts) < 2:
        raise _err(where, f"rule {rule!r} is not PROTOCOL/MODE/[SRC-DST]/[LEVEL]")
    proto, mode = parts[0], parts[1]
    if proto not in ("esp", "ah"):
        raise _err(where, f"rule {rule!r}: protocol {proto} is not supported (esp and ah only)")
    if mode not in ("transport", "tunnel"):
        raise _err(where, f"rule {rule!r}: mode {mode} is not supported (transport and tunnel only)")
    ends = parts[2] if len(parts) > 2 else ""
    level = parts[3] if len(parts) > 3 else "default"
    tsrc = tdst = None
    if ends and ends not in ("me-any", "any-me"):
        if "-" not in ends:
            raise _err(where, f"rule {rule!r}: endpoints must be SRC-DST")
        a, b = ends.split("-", 1)
        tsrc, tdst = _address(a, where, "rule src"), _address(b, where, "rule dst")
    elif mode == "tunnel":
        raise _err(where, f"rule {rule!r}: tunnel mode needs the endpoints (esp/tunnel/SRC-DST/require)")
    reqid = 0
    if level.startswith("unique:"):
        reqid = _int(level.split(":", 1)[1], where, "unique")
    elif level == "use":
        warnings.append(f"{where}: optional rule (level use): nfq-ipsec requires the SA")
    elif level not in ("require", "default", "unique", ""):
        raise _err(where, f"rule {rule!r}: unknown level {level!r}")
    return Template(proto, mode, tsrc, tdst, reqid)


def parse_setkey(text: str, source: str = "<input>", *,
                 sha256_icv_bits: int = 96) -> tuple[list[ImportedSa], list[ImportedPolicy], list[str]]:
    """SAs and policies of an ipsec-tools setkey file.

    ``sha256_icv_bits``: the ICV of hmac-sha256 SAs. Linux's PF_KEY uses 96 bits (its default
    truncation); BSD kernels and RFC 4868 peers use 128.
    """
    sas: list[ImportedSa] = []
    policies: list[ImportedPolicy] = []
    warnings: list[str] = []
    for where, tok in _statements(text, source):
        cmd = tok[0]
        if cmd in ("flush", "spdflush"):
            continue
        if cmd == "add":
            sas.append(_setkey_add(tok, where, sha256_icv_bits, warnings))
        elif cmd in ("spdadd", "spdupdate"):
            policies.append(_setkey_spdadd(tok, where, warnings))
        else:
            raise _err(where, f"'{cmd}' cannot be imported (add, spdadd, flush and spdflush can)")
    return sas, policies, warnings


def import_setkey(text: str, source: str = "<input>", *, sha256_icv_bits: int = 96) -> ImportResult:
    sas, policies, warnings = parse_setkey(text, source, sha256_icv_bits=sha256_icv_bits)
    if not sas and not policies:
        raise ConfigError(source, "no 'add' or 'spdadd' statements found")
    return resolve(sas, policies, warnings)


__all__ = [
    "ImportResult",
    "ImportedPolicy",
    "ImportedSa",
    "Template",
    "import_setkey",
    "import_xfrm",
    "parse_setkey",
    "parse_xfrm",
    "resolve",
]
