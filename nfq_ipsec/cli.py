"""The `nfq-ipsec` command line."""

from __future__ import annotations

import glob
import json
import logging
import sys
from typing import Any

import click

from . import __version__
from .errors import ConfigError

RUN_DIR = "/run/nfq-ipsec"


def _load(path: str) -> Any:
    from .config import load_config

    try:
        return load_config(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"{path}: cannot read: {e.strerror}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="nfq-ipsec")
def main() -> None:
    """IPsec (ESP/AH) in user space, on Linux NFQUEUE.

    iptables rules send the traffic your policies cover to the engine, which encrypts,
    decrypts, accepts or drops every packet. Start with `nfq-ipsec demo`, write a
    configuration (see docs/configuration.md and rules/), check it with `nfq-ipsec check`,
    and run it with `nfq-ipsec run`.
    """


# --- run / check ------------------------------------------------------------------------------
@main.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Configuration file (TOML).")
@click.option("--socket", "socket_path", type=click.Path(),
              help="Control socket path (overrides [engine] control_socket).")
@click.option("--log-level", default=None, type=click.Choice(["debug", "info", "warning", "error"]),
              help="How much to log (stderr); default: [engine] log_level, else info.")
def run(config_path: str, socket_path: str | None, log_level: str | None) -> None:
    """Run the engine in the foreground.

    Installs the iptables hooks, processes packets until SIGTERM or Ctrl-C, then removes the
    hooks. If the engine dies without cleaning up, protected traffic stays blocked (fail
    closed) until `nfq-ipsec hooks remove` or a new `run`.
    """
    cfg = _load(config_path)
    level = (log_level or getattr(cfg.engine, "log_level", None) or "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s nfq-ipsec %(levelname)s %(message)s", stream=sys.stderr)
    if socket_path:
        import dataclasses

        cfg.engine = dataclasses.replace(cfg.engine, control_socket=socket_path)
    for w in cfg.warnings:
        logging.getLogger("nfq_ipsec").warning("%s", w)
    from .engine import Engine, EngineError

    if cfg.engine.workers > 1:
        # one process per queue, each SA pinned to one of them (one sequence-number space per SA)
        from .supervisor import run_workers

        try:
            run_workers(cfg, config_path)  # blocks until SIGTERM/SIGINT, then removes the hooks
        except EngineError as e:
            raise click.ClickException(str(e)) from None
        return
    from .hooks import HookError

    engine = Engine(cfg, config_path)
    try:
        engine.start()
    except (EngineError, HookError) as e:
        raise click.ClickException(str(e)) from None
    except PermissionError as e:
        raise click.ClickException(f"permission denied ({e}); the engine must run as root") from None
    except OSError as e:  # e.g. the TUN device or a raw socket could not be created
        raise click.ClickException(f"start-up failed: {e}") from None
    log = logging.getLogger("nfq_ipsec")
    log.info("engine running: %d SAs, %d policies, queue %d, control socket %s", len(engine.sad.list()),
             len(engine.spd.list()), cfg.engine.queue_num, cfg.engine.control_socket)
    try:
        engine.run()
    finally:
        engine.shutdown()
        log.info("engine stopped, hooks removed")


@main.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Configuration file (TOML).")
def check(config_path: str) -> None:
    """Validate a configuration file without touching the system.

    Exits non-zero with the file, the key (and line) and the reason of the first problem.
    Warnings (e.g. a policy that can never match) are printed but do not fail the check.
    """
    cfg = _load(config_path)
    for w in cfg.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"{config_path}: OK ({len(cfg.sas)} SAs, {len(cfg.policies)} policies)")


# --- hooks -----------------------------------------------------------------------------------
@main.group("hooks")
def hooks_group() -> None:
    """Install, remove or show the iptables hooks (chains NFQIPSEC-IN/OUT/FWD)."""


@hooks_group.command("install")
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False))
def hooks_install(config_path: str) -> None:
    """Install the hooks for a configuration (idempotent). Without a running engine, the
    traffic they cover is blocked (fail closed)."""
    from . import hooks
    from .sad import Sad
    from .spd import Spd

    cfg = _load(config_path)
    spd, sad = Spd(cfg.engine.default_actions()), Sad()
    for sa in cfg.sas:
        sad.add(sa)
    for p in cfg.policies:
        spd.add(p)
    hooks.install(hooks.plan(cfg.engine, spd, sad))
    click.echo("hooks installed")


@hooks_group.command("remove")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="Configuration (for its chain prefix); default prefix NFQIPSEC.")
def hooks_remove(config_path: str | None) -> None:
    """Remove the hooks (idempotent), e.g. after an engine was killed."""
    from . import hooks

    prefix = _load(config_path).engine.chain_prefix if config_path else "NFQIPSEC"
    hooks.remove(prefix)
    click.echo("hooks removed")


@hooks_group.command("status")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def hooks_status(config_path: str | None, as_json: bool) -> None:
    """Show which hooks are installed, with their packet counters."""
    from . import hooks

    prefix = _load(config_path).engine.chain_prefix if config_path else "NFQIPSEC"
    st = hooks.status(prefix)
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    click.echo(hooks.format_status(st) if hasattr(hooks, "format_status") else json.dumps(st, indent=2, default=str))


# --- talking to the running engine -----------------------------------------------------------
def _socket_path(config_path: str | None, socket_path: str | None) -> str:
    if socket_path:
        return socket_path
    if config_path:
        return str(_load(config_path).engine.control_socket)
    found = sorted(glob.glob(f"{RUN_DIR}/*.sock"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise click.ClickException(f"no running engine found in {RUN_DIR}; give -c FILE or --socket PATH")
    raise click.ClickException(f"several engines are running ({', '.join(found)}); choose one with -c or --socket")


def _call(config_path: str | None, socket_path: str | None, cmd: str, **kw: Any) -> dict[str, Any]:
    from .control import ControlClient, ControlError

    try:
        c = ControlClient(_socket_path(config_path, socket_path))
        try:
            return c.call(cmd, **kw)
        finally:
            c.close()
    except ControlError as e:
        raise click.ClickException(str(e)) from None


engine_opts = [
    click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
                 help="Configuration of the engine to ask (finds its control socket)."),
    click.option("--socket", "socket_path", type=click.Path(), help="Control socket path."),
]


def _with_engine_opts(f: Any) -> Any:
    for opt in reversed(engine_opts):
        f = opt(f)
    return f


@main.group("sa")
def sa_group() -> None:
    """Security associations of the running engine."""


@sa_group.command("list")
@_with_engine_opts
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (keys are never shown).")
def sa_list(config_path: str | None, socket_path: str | None, as_json: bool) -> None:
    """List the SAs with their state and counters (never their keys)."""
    sas = _call(config_path, socket_path, "sa-list")["sas"]
    if as_json:
        click.echo(json.dumps(sas, indent=2))
        return
    from .render import table

    rows = [[s.get("name"), s.get("proto"), s.get("mode"), f"{s.get('src')} -> {s.get('dst')}", s.get("spi"),
             s.get("state"), (s.get("counters") or {}).get("packets"), (s.get("counters") or {}).get("bytes")]
            for s in sas]
    click.echo(table(["name", "proto", "mode", "endpoints", "spi", "state", "packets", "bytes"], rows))


@sa_group.command("add")
@_with_engine_opts
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
def sa_add(config_path: str | None, socket_path: str | None, file: str) -> None:
    """Add the [[sa]] (and [[policy]]) tables of FILE to the running engine, all or nothing.

    FILE uses the configuration syntax; keys are read here and sent over the root-only
    control socket, never echoed back."""
    _add_file(config_path, socket_path, file, "sa-add")


@sa_group.command("remove")
@_with_engine_opts
@click.argument("name")
def sa_remove(config_path: str | None, socket_path: str | None, name: str) -> None:
    """Remove an SA from the running engine (refused while a policy uses it)."""
    _call(config_path, socket_path, "sa-remove", name=name)
    click.echo(f"removed SA {name}")


def _add_file(config_path: str | None, socket_path: str | None, file: str, cmd: str) -> None:
    from pathlib import Path

    try:
        text = Path(file).read_text()
    except UnicodeDecodeError as e:
        raise click.ClickException(f"{file}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise click.ClickException(f"{file}: cannot read: {e.strerror}") from None
    reply = _call(config_path, socket_path, cmd, toml=text, base_dir=str(Path(file).resolve().parent), source=file)
    click.echo("added " + ", ".join(reply.get("added", [])))


@main.group("policy")
def policy_group() -> None:
    """Security policies of the running engine."""


@policy_group.command("list")
@_with_engine_opts
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def policy_list(config_path: str | None, socket_path: str | None, as_json: bool) -> None:
    """List the policies in lookup order with their counters."""
    pols = _call(config_path, socket_path, "policy-list")["policies"]
    if as_json:
        click.echo(json.dumps(pols, indent=2))
        return
    from .render import table

    rows = [[p["name"], p["dir"], p["priority"], p["src"], p["dst"], p["proto"], p["action"], p["sa"] or "-",
             (p.get("counters") or {}).get("packets")] for p in pols]
    click.echo(table(["name", "dir", "prio", "src", "dst", "proto", "action", "sa", "packets"], rows))


@policy_group.command("add")
@_with_engine_opts
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
def policy_add(config_path: str | None, socket_path: str | None, file: str) -> None:
    """Add the [[policy]] tables of FILE to the running engine (hooks are updated)."""
    _add_file(config_path, socket_path, file, "policy-add")


@policy_group.command("remove")
@_with_engine_opts
@click.argument("name")
def policy_remove(config_path: str | None, socket_path: str | None, name: str) -> None:
    """Remove a policy from the running engine (hooks are updated)."""
    _call(config_path, socket_path, "policy-remove", name=name)
    click.echo(f"removed policy {name}")


@main.command()
@_with_engine_opts
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "prometheus"]), default="text",
              show_default=True, help="Output format.")
def stats(config_path: str | None, socket_path: str | None, as_json: bool, fmt: str) -> None:
    """Counters: global errors (named like /proc/net/xfrm_stat), per SA, per policy, queues."""
    st = _call(config_path, socket_path, "stats")["stats"]
    if as_json or fmt == "json":
        click.echo(json.dumps(st, indent=2))
        return
    from .render import format_stats, prometheus

    click.echo(prometheus(st) if fmt == "prometheus" else format_stats(st), nl=False)


@main.command()
@click.option("--scenario", type=click.Choice(["all", "host", "site"]), default="all", show_default=True,
              help="host: two hosts with ESP transport; site: two gateways tunnelling two networks.")
@click.option("--peer", type=click.Choice(["nfq-ipsec", "kernel"]), default="nfq-ipsec", show_default=True,
              help="The other side: another nfq-ipsec, or the Linux kernel's IPsec in user-mode-linux "
                   "(host-to-host only; needs /usr/bin/linux.uml).")
def demo(scenario: str, peer: str) -> None:
    """See it work: builds namespaces, runs engines with the shipped rules/, sends ping, UDP
    and TCP through ESP, prints counters and a decrypted sample of the wire, cleans up.

    With --peer kernel the other host is the Linux kernel (ip xfrm, in user-mode-linux),
    configured from the same description with random keys; traffic runs both ways.

    Needs root. Nothing outside the namespaces it creates is touched.
    """
    from .demo import run_demo

    if not run_demo(scenario, peer=peer):
        sys.exit(1)


@main.command()
@_with_engine_opts
@click.option("--hook", type=click.Choice(["input", "output", "forward"]), default=None, help="Only this hook.")
@click.option("--verdict", type=click.Choice(["accept", "drop", "consumed"]), default=None, help="Only this verdict.")
@click.option("--host", default=None, help="Only packets from or to this address.")
@click.option("--proto", default=None, help="Only this protocol.")
@click.option("--port", type=int, default=None, help="Only packets from or to this port.")
@click.option("--sa", default=None, help="Only packets of this SA.")
@click.option("--rate", type=int, default=100, show_default=True, help="At most this many events per second.")
@click.option("--count", type=int, default=0, help="Stop after this many events (0: until Ctrl-C).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def trace(config_path: str | None, socket_path: str | None, as_json: bool, count: int, **flt: Any) -> None:
    """Live stream of per-packet decisions of the running engine (rate-limited): hook,
    addresses, SPI and sequence number, policy, SA, verdict and the reason for a drop."""
    from .control import ControlClient, ControlError

    req = {k: v for k, v in flt.items() if v is not None}
    try:
        c = ControlClient(_socket_path(config_path, socket_path))
        c.call("trace", **req)
        n = 0
        for ev in c.stream():
            if as_json:
                click.echo(json.dumps(ev))
            elif "suppressed" in ev:
                click.echo(f"... {ev['suppressed']} events suppressed (rate limit)")
            else:
                where = f"{ev.get('src', '?')}"
                if ev.get("sport") is not None:
                    where += f":{ev['sport']}"
                where += f" -> {ev.get('dst', '?')}"
                if ev.get("dport") is not None:
                    where += f":{ev['dport']}"
                extra = f" spi={ev['spi']} seq={ev.get('seq')}" if "spi" in ev else ""
                click.echo(f"{ev['hook']:<7} {ev['verdict']:<8} {where} proto={ev.get('proto')}{extra} "
                           f"policy={ev.get('policy') or '-'} sa={ev.get('sa') or '-'} ({ev.get('reason')})")
            n += 1
            if count and n >= count:
                break
    except ControlError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        pass


try:  # commands maintained in their own module (keys, import)
    from .cli_tools import explain_cmd, import_group, keys_cmd

    main.add_command(import_group)
    main.add_command(keys_cmd)
    main.add_command(explain_cmd)
except ImportError:  # pragma: no cover - during development only
    pass


if __name__ == "__main__":  # pragma: no cover
    main()
