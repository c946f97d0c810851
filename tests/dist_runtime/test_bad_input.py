"""Bad input fails early with an error that names the problem.

Configuration and checkpoint problems raise `ConfigError` / `CheckpointError` (both
`ValueError`s) while the Runtime starts; bad requests raise `ValueError` from `generate` or
`SamplingParams` and leave the Runtime usable. Everything here runs the in-process executor
(tp=1) except the tp check, which must fail before any worker or Ray starts.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

import dist_runtime.engine.engine as engine_module
from dist_runtime import Runtime, SamplingParams
from dist_runtime.config import CacheConfig, ConfigError, RuntimeConfig
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from dist_runtime.jobs.client import JobClient
from tests.conftest import TINY_SHAPES
from workers.checkpoint import CheckpointError

VOCAB = TINY_SHAPES["vocab_size"]
CPU32: dict[str, Any] = dict(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def single_file_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-file (`model.safetensors`, no index) Llama checkpoint without tokenizer; tests
    copy it before breaking it."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("single-file"), architecture="llama", with_tokenizer=False
    )


@pytest.fixture
def broken(single_file_dir: Path, tmp_path: Path) -> Path:
    """A private copy of `single_file_dir` that a test may damage."""
    return Path(shutil.copytree(single_file_dir, tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def rt(tiny_llama_dir: Path) -> Iterator[Runtime]:
    with Runtime(model=str(tiny_llama_dir), session_len=64, **CPU32) as runtime:
        yield runtime


def start(folder: Path, **kwargs: Any) -> None:
    with Runtime(model=str(folder), **{**CPU32, **kwargs}):
        pass


# -- model folder and config.json ------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model folder .*nope.* does not exist"):
        start(tmp_path / "nope")


def test_folder_without_config_json(broken: Path) -> None:
    (broken / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json is missing"):
        start(broken)


def test_config_json_not_json(broken: Path) -> None:
    (broken / "config.json").write_text("{'architectures': oops", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        start(broken)


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    hf = json.loads(path.read_text(encoding="utf-8"))
    hf.update(changes)
    path.write_text(json.dumps(hf), encoding="utf-8")


def test_unknown_architecture(broken: Path) -> None:
    _edit_config(broken, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel.*not supported.*LlamaForCausalLM"):
        start(broken)


def test_config_json_missing_required_key(broken: Path) -> None:
    path = broken / "config.json"
    hf = json.loads(path.read_text(encoding="utf-8"))
    del hf["num_attention_heads"]
    path.write_text(json.dumps(hf), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"missing required keys \['num_attention_heads'\]"):
        start(broken)


def test_unsupported_rope_scaling(broken: Path) -> None:
    _edit_config(broken, rope_scaling={"rope_type": "mrope", "factor": 4.0})
    with pytest.raises(ConfigError, match=r"rope_scaling type 'mrope' is not supported"):
        start(broken)
    _edit_config(broken, rope_scaling={"rope_type": "longrope", "factor": 4.0})
    with pytest.raises(ConfigError, match=r"longrope rope_scaling needs short_factor as a list"):
        start(broken)
    _edit_config(broken, rope_scaling={"rope_type": "yarn"})
    with pytest.raises(ConfigError, match=r"yarn rope_scaling needs its factor"):
        start(broken)


# -- weights ---------------------------------------------------------------------------------


def _rewrite_weights(folder: Path, edit: Any) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor(broken: Path) -> None:
    _rewrite_weights(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"
    ):
        start(broken)


def test_misshaped_tensor(broken: Path) -> None:
    def shrink(tensors: dict[str, Any]) -> None:
        name = "model.layers.0.self_attn.k_proj.weight"
        tensors[name] = tensors[name][:16].clone()

    _rewrite_weights(broken, shrink)
    with pytest.raises(
        CheckpointError,
        match=r"'model\.layers\.0\.self_attn\.k_proj\.weight'.* shape \[16, 64\]"
        r".*config\.json implies \[32, 64\]",
    ):
        start(broken)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(broken: Path, damage: str) -> None:
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors"):
        start(broken)


def test_no_safetensors_files(broken: Path) -> None:
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files in .*convert"):
        start(broken)


def test_index_names_missing_shard(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "ckpt"))
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"shard files that are missing: \['{shard.name}'\]"):
        start(folder)


# -- parallel layout -------------------------------------------------------------------------


@pytest.fixture
def no_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the Runtime gets as far as creating an executor (workers, Ray)."""

    def forbidden(config: Any) -> Any:
        raise AssertionError("an executor was created for an invalid tp")

    monkeypatch.setattr(engine_module, "create_executor", forbidden)


def _assert_fails_before_workers(folder: Path, tp: int, match: str) -> None:
    ray = pytest.importorskip("ray")
    was_initialized = ray.is_initialized()
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        start(folder, tp=tp)
    assert time.perf_counter() - t0 < 2.0  # a Ray start alone takes longer
    assert ray.is_initialized() == was_initialized


@pytest.mark.usefixtures("no_executor")
def test_tp_not_dividing_heads(tmp_path: Path) -> None:
    # intermediate_size 192 is divisible by 3, so the heads are what tp=3 cannot split.
    folder = write_random_checkpoint(
        tmp_path / "ckpt", **dict(TINY_SHAPES, intermediate_size=192), with_tokenizer=False
    )
    _assert_fails_before_workers(
        folder,
        3,
        r"tp=3 cannot shard this model: it does not divide the 8 attention heads(,| and) .*; "
        r"choose tp from \[1, 2, 4, 8\]",
    )


@pytest.mark.usefixtures("no_executor")
def test_tp_not_dividing_intermediate_size(tiny_internlm2_dir: Path) -> None:
    _assert_fails_before_workers(
        tiny_internlm2_dir,
        3,
        r"tp=3 cannot shard this model: .* and does not divide the intermediate size 160; "
        r"choose tp from \[1, 2, 4, 8\]",
    )


@pytest.mark.usefixtures("no_executor")
def test_tp_incompatible_with_kv_heads(tmp_path: Path) -> None:
    # 12 heads over 4 KV heads: tp=6 splits the heads but cuts across KV groups.
    shapes = dict(TINY_SHAPES, hidden_size=96, num_heads=12, num_kv_heads=4, intermediate_size=192)
    folder = write_random_checkpoint(tmp_path / "ckpt", **shapes, with_tokenizer=False)
    _assert_fails_before_workers(
        folder,
        6,
        r"tp=6 cannot shard this model: it neither divides the 4 KV heads nor is a multiple of "
        r"them; choose tp from \[1, 2, 4, 12\]",
    )


@pytest.mark.parametrize("cp", [0, -1, 1.5, True])
def test_cp_below_one(tiny_llama_dir: Path, cp: Any) -> None:
    with pytest.raises(ConfigError, match=rf"parallel\.cp must be an integer >= 1, got {cp!r}"):
        start(tiny_llama_dir, cp=cp)


def test_unknown_runtime_kwarg(tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"Runtime: .*'sesion_len'"):
        start(tiny_llama_dir, sesion_len=128)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(max_num_seqs=2),
            r"max_num_seqs is a scheduler setting; pass scheduler=\{'max_num_seqs': 2\}",
        ),
        (dict(block_size=32), r"block_size is a cache setting; pass cache=\{'block_size': 32\}"),
        (dict(quant_policy=8), r"quant_policy is a cache setting; pass cache=\{'quant_policy'"),
    ],
)
def test_section_setting_given_at_the_top(
    tiny_llama_dir: Path, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        start(tiny_llama_dir, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(dtype="float64"), r"dtype 'float64' is not supported"),
        (dict(device="tpu"), r"device 'tpu' is not supported"),
        (dict(session_len=1), r"session_len must be an integer >= 2, got 1"),
        (dict(seed="x"), r"seed must be an integer >= 0, got 'x'"),
        (dict(job_dir=5), r"job_dir must be a non-empty string or unset, got 5"),
        (dict(ray_address=""), r"ray_address must be a non-empty string or unset, got ''"),
        (dict(master_addr=""), r"master_addr must be a host name or IP address, got ''"),
        (dict(collective_timeout_s=0), r"collective_timeout_s must be a positive number"),
        (dict(enforce_eager="no"), r"enforce_eager must be true or false, got 'no'"),
        (dict(require_ray_auth=1), r"require_ray_auth must be true or false, got 1"),
    ],
)
def test_invalid_runtime_values(tiny_llama_dir: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        start(tiny_llama_dir, **kwargs)


def test_config_argument_must_be_a_runtime_config(tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"config must be a RuntimeConfig, got str 'run\.yaml'"):
        Runtime(config="run.yaml")  # type: ignore[arg-type]


def test_model_given_as_a_path_object(tiny_llama_dir: Path) -> None:
    with Runtime(model=tiny_llama_dir, session_len=64, **CPU32) as runtime:  # type: ignore[arg-type]
        assert runtime.config.model == str(tiny_llama_dir)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(tp=0), r"parallel\.tp must be an integer >= 1, got 0"),
        (dict(session_len=1), r"session_len must be an integer >= 2, got 1"),
        (dict(cache={"block_size": 12}), r"block_size must be a power of two, got 12"),
    ],
)
def test_values_checked_before_the_demo_model_is_fetched(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], match: str
) -> None:
    import dist_runtime.formats.demo_model as demo_model

    def no_fetch(*args: Any, **kw: Any) -> Any:
        raise AssertionError("the demo model was fetched for an invalid config")

    monkeypatch.setattr(demo_model, "demo_model_path", no_fetch)
    with pytest.raises(ConfigError, match=match):
        Runtime(**kwargs)


# -- YAML configs ----------------------------------------------------------------------------


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "runtime.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("model: /m\nsesion_len: 8\n", r"unknown keys \['sesion_len'\]"),
        ("model: /m\ncache: {blocksize: 16}\n", r"cache: unknown keys \['blocksize'\]"),
        ("model: /m\nparallel: {tp: 0}\n", r"parallel\.tp must be an integer >= 1, got 0"),
        ("model: /m\nparallel: {tp: true}\n", r"parallel\.tp must be an integer >= 1, got True"),
        ("model: /m\nparallel: {cp: 0}\n", r"parallel\.cp must be an integer >= 1, got 0"),
        ("model: /m\ncache: {block_size: 12}\n", r"block_size must be a power of two, got 12"),
        ("model: /m\nscheduler: 64\n", r"scheduler must be a mapping, got 64"),
        ("model: /m\nsession_len: long\n", r"session_len must be an integer >= 2, got 'long'"),
        ("model: [unclosed\n", r"is not valid YAML"),
        ("- model: /m\n", r"must hold a mapping at the top level"),
        ("session_len: 8\n", r"missing .*argument: 'model'"),
    ],
    ids=[
        "unknown-key",
        "unknown-nested-key",
        "tp-zero",
        "tp-bool",
        "cp-0",
        "block-size",
        "section-not-mapping",
        "session-len-type",
        "syntax",
        "not-mapping",
        "no-model",
    ],
)
def test_yaml_errors(tmp_path: Path, text: str, match: str) -> None:
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=match):
        RuntimeConfig.from_yaml(path)


def test_yaml_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*absent\.yaml.* does not exist"):
        RuntimeConfig.from_yaml(tmp_path / "absent.yaml")


def test_yaml_override_error_names_the_key(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "model: /m\n")
    with pytest.raises(ConfigError, match=r"parallel\.tp must be an integer >= 1, got -2"):
        RuntimeConfig.from_yaml(path, {"parallel.tp": -2})


@pytest.mark.parametrize(
    "text",
    [
        "cache: {num_blocks: 2.5}",
        "scheduler: {max_num_seqs: many}",
        "cache: {gpu_memory_utilization: high}",
        "cache: {cpu_kv_cache_gb: lots}",
        "scheduler: {max_num_seqs: true}",
        "step_timeout_s: soon",
    ],
)
def test_yaml_wrong_value_types(tmp_path: Path, text: str) -> None:
    key = text.split("{")[-1].split(":")[0].strip() if "{" in text else text.split(":")[0]
    with pytest.raises(ConfigError, match=key):
        RuntimeConfig.from_yaml(_yaml(tmp_path, f"model: /m\n{text}\n"))


def test_a_renamed_key_names_its_replacement(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"cache: unknown keys \['cpu_kv_cache_bytes'\]; cpu_kv_cache_bytes is now "
        r"cpu_kv_cache_gb \(GiB",
    ):
        RuntimeConfig.from_yaml(_yaml(tmp_path, "model: /m\ncache: {cpu_kv_cache_bytes: 5}\n"))


def test_runtime_section_given_as_dict(tiny_llama_dir: Path) -> None:
    with Runtime(model=str(tiny_llama_dir), **{**CPU32, "cache": {"num_blocks": 12}}) as rt:
        assert rt.engine.blocks.num_blocks == 12
    with pytest.raises(ConfigError, match=r"cache.*unknown keys \['blocks'\]"):
        start(tiny_llama_dir, cache={"blocks": 12})


# -- KV cache size ---------------------------------------------------------------------------


def test_kv_cache_cannot_hold_one_prompt(tiny_llama_dir: Path) -> None:
    cache = CacheConfig(num_blocks=2, block_size=4)  # 8 tokens
    with Runtime(model=str(tiny_llama_dir), session_len=64, cache=cache, **CPU32) as small:
        with pytest.raises(
            ValueError, match=r"prompt 0 needs 15 tokens of KV cache .* holds 8 \(2 blocks"
        ):
            small.generate([[5, 6, 7, 8, 9]], SamplingParams(max_new_tokens=10))
        # A request that fits still runs on the same Runtime.
        (out,) = small.generate([[5, 6]], SamplingParams(max_new_tokens=3, temperature=0.0))
        assert len(out.token_ids) <= 3


def test_cpu_kv_cache_is_sized_for_a_full_session(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default a CPU worker reserves what one full session needs when that is over 1 GiB:
    the tiny model's KV takes 512 bytes a token (2 layers x 4 heads x 8 dims x fp32, K and
    V), so 1 GiB holds 2,097,152 tokens and a 3,000,000-token session gets its own 187,500
    blocks. The reservation costs nothing until blocks are used."""
    import dist_runtime.memory_planner as planner_module

    monkeypatch.setattr(planner_module, "available_host_bytes", lambda: 16 << 30)  # any machine
    session = 3_000_000
    with Runtime(
        model=str(tiny_llama_dir), session_len=session, allow_rope_extrapolation=True, **CPU32
    ) as rt:
        assert rt.engine.blocks.num_blocks == session // 16
        assert rt.worker_memory()[0]["kv_cache_bytes"] == session * 512
        (out,) = rt.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, temperature=0.0))
        assert len(out.token_ids) == 3
    with Runtime(model=str(tiny_llama_dir), session_len=64, **CPU32) as rt:
        assert rt.worker_memory()[0]["kv_cache_bytes"] == 1 << 30  # the least it reserves


def test_cpu_kv_cache_asked_for_or_needed_beyond_the_host(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dist_runtime.memory_planner as planner_module

    monkeypatch.setattr(planner_module, "available_host_bytes", lambda: 2 << 30)  # 2 GiB free
    with pytest.raises(
        ValueError,
        match=r"cpu_kv_cache_gb = 3 GiB per worker, but this "
        r"worker's node has 2\.0 GiB of memory available; lower --cpu-kv-cache-gb",
    ):
        start(tiny_llama_dir, cache=CacheConfig(cpu_kv_cache_gb=3))
    # A session needing 2.5 GiB: the default reservation stops at 90% of the 2 GiB.
    with pytest.raises(
        ConfigError,
        match=r"session_len 5000000 does not fit: the KV memory each worker may reserve \(one "
        r"full session's by default, capped at its share of 90% of the memory its node has "
        r"available\) holds 235929 blocks",
    ):
        start(tiny_llama_dir, session_len=5_000_000, allow_rope_extrapolation=True)
    # One asked for below the session's need names the reservation that would hold it.
    with pytest.raises(
        ConfigError,
        match=r"reserves \(--cpu-kv-cache-gb 0\.5\) holds 65536 blocks .* raise "
        r"--cpu-kv-cache-gb to 0\.75, or shorten --session-len to 1048576",
    ):
        start(
            tiny_llama_dir,
            session_len=1_572_864,
            allow_rope_extrapolation=True,
            cache=CacheConfig(cpu_kv_cache_gb=0.5),
        )


def test_kv_cache_budget_of_zero_blocks(tiny_llama_dir: Path) -> None:
    cache = CacheConfig(cpu_kv_cache_gb=1e-9)  # one byte
    with pytest.raises(ValueError, match=r"the KV cache has 0 blocks"):
        start(tiny_llama_dir, cache=cache)


# -- sampling parameters ---------------------------------------------------------------------


BAD_SAMPLING: list[tuple[dict[str, Any], str]] = [
    (dict(temperature=-1), r"temperature must be >= 0.*got -1"),
    (dict(temperature=float("nan")), r"temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0\.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1\.5"),
    (dict(top_k=-1), r"top_k must be an integer >= 0"),
    (dict(min_p=2.0), r"min_p must be in \[0, 1\]"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be > 0"),
    (dict(max_new_tokens=-1), r"max_new_tokens must be an integer >= 0 .*, got -1"),
    (dict(max_new_tokens=True), r"max_new_tokens must be an integer >= 0 .*, got True"),
    (dict(seed=-1), r"seed must be a non-negative integer"),
    (dict(stop=[""]), r"stop must hold non-empty strings"),
    (dict(stop_token_ids=[-3]), r"stop_token_ids must be non-negative integers"),
    (dict(logprobs=21), r"logprobs must be an integer in \[0, 20\]"),
    (dict(extra={"beam_width": 4}), r"unknown sampling options \['beam_width'\]"),
    (dict(extra=5), r"extra must be an empty dict \(reserved\), got 5"),
    (dict(ignore_eos="no"), r"ignore_eos must be True or False, got 'no'"),
    (dict(skip_special_tokens=0), r"skip_special_tokens must be True or False, got 0"),
]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    BAD_SAMPLING,
    ids=["-".join(f"{k}={v}" for k, v in kwargs.items()) for kwargs, _ in BAD_SAMPLING],
)
def test_invalid_sampling_params(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


# -- generate() inputs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompts", "match"),
    [
        ([], r"prompts must be a non-empty list"),
        ("just a string", r"prompts must be a non-empty list .*got str"),
        ([[1, 2], []], r"prompt 1 is empty"),
        ([[1, VOCAB]], rf"prompt 0 has token ids outside \[0, {VOCAB}\): \[{VOCAB}\]"),
        ([[3, -1, 4]], rf"prompt 0 has token ids outside \[0, {VOCAB}\): \[-1\]"),
        ([[3, True]], r"outside .*\[True\]"),
        ([None], r"prompt 0 must be a string or a list of token ids, got NoneType None"),
        ([[1], 7], r"prompt 1 must be a string or a list of token ids, got int 7"),
        ([b"hi"], r"prompt 0 must be a string or a list of token ids, got bytes b'hi'"),
        ([[1], ["hello"]], r"prompt 1 is a list holding text \('hello'\), not token ids"),
    ],
    ids=[
        "empty-list",
        "bare-string",
        "empty-prompt",
        "id-too-large",
        "negative-id",
        "bool-id",
        "none-prompt",
        "int-prompt",
        "bytes-prompt",
        "list-of-text",
    ],
)
def test_bad_prompts(rt: Runtime, prompts: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rt.generate(prompts, SamplingParams(max_new_tokens=2))


def test_prompt_longer_than_session_len(rt: Runtime) -> None:
    with pytest.raises(
        ValueError, match=r"prompt 0 has 40 tokens \+ max_new_tokens 30 = 70, over session_len 64"
    ):
        rt.generate([list(range(4, 44))], SamplingParams(max_new_tokens=30))
    # A short prompt with too many new tokens: the message names max_new_tokens as a way out.
    with pytest.raises(ValueError, match=r"over session_len 64; raise session_len, lower max_new"):
        rt.generate([[5]], SamplingParams(max_new_tokens=100))


def test_stream_of_a_list_of_prompts_names_the_mistake(rt: Runtime) -> None:
    """generate_stream takes one prompt: a list of strings is not read as token ids."""
    with pytest.raises(ValueError, match=r"prompt 0 is a list holding text .*take one prompt"):
        rt.generate_stream(["a story"], SamplingParams(max_new_tokens=2))  # type: ignore[list-item]
    assert rt.engine.stats()["num_waiting"] == 0


def test_numpy_token_ids_are_accepted(rt: Runtime) -> None:
    np = pytest.importorskip("numpy")
    ids = [5, 6, 7]
    params = SamplingParams(max_new_tokens=3)
    (plain,) = rt.generate([ids], params)
    (arr,) = rt.generate([list(np.array(ids, dtype=np.int64))], params)
    assert arr.prompt_token_ids == ids and arr.token_ids == plain.token_ids


def test_params_list_length_mismatch(rt: Runtime) -> None:
    with pytest.raises(
        ValueError, match=r"params must be one SamplingParams or a list of 2, got 1"
    ):
        rt.generate([[5], [6]], [SamplingParams()])


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (5, r"params must be one SamplingParams or a list of 2, got int 5"),
        ("greedy", r"params must be one SamplingParams or a list of 2, got str 'greedy'"),
        (
            {"temperature": 0},
            r"params must be a SamplingParams, got a dict \{'temperature': 0\}; pass "
            r"SamplingParams\(\*\*that_dict\)",
        ),
        ([SamplingParams(), {"temperature": 0}], r"params\[1\] must be a SamplingParams, got dict"),
    ],
    ids=["int", "str", "dict", "dict-in-list"],
)
def test_params_of_the_wrong_type(rt: Runtime, params: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rt.generate([[5], [6]], params)
    with pytest.raises(ValueError, match=r"params must be a SamplingParams or None, got "):
        rt.ask("The keeper is Ada.", ["Who?"], params)


def test_one_prompt_calls_name_one_params(rt: Runtime) -> None:
    with pytest.raises(ValueError, match=r"params must be one SamplingParams, got int 5$"):
        rt.generate_stream([5], 5)  # type: ignore[arg-type]


@pytest.mark.parametrize("messages", [None, [], 5, b"hi"], ids=["none", "empty", "int", "bytes"])
def test_chat_messages_of_the_wrong_kind(rt: Runtime, messages: Any) -> None:
    with pytest.raises(
        ValueError, match=r"messages must be a question string or a non-empty list of chat"
    ):
        rt.chat(messages)


def test_ask_checks_the_length_before_any_step(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two questions share the document's prefix, which used to be prefilled (and then fail
    naming max_new_tokens 1, the prefix pass's) before the length check."""
    assert rt.engine.executor is not None

    def no_step(plan: Any) -> Any:
        raise AssertionError("a step ran for a request over session_len")

    monkeypatch.setattr(rt.engine.executor, "execute", no_step)
    with pytest.raises(
        ValueError,
        match=r"longest prompt has \d+ tokens \+ max_new_tokens 5 = \d+, over session_len 64",
    ):
        rt.ask("word " * 30, ["first?", "second?"], SamplingParams(max_new_tokens=5))


# -- durable jobs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(params="greedy"), r"params must be a SamplingParams or None, got str 'greedy'"),
        (dict(idempotency_key=5), r"idempotency_key must be a non-empty string or None, got 5"),
        (dict(idempotency_key=""), r"idempotency_key must be a non-empty string or None, got ''"),
    ],
    ids=["params", "key-int", "key-empty"],
)
def test_submit_rejects_bad_arguments(rt: Runtime, kwargs: dict[str, Any], match: str) -> None:
    before = len(rt.jobs())
    with pytest.raises(ValueError, match=match):
        rt.submit("The keeper is Ada.", ["Who?"], **kwargs)
    assert len(rt.jobs()) == before  # nothing queued


@pytest.mark.parametrize("timeout", [-1, "soon", float("nan"), True])
def test_result_timeout_must_be_seconds(rt: Runtime, tmp_path: Path, timeout: Any) -> None:
    with pytest.raises(ValueError, match=r"timeout must be a number of seconds >= 0 or None"):
        rt.result("any-id", timeout=timeout)
    client = JobClient(tmp_path)
    with pytest.raises(ValueError, match=r"timeout must be a number of seconds >= 0 or None"):
        client.result("any-id", timeout=timeout)
    client.close()


def test_job_client_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"job_dir must be a directory path, got None"):
        JobClient(None)  # type: ignore[arg-type]
    client = JobClient(tmp_path)
    with pytest.raises(ValueError, match=r"params must be a SamplingParams or None, got dict"):
        client.submit("The keeper is Ada.", ["Who?"], {"max_new_tokens": 4})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"idempotency_key must be a non-empty string"):
        client.submit("The keeper is Ada.", ["Who?"], idempotency_key=7)  # type: ignore[arg-type]
    assert client.jobs() == []
    client.close()


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"max_new_tokens": 4, "beam_width": 2}, r"unknown sampling params \['beam_width'\]"),
        (5, r"params must be a mapping of SamplingParams fields or None, got 5"),
        ({"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1, got 0: answers"),
    ],
    ids=["unknown-key", "not-a-mapping", "bad-value"],
)
def test_queue_actor_rejects_bad_params(tmp_path: Path, params: Any, match: str) -> None:
    """The Ray actor's body (a plain class here, no Ray): remote submitters send a mapping."""
    from dist_runtime.jobs.service import JobQueue

    queue = JobQueue(str(tmp_path))
    with pytest.raises(ValueError, match=match):
        queue.submit("The keeper is Ada.", ["Who?"], params)
    assert queue.jobs() == []
    queue.client.close()


def test_submit_after_shutdown_queues_nothing(tiny_llama_dir: Path, tmp_path: Path) -> None:
    stray = sorted(Path(tempfile.gettempdir()).glob("dist_runtime_jobs_*"))
    runtime = Runtime(model=str(tiny_llama_dir), session_len=64, job_dir=str(tmp_path), **CPU32)
    runtime.shutdown()
    with pytest.raises(RuntimeError, match=r"this Runtime was shut down; create a new one"):
        runtime.submit("The keeper is Ada.", ["Who?"])
    with pytest.raises(RuntimeError, match=r"shut down"):
        runtime.serve_jobs()
    for read in (runtime.jobs, lambda: runtime.status("x"), lambda: runtime.result("x")):
        with pytest.raises(RuntimeError, match=r"shut down.*JobClient\(job_dir\)"):
            read()
    # No stray temporary queue was opened.
    assert sorted(Path(tempfile.gettempdir()).glob("dist_runtime_jobs_*")) == stray
    client = JobClient(tmp_path)
    assert client.jobs() == []
    client.close()


def test_text_prompt_without_tokenizer(single_file_dir: Path) -> None:
    with Runtime(model=str(single_file_dir), session_len=64, **CPU32) as no_tok:
        with pytest.raises(ValueError, match=r"has no tokenizer.*pass token ids"):
            no_tok.generate(["hello"], SamplingParams(max_new_tokens=2))
        (out,) = no_tok.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2, ignore_eos=True))
        assert len(out.token_ids) == 2 and out.text == ""


def test_runtime_serves_after_a_failed_generate(rt: Runtime) -> None:
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    good = [10, 20, 30, 40]
    (before,) = rt.generate([good], greedy)
    with pytest.raises(ValueError, match=r"prompt 1 has token ids outside"):
        rt.generate([good, [VOCAB + 7]], greedy)
    with pytest.raises(ValueError, match=r"prompt 2 is empty"):
        rt.generate([good, good, []], greedy)
    outs = rt.generate([good, good], greedy)
    assert [o.token_ids for o in outs] == [before.token_ids] * 2
    assert not rt.engine.scheduler.has_work()


def test_generate_after_shutdown(tiny_llama_dir: Path) -> None:
    runtime = Runtime(model=str(tiny_llama_dir), session_len=64, **CPU32)
    runtime.shutdown()
    with pytest.raises(RuntimeError, match=r"shut down"):
        runtime.generate([[1, 2]])
