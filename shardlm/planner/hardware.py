"""GPU, interconnect and network presets, and which link a group of ranks travels over.

GPU numbers are datasheet numbers (dense bf16 tensor FLOP/s without sparsity, HBM bandwidth),
memory is what the driver reports (nvidia-smi total, GiB). The cost model applies efficiency
factors to them (see cost.Efficiency); a measured profile replaces them.

Link numbers are for graph-captured NCCL collectives (what a serving engine uses):
  alpha  latency of a small all-reduce, growing with the number of ranks,
  busbw  all-reduce bus bandwidth as nccl-tests defines it, so time = alpha + 2(n-1)/n * bytes / busbw.
Eager torch.distributed calls cost ~25-35 us more each (see the GPU host measurements); pass a
profile measured on the engine's own path to use those instead.

Topology: ranks are numbered node by node (gpus_per_node each). A group inside one node uses the
node's interconnect; with `pcie-cross-socket` the node's GPUs sit on two sockets, and a group that
spans both goes through the slow inter-socket path. A group that spans nodes is modelled as
hierarchical (what NCCL does): the intra-node collective, then an inter-node step over the network
that carries 1/(ranks per node) of the bytes through each GPU's share of the NICs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import PlanError


@dataclass(frozen=True)
class GPUSpec:
    """One GPU model."""

    name: str
    """Preset key."""
    description: str
    """Full product name."""
    memory_gib: float
    """Device memory as the driver reports it, GiB."""
    hbm_gbps: float
    """Datasheet memory bandwidth, GB/s."""
    bf16_tflops: float
    """Datasheet dense bf16 tensor-core rate, TFLOP/s."""
    nvlink_gbps: float
    """NVLink bandwidth per GPU per direction, GB/s; 0 if there is no all-to-all NVLink fabric."""
    pcie_gbps: float
    """PCIe x16 bandwidth per direction, GB/s (Gen4 32, Gen5 64)."""

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30


GPUS: dict[str, GPUSpec] = {g.name: g for g in [
    GPUSpec("h100-80gb", "NVIDIA H100 80GB SXM5 (HBM3)", 79.6, 3350, 989, 450, 64),
    GPUSpec("h100-pcie", "NVIDIA H100 80GB PCIe (HBM2e)", 79.6, 2000, 756, 0, 64),
    GPUSpec("h200", "NVIDIA H200 141GB SXM (HBM3e)", 140.4, 4800, 989, 450, 64),
    GPUSpec("b200", "NVIDIA B200 180GB SXM (HBM3e)", 179.0, 8000, 2250, 900, 64),
    GPUSpec("a100-40gb", "NVIDIA A100 40GB SXM4", 39.6, 1555, 312, 300, 32),
    GPUSpec("a100-80gb", "NVIDIA A100 80GB SXM4", 80.0, 2039, 312, 300, 32),
    GPUSpec("l40s", "NVIDIA L40S 48GB (GDDR6)", 45.0, 864, 362, 0, 32),
    GPUSpec("l4", "NVIDIA L4 24GB (GDDR6)", 22.5, 300, 121, 0, 32),
    GPUSpec("a10g", "NVIDIA A10G 24GB (GDDR6)", 22.5, 600, 125, 0, 32),
]}
GPU_ALIASES = {"h100": "h100-80gb", "h100-sxm": "h100-80gb", "a100": "a100-80gb", "h200-141gb": "h200"}


@dataclass(frozen=True)
class Link:
    """Collective costs on one kind of link between GPUs of a node."""

    name: str
    """Which link this is."""
    alpha_us: float
    """Latency of a small all-reduce on 2 ranks, us."""
    alpha_per_rank_us: float
    """Extra all-reduce latency per rank beyond 2, us (more ring/tree steps)."""
    busbw_gbps: float
    """All-reduce bus bandwidth, GB/s."""
    p2p_alpha_us: float
    """Latency of one send/recv, us."""
    p2p_gbps: float
    """Send/recv bandwidth, GB/s."""
    a2a_gbps: float
    """All-to-all: bandwidth of the bytes each rank sends out, GB/s."""
    peer_alpha_us: float | None = None
    """Latency of the engine's peer-memory all-reduce on 2 ranks where it runs over this link, us (None:
    every all-reduce is NCCL's, alpha_us)."""

    def collective_alpha_us(self, n: int) -> float:
        """NCCL's latency for a small collective on n ranks (the all-to-all's)"""
        return self.alpha_us + self.alpha_per_rank_us * max(0, n - 2)

    def allreduce_alpha_us(self, n: int) -> float:
        """a small all-reduce's latency on n ranks: the peer-memory kernel's where the engine runs it"""
        alpha = self.alpha_us if self.peer_alpha_us is None else self.peer_alpha_us
        return alpha + self.alpha_per_rank_us * max(0, n - 2)


INTERCONNECTS = {
    "nvlink": "NVLink/NVSwitch full mesh inside a node",
    "pcie": "PCIe, all GPUs of a node under one socket (P2P through the root complex or a switch)",
    "pcie-cross-socket": "PCIe, the node's GPUs split over two sockets; groups spanning both cross UPI/SMP",
}


def default_interconnect(gpu: GPUSpec) -> str:
    """The interconnect a GPU preset implies when none is given: NVLink where the preset has an NVLink full
    mesh (SXM boards), else PCIe (PCIe cards such as the L4 have no NVLink to default to)."""
    return "nvlink" if gpu.nvlink_gbps > 0 else "pcie"


def intra_links(interconnect: str, gpu: GPUSpec) -> tuple[Link, Link | None]:
    """(link inside a socket / NVLink domain, link for groups spanning two sockets or None)."""
    if interconnect == "nvlink":
        if gpu.nvlink_gbps <= 0:
            raise PlanError(f"{gpu.name} has no NVLink full mesh; use --interconnect pcie or pcie-cross-socket")
        # busbw ~0.8 of the per-direction NVLink rate: 360 GB/s on H100 (measured 336 at 4 GPUs). A small
        # all-reduce is the engine's peer-memory kernel, its default over NVLink: 5.1 us at 2 KiB in a CUDA
        # graph on 2 x H200, NCCL's 10.8 (docs/PERFORMANCE.md, issue 17); the all-to-all stays NCCL's
        nv = gpu.nvlink_gbps
        return Link("nvlink", 9.0, 1.5, 0.8 * nv, 6.0, 0.8 * nv, 0.7 * nv, peer_alpha_us=5.0), None
    if interconnect in ("pcie", "pcie-cross-socket"):
        pc = gpu.pcie_gbps
        same = Link("pcie", 15.0, 2.0, 0.65 * pc, 10.0, 0.7 * pc, 0.6 * pc)
        if interconnect == "pcie":
            return same, None
        # Across sockets NCCL falls back to staging through host memory: ~10 GB/s, higher latency.
        cross = Link("pcie-cross-socket", 25.0, 3.0, min(10.0, same.busbw_gbps), 15.0, 10.0, 8.0)
        return same, cross
    raise PlanError(f"unknown interconnect {interconnect!r}; known: {', '.join(INTERCONNECTS)}")


@dataclass(frozen=True)
class NetworkSpec:
    """The network between nodes."""

    name: str
    """Preset key."""
    description: str
    """What it is."""
    alpha_us: float
    """Latency a collective adds when it crosses nodes, us."""
    p2p_alpha_us: float
    """Latency of a send/recv between nodes, us."""
    nic_gbps: float
    """Achievable bandwidth of one NIC per direction, GB/s (~0.8 of line rate)."""
    nics_per_node: int
    """NICs per node; 0 means one per GPU (rail-optimised)."""

    def per_gpu_gbps(self, gpus_per_node: int) -> float:
        """Network bandwidth one GPU gets when all GPUs of its node talk at once."""
        nics = self.nics_per_node or gpus_per_node
        return self.nic_gbps * nics / gpus_per_node


NETWORKS: dict[str, NetworkSpec] = {n.name: n for n in [
    NetworkSpec("ib-ndr", "InfiniBand NDR 400 Gb/s, one NIC per GPU", 30.0, 10.0, 40.0, 0),
    NetworkSpec("ib-hdr", "InfiniBand HDR 200 Gb/s, one NIC per GPU", 30.0, 10.0, 20.0, 0),
    NetworkSpec("eth-400g", "400 GbE RoCE, one NIC per node", 40.0, 15.0, 40.0, 1),
    NetworkSpec("eth-100g", "100 GbE, one NIC per node", 50.0, 20.0, 10.0, 1),
]}


@dataclass(frozen=True)
class GroupSpan:
    """Where the ranks of one communication group sit."""

    size: int
    """Ranks in the group."""
    nodes: int
    """Nodes the group spans."""
    per_node: int
    """Most ranks of the group on one node."""
    cross_socket: bool
    """Some node's part of the group spans both sockets (pcie-cross-socket only)."""


@dataclass(frozen=True)
class Cluster:
    """The GPUs the plan may use and how they are connected."""

    gpu: GPUSpec
    """GPU model (all GPUs alike)."""
    n_gpus: int
    """GPUs in total."""
    gpus_per_node: int
    """GPUs per node; ranks are numbered node by node."""
    interconnect: str
    """Intra-node fabric preset key."""
    intra: Link
    """Link inside a socket / NVLink domain."""
    cross_socket: Link | None
    """Link for groups spanning the two sockets of a node, if the node has that split."""
    network: NetworkSpec
    """Network between nodes (unused on one node)."""

    @property
    def n_nodes(self) -> int:
        return self.n_gpus // self.gpus_per_node

    def span(self, ranks: list[int]) -> GroupSpan:
        by_node: dict[int, list[int]] = {}
        for r in ranks:
            by_node.setdefault(r // self.gpus_per_node, []).append(r % self.gpus_per_node)
        cross = False
        if self.cross_socket is not None:
            half = max(1, self.gpus_per_node // 2)
            cross = any(len({lr // half for lr in local}) > 1 for local in by_node.values())
        return GroupSpan(len(ranks), len(by_node), max(len(v) for v in by_node.values()), cross)

    def node_link(self, span: GroupSpan) -> Link:
        """The link a group's intra-node part uses."""
        return self.cross_socket if (span.cross_socket and self.cross_socket) else self.intra

    def describe(self) -> str:
        nodes = f"{self.n_nodes} nodes x {self.gpus_per_node}" if self.n_nodes > 1 else f"{self.n_gpus}"
        net = f", {self.network.name} between nodes" if self.n_nodes > 1 else ""
        return f"{nodes} x {self.gpu.name}, {self.interconnect}{net}"


def get_gpu(name: str) -> GPUSpec:
    key = GPU_ALIASES.get(name.lower(), name.lower())
    if key not in GPUS:
        raise PlanError(f"unknown GPU {name!r}; known GPUs: {', '.join(GPUS)}")
    return GPUS[key]


# torch.cuda.get_device_name() / nvidia-smi names -> preset, first match wins (tokens of the lower-cased
# name with "nvidia" dropped; e.g. "NVIDIA H100 80GB HBM3" -> {"h100", "80gb", "hbm3"}).
_NAME_RULES: list[tuple[set[str], set[str], str]] = [  # (all of these tokens, none of these, preset)
    ({"h100"}, {"pcie", "nvl"}, "h100-80gb"),
    ({"h100", "pcie"}, set(), "h100-pcie"),
    ({"h200"}, {"gh200"}, "h200"),
    ({"b200"}, {"gb200"}, "b200"),
    ({"a100", "40gb"}, set(), "a100-40gb"),
    ({"a100"}, set(), "a100-80gb"),
    ({"l40s"}, set(), "l40s"),
    ({"l4"}, set(), "l4"),
    ({"a10g"}, set(), "a10g"),
]


def gpu_preset_from_name(name: str) -> str:
    """Map a device name ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", ...) or a preset name to a GPU
    preset key; PlanError listing the presets when it is not one of them."""
    if not isinstance(name, str) or not name.strip():
        raise PlanError(f"GPU name must be a non-empty string, got {name!r}; pass a preset: {', '.join(GPUS)}")
    key = GPU_ALIASES.get(name.strip().lower(), name.strip().lower())
    if key in GPUS:
        return key
    tokens = set(re.split(r"[\s_/()-]+", key)) - {"nvidia", ""}
    for need, avoid, preset in _NAME_RULES:
        if need <= tokens and not (avoid & tokens):
            return preset
    raise PlanError(f"GPU {name!r} matches no GPU preset; pass one of {', '.join(GPUS)} "
                    "(the closest in memory and bandwidth)")


def make_cluster(gpu: str | GPUSpec, n_gpus: int, interconnect: str | None = None,
                 gpus_per_node: int | None = None, network: str = "ib-ndr") -> Cluster:
    """Validate the cluster description once, at the edge. interconnect None: the GPU preset's own
    (default_interconnect)."""
    spec = gpu if isinstance(gpu, GPUSpec) else get_gpu(gpu)
    if interconnect is None:
        interconnect = default_interconnect(spec)
    if not isinstance(n_gpus, int) or n_gpus < 1:
        raise PlanError(f"--gpus must be a positive integer, got {n_gpus!r}")
    gpn = gpus_per_node or n_gpus
    if gpn < 1 or n_gpus % gpn:
        raise PlanError(f"--gpus-per-node {gpn} must divide --gpus {n_gpus} (whole nodes)")
    if network not in NETWORKS:
        raise PlanError(f"unknown network {network!r}; known: {', '.join(NETWORKS)}")
    intra, cross = intra_links(interconnect, spec)
    return Cluster(spec, n_gpus, gpn, interconnect, intra, cross, NETWORKS[network])
