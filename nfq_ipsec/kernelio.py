"""The engine's I/O helpers: TUN device, raw sockets, path MTU and local-address oracles.

Everything here touches the kernel; the pipeline only sees the callables and the side-effect
objects these helpers execute.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import subprocess
import time

SO_MARK = 36
IP_MTU = 14
IPV6_MTU = 24
IPV6_HDRINCL = 36
IP_MTU_DISCOVER = 10
IP_PMTUDISC_PROBE = 3
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_PROBE = 3

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100


class TunDevice:
    """A TUN device used to hand decrypted tunnel-mode packets back to the kernel.

    Writing an IP packet to it makes the kernel receive it as if it arrived on that interface:
    it is routed, delivered locally or forwarded (and then meets the FORWARD hook), exactly
    like any other arriving packet, all inside the write() call (no NAPI: measured cheaper).

    Reverse-path filtering: the inner source is naturally reachable through another interface,
    so rp_filter is switched off on this device. The kernel applies max(conf.all, conf.<dev>),
    and as the device has no IPv4 address even loose mode (2) drops every packet whose source
    is not routed through the device itself; `rp_filter` holds the mode that really applies,
    and a warning says when it is not 0 (the kernel drops such packets silently).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        try:
            # multi-queue: several worker processes each attach their own queue to one device
            ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            # through /proc/sys, not sysctl(8), which would read the dots of a name like "tun.1" as separators
            for key, value in (
                (f"ipv4/conf/{name}/rp_filter", "0"),
                (f"ipv4/conf/{name}/accept_local", "1"),
                (f"ipv6/conf/{name}/disable_ipv6", "0"),
            ):
                self._sysctl(key, value)
            subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)
            self.ifindex = socket.if_nametoindex(name)
            self.drops = 0
            self.rp_filter = max(self._sysctl_int("ipv4/conf/all/rp_filter"),
                                 self._sysctl_int(f"ipv4/conf/{name}/rp_filter"))
            if self.rp_filter:
                logging.getLogger("nfq_ipsec").warning(
                    "reverse-path filtering (mode %d, from net.ipv4.conf.all.rp_filter) applies to %s: the kernel "
                    "silently drops every decrypted tunnel-mode packet whose inner source is not routed via %s "
                    "(IPReversePathFilter in /proc/net/netstat); set net.ipv4.conf.all.rp_filter=0 and enable it "
                    "on the other interfaces one by one", self.rp_filter, name, name)
        except BaseException:
            os.close(self.fd)
            raise

    @staticmethod
    def _sysctl(key: str, value: str) -> None:
        try:
            with open(f"/proc/sys/net/{key}", "w") as f:
                f.write(value)
        except OSError:
            pass  # e.g. no IPv6 in this kernel: best effort, as before

    @staticmethod
    def _sysctl_int(key: str) -> int:
        try:
            with open(f"/proc/sys/net/{key}") as f:
                return int(f.read())
        except (OSError, ValueError):
            return 0

    def write(self, packet: bytes) -> None:
        try:
            os.write(self.fd, packet)
        except OSError:
            self.drops += 1  # the kernel's backlog is full (or the packet refused): counted, like a congested link

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # a non-persistent TUN device disappears with its last fd
            self.fd = -1


class RawSender:
    """Raw sockets (marked so our own iptables rules let them pass) for packets we emit."""

    def __init__(self, mark: int) -> None:
        self.mark = mark
        self.ip4 = self._sock(socket.AF_INET, socket.IPPROTO_RAW)
        self.ip6 = self._sock(socket.AF_INET6, socket.IPPROTO_RAW)
        self.ip6.setsockopt(socket.IPPROTO_IPV6, IPV6_HDRINCL, 1)
        # PROBE: the kernel checks our packets against the device MTU only, not the path-MTU
        # cache. In transport mode (and host-to-host tunnels) the inner flow and the ESP
        # packets share one destination; the MTU we advertise to the inner sender lowers that
        # destination's cached PMTU, and the kernel must not then drop the (larger) ESP.
        self.ip4.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
        self.ip6.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE)
        self.icmp4 = self._sock(socket.AF_INET, socket.IPPROTO_ICMP)
        self.icmp6 = self._sock(socket.AF_INET6, socket.IPPROTO_ICMPV6)
        self.errors = 0
        self._addrs: dict[bytes, tuple[str, int]] = {}  # packed destination -> sendto() address

    def _sock(self, family: int, proto: int) -> socket.socket:
        s = socket.socket(family, socket.SOCK_RAW, proto)
        s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
        s.setblocking(False)
        return s

    def send_ip(self, family: int, packet: bytes, dst: bytes) -> None:
        addr = self._addrs.get(dst)
        if addr is None:  # inet_ntop and a tuple per packet cost more than the dict lookup
            if len(self._addrs) > 4096:
                self._addrs.clear()
            addr = self._addrs[dst] = (socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, dst), 0)
        try:
            (self.ip4 if family == 4 else self.ip6).sendto(packet, addr)
        except OSError:
            self.errors += 1

    def send_icmp(self, family: int, dst: bytes, message: bytes) -> None:
        try:
            if family == 4:
                self.icmp4.sendto(message, (socket.inet_ntop(socket.AF_INET, dst), 0))
            else:
                self.icmp6.sendto(message, (socket.inet_ntop(socket.AF_INET6, dst), 0))
        except OSError:
            self.errors += 1

    def close(self) -> None:
        for s in (self.ip4, self.ip6, self.icmp4, self.icmp6):
            s.close()


class PathMtu:
    """MTU of the interface the route to a destination leaves by (and of the route, if set).

    Deliberately not the kernel's path-MTU cache: for transport mode and host-to-host tunnels
    that cache also holds the inner MTU we advertised with ICMP (same destination), and
    reading it back would ratchet our own MTU down. Cached for a few seconds per destination.
    """

    def __init__(self, ttl: float = 5.0, default: int = 1500) -> None:
        self.ttl = ttl
        self.default = default
        self._cache: dict[bytes, tuple[int, float]] = {}

    def __call__(self, family: int, dst: bytes) -> int:
        now = time.monotonic()
        hit = self._cache.get(dst)
        if hit is not None and hit[1] > now:
            return hit[0]
        mtu = self._query(family, dst)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[dst] = (mtu, now + self.ttl)
        return mtu

    def _query(self, family: int, dst: bytes) -> int:
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        try:
            out = subprocess.run(["ip", "-o", f"-{family}", "route", "get", socket.inet_ntop(af, dst)],
                                 capture_output=True, text=True, timeout=2).stdout
        except (OSError, subprocess.SubprocessError):
            return self.default
        words = out.split("cache")[0].split()
        mtu = self.default
        if "dev" in words:
            dev = words[words.index("dev") + 1]
            try:
                with open(f"/sys/class/net/{dev}/mtu") as f:
                    mtu = int(f.read())
            except (OSError, ValueError):
                pass
        if "mtu" in words:
            i = words.index("mtu") + 1
            if i < len(words) and words[i] == "lock":
                i += 1
            if i < len(words) and words[i].isdigit():
                mtu = min(mtu, int(words[i]))
        return mtu

    def invalidate(self) -> None:
        self._cache.clear()


class LocalAddresses:
    """Is an address one of this host's? (bind() succeeds only for local addresses.) Cached."""

    def __init__(self, ttl: float = 2.0) -> None:
        self.ttl = ttl
        self._cache: dict[bytes, tuple[bool, float]] = {}

    def __call__(self, family: int, addr: bytes) -> bool:
        now = time.monotonic()
        hit = self._cache.get(addr)
        if hit is not None and hit[1] > now:
            return hit[0]
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        try:
            with socket.socket(af, socket.SOCK_DGRAM) as s:
                s.bind((socket.inet_ntop(af, addr), 0))
            local = True
        except OSError:
            local = False
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[addr] = (local, now + self.ttl)
        return local
