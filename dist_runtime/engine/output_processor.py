"""Token post-processing on the engine thread: detokenize, stop checks, logprobs.

The stop decision lives here and nowhere else: EOS (unless ignore_eos), stop token ids, stop
strings (the text is cut before them), the end of a guided output's JSON value, max_new_tokens
and session_len.
"""

from __future__ import annotations

import logging

from dist_runtime.engine.outputs import RequestDelta, RequestOutput, TokenLogprobs
from dist_runtime.engine.scheduler import Sequence
from dist_runtime.protocol import PromptLogprobs, SampledToken

logger = logging.getLogger(__name__)


class OutputProcessor:
    def __init__(self, eos_token_ids: set[int], session_len: int):
        self.eos_token_ids = eos_token_ids
        self.session_len = session_len

    @staticmethod
    def record_prompt_logprobs(seq: Sequence, scored: PromptLogprobs) -> None:
        """Store a chunk's scored rows at their positions (a recompute overwrites them)."""
        prompt, k = seq.prompt_token_ids, scored.top_k
        if not seq.prompt_logprobs:
            seq.prompt_logprobs = [None] * len(prompt)
        for i, logprob in enumerate(scored.logprobs):
            pos = scored.start_pos + i + 1
            top = dict(
                zip(scored.top_ids[i * k : (i + 1) * k], scored.top_logprobs[i * k : (i + 1) * k])
            )
            seq.num_prompt_logprobs += seq.prompt_logprobs[pos] is None
            seq.prompt_logprobs[pos] = TokenLogprobs(prompt[pos], logprob, top)

    def process(self, seq: Sequence, tok: SampledToken) -> RequestDelta:
        """Record a sampled token on seq; the delta's finish_reason says whether it ended."""
        if seq.params.max_new_tokens == 0:
            # The prompt only: the token the prompt's last chunk sampled is not part of it.
            none: list[TokenLogprobs] | None = [] if seq.params.logprobs is not None else None
            return RequestDelta([], "", none, "length", _prompt_logprobs(seq))
        seq.output_token_ids.append(tok.token_id)
        if seq.thinking is not None:
            seq.thinking.advance(seq.output_token_ids)
        logprobs = None
        if seq.params.logprobs is not None:
            entry = TokenLogprobs(
                tok.token_id, tok.logprob, dict(zip(tok.top_ids, tok.top_logprobs))
            )
            seq.logprobs.append(entry)
            logprobs = [entry]
        text_state = seq.text_state
        # The EOS or stop token that ends a request adds no text, even when special tokens
        # are kept (skip_special_tokens=False), as in vLLM: the answer is what came before it.
        if self._is_stop_token(seq, tok.token_id):
            reason: str | None = "stop"
        elif text_state is not None and text_state.add(
            tok.token_id, armed=len(seq.output_token_ids) >= seq.params.min_tokens
        ):
            reason = "stop"  # a stop string
        else:
            reason = self._stop_reason(seq, tok.token_id)
        text = ""
        if text_state is not None:
            if reason is not None:
                text_state.finish()
            text = text_state.release(reason is not None)
        prompt_logprobs = _prompt_logprobs(seq) if len(seq.output_token_ids) == 1 else None
        return RequestDelta([tok.token_id], text, logprobs, reason, prompt_logprobs)

    def _is_stop_token(self, seq: Sequence, token_id: int) -> bool:
        p = seq.params
        return (not p.ignore_eos and token_id in self.eos_token_ids) or token_id in p.stop_token_ids

    def _stop_reason(self, seq: Sequence, token_id: int) -> str | None:
        """Why a request ends at an ordinary token (not a stop token or string), if it does."""
        guide = seq.guide
        if guide is not None:
            if not guide.advance(token_id):  # the mask allowed it: a bug, but end cleanly
                logger.error("seq %d: token %d left its JSON grammar", seq.seq_id, token_id)
                return "stop"
            if guide.ended:  # the value is complete and nothing may follow it
                return "stop"
            if not guide.can_go_on():
                logger.warning(
                    "seq %d: no token of the vocabulary continues its JSON; ending it here",
                    seq.seq_id,
                )
                return "stop"
        full = seq.num_tokens >= self.session_len
        if len(seq.output_token_ids) >= seq.params.max_new_tokens or full:
            return "length"
        return None

    def output(self, seq: Sequence, finish_reason: str) -> RequestOutput:
        text_state = seq.text_state
        if text_state is not None and finish_reason == "abort":
            text_state.finish()
        return RequestOutput(
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=text_state.text if text_state is not None else "",
            finish_reason=finish_reason,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens,
            prompt_logprobs=_prompt_logprobs(seq),
            stop_reason=self._stop_cause(seq) if finish_reason == "stop" else None,
            num_draft_tokens=seq.num_drafted,
            num_accepted_draft_tokens=seq.num_accepted,
        )

    def _stop_cause(self, seq: Sequence) -> str | int | None:
        if seq.text_state is not None and seq.text_state.stop_hit is not None:
            return str(seq.text_state.stop_hit)
        last = seq.output_token_ids[-1] if seq.output_token_ids else None
        if last is not None and self._is_stop_token(seq, last):
            return last
        return None


def _prompt_logprobs(seq: Sequence) -> list[TokenLogprobs | None] | None:
    """With params.prompt_logprobs, one entry per prompt token (None for the first, and for
    any not computed: an abort before the prompt was read); else None."""
    if seq.params.prompt_logprobs is None:
        return None
    return list(seq.prompt_logprobs) or [None] * len(seq.prompt_token_ids)
