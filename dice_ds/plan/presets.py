"""Devices and links for ``dice-ds plan``: published peak numbers, efficiency, emulated rates.

Owns ``Device`` (sustained FLOP/s = published dense fp16/bf16 tensor peak x ``EFFICIENCY``),
``Link`` (bandwidth per direction per rank, one-way latency per message, and how many queued bytes
a small message may wait behind), the preset tables and ``parse_link`` ('pcie4', 'nvlink-h100',
'ib400', or a tc rate such as '300mbit').

Sources and assumptions (docs/plan.md "Presets"):

- peaks are the vendors' dense (no sparsity) tensor-core numbers: RTX 4090 165.2 TFLOP/s fp16
  with fp32 accumulate (Ada whitepaper), A100 312 (bf16), H100 SXM 989 (bf16);
- ``EFFICIENCY`` = 0.4: the fraction of peak a DiT inference step sustains (GEMMs of a few thousand
  rows; attention at T = 256; per-expert GEMMs of a few hundred rows run below peak). It scales
  every compute number alike, so it moves results between compute- and comm-bound;
- PCIe 4.0 x16 is 32 GB/s raw; RTX 4090s have no peer-to-peer, so an all-to-all goes through host
  memory: 12 GB/s per GPU per direction effective, 15 us per message (NCCL over PCIe/SHM);
- NVLink on H100 (NVSwitch): 450 GB/s per GPU per direction, all-to-all reaching ~70 %: 300 GB/s,
  8 us; 400 Gb/s InfiniBand (one NDR HCA per GPU): 50 GB/s raw, 40 GB/s effective, 10 us;
- a tc rate ('300mbit') is the emulated link of ``dice-ds bench``: bandwidth from the rate (or the
  bench's probe, ``calibrated_link``), 100 us per message, small messages wait behind at most
  64 KiB (the bench's ``tcp_limit_output_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dice_ds.bench.links import rate_bits
from dice_ds.bench.probe import own_cpu_per_byte

EFFICIENCY = 0.4


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float
    """dense fp16/bf16 tensor peak, FLOP/s."""
    efficiency: float = EFFICIENCY
    memory_gib: float = 0.0

    @property
    def flops(self) -> float:
        return self.peak_flops * self.efficiency


DEVICES = {
    "rtx4090": Device("RTX 4090", 165.2e12, memory_gib=24),
    "a100": Device("A100 SXM", 312e12, memory_gib=80),
    "h100": Device("H100 SXM", 989e12, memory_gib=80),
}


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float
    """bytes/s per rank per direction (what an all-to-all achieves)."""
    latency: float = 10e-6
    """seconds per message (one-way, incl. launch/host overhead)."""
    hol_bytes: float = 0.0
    """bytes a small message (counts) waits behind when the link is busy; 0: it overtakes."""
    single_bandwidth: float = 0.0
    """bytes/s per direction of a lone blocking exchange (nothing queued behind it) while the
    other direction also sends (0: ``bandwidth``). On the emulated links of ``dice-ds bench`` a
    lone all-to-all in both directions at once gets about half the throughput of two queued ones
    (the bench probe measures both; docs/plan.md "Link"); on GPU presets it is not modelled."""
    cpu_per_byte: float = 0.0
    """CPU seconds the transfer takes from the rank's compute per byte it sends or receives (the
    emulated links, where the network path shares the 2 cores with compute; 0 on GPUs)."""
    gather_bandwidth: float = 0.0
    """the same for a lone blocking all-gather (sync SP's K/V; 0: ``single_bandwidth``)."""
    cpu_own_per_byte: float = 0.0
    """a rank's own CPU seconds (its threads' user + system time: the kernel's TCP, bridge and
    shaping work done in its system calls included) per byte it sends, from the probe. When the
    ranks outnumber the cores (``simulate(cores=...)``), the g ranks of one collective cannot move
    more than cores / (g x this) bytes/s each: the network path alone keeps the cores busy
    (0: no such limit)."""

    @property
    def lone_rate(self) -> float:
        """bytes/s per direction of a lone exchange (``single_bandwidth``, else ``bandwidth``)."""
        return self.single_bandwidth or self.bandwidth


LINKS = {
    "pcie4": Link("PCIe 4.0 x16 (no P2P)", 12e9, 15e-6),
    "nvlink-h100": Link("NVLink 4 (H100, NVSwitch)", 300e9, 8e-6),
    "ib400": Link("400 Gb/s InfiniBand", 40e9, 10e-6),
    "loopback": Link("loopback (gloo, one host)", 0.6e9, 50e-6),
}

RATE_LATENCY = 100e-6
RATE_HOL = 64 * 1024


def parse_link(name: str) -> Link:
    """A preset name, a preset with its bandwidth replaced ('pcie4@6': 6 GB/s per direction), or a
    tc rate ('300mbit')."""
    if "@" in name:
        base, gbps = name.split("@", 1)
        link = parse_link(base)
        return replace(link, name=f"{link.name} at {gbps} GB/s", bandwidth=float(gbps) * 1e9)
    if name in LINKS:
        return LINKS[name]
    try:
        bits = rate_bits(name)
    except ValueError:
        raise ValueError(f"link {name!r}: use one of {', '.join(LINKS)} or a rate such as "
                         "300mbit") from None
    return Link(name, bits / 8, RATE_LATENCY, RATE_HOL)


def calibrated_link(name: str, probe: dict, cpu_per_byte: float = 0.0) -> Link:
    """The link ``name`` as the bench's probe (``dice_ds.bench.probe``) measured it: pipelined
    and lone all-to-all throughput, lone all-gather throughput; ``cpu_per_byte`` is the one
    emulation constant that is fitted (``dice_ds.plan.validate.fit_emulation``), on shaped links
    only (loopback moves 64 KB frames without a qdisc: no measurable CPU cost)."""
    base = LINKS["loopback"] if name == "loopback" else parse_link(name)
    lone = probe.get("lone_throughput_bits", 0.0) / 8
    return Link(f"{name} (probe)", probe["throughput_bits"] / 8, base.latency, base.hol_bytes,
                single_bandwidth=lone,
                gather_bandwidth=probe.get("gather_throughput_bits", 0.0) / 8,
                cpu_per_byte=0.0 if name == "loopback" else cpu_per_byte,
                cpu_own_per_byte=own_cpu_per_byte(probe) or 0.0)


def cpu_bound(link: Link, group: int, cores: float) -> Link:
    """``link`` as ``group`` ranks sharing ``cores`` cores see it in one collective: every rate
    at most cores / (group x ``cpu_own_per_byte``) (unchanged without a measured CPU cost)."""
    if cores <= 0 or link.cpu_own_per_byte <= 0:
        return link
    cap = cores / (group * link.cpu_own_per_byte)
    return replace(link, bandwidth=min(link.bandwidth, cap),
                   single_bandwidth=min(link.lone_rate, cap),
                   gather_bandwidth=min(link.gather_bandwidth or link.lone_rate, cap))


def parse_device(name: str) -> Device:
    if name not in DEVICES:
        raise ValueError(f"device {name!r}: use one of {', '.join(DEVICES)} or 'cpu' with "
                         "--bench-json")
    return DEVICES[name]
