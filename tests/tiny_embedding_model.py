"""Tiny random-weight embedding models of real architectures, written as model directories.

``write_tiny_bert``: a 2-layer BERT (mlx-embeddings' ``bert``: mean pooling, L2-normalised) with a
real WordPiece tokenizer trained here, and a 64-token window. ``write_tiny_qwen3_embedding``: a
2-layer Qwen3 (mlx-embeddings' ``qwen3``, as Qwen3-Embedding: last-token pooling, Matryoshka)
with the byte-level BPE of tests/tiny_model.py. Both load in well under a second and need no hub.
Their vectors mean nothing, but are deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BERT_CONTEXT = 64
BERT_HIDDEN = 32
QWEN3_HIDDEN = 48

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "def add(a, b):\n    return a + b",
    "Embeddings map text to vectors; similar texts get similar vectors.",
    "Tokens, batches, caches and streams: a server for local models.",
] * 20


def _word_piece_tokenizer(model_max_length: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                        show_progress=False)
    backend.train_from_iterator(_CORPUS, trainer)
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length)


def write_tiny_bert(out_dir: Path, context_length: int = BERT_CONTEXT, seed: int = 0) -> Path:
    from mlx_embeddings.models import bert

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _word_piece_tokenizer(context_length)
    config = {
        "model_type": "bert", "architectures": ["BertModel"], "hidden_size": BERT_HIDDEN, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": context_length,
        "vocab_size": len(tokenizer), "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
        "pad_token_id": tokenizer.pad_token_id,
    }
    return _save(out_dir, bert, config, tokenizer, seed)


def write_tiny_qwen3_embedding(out_dir: Path, seed: int = 0) -> Path:
    """A decoder-based embedding model (model_type qwen3: the worker needs --embedding)."""
    from mlx_embeddings.models import qwen3
    from tiny_model import build_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = {
        "model_type": "qwen3", "architectures": ["Qwen3Model"], "hidden_size": QWEN3_HIDDEN, "num_hidden_layers": 2,
        "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
        "max_position_embeddings": 256, "vocab_size": len(tokenizer), "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": False,
    }
    return _save(out_dir, qwen3, config, tokenizer, seed)


def _save(out_dir: Path, architecture: Any, config: dict, tokenizer: Any, seed: int) -> Path:
    """mlx-embeddings' ``architecture`` module's model, random weights from ``seed``, as a directory."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from tiny_model import save_model_dir

    mx.random.seed(seed)
    model = architecture.Model(architecture.ModelArgs.from_dict(config))
    return save_model_dir(out_dir, dict(tree_flatten(model.parameters())), config, tokenizer)
