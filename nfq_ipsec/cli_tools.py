"""CLI commands that connect nfq-ipsec to other tools: ``import``, ``keys`` and ``explain``.

``cli.py`` registers them (``main.add_command(import_group)`` ...). Helpers of cli.py are
imported inside the commands, not at module level, so that either module can be imported first.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from .errors import ConfigError

SECRET_MODE = 0o600
OUTPUT_HELP = "Write the configuration here (mode 0600)."


def write_secret(path: str, text: str) -> None:
    """Write a file only its owner can read (it holds keys); never through a symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, SECRET_MODE)
    except OSError as e:
        raise click.ClickException(f"{path}: cannot write: {e.strerror}") from None
    try:
        os.fchmod(fd, SECRET_MODE)  # an existing file keeps its old mode otherwise
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read_input(path: str) -> tuple[str, str]:
    """(text, name for messages) of a file, or of stdin for ``-``."""
    if path == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        return Path(path).read_text(encoding="utf-8"), path
    except OSError as e:
        raise click.ClickException(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise click.ClickException(f"{path}: not UTF-8 text (byte {e.start})") from None


def _warn(lines: list[str]) -> None:
    for w in lines:
        click.echo(f"warning: {w}", err=True)


def _emit_config(result: Any, origin: str, output: str | None) -> None:
    try:
        text = result.to_toml(origin)
    except ConfigError as e:  # pragma: no cover - an importer bug: what it built does not validate
        raise click.ClickException(f"the imported configuration does not validate: {e}") from None
    _warn(result.warnings)
    if output:
        write_secret(output, text)
        click.echo(f"{output}: {len(result.sas)} SAs, {len(result.policies)} policies (mode 0600; it "
                   "contains keys)", err=True)
    else:
        click.echo(text, nl=False)


# --- import ----------------------------------------------------------------------------------------------


@click.group("import")
def import_group() -> None:
    """Convert a kernel IPsec setup (ip xfrm, setkey) into an nfq-ipsec configuration.

    The result (TOML, with the keys) goes to stdout or to --output (mode 0600) and always
    passes `nfq-ipsec check`. Anything nfq-ipsec cannot do is an error naming the input line.
    """


@import_group.command("xfrm")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--state", "state_file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Output of `ip xfrm state` (run as root so that keys are shown).")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Output of `ip xfrm policy`.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help=OUTPUT_HELP)
def import_xfrm_cmd(files: tuple[str, ...], state_file: str | None, policy_file: str | None,
                    output: str | None) -> None:
    """Import `ip xfrm state` + `ip xfrm policy` output (FILES, --state/--policy, or stdin).

    States and policies may be mixed in one file, e.g.
    `{ ip xfrm state; ip xfrm policy; } | nfq-ipsec import xfrm -o ipsec.toml`.
    Each protect policy is tied to the state its template selects (proto, mode, reqid,
    endpoints); SAs are named after their SPI (esp-0x1001).
    """
    from . import importers

    paths = [*files, *(p for p in (state_file, policy_file) if p)] or ["-"]
    texts = [_read_input(p) for p in paths]
    try:
        result = importers.import_xfrm(texts)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    _emit_config(result, "ip xfrm (" + ", ".join(name for _, name in texts) + ")", output)


@import_group.command("setkey")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--sha256-icv-bits", type=click.Choice(["96", "128"]), default="96", show_default=True,
              help="ICV of hmac-sha256 SAs: Linux's PF_KEY uses 96 bits, BSD kernels and RFC 4868 use 128.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help=OUTPUT_HELP)
def import_setkey_cmd(file: str, sha256_icv_bits: str, output: str | None) -> None:
    """Import an ipsec-tools setkey file (add / spdadd statements; - for stdin)."""
    from . import importers

    text, name = _read_input(file)
    try:
        result = importers.import_setkey(text, name, sha256_icv_bits=int(sha256_icv_bits))
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    _emit_config(result, f"setkey file {name}", output)


# --- keys ------------------------------------------------------------------------------------------------


def sa_parameters(config_path: str) -> list[dict[str, Any]]:
    """Every SA of a configuration as keyword arguments, keys included (live SAs never give keys back).

    The whole file is validated first (load_config), then its [[sa]] tables are read again
    with the configuration's own parser, so key files and every check apply exactly.
    """
    from . import config as cfgmod
    from .cli import _load

    _load(config_path)  # full validation, friendly errors
    try:
        text = Path(config_path).read_text(encoding="utf-8")
        doc = cfgmod._Doc(text, config_path, Path(config_path).parent)
        tables = doc.load().get("sa", [])
        return [cfgmod._parse_sa(doc, i, d).kwargs for i, d in enumerate(tables)]
    except ConfigError as e:  # pragma: no cover - load_config above already accepted the file
        raise click.ClickException(str(e)) from None


@click.command("keys")
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Configuration holding the SAs (keys are never sent over the control socket).")
@click.option("--wireshark", is_flag=True, help="Print Wireshark's ESP SA table (the esp_sa file).")
@click.option("--tshark-args", is_flag=True, help="Print tshark/wireshark -o options instead (one per SA).")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the esp_sa file here (mode 0600) instead of printing it.")
@click.option("--sa", "sa_names", multiple=True, metavar="NAME", help="Only this SA (repeatable).")
@click.option("--include-chacha20", is_flag=True,
              help="Also list chacha20-poly1305 SAs (Wireshark newer than 4.0 only).")
def keys_cmd(config_path: str, wireshark: bool, tshark_args: bool, output: str | None,
             sa_names: tuple[str, ...], include_chacha20: bool) -> None:
    """Export SA keys so Wireshark/tshark can decrypt captured ESP.

    The esp_sa file goes into a Wireshark profile (e.g. ~/.config/wireshark/esp_sa); also turn
    on Preferences > Protocols > ESP > "Attempt to detect/decode encrypted ESP payloads".
    --tshark-args prints the same as -o options, e.g.
    `eval tshark -r cap.pcap $(nfq-ipsec keys -c FILE --tshark-args)`.
    The output contains secret keys.
    """
    from . import wireshark as ws

    if not (wireshark or tshark_args or output):
        raise click.UsageError("choose an output: --wireshark (esp_sa file), --tshark-args or --output FILE")
    sas = sa_parameters(config_path)
    if sa_names:
        known = {s["name"] for s in sas}
        unknown = [n for n in sa_names if n not in known]
        if unknown:
            raise click.ClickException(f"{config_path}: no SA named {', '.join(unknown)} (SAs: "
                                       f"{', '.join(sorted(known)) or 'none'})")
        sas = [s for s in sas if s["name"] in sa_names]
    recs, notes = ws.records(sas, chacha20=include_chacha20)
    _warn(notes)
    if not recs:
        raise click.ClickException(f"{config_path}: no SA that Wireshark can decrypt")
    if output:
        write_secret(output, ws.esp_sa_file(recs))
        click.echo(f"{output}: {len(recs)} ESP SAs (mode 0600; it contains keys)", err=True)
    if tshark_args:
        click.echo(ws.shell_words(ws.tshark_options(recs)))
    elif not output:
        click.echo(ws.esp_sa_file(recs), nl=False)


# --- explain ---------------------------------------------------------------------------------------------


def _flow_text(req: dict[str, Any]) -> str:
    from .explain import parse_proto

    proto = req.get("proto")
    num = parse_proto(proto)
    parts = [f"proto {proto}" if num is not None else "proto any"]

    def ep(addr: str, port: Any) -> str:
        host = f"[{addr}]" if ":" in addr and port is not None else addr
        return f"{host}:{port}" if port is not None else addr

    parts.append(f"{ep(req['src'], req.get('sport'))} -> {ep(req['dst'], req.get('dport'))}")
    if req.get("icmp_type") is not None:
        parts.append(f"icmp type {req['icmp_type']}" + (f" code {req['icmp_code']}"
                                                         if req.get("icmp_code") is not None else ""))
    return "flow: " + " ".join(parts)


@click.command("explain")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="Explain against this configuration file (offline), or its running engine with --live.")
@click.option("--socket", "socket_path", type=click.Path(),
              help="Ask the running engine on this control socket.")
@click.option("--live", is_flag=True, help="With -c: ask the engine running that configuration.")
@click.option("--src", required=True, help="Source address of the packet.")
@click.option("--dst", required=True, help="Destination address of the packet.")
@click.option("--proto", help="Protocol: name (tcp, udp, icmp, ipv6-icmp, esp, ...) or number; default any.")
@click.option("--sport", type=click.IntRange(0, 65535), help="Source port (tcp/udp/sctp/...).")
@click.option("--dport", type=click.IntRange(0, 65535), help="Destination port.")
@click.option("--icmp-type", type=click.IntRange(0, 255), help="ICMP/ICMPv6 type.")
@click.option("--icmp-code", type=click.IntRange(0, 255), help="ICMP/ICMPv6 code.")
@click.option("--dir", "direction", type=click.Choice(["in", "out", "fwd"]),
              help="Only this direction (default: all three).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def explain_cmd(config_path: str | None, socket_path: str | None, live: bool, src: str, dst: str,
                proto: str | None, sport: int | None, dport: int | None, icmp_type: int | None,
                icmp_code: int | None, direction: str | None, as_json: bool) -> None:
    """Which policy a packet would match, its verdict and SA, and why earlier policies do not match.

    Offline with -c FILE (nothing runs); with --socket, --live or neither, the running engine
    answers from its current policies.
    """
    from .explain import explain_flow, format_explain, parse_proto

    for what, value in (("--src", src), ("--dst", dst)):
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not an IP address", param_hint=what) from None
    try:
        parse_proto(proto)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--proto") from None
    given: dict[str, Any] = {"proto": proto, "sport": sport, "dport": dport, "icmp_type": icmp_type,
                             "icmp_code": icmp_code, "dir": direction}
    req: dict[str, Any] = {"src": src, "dst": dst, **{k: v for k, v in given.items() if v is not None}}
    if config_path and not (live or socket_path):
        from .cli import _load
        from .sad import Sad
        from .spd import Spd

        cfg = _load(config_path)
        spd, sad = Spd(cfg.engine.default_actions()), Sad()
        for sa in cfg.sas:
            sad.add(sa)
        for p in cfg.policies:
            spd.add(p)
        try:
            res = explain_flow(spd, req, sad)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    else:
        from .cli import _call

        res = _call(config_path, socket_path, "explain", **req)["explain"]
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(_flow_text(req))
    click.echo(format_explain(res))


__all__ = ["explain_cmd", "import_group", "keys_cmd", "write_secret"]
