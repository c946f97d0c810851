"""Compile every Triton kernel for NVIDIA GPUs on a machine without one, at the shapes the
runtime launches them with, and check each against the target's limits.

    python bench/cuda_compile.py                       # A100 + H100, 7B at tp 1 and tp 4
    python bench/cuda_compile.py --gpus A100-80GB --model bench/model_configs/*.json --tp 1 2 4
    python bench/cuda_compile.py --gpus L40S B200      # other targets: bench/hardware.py ARCHS
    python bench/cuda_compile.py --sweep-prefill       # the prefill tile candidates instead

Triton compiles to a cubin without a device: its LLVM and its bundled `ptxas` run on the host;
only loading and launching need the driver. This swaps Triton's active driver for one that
reports the target's compute capability, SM count and shared-memory limit, then calls the
kernels' Triton wrappers (the `*_triton` functions the layers call) on CPU tensors of the
deployment shapes. Specialisation, constexprs and the tile configs the wrappers pick (from the
target's SM count) are therefore the real ones; the launch itself becomes a record. Triton's own
load-time checks run as on the card (shared memory over the per-block limit, more threads than
the registers allow). Registers per thread come from `cuobjdump -res-usage` on the cubin and
spill stores from its SASS (the bytes `ptxas -v` reports); resident blocks per SM follow from
the registers, the warps and the shared memory (with the 1 KB per block the hardware reserves).

It also reads each kernel's main loop from its SASS (the instructions a thread issues per
iteration) and, for the kernels that stream device memory at decode (the GEMV, the 4-bit GEMM,
split-KV decode attention), the rate at which the SMs could stream their bytes if issuing
instructions were the only limit: a loop under the HBM's bandwidth there cannot reach it on the
card, however its memory accesses are arranged.

What it cannot say: how fast anything runs. It finds compile failures, configs that do not fit a
card (an A100 has 163 KB of shared memory per block against an H100's 227 KB), register spills,
occupancy and issue-bound loops, before a GPU session spends its minutes on them.

Prints a table per GPU and one summary line; exits 1 if any kernel failed to compile or fit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import hardware  # noqa: E402

log = logging.getLogger("cuda_compile")
_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_MODEL = Path(__file__).resolve().parent / "model_configs" / "internlm2_5-7b-chat-1m.json"
DEFAULT_GPUS = ("A100-80GB", "H100-SXM")
DECODE_BATCHES = (1, 8, 64)
DECODE_CONTEXTS = (8192, 32768, 131072, 1048576)
PREFILL_TOKENS = 8192
"""scheduler.max_num_batched_tokens: a prefill chunk's tokens."""
BLOCK_SIZE = 16
"""cache.block_size."""
GROUP_SIZE = 128
"""4-bit weights' quantization group (AWQ / GPTQ checkpoints)."""
KV_BITS = (0, 8, 4)
RESERVED_SHARED_PER_BLOCK = 1024
"""Shared memory the hardware reserves per resident block (compute capability 8.0 and up)."""


@dataclasses.dataclass
class Launch:
    """One kernel launch, compiled for one GPU."""

    gpu: str
    kernel: str
    where: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    shared: int
    registers: int
    spill_bytes: int
    constexprs: dict[str, Any]
    binary: str
    """The compiled kernel's hash: launches with one hash share one binary."""
    loop: LoopMix | None = None
    pointers: dict[str, str] = dataclasses.field(default_factory=dict)
    """Pointer arguments' element types (Triton's names: bf16, i32, ...)."""

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@dataclasses.dataclass
class Failure:
    gpu: str
    where: str
    error: str


def blocks_per_sm(gpu: hardware.Arch, num_warps: int, registers: int, shared: int) -> int:
    """Resident blocks per SM: the least of the block, thread, register and shared-memory
    limits. Registers are allocated per warp in units of 256."""
    threads = num_warps * 32
    warp_registers = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_registers = (gpu.registers_per_sm // warp_registers) // num_warps
    by_shared = gpu.shared_per_sm // (shared + RESERVED_SHARED_PER_BLOCK)
    return min(gpu.blocks_per_sm, gpu.threads_per_sm // threads, by_registers, by_shared)


def max_threads_per_block(gpu: hardware.Arch, registers: int) -> int:
    """What the driver reports as a function's thread limit, from its registers per thread."""
    warp_registers = math.ceil(max(registers, 1) * 32 / 256) * 256
    return min(1024, (gpu.registers_per_sm // warp_registers) * 32)


def _cuda_tool(name: str) -> str:
    """A CUDA binary (ptxas, cuobjdump) from Triton's NVIDIA backend."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = Path(get_ptxas(90).path).parent / name
    except Exception as e:  # no triton, or a wheel without the NVIDIA backend
        raise RuntimeError(
            f"compiling for NVIDIA GPUs needs Triton's NVIDIA backend and its bundled {name} "
            f"(the Linux x86_64 triton wheel): {e}"
        ) from e
    if not path.exists():
        raise RuntimeError(f"{path} is missing: Triton's NVIDIA backend came without {name}")
    return str(path)


_WIDTH = {"64": 8, "128": 16, "U8": 1, "S8": 1, "U16": 2, "S16": 2}
"""Bytes a thread moves per memory instruction, by its width modifier (none: 4)."""
_SASS_LINE = re.compile(
    r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)\s*([^;]*);"
)
ISSUE_PER_SM_CLOCK = 4
"""Warp instructions an SM issues per clock at most: one per scheduler, four schedulers (Volta
through Blackwell, per NVIDIA's architecture whitepapers)."""


def _width(modifiers: str) -> int:
    for token in modifiers.split("."):
        if token in _WIDTH:
            return _WIDTH[token]
    return 4


@dataclasses.dataclass(frozen=True)
class LoopMix:
    """A kernel's main loop, from its SASS: the backward branch whose body loads the most bytes
    from global memory a thread (ties: the longer body). Counts are per thread and iteration;
    every instruction of the body counts once (a branch inside the body is counted whole)."""

    instructions: int
    global_bytes: int
    """LDG and LDGSTS (cp.async) bytes, by width, as issued: predicated-off lanes and loads
    that several threads repeat included."""
    narrow_shared: int
    """Shared-memory loads and stores under 4 bytes a thread (LDS.U8, STS.U16, ...)."""
    conversions: int
    """Integer to float conversions (I2F, I2FP)."""


def main_loop(sass: str) -> LoopMix | None:
    """The main loop of the one function in `sass` (cuobjdump -sass text), or None without a
    loop that loads from global memory."""
    code = [
        (int(m.group(1), 16), m.group(2), m.group(3), m.group(4)) for m in _SASS_LINE.finditer(sass)
    ]
    best: LoopMix | None = None
    for address, op, _, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands) if op == "BRA" else None
        if target is None or int(target.group(1), 16) > address:
            continue
        body = [x for x in code if int(target.group(1), 16) <= x[0] <= address]
        mix = LoopMix(
            instructions=len(body),
            global_bytes=sum(_width(mods) for _, o, mods, _ in body if o in ("LDG", "LDGSTS")),
            narrow_shared=sum(
                1 for _, o, mods, _ in body if o in ("LDS", "STS") and _width(mods) < 4
            ),
            conversions=sum(1 for _, o, _, _ in body if o in ("I2F", "I2FP")),
        )
        if mix.global_bytes and (
            best is None
            or (mix.global_bytes, mix.instructions) > (best.global_bytes, best.instructions)
        ):
            best = mix
    return best


@dataclasses.dataclass(frozen=True)
class Sass:
    """What `bench/cuda_compile.py` reads from a compiled kernel."""

    registers: int
    spill_bytes: int
    """Spill stores per thread: the local-memory stores (STL) summed by width, the figure
    `ptxas -v` prints as "bytes spill stores". A stack frame alone is not counted."""
    loop: LoopMix | None


def _sass_cache() -> Path:
    """Where `read_sass` keeps what it read of each cubin (beside Triton's own cache, which
    keeps the cubins): a rerun with the kernels unchanged runs no cuobjdump."""
    triton_cache = os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache"
    return Path(triton_cache) / "dist_runtime-sass"


def read_sass(cubin: bytes) -> Sass:
    """Registers, spill stores and the main loop's mix of the one function in `cubin`."""
    tool = _cuda_tool("cuobjdump")
    # (a cubin's line table names the kernel's source files, ours and Triton's: a clone
    # elsewhere, or another environment with the same Triton, reads the same)
    triton_dir = str(Path(tool).parents[3])  # .../site-packages/triton
    same_anywhere = cubin.replace(triton_dir.encode(), b"<triton>")
    same_anywhere = same_anywhere.replace(str(_ROOT).encode(), b"<checkout>")
    key = hashlib.sha256(_file_digest(tool) + b"\0" + same_anywhere).hexdigest()
    cached = _sass_cache() / f"{key}.json"
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        got = json.loads(cached.read_text())
        loop = None if got["loop"] is None else LoopMix(**got["loop"])
        return Sass(int(got["registers"]), int(got["spill_bytes"]), loop)
    sass = _read_sass(cubin, tool)
    with contextlib.suppress(OSError):  # (a cache that cannot be written: read next time)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(sass)))
        tmp.replace(cached)
    return sass


@functools.cache
def _file_digest(path: str) -> bytes:
    """A tool's identity for cache keys: its bytes, wherever it is installed."""
    return hashlib.sha256(Path(path).read_bytes()).digest()


def _read_sass(cubin: bytes, tool: str) -> Sass:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage, sass = (
            subprocess.run([tool, flag, f.name], check=True, capture_output=True, text=True).stdout
            for flag in ("-res-usage", "-sass")
        )
    registers = re.search(r"\bREG:(\d+)", usage)
    if registers is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no register count:\n{usage}")
    spill = sum(_width(m.group(1) or "") for m in re.finditer(r"\bSTL((?:\.\w+)*)\s", sass))
    return Sass(int(registers.group(1)), spill, main_loop(sass))


class _Function:
    """What `load_binary` hands Triton as the kernel's function handle."""

    def __init__(self, name: str, sass: Sass) -> None:
        self.name, self.sass = name, sass


class CompileOnlyDriver:
    """Triton's active driver for a GPU that is not there: compiles for it, records launches."""

    def __init__(self, gpu: hardware.Arch, record: Callable[[Any, Any, _Function, tuple], None]):
        from triton.backends.compiler import GPUTarget

        self.gpu = gpu
        self.target = GPUTarget("cuda", gpu.compute_capability, 32)
        self._record = record
        self.utils = self  # Triton reaches load_binary & co. through driver.utils

    # the DriverBase surface Triton's JIT and CompiledKernel use
    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> int:
        # Distinct per target, not per compute capability: Triton caches compiled kernels (and
        # the launcher that records them) per device, and the H100 and H200 share sm_90.
        return zlib.crc32(self.gpu.key.encode()) & 0x7FFFFFFF

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_properties(self, device: int) -> dict[str, int]:
        return {
            "max_shared_mem": self.gpu.max_shared_per_block,
            "multiprocessor_count": self.gpu.sms,
            "max_num_regs": self.gpu.registers_per_sm,
            "warpSize": 32,
        }

    def load_binary(
        self, name: str, cubin: bytes, shared: int, device: int
    ) -> tuple[Any, _Function, int, int, int]:
        sass = read_sass(cubin)
        fn = _Function(name, sass)
        threads = max_threads_per_block(self.gpu, sass.registers)
        return object(), fn, sass.registers, sass.spill_bytes // 4, threads

    def unload_module(self, module: Any) -> None:
        pass

    def launcher_cls(self, src: Any, metadata: Any) -> Callable[..., None]:
        def launch(g0: int, g1: int, g2: int, stream: int, function: _Function, *rest: Any) -> None:
            self._record(src, metadata, function, (g0, g1, g2))

        return launch


_DEVICE_HOOKS = (  # (module, function of a device, what it returns for the target)
    ("kernels.flash_decode", "_sm_count", "sms"),
    ("kernels.gemv", "_sm_count", "sms"),
    ("kernels.w4a16", "_num_sms", "sms"),
    ("kernels.flash_attn", "capability", "compute_capability"),
)


def _returning(value: int) -> Callable[[torch.device], int]:
    return lambda device: value


@contextlib.contextmanager
def compile_only(gpu: hardware.Arch, record: Callable[..., None]) -> Iterator[None]:
    """Within: Triton compiles for `gpu` and records launches instead of running them, and the
    wrappers plan tiles from `gpu`'s SM count and compute capability."""
    import importlib

    from triton.runtime.driver import driver

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError(
            "TRITON_INTERPRET is set: the kernels were decorated for Triton's CPU interpreter, "
            "which compiles nothing; run without it (unset TRITON_INTERPRET)"
        )
    saved = []
    for module_name, attr, field in _DEVICE_HOOKS:
        module = importlib.import_module(module_name)
        saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, _returning(getattr(gpu, field)))
    previous = driver._active  # None until something asked; asking fails without a GPU
    driver.set_active(CompileOnlyDriver(gpu, record))
    try:
        yield
    finally:
        driver._active = previous
        for module, attr, value in saved:
            setattr(module, attr, value)


# --------------------------------------------------------------------------- the shapes


@dataclasses.dataclass(frozen=True)
class Shard:
    """One worker's slice of a model at a tp degree."""

    name: str
    tp: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    window: int = 0
    """The sliding window of the model's windowed layers (0: none): their attention launches
    compile with it too."""
    softcap: float = 0.0
    """The attention-logit soft-cap (Gemma 2's; 0: none): attention launches compile with it."""
    act: str = "silu"
    """The MLP's gate activation (`ModelConfig.hidden_act`)."""

    @classmethod
    def of(cls, config: dict[str, Any], name: str, tp: int) -> Shard:
        heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
        hidden = config["hidden_size"]
        if heads % tp or config["intermediate_size"] % tp:
            raise ValueError(f"{name}: {heads} heads do not split over tp={tp}")
        extra: dict[str, Any] = {}
        if config.get("architectures"):  # (a checkpoint's config.json: read as the runtime does)
            from dist_runtime.config import ModelConfig

            model = ModelConfig.from_dict(config, source=name)
            extra = {
                "window": model.sliding_window or 0,
                "softcap": model.attn_logit_softcapping or 0.0,
                "act": model.hidden_act,
            }
        return cls(
            name=name,
            tp=tp,
            hidden=hidden,
            q_heads=heads // tp,
            kv_heads=max(kv // tp, 1),
            head_dim=config.get("head_dim") or hidden // heads,
            intermediate=config["intermediate_size"] // tp,
            vocab=-(-config["vocab_size"] // tp),
            **extra,
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """name: (out_features, in_features) of this shard's decode-path linear layers."""
        d = self.head_dim
        return {
            "qkv": ((self.q_heads + 2 * self.kv_heads) * d, self.hidden),
            "o": (self.hidden, self.q_heads * d),
            "gate_up": (2 * self.intermediate, self.hidden),
            "down": (self.hidden, self.intermediate),
            "lm_head": (self.vocab, self.hidden),
        }


def _paged_cache(
    shard: Shard, blocks: int, bits: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    from kernels.kv_quant import code_dim

    shape = (blocks, BLOCK_SIZE, shard.kv_heads, code_dim(shard.head_dim, bits))
    if bits == 0:
        return torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype), None, None
    params = (blocks, BLOCK_SIZE, shard.kv_heads, 2)
    return (
        torch.empty(shape, dtype=torch.uint8),
        torch.empty(shape, dtype=torch.uint8),
        torch.empty(params, dtype=torch.float32),
        torch.empty(params, dtype=torch.float32),
    )


def scenarios(
    shard: Shard, dtype: torch.dtype, contexts: tuple[int, ...], batches: tuple[int, ...]
) -> Iterator[tuple[str, Callable[[], object]]]:
    """(where, call) for every kernel launch the runtime makes with this shard: decode steps,
    prefill chunks, context-parallel ring steps, 4-bit weights and the decode GEMV."""
    from kernels.flash_attn import flash_attn_triton
    from kernels.flash_decode import flash_decode_triton
    from kernels.gemv import GEMV_MAX_M, gemv_triton
    from kernels.lora import lora_add_triton
    from kernels.lse_merge import lse_merge_triton
    from kernels.paged_attention import paged_attention_triton
    from kernels.position_attention import position_attention_triton
    from kernels.rms_norm import rms_norm_triton
    from kernels.rotary import rotary_triton
    from kernels.rotary_store import rotary_store_triton
    from kernels.silu_and_mul import silu_and_mul_triton
    from kernels.store_kv import store_kv_triton
    from kernels.w4a16 import w4a16_matmul_triton

    s, d = shard, shard.head_dim
    scale = d**-0.5
    inv_freq = torch.empty(d // 2, dtype=torch.float32)
    tag = f"{s.name} tp{s.tp} {dtype_tag(dtype)}"

    # per token: norms, activation, RoPE and the KV store (every cache format)
    for t in (*batches, PREFILL_TOKENS):
        x = torch.empty(t, s.hidden, dtype=dtype)
        w = torch.empty(s.hidden, dtype=dtype)
        yield f"{tag} rms_norm {t} tokens", partial(rms_norm_triton, x, w, 1e-5)
        yield f"{tag} rms_norm + residual {t} tokens", partial(rms_norm_triton, x, w, 1e-5, x)
        gate_up = torch.empty(t, 2 * s.intermediate, dtype=dtype)
        yield f"{tag} {s.act}_and_mul {t} tokens", partial(silu_and_mul_triton, gate_up, s.act)

        qkv = torch.empty(t, (s.q_heads + 2 * s.kv_heads) * d, dtype=dtype)
        q_end, k_end = s.q_heads * d, (s.q_heads + s.kv_heads) * d
        q = qkv[:, :q_end].view(t, s.q_heads, d)
        k = qkv[:, q_end:k_end].view(t, s.kv_heads, d)
        v = qkv[:, k_end:].view(t, s.kv_heads, d)
        positions = torch.arange(t, dtype=torch.int64)
        blocks = -(-t // BLOCK_SIZE)
        kc, vc, _, _ = _paged_cache(s, blocks, 0, dtype)
        for freq, label in ((inv_freq, ""), (torch.empty(t, d // 2), " (per-token inv_freq)")):
            yield (
                f"{tag} rotary_store {t} tokens{label}",
                partial(rotary_store_triton, q, k, v, positions, freq, kc, vc, positions),
            )
        yield f"{tag} rotary {t} tokens", partial(rotary_triton, q, k, positions, inv_freq)
        for bits in KV_BITS:
            kc, vc, kp, vp = _paged_cache(s, blocks, bits, dtype)
            yield (
                f"{tag} store_kv {t} tokens kv{bits or 16}",
                partial(store_kv_triton, k, v, kc, vc, positions, kp, vp, bits),
            )

    # decode attention: every batch x context x cache format, with the LSE (cp) and without
    for batch in batches:
        q = torch.empty(batch, s.q_heads, d, dtype=dtype)
        for ctx in contexts:
            tables = torch.zeros(batch, ctx // BLOCK_SIZE, dtype=torch.int32)
            lens = torch.full((batch,), ctx, dtype=torch.int32)
            for bits in KV_BITS:
                kc, vc, kp, vp = _paged_cache(s, 4, bits, dtype)
                for lse in (False, True):
                    yield (
                        f"{tag} flash_decode b{batch} ctx {ctx} kv{bits or 16}"
                        + (" lse" if lse else ""),
                        partial(
                            flash_decode_triton, q, kc, vc, tables, lens, scale, lse, kp, vp, bits
                        ),
                    )

    # a windowed or soft-capped model's own decode launches, at the longest context
    variants: list[tuple[int, float, str]] = []  # (window, softcap, label)
    variants += [(s.window, 0.0, f"window {s.window}")] if s.window else []
    variants += [(0, s.softcap, f"softcap {s.softcap:g}")] if s.softcap else []
    if s.window and s.softcap:
        variants.append((s.window, s.softcap, "window + softcap"))
    ctx = max(contexts)
    for window, softcap, label in variants:
        for batch in batches:
            q = torch.empty(batch, s.q_heads, d, dtype=dtype)
            tables = torch.zeros(batch, ctx // BLOCK_SIZE, dtype=torch.int32)
            lens = torch.full((batch,), ctx, dtype=torch.int32)
            for bits in KV_BITS:
                kc, vc, kp, vp = _paged_cache(s, 4, bits, dtype)
                yield (
                    f"{tag} flash_decode b{batch} ctx {ctx} kv{bits or 16} {label}",
                    partial(
                        flash_decode_triton, q, kc, vc, tables, lens, scale, False, kp, vp, bits,
                        window, softcap,
                    ),
                )  # fmt: skip

    # LoRA terms of a decode step (kernels/lora.py): the fused q/k/v layer's, rank 16 a part
    qkv_out = (s.q_heads + 2 * s.kv_heads) * d
    for batch in batches:
        x = torch.empty(batch, s.hidden, dtype=dtype)
        a = torch.empty(5, 48, s.hidden, dtype=dtype)
        b = torch.empty(5, qkv_out, 48, dtype=dtype)
        slots = torch.zeros(batch, dtype=torch.int64)
        y = torch.empty(batch, qkv_out, dtype=dtype)
        yield f"{tag} lora_add b{batch} qkv rank 48", partial(lora_add_triton, x, a, b, slots, y)

    # prefill: one chunk of PREFILL_TOKENS after as many cached tokens, through the paged kernel
    t = PREFILL_TOKENS
    q = torch.empty(t, s.q_heads, d, dtype=dtype)
    ctx = 2 * t
    tables = torch.zeros(1, ctx // BLOCK_SIZE, dtype=torch.int32)
    cu = torch.tensor([0, t], dtype=torch.int32)
    lens = torch.tensor([ctx], dtype=torch.int32)
    for bits in KV_BITS:
        kc, vc, kp, vp = _paged_cache(s, 4, bits, dtype)
        for lse in (False, True):
            yield (
                f"{tag} paged_attention prefill {t} kv{bits or 16}" + (" lse" if lse else ""),
                partial(
                    paged_attention_triton, q, kc, vc, tables, cu, lens, scale, lse, kp, vp, bits
                ),
            )
    for window, softcap, label in variants:  # (the windowed / soft-capped model's prefill)
        for bits in KV_BITS:
            kc, vc, kp, vp = _paged_cache(s, 4, bits, dtype)
            yield (
                f"{tag} paged_attention prefill {t} kv{bits or 16} {label}",
                partial(
                    paged_attention_triton, q, kc, vc, tables, cu, lens, scale, False, kp, vp,
                    bits, window, softcap,
                ),
            )  # fmt: skip
    # a mixed step: decode rows beside a prefill chunk
    kc, vc, _, _ = _paged_cache(s, 4, 0, dtype)
    yield (
        f"{tag} paged_attention mixed 4 decode + {t} prefill",
        partial(
            paged_attention_triton,
            torch.empty(4 + t, s.q_heads, d, dtype=dtype),
            kc,
            vc,
            torch.zeros(5, ctx // BLOCK_SIZE, dtype=torch.int32),
            torch.tensor([0, 1, 2, 3, 4, 4 + t], dtype=torch.int32),
            torch.full((5,), ctx, dtype=torch.int32),
            scale,
        ),
    )

    # context parallelism: a ring step's attention over a peer's chunk, and the merge
    k = torch.empty(t, s.kv_heads, d, dtype=dtype)
    v = torch.empty(t, s.kv_heads, d, dtype=dtype)
    yield f"{tag} flash_attn causal {t}", partial(flash_attn_triton, q, k, v, scale, True)
    yield f"{tag} flash_attn full {t}", partial(flash_attn_triton, q, k, v, scale, False, t, 0)
    pos = torch.arange(t, dtype=torch.int64)
    for keys_sorted in (False, True):
        yield (
            f"{tag} position_attention {t}" + (" sorted keys" if keys_sorted else ""),
            partial(position_attention_triton, q, pos, k, v, pos, scale, keys_sorted),
        )
        for window, softcap, label in variants:  # (cp > 1 prefill of such a model)
            yield (
                f"{tag} position_attention {t}" + (" sorted keys" if keys_sorted else "")
                + f" {label}",
                partial(
                    position_attention_triton, q, pos, k, v, pos, scale, keys_sorted, window,
                    softcap,
                ),
            )  # fmt: skip
    for rows in (t, 1):
        out = torch.empty(rows, s.q_heads, d, dtype=dtype)
        lse_rows = torch.empty(rows, s.q_heads, dtype=torch.float32)
        yield f"{tag} lse_merge {rows}", partial(lse_merge_triton, out, lse_rows, out, lse_rows)

    # linear layers: the decode GEMV and 4-bit weights (decode and prefill rows)
    for name, (n, k_in) in s.linears().items():
        weight = torch.empty(n, k_in, dtype=dtype)
        for m in sorted({1, *[b for b in batches if b <= GEMV_MAX_M], GEMV_MAX_M}):
            x = torch.empty(m, k_in, dtype=dtype)
            yield f"{tag} gemv {name} {m} rows", partial(gemv_triton, x, weight)
        if name == "lm_head":
            continue  # the head stays in the activation dtype
        for m in (*batches, PREFILL_TOKENS):
            x = torch.empty(m, k_in, dtype=dtype)
            yield (
                f"{tag} w4a16 {name} {m} rows",
                partial(w4a16_matmul_triton, x, _int4(k_in, n, GROUP_SIZE, act_order=False)),
            )
        if name == "gate_up":  # scales gathered per row: GPTQ act-order, groups under a tile
            for group, act_order in ((GROUP_SIZE, True), (32, False)):
                weight_q = _int4(k_in, n, group, act_order)
                for m in (1, PREFILL_TOKENS):
                    x = torch.empty(m, k_in, dtype=dtype)
                    label = "act-order" if act_order else f"group {group}"
                    yield (
                        f"{tag} w4a16 {name} {label} {m} rows",
                        partial(w4a16_matmul_triton, x, weight_q),
                    )


def _int4(k: int, n: int, group: int, act_order: bool) -> Any:
    """A 4-bit weight (in_features k, out_features n) of the runtime layout; with `act_order`
    a GPTQ g_idx that is not the plain k // group, so the kernel gathers scales per row."""
    from dist_runtime.formats.int4 import Int4Weight

    g_idx = None
    if act_order:
        g_idx = (torch.arange(k, dtype=torch.int32) * 7 % k) // group
    return Int4Weight(
        qweight=torch.zeros(k // 8, n, dtype=torch.int32),
        scales=torch.empty(k // group, n, dtype=torch.float16),
        zeros=torch.empty(k // group, n, dtype=torch.float16),
        group_size=group,
        g_idx=g_idx,
    )


# --------------------------------------------------------------------------- running


def _constexpr_names(src: Any) -> dict[str, Any]:
    names = src.fn.arg_names
    return {
        names[path[0]]: (str(value) if not isinstance(value, (int, float, bool)) else value)
        for path, value in src.constants.items()
        if len(path) == 1
    }


class _Recorder:
    """Turns a launch on `gpu` into a `Launch`, labelled with the scenario running."""

    def __init__(self, gpu: hardware.Arch, launches: list[Launch]) -> None:
        self.gpu, self.launches, self.where = gpu, launches, ""

    def __call__(self, src: Any, metadata: Any, function: _Function, grid: tuple) -> None:
        self.launches.append(
            Launch(
                gpu=self.gpu.key,
                kernel=metadata.name,
                where=self.where,
                grid=grid,
                num_warps=metadata.num_warps,
                num_stages=metadata.num_stages,
                shared=metadata.shared,
                registers=function.sass.registers,
                spill_bytes=function.sass.spill_bytes,
                constexprs=_constexpr_names(src),
                binary=metadata.hash,
                loop=function.sass.loop,
                pointers={
                    k: str(v)[1:] for k, v in src.signature.items() if str(v).startswith("*")
                },
            )
        )


def compile_all(
    gpus: list[hardware.Arch],
    shards: list[Shard],
    dtype: torch.dtype,
    contexts: tuple[int, ...],
    batches: tuple[int, ...],
) -> tuple[list[Launch], list[Failure]]:
    launches: list[Launch] = []
    failures: list[Failure] = []
    for gpu in gpus:
        recorder = _Recorder(gpu, launches)
        with compile_only(gpu, recorder):
            for shard in shards:
                for where, call in scenarios(shard, dtype, contexts, batches):
                    recorder.where = where
                    try:
                        call()
                    except Exception as e:  # a compile error or a config that does not fit
                        failures.append(Failure(gpu.key, where, f"{type(e).__name__}: {e}"))
                        log.warning("%s: %s: %s", gpu.key, where, e)
    return launches, failures


def _config_text(launch: Launch) -> str:
    tiles = {k: v for k, v in launch.constexprs.items() if k.startswith(("BLOCK", "TILE"))}
    parts = [f"{k.removeprefix('BLOCK_')}={v}" for k, v in sorted(tiles.items())]
    return " ".join([*parts, f"w{launch.num_warps}", f"s{launch.num_stages}"])


def toolchain() -> str:
    """Triton's version and its bundled ptxas's: what the numbers depend on."""
    import triton

    ptxas = (
        subprocess.run(
            [_cuda_tool("ptxas"), "--version"], check=True, capture_output=True, text=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    return f"Triton {triton.__version__}, ptxas {ptxas}"


def report(launches: list[Launch], failures: list[Failure], gpus: list[hardware.Arch]) -> str:
    lines: list[str] = [
        f"Compiled with {toolchain()}. Spill B: bytes of spill stores per thread (as `ptxas -v` "
        "counts them).",
        "",
    ]
    for gpu in gpus:
        mine = [x for x in launches if x.gpu == gpu.key]
        by_binary: dict[str, list[Launch]] = {}
        for x in mine:
            by_binary.setdefault(x.binary, []).append(x)
        lines += [
            f"## {gpu.name} (sm_{gpu.compute_capability}, {gpu.sms} SMs, "
            f"{gpu.max_shared_per_block // 1024} KB shared memory per block)",
            "",
            f"{len(by_binary)} binaries from {len(mine)} launches. Blocks/SM: resident blocks "
            "per SM; waves: the largest grid of that binary over (SMs x blocks/SM).",
            "",
            "| kernel | tiles, warps, stages | regs | spill B | shared KB | blocks/SM | warps/SM "
            "| waves (max grid) | main loop | launches | e.g. |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
        ]
        for group in sorted(by_binary.values(), key=lambda g: (g[0].kernel, _config_text(g[0]))):
            x = group[0]
            blocks = blocks_per_sm(gpu, x.num_warps, x.registers, x.shared)
            biggest = max(group, key=lambda y: y.programs)
            waves = biggest.programs / max(gpu.sms * blocks, 1)
            lines.append(
                f"| {x.kernel} | {_config_text(x)} | {x.registers} | {x.spill_bytes} | "
                f"{x.shared / 1024:.1f} | {blocks} | {blocks * x.num_warps} | "
                f"{waves:.2f} ({biggest.programs}) | {loop_text(gpu, x)} | {len(group)} "
                f"| {biggest.where} |"
            )
        lines.append("")
        lines += issue_bound_section(gpu, mine)
        mine_failed = [f for f in failures if f.gpu == gpu.key]
        if mine_failed:
            lines += ["Failed:", ""] + [f"- {f.where}: {f.error}" for f in mine_failed] + [""]
    return "\n".join(lines)


_ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "i8": 1, "u8": 1, "i32": 4}


def streamed_bytes(launch: Launch) -> int | None:
    """Device-memory bytes one iteration of a streaming kernel's main loop must read, from its
    tiles (None for other kernels): a GEMV's weight tile, a 4-bit GEMM's packed words, a
    split-KV decode tile's K and V (codes and their float32 scale and zero per token)."""
    c, size = launch.constexprs, _ELEMENT_BYTES
    if launch.kernel == "_gemv_kernel":
        return c["BLOCK_N"] * c["BLOCK_K"] * size[launch.pointers["w_ptr"]]
    if launch.kernel == "_w4a16_kernel":
        return c["BLOCK_K"] // 8 * c["BLOCK_N"] * size[launch.pointers["qw_ptr"]]
    if launch.kernel == "_flash_decode_split_kernel":
        if not c["BITS"]:
            return 2 * c["BLOCK_N"] * c["TILE_D"] * size[launch.pointers["k_cache_ptr"]]
        # TILE_D bytes of codes a row, however the kernel reads them; a scale and a zero a key
        return 2 * c["BLOCK_N"] * (c["TILE_D"] + 2 * size[launch.pointers["k_param_ptr"]])
    return None


def issue_limit(gpu: hardware.Arch, launch: Launch) -> float | None:
    """Bytes a second `gpu` could stream through a streaming launch's main loop if issuing were
    the only limit, at its highest clock on every SM: each iteration issues `instructions` warp
    instructions per warp and reads `streamed_bytes`; an SM issues ISSUE_PER_SM_CLOCK a clock.
    An upper bound: dependencies, memory latency and the other pipes only lower it. None
    without a main loop, for other launches (`is_streaming`) and cards without a clock."""
    tile = streamed_bytes(launch)
    if launch.loop is None or tile is None or not gpu.max_clock_hz or not is_streaming(launch):
        return None
    per_clock = ISSUE_PER_SM_CLOCK * tile / (launch.loop.instructions * launch.num_warps)
    return per_clock * gpu.sms * gpu.max_clock_hz


def loop_text(gpu: hardware.Arch, launch: Launch) -> str:
    """'instructions / global B issued [/ issue-limited TB/s (x HBM)]' of a main loop."""
    if launch.loop is None:
        return ""
    text = f"{launch.loop.instructions} / {launch.loop.global_bytes} B"
    rate = issue_limit(gpu, launch)
    if rate is not None:
        text += f" / {rate / 1e12:.1f} TB/s"
        if gpu.hbm_bytes_per_s:
            text += f" ({rate / gpu.hbm_bytes_per_s:.1f}x)"
    return text


STREAMING_KERNELS = ("_flash_decode_split_kernel", "_gemv_kernel", "_w4a16_kernel")
"""Kernels whose decode launches stream their bytes from device memory once: their main loops
must issue fast enough to keep up with it."""


def is_streaming(launch: Launch) -> bool:
    """A decode launch that reads its bytes once: split-KV decode attention, the GEMV, and the
    4-bit GEMM when one row tile holds every row (more tiles re-read the weight: prefill)."""
    if launch.kernel == "_w4a16_kernel":
        return launch.grid[0] == 1
    return launch.kernel in STREAMING_KERNELS


ISSUE_HEADROOM = 1.5
"""Issue-limited rate a streaming loop should have over the HBM peak: an issue-bound loop
reaches well under its limit (dependencies, memory latency), so at 1x it could not."""


def issue_bound_section(gpu: hardware.Arch, launches: list[Launch]) -> list[str]:
    """Lines naming the streaming kernels' binaries whose main loop could not issue
    ISSUE_HEADROOM x the card's HBM bandwidth (empty for cards without the figures)."""
    if not gpu.hbm_bytes_per_s or not gpu.max_clock_hz:
        return []
    short: dict[str, Launch] = {}
    for x in launches:
        rate = issue_limit(gpu, x)
        fast_enough = rate is None or rate >= ISSUE_HEADROOM * gpu.hbm_bytes_per_s
        if is_streaming(x) and not fast_enough:
            short.setdefault(x.binary, x)
    head = (
        f"Main loop: instructions a thread issues per iteration / the global bytes its loads "
        f"name / for the streaming kernels, the device-memory bytes a second the SMs could "
        f"stream if issuing {ISSUE_PER_SM_CLOCK} warp instructions a clock at "
        f"{gpu.max_clock_hz / 1e6:.0f} MHz were the only limit (x the HBM's "
        f"{gpu.hbm_bytes_per_s / 1e12:.2f} TB/s). "
    )
    if not short:
        return [head + f"Every streaming loop issues {ISSUE_HEADROOM}x the HBM or more.", ""]
    lines = [head + f"Streaming loops under {ISSUE_HEADROOM}x:", ""]
    for x in short.values():
        assert x.loop is not None  # issue_limit had one
        lines.append(
            f"- {x.kernel} {_config_text(x)} ({x.where}): {loop_text(gpu, x)}; "
            f"{x.loop.narrow_shared} narrow shared-memory accesses, {x.loop.conversions} "
            "int-to-float conversions a thread per iteration"
        )
    return [*lines, ""]


def _stream_bits(launch: Launch) -> int:
    """Bits of what a streaming launch reads: the KV cache's or the weight's."""
    if launch.kernel == "_w4a16_kernel":
        return 4
    return int(launch.constexprs.get("BITS", 0)) or 16


def streaming_table(launches: list[Launch], gpus: list[hardware.Arch]) -> str:
    """The streaming binaries' (`is_streaming`) main loops and issue limits: a summary per card
    and kernel, then one row per binary."""
    head = (
        f"Compiled with {toolchain()}. Per iteration of the main loop: the instructions a thread "
        "issues, the bytes the loop must read from device memory (`streamed_bytes`), the "
        "narrow (< 4 B) shared-memory accesses and int-to-float conversions a thread makes; "
        f"issue limit: those bytes over the loop's instructions at {ISSUE_PER_SM_CLOCK} warp "
        "instructions a clock per SM, every SM at the card's highest clock."
    )
    summary_rows = [
        "| card | kernel | bits read | instructions | issue limit | x HBM |",
        "|---|---|---:|---:|---:|---:|",
    ]
    detail = [
        "| card | kernel | tiles, warps, stages | bits read | instructions | streamed B "
        "| narrow shared | conversions | issue limit | x HBM | e.g. |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for gpu in gpus:
        seen: dict[str, Launch] = {}
        for x in launches:
            if x.gpu == gpu.key and x.loop is not None and is_streaming(x):
                seen.setdefault(x.binary, x)
        rows = sorted(seen.values(), key=lambda x: (x.kernel, -_stream_bits(x), x.where))
        kinds: dict[tuple[str, int], list[Launch]] = {}
        for x in rows:
            kinds.setdefault((x.kernel, _stream_bits(x)), []).append(x)
        hbm = gpu.hbm_bytes_per_s or float("nan")
        for (kernel, bits), group in kinds.items():
            counts = sorted(float(y.loop.instructions) for y in group if y.loop is not None)
            rates = sorted(r for y in group if (r := issue_limit(gpu, y)) is not None)
            if rates:
                summary_rows.append(
                    f"| {gpu.key} | {kernel} | {bits} | {_span(counts, '{:.0f}')} "
                    f"| {_span([r / 1e12 for r in rates], '{:.1f}')} TB/s "
                    f"| {_span([r / hbm for r in rates], '{:.2f}')} |"
                )
        for x in rows:
            assert x.loop is not None
            rate = issue_limit(gpu, x)
            limit = "" if rate is None else f"{rate / 1e12:.1f} TB/s"
            ratio = "" if rate is None else f"{rate / hbm:.2f}"
            detail.append(
                f"| {gpu.key} | {x.kernel} | {_config_text(x)} | {_stream_bits(x)} "
                f"| {x.loop.instructions} | {streamed_bytes(x)} | {x.loop.narrow_shared} "
                f"| {x.loop.conversions} | {limit} | {ratio} | {x.where} |"
            )
    return "\n".join([head, "", *summary_rows, "", "Every binary:", "", *detail])


def _span(values: list[float], fmt: str) -> str:
    """'lo-hi' of sorted values in `fmt`, one value when both print the same."""
    lo, hi = fmt.format(values[0]), fmt.format(values[-1])
    return lo if lo == hi else f"{lo}-{hi}"


def summary(launches: list[Launch], failures: list[Failure], gpus: list[hardware.Arch]) -> str:
    binaries = {(x.gpu, x.binary): x for x in launches}
    spills = [x for x in binaries.values() if x.spill_bytes > 0]
    kernels = sorted({x.kernel for x in launches})
    worst_spill = max((x.spill_bytes for x in spills), default=0)
    arch = ", ".join(f"{g.key} (sm_{g.compute_capability})" for g in gpus)
    return (
        f"cuda-compile: {len(kernels)} kernels, {len(binaries)} binaries, {len(launches)} launches "
        f"for {arch}: {len(failures)} failed, {len(spills)} binaries spill "
        f"(max {worst_spill} B/thread); {toolchain()}"
    )


PREFILL_CANDIDATES = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (256, 64, 16, 3),
    (256, 32, 16, 3),
    (128, 128, 8, 3),
    (128, 128, 8, 2),
    (128, 64, 8, 4),
    (128, 64, 8, 3),
    (128, 64, 8, 2),
    (128, 64, 4, 3),
    (128, 64, 4, 2),
    (128, 32, 8, 3),
    (128, 32, 8, 2),
    (128, 32, 4, 3),
    (128, 32, 4, 2),
    (64, 128, 4, 3),
    (64, 64, 8, 3),
    (64, 64, 4, 3),
    (64, 64, 4, 2),
    (64, 32, 4, 3),
    (64, 32, 4, 2),
]
"""Prefill tiles `--sweep-prefill` compiles: the H100 sweep's and smaller ones."""


def sweep_prefill(gpus: list[hardware.Arch], shard: Shard, dtype: torch.dtype) -> str:
    """Compile every prefill-tile kernel (paged over each cache format, flash_attn, position)
    at each candidate config; one table row per (GPU, config): each variant's spill bytes,
    registers, shared memory and blocks per SM."""
    import kernels.flash_attn as FA
    import kernels.paged_attention as PA
    import kernels.position_attention as PO

    lines = [
        f"Compiled with {toolchain()}. Each cell: spill B / registers / shared KB / blocks per SM.",
        "",
    ]
    header = None
    modules: list[Any] = [FA, PA, PO]  # each holds its own name for attention_config
    for gpu in gpus:
        for bm, bn, warps, stages in PREFILL_CANDIDATES:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
            launches: list[Launch] = []
            recorder = _Recorder(gpu, launches)
            saved = [(m, m.attention_config) for m in modules]
            cells: list[tuple[str, str]] = []
            try:
                for module, _ in saved:
                    module.attention_config = lambda *_, c=cfg: dict(c)
                with compile_only(gpu, recorder):
                    for where, call in scenarios(shard, dtype, (8192,), (1,)):
                        if not _is_prefill(where):
                            continue
                        first = len(launches)
                        recorder.where = where
                        try:
                            call()
                        except Exception as e:  # does not compile or fit
                            cells.append((where, type(e).__name__))
                            continue
                        for x in launches[first:]:
                            blocks = blocks_per_sm(gpu, x.num_warps, x.registers, x.shared)
                            cells.append(
                                (
                                    where,
                                    f"{x.spill_bytes} / {x.registers} / "
                                    f"{x.shared / 1024:.0f} / {blocks}",
                                )
                            )
            finally:
                for module, fn in saved:
                    module.attention_config = fn
            if header is None:
                names = [w.split(f"{dtype_tag(dtype)} ", 1)[-1] for w, _ in cells]
                header = "| GPU | config | " + " | ".join(names) + " |"
                lines += [header, "|---|---|" + "---|" * len(names)]
            config = f"{bm} x {bn}, {warps} warps, {stages} stages"
            lines.append(f"| {gpu.key} | {config} | " + " | ".join(c for _, c in cells) + " |")
    return "\n".join(lines)


def dtype_tag(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_prefill(where: str) -> bool:
    return any(k in where for k in ("paged_attention", "flash_attn", "position_attention"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--gpus", nargs="+", default=list(DEFAULT_GPUS), help="bench/hardware.py ARCHS keys"
    )
    ap.add_argument("--model", nargs="+", type=Path, default=[DEFAULT_MODEL])
    ap.add_argument("--tp", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    ap.add_argument("--contexts", nargs="+", type=int, default=list(DECODE_CONTEXTS))
    ap.add_argument("--batches", nargs="+", type=int, default=list(DECODE_BATCHES))
    ap.add_argument("--report", type=Path, help="also write the tables (markdown) here")
    ap.add_argument("--json", type=Path, help="write every launch and failure as JSON here")
    ap.add_argument(
        "--streaming",
        action="store_true",
        help="print only the streaming kernels' main loops and issue limits (one table)",
    )
    ap.add_argument(
        "--sweep-prefill",
        action="store_true",
        help="instead: compile the prefill-tile kernels at every PREFILL_CANDIDATES config "
        "(first --model at the first --tp)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Triton 3.9 fuses multiply-adds unless told otherwise and warns that the default will
    # change; compile what a GPU run gets today, without the warning.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    gpus = []
    for name in args.gpus:
        gpu = hardware.lookup_arch(name)
        if gpu is None:
            ap.error(f"--gpus {name!r} is not known; use one of: {hardware.accepted_arch_names()}")
        gpus.append(gpu)
    shards = []
    for path in args.model:
        config = json.loads(path.read_text())
        for tp in args.tp:
            shards.append(Shard.of(config, path.stem, tp))

    started = time.perf_counter()
    torch.set_num_threads(1)  # nothing here computes; the tensors only carry shapes
    if args.sweep_prefill:
        text = sweep_prefill(gpus, shards[0], getattr(torch, args.dtype))
        print(text)
        print(f"({time.perf_counter() - started:.0f} s)")
        if args.report:
            args.report.write_text(text + "\n")
        return 0
    launches, failures = compile_all(
        gpus, shards, getattr(torch, args.dtype), tuple(args.contexts), tuple(args.batches)
    )
    text = streaming_table(launches, gpus) if args.streaming else report(launches, failures, gpus)
    line = summary(launches, failures, gpus)
    print(text)
    print(f"({time.perf_counter() - started:.0f} s)")
    print(line)
    if args.report:
        args.report.write_text(text + "\n" + line + "\n")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "launches": [
                        {
                            **dataclasses.asdict(x),
                            "issue_limit": issue_limit(hardware.ARCHS[x.gpu], x),
                        }
                        for x in launches
                    ],
                    "failures": [dataclasses.asdict(f) for f in failures],
                    "summary": line,
                },
                indent=1,
            )
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
