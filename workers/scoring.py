"""Teacher-forced scoring of a text on one in-process worker: the negative log-likelihood of
each token given the tokens before it, read through the paged KV cache.

Every step stores its K/V in the cache and then attends to the cache, so with KV quantization
(`cache.quant_policy` 8 or 4) each token is predicted from the quantized K/V of everything
before it (and of itself), as in serving. Prefill chunks and one-token decode steps both work
that way; `decode_last` runs the tail through the decode path, so a caller can check the two
agree. tp * cp must be 1 (the worker computes the whole vocabulary itself).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import msgpack
import torch

from dist_runtime.config import RuntimeConfig
from workers.layers.attention import AttentionMetadata
from workers.layers.rotary import model_frequencies
from workers.worker import Worker


@dataclass(frozen=True)
class Score:
    nll: list[float]
    """-log p(token i | tokens < i) for i = 1 .. len - 1, in nats."""
    decode_seconds: list[float]
    """Wall time of each one-token decode step (device synchronized)."""

    @property
    def mean_nll(self) -> float:
        return sum(self.nll) / len(self.nll)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


class Scorer:
    """One worker (the runtime's own model code and KV cache) for teacher-forced scoring."""

    def __init__(self, config: RuntimeConfig, max_tokens: int):
        if config.parallel.world_size != 1:
            raise ValueError(f"scoring runs one worker; got tp*cp = {config.parallel.world_size}")
        self.worker = Worker(msgpack.packb(config.to_dict()), rank=0)
        self.worker.init_model("127.0.0.1", 0)
        self.block_size = config.cache.block_size
        self.num_blocks = -(-max_tokens // self.block_size)
        self.worker.allocate_kv_cache(self.num_blocks)
        runner = self.worker.runner
        assert runner is not None
        self.runner = runner

    def close(self) -> None:
        self.worker.shutdown()

    @torch.inference_mode()
    def score(self, token_ids: list[int], chunk: int = 512, decode_last: int = 0) -> Score:
        """NLL of every token after the first; the last `decode_last` tokens are fed one at a
        time (decode steps), the rest in prefill chunks of `chunk` tokens."""
        n = len(token_ids)
        if not 2 <= n <= self.num_blocks * self.block_size:
            raise ValueError(f"score 2..{self.num_blocks * self.block_size} tokens, got {n}")
        runner, dev = self.runner, self.runner.device
        assert runner.kv_cache is not None
        table = torch.arange(self.num_blocks, dtype=torch.int32, device=dev)[None]
        ids = torch.tensor(token_ids, dtype=torch.int64, device=dev)
        # The text's RoPE frequencies as a request with it as its prompt gets them (dynamic NTK's
        # base, LongRoPE's long factors past the trained length), for every step.
        config = runner.model_config
        base = config.rope_base(n)
        inv = None
        if base != config.rope_theta:
            inv = model_frequencies(config, base).to(dev)
        bounds, start = [], 0
        while start < n:
            step = 1 if start >= n - decode_last else min(chunk, n - decode_last - start)
            bounds.append((start, start + step))
            start += step
        nll: list[float] = []
        decode_seconds: list[float] = []
        for lo, hi in bounds:
            started = time.perf_counter()
            pos = torch.arange(lo, hi, dtype=torch.int64, device=dev)
            meta = AttentionMetadata(
                slot_mapping=pos,  # block i of the table is block id i: slot == position
                block_tables=table,
                cu_seqlens_q=torch.tensor([0, hi - lo], dtype=torch.int64, device=dev),
                context_lens=torch.tensor([hi], dtype=torch.int64, device=dev),
                is_decode=hi - lo == 1,
                rope_inv_freq=None if inv is None else inv.repeat(hi - lo, 1),
            )
            hidden = runner.model(ids[lo:hi], pos, meta, runner.kv_cache.layers)
            targets = ids[lo + 1 : hi + 1]
            logits = runner.model.compute_logits(hidden[: targets.numel()])
            logp = torch.log_softmax(logits.float(), dim=-1)
            nll.extend((-logp.gather(1, targets[:, None])[:, 0]).tolist())  # syncs the device
            if hi - lo == 1:
                decode_seconds.append(time.perf_counter() - started)
        return Score(nll=nll, decode_seconds=decode_seconds)
