"""Read one rank's slice of a 4-bit (AWQ GEMM or GPTQ) linear layer from a checkpoint.

A column-parallel layer reads an output range [o0, o1) with every input; a row-parallel layer
reads an input range [i0, i1), on whole groups, with every output. Only the words that hold
the range are read (AWQ packs 8 outputs per word, GPTQ 8 inputs), then unpacked to codes and
cut exactly. The result is in the orientation of `dist_runtime/formats/int4.py`: codes
[in, out], scales / zeros [groups, out], and `g_idx` [in] for act-order checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_runtime.config import WeightQuant
from dist_runtime.formats.int4 import AWQ_ORDER, unpack_cols, unpack_rows
from workers.checkpoint import CheckpointError, CheckpointReader


@dataclass
class Int4Slice:
    codes: torch.Tensor
    """int32 [in, out]."""
    scales: torch.Tensor
    """float32 [groups, out]."""
    zeros: torch.Tensor
    """float32 [groups, out]."""
    g_idx: torch.Tensor | None
    """int32 [in], act-order only."""

    @staticmethod
    def cat_out(parts: list[Int4Slice], name: str) -> Int4Slice:
        """Concatenate output ranges of layers that share their input (q/k/v, gate/up)."""
        first = parts[0]
        for p in parts[1:]:
            if (first.g_idx is None) != (p.g_idx is None) or (
                first.g_idx is not None
                and p.g_idx is not None
                and not torch.equal(first.g_idx, p.g_idx)
            ):
                raise CheckpointError(
                    f"{name}: the fused projections' g_idx differ, so they cannot share one "
                    "kernel call; re-quantize with one act-order permutation per input"
                )
        return Int4Slice(
            codes=torch.cat([p.codes for p in parts], dim=1),
            scales=torch.cat([p.scales for p in parts], dim=1),
            zeros=torch.cat([p.zeros for p in parts], dim=1),
            g_idx=first.g_idx,
        )


def int4_shapes(quant: WeightQuant, name: str, in_f: int, out_f: int) -> dict[str, tuple[int, ...]]:
    """Full shapes of one quantized linear layer's tensors (without its optional bias)."""
    groups = in_f // quant.group_of(in_f)
    words = -(-out_f // 8)
    if quant.method == "gguf":
        return {
            f"{name}.qweight": (in_f // 8, out_f),
            f"{name}.zeros": (groups, out_f),
            f"{name}.scales": (groups, out_f),
        }
    if quant.method == "awq":
        return {
            f"{name}.qweight": (in_f, words),
            f"{name}.qzeros": (groups, words),
            f"{name}.scales": (groups, out_f),
        }
    shapes: dict[str, tuple[int, ...]] = {
        f"{name}.qweight": (in_f // 8, out_f),
        f"{name}.qzeros": (groups, words),
        f"{name}.scales": (groups, out_f),
    }
    if quant.desc_act:
        shapes[f"{name}.g_idx"] = (in_f,)
    return shapes


def read_int4(
    reader: CheckpointReader,
    quant: WeightQuant,
    name: str,
    in_f: int,
    out_range: tuple[int, int] | None = None,
    in_range: tuple[int, int] | None = None,
) -> Int4Slice:
    """The slice [in_range] x [out_range] (None: all) of the layer `name` (no suffix)."""
    out_f = reader.shape(f"{name}.scales")[1]
    o0, o1 = out_range or (0, out_f)
    i0, i1 = in_range or (0, in_f)
    group = quant.group_of(in_f)
    if i0 % group or (i1 % group and i1 != in_f):
        raise CheckpointError(
            f"{name}: input range [{i0}, {i1}) does not hold whole groups of {group}"
        )
    if quant.desc_act:  # rows may belong to any group: keep every group's scales
        g0, g1 = 0, in_f // group
    else:
        g0, g1 = i0 // group, -(-i1 // group)
    w0, w1 = o0 // 8, -(-o1 // 8)  # words holding the output range (8 outputs per word)

    if quant.method == "awq":
        words = reader.read_rows(f"{name}.qweight", w0, w1, dim=1)[i0:i1]
        codes = unpack_cols(words, AWQ_ORDER)[:, o0 - 8 * w0 : o1 - 8 * w0]
        zwords = reader.read_rows(f"{name}.qzeros", g0, g1)[:, w0:w1]
        zeros = unpack_cols(zwords, AWQ_ORDER)[:, o0 - 8 * w0 : o1 - 8 * w0]
        g_idx = None
    elif quant.method == "gguf":  # GPTQ's row packing, float zeros
        codes = unpack_rows(reader.read_rows(f"{name}.qweight", i0 // 8, i1 // 8)[:, o0:o1])
        zeros = reader.read_rows(f"{name}.zeros", g0, g1)[:, o0:o1]
        g_idx = None
    else:
        if i0 % 8 or i1 % 8:
            raise CheckpointError(f"{name}: GPTQ rows pack 8 inputs; [{i0}, {i1}) splits a word")
        words = reader.read_rows(f"{name}.qweight", i0 // 8, i1 // 8)[:, o0:o1]
        codes = unpack_rows(words)
        zwords = reader.read_rows(f"{name}.qzeros", g0, g1)[:, w0:w1]
        zeros = (unpack_cols(zwords) + quant.zero_offset)[:, o0 - 8 * w0 : o1 - 8 * w0]
        g_idx = _read_g_idx(reader, quant, name, in_f, group, i0, i1)
    scales = reader.read_rows(f"{name}.scales", g0, g1)[:, o0:o1]
    return Int4Slice(
        codes=codes.to(torch.int32),
        scales=scales.to(torch.float32),
        zeros=zeros.to(torch.float32),
        g_idx=g_idx,
    )


def _read_g_idx(
    reader: CheckpointReader,
    quant: WeightQuant,
    name: str,
    in_f: int,
    group: int,
    i0: int,
    i1: int,
) -> torch.Tensor | None:
    key = f"{name}.g_idx"
    if not reader.has(key):
        if quant.desc_act:
            raise CheckpointError(f"{key} is missing, but the checkpoint says desc_act: true")
        return None
    g_idx = reader.read(key).to(torch.int64)
    if not quant.desc_act:
        plain = torch.arange(in_f) // group
        if not torch.equal(g_idx, plain):
            raise CheckpointError(
                f"{key} groups inputs out of order, but the checkpoint says desc_act: false; "
                "set desc_act: true in its quantization_config"
            )
        return None
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= in_f // group:
        raise CheckpointError(f"{key} has group indices outside [0, {in_f // group})")
    return g_idx[i0:i1].to(torch.int32)
