"""Configuration: one frozen dataclass per owner, validated on construction.

A YAML file maps 1:1 onto `RuntimeConfig`: top-level keys are `RuntimeConfig` fields, and the
sections `parallel:`, `cache:` and `scheduler:` are the nested configs::

    model: /models/internlm2_5-7b-chat
    dtype: bfloat16
    session_len: 32768
    parallel: {tp: 2, cp: 1}
    cache: {block_size: 16}
    scheduler: {max_num_seqs: 64}

`ModelConfig` is not user-written: it is read from the checkpoint's `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_ARCHITECTURES = {
    "InternLM2ForCausalLM": "internlm2",
    "InternLM3ForCausalLM": "llama",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MinistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "Phi3ForCausalLM": "llama",
    "GraniteForCausalLM": "llama",
    "GlmForCausalLM": "llama",
    "GemmaForCausalLM": "llama",
    "Gemma2ForCausalLM": "gemma",
    "Gemma3ForCausalLM": "gemma",
    "Gemma3ForConditionalGeneration": "gemma",
}
"""config.json architectures and the weight layout each is read with (InternLM3's is Llama's, with
q/k/v biases where `qkv_bias` says and o / MLP biases where `bias` does; Qwen2's is Llama's,
with biases on q/k/v only; Qwen3's Llama's with an RMSNorm on each q and k head; Phi-3's Llama's
with q/k/v and gate/up packed, `ModelConfig.fused_projections`; IBM Granite's Llama's with four
scalar multipliers, `ModelConfig.embedding_multiplier` and the three after it; GLM-4's (the
`-hf` checkpoints) Llama's with gate/up packed, no o bias and interleaved partial RoPE; Gemma
3's (the text-only `gemma3_text` checkpoints) Llama's names with Qwen3's head norms, a norm on
each sublayer's output and GELU, `ModelConfig.sandwich_norms` and the fields after it; Gemma 2's
Gemma 3's without the head norms, with attention-logit soft-capping; Gemma 1's Llama's names and
norms with Gemma's 1 + w norm scale, GELU and embedding scale)."""
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
SUPPORTED_ROPE_SCALING = (None, "default", "linear", "dynamic", "llama3", "yarn", "longrope")


QUANT_POLICIES = (0, 8, 4)
"""KV cache quantization: bits per cached K/V element (0: the model's dtype)."""


MAX_SPECULATIVE_TOKENS = 16
"""Most draft tokens one sequence may propose per step."""


class ConfigError(ValueError):
    """A configuration value a user can fix; `key` names the config key (e.g. `parallel.tp`)
    when one value is at fault, so a front end can name its own flag instead."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def rope_attention_factor(scaling: RopeScaling) -> float:
    """YaRN's and LongRoPE's q / k scale (HF's `attention_factor`); 1 for every other
    scaling."""
    if scaling.type not in ("yarn", "longrope"):
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    if scaling.type == "longrope":  # (from the ratio of the lengths, HF's default)
        trained = scaling.original_max_position_embeddings
        if scaling.factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(scaling.factor) / math.log(trained))

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return mscale(scaling.factor, scaling.mscale) / mscale(
            scaling.factor, scaling.mscale_all_dim
        )
    return mscale(scaling.factor)


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    type: str
    """Scaling type from `rope_scaling.type` / `rope_type`: linear, dynamic (NTK) or llama3
    (Llama 3.1's: the low frequencies divided by `factor`, the high ones kept, a smooth blend
    between)."""
    factor: float = 1.0
    """Linear: positions are divided by it. Dynamic: the NTK factor, which changes the RoPE
    base only for prompts longer than max_position_embeddings. Llama3: the low frequencies'
    divisor."""
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    """Llama3: wavelengths over original / low_freq_factor are scaled, those under
    original / high_freq_factor kept. YaRN: the trained length its ramp is placed by."""
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    """YaRN: the rotation counts whose dimensions bound the ramp between extrapolated (fast)
    and interpolated (slow) frequencies."""
    attention_factor: float | None = None
    """YaRN: the factor q and k are scaled by (HF scales cos and sin); None: from `factor`
    (and mscale / mscale_all_dim, DeepSeek's form), 0.1 ln(factor) + 1."""
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    """YaRN: the ramp's bounds rounded to whole dimensions (HF's default)."""
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    """LongRoPE (Phi-3's): each frequency's divisor, one per dimension pair; a request whose
    prompt is longer than original_max_position_embeddings takes the long ones
    (`ModelConfig.rope_base`), else the short ones. `factor` is max_position_embeddings over
    the trained length (it sets the default attention_factor)."""

    def __post_init__(self) -> None:
        if self.type not in ("linear", "dynamic", "llama3", "yarn", "longrope"):
            raise ConfigError(
                f"rope_scaling type {self.type!r} is not supported (supported: linear, dynamic, "
                "llama3, yarn, longrope, or none); remove `rope_scaling` from config.json or "
                "use a checkpoint without it"
            )
        if not self.factor >= 1.0:
            raise ConfigError(f"rope_scaling factor must be >= 1, got {self.factor}")
        if self.type == "llama3" and not (
            0 < self.low_freq_factor < self.high_freq_factor
            and self.original_max_position_embeddings > 0
        ):
            raise ConfigError(
                "llama3 rope_scaling needs 0 < low_freq_factor < high_freq_factor and "
                f"original_max_position_embeddings > 0, got {self.low_freq_factor}, "
                f"{self.high_freq_factor} and {self.original_max_position_embeddings}"
            )


WEIGHT_QUANT_METHODS = ("awq", "gptq", "gguf")
"""4-bit weight checkpoint formats the loader reads (see dist_runtime/formats/int4.py); 'gguf'
is the layout `launch/convert.py --weights int4` writes from GGUF Q4_0 / Q4_1 / Q4_K tensors."""
CPU_INT4_GROUPS = (32, 64, 128, 256)
"""Group sizes PyTorch's CPU int4 matmul takes (`kernels/w4a16.py: CpuInt4Weight`)."""
CPU_GEMM_ENV = "DIST_RUNTIME_CPU_GEMM"
"""`native` (default), `onednn` or `torch`: how float linear layers run on CPU
(`kernels/cpu_gemm.py`)."""
CPU_GEMM_DTYPES = ("float32", "bfloat16")
"""Weight dtypes packed on CPU: float32 for the native kernel, both where this CPU's oneDNN
runs them."""


def env_choice(name: str, values: tuple[str, ...]) -> str:
    """The value of environment variable `name`, lower-cased: values[0] when unset or empty;
    one outside `values` is an error naming them."""
    value = os.environ.get(name, "").strip().lower() or values[0]
    if value not in values:
        accepted = ", ".join(repr(v) for v in values)
        raise ValueError(f"{name}={value!r} is not valid; use {accepted} or leave it unset")
    return value


def cpu_gemm_choice() -> str:
    """`DIST_RUNTIME_CPU_GEMM`: 'native' (default), 'onednn' or 'torch'."""
    return env_choice(CPU_GEMM_ENV, ("native", "onednn", "torch"))


CPU_ATTENTION_ENV = "DIST_RUNTIME_CPU_ATTENTION"
"""`native` (default) or `torch`: whether CPU decode attention and the RoPE + KV store run through
the native kernels (`kernels/cpu_attention.py`) or the torch references."""


def cpu_attention_choice() -> str:
    """`DIST_RUNTIME_CPU_ATTENTION`: 'native' (default) or 'torch'."""
    return env_choice(CPU_ATTENTION_ENV, ("native", "torch"))


CPU_ELEMENTWISE_ENV = "DIST_RUNTIME_CPU_ELEMENTWISE"
"""`native` (default) or `torch`: whether a float32 CPU model's residual add + RMSNorm and
SiLU-and-mul run through the native kernels (`kernels/cpu_elementwise.py`) or the torch
references."""


def cpu_elementwise_choice() -> str:
    """`DIST_RUNTIME_CPU_ELEMENTWISE`: 'native' (default) or 'torch'."""
    return env_choice(CPU_ELEMENTWISE_ENV, ("native", "torch"))


CPU_DECODE_ENV = "DIST_RUNTIME_CPU_DECODE"
"""`fused` (default) or `layers`: whether a CPU decode step runs every decoder layer's kernels
from one native call (`kernels/cpu_decoder.py`, where the model fits) or layer by layer."""


def cpu_decode_choice() -> str:
    """`DIST_RUNTIME_CPU_DECODE`: 'fused' (default) or 'layers'."""
    return env_choice(CPU_DECODE_ENV, ("fused", "layers"))


CPU_COLLECTIVES_ENV = "DIST_RUNTIME_CPU_COLLECTIVES"
"""`shm` (default) or `gloo`: whether the tp all-reduces and all-gathers of a gloo (CPU) group
whose ranks share one machine go through a shared memory segment (`kernels/cpu_shm.py`) or
through gloo's sockets."""


def cpu_collectives_choice() -> str:
    """`DIST_RUNTIME_CPU_COLLECTIVES`: 'shm' (default) or 'gloo'."""
    return env_choice(CPU_COLLECTIVES_ENV, ("shm", "gloo"))


DECODE_GRAPHS_ENV = "DIST_RUNTIME_DECODE_GRAPHS"
"""`auto` (default: decode steps replay from CUDA graphs on CUDA unless `enforce_eager`) or
`emulate` (any device, for tests where there is no CUDA: decode steps go through the graphs'
fixed buffers, batch padding and scratch block, and a replay runs the forward again)."""


def decode_graphs_choice() -> str:
    """`DIST_RUNTIME_DECODE_GRAPHS`: 'auto' (default) or 'emulate'."""
    return env_choice(DECODE_GRAPHS_ENV, ("auto", "emulate"))


DECODE_GRAPH_SEGMENTS_ENV = "DIST_RUNTIME_DECODE_GRAPH_SEGMENTS"
"""Graphs a decode step's forward is cut into (whole decoder layers each; default 1). The device
starts on a graph only once its launch call returns, and a launch takes longer the more kernels
the graph holds; with several, the first runs while the host launches the rest."""


def decode_graph_segments() -> int:
    """`DIST_RUNTIME_DECODE_GRAPH_SEGMENTS`: a positive integer, 1 when unset."""
    raw = os.environ.get(DECODE_GRAPH_SEGMENTS_ENV, "").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(
            f"{DECODE_GRAPH_SEGMENTS_ENV}={raw!r} is not valid; use a positive integer or leave "
            "it unset"
        )
    return int(raw)


ASYNC_DECODE_ENV = "DIST_RUNTIME_ASYNC_DECODE"
"""`1`: decode steps (greedy or sampling, without penalties or top-k log-probabilities) are
planned and launched one step ahead, while the device still runs the step before (in one
process with decode graphs; over Ray always, each step's call queued on the actors); `0`
(default): each step waits for the one before."""


def async_decode_enabled() -> bool:
    """`DIST_RUNTIME_ASYNC_DECODE`: '0' (default) or '1'."""
    return env_choice(ASYNC_DECODE_ENV, ("0", "1")) == "1"


GEMV_ENV = "DIST_RUNTIME_GEMV"
"""`cublas` (default) or `triton`: float linear layers of decode-sized batches (at most 16 rows)
on CUDA through `F.linear` or the weight-streaming Triton kernel (`kernels/gemv.py`)."""


def gemv_choice() -> str:
    """`DIST_RUNTIME_GEMV`: 'cublas' (default) or 'triton'."""
    return env_choice(GEMV_ENV, ("cublas", "triton"))


KERNELS_ENV = "DIST_RUNTIME_KERNELS"
"""`torch` or `triton` forces the kernel family (`kernels/dispatch.py`); unset: Triton on CUDA."""

WORKER_ENV = (
    KERNELS_ENV,
    CPU_GEMM_ENV,
    CPU_ATTENTION_ENV,
    CPU_ELEMENTWISE_ENV,
    CPU_DECODE_ENV,
    CPU_COLLECTIVES_ENV,
    DECODE_GRAPHS_ENV,
    DECODE_GRAPH_SEGMENTS_ENV,
    ASYNC_DECODE_ENV,
    GEMV_ENV,
)
"""Environment switches that choose kernels and paths inside the workers. The Ray executor
hands the driver's values to every worker, so they hold on a cluster started elsewhere too."""


@dataclass(frozen=True, kw_only=True)
class WeightQuant:
    """A 4-bit weight checkpoint's format, from config.json's `quantization_config` (or a
    `quant_config.json` / `quantize_config.json` beside it)."""

    method: str
    """'awq' (AutoAWQ GEMM layout), 'gptq', or 'gguf' (GGUF 4-bit blocks, float zeros)."""
    bits: int = 4
    group_size: int = 128
    """Input rows per scale and zero; -1: one group over all of a layer's inputs."""
    zero_point: bool = True
    """AWQ: asymmetric with zero points. GPTQ files store zeros either way (sym: 8)."""
    desc_act: bool = False
    """GPTQ act-order: input rows are grouped by `g_idx`, not by position."""
    zero_offset: int = 1
    """GPTQ zeros are stored minus this (1 in the 'gptq' format, 0 in 'gptq_v2')."""
    modules_to_not_convert: tuple[str, ...] = ()
    """Name fragments of linear layers kept in float."""

    def __post_init__(self) -> None:
        if self.method not in WEIGHT_QUANT_METHODS:
            raise ConfigError(
                f"quantization_config: quant_method {self.method!r} is not supported; the "
                f"runtime loads 4-bit {' and '.join(WEIGHT_QUANT_METHODS)} checkpoints (or "
                "quantize a float checkpoint with launch/quantize.py)"
            )
        if self.bits != 4:
            raise ConfigError(
                f"quantization_config: bits={self.bits!r} is not supported; only 4-bit "
                f"{self.method} weights load"
            )
        if not _is_int(self.group_size) or (
            self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8)
        ):
            raise ConfigError(
                f"quantization_config: group_size must be a positive multiple of 8 or -1, got "
                f"{self.group_size!r}"
            )

    def quantized(self, module: str) -> bool:
        """Whether the linear layer `module` (a checkpoint name) holds 4-bit weights."""
        return not any(frag in module for frag in self.modules_to_not_convert)

    def group_of(self, in_features: int) -> int:
        """Group size of a layer with `in_features` inputs."""
        return in_features if self.group_size == -1 else self.group_size

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str) -> WeightQuant:
        """Parse HF's `quantization_config`, AutoAWQ's `quant_config.json` or AutoGPTQ's
        `quantize_config.json` (the key spellings differ)."""
        method = str(raw.get("quant_method") or "").lower()
        if not method:
            method = "awq" if ("w_bit" in raw or "q_group_size" in raw) else "gptq"
        bits = raw.get("bits", raw.get("w_bit", 4))
        group = raw.get("group_size", raw.get("q_group_size", 128))
        try:
            if method == "awq":
                version = str(raw.get("version", "gemm")).lower()
                if version != "gemm":
                    raise ConfigError(
                        f"{source}: AWQ version {version!r} is not supported; the runtime "
                        "reads the GEMM layout (qweight [in, out/8]); re-export with "
                        'version="GEMM"'
                    )
                return cls(
                    method="awq",
                    bits=bits,
                    group_size=group,
                    zero_point=bool(raw.get("zero_point", True)),
                    modules_to_not_convert=tuple(raw.get("modules_to_not_convert") or ()),
                )
            if method == "gptq":
                fmt = str(raw.get("checkpoint_format", "gptq")).lower()
                if fmt not in ("gptq", "gptq_v2"):
                    raise ConfigError(
                        f"{source}: GPTQ checkpoint_format {fmt!r} is not supported "
                        "(supported: gptq, gptq_v2)"
                    )
                return cls(
                    method="gptq",
                    bits=bits,
                    group_size=group,
                    zero_point=not bool(raw.get("sym", True)),
                    desc_act=bool(raw.get("desc_act", False)),
                    zero_offset=1 if fmt == "gptq" else 0,
                    modules_to_not_convert=tuple(raw.get("modules_to_not_convert") or ()),
                )
            if method == "gguf":
                return cls(
                    method="gguf",
                    bits=bits,
                    group_size=group,
                    modules_to_not_convert=tuple(raw.get("modules_to_not_convert") or ()),
                )
            return cls(method=method)
        except ConfigError as e:
            if str(e).startswith(source):
                raise
            raise ConfigError(f"{source}: {e}") from None


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and numerics of a decoder checkpoint, read from its config.json."""

    architecture: str
    """Checkpoint layout: 'internlm2' (packed wqkv) or 'llama' (q/k/v_proj)."""
    vocab_size: int
    """Rows of the embedding and LM head."""
    hidden_size: int
    """Model width."""
    intermediate_size: int
    """Width of the gated MLP."""
    num_layers: int
    """Decoder layers."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA when fewer than num_heads)."""
    head_dim: int
    """Per-head width."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: RopeScaling | None = None
    """RoPE scaling, or None."""
    max_position_embeddings: int = 4096
    """Trained context length."""
    sliding_window: int | None = None
    """Each token of a windowed layer attends to at most this many keys, its own included
    (Mistral v0.1, Phi-3-mini-4k, Qwen2's `use_sliding_window`); None: every layer attends to
    every earlier token."""
    window_layers: tuple[bool, ...] | None = None
    """Which layers attend within sliding_window (transformers' `layer_types`, or Qwen2's
    `max_window_layers`: the layers from it on); None: every layer."""
    tie_word_embeddings: bool = False
    """LM head shares the embedding matrix."""
    attention_bias: bool = False
    """q/k/v projections carry a bias (InternLM2 `bias`, Llama `attention_bias`, Qwen2's
    always), and o too unless `o_bias` says otherwise."""
    o_bias: bool | None = None
    """The output projection carries a bias; None: as attention_bias (Qwen2: False)."""
    qk_norm: bool = False
    """Qwen3's: every q and k head goes through an RMSNorm (weights of head_dim) before RoPE."""
    rotary_dim: int | None = None
    """RoPE turns only the first rotary_dim dimensions of every q and k head (HF's
    `partial_rotary_factor`, Phi-4-mini's 0.75), the rest pass through; None: all of them.
    The loader reorders each q and k head's rows so that the turned pairs are the runtime's
    rotate-half pairs and the rest pair up at frequency 0 (`workers.models.layouts.
    rotary_row_order`): q.k is unchanged, and every RoPE kernel serves it as it is."""
    rope_interleaved: bool = False
    """GLM-4's: RoPE turns adjacent dimensions (2i, 2i + 1) together, not (i, i + d/2); the
    loader reorders q / k rows into the runtime's pairs (`rotary_row_order`)."""
    embedding_multiplier: float = 1.0
    """Granite's: the embeddings are multiplied by it."""
    residual_multiplier: float = 1.0
    """Granite's: each layer's attention and MLP outputs are multiplied by it before the
    residual add (the loader folds it into o_proj's and down_proj's weights and biases)."""
    attention_multiplier: float | None = None
    """Granite's: the softmax scale of q.k, in place of 1 / sqrt(head_dim)."""
    logits_scaling: float = 1.0
    """Granite's: the logits are divided by it."""
    sandwich_norms: bool = False
    """Gemma 3's: each layer also norms its attention's and its MLP's outputs before adding
    them to the residual stream (`post_attention_layernorm`, `post_feedforward_layernorm`; the
    MLP's input norm is `pre_feedforward_layernorm`)."""
    norm_weight_offset: float = 0.0
    """Gemma's RMSNorms scale by 1 + weight: the loader adds this to every norm weight in
    float32, where the weight stays (`fp32_norm_scale`)."""
    hidden_act: str = "silu"
    """The MLP's gate activation: 'silu', or Gemma 3's 'gelu_pytorch_tanh' (one of
    SUPPORTED_ACTIVATIONS)."""
    local_rope_theta: float | None = None
    """Gemma 3's: the RoPE base of its sliding-window layers (`rope_local_base_freq`), which
    take no rope_scaling; None: every layer turns with rope_theta and rope_scaling."""
    round_embedding_multiplier: bool = False
    """Gemma 3's: embedding_multiplier (sqrt(hidden)) is first rounded to the model's dtype, as
    HF does (bfloat16 turns sqrt(1152) = 33.94 into 34)."""
    final_logit_softcapping: float | None = None
    """The logits go through cap * tanh(logits / cap) (Gemma's `final_logit_softcapping`);
    None: as they are."""
    attn_logit_softcapping: float | None = None
    """Gemma 2's: each scaled attention score s goes through cap * tanh(s / cap) before the
    softmax (the attention kernels' `softcap`); None: none."""
    fused_projections: bool = False
    """Phi-3's checkpoint packs q, k and v into one `qkv_proj` and gate and up into one
    `gate_up_proj` (rows [q | k | v] and [gate | up]); read as Llama's names through row
    views (`workers.models.names.fused_views`)."""
    mlp_bias: bool = False
    """MLP projections carry a bias."""
    bos_token_id: int | None = None
    """Beginning-of-sequence id."""
    eos_token_ids: tuple[int, ...] = ()
    """Ids that end generation."""
    weight_quant: WeightQuant | None = None
    """4-bit weights (AWQ / GPTQ checkpoint), or None for float weights."""
    torch_dtype: str | None = None
    """The dtype the checkpoint's weights were saved in (config.json's `torch_dtype`, or
    transformers 5's `dtype`), if it names one of SUPPORTED_DTYPES: what `dtype: auto`
    computes in on CUDA when it is float16 or bfloat16."""

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        )
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"config.json: hidden_act {self.hidden_act!r} is not one of {SUPPORTED_ACTIVATIONS}"
            )
        if self.rotary_dim is not None and not (
            _is_int(self.rotary_dim) and 0 < self.rotary_dim < self.head_dim
        ):
            raise ConfigError(
                f"config.json: rotary_dim {self.rotary_dim!r} must be an integer in "
                f"(0, head_dim {self.head_dim})"
            )

    @property
    def rope_dim(self) -> int:
        """Dimensions of each head RoPE turns (`rotary_dim`, or all of head_dim)."""
        return self.rotary_dim or self.head_dim

    def rope_base(self, prompt_len: int) -> float:
        """RoPE base of a request: dynamic NTK (HF InternLM2's formula) raises it for a prompt
        longer than max_position_embeddings. It is fixed once per request from its prompt
        length (as TurboMind does), so keys already cached never change rotation.

        LongRoPE keeps the base and changes the factors: a prompt longer than the trained
        length takes the long ones (as HF does for such a prompt), named by the base negated
        (no real base is negative; `workers.layers.rotary.model_frequencies` reads the sign).
        A request that grows past the trained length while decoding keeps its short factors
        (HF switches them mid-sequence while its cache keeps the old rotations)."""
        scaling, max_pos = self.rope_scaling, self.max_position_embeddings
        if scaling is not None and scaling.type == "longrope":
            if prompt_len > scaling.original_max_position_embeddings:
                return -self.rope_theta
            return self.rope_theta
        if scaling is None or scaling.type != "dynamic" or prompt_len <= max_pos:
            return self.rope_theta
        d, factor = self.rope_dim, scaling.factor
        return self.rope_theta * (factor * prompt_len / max_pos - (factor - 1)) ** (d / (d - 2))

    def uniform_window(self) -> int:
        """The sliding window when every layer has it (0: none, or some layer sees every key):
        the blocks it has passed can go back to the pool (`Scheduler.window`)."""
        return (self.sliding_window or 0) if self.window_layers is None else 0

    def layer_window(self, layer: int) -> int:
        """The sliding window of layer `layer`, 0 for none (the attention kernels' `window`)."""
        if self.sliding_window is None:
            return 0
        if self.window_layers is not None and not self.window_layers[layer]:
            return 0
        return self.sliding_window

    def max_rope_len(self) -> int | None:
        """Longest sequence RoPE supports: the trained length, times a linear factor; None
        (no bound) with dynamic NTK, which rescales past it."""
        scaling = self.rope_scaling
        if scaling is None or scaling.type in ("llama3", "longrope"):  # (max_position_embeddings
            return self.max_position_embeddings  # is the scaled length already)
        if scaling.type == "linear" and self.local_rope_theta is None:
            return int(self.max_position_embeddings * scaling.factor)
        if scaling.type == "linear":  # (Gemma 3's max_position_embeddings is the scaled length)
            return self.max_position_embeddings
        if scaling.type == "yarn":
            scaled = int(scaling.original_max_position_embeddings * scaling.factor)
            return max(scaled, self.max_position_embeddings)
        return None

    @property
    def fp32_norm_scale(self) -> bool:
        """The RMSNorms keep their weights in float32 and scale by them before the one cast to
        the activations' dtype, as HF's Gemma norms do (`workers.layers.norm.RMSNorm`)."""
        return self.norm_weight_offset != 0.0

    @property
    def attention_scale(self) -> float:
        """Softmax scale of q.k: 1 / sqrt(head_dim), times the square of YaRN's or LongRoPE's
        attention factor (HF scales the rotated q and k by it; folding it in here is the same
        product). With partial RoPE only the turned dimensions are scaled, so the factor is
        folded into their weight rows at load instead."""
        base = (
            self.head_dim**-0.5 if self.attention_multiplier is None else self.attention_multiplier
        )
        if self.rotary_dim is not None:  # (the factor is in q's and k's turned rows instead:
            return base  # `workers.models.layouts.rotary_row_scale`)
        return base * self.rope_attention_factor**2

    @property
    def rope_attention_factor(self) -> float:
        """YaRN's or LongRoPE's scale of the turned q and k (1 for other scalings)."""
        scaling = self.rope_scaling
        return rope_attention_factor(scaling) if scaling is not None else 1.0

    @property
    def has_o_bias(self) -> bool:
        return self.attention_bias if self.o_bias is None else self.o_bias

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dict(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = hf.get("architectures") or []
        if "Gemma3ForConditionalGeneration" in archs:  # (its language model alone)
            hf = _gemma3_language_model(hf, source)
            archs = hf["architectures"]
        arch = next(
            (SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None
        )
        if arch is None:
            raise ConfigError(
                f"{source}: architectures {archs!r} are not supported; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}"
            )
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if k not in hf
        ]
        if missing:
            raise ConfigError(f"{source}: missing required keys {missing}")
        gemma = next((v for a, v in GEMMA_VERSIONS.items() if a in archs), 0)
        if gemma:
            hf = _gemma_keys(hf, source, gemma)
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        qwen2 = "Qwen2ForCausalLM" in archs
        phi3 = "Phi3ForCausalLM" in archs
        glm = "GlmForCausalLM" in archs
        params = _rope_params(hf)
        partial = (params if isinstance(params, dict) else {}).get(
            "partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)
        )
        quant = _parse_weight_quant(hf, source)
        rotary_dim = _rotary_dim(partial, head_dim, source)
        if rotary_dim is not None and arch == "internlm2":
            raise ConfigError(f"{source}: partial_rotary_factor is not read for InternLM2")
        if (rotary_dim is not None or glm) and quant is not None:
            raise ConfigError(
                f"{source}: 4-bit weights with a partial_rotary_factor are not read; load the "
                "float checkpoint"
            )
        internlm3 = "InternLM3ForCausalLM" in archs  # (q/k/v biases apart from o's and the MLP's)
        bias = (
            bool(hf.get("bias", False))
            if arch == "internlm2"
            else bool(hf.get("qkv_bias", False))
            if internlm3
            else qwen2 or bool(hf.get("attention_bias", False))
        )
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(hf, source),
            rope_scaling=_parse_rope_scaling(
                _rope_params(hf),
                source,
                int(hf.get("max_position_embeddings", 4096)),
                phi3=phi3,
                original=hf.get("original_max_position_embeddings"),
                head_dim=rotary_dim or head_dim,
            ),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            **_sliding_window(hf, source, archs),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bias,
            # (Qwen2, GLM: q/k/v biases, none on o; InternLM3: o's by `bias`)
            o_bias=False if qwen2 or glm else bool(hf.get("bias", False)) if internlm3 else None,
            qk_norm="Qwen3ForCausalLM" in archs or gemma == 3,
            fused_projections=phi3 or glm,  # (GLM: gate_up_proj packed; q, k, v apart)
            rope_interleaved=glm,
            **(_gemma_fields(hf, source, gemma) if gemma else _granite_multipliers(hf, source)),
            rotary_dim=rotary_dim,
            # InternLM2's `bias` covers wqkv and wo only; its MLP never has biases.
            mlp_bias=(
                bool(hf.get("bias" if internlm3 else "mlp_bias", False))
                if arch == "llama"
                else False
            ),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            weight_quant=quant,
            torch_dtype=_saved_dtype(hf),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> ModelConfig:
        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(
                f"model folder {str(folder)!r} does not exist; pass --model with a folder holding "
                "config.json and *.safetensors"
            )
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(
                f"{cfg_file} is missing; the model folder must be a Hugging Face checkpoint "
                "(config.json + *.safetensors)"
            )
        hf = _read_json(cfg_file)
        if "quantization_config" not in hf:
            for name in ("quant_config.json", "quantize_config.json"):
                if (folder / name).is_file():
                    hf = {**hf, "quantization_config": _read_json(folder / name)}
                    cfg_file = folder / name
                    break
        model = cls.from_dict(hf, source=str(cfg_file))
        gen_file = folder / "generation_config.json"
        if not gen_file.is_file():
            return model
        # HF's generate stops at generation_config's EOS ids (Llama 3 Instruct's turns end with
        # <|eot_id|>, which config.json may not name): they end generation here too
        eos = _read_json(gen_file).get("eos_token_id")
        more = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in more):
            raise ConfigError(f"{gen_file}: eos_token_id must be token ids, got {eos!r:.80}")
        ids = tuple(dict.fromkeys([*model.eos_token_ids, *more]))
        return dataclasses.replace(model, eos_token_ids=ids)


def _granite_multipliers(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """IBM Granite's scalars where config.json names them (other configs have none)."""
    out: dict[str, Any] = {}
    for key in (
        "embedding_multiplier",
        "residual_multiplier",
        "attention_multiplier",
        "logits_scaling",
    ):
        value = hf.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ConfigError(f"{source}: {key} must be a positive number, got {value!r}")
        out[key] = float(value)
    return out


GEMMA3_DEFAULTS = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "max_position_embeddings": 131_072,
    "sliding_window": 4096,
    "query_pre_attn_scalar": 256,
    "bos_token_id": 2,
    "eos_token_id": 1,
}
"""What transformers' Gemma3TextConfig takes for a key its config.json leaves out (the
multimodal checkpoints' `text_config` names only what differs from these)."""
GEMMA2_DEFAULTS = {
    **GEMMA3_DEFAULTS,
    "vocab_size": 256_000,
    "max_position_embeddings": 8192,
}
"""Gemma2Config's."""
GEMMA_VERSIONS = {"GemmaForCausalLM": 1, "Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 3}
"""Gemma's text classes by version (a multimodal Gemma 3 is read as its Gemma3ForCausalLM)."""
GEMMA1_DEFAULTS = {
    "vocab_size": 256_000,
    "hidden_size": 3072,
    "intermediate_size": 24_576,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
    "rope_theta": 10_000.0,
    "bos_token_id": 2,
    "eos_token_id": 1,
}
"""GemmaConfig's (Gemma 1: gemma-2b / -7b, CodeGemma, RecurrentGemma aside)."""
GEMMA_SOFTCAPS = {1: (None, None), 2: (30.0, 50.0), 3: (None, None)}
"""(final_logit_softcapping, attn_logit_softcapping) where a config leaves the key out (null
turns one off)."""


def _gemma3_language_model(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """A multimodal Gemma 3 config (`Gemma3ForConditionalGeneration`, the 4B / 12B / 27B
    checkpoints) as its language model's: `text_config` with Gemma3TextConfig's defaults, and
    the top level's token ids and dtype (what HF's generate reads) over the text config's. The
    loader reads the language model's tensors under their prefix
    (`workers.models.layouts.check_checkpoint`); the vision tower is not loaded, so prompts
    are text."""
    text = hf.get("text_config")
    if text is None:
        text = {}
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: text_config must be an object, got {text!r:.80}")
    keys = ("eos_token_id", "bos_token_id", "torch_dtype", "dtype")
    top = {k: hf[k] for k in keys if hf.get(k) is not None}
    merged = {**GEMMA3_DEFAULTS, **{k: v for k, v in text.items() if v is not None}, **top}
    return {**merged, "architectures": ["Gemma3ForCausalLM"]}


GEMMA3_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
"""Gemma 3's RoPE bases where its config names none (global layers, sliding-window layers)."""


def _gemma_keys(hf: dict[str, Any], source: str, version: int) -> dict[str, Any]:
    """A Gemma 2 or Gemma 3 text config.json in the keys the Llama path reads, as
    Gemma2Config / Gemma3TextConfig read it (version 1: GemmaConfig, which has no windows and
    no soft-caps): their defaults filled in (the soft-caps only where
    the key is absent: null turns one off), `layer_types` where it names none (Gemma 2: every
    second layer global; Gemma 3: every `sliding_window_pattern`-th, 6), and for Gemma 3
    transformers 5's per-layer-type `rope_parameters` split into the global layers' (rope_theta
    and scaling) and the local base (`rope_local_base_freq`, default 10000; its scaling must be
    the default). Gemma 2's layers all turn with rope_theta (10000). Refuses bidirectional
    attention (the embedding models)."""
    defaults = {1: GEMMA1_DEFAULTS, 2: GEMMA2_DEFAULTS, 3: GEMMA3_DEFAULTS}[version]
    hf = {**hf, **{k: v for k, v in defaults.items() if hf.get(k) is None}}
    for key, default in zip(
        ("final_logit_softcapping", "attn_logit_softcapping"), GEMMA_SOFTCAPS[version], strict=True
    ):
        hf.setdefault(key, default)
    if hf.get("use_bidirectional_attention"):
        raise ConfigError(
            f"{source}: use_bidirectional_attention (an embedding model) is not run; only "
            f"causal Gemma {version} text models generate"
        )
    if version == 1:
        hf["rope_local_base_freq"] = None
        return hf
    if hf.get("layer_types") is None:
        pattern = hf.get("sliding_window_pattern", 6) if version == 3 else 2
        if not _is_int(pattern) or pattern < 1:
            raise ConfigError(f"{source}: sliding_window_pattern must be a positive integer, "
                              f"got {pattern!r:.80}")  # fmt: skip
        hf["layer_types"] = [
            "sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(hf["num_hidden_layers"])
        ]
    if version == 2:
        hf["rope_local_base_freq"] = None
        return hf
    params = hf.get("rope_parameters")
    local = hf.get("rope_local_base_freq", GEMMA3_THETA["sliding_attention"])
    if isinstance(params, dict) and {"full_attention", "sliding_attention"} & set(params):
        full = dict(params.get("full_attention") or {})
        sliding = params.get("sliding_attention") or {}
        if not isinstance(sliding, dict) or sliding.get("rope_type", "default") != "default":
            raise ConfigError(
                f"{source}: rope_parameters.sliding_attention must be default RoPE (a base "
                f"only), got {sliding!r:.120}"
            )
        local = sliding.get("rope_theta", local)
        full.setdefault("rope_theta", hf.get("rope_theta", GEMMA3_THETA["full_attention"]))
        hf["rope_parameters"] = full
    elif params is None:
        hf.setdefault("rope_theta", GEMMA3_THETA["full_attention"])
    try:
        hf["rope_local_base_freq"] = float(local)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{source}: rope_local_base_freq must be a number, got {local!r:.80}"
        ) from None
    return hf


def _gemma_fields(hf: dict[str, Any], source: str, version: int) -> dict[str, Any]:
    """The ModelConfig fields of a Gemma 1, 2 or 3 config (after `_gemma_keys`). Gemma 3's
    class keeps attn_logit_softcapping without applying it, and so does this runtime. Gemma 1
    norms each sublayer's input only, scales q.k by 1 / sqrt(head_dim), and reads its
    activation from `hidden_act`, where its first checkpoints' 'gelu' means the tanh form (as
    transformers reads it)."""
    act_key = "hidden_act" if version == 1 else "hidden_activation"
    act = hf.get(act_key) or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if version == 1 and act == "gelu":
        act = "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"{source}: {act_key} {act!r} is not run for Gemma {version}; it "
                          "takes 'gelu_pytorch_tanh'")  # fmt: skip
    multiplier = None  # (Gemma 1: 1 / sqrt(head_dim))
    if version > 1:
        scalar = hf.get("query_pre_attn_scalar")
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool) or not scalar > 0:
            raise ConfigError(f"{source}: query_pre_attn_scalar must be a positive number, "
                              f"got {scalar!r:.80}")  # fmt: skip
        multiplier = float(scalar) ** -0.5
    caps: dict[str, float | None] = {}
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        cap = hf.get(key)
        if cap is not None and (
            not isinstance(cap, (int, float)) or isinstance(cap, bool) or not cap > 0
        ):
            raise ConfigError(f"{source}: {key} must be a positive number or null, "
                              f"got {cap!r:.80}")  # fmt: skip
        caps[key] = None if cap is None else float(cap)
    return {
        "sandwich_norms": version > 1,
        "norm_weight_offset": 1.0,
        "hidden_act": act,
        "local_rope_theta": hf["rope_local_base_freq"],
        "embedding_multiplier": hf["hidden_size"] ** 0.5,
        "round_embedding_multiplier": True,
        "attention_multiplier": multiplier,
        "final_logit_softcapping": caps["final_logit_softcapping"],
        "attn_logit_softcapping": caps["attn_logit_softcapping"] if version == 2 else None,
    }


def _rotary_dim(partial: Any, head_dim: int, source: str) -> int | None:
    """Dimensions RoPE turns per head for HF's `partial_rotary_factor` (int(head_dim *
    factor), as HF computes it); None for 1 (all of them)."""
    if not isinstance(partial, (int, float)) or isinstance(partial, bool) or not 0 < partial <= 1:
        raise ConfigError(f"{source}: partial_rotary_factor must be in (0, 1], got {partial!r}")
    dim = int(head_dim * partial)
    if dim == head_dim:
        return None
    if dim < 2 or dim % 2:
        raise ConfigError(
            f"{source}: partial_rotary_factor {partial} turns {dim} of head_dim {head_dim} "
            "dimensions; RoPE needs an even number, at least 2"
        )
    return dim


def _saved_dtype(hf: dict[str, Any]) -> str | None:
    """config.json's `torch_dtype` (transformers 5: `dtype`), as a SUPPORTED_DTYPES name; None
    when it names none (absent, 'auto', or a dtype the runtime does not compute in)."""
    name = hf.get("torch_dtype", hf.get("dtype"))
    if isinstance(name, str):
        name = name.removeprefix("torch.")
        name = {"half": "float16", "float": "float32", "bf16": "bfloat16"}.get(name, name)
    return name if name in SUPPORTED_DTYPES else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _parse_weight_quant(hf: dict[str, Any], source: str) -> WeightQuant | None:
    raw = hf.get("quantization_config")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: quantization_config must be an object, got {raw!r}")
    return WeightQuant.from_dict(raw, source)


SLIDING_LAYER_TYPES = {"sliding_attention": True, "full_attention": False}
"""transformers' `layer_types` this runtime reads: whether each is windowed."""


def _sliding_window(hf: dict[str, Any], source: str, archs: list[str]) -> dict[str, Any]:
    """`sliding_window` and `window_layers`, as transformers' classes read them: Mistral's
    window (4096 where its config names none) and Phi-3's on every layer; Ministral's (4096
    too) and Gemma 2 / 3's on the layers their `layer_types` name; Qwen2 / Qwen3's only with
    `use_sliding_window`, on the layers `layer_types` name or else those from
    `max_window_layers` on. The other architectures have none (their classes ignore the key),
    and Mistral's and Phi-3's ignore `layer_types`."""
    mistral = bool({"MistralForCausalLM", "MinistralForCausalLM"} & set(archs))
    qwen = bool({"Qwen2ForCausalLM", "Qwen3ForCausalLM"} & set(archs))
    gemma = bool({"Gemma2ForCausalLM", "Gemma3ForCausalLM"} & set(archs))
    window = hf.get("sliding_window", 4096 if mistral else None)
    if (
        window is None
        or not (mistral or qwen or gemma or "Phi3ForCausalLM" in archs)
        or (qwen and not hf.get("use_sliding_window", False))
    ):
        return {"sliding_window": None}
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConfigError(f"{source}: sliding_window must be a positive integer or null, "
                          f"got {window!r:.80}")  # fmt: skip
    layers = hf["num_hidden_layers"]
    kinds = hf.get("layer_types") if qwen or gemma or "MinistralForCausalLM" in archs else None
    if kinds is not None:
        if (
            not isinstance(kinds, list)
            or len(kinds) != layers
            or any(k not in SLIDING_LAYER_TYPES for k in kinds)
        ):
            raise ConfigError(
                f"{source}: layer_types must list one of {sorted(SLIDING_LAYER_TYPES)} per "
                f"layer ({layers}), got {kinds!r:.120}"
            )
        windowed = tuple(SLIDING_LAYER_TYPES[k] for k in kinds)
    elif qwen:
        first = hf.get("max_window_layers", 28)
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            raise ConfigError(f"{source}: max_window_layers must be an integer >= 0, "
                              f"got {first!r:.80}")  # fmt: skip
        windowed = tuple(i >= first for i in range(layers))
    else:
        return {"sliding_window": window}
    if not any(windowed):
        return {"sliding_window": None}
    return {"sliding_window": window, "window_layers": None if all(windowed) else windowed}


def _yarn_scaling(raw: dict[str, Any], source: str, max_pos: int) -> RopeScaling:
    """YaRN's parameters (HF's `rope_type: yarn`: Qwen2.5's long-context setting); the trained
    length is max_position_embeddings where the config names none, as in HF."""
    if "factor" not in raw:
        raise ConfigError(f"{source}: yarn rope_scaling needs its factor")

    def number(key: str) -> float | None:
        value = raw.get(key)
        return None if value is None else float(value)

    return RopeScaling(
        type="yarn",
        factor=float(raw["factor"]),
        original_max_position_embeddings=int(
            raw.get("original_max_position_embeddings") or max_pos
        ),
        beta_fast=number("beta_fast") or 32.0,
        beta_slow=number("beta_slow") or 1.0,
        attention_factor=number("attention_factor"),
        mscale=number("mscale"),
        mscale_all_dim=number("mscale_all_dim"),
        truncate=bool(raw.get("truncate", True)),
    )


def _longrope_scaling(
    raw: dict[str, Any], source: str, max_pos: int, original: Any, head_dim: int
) -> RopeScaling:
    """LongRoPE's parameters (Phi-3's `rope_type: longrope`, formerly `su`): both factor
    lists, of head_dim / 2 positive numbers; the trained length from rope_scaling or the
    config's top level (Phi-3 writes it there)."""
    lists = {}
    for key in ("short_factor", "long_factor"):
        value = raw.get(key)
        if not (
            isinstance(value, list)
            and len(value) == head_dim // 2
            and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in value
            )
        ):
            raise ConfigError(
                f"{source}: longrope rope_scaling needs {key} as a list of {head_dim // 2} "
                f"positive numbers (half the dimensions RoPE turns), got {value!r:.80}"
            )
        lists[key] = tuple(float(x) for x in value)
    trained = raw.get("original_max_position_embeddings") or original or max_pos
    if not (_is_int(trained) and trained > 0):
        raise ConfigError(
            f"{source}: original_max_position_embeddings must be a positive integer, got "
            f"{trained!r}"
        )
    factor = raw.get("factor")
    attention = raw.get("attention_factor")
    return RopeScaling(
        type="longrope",
        factor=float(factor) if factor is not None else max(1.0, max_pos / trained),
        original_max_position_embeddings=int(trained),
        attention_factor=None if attention is None else float(attention),
        short_factor=lists["short_factor"],
        long_factor=lists["long_factor"],
    )


def _rope_params(hf: dict[str, Any]) -> Any:
    """The checkpoint's RoPE scaling: transformers 5 writes it (with rope_theta) as
    `rope_parameters`, earlier versions as `rope_scaling`."""
    params = hf.get("rope_parameters")
    return params if params is not None else hf.get("rope_scaling")


def _rope_theta(hf: dict[str, Any], source: str) -> float:
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters must be an object, got {params!r:.80}")
    theta = (params or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    try:
        return float(theta)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: rope_theta must be a number, got {theta!r:.80}") from None


def _parse_rope_scaling(
    raw: Any,
    source: str,
    max_pos: int = 4096,
    *,
    phi3: bool = False,
    original: Any = None,
    head_dim: int = 0,
) -> RopeScaling | None:
    """`phi3`: Phi-3's config, whose `su` and `yarn` mean longrope (as HF reads them);
    `original`: the config's top-level original_max_position_embeddings."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: rope_scaling must be an object or null, got {raw!r}")
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "su" or (phi3 and kind == "yarn"):
        kind = "longrope"
    if kind == "longrope":
        return _longrope_scaling(raw, source, max_pos, original, head_dim)
    if kind == "yarn":
        return _yarn_scaling(raw, source, max_pos)
    if kind != "llama3":
        return RopeScaling(type=kind, factor=float(raw.get("factor", 1.0)))
    missing = [
        k
        for k in (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        )
        if k not in raw
    ]
    if missing:
        raise ConfigError(f"{source}: llama3 rope_scaling lacks {missing}")
    return RopeScaling(
        type=kind,
        factor=float(raw["factor"]),
        low_freq_factor=float(raw["low_freq_factor"]),
        high_freq_factor=float(raw["high_freq_factor"]),
        original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
    )


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """The device mesh: world = tp * cp, rank = cp_rank * tp + tp_rank."""

    tp: int = 1
    """Tensor-parallel size: heads and MLP sharded across this many devices."""
    cp: int = 1
    """Context-parallel size: the sequence sharded across this many tp groups."""

    def __post_init__(self) -> None:
        for name in ("tp", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"parallel.{name} must be an integer >= 1, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.cp

    def check_model(self, model: ModelConfig) -> None:
        """Raise before anything loads when tp cannot shard this model; the error lists every
        tp that shards all of it (heads, KV heads, MLP; the vocabulary is padded per rank)."""
        tp = self.tp
        problems = tp_problems(model, tp)
        if problems:
            said = problems[0] if len(problems) == 1 else ", ".join(problems[:-1])
            said += f" and {problems[-1]}" if len(problems) > 1 else ""
            raise ConfigError(
                f"tp={tp} cannot shard this model: it {said}; choose tp from "
                f"{valid_tp_sizes(model)}",
                key="parallel.tp",
            )


def tp_problems(model: ModelConfig, tp: int) -> list[str]:
    """Why `tp` cannot shard `model` (empty when it can)."""
    problems = []
    if model.num_heads % tp:
        problems.append(f"does not divide the {model.num_heads} attention heads")
    kvh = model.num_kv_heads
    if kvh % tp and tp % kvh:
        problems.append(f"neither divides the {kvh} KV heads nor is a multiple of them")
    if model.intermediate_size % tp:
        problems.append(f"does not divide the intermediate size {model.intermediate_size}")
    quant = model.weight_quant
    if quant is not None and quant.group_size != -1 and not problems:
        # Row-parallel layers (o, down) split their inputs: each rank must hold whole groups.
        group = quant.group_size
        for what, width in (
            ("attention output", model.num_heads * model.head_dim),
            ("MLP down projection", model.intermediate_size),
        ):
            if (width // tp) % group:
                problems.append(
                    f"splits the {width} inputs of the {what} into {width // tp} per rank, "
                    f"not whole {quant.method.upper()} groups of {group}"
                )
    return problems


def valid_tp_sizes(model: ModelConfig) -> list[int]:
    """Every tensor-parallel size that shards `model` (a tp beyond the attention heads never
    does)."""
    return [t for t in range(1, model.num_heads + 1) if not tp_problems(model, t)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """The paged KV cache on each worker."""

    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """Blocks per worker; None derives it from the memory budget below."""
    gpu_memory_utilization: float = 0.9
    """On CUDA: fraction of the device's memory the runtime may use (weights + KV + activations)."""
    cpu_kv_cache_gb: float | None = None
    """On CPU: GiB of host memory per worker for the KV cache when num_blocks is None. None:
    what one full session needs on a worker, at least 1 GiB and at most its share (of the
    runtime's workers on its node) of 90% of the memory the node has available at start. The
    memory is reserved, not written: the OS supplies its pages as blocks are first used."""
    enable_prefix_caching: bool = True
    """Share full KV blocks between sequences with the same token prefix."""
    host_kv_cache_gb: float = 0.0
    """GiB of host memory per worker for a second tier of the prefix cache: a cached block
    evicted from the device is copied there first, and a prompt whose prefix is found there
    copies it back instead of computing it again (0: off)."""
    kv_cache_dir: str | None = None
    """A directory for a disk tier of the prefix cache, kept across restarts: every full block
    computed is also written there (by each worker, its own heads), and a prompt whose prefix
    is found there reads it back instead of computing it. Files are kept per model, dtype and
    KV layout (a fingerprint of the weights' content among them), so one directory serves
    several models. Every worker must reach it (a local disk on one node; a shared file system
    across nodes). None: off."""
    disk_kv_cache_gb: float = 64.0
    """Most GiB the disk tier's files take (all workers together); the least recently used
    blocks are deleted past it."""
    quant_policy: int = 0
    """KV cache quantization (LMDeploy's quant_policy): 0 keeps K/V in the model's dtype; 8 and
    4 store them as 8- or 4-bit codes with a float32 scale and zero per token and KV head,
    quantized online as they are written (no calibration)."""

    def __post_init__(self) -> None:
        if self.quant_policy not in QUANT_POLICIES or isinstance(self.quant_policy, bool):
            raise ConfigError(
                f"cache.quant_policy must be one of {list(QUANT_POLICIES)} (0: no KV "
                f"quantization, 8: int8, 4: int4), got {self.quant_policy!r}"
            )
        if (
            not isinstance(self.block_size, int)
            or self.block_size < 1
            or (self.block_size & (self.block_size - 1))
        ):
            raise ConfigError(f"cache.block_size must be a power of two, got {self.block_size!r}")
        if self.num_blocks is not None and (not _is_int(self.num_blocks) or self.num_blocks < 1):
            raise ConfigError(
                f"cache.num_blocks must be a positive integer or null, got {self.num_blocks!r}"
            )
        if (
            not _is_number(self.gpu_memory_utilization)
            or not 0.0 < self.gpu_memory_utilization <= 1.0
        ):
            raise ConfigError(
                f"cache.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if not isinstance(self.enable_prefix_caching, bool):
            raise ConfigError(
                f"cache.enable_prefix_caching must be true or false, got "
                f"{self.enable_prefix_caching!r}"
            )
        if not _is_number(self.host_kv_cache_gb) or not 0 <= self.host_kv_cache_gb < float("inf"):
            raise ConfigError(
                f"cache.host_kv_cache_gb must be a number of GiB >= 0 (0: no host tier), got "
                f"{self.host_kv_cache_gb!r}"
            )
        if self.host_kv_cache_gb and not self.enable_prefix_caching:
            raise ConfigError(
                f"cache.host_kv_cache_gb ({self.host_kv_cache_gb}) keeps prefix-cache blocks in "
                "host memory, and enable_prefix_caching is false: turn prefix caching on or "
                "leave the host tier at 0"
            )
        if self.kv_cache_dir is not None:
            if not isinstance(self.kv_cache_dir, str) or not self.kv_cache_dir:
                raise ConfigError(
                    f"cache.kv_cache_dir must be a directory path or null, got "
                    f"{self.kv_cache_dir!r}"
                )
            if not self.enable_prefix_caching:
                raise ConfigError(
                    f"cache.kv_cache_dir ({self.kv_cache_dir}) keeps prefix-cache blocks on "
                    "disk, and enable_prefix_caching is false: turn prefix caching on or leave "
                    "the directory out"
                )
        if not _is_number(self.disk_kv_cache_gb) or not 0 < self.disk_kv_cache_gb < float("inf"):
            raise ConfigError(
                f"cache.disk_kv_cache_gb must be a number of GiB > 0, got {self.disk_kv_cache_gb!r}"
            )
        if self.cpu_kv_cache_gb is not None and (
            not _is_number(self.cpu_kv_cache_gb) or not 0 < self.cpu_kv_cache_gb < float("inf")
        ):
            raise ConfigError(
                f"cache.cpu_kv_cache_gb must be a number of GiB > 0 (or left out: one full "
                f"session's), got {self.cpu_kv_cache_gb!r}"
            )


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Batching limits per step."""

    max_num_seqs: int = 64
    """Sequences running at once."""
    max_num_batched_tokens: int = 8192
    """Token budget of one step per cp rank (a step computes up to cp times this many tokens):
    decodes first, then prefill chunks."""
    num_speculative_tokens: int = 0
    """Speculative decoding by prompt lookup (n-gram drafts, vLLM's `ngram` method): a decoding
    sequence whose last tokens appeared earlier in its prompt or output proposes up to this many
    of the tokens that followed them, and one step checks them all; 0: off."""
    prompt_lookup_max: int = 4
    """Longest n-gram matched against the sequence's earlier tokens (the longest match wins)."""
    prompt_lookup_min: int = 2
    """Shortest n-gram that may propose a draft."""
    draft_policy: str = "adaptive"
    """adaptive: a draft's length follows the measured cost of a row and the sequence's share
    of kept draft tokens (`dist_runtime.engine.speculative.PromptLookup`); fixed: every draft
    as long as the lookup finds, up to num_speculative_tokens (vLLM's ngram)."""
    priority_aging_s: float = 600.0
    """A request moves one priority level ahead for every this many seconds since it arrived,
    so less important work (batches, queued jobs) is not starved by a steady stream of more
    important requests; 0: never (strict priority)."""
    fair_share: bool = True
    """Among requests of one priority, a free slot goes to the tenant (API key, job
    submitter) that has received the least service so far, not to the oldest request
    (`dist_runtime.engine.scheduler`); false: first come, first served."""

    def __post_init__(self) -> None:
        if not isinstance(self.fair_share, bool):
            raise ConfigError(
                f"scheduler.fair_share must be true or false, got {self.fair_share!r}"
            )
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"scheduler.{name} must be a positive integer, got {value!r}")
        k = self.num_speculative_tokens
        if not _is_int(k) or not 0 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(
                f"scheduler.num_speculative_tokens must be an integer in [0, "
                f"{MAX_SPECULATIVE_TOKENS}] (0: no speculative decoding), got {k!r}"
            )
        aging = self.priority_aging_s
        if not isinstance(aging, (int, float)) or isinstance(aging, bool) or not aging >= 0:
            raise ConfigError(
                f"scheduler.priority_aging_s must be a number of seconds >= 0 (0: no aging), "
                f"got {aging!r}"
            )
        if self.draft_policy not in ("adaptive", "fixed"):
            raise ConfigError(
                f"scheduler.draft_policy must be adaptive or fixed, got {self.draft_policy!r}"
            )
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not (_is_int(lo) and _is_int(hi) and 1 <= lo <= hi):
            raise ConfigError(
                f"scheduler.prompt_lookup_min ({lo!r}) and scheduler.prompt_lookup_max ({hi!r}) "
                "must be integers with 1 <= min <= max"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"scheduler.max_num_batched_tokens ({self.max_num_batched_tokens}) must be at "
                f"least max_num_seqs ({self.max_num_seqs}) so every running sequence can decode"
            )


def auto_dtype(device: str, model: ModelConfig | None) -> str:
    """`dtype: auto` on `device`: float32 on CPU (its matmuls are fastest there); on CUDA the
    checkpoint's saved half type, so a float16 model is not rounded to bfloat16's shorter
    mantissa, and bfloat16 for float32 or unnamed checkpoints (as vLLM does)."""
    if device != "cuda":
        return "float32"
    saved = model.torch_dtype if model is not None else None
    return saved if saved in ("float16", "bfloat16") else "bfloat16"


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Everything a Runtime needs; the YAML file's top level."""

    model: str
    """Path to a Hugging Face checkpoint folder (config.json + *.safetensors)."""
    dtype: str = "auto"
    """Weight/activation dtype: float32, float16, bfloat16, or auto: on CUDA the checkpoint's
    own half type (config.json's torch_dtype, float16 or bfloat16; bfloat16 for a float32 or
    unnamed one), on CPU float32."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    session_len: int = 4096
    """Longest prompt + generated tokens of one sequence."""
    executor: str = "auto"
    """ray, inprocess, or auto (in-process when tp*cp == 1)."""
    load_format: str = "safetensors"
    """safetensors (read the checkpoint), or dummy: random weights from config.json alone, for
    performance work on shape-only model folders."""
    seed: int = 0
    """Seed for sequences that give none."""
    ray_address: str | None = None
    """Address of an existing Ray cluster ('auto'), or None to start a local one."""
    master_addr: str = "127.0.0.1"
    """Address the workers' rendezvous store listens on: loopback on one node; set the head
    node's interface address for a multi-node cluster."""
    step_timeout_s: float = 600.0
    """Seconds a step may take on the workers before it is declared hung."""
    init_timeout_s: float = 300.0
    """Seconds for workers to start and load weights."""
    collective_timeout_s: float = 300.0
    """Seconds one collective (all-reduce, ring exchange, all-to-all) waits for its peers before
    it fails; a failed collective fails the step and the worker group is rebuilt."""
    enforce_eager: bool = False
    """Never replay decode steps from CUDA graphs (captured by default on CUDA with cp=1)."""
    require_ray_auth: bool = False
    """Refuse to start on a Ray cluster whose token authentication is off (RAY_AUTH_MODE is not
    'token'); by default that only logs a warning."""
    monitor_interval_s: float = 2.0
    """Seconds between the driver's liveness pings of its Ray workers."""
    max_job_attempts: int = 3
    """Runs of a job before a worker failure marks it failed (1: never retried)."""
    request_retries: int = 1
    """Failed steps a request goes on through (a worker died or hung, or the step raised):
    it computes its prompt and the tokens it had again (as after a preemption, on a new worker
    group after a worker failure) and carries on, its stream unbroken and its tokens those of
    a run without the failure. A failure is counted against every request of its step, or,
    when the step ran a suspect of an earlier failure, against that one only (suspects run one
    at a time until each passes the point where it failed). A request counted more times than
    this fails (a worker failure with `WorkerError`), so one that kills its workers does not go
    on killing them and the requests beside it go on; 0: every request of a failed step fails."""
    job_dir: str | None = None
    """Directory of the durable job queue (SQLite); None: a temporary one per Runtime."""
    allow_rope_extrapolation: bool = False
    """Run sessions past the positions the model's RoPE supports with plain RoPE (no scaling):
    quality falls past the trained length; for evaluations that show where (launch/needle.py)."""
    rope_scaling_factor: float | None = None
    """Dynamic-NTK factor to use instead of the checkpoint's rope_scaling (as LMDeploy's
    --rope-scaling-factor): lets a model without RoPE scaling run past its trained length."""
    chat_template: str | None = None
    """A Jinja chat template used instead of the model's (vLLM's `--chat-template`): the path
    of a file holding it, or its text. For a checkpoint that ships none (a base model) or one
    that should be prompted otherwise."""
    lora_modules: dict[str, str] = field(default_factory=dict)
    """LoRA adapters to serve beside the base model, name -> PEFT folder (`--lora-modules`);
    a request picks one by name (`SamplingParams.adapter`, the server's `model`)."""
    max_loras: int | None = None
    """Adapter slots each worker reserves (`--max-loras`): set, adapters can also be loaded and
    unloaded while the runtime runs (`Runtime.load_adapter`), and more adapters than slots may
    be registered: one is loaded into a slot when a request of it is admitted (in place of the
    least recently used adapter no running request uses); None: exactly `lora_modules`, all
    resident, fixed at start."""
    max_cpu_loras: int | None = None
    """Adapters whose shards each worker keeps in host memory (`--max-cpu-loras`, vLLM's name),
    so an adapter loaded into a slot again is copied, not read from its folder; None: twice
    max_loras (with max_loras set; else none)."""
    max_lora_rank: int | None = None
    """Largest rank an adapter loaded into a reserved slot may have (`--max-lora-rank`); with
    max_loras set, None means 16 (or the largest rank of `lora_modules`)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model must be a path to a checkpoint folder")
        if self.dtype not in (*SUPPORTED_DTYPES, "auto"):
            raise ConfigError(
                f"dtype {self.dtype!r} is not supported; use one of {[*SUPPORTED_DTYPES, 'auto']}"
            )
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device {self.device!r} is not supported; use cpu, cuda or auto")
        if self.executor not in ("ray", "inprocess", "auto"):
            raise ConfigError(
                f"executor {self.executor!r} is not supported; use ray, inprocess or auto"
            )
        if self.load_format not in ("safetensors", "dummy"):
            raise ConfigError(
                f"load_format {self.load_format!r} is not supported; use safetensors or dummy"
            )
        if self.executor == "inprocess" and self.parallel.world_size != 1:
            raise ConfigError(
                f"executor=inprocess runs one worker, but tp*cp = {self.parallel.world_size}; "
                "use executor=ray (or auto) for more than one device"
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("job_dir", "ray_address"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{name} must be a non-empty string or unset, got {value!r}")
        if not isinstance(self.master_addr, str) or not self.master_addr:
            raise ConfigError(
                f"master_addr must be a host name or IP address, got {self.master_addr!r}"
            )
        if not _is_int(self.session_len) or self.session_len < 2:
            raise ConfigError(f"session_len must be an integer >= 2, got {self.session_len!r}")
        if not _is_int(self.max_job_attempts) or self.max_job_attempts < 1:
            raise ConfigError(
                f"max_job_attempts must be an integer >= 1, got {self.max_job_attempts!r}"
            )
        if not _is_int(self.request_retries) or self.request_retries < 0:
            raise ConfigError(
                f"request_retries must be an integer >= 0, got {self.request_retries!r}"
            )
        for name in (
            "step_timeout_s",
            "init_timeout_s",
            "collective_timeout_s",
            "monitor_interval_s",
        ):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ConfigError(f"enforce_eager must be true or false, got {self.enforce_eager!r}")
        if not isinstance(self.allow_rope_extrapolation, bool):
            raise ConfigError(
                "allow_rope_extrapolation must be true or false, got "
                f"{self.allow_rope_extrapolation!r}"
            )
        if not isinstance(self.require_ray_auth, bool):
            raise ConfigError(
                f"require_ray_auth must be true or false, got {self.require_ray_auth!r}"
            )
        factor = self.rope_scaling_factor
        if factor is not None and (not _is_number(factor) or not factor >= 1.0):
            raise ConfigError(f"rope_scaling_factor must be a number >= 1, got {factor!r}")
        check_chat_template(self.chat_template)
        check_lora_modules(self.lora_modules)
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 1 <= value <= 1024):
                raise ConfigError(f"{name} must be an integer in [1, 1024] or unset, got {value!r}")
        if self.max_cpu_loras is not None and self.max_loras is None:
            raise ConfigError(
                "max_cpu_loras keeps adapters for the slots of max_loras; set max_loras too (or "
                "leave max_cpu_loras out)",
                key="max_cpu_loras",
            )
        if self.max_lora_rank is not None and self.max_loras is None:
            raise ConfigError(
                "max_lora_rank sizes the slots of max_loras; set max_loras too (or leave "
                "max_lora_rank out)",
                key="max_lora_rank",
            )
        for name, cls in (
            ("parallel", ParallelConfig),
            ("cache", CacheConfig),
            ("scheduler", SchedulerConfig),
        ):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(
                    f"{name} must be a {cls.__name__} (or a mapping in YAML / from_dict), got "
                    f"{getattr(self, name)!r:.80}"
                )

    def load_model_config(self) -> ModelConfig:
        """The checkpoint's config.json with this runtime's RoPE override applied."""
        return self.with_rope_override(ModelConfig.from_pretrained(self.model))

    def with_rope_override(self, model: ModelConfig) -> ModelConfig:
        """`model` with rope_scaling_factor (if set) as its dynamic-NTK scaling."""
        if self.rope_scaling_factor is not None:
            own = model.rope_scaling
            if own is not None and own.type in ("llama3", "yarn", "longrope"):
                raise ConfigError(
                    "rope_scaling_factor (--rope-scaling-factor) sets dynamic NTK scaling, "
                    f"which would replace this checkpoint's {own.type} rope_scaling (it runs "
                    f"to {model.max_rope_len()} positions with it); leave it out",
                    key="rope_scaling_factor",
                )
            scaling = RopeScaling(type="dynamic", factor=float(self.rope_scaling_factor))
            model = dataclasses.replace(model, rope_scaling=scaling)
        return model

    def check_session_len(self, model: ModelConfig) -> None:
        """Refuse, before any work, a session longer than the model's RoPE supports."""
        limit = model.max_rope_len()
        if limit is not None and self.session_len > limit and not self.allow_rope_extrapolation:
            scaling = model.rope_scaling
            how = "no rope_scaling" if scaling is None else f"linear rope_scaling x{scaling.factor}"
            need = self.session_len / model.max_position_embeddings
            raise ConfigError(
                f"session_len {self.session_len} is over the {limit} tokens this model's RoPE "
                f"supports (max_position_embeddings {model.max_position_embeddings}, {how}); "
                f"shorten session_len to {limit}, or set rope_scaling_factor (--rope-scaling-"
                f"factor) to enable dynamic NTK scaling, e.g. {max(2.0, round(need, 1))}",
                key="session_len",
            )

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self, model: ModelConfig | None = None) -> str:
        """The dtype workers compute in; `model` (the checkpoint's config) settles `auto` on
        CUDA by its saved dtype (without it: bfloat16)."""
        if self.dtype != "auto":
            return self.dtype
        return auto_dtype(self.resolved_device(), model)

    def resolved_executor(self) -> str:
        if self.executor != "auto":
            return self.executor
        return "inprocess" if self.parallel.world_size == 1 else "ray"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> RuntimeConfig:
        nested = {"parallel": ParallelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}; known keys: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        try:
            for key, value in raw.items():
                if key in nested:
                    kwargs[key] = build_section(nested[key], value, f"{source}: {key}")
                else:
                    kwargs[key] = value
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from e
        except ConfigError as e:  # a value's own check: say where the value came from
            if str(e).startswith(f"{source}:"):
                raise
            raise ConfigError(f"{source}: {e}", key=e.key) from e

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike[str], overrides: dict[str, Any] | None = None
    ) -> RuntimeConfig:
        """Read a YAML file and apply overrides: `{"session_len": 8192, "parallel.tp": 2}`."""
        return cls.from_dict(merge_overrides(read_yaml(path), overrides or {}), source=str(path))


ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
"""A LoRA adapter's name (`RuntimeConfig.lora_modules`): what requests and the server's `model`
field pick it by."""


def check_chat_template(value: Any) -> None:
    """RuntimeConfig.chat_template: unset, a file, or a Jinja template's text."""
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"chat_template must be a file's path or a Jinja template's text, got {value!r:.80}"
        )
    if "{{" in value or "{%" in value:
        return
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"chat_template {value!r:.200} is neither a file nor a Jinja template (no '{{{{' "
            "or '{%'); give the path of a .jinja file or the template's text"
        )


def read_chat_template(value: str) -> str:
    """The template text of a checked `chat_template` value (a file is read)."""
    if "{{" in value or "{%" in value:
        return value
    return Path(value).expanduser().read_text(encoding="utf-8")


def check_lora_modules(value: Any) -> None:
    """RuntimeConfig.lora_modules: a mapping of adapter names to folders."""
    if not isinstance(value, dict):
        raise ConfigError(
            f"lora_modules must be a mapping of adapter names to folders, got {value!r:.80}",
            key="lora_modules",
        )
    for name, path in value.items():
        if not isinstance(name, str) or not ADAPTER_NAME.match(name):
            raise ConfigError(
                f"lora_modules: adapter name {name!r} must be 1-128 letters, digits or ._:/@+- "
                "(starting with a letter or digit)",
                key="lora_modules",
            )
        if not isinstance(path, str) or not path:
            raise ConfigError(
                f"lora_modules: adapter {name!r} needs a folder path, got {path!r}",
                key="lora_modules",
            )


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML config file's top-level mapping, with errors that name the file."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file {str(path)!r} does not exist") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return raw


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


RENAMED_KEYS = {"cpu_kv_cache_bytes": "cpu_kv_cache_gb (GiB; left out, one full session's)"}
"""Section keys that were renamed, with what replaced them (named when an old one is given)."""


def build_section(cls: type, value: Any, source: str) -> Any:
    """A nested config section from a mapping (or the section object itself)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{source} must be a mapping, got {value!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        renamed = "".join(
            f"; {key} is now {RENAMED_KEYS[key]}" for key in unknown if key in RENAMED_KEYS
        )
        raise ConfigError(f"{source}: unknown keys {unknown}{renamed}; known keys: {sorted(known)}")
    try:
        return cls(**value)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from e


def merge_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted-key overrides (`parallel.tp`) on top of a raw config mapping."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        if section:
            merged.setdefault(section, {})
            merged[section][name] = value
        else:
            merged[key] = value
    return merged
