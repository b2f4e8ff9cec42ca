"""A Linux kernel IPsec peer in user-mode-linux (UML), attached to a tap device in a namespace.

The host kernel here may have no ESP at all; Debian's `user-mode-linux` package ships a Linux 6.1
kernel that runs as an ordinary process, with its own XFRM stack and esp4/esp6/ah4/ah6 modules.

    namespace (ours): tap 198.51.100.1 2001:db8:100::1  <== ethernet ==>  UML vec0 .2 / ::2

UML boots with the host's / as its root (hostfs, read-write), runs our init script (mounts,
module preloading, addresses, then `uml_agent.py`), and from then on takes commands through
files in a shared run directory (see uml_agent.py). Boot to ready is about 2 s. Used by the
interoperability tests (tests/interop) and by `nfq-ipsec demo --peer kernel`; docs/interop.md.

Things that needed care (each one cost a failed boot):

* Crypto modules. esp4/esp6 allocate `seqiv(...)`/`echainiv(...)`, which seed from the kernel's
  `stdrng` (module drbg, which needs hmac + sha512_generic). The kernel's own module loader
  looks in /lib/modules/<uml version>, which does not exist on the host file system: every
  module is preloaded from /usr/lib/uml/modules through a /mnt/lib/modules symlink, and
  /proc/sys/kernel/modprobe points at a `modprobe -d /mnt` wrapper for anything else.
* FPU state on hosts with AMX (or any XSAVE layout other than the 2696 bytes Debian's UML was
  built for). UML 6.1 saves/restores its processes' FPU state with PTRACE_{GET,SET}REGSET
  NT_X86_XSTATE and a fixed-size buffer; recent host kernels refuse a SETREGSET whose size is not
  exactly theirs (EFAULT), so the first context switch kills init ("ptrace set fp regs failed,
  errno = 14"). We run a copy of the binary with one byte changed so that UML believes the host
  has no XSTATE support and uses PTRACE_{GET,SET}FPREGS (x87/SSE state only), and hide AVX from
  every process inside UML (GLIBC_TUNABLES, OPENSSL_ia32cap): the upper halves of the vector
  registers are no longer saved across page faults, which silently corrupts AVX memcpy().
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .interop import OURS_INNER4, OURS_INNER6, OURS_LINK4, OURS_LINK6, UML_INNER4, UML_INNER6, UML_LINK4, UML_LINK6
from .netns import Namespace

UML_BIN = Path(os.environ.get("NFQ_INTEROP_UML", "/usr/bin/linux.uml"))
UML_MODULES = Path("/usr/lib/uml/modules")
AGENT = Path(__file__).with_name("uml_agent.py")

# Environment of every process inside UML: no AVX (see the module docstring).
UML_ENV = {
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX2,-AVX,-AVX_Fast_Unaligned_Load",
    "OPENSSL_ia32cap": "~0x1000000000000000:0",
}

MODULES = (
    "xfrm_user xfrm_algo ipv6 esp4 esp6 ah4 ah6 "
    "sha512_generic hmac jitterentropy_rng drbg "  # stdrng for seqiv/echainiv
    "ctr ghash-generic gcm seqiv chacha_generic poly1305_generic chacha20poly1305 cbc authenc echainiv"
)

# `mov $0x202,%edx; ...; mov $0x4204,%edi` (PTRACE_GETREGSET, NT_X86_XSTATE) in arch_init_registers(),
# followed by `movl $0x1,(%rax)`: have_xstate_support = 1. We store 0 instead.
_XSTATE_PATTERN = re.compile(rb"\xba\x02\x02\x00\x00.{0,8}\xbf\x04\x42\x00\x00.{0,40}?\xc7\x00\x01\x00\x00\x00",
                             re.S)


class UmlError(RuntimeError):
    pass


def uml_missing_reason() -> str | None:
    """Why the UML peer cannot run here (None if it can)."""
    if not UML_BIN.exists():
        return f"{UML_BIN} is missing: apt-get install user-mode-linux (./setup.sh installs it)"
    if os.geteuid() != 0:
        return "needs root (namespaces, tap devices)"
    if not any(UML_MODULES.glob("*/modules.dep")):
        return f"no UML kernel modules under {UML_MODULES}"
    for tool in ("modprobe", "tcpdump", "ip"):
        if shutil.which(tool) is None and not Path("/sbin", tool).exists():
            return f"{tool} missing (apt-get install kmod tcpdump iproute2)"
    return None


def uml_binary() -> Path:
    """A copy of linux.uml that never uses PTRACE_SETREGSET for FPU state (see module docstring).

    Cached per content hash in the temp directory; falls back to the original binary if the
    instruction pattern is not found exactly once (another build: hope it does not need it).
    """
    data = UML_BIN.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "nfq-interop-uml"
    patched = cache / f"linux.uml.{digest}.noxstate"
    if patched.exists():
        return patched
    matches = list(_XSTATE_PATTERN.finditer(data))
    if len(matches) != 1:
        return UML_BIN
    buf = bytearray(data)
    buf[matches[0].end() - 4] = 0
    cache.mkdir(mode=0o700, exist_ok=True)
    tmp = cache / f".{patched.name}.{os.getpid()}"
    tmp.write_bytes(bytes(buf))
    tmp.chmod(0o755)
    tmp.rename(patched)
    return patched


@dataclass
class Result:
    cmd: str
    rc: int
    out: str
    timed_out: bool
    elapsed: float

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def __str__(self) -> str:
        state = "timed out" if self.timed_out else f"exit {self.rc}"
        return f"[uml] $ {self.cmd}\n({state}, {self.elapsed:.2f}s)\n{self.out}"


class Job:
    """A command running inside UML."""

    def __init__(self, peer: UmlPeer, job_id: str, cmd: str, timeout: float) -> None:
        self.peer, self.id, self.cmd, self.timeout = peer, job_id, cmd, timeout
        self.t0 = time.monotonic()
        self._result: Result | None = None

    def done(self) -> bool:
        return self._result is not None or (self.peer.res_dir / f"{self.id}.json").exists()

    def output(self) -> str:
        """What the command printed so far (best effort while it runs: UML's page cache)."""
        try:
            return (self.peer.res_dir / f"{self.id}.out").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> Result:
        """Stop the command (e.g. a server) and return what it printed."""
        if not self.done():
            self.peer._submit({"id": f"k{self.id}", "op": "kill", "target": self.id})
        return self.wait()

    def wait(self, extra: float = 15.0) -> Result:
        if self._result is not None:
            return self._result
        res = self.peer.res_dir / f"{self.id}.json"
        deadline = self.t0 + self.timeout + extra
        while not res.exists():
            if not self.peer.alive():
                raise UmlError(f"UML died while running {self.cmd!r}\n{self.peer.console_tail()}")
            if time.monotonic() > deadline:
                raise UmlError(f"no answer from the UML agent for {self.cmd!r} after {self.timeout + extra:.0f}s\n"
                               f"{self.peer.console_tail()}")
            time.sleep(0.01)
        meta = json.loads(res.read_text())
        self._result = Result(self.cmd, int(meta["rc"]), self.output() + meta.get("error", ""),
                              bool(meta["timed_out"]), float(meta["elapsed"]))
        return self._result


class UmlPeer:
    """One UML kernel attached to tap `tap` of namespace `ns`; commands run through the agent."""

    def __init__(self, ns: Namespace, tap: str, rundir: Path, mem: str = "256M") -> None:
        self.ns, self.tap, self.rundir, self.mem = ns, tap, rundir, mem
        self.cmd_dir, self.res_dir = rundir / "cmd", rundir / "res"
        self.console = rundir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._seq = 0
        self.boot_seconds = 0.0

    # -- life cycle ---------------------------------------------------------------------------------
    def _init_script(self) -> str:
        kver = next(p.parent.name for p in sorted(UML_MODULES.glob("*/modules.dep")))
        modprobe = shutil.which("modprobe") or "/sbin/modprobe"
        q = shlex.quote
        return f"""#!/bin/sh
# PID 1 of the UML peer (generated by nfq_ipsec/umlpeer.py); the root fs is the host's
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
RUNDIR={q(str(self.rundir))}
fail() {{ echo "UMLPEER-ERROR: $*"; echo "$*" > "$RUNDIR/error"; dmesg | tail -n 15; poweroff -f; sleep 5; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o size=8m,mode=755 tmpfs /mnt || fail "tmpfs /mnt"
mkdir -p /mnt/lib/modules && ln -s {q(str(UML_MODULES / kver))} /mnt/lib/modules/{q(kver)}
printf '#!/bin/sh\\nexec {modprobe} -d /mnt "$@"\\n' > /mnt/modprobe && chmod 755 /mnt/modprobe
echo /mnt/modprobe > /proc/sys/kernel/modprobe
{modprobe} -d /mnt -a {MODULES} || fail "modprobe -a {MODULES}"
sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 \\
    net.ipv6.conf.default.accept_ra=0 net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.router_solicitations=0
ip link set lo up
ip link set vec0 up || fail "no vec0"
ip addr add {UML_LINK4}/24 dev vec0 || fail "addr"
ip -6 addr add {UML_LINK6}/64 dev vec0 nodad || fail "addr6"
ip addr add {UML_INNER4}/32 dev lo && ip -6 addr add {UML_INNER6}/128 dev lo || fail "inner addresses"
ip route add {OURS_INNER4}/32 via {OURS_LINK4} src {UML_INNER4} || fail "inner route"
ip -6 route add {OURS_INNER6}/128 via {OURS_LINK6} src {UML_INNER6} || fail "inner route6"
{q(sys.executable)} {q(str(AGENT))} "$RUNDIR" > "$RUNDIR/agent.log" 2>&1
echo "UMLPEER: agent exited $?"
poweroff -f
sleep 5
"""

    def start(self, timeout: float = 60.0) -> None:
        for d in (self.cmd_dir, self.res_dir):
            d.mkdir(parents=True, exist_ok=True)
        init = self.rundir / "init.sh"
        init.write_text(self._init_script())
        init.chmod(0o755)
        env_args = [f"{k}={v}" for k, v in UML_ENV.items()]
        argv = [str(uml_binary()), f"mem={self.mem}", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "rw",
                f"init={init}", f"vec0:transport=tap,ifname={self.tap}", "con=null", "con0=null,fd:1", "quiet",
                f"uml_dir={self.rundir}", "umid=uml", *env_args]
        t0 = time.monotonic()
        with open(self.console, "wb") as out:
            self.proc = self.ns.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        ready = self.rundir / "agent-ready"
        while not ready.exists():
            if (self.rundir / "error").exists() or not self.alive():
                self.stop()
                raise UmlError(f"UML failed to boot\n{self.console_tail()}")
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise UmlError(f"UML not ready after {timeout}s\n{self.console_tail()}")
            time.sleep(0.02)
        self.boot_seconds = time.monotonic() - t0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.alive():
            try:
                self._submit({"op": "exit"})
                self.proc.wait(timeout)
            except (subprocess.TimeoutExpired, OSError):
                pass
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except FileNotFoundError:
            return "(no console output)"
        agent = self.rundir / "agent.log"
        if agent.exists():
            text += "\n--- agent.log ---\n" + agent.read_text(errors="replace")
        return "--- UML console (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    # -- commands -----------------------------------------------------------------------------------
    def _submit(self, req: dict[str, object]) -> None:
        name = str(req.get("id", "zz-exit"))
        tmp = self.cmd_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(req))
        tmp.rename(self.cmd_dir / f"{name}.json")

    def spawn(self, cmd: str, timeout: float = 30.0) -> Job:
        """Start `cmd` (sh syntax) inside UML; it is killed after `timeout` seconds."""
        if not self.alive():
            raise UmlError(f"UML is not running\n{self.console_tail()}")
        self._seq += 1
        job = Job(self, f"c{self._seq:05d}", cmd, timeout)
        self._submit({"id": job.id, "sh": cmd, "timeout": timeout})
        return job

    def run(self, cmd: str, timeout: float = 30.0, check: bool = True) -> Result:
        r = self.spawn(cmd, timeout).wait()
        if check and not r.ok:
            raise UmlError(str(r))
        return r

    def python(self, *args: str, timeout: float = 30.0) -> Job:
        """Start the host's Python inside UML (nfq_ipsec importable for its traffic tools)."""
        root = str(Path(__file__).resolve().parents[1])  # the directory holding the nfq_ipsec package
        cmd = f"cd {shlex.quote(root)} && exec {shlex.quote(sys.executable)} " + " ".join(map(shlex.quote, args))
        return self.spawn(cmd, timeout)

    def wait_listening(self, proto: str, port: int, timeout: float = 10.0) -> bool:
        """Wait until a server inside UML listens on `port` (its own output is not reliably visible yet)."""
        flag = "-Hlnu" if proto == "udp" else "-Hlnt"
        rounds = max(1, int(timeout / 0.05))
        r = self.run(f"for i in $(seq {rounds}); do ss {flag} 'sport = :{port}' | grep -q . && exit 0; sleep 0.05; "
                     "done; exit 1", timeout=timeout + 10, check=False)
        return r.ok

    # -- XFRM -------------------------------------------------------------------------------------
    def xfrm_apply(self, batch: list[str]) -> None:
        """Replace the kernel's SAs and policies by `batch` (ip -batch lines)."""
        path = self.rundir / "xfrm.batch"
        path.write_text("\n".join(["xfrm policy flush", "xfrm state flush", *batch]) + "\n")
        self.run(f"ip -batch {shlex.quote(str(path))}", timeout=30)

    def xfrm_state(self) -> dict[int, KernelSa]:
        """Per-SPI state of the kernel's SAs (ip -s xfrm state)."""
        return parse_xfrm_state(self.run("ip -s xfrm state").out)

    def xfrm_stat(self) -> dict[str, int]:
        """/proc/net/xfrm_stat, non-zero counters only."""
        out = self.run("cat /proc/net/xfrm_stat").out
        stats = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit() and int(parts[1]):
                stats[parts[0]] = int(parts[1])
        return stats


def prepare_namespace(ns: Namespace, tap: str) -> None:
    """Create the tap device the UML kernel attaches to, with our side's addresses and routes.

    Link addresses on the tap, tunnel-inner addresses on lo, routes to the kernel's inner
    addresses through its link address (the kernel side is configured by the init script).
    """
    ns.run(["ip", "tuntap", "add", tap, "mode", "tap"])
    ns.sysctl(f"net.ipv6.conf.{tap}.accept_dad", "0")
    ns.sysctl(f"net.ipv6.conf.{tap}.accept_ra", "0")
    ns.run(["ip", "link", "set", tap, "up"])
    ns.run(["ip", "addr", "add", f"{OURS_LINK4}/24", "dev", tap])
    ns.run(["ip", "-6", "addr", "add", f"{OURS_LINK6}/64", "dev", tap, "nodad"])
    ns.run(["ip", "addr", "add", f"{OURS_INNER4}/32", "dev", "lo"])
    ns.run(["ip", "-6", "addr", "add", f"{OURS_INNER6}/128", "dev", "lo"])
    ns.run(["ip", "route", "add", f"{UML_INNER4}/32", "via", UML_LINK4, "src", OURS_INNER4])
    ns.run(["ip", "-6", "route", "add", f"{UML_INNER6}/128", "via", UML_LINK6, "src", OURS_INNER6])


@dataclass
class KernelSa:
    spi: int
    src: str
    dst: str
    packets: int = 0
    bytes: int = 0
    replay: int = 0  # packets dropped by the anti-replay check
    integrity_failed: int = 0
    replay_window_drops: int = 0
    seq_hi: int = 0  # ESN: high 32 bits of the highest sequence number received
    oseq_hi: int = 0  # ESN: high 32 bits of the last sequence number sent
    seq: int = 0
    oseq: int = 0


def parse_xfrm_state(text: str) -> dict[int, KernelSa]:
    sas: dict[int, KernelSa] = {}
    cur: KernelSa | None = None
    src = dst = ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if line.startswith("src "):
            parts = s.split()
            src, dst = parts[1], parts[3]
        elif s.startswith("proto ") and " spi " in s:
            spi = int(s.split(" spi ")[1].split("(")[0], 16)
            cur = sas[spi] = KernelSa(spi, src, dst)
        elif cur is None:
            continue
        elif s.startswith("lifetime current:") and i + 1 < len(lines):
            m = re.match(r"\s*(\d+)\(bytes\), (\d+)\(packets\)", lines[i + 1])
            if m:
                cur.bytes, cur.packets = int(m.group(1)), int(m.group(2))
        elif s.startswith("replay-window ") and " failed " in s:
            m = re.search(r"replay-window (\d+) replay (\d+) failed (\d+)", s)
            if m:
                cur.replay_window_drops, cur.replay, cur.integrity_failed = map(int, m.groups())
        elif " oseq " in s:  # "anti-replay context: seq 0x.., oseq 0x.." or the ESN context's second line
            for key in ("seq-hi", "oseq-hi", "seq", "oseq"):
                m = re.search(rf"(?<![-\w]){key} (0x[0-9a-f]+)", s)
                if m:
                    setattr(cur, key.replace("-", "_"), int(m.group(1), 16))
    return sas
