"""Tensor-parallel GQA attention over the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from dist_runtime.config import ModelConfig, WeightQuant
from kernels.cpu_attention import native_rope_store_supported, rope_store
from kernels.dispatch import use_triton
from kernels.flash_decode import flash_decode
from kernels.paged_attention import paged_attention
from kernels.rotary_store import rotary_store
from kernels.store_kv import store_kv
from workers.context_parallel import CPMetadata, cp_attention, cp_decode_attention
from workers.distributed import Collectives
from workers.kv_cache import LayerKV
from workers.layers.linear import ColumnParallelLinear, RowParallelLinear
from workers.layers.norm import RMSNorm
from workers.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from workers.lora import LoraBatch


@dataclass(frozen=True, kw_only=True)
class HeadShard:
    """Which query and KV heads one tp rank owns.

    tp dividing kv_heads: each rank owns kv_heads/tp KV heads and their query groups.
    tp a multiple of kv_heads: each KV head is replicated on tp/kv_heads ranks, each of which owns
    a contiguous part of that head's query group.
    """

    num_q: int
    q_start: int
    num_kv: int
    kv_start: int

    @classmethod
    def for_rank(cls, num_heads: int, num_kv_heads: int, tp_rank: int, tp_size: int) -> HeadShard:
        num_q = num_heads // tp_size
        if num_kv_heads >= tp_size:
            num_kv = num_kv_heads // tp_size
            kv_start = tp_rank * num_kv
        else:
            num_kv = 1
            kv_start = tp_rank // (tp_size // num_kv_heads)
        return cls(num_q=num_q, q_start=tp_rank * num_q, num_kv=num_kv, kv_start=kv_start)


@dataclass(frozen=True, kw_only=True)
class AttentionMetadata:
    """Per-step layout of the packed batch, shared by every layer."""

    slot_mapping: torch.Tensor
    """(tokens,) int64 cache slot of each new token."""
    block_tables: torch.Tensor
    """(batch, max_blocks) int32 block ids per sequence, padded."""
    cu_seqlens_q: torch.Tensor
    """(batch + 1,) int64 prefix sums of new tokens per sequence."""
    context_lens: torch.Tensor
    """(batch,) int64 cached + new tokens per sequence."""
    is_decode: bool = False
    """Every sequence has exactly one new token (split-KV decode kernel)."""
    rope_inv_freq: torch.Tensor | None = None
    """(tokens, head_dim // 2) fp32 RoPE frequencies per token when a step holds a request with
    its own base (dynamic NTK); None: the model's frequencies for every token."""
    cp: CPMetadata | None = None
    """Set when cp > 1: the rows are this rank's tokens and attention spans the cp ranks."""
    cp_decode: bool = False
    """A decode step with cp > 1: every cp rank holds every row, `block_tables` and
    `context_lens` describe this rank's KV shard, and the partial results are merged over the
    cp group (`cp_decode_attention`)."""
    lora: LoraBatch | None = None
    """The step's rows by LoRA adapter (`workers/lora.py`); None: every row is the base
    model's."""


class Attention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        shard: HeadShard,
        rotary: RotaryEmbedding,
        comm: Collectives,
        dtype: torch.dtype,
        device: torch.device,
        qkv_quant: WeightQuant | None = None,
        o_quant: WeightQuant | None = None,
        window: int = 0,
    ):
        super().__init__()
        self.shard = shard
        self.window = window
        """Each query attends to this many keys at most, its own included (a sliding-window
        layer); 0: to every earlier key."""
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.softcap = config.attn_logit_softcapping or 0.0
        """Gemma 2's attention-logit soft-cap (0: none)."""
        self.q_size = shard.num_q * config.head_dim
        self.kv_size = shard.num_kv * config.head_dim
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size,
            self.q_size + 2 * self.kv_size,
            config.attention_bias,
            dtype,
            device,
            qkv_quant,
        )
        self.o_proj = RowParallelLinear(
            self.q_size,
            config.hidden_size,
            config.has_o_bias,
            dtype,
            device,
            comm,
            o_quant,
        )
        self.rotary = rotary
        self.comm = comm
        self.q_norm = self.k_norm = None
        if config.qk_norm:  # (Qwen3, Gemma 3: each head normed over head_dim before RoPE)
            self.q_norm = RMSNorm(
                config.head_dim, config.rms_norm_eps, dtype, device, config.fp32_norm_scale
            )
            self.k_norm = RMSNorm(
                config.head_dim, config.rms_norm_eps, dtype, device, config.fp32_norm_scale
            )

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: LayerKV,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.shard.num_q, self.head_dim)
        k = k.view(tokens, self.shard.num_kv, self.head_dim)
        v = v.view(tokens, self.shard.num_kv, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim))[0].view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim))[0].view_as(k)
        k_cache, v_cache, quant = kv_cache.k, kv_cache.v, kv_cache.quant_args()
        if not use_triton(q.device) and native_rope_store_supported(q, k_cache, kv_cache.bits):
            # CPU: RoPE in place and the KV store in one native call.
            cos, sin = self.rotary.cos_sin(positions, meta.rope_inv_freq)
            rope_store(q, k, v, cos, sin, k_cache, v_cache, meta.slot_mapping, **quant)  # type: ignore[arg-type]
        elif use_triton(q.device) and kv_cache.bits == 0 and meta.cp is None:
            # One kernel rotates q and writes the rotated k and v into the cache (a cp prefill
            # chunk also reads k and v themselves, and a quantized cache stores codes).
            own = None if self.rotary.fixed else meta.rope_inv_freq
            inv = self.rotary.inv_freq if own is None else own
            q = rotary_store(q, k, v, positions, inv, k_cache, v_cache, meta.slot_mapping)
        else:
            q, k = self.rotary(q, k, positions, meta.rope_inv_freq)
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping, **quant)  # type: ignore[arg-type]
        if meta.cp_decode:
            out = cp_decode_attention(
                q,
                kv_cache,
                meta.block_tables,
                meta.context_lens,
                self.comm,
                self.scale,
                positions,
                self.window,
                self.softcap,
            )
            return self.o_proj(out.reshape(tokens, self.q_size))
        if meta.cp is not None:
            out = cp_attention(
                q, k, v, kv_cache, meta.cp, self.comm, self.scale, self.window, self.softcap
            )
            return self.o_proj(out.reshape(tokens, self.q_size))
        if meta.is_decode:
            out, _ = flash_decode(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.context_lens,
                self.scale,
                window=self.window,
                softcap=self.softcap,
                **quant,  # type: ignore[arg-type]
            )
            return self.o_proj(out.reshape(tokens, self.q_size))
        out, _ = paged_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.cu_seqlens_q,
            meta.context_lens,
            self.scale,
            window=self.window,
            softcap=self.softcap,
            **quant,  # type: ignore[arg-type]
        )
        return self.o_proj(out.reshape(tokens, self.q_size))
