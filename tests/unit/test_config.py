"""TOML configuration: the documented example, the shipped rules, every error class, key files.

Error tests check the whole location (file, line, key path) and the reason, and that no key
material leaks into the message.
"""

from __future__ import annotations

import ipaddress
import os
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfq_ipsec.config import (
    AEAD_KEYS,
    AUTH_KEYS,
    ENC_KEYS,
    Config,
    EngineSettings,
    config_to_toml,
    load_config,
    parse_config,
    parse_fragment,
)
from nfq_ipsec.errors import ConfigError
from nfq_ipsec.flow import FlowKey
from nfq_ipsec.packet import ipv4_header, ipv6_header
from nfq_ipsec.sa import Lifetime, SecurityAssociation
from nfq_ipsec.spd import Action, Direction, Policy, Selector

RULES = Path(__file__).resolve().parents[2] / "rules"

EXAMPLE = """\
[engine]
default_policy = "bypass"

[[sa]]
name = "a-to-b"
proto = "esp"
mode = "transport"          # or "tunnel": src/dst are then the tunnel endpoints
src = "192.0.2.1"
dst = "192.0.2.2"
spi = 0x00001001
aead = "aes-gcm-128"        # 16-byte key + 4-byte salt, 16-byte ICV
key = "0x0102030405060708090a0b0c0d0e0f1011121314"
replay_window = 128

[[sa]]
name = "b-to-a"
proto = "esp"
mode = "transport"
src = "192.0.2.2"
dst = "192.0.2.1"
spi = 0x00001002
enc = "aes-cbc-128"
enc_key = "0x2122232425262728292a2b2c2d2e2f30"
auth = "hmac-sha256-128"
auth_key = "0x3132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f50"

[[policy]]
dir = "out"
src = "192.0.2.1/32"
dst = "192.0.2.2/32"
proto = "any"
action = "protect"
sa = "a-to-b"

[[policy]]
dir = "in"
src = "192.0.2.2/32"
dst = "192.0.2.1/32"
action = "protect"
sa = "b-to-a"
"""
GCM_HEX = "0102030405060708090a0b0c0d0e0f1011121314"
CBC_HEX = "2122232425262728292a2b2c2d2e2f30"
HMAC_HEX = "3132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f50"
SECRETS = (GCM_HEX, CBC_HEX, HMAC_HEX)
SRC = "rules/x.toml"


# --- helpers --------------------------------------------------------------------------------------


def udp_packet(src: str, dst: str, payload: bytes = b"p" * 33) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    if s.version == 4:
        return ipv4_header(s.packed, d.packed, 17, len(udp)) + udp
    return ipv6_header(s.packed, d.packed, 17, len(udp)) + udp


def line_of(text: str, needle: str, nth: int = 0) -> int:
    """1-based line number of the nth line containing ``needle``."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if needle in line]
    return hits[nth]


def error_of(text: str, source: str = SRC, **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source, **kw)
    e = info.value
    msg = str(e)
    for secret in SECRETS:
        assert secret not in msg.lower(), f"key material in {msg!r}"
        assert secret[:16] not in msg.lower()
    return e


def expect(text: str, line: int | None, path: str, *reason: str, source: str = SRC, **kw: Any) -> ConfigError:
    e = error_of(text, source, **kw)
    where = f"{source}:{line}: {path}" if line is not None else f"{source}: {path}"
    assert e.where == where, (e.where, where)
    for r in reason:
        assert r in e.reason, (r, e.reason)
    assert str(e) == f"{e.where}: {e.reason}"
    return e


def sub(text: str, old: str, new: str, count: int = 1) -> str:
    assert old in text, old
    return text.replace(old, new, count)


# --- the documented example -----------------------------------------------------------------------


def test_example_is_accepted_exactly_as_written() -> None:
    cfg = parse_config(EXAMPLE, SRC)
    assert isinstance(cfg, Config)
    assert cfg.warnings == []
    assert cfg.engine.default_actions() == {d: Action.BYPASS for d in Direction}
    a, b = cfg.sas
    assert (a.name, a.proto, a.mode, str(a.src), str(a.dst), a.spi, a.aead) == (
        "a-to-b",
        "esp",
        "transport",
        "192.0.2.1",
        "192.0.2.2",
        0x1001,
        "aes-gcm-128",
    )
    assert a.replay.size == 128 and a.icv_len == 16 and not a.esn
    assert (b.name, b.spi, b.enc, b.auth, b.replay.size) == (
        "b-to-a",
        0x1002,
        "aes-cbc-128",
        "hmac-sha256-128",
        32,
    )
    out, inb = cfg.policies
    assert (out.name, out.dir, out.action, out.sa, out.priority) == (
        "out-a-to-b",
        Direction.OUT,
        Action.PROTECT,
        "a-to-b",
        0,
    )
    assert out.selector == Selector(
        src=ipaddress.ip_network("192.0.2.1/32"), dst=ipaddress.ip_network("192.0.2.2/32")
    )
    assert (inb.name, inb.dir, inb.sa) == ("in-b-to-a", Direction.IN, "b-to-a")
    assert inb.selector.matches(
        FlowKey(4, int(ipaddress.ip_address("192.0.2.2")), int(ipaddress.ip_address("192.0.2.1")), 6, 1, 2)
    )


def test_example_keys_are_decoded_byte_for_byte() -> None:
    """A packet protected by the configured SA opens with an SA built from the raw key bytes."""
    cfg = parse_config(EXAMPLE, SRC)
    common: dict[str, Any] = {"proto": "esp", "mode": "transport"}
    ref_a = SecurityAssociation(
        name="ref-a",
        src="192.0.2.1",
        dst="192.0.2.2",
        spi=0x1001,
        aead="aes-gcm-128",
        key=bytes.fromhex(GCM_HEX),
        replay_window=128,
        **common,
    )
    ref_b = SecurityAssociation(
        name="ref-b",
        src="192.0.2.2",
        dst="192.0.2.1",
        spi=0x1002,
        enc="aes-cbc-128",
        enc_key=bytes.fromhex(CBC_HEX),
        auth="hmac-sha256-128",
        auth_key=bytes.fromhex(HMAC_HEX),
        **common,
    )
    for cfg_sa, ref, (s, d) in (
        (cfg.sas[0], ref_a, ("192.0.2.1", "192.0.2.2")),
        (cfg.sas[1], ref_b, ("192.0.2.2", "192.0.2.1")),
    ):
        pkt = udp_packet(s, d)
        assert ref.unprotect(cfg_sa.protect(pkt)) == pkt
        assert cfg_sa.unprotect(ref.protect(pkt)) == pkt


def test_load_config_names_the_file_and_uses_its_stem(tmp_path: Path) -> None:
    f = tmp_path / "office.toml"
    f.write_text(EXAMPLE)
    f.chmod(0o600)
    cfg = load_config(f)
    assert cfg.source == str(f)
    assert cfg.engine.control_socket == "/run/nfq-ipsec/office.sock"
    assert cfg.warnings == []
    f.chmod(0o644)
    w = load_config(f).warnings
    assert len(w) == 1 and "0644" in w[0] and "inline keys" in w[0] and str(f) in w[0]
    f.write_text(sub(EXAMPLE, "replay_window = 128", "replay_windw = 128"))
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert info.value.where == f"{f}:{line_of(EXAMPLE, 'replay_window')}: sa[0] (a-to-b).replay_windw"
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


# --- the shipped rules ----------------------------------------------------------------------------

RULE_FILES = sorted(RULES.glob("*.toml"))
PAIRS = [
    ("host-to-host-transport", "host-to-host-transport-b"),
    ("host-to-host-tunnel", "host-to-host-tunnel-b"),
    ("site-to-site-gw-a", "site-to-site-gw-b"),
]


def test_rules_directory_has_the_documented_files() -> None:
    names = {p.stem for p in RULE_FILES}
    assert {n for pair in PAIRS for n in pair} <= names


DOC_NETS = [
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
]


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_every_rules_file_parses_cleanly(path: Path) -> None:
    cfg = parse_config(path.read_text(), str(path))  # parse_config: no file-mode warning for the repo copy
    assert cfg.sas and cfg.policies
    assert cfg.warnings == []
    text = path.read_text()
    assert "EXAMPLE KEYS" in text  # the keys say they must be replaced
    for addr in re.findall(r'"([0-9a-f:.]+(?:/\d+)?)"', text):
        if any(c.isdigit() for c in addr) and ("." in addr or ":" in addr):
            net = ipaddress.ip_network(addr)
            assert any(net.subnet_of(doc) for doc in DOC_NETS if doc.version == net.version), addr  # type: ignore[arg-type]
    keys = re.findall(r'key = "0x([0-9a-f]+)"', text)
    assert len(keys) == len(set(keys)) == len(cfg.sas)  # no key shared by two SAs


@pytest.mark.parametrize(("a_name", "b_name"), PAIRS)
def test_rules_pairs_mirror_each_other(a_name: str, b_name: str) -> None:
    """Each side's outbound SA opens on the other side, and each protect policy has its counterpart."""
    a = load_config(RULES / f"{a_name}.toml")
    b = load_config(RULES / f"{b_name}.toml")
    sas_a, sas_b = {s.name: s for s in a.sas}, {s.name: s for s in b.sas}
    assert sas_a.keys() == sas_b.keys()
    for name, sa_a in sas_a.items():
        sa_b = sas_b[name]
        assert (sa_a.spi, sa_a.src, sa_a.dst, sa_a.mode) == (sa_b.spi, sa_b.src, sa_b.dst, sa_b.mode)
        pkt = udp_packet(str(sa_a.src), str(sa_a.dst))
        assert sa_b.unprotect(sa_a.protect(pkt)) == pkt
    for mine, theirs in ((a, b), (b, a)):
        for p in mine.policies:
            if p.dir is not Direction.OUT or p.action is not Action.PROTECT:
                continue
            peer = [
                q
                for q in theirs.policies
                if q.dir is not Direction.OUT and q.sa == p.sa and q.selector == p.selector
            ]
            assert peer, f"{p.name}: no in/fwd counterpart for SA {p.sa} in the mirror file"


def test_site_to_site_topology_is_exactly_as_documented() -> None:
    gwa = load_config(RULES / "site-to-site-gw-a.toml")
    ends = {s.name: (str(s.src), str(s.dst), s.mode) for s in gwa.sas}
    assert ends == {
        "gwa-to-gwb": ("203.0.113.1", "198.51.100.1", "tunnel"),
        "gwb-to-gwa": ("198.51.100.1", "203.0.113.1", "tunnel"),
        "gwa-to-gwb-v6": ("2001:db8:ff01::1", "2001:db8:ff02::1", "tunnel"),
        "gwb-to-gwa-v6": ("2001:db8:ff02::1", "2001:db8:ff01::1", "tunnel"),
    }
    spd_order = {p.name: p for p in gwa.policies}
    flow_telnet = FlowKey(
        4, int(ipaddress.ip_address("192.0.2.10")), int(ipaddress.ip_address("192.0.2.130")), 6, 40000, 23
    )
    flow_udp = flow_telnet._replace(proto=17, dport=9999)
    flow_web = flow_telnet._replace(dport=443)
    from nfq_ipsec.spd import Spd

    spd = Spd(gwa.engine.default_actions())
    for p in gwa.policies:
        spd.add(p)
    assert spd.lookup(Direction.OUT, flow_telnet) is spd_order["out-discard-telnet"]
    assert spd.lookup(Direction.OUT, flow_udp) is spd_order["out-bypass-udp9999"]
    assert spd.lookup(Direction.OUT, flow_web) is spd_order["out-protect"]
    back = FlowKey(4, flow_web.dst, flow_web.src, 6, 443, 40000)
    assert spd.lookup(Direction.FWD, back) is spd_order["fwd-protect"]
    to_gw = back._replace(dst=int(ipaddress.ip_address("192.0.2.1")))
    assert spd.lookup(Direction.IN, to_gw) is spd_order["in-protect"]
    v6 = FlowKey(
        6,
        int(ipaddress.ip_address("2001:db8:a::10")),
        int(ipaddress.ip_address("2001:db8:b::10")),
        6,
        40000,
        23,
    )
    assert spd.lookup(Direction.OUT, v6) is spd_order["out-discard-telnet-v6"]


# --- error classes --------------------------------------------------------------------------------


def test_malformed_toml_names_file_and_line() -> None:
    text = sub(EXAMPLE, 'key = "0x0102', "key = 0x0102")  # an unquoted "number" with hex letters and more
    e = error_of(text)
    assert e.where == f"{SRC}:{line_of(EXAMPLE, 'key = ')}"
    assert e.reason.startswith("invalid TOML: ")
    unterminated = sub(EXAMPLE, f'"0x{CBC_HEX}"', f'"0x{CBC_HEX}')
    e = error_of(unterminated)
    assert e.where == f"{SRC}:{line_of(EXAMPLE, 'enc_key')}"
    twice = EXAMPLE + "\n[engine]\n"
    e = error_of(twice)
    assert e.where == f"{SRC}:{len(EXAMPLE.splitlines()) + 2}"


def test_unknown_keys_are_named_with_a_suggestion() -> None:
    expect(
        sub(EXAMPLE, "replay_window", "replay_windw"),
        line_of(EXAMPLE, "replay_window"),
        "sa[0] (a-to-b).replay_windw",
        "unknown key 'replay_windw'",
        "did you mean 'replay_window'?",
    )
    expect(
        sub(EXAMPLE, "default_policy", "default_polcy"),
        2,
        "engine.default_polcy",
        "did you mean 'default_policy'?",
    )
    expect(
        sub(EXAMPLE, 'action = "protect"\nsa = "b-to-a"', 'action = "protect"\nsa = "b-to-a"\nprotocol = 6'),
        len(EXAMPLE.splitlines()) + 1,
        "policy[1].protocol",
        "unknown key 'protocol'",
        "did you mean 'proto'?",
    )
    expect('[[polcy]]\ndir = "in"\n' + EXAMPLE, 1, "polcy", "unknown top-level key", "did you mean 'policy'?")
    text = EXAMPLE.replace("replay_window = 128\n", "replay_window = 128\n\n[sa.lifetime]\nsoft_byte = 5\n")
    expect(
        text, line_of(text, "soft_byte"), "sa[0] (a-to-b).lifetime.soft_byte", "did you mean 'soft_bytes'?"
    )


def test_unknown_algorithm_lists_the_valid_ones() -> None:
    e = expect(
        sub(EXAMPLE, '"aes-cbc-128"', '"aes-cbc-129"'),
        line_of(EXAMPLE, "enc = "),
        "sa[1] (b-to-a).enc",
        "unknown value 'aes-cbc-129'",
    )
    assert all(n in e.reason for n in ENC_KEYS)
    e = expect(
        sub(EXAMPLE, '"aes-gcm-128"', '"aes-ccm-128"'),
        line_of(EXAMPLE, "aead = "),
        "sa[0] (a-to-b).aead",
        "aes-ccm-128",
    )
    assert all(n in e.reason for n in AEAD_KEYS)
    e = expect(
        sub(EXAMPLE, '"hmac-sha256-128"', '"hmac-md5-96"'), line_of(EXAMPLE, "auth = "), "sa[1] (b-to-a).auth"
    )
    assert all(n in e.reason for n in AUTH_KEYS)


def test_wrong_key_lengths_say_what_is_needed() -> None:
    expect(
        sub(EXAMPLE, GCM_HEX, GCM_HEX[:-2]),
        line_of(EXAMPLE, "key = "),
        "sa[0] (a-to-b).key",
        "key has 19 bytes, aes-gcm-128 needs 20 (16-byte key + 4-byte salt)",
    )
    expect(
        sub(EXAMPLE, CBC_HEX, CBC_HEX[:-2]),
        line_of(EXAMPLE, "enc_key"),
        "sa[1] (b-to-a).enc_key",
        "enc_key has 15 bytes, aes-cbc-128 needs 16",
    )
    expect(
        sub(EXAMPLE, HMAC_HEX, HMAC_HEX + "00"),
        line_of(EXAMPLE, "auth_key"),
        "sa[1] (b-to-a).auth_key",
        "auth_key has 33 bytes, hmac-sha256-128 needs 32",
    )
    expect(
        sub(EXAMPLE, f'key = "0x{GCM_HEX}"\n', ""),
        line_of(EXAMPLE, "[[sa]]"),
        "sa[0] (a-to-b).key",
        "missing",
        "20 (16-byte key + 4-byte salt)",
    )


def test_bad_hex_is_reported_without_the_key() -> None:
    expect(
        sub(EXAMPLE, CBC_HEX, CBC_HEX[:-1]),
        line_of(EXAMPLE, "enc_key"),
        "sa[1] (b-to-a).enc_key",
        "odd number of hex digits (31)",
    )
    expect(
        sub(EXAMPLE, CBC_HEX, CBC_HEX[:5] + "g" + CBC_HEX[6:]),
        line_of(EXAMPLE, "enc_key"),
        "sa[1] (b-to-a).enc_key",
        "not hexadecimal",
        "hex digit 6 of 32",
    )
    expect(
        sub(EXAMPLE, f'"0x{GCM_HEX}"', "0x0102"),
        line_of(EXAMPLE, "key = "),
        "sa[0] (a-to-b).key",
        "expected a hex string, got an integer",
    )


@pytest.mark.parametrize("alg", sorted(AEAD_KEYS))
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_key_errors_never_echo_the_key(alg: str, data: st.DataObject) -> None:
    need = sum(AEAD_KEYS[alg])
    n = data.draw(st.integers(8, 80).filter(lambda k: k != need))
    key = data.draw(st.binary(min_size=n, max_size=n)).hex()
    mutate = data.draw(st.sampled_from(["length", "odd", "nonhex"]))
    if mutate == "odd":
        key = key[:-1]
    elif mutate == "nonhex":
        pos = data.draw(st.integers(0, len(key) - 1))
        key = key[:pos] + "z" + key[pos + 1 :]
    text = sub(
        EXAMPLE,
        f'aead = "aes-gcm-128"        # 16-byte key + 4-byte salt, 16-byte ICV\nkey = "0x{GCM_HEX}"',
        f'aead = "{alg}"\nkey = "0x{key}"',
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    msg = str(info.value).lower()
    assert info.value.where == f"{SRC}:{line_of(text, 'key = ')}: sa[0] (a-to-b).key"
    for i in range(0, len(key) - 8):
        assert key[i : i + 8] not in msg


def test_duplicate_sa_name() -> None:
    text = sub(EXAMPLE, 'name = "b-to-a"', 'name = "a-to-b"')
    expect(
        text,
        line_of(text, 'name = "a-to-b"', 1),
        "sa[1] (a-to-b).name",
        "duplicate SA name 'a-to-b'",
        "sa[0] (a-to-b)",
    )


def test_duplicate_spi_for_the_same_destination_and_protocol() -> None:
    text = sub(EXAMPLE, "spi = 0x00001002", "spi = 0x00001001")
    text = sub(text, 'dst = "192.0.2.1"\nspi', 'dst = "192.0.2.2"\nspi')
    text = sub(text, 'src = "192.0.2.2"\ndst', 'src = "192.0.2.1"\ndst')
    expect(
        text,
        line_of(text, "spi = ", 1),
        "sa[1] (b-to-a).spi",
        "duplicate SPI 0x00001001 for esp to 192.0.2.2",
        "sa[0] (a-to-b)",
    )
    # same SPI towards another destination is fine (the SAD keys on SPI + destination + protocol)
    ok = sub(EXAMPLE, "spi = 0x00001002", "spi = 0x00001001")
    assert [s.spi for s in parse_config(ok, SRC).sas] == [0x1001, 0x1001]


def test_policy_naming_a_missing_sa() -> None:
    expect(
        sub(EXAMPLE, 'sa = "b-to-a"', 'sa = "b-to-c"'),
        line_of(EXAMPLE, 'sa = "b-to-a"'),
        "policy[1].sa",
        "no SA named 'b-to-c'",
        "did you mean 'b-to-a'?",
    )


def test_protect_policy_family_must_fit_a_transport_sa() -> None:
    text = sub(
        EXAMPLE,
        'src = "192.0.2.2/32"\ndst = "192.0.2.1/32"',
        'src = "2001:db8::2/128"\ndst = "2001:db8::1/128"',
    )
    expect(
        text,
        line_of(text, "2001:db8::2/128"),
        "policy[1].src",
        "selects IPv6 traffic",
        "transport SA b-to-a is IPv4",
    )
    # the same selector with a tunnel SA is fine (6-in-4)
    tunnel = text.replace('mode = "transport"\nsrc = "192.0.2.2"', 'mode = "tunnel"\nsrc = "192.0.2.2"')
    assert parse_config(tunnel, SRC).policies[1].selector.family == 6
    # a selector without addresses covers both families: a warning, not an error
    anyfam = sub(EXAMPLE, 'src = "192.0.2.2/32"\ndst = "192.0.2.1/32"\n', "")
    (w,) = parse_config(anyfam, SRC).warnings
    assert (
        w.startswith(f"{SRC}:{line_of(anyfam, '[[policy]]', 1)}: policy[1]") and "IPv6 traffic matches" in w
    )


def test_addresses_of_the_wrong_family() -> None:
    text = sub(EXAMPLE, 'dst = "192.0.2.2"\nspi', 'dst = "2001:db8::2"\nspi')
    expect(
        text,
        line_of(text, '"2001:db8::2"'),
        "sa[0] (a-to-b).dst",
        "2001:db8::2 is IPv6 but src 192.0.2.1 is IPv4",
    )
    text = sub(EXAMPLE, 'dst = "192.0.2.2/32"', 'dst = "2001:db8::/32"')
    expect(
        text,
        line_of(text, '"2001:db8::/32"'),
        "policy[0].dst",
        "2001:db8::/32 is IPv6 but src 192.0.2.1/32 is IPv4",
    )
    expect(
        sub(EXAMPLE, 'src = "192.0.2.1"', 'src = "192.0.2.1/32"'),
        line_of(EXAMPLE, 'src = "192.0.2.1"'),
        "sa[0] (a-to-b).src",
        "not an IP address",
        "single address",
    )


def test_prefix_with_host_bits_set() -> None:
    text = sub(EXAMPLE, 'dst = "192.0.2.2/32"', 'dst = "192.0.2.2/24"')
    expect(
        text,
        line_of(text, "192.0.2.2/24"),
        "policy[0].dst",
        "192.0.2.2/24 has host bits set",
        "did you mean 192.0.2.0/24?",
    )
    expect(
        sub(EXAMPLE, 'dst = "192.0.2.2/32"', 'dst = "192.0.2.300/32"'),
        line_of(EXAMPLE, "192.0.2.2/32"),
        "policy[0].dst",
        "is not an address or prefix",
    )


def test_shadowed_policy_is_a_warning() -> None:
    text = (
        EXAMPLE
        + """
[[policy]]
name = "all-out"
dir = "out"
action = "discard"

[[policy]]
name = "web-out"
dir = "out"
dst = "192.0.2.0/24"
proto = "tcp"
dport = 443
action = "bypass"
"""
    )
    cfg = parse_config(text, SRC)
    assert len(cfg.policies) == 4
    (w,) = cfg.warnings
    header = line_of(text, 'name = "web-out"') - 1
    assert w == (
        f"{SRC}:{header}: policy[3] (web-out): policy web-out can never "
        "match: earlier policy all-out (priority 0) covers all of its traffic"
    )
    # a lower priority value puts it first again: no warning
    assert parse_config(text + "priority = 0\n", SRC).warnings  # same priority: still after all-out
    fixed = text.replace('name = "all-out"\ndir = "out"', 'name = "all-out"\ndir = "out"\npriority = 5')
    assert parse_config(fixed, SRC).warnings == []


def test_unused_sa_is_a_warning() -> None:
    text = EXAMPLE[: EXAMPLE.index('[[policy]]\ndir = "in"')]
    (w,) = parse_config(text, SRC).warnings
    assert w == f"{SRC}:{line_of(text, '[[sa]]', 1)}: sa[1] (b-to-a): SA b-to-a is not used by any policy"


# --- key files ------------------------------------------------------------------------------------


def with_key_file(tmp_path: Path, mode: int, content: str = f"0x{GCM_HEX}\n") -> tuple[str, Path]:
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    kf = keys / "a-to-b.hex"
    kf.write_text(content)
    kf.chmod(mode)
    text = sub(EXAMPLE, f'key = "0x{GCM_HEX}"', 'key_file = "keys/a-to-b.hex"')
    return text, kf


def test_key_file_relative_to_the_config_and_private(tmp_path: Path) -> None:
    content = f"# test key, replace me\n0x{GCM_HEX[:20]}\n  {GCM_HEX[20:]}\n"
    text, _ = with_key_file(tmp_path, 0o600, content)
    conf = tmp_path / "c.toml"
    conf.write_text(text)
    conf.chmod(0o600)
    cfg = load_config(conf)
    assert cfg.warnings == []
    ref = SecurityAssociation(
        name="ref",
        proto="esp",
        mode="transport",
        src="192.0.2.1",
        dst="192.0.2.2",
        spi=0x1001,
        aead="aes-gcm-128",
        key=bytes.fromhex(GCM_HEX),
    )
    pkt = udp_packet("192.0.2.1", "192.0.2.2")
    assert ref.unprotect(cfg.sas[0].protect(pkt)) == pkt
    # parse_config resolves against base_dir
    assert parse_config(text, "<string>", base_dir=tmp_path).sas[0].aead == "aes-gcm-128"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o666])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    text, kf = with_key_file(tmp_path, mode)
    e = expect(
        text,
        line_of(text, "key_file"),
        "sa[0] (a-to-b).key_file",
        f"key file {kf} has mode {mode:04o}",
        "chmod 600",
        source=str(tmp_path / "c.toml"),
    )
    assert GCM_HEX not in str(e)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_key_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    text, kf = with_key_file(tmp_path, 0o600)
    os.chown(kf, 12345, -1)
    expect(
        text,
        line_of(text, "key_file"),
        "sa[0] (a-to-b).key_file",
        f"key file {kf} is owned by uid 12345",
        source=str(tmp_path / "c.toml"),
    )


def test_key_file_problems(tmp_path: Path) -> None:
    src = str(tmp_path / "c.toml")
    text, kf = with_key_file(tmp_path, 0o600, f"{GCM_HEX}00\n")
    expect(
        text,
        line_of(text, "key_file"),
        "sa[0] (a-to-b).key_file",
        "key has 21 bytes, aes-gcm-128 needs 20",
        source=src,
    )
    kf.write_text("# nothing\n")
    expect(text, line_of(text, "key_file"), "sa[0] (a-to-b).key_file", "contains no hex digits", source=src)
    kf.unlink()
    expect(text, line_of(text, "key_file"), "sa[0] (a-to-b).key_file", "cannot open key file", source=src)
    both = sub(EXAMPLE, f'key = "0x{GCM_HEX}"', f'key = "0x{GCM_HEX}"\nkey_file = "k"')
    expect(both, line_of(both, "key_file"), "sa[0] (a-to-b).key_file", "either key or key_file")
    (tmp_path / "keys" / "dir.hex").mkdir()
    text2 = text.replace("a-to-b.hex", "dir.hex")
    os.chmod(tmp_path / "keys" / "dir.hex", 0o700)
    expect(text2, line_of(text2, "key_file"), "sa[0] (a-to-b).key_file", "not a regular file", source=src)


# --- engine settings ------------------------------------------------------------------------------


def test_engine_defaults_and_values() -> None:
    cfg = parse_config(EXAMPLE.replace("[engine]\n", "", 1).replace('default_policy = "bypass"\n', "", 1))
    assert cfg.engine == EngineSettings()
    assert cfg.engine.control_socket == "/run/nfq-ipsec/nfq-ipsec.sock"
    assert (cfg.engine.mark, cfg.engine.mark_mask, cfg.engine.tunnel_device) == (
        0x4E510000,
        0xFFFF0000,
        "nfqipsec0",
    )
    text = sub(
        EXAMPLE,
        'default_policy = "bypass"',
        """fail_open = true
queue_num = 7
workers = 2
control_socket = "/run/nfq-ipsec/x.sock"
chain_prefix = "IPSECX"
mark = 0x00770000
mark_mask = 0x00ff0000
tunnel_device = "ipsectun1"
icmp_rate = 2.5
icmp_burst = 3
log_level = "debug"
audit_rate = 1
audit_burst = 4

[engine.default_policy]
in = "discard"
fwd = "discard"
""",
    )
    e = parse_config(text, SRC).engine
    assert e.default_actions() == {
        Direction.IN: Action.DISCARD,
        Direction.OUT: Action.BYPASS,
        Direction.FWD: Action.DISCARD,
    }
    assert (e.fail_open, e.queue_num, e.workers, e.chain_prefix, e.mark, e.mark_mask) == (
        True,
        7,
        2,
        "IPSECX",
        0x770000,
        0xFF0000,
    )
    assert (e.tunnel_device, e.icmp_rate, e.icmp_burst, e.log_level, e.audit_rate, e.audit_burst) == (
        "ipsectun1",
        2.5,
        3,
        "debug",
        1.0,
        4,
    )
    hash(e)  # frozen and hashable despite the mapping
    assert parse_config(sub(EXAMPLE, '"bypass"', '"discard"'), SRC).engine.default_actions() == {
        d: Action.DISCARD for d in Direction
    }


@pytest.mark.parametrize(
    ("setting", "path", "reason"),
    [
        ('default_policy = "protect"', "engine.default_policy", "cannot be protect"),
        ('default_policy = "allow"', "engine.default_policy", "unknown value 'allow'"),
        ('default_policy = { in = "protect" }', "engine.default_policy.in", "cannot be protect"),
        ('default_policy = { inn = "discard" }', "engine.default_policy.inn", "did you mean 'in'?"),
        ("queue_num = 70000", "engine.queue_num", "out of range 0..65535"),
        ("queue_num = 65535\nworkers = 2", "engine.workers", "exceed 65535"),
        ("fail_open = 1", "engine.fail_open", "expected true or false"),
        ("mark = 0x1234", "engine.mark", "outside mark_mask"),
        ('control_socket = "x.sock"', "engine.control_socket", "absolute path"),
        (f'control_socket = "/{"x" * 120}"', "engine.control_socket", "107 bytes"),
        ('tunnel_device = "a/b"', "engine.tunnel_device", "not a valid interface name"),
        ('tunnel_device = "sixteen-chars-xx"', "engine.tunnel_device", "not a valid interface name"),
        ('chain_prefix = "A B"', "engine.chain_prefix", "iptables chain names"),
        ('log_level = "verbose"', "engine.log_level", "unknown value 'verbose'"),
        ("icmp_rate = -1", "engine.icmp_rate", "out of range"),
        ('workers = "2"', "engine.workers", "expected an integer, got a string"),
    ],
)
def test_engine_errors(setting: str, path: str, reason: str) -> None:
    text = sub(EXAMPLE, 'default_policy = "bypass"', setting)
    expect(text, 2 if "\n" not in setting else 3, path, reason)


# --- SA features ----------------------------------------------------------------------------------

SA_TEMPLATE = """
[[sa]]
name = "x"
proto = "esp"
mode = "tunnel"
src = "198.51.100.1"
dst = "203.0.113.1"
spi = 0x4000
"""


def one_sa(extra: str, template: str = SA_TEMPLATE) -> Config:
    return parse_config(template + extra + '\n[[policy]]\ndir = "out"\naction = "protect"\nsa = "x"\n', SRC)


def test_sa_features() -> None:
    sa = one_sa(
        f'aead = "aes-gcm-128"\nkey = "{GCM_HEX}"\nicv_len = 8\nesn = true\nreplay_window = 4096\n'
        f"seq_start = 0x1fffffff0\ntfc_pad = 200\n[sa.lifetime]\nsoft_packets = 10\nhard_packets = 20\n"
        "hard_seconds = 3600\n"
    ).sas[0]
    assert (sa.icv_len, sa.esn, sa.replay.size, sa.seq, sa.tfc_pad) == (8, True, 4096, 0x1FFFFFFF0, 200)
    assert sa.lifetime == Lifetime(soft_packets=10, hard_packets=20, hard_seconds=3600)
    ah = one_sa(
        f'auth = "hmac-sha256-128"\nauth_key = "{HMAC_HEX}"\nicv_len = 12\n',
        SA_TEMPLATE.replace('"esp"', '"ah"'),
    ).sas[0]
    assert (ah.proto, ah.auth, ah.icv_len) == ("ah", "hmac-sha256-128", 12)
    null = one_sa(f'enc = "null"\nauth = "hmac-sha1-96"\nauth_key = "{HMAC_HEX[:40]}"\n').sas[0]
    assert (null.enc, null.icv_len) == ("null", 12)
    assert (
        one_sa('aead = "chacha20-poly1305"\nkey = "' + "ab" * 36 + '"\n').sas[0].aead == "chacha20-poly1305"
    )
    spi_str = one_sa(
        f'aead = "aes-gmac-256"\nkey = "{"cd" * 36}"\n', SA_TEMPLATE.replace("0x4000", '"0x4000"')
    )
    assert spi_str.sas[0].spi == 0x4000


@pytest.mark.parametrize(
    ("extra", "path", "reason"),
    [
        (f'aead = "chacha20-poly1305"\nkey = "{"ab" * 36}"\nicv_len = 8', "icv_len", "valid: 16"),
        (f'aead = "aes-gcm-128"\nkey = "{GCM_HEX}"\nesn = true\nreplay_window = 0', "replay_window", "esn"),
        (f'aead = "aes-gcm-128"\nkey = "{GCM_HEX}"\nreplay_window = 70000', "replay_window", "out of range"),
        (f'aead = "aes-gcm-128"\nkey = "{GCM_HEX}"\nseq_start = 0x100000000', "seq_start", "out of range"),
        (f'aead = "aes-gcm-128"\nkey = "{GCM_HEX}"\nenc = "aes-cbc-128"', "enc", "not used with aead"),
        (f'enc = "aes-cbc-128"\nenc_key = "{CBC_HEX}"', "auth", "without integrity"),
        (f'auth = "hmac-sha256-128"\nauth_key = "{HMAC_HEX}"', "enc", "'null' for integrity only"),
        (
            f'enc = "null"\nenc_key = "{CBC_HEX}"\nauth = "hmac-sha1-96"\nauth_key = "{HMAC_HEX[:40]}"',
            "enc_key",
            "null takes no key",
        ),
        ("", "aead", "missing: ESP needs aead"),
        (
            f'aead = "aes-gcm-128"\nkey = "{GCM_HEX}"\n[sa.lifetime]\nsoft_bytes = 10\nhard_bytes = 5',
            "lifetime.soft_bytes",
            "larger than hard_bytes",
        ),
        (f'aead = "aes-gcm-128"\nkey = "{GCM_HEX}"\nlifetime = 5', "lifetime", "expected a table"),
    ],
)
def test_sa_errors(extra: str, path: str, reason: str) -> None:
    text = SA_TEMPLATE + extra + "\n"
    last = path.split(".")[-1]
    line = line_of(text, f"{last} =") if f"{last} =" in text else line_of(text, "[[sa]]")
    expect(text, line, f"sa[0] (x).{path}", reason)


@pytest.mark.parametrize(
    ("old", "new", "path", "reason"),
    [
        ("spi = 0x4000", "spi = 255", "spi", "reserved"),
        ("spi = 0x4000", "spi = 0", "spi", "invalid"),
        ("spi = 0x4000", "spi = 0x100000000", "spi", "out of range"),
        ('mode = "tunnel"', 'mode = "beet"', "mode", "unknown value 'beet'"),
        ('proto = "esp"', 'proto = "ipcomp"', "proto", "unknown value"),
        ('name = "x"', 'name = "x y"', "name", "letters, digits"),
        (
            'src = "198.51.100.1"',
            'src = "0.0.0.0"',
            "src",
            "unspecified",
        ),  # caught by SecurityAssociation itself
    ],
)
def test_sa_field_errors(old: str, new: str, path: str, reason: str) -> None:
    text = sub(SA_TEMPLATE, old, new) + f'aead = "aes-gcm-128"\nkey = "{GCM_HEX}"\n'
    label = "sa[0] (x y)" if "x y" in new else "sa[0] (x)"
    expect(text, line_of(text, new), f"{label}.{path}", reason)


def test_ah_refuses_encryption_and_tfc_needs_tunnel() -> None:
    text = SA_TEMPLATE.replace('"esp"', '"ah"') + f'aead = "aes-gcm-128"\nkey = "{GCM_HEX}"\n'
    expect(text, line_of(text, "aead"), "sa[0] (x).aead", "AH only authenticates")
    text = (
        SA_TEMPLATE.replace('"tunnel"', '"transport"')
        + f'aead = "aes-gcm-128"\nkey = "{GCM_HEX}"\ntfc_pad = 5\n'
    )
    expect(text, line_of(text, "tfc_pad"), "sa[0] (x).tfc_pad", "tunnel mode")


# --- policies -------------------------------------------------------------------------------------


def policies_of(*tables: str) -> list[Policy]:
    text = EXAMPLE + "".join(f"\n[[policy]]\n{t}\n" for t in tables)
    return parse_config(text, SRC).policies[2:]


def test_policy_selector_forms() -> None:
    p = policies_of(
        'dir = "out"\nproto = "tcp"\nsport = 1000\ndport = "1000-2000"\naction = "bypass"\npriority = 7',
        'dir = "fwd"\nproto = "udp"\ndport = [53, 54]\naction = "discard"\nname = "dns"',
        'dir = "in"\nproto = "icmp"\nicmp_type = 8\nicmp_code = 0\nsrc = "198.51.100.0/24"\n'
        'action = "bypass"',
        'dir = "in"\nproto = "ipv6-icmp"\nicmp_type = 135\naction = "bypass"',
        'dir = "in"\nproto = "icmpv6"\nicmp_type = 136\ndst = "2001:db8::/32"\naction = "bypass"',
        'dir = "out"\nproto = 47\ndst = "203.0.113.7"\naction = "bypass"',
        'dir = "out"\nproto = "SCTP"\nsport = "9"\naction = "bypass"',
        'dir = "out"\nproto = "132"\ndport = 1\naction = "bypass"',
    )
    s = [x.selector for x in p]
    assert (s[0].proto, s[0].sport, s[0].dport, p[0].priority) == (6, (1000, 1000), (1000, 2000), 7)
    assert (p[1].name, s[1].proto, s[1].dport, p[1].dir, p[1].action) == (
        "dns",
        17,
        (53, 54),
        Direction.FWD,
        Action.DISCARD,
    )
    assert (s[2].proto, s[2].icmp_type, s[2].icmp_code, str(s[2].src)) == (1, 8, 0, "198.51.100.0/24")
    assert (s[3].proto, s[3].icmp_type, s[4].proto) == (58, 135, 58)
    assert (s[5].proto, str(s[5].dst)) == (47, "203.0.113.7/32")  # a bare address is a host prefix
    assert (s[6].proto, s[6].sport, s[7].proto) == (132, (9, 9), 132)
    # derived names are unique
    assert [x.name for x in p] == [
        "out-bypass",
        "dns",
        "in-bypass",
        "in-bypass-5",
        "in-bypass-6",
        "out-bypass-7",
        "out-bypass-8",
        "out-bypass-9",
    ]


@pytest.mark.parametrize(
    ("table", "path", "reason"),
    [
        ('dir = "out"\nsport = 80\naction = "bypass"', "sport", "ports need proto tcp"),
        ('dir = "out"\nproto = "tcp"\ndport = "2000-1000"\naction = "bypass"', "dport", "empty"),
        ('dir = "out"\nproto = "tcp"\ndport = 70000\naction = "bypass"', "dport", "out of range"),
        ('dir = "out"\nproto = "tcp"\ndport = "http"\naction = "bypass"', "dport", "not a port or range"),
        ('dir = "out"\nproto = "tcp"\ndport = [1, 2, 3]\naction = "bypass"', "dport", "[low, high]"),
        ('dir = "out"\nproto = "tcp"\nicmp_type = 8\naction = "bypass"', "icmp_type", "needs proto icmp"),
        ('dir = "out"\nproto = "icmp"\nicmp_code = 1\naction = "bypass"', "icmp_code", "needs icmp_type"),
        ('dir = "out"\nproto = "icmp"\ndst = "2001:db8::1"\naction = "bypass"', "proto", "use ipv6-icmp"),
        ('dir = "out"\nproto = "ipv6-icmp"\ndst = "192.0.2.1"\naction = "bypass"', "proto", "use icmp"),
        ('dir = "out"\nproto = "tcpp"\naction = "bypass"', "proto", "did you mean 'tcp'?"),
        ('dir = "out"\nproto = 0\naction = "bypass"', "proto", 'use "any"'),
        ('dir = "up"\naction = "bypass"', "dir", "unknown value 'up'"),
        ('dir = "out"\naction = "allow"', "action", "unknown value 'allow'"),
        ('dir = "out"\naction = "protect"', "sa", "action protect needs"),
        ('dir = "out"\naction = "bypass"\nsa = "a-to-b"', "sa", "takes no sa"),
        ('action = "bypass"', "dir", "missing"),
        ('dir = "out"\naction = "bypass"\npriority = -1', "priority", "out of range"),
    ],
)
def test_policy_errors(table: str, path: str, reason: str) -> None:
    text = EXAMPLE + f"\n[[policy]]\n{table}\n"
    key = path + " ="
    start = text.index(table)
    line = (
        text.count("\n", 0, start) + 1 + table[: table.index(key)].count("\n")
        if key in table
        else line_of(text, "[[policy]]", 2)
    )
    expect(text, line, f"policy[2].{path}", reason)


def test_duplicate_policy_names() -> None:
    text = EXAMPLE + '\n[[policy]]\nname = "p"\ndir = "out"\naction = "bypass"\n' * 2
    expect(
        text, line_of(text, 'name = "p"', 1), "policy[3] (p).name", "duplicate policy name 'p'", "policy[2]"
    )
    # an explicit name wins over a derived one, which moves aside
    text = EXAMPLE + '\n[[policy]]\nname = "out-a-to-b"\ndir = "out"\naction = "bypass"\n'
    assert [p.name for p in parse_config(text, SRC).policies] == ["out-a-to-b-0", "in-b-to-a", "out-a-to-b"]


# --- fragments (the control socket's sa-add / policy-add) -----------------------------------------


def test_parse_fragment() -> None:
    frag = (
        SA_TEMPLATE
        + f'aead = "aes-gcm-128"\nkey = "{GCM_HEX}"\n'
        + '\n[[policy]]\ndir = "out"\naction = "protect"\nsa = "x"\n'
        + '\n[[policy]]\ndir = "in"\naction = "protect"\nsa = "existing"\n'
    )
    sas, pols = parse_fragment(frag, known_sas={"existing"})
    assert [s.name for s in sas] == ["x"] and [p.sa for p in pols] == ["x", "existing"]
    with pytest.raises(ConfigError, match="no SA named 'existing'"):
        parse_fragment(frag)
    with pytest.raises(ConfigError, match="an SA named 'x' already exists"):
        parse_fragment(frag, known_sas={"existing", "x"})
    with pytest.raises(ConfigError, match="cannot be changed at run time"):
        parse_fragment("[engine]\nworkers = 2\n")
    _, pols = parse_fragment(frag, known_sas={"existing"}, known_policies={"out-x"})
    assert pols[0].name == "out-x-0"
    transport = parse_config(EXAMPLE, SRC).sas[1]  # an IPv4 transport SA
    bad = '[[policy]]\ndir = "in"\nsrc = "2001:db8::/64"\naction = "protect"\nsa = "b-to-a"\n'
    with pytest.raises(ConfigError, match="transport SA b-to-a is IPv4"):
        parse_fragment(bad, known_sas={"b-to-a": transport})


# --- writing --------------------------------------------------------------------------------------


def example_sa_params() -> list[dict[str, Any]]:
    return [
        {
            "name": "a-to-b",
            "proto": "esp",
            "mode": "transport",
            "src": "192.0.2.1",
            "dst": "192.0.2.2",
            "spi": 0x1001,
            "aead": "aes-gcm-128",
            "key": bytes.fromhex(GCM_HEX),
            "replay_window": 128,
        },
        {
            "name": "b-to-a",
            "proto": "esp",
            "mode": "tunnel",
            "src": "2001:db8::2",
            "dst": "2001:db8::1",
            "spi": 0x1002,
            "enc": "aes-cbc-128",
            "enc_key": bytes.fromhex(CBC_HEX),
            "auth": "hmac-sha256-128",
            "auth_key": bytes.fromhex(HMAC_HEX),
            "esn": True,
            "seq_start": 5,
            "tfc_pad": 64,
            "lifetime": Lifetime(soft_bytes=1000, hard_bytes=2000, soft_seconds=1.5),
        },
        {
            "name": "ah1",
            "proto": "ah",
            "mode": "transport",
            "src": "192.0.2.2",
            "dst": "192.0.2.1",
            "spi": 0x1003,
            "auth": "hmac-sha512-256",
            "auth_key": bytes(range(64)),
            "icv_len": 16,
            "replay_window": 0,
        },
        {
            "name": "g8",
            "proto": "esp",
            "mode": "tunnel",
            "src": "192.0.2.2",
            "dst": "192.0.2.1",
            "spi": 0x1004,
            "aead": "aes-gcm-256",
            "key": bytes(range(36)),
            "icv_len": 8,
        },
    ]


def test_config_to_toml_round_trip() -> None:
    params = example_sa_params()
    net = ipaddress.ip_network
    pols = [
        Policy(
            "p1",
            Direction.OUT,
            Selector(src=net("192.0.2.1/32"), dst=net("192.0.2.2/32")),
            Action.PROTECT,
            "a-to-b",
        ),
        Policy(
            "p2",
            Direction.FWD,
            Selector(dst=net("2001:db8::/48"), proto=6, sport=(1, 1), dport=(80, 90)),
            Action.DISCARD,
            priority=3,
        ),
        Policy("p3", Direction.IN, Selector(proto=58, icmp_type=128, icmp_code=0), Action.BYPASS),
        Policy("p4", Direction.IN, Selector(proto=99), Action.PROTECT, "ah1", priority=2**32 - 1),
    ]
    eng = EngineSettings(
        default_policy={
            Direction.IN: Action.DISCARD,
            Direction.OUT: Action.BYPASS,
            Direction.FWD: Action.BYPASS,
        },
        workers=3,
        mark=0x10000,
        control_socket="/run/x.sock",
        icmp_rate=0.5,
    )
    text = config_to_toml(params, pols, eng)
    assert "chmod 600" in text
    cfg = parse_config(text, SRC)
    assert cfg.engine == eng
    assert [(p.name, p.dir, p.selector, p.action, p.sa, p.priority) for p in cfg.policies] == [
        (p.name, p.dir, p.selector, p.action, p.sa, p.priority) for p in pols
    ]
    for got, want in zip(cfg.sas, params, strict=True):
        ref = SecurityAssociation(**want)
        d_got, d_ref = got.describe(), ref.describe()
        for k in ("age_seconds",):
            d_got.pop(k), d_ref.pop(k)
        assert d_got == d_ref
        pkt = (
            udp_packet(str(ref.src), str(ref.dst))
            if ref.mode == "transport"
            else udp_packet("192.0.2.77", "192.0.2.88")
        )
        assert ref.unprotect(got.protect(pkt)) == pkt  # the keys made the trip too
    with pytest.raises(TypeError, match="live SecurityAssociation"):
        config_to_toml([SecurityAssociation(**params[0])], [])  # type: ignore[list-item]


PREFIX4 = st.builds(
    lambda a, n: ipaddress.IPv4Network((a, n), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32)
)
PREFIX6 = st.builds(
    lambda a, n: ipaddress.IPv6Network((a, n), strict=False), st.integers(0, 2**128 - 1), st.integers(0, 128)
)
PORT = st.integers(0, 65535)
PORTS = st.none() | st.tuples(PORT, PORT).map(lambda t: (min(t), max(t)))


@st.composite
def selectors(draw: st.DrawFn) -> Selector:
    fam = draw(st.sampled_from([4, 6, None]))
    pre: st.SearchStrategy[ipaddress.IPv4Network | ipaddress.IPv6Network] = PREFIX4 if fam == 4 else PREFIX6
    src = draw(st.none() | pre) if fam else None
    dst = draw(st.none() | pre) if fam else None
    kind = draw(st.sampled_from(["ports", "icmp", "other", "any"]))
    if kind == "ports":
        proto = draw(st.sampled_from([6, 17, 33, 132, 136]))
        return Selector(src=src, dst=dst, proto=proto, sport=draw(PORTS), dport=draw(PORTS))
    if kind == "icmp":
        proto = 58 if fam == 6 else 1
        t = draw(st.none() | st.integers(0, 255))
        c = draw(st.none() | st.integers(0, 255)) if t is not None else None
        return Selector(src=src, dst=dst, proto=proto, icmp_type=t, icmp_code=c)
    if kind == "other":
        return Selector(src=src, dst=dst, proto=draw(st.integers(1, 255).filter(lambda p: p not in (1, 58))))
    return Selector(src=src, dst=dst)


@settings(max_examples=60, deadline=None)
@given(
    sels=st.lists(selectors(), min_size=1, max_size=6),
    prios=st.lists(st.integers(0, 2**32 - 1), min_size=6, max_size=6),
)
def test_policy_round_trip_property(sels: list[Selector], prios: list[int]) -> None:
    pols = [Policy(f"p{i}", Direction.OUT, s, Action.BYPASS, priority=prios[i]) for i, s in enumerate(sels)]
    cfg = parse_config(config_to_toml([], pols), SRC)
    assert [(p.name, p.selector, p.priority) for p in cfg.policies] == [
        (p.name, p.selector, p.priority) for p in pols
    ]


# --- the tables agree with the transforms ---------------------------------------------------------


def test_algorithm_tables_match_the_transforms() -> None:
    from nfq_ipsec import algorithms

    assert set(algorithms.ALGORITHMS["aead"]) == set(AEAD_KEYS)
    assert set(algorithms.ALGORITHMS["enc"]) == set(ENC_KEYS)
    assert set(algorithms.ALGORITHMS["auth"]) == set(AUTH_KEYS)
    for alg, (k, salt) in AEAD_KEYS.items():
        algorithms.make_transform(aead=alg, key=bytes(k + salt))
        with pytest.raises(ValueError):
            algorithms.make_transform(aead=alg, key=bytes(k + salt - 1))
    for alg, n in ENC_KEYS.items():
        if n:
            algorithms.make_transform(enc=alg, enc_key=bytes(n), auth="hmac-sha1-96", auth_key=bytes(20))
    for alg, n in AUTH_KEYS.items():
        algorithms.make_integrity(alg, bytes(n))
        with pytest.raises(ValueError):
            algorithms.make_integrity(alg, bytes(n + 1))


# --- the documentation's examples -----------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def doc_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.S)


def test_docs_complete_example_is_the_accepted_one() -> None:
    assert doc_blocks()[0] == EXAMPLE


def test_docs_examples_parse(tmp_path: Path) -> None:
    """Every TOML block of docs/configuration.md is accepted (with generated key files and stand-in SAs)."""
    import tomllib

    blocks = doc_blocks()
    assert len(blocks) >= 5
    standin = "".join(
        SA_TEMPLATE.replace('name = "x"', f'name = "{n}"').replace("0x4000", hex(0x5000 + i))
        + f'aead = "aes-gcm-128"\nkey = "{GCM_HEX}"\n'
        for i, n in enumerate(("a-to-b-v6", "placeholder"))
    )
    for block in blocks:
        data = tomllib.loads(block)
        for sa in data.get("sa", []):
            for alg_key, file_key in (
                ("aead", "key_file"),
                ("enc", "enc_key_file"),
                ("auth", "auth_key_file"),
            ):
                if file_key in sa:
                    alg = sa[alg_key]
                    n = sum(AEAD_KEYS[alg]) if alg in AEAD_KEYS else ENC_KEYS.get(alg) or AUTH_KEYS[alg]
                    kf = tmp_path / sa[file_key]
                    kf.parent.mkdir(parents=True, exist_ok=True)
                    kf.write_text(os.urandom(n).hex())
                    kf.chmod(0o600)
        text = block
        if "[[policy]]" in block and "[[sa]]" not in block:
            text = standin + block
        if "# ...\n[sa.lifetime]" in block:
            text = block.replace(
                "# ...\n",
                f'proto = "esp"\nmode = "tunnel"\nsrc = "192.0.2.1"\ndst = "192.0.2.2"\n'
                f'spi = 0x1001\naead = "aes-gcm-128"\nkey = "{GCM_HEX}"\n',
            )
        parse_config(text, str(tmp_path / "doc.toml"))
