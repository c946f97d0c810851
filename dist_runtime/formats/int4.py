"""4-bit weight formats: AWQ "GEMM" and GPTQ packings, and the runtime's own layout.

Every format stores, for a linear layer with `in` inputs and `out` outputs, integer codes
q[k, n] in 0..15, and per (group, output) a scale and a zero point, so that the float weight
(nn.Linear orientation, out x in) is

    W[n, k] = (q[k, n] - zero[g(k), n]) * scale[g(k), n]

with g(k) = k // group_size, or g_idx[k] for GPTQ's act-order checkpoints.

- **AWQ GEMM** (AutoAWQ, `version: "gemm"`): `qweight` int32 [in, out/8] and `qzeros` int32
  [in/group, out/8] pack 8 output columns per word in AWQ's interleaved order: nibble i (bits
  4i..4i+3) holds column `AWQ_ORDER[i]` of its 8; `scales` [in/group, out]. Zeros are stored
  as they are.
- **GPTQ** (AutoGPTQ / Optimum, `checkpoint_format: "gptq"`): `qweight` int32 [in/8, out] packs
  8 consecutive input rows per word, nibble j holding row 8r + j; `qzeros` int32 [groups, out/8]
  packs 8 consecutive columns the same way and stores zero - 1 (the format's historical
  offset; `gptq_v2` stores the zero itself); `scales` [groups, out]; `g_idx` int32 [in].
  Symmetric checkpoints store zero 8 (0x77777777 in `qzeros`).
- **Runtime layout** (what `kernels/w4a16.py` reads): the GPTQ row packing (`qweight` int32
  [in/8, out]) with zeros unpacked into a float tensor [groups, out] beside the scales, and an
  optional `g_idx`. Row packing lets a kernel tile over `in` and unpack with one shift per row.
  Float zeros also hold GGUF's Q4_1 / Q4_K blocks exactly (`dist_runtime/formats/gguf.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble i of an AWQ word holds column AWQ_ORDER[i] of its 8 columns."""
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
"""Column j of an AWQ word sits in nibble AWQ_REVERSE_ORDER[j]."""
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def _check_codes(codes: torch.Tensor, dim: int) -> None:
    if codes.shape[dim] % 8:
        raise ValueError(
            f"packing 8 codes per int32 needs dim {dim} divisible by 8, got {codes.shape}"
        )


def _pack(nibbles: torch.Tensor) -> torch.Tensor:
    """(..., 8) codes 0..15 -> (...) int32, nibble i from nibbles[..., i]."""
    words = (nibbles.to(torch.int64) & 0xF) << _SHIFTS.to(torch.int64).to(nibbles.device)
    packed = words.sum(dim=-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _unpack(words: torch.Tensor) -> torch.Tensor:
    """(...) int32 -> (..., 8) int32 codes, element i from nibble i."""
    return (words[..., None] >> _SHIFTS.to(words.device)) & 0xF


def pack_cols(codes: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[rows, cols] codes -> int32 [rows, cols/8], 8 columns per word (AWQ order if given)."""
    _check_codes(codes, 1)
    groups = codes.reshape(codes.shape[0], -1, 8)
    if order is not None:
        groups = groups[..., list(order)]
    return _pack(groups)


def unpack_cols(words: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of `pack_cols`: int32 [rows, cols/8] -> int32 codes [rows, cols]."""
    nib = _unpack(words)
    if order is not None:
        nib = nib[..., [order.index(j) for j in range(8)]]
    return nib.reshape(words.shape[0], -1)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols] codes -> int32 [rows/8, cols]: nibble j of word r holds row 8r + j."""
    _check_codes(codes, 0)
    return _pack(codes.reshape(-1, 8, codes.shape[1]).transpose(1, 2))


def unpack_rows(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_rows`: int32 [rows/8, cols] -> int32 codes [rows, cols]."""
    return _unpack(words).transpose(1, 2).reshape(-1, words.shape[1])


# --------------------------------------------------------------------------------------------
# Checkpoint formats
# --------------------------------------------------------------------------------------------


def pack_awq(codes: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [in, out], zeros [groups, out] (integers 0..15) -> AWQ (qweight, qzeros)."""
    return pack_cols(codes, AWQ_ORDER), pack_cols(zeros.round().to(torch.int32), AWQ_ORDER)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ (qweight [in, out/8], qzeros [groups, out/8]) -> codes [in, out], zeros [groups, out]."""
    return unpack_cols(qweight, AWQ_ORDER), unpack_cols(qzeros, AWQ_ORDER)


def pack_gptq(
    codes: torch.Tensor, zeros: torch.Tensor, zero_offset: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [in, out], zeros [groups, out] -> GPTQ qweight [in/8, out], qzeros [groups, out/8]."""
    stored = (zeros.round().to(torch.int32) - zero_offset) & 0xF
    return pack_rows(codes), pack_cols(stored)


def unpack_gptq(
    qweight: torch.Tensor, qzeros: torch.Tensor, zero_offset: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (qweight, qzeros) -> codes [in, out], zeros [groups, out] (offset added back)."""
    return unpack_rows(qweight), unpack_cols(qzeros) + zero_offset


# --------------------------------------------------------------------------------------------
# Quantization and references
# --------------------------------------------------------------------------------------------


@dataclass
class Int4Weight:
    """One linear layer's 4-bit weight in the runtime layout (see the module docstring)."""

    qweight: torch.Tensor
    """int32 [in/8, out], rows packed."""
    scales: torch.Tensor
    """[groups, out], float16 or float32."""
    zeros: torch.Tensor
    """[groups, out], same dtype as scales: integers 0..15 for AWQ / GPTQ, any float for
    GGUF blocks (value = a * code + b has zero -b / a)."""
    group_size: int
    g_idx: torch.Tensor | None = None
    """int32 [in] group of each input row, or None for k // group_size."""

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 8

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        g_idx: torch.Tensor | None = None,
    ) -> Int4Weight:
        if g_idx is not None and torch.equal(
            g_idx.to(torch.int64), torch.arange(codes.shape[0], device=g_idx.device) // group_size
        ):
            g_idx = None  # the plain grouping: kernels take the faster path
        return cls(
            qweight=pack_rows(codes.to(torch.int32)),
            scales=scales,
            zeros=zeros.to(scales.dtype),
            group_size=group_size,
            g_idx=None if g_idx is None else g_idx.to(torch.int32),
        )

    def groups(self) -> torch.Tensor:
        """int64 [in]: the group of every input row."""
        if self.g_idx is not None:
            return self.g_idx.to(torch.int64)
        return torch.arange(self.in_features, device=self.qweight.device) // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] (nn.Linear orientation)."""
        return dequantize(
            unpack_rows(self.qweight), self.scales, self.zeros, self.groups(), dtype
        ).T.contiguous()


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    groups: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """codes [in, out], scales / zeros [groups, out], groups [in] -> float [in, out]."""
    g = groups.to(torch.int64)
    return ((codes.to(dtype) - zeros.to(dtype)[g]) * scales.to(dtype)[g]).to(dtype)


def quantize_rtn(
    weight: torch.Tensor, group_size: int, zero_point: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit quantization of a float weight [out, in], per (group of inputs,
    output): returns codes [in, out] int32, scales [in/group, out] float32, zeros [in/group, out]
    float32 (integers). Asymmetric with `zero_point` (scale = (max - min) / 15, zero =
    round(-min / scale)); symmetric otherwise (scale = max|w| / 7.5 rounded to 8 as zero, as
    GPTQ's `sym=True` does with max|w| * 2 / 15)."""
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of group_size {group_size}")
    w = weight.detach().to(torch.float32).T.reshape(in_f // group_size, group_size, out_f)
    if zero_point:
        wmax = w.amax(dim=1).clamp(min=0)
        wmin = w.amin(dim=1).clamp(max=0)
        scales = ((wmax - wmin) / 15).clamp(min=1e-8)
        zeros = torch.round(-wmin / scales).clamp(0, 15)
    else:
        scales = (w.abs().amax(dim=1) * 2 / 15).clamp(min=1e-8)
        zeros = torch.full_like(scales, 8.0)
    codes = torch.round(w / scales[:, None] + zeros[:, None]).clamp(0, 15)
    return codes.reshape(in_f, out_f).to(torch.int32), scales, zeros
