"""Where the disk tier of the prefix cache keeps a model's blocks, and the root of their hashes.

Blocks on disk outlive the process, so their hash chain must mean the same K/V in every
process that reads them: it is rooted in a fingerprint of everything that shapes K/V for given
tokens (the weights' content, the model's configuration as run, dtype, KV quantization, block
size and the tp x cp layout that splits heads and blocks over workers). Each fingerprint has a
directory of its own under `cache.kv_cache_dir` (with `fingerprint.json` saying what went into
it), so a directory can hold several models side by side and a changed checkpoint never reads
another's blocks.

The weights' content is hashed once (BLAKE2b over every `*.safetensors` file and
`config.json`) and remembered in `weights.json` by each file's path, size and modification
time, so later starts hash nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from dist_runtime.config import ModelConfig, RuntimeConfig
from dist_runtime.progress import Phase

logger = logging.getLogger(__name__)

FORMAT = 1
"""The block files' layout version (`workers.kv_cache.DiskKVTier`): part of the fingerprint."""
_CHUNK = 8 << 20
_SHOW_PROGRESS_BYTES = 2 << 30


def disk_tier(config: RuntimeConfig, model_config: ModelConfig) -> tuple[Path, int]:
    """(the directory of this model's and layout's blocks, the root of their hash chain)."""
    assert config.cache.kv_cache_dir is not None
    top = Path(config.cache.kv_cache_dir).expanduser()
    try:
        top.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"cache.kv_cache_dir {str(top)!r}: cannot create it ({e.strerror or e}); give a "
            "writable directory"
        ) from None
    what = {
        "format": FORMAT,
        "weights": weights_digest(config, top / "weights.json"),
        "model": _model_fields(model_config),
        "dtype": config.resolved_dtype(),
        "quant_policy": config.cache.quant_policy,
        "block_size": config.cache.block_size,
        "tp": config.parallel.tp,
        "cp": config.parallel.cp,
    }
    text = json.dumps(what, sort_keys=True)
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    where = top / digest.hex()
    where.mkdir(exist_ok=True)
    card = where / "fingerprint.json"
    if not card.exists():
        card.write_text(json.dumps({"model": config.model, **what}, indent=2, sort_keys=True))
    return where, int.from_bytes(digest, "little")


def _model_fields(model_config: ModelConfig) -> dict[str, Any]:
    return {
        "num_layers": model_config.num_layers,
        "hidden_size": model_config.hidden_size,
        "num_heads": model_config.num_heads,
        "num_kv_heads": model_config.num_kv_heads,
        "head_dim": model_config.head_dim,
        "rope_theta": model_config.rope_theta,
        "rope_scaling": str(model_config.rope_scaling),
    }


def weights_digest(config: RuntimeConfig, memo: Path) -> str:
    """BLAKE2b of the checkpoint's weight files and config.json (a random-weight model: its
    seed), remembered in `memo` by path, size and modification time."""
    if config.load_format == "dummy":
        return f"dummy-seed-{config.seed}"
    folder = Path(config.model)
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.suffix == ".safetensors" or p.name == "config.json")
    )
    try:
        known: dict[str, Any] = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    parts, changed = [], False
    for path in files:
        st = path.stat()
        key = str(path.resolve())
        entry = known.get(key)
        if not (
            isinstance(entry, dict)
            and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns
        ):
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "blake2b": _hash_file(path)}
            known[key], changed = entry, True
        parts.append(f"{path.name}:{entry['blake2b']}")
    if changed:
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, memo)
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=16).hexdigest()


def _hash_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    desc = f"fingerprinting {path.name} for the disk KV tier"
    with (
        Phase(desc, "MiB", total=size >> 20, enabled=size >= _SHOW_PROGRESS_BYTES) as phase,
        open(path, "rb") as f,
    ):
        done = 0
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            done += len(chunk)
            phase.update_to(done >> 20)
    logger.info("disk KV tier: hashed %s (%.0f MiB)", path, size / 2**20)
    return h.hexdigest()


__all__ = ["FORMAT", "disk_tier", "weights_digest"]
