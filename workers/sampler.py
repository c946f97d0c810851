"""Token sampling on tp rank 0, after the LM head.

Per row: OpenAI's logit bias, then, in the order of HF transformers' `generate`, repetition
penalty (then OpenAI's presence and frequency penalties on the generated tokens), vLLM's
allowed token ids and bad words, the allowed tokens of guided output, then either greedy
argmax (temperature 0) or temperature, top-k, top-p, min-p and a seeded draw (an exponential
race, `_draw`).

The helpers take a (batch, vocab) tensor and per-row parameter tensors and return a new tensor
(filtered tokens set to -inf). Parameter tensors may live on the CPU; building them there keeps
the helpers free of device syncs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from dist_runtime.protocol import SampledToken, SamplingSpec

_NEG_INF = float("-inf")

PROMPT_LOGITS_BYTES = 128 << 20
"""Most fp32 logits materialised at once when scoring prompt rows (the log_softmax beside
them doubles it): an 8K-token chunk over a 92K vocabulary would be 3 GB in one piece."""


def apply_repetition_penalty(
    logits: torch.Tensor, histories: list[torch.Tensor], penalties: torch.Tensor
) -> torch.Tensor:
    """HF `RepetitionPenaltyLogitsProcessor` with a penalty per row.

    For every id in a row's history, a negative score is multiplied by the penalty and any other
    score divided by it. Rows whose penalty is 1 are left untouched; ids at or beyond the vocab
    (an embedding larger than the LM head) are ignored, as in HF.
    """
    vocab = logits.shape[-1]
    rows = [i for i, p in enumerate(penalties.cpu().tolist()) if p != 1.0 and histories[i].numel()]
    if not rows:
        return logits
    index = torch.tensor(rows, device=logits.device)
    ids = pad_sequence(
        [histories[i].to(device=logits.device, dtype=torch.long) for i in rows],
        batch_first=True,
        padding_value=vocab,
    ).clamp(max=vocab)  # (rows, max_len)
    padded = F.pad(logits.index_select(0, index), (0, 1))  # (rows, vocab + 1)
    penalty = penalties.to(device=logits.device, dtype=logits.dtype).index_select(0, index)
    penalty = penalty.unsqueeze(1)  # (rows, 1)
    score = padded.gather(1, ids)  # (rows, max_len)
    score = torch.where(score < 0, score * penalty, score / penalty)
    out = logits.clone()
    out[index] = padded.scatter(1, ids, score)[:, :vocab]
    return out


def apply_presence_frequency(
    logits: torch.Tensor,
    outputs: list[torch.Tensor],
    presence: list[float],
    frequency: list[float],
) -> torch.Tensor:
    """OpenAI's penalties (as vLLM applies them): logit -= frequency * count + presence *
    (count > 0), counting each row's generated tokens only."""
    rows = [i for i in range(len(outputs)) if presence[i] or frequency[i]]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    out = logits.clone()
    for i in rows:
        ids = outputs[i].to(device=logits.device, dtype=torch.long)
        counts = torch.bincount(ids[ids < vocab], minlength=vocab).to(logits.dtype)  # (vocab,)
        out[i] -= frequency[i] * counts + presence[i] * (counts > 0).to(logits.dtype)
    return out


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (ties with the k-th are kept, as in HF); 0 disables."""
    vocab = logits.shape[-1]
    k = top_k.to(device="cpu", dtype=torch.long)  # (batch,)
    enabled = (k > 0) & (k < vocab)
    if not bool(enabled.any()):
        return logits
    k = torch.where(enabled, k, 1)
    top = logits.topk(int(k.max()), dim=-1).values  # (batch, max_k)
    kth = top.gather(1, (k - 1).to(logits.device).unsqueeze(1))  # (batch, 1)
    kth = kth.masked_fill(~enabled.to(logits.device).unsqueeze(1), _NEG_INF)
    return logits.masked_fill(logits < kth, _NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering with HF `TopPLogitsWarper` semantics; p >= 1 disables a row.

    Keeps the smallest set of most likely tokens whose cumulative probability reaches p, and
    always the most likely token. Pass `top_p` as float64 to get HF's exact `1 - p` threshold.
    """
    p = top_p.to(device="cpu", dtype=torch.float64)  # (batch,)
    enabled = p < 1.0
    if not bool(enabled.any()):
        return logits
    sorted_logits, sorted_ids = logits.sort(dim=-1)  # ascending, (batch, vocab)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (batch, vocab)
    threshold = (1.0 - p).to(device=logits.device, dtype=logits.dtype).unsqueeze(1)
    remove_sorted = cumulative <= threshold
    remove_sorted[:, -1] = False
    remove_sorted &= enabled.to(logits.device).unsqueeze(1)
    remove = torch.zeros_like(remove_sorted).scatter_(1, sorted_ids, remove_sorted)
    return logits.masked_fill(remove, _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability; 0 disables.

    The ratio to the top probability does not change when earlier filters renormalise, so this
    equals min-p on the temperature-scaled distribution. The top token is always kept.
    """
    m = min_p.to(device="cpu", dtype=torch.float64)  # (batch,)
    if not bool((m > 0).any()):
        return logits
    probs = logits.softmax(dim=-1)  # (batch, vocab)
    top = probs.amax(dim=-1, keepdim=True)  # (batch, 1)
    scale = m.to(device=logits.device, dtype=logits.dtype).unsqueeze(1)
    remove = probs < scale * top
    remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, _NEG_INF)


def warp_logits(logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p for rows that sample (temperature > 0)."""
    temperature = torch.tensor([s.temperature for s in specs], dtype=logits.dtype)
    logits = logits / temperature.to(logits.device).unsqueeze(1)  # (batch, vocab)
    logits = apply_top_k(logits, torch.tensor([s.top_k for s in specs], dtype=torch.long))
    logits = apply_top_p(logits, torch.tensor([s.top_p for s in specs], dtype=torch.float64))
    return apply_min_p(logits, torch.tensor([s.min_p for s in specs], dtype=torch.float64))


class Sampler:
    """Picks one token per row and reports its log-probabilities.

    Log-probabilities (the chosen token's and the top-k list) come from `log_softmax` of the
    raw logits, before repetition penalty, temperature and filters; this is vLLM's default
    "raw logprobs" and does not depend on the sampling settings.
    """

    def sample(
        self,
        logits: torch.Tensor,
        specs: list[SamplingSpec],
        histories: list[torch.Tensor],
        generators: list[torch.Generator],
        seq_ids: list[int],
        output_starts: list[int] | None = None,
        allowed: list[bytes | None] | None = None,
    ) -> list[SampledToken]:
        """Sample a token for each row of `logits` (batch, vocab).

        Row i belongs to seq_ids[i]; histories[i] is the 1-D int64 tensor of every token the
        sequence has seen (prompt and output), generators[i] its random stream (CPU or the
        logits' device), advanced only by rows that sample; output_starts[i] is where the
        generated tokens start in histories[i] (default: the spec's num_prompt_tokens);
        allowed[i], when given and not None, the packed mask of the tokens row i may pick
        (guided output: `SeqStep.allowed_tokens`), applied after the penalties.
        """
        _check_lengths(logits, specs, histories, generators, seq_ids)
        if not specs:
            return []
        logits = logits.float()  # (batch, vocab)
        guided = allowed is not None and any(a is not None for a in allowed)
        if plain_greedy(specs) and not guided:
            return _greedy(logits, seq_ids)
        starts = output_starts or [s.num_prompt_tokens for s in specs]
        penalized = adjusted_logits(logits, specs, histories, starts, allowed if guided else None)
        token_ids = _choose(penalized, specs, generators)
        return _results(logits, token_ids, specs, seq_ids)


def adjusted_logits(
    logits: torch.Tensor,
    specs: list[SamplingSpec],
    histories: list[torch.Tensor],
    output_starts: list[int],
    allowed: Sequence[bytes | None] | None,
) -> torch.Tensor:
    """The fp32 logits a row's token is picked from: logit bias, repetition penalty over its
    history, presence and frequency penalties over its outputs (history[output_start:]), the
    allowed ids and bad words (`apply_token_bans`), then the guided mask (`allowed`, None:
    none), in that order. A row left with no token to pick is a ValueError."""
    penalties = torch.tensor([s.repetition_penalty for s in specs], dtype=torch.float32)
    penalized = apply_repetition_penalty(apply_logit_bias(logits, specs), histories, penalties)
    outputs = [h[start:] for h, start in zip(histories, output_starts)]
    penalized = apply_presence_frequency(
        penalized,
        outputs,
        [s.presence_penalty for s in specs],
        [s.frequency_penalty for s in specs],
    )
    banned = any(s.allowed_ids or s.bad_words for s in specs)
    if banned:
        penalized = apply_token_bans(penalized, specs, outputs)
    if allowed is not None:
        penalized = penalized.masked_fill(~allowed_rows(allowed, logits), _NEG_INF)
    if banned or allowed is not None:  # (a row's max is -inf only when every logit is)
        empty = torch.isneginf(penalized.amax(dim=-1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"no token is left to sample in row {empty[0]}: allowed_token_ids, bad_words "
                "and guided output rule out every one"
            )
    return penalized


def apply_token_bans(
    logits: torch.Tensor, specs: list[SamplingSpec], outputs: list[torch.Tensor]
) -> torch.Tensor:
    """vLLM's allowed_token_ids and bad_words: each row's logits outside its allowed ids, and
    the last token of each bad word whose other tokens end the row's output (`outputs[i]`, its
    generated tokens; a one-token word always), set to -inf in a new tensor."""
    vocab = logits.shape[-1]
    keep = torch.ones_like(logits, dtype=torch.bool, device="cpu")  # (batch, vocab)
    for i, spec in enumerate(specs):
        if spec.allowed_ids:
            keep[i] = _allowed_row(spec, vocab)
        if not spec.bad_words:
            continue
        tail = outputs[i][-max(len(w) for w in spec.bad_words) :].tolist()
        for word in spec.bad_words:
            last, before = word[-1], word[:-1]
            if last < vocab and (not before or tail[len(tail) - len(before) :] == before):
                keep[i, last] = False
    return logits.masked_fill(~keep.to(logits.device), _NEG_INF)


def _allowed_row(spec: SamplingSpec, vocab: int) -> torch.Tensor:
    """(vocab,) bool, true at the spec's allowed ids: built at its first step and kept on the
    spec (a worker holds one spec per sequence for its whole life), so a step costs a copy,
    not a list of ids turned into a tensor per row."""
    cached = spec.__dict__.get("_allowed_row")
    if cached is None or cached.numel() != vocab:
        if spec.allowed_ids[-1] >= vocab:
            raise ValueError(
                f"allowed_token_ids names token {spec.allowed_ids[-1]}, past the {vocab} logits"
            )
        cached = torch.zeros(vocab, dtype=torch.bool)
        cached[torch.tensor(spec.allowed_ids, dtype=torch.long)] = True
        object.__setattr__(spec, "_allowed_row", cached)  # (a frozen dataclass's cache)
    return cached


def verify_draft(
    logits: torch.Tensor,
    draft: list[int],
    spec: SamplingSpec,
    generator: torch.Generator,
    seeds: list[int],
    seq_id: int,
    allowed: list[bytes] | None = None,
    history: torch.Tensor | None = None,
    output_start: int = 0,
) -> list[SampledToken]:
    """The tokens one sequence keeps from a draft: `logits` (len(draft) + 1, vocab) are the
    rows after its last token and after each draft token; `seeds` seed the draw at each row.

    Each row's token is the one plain decoding would pick there: the argmax (greedy) or the
    seeded draw of `_draw` (sampling: temperature, top-k, top-p, min-p), the draw at row j
    seeded by seeds[j]. The draft tokens equal to the pick of the row before them are kept, up
    to the first that is not, and that row's pick comes instead; when all are kept the last
    row's pick follows. `_draw` is an exponential race (the argmax of p / E for i.i.d.
    exponential noise E from the row's seed), so a row's pick is a function of its
    distribution and its seed alone: draft token d_j is kept with probability p_j(d_j), every
    token is distributed as plain sampling's, and a seeded answer is the same token for token
    with drafts or without.

    Logit bias applies, then with penalties the ones of each row's own history (`history`,
    1-D: every token up to the draft's last, outputs from `output_start`; row j sees it without
    the draft tokens after d_j), then with guided output each row's packed mask `allowed` (the
    grammar's state after the draft tokens before it), in `Sampler.sample`'s order.
    Log-probabilities are the raw ones, as `Sampler.sample` reports."""
    n = len(draft)
    if logits.dim() != 2 or logits.shape[0] != n + 1 or len(seeds) != n + 1:
        raise ValueError(
            f"a draft of {n} tokens needs {n + 1} logit rows and seeds, got shape "
            f"{tuple(logits.shape)} and {len(seeds)} seeds"
        )
    if spec.needs_history and history is None:
        raise ValueError(f"seq {seq_id}: a sequence with penalties needs its history")
    logits = logits.float()
    specs = [spec] * (n + 1)
    if history is None:
        rows = [torch.empty(0, dtype=torch.int64)] * (n + 1)
    else:  # row j: the history through draft token j
        rows = [history[: history.numel() - n + j] for j in range(n + 1)]
    biased = adjusted_logits(logits, specs, rows, [output_start] * (n + 1), allowed)
    if spec.temperature == 0.0:
        picks = biased.argmax(dim=-1).tolist()
    else:
        probs = warp_logits(biased, specs).softmax(dim=-1)  # (n + 1, vocab)
        picks = []
        for j in range(n + 1):
            generator.manual_seed(seeds[j])
            picks.append(int(_draw(probs[j], generator)))
    chosen: list[int] = []
    while len(chosen) < n and draft[len(chosen)] == picks[len(chosen)]:
        chosen.append(draft[len(chosen)])
    chosen.append(picks[len(chosen)])
    m = len(chosen)
    token_ids = torch.tensor(chosen, dtype=torch.long, device=logits.device)
    return _results(logits[:m], token_ids, [spec] * m, [seq_id] * m)


def apply_logit_bias(logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
    """OpenAI's logit bias: each row's (token, bias) pairs added to its logits (a new tensor
    when any row has some; the raw logits stay for the log-probabilities)."""
    rows = [i for i, s in enumerate(specs) if s.bias_ids]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    for i in rows:
        if specs[i].bias_ids[-1] >= vocab:
            raise ValueError(
                f"logit_bias names token {specs[i].bias_ids[-1]}, past the {vocab} logits"
            )
    row_idx = torch.tensor([i for i in rows for _ in specs[i].bias_ids])
    col_idx = torch.tensor([t for i in rows for t in specs[i].bias_ids])
    values = torch.tensor([b for i in rows for b in specs[i].bias_values], dtype=logits.dtype)
    return logits.index_put(
        (row_idx.to(logits.device), col_idx.to(logits.device)),
        values.to(logits.device),
        accumulate=True,
    )


MASK_CACHE_ROWS = 64
"""Unpacked allowed-token masks a sampler keeps (least recently used out): a request's
min_tokens mask is the same every step, a grammar's states recur."""
_mask_rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()
_mask_lock = threading.Lock()


def _mask_row(mask: bytes, vocab: int) -> torch.Tensor:
    """(vocab,) bool of one packed mask (least significant bit first), from the cache."""
    with _mask_lock:
        row = _mask_rows.get(mask)
        if row is not None and row.numel() == vocab:
            _mask_rows.move_to_end(mask)
            return row
    packed = torch.frombuffer(bytearray(mask), dtype=torch.uint8)
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1  # (nbytes, 8)
    row = bits.reshape(-1)[:vocab].bool()
    if not bool(row.any()):
        raise ValueError("an allowed-token mask allows no token")
    with _mask_lock:
        _mask_rows[mask] = row
        while len(_mask_rows) > MASK_CACHE_ROWS:
            _mask_rows.popitem(last=False)
    return row


def allowed_rows(allowed: Sequence[bytes | None], logits: torch.Tensor) -> torch.Tensor:
    """(batch, vocab) bool on the logits' device from packed masks (None: every token)."""
    batch, vocab = logits.shape
    nbytes = (vocab + 7) // 8
    rows = torch.ones((batch, vocab), dtype=torch.bool)
    for i, mask in enumerate(allowed):
        if mask is None:
            continue
        if len(mask) != nbytes:
            raise ValueError(
                f"an allowed-token mask of {len(mask)} bytes for {vocab} logits (want {nbytes})"
            )
        rows[i] = _mask_row(bytes(mask), vocab)
    return rows.to(logits.device, non_blocking=True)


def _choose(
    logits: torch.Tensor, specs: list[SamplingSpec], generators: list[torch.Generator]
) -> torch.Tensor:
    """(batch,) token ids on the logits' device: argmax for greedy rows, a draw from the warped
    distribution for the others; nothing is read back to the host."""
    greedy = [i for i, s in enumerate(specs) if s.temperature == 0.0]
    if len(greedy) == len(specs):
        return logits.argmax(dim=-1)
    token_ids = torch.empty(len(specs), dtype=torch.long, device=logits.device)  # (batch,)
    if greedy:
        rows = torch.tensor(greedy, device=logits.device)
        token_ids[rows] = logits.index_select(0, rows).argmax(dim=-1)
    sampled = [i for i, s in enumerate(specs) if s.temperature != 0.0]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        warped = warp_logits(logits.index_select(0, rows), [specs[i] for i in sampled])
        probs = warped.softmax(dim=-1)  # (rows, vocab)
        draws = [_draw(probs[j], generators[i]) for j, i in enumerate(sampled)]
        token_ids[rows] = torch.cat(draws)
    return token_ids


def sample_on_device(
    logits: torch.Tensor, specs: list[SamplingSpec], generators: list[torch.Generator]
) -> torch.Tensor:
    """`Sampler.sample`'s tokens and chosen log-probabilities as (batch, 2) float64 (token id,
    raw log-probability) rows left on the logits' device, for rows that need no history
    (penalties) and no top-k list (`samples_on_device`): a step launched ahead takes its ids
    from them without a read-back. Generators are seeded by the caller, as for `sample`."""
    if not samples_on_device(specs):
        raise ValueError("sample_on_device takes rows without penalties or top-k log-probs")
    logits = logits.float()
    token_ids = _choose(logits, specs, generators)
    picked = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    chosen = picked - torch.logsumexp(logits, dim=-1)
    return torch.stack((token_ids.double(), chosen.double()), dim=1)


def samples_on_device(specs: list[SamplingSpec]) -> bool:
    """Every row's token and log-probability can be picked without a host read: no history
    (penalties), no top-k list and no logit bias; greedy or any temperature / top-k / top-p /
    min-p."""
    return all(s.logprobs <= 0 and not s.needs_history and not s.adjusts_logits for s in specs)


def _check_lengths(
    logits: torch.Tensor,
    specs: list[SamplingSpec],
    histories: list[torch.Tensor],
    generators: list[torch.Generator],
    seq_ids: list[int],
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    lengths = {len(specs), len(histories), len(generators), len(seq_ids)}
    if lengths != {batch}:
        raise ValueError(
            f"{batch} logit rows but {len(specs)} specs, {len(histories)} histories, "
            f"{len(generators)} generators and {len(seq_ids)} seq ids"
        )


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw from `probs` (vocab,) on the generator's device, returns (1,): the argmax of
    probs / E with E i.i.d. exponential noise from the generator (an exponential race, which
    picks token i with probability probs[i], as vLLM's sampler does). The pick is fixed by the
    distribution and the generator's state alone, which lets a speculative step check a draft
    token against the very token plain decoding would draw (`verify_draft`)."""
    on_gen = probs if probs.device.type == generator.device.type else probs.to(generator.device)
    noise = torch.empty_like(on_gen, dtype=torch.float32).exponential_(generator=generator)
    race = on_gen.float() / noise.clamp_min_(torch.finfo(torch.float32).tiny)
    return race.argmax().reshape(1).to(probs.device)


def plain_greedy(specs: list[SamplingSpec]) -> bool:
    """Every row greedy, with no top-k list, no penalty and no logit bias: its token and
    log-probability are the argmax and the logit minus the row's log-sum-exp, nothing else."""
    return all(
        s.temperature == 0.0 and s.logprobs <= 0 and not s.needs_history and not s.adjusts_logits
        for s in specs
    )


def _greedy(logits: torch.Tensor, seq_ids: list[int]) -> list[SampledToken]:
    """Argmax rows with their raw log-probabilities and no top-k lists (the common decode step):
    the same values as the general path, read back in one device-to-host copy."""
    token_ids = logits.argmax(dim=-1)  # (batch,)
    picked = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    chosen = picked - torch.logsumexp(logits, dim=-1)
    return greedy_tokens(torch.stack((token_ids.double(), chosen.double()), dim=1), seq_ids)


def greedy_tokens(picked: torch.Tensor, seq_ids: list[int]) -> list[SampledToken]:
    """Sampled tokens from (rows, 2) float64 (token id, log-probability) rows, read back in one
    copy."""
    return [
        SampledToken(seq_id=seq_id, token_id=int(t), logprob=lp, top_ids=[], top_logprobs=[])
        for seq_id, (t, lp) in zip(seq_ids, picked.tolist())
    ]


def _results(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    specs: list[SamplingSpec],
    seq_ids: list[int],
) -> list[SampledToken]:
    """Package the chosen tokens with their raw log-probabilities, from the (batch, vocab)
    fp32 logits: the chosen token's is its logit minus the row's log-sum-exp, so the full
    log_softmax is only built when some row asks for its top-k list."""
    max_k = min(max(s.logprobs for s in specs), logits.shape[-1])
    top_lp: list[list[float]] = [[] for _ in specs]
    top_ids: list[list[int]] = [[] for _ in specs]
    if max_k > 0:
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
        values, indices = logprobs.topk(max_k, dim=-1)  # (batch, max_k)
        top_lp, top_ids = values.tolist(), indices.tolist()
    else:
        picked = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # (batch,)
        chosen = (picked - torch.logsumexp(logits, dim=-1)).tolist()
    return [
        SampledToken(
            seq_id=seq_id,
            token_id=token_id,
            logprob=chosen[i],
            top_ids=top_ids[i][: max(spec.logprobs, 0)],
            top_logprobs=top_lp[i][: max(spec.logprobs, 0)],
        )
        for i, (seq_id, token_id, spec) in enumerate(zip(seq_ids, token_ids.tolist(), specs))
    ]


def score_rows(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    top_k: int,
    vocab_size: int,
    keep: bool = True,
) -> tuple[list[float], list[int], list[float]]:
    """Raw log-probability of each row's target and the row's top_k, over hidden (rows,
    hidden) and targets (rows,), in slices of at most PROMPT_LOGITS_BYTES of logits.

    Every tp rank must call this with the same row count (the LM head gathers each slice);
    ranks that do not keep the values (keep=False) skip the softmax and return empty lists.
    Returns (logprobs (rows,), top ids and top logprobs (rows * top_k,), row after row).
    """
    step = max(1, PROMPT_LOGITS_BYTES // (4 * vocab_size))
    chosen: list[float] = []
    top_ids: list[int] = []
    top_lp: list[float] = []
    k = min(top_k, vocab_size)
    for lo in range(0, hidden.shape[0], step):
        logits = compute_logits(hidden[lo : lo + step])  # (rows, vocab) fp32
        if not keep:
            continue
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        del logits
        index = targets[lo : lo + step].to(logprobs.device).unsqueeze(1)
        chosen += logprobs.gather(1, index).squeeze(1).tolist()
        if k > 0:
            values, ids = logprobs.topk(k, dim=-1)  # (rows, k)
            top_lp += values.flatten().tolist()
            top_ids += ids.flatten().tolist()
    return chosen, top_ids, top_lp
