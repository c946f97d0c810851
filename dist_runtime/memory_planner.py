"""Predict one worker's memory for a model at a given tp/cp/session length, before loading anything.

Everything here is arithmetic on `ModelConfig`; nothing touches a device. The numbers are
predictions: weights and KV cache are exact byte counts of the tensors the workers allocate,
activations are a bound, and the overhead is a fixed reserve.

Per worker (tp rank of one cp group):

* weights: the sharded parameter count x dtype bytes (4-bit layers: see
  `weight_bytes_per_worker`). Column-parallel qkv holds ``(q_heads/tp + 2*kv_local) *
  head_dim`` rows of ``hidden``; row-parallel o holds ``hidden x q_heads/tp * head_dim``;
  gate/up/down hold ``intermediate/tp`` rows/columns; norms are replicated; the embedding and
  the LM head hold ``ceil(vocab/tp)`` rows each (the LM head is absent when tied). Biases:
  column-parallel ones are sharded, row-parallel ones (o, down) are replicated. Weights are
  replicated across cp.
* kv_cache: ``num_seqs * ceil(ceil(session_len/cp)/block_size)*block_size`` tokens x
  ``2 * layers * kv_local * head_dim * dtype bytes``, with ``kv_local = kv_heads/tp``, or 1
  when tp > kv_heads (each KV head replicated on tp/kv_heads ranks). With KV quantization
  (quant_policy 8 or 4) ``head_dim * dtype bytes`` becomes ``head_dim * bits/8 + 8``: the codes
  plus a float32 scale and zero per token and head.
* activations: a bound for one prefill chunk of ``T = max_num_batched_tokens`` tokens::

      T * (4*hidden + (q_local + 2*kv_local)*head_dim + 3*inter_local) * dtype bytes   # hidden,
          # residual, norm output, attention output; qkv; gate+up (2*inter_local) and their
          # silu*mul product (inter_local)
    + T * q_local * (head_dim + 1) * 4                 # flash-attention fp32 accumulator + LSE
    + num_seqs * vocab * 4                             # fp32 logits of the sampled tokens

  It does not depend on session_len: prefill runs in chunks of at most T tokens.
* overhead: CUDA context + caching-allocator reserve, 1 GiB on CUDA, 0 on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_runtime.config import (
    CPU_GEMM_DTYPES,
    CPU_INT4_GROUPS,
    QUANT_POLICIES,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    cpu_gemm_choice,
)

GiB = 1 << 30
CUDA_OVERHEAD_BYTES = 1 * GiB
CPU_KV_MIN_BYTES = 1 * GiB
"""The least KV memory a CPU worker reserves by default (room for concurrent short sessions)."""
CPU_KV_AVAILABLE_FRACTION = 0.9
"""The most of its node's available memory a CPU worker reserves for KV by default (its share,
when the runtime has several workers on the node)."""
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ConfigError(
            f"dtype {dtype!r} is not supported; use one of {sorted(DTYPE_BYTES)}"
        ) from None


def kv_heads_per_rank(model: ModelConfig, tp: int) -> int:
    """KV heads one tp rank stores: kv_heads/tp, or 1 when tp > kv_heads (replicated)."""
    return model.num_kv_heads // tp if model.num_kv_heads >= tp else 1


def valid_tp(model: ModelConfig, tp: int) -> bool:
    """Whether the workers can shard this model's heads and MLP over tp ranks."""
    try:
        ParallelConfig(tp=tp, cp=1).check_model(model)
    except ConfigError:
        return False
    return True


def weight_params_per_worker(model: ModelConfig, tp: int) -> int:
    """Parameters one tp rank holds (the same on every cp rank)."""
    h, hd = model.hidden_size, model.head_dim
    q_local = model.num_heads // tp
    kv_local = kv_heads_per_rank(model, tp)
    inter_local = model.intermediate_size // tp
    qkv_rows = (q_local + 2 * kv_local) * hd
    layer = qkv_rows * h + h * q_local * hd  # wqkv (column-parallel) + wo (row-parallel)
    if model.attention_bias:
        layer += qkv_rows  # sharded qkv bias
    if model.has_o_bias:
        layer += h  # replicated o bias
    layer += 3 * inter_local * h  # gate, up (column-parallel), down (row-parallel)
    if model.mlp_bias:
        layer += 2 * inter_local + h
    layer += 2 * h  # attention and ffn RMSNorm, replicated
    if model.qk_norm:
        layer += 2 * hd  # Qwen3's and Gemma 3's q and k head norms, replicated
    if model.sandwich_norms:
        layer += 2 * h  # Gemma 3's norms of the attention's and the MLP's outputs
    vocab_local = _ceil_div(model.vocab_size, tp)
    embed = vocab_local * h * (1 if model.tie_word_embeddings else 2)
    return model.num_layers * layer + embed + h  # + final norm


def weight_bytes_per_worker(model: ModelConfig, tp: int, dtype: str, is_cuda: bool = True) -> int:
    """Bytes of weights one tp rank holds. With 4-bit weights on CUDA each quantized linear
    layer holds in*out/2 bytes of codes, a scale and a zero per (group, output) in float16
    (float32 for float32 models) and, act-order, an int32 group index per input. On CPU a
    bfloat16 model keeps them 4-bit too (PyTorch's int4 matmul: codes plus a bf16 scale and
    offset per group and output) when there is no act-order and the group is 32-256; otherwise
    the CPU dequantizes them once after loading, so they cost what float weights do. A tied
    LM head on CPU holds a second, packed copy of the embedding rows (`kernels/cpu_gemm.py`)
    unless DIST_RUNTIME_CPU_GEMM=torch."""
    width = _dtype_bytes(dtype)
    total = weight_params_per_worker(model, tp) * width
    if (
        not is_cuda
        and model.tie_word_embeddings
        and dtype in CPU_GEMM_DTYPES
        and cpu_gemm_choice() != "torch"
    ):
        total += _ceil_div(model.vocab_size, tp) * model.hidden_size * width
    quant = model.weight_quant
    if quant is None:
        return total
    cpu_int4 = dtype == "bfloat16" and not quant.desc_act and quant.group_size in CPU_INT4_GROUPS
    if not is_cuda and not cpu_int4:
        return total
    from workers.models.names import linear_quant

    h, hd = model.hidden_size, model.head_dim
    q_local, kv_local = model.num_heads // tp, kv_heads_per_rank(model, tp)
    inter_local = model.intermediate_size // tp
    scale_bytes = 4 if dtype == "float32" else 2
    layers = {  # part: (inputs held, inputs of the whole layer, outputs held)
        "qkv": (h, h, (q_local + 2 * kv_local) * hd),
        "o": (q_local * hd, model.num_heads * hd, h),
        "gate": (h, h, 2 * inter_local),
        "down": (inter_local, model.intermediate_size, h),
    }
    for part, (in_local, in_full, out) in layers.items():
        if linear_quant(model, part) is None:
            continue
        group = quant.group_of(in_full)
        groups = in_full // group if quant.desc_act else -(-in_local // group)
        packed = in_local * out // 2 + 2 * groups * out * scale_bytes
        packed += 4 * in_local if quant.desc_act else 0
        total += model.num_layers * (packed - in_local * out * width)
    return total


KV_PARAM_BYTES = 8
"""A quantized cache's float32 scale and zero per token, KV head and K or V."""


def kv_bytes_per_token(model: ModelConfig, tp: int, dtype: str, quant_policy: int = 0) -> int:
    """KV-cache bytes one worker stores per cached token (K and V, every layer): head_dim
    values in the dtype, or head_dim * bits / 8 bytes of codes plus a scale and a zero when
    quant_policy is 8 or 4."""
    if quant_policy:
        per_head = model.head_dim * quant_policy // 8 + KV_PARAM_BYTES
    else:
        per_head = model.head_dim * _dtype_bytes(dtype)
    return 2 * model.num_layers * kv_heads_per_rank(model, tp) * per_head


def available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def held_tokens(
    model: ModelConfig, tokens: int, block_size: int, max_num_batched_tokens: int
) -> int:
    """KV tokens a sequence of `tokens` tokens holds at once: all of them, or for a model with
    a sliding window on every layer (whose passed blocks go back after each step) at most the
    window, one step's tokens and a block on either side."""
    window = model.uniform_window()
    if not window:
        return tokens
    return min(tokens, window + max_num_batched_tokens + 2 * block_size)


def kv_tokens_per_worker(session_len: int, cp: int, block_size: int, num_seqs: int = 1) -> int:
    """Cache slots one worker holds: each sequence's share of the cp ranks, in whole blocks."""
    per_rank = _ceil_div(session_len, cp)
    return num_seqs * _ceil_div(per_rank, block_size) * block_size


def activation_bytes(
    model: ModelConfig, tp: int, dtype: str, max_num_batched_tokens: int, num_seqs: int = 1
) -> int:
    """The activation bound of the module docstring."""
    tokens, hd = max_num_batched_tokens, model.head_dim
    q_local = model.num_heads // tp
    kv_local = kv_heads_per_rank(model, tp)
    inter_local = model.intermediate_size // tp
    width = 4 * model.hidden_size + (q_local + 2 * kv_local) * hd + 3 * inter_local
    attn_workspace = tokens * q_local * (hd + 1) * 4
    logits = num_seqs * model.vocab_size * 4
    return tokens * width * _dtype_bytes(dtype) + attn_workspace + logits


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """One worker's predicted memory (bytes) and whether it fits the device."""

    model: ModelConfig
    tp: int
    cp: int
    session_len: int
    dtype: str
    block_size: int
    max_num_batched_tokens: int
    num_seqs: int
    is_cuda: bool
    quant_policy: int
    weights: int
    kv_cache: int
    activations: int
    overhead: int
    total: int
    device_bytes: int
    fits: bool
    max_session_len: int
    """Largest session_len (num_seqs sequences) that fits at this tp/cp/dtype/device; 0 if
    none does."""
    max_positions: int | None = None
    """The model's RoPE limit on session_len when the caller passes it (None: unlimited); the
    table and the suggestion never go past it."""

    def table(self) -> str:
        rows = [
            ("weights", self.weights),
            ("kv cache", self.kv_cache),
            ("activations", self.activations),
            ("overhead", self.overhead),
            ("total", self.total),
            ("device", self.device_bytes),
        ]
        head = (
            f"memory plan per worker: tp={self.tp} cp={self.cp} (world {self.tp * self.cp}), "
            f"session_len={self.session_len:,} x {self.num_seqs} seq, {self.dtype}, "
            f"block_size={self.block_size}, max_num_batched_tokens={self.max_num_batched_tokens}"
            + (f", KV int{self.quant_policy}" if self.quant_policy else "")
        )
        name_w = max(len(n) for n, _ in rows)
        val_w = max(len(f"{b / GiB:,.2f}") for _, b in rows)
        lines = [head]
        for name, value in rows:
            if name == "total":
                lines.append("  " + "-" * (name_w + val_w + 6))
            lines.append(f"  {name:<{name_w}}  {value / GiB:>{val_w},.2f} GiB")
        free = self.device_bytes - self.total
        lines.append(
            f"  {'free' if free >= 0 else 'over':<{name_w}}  {abs(free) / GiB:>{val_w},.2f} GiB"
        )
        lines.append(f"fits: {'yes' if self.fits else 'no'}")
        line = f"max session_len at tp={self.tp} cp={self.cp}: {self.max_session_len:,}"
        if self.max_positions is not None and self.max_positions < self.max_session_len:
            line = (
                f"max session_len at tp={self.tp} cp={self.cp}: {self.max_positions:,} (the "
                f"model's RoPE limit; the memory holds {self.max_session_len:,})"
            )
        lines.append(line)
        window = self.model.uniform_window()
        if window:
            held = held_tokens(self.model, self.session_len, self.block_size,
                               self.max_num_batched_tokens)  # fmt: skip
            lines.append(
                f"(a sliding window of {window} on every layer: a sequence holds at most "
                f"{held:,} tokens of KV at once, its window and one step's, whatever its length)"
            )
        return "\n".join(lines)

    def suggestion(self) -> str:
        """How to make it fit, with numbers; empty when it already fits."""
        if self.fits:
            return ""
        options = []
        tp = smallest_fitting_tp(self)
        if tp is not None and tp != self.tp:
            options.append(
                f"raise --tp to {tp}" + (f" (with --cp {self.cp})" if self.cp > 1 else "")
            )
        cp = smallest_fitting_cp(self)
        if cp is not None and cp != self.cp:
            options.append(f"add --cp {cp} (at --tp {self.tp})")
        if tp is None and cp is None:
            both = smallest_fitting_tp_cp(self)
            if both is not None:
                options.append(f"use --tp {both[0]} --cp {both[1]}")
        longest = self.max_session_len
        if self.max_positions is not None:
            longest = min(longest, self.max_positions)
        if longest >= 2:
            options.append(f"shorten --session-len to {longest}")
        if not options:
            return (
                f"does not fit: {self.total / GiB:.2f} GiB needed per worker, "
                f"{self.device_bytes / GiB:.2f} GiB available, and no tp, cp or session length "
                "makes it fit; use a device with more memory"
            )
        return (
            f"does not fit: {self.total / GiB:.2f} GiB needed per worker, "
            f"{self.device_bytes / GiB:.2f} GiB available; " + ", or ".join(options)
        )


def plan_memory(
    model: ModelConfig,
    *,
    tp: int,
    cp: int,
    session_len: int,
    dtype: str,
    device_bytes: int,
    block_size: int = 16,
    max_num_batched_tokens: int = 8192,
    num_seqs: int = 1,
    is_cuda: bool = True,
    quant_policy: int = 0,
) -> MemoryPlan:
    """Predict one worker's memory for num_seqs sequences of session_len tokens."""
    for name, value in (
        ("tp", tp),
        ("cp", cp),
        ("block_size", block_size),
        ("max_num_batched_tokens", max_num_batched_tokens),
        ("num_seqs", num_seqs),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(session_len, int) or session_len < 0:
        raise ConfigError(f"session_len must be an integer >= 0, got {session_len!r}")
    if not valid_tp(model, tp):
        ParallelConfig(tp=tp, cp=1).check_model(model)  # raises with the valid choices
    weights = weight_bytes_per_worker(model, tp, dtype, is_cuda)
    if quant_policy not in QUANT_POLICIES:
        raise ConfigError(
            f"quant_policy must be one of {list(QUANT_POLICIES)}, got {quant_policy!r}"
        )
    per_token = kv_bytes_per_token(model, tp, dtype, quant_policy)
    held = held_tokens(model, session_len, block_size, max_num_batched_tokens)
    kv = kv_tokens_per_worker(held, cp, block_size, num_seqs) * per_token
    act = activation_bytes(model, tp, dtype, max_num_batched_tokens, num_seqs)
    overhead = CUDA_OVERHEAD_BYTES if is_cuda else 0
    total = weights + kv + act + overhead
    # Closed form: every sequence gets at most `blocks` whole blocks per rank, and
    # ceil(s/cp) <= blocks*block_size  <=>  s <= blocks*block_size*cp.
    free_for_kv = device_bytes - weights - act - overhead
    blocks = max(free_for_kv, 0) // (per_token * block_size * num_seqs)
    return MemoryPlan(
        model=model,
        tp=tp,
        cp=cp,
        session_len=session_len,
        dtype=dtype,
        block_size=block_size,
        max_num_batched_tokens=max_num_batched_tokens,
        num_seqs=num_seqs,
        is_cuda=is_cuda,
        quant_policy=quant_policy,
        weights=weights,
        kv_cache=kv,
        activations=act,
        overhead=overhead,
        total=total,
        device_bytes=device_bytes,
        fits=total <= device_bytes,
        max_session_len=blocks * block_size * cp if free_for_kv >= 0 else 0,
    )


def replan(plan: MemoryPlan, *, tp: int | None = None, cp: int | None = None) -> MemoryPlan:
    """The same plan at another tp and/or cp."""
    return plan_memory(
        plan.model,
        tp=plan.tp if tp is None else tp,
        cp=plan.cp if cp is None else cp,
        session_len=plan.session_len,
        dtype=plan.dtype,
        device_bytes=plan.device_bytes,
        block_size=plan.block_size,
        max_num_batched_tokens=plan.max_num_batched_tokens,
        num_seqs=plan.num_seqs,
        is_cuda=plan.is_cuda,
        quant_policy=plan.quant_policy,
    )


def smallest_fitting_tp(plan: MemoryPlan) -> int | None:
    """The smallest tp the model can be sharded over (it divides the heads) that fits at the
    plan's cp, or None."""
    for tp in range(1, plan.model.num_heads + 1):
        if valid_tp(plan.model, tp) and replan(plan, tp=tp).fits:
            return tp
    return None


def smallest_fitting_cp(plan: MemoryPlan) -> int | None:
    """The smallest cp that fits at the plan's tp, or None when weights + activations alone do
    not fit."""
    base = replan(plan, cp=1)
    if base.fits:
        return 1
    if base.max_session_len < 1:
        return None  # no room for even one KV block: no cp helps
    # s fits at cp iff ceil(s/cp) <= max_session_len(cp=1); start there, step over rounding.
    cp = max(2, _ceil_div(base.session_len, base.max_session_len))
    while cp <= max(base.session_len, 2):
        if replan(plan, cp=cp).fits:
            return cp
        cp += 1
    return None


def smallest_fitting_tp_cp(plan: MemoryPlan) -> tuple[int, int] | None:
    """(tp, cp) for the smallest valid tp at which some cp fits, with its smallest cp."""
    for tp in range(1, plan.model.num_heads + 1):
        if valid_tp(plan.model, tp):
            cp = smallest_fitting_cp(replan(plan, tp=tp))
            if cp is not None:
                return tp, cp
    return None
