"""Achieved memory bandwidth of the elementwise Triton kernels against their torch references.

    python bench/kernel_bench_elementwise.py        # on a CUDA machine; one line per kernel

Shapes are one 16K-token prefill of a Llama-3-8B-sized layer at tp=1 in bf16: hidden 4096,
32 query / 8 KV heads of 128, intermediate 14336. GB/s counts the bytes each kernel must read
and write once (inputs, outputs; the weight and positions too), divided by the median time of
`triton.testing.do_bench`; the reference's extra temporaries are not counted, so its GB/s is the
bandwidth it would need to match, not what it moved.

The fused RoPE + KV-store kernel (`kernels/rotary_store.py`) is timed against the two Triton
kernels it replaces (rotary, then store_kv), at the prefill shape and at decode batches of 1
and 8 tokens, where a layer's small kernels cost about their launch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from kernels.rms_norm import rms_norm_ref, rms_norm_triton  # noqa: E402
from kernels.rotary import rotary_ref, rotary_triton  # noqa: E402
from kernels.rotary_store import rotary_store_triton  # noqa: E402
from kernels.silu_and_mul import silu_and_mul_ref, silu_and_mul_triton  # noqa: E402
from kernels.store_kv import store_kv_ref, store_kv_triton  # noqa: E402

SEED = 0
TOKENS = 16384
HIDDEN = 4096
Q_HEADS = 32
KV_HEADS = 8
HEAD_DIM = 128
INTER = 14336
BLOCK_SIZE = 16
DTYPE = torch.bfloat16


def bench_elementwise(device: torch.device | str = "cuda") -> list[dict]:
    """Time each kernel's Triton and torch versions; one dict per kernel.

    Keys: kernel, shape, bytes, triton_ms, torch_ms, triton_gbps, torch_gbps, speedup, baseline
    (what the torch_* keys timed: the torch reference, or for the fused kernel the two Triton
    kernels it replaces).
    Raises RuntimeError off CUDA (the Triton kernels only compile for CUDA devices).
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"bench_elementwise needs a CUDA device, got {device}")
    import triton.testing

    torch.manual_seed(SEED)
    results = []
    for name, shape, num_bytes, fns in _workloads(device):
        baseline = "torch" if "torch" in fns else "separate"
        ms = {impl: triton.testing.do_bench(fn) for impl, fn in fns.items()}
        ms["torch"] = ms.pop(baseline)
        results.append(
            dict(
                kernel=name,
                shape=shape,
                bytes=num_bytes,
                triton_ms=ms["triton"],
                torch_ms=ms["torch"],
                triton_gbps=num_bytes / ms["triton"] / 1e6,
                torch_gbps=num_bytes / ms["torch"] / 1e6,
                speedup=ms["torch"] / ms["triton"],
                baseline=baseline,
            )
        )
    return results


Workload = tuple[str, str, int, dict[str, Callable[[], object]]]


def _workloads(device: torch.device) -> list[Workload]:
    """(name, shape, bytes read + written, {impl: call}) per kernel; first calls are warm-ups."""
    el = torch.finfo(DTYPE).bits // 8
    t = TOKENS

    x = torch.randn(t, HIDDEN, dtype=DTYPE, device=device)
    residual = torch.randn_like(x)
    weight = torch.randn(HIDDEN, dtype=DTYPE, device=device)
    norm_bytes = 4 * t * HIDDEN * el + HIDDEN * el  # read x, residual; write out, x + residual

    qkv_size = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
    qkv = torch.randn(t, qkv_size, dtype=DTYPE, device=device)
    q = qkv[:, : Q_HEADS * HEAD_DIM].view(t, Q_HEADS, HEAD_DIM)
    k = qkv[:, Q_HEADS * HEAD_DIM : (Q_HEADS + KV_HEADS) * HEAD_DIM].view(t, KV_HEADS, HEAD_DIM)
    v = qkv[:, (Q_HEADS + KV_HEADS) * HEAD_DIM :].view(t, KV_HEADS, HEAD_DIM)
    positions = torch.arange(t, device=device) + 1_000_000
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM)
    rot_bytes = 2 * t * (Q_HEADS + KV_HEADS) * HEAD_DIM * el + 8 * t + 4 * HEAD_DIM // 2

    gate_up = torch.randn(t, 2 * INTER, dtype=DTYPE, device=device)
    silu_bytes = 3 * t * INTER * el

    num_blocks = 2 * t // BLOCK_SIZE
    cache_shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_cache = torch.zeros(cache_shape, dtype=DTYPE, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:t]
    store_bytes = 4 * t * KV_HEADS * HEAD_DIM * el + 8 * t  # read k, v; write two cache rows

    def fused(tokens: int) -> Workload:
        """Fused RoPE + store against rotary then store_kv, on the first `tokens` rows."""
        qt, kt, vt, pt, st = q[:tokens], k[:tokens], v[:tokens], positions[:tokens], slots[:tokens]

        def separate() -> None:
            q_out, k_out = rotary_triton(qt, kt, pt, inv_freq)
            store_kv_triton(k_out, vt, k_cache, v_cache, st)

        nbytes = tokens * (2 * Q_HEADS + 3 * KV_HEADS) * HEAD_DIM * el + 16 * tokens
        return (
            "rotary+store fused",
            f"{tokens} tokens (vs rotary, store_kv)",
            nbytes,
            dict(
                triton=lambda: rotary_store_triton(qt, kt, vt, pt, inv_freq, k_cache, v_cache, st),
                separate=separate,
            ),
        )

    return [
        fused(1),
        fused(8),
        fused(t),
        (
            "rms_norm+residual",
            f"({t}, {HIDDEN})",
            norm_bytes,
            dict(
                triton=lambda: rms_norm_triton(x, weight, 1e-5, residual),
                torch=lambda: rms_norm_ref(x, weight, 1e-5, residual),
            ),
        ),
        (
            "rotary",
            f"q ({t}, {Q_HEADS}, {HEAD_DIM}) k ({t}, {KV_HEADS}, {HEAD_DIM})",
            rot_bytes,
            dict(
                triton=lambda: rotary_triton(q, k, positions, inv_freq),
                torch=lambda: rotary_ref(q, k, positions, inv_freq),
            ),
        ),
        (
            "silu_and_mul",
            f"({t}, {2 * INTER})",
            silu_bytes,
            dict(
                triton=lambda: silu_and_mul_triton(gate_up),
                torch=lambda: silu_and_mul_ref(gate_up),
            ),
        ),
        (
            "store_kv",
            f"k, v ({t}, {KV_HEADS}, {HEAD_DIM}) block {BLOCK_SIZE}",
            store_bytes,
            dict(
                triton=lambda: store_kv_triton(k, v, k_cache, v_cache, slots),
                torch=lambda: store_kv_ref(k, v, k_cache, v_cache, slots),
            ),
        ),
    ]


def main() -> int:
    if not torch.cuda.is_available():
        print("kernel_bench_elementwise: skipped, no CUDA device", file=sys.stderr)
        return 0
    import triton

    print(
        f"{torch.cuda.get_device_name()} torch {torch.__version__} "
        f"triton {triton.__version__} {DTYPE}"
    )
    for r in bench_elementwise("cuda"):
        print(
            f"{r['kernel']:<18} {r['shape']:<44} triton {r['triton_ms']:7.3f} ms "
            f"{r['triton_gbps']:6.0f} GB/s | {r['baseline']} {r['torch_ms']:7.3f} ms "
            f"{r['torch_gbps']:6.0f} GB/s | x{r['speedup']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
