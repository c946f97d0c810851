"""Tokenizer loaded from the model folder, and incremental detokenization for streaming.

Two backends behind one `Tokenizer`:

* HF `tokenizer.json` through the `tokenizers` library (Llama 3, Qwen, the random checkpoints).
  Added tokens are split and decoded by the library itself.
* SentencePiece `tokenizer.model` through the `sentencepiece` library (InternLM2, Llama 2).
  This follows HF's slow SentencePiece tokenizers (`LlamaTokenizer` with `legacy=True`,
  `InternLM2Tokenizer`): the special tokens of `tokenizer_config.json` (`added_tokens_decoder`,
  the named bos/eos/unk/pad tokens, `additional_special_tokens`, `added_tokens.json`) are cut
  out of the text first (longest match) and encode as single ids, every piece of text in
  between is encoded by SentencePiece on its own (so it gets the model's word-start "▁" dummy
  prefix, as HF's legacy tokenizers do), and decoding runs `sp.decode` over each run of normal
  pieces (which drops the word-start space at the start of the run, as sentencepiece does)
  with special tokens rendered as their strings in between, or dropped with
  `skip_special_tokens`. So `decode(encode(text)[1:], skip_special_tokens=False)` gives
  back `text` (with byte_fallback models, which have no unknown characters).

In both backends `encode` adds BOS itself (`add_bos_token` of `tokenizer_config.json`) rather
than through the `tokenizers` post-processor, so the BOS is never added twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_runtime.text.token_cache import PrefixTokenCache

logger = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
ADDED_TOKENS_JSON = "added_tokens.json"
IM_END = "<|im_end|>"
LONG_TEXT_CHARS = 32768
"""Texts longer than this are encoded without holding the GIL (`tokenizers` holds it through
`encode`, about 2 s for a million tokens; `encode_batch` releases it; sentencepiece always
does), so a server thread encoding a long document does not stall the others."""
"""ChatML end of turn: chat models (InternLM2, Qwen, SmolLM) stop on it as on EOS."""
REPLACEMENT_CHAR = "\ufffd"
"""What decoding renders for incomplete UTF-8; a streamed delta never ends with it."""
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>\Z")


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be loaded (missing or unreadable files)."""


class Tokenizer:
    """Text <-> token ids for one model folder (see the module docstring for the backends).

    `Tokenizer(folder)` raises `TokenizerError` when the folder has no tokenizer;
    `Tokenizer.from_folder(folder)` returns None then (token-id prompts only).
    """

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.config: dict[str, Any] = read_tokenizer_config(self.folder)
        json_path = self.folder / TOKENIZER_JSON
        sp_path = self.folder / SENTENCEPIECE_MODEL
        self._backend: _Backend
        if json_path.is_file():
            self._backend = _TokenizersBackend(json_path)
        elif sp_path.is_file():
            self._backend = _SentencePieceBackend(sp_path, self.config, self.folder)
        else:
            raise TokenizerError(_missing_files_message(self.folder, self.config))
        self.backend: str = self._backend.name
        """"tokenizers" (tokenizer.json) or "sentencepiece" (tokenizer.model)."""
        self.bos_token, self.bos_token_id = self._named("bos_token")
        self.eos_token, self.eos_token_id = self._named("eos_token")
        self.unk_token, self.unk_token_id = self._named("unk_token")
        self.pad_token, self.pad_token_id = self._named("pad_token")
        default_bos, default_eos = self._backend.default_add_special(
            self.bos_token_id, self.eos_token_id
        )
        self.add_bos: bool = _config_bool(self.config, "add_bos_token", default_bos)
        self.add_eos: bool = _config_bool(self.config, "add_eos_token", default_eos)
        self.chat_template: str | None = None
        """A chat template used instead of the folder's (`RuntimeConfig.chat_template`)."""
        self.prefix_tokens = PrefixTokenCache(self._backend.encode, self._token_spelling)
        """The tokens of the last long texts, reused for a text that starts the same way (a
        new question after the same document)."""

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> Tokenizer | None:
        """The folder's tokenizer, or None when it ships none (token-id prompts only).

        Prefers `tokenizer.json`, then `tokenizer.model`. A folder whose
        `tokenizer_config.json` names a `tokenizer_class` but has neither file is broken
        (a partial download, say): that raises `TokenizerError` instead of returning None.
        """
        folder = Path(folder)
        if (folder / TOKENIZER_JSON).is_file() or (folder / SENTENCEPIECE_MODEL).is_file():
            return cls(folder)
        config = read_tokenizer_config(folder)
        if config.get("tokenizer_class"):
            raise TokenizerError(_missing_files_message(folder, config))
        return None

    # -- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """One past the largest token id (added tokens included)."""
        return self._backend.vocab_size

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: EOS, plus `<|im_end|>` when the vocabulary has it."""
        ids = [self.eos_token_id, self.token_to_id(IM_END)]
        return list(dict.fromkeys(i for i in ids if i is not None))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens as strings (what chat templates get as `bos_token`...)."""
        named = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }
        return {k: v for k, v in named.items() if v is not None}

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string (a special token or a vocabulary piece), else None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        """Whether `decode(..., skip_special_tokens=True)` drops this id."""
        return self._backend.is_special(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for, which may be part of a UTF-8 character.

        Byte-level BPE pieces map back through GPT-2's byte-to-unicode table (`ĠðŁ` is
        b" \\xf0\\x9f"); SentencePiece byte tokens `<0xNN>` are that byte and "▁" is a space
        (also at the start of a word, where `decode` drops it); special and added tokens are
        their UTF-8 text. Concatenated over a sequence of tokens, they are the UTF-8 of its
        text (plus any word-start space `decode` drops). An id outside the vocabulary gives b"".
        """
        return self._backend.token_bytes(int(token_id))

    def is_byte_run_token(self, token_id: int) -> bool:
        """A byte token (`<0x0A>`) whose text can still change with the tokens after it.

        True only for a tokenizer.json with a `ByteFallback` decoder (Llama 2 / Mistral
        style): it decodes each run of byte tokens as a whole, and a run that is not valid
        UTF-8 becomes one U+FFFD per byte, valid bytes ("\\n") included. Sentencepiece and
        byte-level BPE decode invalid bytes one by one, so text before them never changes.
        """
        return self._backend.is_byte_run_token(token_id)

    # -- text <-> ids -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it encode as their single ids.

        `add_special_tokens` adds BOS (and EOS) per `add_bos_token` / `add_eos_token`.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self.prefix_tokens.encode(text)
        if add_special_tokens:
            if self.add_bos and self.bos_token_id is not None:
                ids = [self.bos_token_id, *ids]
            if self.add_eos and self.eos_token_id is not None:
                ids = [*ids, self.eos_token_id]
        return ids

    def _token_spelling(self) -> tuple[np.ndarray, np.ndarray]:
        """The UTF-8 byte length of each token id's text, and which ids are added tokens."""
        n = self.vocab_size
        lengths = np.fromiter((len(self.token_bytes(i)) for i in range(n)), np.int64, count=n)
        added = np.zeros(n, dtype=bool)
        added[[i for i in self._backend.added_token_ids() if 0 <= i < n]] = True
        return lengths, added

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Ids the tokenizer does not know (padded model vocabularies) are
        skipped; incomplete UTF-8 byte tokens render as U+FFFD."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def _named(self, key: str) -> tuple[str | None, int | None]:
        if key in self.config:
            token = token_content(self.config[key])
        else:
            token = self._backend.default_named_token(key)
        if token is None:
            return None, None
        token_id = self.token_to_id(token)
        if token_id is None:
            logger.warning("%s %r of %s is not in the vocabulary", key, token, self.folder)
        return token, token_id

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.folder)!r}, backend={self.backend}, vocab={self.vocab_size})"


class IncrementalDetokenizer:
    """Text deltas for a stream of token ids (vLLM's `detokenize_incrementally`).

    Every `add` decodes a short window: the tokens since `prefix_offset` with and without the
    ones since `read_offset`, and emits the difference. That gets word-start spaces right
    (sentencepiece's "▁" is dropped only at the start of a decode, which is inside the window's
    already-emitted prefix) and, by holding output back while the decoded tail ends with U+FFFD,
    never emits half of a character whose UTF-8 bytes span several tokens.

    Without `prompt_ids`, the concatenation of all deltas and a final `flush()` equals
    `tokenizer.decode(<all added ids>, skip_special_tokens)`. With `prompt_ids`, the last few
    prompt tokens are the decode context, so the deltas are the text the output adds after the
    prompt (a word-start space of the first token is kept, as in vLLM); that is what to show
    when streaming a continuation, while the first form matches `Tokenizer.decode` of the output.
    """

    CONTEXT_TOKENS = 5
    """Prompt tokens decoded as context before the first output token (vLLM uses 5)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = [int(i) for i in prompt_ids or ()]
        self.num_prompt_tokens = len(self.token_ids)
        self.read_offset = len(self.token_ids)
        self.prefix_offset = max(self.read_offset - self.CONTEXT_TOKENS, 0)
        self._prefix_text = self._decode(self.prefix_offset, self.read_offset)
        self.text = ""
        """Everything emitted so far."""

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def add(self, token_id: int) -> str:
        """Append one token id; the text it completes (often "", e.g. mid-character)."""
        self.token_ids.append(int(token_id))
        return self._advance(final=False)

    def extend(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """Text held back at the end of the stream (an incomplete character renders U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset == len(self.token_ids):
            return ""
        new_text = self._decode(self.prefix_offset, len(self.token_ids))
        grew = len(new_text) > len(self._prefix_text) and new_text.startswith(self._prefix_text)
        if not final and (not grew or new_text.endswith(REPLACEMENT_CHAR) or self._in_byte_run()):
            return ""  # nothing yet, or the tail may still be an incomplete character
        delta = new_text[len(self._prefix_text) :] if grew else ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self._prefix_text = self._decode(self.prefix_offset, self.read_offset)
        self.text += delta
        return delta

    def _in_byte_run(self) -> bool:
        """Whether the last token that renders text is a byte token the next one may join."""
        tok = self.tokenizer
        for token_id in reversed(self.token_ids[self.read_offset :]):
            if tok.is_byte_run_token(token_id):
                return True
            skipped = self.skip_special_tokens and tok.is_special(token_id)
            if not skipped and 0 <= token_id < tok.vocab_size:
                return False
        return False

    def _decode(self, start: int, stop: int) -> str:
        if start >= stop:
            return ""
        return self.tokenizer.decode(self.token_ids[start:stop], self.skip_special_tokens)


# -- config helpers ---------------------------------------------------------------------------
def read_tokenizer_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """`tokenizer_config.json` of a folder as a dict ({} when absent)."""
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    if not isinstance(config, dict):
        raise TokenizerError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return config


def token_content(value: object) -> str | None:
    """A token from a config: a string, or an AddedToken dict `{"content": ...}`."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _config_bool(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key)
    return default if value is None else bool(value)


def _missing_files_message(folder: Path, config: Mapping[str, Any]) -> str:
    cls = config.get("tokenizer_class")
    named = f" names tokenizer_class {cls!r} but" if cls else ""
    return (
        f"tokenizer folder {folder}{named} has neither {TOKENIZER_JSON} nor "
        f"{SENTENCEPIECE_MODEL}; copy the tokenizer files next to config.json or pass token ids"
    )


# -- token bytes ------------------------------------------------------------------------------
SP_SPACE = "\u2581"
"""SentencePiece's "▁", a space in its pieces."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


def byte_level_bytes(piece: str) -> bytes:
    """The bytes of a byte-level BPE piece (`ĠðŁ` -> b" \\xf0\\x9f"); a character outside
    the table (never in a real vocabulary) stands for its own UTF-8."""
    out = bytearray()
    for ch in piece:
        b = _UNICODE_TO_BYTE.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def _decoder_types(decoder: Any) -> set[str]:
    """The `type` of a tokenizers decoder and of every decoder inside it (a Sequence)."""
    if decoder is None:
        return set()
    try:
        config = json.loads(decoder.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return {type(decoder).__name__}
    types: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                types.add(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return types


# -- backends ---------------------------------------------------------------------------------
class _Backend:
    name = ""
    vocab_size = 0

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str | None:
        raise NotImplementedError

    def is_special(self, token_id: int) -> bool:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def is_byte_run_token(self, token_id: int) -> bool:
        return False

    def added_token_ids(self) -> Iterable[int]:
        """Ids of the added tokens (special or not): encoding splits a text at them first."""
        return ()

    def default_named_token(self, key: str) -> str | None:
        return None

    def default_add_special(self, bos: int | None, eos: int | None) -> tuple[bool, bool]:
        return False, False


class _TokenizersBackend(_Backend):
    name = "tokenizers"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust loader raises its own exception type
            raise TokenizerError(f"cannot load {path}: {e}") from e
        self._tok.no_truncation()  # some tokenizer.json files ship with these switched on
        self._tok.no_padding()
        vocab: dict[str, int] = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(len(vocab), max(vocab.values(), default=-1) + 1)
        added = self._tok.get_added_tokens_decoder()
        self._special = {i for i, t in added.items() if t.special}
        self._added_text = {int(i): str(t.content) for i, t in added.items()}
        self._byte_run_ids: frozenset[int] = frozenset()
        if "ByteFallback" in repr(self._tok.decoder):
            self._byte_run_ids = frozenset(i for t, i in vocab.items() if _BYTE_TOKEN.match(t))
        decoders = _decoder_types(self._tok.decoder)
        self._byte_level = "ByteLevel" in decoders
        """Pieces are GPT-2 byte-to-unicode strings (GPT-2, Llama 3, Qwen, SmolLM)."""
        self._metaspace = bool(decoders & {"Metaspace", "Replace", "ByteFallback"})
        """SentencePiece-style pieces: "▁" is a space, `<0xNN>` a byte (Llama 2, Mistral)."""

    def encode(self, text: str) -> list[int]:
        if len(text) > LONG_TEXT_CHARS:  # the batch call lets other threads run meanwhile
            return list(self._tok.encode_batch([text], add_special_tokens=False)[0].ids)
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        token_id = self._tok.token_to_id(token)
        return None if token_id is None else int(token_id)

    def id_to_token(self, token_id: int) -> str | None:
        token = self._tok.id_to_token(token_id)
        return None if token is None else str(token)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added_text:
            return self._added_text[token_id].encode("utf-8")
        piece = self._tok.id_to_token(token_id) if 0 <= token_id < self.vocab_size else None
        if piece is None:
            return b""
        if self._byte_level:
            return byte_level_bytes(piece)
        if self._metaspace:
            if _BYTE_TOKEN.match(piece):
                return bytes([int(piece[3:5], 16)])
            return piece.replace(SP_SPACE, " ").encode("utf-8")
        # another decoder (WordPiece...): its own rendering of the single token
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def is_byte_run_token(self, token_id: int) -> bool:
        return token_id in self._byte_run_ids

    def added_token_ids(self) -> Iterable[int]:
        return self._added_text.keys()

    def default_add_special(self, bos: int | None, eos: int | None) -> tuple[bool, bool]:
        """What the tokenizer.json post-processor adds (used when the config does not say)."""
        added = list(self._tok.encode("", add_special_tokens=True).ids)
        add_bos = bos is not None and added[:1] == [bos]
        add_eos = eos is not None and added[-1:] == [eos] and not (add_bos and len(added) == 1)
        return add_bos, add_eos


@dataclass(frozen=True)
class _AddedToken:
    content: str
    special: bool
    lstrip: bool = False
    rstrip: bool = False


class _SentencePieceBackend(_Backend):
    name = "sentencepiece"

    def __init__(self, path: Path, config: Mapping[str, Any], folder: Path):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot load {path}: {e}") from e
        self._num_pieces = int(self._sp.get_piece_size())
        if config.get("legacy") is False:
            logger.warning(
                "%s: legacy=False is not implemented for sentencepiece; text after a special "
                "token gets the word-start space as with legacy=True",
                path,
            )
        self._added: dict[int, _AddedToken] = {}
        self._by_content: dict[str, int] = {}
        self._load_added_tokens(config, folder)
        # sentencepiece renders control pieces (<s>, </s>) as "" and <unk> as " ⁇ "; like HF,
        # render them as their strings and treat them as special tokens.
        self._special_text: dict[int, str] = {
            i: self._sp.id_to_piece(i)
            for i in range(self._num_pieces)
            if self._sp.is_control(i) or self._sp.is_unknown(i)
        }
        self._special_ids = set(self._special_text)
        for token_id, tok in self._added.items():
            self._special_text[token_id] = tok.content
            if tok.special:
                self._special_ids.add(token_id)
            else:
                self._special_ids.discard(token_id)
        self.vocab_size = max([self._num_pieces, *(i + 1 for i in self._added)])
        self._split_re: re.Pattern[str] | None = None
        self._update_split()

    # -- added tokens ---------------------------------------------------------------------
    def _load_added_tokens(self, config: Mapping[str, Any], folder: Path) -> None:
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, Mapping):
            raise TokenizerError(
                f"added_tokens_decoder in {folder / TOKENIZER_CONFIG} is not a dict"
            )
        for key, value in decoder.items():
            content = token_content(value)
            if content is None:
                continue
            flags = value if isinstance(value, Mapping) else {}
            self._register(
                int(key),
                _AddedToken(
                    content,
                    special=bool(flags.get("special", True)),
                    lstrip=bool(flags.get("lstrip", False)),
                    rstrip=bool(flags.get("rstrip", False)),
                ),
            )
        added_json = folder / ADDED_TOKENS_JSON
        if added_json.is_file():
            try:
                entries = json.loads(added_json.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise TokenizerError(f"cannot read {added_json}: {e}") from e
            for content, token_id in dict(entries).items():
                if content not in self._by_content:
                    self._register(int(token_id), _AddedToken(str(content), special=False))
        extra = list(config.get("additional_special_tokens") or ())
        extra_special = config.get("extra_special_tokens")  # transformers v5 name
        if isinstance(extra_special, Mapping):
            extra += list(extra_special.values())
        elif isinstance(extra_special, list):
            extra += extra_special
        for key in NAMED_SPECIAL_TOKENS:  # the model's own <s>, </s>, <unk> when not named
            value = config[key] if key in config else self.default_named_token(key)
            self._mark_special(token_content(value), new_id=False)
        for value in extra:
            self._mark_special(token_content(value), new_id=True)

    def _mark_special(self, content: str | None, new_id: bool) -> None:
        """Make a named or listed special token splittable and special.

        A token neither in `added_tokens_decoder` nor a sentencepiece piece gets the next free
        id when listed in `additional_special_tokens` (as HF adds it); a named one (bos...) that
        is nowhere is left out (`Tokenizer` warns about it).
        """
        if content is None:
            return
        if content in self._by_content:
            known = self._by_content[content]
            if not self._added[known].special:
                self._register(known, _AddedToken(content, special=True))
            return
        token_id = self._piece_id(content)
        if token_id is None:
            if not new_id:
                return
            token_id = max([self._num_pieces - 1, *self._added]) + 1
        self._register(token_id, _AddedToken(content, special=True))

    def _register(self, token_id: int, tok: _AddedToken) -> None:
        old = self._added.get(token_id)
        if old is not None:
            self._by_content.pop(old.content, None)
        self._added[token_id] = tok
        self._by_content[tok.content] = token_id

    def _update_split(self) -> None:
        tokens = sorted(self._by_content, key=len, reverse=True)  # longest match first
        self._split_re = re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None

    def _piece_id(self, piece: str) -> int | None:
        token_id = int(self._sp.piece_to_id(piece))
        if 0 <= token_id < self._num_pieces and self._sp.id_to_piece(token_id) == piece:
            return token_id
        return None

    def added_token_ids(self) -> Iterable[int]:
        return self._added.keys()

    def default_named_token(self, key: str) -> str | None:
        token_id = {
            "bos_token": self._sp.bos_id(),
            "eos_token": self._sp.eos_id(),
            "unk_token": self._sp.unk_id(),
            "pad_token": self._sp.pad_id(),
        }[key]
        if 0 <= token_id < self._num_pieces:
            return str(self._sp.id_to_piece(token_id))
        return None

    def default_add_special(self, bos: int | None, eos: int | None) -> tuple[bool, bool]:
        return True, False  # HF LlamaTokenizer / InternLM2Tokenizer defaults

    # -- encode / decode ------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self._split_re is None:
            return list(self._sp.encode(text)) if text else []
        ids: list[int] = []
        pos = 0
        strip_next = False
        for match in self._split_re.finditer(text):
            tok = self._added[self._by_content[match.group()]]
            ids += self._encode_plain(text[pos : match.start()], strip_next, tok.lstrip)
            ids.append(self._by_content[tok.content])
            pos, strip_next = match.end(), tok.rstrip
        ids += self._encode_plain(text[pos:], strip_next, False)
        return ids

    def _encode_plain(self, text: str, lstrip: bool, rstrip: bool) -> list[int]:
        if lstrip:
            text = text.lstrip()
        if rstrip:
            text = text.rstrip()
        return list(self._sp.encode(text)) if text else []

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            special = self._special_text.get(token_id)
            if special is None:
                if 0 <= token_id < self._num_pieces:
                    run.append(token_id)
                continue
            if skip_special_tokens and token_id in self._special_ids:
                continue
            if run:
                parts.append(self._sp.decode(run))
                run = []
            parts.append(special)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        if token in self._by_content:
            return self._by_content[token]
        return self._piece_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._added:
            return self._added[token_id].content
        if 0 <= token_id < self._num_pieces:
            return str(self._sp.id_to_piece(token_id))
        return None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        special = self._special_text.get(token_id)
        if special is not None:
            return special.encode("utf-8")
        if not 0 <= token_id < self._num_pieces:
            return b""
        piece = str(self._sp.id_to_piece(token_id))
        if self._sp.is_byte(token_id) and _BYTE_TOKEN.match(piece):
            return bytes([int(piece[3:5], 16)])
        return piece.replace(SP_SPACE, " ").encode("utf-8")
