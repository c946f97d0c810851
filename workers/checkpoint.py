"""Read slices of tensors from a Hugging Face safetensors checkpoint folder.

A worker never materialises a full tensor it only needs part of: `read_rows` goes through
`safe_open(...).get_slice(...)`, which reads just the requested byte ranges. The reader counts
the bytes it returns so tests (and logs) can show what a worker loaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as it is."""


@dataclass(frozen=True)
class View:
    """A tensor read as [start, stop) along `dim` (0 or 1) of `source`."""

    source: str
    start: int
    stop: int
    dim: int = 0


class CheckpointReader:
    """Name -> file map of a checkpoint folder, with lazily opened safetensors handles."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.weight_map = _weight_map(self.folder)
        self._handles: dict[str, Any] = {}
        self.views: dict[str, View] = {}
        """Tensors read as a slice of another: a packed projection's parts (`add_views`)."""
        self.bytes_read = 0

    def names(self) -> list[str]:
        """The tensors stored (views are not listed)."""
        return list(self.weight_map)

    def has(self, name: str) -> bool:
        return name in self.weight_map or name in self.views

    def add_views(self, views: dict[str, View], optional: frozenset[str] = frozenset()) -> None:
        """Read each `name` as its view's slice of the source tensor; a name the checkpoint
        stores itself is read as stored, and one in `optional` whose source is not stored is
        left out (it is as absent as its source)."""
        for name, view in views.items():
            if name in self.weight_map or (name in optional and view.source not in self.weight_map):
                continue
            size = self.shape(view.source)[view.dim]
            if not 0 <= view.start < view.stop <= size:
                what = "rows" if view.dim == 0 else "columns"
                raise CheckpointError(
                    f"tensor {view.source!r} in {self.folder} has {size} {what}, fewer than the "
                    f"{view.stop} its parts need; the weights do not match the config"
                )
            self.views[name] = view

    def _handle(self, name: str) -> Any:
        if name not in self.weight_map:
            raise CheckpointError(
                f"tensor {name!r} is missing from the checkpoint in {self.folder}"
            )
        file = self.weight_map[name]
        if file not in self._handles:
            path = self.folder / file
            try:
                self._handles[file] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(
                    f"{path} is not a readable safetensors file ({e}); re-download or re-convert "
                    "the checkpoint"
                ) from e
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.views:
            view = self.views[name]
            shape = list(self.shape(view.source))
            shape[view.dim] = view.stop - view.start
            return tuple(shape)
        return tuple(self._handle(name).get_slice(name).get_shape())

    def check_shape(self, name: str, expected: tuple[int, ...]) -> None:
        got = self.shape(name)
        if got != tuple(expected):
            raise CheckpointError(
                f"tensor {name!r} in {self.folder} has shape {list(got)}, but config.json implies "
                f"{list(expected)}; the weights do not match the config"
            )

    def read_rows(
        self, name: str, start: int | None = None, stop: int | None = None, dim: int = 0
    ) -> torch.Tensor:
        """Rows [start, stop) along dim (0 or 1) of a tensor, reading only those bytes."""
        wanted = slice(start, stop)
        source, index = name, (wanted,) if dim == 0 else (slice(None), wanted)
        if name in self.views:
            view = self.views[name]
            source, own = view.source, slice(view.start, view.stop)
            if view.dim == dim:  # (a slice of the view along its own axis)
                first, last = wanted.indices(view.stop - view.start)[:2]
                part = slice(view.start + first, view.start + max(first, last))
                index = (part,) if dim == 0 else (slice(None), part)
            else:  # (the view's rows or columns, and the wanted ones along the other axis)
                index = (wanted, own) if view.dim == 1 else (own, wanted)
        tensor_slice = self._handle(source).get_slice(source)
        try:
            t = tensor_slice[index]
        except Exception as e:
            raise CheckpointError(f"reading {name!r} from {self.folder} failed: {e}") from e
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read(self, name: str) -> torch.Tensor:
        return self.read_rows(name)

    def close(self) -> None:
        self._handles.clear()


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            raw = json.loads(index.read_text(encoding="utf-8"))
            weight_map = dict(raw["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {missing}")
        return weight_map
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no *.safetensors files in {folder}; convert .bin/.pth weights to safetensors "
            "first (or point --model at a folder that has them)"
        )
    weight_map = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    weight_map[key] = path.name
        except Exception as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({e}); re-download or re-convert it"
            ) from e
    return weight_map


def dtype_from_name(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
