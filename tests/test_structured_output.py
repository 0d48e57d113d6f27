"""Structured output through every API, on the real gateway and worker with the tiny model.

The tiny model writes noise unless constrained; here every reply parses and validates, through
the openai SDK's ``responses.parse`` and ``chat.completions.parse``, the anthropic SDK's
``output_config.format`` and strict tools; a schema the worker cannot apply is a 400 naming
the field before anything runs. (The agents SDK's ``output_type``: tests/test_agents_sdk.py.)
"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import pytest
from conftest import SCRIPTED, TINY_LONG
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.family import CHAT
from gateway.api.request import ModelRequest, text_message, to_generate
from gateway.api.structured_output import from_chat, from_messages, from_responses

openai = pytest.importorskip("openai")


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as strict schemas have
    city: str = Field(max_length=10)
    zip: str = Field(pattern="^[0-9]{5}$")


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=130)
    role: Literal["admin", "editor", "viewer"]
    address: Address
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)


SCHEMA = Person.model_json_schema()
BAD_SCHEMA = {"type": "object", "properties": {"x": {"not": {"type": "string"}}}}
PROMPTS = ["Describe a person.", "Who is Ada?", "Make one up.", "JSON please", "Another one"]


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_responses_parse_gives_a_valid_object_for_every_prompt(tiny_stack):
    for prompt in PROMPTS:
        response = client(tiny_stack).responses.parse(model=TINY_LONG, input=prompt, text_format=Person,
                                                      temperature=1.0, max_output_tokens=400)
        assert response.status == "completed"
        assert isinstance(response.output_parsed, Person), response.output_text


def test_responses_json_object_and_a_streamed_schema(tiny_stack):
    # Any object: random weights may nest without end (tests/test_constraints.py checks that the
    # replies that end parse), so here: an object begins, and one that ended parses.
    for _ in range(2):
        r = httpx.post(f"{tiny_stack.base_url}/v1/responses", timeout=120, json={
            "model": TINY_LONG, "input": "hi", "max_output_tokens": 100, "temperature": 1.0,
            "text": {"format": {"type": "json_object"}}})
        assert r.status_code == 200, r.text
        text = r.json()["output"][0]["content"][0]["text"]
        assert text.startswith("{")
        if r.json()["status"] == "completed":
            assert isinstance(json.loads(text), dict)
    with client(tiny_stack).responses.stream(model=TINY_LONG, input="hi", text_format=Person, temperature=1.0,
                                             max_output_tokens=400) as stream:
        final = stream.get_final_response()
    assert isinstance(final.output_parsed, Person)


def test_chat_response_format_json_schema_and_json_object(tiny_stack):
    for prompt in PROMPTS[:3]:
        completion = client(tiny_stack).chat.completions.parse(
            model=TINY_LONG, messages=[{"role": "user", "content": prompt}], response_format=Person,
            temperature=1.0, max_tokens=400)
        assert isinstance(completion.choices[0].message.parsed, Person)
    for _ in range(2):
        r = httpx.post(f"{tiny_stack.base_url}/v1/chat/completions", timeout=120, json={
            "model": TINY_LONG, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100,
            "response_format": {"type": "json_object"}, "stream": True})
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text.startswith("{")
        if chunks[-1]["choices"][0]["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)


class Badge(BaseModel):
    """Bounded without string or number limits, which the anthropic SDK moves into descriptions."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["admin", "editor", "viewer"]
    level: Literal[1, 2, 3]
    active: bool
    colors: list[Literal["red", "green"]] = Field(max_length=2)


def test_messages_output_config_format(tiny_stack):
    anthropic = pytest.importorskip("anthropic")
    messages = anthropic.Anthropic(base_url=tiny_stack.base_url, api_key="unused", max_retries=0)
    reply = messages.messages.create(model=TINY_LONG, max_tokens=400,
                                     messages=[{"role": "user", "content": "A person, please."}],
                                     output_config={"format": {"type": "json_schema", "schema": SCHEMA}})
    jsonschema.validate(json.loads(reply.content[0].text), SCHEMA)
    parsed = messages.messages.parse(model=TINY_LONG, max_tokens=200, output_format=Badge,
                                     messages=[{"role": "user", "content": "A badge, please."}])
    assert isinstance(parsed.parsed_output, Badge)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/responses", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "X", "schema": BAD_SCHEMA}}},
     "text.format"),
    ("/v1/responses", {"input": "hi", "stream": True,
                       "text": {"format": {"type": "json_schema", "name": "X", "schema": BAD_SCHEMA}}}, "text.format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema", "json_schema": {"name": "X", "schema": BAD_SCHEMA}}},
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                              "response_format": {"type": "json_schema", "json_schema": {"name": "X", "schema": BAD_SCHEMA}}},
     "response_format"),
])
def test_a_schema_the_worker_cannot_apply_is_a_400_naming_the_field(tiny_stack, path, body, param):
    r = httpx.post(f"{tiny_stack.base_url}{path}", json={"model": TINY_LONG, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, "invalid_schema") and "not" in error["message"]


def test_a_bad_schema_on_the_messages_api_is_a_400(tiny_stack):
    r = httpx.post(f"{tiny_stack.base_url}/v1/messages", timeout=60, json={
        "model": TINY_LONG, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}],
        "output_config": {"format": {"type": "json_schema", "schema": BAD_SCHEMA}}})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "output_config.format" in r.json()["error"]["message"]


def test_max_output_tokens_mid_object_is_incomplete(tiny_stack):
    response = client(tiny_stack).responses.create(model=TINY_LONG, input="hi", max_output_tokens=5, text={
        "format": {"type": "json_schema", "name": "Person", "schema": SCHEMA, "strict": False}})
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"


WEATHER_TOOL = {"type": "function", "name": "get_weather", "strict": True, "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "days"],
    "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}


def test_strict_tool_arguments_with_a_named_tool_choice(scripted_stack):
    # The scripted worker's model (Qwen's <tool_call> format) writes the call itself here.
    for prompt in PROMPTS[:3]:
        response = client(scripted_stack).responses.create(
            model=SCRIPTED, input=prompt, tools=[WEATHER_TOOL], tool_choice={"type": "function", "name": "get_weather"},
            reasoning={"effort": "none"}, temperature=1.0, max_output_tokens=300, parallel_tool_calls=False)
        [call] = [item for item in response.output if item.type == "function_call"]
        assert call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["parameters"])
    chat = client(scripted_stack).chat.completions.create(
        model=SCRIPTED, messages=[{"role": "user", "content": "weather?"}], temperature=1.0, max_tokens=300,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}}, tool_choice="required", parallel_tool_calls=False,
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"}}])
    [call] = chat.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["parameters"])
    assert chat.choices[0].finish_reason == "tool_calls"


def test_what_each_api_sends_becomes_one_constraint():
    schema = {"type": "object"}
    assert from_responses({"format": {"type": "json_schema", "schema": schema, "strict": False}}) == {
        "type": "json_schema", "schema": schema}
    assert from_responses({"format": {"type": "text"}, "verbosity": "low"}) is None
    assert from_chat({"type": "json_object"}) == {"type": "json_object"}
    assert from_chat({"type": "json_schema", "json_schema": {"name": "x"}}) == {"type": "json_schema", "schema": schema}
    assert from_messages({"effort": "high"}, None) is None
    assert from_messages(None, {"type": "json_schema", "schema": schema}) == {"type": "json_schema", "schema": schema}
    request = ModelRequest(CHAT, "m", [text_message("user", "hi")], constraint={"type": "json_object"})
    messages = to_generate(request, "chatcmpl-test").messages
    assert messages[0] == {"role": "system", "content": "Respond with only a valid JSON object."}
