"""Constrained decoding in the engine, on the tiny random-weight model.

Unconstrained, the tiny model writes noise (checked below), so an output that parses and
validates against its schema, every time, for many prompts at temperature 1, is the
constraint's doing and cannot be luck.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from tiny_model import forced_output

from protocol import Accepted, Error, Generate, SamplingParams
from protocol.messages import ERROR_INVALID_SCHEMA, ERROR_INVALID_TOOL_SCHEMA
from worker.constraints import ConstraintError, Grammars, plan
from worker.engine import Engine
from worker.models import load
from worker.tool_formats import ToolFormat

HOT = SamplingParams(temperature=1.0)
NO_THINKING = {"enable_thinking": False}
PROMPTS = ["Describe a person.", "hi", "Give me JSON about the sea.", "def f(x):", "Café 日本 🎉", "List things."]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "score": {"type": "number", "minimum": -1.5, "maximum": 1.5, "multipleOf": 0.25},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "nickname": {"type": "string", "maxLength": 8},  # optional
        "active": {"type": "boolean"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 4},
    },
    "required": ["name", "age", "score", "role", "active", "address", "tags"],
    "additionalProperties": False,
}
# What pydantic writes for nested models: $defs and $ref, titles, anyOf with null.
ORDER = {
    "$defs": {
        "Item": {"type": "object", "title": "Item",
                 "properties": {"sku": {"type": "string", "title": "Sku", "maxLength": 6},
                                "qty": {"type": "integer", "title": "Qty", "minimum": 1, "maximum": 9}},
                 "required": ["sku", "qty"], "additionalProperties": False},
    },
    "type": "object",
    "title": "Order",
    "properties": {
        "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 1, "maxItems": 3},
        "note": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
        "priority": {"const": "high"},
    },
    "required": ["items", "note", "priority"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10},
                           "unit": {"type": "string", "enum": ["c", "f"]},
                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
LOOSE = {"type": "function", "function": {"name": "lookup", "description": "Look something up",
                                          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def models(tiny_variant_dir):
    return {variant: load(str(tiny_variant_dir(variant))) for variant in ("qwen", "mistral", "llama")}


def chat(request_id: str, text: str, **kwargs) -> Generate:
    kwargs.setdefault("max_tokens", 300)
    kwargs.setdefault("sampling", HOT)
    kwargs.setdefault("chat_template_kwargs", NO_THINKING)
    return Generate(request_id, messages=[{"role": "user", "content": text}], **kwargs)


def run(engine: Engine, *requests: Generate) -> dict[str, dict]:
    """Every request at once; per request: content, reasoning, calls, finish reason."""
    out = {r.request_id: {"content": "", "reasoning": "", "calls": [], "finish": None} for r in requests}
    for request in requests:
        accepted = engine.submit(request)
        assert isinstance(accepted, Accepted), accepted
    while engine.busy:
        result = engine.step()
        assert not result.errors, result.errors
        for delta in result.deltas:
            one = out[delta.request_id]
            one["content"] += delta.text
            one["reasoning"] += delta.reasoning
            one["calls"] += delta.tool_calls
        for finished in result.finished:
            out[finished.request_id]["finish"] = finished.finish_reason
    return out


def forced_prefix(tokenizer, text: str):
    """A test hook: the model writes ``text``, then whatever it (and the constraint) likes."""
    import mlx.core as mx

    tokens = list(tokenizer.encode(text, add_special_tokens=False))
    position = 0

    def processor(context, logits):
        nonlocal position
        position += 1
        if position > len(tokens):
            return logits
        mask = mx.arange(logits.shape[-1]) == tokens[position - 1]
        return mx.where(mask, mx.zeros_like(logits), mx.full(logits.shape, -mx.inf))

    return processor


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("schema", [PERSON, ORDER], ids=["nested-bounds-enums-optional", "pydantic-defs-anyof"])
def test_every_constrained_output_validates(models, schema):
    engine = Engine(models["qwen"], max_sequences=8)
    out = run(engine, *[chat(f"c{i}", p, constraint={"type": "json_schema", "schema": schema})
                        for i, p in enumerate(PROMPTS)])
    for one in out.values():
        assert one["finish"] == "stop", one
        jsonschema.validate(json.loads(one["content"]), schema)
    assert len({one["content"] for one in out.values()}) > 1, "different prompts, different objects"
    # The same requests unconstrained: noise, not JSON.
    free = run(Engine(models["qwen"], max_sequences=8),
               *[chat(f"f{i}", p, max_tokens=40) for i, p in enumerate(PROMPTS)])
    assert not any(parses(one["content"]) for one in free.values())


def test_json_object_regex_and_lark(models):
    # Sampled, and whether any reply ends is chance: seeded, and without speculation (whose
    # timing-driven choices would change which random draws each token takes).
    import mlx.core as mx

    mx.random.seed(3)
    engine = Engine(models["qwen"], speculative="off")
    objects = run(engine, *[chat(f"object{i}", p, constraint={"type": "json_object"}) for i, p in enumerate(PROMPTS)])
    # Any object: random weights may nest without end, so only replies that ended are parsed.
    ended = [one["content"] for one in objects.values() if one["finish"] == "stop"]
    assert ended and all(isinstance(json.loads(text), dict) for text in ended)
    out = run(engine,
              chat("regex", "hi", constraint={"type": "regex", "pattern": r"(yes|no): [0-9]{3}-[a-z]{2,4}"}),
              chat("lark", "hi", constraint={"type": "lark", "grammar": 'start: "x=" NUM ("," NUM)*\nNUM: /[0-9]{1,3}/'}))
    assert re.fullmatch(r"(yes|no): [0-9]{3}-[a-z]{2,4}", out["regex"]["content"]), out["regex"]
    assert re.fullmatch(r"x=[0-9]{1,3}(,[0-9]{1,3})*", out["lark"]["content"]), out["lark"]


def test_a_mixed_batch_constrains_only_its_constrained_rows(models):
    greedy = SamplingParams(temperature=0.0)
    free = [chat(f"free{i}", p, max_tokens=20, sampling=greedy) for i, p in enumerate(PROMPTS[:3])]
    alone = {}
    for request in free:
        alone.update(run(Engine(models["qwen"]), request))
    constrained = [chat(f"json{i}", p, constraint={"type": "json_schema", "schema": PERSON})
                   for i, p in enumerate(PROMPTS[:3])]
    together = run(Engine(models["qwen"], max_sequences=8), *[r for pair in zip(free, constrained, strict=True) for r in pair])
    for request in free:
        assert together[request.request_id]["content"] == alone[request.request_id]["content"]
    for request in constrained:
        jsonschema.validate(json.loads(together[request.request_id]["content"]), PERSON)


def test_a_schema_the_engine_cannot_apply_fails_before_anything_runs(models):
    engine = Engine(models["qwen"])
    bad = engine.submit(chat("bad", "hi", constraint={"type": "json_schema", "schema": {"not": {"type": "string"}}}))
    assert isinstance(bad, Error) and bad.code == ERROR_INVALID_SCHEMA and "not" in bad.message
    unknown = engine.submit(chat("regex", "hi", constraint={"type": "regex", "pattern": "[unclosed"}))
    assert isinstance(unknown, Error) and unknown.code == ERROR_INVALID_SCHEMA
    shape = engine.submit(chat("shape", "hi", constraint={"type": "xml"}))
    assert isinstance(shape, Error) and shape.code == ERROR_INVALID_SCHEMA
    broken_tool = {"type": "function", "function": {**WEATHER["function"], "parameters": {"type": "strin"}}}
    tool = engine.submit(chat("tool", "hi", tools=[broken_tool]))
    assert isinstance(tool, Error) and tool.code == ERROR_INVALID_TOOL_SCHEMA and "get_weather" in tool.message
    assert not engine.busy, "nothing was queued"


def test_grammars_are_compiled_once_per_schema(models):
    engine = Engine(models["qwen"])
    assert isinstance(engine.submit(chat("a", "hi", constraint={"type": "json_schema", "schema": ORDER})), Accepted)
    compiled = engine._grammars.compiled
    assert isinstance(engine.submit(chat("b", "ho", constraint={"type": "json_schema", "schema": ORDER})), Accepted)
    assert engine._grammars.compiled == compiled


def test_max_tokens_mid_object_ends_with_length(models):
    out = run(Engine(models["qwen"]), chat("cut", "hi", max_tokens=6, constraint={"type": "json_schema", "schema": PERSON}))
    assert out["cut"]["finish"] == "length" and out["cut"]["content"].startswith('{"name": "')
    assert not parses(out["cut"]["content"])


def call_text(calls) -> list[tuple[str, dict]]:
    return [(call.name, json.loads(call.arguments)) for call in calls]


@pytest.mark.parametrize("variant", ["qwen", "mistral", "llama"])
def test_required_tool_choice_makes_the_models_own_reply_a_valid_call(models, variant):
    engine = Engine(models[variant], max_sequences=8)
    out = run(engine, *[chat(f"r{i}", p, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
                        for i, p in enumerate(PROMPTS)])
    for one in out.values():
        assert one["finish"] == "stop" and one["content"] == "", one
        [(name, arguments)] = call_text(one["calls"])
        assert name == "get_weather"
        jsonschema.validate(arguments, WEATHER["function"]["parameters"])


def test_parallel_calls_of_strict_and_loose_tools(models):
    # Random weights may chain calls until max_tokens: every call that closed is checked.
    engine = Engine(models["qwen"], max_sequences=8)
    out = run(engine, *[chat(f"p{i}", p, tools=[WEATHER, LOOSE], tool_choice="required", max_tokens=400)
                        for i, p in enumerate(PROMPTS)])
    calls = [call for one in out.values() for call in call_text(one["calls"])]
    assert calls and {name for name, _ in calls} <= {"get_weather", "lookup"}
    for one in out.values():
        assert one["content"].strip() == "" or one["finish"] == "length", one
    for name, arguments in calls:
        if name == "get_weather":
            jsonschema.validate(arguments, WEATHER["function"]["parameters"])
        assert isinstance(arguments, dict)


def test_a_strict_tools_arguments_follow_its_schema_once_the_model_opens_a_call(models):
    loaded = models["qwen"]
    engine = Engine(loaded, max_sequences=8,
                    logits_processors=lambda request: [forced_prefix(loaded.tokenizer, "Let me check.<tool_call>")])
    out = run(engine, *[chat(f"t{i}", p, tools=[WEATHER], parallel_tool_calls=False) for i, p in enumerate(PROMPTS)])
    for one in out.values():
        assert one["content"] == "Let me check." and one["finish"] == "stop", one
        [(name, arguments)] = call_text(one["calls"])
        assert name == "get_weather"
        jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    # Parallel calls allowed: after the call closes the reply is free again.
    out = run(engine, chat("free", "hi", tools=[WEATHER], max_tokens=80))
    assert len(out["free"]["calls"]) >= 1


def test_the_constraint_starts_after_the_thinking_block(models):
    loaded = models["qwen"]
    engine = Engine(loaded, logits_processors=lambda request: [forced_prefix(loaded.tokenizer, "Hmm, a person.</think>")])
    # enable_thinking: the template ends the prompt inside an open <think> block.
    out = run(engine, chat("t", "hi", constraint={"type": "json_schema", "schema": PERSON},
                           chat_template_kwargs={"enable_thinking": True}))
    assert out["t"]["reasoning"] == "Hmm, a person."
    jsonschema.validate(json.loads(out["t"]["content"]), PERSON)


def test_a_model_may_open_a_thinking_block_before_a_constrained_answer(models):
    loaded = models["qwen"]
    engine = Engine(loaded, logits_processors=lambda request: [forced_prefix(loaded.tokenizer, "<think>plan</think>")])
    out = run(engine, chat("t", "hi", constraint={"type": "json_schema", "schema": ORDER}))
    assert out["t"]["reasoning"] == "plan"
    jsonschema.validate(json.loads(out["t"]["content"]), ORDER)


def test_strict_tools_on_a_format_without_a_grammar_are_refused(models):
    grammars = Grammars(models["qwen"].tokenizer)
    xml = ToolFormat("<tool_call>", "</tool_call>", lambda text, tools: {}, native=True)
    with pytest.raises(ConstraintError) as refused:
        plan(chat("x", "hi", tools=[WEATHER]), xml, grammars, forced_tool_call=False, initial_state="normal")
    assert refused.value.code == ERROR_INVALID_TOOL_SCHEMA and "strict: false" in str(refused.value)
    # Not strict: nothing to constrain.
    assert plan(chat("y", "hi", tools=[LOOSE]), xml, grammars, forced_tool_call=False, initial_state="normal") is None


def test_a_scripted_override_abandons_the_constraint_without_failing(models):
    # A processor after ours (the scripted test worker's) may force tokens the grammar refuses.
    loaded = models["qwen"]
    engine = Engine(loaded, logits_processors=lambda request: [forced_output(loaded.tokenizer, "not json")])
    out = run(engine, chat("s", "hi", constraint={"type": "json_object"}))
    assert out["s"]["content"] == "not json" and out["s"]["finish"] == "stop"


def test_a_forced_call_comes_after_the_thinking_block(models):
    # tool_choice "required" on a thinking model: no marker is prefilled, so the model thinks
    # first; then the grammar makes the rest of the reply a call.
    loaded = models["qwen"]
    engine = Engine(loaded, logits_processors=lambda request: [forced_prefix(loaded.tokenizer, "Which city?</think>")])
    out = run(engine, chat("t", "hi", tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                           chat_template_kwargs={"enable_thinking": True}))
    assert out["t"]["reasoning"] == "Which city?" and out["t"]["content"].strip() == ""
    [(name, arguments)] = call_text(out["t"]["calls"])
    assert name == "get_weather"
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
