"""Write a step's new K/V into their paged-cache slots."""

from __future__ import annotations

import torch


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v: (tokens, kv_heads, head_dim); caches: (num_blocks, block_size, kv_heads, head_dim).

    slot_mapping: (tokens,) int64, slot = block_id * block_size + offset in block.
    """
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    k_cache.view(num_blocks * block_size, kv_heads, head_dim)[slot_mapping] = k
    v_cache.view(num_blocks * block_size, kv_heads, head_dim)[slot_mapping] = v


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
