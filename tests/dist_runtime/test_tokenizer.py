"""Tokenizer backends (SentencePiece `tokenizer.model`, HF `tokenizer.json`) against HF
`transformers`, and the incremental detokenizer used for streaming.

The SentencePiece models are trained in the test (a few tens of ms) in two layouts:

* "llama": Llama 2 style, with the word-start dummy prefix, InternLM2's special tokens
  appended after the SentencePiece vocabulary through `added_tokens_decoder` only.
* "internlm2": no dummy prefix, the special tokens are user-defined pieces inside the
  SentencePiece vocabulary (as in InternLM2's own `tokenizer.model`) and listed in
  `added_tokens_decoder` with those ids.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pytest

from dist_runtime.text.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

SP_VOCAB = 500
BOS, EOS = 1, 2
INTERNLM2_SPECIALS = (
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
)
"""InternLM2's added tokens, in id order (92538..92543 there)."""
LAYOUTS = ("llama", "internlm2")

_CORPUS_BASE = """\
The river ran quietly past the old mill, where the miller kept a small garden.
A distributed runtime splits a large language model across several devices.
She opened the window and listened to the rain falling on the empty street.
To bake bread, mix flour, water, salt and yeast into a soft dough, then knead it.
Questions about long documents need long context and a paged key value cache.
The café served crêpes and a naïve résumé was left on the table by the façade.
東京は日本の首都です。中文测试很好。
"""
_WORDS = [
    *("the", "model", "reads", "writes", "computes", "sends", "receives", "tokens", "cache"),
    *("blocks", "weights", "answer", "question", "device", "worker", "driver", "kernel"),
    *("garden", "bread", "river", "window", "rain", "street"),
]


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = _CORPUS_BASE.splitlines()
    for i in range(300):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12)))
        lines.append(f"{words.capitalize()}. Step {i}:  {rng.randint(0, 9999)}\n\tdone.")
    return lines


def write_sentencepiece_folder(folder: Path, layout: str = "llama", **config: Any) -> Path:
    """Train a byte-fallback BPE SentencePiece model; write tokenizer.model + config.

    `config` entries override the written tokenizer_config.json.
    """
    import sentencepiece as spm

    internlm2 = layout == "internlm2"
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=buf,
        vocab_size=SP_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=not internlm2,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=list(INTERNLM2_SPECIALS) if internlm2 else [],
        unk_id=0,
        bos_id=BOS,
        eos_id=EOS,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    if internlm2:
        special_ids = [sp.piece_to_id(t) for t in INTERNLM2_SPECIALS]
    else:
        special_ids = list(range(SP_VOCAB, SP_VOCAB + len(INTERNLM2_SPECIALS)))
    decoder = {str(i): _added(t) for i, t in [(0, "<unk>"), (BOS, "<s>"), (EOS, "</s>")]} | {
        str(i): _added(t) for i, t in zip(special_ids, INTERNLM2_SPECIALS)
    }
    tokenizer_config = {
        "tokenizer_class": "InternLM2Tokenizer" if internlm2 else "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": decoder,
        **config,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return folder


def _added(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "single_word": False,
        "special": True,
    }


TEXTS = (
    "Hello world",
    "The river ran quietly past the old mill.",
    "  leading spaces, runs   of   spaces and a trailing one ",
    "line one\nline two\n\n\tindented\r\nwindows line",
    "Café naïve résumé Ångström façade Æsir ØRE ß",
    "東京は日本の首都です。中文测试 한국어 ภาษาไทย",
    "emoji 😀🎉🚀 and a family 👩‍👩‍👧 and flags 🇫🇷",
    "maths ∑ √ ≠ ≤ 𝔘𝔫𝔦 and € £ ¥",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "inline <|im_end|> token, then <|action_start|><|plugin|>\n{'a': 1}<|action_end|>",
    "<|im_start|><|im_end|><|interpreter|>",
    "almost special: <|im_start| and |im_end|> and <|im_end",
    "nested <|im_<|im_end|>start|>",
    "digits 1234567890 and punctuation !?.,;:'\"()[]{}",
    "",
    " ",
    "\n",
)
PLAIN_TEXTS = tuple(t for t in TEXTS if not any(s in t for s in INTERNLM2_SPECIALS))


@pytest.fixture(scope="module", params=LAYOUTS)
def sp_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sentencepiece_folder(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def llama_sp_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sentencepiece_folder(tmp_path_factory.mktemp("sp-llama"), "llama")


def _special_ids(tok: Tokenizer) -> dict[str, int]:
    ids = {t: tok.token_to_id(t) for t in INTERNLM2_SPECIALS}
    assert None not in ids.values()
    return {t: i for t, i in ids.items() if i is not None}


# -- loading ----------------------------------------------------------------------------------
def test_from_folder_picks_backend(sp_folder: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    sp = Tokenizer.from_folder(sp_folder)
    assert sp is not None and sp.backend == "sentencepiece"
    hf = Tokenizer.from_folder(tiny_llama_dir)
    assert hf is not None and hf.backend == "tokenizers"
    assert Tokenizer.from_folder(tmp_path) is None  # no tokenizer at all: token-id prompts only
    both = tmp_path / "both"
    both.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (both / name).write_bytes((tiny_llama_dir / name).read_bytes())
    (both / "tokenizer.model").write_bytes((sp_folder / "tokenizer.model").read_bytes())
    picked = Tokenizer.from_folder(both)
    assert picked is not None and picked.backend == "tokenizers"


def test_config_naming_a_tokenizer_without_files_is_an_error(tmp_path: Path) -> None:
    cfg = {"tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    for load in (Tokenizer.from_folder, Tokenizer):
        with pytest.raises(TokenizerError, match="tokenizer.json nor tokenizer.model") as e:
            load(tmp_path)
        assert str(tmp_path) in str(e.value) and "InternLM2Tokenizer" in str(e.value)
    assert issubclass(TokenizerError, ValueError)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model"])
def test_unreadable_tokenizer_file_is_an_error(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("{not a tokenizer", encoding="utf-8")
    with pytest.raises(TokenizerError, match=f"cannot load .*{name}"):
        Tokenizer.from_folder(tmp_path)


def test_sentencepiece_vocab_and_special_ids(sp_folder: Path) -> None:
    tok = Tokenizer(sp_folder)
    assert (tok.bos_token_id, tok.eos_token_id, tok.bos_token, tok.eos_token) == (
        BOS,
        EOS,
        "<s>",
        "</s>",
    )
    specials = _special_ids(tok)
    assert len(set(specials.values())) == len(INTERNLM2_SPECIALS)
    assert tok.eos_token_ids == [EOS, specials["<|im_end|>"]]
    assert tok.vocab_size == max(SP_VOCAB - 1, *specials.values()) + 1
    assert all(tok.is_special(i) for i in [BOS, EOS, *specials.values()])
    assert not tok.is_special(tok.encode("Hello", add_special_tokens=False)[0])


def test_sentencepiece_without_config_uses_model_defaults(
    llama_sp_folder: Path, tmp_path: Path
) -> None:
    (tmp_path / "tokenizer.model").write_bytes((llama_sp_folder / "tokenizer.model").read_bytes())
    tok = Tokenizer.from_folder(tmp_path)
    assert tok is not None and tok.config == {}
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == (
        "<s>",
        BOS,
        "</s>",
        EOS,
    )
    assert tok.add_bos and tok.eos_token_ids == [EOS]  # no <|im_end|> without the config
    ids = tok.encode("<s>Hello</s>")
    assert ids[:2] == [BOS, BOS] and ids[-1] == EOS
    assert tok.decode(ids, skip_special_tokens=False) == "<s><s>Hello</s>"
    assert tok.decode(ids) == "Hello"


# -- SentencePiece backend ------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_round_trip_and_single_bos(sp_folder: Path, text: str) -> None:
    tok = Tokenizer(sp_folder)
    ids = tok.encode(text)
    assert ids[0] == BOS and ids.count(BOS) == 1  # BOS added once
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids[1:], skip_special_tokens=False) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert tok.unk_token_id not in ids  # byte fallback: nothing is unknown
    specials = _special_ids(tok)
    for token, token_id in specials.items():  # special tokens are single ids, never split
        assert ids.count(token_id) == text.count(token)
    if not any(s in text for s in specials):
        assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(sp_folder: Path) -> None:
    tok = Tokenizer(sp_folder)
    for token, token_id in _special_ids(tok).items():
        assert tok.encode(token, add_special_tokens=False) == [token_id]
        ids = tok.encode(f"a{token}b{token}{token} c", add_special_tokens=False)
        assert ids.count(token_id) == 3
        assert tok.decode(ids, skip_special_tokens=False) == f"a{token}b{token}{token} c"
        assert tok.id_to_token(token_id) == token
    # the BOS string in the text is the BOS id (so chat prompts that start with it get one)
    assert tok.encode("<s>hi", add_special_tokens=False)[0] == BOS
    # longest match wins over a special token that is a prefix of another one
    cfg = json.loads((sp_folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"]["600"] = _added("<|im_end|>X")
    (sp_folder / "longest").mkdir(exist_ok=True)
    (sp_folder / "longest" / "tokenizer.model").write_bytes(
        (sp_folder / "tokenizer.model").read_bytes()
    )
    (sp_folder / "longest" / "tokenizer_config.json").write_text(json.dumps(cfg))
    longest = Tokenizer(sp_folder / "longest")
    ids = longest.encode("a<|im_end|>Xb<|im_end|>b", add_special_tokens=False)
    assert ids.count(600) == 1 and ids.count(_special_ids(longest)["<|im_end|>"]) == 1


def test_skip_special_tokens_joins_runs(sp_folder: Path) -> None:
    tok = Tokenizer(sp_folder)
    ids = tok.encode("<|im_start|>user\nhi there<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=False) == "<s><|im_start|>user\nhi there<|im_end|>"
    stripped = tok.decode(ids, skip_special_tokens=True)
    assert "<|" not in stripped and "<s>" not in stripped and "user\nhi there" in stripped
    assert tok.decode([BOS, EOS, 10**6]) == ""  # special and unknown ids dropped


def test_add_bos_token_false(tmp_path: Path) -> None:
    tok = Tokenizer(write_sentencepiece_folder(tmp_path, "llama", add_bos_token=False))
    assert tok.encode("Hello")[0] != BOS
    eos = Tokenizer(write_sentencepiece_folder(tmp_path / "eos", "llama", add_eos_token=True))
    assert eos.encode("Hello")[0] == BOS and eos.encode("Hello")[-1] == EOS


def _hf_slow(folder: Path) -> Any:
    """transformers' slow SentencePiece tokenizer, legacy (what LlamaTokenizer(legacy=True) and
    InternLM2Tokenizer encode like): special tokens split out, each piece `sp.encode`d."""
    module = pytest.importorskip("transformers.tokenization_utils_sentencepiece")
    return module.SentencePieceBackend(
        vocab_file=str(folder / "tokenizer.model"),
        legacy=True,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(INTERNLM2_SPECIALS),
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sentencepiece_encode_matches_hf_slow_legacy(tmp_path: Path, layout: str) -> None:
    folder = write_sentencepiece_folder(tmp_path, layout)
    tok = Tokenizer(folder)
    slow = _hf_slow(folder)
    if layout == "internlm2":  # the specials are SentencePiece pieces: same ids in both
        assert slow.convert_tokens_to_ids(list(INTERNLM2_SPECIALS)) == list(
            _special_ids(tok).values()
        )
    else:  # HF numbers the added tokens from 500 on, as the config does
        assert slow.convert_tokens_to_ids(list(INTERNLM2_SPECIALS)) == list(
            range(SP_VOCAB, SP_VOCAB + len(INTERNLM2_SPECIALS))
        )
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == slow.encode(
            text, add_special_tokens=False
        ), text


def _starts_a_chunk_with_whitespace(text: str) -> bool:
    """HF's converted (fast) Llama tokenizer does not add the word-start "▁" to a chunk that
    already starts with a space, unlike sentencepiece and the slow tokenizer."""
    chunks = [text]
    for special in INTERNLM2_SPECIALS:
        chunks = [part for chunk in chunks for part in chunk.split(special)]
    return any(chunk[:1] == " " for chunk in chunks)


def test_sentencepiece_matches_hf_llama_tokenizer(llama_sp_folder: Path) -> None:
    from transformers import AutoTokenizer

    tok = Tokenizer(llama_sp_folder)
    hf = AutoTokenizer.from_pretrained(str(llama_sp_folder), legacy=True)
    assert hf.convert_tokens_to_ids(list(INTERNLM2_SPECIALS)) == list(_special_ids(tok).values())
    compared = 0
    for text in TEXTS:
        ids = tok.encode(text)
        if not _starts_a_chunk_with_whitespace(text):
            assert ids == hf.encode(text), text
            compared += 1
        # decoding: sentencepiece's leading-space rule is HF's Strip(left=1) decoder
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(
            ids, skip_special_tokens=True
        ), text
        if text in PLAIN_TEXTS:
            assert tok.decode(ids[1:], False) == hf.decode(ids[1:], skip_special_tokens=False)
    assert compared >= len(TEXTS) - 3


# -- tokenizer.json backend -------------------------------------------------------------------
def test_tokenizer_json_matches_hf_auto_tokenizer(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = Tokenizer(tiny_llama_dir)
    hf = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    assert (tok.bos_token_id, tok.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert tok.eos_token_ids == [hf.eos_token_id, hf.convert_tokens_to_ids("<|im_end|>")]
    assert tok.vocab_size == len(hf)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert ids.count(0) == 1  # the random checkpoint's <s>
        for skip in (True, False):
            assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), text
        assert tok.decode(ids[1:], skip_special_tokens=False) == text


def test_tokenizer_json_bos_follows_config(tiny_llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((tiny_llama_dir / "tokenizer.json").read_bytes())
    cfg = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    # no add_bos_token in the config: the post-processor's BOS is added, and only once
    cfg.pop("add_bos_token")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert Tokenizer(tmp_path).encode("hi").count(0) == 1
    cfg["add_bos_token"] = False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert 0 not in Tokenizer(tmp_path).encode("hi")


# -- incremental detokenization ---------------------------------------------------------------
def write_byte_fallback_tokenizer_json(sp_folder: Path, out: Path) -> Path:
    """HF's conversion of the sentencepiece model to a Llama 2 style tokenizer.json
    (Metaspace, `ByteFallback` decoder), without the tokenizer.model."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(sp_folder), legacy=True).save_pretrained(str(out))
    (out / "tokenizer.model").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def byte_fallback_json(llama_sp_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_byte_fallback_tokenizer_json(llama_sp_folder, tmp_path_factory.mktemp("bf"))


TOKENIZER_KINDS = ["sp-llama", "sp-internlm2", "byte-level.json", "byte-fallback.json"]


@pytest.fixture(scope="module", params=TOKENIZER_KINDS)
def any_tokenizer(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama_dir: Path,
    byte_fallback_json: Path,
) -> Tokenizer:
    if request.param == "byte-level.json":
        return Tokenizer(tiny_llama_dir)
    if request.param == "byte-fallback.json":
        tok = Tokenizer(byte_fallback_json)
        assert tok.backend == "tokenizers" and tok.is_byte_run_token(
            tok.token_to_id("<0x0A>") or -1
        )
        return tok
    layout = request.param.removeprefix("sp-")
    return Tokenizer(write_sentencepiece_folder(tmp_path_factory.mktemp(layout), layout))


def _stream(tok: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    """All deltas, the flush last; checks the emitted text after every token: the decode so
    far, less a tail that decodes to U+FFFD for now or is an unfinished run of byte tokens."""
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = []
    for k, token_id in enumerate(ids, start=1):
        deltas.append(detok.add(token_id))
        so_far = tok.decode(ids[:k], skip)
        rendered = [i for i in ids[:k] if not (skip and tok.is_special(i))]
        if so_far.endswith("\ufffd") or (rendered and tok.is_byte_run_token(rendered[-1])):
            assert so_far.startswith(detok.text), ids[:k]
        else:
            assert detok.text == so_far, ids[:k]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_random_ids_concatenate_to_decode(any_tokenizer: Tokenizer, skip: bool) -> None:
    tok = any_tokenizer
    rng = random.Random(1)
    # mostly byte tokens and special ids, so partial UTF-8 and run boundaries are everywhere
    bytes_ = [tok.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    named = [tok.bos_token_id, tok.eos_token_id]
    pool = [i for i in [*bytes_, *named, *_special_ids_or_empty(tok)] if i is not None]
    for _ in range(150):
        n = rng.randint(1, 40)
        ids = [
            rng.choice(pool) if rng.random() < 0.5 else rng.randrange(tok.vocab_size)
            for _ in range(n)
        ]
        deltas = _stream(tok, ids, skip)
        full = tok.decode(ids, skip)
        assert "".join(deltas) == full, ids
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas), ids


def _special_ids_or_empty(tok: Tokenizer) -> list[int]:
    ids = [tok.token_to_id(t) for t in INTERNLM2_SPECIALS]
    return [i for i in ids if i is not None]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_never_emits_partial_characters(
    any_tokenizer: Tokenizer, text: str
) -> None:
    tok = any_tokenizer
    ids = tok.encode(text)
    for skip in (True, False):
        deltas = _stream(tok, ids, skip)
        assert "".join(deltas) == tok.decode(ids, skip)
        assert not any("\ufffd" in d for d in deltas)
        rendered = [i for i in ids if not (skip and tok.is_special(i))]
        if not (rendered and tok.is_byte_run_token(rendered[-1])):
            assert deltas[-1] == ""  # nothing was left to flush


def test_incremental_splits_multibyte_characters(any_tokenizer: Tokenizer) -> None:
    """The emoji and CJK text really does put characters' bytes in separate tokens."""
    tok = any_tokenizer
    ids = tok.encode("emoji 😀🎉🚀 東京 👩‍👩‍👧", add_special_tokens=False)
    partial = [k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd")]
    assert len(partial) >= 3
    deltas = _stream(tok, ids, True)
    assert all(deltas[k - 1] == "" for k in partial)  # held back mid-character
    assert "".join(deltas) == "emoji 😀🎉🚀 東京 👩‍👩‍👧"


def test_incremental_with_prompt_context(any_tokenizer: Tokenizer) -> None:
    tok = any_tokenizer
    ids = tok.encode("The river ran quietly past the old mill, 東京 😀 and on.")
    for cut in range(1, len(ids)):
        prompt, output = ids[:cut], ids[cut:]
        detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
        streamed = detok.extend(output) + detok.flush()
        full, head = tok.decode(ids), tok.decode(prompt)
        if not head.endswith("\ufffd"):
            assert streamed == full[len(head) :], cut
        assert detok.output_token_ids == output


def test_incremental_sentencepiece_word_start_spaces(llama_sp_folder: Path) -> None:
    tok = Tokenizer(llama_sp_folder)
    ids = tok.encode("hello  the river  ", add_special_tokens=False)
    assert tok.id_to_token(ids[0]) == "▁hello" or tok.id_to_token(ids[0]) == "▁"
    deltas = _stream(tok, ids, True)
    assert "".join(deltas) == "hello  the river  "
    assert not deltas[0].startswith(" ")  # the dummy prefix of the first word is dropped
    assert sum(d.startswith(" ") for d in deltas) >= 2  # later word-start spaces are kept


def test_incremental_byte_fallback_run_is_held(byte_fallback_json: Path) -> None:
    """HF's ByteFallback decoder turns a whole invalid run of byte tokens into U+FFFD, valid
    bytes before the bad ones included, so a byte token's text waits for the run to end."""
    tok = Tokenizer(byte_fallback_json)
    ids = tok.encode("x ñ😃", add_special_tokens=False)
    runs = [i for i in ids if tok.is_byte_run_token(i)]
    assert len(runs) == 6  # ñ and 😃 are not in the vocabulary: 2 + 4 byte tokens
    truncated = ids[:-2]  # stopped in the middle of the emoji
    assert tok.decode(truncated) == "x " + "\ufffd" * 4  # the ñ is lost too
    deltas = _stream(tok, truncated, True)
    assert "".join(deltas) == tok.decode(truncated)
    assert deltas[-1] == "\ufffd" * 4  # held until the flush
    assert "".join(_stream(tok, ids, True)) == "x ñ😃"


# -- token bytes ------------------------------------------------------------------------------
def test_token_bytes_of_the_demo_tokenizer(smollm2_dir: Path) -> None:
    """Byte-level BPE pieces map back to their bytes, including half a character."""
    tok = Tokenizer(smollm2_dir)
    assert tok.token_bytes(tok.token_to_id("Hello") or -1) == b"Hello"
    assert tok.token_bytes(tok.token_to_id("Ġworld") or -1) == b" world"
    assert tok.token_bytes(tok.token_to_id("Ċ") or -1) == b"\n"
    pizza = tok.encode(" 🍕", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in pizza] == ["ĠðŁ", "į", "ķ"]
    assert [tok.token_bytes(i) for i in pizza] == [b" \xf0\x9f", b"\x8d", b"\x95"]
    assert tok.decode(pizza[:1]) == " \ufffd"  # what decoding one id alone gives instead
    im_end = tok.token_to_id("<|im_end|>")
    assert im_end is not None and tok.is_special(im_end)
    assert tok.token_bytes(im_end) == b"<|im_end|>"
    assert tok.token_bytes(tok.vocab_size + 5) == b""


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_concatenate_to_the_text(any_tokenizer: Tokenizer, text: str) -> None:
    """Every backend: the tokens' bytes joined are the text's UTF-8, up to the word-start
    spaces SentencePiece adds ("▁"), and `<0xNN>` byte tokens are one byte each."""
    tok = any_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    joined = b"".join(tok.token_bytes(i) for i in ids)
    assert joined.decode("utf-8").replace(" ", "") == text.replace(" ", "")
    if tok.backend == "tokenizers" and tok.token_to_id("<0x0A>") is None:  # byte-level BPE
        assert joined == text.encode("utf-8")
    for b in (0x0A, 0xF0, 0x9F):
        byte_id = tok.token_to_id(f"<0x{b:02X}>")
        if byte_id is not None:
            assert tok.token_bytes(byte_id) == bytes([b])


def test_long_texts_encode_without_holding_the_gil(tiny_llama_dir: Path) -> None:
    """A server thread encoding a million-character document leaves the others running (HF
    `tokenizers` holds the GIL through `encode`; long texts go through `encode_batch`)."""
    import threading
    import time

    tok = Tokenizer.from_folder(tiny_llama_dir)
    assert tok is not None
    text = "The river ran quietly past the old mill. " * 25000
    ticks, stop = [0], threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        time.sleep(0.05)
        before = ticks[0]
        ids = tok.encode(text, add_special_tokens=False)
        during = ticks[0] - before
    finally:
        stop.set()
        ticker.join()
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert during >= 20, during  # held: 1-2 ticks in the ~0.5 s the encode takes


# -- long texts: tokens reused from a text that starts the same way ------------------------------


def _long_text(rng: random.Random, chars: int) -> str:
    """Varied text: corpus lines, accents, CJK, emoji (4-byte characters split across byte
    tokens), runs of spaces, tabs and blank lines, digits, special-token strings."""
    pieces = [*_corpus(), "naïve café façade", "港口的起重机", "🚢⚓🌊", "   ", "\t", "\n\n\n",
              "2026-12-05 14:03", "<|im_end|>", " \n ", "x"]  # fmt: skip
    out: list[str] = []
    n = 0
    while n < chars:
        piece = rng.choice(pieces) + rng.choice(["\n", " ", "", "\n\n"])
        out.append(piece)
        n += len(piece)
    return "".join(out)


def _check_reuse(tok: Tokenizer, seed: int, partings: int) -> None:
    """Questions after the same long document, texts parting from it at random places (inside
    a word, a run of spaces, an emoji's bytes), the same text again and one sharing only a
    short start: each encodes exactly as the backend encodes it whole, and most reuse kept
    tokens."""
    from dist_runtime.text.token_cache import MIN_CHARS

    rng = random.Random(seed)
    doc = _long_text(rng, MIN_CHARS + 20_000)
    texts = [doc + f"\nQuestion {i}: which crane failed?" for i in range(3)]
    texts += [
        doc[: rng.randrange(MIN_CHARS, len(doc))] + _long_text(rng, 300) for _ in range(partings)
    ]
    texts += [texts[0], doc[:1000] + _long_text(rng, MIN_CHARS)]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == tok._backend.encode(text)
    cache = tok.prefix_tokens
    whole = len(tok._backend.encode(doc))
    assert cache.hits >= partings + 2 and cache.reused_tokens > (partings + 2) * whole // 2


def test_a_long_text_reuses_the_tokens_of_one_that_starts_the_same_way(
    any_tokenizer: Tokenizer,
) -> None:
    """Every kind of tokenizer: byte-level BPE, SentencePiece with and without its dummy
    prefix (which leads each piece between added tokens), and its tokenizer.json conversion."""
    _check_reuse(any_tokenizer, seed=5, partings=6)


def test_the_demo_tokenizer_reuses_long_texts_exactly(smollm2_dir: Path) -> None:
    _check_reuse(Tokenizer(smollm2_dir), seed=11, partings=20)


def test_a_normalizer_that_changes_lengths_keeps_nothing(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A tokenizer.json whose normalizer rewrites "x" as "yy": its tokens do not spell the
    text, so no boundary can be found; every text is encoded whole, and right."""
    from dist_runtime.text.token_cache import MIN_CHARS

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_llama_dir / name).read_bytes())
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": "x"}, "content": "yy"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    tok = Tokenizer(tmp_path)
    doc = _long_text(random.Random(2), MIN_CHARS + 5000)
    for q in ("x?", "y?"):
        assert tok.encode(doc + q, add_special_tokens=False) == tok._backend.encode(doc + q)
    assert tok.prefix_tokens.hits == 0 and not tok.prefix_tokens._entries


def test_common_prefix() -> None:
    from dist_runtime.text.token_cache import common_prefix

    def oracle(a: str, b: str) -> int:
        """The longest n with a[:n] == b[:n], by bisection over slice comparisons."""
        lo, hi = 0, min(len(a), len(b))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid - 1)
        return lo

    rng, AB = random.Random(0), str.maketrans("01", "ab")
    for _ in range(200):
        n = rng.randrange(0, 300_000, 997)
        a = format(rng.getrandbits(n), f"0{n}b")[-n:].translate(AB) if n else ""
        cut = rng.randrange(len(a) + 1)
        b = a[:cut] + rng.choice(["", "c", "cab"]) + a[cut:][: rng.randrange(3)]
        expected = oracle(a, b)
        assert common_prefix(a, b) == expected == common_prefix(b, a)
    assert oracle("abc", "abd") == 2 and oracle("ab", "abc") == 2 and oracle("", "a") == 0
