"""Decode attention on CPU that reads the paged KV cache in place, and RoPE fused with the KV
store (`csrc/cpu_decode.c`).

The torch reference decode (`paged_attention._decode`) gathers every sequence's blocks into a
contiguous copy (`index_select`) and runs SDPA over it, so each step reads the context's K/V
three times (gather read, gather write, SDPA read). The native kernel walks each sequence's
block table and reads every key and value from memory once: a block is converted to float rows
(dequantized, for an int8 / int4 cache) in one pass in address order, then all query heads of a
kv head's group (and, for a batch over a shared cached prefix, every sequence's queries) are
scored against it, two at a time, while it sits in cache. Long contexts are cut into splits
merged by log-sum-exp, so a single sequence still spreads over the threads.

The C source is compiled once per machine with the system C compiler into the native library
(`kernels/native.py`), which shares PyTorch's OpenMP thread pool. float32 and bfloat16 caches
run natively, and so do int8 / int4 caches (`kernels/kv_quant.py`), each block dequantized as
it is read instead of the reference's dequantized copy of the whole context; float16, a head_dim
that is not a multiple of 16, or a machine without a compiler uses the reference.

`rope_store` rotates a layer's q and k in place and writes k and v to their cache slots in one
call: on the reference path that is about twenty small operators per layer (RoPE's slices,
concatenations and products for q and k, the slot filter and two scatters; for an int8 / int4
cache a dozen more that quantize k and v), whose dispatch cost at decode sizes exceeds their
arithmetic. `DIST_RUNTIME_CPU_ATTENTION` chooses for both:
`native` (the default) or `torch` (always the references, e.g. to compare the two).
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from dist_runtime.config import cpu_attention_choice
from kernels import native
from kernels.flash_attn import check_window
from kernels.kv_quant import check_quant_caches, code_dim
from kernels.native import run_profiled
from kernels.position_attention import check_softcap

logger = logging.getLogger(__name__)

DTYPES = {torch.float32: 0, torch.bfloat16: 1}
PROFILE_NAME = "cpu_attention::paged_decode"
"""What a torch.profiler trace calls the kernel's calls (recorded only while one runs)."""
ROPE_STORE_PROFILE_NAME = "cpu_attention::rope_store"
SPLITS_PER_THREAD = 4
"""Work items aimed at per thread when a batch has too few sequences (an item takes every kv
head of its sequence's key range, walking whole cache blocks in order)."""
MIN_SPLIT_BLOCKS = 8
"""Fewest cache blocks in a split: shorter ones cost more in merging than they spread."""
MAX_HEAD_DIM = 256
"""head_dim the kernel takes (a multiple of 16 up to this)."""


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The native library with this module's functions typed; None when it cannot be built."""
    lib = native.library()
    return None if lib is None else bind(lib)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """lib with this module's functions typed (the runtime's library, or a benchmark's build
    of earlier sources)."""
    fn = lib.dr_paged_decode
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    fn.argtypes = [
        *(ptr, i64, i64, i64),  # q and its seq / row / head strides
        *(ptr, ptr, i64, i64, i64),  # k, v caches and their block / slot / head strides
        *(ptr, i32, i64),  # block tables, int64?, row stride
        ptr,  # context lens (int64)
        *(ptr, i64, i64, i64),  # out and its strides
        *(ptr, i64, i64),  # lse (or NULL) and its strides
        *(i32, i32, i32, i32, i32, i32),  # seqs, rows, kv heads, group, head_dim, block_size
        ctypes.c_float,  # scale
        *(i32, i32, i64, i32),  # dtype, splits, blocks per split, threads
        ptr,  # scratch
        i32,  # cache kind: the dtype's code, or 8 / 4 bits
        *(ptr, ptr, i64, i64, i64),  # k, v params (scale, zero) and their strides
        i64,  # sliding window (0: none)
        ctypes.c_float,  # soft-cap (0: none)
    ]
    fn.restype = i32
    rs = lib.dr_rope_store
    rs.argtypes = [
        *(ptr, i64, i64),  # q and its token / head strides
        *(ptr, i64, i64),  # k
        *(ptr, i64, i64),  # v
        ptr,  # cos (tokens, head_dim) float32
        ptr,  # sin
        *(ptr, ptr, i64, i64, i64),  # k, v caches and their block / slot / head strides
        ptr,  # slots (int64)
        *(
            i32,
            i32,
            i32,
            i32,
            i32,
            i32,
            i32,
        ),  # tokens, q / kv heads, head_dim, block, dtype, threads
        i32,  # bits: 0, or 8 / 4 for code caches
        *(ptr, ptr, i64, i64, i64),  # k, v params (scale, zero) and their strides
    ]
    rs.restype = None
    return lib


def native_decode_supported(q: torch.Tensor, k_cache: torch.Tensor, bits: int) -> bool:
    """True when this decode runs the native kernel: CPU, float32/bfloat16 queries over a cache
    of their dtype or of int8 / int4 codes, head_dim a multiple of 16 up to MAX_HEAD_DIM,
    DIST_RUNTIME_CPU_ATTENTION not `torch`, and the kernel built."""
    return (
        (k_cache.dtype == q.dtype if bits == 0 else bits in (4, 8))
        and q.shape[-1] % 16 == 0
        and _native_on(q)
    )


def _native_on(q: torch.Tensor) -> bool:
    """What every native kernel needs: a float32/bfloat16 CPU tensor, a head_dim up to
    MAX_HEAD_DIM, DIST_RUNTIME_CPU_ATTENTION not `torch`, and the library built."""
    return (
        q.device.type == "cpu"
        and q.dtype in DTYPES
        and q.shape[-1] <= MAX_HEAD_DIM
        and cpu_attention_choice() == "native"
        and _library() is not None
    )


def split_plan(items: int, max_blocks: int, threads: int) -> tuple[int, int]:
    """(splits, blocks per split) for `items` sequences whose longest context
    spans max_blocks blocks: enough splits for SPLITS_PER_THREAD items per thread, none shorter
    than MIN_SPLIT_BLOCKS blocks."""
    want = -(-SPLITS_PER_THREAD * threads // max(items, 1))
    splits = max(1, min(want, max_blocks // MIN_SPLIT_BLOCKS))
    per = max(1, -(-max_blocks // splits))
    return -(-max_blocks // per) if max_blocks else 1, per


def window_keys(max_keys: int, window: int, block_size: int) -> int:
    """The keys a split plan spreads over threads: the longest context, or with a sliding
    window (window > 0) the most blocks a window can touch (it may start mid-block)."""
    return min(max_keys, window + block_size) if window > 0 else max_keys


def scratch_floats(seqs: int, rows: int, kv_heads: int, group: int, splits: int, d: int) -> int:
    """Floats of `dr_paged_decode`'s scratch: per (sequence, kv head, split) the partial
    (acc d, max, sum) of each of its rows x group queries."""
    return seqs * kv_heads * splits * rows * group * (d + 2)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_keys: int,
    rows: int = 1,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (seqs * rows, q_heads, d) float32 and lse (seqs * rows, q_heads) float32.

    q: (seqs * rows, q_heads, d); the `rows` consecutive queries of each sequence share its
    block table row and context length (rows > 1: a batch over one shared prefix, seqs = 1).
    max_keys: the longest context (bounds the splits; the kernel reads each sequence's own).
    A context of 0 keys gives out 0 and lse -inf. bits 8 / 4: the caches hold uint8 codes and
    k_params / v_params their float32 (scale, zero) (`kernels/kv_quant.py`). window > 0: the
    query of a context of n keys attends to its last `window` keys only, [max(0, n - window),
    n) (one row per sequence); 0: to all of them. softcap > 0: each scaled score s becomes
    softcap * tanh(s / softcap) before the softmax (Gemma 2's `attn_logit_softcapping`).
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU decode attention kernel is not built (see the log)")
    check_window(window)
    check_softcap(softcap)
    tokens, q_heads, d = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    seqs = block_tables.shape[0]
    if tokens != seqs * rows or context_lens.shape[0] != seqs:
        raise ValueError(
            f"q holds {tokens} queries, block_tables {seqs} sequences of {rows} rows and "
            f"context_lens {context_lens.shape[0]}: they disagree"
        )
    if d % 16 or d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} is not a multiple of 16 up to {MAX_HEAD_DIM}")
    check_quant_caches(k_cache, v_cache, k_params, v_params, bits, d)
    if (
        q_heads % kv_heads
        or k_cache.shape[3] != code_dim(d, bits)
        or k_cache.shape != v_cache.shape
    ):
        raise ValueError(
            f"q {tuple(q.shape)} does not fit caches of {tuple(k_cache.shape)} / "
            f"{tuple(v_cache.shape)}"
        )
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("q and the caches need a contiguous head_dim and equal cache strides")
    if block_tables.dtype not in (torch.int32, torch.int64) or block_tables.stride(-1) != 1:
        raise ValueError(f"block_tables must be int32/int64 rows, got {block_tables.dtype}")
    if k_params is not None and v_params is not None:
        if k_params.stride() != v_params.stride():
            raise ValueError("k_params and v_params need equal strides")
        kind, p_strides = bits, k_params.stride()[:3]
        k_ptr, v_ptr = k_params.data_ptr(), v_params.data_ptr()
    else:
        if k_cache.dtype != q.dtype:
            raise ValueError(f"q is {q.dtype} but the caches {k_cache.dtype}")
        kind, p_strides, k_ptr, v_ptr = DTYPES[q.dtype], (0, 0, 0), None, None
    lens = context_lens.to(torch.int64).contiguous()
    out = torch.empty(tokens, q_heads, d, dtype=torch.float32)
    lse = torch.empty(tokens, q_heads, dtype=torch.float32)
    if tokens == 0:
        return out, lse
    threads = torch.get_num_threads()
    max_blocks = -(-window_keys(max_keys, window, block_size) // block_size)
    splits, per = split_plan(seqs, max_blocks, threads)
    group = q_heads // kv_heads
    work = torch.empty(scratch_floats(seqs, rows, kv_heads, group, splits, d), dtype=torch.float32)
    args = (
        q.data_ptr(),
        q.stride(0) * rows,
        q.stride(0),
        q.stride(1),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.data_ptr(),
        int(block_tables.dtype == torch.int64),
        block_tables.stride(0),
        lens.data_ptr(),
        out.data_ptr(),
        out.stride(0) * rows,
        out.stride(0),
        out.stride(1),
        lse.data_ptr(),
        lse.stride(0) * rows,
        lse.stride(0),
        seqs,
        rows,
        kv_heads,
        group,
        d,
        block_size,
        scale,
        DTYPES[q.dtype],
        splits,
        per,
        threads,
        work.data_ptr(),
        kind,
        k_ptr,
        v_ptr,
        *p_strides,
        window,
        softcap,
    )
    failed = run_profiled(lib.dr_paged_decode, PROFILE_NAME, args)
    if failed == 1:
        raise MemoryError("the CPU decode attention kernel could not allocate its scratch")
    if failed == 4:
        raise ValueError(
            f"a sliding window ({window}) needs one query row per sequence, not {rows}"
        )
    if failed:
        raise RuntimeError(f"the CPU decode attention kernel refused its inputs (code {failed})")
    return out, lse


def flash_decode_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    return_lse: bool = False,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`flash_decode_ref` through the native kernel (see `native_decode_supported`); a
    quantized cache (bits 8 / 4) is dequantized row by row as it is read. window > 0: each
    query attends to its sequence's last `window` keys only; softcap > 0 caps the scaled
    scores (`paged_decode`).

    A batch whose sequences share at least MIN_SHARED_BLOCKS leading blocks (questions on one
    cached document) reads the shared prefix once for every query, each sequence's tail on its
    own, and merges the two by log-sum-exp, as the reference does; not when a window hides
    keys of the longest context (each query's window starts elsewhere).
    """
    from kernels.paged_attention import MIN_SHARED_BLOCKS, _decode_plan
    from kernels.position_attention import merge_pair

    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    check_window(window)
    batch = q.shape[0]
    block_size = k_cache.shape[1]
    plan = _decode_plan(block_tables, context_lens, block_size)
    if batch > 1 and plan.shared >= MIN_SHARED_BLOCKS and not 0 < window < plan.keys:
        shared = plan.shared
        prefix = torch.tensor([shared * block_size], dtype=torch.int64)
        out, lse = paged_decode(
            q,
            k_cache,
            v_cache,
            block_tables[:1, :shared],
            prefix,
            scale,
            shared * block_size,
            batch,
            k_params=k_params,
            v_params=v_params,
            bits=bits,
            softcap=softcap,
        )
        rest = context_lens - shared * block_size
        o_t, s_t = paged_decode(
            q,
            k_cache,
            v_cache,
            block_tables[:, shared:],
            rest,
            scale,
            plan.keys - shared * block_size,
            k_params=k_params,
            v_params=v_params,
            bits=bits,
            softcap=softcap,
        )
        out, lse = merge_pair(out, lse, o_t, s_t)
    else:
        out, lse = paged_decode(
            q,
            k_cache,
            v_cache,
            block_tables,
            context_lens,
            scale,
            plan.keys,
            k_params=k_params,
            v_params=v_params,
            bits=bits,
            window=window,
            softcap=softcap,
        )
    return out.to(q.dtype), (lse if return_lse else None)


def native_rope_store_supported(q: torch.Tensor, k_cache: torch.Tensor, bits: int) -> bool:
    """True when `rope_store` serves this layer: CPU, float32/bfloat16 q over a cache of its
    dtype or of int8 / int4 codes, an even head_dim up to MAX_HEAD_DIM,
    DIST_RUNTIME_CPU_ATTENTION not `torch`, and the kernel built."""
    return (
        (k_cache.dtype == q.dtype if bits == 0 else bits in (4, 8))
        and q.shape[-1] % 2 == 0
        and _native_on(q)
    )


def rope_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
) -> None:
    """In place: q and k rotated by RoPE (`kernels/rotary.py: rotate` with these tables), then
    k and v written to their cache slots (`store_kv`; slots < 0 are not written), in one call.
    bits 8 / 4: the caches hold uint8 codes and each rotated k and each v is quantized as
    `quantize_kv_ref` does (the same codes and (scale, zero), written to k_params / v_params).

    q: (tokens, q_heads, d), k, v: (tokens, kv_heads, d), any token / head strides with a
    contiguous head_dim (views into the fused qkv output); cos, sin: (tokens, 1, d) or
    (tokens, d) float32 (`rotary_cos_sin`); caches (num_blocks, block_size, kv_heads, d) of q's
    dtype, or of `code_dim(d, bits)` uint8 codes; slot_mapping (tokens,) integer.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU decode kernels are not built (see the log)")
    tokens, q_heads, d = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    check_quant_caches(k_cache, v_cache, k_params, v_params, bits, d)
    if (
        k.shape != (tokens, kv_heads, d)
        or v.shape != k.shape
        or k_cache.shape[3] != code_dim(d, bits)
        or v_cache.shape != k_cache.shape
        or k_cache.stride() != v_cache.stride()
        or cos.numel() != tokens * d
        or sin.shape != cos.shape
        or slot_mapping.shape != (tokens,)
    ):
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, cos "
            f"{tuple(cos.shape)}, slots {tuple(slot_mapping.shape)} and caches "
            f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)} disagree"
        )
    stored = (k, v) if bits else (k, v, k_cache, v_cache)
    if any(t.dtype != q.dtype for t in stored) or q.dtype not in DTYPES:
        raise ValueError(f"q, k, v (and unquantized caches) need one dtype of {list(DTYPES)}")
    if any(t.stride(-1) != 1 for t in (q, k, v, k_cache)):
        raise ValueError("q, k, v and the caches need a contiguous head_dim")
    params: tuple[int | None, ...] = (None, None, 0, 0, 0)
    if bits and k_params is not None and v_params is not None:
        if k_params.stride() != v_params.stride():
            raise ValueError("k_params and v_params need equal strides")
        params = (k_params.data_ptr(), v_params.data_ptr(), *k_params.stride()[:3])
    cos = cos.to(torch.float32).contiguous()
    sin = sin.to(torch.float32).contiguous()
    slots = slot_mapping.to(torch.int64).contiguous()
    if tokens == 0:
        return
    args = (
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        k.data_ptr(),
        k.stride(0),
        k.stride(1),
        v.data_ptr(),
        v.stride(0),
        v.stride(1),
        cos.data_ptr(),
        sin.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        slots.data_ptr(),
        tokens,
        q_heads,
        kv_heads,
        d,
        block_size,
        DTYPES[q.dtype],
        torch.get_num_threads(),
        bits,
        *params,
    )
    run_profiled(lib.dr_rope_store, ROPE_STORE_PROFILE_NAME, args)
