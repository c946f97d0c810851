"""RoPE frequencies, with the scaling a checkpoint asks for."""

from __future__ import annotations

import math

import torch
from torch import nn

from dist_runtime.config import ModelConfig, RopeScaling
from kernels.dispatch import use_triton
from kernels.rotary import rotary, rotary_cos_sin, rotate


def inverse_frequencies(head_dim: int, theta: float, linear_factor: float = 1.0) -> torch.Tensor:
    """(head_dim // 2,) fp32; linear scaling divides positions, i.e. the frequencies, by factor.

    Same formula as HF's default RoPE init: 1 / theta ** (2i / head_dim).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents) / linear_factor


def llama3_frequencies(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1's frequency scaling (HF's `rope_type: llama3`, the same float32 ops): a
    wavelength longer than original / low_freq_factor is stretched `factor` times, one shorter
    than original / high_freq_factor kept, and one between blended smoothly."""
    old = scaling.original_max_position_embeddings
    low, high, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, blended, scaled)


def yarn_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """YaRN's frequencies (HF's `rope_type: yarn`, the same float32 ops): dimensions that turn
    more than beta_fast times over the trained length keep their frequency, those turning
    fewer than beta_slow times are interpolated (divided by `factor`), a linear ramp between."""

    def dim_of(rotations: float) -> float:
        trained = scaling.original_max_position_embeddings
        return head_dim * math.log(trained / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(scaling.beta_fast), dim_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # (HF's guard against a zero-width ramp)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (scaling.factor * pos_freqs)
    keep = 1 - ramp
    return interpolated * (1 - keep) + extrapolated * keep


def longrope_frequencies(head_dim: int, theta: float, factors: tuple[float, ...]) -> torch.Tensor:
    """LongRoPE's frequencies (HF's `rope_type: longrope`, the same float32 ops): each default
    frequency divided by its own factor."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta**exponents)


def model_frequencies(config: ModelConfig, theta: float | None = None) -> torch.Tensor:
    """(head_dim // 2,) fp32: the model's RoPE frequencies with its scaling (linear divides
    them; llama3 rescales them by wavelength; dynamic NTK changes only the base, `theta`;
    LongRoPE divides them by its short factors, or its long ones for a negative `theta`, see
    `ModelConfig.rope_base`). With partial RoPE (`ModelConfig.rotary_dim`) the pairs past the
    turned ones get frequency 0 (the loader's row order puts the passed-through dimensions
    there)."""
    inv = _frequencies(config, config.rope_theta if theta is None else theta)
    if config.rope_dim < config.head_dim:  # (partial RoPE: the passed-through pairs turn at 0)
        inv = torch.cat([inv, inv.new_zeros((config.head_dim - config.rope_dim) // 2)])
    return inv


def _frequencies(config: ModelConfig, base: float) -> torch.Tensor:
    """(rope_dim // 2,) frequencies of the dimensions RoPE turns."""
    scaling, dim = config.rope_scaling, config.rope_dim
    if scaling is not None and scaling.type == "longrope":
        factors = scaling.long_factor if base < 0 else scaling.short_factor
        return longrope_frequencies(dim, abs(base), factors)
    if scaling is not None and scaling.type == "linear":
        return inverse_frequencies(dim, base, scaling.factor)
    if scaling is not None and scaling.type == "yarn":
        return yarn_frequencies(dim, base, scaling)
    inv = inverse_frequencies(dim, base)
    if scaling is not None and scaling.type == "llama3":
        return llama3_frequencies(inv, scaling)
    return inv


class RotaryEmbedding(nn.Module):
    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig, device: torch.device, theta: float | None = None):
        """`theta`: a base of its own with no scaling (Gemma 3's sliding-window layers), which
        also ignores the frequencies a request brings; None: the model's RoPE."""
        super().__init__()
        self.fixed = theta is not None
        """Requests' own frequencies (`AttentionMetadata.rope_inv_freq`) do not apply."""
        if theta is None:
            # Dynamic NTK keeps the trained base for prompts within max_position_embeddings (a
            # longer one brings its own frequencies: `ModelRunner._rope_inv_freq`).
            inv = model_frequencies(config)
        else:
            inv = inverse_frequencies(config.head_dim, theta)
        self.register_buffer("inv_freq", inv.to(device), persistent=False)
        self._key: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] = (inv, inv)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        positions: torch.Tensor,
        inv_freq: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """inv_freq: (tokens, head_dim // 2) frequencies per token (requests with their own
        RoPE base); None: the model's."""
        inv_freq = None if self.fixed else inv_freq
        inv = self.inv_freq if inv_freq is None else inv_freq
        if use_triton(q.device):
            return rotary(q, k, positions, inv)
        cos, sin = self.cos_sin(positions, inv_freq)
        return rotate(q, cos, sin), rotate(k, cos, sin)

    def cos_sin(
        self, positions: torch.Tensor, inv_freq: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of `rotary_cos_sin` for the step's positions (and per-token frequencies,
        if any). Every layer of a step passes the same tensors, so the angles are computed once
        per step, not per layer."""
        inv_freq = None if self.fixed else inv_freq
        key = (positions, inv_freq)
        if self._key is None or any(a is not b for a, b in zip(key, self._key)):
            self._key = key
            inv = self.inv_freq if inv_freq is None else inv_freq
            self._cos_sin = rotary_cos_sin(positions, inv)
        return self._cos_sin
