"""The decoder shared by InternLM2, Llama and Gemma: embed -> [norm, attention, norm, MLP] x L
-> head (Gemma 2 / 3 norm each sublayer's output too, `ModelConfig.sandwich_norms`).

Only wiring lives here; the checkpoint layouts (tensor names, InternLM2's packed wqkv) are in
`workers/models/layouts.py`, and each parallel layer creates just this rank's shard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dist_runtime.config import ModelConfig
from kernels.cpu_decoder import CpuDecoder
from kernels.paged_attention import layer_invariant_scope
from kernels.silu_and_mul import act_and_mul
from workers.distributed import Collectives
from workers.kv_cache import LayerKV
from workers.layers.attention import Attention, AttentionMetadata, HeadShard
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.linear import ColumnParallelLinear, RowParallelLinear
from workers.layers.norm import RMSNorm
from workers.layers.rotary import RotaryEmbedding
from workers.models import native_decode
from workers.models.names import linear_quant

if TYPE_CHECKING:
    from workers.lora import LoraState

MLP_PIECE_BYTES = 8 << 20
"""On CPU, the MLP of a long chunk runs in row pieces whose gate_up output is at most this big
(well under glibc's largest mmap threshold, 32 MiB, and a quarter of a typical L3)."""


class MLP(nn.Module):
    def __init__(
        self, config: ModelConfig, comm: Collectives, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        self.inter_local = config.intermediate_size // comm.tp_size
        self.hidden = config.hidden_size
        self.act = config.hidden_act
        # Local rows: [gate slice | up slice], so act_and_mul splits them in halves.
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size,
            2 * self.inter_local,
            config.mlp_bias,
            dtype,
            device,
            linear_quant(config, "gate"),
        )
        self.down_proj = RowParallelLinear(
            self.inter_local,
            config.hidden_size,
            config.mlp_bias,
            dtype,
            device,
            comm,
            linear_quant(config, "down"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        step = self._cpu_rows_per_piece(x)
        if step >= rows or self._adapted():
            return self.down_proj(act_and_mul(self.gate_up_proj(x), self.act))
        # A long CPU prefill chunk in pieces: the (rows, 2 * inter) gate_up output would be a
        # fresh allocation past glibc's mmap threshold in every layer (zero-filled pages faulted
        # in again each time); a piece's stays in the allocator's reuse and in L3. One reduce.
        out = torch.empty(rows, self.hidden, dtype=x.dtype)
        for i in range(0, rows, step):
            piece = act_and_mul(self.gate_up_proj(x[i : i + step]), self.act)
            out[i : i + step] = self.down_proj.partial(piece)
        return self.down_proj.reduce(out)

    def _adapted(self) -> bool:
        """A step with LoRA rows: its row indices span the whole chunk (no pieces)."""
        lora = self.gate_up_proj.lora or self.down_proj.lora
        return lora is not None and lora.state.batch is not None

    def _cpu_rows_per_piece(self, x: torch.Tensor) -> int:
        """Rows whose gate_up output fits MLP_PIECE_BYTES on CPU (at least 64); any on GPU."""
        if x.device.type != "cpu":
            return x.shape[0]
        return max(64, MLP_PIECE_BYTES // (2 * self.inter_local * x.element_size()))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        shard: HeadShard,
        rotary: RotaryEmbedding,
        comm: Collectives,
        dtype: torch.dtype,
        device: torch.device,
        window: int = 0,
    ):
        super().__init__()
        self.input_norm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype, device, config.fp32_norm_scale
        )
        self.attn = Attention(
            config,
            shard,
            rotary,
            comm,
            dtype,
            device,
            qkv_quant=linear_quant(config, "qkv"),
            o_quant=linear_quant(config, "o"),
            window=window,
        )
        self.post_attn_norm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype, device, config.fp32_norm_scale
        )
        """The MLP's input norm (Gemma's `pre_feedforward_layernorm`)."""
        self.mlp = MLP(config, comm, dtype, device)
        self.attn_out_norm = self.mlp_out_norm = None
        if config.sandwich_norms:  # (Gemma: each sublayer's output normed before the add)
            self.attn_out_norm = RMSNorm(
                config.hidden_size, config.rms_norm_eps, dtype, device, config.fp32_norm_scale
            )
            self.mlp_out_norm = RMSNorm(
                config.hidden_size, config.rms_norm_eps, dtype, device, config.fp32_norm_scale
            )

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: LayerKV,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) in, (what this layer adds, residual stream before it) out: the
        next norm adds the two, as the final norm does."""
        h, residual = self.input_norm(x, residual)
        h = self.attn(h, positions, meta, kv_cache)
        if self.attn_out_norm is not None:
            h = self.attn_out_norm(h)[0]
        h, residual = self.post_attn_norm(h, residual)
        h = self.mlp(h)
        if self.mlp_out_norm is not None:
            h = self.mlp_out_norm(h)[0]
        return h, residual


class DecoderLM(nn.Module):
    def __init__(
        self, config: ModelConfig, comm: Collectives, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        self.config = config
        self.comm = comm
        self.shard = HeadShard.for_rank(
            config.num_heads, config.num_kv_heads, comm.tp_rank, comm.tp_size
        )
        self.embed = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, dtype, device, comm
        )
        self.rotary = rotary = RotaryEmbedding(config, device)
        local = None
        if config.local_rope_theta is not None:  # (Gemma 3: its own base on windowed layers)
            local = RotaryEmbedding(config, device, theta=config.local_rope_theta)
        self.local_rotary = local
        self.layers = nn.ModuleList(
            DecoderLayer(
                config,
                self.shard,
                local if local is not None and config.layer_window(i) else rotary,
                comm,
                dtype,
                device,
                config.layer_window(i),
            )
            for i in range(config.num_layers)
        )
        scale = config.embedding_multiplier
        if config.round_embedding_multiplier:
            scale = torch.tensor(scale, dtype=dtype).item()
        self.embed_scale = scale
        """The embeddings' multiplier (Granite's, Gemma's sqrt(hidden) in the model's dtype)."""
        self.norm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype, device, config.fp32_norm_scale
        )
        tied = self.embed if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, dtype, device, comm, tied
        )
        self.lora: LoraState | None = None
        """Set when LoRA adapters are loaded (`workers/lora.py`): each step's rows by adapter
        go there for the forward's duration."""
        self.drop_native_decoder()

    def drop_native_decoder(self) -> None:
        """Forget the native CPU decoder (built again at the next decode step): its pointers
        are to the weights as packed and the caches as allocated when it was built."""
        self._native: tuple[list[LayerKV], CpuDecoder | None] | None = None

    def _native_decoder(self, kv_caches: list[LayerKV]) -> CpuDecoder | None:
        if self._native is None or self._native[0] is not kv_caches:
            self._native = (kv_caches, native_decode.build(self, kv_caches))
        return self._native[1]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[LayerKV],
    ) -> torch.Tensor:
        """input_ids, positions: (tokens,) -> final hidden states (tokens, hidden)."""
        x = self.embed_tokens(input_ids)
        if x.is_cpu and native_decode.step_runs_native(meta, x.shape[0]):
            decoder = self._native_decoder(kv_caches)
            lora = None if meta.lora is None else native_decode.lora_step(self, meta.lora)
            if decoder is not None and (meta.lora is None or lora is not None):
                cos, sin = self.rotary.cos_sin(positions, meta.rope_inv_freq)
                local = None
                if self.local_rotary is not None:
                    local = self.local_rotary.cos_sin(positions)
                reduce = self.comm.tp_all_reduce if self.comm.tp_size > 1 else None
                return decoder.run(
                    x.contiguous(),
                    cos,
                    sin,
                    meta.slot_mapping,
                    meta.block_tables,
                    meta.context_lens,
                    reduce,
                    lora,
                    local,
                )
        if meta.lora is not None:  # rows with LoRA adapters, layer by layer
            everything = range(len(self.layers))
            carry = (x, None)
            return self.forward_layers(input_ids, positions, meta, kv_caches, everything, carry)[0]
        residual: torch.Tensor | None = None
        with layer_invariant_scope():
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                x, residual = layer(x, residual, positions, meta, kv_cache)
        x, _ = self.norm(x, residual)
        return x

    def forward_layers(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[LayerKV],
        layers: range,
        carry: tuple[torch.Tensor, torch.Tensor | None] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A contiguous run of decoder layers (a segment of a decode graph, `forward` cut in
        pieces): from the embedding when `carry` is None, else from the (hidden, residual) the
        previous run returned. Returns (hidden, residual), or (final hidden, None) when the run
        ends with the last layer."""
        if carry is None:
            x, residual = self.embed_tokens(input_ids), None
        else:
            x, residual = carry
        if meta.lora is not None:
            if self.lora is None:
                raise ValueError("this step has LoRA rows but the model has no adapters loaded")
            self.lora.batch = meta.lora  # the adapted layers read the step's rows from here
        try:
            with layer_invariant_scope():
                for i in layers:
                    x, residual = self.layers[i](x, residual, positions, meta, kv_caches[i])
        finally:
            if self.lora is not None:
                self.lora.batch = None
        if layers.stop == len(self.layers):
            x, _ = self.norm(x, residual)
            return x, None
        return x, residual

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(tokens,) -> (tokens, hidden): the embeddings, times `embed_scale`."""
        x = self.embed(input_ids)
        scale = self.embed_scale
        return x if scale == 1.0 else x * scale

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, hidden) -> (n, vocab) fp32, identical on every tp rank (divided by Granite's
        logits_scaling; soft-capped where the config says, Gemma's cap * tanh(logits / cap))."""
        logits = self.lm_head(hidden)
        scale = self.config.logits_scaling
        logits = logits if scale == 1.0 else logits / scale
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
