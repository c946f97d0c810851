"""Causal attention of one sequence's queries over keys at arbitrary positions, with LSE.

Context parallelism stripes a sequence's KV blocks over ranks, so neither a rank's queries nor
its keys are contiguous in position: query i sits at q_pos[i], key j at k_pos[j], and query i
sees key j when k_pos[j] <= q_pos[i] (and, with a sliding window W > 0, k_pos[j] > q_pos[i] - W).
A query that sees no key gets out 0 and lse -inf, so a merge by log-sum-exp ignores it.

The reference is memory-bounded for million-token contexts: it walks query and key tiles
(scores never exceed one tile), skips tiles wholly in a query tile's future (or wholly before
every query's window), and masks only tiles that straddle either edge. On CPU each tile runs
PyTorch's fused flash kernel, which returns the LSE; elsewhere, and in float64, the tile runs in
plain fp32/fp64 math.

The Triton kernel, `position_attention_triton`, is `_flash_attn_kernel` with positions read from
`q_pos` / `k_pos` instead of offset + index. Keys need not be sorted, so a key tile's visibility
is decided from the positions it loads: skipped when its smallest position is past the row
tile's largest, unmasked when its largest is at or before the row tile's smallest, else masked.
With a window (WINDOW) a key tile wholly before every row's window is skipped too, and one
that straddles a window's start is masked; with a soft-cap (SOFTCAP) the raw scores are capped
before the mask, as in the paged prefill kernel (context parallelism's prefill of a windowed
or soft-capped model).
"""

from __future__ import annotations

import math

import torch

from kernels.dispatch import use_triton
from kernels.flash_attn import (
    LOG2E,
    _jit,
    _online_softmax_tile,
    _store_rows,
    attention_config,
    check_head_dim,
    check_qkv,
    check_window,
    is_interpreting,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the torch reference runs
    triton = None  # type: ignore[assignment]

Q_TILE = 4096
K_TILE = 16384


def check_inputs(
    q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor
) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"q must be (n, q_heads, d) and k, v equal (m, kv_heads, d); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"head_dim {q.shape[-1]} vs {k.shape[-1]}: q heads ({q.shape[1]}) must be a multiple "
            f"of kv heads ({k.shape[1]}) with the same head_dim"
        )
    if q_pos.shape != q.shape[:1] or k_pos.shape != k.shape[:1]:
        raise ValueError(
            f"q_pos {tuple(q_pos.shape)} and k_pos {tuple(k_pos.shape)} must be (n,) and (m,)"
        )


def position_attention_ref(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    keys_sorted: bool = False,
    window: int = 0,
    q_tile: int | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (n, q_heads, d), k, v: (m, kv_heads, d), positions int64.

    Returns out (n, q_heads, d) in q's dtype and lse (n, q_heads) fp32 (fp64 for fp64 inputs).
    The reference finds out itself whether keys are sorted; `keys_sorted=True` (the Triton
    kernel's promise) is checked, so CPU runs catch a caller that breaks it.
    window > 0: query i sees only keys with q_pos[i] - window < k_pos[j] (a sliding window of
    `window` positions, its own included); 0: no window. q_tile: queries per tile (a query
    tile reads the keys from its first query's window to its last query); None: Q_TILE.
    softcap > 0: each scaled score s becomes softcap * tanh(s / softcap) before the softmax
    (Gemma 2's attention-logit soft-capping); 0: none.
    """
    check_inputs(q, q_pos, k, v, k_pos)
    check_window(window)
    check_softcap(softcap)
    n, q_heads, d = q.shape
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(n, q_heads, d, dtype=q.dtype, device=q.device)
    lse = torch.full((n, q_heads), float("-inf"), dtype=lse_dtype, device=q.device)
    m = k.shape[0]
    if n == 0 or m == 0:
        return out, lse
    # Queries in position order, so a query tile spans few positions and only the keys among
    # them need a mask (context parallelism hands over queries rank by rank, each striped).
    order = None
    if n > 1 and not bool((q_pos[1:] >= q_pos[:-1]).all()):
        order = torch.argsort(q_pos, stable=True)
        q, q_pos = q[order], q_pos[order]
    promised = keys_sorted
    keys_sorted = m < 2 or bool((k_pos[1:] >= k_pos[:-1]).all())
    if promised and not keys_sorted:
        raise ValueError("keys_sorted=True, but k_pos decreases somewhere")
    q_tile = q_tile or Q_TILE
    for q0 in range(0, n, q_tile):
        qs = slice(q0, min(q0 + q_tile, n))
        qp = q_pos[qs]
        q_lo, q_hi = int(qp.min()), int(qp.max())
        acc_o: torch.Tensor | None = None
        acc_l: torch.Tensor | None = None
        for ks in _key_tiles(k_pos, q_lo, q_hi, keys_sorted, window):
            kp = k_pos[ks]
            k_lo, k_hi = int(kp.min()), int(kp.max())
            if k_lo > q_hi:  # every key is in every query's future
                continue
            if window and k_hi <= q_lo - window:  # every key before every query's window
                continue
            visible = None
            if k_hi > q_lo:
                visible = kp[None, :] <= qp[:, None]
            if window and k_lo <= q_hi - window:
                inside = kp[None, :] > qp[:, None] - window
                visible = inside if visible is None else visible & inside
            o, s = attend_tile(q[qs], k[ks], v[ks], visible, scale, softcap)
            if acc_o is None or acc_l is None:
                acc_o, acc_l = o, s
            else:
                acc_o, acc_l = merge_pair(acc_o, acc_l, o, s)
        if acc_o is not None and acc_l is not None:
            out[qs] = acc_o.to(q.dtype)
            lse[qs] = acc_l.to(lse_dtype)
    if order is not None:
        out = torch.empty_like(out).index_copy_(0, order, out)
        lse = torch.empty_like(lse).index_copy_(0, order, lse)
    return out, lse


def _key_tiles(
    k_pos: torch.Tensor, q_lo: int, q_hi: int, keys_sorted: bool, window: int = 0
) -> list[slice]:
    """Key ranges to visit for queries at positions [q_lo, q_hi].

    Sorted keys split at q_lo and q_hi: keys at or before q_lo are visible to every query (large
    unmasked tiles), keys in (q_lo, q_hi] need a mask, keys past q_hi are skipped. With a
    window W, keys at or before q_lo - W are skipped too and those in (q_lo - W, q_hi - W] need
    a mask. Unsorted keys are walked in fixed tiles.
    """
    m = k_pos.numel()
    if not keys_sorted:
        return [slice(k0, min(k0 + K_TILE, m)) for k0 in range(0, m, K_TILE)]
    ends = [q_lo, q_hi] + ([q_lo - window, q_hi - window] if window else [])
    bounds = torch.tensor(ends, dtype=k_pos.dtype, device=k_pos.device)
    j0, j1, *edge = torch.searchsorted(k_pos, bounds, right=True).tolist()
    cuts = [0, j0, j1] if not edge else [edge[0], min(edge[1], j0), j0, j1]
    return [
        slice(k0, min(k0 + K_TILE, end))
        for start, end in zip(cuts, cuts[1:])
        for k0 in range(start, end, K_TILE)
    ]


def attend_tile(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor | None,
    scale: float,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile: out (n, q_heads, d) and lse (n, q_heads) in the compute dtype (fp32 or fp64);
    softcap > 0 caps the scaled scores (`soft_cap`)."""
    n, q_heads, d = q.shape
    m, kv_heads, _ = k.shape
    group = q_heads // kv_heads
    compute = torch.promote_types(q.dtype, torch.float32)
    if q.device.type == "cpu" and q.dtype != torch.float64 and not softcap:
        # (1, heads, len, d) for the fused kernel; it wants K/V with q's head count.
        qh = q.transpose(0, 1)[None]
        kh = k.repeat_interleave(group, dim=1).transpose(0, 1)[None] if group > 1 else None
        vh = v.repeat_interleave(group, dim=1).transpose(0, 1)[None] if group > 1 else None
        kh = k.transpose(0, 1)[None] if kh is None else kh
        vh = v.transpose(0, 1)[None] if vh is None else vh
        mask = None
        if visible is not None:
            mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
            mask.masked_fill_(~visible, float("-inf"))
            mask = mask[None, None]
        o, s = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qh, kh, vh, 0.0, False, attn_mask=mask, scale=scale
        )
        o = o[0].transpose(0, 1).to(compute)  # (n, q_heads, d)
        s = s[0].transpose(0, 1).to(compute)  # (n, q_heads)
        if visible is not None:
            # The fused kernel reports lse 0 for a row that sees nothing.
            blind = ~visible.any(dim=1)
            if bool(blind.any()):
                o[blind] = 0
                s[blind] = float("-inf")
        return o, s
    qg = q.to(compute).view(n, kv_heads, group, d).permute(1, 2, 0, 3)  # (kvh, g, n, d)
    scores = qg @ k.to(compute).permute(1, 2, 0)[:, None]  # (kvh, g, n, m)
    scores = soft_cap(scores, softcap, scale)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    s = torch.logsumexp(scores, dim=-1)  # (kvh, g, n)
    probs = torch.exp(scores - s.nan_to_num(neginf=0.0)[..., None])
    o = probs @ v.to(compute).transpose(0, 1)[:, None]  # (kvh, g, n, d)
    return o.permute(2, 0, 1, 3).reshape(n, q_heads, d), s.permute(2, 0, 1).reshape(n, q_heads)


def check_softcap(softcap: float) -> None:
    if not (softcap >= 0.0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be 0 (none) or a positive number, got {softcap!r}")


def soft_cap(scores: torch.Tensor, softcap: float, scale: float = 1.0) -> torch.Tensor:
    """softcap * tanh(scale * scores / softcap) (Gemma 2's attention-logit soft-capping of the
    scaled scores); softcap 0: scale * scores. Computed as 2 softcap sigmoid(2 x) - softcap, the
    same function to float rounding: torch's CPU sigmoid runs several times faster than its
    tanh. `scores` is overwritten."""
    if not softcap:
        return scores.mul_(scale)
    return scores.mul_(2.0 * scale / softcap).sigmoid_().mul_(2.0 * softcap).sub_(softcap)


def merge_pair(
    o_a: torch.Tensor, s_a: torch.Tensor, o_b: torch.Tensor, s_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log-sum-exp merge of two partials in o_a's (compute) dtype; a side with lse -inf
    (saw no key) weighs nothing, and a row neither side saw stays out 0, lse -inf."""
    s_b = s_b.to(s_a.dtype)
    s = torch.logaddexp(s_a, s_b)
    shift = torch.where(s == float("-inf"), torch.zeros_like(s), s)
    w_a = torch.exp(s_a - shift)[..., None]
    w_b = torch.exp(s_b - shift)[..., None]
    return o_a * w_a + o_b.to(o_a.dtype) * w_b, s


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge P partial results exactly: outs (P, n, heads, d), lses (P, n, heads).

    Returns out (n, heads, d) in outs' dtype and lse (n, heads); math in fp32 (fp64 stays).
    Partials with lse -inf (saw no key) weigh nothing; a row no partial saw gets out 0.
    """
    compute = torch.promote_types(outs.dtype, torch.float32)
    lses = lses.to(compute)
    lse = torch.logsumexp(lses, dim=0)
    shift = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    weights = torch.exp(lses - shift[None])[..., None]  # (P, n, heads, 1), 0 for -inf
    out = (outs.to(compute) * weights).sum(dim=0)
    return out.to(outs.dtype), lse


# -- Triton ----------------------------------------------------------------------------------

FAR = 1 << 62
"""Position of padding keys (after every query) and padding rows (before every key); real
positions must lie in (-2^62, 2^62)."""


@_jit
def _position_key_tile(
    acc,
    l_i,
    m_i,
    q,
    q_pos,
    q_lo,
    q_hi,
    k_base,
    v_base,
    k_pos_ptr,
    start_n,
    k_len,
    stride_k_tok,
    stride_v_tok,
    scale_log2,
    window,
    softcap_c,
    BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr,
    DOT_F32: tl.constexpr,
    FAR_POS: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Fold key tile [start_n, start_n + BLOCK_N) into (acc, l, m) by the keys' positions.

    EVEN_N: the tile lies wholly inside [0, k_len), so loads need no mask. Otherwise padding keys
    get position FAR_POS, which no row sees, so the tile always takes the masked path. WINDOW:
    row i sees only keys after q_pos[i] - window.
    """
    keys = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
    if EVEN_N:
        k_pos = tl.load(k_pos_ptr + keys)
    else:
        key_mask = keys < k_len
        k_pos = tl.load(k_pos_ptr + keys, mask=key_mask, other=FAR_POS)
    # Every key after every row (or before every row's window): nothing to do, no K/V to load.
    needed = tl.min(k_pos, 0) <= q_hi
    if WINDOW:
        needed = needed & (tl.max(k_pos, 0) > q_lo - window)
    if needed:
        if EVEN_N:
            k = tl.load(k_base + keys[:, None] * stride_k_tok)
            v = tl.load(v_base + keys[:, None] * stride_v_tok)
        else:
            k = tl.load(k_base + keys[:, None] * stride_k_tok, mask=key_mask[:, None], other=0.0)
            v = tl.load(v_base + keys[:, None] * stride_v_tok, mask=key_mask[:, None], other=0.0)
        # Every row sees every key (never so for a tail tile: its padding keys sit at FAR_POS).
        whole = tl.max(k_pos, 0) <= q_lo
        if WINDOW:
            whole = whole & (tl.min(k_pos, 0) > q_hi - window)
        if whole:
            acc, l_i, m_i = _online_softmax_tile(
                acc, l_i, m_i, q, k, v, None, scale_log2, False, DOT_F32, SOFTCAP, softcap_c
            )
        else:
            keep = k_pos[None, :] <= q_pos[:, None]
            if WINDOW:
                keep = keep & (k_pos[None, :] > q_pos[:, None] - window)
            acc, l_i, m_i = _online_softmax_tile(
                acc, l_i, m_i, q, k, v, keep, scale_log2, True, DOT_F32, SOFTCAP, softcap_c
            )
    return acc, l_i, m_i


@_jit
def _position_attn_kernel(
    q_ptr,
    q_pos_ptr,
    k_ptr,
    v_ptr,
    k_pos_ptr,
    bounds_ptr,
    out_ptr,
    lse_ptr,
    q_len,
    k_len,
    scale_log2,
    window,
    softcap_c,
    num_q_blocks,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_o_tok,
    stride_o_head,
    stride_lse_tok,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
    FAR_POS: tl.constexpr,
    KEYS_SORTED: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    pid = tl.program_id(0)
    kv_head = pid % NUM_KV_HEADS
    # Last query blocks first: with positions roughly ascending they have the most keys.
    q_block = num_q_blocks - 1 - pid // NUM_KV_HEADS
    m_start = q_block * TOKENS

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    tok = m_start + offs_m // GROUP  # (BLOCK_M,)
    head = kv_head * GROUP + offs_m % GROUP
    row_mask = (offs_m < TOKENS * GROUP) & (tok < q_len)
    tok64 = tok.to(tl.int64)
    q_ptrs = (
        q_ptr + tok64[:, None] * stride_q_tok + (head * stride_q_head)[:, None] + offs_d[None, :]
    )
    q = tl.load(q_ptrs, mask=row_mask[:, None], other=0.0)
    # Padding rows sit before every key (they see none) and out of the tile's bounds.
    q_pos = tl.load(q_pos_ptr + tok64, mask=row_mask, other=-FAR_POS)
    q_lo = tl.min(tl.where(row_mask, q_pos, FAR_POS), 0)
    q_hi = tl.max(q_pos, 0)

    k_base = k_ptr + kv_head * stride_k_head + offs_d[None, :]
    v_base = v_ptr + kv_head * stride_v_head + offs_d[None, :]
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if KEYS_SORTED:
        # Keys [0, lo) sit at or before the tile's first position (every row sees them), keys
        # [lo, hi) inside its span (masked by position), keys from hi on after its last one.
        # Both loops have bounds known up front and unconditional loads, so they pipeline.
        # With a window, keys [0, first) sit at or before the tile's first row's window start
        # (no row sees them) and the rest up to hi are masked by position and window alike.
        lo = tl.load(bounds_ptr + 3 * q_block)
        hi = tl.load(bounds_ptr + 3 * q_block + 1)
        offs_n = tl.arange(0, BLOCK_N)
        interior_end = (lo // BLOCK_N) * BLOCK_N
        if WINDOW:
            interior_end = (tl.load(bounds_ptr + 3 * q_block + 2) // BLOCK_N) * BLOCK_N
        else:
            for start_n in range(0, interior_end, BLOCK_N):
                keys = (start_n + offs_n).to(tl.int64)
                k = tl.load(k_base + keys[:, None] * stride_k_tok)
                v = tl.load(v_base + keys[:, None] * stride_v_tok)
                acc, l_i, m_i = _online_softmax_tile(
                    acc, l_i, m_i, q, k, v, None, scale_log2, False, DOT_F32, SOFTCAP, softcap_c
                )
        for start_n in range(interior_end, hi, BLOCK_N):
            keys = (start_n + offs_n).to(tl.int64)
            key_mask = keys < hi
            k_pos = tl.load(k_pos_ptr + keys, mask=key_mask, other=FAR_POS)
            k = tl.load(k_base + keys[:, None] * stride_k_tok, mask=key_mask[:, None], other=0.0)
            v = tl.load(v_base + keys[:, None] * stride_v_tok, mask=key_mask[:, None], other=0.0)
            keep = k_pos[None, :] <= q_pos[:, None]
            if WINDOW:
                keep = keep & (k_pos[None, :] > q_pos[:, None] - window)
            acc, l_i, m_i = _online_softmax_tile(
                acc, l_i, m_i, q, k, v, keep, scale_log2, True, DOT_F32, SOFTCAP, softcap_c
            )
        out_ptrs = out_ptr + tok64[:, None] * stride_o_tok + (head * stride_o_head)[:, None]
        lse_ptrs = lse_ptr + tok64 * stride_lse_tok + head
        _store_rows(out_ptrs + offs_d[None, :], lse_ptrs, acc, l_i, m_i, row_mask, STORE_LSE=True)
        return
    full_end = (k_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _position_key_tile(
            acc,
            l_i,
            m_i,
            q,
            q_pos,
            q_lo,
            q_hi,
            k_base,
            v_base,
            k_pos_ptr,
            start_n,
            k_len,
            stride_k_tok,
            stride_v_tok,
            scale_log2,
            window,
            softcap_c,
            BLOCK_N=BLOCK_N,
            EVEN_N=True,
            DOT_F32=DOT_F32,
            FAR_POS=FAR_POS,
            WINDOW=WINDOW,
            SOFTCAP=SOFTCAP,
        )
    if full_end < k_len:
        acc, l_i, m_i = _position_key_tile(
            acc,
            l_i,
            m_i,
            q,
            q_pos,
            q_lo,
            q_hi,
            k_base,
            v_base,
            k_pos_ptr,
            full_end,
            k_len,
            stride_k_tok,
            stride_v_tok,
            scale_log2,
            window,
            softcap_c,
            BLOCK_N=BLOCK_N,
            EVEN_N=False,
            DOT_F32=DOT_F32,
            FAR_POS=FAR_POS,
            WINDOW=WINDOW,
            SOFTCAP=SOFTCAP,
        )

    out_ptrs = out_ptr + tok64[:, None] * stride_o_tok + (head * stride_o_head)[:, None]
    lse_ptrs = lse_ptr + tok64 * stride_lse_tok + head
    _store_rows(out_ptrs + offs_d[None, :], lse_ptrs, acc, l_i, m_i, row_mask, STORE_LSE=True)


def position_attention_triton(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    keys_sorted: bool = False,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `position_attention_ref` (window > 0: a sliding window of that many
    positions; softcap > 0: the scaled scores capped).

    q: (n, q_heads, head_dim); k, v: (m, kv_heads, head_dim), one of fp16/bf16/fp32, unit stride
    in head_dim (other strides free); q_pos (n,), k_pos (m,) integer positions in (-2^62, 2^62),
    keys in any order. Returns out (n, q_heads, head_dim) in q's dtype and lse (n, q_heads) fp32.
    Grid: one program per (query tile of BLOCK_M // group tokens, kv head).

    `keys_sorted=True` promises k_pos is non-decreasing (a cp rank's own blocks in table order
    are): each query tile's visible key range is then found up front (a searchsorted on the
    device, no host sync) and walked in pipelined loops, as the paged prefill kernel does;
    otherwise every key tile decides from its positions whether to load at all.
    """
    check_inputs(q, q_pos, k, v, k_pos)
    check_window(window)
    check_softcap(softcap)
    group = check_qkv(q, k, v)
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    n, q_heads, head_dim = q.shape
    m, kv_heads, _ = k.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(n, q_heads, dtype=torch.float32, device=q.device)
    if n == 0:
        return out, lse
    if m == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    q_pos = q_pos.to(device=q.device, dtype=torch.int64).contiguous()
    k_pos = k_pos.to(device=q.device, dtype=torch.int64).contiguous()
    cfg = attention_config(head_dim, group, q.dtype, q.device)
    tokens = cfg["BLOCK_M"] // group
    num_q_blocks = triton.cdiv(n, tokens)
    bounds = k_pos  # unused unless keys_sorted
    if keys_sorted:
        bounds = _key_bounds(q_pos, k_pos, tokens, num_q_blocks, window)
    _position_attn_kernel[(num_q_blocks * kv_heads,)](
        q,
        q_pos,
        k,
        v,
        k_pos,
        bounds,
        out,
        lse,
        n,
        m,
        scale * LOG2E,
        window,
        softcap / scale if softcap else 1.0,
        num_q_blocks,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        NUM_KV_HEADS=kv_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        DOT_F32=q.dtype == torch.float32 or is_interpreting(),
        FAR_POS=FAR,
        KEYS_SORTED=keys_sorted,
        WINDOW=window > 0,
        SOFTCAP=softcap > 0,
        **cfg,
    )
    return out, lse


def _key_bounds(
    q_pos: torch.Tensor, k_pos: torch.Tensor, tokens: int, num_q_blocks: int, window: int = 0
) -> torch.Tensor:
    """(num_q_blocks, 3) int32: per query tile of `tokens` rows, the number of sorted keys at or
    before its first (smallest) position, at or before its last (largest) one, and (with a
    window) at or before its first position's window start (0 without one)."""
    pad = num_q_blocks * tokens - q_pos.numel()
    padded = torch.cat([q_pos, q_pos[-1:].expand(pad)]) if pad else q_pos
    tiles = padded.view(num_q_blocks, tokens)
    first = tiles.amin(dim=1)
    starts = first - window if window else torch.full_like(first, -FAR)
    ends = torch.stack([first, tiles.amax(dim=1), starts], dim=1).contiguous()
    return torch.searchsorted(k_pos, ends, right=True).to(torch.int32)


def _triton_can_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs (dtype, head_dim); otherwise the reference runs."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ):
        return False
    try:
        check_head_dim(q.shape[-1])
    except ValueError:
        return False
    return True


def position_attention(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    keys_sorted: bool = False,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton on CUDA (or when forced) for the head dims and dtypes it takes, else the reference.
    `keys_sorted`: the caller guarantees non-decreasing k_pos (see position_attention_triton).
    window > 0: a sliding window of that many positions; softcap > 0: the scaled scores capped
    (`position_attention_ref`)."""
    if use_triton(q.device) and _triton_can_run(q, k, v):
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return position_attention_triton(q, q_pos, k, v, k_pos, scale, keys_sorted, window, softcap)
    return position_attention_ref(
        q, q_pos, k, v, k_pos, scale, keys_sorted, window=window, softcap=softcap
    )
