"""Emulated cluster nodes: M network namespaces ("nodes") of K ranks each, joined by one bridge.

Owns building and removing a two-level fabric on one machine (``Nodes`` is a context manager:
whatever it created is deleted on exit, on an exception, on Ctrl-C and, inside ``with``, on
SIGTERM), shaping the link between nodes, and the per-node command prefix and environment a
launcher runs with. Topology: namespace ``ddsN<i>p<pid>`` is node i; its end of a veth pair
(``ddn<i>``, address 10.201.0.<i+1>/24) joins the bridge ``ddsbr`` in a namespace of its own. The
ranks of one node share the node's namespace, so traffic between them never leaves it (a packet
to a local address goes over the node's loopback, unshaped: the fast link inside a node); traffic
between nodes crosses two veths and the bridge, shaped on both ends of every node's veth to the
inter-node rate (``tbf``, the burst rule of ``dice_ds.bench.links``) and, when asked, delayed
(``netem``, one way per end, so a round trip adds 2 x latency).

Host names, as on a cluster: every node runs in a UTS namespace of its own whose host name is
``dds-node<i>``, and inside every node ``/etc/hosts`` (``ip netns exec`` binds
``/etc/netns/<ns>/hosts`` over it) resolves every node's name to its address. So launchers find
the master by name and torchrun's c10d rendezvous recognises, on node 0, that it hosts the store,
with the same arguments a real allocation gives them.

Nothing outside these namespaces is configured. Needs root (CAP_NET_ADMIN), ``ip`` and ``tc``:
``dice_ds.bench.links.available()`` says why not.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

from dice_ds.bench.links import DEFAULT_SYSCTLS, rate_bits, small_burst


def node_addr(node: int) -> str:
    """Node ``node``'s address on the emulated network (every rank of the node binds to it)."""
    return f"10.201.0.{node + 1}"


def node_name(node: int) -> str:
    """Node ``node``'s host name (resolvable inside every node, as on a cluster)."""
    return f"dds-node{node}"


def _run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, text=True)


class Nodes:
    """``nodes`` emulated hosts of ``ranks_per_node`` ranks; ``shape`` sets the network between
    them, ``node_env`` places a node's launcher."""

    def __init__(self, nodes: int, ranks_per_node: int, sysctls: tuple[str, ...] = DEFAULT_SYSCTLS):
        if not 2 <= nodes <= 250:
            raise ValueError(f"nodes {nodes}: use 2 to 250")
        if ranks_per_node < 1:
            raise ValueError(f"ranks_per_node {ranks_per_node}: use 1 or more")
        self.nodes, self.ranks_per_node = nodes, ranks_per_node
        self.sysctls = tuple(sysctls)
        pid = os.getpid()
        self.ns = [f"ddsN{i}p{pid}" for i in range(nodes)]
        self.bridge_ns = f"ddsNB{pid}"
        self._made: list[str] = []
        self._saved_term = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

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
                f"{node_addr(i)} {node_name(i)}\n" for i in range(self.nodes))
            for i, ns in enumerate(self.ns):
                self._add_ns(ns)
                os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
                with open(f"/etc/netns/{ns}/hosts", "w") as f:
                    f.write(hosts)
                _run("ip", "link", "add", f"ddn{i}", "netns", ns, "type", "veth", "peer", "name",
                     f"brn{i}", "netns", self.bridge_ns)
                _run("ip", "-n", ns, "addr", "add", f"{node_addr(i)}/24", "dev", f"ddn{i}")
                _run("ip", "-n", ns, "link", "set", f"ddn{i}", "up")
                _run("ip", "-n", self.bridge_ns, "link", "set", f"brn{i}", "master", "ddsbr")
                _run("ip", "-n", self.bridge_ns, "link", "set", f"brn{i}", "up")
                for kv in self.sysctls:
                    _run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", kv)
        except subprocess.CalledProcessError as e:
            self.__exit__(None, None, None)
            raise RuntimeError(f"creating the emulated nodes failed: {e.stderr.strip()}") from e
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
            for where, dev in ((ns, f"ddn{i}"), (self.bridge_ns, f"brn{i}")):
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

    def prefix(self, node: int) -> list[str]:
        """The command prefix that runs a program inside node ``node`` (its network and its host
        name)."""
        return ["ip", "netns", "exec", self.ns[node], "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', node_name(node)]

    def node_env(self, node: int, port: int, base: dict | None = None) -> dict:
        """The environment of node ``node``'s launcher: its ranks bind to the node's address
        (gloo's interface), the master is node 0, and the node's facts a cluster scheduler sets
        (NNODES, NODE_RANK, NPROC)."""
        env = dict(os.environ if base is None else base)
        env.update(MASTER_ADDR=node_name(0), MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=f"ddn{node}",
                   NNODES=str(self.nodes), NODE_RANK=str(node), NPROC=str(self.ranks_per_node),
                   OMP_NUM_THREADS="1")
        return env

    def cut_node(self, node: int) -> None:
        """Take node ``node`` off the network (its link down): its peers see silence, not a
        closed connection, so they wait until the collective timeout."""
        _run("ip", "-n", self.ns[node], "link", "set", f"ddn{node}", "down")

    def kill_node(self, node: int) -> None:
        """Kill every process running in node ``node`` (a node failure): SIGKILL, no clean-up."""
        pids = subprocess.run(["ip", "netns", "pids", self.ns[node]], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)
