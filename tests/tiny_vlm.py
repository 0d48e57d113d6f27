"""A tiny random-weight LLaVA (CLIP vision tower, projector, llama language model), written as a
model directory mlx-vlm loads: config.json, safetensors, the tiny model's tokenizer with an
``<image>`` token, and a LLaVA processor (CLIP image processor) built locally; nothing is downloaded.

A 56x56 image becomes 16 image tokens (4x4 patches of 14 pixels; the CLS token is dropped), so a
one-image prompt is ~30 tokens. Output is gibberish, but deterministic; as in the tiny text model,
end-of-turn never wins greedy decoding, so tests can count on long generations.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from tiny_model import build_tokenizer, save_model_dir

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 56
PATCH_SIZE = 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # per image
# As the real VLMs' templates (SmolVLM's, Idefics3's, LLaVA's): content is always a list of parts
# (a plain string would render as nothing), and the template writes the BOS itself.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>\n{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _adds_bos(tokenizer: Any) -> Any:
    """As llama's tokenizers: encoding with special tokens (the default) puts a BOS first, here the
    template's own first token, so a prompt tokenized with them would start with two."""
    from tokenizers.processors import TemplateProcessing

    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))])
    return tokenizer


def write_tiny_vlm(out_dir: Path, image_size: int = IMAGE_SIZE) -> Path:
    """``image_size``: the vision tower's input side (``(image_size // 14) ** 2`` tokens per image)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import llava
    from transformers import CLIPImageProcessor, LlavaProcessor

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _adds_bos(build_tokenizer(CHAT_TEMPLATE, (IMAGE_TOKEN,)))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text: dict[str, Any] = {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "vocab_size": len(tokenizer), "tie_word_embeddings": False,
    }
    vision: dict[str, Any] = {
        "model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
        "num_attention_heads": 2, "image_size": image_size, "patch_size": PATCH_SIZE, "projection_dim": 32,
        "num_channels": 3, "layer_norm_eps": 1e-5,
    }
    config = {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "text_config": text,
        "vision_config": vision, "image_token_index": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "vision_feature_select_strategy": "default", "vision_feature_layer": -2, "vocab_size": len(tokenizer),
        "eos_token_id": eos,
    }
    parsed = llava.ModelConfig.from_dict({**config, "text_config": llava.TextConfig.from_dict(text),
                                          "vision_config": llava.VisionConfig.from_dict(vision)})
    mx.random.seed(0)
    weights = dict(tree_flatten(llava.Model(parsed).parameters()))
    # As tests/tiny_model.py: wide logit gaps (batched and single runs pick the same tokens), and
    # end-of-turn's row zeroed so greedy runs never stop on their own.
    head = weights["language_model.lm_head.weight"] * 8
    weights["language_model.lm_head.weight"] = mx.concatenate([head[:eos], mx.zeros_like(head[eos:eos + 1]),
                                                                head[eos + 1:]])
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    return save_model_dir(out_dir, weights, config, processor, tokenizer)


IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}"
    "{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% elif p['type'] == 'text' %}: {{ p['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def write_tiny_idefics3(out_dir: Path) -> Path:
    """A tiny Idefics3 (SmolVLM's architecture: SigLIP-style vision tower, pixel-shuffle connector,
    llama text model), with its processor's image splitting: an image larger than 64 pixels is cut
    into 64-pixel tiles plus a global view, each 4 image tokens between row/column marker tokens."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import idefics3
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    out_dir.mkdir(parents=True, exist_ok=True)
    markers = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
    tokenizer = build_tokenizer(IDEFICS3_TEMPLATE, (IMAGE_TOKEN, "<fake_token_around_image>", "<global-img>",
                                                    "<end_of_utterance>", *markers))
    eos = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    text: dict[str, Any] = {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "vocab_size": len(tokenizer), "tie_word_embeddings": False,
    }
    vision: dict[str, Any] = {
        "model_type": "idefics3_vision", "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
        "num_attention_heads": 2, "image_size": 64, "patch_size": 16, "num_channels": 3, "layer_norm_eps": 1e-5,
    }
    config = {
        "model_type": "idefics3", "architectures": ["Idefics3ForConditionalGeneration"], "text_config": text,
        "vision_config": vision, "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), "scale_factor": 2,
        "vocab_size": len(tokenizer), "eos_token_id": eos,
    }
    parsed = idefics3.ModelConfig.from_dict({**config, "text_config": idefics3.TextConfig.from_dict(text),
                                             "vision_config": idefics3.VisionConfig.from_dict(vision)})
    mx.random.seed(0)
    weights = dict(tree_flatten(idefics3.Model(parsed).parameters()))
    image_processor = Idefics3ImageProcessor(do_image_splitting=True, size={"longest_edge": 128},
                                             max_image_size={"longest_edge": 64})
    # (64 / 16)^2 patches, pixel-shuffled by scale_factor 2: 4 tokens per tile
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=IDEFICS3_TEMPLATE)
    return save_model_dir(out_dir, weights, config, processor, tokenizer)


def png(seed: int, width: int = 40, height: int = 50, noise: bool = True) -> bytes:
    """A PNG of random pixels (``noise``: it compresses badly, so its size follows its pixels) or one colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    if noise:
        pixels = (rng.random((height, width, 3)) * 255).astype("uint8")
    else:
        pixels = np.full((height, width, 3), seed % 256, dtype="uint8")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()
