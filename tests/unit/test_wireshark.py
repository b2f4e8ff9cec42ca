"""Wireshark ESP SA table export (nfq_ipsec.wireshark) and `nfq-ipsec keys`.

The exact esp_sa text for a known configuration is checked line by line; the algorithm
strings are also checked against the installed libwireshark when there is one, since a
string Wireshark does not know makes it reject the whole table. tests/netns/test_tshark.py
checks that tshark really decrypts our packets with these lines.
"""

from __future__ import annotations

import glob
import os
import shlex
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from nfq_ipsec import wireshark as ws
from nfq_ipsec.cli import main

CONFIG = """\
[[sa]]
name = "gcm-v4"
proto = "esp"
mode = "tunnel"
src = "192.0.2.1"
dst = "192.0.2.2"
spi = 0x00001001
aead = "aes-gcm-128"
key = "0x0102030405060708090a0b0c0d0e0f1011121314"

[[sa]]
name = "cbc-v6"
proto = "esp"
mode = "transport"
src = "2001:db8:1::1"
dst = "2001:db8:1::2"
spi = 0x00001002
enc = "aes-cbc-256"
enc_key = "0x{k32a}"
auth = "hmac-sha256-128"
auth_key = "0x{k32b}"

[[sa]]
name = "null-sha1"
proto = "esp"
mode = "transport"
src = "198.51.100.1"
dst = "198.51.100.2"
spi = 0x00001003
enc = "null"
auth = "hmac-sha1-96"
auth_key = "0x{k20}"
esn = true
replay_window = 64

[[sa]]
name = "gcm256-icv12"
proto = "esp"
mode = "tunnel"
src = "203.0.113.1"
dst = "203.0.113.2"
spi = 0x00001004
aead = "aes-gcm-256"
key = "0x{k36}"
icv_len = 12

[[sa]]
name = "sha256-96"
proto = "esp"
mode = "tunnel"
src = "203.0.113.1"
dst = "203.0.113.2"
spi = 0x00001005
enc = "aes-cbc-128"
enc_key = "0x{k16}"
auth = "hmac-sha256-128"
auth_key = "0x{k32b}"
icv_len = 12

[[sa]]
name = "sha512-128"
proto = "esp"
mode = "tunnel"
src = "203.0.113.1"
dst = "203.0.113.2"
spi = 0x00001006
enc = "aes-cbc-128"
enc_key = "0x{k16}"
auth = "hmac-sha512-256"
auth_key = "0x{k64}"
icv_len = 16

[[sa]]
name = "chacha"
proto = "esp"
mode = "tunnel"
src = "192.0.2.1"
dst = "192.0.2.2"
spi = 0x00001007
aead = "chacha20-poly1305"
key = "0x{k36}"

[[sa]]
name = "gmac"
proto = "esp"
mode = "tunnel"
src = "192.0.2.1"
dst = "192.0.2.2"
spi = 0x00001008
aead = "aes-gmac-128"
key = "0x{k20}"

[[sa]]
name = "ah-sha384"
proto = "ah"
mode = "transport"
src = "192.0.2.1"
dst = "192.0.2.2"
spi = 0x00001009
auth = "hmac-sha384-192"
auth_key = "0x{k48}"
"""
KEYS = {
    "k16": bytes(range(0x10, 0x20)).hex(),
    "k20": bytes(range(0x20, 0x34)).hex(),
    "k32a": bytes(range(0x40, 0x60)).hex(),
    "k32b": bytes(range(0x60, 0x80)).hex(),
    "k36": bytes(range(0x80, 0xA4)).hex(),
    "k48": bytes(range(0xB0, 0xE0)).hex(),
    "k64": bytes(range(0xC0, 0x100)).hex(),
}
K = KEYS

EXPECTED_LINES = [
    '"IPv4","192.0.2.1","192.0.2.2","0x00001001","AES-GCM with 16 octet ICV [RFC4106]",'
    '"0x0102030405060708090a0b0c0d0e0f1011121314","NULL",""',
    f'"IPv6","2001:db8:1::1","2001:db8:1::2","0x00001002","AES-CBC [RFC3602]","0x{K["k32a"]}",'
    f'"HMAC-SHA-256-128 [RFC4868]","0x{K["k32b"]}"',
    f'"IPv4","198.51.100.1","198.51.100.2","0x00001003","NULL","","HMAC-SHA-1-96 [RFC2404]","0x{K["k20"]}"',
    f'"IPv4","203.0.113.1","203.0.113.2","0x00001004","AES-GCM with 12 octet ICV [RFC4106]","0x{K["k36"]}",'
    '"NULL",""',
    f'"IPv4","203.0.113.1","203.0.113.2","0x00001005","AES-CBC [RFC3602]","0x{K["k16"]}",'
    f'"HMAC-SHA-256-96 [draft-ietf-ipsec-ciph-sha-256-00]","0x{K["k32b"]}"',
    f'"IPv4","203.0.113.1","203.0.113.2","0x00001006","AES-CBC [RFC3602]","0x{K["k16"]}",'
    f'"ANY 128 bit authentication [no checking]","0x{K["k64"]}"',
]
CHACHA_LINE = ('"IPv4","192.0.2.1","192.0.2.2","0x00001007","ChaCha20 with Poly1305 [RFC7634]",'
               f'"0x{K["k36"]}","NULL",""')


@pytest.fixture
def config(tmp_path: Path) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(CONFIG.format(**KEYS))
    p.chmod(0o600)
    return p


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_keys_wireshark_exact_text(config: Path) -> None:
    code, out, err = run("keys", "-c", str(config), "--wireshark")
    assert code == 0, err
    assert out == ws.FILE_HEADER + "".join(line + "\n" for line in EXPECTED_LINES)
    # what was left out, and why
    assert "skipped SA chacha: chacha20-poly1305 is not in Wireshark 4.0's ESP table" in err
    assert "skipped SA gmac: aes-gmac-128 (ENCR_NULL_AUTH_AES_GMAC) is not in Wireshark's ESP table" in err
    assert "skipped SA ah-sha384: AH has nothing to decrypt" in err
    assert "SA null-sha1: uses ESN" in err
    assert "SA sha512-128: Wireshark cannot check a 16-byte hmac-sha512-256 ICV" in err


def test_keys_include_chacha20_and_select(config: Path) -> None:
    code, out, _ = run("keys", "-c", str(config), "--wireshark", "--include-chacha20", "--sa", "chacha",
                       "--sa", "gcm-v4")
    assert code == 0
    assert out.splitlines()[1:] == [EXPECTED_LINES[0], CHACHA_LINE]
    code, _, err = run("keys", "-c", str(config), "--wireshark", "--sa", "nope")
    assert code != 0 and "no SA named nope" in err
    code, _, err = run("keys", "-c", str(config), "--wireshark", "--sa", "ah-sha384")
    assert code != 0 and "no SA that Wireshark can decrypt" in err


def test_keys_tshark_args_are_shell_words(config: Path) -> None:
    code, out, _ = run("keys", "-c", str(config), "--tshark-args", "--sa", "gcm-v4", "--sa", "cbc-v6")
    assert code == 0
    words = shlex.split(out)
    assert words == ["-o", "esp.enable_encryption_decode:TRUE", "-o", "esp.enable_authentication_check:TRUE",
                     "-o", "uat:esp_sa:" + EXPECTED_LINES[0], "-o", "uat:esp_sa:" + EXPECTED_LINES[1]]


def test_keys_output_file_is_private(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "esp_sa"
    out.write_text("old")
    out.chmod(0o644)  # an existing file must not keep a readable mode
    code, stdout, err = run("keys", "-c", str(config), "-o", str(out))
    assert code == 0, err
    assert stdout == ""
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text().splitlines()[1:] == EXPECTED_LINES
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    code, _, err = run("keys", "-c", str(config), "-o", str(link))
    assert code != 0 and "cannot write" in err
    assert not (tmp_path / "elsewhere").exists()


def test_keys_needs_a_format_and_a_valid_config(config: Path, tmp_path: Path) -> None:
    code, _, err = run("keys", "-c", str(config))
    assert code != 0 and "--wireshark" in err
    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG.format(**KEYS).replace('spi = 0x00001002', 'spi = 0x00001002\nenc_key_file = "x"'))
    code, _, err = run("keys", "-c", str(bad), "--wireshark")
    assert code != 0 and "bad.toml" in err


def test_key_files_are_followed(tmp_path: Path) -> None:
    keyfile = tmp_path / "k.hex"
    keyfile.write_text("# gcm-128 key + salt\n" + "ab" * 20 + "\n")
    keyfile.chmod(0o600)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[sa]]\nname = "x"\nproto = "esp"\nmode = "tunnel"\nsrc = "192.0.2.1"\n'
                   'dst = "192.0.2.2"\nspi = 0x1001\naead = "aes-gcm-128"\nkey_file = "k.hex"\n')
    code, out, err = run("keys", "-c", str(cfg), "--wireshark")
    assert code == 0, err
    assert out.splitlines()[1] == ('"IPv4","192.0.2.1","192.0.2.2","0x00001001",'
                                   f'"AES-GCM with 16 octet ICV [RFC4106]","0x{"ab" * 20}","NULL",""')


def test_uat_quote() -> None:
    assert ws.uat_quote("AES-CBC [RFC3602]") == '"AES-CBC [RFC3602]"'
    assert ws.uat_quote('a"b\\c') == '"a\\x22b\\x5cc"'
    assert ws.uat_quote("é\n") == '"\\xc3\\xa9\\x0a"'


def test_record_repr_hides_keys() -> None:
    rec = ws.record_for({"name": "s", "proto": "esp", "src": "192.0.2.1", "dst": "192.0.2.2", "spi": 0x1234,
                         "aead": "aes-gcm-128", "key": bytes(range(20))})
    assert rec.encryption_key == "0x" + bytes(range(20)).hex()
    assert bytes(range(20)).hex() not in repr(rec)
    assert rec.spi == "0x00001234"


@pytest.mark.parametrize(("icv", "name"), [(8, "AES-GCM with 8 octet ICV [RFC4106]"),
                                           (12, "AES-GCM with 12 octet ICV [RFC4106]"),
                                           (None, "AES-GCM with 16 octet ICV [RFC4106]")])
def test_gcm_icv_lengths(icv: int | None, name: str) -> None:
    rec = ws.record_for({"name": "s", "src": "192.0.2.1", "dst": "192.0.2.2", "spi": 0x1234,
                         "aead": "aes-gcm-192", "key": bytes(28), "icv_len": icv})
    assert (rec.encryption, rec.authentication, rec.authentication_key) == (name, "NULL", "")


def _libwireshark() -> bytes | None:
    for path in sorted(glob.glob("/usr/lib/*/libwireshark.so.*") + glob.glob("/usr/lib/libwireshark.so.*")):
        if os.path.isfile(path):
            return Path(path).read_bytes()
    return None


def test_algorithm_strings_are_wiresharks() -> None:
    """Every string we emit must be one Wireshark's ESP table knows (else it rejects the table)."""
    lib = _libwireshark()
    if lib is None:
        pytest.skip("libwireshark not installed (apt-get install tshark)")
    names = {*ws.ENCRYPTION.values(), *ws.GCM_BY_ICV.values(), *ws.UNCHECKED_BY_ICV.values(), ws.NULL}
    for table in ws.AUTHENTICATION.values():
        names.update(table.values())
    missing = [n for n in sorted(names) if n.encode() + b"\0" not in lib]
    assert missing == []
    for field in ws.UAT_FIELDS:
        assert field.encode() + b"\0" in lib
