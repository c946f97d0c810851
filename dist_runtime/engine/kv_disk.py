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

A runtime holds a shared lock on its fingerprint directory's `in_use.lock` while it runs
(`InUse`; the kernel drops it when the process ends), so `prune` (`launch/kv_cache_dir.py`),
which bounds the directory as a whole, never deletes blocks a running runtime reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from dist_runtime.config import ModelConfig, RopeScaling, RuntimeConfig
from dist_runtime.engine.block_manager import _DiskTier
from dist_runtime.progress import Phase

logger = logging.getLogger(__name__)

FORMAT = 1
"""The block files' layout version (`workers.kv_cache.DiskKVTier`): part of the fingerprint."""
LOCK = "in_use.lock"
CARD = "fingerprint.json"
_CHUNK = 8 << 20
_SHOW_PROGRESS_BYTES = 2 << 30


def disk_tier(config: RuntimeConfig, model_config: ModelConfig) -> tuple[InUse, int]:
    """(this model's and layout's directory of blocks, held in use until closed; the root of
    their hash chain)."""
    assert config.cache.kv_cache_dir is not None
    top = Path(config.cache.kv_cache_dir).expanduser().absolute()  # (workers: another cwd)
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
        "dtype": config.resolved_dtype(model_config),
        "quant_policy": config.cache.quant_policy,
        "block_size": config.cache.block_size,
        "tp": config.parallel.tp,
        "cp": config.parallel.cp,
    }
    text = json.dumps(what, sort_keys=True)
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    held = InUse(top / digest.hex())
    card = held.where / CARD
    if not card.exists():
        card.write_text(json.dumps({"checkpoint": config.model, **what}, indent=2, sort_keys=True))
    return held, int.from_bytes(digest, "little")


def _model_fields(model_config: ModelConfig) -> dict[str, Any]:
    return {
        "num_layers": model_config.num_layers,
        "hidden_size": model_config.hidden_size,
        "num_heads": model_config.num_heads,
        "num_kv_heads": model_config.num_kv_heads,
        "head_dim": model_config.head_dim,
        "rope_theta": model_config.rope_theta,
        "rope_scaling": _scaling_text(model_config.rope_scaling),
    }


def _scaling_text(scaling: RopeScaling | None) -> str:
    """`scaling` as the fingerprint has always spelled it: linear and dynamic scaling (all
    RopeScaling held before llama3 and YaRN) by their type and factor alone, so directories
    written before the other types' fields existed stay found; the others in full."""
    if scaling is not None and scaling.type in ("linear", "dynamic"):
        return f"RopeScaling(type={scaling.type!r}, factor={scaling.factor!r})"
    return str(scaling)


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


class InUse:
    """A shared lock on a tier directory, held while a runtime uses it (several runtimes may
    share one directory; `prune` takes the lock exclusively, so it skips a directory in use
    and a runtime starting waits for a deletion under way, then makes the directory anew)."""

    def __init__(self, where: Path):
        while True:
            where.mkdir(parents=True, exist_ok=True)
            f: IO[bytes] = open(where / LOCK, "a+b")  # noqa: SIM115 (held until close)
            try:
                fcntl.flock(f, fcntl.LOCK_SH)
            except OSError as e:  # a file system without locks (Lustre without -o flock, ...)
                logger.warning(
                    "disk KV tier: %s cannot be locked (%s); launch/kv_cache_dir.py cannot tell "
                    "that this runtime uses it",
                    where,
                    e.strerror or e,
                )
                break
            try:
                if os.stat(where / LOCK).st_ino == os.fstat(f.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            f.close()  # the directory was deleted while this waited: again, anew
        os.utime(where / LOCK)  # its time: when a runtime last started on the directory
        self.where = where
        self._file: IO[bytes] | None = f

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                os.utime(self.where / LOCK)  # ... and last stopped using it
            self._file.close()
            self._file = None


@dataclasses.dataclass
class TierDir:
    """One fingerprint's directory of blocks, as `survey` finds it."""

    path: Path
    card: dict[str, Any]
    """Its `fingerprint.json`: the model, dtype, KV layout (empty when unreadable)."""
    files: int
    nbytes: int
    last_used: float
    """The newest time a block in it was written or read, or a runtime started or stopped on
    it (seconds since the epoch)."""
    in_use: bool | None
    """Whether a running runtime holds it (None: its file system has no locks to tell)."""

    @property
    def id(self) -> str:
        return self.path.name


def survey(top: Path) -> list[TierDir]:
    """Every fingerprint directory under a disk tier's top directory, least recently used
    first."""
    if not top.is_dir():
        raise ValueError(f"{str(top)!r} is not a directory; give a --kv-cache-dir")
    found = []
    for path in top.iterdir():
        if not (path.is_dir() and (path / CARD).exists()):
            continue
        try:
            card = json.loads((path / CARD).read_text())
        except (OSError, ValueError):
            card = {}
        files = nbytes = 0
        last = 0.0
        for entry in [path / LOCK, path / CARD, *path.glob("tp*-cp*/*.kv")]:
            try:
                st = entry.stat()
            except OSError:
                continue
            last = max(last, st.st_mtime)
            if entry.suffix == ".kv":
                files += 1
                nbytes += st.st_size
        found.append(TierDir(path, card, files, nbytes, last, _in_use(path)))
    return sorted(found, key=lambda t: t.last_used)


def _in_use(path: Path) -> bool | None:
    """Whether a runtime holds the directory; None when its file system has no locks."""
    try:
        with open(path / LOCK, "r+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            except OSError:
                return None
    except FileNotFoundError:
        pass
    return False


def choose(
    tiers: list[TierDir],
    ids: Sequence[str] = (),
    unused_for_s: float | None = None,
    max_bytes: int | None = None,
    now: float | None = None,
) -> list[TierDir]:
    """The directories to delete: those named (an id or a prefix naming one), those unused
    for `unused_for_s`, then the least recently used until the rest hold at most `max_bytes`;
    never one in use (`tiers` as `survey` orders them)."""
    now = time.time() if now is None else now
    picked: dict[str, TierDir] = {}
    for want in ids:
        match = [t for t in tiers if t.id.startswith(want)]
        if len(match) != 1:
            what = "no directory" if not match else f"{len(match)} directories"
            raise ValueError(
                f"{want!r} names {what} of {[t.id[:12] for t in tiers]}; give more of an id"
            )
        picked[match[0].id] = match[0]
    if unused_for_s is not None:
        for t in tiers:
            if now - t.last_used >= unused_for_s:
                picked[t.id] = t
    if max_bytes is not None:
        left = sum(t.nbytes for t in tiers if t.id not in picked or t.in_use)  # what stays
        for t in tiers:  # least recently used first
            if left <= max_bytes:
                break
            if t.id not in picked and not t.in_use:
                picked[t.id] = t
                left -= t.nbytes
    return [t for t in tiers if t.id in picked and not t.in_use]


def prune(tier: TierDir) -> bool:
    """Delete a fingerprint's directory unless a runtime holds it now; whether it went."""
    try:
        f = open(tier.path / LOCK, "a+b")  # noqa: SIM115
    except FileNotFoundError:
        return False  # gone already
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:
            pass  # no locks on this file system: the caller was told (`TierDir.in_use` None)
        shutil.rmtree(tier.path, ignore_errors=True)
    logger.info(
        "disk KV tier: deleted %s (%d blocks, %.1f GiB)", tier.path, tier.files, tier.nbytes / 2**30
    )
    return True


def trim_shared(
    where: Path, tp: int, cp: int, capacity: int, indexed: Callable[[int], bool]
) -> int:
    """Keep a fingerprint directory that several runtimes share within one runtime's bound:
    per pool, when its block files (counted on tp rank 0) exceed `capacity`, delete on every
    rank blocks this runtime does not index (`indexed(digest)`: the others' blocks) until they
    fit, as the runtime's own index evicts: leaves first (a document loses its tail before its
    head), the least recently used (written or read) first. A runtime whose indexed block goes
    this way finds its files gone at its next lookup: a miss. Returns the blocks deleted."""
    deleted = 0
    for pool in range(cp):
        try:
            with os.scandir(where / f"tp0-cp{pool}") as it:
                entries = [e for e in it if e.name.endswith(".kv")]
        except FileNotFoundError:
            continue
        over = len(entries) - capacity
        if over <= 0:
            continue
        theirs = []
        for entry in entries:
            key, _, after = entry.name.removesuffix(".kv").partition("-")
            with contextlib.suppress(OSError, ValueError):
                digest = int(key, 16)
                if not indexed(digest):
                    theirs.append((entry.stat().st_mtime_ns, digest, int(after, 16)))
        chains = _DiskTier(len(theirs), None)
        for _, digest, parent in sorted(theirs):  # least recently used first
            chains.add(digest, parent, pool)
        while over > 0 and (victim := chains.victim()) is not None:
            name = f"{victim:032x}-{chains.parent[victim]:032x}.kv"
            chains.remove(victim)
            for rank in range(tp):
                with contextlib.suppress(OSError):
                    os.unlink(where / f"tp{rank}-cp{pool}" / name)
            over -= 1
            deleted += 1
    if deleted:
        logger.info(
            "disk KV tier %s: deleted %d least recently used block(s) other runtimes on the "
            "directory wrote, to keep it within this runtime's bound",
            where,
            deleted,
        )
    return deleted


__all__ = [
    "FORMAT",
    "InUse",
    "TierDir",
    "choose",
    "disk_tier",
    "prune",
    "survey",
    "trim_shared",
    "weights_digest",
]
