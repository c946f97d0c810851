"""4-bit weight, 16-bit activation GEMM (W4A16) over the runtime's int4 layout.

`w4a16_matmul(x, weight, bias)` computes x @ W.T (+ bias) for x [M, K] and a 4-bit weight in
`dist_runtime.formats.int4.Int4Weight` layout, W[n, k] = (q[k, n] - zero[g(k), n]) *
scale[g(k), n], accumulating in fp32 and returning x's dtype.

- **Triton kernel** (CUDA): dequantizes inside the GEMM. A program owns a BLOCK_M x BLOCK_N
  output tile and walks K in BLOCK_K steps: it loads each packed word of its BLOCK_K rows once
  (BLOCK_K / 8 word rows) and spreads the 8 nibbles in registers (row k from word k // 8,
  nibble k % 8). (Loading a word per row instead, 8 copies of each, staged 32 KB a pipeline
  stage in shared memory at 128 x 64: 125 KB and one 4-warp block per SM at decode sizes;
  bench/cuda_compile.py.) Without a g_idx a tile takes its rows in runs of GROUP_K (the
  largest power of two dividing group_size, at most BLOCK_K), each run inside one group with
  one scale and zero per column, which come out of the product: x . ((q - z) s) = s (x . (q +
  c) - (z + c) sum(x)). The codes go into `tl.dot` as they are, q + c exactly in x's dtype (the
  nibble in the low mantissa bits of c = 128 for bfloat16, 1024 for float16: no conversion
  instruction), and the scale and zero apply to the product's columns, so no weight is
  dequantized element by element (`_group_tile`; the main loop issues ~5 instructions a weight,
  against ~9 when each was dequantized and stored to shared memory 2 bytes at a time:
  bench/cuda_compile.py --streaming). Otherwise (GPTQ act-order `g_idx`, or groups under
  MIN_GROUP_K rows) scales and zeros are gathered per row and the tile is dequantized in fp32
  before the dot.
  Decode shapes (M <= `DECODE_MAX_M`) use 16-64-row tiles and split K over several programs
  when the output tiles alone would leave the GPU's SMs idle: each split writes an fp32 partial
  sum and a second pass adds them (deterministic, no atomics). Prefill shapes use 64- or
  128-row tiles without split. `pick_config` is the heuristic; `W4A16Config` can be passed to
  `w4a16_matmul_triton` to force tiles.
- **Torch twin** `w4a16_matmul_torch`: unpacks and dequantizes the whole weight to fp32 on every
  call and multiplies in fp32: the per-call reference of the kernel's semantics, not a serving
  path (it materializes the fp32 weight each call).
- **CPU serving**: with bfloat16 activations, `CpuInt4Weight` repacks the codes once for
  PyTorch's CPU int4 matmul (`aten._weight_int4pack_mm_for_cpu`, half a byte per weight, a
  bfloat16 scale and offset per group and output): 4x less memory than bf16 and faster than
  a bf16 or fp32 matmul at decode sizes (it reads a quarter of the bytes). The op computes
  (q - 8) * scale + offset, so the offset is (8 - zero) * scale, rounded to bfloat16. Otherwise
  (float32 / float16 activations, act-order `g_idx`, groups the op does not take) the runtime
  dequantizes once at load with `dequantized_weight(weight, dtype)` and keeps the float [N, K]
  weight for `F.linear`: memory on CPU is then that of float weights.

K (the weight's `in_features`) is a multiple of 8 by construction of the packing and must be a
multiple of `group_size`; M and N are arbitrary (N need not be a multiple of 8 in the runtime
layout; AWQ checkpoints are, by their own packing).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

from dist_runtime.config import CPU_INT4_GROUPS
from dist_runtime.formats.int4 import Int4Weight
from kernels.dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the torch reference runs
    triton = None  # type: ignore[assignment]

DECODE_MAX_M = 64
"""Largest M served by the decode configs (small row tiles, split K)."""
MIN_GROUP_K = 16
"""Fewest rows of one group a tile takes its scale and zero out of the product for (tl.dot's
smallest K); smaller groups gather them per row."""
MAX_SPLIT_K = 16
"""Upper bound on K splits: each split costs an fp32 partial of M x N."""
INTERPRETER_SMS = 8
"""SM count assumed off CUDA (Triton's interpreter), so small test shapes still split K."""
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEQUANT_ELEMENTS = 1 << 19
"""Weight elements `dequantized_weight` unpacks per step on CPU (whole rows): about 2 MB of fp32
that stays in cache between the unpack, the zero and the scale passes. Other devices take the
whole weight in one step."""


def _jit(fn: Any) -> Any:
    return triton.jit(fn) if triton is not None else fn


def _is_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class W4A16Config:
    """Tiles and launch parameters of one `_w4a16_kernel` launch."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    """Programs along K; 1 writes the output directly, more write fp32 partials to sum."""
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {v}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")


def pick_config(
    m: int, n: int, k: int, group_size: int, num_sms: int, act_order: bool = False
) -> W4A16Config:
    """The tiles for an [m, k] x [k, n] product on a GPU with `num_sms` SMs.

    Decode (m <= DECODE_MAX_M): the row tile covers m (16..64 rows), 128 columns (64 at 64
    rows), 128 rows of K;
    K is split until the programs number about twice the SMs (at most MAX_SPLIT_K splits, at
    least one K tile each). Prefill: 64 x 128 tiles up to m = 128, 128 x 128 above, 64 rows of K.
    A tile takes its rows in runs of the largest power of two dividing group_size (at most
    BLOCK_K; a prefill tile's BLOCK_K shrinks to one run), each with one scale / zero row; below
    MIN_GROUP_K (and with `act_order`: a g_idx) they are gathered per row instead, and decode
    tiles stay 64 columns wide.
    """
    group_k = group_size & -group_size  # the longest run of rows inside one group
    gathers = act_order or group_k < MIN_GROUP_K
    if m <= DECODE_MAX_M:
        block_m, cap = max(16, _next_power_of_2(m)), 128
        # Up to 32 rows: 128 columns a program (at 16 rows the main loop issues ~630
        # instructions a thread for 8 KB of packed weights against ~410 for 4 KB at 64 columns:
        # bench/cuda_compile.py --streaming); 64 rows keep 64 columns, as at 128 their
        # accumulators spill on an A100 (255 registers), and so do tiles that gather scales
        # per row (111 KB of shared memory at 128 columns: over an L40S's 99 KB).
        wide = block_m <= 32 and not gathers
        block_n, num_warps, num_stages = (128, 4, 3) if wide else (64, 4, 4)
    else:
        block_m, block_n, cap = (64 if m <= 128 else 128), 128, 64
        num_warps, num_stages = (4, 3) if block_m == 64 else (8, 3)
    # Decode tiles take several runs of a smaller group; prefill tiles one (the 128 x 128 tile
    # with two runs of 32 spills on an H100).
    block_k = cap if m <= DECODE_MAX_M or gathers else min(cap, group_k)
    split_k = 1
    if m <= DECODE_MAX_M:
        tiles = _cdiv(m, block_m) * _cdiv(n, block_n)
        k_tiles = _cdiv(k, block_k)
        split_k = max(1, min(_cdiv(2 * num_sms, tiles), k_tiles, MAX_SPLIT_K))
    return W4A16Config(block_m, block_n, block_k, split_k, num_warps, num_stages)


@_jit
def _nibble_codes(words, SHIFT: tl.constexpr, CODE_MAGIC: tl.constexpr, CODE_DTYPE: tl.constexpr):
    """Nibble SHIFT / 4 of each word as CODE_DTYPE: q + c, exactly. 16-bit dtypes put the code
    in the low mantissa bits of a constant (CODE_MAGIC: bf16 0x4300 = 128, fp16 0x6400 = 1024),
    so c is that constant and no conversion instruction runs; fp32 converts (c = 0)."""
    q = (words >> SHIFT) & 0xF
    if CODE_MAGIC == 0:
        return q.to(CODE_DTYPE)
    return (q | CODE_MAGIC).to(tl.int16).to(CODE_DTYPE, bitcast=True)


@_jit
def _codes_tile(
    words,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CODE_MAGIC: tl.constexpr,
    CODE_DTYPE: tl.constexpr,
):
    """(BLOCK_K / 8, BLOCK_N) packed words -> (BLOCK_K, BLOCK_N) codes (+ offset), row 8r + j
    from nibble j of word row r. The 8 nibbles are stacked with joins (nibble j and j + 4 first:
    the two halves of a 32-bit register) and each thread keeps a word's 8 codes together, so
    the tile reaches shared memory in 16-byte stores (bench/cuda_compile.py --streaming: a
    2-byte store per code when the tile was built by broadcasting shifts)."""
    c0 = _nibble_codes(words, 0, CODE_MAGIC, CODE_DTYPE)
    c1 = _nibble_codes(words, 4, CODE_MAGIC, CODE_DTYPE)
    c2 = _nibble_codes(words, 8, CODE_MAGIC, CODE_DTYPE)
    c3 = _nibble_codes(words, 12, CODE_MAGIC, CODE_DTYPE)
    c4 = _nibble_codes(words, 16, CODE_MAGIC, CODE_DTYPE)
    c5 = _nibble_codes(words, 20, CODE_MAGIC, CODE_DTYPE)
    c6 = _nibble_codes(words, 24, CODE_MAGIC, CODE_DTYPE)
    c7 = _nibble_codes(words, 28, CODE_MAGIC, CODE_DTYPE)
    # join appends an axis: after three, [r, n, a, b, c] holds nibble 4a + 2b + c.
    high = tl.join(tl.join(c0, c4), tl.join(c2, c6))  # [r, n, a, b]: nibble 4a + 2b
    low = tl.join(tl.join(c1, c5), tl.join(c3, c7))  # nibble 4a + 2b + 1
    stacked = tl.permute(tl.join(high, low), (0, 2, 3, 4, 1))  # [r, a, b, c, n]
    return tl.reshape(stacked, (BLOCK_K, BLOCK_N))


@_jit
def _load_rows(
    x_rows,
    qw_ptr,
    k0,
    k_end,
    offs_n,
    mask_m,
    mask_n,
    stride_xk,
    stride_qk,
    stride_qn,
    ROWS: tl.constexpr,
):
    """Activations (BLOCK_M, ROWS) and packed words (ROWS / 8, BLOCK_N) of rows k0.. k0 + ROWS,
    each word once; rows at or past k_end read as zeros."""
    offs_k = k0 + tl.arange(0, ROWS)
    x = tl.load(
        x_rows + offs_k[None, :] * stride_xk,
        mask=mask_m[:, None] & (offs_k < k_end)[None, :],
        other=0.0,
    )
    offs_w = k0 // 8 + tl.arange(0, ROWS // 8)
    words = tl.load(
        qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn,
        mask=(offs_w < k_end // 8)[:, None] & mask_n[None, :],
        other=0,
    )
    return x, words


@_jit
def _group_tile(
    acc,
    x_rows,
    qw_ptr,
    scales_ptr,
    zeros_ptr,
    k0,
    k_end,
    group_size,
    offs_n,
    mask_m,
    mask_n,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CODE_MAGIC: tl.constexpr,
    CODE_OFFSET: tl.constexpr,
    CODE_DTYPE: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """acc + x[:, k0:k0+ROWS] @ W[k0:k0+ROWS] for ROWS rows inside one group (k0 a multiple of
    ROWS, ROWS of the group size). Its one scale and zero per column come out of the product,
    x . ((q - z) s) = s (x . (q + c) - (z + c) sum(x)), so the codes go into the dot as they are
    (q + c, exact in x's dtype: `_codes_tile`) and nothing is dequantized element by element.
    Each packed word is loaded once ((ROWS / 8, BLOCK_N) words). Rows at or past k_end read as
    zeros (a run wholly past it adds nothing)."""
    x, words = _load_rows(
        x_rows, qw_ptr, k0, k_end, offs_n, mask_m, mask_n, stride_xk, stride_qk, stride_qn, ROWS
    )
    # a run wholly past k_end (its x reads as zeros) reads the last group's row instead
    g = tl.minimum(k0, k_end - 1) // group_size
    s = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)
    z = tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn, mask=mask_n, other=0.0)
    codes = _codes_tile(words, ROWS, BLOCK_N, CODE_MAGIC, CODE_DTYPE)
    if DOT_F32:
        part = tl.dot(x.to(tl.float32), codes.to(tl.float32), input_precision="ieee")
    else:
        part = tl.dot(x, codes)
    x_sum = tl.sum(x.to(tl.float32), axis=1)
    zero = z.to(tl.float32) + CODE_OFFSET
    return acc + s.to(tl.float32)[None, :] * (part - zero[None, :] * x_sum[:, None])


@_jit
def _w4a16_kernel(
    x_ptr,
    qw_ptr,
    scales_ptr,
    zeros_ptr,
    g_idx_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    group_size,
    k_split,
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    stride_os,
    stride_om,
    stride_on,
    HAS_G_IDX: tl.constexpr,
    TILE_IN_GROUP: tl.constexpr,
    CODE_MAGIC: tl.constexpr,
    CODE_OFFSET: tl.constexpr,
    CODE_DTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_K: tl.constexpr,
):
    """out[split, m, n] = sum over this split's K slice of x[m, k] * W[n, k] (+ bias).

    Grid (M tiles, N tiles, splits). k_split is a multiple of BLOCK_K (so of 8), so every tile
    starts on a word boundary; with TILE_IN_GROUP each GROUP_K rows of it lie inside one group.
    DOT_F32 multiplies in fp32 IEEE (fp32 activations, and the interpreter, whose numpy has no
    bf16 matmul); otherwise the codes (TILE_IN_GROUP) or the dequantized tile rounded to x's
    dtype go to the tensor cores.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    shifts = (tl.arange(0, 8) * 4)[:, None]  # (8, 1): nibble j of a word
    k_start = pid_k * k_split
    k_end = tl.minimum(k_start + k_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if TILE_IN_GROUP:
            # GROUP_K rows at a time share one scale and zero per column (GROUP_K divides the
            # group): `_group_tile` takes them out of the product.
            for j in tl.static_range(BLOCK_K // GROUP_K):
                acc = _group_tile(
                    acc,
                    x_rows,
                    qw_ptr,
                    scales_ptr,
                    zeros_ptr,
                    k0 + j * GROUP_K,
                    k_end,
                    group_size,
                    offs_n,
                    mask_m,
                    mask_n,
                    stride_xk,
                    stride_qk,
                    stride_qn,
                    stride_sg,
                    stride_sn,
                    stride_zg,
                    stride_zn,
                    GROUP_K,
                    BLOCK_N,
                    CODE_MAGIC,
                    CODE_OFFSET,
                    CODE_DTYPE,
                    DOT_F32,
                )
        else:
            # Scales and zeros gathered per row: dequantize the tile, then multiply.
            x, words = _load_rows(
                x_rows,
                qw_ptr,
                k0,
                k_end,
                offs_n,
                mask_m,
                mask_n,
                stride_xk,
                stride_qk,
                stride_qn,
                BLOCK_K,
            )
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_end
            nibbles = (words[:, None, :] >> shifts[None, :, :]) & 0xF
            q = tl.reshape(nibbles, (BLOCK_K, BLOCK_N)).to(tl.float32)
            mask_kn = mask_k[:, None] & mask_n[None, :]
            if HAS_G_IDX:
                g_rows = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
            else:
                g_rows = offs_k // group_size
            s = tl.load(
                scales_ptr + g_rows[:, None] * stride_sg + offs_n[None, :] * stride_sn,
                mask=mask_kn,
                other=0.0,
            )
            z = tl.load(
                zeros_ptr + g_rows[:, None] * stride_zg + offs_n[None, :] * stride_zn,
                mask=mask_kn,
                other=0.0,
            )
            w = (q - z.to(tl.float32)) * s.to(tl.float32)
            if DOT_F32:
                acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = (
        out_ptr
        + pid_k * stride_os
        + offs_m.to(tl.int64)[:, None] * stride_om
        + offs_n[None, :] * stride_on
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def check_shapes(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> None:
    """Raise ValueError unless x [..., K], weight and bias [N] fit together (K = in_features, a
    multiple of 8 and of group_size; scales / zeros [K / group_size, N]; g_idx [K])."""
    k, n = weight.in_features, weight.out_features
    if weight.qweight.dim() != 2 or weight.qweight.dtype != torch.int32:
        raise ValueError(
            f"qweight must be int32 [K/8, N], got {weight.qweight.dtype} "
            f"{tuple(weight.qweight.shape)}"
        )
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x {tuple(x.shape)} must end in K = {k}, the weight's in_features "
            f"(qweight {tuple(weight.qweight.shape)})"
        )
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if k % 8 or weight.group_size <= 0 or k % weight.group_size:
        raise ValueError(
            f"K = {k} must be a multiple of 8 and of group_size {weight.group_size} "
            f"(x {tuple(x.shape)}, qweight {tuple(weight.qweight.shape)})"
        )
    if weight.g_idx is None:
        groups = k // weight.group_size
        if weight.scales.shape[0] != groups:
            raise ValueError(
                f"scales {tuple(weight.scales.shape)} must have K / group_size = {groups} rows "
                f"for K = {k}, group_size {weight.group_size}"
            )
    elif tuple(weight.g_idx.shape) != (k,):
        raise ValueError(f"g_idx {tuple(weight.g_idx.shape)} must be [K] = [{k}]")
    for name, t in (("scales", weight.scales), ("zeros", weight.zeros)):
        if t.dim() != 2 or t.shape[1] != n or t.shape[0] != weight.scales.shape[0]:
            raise ValueError(
                f"{name} {tuple(t.shape)} must be [groups, N] with N = {n} and the scales' rows"
            )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias {tuple(bias.shape)} must be [N] = [{n}]")


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(torch.cuda.current_device() if device.index is None else device.index)
    return INTERPRETER_SMS


_CODE_ARGS = {
    # activation dtype: the constant a code goes into as low mantissa bits (value c + q), c
    torch.bfloat16: (0x4300, 128.0),  # 2^7: 7 mantissa bits
    torch.float16: (0x6400, 1024.0),  # 2^10: 10 mantissa bits
    torch.float32: (0, 0.0),  # converted
}


def _code_args(dtype: torch.dtype) -> dict[str, Any]:
    """The kernel's CODE_* constexprs for activations of `dtype` (see `_nibble_codes`)."""
    magic, offset = _CODE_ARGS[dtype]
    code_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype, tl.float32)
    return dict(CODE_MAGIC=magic, CODE_OFFSET=offset, CODE_DTYPE=code_dtype)


def w4a16_matmul_triton(
    x: torch.Tensor,
    weight: Int4Weight,
    bias: torch.Tensor | None = None,
    config: W4A16Config | None = None,
) -> torch.Tensor:
    """Triton twin of `w4a16_matmul_torch`: x [..., K] -> [..., N] in x's dtype.

    `config` overrides `pick_config` (tests force split / gather paths with it).
    """
    check_shapes(x, weight, bias)
    k, n = weight.in_features, weight.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    if config is None:
        config = pick_config(
            m, n, k, weight.group_size, _num_sms(x.device), act_order=weight.g_idx is not None
        )
    k_tiles = _cdiv(k, config.block_k)
    k_split = _cdiv(k_tiles, min(config.split_k, k_tiles)) * config.block_k
    splits = _cdiv(k, k_split)
    has_g_idx = weight.g_idx is not None
    group_k = min(config.block_k, weight.group_size & -weight.group_size)
    tile_in_group = not has_g_idx and group_k >= MIN_GROUP_K
    target = out if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    fuse_bias = bias is not None and splits == 1
    scales, zeros = weight.scales, weight.zeros
    grid = (_cdiv(m, config.block_m), _cdiv(n, config.block_n), splits)
    _w4a16_kernel[grid](
        x2,
        weight.qweight,
        scales,
        zeros,
        weight.g_idx if has_g_idx else weight.qweight,
        bias if fuse_bias else scales,
        target,
        m,
        n,
        k,
        weight.group_size,
        k_split,
        x2.stride(0),
        x2.stride(1),
        weight.qweight.stride(0),
        weight.qweight.stride(1),
        scales.stride(0),
        scales.stride(1),
        zeros.stride(0),
        zeros.stride(1),
        target.stride(0) if splits > 1 else 0,
        target.stride(-2),
        target.stride(-1),
        HAS_G_IDX=has_g_idx,
        TILE_IN_GROUP=tile_in_group,
        **_code_args(x.dtype),
        HAS_BIAS=fuse_bias,
        DOT_F32=x.dtype == torch.float32 or _is_interpreting(),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_K=group_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if splits > 1:
        total = target.sum(dim=0)
        if bias is not None:
            total += bias.to(torch.float32)
        out.copy_(total)
    return out.reshape(*lead, n)


def w4a16_matmul_torch(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference: dequantize the whole weight to fp32, x @ W.T (+ bias) in fp32, cast to x's
    dtype. x [..., K] -> [..., N]."""
    check_shapes(x, weight, bias)
    out = x.to(torch.float32) @ dequantized_weight(weight, torch.float32).T
    if bias is not None:
        out += bias.to(torch.float32)
    return out.to(x.dtype)


def w4a16_matmul(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ dequantized(weight).T (+ bias) -> [..., N] in x's dtype, fp32 accumulation:
    the Triton kernel on CUDA, the torch twin elsewhere (see `kernels.dispatch`)."""
    if use_triton(x.device):
        return w4a16_matmul_triton(x, weight, bias)
    return w4a16_matmul_torch(x, weight, bias)


def dequantized_weight(weight: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] (nn.Linear orientation) in `dtype`: (q - zero) * scale in fp32,
    rounded once to `dtype`. The CPU path caches it at load and multiplies with `F.linear`; it
    costs the memory of a float weight (N * K * dtype size). Works through DEQUANT_ELEMENTS at a
    time, so the temporaries stay small beside the result."""
    k, n = weight.in_features, weight.out_features
    if weight.group_size <= 0 or k % weight.group_size:
        raise ValueError(
            f"K = {k} (qweight {tuple(weight.qweight.shape)}) is not a multiple of group_size "
            f"{weight.group_size}"
        )
    device = weight.qweight.device
    out = torch.empty(n, k, dtype=dtype, device=device)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=device)
    words = weight.qweight.T.contiguous()  # [N, K/8], an eighth of the fp32 weight's bytes
    scales, zeros = weight.scales.T, weight.zeros.T  # [N, groups]
    g = None if weight.g_idx is None else weight.g_idx.to(device=device, dtype=torch.int64)
    rows = max(1, DEQUANT_ELEMENTS // max(k, 1)) if device.type == "cpu" else max(n, 1)
    for n0 in range(0, n, rows):
        n1 = min(n0 + rows, n)
        codes = (words[n0:n1, :, None] >> shifts) & 0xF  # [rows, K/8, 8]
        w = out[n0:n1] if dtype == torch.float32 else torch.empty(n1 - n0, k, device=device)
        w.copy_(codes.reshape(n1 - n0, k))
        s = scales[n0:n1].to(torch.float32)
        z = zeros[n0:n1].to(torch.float32)
        if g is None:
            per_group = w.view(n1 - n0, -1, weight.group_size)
            per_group.sub_(z[:, :, None]).mul_(s[:, :, None])
        else:
            w.sub_(z[:, g]).mul_(s[:, g])
        if dtype != torch.float32:
            out[n0:n1] = w
    return out


def cpu_int4_supported(weight: Int4Weight, dtype: torch.dtype) -> bool:
    """Whether `CpuInt4Weight` can serve this weight with `dtype` activations on CPU."""
    return (
        dtype == torch.bfloat16
        and weight.g_idx is None
        and weight.group_size in CPU_INT4_GROUPS
        and weight.in_features % weight.group_size == 0
        and weight.out_features % 16 == 0
        and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    )


class CpuInt4Weight:
    """A 4-bit weight repacked for PyTorch's CPU int4 matmul (bfloat16 activations)."""

    def __init__(self, weight: Int4Weight):
        from dist_runtime.formats.int4 import unpack_rows

        if not cpu_int4_supported(weight, torch.bfloat16):
            raise ValueError(
                f"CPU int4 matmul needs bfloat16 activations, no g_idx, group_size in "
                f"{CPU_INT4_GROUPS} and out_features % 16 == 0; got group_size "
                f"{weight.group_size}, out_features {weight.out_features}, g_idx "
                f"{'set' if weight.g_idx is not None else 'none'}"
            )
        codes = unpack_rows(weight.qweight).T.contiguous()  # [N, K] int32
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scales = weight.scales.to(torch.float32)
        offsets = (8.0 - weight.zeros.to(torch.float32)) * scales
        self.scales_and_zeros = torch.stack([scales, offsets], dim=-1).to(torch.bfloat16)
        self.group_size = weight.group_size
        self.out_features = weight.out_features

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] (bfloat16) -> [..., N] bfloat16."""
        lead = x.shape[:-1]
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous(),
            self.packed,
            self.group_size,
            self.scales_and_zeros,
        )
        if bias is not None:
            out = out + bias
        return out.reshape(*lead, self.out_features)
