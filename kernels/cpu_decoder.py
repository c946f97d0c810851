"""A CPU decode step's decoder layers in one native call (`csrc/cpu_decoder.c`).

Layer by layer, a decode step calls nine native kernels per layer from Python, and around each
call go its argument checks, output allocations, views and module dispatch: on the demo model
(30 layers) that glue measured about as long as the kernels' own work at batch 1. `CpuDecoder`
takes the weights' and the caches' addresses once, allocates a step's buffers in one tensor,
and runs every layer's kernels from C in the layer path's order on the same inputs, so it
returns the same hidden states bit for bit (a batch over a shared cached prefix merges its two
attention partials in C, which agrees with the torch merge to float rounding).

Under tensor parallelism the step is run in stages with the caller's all-reduce between them
(`reduce`): stage 2l is layer l's attention half ending with its o_proj partial sums, stage
2l + 1 its MLP half ending with down_proj's, the last one the final norm. With tp = 1 one call
runs them all.

Which models it serves (`workers/models/native_decode.py` decides): float32 on CPU with every
linear layer on the native panel kernel, the native norm / activation and attention kernels
chosen, a head_dim that is a multiple of 16 (up to 256), and no cp. Gemma 2 / 3's parts run
in it too: the norms of each half's output (the next stage's first step, so that under tensor
parallelism they norm the reduced sum), GELU's tanh form, the score soft-cap, and the
sliding-window layers' own RoPE base (a second pair of tables per step).
`DIST_RUNTIME_CPU_DECODE=layers` runs decode steps layer by layer instead (`fused`, the
default, uses this).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import native
from kernels.cpu_attention import MAX_HEAD_DIM, scratch_floats, split_plan, window_keys
from kernels.cpu_gemm import NativeLinearWeight
from kernels.native import run_profiled
from kernels.paged_attention import MIN_SHARED_BLOCKS, shared_blocks
from kernels.position_attention import check_softcap
from kernels.silu_and_mul import ACTIVATIONS

PROFILE_NAME = "cpu_decoder::stages"
"""What a torch.profiler trace calls the native decoder's calls (recorded only while one runs)."""

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class _Decoder(ctypes.Structure):
    _fields_ = [
        *((name, _i64) for name in ("num_layers", "hidden", "q_heads", "kv_heads", "head_dim")),
        ("inter", _i64),
        *((name, _i64) for name in ("block_size", "kc_block", "kc_slot", "kc_head")),
        *((name, _i64) for name in ("kp_block", "kp_slot", "kp_head", "bits")),
        ("eps", _f32),
        ("scale", _f32),
        ("final_norm", _ptr),
        ("act", _i64),
        ("softcap", _f32),
    ]


LAYER_FIELDS = (
    "input_norm",
    "post_norm",
    "qkv",
    "qkv_bias",
    "o",
    "o_bias",
    "gate_up",
    "gate_up_bias",
    "down",
    "down_bias",
    "k_cache",
    "v_cache",
    "k_params",
    "v_params",
    "q_norm",
    "k_norm",
)


LORA_LINEARS = ("qkv", "o", "gate_up", "down")
"""The order of a layer's LoRA stacks in `_Layer.lora_a` / `lora_b` / `lora_rank`."""


class _Layer(ctypes.Structure):
    _fields_ = [
        *((name, _ptr) for name in LAYER_FIELDS),
        ("lora_a", _ptr * 4),
        ("lora_b", _ptr * 4),
        ("lora_rank", _i64 * 4),
        ("attn_out_norm", _ptr),
        ("mlp_out_norm", _ptr),
        ("local_rope", _i64),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        ("tokens", _i64),
        ("num_threads", _i64),
        *((name, _ptr) for name in ("cos", "sin", "slots", "block_tables")),
        ("bt_int64", _i64),
        ("bt_stride", _i64),
        ("context_lens", _ptr),
        ("splits", _i64),
        ("per", _i64),
        ("shared_blocks", _i64),
        ("prefix_len", _ptr),
        ("tail_lens", _ptr),
        ("prefix_splits", _i64),
        ("prefix_per", _i64),
        ("windows", _ptr),
        *((name, _ptr) for name in ("x", "residual", "h", "qkv", "attn", "gate_up", "act", "work")),
        *((name, _ptr) for name in ("tail_out", "tail_lse", "prefix_lse")),
        ("lora_slots", _ptr),
        ("lora_h", _ptr),
        ("local_cos", _ptr),
        ("local_sin", _ptr),
    ]


@functools.cache
def _stages_fn() -> Callable[..., int] | None:
    """`dr_decoder_stages`, typed; None when the library cannot be built."""
    lib = native.library()
    if lib is None:
        return None
    fn = lib.dr_decoder_stages
    fn.argtypes = [
        ctypes.POINTER(_Decoder),
        ctypes.POINTER(_Layer),
        ctypes.POINTER(_Step),
        _i64,
        _i64,
    ]
    fn.restype = ctypes.c_int
    return fn


def available() -> bool:
    return _stages_fn() is not None


@dataclass(frozen=True)
class LayerTensors:
    """One decoder layer as the native step reads it (this rank's shard)."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: NativeLinearWeight
    qkv_bias: torch.Tensor | None
    o: NativeLinearWeight
    o_bias: torch.Tensor | None
    gate_up: NativeLinearWeight
    gate_up_bias: torch.Tensor | None
    down: NativeLinearWeight
    down_bias: torch.Tensor | None
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_params: torch.Tensor | None = None
    v_params: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    """Qwen3's RMSNorm weights (head_dim,) of every q head, before RoPE (None: no norm)."""
    k_norm: torch.Tensor | None = None
    """The same for every k head (given with q_norm or not at all)."""
    attn_out_norm: torch.Tensor | None = None
    """Gemma's RMSNorm weights (hidden,) of the attention's output, before the residual add
    (None: no norm)."""
    mlp_out_norm: torch.Tensor | None = None
    """The same for the MLP's output (given with attn_out_norm or not at all)."""
    local_rope: bool = False
    """RoPE turns this layer by the step's local tables (Gemma 3's sliding-window layers)."""


LoraStacks = tuple[torch.Tensor, torch.Tensor] | None
"""One linear layer's LoRA stacks, A (slots, rank, in) and B by rows (slots, rank, out), float32
(the scale folded into B, slot 0 zeros), or None where no adapter touches it."""


@dataclass(frozen=True)
class LoraStep:
    """A decode step's adapters: each sequence's slot (0: the base model) and, per layer, the
    stacks of its qkv, o, gate_up and down layers (`LORA_LINEARS`)."""

    slots: torch.Tensor
    layers: list[tuple[LoraStacks, LoraStacks, LoraStacks, LoraStacks]]


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuDecoder:
    """The decoder layers of one rank, ready for native decode steps (see the module doc).

    Holds every tensor it points at, so they outlive it; a model whose weights are reloaded or
    whose caches are reallocated builds a new one."""

    def __init__(
        self,
        layers: list[LayerTensors],
        final_norm: torch.Tensor,
        *,
        q_heads: int,
        kv_heads: int,
        head_dim: int,
        eps: float,
        bits: int = 0,
        scale: float | None = None,
        windows: list[int] | None = None,
        act: str = "silu",
        softcap: float = 0.0,
    ):
        """`scale`: the attention's softmax scale (None: 1 / sqrt(head_dim)); `windows`: each
        layer's sliding window, 0 for none (None: no layer has one); `act`: the MLP's gate
        activation (`kernels.silu_and_mul.ACTIVATIONS`); `softcap`: the attention scores'
        soft-cap (Gemma 2's, 0: none)."""
        fn = _stages_fn()
        if fn is None:
            raise RuntimeError("the native CPU kernels are not built (see the log)")
        if not layers:
            raise ValueError("a decoder needs at least one layer")
        windows = [0] * len(layers) if windows is None else list(windows)
        if len(windows) != len(layers) or any(w < 0 for w in windows):
            raise ValueError(
                f"windows {windows}: one per layer ({len(layers)}), each 0 (none) or positive"
            )
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r} is not one of {sorted(ACTIVATIONS)}")
        check_softcap(softcap)
        if head_dim % 16 or head_dim > MAX_HEAD_DIM or q_heads % kv_heads:
            raise ValueError(
                f"head_dim {head_dim} (a multiple of 16 up to {MAX_HEAD_DIM}) or heads "
                f"{q_heads} / {kv_heads} not taken"
            )
        first = layers[0]
        hidden = first.qkv.in_features
        q_size, kv_size = q_heads * head_dim, kv_heads * head_dim
        inter = first.down.in_features
        k0 = first.k_cache
        _, block_size, cache_heads, _ = k0.shape
        for i, t in enumerate(layers):
            shapes = (
                (t.qkv.in_features, t.qkv.out_features),
                (t.o.in_features, t.o.out_features),
                (t.gate_up.in_features, t.gate_up.out_features),
                (t.down.in_features, t.down.out_features),
            )
            want = (
                (hidden, q_size + 2 * kv_size),
                (q_size, hidden),
                (hidden, 2 * inter),
                (inter, hidden),
            )
            if shapes != want:
                raise ValueError(f"layer {i}: linear (in, out) {shapes}, expected {want}")
            for name in ("input_norm", "post_norm"):
                w = getattr(t, name)
                if w.dtype != torch.float32 or w.shape != (hidden,) or not w.is_contiguous():
                    raise ValueError(f"layer {i}: {name} must be float32 ({hidden},) contiguous")
            if (t.q_norm is None) != (t.k_norm is None):
                raise ValueError(f"layer {i}: q_norm and k_norm come together")
            if (t.attn_out_norm is None) != (t.mlp_out_norm is None):
                raise ValueError(f"layer {i}: attn_out_norm and mlp_out_norm come together")
            for name in ("attn_out_norm", "mlp_out_norm"):
                w = getattr(t, name)
                if w is not None and (
                    w.dtype != torch.float32 or w.shape != (hidden,) or not w.is_contiguous()
                ):
                    raise ValueError(f"layer {i}: {name} must be float32 ({hidden},) contiguous")
            for name in ("q_norm", "k_norm"):
                w = getattr(t, name)
                if w is not None and (
                    w.dtype != torch.float32 or w.shape != (head_dim,) or not w.is_contiguous()
                ):
                    raise ValueError(f"layer {i}: {name} must be float32 ({head_dim},) contiguous")
            for name, size in (
                ("qkv_bias", q_size + 2 * kv_size),
                ("o_bias", hidden),
                ("gate_up_bias", 2 * inter),
                ("down_bias", hidden),
            ):
                b = getattr(t, name)
                if b is not None and (b.dtype != torch.float32 or b.shape != (size,)):
                    raise ValueError(f"layer {i}: {name} must be float32 ({size},)")
            if (
                t.k_cache.shape != k0.shape
                or t.v_cache.shape != k0.shape
                or t.k_cache.stride() != k0.stride()
                or t.v_cache.stride() != k0.stride()
                or k0.stride(-1) != 1
            ):
                raise ValueError(f"layer {i}: caches differ from layer 0's in shape or strides")
        if cache_heads != kv_heads:
            raise ValueError(f"caches hold {cache_heads} kv heads, the layers {kv_heads}")
        if bits:
            if bits not in (4, 8) or any(t.k_params is None or t.v_params is None for t in layers):
                raise ValueError(f"bits {bits}: int8 / int4 caches need their (scale, zero)")
            p0 = first.k_params
            assert p0 is not None
            kp = p0.stride()[:3]
        else:
            if k0.dtype != torch.float32:
                raise ValueError(f"a float cache must be float32 here, got {k0.dtype}")
            kp = (0, 0, 0)
        final_norm = final_norm.contiguous()  # held below: the decoder points at it
        self._tensors = (layers, final_norm)
        self._fn = fn
        self.num_layers = len(layers)
        self.hidden, self.q_size, self.kv_size, self.inter = hidden, q_size, kv_size, inter
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.block_size = block_size
        self.windows = tuple(windows)
        self.local_rope = any(t.local_rope for t in layers)
        self.decoder = _Decoder(
            len(layers),
            hidden,
            q_heads,
            kv_heads,
            head_dim,
            inter,
            block_size,
            *k0.stride()[:3],
            *kp,
            bits,
            eps,
            head_dim**-0.5 if scale is None else scale,
            final_norm.data_ptr(),
            ACTIVATIONS[act],
            softcap,
        )
        self.layers = (_Layer * len(layers))()
        for i, t in enumerate(layers):
            self.layers[i] = _Layer(
                *(
                    _addr(w.panels if isinstance(w, NativeLinearWeight) else w)
                    for w in (getattr(t, name) for name in LAYER_FIELDS)
                )
            )
            layer = self.layers[i]
            layer.attn_out_norm, layer.mlp_out_norm = _addr(t.attn_out_norm), _addr(t.mlp_out_norm)
            layer.local_rope = int(t.local_rope)
        self._decoder_ref = ctypes.byref(self.decoder)

    def run(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        lora: LoraStep | None = None,
        local: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The final hidden states (tokens, hidden) of one decode step.

        x: (tokens, hidden) float32 embeddings, one token per sequence (used as a buffer);
        cos, sin: (tokens, head_dim) worth of RoPE tables; slot_mapping (tokens,) int64;
        block_tables (tokens, max_blocks) int32 / int64; context_lens (tokens,) int64.
        reduce: the tp all-reduce, in place, between stages (None: tp = 1).
        lora: the sequences' LoRA adapters (None: none).
        local: (cos, sin) of the layers whose RoPE has its own base (`LayerTensors.local_rope`),
        shaped as cos; needed when any layer has it.
        """
        tokens = x.shape[0]
        if (
            x.shape != (tokens, self.hidden)
            or x.dtype != torch.float32
            or not x.is_contiguous()
            or block_tables.shape[0] != tokens
            or context_lens.shape != (tokens,)
            or slot_mapping.shape != (tokens,)
            or cos.numel() != tokens * self.head_dim
            or sin.shape != cos.shape
            or block_tables.dtype not in (torch.int32, torch.int64)
            or block_tables.stride(-1) != 1
        ):
            raise ValueError(
                f"x {tuple(x.shape)} {x.dtype}, block_tables {tuple(block_tables.shape)} "
                f"{block_tables.dtype}, context_lens {tuple(context_lens.shape)}, slots "
                f"{tuple(slot_mapping.shape)} and cos {tuple(cos.shape)} do not describe a "
                f"decode step of {tokens} sequences"
            )
        if self.local_rope and (
            local is None or local[0].shape != cos.shape or local[1].shape != cos.shape
        ):
            got = None if local is None else [tuple(t.shape) for t in local]
            raise ValueError(
                f"layers with their own RoPE base need local (cos, sin) shaped as cos "
                f"{tuple(cos.shape)}, got {got}"
            )
        if tokens == 0:
            return x
        lora_slots, rank = None, 0
        if lora is not None:
            lora_slots, rank = self._set_lora(lora, tokens)
        threads = torch.get_num_threads()
        bs = self.block_size
        lens = context_lens.to(torch.int64).contiguous()
        keys = int(lens.max())
        heads = (self.kv_heads, self.q_heads // self.kv_heads)
        windows, window_splits = self._window_plans(tokens, keys, threads)
        shared = shared_blocks(block_tables, lens, bs) if tokens > 1 else 0
        if shared < MIN_SHARED_BLOCKS or (windows is not None and bool(windows[::3].all())):
            shared = 0  # (no prefix, or every layer attends within its window)
        prefix_splits = prefix_per = 0
        if shared:  # the prefix: one table row, every sequence's query a row over it
            prefix_splits, prefix_per = split_plan(1, shared, threads)
            keys -= shared * bs
        splits, per = split_plan(tokens, -(-keys // bs), threads)
        work = max(
            scratch_floats(1, tokens, *heads, prefix_splits, self.head_dim),
            scratch_floats(tokens, 1, *heads, max(splits, window_splits), self.head_dim),
        )
        sizes = [
            tokens * self.hidden,  # residual
            tokens * self.hidden,  # h
            tokens * (self.q_size + 2 * self.kv_size),  # qkv
            tokens * self.q_size,  # attn
            tokens * 2 * self.inter,  # gate_up
            tokens * self.inter,  # act
            work,
        ]
        merge = [tokens * self.q_size, tokens * self.q_heads, tokens * self.q_heads]
        sizes += merge if shared else [0, 0, 0]
        sizes.append(tokens * rank)  # lora_h
        buf = torch.empty(sum(sizes), dtype=torch.float32)
        base, addrs = buf.data_ptr(), []
        for i, n in enumerate(sizes):
            addrs.append(base if n or i < 7 else None)  # (no merge or LoRA buffers: NULL)
            base += 4 * n
        cos = cos.to(torch.float32).contiguous()
        sin = sin.to(torch.float32).contiguous()
        slots = slot_mapping.to(torch.int64).contiguous()
        local_cos = local_sin = None
        if self.local_rope and local is not None:
            local_cos = local[0].to(torch.float32).contiguous()
            local_sin = local[1].to(torch.float32).contiguous()
        prefix = tail = None
        if shared:
            prefix = torch.tensor([shared * bs], dtype=torch.int64)
            tail = lens - shared * bs
        step = _Step(
            tokens,
            threads,
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            block_tables.data_ptr(),
            int(block_tables.dtype == torch.int64),
            block_tables.stride(0),
            lens.data_ptr(),
            splits,
            per,
            shared,
            _addr(prefix),
            _addr(tail),
            prefix_splits,
            prefix_per,
            _addr(windows),
            x.data_ptr(),
            *addrs[:10],
            _addr(lora_slots),
            addrs[10],
            _addr(local_cos),
            _addr(local_sin),
        )
        stages = 2 * self.num_layers + 1
        step_ref = ctypes.byref(step)
        if reduce is None:
            self._check(
                run_profiled(
                    self._fn, PROFILE_NAME, (self._decoder_ref, self.layers, step_ref, 0, stages)
                )
            )
        else:
            for stage in range(stages):
                self._check(
                    run_profiled(
                        self._fn,
                        PROFILE_NAME,
                        (self._decoder_ref, self.layers, step_ref, stage, stage + 1),
                    )
                )
                if stage < stages - 1:
                    reduce(x)
        return buf[sizes[0] : sizes[0] + tokens * self.hidden].view(tokens, self.hidden)

    def _window_plans(
        self, tokens: int, keys: int, threads: int
    ) -> tuple[torch.Tensor | None, int]:
        """The step's `windows` and the most splits among their plans: per layer (window,
        splits, per) where the window is shorter than the longest context (`keys`), split as
        `paged_decode` splits it, else (0, 0, 0); (None, 0) when no layer's window hides a key."""
        hiding = [w if 0 < w < keys else 0 for w in self.windows]
        if not any(hiding):
            return None, 0
        bs = self.block_size
        plans = {
            w: split_plan(tokens, -(-window_keys(keys, w, bs) // bs), threads)
            for w in set(hiding)
            if w
        }
        rows = [v for w in hiding for v in ((w, *plans[w]) if w else (0, 0, 0))]
        return torch.tensor(rows, dtype=torch.int64), max(n for n, _ in plans.values())

    def _set_lora(self, lora: LoraStep, tokens: int) -> tuple[torch.Tensor, int]:
        """Point each layer at its LoRA stacks for this step (they may have been reallocated
        since the last); returns the slots as int64 and the largest rank."""
        slots = lora.slots.to(torch.int64).contiguous()
        if slots.shape != (tokens,) or len(lora.layers) != self.num_layers:
            raise ValueError(
                f"LoRA slots {tuple(slots.shape)} and {len(lora.layers)} layers' stacks do not "
                f"describe a decode step of {tokens} sequences over {self.num_layers} layers"
            )
        low, high = (int(v) for v in torch.aminmax(slots))
        dims = (
            (self.hidden, self.q_size + 2 * self.kv_size),
            (self.q_size, self.hidden),
            (self.hidden, 2 * self.inter),
            (self.inter, self.hidden),
        )
        rank = 0
        for i, stacks in enumerate(lora.layers):
            layer = self.layers[i]
            for w, ab in enumerate(stacks):
                if ab is None:
                    layer.lora_a[w] = layer.lora_b[w] = None
                    layer.lora_rank[w] = 0
                    continue
                a, b = ab
                (k, n), r = dims[w], a.shape[1] if a.dim() == 3 else -1
                if (
                    a.dtype != torch.float32
                    or b.dtype != torch.float32
                    or not (a.is_contiguous() and b.is_contiguous())
                    or a.shape != (a.shape[0], r, k)
                    or b.shape != (a.shape[0], r, n)
                    or not 0 <= low <= high < a.shape[0]
                ):
                    raise ValueError(
                        f"layer {i} {LORA_LINEARS[w]}: LoRA stacks A {tuple(a.shape)} {a.dtype} "
                        f"and B {tuple(b.shape)} {b.dtype} (contiguous float32 (slots, rank, "
                        f"{k}) and (slots, rank, {n})) do not take slots {low}..{high}"
                    )
                layer.lora_a[w], layer.lora_b[w], layer.lora_rank[w] = a.data_ptr(), b.data_ptr(), r
                rank = max(rank, r)
        return slots, rank

    @staticmethod
    def _check(code: int) -> None:
        if code == 1:
            raise MemoryError("the CPU decode attention kernel could not allocate its scratch")
        if code:
            raise RuntimeError(f"the native decoder refused its inputs (code {code})")
