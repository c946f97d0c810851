"""Which decode steps `DecoderLM` hands to the native CPU decoder (`kernels/cpu_decoder.py`).

A float32 model on CPU whose linear layers all run on the native panel kernel decodes through
it: every layer's kernels from one C call (tp = 1) or two per layer with the all-reduces
between them (tp > 1), the rows' LoRA adapters and the layers' sliding windows included. The
layer-by-layer path stays for everything else: prefill chunks, cp, other dtypes or weight
formats, a head_dim the attention kernel does not take, a row-parallel bias under tp > 1
(added after the reduce, between stages), and whenever `DIST_RUNTIME_CPU_DECODE=layers` or the
attention / elementwise kernels are switched to torch. Gemma 2 / 3 decode natively too: their
output norms, GELU, score soft-cap and Gemma 3's local RoPE base are in the native layer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, cast

import torch

from dist_runtime.config import cpu_attention_choice, cpu_decode_choice, cpu_elementwise_choice
from kernels import cpu_decoder
from kernels.cpu_attention import MAX_HEAD_DIM
from kernels.cpu_decoder import CpuDecoder, LayerTensors, LoraStacks, LoraStep
from kernels.cpu_gemm import NativeLinearWeight
from kernels.silu_and_mul import ACTIVATIONS
from workers.kv_cache import LayerKV
from workers.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from workers.layers.norm import RMSNorm
    from workers.lora import LoraBatch
    from workers.models.decoder import DecoderLayer, DecoderLM

logger = logging.getLogger(__name__)


def step_runs_native(meta: AttentionMetadata, tokens: int) -> bool:
    """Whether this step's kind is one the native decoder runs (the model's fitness is
    `build`'s): a decode step without cp, one token per sequence, the fused path chosen."""
    return (
        meta.is_decode
        and (meta.lora is None or meta.lora.slots is not None)
        and meta.cp is None
        and not meta.cp_decode
        and meta.block_tables.shape[0] == tokens
        and cpu_decode_choice() == "fused"
        and cpu_attention_choice() == "native"
        and cpu_elementwise_choice() == "native"
    )


def unfit_reason(model: DecoderLM, kv_caches: list[LayerKV]) -> str | None:
    """Why this model cannot decode natively, or None when it can."""
    config, comm = model.config, model.comm
    if model.embed.weight.device.type != "cpu" or model.embed.weight.dtype != torch.float32:
        return "not a float32 model on CPU"
    if comm.cp_size > 1:
        return "cp > 1"
    if not cpu_decoder.available():
        return "the native library is not built"
    if config.hidden_act not in ACTIVATIONS:
        return f"the activation {config.hidden_act!r}"
    head_dim = config.head_dim
    if head_dim % 16 or head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is not a multiple of 16 up to {MAX_HEAD_DIM}"
    for layer in _layers(model):
        linears = (
            layer.attn.qkv_proj,
            layer.attn.o_proj,
            layer.mlp.gate_up_proj,
            layer.mlp.down_proj,
        )
        if any(not isinstance(lin.cpu_packed, NativeLinearWeight) for lin in linears):
            return "a linear layer is not on the native panel kernel"
        if comm.tp_size > 1 and (
            layer.attn.o_proj.bias is not None or layer.mlp.down_proj.bias is not None
        ):
            return "row-parallel biases under tp > 1"
    bits = kv_caches[0].bits
    if bits not in (0, 4, 8) or (bits == 0 and kv_caches[0].k.dtype != torch.float32):
        return f"a KV cache of {kv_caches[0].k.dtype} ({bits} bits)"
    return None


def build(model: DecoderLM, kv_caches: list[LayerKV]) -> CpuDecoder | None:
    """The model's native decoder over these caches, or None (logged once per build) when
    the model is unfit."""
    reason = unfit_reason(model, kv_caches)
    if reason is not None:
        logger.debug("decode steps run layer by layer: %s", reason)
        return None
    layers = []
    for layer, kv in zip(_layers(model), kv_caches, strict=True):
        attn, mlp = layer.attn, layer.mlp
        packed = [
            lin.cpu_packed for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        ]
        assert all(isinstance(p, NativeLinearWeight) for p in packed)
        qkv, o, gate_up, down = packed
        layers.append(
            LayerTensors(
                input_norm=layer.input_norm.weight.data,
                post_norm=layer.post_attn_norm.weight.data,
                qkv=qkv,  # type: ignore[arg-type]
                qkv_bias=_data(attn.qkv_proj.bias),
                o=o,  # type: ignore[arg-type]
                o_bias=_data(attn.o_proj.bias),
                gate_up=gate_up,  # type: ignore[arg-type]
                gate_up_bias=_data(mlp.gate_up_proj.bias),
                down=down,  # type: ignore[arg-type]
                down_bias=_data(mlp.down_proj.bias),
                k_cache=kv.k,
                v_cache=kv.v,
                k_params=kv.k_params,
                v_params=kv.v_params,
                q_norm=None if attn.q_norm is None else attn.q_norm.weight.data,
                k_norm=None if attn.k_norm is None else attn.k_norm.weight.data,
                attn_out_norm=_norm(layer.attn_out_norm),
                mlp_out_norm=_norm(layer.mlp_out_norm),
                local_rope=attn.rotary is model.local_rotary,
            )
        )
    return CpuDecoder(
        layers,
        model.norm.weight.data,
        q_heads=model.shard.num_q,
        kv_heads=model.shard.num_kv,
        head_dim=model.config.head_dim,
        eps=model.config.rms_norm_eps,
        bits=kv_caches[0].bits,
        scale=model.config.attention_scale,
        windows=[layer.attn.window for layer in _layers(model)],
        act=model.config.hidden_act,
        softcap=model.config.attn_logit_softcapping or 0.0,
    )


def lora_step(model: DecoderLM, batch: LoraBatch) -> LoraStep | None:
    """The native decoder's view of a step's adapters: each row's slot and every adapted
    layer's stacks; None (the step runs layer by layer) where a stack is not float32."""
    assert batch.slots is not None
    layers = []
    for layer in _layers(model):
        attn, mlp = layer.attn, layer.mlp
        stacks: list[LoraStacks] = []
        for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            lora = lin.lora
            if lora is None or lora.a.dim() != 3:
                stacks.append(None)
            elif lora.a.dtype != torch.float32 or lora.b.dtype != torch.float32:
                return None
            else:
                stacks.append((lora.a, lora.b_rows()))
        layers.append((stacks[0], stacks[1], stacks[2], stacks[3]))
    return LoraStep(batch.slots, layers)


def _layers(model: DecoderLM) -> list[DecoderLayer]:
    return cast("list[DecoderLayer]", list(model.layers))


def _data(p: torch.nn.Parameter | None) -> torch.Tensor | None:
    return None if p is None else p.data


def _norm(norm: RMSNorm | None) -> torch.Tensor | None:
    return None if norm is None else norm.weight.data
