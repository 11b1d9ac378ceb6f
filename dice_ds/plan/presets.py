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

from dataclasses import dataclass

from dice_ds.bench.links import rate_bits

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
    cpu_dilation: float = 0.0
    """compute runs (1 + this) times slower while the rank's link carries traffic (the emulated
    links of the 2-core bench, where the transfer itself takes CPU; 0 on GPUs)."""


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
        return Link(f"{link.name} at {gbps} GB/s", float(gbps) * 1e9, link.latency,
                    link.hol_bytes, link.cpu_dilation)
    if name in LINKS:
        return LINKS[name]
    try:
        bits = rate_bits(name)
    except ValueError:
        raise ValueError(f"link {name!r}: use one of {', '.join(LINKS)} or a rate such as "
                         "300mbit") from None
    return Link(name, bits / 8, RATE_LATENCY, RATE_HOL)


def calibrated_link(name: str, throughput_bits: float, efficiency: float = 1.0,
                    hol_bytes: float | None = None, cpu_dilation: float = 0.0) -> Link:
    """The emulated link ``name`` with the bandwidth the bench's probe measured on it, optionally
    with emulation constants fitted by ``dice_ds.plan.validate.fit_emulation``: the fraction of
    the probe's throughput a run's exchanges get, the bytes a small message waits behind, and
    the CPU dilation."""
    base = parse_link(name)
    return Link(f"{name} (probe)", throughput_bits / 8 * efficiency, base.latency,
                base.hol_bytes if hol_bytes is None else hol_bytes, cpu_dilation)


def parse_device(name: str) -> Device:
    if name not in DEVICES:
        raise ValueError(f"device {name!r}: use one of {', '.join(DEVICES)} or 'cpu' with "
                         "--bench-json")
    return DEVICES[name]
