"""TOML configuration: engine settings, SAs and policies, validated before anything is built.

A configuration is all-or-nothing: the whole file is parsed and checked, and the first
problem raises `ConfigError` naming the file, the line (when it can be found) and the key
path, e.g. ``rules/x.toml:22: sa[1] (b-to-a).enc_key: enc_key has 15 bytes, aes-cbc-128
needs 16``. tomllib reports lines only for syntax errors, so for semantic errors the line is
recovered by scanning the text for the Nth ``[[sa]]``/``[[policy]]`` header and the key
inside that table. Messages never contain key material (only lengths and positions).

The format is documented in docs/configuration.md; shipped examples live in rules/.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .replay import MAX_WINDOW
from .sa import Lifetime, SecurityAssociation
from .spd import ICMP_PROTOCOLS, PORT_PROTOCOLS, Action, Direction, Policy, Selector, Spd

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# --- algorithms: (key bytes, salt bytes) and ICV lengths, for messages that say what is expected ----------
# The transform (algorithms.make_transform) validates again; these tables exist so that the error
# can point at the exact key with a helpful expectation.
AEAD_KEYS: dict[str, tuple[int, int]] = {
    "aes-gcm-128": (16, 4),
    "aes-gcm-192": (24, 4),
    "aes-gcm-256": (32, 4),
    "chacha20-poly1305": (32, 4),
    "aes-gmac-128": (16, 4),
    "aes-gmac-192": (24, 4),
    "aes-gmac-256": (32, 4),
}
AEAD_ICV_LENGTHS: dict[str, tuple[int, ...]] = {
    name: ((8, 12, 16) if name.startswith("aes-gcm-") else (16,)) for name in AEAD_KEYS
}
ENC_KEYS: dict[str, int] = {"aes-cbc-128": 16, "aes-cbc-192": 24, "aes-cbc-256": 32, "null": 0}
# RFC 4868 §2.1.1 / RFC 2404: the key is as long as the hash output
AUTH_KEYS: dict[str, int] = {
    "hmac-sha256-128": 32,
    "hmac-sha384-192": 48,
    "hmac-sha512-256": 64,
    "hmac-sha1-96": 20,
}
AUTH_ICV: dict[str, int] = {
    "hmac-sha256-128": 16, "hmac-sha384-192": 24, "hmac-sha512-256": 32, "hmac-sha1-96": 12,
}
# other truncations (as `ip xfrm ... auth-trunc`): multiples of 4 bytes from 12 up to the digest size,
# which for these HMACs equals the key length

PROTOCOLS: dict[str, int | None] = {
    "any": None,
    "icmp": 1,
    "tcp": 6,
    "udp": 17,
    "dccp": 33,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "ipv6-icmp": 58,
    "icmpv6": 58,
    "sctp": 132,
    "udplite": 136,
}
PROTOCOL_NAMES: dict[int, str] = {
    1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 47: "gre", 50: "esp", 51: "ah", 58: "ipv6-icmp", 132: "sctp",
    136: "udplite",
}

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MARK = 0x4E510000  # "NQ" in the high 16 bits: packets the engine sends itself
DEFAULT_MARK_MASK = 0xFFFF0000
DEFAULT_SOCKET_DIR = "/run/nfq-ipsec"
MAX_KEY_FILE = 4096
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,79}")
_CHAIN_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{1,20}")
_IFNAME_BAD = re.compile(r"[/:\s]")
_SUN_PATH_MAX = 107


def _all_bypass() -> dict[Direction, Action]:
    return {d: Action.BYPASS for d in Direction}


@dataclass(frozen=True)
class EngineSettings:
    """The ``[engine]`` table: how the engine attaches to the kernel and how loud it is."""

    default_policy: Mapping[Direction, Action] = field(default_factory=_all_bypass, hash=False)
    fail_open: bool = False  # True: iptables --queue-bypass, traffic passes in clear if the engine dies
    queue_num: int = 0  # first NFQUEUE number; workers use queue_num .. queue_num + workers - 1
    workers: int = 1
    control_socket: str = f"{DEFAULT_SOCKET_DIR}/nfq-ipsec.sock"
    chain_prefix: str = "NFQIPSEC"  # iptables chains <prefix>-IN / -OUT / -FWD
    mark: int = DEFAULT_MARK  # fwmark on packets the engine sends itself, so the hooks let them pass
    mark_mask: int = DEFAULT_MARK_MASK
    tunnel_device: str = "nfqipsec0"  # TUN device re-injecting decrypted tunnel-mode packets
    icmp_rate: float = 10.0  # ICMP errors per second on average (token bucket refill rate)
    icmp_burst: int = 20  # bucket size; 0 = never send ICMP errors
    log_level: str = "info"
    audit_rate: float = 5.0  # audit log lines per second (drops, policy violations)
    audit_burst: int = 10  # 0 = no audit lines
    fast_path: bool = True  # decided flows of ESP AEAD IPv4 SAs are handled in C (_espcore.FastPath)

    def default_actions(self) -> dict[Direction, Action]:
        """A fresh per-direction dict, as `Spd(...)` takes it."""
        return dict(self.default_policy)


@dataclass
class Config:
    """A fully validated configuration; SAs and policies are ready to be added to a Sad/Spd."""

    engine: EngineSettings
    sas: list[SecurityAssociation]
    policies: list[Policy]
    warnings: list[str] = field(default_factory=list)
    source: str = "<string>"


# --- locating things in the text --------------------------------------------------------------------


_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([^\[\]#]*?)\s*\]\]?\s*(?:#.*)?$")
_TOML_POS_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def _split_dotted(name: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in name.split("."))


class _Doc:
    """The source text and where its tables and keys are, for error messages with line numbers."""

    def __init__(self, text: str, source: str, base_dir: Path) -> None:
        self.text = text
        self.source = source
        self.base_dir = base_dir
        self.lines = text.splitlines()
        # (0-based line index, is array-of-tables, dotted name parts)
        self.headers: list[tuple[int, bool, tuple[str, ...]]] = []
        for i, line in enumerate(self.lines):
            m = _HEADER_RE.match(line)
            if m:
                self.headers.append((i, m.group(1) == "[[", _split_dotted(m.group(2))))

    def load(self) -> dict[str, Any]:
        try:
            return tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            msg = str(e)
            m = _TOML_POS_RE.search(msg)
            if m:
                raise ConfigError(f"{self.source}:{m.group(1)}", f"invalid TOML: {msg[: m.start()]} "
                                  f"(column {m.group(2)})") from None
            raise ConfigError(self.source, f"invalid TOML: {msg}") from None

    def _entry_header(self, kind: str, index: int | None) -> int | None:
        """Position in self.headers of ``[[kind]]`` number ``index`` (or of ``[kind]`` when index is None)."""
        n = 0
        for pos, (_, is_array, parts) in enumerate(self.headers):
            if parts != (kind,):
                continue
            if index is None and not is_array:
                return pos
            if index is not None and is_array:
                if n == index:
                    return pos
                n += 1
        return None

    def _find_key(self, start: int, end: int, dotted: Sequence[str]) -> int | None:
        pattern = re.compile(
            r"^\s*" + r"\s*\.\s*".join(rf"[\"']?{re.escape(p)}[\"']?" for p in dotted) + r"\s*[=.]"
        )
        for i in range(start, end):
            if pattern.match(self.lines[i]):
                return i
        return None

    def line_of(self, kind: str | None, index: int | None, path: Sequence[str]) -> int | None:
        """1-based line of ``path`` inside table ``kind`` (entry ``index``), else of the table header."""
        if kind is None:  # a top-level key
            first = self.headers[0][0] if self.headers else len(self.lines)
            i = self._find_key(0, first, path[:1]) if path else None
            if i is None and path:
                for line, _, parts in self.headers:
                    if parts[:1] == (path[0],):
                        return line + 1
            return None if i is None else i + 1
        pos = self._entry_header(kind, index)
        if pos is None:
            return None
        # this entry's block: its header plus following sub-tables ([sa.lifetime], [engine.x])
        block = [self.headers[pos]]
        for h in self.headers[pos + 1:]:
            if h[2][0] != kind or len(h[2]) == 1:
                break
            block.append(h)
        ends = [self.headers[pos + k + 1][0] if pos + k + 1 < len(self.headers) else len(self.lines)
                for k in range(len(block))]
        for depth in range(len(path), -1, -1):  # deepest sub-table first: [sa.lifetime] before [[sa]]
            want = (kind, *path[:depth])
            for (line, _, parts), end in zip(block, ends, strict=True):
                if parts != want:
                    continue
                rest = path[depth:]
                # `a.b = ` (dotted), then `a = { ... }` (inline table): the longest key found wins
                for n in range(len(rest), 0, -1):
                    found = self._find_key(line + 1, end, rest[:n])
                    if found is not None:
                        return found + 1
                return line + 1
        return block[0][0] + 1

    def where(self, label: str, kind: str | None, index: int | None, path: Sequence[str]) -> str:
        line = self.line_of(kind, index, path)
        loc = self.source if line is None else f"{self.source}:{line}"
        full = ".".join([label, *path]) if label else ".".join(path)
        return f"{loc}: {full}" if full else loc


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _typename(v: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(v), type(v).__name__)


class _Table:
    """One TOML table with typed getters whose errors say exactly where the problem is."""

    def __init__(self, doc: _Doc, data: Mapping[str, Any], label: str, kind: str | None, index: int | None,
                 prefix: tuple[str, ...] = ()) -> None:
        self.doc = doc
        self.data = data
        self.label = label
        self.kind = kind
        self.index = index
        self.prefix = prefix

    def location(self, key: str | None = None) -> str:
        path = (*self.prefix, key) if key is not None else self.prefix
        return self.doc.where(self.label, self.kind, self.index, path)

    def error(self, key: str | None, reason: str) -> ConfigError:
        return ConfigError(self.location(key), reason)

    def check_keys(self, allowed: Collection[str]) -> None:
        for key in self.data:
            if key not in allowed:
                raise self.error(key, f"unknown key {key!r}{_suggest(key, allowed)}; valid keys: "
                                      f"{', '.join(sorted(allowed))}")

    def has(self, key: str) -> bool:
        return key in self.data

    def get_str(self, key: str, default: str | None = None, *, choices: Collection[str] | None = None,
                required: bool = False) -> str | None:
        if key not in self.data:
            if required:
                raise self.error(key, "missing" + (f" (one of: {', '.join(choices)})" if choices else ""))
            return default
        v = self.data[key]
        if not isinstance(v, str):
            raise self.error(key, f"expected a string, got {_typename(v)}")
        if choices is not None and v not in choices:
            raise self.error(key, f"unknown value {v!r}{_suggest(v, choices)}; valid: {', '.join(choices)}")
        return v

    def get_choice(self, key: str, choices: Sequence[str]) -> str:
        """A required string that must be one of ``choices``."""
        v = self.get_str(key, choices=choices, required=True)
        assert v is not None
        return v

    def get_int(self, key: str, default: int, lo: int, hi: int) -> int:
        if key not in self.data:
            return default
        v = self.data[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(key, f"expected an integer, got {_typename(v)}")
        if not lo <= v <= hi:
            raise self.error(key, f"{v} is out of range {lo}..{hi}")
        return v

    def get_number(self, key: str, default: float, lo: float, hi: float) -> float:
        if key not in self.data:
            return default
        v = self.data[key]
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.error(key, f"expected a number, got {_typename(v)}")
        if not lo <= v <= hi:
            raise self.error(key, f"{v} is out of range {lo:g}..{hi:g}")
        return v

    def get_bool(self, key: str, default: bool) -> bool:
        if key not in self.data:
            return default
        v = self.data[key]
        if not isinstance(v, bool):
            raise self.error(key, f"expected true or false, got {_typename(v)}")
        return v

    def sub(self, key: str) -> _Table | None:
        if key not in self.data:
            return None
        v = self.data[key]
        if not isinstance(v, dict):
            raise self.error(key, f"expected a table, got {_typename(v)}")
        return _Table(self.doc, v, self.label, self.kind, self.index, (*self.prefix, key))


# --- keys ---------------------------------------------------------------------------------------------


def _parse_hex(text: str, what: str) -> bytes:
    """Hex digits, optional 0x, whitespace ignored. Errors name positions, never the digits."""
    s = "".join(text.split())
    if s[:2] in ("0x", "0X"):
        s = s[2:]
    for i, ch in enumerate(s):
        if ch not in "0123456789abcdefABCDEF":
            raise ValueError(f"{what} is not hexadecimal (hex digit {i + 1} of {len(s)} is not 0-9/a-f)")
    if len(s) % 2:
        raise ValueError(f"{what} has an odd number of hex digits ({len(s)}); each byte takes two")
    return bytes.fromhex(s)


def _read_key_file(path: Path) -> bytes:
    """Read a hex key file, refusing files others could read or change (mode & 0o077, foreign owner)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"cannot open key file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)  # check what was opened, not what the name pointed to a moment earlier
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"key file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise ValueError(
                f"key file {path} has mode {mode:04o}: group/others may access it; refusing it "
                f"(chmod 600 {path})"
            )
        if st.st_uid not in (0, os.geteuid()):
            raise ValueError(
                f"key file {path} is owned by uid {st.st_uid}: it must be owned by root or uid {os.geteuid()}"
            )
        if st.st_size > MAX_KEY_FILE:
            raise ValueError(f"key file {path} is too large ({st.st_size} bytes) for a hex key")
        raw = os.read(fd, MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"key file {path} is not hex text (non-ASCII bytes)") from None
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    key = _parse_hex(text, f"key file {path}")
    if not key:
        raise ValueError(f"key file {path} contains no hex digits")
    return key


def _key_length_text(alg: str) -> str:
    if alg in AEAD_KEYS:
        k, salt = AEAD_KEYS[alg]
        return f"{k + salt} ({k}-byte key + {salt}-byte salt)"
    return str(ENC_KEYS.get(alg, AUTH_KEYS.get(alg, 0)))


def _expected_len(alg: str) -> int:
    if alg in AEAD_KEYS:
        return sum(AEAD_KEYS[alg])
    return ENC_KEYS[alg] if alg in ENC_KEYS else AUTH_KEYS[alg]


def _get_key(t: _Table, key: str, alg: str) -> bytes:
    """The key for ``alg`` from ``key`` (inline hex) or ``<key>_file``, length-checked."""
    file_key = f"{key}_file"
    inline, from_file = t.has(key), t.has(file_key)
    want = _expected_len(alg)
    if inline and from_file:
        raise t.error(file_key, f"give either {key} or {file_key}, not both")
    if not inline and not from_file:
        if want == 0:
            return b""
        raise t.error(key, f"missing: {alg} needs a {_key_length_text(alg)}-byte key "
                           f"({key} = \"0x...\" or {file_key} = \"path\")")
    where = key if inline else file_key
    v = t.data[where]
    if not isinstance(v, str):
        raise t.error(where, f"expected a {'hex string' if inline else 'path string'}, got {_typename(v)}")
    try:
        if inline:
            data = _parse_hex(v, key)
        else:
            p = Path(v)
            data = _read_key_file(p if p.is_absolute() else t.doc.base_dir / p)
    except ValueError as e:
        raise t.error(where, str(e)) from None
    if len(data) != want:
        if want == 0:
            raise t.error(where, f"{alg} takes no key, got {len(data)} bytes")
        raise t.error(where, f"{key} has {len(data)} bytes, {alg} needs {_key_length_text(alg)}")
    return data


# --- [engine] -----------------------------------------------------------------------------------------

ENGINE_KEYS = tuple(f.name for f in fields(EngineSettings))


def _default_socket(source: str) -> str:
    stem = Path(source).stem if not source.startswith("<") else ""
    return f"{DEFAULT_SOCKET_DIR}/{stem or 'nfq-ipsec'}.sock"


_NO_DEFAULT_PROTECT = "cannot be protect (a default names no SA); use bypass or discard"


def _parse_default_policy(t: _Table) -> dict[Direction, Action]:
    allowed = (Action.BYPASS.value, Action.DISCARD.value)
    out = _all_bypass()
    v = t.data.get("default_policy")
    if v is None:
        return out
    if isinstance(v, str):
        if v == Action.PROTECT.value:
            raise t.error("default_policy", _NO_DEFAULT_PROTECT)
        return {d: Action(t.get_choice("default_policy", allowed)) for d in Direction}
    sub = t.sub("default_policy")
    if sub is None:  # pragma: no cover - has() checked above
        return out
    sub.check_keys([d.value for d in Direction])
    for d in Direction:
        if sub.data.get(d.value) == Action.PROTECT.value:
            raise sub.error(d.value, _NO_DEFAULT_PROTECT)
        if sub.has(d.value):
            out[d] = Action(sub.get_choice(d.value, allowed))
    return out


def _parse_engine(doc: _Doc, data: object) -> EngineSettings:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(doc.where("engine", "engine", None, ()),
                          f"expected a table ([engine]), got {_typename(data)}")
    t = _Table(doc, data, "engine", "engine", None)
    t.check_keys(ENGINE_KEYS)
    d = EngineSettings()
    default_policy = _parse_default_policy(t)
    queue_num = t.get_int("queue_num", d.queue_num, 0, 65535)
    workers = t.get_int("workers", d.workers, 1, 64)
    if queue_num + workers - 1 > 65535:
        raise t.error("workers", f"queues {queue_num}..{queue_num + workers - 1} exceed 65535")
    sock = t.get_str("control_socket", _default_socket(doc.source))
    assert sock is not None
    if not sock.startswith("/"):
        raise t.error("control_socket", f"must be an absolute path, got {sock!r}")
    if len(os.fsencode(sock)) > _SUN_PATH_MAX:
        raise t.error("control_socket", f"path is longer than the {_SUN_PATH_MAX} bytes a unix socket allows")
    prefix = t.get_str("chain_prefix", d.chain_prefix)
    assert prefix is not None
    if not _CHAIN_PREFIX_RE.fullmatch(prefix):
        raise t.error("chain_prefix", f"{prefix!r} must be 1-20 letters, digits, '_' or '-' "
                                      "(iptables chain names)")
    mark = t.get_int("mark", d.mark, 1, 0xFFFFFFFF)
    mask = t.get_int("mark_mask", d.mark_mask, 1, 0xFFFFFFFF)
    if mark & ~mask:
        raise t.error("mark", f"0x{mark:08x} has bits outside mark_mask 0x{mask:08x}")
    dev = t.get_str("tunnel_device", d.tunnel_device)
    assert dev is not None
    if not dev or len(dev.encode()) > 15 or dev in (".", "..") or _IFNAME_BAD.search(dev):
        raise t.error("tunnel_device", f"{dev!r} is not a valid interface name (1-15 characters, no '/', ':' "
                                       "or spaces)")
    return EngineSettings(
        default_policy=default_policy,
        fail_open=t.get_bool("fail_open", d.fail_open),
        queue_num=queue_num,
        workers=workers,
        control_socket=sock,
        chain_prefix=prefix,
        mark=mark,
        mark_mask=mask,
        tunnel_device=dev,
        icmp_rate=float(t.get_number("icmp_rate", d.icmp_rate, 0, 1e6)),
        icmp_burst=t.get_int("icmp_burst", d.icmp_burst, 0, 1_000_000),
        log_level=t.get_str("log_level", d.log_level, choices=LOG_LEVELS) or d.log_level,
        audit_rate=float(t.get_number("audit_rate", d.audit_rate, 0, 1e6)),
        audit_burst=t.get_int("audit_burst", d.audit_burst, 0, 1_000_000),
        fast_path=t.get_bool("fast_path", d.fast_path),
    )


# --- [[sa]] -------------------------------------------------------------------------------------------

SA_KEYS = (
    "name", "proto", "mode", "src", "dst", "spi", "aead", "key", "key_file", "enc", "enc_key",
    "enc_key_file", "auth", "auth_key", "auth_key_file", "icv_len", "esn", "replay_window", "seq_start",
    "tfc_pad", "ah_align", "lifetime",
)
LIFETIME_KEYS = tuple(f.name for f in fields(Lifetime))


@dataclass
class _SaSpec:
    table: _Table
    kwargs: dict[str, Any]


def _address(t: _Table, key: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    v = t.get_str(key, required=True)
    assert v is not None
    try:
        return ipaddress.ip_address(v)
    except ValueError:
        hint = " (an SA endpoint is a single address, not a prefix)" if "/" in v else ""
        raise t.error(key, f"{v!r} is not an IP address{hint}") from None


def _parse_sa(doc: _Doc, index: int, data: object) -> _SaSpec:
    if not isinstance(data, dict):
        raise ConfigError(doc.where(f"sa[{index}]", "sa", index, ()),
                          f"expected a table, got {_typename(data)}")
    name = data.get("name")
    label = f"sa[{index}] ({name})" if isinstance(name, str) else f"sa[{index}]"
    t = _Table(doc, data, label, "sa", index)
    t.check_keys(SA_KEYS)
    name = t.get_str("name", required=True)
    assert name is not None
    if not _NAME_RE.fullmatch(name) or len(name) > 64:
        raise t.error("name", f"{name!r}: use 1-64 letters, digits, '_', '.', ':' or '-', starting with "
                              "a letter or digit")
    proto = t.get_choice("proto", ("esp", "ah"))
    mode = t.get_choice("mode", ("transport", "tunnel"))
    src = _address(t, "src")
    dst = _address(t, "dst")
    if src.version != dst.version:
        raise t.error("dst", f"{dst} is IPv{dst.version} but src {src} is IPv{src.version} (both {mode} "
                             "endpoints must be of the same family)")
    spi_v = t.data.get("spi")
    if isinstance(spi_v, str):  # "0x1001" as ip xfrm prints it
        try:
            spi_v = int(spi_v, 0)
        except ValueError:
            raise t.error("spi", f"{spi_v!r} is not a number") from None
        spi = spi_v
        if not 0 <= spi <= 0xFFFFFFFF:
            raise t.error("spi", f"{spi} is not a 32-bit value")
    elif spi_v is None:
        raise t.error("spi", "missing (a 32-bit number, e.g. spi = 0x00001001)")
    else:
        spi = t.get_int("spi", 0, 0, 0xFFFFFFFF)
    if spi == 0:
        raise t.error("spi", "0 is invalid (RFC 4303 §2.1)")
    if spi < 256:
        raise t.error("spi", f"{spi} is in 1..255, reserved by IANA (RFC 4303 §2.1); use 256 or more")

    kw: dict[str, Any] = {
        "name": name, "proto": proto, "mode": mode, "src": str(src), "dst": str(dst), "spi": spi,
    }
    aead = t.get_str("aead", choices=tuple(AEAD_KEYS))
    enc = t.get_str("enc", choices=tuple(ENC_KEYS))
    auth = t.get_str("auth", choices=tuple(AUTH_KEYS))
    if proto == "ah":
        for k in ("aead", "enc", "key", "key_file", "enc_key", "enc_key_file"):
            if t.has(k):
                raise t.error(k, "AH only authenticates: give auth and auth_key")
        if auth is None:
            raise t.error("auth", f"missing: AH needs auth (one of {', '.join(AUTH_KEYS)})")
    elif aead is not None:
        for k in ("enc", "auth", "enc_key", "enc_key_file", "auth_key", "auth_key_file"):
            if t.has(k):
                raise t.error(k, f"not used with aead {aead} (an AEAD encrypts and authenticates with 'key')")
    else:
        for k in ("key", "key_file"):
            if t.has(k):
                raise t.error(k, "'key' is for aead; with enc and auth give enc_key and auth_key")
        if enc is None and auth is None:
            raise t.error("aead", f"missing: ESP needs aead ({', '.join(AEAD_KEYS)}) or enc and auth")
        if enc is None:
            raise t.error("enc", f"missing: ESP with auth needs enc ({', '.join(ENC_KEYS)}; 'null' for "
                                 "integrity only)")
        if auth is None:
            raise t.error("auth", f"missing: ESP enc {enc} without integrity is not allowed (RFC 8221); "
                                  f"add auth ({', '.join(AUTH_KEYS)}) or use an aead")
    if aead is not None:
        kw["aead"] = aead
        kw["key"] = _get_key(t, "key", aead)
    if enc is not None:
        kw["enc"] = enc
        kw["enc_key"] = _get_key(t, "enc_key", enc)
    if auth is not None:
        kw["auth"] = auth
        kw["auth_key"] = _get_key(t, "auth_key", auth)
    if t.has("icv_len"):
        icv = t.get_int("icv_len", 0, 1, 64)
        if aead is not None:
            valid: tuple[int, ...] = AEAD_ICV_LENGTHS[aead]
        else:
            assert auth is not None
            valid = tuple(range(12, AUTH_KEYS[auth] + 1, 4))
        if icv not in valid:
            raise t.error("icv_len", f"{icv} is not possible with {aead or auth}; valid: "
                                     f"{', '.join(str(n) for n in valid)}")
        kw["icv_len"] = icv
    esn = t.get_bool("esn", False)
    kw["esn"] = esn
    window = t.get_int("replay_window", 32, 0, MAX_WINDOW)
    if esn and window == 0:
        raise t.error("replay_window", "must be > 0 with esn = true (as Linux requires)")
    kw["replay_window"] = window
    kw["seq_start"] = t.get_int("seq_start", 0, 0, (1 << 64) - 1 if esn else (1 << 32) - 1)
    kw["tfc_pad"] = t.get_int("tfc_pad", 0, 0, 65535)
    if kw["tfc_pad"] and (proto != "esp" or mode != "tunnel"):
        raise t.error("tfc_pad", "TFC padding needs ESP in tunnel mode (RFC 4303 §2.7)")
    if t.has("ah_align"):
        align = t.get_int("ah_align", 0, 4, 8)
        if proto != "ah" or align not in (4, 8):
            raise t.error("ah_align", "4 or 8, for AH SAs only (8 = 64-bit aligned IPv4 AH, as stock Linux sends)")
        kw["ah_align"] = align
    lt = t.sub("lifetime")
    if lt is not None:
        lt.check_keys(LIFETIME_KEYS)
        values: dict[str, Any] = {}
        for k in LIFETIME_KEYS:
            if k.endswith("_seconds"):
                values[k] = lt.get_number(k, 0, 0, 1e12)
            else:
                values[k] = lt.get_int(k, 0, 0, (1 << 64) - 1)
        for kind in ("bytes", "packets", "seconds"):
            soft, hard = values[f"soft_{kind}"], values[f"hard_{kind}"]
            if soft and hard and soft > hard:
                raise lt.error(f"soft_{kind}", f"{soft} is larger than hard_{kind} {hard}")
        kw["lifetime"] = Lifetime(**values)
    return _SaSpec(t, kw)


def _build_sa(spec: _SaSpec) -> SecurityAssociation:
    try:
        return SecurityAssociation(**spec.kwargs)
    except ValueError as e:
        msg = str(e)
        prefix = f"SA {spec.kwargs['name']}: "
        msg = msg.removeprefix(prefix)
        first = msg.split(" ", 1)[0]
        raise spec.table.error(first if first in SA_KEYS else None, msg) from None


# --- [[policy]] ---------------------------------------------------------------------------------------

POLICY_KEYS = (
    "name", "dir", "action", "sa", "priority", "src", "dst", "proto", "sport", "dport", "icmp_type",
    "icmp_code",
)


@dataclass
class _PolicySpec:
    table: _Table
    explicit_name: str | None
    dir: Direction
    action: Action
    sa: str | None
    priority: int
    selector: Selector


def _prefix(t: _Table, key: str) -> IpNetwork | None:
    v = t.get_str(key)
    if v is None or v == "any":
        return None
    try:
        return ipaddress.ip_network(v)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise t.error(key, f"{v!r} is not an address or prefix (e.g. 192.0.2.0/24, 2001:db8::/32, "
                           "any)") from None
    raise t.error(key, f"{v} has host bits set (did you mean {loose}?)")


def _port_range(t: _Table, key: str) -> tuple[int, int] | None:
    if not t.has(key):
        return None
    v = t.data[key]
    lo: object
    hi: object
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", v)
        if not m:
            raise t.error(key, f"{v!r} is not a port or range (e.g. 443, \"1000-2000\", [1000, 2000])")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    elif isinstance(v, list):
        if len(v) != 2:
            raise t.error(key, f"a range is [low, high], got {len(v)} elements")
        lo, hi = v
    else:
        lo = hi = v
    for p in (lo, hi):
        if isinstance(p, bool) or not isinstance(p, int):
            raise t.error(key, f"expected a port number, got {_typename(p)}")
        if not 0 <= p <= 65535:
            raise t.error(key, f"port {p} is out of range 0..65535")
    assert isinstance(lo, int) and isinstance(hi, int)
    if lo > hi:
        raise t.error(key, f"range {lo}-{hi} is empty (low > high)")
    return (lo, hi)


def _proto(t: _Table) -> int | None:
    if not t.has("proto"):
        return None
    v = t.data["proto"]
    if isinstance(v, str):
        name = v.lower()
        if name in PROTOCOLS:
            return PROTOCOLS[name]
        if name.isdigit():
            v = int(name)
        else:
            raise t.error("proto", f"unknown protocol {v!r}{_suggest(name, PROTOCOLS)}; use a number "
                                   f"1..255 or one of {', '.join(PROTOCOLS)}")
    if isinstance(v, bool) or not isinstance(v, int):
        raise t.error("proto", f"expected a protocol name or number, got {_typename(v)}")
    if not 1 <= v <= 255:
        raise t.error("proto", f"{v} is out of range 1..255 (use \"any\" for all protocols)")
    return v


def _parse_policy(doc: _Doc, index: int, data: object) -> _PolicySpec:
    if not isinstance(data, dict):
        raise ConfigError(doc.where(f"policy[{index}]", "policy", index, ()),
                          f"expected a table, got {_typename(data)}")
    name = data.get("name")
    label = f"policy[{index}] ({name})" if isinstance(name, str) else f"policy[{index}]"
    t = _Table(doc, data, label, "policy", index)
    t.check_keys(POLICY_KEYS)
    if name is not None:
        name = t.get_str("name")
        assert name is not None
        if not _NAME_RE.fullmatch(name):
            raise t.error("name", f"{name!r}: use 1-80 letters, digits, '_', '.', ':' or '-', starting "
                                  "with a letter or digit")
    direction = Direction(t.get_choice("dir", [d.value for d in Direction]))
    action = Action(t.get_choice("action", [a.value for a in Action]))
    sa = t.get_str("sa")
    if action is Action.PROTECT and sa is None:
        raise t.error("sa", "missing: action protect needs the name of the SA to apply")
    if action is not Action.PROTECT and sa is not None:
        raise t.error("sa", f"action {action.value} takes no sa (only protect does)")
    priority = t.get_int("priority", 0, 0, 0xFFFFFFFF)
    src = _prefix(t, "src")
    dst = _prefix(t, "dst")
    if src is not None and dst is not None and src.version != dst.version:
        raise t.error("dst", f"{dst} is IPv{dst.version} but src {src} is IPv{src.version}")
    family = src.version if src is not None else dst.version if dst is not None else None
    proto = _proto(t)
    if proto == 1 and family == 6:
        raise t.error("proto", "icmp is IPv4's; with IPv6 addresses use ipv6-icmp")
    if proto == 58 and family == 4:
        raise t.error("proto", "ipv6-icmp is IPv6's; with IPv4 addresses use icmp")
    sport = _port_range(t, "sport")
    dport = _port_range(t, "dport")
    for k, r in (("sport", sport), ("dport", dport)):
        if r is not None and proto not in PORT_PROTOCOLS:
            raise t.error(k, "ports need proto tcp, udp, sctp, dccp or udplite")
    icmp_type = t.get_int("icmp_type", -1, 0, 255) if t.has("icmp_type") else None
    icmp_code = t.get_int("icmp_code", -1, 0, 255) if t.has("icmp_code") else None
    for k, v in (("icmp_type", icmp_type), ("icmp_code", icmp_code)):
        if v is not None and proto not in ICMP_PROTOCOLS:
            raise t.error(k, "needs proto icmp or ipv6-icmp")
    if icmp_code is not None and icmp_type is None:
        raise t.error("icmp_code", "needs icmp_type")
    try:
        selector = Selector(src=src, dst=dst, proto=proto, sport=sport, dport=dport, icmp_type=icmp_type,
                            icmp_code=icmp_code)
    except ValueError as e:
        raise t.error(None, str(e)) from None
    return _PolicySpec(t, name, direction, action, sa, priority, selector)


def _name_policies(specs: list[_PolicySpec], taken: Collection[str]) -> list[str]:
    """Explicit names, else ``<dir>-<sa>`` / ``<dir>-<action>``, made unique with ``-<index>``."""
    seen: dict[str, int] = {}
    for i, s in enumerate(specs):
        if s.explicit_name is not None:
            if s.explicit_name in seen:
                raise s.table.error("name", f"duplicate policy name {s.explicit_name!r} (also policy["
                                            f"{seen[s.explicit_name]}])")
            if s.explicit_name in taken:
                raise s.table.error("name", f"a policy named {s.explicit_name!r} already exists")
            seen[s.explicit_name] = i
    names: list[str] = []
    used = set(seen) | set(taken)
    for i, s in enumerate(specs):
        if s.explicit_name is not None:
            names.append(s.explicit_name)
            continue
        base = f"{s.dir.value}-{s.sa}" if s.sa else f"{s.dir.value}-{s.action.value}"
        if not _NAME_RE.fullmatch(base):
            base = f"policy-{i}"
        name = base
        n = i
        while name in used:
            name = f"{base}-{n}"
            n += 1
        used.add(name)
        names.append(name)
    return names


# --- the whole document -------------------------------------------------------------------------------


def _array(doc: _Doc, data: Mapping[str, Any], key: str) -> list[Any]:
    v = data.get(key, [])
    if not isinstance(v, list):
        raise ConfigError(doc.where("", None, None, (key,)),
                          f"expected an array of tables ([[{key}]] ... ), got {_typename(v)} ([{key}])")
    return v


def _parse_document(
    doc: _Doc,
    data: Mapping[str, Any],
    *,
    top_keys: Collection[str],
    known_sas: Collection[str] | Mapping[str, Any] = (),
    known_policies: Collection[str] = (),
) -> tuple[list[SecurityAssociation], list[Policy], list[str]]:
    for key in data:
        if key not in top_keys:
            raise ConfigError(doc.where("", None, None, (key,)),
                              f"unknown top-level key {key!r}{_suggest(key, top_keys)}; valid: "
                              f"{', '.join(f'[{k}]' if k == 'engine' else f'[[{k}]]' for k in top_keys)}")
    warnings: list[str] = []
    sa_specs = [_parse_sa(doc, i, d) for i, d in enumerate(_array(doc, data, "sa"))]
    by_name: dict[str, _SaSpec] = {}
    by_spi: dict[tuple[str, int, str], _SaSpec] = {}
    for s in sa_specs:
        kw = s.kwargs
        other = by_name.get(kw["name"])
        if other is not None:
            raise s.table.error("name", f"duplicate SA name {kw['name']!r} (also {other.table.label})")
        if kw["name"] in known_sas:
            raise s.table.error("name", f"an SA named {kw['name']!r} already exists")
        by_name[kw["name"]] = s
        ident = (kw["proto"], kw["spi"], kw["dst"])
        other = by_spi.get(ident)
        if other is not None:
            raise s.table.error("spi", f"duplicate SPI 0x{kw['spi']:08x} for {kw['proto']} to {kw['dst']} "
                                       f"(also {other.table.label}): inbound packets could not tell the "
                                       "SAs apart")
        by_spi[ident] = s
    pol_specs = [_parse_policy(doc, i, d) for i, d in enumerate(_array(doc, data, "policy"))]
    names = _name_policies(pol_specs, known_policies)
    for p in pol_specs:
        if p.sa is None:
            continue
        spec = by_name.get(p.sa)
        if spec is None and p.sa not in known_sas:
            valid = list(by_name) + list(known_sas)
            raise p.table.error("sa", f"no SA named {p.sa!r}{_suggest(p.sa, valid)}")
        fam = p.selector.family
        mode: object
        sa_fam: object
        if spec is not None:
            mode, sa_fam = spec.kwargs["mode"], ipaddress.ip_address(spec.kwargs["src"]).version
        elif isinstance(known_sas, Mapping):
            known = known_sas[p.sa]
            mode, sa_fam = getattr(known, "mode", None), getattr(known, "family", None)
        else:
            continue
        if mode != "transport":
            continue
        if fam is not None and fam != sa_fam:
            key = "src" if p.table.has("src") else "dst"
            raise p.table.error(key, f"selects IPv{fam} traffic but transport SA {p.sa} is IPv{sa_fam} "
                                     "(transport mode cannot change the family; use a tunnel SA)")
        if fam is None:
            other_fam = 6 if sa_fam == 4 else 4
            warnings.append(f"{p.table.location()}: no src/dst, so IPv{other_fam} traffic matches too, but "
                            f"transport SA {p.sa} is IPv{sa_fam}: such packets will be dropped")
    # everything is valid: build the objects
    sas = [_build_sa(s) for s in sa_specs]
    policies: list[Policy] = []
    for name, p in zip(names, pol_specs, strict=True):
        try:
            policies.append(Policy(name=name, dir=p.dir, selector=p.selector, action=p.action, sa=p.sa,
                                   priority=p.priority))
        except ValueError as e:
            raise p.table.error(None, str(e)) from None
    spd = Spd()
    for pol, p in zip(policies, pol_specs, strict=True):
        cover = spd.shadowed(pol)
        if cover is not None:
            warnings.append(f"{p.table.location()}: policy {pol.name} can never match: earlier policy "
                            f"{cover.name} (priority {cover.priority}) covers all of its traffic")
        spd.add(pol)
    used = {p.sa for p in policies}
    for s in sa_specs:
        if s.kwargs["name"] not in used:
            warnings.append(f"{s.table.location()}: SA {s.kwargs['name']} is "
                            "not used by any policy")
    return sas, policies, warnings


def _base_dir(source: str, base_dir: str | os.PathLike[str] | None) -> Path:
    if base_dir is not None:
        return Path(base_dir)
    if source.startswith("<"):
        return Path.cwd()
    return Path(source).parent


def parse_config(
    text: str, source: str = "<string>", base_dir: str | os.PathLike[str] | None = None
) -> Config:
    """Parse and validate a whole configuration; key files are relative to ``base_dir``."""
    doc = _Doc(text, source, _base_dir(source, base_dir))
    data = doc.load()
    engine = _parse_engine(doc, data.get("engine"))
    sas, policies, warnings = _parse_document(doc, data, top_keys=("engine", "sa", "policy"))
    return Config(engine=engine, sas=sas, policies=policies, warnings=warnings, source=source)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a configuration file (messages name it as given)."""
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
        st = os.stat(source)
    except OSError as e:
        raise ConfigError(source, f"cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(source, f"not UTF-8 text (byte {e.start})") from None
    cfg = parse_config(text, source)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 and re.search(r"^\s*(key|enc_key|auth_key)\s*=", text, re.MULTILINE):
        cfg.warnings.append(f"{source}: has mode {mode:04o} and contains inline keys: others may read them "
                            f"(chmod 600 {source}, or use key_file)")
    return cfg


def parse_fragment(
    text: str,
    known_sas: Collection[str] | Mapping[str, Any] = (),
    source: str = "<fragment>",
    known_policies: Collection[str] = (),
    base_dir: str | os.PathLike[str] | None = None,
) -> tuple[list[SecurityAssociation], list[Policy]]:
    """Parse ``[[sa]]``/``[[policy]]`` tables to add to a running engine.

    Policies may name SAs of the fragment or ``known_sas`` (names; a mapping name -> SA also
    lets transport-family checks run). New names must not collide with known ones. Relative
    key files resolve against ``base_dir`` (default: the current directory).
    """
    doc = _Doc(text, source, _base_dir(source, base_dir))
    data = doc.load()
    if "engine" in data:
        raise ConfigError(doc.where("", None, None, ("engine",)),
                          "[engine] settings cannot be changed at run time")
    sas, policies, _ = _parse_document(doc, data, top_keys=("sa", "policy"), known_sas=known_sas,
                                       known_policies=known_policies)
    return sas, policies


# --- writing ------------------------------------------------------------------------------------------


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _fmt_ports(r: tuple[int, int]) -> str:
    return str(r[0]) if r[0] == r[1] else _toml_str(f"{r[0]}-{r[1]}")


def config_to_toml(
    sas: Iterable[Mapping[str, Any]],
    policies: Iterable[Policy],
    engine: EngineSettings | None = None,
) -> str:
    """Write a configuration that `parse_config` reads back to the same SAs, policies and settings.

    ``sas`` are SecurityAssociation keyword arguments (what an importer of ``ip xfrm state``
    or setkey output produces): a live SA does not give its keys back. The output contains
    the keys, so it belongs in a file only its owner can read.
    """
    lines = ["# nfq-ipsec configuration (generated). It contains secret keys: keep it chmod 600.", ""]
    d = EngineSettings()
    if engine is not None:
        lines.append("[engine]")
        dp = engine.default_actions()
        if len(set(dp.values())) == 1:
            lines.append(f"default_policy = {_toml_str(next(iter(dp.values())).value)}")
        else:
            inner = ", ".join(f"{k.value} = {_toml_str(v.value)}" for k, v in dp.items())
            lines.append(f"default_policy = {{ {inner} }}")
        for f in fields(EngineSettings):
            if f.name == "default_policy":
                continue
            value = getattr(engine, f.name)
            if value == getattr(d, f.name):
                continue
            text = f"0x{value:08x}" if f.name in ("mark", "mark_mask") else _toml_value(value)
            lines.append(f"{f.name} = {text}")
        lines.append("")
    for sa in sas:
        if isinstance(sa, SecurityAssociation):
            raise TypeError("config_to_toml needs SA parameters (with keys), not a live SecurityAssociation")
        lines.append("[[sa]]")
        for k in ("name", "proto", "mode", "src", "dst"):
            lines.append(f"{k} = {_toml_str(str(sa[k]))}")
        lines.append(f"spi = 0x{int(sa['spi']):08x}")
        for alg, key in (("aead", "key"), ("enc", "enc_key"), ("auth", "auth_key")):
            if sa.get(alg) is not None:
                lines.append(f"{alg} = {_toml_str(sa[alg])}")
                material = bytes(sa.get(key, b""))
                if material:
                    lines.append(f"{key} = {_toml_str('0x' + material.hex())}")
        if sa.get("icv_len") is not None:
            lines.append(f"icv_len = {int(sa['icv_len'])}")
        if sa.get("esn"):
            lines.append("esn = true")
        lines.append(f"replay_window = {int(sa.get('replay_window', 32))}")
        for k in ("seq_start", "tfc_pad", "ah_align"):
            if sa.get(k):
                lines.append(f"{k} = {int(sa[k])}")
        lifetime = sa.get("lifetime")
        if isinstance(lifetime, Lifetime):
            lifetime = lifetime.as_dict()
        if lifetime and any(lifetime.values()):
            lines.append("")
            lines.append("[sa.lifetime]")
            for k in LIFETIME_KEYS:
                if lifetime.get(k):
                    lines.append(f"{k} = {_toml_value(lifetime[k])}")
        lines.append("")
    for p in policies:
        sel = p.selector
        lines.append("[[policy]]")
        lines.append(f"name = {_toml_str(p.name)}")
        lines.append(f"dir = {_toml_str(p.dir.value)}")
        if sel.src is not None:
            lines.append(f"src = {_toml_str(str(sel.src))}")
        if sel.dst is not None:
            lines.append(f"dst = {_toml_str(str(sel.dst))}")
        if sel.proto is not None:
            proto = PROTOCOL_NAMES.get(sel.proto)
            lines.append(f"proto = {_toml_str(proto) if proto else sel.proto}")
        if sel.sport is not None:
            lines.append(f"sport = {_fmt_ports(sel.sport)}")
        if sel.dport is not None:
            lines.append(f"dport = {_fmt_ports(sel.dport)}")
        if sel.icmp_type is not None:
            lines.append(f"icmp_type = {sel.icmp_type}")
        if sel.icmp_code is not None:
            lines.append(f"icmp_code = {sel.icmp_code}")
        lines.append(f"action = {_toml_str(p.action.value)}")
        if p.sa is not None:
            lines.append(f"sa = {_toml_str(p.sa)}")
        if p.priority:
            lines.append(f"priority = {p.priority}")
        lines.append("")
    return "\n".join(lines)


__all__ = [
    "AEAD_KEYS",
    "AUTH_KEYS",
    "ENC_KEYS",
    "PROTOCOLS",
    "Config",
    "EngineSettings",
    "config_to_toml",
    "load_config",
    "parse_config",
    "parse_fragment",
]
