"""Emulated network on one machine: M network namespaces ("nodes") of K ranks each, one bridge.

Owns the one builder of the bench's and the tests' fabrics: ``Nodes`` creates and removes the
namespaces (a context manager: whatever it created is deleted on exit, on an exception, on Ctrl-C
and, inside ``with``, on SIGTERM), shapes the links between nodes, and says where each rank and
each node's launcher runs (command prefix, environment). ``dice_ds.bench.links.Links`` (the flat
fabric of ``dice-ds bench --ranks N``: every rank its own node) is ``Nodes(N, 1)``.

Topology: namespace ``dds<tag><i>p<pid>`` is node i; its end of a veth pair (``dds<i>``, address
10.<subnet>.0.<i+1>/24) joins the bridge ``ddsbr`` in a namespace of its own (``dds<tag>Bp<pid>``).
The ranks of one node share the node's namespace, so traffic between them never leaves it (a
packet to a local address goes over the node's loopback, unshaped: the fast link inside a node);
traffic between nodes crosses two veths and the bridge.

Shaping (docs/benchmarks.md "Link emulation"): ``tbf rate R burst B latency 100ms`` on both ends
of every node's veth: the node's end limits what it sends, the bridge's end what it receives, so
each node has its own full-duplex link of rate R (a switch port), and in an all-to-all every node
sends its share through its own link while the others share its receiving side. The default burst
is small ("small": max(8 KB, 0.4 ms at line rate) in 8 KB steps, 16 KB at 300 mbit, 8 KB at
100 mbit): it holds line rate for bulk transfers without letting a sender that paused for compute
refill a large bucket and then leave far above line rate; any tc size (``"256kb"``) keeps the
older setting. A latency (``netem``, one way per end: a round trip adds 2 x latency) needs a
kernel with netem; this one has none, which is one line.

Queue depth: Linux lets one TCP connection park up to ``tcp_limit_output_bytes`` (4 MB) in the
qdisc, so behind a bulk transfer a small message on ANOTHER connection waits for up to a whole tbf
queue (100 ms of line rate): bufferbloat that a cluster fabric, which interleaves connections at
packet granularity, does not have. Inside every node the fabric sets it to 64 KB by default
(``sysctls``; an empty tuple keeps the kernel's values).

Host names, as on a cluster (``host_names``, the default): every node runs in a UTS namespace of
its own whose host name is ``dds-node<i>``, and inside every node ``/etc/hosts`` (``ip netns
exec`` binds ``/etc/netns/<ns>/hosts`` over it) resolves every node's name to its address. So
launchers find the master by name, torchrun's c10d rendezvous recognises on node 0 that it hosts
the store, and the rank layout (``dice_ds.parallel.topology``) sees which ranks share a node.

Nothing outside these namespaces is configured. Needs root (CAP_NET_ADMIN), ``ip`` and ``tc``:
``available()`` says why not.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
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


NODE_SUBNET = 201
"""The emulated nodes' network: 10.201.0.0/24 (the flat fabric's is 10.200.0.0/24)."""


def node_addr(node: int, subnet: int = NODE_SUBNET) -> str:
    """Node ``node``'s address on the emulated network (every rank of the node binds to it)."""
    return f"10.{subnet}.0.{node + 1}"


def node_name(node: int) -> str:
    """Node ``node``'s host name (resolvable inside every node, as on a cluster)."""
    return f"dds-node{node}"


def _run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, text=True)


class Nodes:
    """``nodes`` emulated hosts of ``ranks_per_node`` ranks; ``shape`` sets the network between
    them, ``rank_env`` places a rank, ``node_env`` and ``prefix`` a node's launcher.

    ``tag`` and ``subnet`` name the namespaces and the addresses (two fabrics of one process
    differ in both); ``host_names`` gives every node its own host name (module docstring)."""

    def __init__(self, nodes: int, ranks_per_node: int, sysctls: tuple[str, ...] = DEFAULT_SYSCTLS,
                 *, tag: str = "N", subnet: int = NODE_SUBNET, host_names: bool = True):
        if not 2 <= nodes <= 250:
            raise ValueError(f"nodes {nodes}: use 2 to 250")
        if ranks_per_node < 1:
            raise ValueError(f"ranks_per_node {ranks_per_node}: use 1 or more")
        self.nodes, self.ranks_per_node = nodes, ranks_per_node
        self.sysctls = tuple(sysctls)
        self.subnet, self.host_names = subnet, host_names
        pid = os.getpid()
        self.ns = [f"dds{tag}{i}p{pid}" for i in range(nodes)]
        self.bridge_ns = f"dds{tag}Bp{pid}"
        self.burst_used: dict[str, str] = {}
        """tc burst each shaped rate was set with (the bench's report)."""
        self._made: list[str] = []
        self._saved_term = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def ranks(self) -> int:
        """Ranks of a job on this fabric (``dice_ds.bench.launch`` starts that many)."""
        return self.world_size

    def addr(self, node: int) -> str:
        return node_addr(node, self.subnet)

    @staticmethod
    def dev(node: int) -> str:
        """Node ``node``'s veth (gloo's interface there)."""
        return f"dds{node}"

    def node_of(self, rank: int) -> int:
        """The node rank ``rank`` of a job runs on (ranks numbered node by node, as launchers
        number them)."""
        return rank // self.ranks_per_node

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._made.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def __enter__(self) -> "Nodes":
        self._saved_term = signal.getsignal(signal.SIGTERM)
        if self._saved_term in (signal.SIG_DFL, None):  # SIGTERM unwinds through __exit__
            signal.signal(signal.SIGTERM, _raise_exit)
        try:
            self._add_ns(self.bridge_ns)
            _run("ip", "-n", self.bridge_ns, "link", "add", "ddsbr", "type", "bridge")
            _run("ip", "-n", self.bridge_ns, "link", "set", "ddsbr", "up")
            hosts = "127.0.0.1 localhost\n" + "".join(
                f"{self.addr(i)} {node_name(i)}\n" for i in range(self.nodes))
            for i, ns in enumerate(self.ns):
                self._add_ns(ns)
                if self.host_names:
                    os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
                    with open(f"/etc/netns/{ns}/hosts", "w") as f:
                        f.write(hosts)
                _run("ip", "link", "add", self.dev(i), "netns", ns, "type", "veth", "peer", "name",
                     f"brp{i}", "netns", self.bridge_ns)
                _run("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", self.dev(i))
                _run("ip", "-n", ns, "link", "set", self.dev(i), "up")
                _run("ip", "-n", self.bridge_ns, "link", "set", f"brp{i}", "master", "ddsbr")
                _run("ip", "-n", self.bridge_ns, "link", "set", f"brp{i}", "up")
                for kv in self.sysctls:
                    _run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", kv)
        except subprocess.CalledProcessError as e:
            self.__exit__(None, None, None)
            raise RuntimeError(f"creating the emulated network failed: {e.stderr.strip()}") from e
        return self

    def __exit__(self, *exc) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            with contextlib.suppress(FileNotFoundError, OSError):
                os.remove(f"/etc/netns/{ns}/hosts")
                os.rmdir(f"/etc/netns/{ns}")
        self._made.clear()
        if self._saved_term is not None:
            signal.signal(signal.SIGTERM, self._saved_term)
            self._saved_term = None

    def shape(self, rate: str | None, latency_ms: float = 0.0, burst: str = "small") -> None:
        """The link between nodes: ``rate`` (a tc rate, None: unshaped) and a one-way delay per
        veth end. Inside a node nothing is shaped."""
        if rate is not None:
            rate_bits(rate)  # a clear error for a bad rate
        if latency_ms < 0:
            raise ValueError(f"latency_ms {latency_ms}: must be >= 0")
        for i, ns in enumerate(self.ns):
            for where, dev in ((ns, self.dev(i)), (self.bridge_ns, f"brp{i}")):
                tc = ["ip", "netns", "exec", where, "tc", "qdisc"]
                subprocess.run([*tc, "del", "dev", dev, "root"], capture_output=True)
                parent = ["root"]
                if latency_ms > 0:
                    try:
                        _run(*tc, "add", "dev", dev, "root", "handle", "1:", "netem", "delay",
                             f"{latency_ms}ms")
                    except subprocess.CalledProcessError as e:
                        raise RuntimeError(f"latency {latency_ms} ms needs tc's netem qdisc, which "
                                           f"this kernel lacks ({e.stderr.strip()}): shape the "
                                           "rate only") from None
                    parent = ["parent", "1:1"]
                if rate is not None:
                    b = small_burst(rate) if burst == "small" else burst
                    _run(*tc, "add", "dev", dev, *parent, "handle", "10:", "tbf", "rate", rate,
                         "burst", b, "latency", "100ms")
                    self.burst_used[rate] = b

    def prefix(self, node: int) -> list[str]:
        """The command prefix that runs a program inside node ``node`` (its network and, with
        ``host_names``, its host name)."""
        netns = ["ip", "netns", "exec", self.ns[node]]
        if not self.host_names:
            return netns
        return [*netns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                node_name(node)]

    def node_env(self, node: int, port: int, base: dict | None = None) -> dict:
        """The environment of node ``node``'s launcher: its ranks bind to the node's address
        (gloo's interface), the master is node 0, and the node's facts a cluster scheduler sets
        (NNODES, NODE_RANK, NPROC)."""
        env = dict(os.environ if base is None else base)
        env.update(MASTER_ADDR=node_name(0) if self.host_names else self.addr(0),
                   MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=self.dev(node),
                   NNODES=str(self.nodes), NODE_RANK=str(node), NPROC=str(self.ranks_per_node),
                   OMP_NUM_THREADS="1")
        return env

    def rank_env(self, link: str, rank: int, port: int) -> tuple[list[str], dict]:
        """(command prefix, environment) of rank ``rank`` of a job started without a launcher
        (``dice_ds.bench.launch``): on its node, numbered node by node, as a launcher would set
        it. ``link`` names the shaping (``shape``), which placing a rank does not change."""
        node = self.node_of(rank)
        env = self.node_env(node, port)
        env.update(RANK=str(rank), WORLD_SIZE=str(self.world_size),
                   LOCAL_RANK=str(rank % self.ranks_per_node),
                   LOCAL_WORLD_SIZE=str(self.ranks_per_node))
        return self.prefix(node), env

    def cut_node(self, node: int) -> None:
        """Take node ``node`` off the network (its link down): its peers see silence, not a
        closed connection, so they wait until the collective timeout."""
        _run("ip", "-n", self.ns[node], "link", "set", self.dev(node), "down")

    def kill_node(self, node: int) -> None:
        """Kill every process running in node ``node`` (a node failure): SIGKILL, no clean-up."""
        pids = subprocess.run(["ip", "netns", "pids", self.ns[node]], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)
