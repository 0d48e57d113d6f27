"""How the grammar engines compare on our tokenizers: what chose llguidance (README, "Structured output").

    .venv/bin/python bench/grammar_engines.py [llguidance|outlines|xgrammar] [smollm2|tiny]

For three JSON schemas, the time to compile one and the time to compute each token's mask while
a valid instance is fed token by token. llguidance is the worker's own dependency; outlines-core
and xgrammar are installed by hand to compare (xgrammar imports torch: put a stand-in ``torch``
module on PYTHONPATH if torch is not installed, only the C++ core is timed).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

SIMPLE = ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
           "required": ["name", "age"], "additionalProperties": False},
          {"name": "Ada Lovelace", "age": 36})
NESTED = ({
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "level": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False},
        "nickname": {"type": "string"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "role", "score", "level", "tags", "address", "active"],
    "additionalProperties": False,
}, {"name": "Grace Hopper", "role": "admin", "score": 97.5, "level": 4, "tags": ["navy", "cobol"],
    "address": {"street": "1 Main St", "city": "Arlington", "zip": "22201"}, "active": True})


def _large() -> tuple[dict, dict]:
    kinds = [({"type": "string"}, "some text here"), ({"type": "integer"}, 42), ({"type": "number"}, 3.25),
             ({"type": "boolean"}, False), ({"type": "array", "items": {"type": "integer"}}, [1, 2, 3]),
             ({"type": "string", "enum": ["red", "green", "blue"]}, "green")]
    properties = {f"field_{i}": kinds[i % len(kinds)][0] for i in range(40)}
    instance = {f"field_{i}": kinds[i % len(kinds)][1] for i in range(40)}
    item = {"type": "object", "properties": {"id": {"type": "integer"}, "label": {"type": "string"},
                                             "children": {"type": "array", "items": {"type": "string"}}},
            "required": ["id", "label"], "additionalProperties": False}
    properties["items"] = {"type": "array", "items": item}
    instance["items"] = [{"id": 1, "label": "first", "children": ["a", "b"]}, {"id": 2, "label": "second"}]
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}, instance


SCHEMAS = {"simple": SIMPLE, "nested": NESTED, "large": _large()}


def _tokenizer(name: str):
    if name == "tiny":
        from tiny_model import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    from worker.models import resolve

    return AutoTokenizer.from_pretrained(resolve("smollm2-135m")[0])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table (byte-level BPE token strings)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def main() -> None:
    engine = sys.argv[1] if len(sys.argv) > 1 else "llguidance"
    tokenizer_name = sys.argv[2] if len(sys.argv) > 2 else "smollm2"
    hf = _tokenizer(tokenizer_name)
    vocab, eos = len(hf), hf.eos_token_id
    words = (vocab + 31) // 32
    started = time.perf_counter()
    if engine == "llguidance":
        import llguidance
        import llguidance.hf

        lt = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
        options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

        def compile_(schema):
            return llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options))

        def step(matcher, bitmask, token):
            matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)
            return lambda: matcher.consume_token(token)
    elif engine == "outlines":
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        decode = {c: b for b, c in _bytes_to_unicode().items()}
        table: dict[bytes, list[int]] = {}
        special = set(hf.all_special_ids)
        for token, token_id in hf.get_vocab().items():
            if token_id not in special:
                key = bytes(decode[c] for c in token) if all(c in decode for c in token) else token.encode()
                table.setdefault(key, []).append(token_id)
        outlines_vocabulary = Vocabulary(eos, table)

        def compile_(schema):
            return Guide(Index(build_regex_from_schema(json.dumps(schema), whitespace_pattern=r"[ ]?"),
                               outlines_vocabulary))

        def step(guide, bitmask, token):
            guide.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)
            return lambda: token == eos or guide.advance(token, return_tokens=False)
    elif engine == "xgrammar":
        import xgrammar

        compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab), max_threads=2)

        def compile_(schema):
            return xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                                        separators=(", ", ": ")))

        def step(matcher, bitmask, token):
            matcher.fill_next_token_bitmask(bitmask)
            return lambda: matcher.accept_token(token)
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    print(f"{engine} on {tokenizer_name} ({vocab} tokens): tokenizer setup {time.perf_counter() - started:.2f} s")
    for name, (schema, instance) in SCHEMAS.items():
        tokens = [*hf.encode(json.dumps(instance), add_special_tokens=False), eos]
        started = time.perf_counter()
        matcher = compile_(schema)
        compile_ms = (time.perf_counter() - started) * 1000
        bitmask = np.full((1, words), -1, dtype=np.int32)
        masks = []
        for token in tokens:
            started = time.perf_counter()
            consume = step(matcher, bitmask, token)
            masks.append(time.perf_counter() - started)
            assert (int(bitmask.flat[token // 32]) >> (token % 32)) & 1, f"{name}: the engine refused a valid token"
            consume()
        masks.sort()
        print(f"  {name:7s} compile {compile_ms:8.2f} ms   mask p50 {masks[len(masks) // 2] * 1e6:6.0f} µs  "
              f"p95 {masks[int(len(masks) * 0.95)] * 1e6:6.0f} µs  max {masks[-1] * 1e6:6.0f} µs  "
              f"({len(tokens)} tokens)")


if __name__ == "__main__":
    main()
