"""Emulated links for ``dice-ds bench``: two network namespaces joined by a shaped veth pair.

Owns creating and removing the namespaces (``Links`` is a context manager: whatever it created is
deleted on exit, also on Ctrl-C), shaping both veth ends with a token-bucket filter, and where each
rank runs. Addresses 10.200.0.1 (namespace A, rank 0) and 10.200.0.2 (namespace B, rank 1) exist only
on interfaces inside those namespaces; nothing outside them is configured.

Shaping (docs/benchmarks.md "Link emulation"): ``tbf rate R burst B latency 100ms`` on each end. The
default burst is small ("small": max(8 KB, 0.4 ms at line rate) in 8 KB steps, 16 KB at 300 mbit, 8 KB at
100 mbit): it holds line rate for bulk transfers without letting a sender that paused for compute
refill a large bucket and then leave far above line rate. ``burst="256kb"`` (or any tc size) keeps
the older setting for comparison.

Queue depth: Linux lets one TCP connection park up to ``tcp_limit_output_bytes`` (4 MB here) in the
qdisc, so behind a bulk transfer a small message on ANOTHER connection (the count exchange, a
dispatch behind a combine) waits for up to a whole tbf queue (100 ms of line rate): bufferbloat that
a cluster fabric, which interleaves connections at packet granularity, does not have. Inside both
namespaces the bench sets it to 64 KB by default (``sysctls``; ``--sysctl`` overrides, an empty
``--sysctl`` list keeps the kernel's values).

Needs root (CAP_NET_ADMIN), ``ip`` and ``tc``; ``available()`` says why not otherwise. The loopback
link needs none of it: without root its ranks run on the host's loopback.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

ADDR = {"A": "10.200.0.1", "B": "10.200.0.2"}
DEFAULT_SYSCTLS = ("net.ipv4.tcp_limit_output_bytes=65536",)
_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}


def rate_bits(rate: str) -> float:
    """'300mbit' -> 3e8 bits/s (tc's decimal units)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit|bit)", rate.strip().lower())
    if not m:
        raise ValueError(f"link rate {rate!r}: use a tc rate such as 300mbit, 100mbit or 1gbit")
    return float(m.group(1)) * _UNITS[m.group(2)]


def small_burst(rate: str) -> str:
    """max(8 KB, 0.4 ms of line rate), rounded up to a multiple of 8 KB."""
    kb = 8 * max(1, -(-int(rate_bits(rate) / 8 * 4e-4) // 8192))
    return f"{kb}kb"


def available() -> str | None:
    """None when namespaces can be made here, else the reason (for a clear skip message)."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no '{tool}' command (iproute2)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Links:
    """The namespace pair; ``shape(link)`` sets the rate, ``where(link, rank)`` places a rank."""

    def __init__(self, use_netns: bool, sysctls: tuple[str, ...] = DEFAULT_SYSCTLS):
        self.use_netns = use_netns
        self.sysctls = tuple(sysctls)
        pid = os.getpid()
        self.ns = {"A": f"ddsA{pid}", "B": f"ddsB{pid}"}
        self.burst_used: dict[str, str] = {}
        self._made: list[str] = []

    def __enter__(self) -> "Links":
        if not self.use_netns:
            return self
        try:
            for side in ("A", "B"):
                _ip("netns", "add", self.ns[side])
                self._made.append(self.ns[side])
            a, b = self.ns["A"], self.ns["B"]
            _ip("link", "add", "vethA", "netns", a, "type", "veth", "peer", "name", "vethB",
                "netns", b)
            for ns, dev, side in ((a, "vethA", "A"), (b, "vethB", "B")):
                _ip("-n", ns, "addr", "add", f"{ADDR[side]}/24", "dev", dev)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", dev, "up")
                for kv in self.sysctls:
                    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", kv],
                                   check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            self.__exit__(None, None, None)
            raise RuntimeError(f"creating network namespaces failed: {e.stderr.strip()}") from e
        return self

    def __exit__(self, *exc) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()

    def shape(self, link: str, burst: str = "small") -> None:
        """Shape both veth ends to ``link`` (a tc rate); loopback needs nothing."""
        if link == "loopback":
            return
        b = small_burst(link) if burst == "small" else burst
        for side, dev in (("A", "vethA"), ("B", "vethB")):
            subprocess.run(["ip", "netns", "exec", self.ns[side], "tc", "qdisc", "replace", "dev",
                            dev, "root", "tbf", "rate", link, "burst", b, "latency", "100ms"],
                           check=True, capture_output=True)
        self.burst_used[link] = b

    def rank_env(self, link: str, rank: int, port: int) -> tuple[list[str], dict]:
        """(command prefix, environment) placing ``rank`` of a 2-rank job on ``link``."""
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE="2", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        if link == "loopback":
            env.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
            prefix = ["ip", "netns", "exec", self.ns["A"]] if self.use_netns else []
            return prefix, env
        if not self.use_netns:
            raise RuntimeError(f"link {link}: shaped links need network namespaces")
        env.update(MASTER_ADDR=ADDR["A"], GLOO_SOCKET_IFNAME="vethB" if rank else "vethA")
        return ["ip", "netns", "exec", self.ns["B" if rank else "A"]], env
