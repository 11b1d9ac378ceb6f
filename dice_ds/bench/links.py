"""Emulated links for ``dice-ds bench``: N network namespaces, one per rank, joined by one bridge.

Owns creating and removing the namespaces (``Links`` is a context manager: whatever it created is
deleted on exit, also on Ctrl-C), shaping every rank's link with a token-bucket filter, and where
each rank runs. Topology: namespace ``ddsR<i>`` holds rank i's end of a veth pair (``dds<i>``,
address 10.200.0.<i+1>/24); the other ends (``brp<i>``) are ports of bridge ``ddsbr`` in a namespace
of its own. Nothing outside these namespaces is configured. ``ranks`` = 2 is the same topology as any
other N (a switch with two ports).

Shaping (docs/benchmarks.md "Link emulation"): ``tbf rate R burst B latency 100ms`` on both ends of
every rank's veth: the rank's end limits what it sends, the bridge's end what it receives, so each
rank has its own full-duplex link of rate R (a switch port), and in an all-to-all every rank sends
(W-1)/W of its rows through its own link while W-1 peers share its receiving side. The default
burst is small ("small": max(8 KB, 0.4 ms at line rate) in 8 KB steps, 16 KB at 300 mbit, 8 KB at
100 mbit): it holds line rate for bulk transfers without letting a sender that paused for compute
refill a large bucket and then leave far above line rate. ``burst="256kb"`` (or any tc size) keeps
the older setting for comparison.

Queue depth: Linux lets one TCP connection park up to ``tcp_limit_output_bytes`` (4 MB here) in the
qdisc, so behind a bulk transfer a small message on ANOTHER connection (the count exchange, a
dispatch behind a combine) waits for up to a whole tbf queue (100 ms of line rate): bufferbloat that
a cluster fabric, which interleaves connections at packet granularity, does not have. Inside every
rank's namespace the bench sets it to 64 KB by default (``sysctls``; ``--sysctl`` overrides, an
empty ``--sysctl`` list keeps the kernel's values).

Needs root (CAP_NET_ADMIN), ``ip`` and ``tc``; ``available()`` says why not otherwise. The loopback
link needs none of it: all ranks share one loopback (rank 0's namespace when there are namespaces,
else the host's).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

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


def addr(rank: int) -> str:
    """Rank ``rank``'s address on the emulated fabric."""
    return f"10.200.0.{rank + 1}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Links:
    """The namespaces of ``ranks`` ranks and their bridge; ``shape(link)`` sets every rank's rate,
    ``rank_env(link, rank, port)`` places a rank."""

    def __init__(self, use_netns: bool, sysctls: tuple[str, ...] = DEFAULT_SYSCTLS,
                 ranks: int = 2):
        if not 2 <= ranks <= 250:
            raise ValueError(f"ranks {ranks}: use 2 to 250")
        self.use_netns = use_netns
        self.sysctls = tuple(sysctls)
        self.ranks = ranks
        pid = os.getpid()
        self.ns = [f"ddsR{i}p{pid}" for i in range(ranks)]
        self.bridge_ns = f"ddsBr{pid}"
        self.burst_used: dict[str, str] = {}
        self._made: list[str] = []

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def __enter__(self) -> "Links":
        if not self.use_netns:
            return self
        try:
            self._add_ns(self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "add", "ddsbr", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "ddsbr", "up")
            for i, ns in enumerate(self.ns):
                self._add_ns(ns)
                _ip("link", "add", f"dds{i}", "netns", ns, "type", "veth", "peer", "name",
                    f"brp{i}", "netns", self.bridge_ns)
                _ip("-n", ns, "addr", "add", f"{addr(i)}/24", "dev", f"dds{i}")
                _ip("-n", ns, "link", "set", f"dds{i}", "up")
                _ip("-n", self.bridge_ns, "link", "set", f"brp{i}", "master", "ddsbr")
                _ip("-n", self.bridge_ns, "link", "set", f"brp{i}", "up")
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
        """Shape both ends of every rank's veth to ``link`` (a tc rate); loopback needs nothing."""
        if link == "loopback":
            return
        b = small_burst(link) if burst == "small" else burst
        for i, ns in enumerate(self.ns):
            for where, dev in ((ns, f"dds{i}"), (self.bridge_ns, f"brp{i}")):
                subprocess.run(["ip", "netns", "exec", where, "tc", "qdisc", "replace", "dev",
                                dev, "root", "tbf", "rate", link, "burst", b, "latency", "100ms"],
                               check=True, capture_output=True)
        self.burst_used[link] = b

    def rank_env(self, link: str, rank: int, port: int) -> tuple[list[str], dict]:
        """(command prefix, environment) placing ``rank`` of the ``ranks``-rank job on ``link``."""
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(self.ranks), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(self.ranks), MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        if link == "loopback":
            env.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
            prefix = ["ip", "netns", "exec", self.ns[0]] if self.use_netns else []
            return prefix, env
        if not self.use_netns:
            raise RuntimeError(f"link {link}: shaped links need network namespaces")
        env.update(MASTER_ADDR=addr(0), GLOO_SOCKET_IFNAME=f"dds{rank}")
        return ["ip", "netns", "exec", self.ns[rank]], env
