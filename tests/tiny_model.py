"""A tiny random-weight llama with a real byte-level BPE tokenizer, written as an mlx-lm model dir.

Two layers and a 256-token context: it loads in a fraction of a second, decodes in
milliseconds, and exercises the same loader, tokenizer wrapper, chat template and
batching code as a real model. Its output is gibberish, but deterministic.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% if preamble is defined %}<|im_start|>system\n{{ preamble }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}"
    "{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Variants whose templates make mlx-lm (or worker.tool_formats) pick each tool-call format.
# The "qwen" variant also has <think>/</think> tokens and opens a thinking block when asked.
_CHATML_TURNS = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{% if m.tool_calls %}{% for tool_call in m.tool_calls %}"
    "{% if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}"
    "<tool_call>{\"name\": \"{{ tool_call.name }}\", \"arguments\": {{ tool_call.arguments | tojson }}}</tool_call>"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
)
TOOL_TEMPLATES = {
    "qwen": (
        "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
        + _CHATML_TURNS
        + "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking %}<think>\n{% endif %}{% endif %}"
    ),
    "mistral": (
        "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
        "{% for m in messages %}{% if m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | tojson }}"
        "{% else %}[INST]{{ m['content'] }}[/INST]{% endif %}{% endfor %}"
    ),
    "llama": (
        "{% if tools %}Respond with {\"name\": function name, \"parameters\": dictionary of arguments}. "
        "Functions: {{ tools | tojson }}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
        "{% if m.tool_calls %}<|python_tag|>{{ m.tool_calls | tojson }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}
THINK_TOKENS = ["<think>", "</think>"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CONTEXT_LENGTH = 256

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a short poem about the sea and the sky and the stars.",
    "Tokens, batches, caches and streams: a server for local models.",
    "Café, naïve, façade, déjà vu; 日本語のテキスト; emoji 🎉🚀 and ünïcödé.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
] * 20


@functools.cache
def _trained_bpe() -> str:
    """A byte-level BPE trained once per session on our sentences and Python's own sources.

    A realistic vocabulary keeps long prompts (a Codex request is ~35 KB) at a realistic
    number of tokens, which keeps prefill, quadratic in length on the CPU, quick.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS + _stdlib_text(2_000_000), trainer=trainer)
    return backend.to_str()


def _stdlib_text(limit: int) -> list[str]:
    texts, total = [], 0
    for path in sorted(Path(json.__file__).parent.parent.glob("*.py")):
        text = path.read_text(errors="replace")
        texts.append(text)
        total += len(text)
        if total >= limit:
            break
    return texts


def build_tokenizer(chat_template: str = CHAT_TEMPLATE, added_tokens: tuple[str, ...] = ()):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_trained_bpe())
    if added_tokens:
        backend.add_tokens(list(added_tokens))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
    )


def model_config(vocab_size: int, eos_token_id: int, context_length: int = CONTEXT_LENGTH) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": context_length,
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "eos_token_id": eos_token_id,
    }


def random_weights(config: dict, seed: int = 0) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    # Widen the logit gaps so greedy decoding does not hinge on float rounding
    # (batched and single runs must pick the same tokens).
    lm_head = weights["lm_head.weight"] * 8
    # A zero row gives end-of-turn a logit of 0 while the best token's is far above it, so
    # greedy runs never stop early: tests can rely on long generations to cancel or kill.
    eos = config["eos_token_id"]
    weights["lm_head.weight"] = mx.concatenate([lm_head[:eos], mx.zeros_like(lm_head[eos:eos + 1]), lm_head[eos + 1:]])
    return weights


def save_model_dir(out_dir: Path, weights: dict, config: dict, *savers: Any) -> Path:
    """A model directory as loaders read it: the weights (MLX's safetensors), config.json, and
    each of ``savers`` (tokenizer, processor) saved beside them."""
    import mlx.core as mx

    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for saver in savers:
        saver.save_pretrained(str(out_dir))
    return out_dir


def write_tiny_model(out_dir: Path, variant: str | None = None) -> Path:
    """The plain tiny model, or one of TOOL_TEMPLATES' variants."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if variant is None:
        tokenizer = build_tokenizer()
    else:
        tokenizer = build_tokenizer(TOOL_TEMPLATES[variant], tuple(THINK_TOKENS) if variant == "qwen" else ())
    # Variants get room for tool definitions in the prompt.
    context = CONTEXT_LENGTH if variant is None else 4096
    config = model_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|im_end|>"), context)
    return save_model_dir(out_dir, random_weights(config), config, tokenizer)


def forced_output(tokenizer, script: str):
    """A logits processor that makes the model write ``script`` and then end its turn.

    Test-only: small models do not call tools on their own, so tests that need a tool call
    (or a thinking block) force the tokens and let everything after sampling run for real.
    """
    import mlx.core as mx

    tokens = list(tokenizer.encode(script, add_special_tokens=False)) + [tokenizer.eos_token_id]
    position = 0

    def processor(context, logits):
        nonlocal position
        target = tokens[min(position, len(tokens) - 1)]
        position += 1
        mask = mx.arange(logits.shape[-1]) == target
        return mx.where(mask, mx.zeros_like(logits), mx.full(logits.shape, -mx.inf))

    return processor


SCRIPT_PREFIX = "SCRIPT:"


STEP_SEPARATOR = "|||"
HARNESS_TEXT = "\n\n<system-reminder>"  # Claude Code's reminders, merged after the user's text


def scripted_logits_processors(loaded):
    """For a worker under test: the model writes a script, when the request carries one.

    The script is ``chat_template_kwargs["test_script"]``, or the text after "SCRIPT:" in the
    last user message that has one. A script may have steps separated by "|||" for agent loops: step k is
    written when k tool results follow that user message. Other requests run normally.
    """

    def factory(request):
        script = (request.chat_template_kwargs or {}).get("test_script")
        messages = request.messages or []
        # The last user message with a script (clients such as Claude Code put reminders before
        # the user's text, and after tool results).
        users = [i for i, m in enumerate(messages)
                 if m.get("role") == "user" and SCRIPT_PREFIX in str(m.get("content") or "")]
        if script is None and users:
            content = str(messages[users[-1]].get("content"))
            tool_results = sum(1 for m in messages[users[-1]:] if m.get("role") == "tool")
            # The script ends where harness text merged into the same message begins.
            steps = content.split(SCRIPT_PREFIX, 1)[1].split(HARNESS_TEXT)[0].split(STEP_SEPARATOR)
            if tool_results < len(steps):
                script = steps[tool_results]
        return [forced_output(loaded.tokenizer, script)] if script is not None else []

    return factory
