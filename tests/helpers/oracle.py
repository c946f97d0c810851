"""Reference model: the checkpoint loaded into Hugging Face `LlamaForCausalLM`.

InternLM2 folders are converted to Llama names (wqkv unpacked) so that one well-tested HF
implementation is the oracle for both layouts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from dist_runtime.formats.random_checkpoint import unpack_internlm2_wqkv


def load_hf_llama(folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> Any:
    """Load a Llama, InternLM2 or InternLM3 checkpoint folder as an eval-mode eager-attention HF
    Llama (InternLM3 with q/k/v biases as HF's Qwen2; a
    Mistral, Ministral, Qwen2, Qwen3, Phi-3, Granite, GLM or Gemma 1 / 2 / 3 one as HF's own)."""
    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model: Any
    if hf["architectures"] == ["InternLM2ForCausalLM"]:
        model = _load_internlm2(folder, hf, dtype)
    elif hf["architectures"] == ["InternLM3ForCausalLM"]:
        model = _load_internlm3(folder, hf, dtype)
    elif hf["architectures"] in (
        ["MistralForCausalLM"],
        ["MinistralForCausalLM"],
        ["Qwen2ForCausalLM"],
        ["Qwen3ForCausalLM"],
        ["Phi3ForCausalLM"],
        ["GraniteForCausalLM"],
        ["GlmForCausalLM"],
        ["GemmaForCausalLM"],
        ["Gemma2ForCausalLM"],
        ["Gemma3ForCausalLM"],
    ):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation="eager"
        )
    else:
        model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    return model.eval()


def hf_greedy(model: Any, prompt: list[int], new_tokens: int) -> tuple[list[int], list[Any]]:
    """HF generate's greedy tokens after `prompt` and the log-softmax of each step's logits
    (float32, over the vocabulary), EOS ignored."""
    with torch.no_grad():
        gen = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    logprobs = [torch.log_softmax(raw[0].float(), dim=-1) for raw in gen.logits]
    return gen.sequences[0, len(prompt) :].tolist(), logprobs


def _load_internlm2(folder: Path, hf: dict[str, Any], dtype: torch.dtype) -> LlamaForCausalLM:
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    dropped = ("architectures", "model_type", "bias")
    llama = {k: v for k, v in hf.items() if k not in dropped}
    llama.update(head_dim=head_dim, attention_bias=hf.get("bias", False), mlp_bias=False)
    config = LlamaConfig.from_dict(llama, attn_implementation="eager")
    model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.load_state_dict(internlm2_to_llama_state_dict(_read_safetensors(folder), hf))
    return model


def _load_internlm3(folder: Path, hf: dict[str, Any], dtype: torch.dtype) -> Any:
    """InternLM3 (remote code; Llama's layers and names) as the transformers class with its
    biases: Llama's without any, Qwen2's with q/k/v biases alone (`qkv_bias`), Llama's with
    attention and MLP biases where both `qkv_bias` and `bias` are set."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qkv, rest = bool(hf.get("qkv_bias", False)), bool(hf.get("bias", False))
    keys = {k: v for k, v in hf.items() if k not in ("architectures", "model_type", "bias")}
    if qkv and not rest:
        qwen2 = Qwen2Config.from_dict(
            {**keys, "use_sliding_window": False}, attn_implementation="eager"
        )
        return Qwen2ForCausalLM.from_pretrained(folder, config=qwen2, dtype=dtype)
    if qkv != rest:
        raise ValueError("no transformers class has o / MLP biases without q/k/v ones")
    llama = LlamaConfig.from_dict(
        {**keys, "attention_bias": qkv, "mlp_bias": rest}, attn_implementation="eager"
    )
    return LlamaForCausalLM.from_pretrained(folder, config=llama, dtype=dtype)


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def internlm2_to_llama_state_dict(
    src: dict[str, torch.Tensor], hf: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Rename InternLM2 tensors (config.json `hf`) to Llama names, unpacking `wqkv` into q/k/v."""
    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
    head_dim = hf["hidden_size"] // heads
    out = {
        "model.embed_tokens.weight": src["model.tok_embeddings.weight"],
        "model.norm.weight": src["model.norm.weight"],
    }
    out["lm_head.weight"] = src.get("output.weight", src["model.tok_embeddings.weight"])
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            if f"{p}attention.wqkv.{kind}" not in src:
                continue
            qkv = unpack_internlm2_wqkv(src[f"{p}attention.wqkv.{kind}"], heads, kv_heads, head_dim)
            for name, tensor in zip("qkv", qkv):
                out[f"{p}self_attn.{name}_proj.{kind}"] = tensor
            out[f"{p}self_attn.o_proj.{kind}"] = src[f"{p}attention.wo.{kind}"]
        for w, proj in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            out[f"{p}mlp.{proj}_proj.weight"] = src[f"{p}feed_forward.{w}.weight"]
        out[f"{p}input_layernorm.weight"] = src[f"{p}attention_norm.weight"]
        out[f"{p}post_attention_layernorm.weight"] = src[f"{p}ffn_norm.weight"]
    return out
