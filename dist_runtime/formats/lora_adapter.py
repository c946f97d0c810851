"""PEFT LoRA adapter folders: their file and tensor names (shared with the workers), random ones
for tests and benchmarks, and merging one into a checkpoint (`W + s * B @ A` on the full,
unsharded tensors: the reference the served adapter is checked against).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

# (torch and safetensors load in the functions that read or write tensors: the launchers import
# the names above to check their flags, and answer --help and bad flags without torch)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""PEFT's prefix of the base model's module names in an adapter's tensor names."""

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INTERNLM2_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")


def write_random_adapter(
    out_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    *,
    targets: tuple[str, ...] | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    layers: tuple[int, ...] | None = None,
    std: float = 0.05,
    seed: int = 0,
) -> Path:
    """A PEFT-format adapter for the checkpoint folder `checkpoint` with random A and B (PEFT
    starts B at zero; random B makes the adapter change the answers). `targets` are module
    suffixes (default: every projection); `layers` limits it to those layer indices."""
    import torch
    from safetensors.torch import save_file

    ckpt = Path(checkpoint)
    config = json.loads((ckpt / "config.json").read_text())
    arch = config["architectures"][0]
    default = INTERNLM2_TARGETS if "InternLM2" in arch else LLAMA_TARGETS
    targets = targets or default
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (out_f, in_f) in _linear_shapes(ckpt).items():
        layer = int(name.split(".")[2])
        if layers is not None and layer not in layers:
            continue
        if not any(name.endswith("." + t) for t in targets):
            continue
        r = int(pattern_value(rank_pattern or {}, name, rank))
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * std
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * std
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    adapter_config: dict[str, Any] = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(ckpt),
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "use_rslora": use_rslora,
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": {},
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "task_type": "CAUSAL_LM",
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder


def _linear_shapes(ckpt: Path) -> dict[str, tuple[int, int]]:
    """(out, in) of every 2-D `model.layers.*` weight of a checkpoint folder, by module name."""
    from safetensors import safe_open

    out = {}
    for file in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names = f.keys()
            for key in names:
                shape = f.get_slice(key).get_shape()
                if key.startswith("model.layers.") and key.endswith(".weight") and len(shape) == 2:
                    out[key.removesuffix(".weight")] = (shape[0], shape[1])
    return out


def merge_adapter(
    checkpoint: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
) -> Path:
    """A copy of `checkpoint` with the adapter merged: each adapted weight W becomes
    W + s * B @ A (computed in float64, stored in W's dtype), s = alpha / r (alpha / sqrt(r)
    with rsLoRA; alpha_pattern read as PEFT reads it)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt, folder, out = Path(checkpoint), Path(adapter), Path(out_dir)
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    deltas: dict[str, torch.Tensor] = {}
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
        for key in keys:
            if ".lora_A" not in key:
                continue
            module = key.split(".lora_A")[0].removeprefix(PEFT_PREFIX)
            a = f.get_tensor(key).double()
            b = f.get_tensor(key.replace(".lora_A", ".lora_B")).double()
            r = a.shape[0]
            alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            deltas[f"{module}.weight"] = scale * (b @ a)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(ckpt, out)
    merged: set[str] = set()
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names = f.keys()
            tensors = {k: f.get_tensor(k) for k in names}
        mine = [name for name in deltas if name in tensors]
        for name in mine:
            w = tensors[name]
            tensors[name] = (w.double() + deltas[name]).to(w.dtype)
        if mine:
            save_file(tensors, str(file), metadata={"format": "pt"})
        merged.update(mine)
    missing = [n for n in deltas if n not in merged]
    if missing:
        raise ValueError(f"the checkpoint has no tensors {missing[:3]} that the adapter adapts")
    return out


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    r"""A rank_pattern / alpha_pattern override for `module`, as PEFT reads them: the value of the
    first key that, as a regular expression, matches the module name or a dotted suffix of it
    (`(.*\.)?(key)$`); `default` when none does."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as e:
            raise ValueError(f"pattern key {key!r} is not a regular expression: {e}") from e
    return default
