"""iptables hooks: the netfilter rules that hand packets to the engine's NFQUEUE(s).

`plan()` is pure: it turns the engine settings, the SPD and the SAD into a `HookPlan`, an
ordered list of `Rule`s for our own chains (PREFIX-IN/-OUT/-FWD in the filter table of
iptables and ip6tables), each able to render itself in iptables-save syntax. `install()`,
`remove()` and `status()` apply / undo / inspect a plan through python-iptables (libiptc,
i.e. the legacy ip_tables interface: this kernel has no nftables queue support). They act on
the network namespace of the calling process; the user's own rules are never modified, and
each table is replaced in one atomic libiptc commit.

The rules only have to *over*-approximate what the engine must see: the engine does the
exact, ordered SPD lookup itself. Queuing a packet too many is a little CPU; not queuing one
that a PROTECT or DISCARD policy covers would let it through in clear -- a security bug. So
whatever a selector cannot express in iptables (ports without a port protocol, ICMP type
with the wrong family, UDP-Lite ports, ...) is left out of the rule, widening it.

Fail closed by default: without `fail_open`, a dead engine leaves the queued traffic dropped
by the kernel (no `--queue-bypass`), never passed in clear.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from .spd import Direction  # the SPD's own enum: its members are the keys default_action() knows

DEFAULT_PREFIX = "NFQIPSEC"
COMMENT_PREFIX = "nfq-ipsec:"  # + policy name (status ties rules to policies through it)
SA_COMMENT_PREFIX = "nfq-ipsec-sa:"  # + SA name, on per-SPI ESP/AH rules (workers > 1)
DEFAULT_COMMENT_PREFIX = "nfq-ipsec-default:"  # + direction, on the catch-all rules
FAMILIES = (4, 6)
# builtin chain -> suffix of our chain jumped to from it (at position 1)
HOOK_CHAINS = (("INPUT", "IN"), ("OUTPUT", "OUT"), ("FORWARD", "FWD"))
PORT_MATCHES = {6: "tcp", 17: "udp", 33: "dccp", 132: "sctp"}  # UDP-Lite (136) has no port match
MAX_CHAIN_NAME = 28  # XT_EXTENSION_MAXNAMELEN - 1
MAX_COMMENT = 255  # XT_MAX_COMMENT_LEN - 1 (bytes)
_IFNAME = re.compile(r"^[^\s/:!'\"+]{1,15}$")  # IFNAMSIZ - 1; no '+': an iptables wildcard


class HookError(RuntimeError):
    """Installing or removing the hooks failed (whatever this call changed was rolled back)."""


# --- inputs (structural: config.EngineSettings, spd.Spd, sad.Sad satisfy these) ------------------
class HookSettings(Protocol):
    @property
    def queue_num(self) -> int: ...
    @property
    def fail_open(self) -> bool: ...
    @property
    def mark(self) -> int: ...
    @property
    def mark_mask(self) -> int: ...
    @property
    def tunnel_device(self) -> str | None: ...
    @property
    def workers(self) -> int: ...


class _Selector(Protocol):
    @property
    def src(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None: ...
    @property
    def dst(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None: ...
    @property
    def proto(self) -> int | None: ...
    @property
    def sport(self) -> tuple[int, int] | None: ...
    @property
    def dport(self) -> tuple[int, int] | None: ...
    @property
    def icmp_type(self) -> int | None: ...
    @property
    def icmp_code(self) -> int | None: ...


class _Policy(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def dir(self) -> Any: ...  # spd.Direction (a str enum)
    @property
    def selector(self) -> _Selector: ...
    @property
    def sa(self) -> str | None: ...


class _Spd(Protocol):
    def list(self) -> Sequence[Any]: ...  # Sequence[_Policy], in lookup order
    def default_action(self, direction: Any) -> Any: ...


class _Sa(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def proto(self) -> str: ...
    @property
    def spi(self) -> int: ...
    @property
    def dst(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address: ...


class _Sad(Protocol):
    def list(self) -> Sequence[Any]: ...  # Sequence[_Sa]


# --- the plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class MatchSpec:
    """One `-m NAME --opt value ...` block; a value of "" is a flag (`--queue-bypass`); an
    option name starting with "!" is negated (only produced when reading foreign rules back)."""

    name: str
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Rule:
    """One iptables rule of one family, in the terms iptables-save prints it."""

    family: int  # 4 = iptables, 6 = ip6tables
    chain: str
    src: str | None = None  # canonical "net/len" (iptables-save form), None = any
    dst: str | None = None
    in_iface: str | None = None
    out_iface: str | None = None
    proto: int | None = None  # None = all
    matches: tuple[MatchSpec, ...] = ()
    target: str = ""  # "" = no target (a counting rule)
    target_options: tuple[tuple[str, str], ...] = ()
    negated: frozenset[str] = frozenset()  # of "src", "dst", "in", "out", "proto" (read-back only)

    @property
    def comment(self) -> str | None:
        for m in self.matches:
            if m.name == "comment":
                return dict(m.options).get("comment")
        return None

    def render(self) -> str:
        """The rule exactly as `iptables-save` / `ip6tables-save` prints it."""
        out = [f"-A {self.chain}"]

        def neg(key: str) -> str:
            return "! " if key in self.negated else ""

        if self.src is not None:
            out.append(f"{neg('src')}-s {self.src}")
        if self.dst is not None:
            out.append(f"{neg('dst')}-d {self.dst}")
        if self.in_iface is not None:
            out.append(f"{neg('in')}-i {self.in_iface}")
        if self.out_iface is not None:
            out.append(f"{neg('out')}-o {self.out_iface}")
        if self.proto is not None:
            out.append(f"{neg('proto')}-p {protocol_name(self.proto)}")
        for m in self.matches:
            out.append(f"-m {m.name}")
            out.extend(_render_options(m.options, quote=m.name == "comment"))
        if self.target:
            out.append(f"-j {self.target}")
            out.extend(_render_options(self.target_options, quote=False))
        return " ".join(out)


def _render_options(options: Iterable[tuple[str, str]], quote: bool) -> Iterator[str]:
    for opt, value in options:
        prefix, opt = ("! ", opt[1:]) if opt.startswith("!") else ("", opt)
        if value == "":
            yield f"{prefix}--{opt}"
        else:
            yield f"{prefix}--{opt} {_save_string(value) if quote else value}"


def _save_string(value: str) -> str:
    """Quote like libxtables' xtables_save_string (used by the comment match)."""
    if value and re.fullmatch(r"[A-Za-z0-9_-]+", value):
        return value
    return '"' + re.sub(r'(["\\\'])', r"\\\1", value) + '"'


_FALLBACK_PROTOCOLS = {
    1: "icmp", 4: "ipencap", 6: "tcp", 17: "udp", 33: "dccp", 41: "ipv6", 47: "gre", 50: "esp", 51: "ah",
    58: "ipv6-icmp", 132: "sctp", 135: "mobility-header", 136: "udplite",
}


@lru_cache(maxsize=1)
def _protocol_names() -> dict[int, str]:
    """Number -> name as getprotobynumber() (hence iptables-save) sees them."""
    names = dict(_FALLBACK_PROTOCOLS)
    try:
        with open("/etc/protocols", encoding="utf-8", errors="replace") as f:
            seen: set[int] = set()
            for line in f:
                fields = line.split("#", 1)[0].split()
                if len(fields) >= 2 and fields[1].isdigit():
                    num = int(fields[1])
                    if num not in seen:  # the first entry wins, as in getprotobynumber()
                        seen.add(num)
                        names[num] = fields[0]
    except OSError:
        pass
    return names


def protocol_name(proto: int) -> str:
    return _protocol_names().get(proto, str(proto))


@dataclass(frozen=True)
class HookPlan:
    """Everything `install()` puts in place, in order."""

    rules: tuple[Rule, ...]
    chains: dict[int, tuple[str, ...]]  # family -> our chains (all created, even if nearly empty)
    jumps: tuple[tuple[str, str], ...]  # (builtin chain, our chain): one jump each, at position 1
    prefix: str = DEFAULT_PREFIX

    def rules_for(self, family: int, chain: str | None = None) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.family == family and (chain is None or r.chain == chain))

    def render(self, family: int) -> list[str]:
        """Our part of `iptables-save -t filter` (chain lines, jumps, rules), in save order."""
        lines = [f":{c} - [0:0]" for c in sorted(self.chains[family])]
        save_order = ("INPUT", "FORWARD", "OUTPUT")  # the filter table's builtin chain order
        for builtin, chain in sorted(self.jumps, key=lambda j: save_order.index(j[0])):
            lines.append(f"-A {builtin} -j {chain}")
        for chain in sorted(self.chains[family]):
            lines.extend(r.render() for r in self.rules_for(family, chain))
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "chains": {str(f): list(c) for f, c in self.chains.items()},
            "jumps": [list(j) for j in self.jumps],
            "rules": [_rule_to_dict(r) for r in self.rules],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HookPlan:
        return cls(
            rules=tuple(_rule_from_dict(r) for r in d["rules"]),
            chains={int(f): tuple(c) for f, c in d["chains"].items()},
            jumps=tuple((b, c) for b, c in d["jumps"]),
            prefix=d["prefix"],
        )


def _rule_to_dict(r: Rule) -> dict[str, Any]:
    return {
        "family": r.family, "chain": r.chain, "src": r.src, "dst": r.dst, "in_iface": r.in_iface,
        "out_iface": r.out_iface, "proto": r.proto,
        "matches": [[m.name, [list(o) for o in m.options]] for m in r.matches],
        "target": r.target, "target_options": [list(o) for o in r.target_options],
    }


def _rule_from_dict(d: Mapping[str, Any]) -> Rule:
    return Rule(
        family=d["family"], chain=d["chain"], src=d["src"], dst=d["dst"], in_iface=d["in_iface"],
        out_iface=d["out_iface"], proto=d["proto"],
        matches=tuple(MatchSpec(n, tuple((o, v) for o, v in opts)) for n, opts in d["matches"]),
        target=d["target"], target_options=tuple((o, v) for o, v in d["target_options"]),
    )


def chain_names(prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
    """builtin chain -> our chain."""
    return {builtin: f"{prefix}-{suffix}" for builtin, suffix in HOOK_CHAINS}


def _value(x: Any) -> str:
    """Enum member or plain string -> its string value (spd.Direction / Action are str enums)."""
    return str(getattr(x, "value", x))


def _network_str(net: ipaddress.IPv4Network | ipaddress.IPv6Network | None) -> str | None:
    if net is None or net.prefixlen == 0:
        return None  # /0 is "any" of that family: iptables-save prints nothing
    return f"{net.network_address}/{net.prefixlen}"


def _port_value(r: tuple[int, int] | None) -> str | None:
    if r is None:
        return None
    lo, hi = r
    if not 0 <= lo <= hi <= 65535:
        raise ValueError(f"invalid port range {r!r}")
    if (lo, hi) == (0, 65535):
        return None  # ANY
    return str(lo) if lo == hi else f"{lo}:{hi}"


def _selector_families(sel: _Selector) -> tuple[int, ...]:
    versions = {n.version for n in (sel.src, sel.dst) if n is not None}
    if len(versions) > 1:
        return ()  # can never match anything: nothing to queue
    return tuple(versions) if versions else FAMILIES


def _selector_rule(family: int, chain: str, sel: _Selector, target: tuple[str, tuple[tuple[str, str], ...]],
                    comment: str) -> Rule:
    proto = sel.proto or None  # 0 (or None): any protocol
    matches: list[MatchSpec] = []
    port_match = PORT_MATCHES.get(proto or -1)
    if port_match is not None:
        ports = (("sport", _port_value(sel.sport)), ("dport", _port_value(sel.dport)))
        opts = tuple((name, v) for name, v in ports if v is not None)
        if opts:
            matches.append(MatchSpec(port_match, opts))
    icmp = {(4, 1): ("icmp", "icmp-type"), (6, 58): ("icmp6", "icmpv6-type")}.get((family, proto or -1))
    if icmp is not None and sel.icmp_type is not None:
        value = str(sel.icmp_type) if sel.icmp_code is None else f"{sel.icmp_type}/{sel.icmp_code}"
        matches.append(MatchSpec(icmp[0], ((icmp[1], value),)))
    matches.append(_comment_match(comment))
    return Rule(family=family, chain=chain, src=_network_str(sel.src), dst=_network_str(sel.dst), proto=proto,
                matches=tuple(matches), target=target[0], target_options=target[1])


def _comment_match(text: str) -> MatchSpec:
    raw = text.encode("utf-8")
    if len(raw) > MAX_COMMENT:  # the kernel's limit; the name prefix still identifies the policy
        text = raw[:MAX_COMMENT].decode("utf-8", errors="ignore")
    return MatchSpec("comment", (("comment", text),))


def _check_settings(settings: HookSettings, workers: int) -> tuple[int, int]:
    queue_num = int(settings.queue_num)
    if not 0 <= queue_num or queue_num + workers - 1 > 65535:
        raise ValueError(f"queue_num {queue_num} (+{workers} workers) must fit in 0..65535")
    mark, mask = int(settings.mark), int(settings.mark_mask)
    if not 0 < mask <= 0xFFFFFFFF or not 0 <= mark <= 0xFFFFFFFF:
        raise ValueError(f"mark/mask 0x{mark:x}/0x{mask:x} must be 32-bit, mask non-zero")
    if mark & mask == 0:
        # `--mark 0/MASK -j RETURN` would wave every unmarked packet past the engine
        raise ValueError(f"mark 0x{mark:x}/0x{mask:x} must have a bit set inside the mask")
    if mark & ~mask:
        raise ValueError(f"mark 0x{mark:x} has bits outside mask 0x{mask:x} (would never match)")
    dev = settings.tunnel_device
    if dev is not None and dev != "" and not _IFNAME.match(dev):
        raise ValueError(f"tunnel_device {dev!r} is not a valid interface name")
    return mark, mask


def plan(settings: HookSettings, spd: _Spd, sad: _Sad,
         worker_of: Callable[[str], int] = lambda sa: 0) -> HookPlan:
    """The rules for a configuration (pure; raises ValueError on settings that would be unsafe)."""
    prefix = str(getattr(settings, "chain_prefix", DEFAULT_PREFIX) or DEFAULT_PREFIX)
    if not re.fullmatch(r"[A-Za-z0-9_]+", prefix) or len(prefix) + 4 > MAX_CHAIN_NAME:
        raise ValueError(f"chain prefix {prefix!r}: letters, digits and _ only, "
                         f"at most {MAX_CHAIN_NAME - 4} characters")
    workers = max(1, int(getattr(settings, "workers", 1) or 1))
    mark, mask = _check_settings(settings, workers)
    queue_num = int(settings.queue_num)
    chains = chain_names(prefix)
    c_in, c_out, c_fwd = chains["INPUT"], chains["OUTPUT"], chains["FORWARD"]
    bypass_opt: tuple[tuple[str, str], ...] = (("queue-bypass", ""),) if settings.fail_open else ()

    def queue(worker: int) -> tuple[str, tuple[tuple[str, str], ...]]:
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} out of range 0..{workers - 1}")
        return "NFQUEUE", (("queue-num", str(queue_num + worker)), *bypass_opt)

    def policy_queue(p: _Policy) -> tuple[str, tuple[tuple[str, str], ...]]:
        return queue(worker_of(p.sa) if p.sa else 0)

    def not_bypass(direction: Direction) -> bool:
        actions = {_value(spd.default_action(direction))}
        configured = getattr(settings, "default_policy", None)
        if isinstance(configured, Mapping):  # belt and braces: either saying "not bypass" queues
            for key in (direction, direction.value):
                if key in configured:
                    actions.add(_value(configured[key]))
        return actions != {"bypass"}

    policies = list(spd.list())
    by_dir: dict[str, list[_Policy]] = {
        d.value: [p for p in policies if _value(p.dir) == d.value] for d in Direction
    }
    mark_value = f"0x{mark:x}" if mask == 0xFFFFFFFF else f"0x{mark:x}/0x{mask:x}"
    mark_rule = MatchSpec("mark", (("mark", mark_value),))
    tunnel = settings.tunnel_device or None

    # Inbound SAs get per-SPI rules to their worker's queue: those an in/fwd policy uses, and
    # any no out policy uses (an unreferenced SA may still receive traffic).
    used_in = {p.sa for d in ("in", "fwd") for p in by_dir[d] if p.sa}
    used_out = {p.sa for p in by_dir["out"] if p.sa}
    inbound_sas = [sa for sa in sad.list() if sa.name in used_in or sa.name not in used_out]

    rules: list[Rule] = []
    for fam in FAMILIES:
        host_len = 32 if fam == 4 else 128
        # IN
        rules.append(Rule(fam, c_in, matches=(mark_rule,), target="RETURN"))
        rules.append(Rule(fam, c_in, in_iface="lo", target="RETURN"))
        if tunnel:
            rules.append(Rule(fam, c_in, in_iface=tunnel, target="RETURN"))
        for proto_name, proto_num in (("esp", 50), ("ah", 51)):
            if workers > 1:
                for sa in inbound_sas:
                    if _value(sa.proto) != proto_name or sa.dst.version != fam:
                        continue
                    target, options = queue(worker_of(sa.name))
                    rules.append(Rule(
                        fam, c_in, dst=f"{sa.dst}/{host_len}", proto=proto_num,
                        matches=(MatchSpec(proto_name, ((f"{proto_name}spi", str(int(sa.spi))),)),
                                 _comment_match(SA_COMMENT_PREFIX + sa.name)),
                        target=target, target_options=options))
            # all IPsec to this host, whatever the SPI: SAD misses are counted by the engine
            rules.append(Rule(fam, c_in, proto=proto_num, target=queue(0)[0], target_options=queue(0)[1]))
        for p in by_dir["in"]:
            if fam in _selector_families(p.selector):
                rules.append(_selector_rule(fam, c_in, p.selector, policy_queue(p), COMMENT_PREFIX + p.name))
        if not_bypass(Direction.IN):
            rules.append(_catch_all(fam, c_in, queue(0), "in"))
        # OUT
        rules.append(Rule(fam, c_out, matches=(mark_rule,), target="RETURN"))
        rules.append(Rule(fam, c_out, out_iface="lo", target="RETURN"))
        for p in by_dir["out"]:
            if fam in _selector_families(p.selector):
                rules.append(_selector_rule(fam, c_out, p.selector, policy_queue(p), COMMENT_PREFIX + p.name))
        if not_bypass(Direction.OUT):
            rules.append(_catch_all(fam, c_out, queue(0), "out"))
        # FWD: checked against fwd policies on arrival and out policies on departure
        rules.append(Rule(fam, c_fwd, matches=(mark_rule,), target="RETURN"))
        if tunnel:
            # decrypted tunnel traffic re-injected by the engine: its fwd and out checks were
            # already made at decryption (one queue pass per packet, not two)
            rules.append(Rule(fam, c_fwd, in_iface=tunnel, target="RETURN"))
        for p in by_dir["fwd"] + by_dir["out"]:
            if fam in _selector_families(p.selector):
                rules.append(_selector_rule(fam, c_fwd, p.selector, policy_queue(p), COMMENT_PREFIX + p.name))
        if not_bypass(Direction.FWD) or not_bypass(Direction.OUT):
            rules.append(_catch_all(fam, c_fwd, queue(0), "fwd"))
        # A no-op, but a conntrack match makes the kernel register conntrack -- and with it IP
        # defragmentation -- for this namespace (nf_ct_netns_get() at rule load). Without it
        # FORWARD (and, for IPv6, even INPUT) sees single fragments, and non-first fragments
        # carry no ports: port selectors would miss them and they would pass unqueued.
        rules.append(Rule(fam, c_fwd, matches=(MatchSpec("conntrack", (("ctstate", "INVALID"),)),),
                          target="RETURN"))
    return HookPlan(
        rules=tuple(rules),
        chains={fam: (c_in, c_out, c_fwd) for fam in FAMILIES},
        jumps=tuple((builtin, chains[builtin]) for builtin, _ in HOOK_CHAINS),
        prefix=prefix,
    )


def _catch_all(fam: int, chain: str, target: tuple[str, tuple[tuple[str, str], ...]], direction: str) -> Rule:
    return Rule(fam, chain, matches=(_comment_match(DEFAULT_COMMENT_PREFIX + direction),),
                target=target[0], target_options=target[1])


# --- python-iptables adapter ----------------------------------------------------------------------
_lock = threading.RLock()


def _xtables_libdir() -> str | None:
    """Where this system's iptables keeps its extensions (libxt_*.so).

    python-iptables otherwise scans `ldconfig -N -v` and takes the first library directory
    that has an `xtables` subdirectory -- which may be a /usr/local one from another iptables
    build whose extensions do not match the system libxtables (Debian 12: libxtables.so.12,
    iptables 1.8.9). Pinning the directory that belongs to the distribution's library avoids it.
    """
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    for d in (f"/usr/lib/{multiarch}/xtables", "/usr/lib64/xtables", "/usr/lib/xtables",
              "/usr/libexec/xtables"):
        if os.path.isfile(os.path.join(d, "libxt_standard.so")):
            return d
    return None


def _iptc() -> Any:
    """Import python-iptables lazily: importing it loads libxtables and may run modprobe."""
    if "iptc" not in sys.modules and "XTABLES_LIBDIR" not in os.environ:
        libdir = _xtables_libdir()
        if libdir:
            os.environ["XTABLES_LIBDIR"] = libdir
    import iptc

    return iptc


@contextmanager
def _filter_table_only(ipt: Any) -> Iterator[None]:
    """Keep python-iptables away from the other tables.

    Creating a target by name makes python-iptables check every table of Table.ALL for a
    chain of that name, opening each one -- which makes the kernel instantiate nat, mangle,
    raw and security in this namespace (and the nat table drags conntrack+NAT hooks in).
    We only use the filter table, so we tell its availability cache the others are absent.
    """
    saved = [(cls, dict(cls.existing_table_names)) for cls in (ipt.Table, ipt.Table6)]
    try:
        for cls, _ in saved:
            for name in cls.ALL:
                cls.existing_table_names[name] = name == "filter"
        yield
    finally:
        for cls, old in saved:
            cls.existing_table_names.clear()
            cls.existing_table_names.update(old)


def _table(ipt: Any, family: int) -> Any:
    cls = ipt.Table if family == 4 else ipt.Table6
    table = cls(cls.FILTER, autocommit=False)  # cached singleton; autocommit off: one commit per call
    table.refresh()  # drops anything uncommitted and re-reads the kernel's current table
    return table


def _new_rule(ipt: Any, family: int) -> Any:
    return ipt.Rule() if family == 4 else ipt.Rule6()


def _to_iptc(ipt: Any, rule: Rule) -> Any:
    r = _new_rule(ipt, rule.family)
    if rule.src is not None:
        r.src = rule.src
    if rule.dst is not None:
        r.dst = rule.dst
    if rule.in_iface is not None:
        r.in_interface = rule.in_iface
    if rule.out_iface is not None:
        r.out_interface = rule.out_iface
    if rule.family == 6:
        _fix_ip6_iface_masks(r, rule.in_iface, rule.out_iface)
    if rule.proto is not None:
        r.protocol = str(rule.proto)  # numeric: independent of /etc/protocols and iptc's name table
    for spec in rule.matches:
        m = r.create_match(spec.name)
        for opt, value in spec.options:
            m.set_parameter(opt, value)
    t = r.create_target(rule.target)
    for opt, value in rule.target_options:
        t.set_parameter(opt, value)
    return r


def _iface_mask(name: str) -> bytes:
    """The interface mask iptables itself builds: 0xff over the name and its NUL (not for `+`)."""
    name = name.removeprefix("!")
    n = len(name) - 1 if name.endswith("+") else len(name) + 1
    return b"\xff" * n + b"\x00" * (16 - n)


def _fix_ip6_iface_masks(r: Any, in_iface: str | None, out_iface: str | None) -> None:
    """python-iptables' Rule6 fills interface masks with 0x01 bytes instead of 0xff, so the
    kernel compares only the lowest bit of each character: `-i lo` then matches almost every
    interface (seen: ESP arriving on a veth returned by our `-i lo -j RETURN`). Fix the masks."""
    if in_iface is not None:
        r.entry.ipv6.iniface_mask = _iface_mask(in_iface)
    if out_iface is not None:
        r.entry.ipv6.outiface_mask = _iface_mask(out_iface)


def _is_ours(name: str, prefix: str) -> bool:
    return name.startswith(prefix + "-")


def _target_name(rule: Any) -> str:
    t = rule.target
    return str(t.name) if t is not None and t.name else ""


def _jumps(table: Any, prefix: str) -> list[tuple[str, int, Any]]:
    """(chain, 0-based index, rule) of every rule of a foreign chain that jumps/goes to ours."""
    found = []
    for chain in table.chains:
        if _is_ours(chain.name, prefix):
            continue
        for i, rule in enumerate(chain.rules):
            if _is_ours(_target_name(rule), prefix):
                found.append((chain.name, i, rule))
    return found


def _our_chains(table: Any, prefix: str) -> list[str]:
    return [c.name for c in table.chains if _is_ours(c.name, prefix)]


def _strip(ipt: Any, table: Any, prefix: str, keep: Iterable[str] = ()) -> bool:
    """In the (uncommitted) handle: drop all jumps to our chains, flush our chains and delete
    those not in `keep`. Returns whether there was anything to change."""
    changed = False
    while True:
        jumps = _jumps(table, prefix)
        if not jumps:
            break
        chain, _, rule = jumps[-1]
        ipt.Chain(table, chain).delete_rule(rule)  # the handle changed: re-read before the next one
        changed = True
    ours = _our_chains(table, prefix)
    keep = set(keep)
    for name in ours:
        table.flush_entries(name)
    for name in ours:
        if name not in keep:
            table.delete_chain(name)
    return changed or bool(ours)


@dataclass
class _Snapshot:
    """Our previous state in one table, as raw rule blobs, to restore after a failed install."""

    chains: dict[str, list[bytes]] = field(default_factory=dict)
    jumps: list[tuple[str, int, bytes]] = field(default_factory=list)


def _snapshot(ipt: Any, table: Any, prefix: str) -> _Snapshot:
    snap = _Snapshot()
    for name in _our_chains(table, prefix):
        snap.chains[name] = [bytes(r.rule) for r in ipt.Chain(table, name).rules]
    snap.jumps = [(chain, i, bytes(rule.rule)) for chain, i, rule in _jumps(table, prefix)]
    return snap


def _blob(data: bytes) -> Any:
    import ctypes

    return (ctypes.c_ubyte * len(data)).from_buffer_copy(data)


def _restore(ipt: Any, family: int, prefix: str, snap: _Snapshot) -> None:
    table = _table(ipt, family)
    _strip(ipt, table, prefix)
    for name in snap.chains:
        table.create_chain(name)
    for name, blobs in snap.chains.items():
        for b in blobs:
            table.append_entry(name, _blob(b))
    for chain, index, b in sorted(snap.jumps, key=lambda j: (j[0], j[1])):
        table.insert_entry(chain, _blob(b), index)
    table.commit()


def _apply(ipt: Any, family: int, hook_plan: HookPlan) -> _Snapshot:
    """Replace our chains and jumps in one table with the plan's, in one commit; returns what
    was there before."""
    table = _table(ipt, family)
    snap = _snapshot(ipt, table, hook_plan.prefix)
    wanted = hook_plan.chains[family]
    # all in one handle, committed at once: the kernel switches from the old rules (or none)
    # to the complete new set atomically -- never a half-filled chain or a duplicate jump
    _strip(ipt, table, hook_plan.prefix, keep=wanted)
    for name in wanted:
        if not table.is_chain(name):
            table.create_chain(name)
    for rule in hook_plan.rules_for(family):
        ipt.Chain(table, rule.chain).append_rule(_to_iptc(ipt, rule))
    for builtin, chain in reversed(hook_plan.jumps):
        jump = _new_rule(ipt, family)
        jump.create_target(chain)
        ipt.Chain(table, builtin).insert_rule(jump, 0)
    table.commit()
    return snap


def _describe(e: BaseException) -> str:
    """python-iptables puts C strings in its messages as b'...': show them as text."""
    return re.sub(r"""b(['"])(.*?)\1""", r"\2", str(e)) or type(e).__name__


def install(hook_plan: HookPlan, attempts: int = 3) -> None:
    """Install (or replace) our chains and jumps in both families; idempotent.

    Stale chains of the same prefix (from a killed engine) are flushed and refilled, jumps
    de-duplicated. Each table is replaced in one commit; if the second one cannot be
    committed, the first is put back as it was, so a failure leaves the previous state.
    A commit also fails when someone else changed the table meanwhile: that is retried.
    """
    for rule in hook_plan.rules:  # never write into a chain remove() would not clean up
        own = hook_plan.chains.get(rule.family, ())
        if rule.chain not in own or not _is_ours(rule.chain, hook_plan.prefix):
            raise HookError(f"rule for chain {rule.chain} (IPv{rule.family}) is not in the plan's own chains")
    ipt = _iptc()
    with _lock, _filter_table_only(ipt):
        done: list[tuple[int, _Snapshot]] = []
        try:
            for family in FAMILIES:
                for attempt in range(attempts):
                    try:
                        done.append((family, _apply(ipt, family, hook_plan)))
                        break
                    except ipt.IPTCError:
                        if attempt == attempts - 1:
                            raise
                        time.sleep(0.01 * (attempt + 1))
        except Exception as e:
            rollback_errors = []
            for family, snap in reversed(done):
                try:
                    _restore(ipt, family, hook_plan.prefix, snap)
                except Exception as re_err:  # report both; there is nothing better to do
                    rollback_errors.append(f"IPv{family}: {_describe(re_err)}")
            for family in FAMILIES:  # discard whatever is pending in the handles
                try:
                    _table(ipt, family)
                except Exception:
                    pass
            msg = f"installing the iptables hooks failed: {_describe(e)}"
            if rollback_errors:
                msg += f"; rolling back also failed ({'; '.join(rollback_errors)})"
            raise HookError(msg) from e


def remove(prefix: str = DEFAULT_PREFIX) -> None:
    """Remove every jump to and every chain named PREFIX-* in both families, nothing else.

    Idempotent; a table without any of ours is not written at all.
    """
    ipt = _iptc()
    errors = []
    with _lock, _filter_table_only(ipt):
        for family in FAMILIES:
            try:
                table = _table(ipt, family)
                if _strip(ipt, table, prefix):
                    table.commit()
            except ipt.IPTCError as e:
                errors.append(f"IPv{family}: {_describe(e)}")
                try:
                    _table(ipt, family)
                except Exception:
                    pass
    if errors:
        raise HookError("removing the iptables hooks failed: " + "; ".join(errors))


# --- status ---------------------------------------------------------------------------------------
def _addr_from_iptc(value: str | None, family: int) -> tuple[str | None, bool]:
    """python-iptables' "[!]addr/netmask" -> ("net/len" or None for any, negated)."""
    if not value:
        return None, False
    negated = value.startswith("!")
    addr, _, mask = value.lstrip("!").partition("/")
    if not mask:
        plen = 32 if family == 4 else 128
    elif mask.isdigit():
        plen = int(mask)
    else:
        plen = bin(int(ipaddress.ip_address(mask))).count("1")
    if plen == 0:
        return None, negated
    net = ipaddress.ip_network(f"{addr}/{plen}", strict=False)
    return f"{net.network_address}/{plen}", negated


def _from_iptc(rule: Any, family: int, chain: str) -> Rule:
    negated = set()
    src, neg = _addr_from_iptc(rule.src, family)
    if neg:
        negated.add("src")
    dst, neg = _addr_from_iptc(rule.dst, family)
    if neg:
        negated.add("dst")
    ifaces = []
    for key, value in (("in", rule.in_interface), ("out", rule.out_interface)):
        if value and value.startswith("!"):
            negated.add(key)
            value = value[1:]
        ifaces.append(value or None)
    ip = rule.get_ip()
    raw_proto = int(ip.proto)
    proto = raw_proto or None
    inv_proto = 0x02 if family == 4 else 0x04  # IPT_INV_PROTO (XT_INV_PROTO) vs IP6T_INV_PROTO
    if proto is not None and ip.invflags & inv_proto:
        negated.add("proto")
    matches = []
    for m in rule.matches:
        opts = []
        for opt, values in m.get_all_parameters().items():
            if values[:1] == ["!"]:
                opt, values = "!" + opt, values[1:]
            opts.append((opt, " ".join(values)))
        matches.append(MatchSpec(str(m.name), tuple(opts)))
    target = _target_name(rule)
    t_opts: list[tuple[str, str]] = []
    if target:  # standard verdicts and jumps have no save function, hence no parameters
        for opt, values in rule.target.get_all_parameters().items():
            t_opts.append((opt, " ".join(values)))
    return Rule(family=family, chain=chain, src=src, dst=dst, in_iface=ifaces[0], out_iface=ifaces[1],
                proto=proto, matches=tuple(matches), target=target, target_options=tuple(t_opts),
                negated=frozenset(negated))


def _rule_entry(rule: Rule, counters: tuple[int, int]) -> dict[str, Any]:
    comment = rule.comment or ""
    entry: dict[str, Any] = {"rule": rule.render(), "packets": int(counters[0]), "bytes": int(counters[1])}
    tags = (("policy", COMMENT_PREFIX), ("sa", SA_COMMENT_PREFIX), ("default", DEFAULT_COMMENT_PREFIX))
    for key, tag in tags:
        if comment.startswith(tag):
            entry[key] = comment[len(tag):]
    return entry


def status(prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """What is installed now: our chains with their rules (iptables-save syntax) and packet/byte
    counters, and where the jumps to them sit (1-based positions, as `iptables -L --line-numbers`)."""
    ipt = _iptc()
    expected = chain_names(prefix)
    out: dict[str, Any] = {"prefix": prefix, "families": {}}
    installed = True
    with _lock, _filter_table_only(ipt):
        for family in FAMILIES:
            fam: dict[str, Any] = {"chains": {}, "jumps": []}
            out["families"][f"ipv{family}"] = fam
            try:
                table = _table(ipt, family)
            except ipt.IPTCError as e:
                fam["error"] = _describe(e)
                installed = False
                continue
            for name in _our_chains(table, prefix):
                fam["chains"][name] = [_rule_entry(_from_iptc(r, family, name), r.get_counters())
                                       for r in ipt.Chain(table, name).rules]
            for chain, index, rule in _jumps(table, prefix):
                pkts, nbytes = rule.get_counters()
                fam["jumps"].append({"chain": chain, "position": index + 1, "target": _target_name(rule),
                                     "rule": _from_iptc(rule, family, chain).render(),
                                     "packets": int(pkts), "bytes": int(nbytes)})
            for builtin, ours in expected.items():
                positions = [j["position"] for j in fam["jumps"]
                             if j["chain"] == builtin and j["target"] == ours]
                if ours not in fam["chains"] or positions != [1]:
                    installed = False
    out["installed"] = installed
    return out


def format_status(st: Mapping[str, Any]) -> str:
    """Human-readable `status()`."""
    state = "installed" if st.get("installed") else "NOT (fully) installed"
    lines = [f"hooks {state} (prefix {st.get('prefix')})"]
    for fam_name, fam in st.get("families", {}).items():
        lines.append(f"{fam_name}:")
        if "error" in fam:
            lines.append(f"  error: {fam['error']}")
            continue
        for j in fam["jumps"]:
            lines.append(f"  {j['chain']} #{j['position']} -> {j['target']}"
                         f"  [{j['packets']} pkts, {j['bytes']} bytes]")
        for chain, rules in fam["chains"].items():
            lines.append(f"  {chain}:")
            for r in rules:
                lines.append(f"    {r['packets']:>10} {r['bytes']:>12}  {r['rule']}")
    return "\n".join(lines)


# --- `python -m nfq_ipsec.hooks`: apply a plan file in the current namespace (tests, debugging) ----
def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nfq_ipsec.hooks", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_install = sub.add_parser("install", help="install a plan (JSON from HookPlan.to_dict)")
    p_install.add_argument("plan_file")
    for name in ("remove", "status"):
        sub.add_parser(name).add_argument("--prefix", default=DEFAULT_PREFIX)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "install":
            with open(args.plan_file, encoding="utf-8") as f:
                hook_plan = HookPlan.from_dict(json.load(f))
            t0 = time.perf_counter()
            install(hook_plan)
            print(json.dumps({"seconds": time.perf_counter() - t0}))
        elif args.cmd == "remove":
            remove(args.prefix)
        else:
            print(json.dumps(status(args.prefix), indent=2))
    except HookError as e:
        print(str(e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
