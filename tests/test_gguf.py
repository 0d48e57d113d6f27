"""GGUF -> mlx-lm conversion, checked against the model it was made from.

We write the tiny model as llama.cpp would (GGUF names, Q/K rows permuted for interleaved
rotary embeddings, tokenizer in the metadata), convert it back with worker.gguf, and
require the same logits and the same tokenization as the original.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from worker.gguf import ModelLoadError, convert_gguf

LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(w: mx.array, n_heads: int) -> mx.array:
    """llama.cpp's convert_hf_to_gguf.py ``permute`` (what GGUF llama files contain)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir: Path, out: Path, architecture: str = "llama", file_type: int = 0) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    weights = mx.load(str(model_dir / "model.safetensors"))
    tensors = {}
    for name, w in weights.items():
        if name.startswith("model.layers."):
            _, _, layer, *rest = name.split(".")
            module, suffix = ".".join(rest[:-1]), rest[-1]
            if module == "self_attn.q_proj":
                w = llama_cpp_permute(w, config["num_attention_heads"])
            elif module == "self_attn.k_proj":
                w = llama_cpp_permute(w, config["num_key_value_heads"])
            tensors[f"blk.{layer}.{LAYER_NAMES[module]}.{suffix}"] = w
        else:
            tensors[{"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]] = w

    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    for added in tokenizer["added_tokens"]:
        tokens[added["id"]] = added["content"]
    special = {a["id"] for a in tokenizer["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    template = tokenizer_config.get("chat_template") or (model_dir / "chat_template.jinja").read_text()

    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    metadata = {
        "general.architecture": architecture,
        "general.file_type": u32(file_type),
        "llama.embedding_length": u32(config["hidden_size"]),
        "llama.block_count": u32(config["num_hidden_layers"]),
        "llama.feed_forward_length": u32(config["intermediate_size"]),
        "llama.attention.head_count": u32(config["num_attention_heads"]),
        "llama.attention.head_count_kv": u32(config["num_key_value_heads"]),
        "llama.attention.layer_norm_rms_epsilon": mx.array(config["rms_norm_eps"], dtype=mx.float32),
        "llama.rope.freq_base": mx.array(config["rope_theta"], dtype=mx.float32),
        "llama.context_length": u32(config["max_position_embeddings"]),
        "llama.vocab_size": u32(config["vocab_size"]),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array([3 if i in special else 1 for i in range(len(tokens))], dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(tokens.index("<|im_start|>")),
        "tokenizer.ggml.eos_token_id": u32(tokens.index("<|im_end|>")),
        "tokenizer.chat_template": template,
    }
    mx.save_gguf(str(out), tensors, metadata)
    return out


def test_converted_gguf_matches_the_original_model(tiny_model_dir, tmp_path):
    from mlx_lm.utils import load

    gguf = write_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    converted = convert_gguf(gguf, tmp_path / "converted")
    original_model, original_tok = load(str(tiny_model_dir))
    model, tok = load(str(converted))

    text = "What is the capital of France? Café 日本 🎉"
    assert tok.encode(text) == original_tok.encode(text)
    messages = [{"role": "user", "content": text}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == original_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.eos_token_ids == original_tok.eos_token_ids

    ids = mx.array([original_tok.encode(prompt, add_special_tokens=False)])
    expected, actual = original_model(ids), model(ids)
    assert mx.allclose(actual, expected, atol=1e-4).item(), "Q/K un-permutation or naming is wrong"


def test_without_unpermuting_the_logits_differ(tiny_model_dir, tmp_path):
    """Guards the test above: the permutation matters for this model."""
    from mlx_lm.utils import load

    converted = convert_gguf(write_gguf(tiny_model_dir, tmp_path / "t.gguf"), tmp_path / "c")
    weights = mx.load(str(converted / "model.safetensors"))
    config = json.loads((converted / "config.json").read_text())
    weights["model.layers.0.self_attn.q_proj.weight"] = llama_cpp_permute(
        weights["model.layers.0.self_attn.q_proj.weight"], config["num_attention_heads"])
    mx.save_safetensors(str(converted / "model.safetensors"), weights, metadata={"format": "mlx"})
    original_model, tok = load(str(tiny_model_dir))
    model, _ = load(str(converted))
    ids = mx.array([tok.encode("What is the capital of France?")])
    assert not mx.allclose(model(ids), original_model(ids), atol=1e-4).item()


def test_unknown_architecture_is_a_clear_error(tiny_model_dir, tmp_path):
    gguf = write_gguf(tiny_model_dir, tmp_path / "x.gguf", architecture="mamba")
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'mamba'"):
        convert_gguf(gguf, tmp_path / "out")


def test_unsupported_quantization_is_a_clear_error(tiny_model_dir, tmp_path):
    gguf = write_gguf(tiny_model_dir, tmp_path / "k.gguf", file_type=15)
    with pytest.raises(ModelLoadError, match="unsupported GGUF quantization Q4_K_M"):
        convert_gguf(gguf, tmp_path / "out")


def test_missing_and_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="MLX cannot read junk.gguf"):
        convert_gguf(junk, tmp_path / "out")
