"""`CheckpointReader` views: a packed tensor's parts read as tensors of their own (Phi-3's
qkv_proj / gate_up_proj and their 4-bit columns), every slice equal to slicing the part."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from workers.checkpoint import CheckpointError, CheckpointReader, View


@pytest.fixture
def reader(tmp_path: Path) -> CheckpointReader:
    packed = torch.arange(12 * 10, dtype=torch.float32).reshape(12, 10)
    save_file({"packed": packed, "plain": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    return CheckpointReader(tmp_path)


def test_row_and_column_views_read_as_the_slices_they_name(reader: CheckpointReader) -> None:
    packed = reader.read("packed")
    reader.add_views({"rows": View("packed", 4, 10), "cols": View("packed", 2, 7, dim=1)})
    parts = {"rows": packed[4:10], "cols": packed[:, 2:7]}
    for name, part in parts.items():
        assert reader.has(name) and reader.shape(name) == tuple(part.shape)
        assert torch.equal(reader.read(name), part)
        for start, stop in ((None, None), (1, 3), (0, 1), (2, None)):
            want_rows, want_cols = part[start:stop], part[:, start:stop]
            assert torch.equal(reader.read_rows(name, start, stop), want_rows), (name, start)
            assert torch.equal(reader.read_rows(name, start, stop, dim=1), want_cols)
    assert reader.names() == ["packed", "plain"]  # (views are not stored tensors)


def test_views_never_hide_a_stored_tensor_and_must_fit(reader: CheckpointReader) -> None:
    reader.add_views({"plain": View("packed", 0, 3)})
    assert torch.equal(reader.read("plain"), torch.zeros(3))
    reader.add_views({"gone": View("absent", 0, 1)}, optional=frozenset({"gone"}))
    assert not reader.has("gone")
    with pytest.raises(CheckpointError, match="'absent' is missing"):
        reader.add_views({"gone": View("absent", 0, 1)})
    with pytest.raises(CheckpointError, match="has 10 columns, fewer than the 11 its parts"):
        reader.add_views({"wide": View("packed", 5, 11, dim=1)})
