"""Datasheet figures of the GPUs `bench/predict.py` models, in one place, with their sources.

Every figure is the vendor's peak, not a measurement:

* ``bf16_dense_flops``: bf16 Tensor Core FLOP/s *without* structured sparsity. NVIDIA's H100 and
  H200 datasheets print the sparse figure (1,979 TFLOP/s, "shown with sparsity"); dense is half.
* ``hbm_bytes_per_s``: HBM bandwidth, bytes read or written per second.
* ``nvlink_bidir_bytes_per_s``: NVLink bandwidth per GPU, **both directions added** (the
  datasheets' "600 GB/s" / "900 GB/s"). One direction carries half:
  `nvlink_bytes_per_s_per_direction`. A ring collective sends and receives at once, so its
  time is bytes sent per GPU over the one-direction figure.
* ``pcie_bidir_bytes_per_s``: the host PCIe link per GPU, both directions added (Gen4 x16:
  64 GB/s, Gen5 x16: 128 GB/s); half of it per direction.
* ``memory_bytes``: device memory as `nvidia-smi` reports it for the card (MiB x 2^20), which is
  what the memory planner compares a plan against.
* ``compute_capability`` (80 = sm_80), ``sms`` (streaming multiprocessors),
  ``max_shared_per_block`` (the opt-in limit a kernel's dynamic shared memory must fit, which
  Triton checks at load) and ``shared_per_sm``: what `bench/cuda_compile.py` compiles for and
  checks against. SM counts from the A100 and H100 whitepapers (A100: 108 SMs; H100 SXM5: 132;
  H200 is the same GH100 configuration); shared memory from the CUDA C++ Programming Guide's
  table of technical specifications per compute capability (8.0: 164 KB per SM, 163 KB per
  block; 9.0: 228 KB per SM, 227 KB per block). Both have 64K 32-bit registers, 2,048 resident
  threads and 32 resident blocks per SM. `ARCHS` adds compile targets that are not modelled
  (L40S, B200).
* ``max_clock_hz``: the highest SM clock, for `bench/cuda_compile.py`'s issue limits (an upper
  bound: a card under load runs at or below it). A100 SXM4: the whitepaper's boost clock,
  1,410 MHz; H100 SXM5: 1,980 MHz, the boost clock of NVIDIA's final H100 SXM5
  specifications; H200 SXM (the same GH100 die) taken at the same clock until a run records
  it (`bench/gpu_decode.sh` logs `clocks.max.sm`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

GB = 10**9
TB = 10**12
MHz = 10**6
MiB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Arch:
    """What a kernel compiled for a card must fit: `bench/cuda_compile.py`'s targets."""

    key: str
    name: str
    aliases: tuple[str, ...] = ()
    compute_capability: int
    """80 = sm_80."""
    sms: int
    max_shared_per_block: int
    """The opt-in limit a kernel's dynamic shared memory must fit (Triton checks it at load)."""
    shared_per_sm: int
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    registers_per_sm: int = 65536
    max_clock_hz: float = 0.0
    """The highest SM clock (0: not modelled): `bench/cuda_compile.py`'s issue limits use it."""
    hbm_bytes_per_s: float = 0.0
    """Device-memory bandwidth (0: not modelled)."""


@dataclass(frozen=True, kw_only=True)
class GPU:
    key: str
    """The name `--gpus` takes (e.g. ``A100-80GB``)."""
    name: str
    """The product, as NVIDIA names it."""
    aliases: tuple[str, ...]
    """Other spellings `--gpus` accepts (compared case-insensitively)."""
    device_names: tuple[str, ...]
    """Substrings of ``torch.cuda.get_device_name()`` (and of the benchmark reports' titles)
    that identify this card."""
    bf16_dense_flops: float
    hbm_bytes_per_s: float
    memory_bytes: int
    nvlink_bidir_bytes_per_s: float
    pcie_bidir_bytes_per_s: float
    sources: tuple[str, ...]
    compute_capability: int
    sms: int
    max_shared_per_block: int
    shared_per_sm: int
    max_clock_hz: float

    @property
    def arch(self) -> Arch:
        return Arch(
            key=self.key,
            name=self.name,
            aliases=self.aliases,
            compute_capability=self.compute_capability,
            sms=self.sms,
            max_shared_per_block=self.max_shared_per_block,
            shared_per_sm=self.shared_per_sm,
            max_clock_hz=self.max_clock_hz,
            hbm_bytes_per_s=self.hbm_bytes_per_s,
        )

    @property
    def nvlink_bytes_per_s_per_direction(self) -> float:
        return self.nvlink_bidir_bytes_per_s / 2

    @property
    def pcie_bytes_per_s_per_direction(self) -> float:
        return self.pcie_bidir_bytes_per_s / 2

    def link_bytes_per_s(self, link: str) -> float:
        """One direction of `link` ('nvlink' or 'pcie') per GPU."""
        if link == "nvlink":
            return self.nvlink_bytes_per_s_per_direction
        if link == "pcie":
            return self.pcie_bytes_per_s_per_direction
        raise ValueError(f"link must be 'nvlink' or 'pcie', got {link!r}")


A100_DATASHEET = (
    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
    "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
)
H100_DATASHEET = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
H200_PAGE = "https://www.nvidia.com/en-us/data-center/h200/"
H200_DATASHEET = "https://nvdam.widen.net/s/nb5zzzsjdf/hpc-datasheet-sc23-h200-datasheet-3002446"
A100_WHITEPAPER = (
    "https://images.nvidia.com/aem-dam/en-zz/Solutions/data-center/"
    "nvidia-ampere-architecture-whitepaper.pdf"
)
H100_WHITEPAPER = "https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper"
CUDA_GUIDE_SPECS = (
    "https://docs.nvidia.com/cuda/cuda-c-programming-guide/"
    "#features-and-technical-specifications-technical-specifications-per-compute-capability"
)
KB = 1024

GPUS: dict[str, GPU] = {
    g.key: g
    for g in (
        GPU(
            key="A100-80GB",
            name="NVIDIA A100 80GB SXM4",
            aliases=("A100", "A100-SXM", "A100-SXM4-80GB", "A100-80G"),
            device_names=("A100-SXM4-80GB", "A100 80GB", "A100-80GB"),
            # Datasheet, "A100 80GB SXM" column: BFLOAT16 Tensor Core 312 TFLOPS (624 with
            # sparsity); GPU memory bandwidth 2,039 GB/s (HBM2e); NVLink 600 GB/s; PCIe Gen4
            # 64 GB/s. nvidia-smi: 81920 MiB.
            bf16_dense_flops=312 * TB,
            hbm_bytes_per_s=2039 * GB,
            memory_bytes=81920 * MiB,
            nvlink_bidir_bytes_per_s=600 * GB,
            pcie_bidir_bytes_per_s=64 * GB,
            sources=(A100_DATASHEET, A100_WHITEPAPER, CUDA_GUIDE_SPECS),
            compute_capability=80,
            sms=108,
            max_shared_per_block=163 * KB,
            shared_per_sm=164 * KB,
            max_clock_hz=1410 * MHz,
        ),
        GPU(
            key="H100-SXM",
            name="NVIDIA H100 SXM5 80GB",
            aliases=("H100", "H100-80GB", "H100-SXM5", "H100-SXM5-80GB"),
            device_names=("H100 80GB HBM3", "H100-SXM", "H100 SXM"),
            # Datasheet, "H100 SXM" column: BFLOAT16 Tensor Core 1,979 TFLOPS with sparsity
            # (989 dense); GPU memory bandwidth 3.35 TB/s; NVLink 900 GB/s; PCIe Gen5 128 GB/s.
            # nvidia-smi: 81559 MiB.
            bf16_dense_flops=989 * TB,
            hbm_bytes_per_s=3350 * GB,
            memory_bytes=81559 * MiB,
            nvlink_bidir_bytes_per_s=900 * GB,
            pcie_bidir_bytes_per_s=128 * GB,
            sources=(H100_DATASHEET, H100_WHITEPAPER, CUDA_GUIDE_SPECS),
            compute_capability=90,
            sms=132,
            max_shared_per_block=227 * KB,
            shared_per_sm=228 * KB,
            max_clock_hz=1980 * MHz,
        ),
        GPU(
            key="H200-SXM",
            name="NVIDIA H200 SXM 141GB",
            aliases=("H200", "H200-141GB", "H200-SXM5"),
            device_names=("H200",),
            # Datasheet, "H200 SXM" column: BFLOAT16 Tensor Core 1,979 TFLOPS with sparsity
            # (989 dense, the same GH100 die as H100); 141 GB HBM3e at 4.8 TB/s; NVLink
            # 900 GB/s; PCIe Gen5 128 GB/s. nvidia-smi: 143771 MiB.
            bf16_dense_flops=989 * TB,
            hbm_bytes_per_s=4800 * GB,
            memory_bytes=143771 * MiB,
            nvlink_bidir_bytes_per_s=900 * GB,
            pcie_bidir_bytes_per_s=128 * GB,
            sources=(H200_DATASHEET, H200_PAGE, H100_WHITEPAPER, CUDA_GUIDE_SPECS),
            compute_capability=90,
            sms=132,
            max_shared_per_block=227 * KB,
            shared_per_sm=228 * KB,
            max_clock_hz=1980 * MHz,
        ),
    )
}


ARCHS: dict[str, Arch] = {
    **{g.key: g.arch for g in GPUS.values()},
    # Cards `bench/cuda_compile.py` compiles for beyond the modelled ones, with the figures
    # PyTorch reports for them (`torch.cuda.get_device_properties`): L40S compute capability 8.9,
    # 142 SMs; B200 10.0, 148 SMs, 232,448 B (227 KB) of opt-in shared memory per block. The
    # CUDA C++ Programming Guide's table per compute capability gives the rest: 8.9 has 100 KB
    # of shared memory per SM, 99 KB per block, 1,536 resident threads and 24 blocks per SM;
    # 10.0 228 KB per SM, 2,048 threads and 32 blocks.
    "L40S": Arch(
        key="L40S",
        name="NVIDIA L40S",
        compute_capability=89,
        sms=142,
        max_shared_per_block=99 * KB,
        shared_per_sm=100 * KB,
        threads_per_sm=1536,
        blocks_per_sm=24,
    ),
    "B200": Arch(
        key="B200",
        name="NVIDIA B200",
        aliases=("B200-SXM",),
        compute_capability=100,
        sms=148,
        max_shared_per_block=227 * KB,
        shared_per_sm=228 * KB,
    ),
}


def _named(table: dict[str, Any], name: str) -> Any:
    """The entry of `table` (GPUS or ARCHS) whose key or an alias is `name`, any case; None."""
    want = name.strip().lower()
    for entry in table.values():
        if want == entry.key.lower() or want in (a.lower() for a in entry.aliases):
            return entry
    return None


def _names(table: dict[str, Any]) -> str:
    """Every name `_named` accepts in `table`, for error messages."""
    return "; ".join(
        entry.key + (f" (also {', '.join(entry.aliases)})" if entry.aliases else "")
        for entry in table.values()
    )


def lookup_arch(name: str) -> Arch | None:
    """The compile target named `name` (a key or alias of `ARCHS`, any case), or None."""
    arch: Arch | None = _named(ARCHS, name)
    return arch


def accepted_arch_names() -> str:
    return _names(ARCHS)


def accepted_names() -> str:
    """Every name `lookup` accepts, for error messages."""
    return _names(GPUS)


def lookup(name: str) -> GPU | None:
    """The GPU named `name` (its key or an alias, any case), or None."""
    gpu: GPU | None = _named(GPUS, name)
    return gpu


def match_device_name(text: str) -> GPU | None:
    """The GPU a device name or a report title names (``NVIDIA H100 80GB HBM3``), or None."""
    for gpu in GPUS.values():
        for device in gpu.device_names:
            if re.search(re.escape(device), text, flags=re.IGNORECASE):
                return gpu
    return None
