"""Why does a packet get the verdict it gets? (`nfq-ipsec explain` and `nfq-ipsec trace`)."""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import TYPE_CHECKING, Any

from .errors import Drop
from .flow import NO_PORT, FlowKey

if TYPE_CHECKING:
    from .pipeline import Decision
    from .sad import Sad
    from .spd import Spd

PROTO_NAMES = {"any": None, "icmp": 1, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51, "ipv6-icmp": 58,
               "icmpv6": 58, "sctp": 132}
HOOK_NAMES = {1: "input", 2: "forward", 3: "output"}


def parse_proto(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    s = str(value).strip().lower()
    if s.isdigit():
        return int(s)
    if s not in PROTO_NAMES:
        raise ValueError(f"unknown protocol {value!r} (use a number or one of {', '.join(PROTO_NAMES)})")
    return PROTO_NAMES[s]


def flow_from_request(req: dict[str, Any]) -> FlowKey:
    try:
        src = ipaddress.ip_address(str(req["src"]))
        dst = ipaddress.ip_address(str(req["dst"]))
    except KeyError as e:
        raise ValueError(f"explain needs --{e.args[0]}") from None
    if src.version != dst.version:
        raise ValueError(f"--src {src} and --dst {dst} are of different address families")
    proto = parse_proto(req.get("proto")) or 0

    def num(key: str) -> int:
        v = req.get(key)
        return NO_PORT if v is None else int(v)

    return FlowKey(src.version, int(src), int(dst), proto, num("sport"), num("dport"), num("icmp_type"),
                   num("icmp_code"))


def _sa_detail(sad: Sad | None, name: str | None) -> dict[str, Any] | None:
    """What the SA a protect verdict uses looks like (never its keys); None when unknown."""
    sa = sad.get(name) if sad is not None and name else None
    if sa is None:
        return None
    algorithm = (sa.aead or f"{sa.enc}+{sa.auth}") if sa.proto == "esp" else sa.auth
    return {"proto": sa.proto, "mode": sa.mode, "src": str(sa.src), "dst": str(sa.dst),
            "spi": f"0x{sa.spi:08x}", "algorithm": algorithm, "state": sa.state}


def explain_flow(spd: Spd, req: dict[str, Any], sad: Sad | None = None) -> dict[str, Any]:
    """For each direction asked: the policy that matches, its verdict, and why each earlier one did not.

    With ``sad`` the SA of a protect verdict is described too (``sa_detail``).
    """
    from .spd import Action, Direction

    flow = flow_from_request(req)
    dirs = [Direction(req["dir"])] if req.get("dir") else [Direction.OUT, Direction.IN, Direction.FWD]
    result: dict[str, Any] = {}
    for d in dirs:
        skipped: list[dict[str, Any]] = []
        match = None
        for pol, why in spd.explain(d, flow):
            if why is None:
                match = pol
                break
            skipped.append({"policy": pol.name, "priority": pol.priority, "why": why})
        action = match.action if match is not None else spd.default_action(d)
        verdict = {Action.PROTECT: "protect", Action.BYPASS: "bypass (accept as is)",
                   Action.DISCARD: "discard"}[action]
        result[d.value] = {
            "policy": match.name if match is not None else None,
            "priority": match.priority if match is not None else None,
            "action": action.value,
            "sa": match.sa if match is not None else None,
            "verdict": verdict if match is not None else f"{verdict} (no policy matches: default_policy)",
            "not_matching": skipped,
        }
        detail = _sa_detail(sad, match.sa if match is not None else None)
        if detail is not None:
            result[d.value]["sa_detail"] = detail
    return result


def format_explain(res: dict[str, Any]) -> str:
    lines: list[str] = []
    for d, r in res.items():
        head = f"dir {d}: "
        if r["policy"]:
            head += f"policy {r['policy']} (priority {r['priority']}) -> {r['action']}"
            if r["sa"]:
                head += f" with SA {r['sa']}"
        else:
            head += r["verdict"]
        lines.append(head)
        sd = r.get("sa_detail")
        if sd:
            lines.append(f"    SA {r['sa']}: {sd['proto']} {sd['mode']} {sd['src']} -> {sd['dst']}, "
                         f"spi {sd['spi']}, {sd['algorithm']}, {sd['state']}")
        for s in r["not_matching"]:
            lines.append(f"    skipped {s['policy']} (priority {s['priority']}): {s['why']}")
    return "\n".join(lines)


def _addr(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def trace_event(hook: int, pkt: bytes, d: Decision) -> dict[str, Any]:
    from . import packet

    ev: dict[str, Any] = {
        "time": round(time.time(), 6),
        "hook": HOOK_NAMES.get(hook, str(hook)),
        "len": len(pkt),
        "verdict": "accept" if d.verdict == 1 else ("consumed" if d.actions else "drop"),
        "reason": d.reason,
        "policy": d.policy,
        "sa": d.sa,
    }
    try:
        info = packet.parse(pkt)
        ev.update(src=_addr(info.src), dst=_addr(info.dst), proto=info.proto)
        if info.flow.sport >= 0:
            ev.update(sport=info.flow.sport, dport=info.flow.dport)
        if info.spi >= 0:
            ev["spi"] = f"0x{info.spi:08x}"
            off = info.l4_offset + (4 if info.proto == 50 else 8)
            if len(pkt) >= off + 4:
                ev["seq"] = int.from_bytes(pkt[off : off + 4], "big")
    except Drop:
        ev["malformed"] = True
    return ev


def trace_matches(ev: dict[str, Any], flt: dict[str, Any]) -> bool:
    for key in ("hook", "verdict", "sa", "policy", "spi"):
        want = flt.get(key)
        if want is not None and str(ev.get(key)) != str(want):
            return False
    host = flt.get("host")
    if host is not None and host not in (ev.get("src"), ev.get("dst")):
        return False
    proto = flt.get("proto")
    if proto is not None:
        try:
            if parse_proto(proto) != ev.get("proto"):
                return False
        except ValueError:
            return False
    port = flt.get("port")
    return not (port is not None and int(port) not in (ev.get("sport"), ev.get("dport")))
