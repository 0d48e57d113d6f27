"""Turn a GGUF file into an mlx-lm model directory (config, safetensors, tokenizer).

``mx.load`` reads GGUF tensors and metadata, keeping Q4_0, Q4_1 and Q8_0 weights in MLX's
affine quantized layout (group size 32). We rename tensors to the Hugging Face names
mlx-lm's model classes expect, undo llama.cpp's Q/K row permutation (it converts llama
weights to the interleaved rotary layout; mlx-lm uses the half-split one), write a
config, and build a fast tokenizer from the vocabulary and merges in the metadata with
transformers' GGUF tokenizer builders. mlx-lm's own loader then reads the directory.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, cast

import mlx.core as mx

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded, with a message meant for the operator."""


# GGUF tensor names -> Hugging Face names, per architecture family.
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# architecture -> (mlx-lm model_type, whether llama.cpp permuted Q/K rows at conversion)
SUPPORTED_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}

# llama.cpp's general.file_type values (enum llama_ftype), for messages.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}
SUPPORTED_FILE_TYPES = {0, 1, 2, 3, 7, 32}
GGUF_GROUP_SIZE = 32


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write an mlx-lm model directory for ``gguf_path`` into ``out_dir`` and return it."""
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    try:
        weights, metadata = cast(tuple[dict[str, mx.array], dict[str, Any]],
                                 mx.load(str(gguf_path), return_metadata=True))
    except Exception as exc:
        raise ModelLoadError(
            f"MLX cannot read {gguf_path.name}: {exc}. MLX reads GGUF files in F32, F16, BF16, "
            "Q4_0, Q4_1 and Q8_0; requantize with llama.cpp's llama-quantize or use an MLX build."
        ) from None

    arch = str(metadata.get("general.architecture", ""))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r} in {gguf_path.name}; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    file_type = _scalar(metadata.get("general.file_type"))
    if file_type is not None and file_type not in SUPPORTED_FILE_TYPES:
        name = _FILE_TYPES.get(file_type, f"type {file_type}")
        raise ModelLoadError(
            f"unsupported GGUF quantization {name} in {gguf_path.name}; "
            "supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0"
        )
    model_type, permuted_qk = SUPPORTED_ARCHITECTURES[arch]
    config = _model_config(arch, model_type, metadata, weights)
    hf_weights = _rename_weights(weights, config, permuted_qk)
    config.update(_quantization_config(hf_weights))

    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    mx.save_safetensors(str(tmp_dir / "model.safetensors"), hf_weights, metadata={"format": "mlx"})
    (tmp_dir / "config.json").write_text(json.dumps(config, indent=2))
    _save_tokenizer(arch, metadata, tmp_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)  # atomic: a half-written conversion is never mistaken for a cache hit
    return out_dir


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, mx.array) else value


def _model_config(arch: str, model_type: str, metadata: dict, weights: dict) -> dict:
    def meta(key: str, default: Any = None) -> Any:
        return _scalar(metadata.get(f"{arch}.{key}", default))

    try:
        hidden = int(meta("embedding_length"))
        heads = int(meta("attention.head_count"))
        config = {
            "model_type": model_type,
            "hidden_size": hidden,
            "num_hidden_layers": int(meta("block_count")),
            "intermediate_size": int(meta("feed_forward_length")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
            "head_dim": int(meta("attention.key_length", hidden // heads)),
            "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(meta("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(meta("context_length", 4096)),
            "vocab_size": int(meta("vocab_size", len(metadata["tokenizer.ggml.tokens"]))),
            "tie_word_embeddings": "output.weight" not in weights,
        }
    except (TypeError, KeyError) as exc:
        raise ModelLoadError(f"GGUF metadata is missing {exc}") from None
    for key in ("bos_token_id", "eos_token_id"):
        value = _scalar(metadata.get(f"tokenizer.ggml.{key}"))
        if value is not None:
            config[key] = int(value)
    return config


def _rename_weights(weights: dict[str, mx.array], config: dict, permuted_qk: bool) -> dict[str, mx.array]:
    renamed: dict[str, mx.array] = {}
    for name, value in weights.items():
        parts = name.split(".")
        if parts[0] == "blk":
            layer, part, suffix = parts[1], parts[2], ".".join(parts[3:])
            hf_part = _LAYER_NAMES.get(part)
            if hf_part is None:
                raise ModelLoadError(f"unexpected GGUF tensor {name!r}")
            if permuted_qk and part in ("attn_q", "attn_k"):
                heads = config["num_attention_heads"] if part == "attn_q" else config["num_key_value_heads"]
                value = _unpermute_rows(value, heads)
            renamed[f"model.layers.{layer}.{hf_part}.{suffix}"] = value
        else:
            hf_name = _GLOBAL_NAMES.get(parts[0])
            if hf_name is None:
                log.info("skipping GGUF tensor %s", name)
                continue
            renamed[f"{hf_name}.{'.'.join(parts[1:])}"] = value
    return renamed


def _unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Inverse of llama.cpp's ``permute``: rows (a0 b0 a1 b1 ...) per head back to (a.. b..).

    Rows are output features, and quantization groups run along the input features, so
    quantized weights, scales and biases can all be reordered the same way.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _quantization_config(weights: dict[str, mx.array]) -> dict:
    """mlx-lm's ``quantization`` entry: the common bit width, plus per-module exceptions."""
    bits_by_module: dict[str, int] = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            module = name[: -len(".scales")]
            bits_by_module[module] = weights[f"{module}.weight"].shape[-1] // scales.shape[-1]
    if not bits_by_module:
        return {}
    counts: dict[int, int] = {}
    for bits in bits_by_module.values():
        counts[bits] = counts.get(bits, 0) + 1
    common = max(counts, key=counts.__getitem__)
    quantization: dict[str, Any] = {"group_size": GGUF_GROUP_SIZE, "bits": common, "mode": "affine"}
    for module, bits in bits_by_module.items():
        if bits != common:
            quantization[module] = {"group_size": GGUF_GROUP_SIZE, "bits": bits, "mode": "affine"}
    return {"quantization": quantization}


def _save_tokenizer(arch: str, metadata: dict, out_dir: Path) -> None:
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError("GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    spec: dict[str, Any] = {
        "tokenizer_type": metadata.get("tokenizer.ggml.model"),
        "pre_tokenizer_type": metadata.get("tokenizer.ggml.pre"),
        "tokens": tokens,
    }
    for key, name in (("merges", "merges"), ("scores", "scores"), ("token_type", "token_type")):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None:
            spec[name] = value.tolist() if isinstance(value, mx.array) else value
    try:
        backend, _ = convert_gguf_tokenizer(arch, spec)
    except ValueError as exc:
        raise ModelLoadError(f"cannot build a tokenizer from the GGUF metadata: {exc}") from None
    if spec["pre_tokenizer_type"] == "smollm":
        # SmolLM's own tokenizer.json splits digits one by one before the GPT-2 byte-level split.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )

    def token(key: str) -> str | None:
        index = _scalar(metadata.get(f"tokenizer.ggml.{key}"))
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=metadata.get("tokenizer.chat_template"),
    )
    tokenizer.save_pretrained(str(out_dir))
