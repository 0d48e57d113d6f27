"""Tool calls and reasoning, parsed from output that went through the real generation path.

The tiny model is made to write scripted text (a test-only logits processor); sampling,
detokenization, stop strings and parsing all run as in production.
"""

from __future__ import annotations

import json

import pytest
from tiny_model import forced_output

from protocol import Accepted, Generate, SamplingParams
from worker.engine import Engine
from worker.models import load

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def models(tiny_variant_dir):
    return {variant: load(str(tiny_variant_dir(variant))) for variant in ("qwen", "mistral", "llama")}


def run_scripted(loaded, script: str, tools=(WEATHER,), **kwargs):
    """Generate with the model forced to write ``script``; return (content, reasoning, calls, finished)."""
    engine = Engine(loaded, logits_processors=lambda request: [forced_output(loaded.tokenizer, script)])
    # mlx-lm turns thinking on by default for models that have it; these tests choose.
    kwargs.setdefault("chat_template_kwargs", {"enable_thinking": False})
    request = Generate("r", messages=[{"role": "user", "content": "Weather in Paris?"}],
                       tools=list(tools) or None, sampling=SamplingParams(temperature=0.0), **kwargs)
    assert isinstance(engine.submit(request), Accepted)
    content, reasoning, calls, finished = "", "", [], None
    deltas = 0
    while engine.busy:
        result = engine.step()
        for delta in result.deltas:
            deltas += 1
            content += delta.text
            reasoning += delta.reasoning
            calls += delta.tool_calls
        finished = result.finished[0] if result.finished else finished
    assert deltas > 3, "output should arrive token by token"
    return content, reasoning, calls, finished


def call_args(call) -> dict:
    return json.loads(call.arguments)


@pytest.mark.parametrize(
    "variant, script",
    [
        ("qwen", 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
        ("mistral", 'Let me check.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
        ("llama", '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
        ("llama", 'Let me check.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    ],
    ids=["hermes-qwen", "mistral", "llama-json", "llama-python-tag"],
)
def test_tool_call_formats(models, variant, script):
    loaded = models[variant]
    marker = {"qwen": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama": "<|python_tag|>"}[variant]
    if marker in script:
        assert len(loaded.tokenizer.encode(marker, add_special_tokens=False)) > 1, "the marker must span tokens"
    content, _, calls, finished = run_scripted(loaded, script)
    assert [(c.name, call_args(c)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_")
    assert content == ("Let me check." if script.startswith("Let") else "")
    assert finished.finish_reason == "stop"


def test_parallel_calls_and_text_after_a_call(models):
    script = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
              '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call> done')
    content, _, calls, _ = run_scripted(models["qwen"], script)
    assert [call_args(c)["city"] for c in calls] == ["Paris", "Oslo"]
    assert len({c.id for c in calls}) == 2
    assert content == " done"


def test_a_malformed_call_is_passed_on_as_text(models):
    content, _, calls, _ = run_scripted(models["qwen"], "<tool_call>not json at all</tool_call>")
    assert calls == [] and content == "<tool_call>not json at all"


def test_a_call_cut_off_by_max_tokens_is_text(models):
    script = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    content, _, calls, finished = run_scripted(models["qwen"], script, max_tokens=18)
    assert calls == [] and content.startswith("<tool_call>{") and finished.finish_reason == "length"


def test_without_tools_markers_are_plain_text(models):
    script = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    content, _, calls, _ = run_scripted(models["qwen"], script, tools=())
    assert calls == [] and content == script


def test_llama_text_that_is_not_json_streams_as_text(models):
    content, _, calls, _ = run_scripted(models["llama"], "  Paris is {sunny}.")
    # (mlx-lm's BPE detokenizer drops the first space of a chat reply.)
    assert calls == [] and content == " Paris is {sunny}."


def test_reasoning_block_is_split_from_the_answer(models):
    content, reasoning, calls, finished = run_scripted(
        models["qwen"], "<think>The user wants weather.</think>It is sunny.", tools=())
    assert reasoning == "The user wants weather." and content == "It is sunny."
    assert 0 < finished.reasoning_tokens < finished.completion_tokens


def test_reasoning_opened_by_the_template(models):
    # enable_thinking makes the template end the prompt with "<think>\n": the reply starts inside it.
    content, reasoning, _, _ = run_scripted(
        models["qwen"], "Hmm, weather.</think>Sunny.", tools=(), chat_template_kwargs={"enable_thinking": True})
    assert reasoning == "Hmm, weather." and content == "Sunny."


def test_reasoning_then_tool_call(models):
    script = '<think>Need the tool.</think><tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    content, reasoning, calls, _ = run_scripted(models["qwen"], script)
    assert reasoning == "Need the tool." and content == "" and call_args(calls[0]) == {"city": "Rome"}


@pytest.mark.parametrize("variant", ["qwen", "mistral", "llama"])
def test_required_tool_choice_makes_the_reply_a_call(models, variant):
    # A grammar makes the whole reply a call (tests/test_constraints.py checks the model's own
    # calls); this script is one the grammar allows, and the prompt carries no prefilled marker.
    call = {
        "qwen": '<tool_call>{"name": "get_weather", "arguments": {"city": "Lima"}}</tool_call>',
        "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lima"}}]',
        "llama": '{"name": "get_weather", "parameters": {"city": "Lima"}}',
    }[variant]
    content, _, calls, _ = run_scripted(models[variant], call, tool_choice="required")
    assert [(c.name, call_args(c)) for c in calls] == [("get_weather", {"city": "Lima"})] and content == ""


def test_history_with_tool_calls_renders(models):
    engine = Engine(models["qwen"])
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    result = engine.submit(Generate("h", messages=history, tools=[WEATHER], max_tokens=2))
    assert isinstance(result, Accepted), result
