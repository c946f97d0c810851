"""LoRA adapters served beside the base model (`--lora-modules NAME=DIR`).

An adapter is a PEFT folder: `adapter_config.json` (`r`, `lora_alpha`, `target_modules`,
optionally `use_rslora`, `rank_pattern`, `alpha_pattern`) and `adapter_model.safetensors`
holding, for each adapted linear layer `M` of the base checkpoint,
`base_model.model.M.lora_A.weight` [r, in] and `base_model.model.M.lora_B.weight` [out, r].
The layer's output becomes `W x + s * B (A x)` with `s = alpha / r` (`alpha / sqrt(r)` with
rsLoRA), exactly what PEFT's merge computes into `W`.

Every adapter's folder is checked against the model before it is served (`AdapterSpec.load`,
headers only: at start before any worker starts, or when it is registered while running with
`max_loras`); requests pick one by name (`SamplingParams.adapter`), and one batch mixes
requests of any adapters and of the base model.
The adapted layers are the attention and MLP projections (q, k, v, o, gate, up, down, or
InternLM2's wqkv, wo, w1, w3, w2); an adapter that trains embeddings or the LM head, DoRA,
or adapter biases is refused with the reason. Prefix-cache keys of a request are salted with its
adapter's content hash, so base and adapter K/V are never shared.

The worker side (sharding A and B for tensor parallelism, the batched forward) is
`workers/lora.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_runtime.config import ConfigError, ModelConfig, RuntimeConfig, check_lora_modules
from dist_runtime.formats.lora_adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    pattern_value,
)

if TYPE_CHECKING:
    from workers.models.names import Layout

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PEFT_PREFIX",
    "AdapterConflictError",
    "AdapterModule",
    "AdapterNotFoundError",
    "AdapterSpec",
    "adapter_slot_rank",
    "check_lora_modules",
    "check_slot_rank",
    "lora_bytes_per_worker",
    "parse_lora_modules",
]


_UNSUPPORTED = {
    "use_dora": "DoRA adapters (use_dora) are not supported; merge the adapter into the "
    "weights (PEFT's merge_and_unload) and serve the merged checkpoint",
    "modules_to_save": "adapters that fully train extra modules (modules_to_save) are not "
    "supported; merge the adapter into the weights and serve the merged checkpoint",
}


@dataclass(frozen=True)
class AdapterModule:
    """One adapted linear layer: its checkpoint name (e.g. `model.layers.0.self_attn.q_proj`),
    rank, scale, and the names of its A and B tensors in the adapter's file."""

    name: str
    rank: int
    scale: float
    a_key: str = ""
    b_key: str = ""
    b_rows: tuple[int, int] | None = None
    """The rows of B that are this layer's, when the adapter adapts a packed projection
    (Phi-3's qkv_proj / gate_up_proj: one module per part, all with the packed A)."""


@dataclass(frozen=True)
class AdapterSpec:
    """A checked adapter folder: what it adapts and its content hash."""

    name: str
    path: str
    modules: tuple[AdapterModule, ...]
    digest: bytes
    """BLAKE2b of its config and weights: salts its requests' prefix-cache keys."""

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules)

    @classmethod
    def load(
        cls, name: str, path: str, model: ModelConfig, digest: bytes | None = None
    ) -> AdapterSpec:
        """Read and check the folder `path` against `model` (tensor headers only). Its content
        hash is computed (a read of the whole file) unless `digest` is given."""
        where = f"LoRA adapter {name!r} ({path})"
        folder = Path(path)
        cfg_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
        if not folder.is_dir():
            raise ConfigError(f"{where}: no such directory; give --lora-modules NAME=DIR")
        if not cfg_path.is_file():
            raise ConfigError(f"{where}: {ADAPTER_CONFIG} is missing; is it a PEFT LoRA folder?")
        if not weights.is_file():
            bin_file = folder / "adapter_model.bin"
            hint = (
                "; it has adapter_model.bin (pickle), which is not read: save it with "
                "safe_serialization=True"
                if bin_file.is_file()
                else ""
            )
            raise ConfigError(f"{where}: {ADAPTER_WEIGHTS} is missing{hint}")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}: {ADAPTER_CONFIG} is not valid JSON: {e}") from e
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}: {ADAPTER_CONFIG} must hold a JSON object")
        _check_config(cfg, where)
        shapes = _tensor_shapes(weights, where)
        modules = _modules(cfg, shapes, model, where)
        if digest is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(cfg_path.read_bytes())
            with weights.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digest = h.digest()
        return cls(name=name, path=str(folder), modules=modules, digest=digest)


def _check_config(cfg: dict[str, Any], where: str) -> None:
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ConfigError(f"{where}: peft_type {peft_type!r} is not a LoRA adapter (LORA)")
    for key, why in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ConfigError(f"{where}: {why}")
    if cfg.get("bias", "none") != "none":
        raise ConfigError(
            f"{where}: bias {cfg['bias']!r} trains the base model's biases, which is not "
            "supported; merge the adapter into the weights and serve the merged checkpoint"
        )
    if cfg.get("fan_in_fan_out"):
        raise ConfigError(f"{where}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{where}: {ADAPTER_CONFIG} needs {key} > 0, got {value!r}")


def _tensor_shapes(weights: Path, where: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            names = f.keys()
            return {k: tuple(f.get_slice(k).get_shape()) for k in names}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ConfigError(f"{where}: {ADAPTER_WEIGHTS} cannot be read: {e}") from e


def _layout(model: ModelConfig) -> Layout:
    from workers.models.names import LAYOUTS

    return LAYOUTS[model.architecture]


def _modules(
    cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]], model: ModelConfig, where: str
) -> tuple[AdapterModule, ...]:
    from workers.models.layouts import linear_shapes
    from workers.models.names import packed_parts

    linears = linear_shapes(model)
    packed = packed_parts(model)
    lay = _layout(model)
    residual_outputs = (f".{lay.o}", f".{lay.down}")
    found: dict[str, dict[str, tuple[int, ...]]] = {}
    keys: dict[tuple[str, str], str] = {}
    for key, shape in shapes.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            what = "a bias" if key.endswith(".bias") else "not a lora_A / lora_B weight"
            raise ConfigError(f"{where}: tensor {key!r} is {what}; only LoRA A/B are supported")
        module = m.group(1).removeprefix(PEFT_PREFIX)
        found.setdefault(module, {})[m.group(2)] = shape
        keys[module, m.group(2)] = key
    if not found:
        raise ConfigError(f"{where}: {ADAPTER_WEIGHTS} holds no lora_A / lora_B tensors")
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    modules = []
    for module, ab in sorted(found.items()):
        parts = packed.get(module)
        if module not in linears and parts is None:
            kind = (
                "an embedding or the LM head"
                if re.search(r"embed|lm_head|output$", module)
                else "not one of the model's attention or MLP projections"
            )
            raise ConfigError(
                f"{where}: it adapts {module!r}, which is {kind}; only q/k/v/o and gate/up/down "
                f"projections ({model.architecture} names) can carry an adapter"
            )
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"{where}: {module!r} has lora_{''.join(ab)} but not both A and B")
        if parts is not None:  # (a packed projection: its rows are the parts', in order)
            out_f, in_f = parts[-1][2], linears[parts[0][0]][1]
        else:
            out_f, in_f = linears[module]
        a, b = ab["A"], ab["B"]
        rank = a[0] if len(a) == 2 else -1
        if len(a) != 2 or len(b) != 2 or a[1] != in_f or b[0] != out_f or b[1] != rank:
            raise ConfigError(
                f"{where}: {module!r} has lora_A {list(a)} and lora_B {list(b)}; this model "
                f"needs [r, {in_f}] and [{out_f}, r]: was the adapter trained on another model?"
            )
        expected = _pattern(rank_pattern, module, cfg["r"], where)
        if rank != expected:
            raise ConfigError(
                f"{where}: {module!r} has rank {rank} but {ADAPTER_CONFIG} says {expected}"
            )
        alpha = float(_pattern(alpha_pattern, module, cfg["lora_alpha"], where))
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        if module.endswith(residual_outputs):  # (Granite's residual multiplier, folded into
            scale *= model.residual_multiplier  # these layers' weights too)
        a_key, b_key = keys[module, "A"], keys[module, "B"]
        if parts is None:
            modules.append(AdapterModule(module, rank, scale, a_key, b_key))
            continue
        for part, start, stop in parts:
            modules.append(AdapterModule(part, rank, scale, a_key, b_key, (start, stop)))
    return tuple(sorted(modules, key=lambda m: m.name))


def _pattern(patterns: dict[str, Any], module: str, default: Any, where: str) -> Any:
    try:
        return pattern_value(patterns, module, default)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e


def lora_bytes_per_worker(
    specs: list[AdapterSpec],
    model: ModelConfig,
    tp: int,
    itemsize: int,
    room: tuple[int, int] | None = None,
) -> int:
    """Device bytes of the adapters on one tp rank, as `workers/lora.py` stacks them: per
    adapted layer, for every slot (the adapters and the base model's zeros) an A of the largest
    rank there by the rank's input width, and a B of the rank's output rows by that rank. A
    fused layer's rank is its parts' ranks added (q + k + v, gate + up), and its B holds every
    output row of the fusion. With `room` = (slots, rank) (reserved slots, `max_loras`): every
    projection, `slots` slots, each part `rank` wide."""
    if not specs and room is None:
        return 0
    c, lay = model, _layout(model)
    hd, hidden, inter = c.head_dim, c.hidden_size, c.intermediate_size // tp
    q_local, kv_local = c.num_heads // tp, max(c.num_kv_heads // tp, 1)
    qkv = [lay.wqkv] if lay.wqkv else [lay.q, lay.k, lay.v]
    layers = [  # our layers: (their checkpoint parts, in_local, out_local)
        (qkv, hidden, (q_local + 2 * kv_local) * hd),
        ([lay.o], q_local * hd, hidden),
        ([lay.gate, lay.up], hidden, 2 * inter),
        ([lay.down], inter, hidden),
    ]
    ranks = [{m.name: m.rank for m in spec.modules} for spec in specs]
    slots = len(specs) + 1 if room is None else room[0]
    total = 0
    for i in range(c.num_layers):
        p = lay.layer.format(i)
        for parts, in_local, out_local in layers:
            if room is not None:
                rank = len(parts) * room[1]
            else:
                rank = max(sum(r.get(f"{p}{part}", 0) for part in parts) for r in ranks)
            total += slots * rank * (in_local + out_local)
    return total * itemsize


class AdapterConflictError(ValueError):
    """Loading or unloading an adapter conflicts with the runtime's state: the name is loaded
    already, every slot is taken, or requests still use it."""


class AdapterNotFoundError(ValueError):
    """The adapter named is not loaded."""


DEFAULT_SLOT_RANK = 16
"""The rank reserved slots hold when max_lora_rank is not given (vLLM's default too)."""


def adapter_slot_rank(config: RuntimeConfig, specs: list[AdapterSpec]) -> int:
    """The rank of reserved adapter slots: max_lora_rank, else the larger of 16 and the
    start adapters' ranks. A start adapter over an explicit max_lora_rank is a ConfigError."""
    if config.max_lora_rank is not None:
        for spec in specs:
            check_slot_rank(spec, config.max_lora_rank)
        return config.max_lora_rank
    return max([DEFAULT_SLOT_RANK, *(s.max_rank for s in specs)])


def check_slot_rank(spec: AdapterSpec, rank: int) -> None:
    if spec.max_rank > rank:
        raise ConfigError(
            f"LoRA adapter {spec.name!r} ({spec.path}) has rank {spec.max_rank}, over the "
            f"{rank} the reserved slots hold; start with a larger max_lora_rank "
            "(--max-lora-rank)",
            key="max_lora_rank",
        )


def parse_lora_modules(items: list[str]) -> dict[str, str]:
    """`--lora-modules` values `NAME=DIR` (or a JSON object {"name": ..., "path": ...}, as
    vLLM takes) as {name: dir}."""
    out: dict[str, str] = {}
    for item in items:
        name, path = _split_item(item)
        if name in out:
            raise ConfigError(f"--lora-modules names {name!r} twice")
        out[name] = path
    return out


def _split_item(item: str) -> tuple[str, str]:
    if item.lstrip().startswith("{"):
        try:
            obj = json.loads(item)
        except ValueError as e:
            raise ConfigError(f"--lora-modules {item!r} is not valid JSON: {e}") from e
        name, path = obj.get("name"), obj.get("path")
    else:
        name, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(
                f"--lora-modules {item!r} must be NAME=DIR (e.g. sql=/adapters/sql-lora)"
            )
    if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
        raise ConfigError(f"--lora-modules {item!r} needs a name and a directory")
    return name, path
