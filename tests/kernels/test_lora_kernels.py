"""The batched LoRA kernels (`kernels/lora.py`): shrink + expand in Triton and their torch twin,
each against a float64 formula, over batches mixing adapter slots with base rows (slot 0, left
untouched), ranks that are not powers of two, widths that are not multiples of the blocks, and
half-precision outputs; and the dispatch between them.

Without CUDA the Triton kernels run in Triton's interpreter (see conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import kernels.lora as LK
from dist_runtime.config import KERNELS_ENV

try:
    import triton
except ImportError:
    triton = None


def _skip_reason() -> str | None:
    if triton is None:
        return "triton is not installed"
    if torch.cuda.is_available():
        return None
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(LK._shrink_kernel, InterpretedFunction):
        return "triton was imported before TRITON_INTERPRET=1; run tests/kernels on its own"
    return None


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SKIP = _skip_reason()


Case = tuple[int, int, int, int, list[int]]


def _case(case: Case, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    rows, in_f, out_f, rank, slots = case
    gen = torch.Generator().manual_seed(seed)
    num_slots = max(slots) + 2  # one slot no row uses
    x = torch.randn(rows, in_f, generator=gen).to(dtype)
    a = torch.randn(num_slots, rank, in_f, generator=gen).to(dtype) / in_f**0.5
    b = torch.randn(num_slots, out_f, rank, generator=gen).to(dtype) / rank**0.5
    a[0].zero_()
    b[0].zero_()
    y = torch.randn(rows, out_f, generator=gen).to(dtype)
    s = torch.tensor(slots, dtype=torch.int64)
    return x, a, b, s, y


def _expected(x, a, b, s, y) -> torch.Tensor:  # type: ignore[no-untyped-def]
    out = y.double().clone()
    for i, slot in enumerate(s.tolist()):
        if slot:
            out[i] += b[slot].double() @ (a[slot].double() @ x[i].double())
    return out


CASES: list[Case] = [
    # rows, in, out, rank, slots of the rows
    (1, 64, 96, 8, [1]),
    (5, 200, 130, 12, [0, 2, 1, 0, 2]),  # base rows between adapter rows; rank 12
    (8, 257, 300, 16, [3, 3, 3, 1, 0, 2, 3, 1]),
    (3, 96, 40, 40, [0, 0, 0]),  # no adapter row: nothing changes
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[f"rows{c[0]}-r{c[3]}" for c in CASES])
def test_reference_matches_float64(case: Case, dtype: torch.dtype) -> None:
    x, a, b, s, y = _case(case, dtype, seed=1)
    want = _expected(x, a, b, s, y)
    base = [i for i, slot in enumerate(case[4]) if slot == 0]
    got = LK.lora_add_ref(x, a, b, s, y.clone())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    assert torch.equal(got[base], y[base])  # base rows are left exactly as they were


@pytest.mark.skipif(SKIP is not None, reason=SKIP or "")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[f"rows{c[0]}-r{c[3]}" for c in CASES])
def test_triton_matches_float64(case: Case, dtype: torch.dtype) -> None:
    x, a, b, s, y = (t.to(DEVICE) for t in _case(case, dtype, seed=2))
    want = _expected(x.cpu(), a.cpu(), b.cpu(), s.cpu(), y.cpu())
    got = LK.lora_add_triton(x, a, b, s, y.clone()).cpu()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    base = [i for i, slot in enumerate(case[4]) if slot == 0]
    assert torch.equal(got[base], y.cpu()[base])
    assert got.dtype == dtype


def test_shapes_are_checked() -> None:
    x, a, b, s, y = _case((2, 16, 8, 4, [1, 0]), torch.float32, seed=3)
    with pytest.raises(ValueError, match="a must be"):
        LK.lora_add_ref(x, a[:, :, :8], b, s, y)
    with pytest.raises(ValueError, match="b must be"):
        LK.lora_add_ref(x, a, b[:, :, :2], s, y)
    with pytest.raises(ValueError, match="slots"):
        LK.lora_add_ref(x, a, b, s[:1], y)


def test_dispatch_runs_the_reference_off_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    x, a, b, s, y = _case((2, 16, 8, 4, [1, 0]), torch.float32, seed=4)
    monkeypatch.setenv(KERNELS_ENV, "torch")
    calls: list[str] = []
    monkeypatch.setattr(LK, "lora_add_triton", lambda *t: calls.append("triton"))
    LK.lora_add(x, a, b, s, y.clone())
    assert calls == []
    if SKIP is None:
        monkeypatch.setenv(KERNELS_ENV, "triton")
        LK.lora_add(x, a, b, s, y.clone())
        assert calls == ["triton"]
