"""The openai-agents SDK (Responses API by default) running an agent with a tool, for real.

The worker is scripted ("SCRIPT:step|||step"): the model calls the tool, the SDK runs our
Python function, sends its result back, and the model answers with it.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import SCRIPTED
from processes import Stack

agents = pytest.importorskip("agents")
from agents import (  # noqa: E402
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI  # noqa: E402

MODEL = SCRIPTED
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
# The tiny model's template opens a thinking block by default: each step closes it first.
SCRIPT = f"SCRIPT:</think>{CALL}|||</think>The weather in Paris is sunny."


@pytest.fixture(scope="module")
def stack(scripted_stack: Stack) -> Stack:
    return scripted_stack


def make_agent(stack: Stack, calls: list[str]) -> Agent:
    set_tracing_disabled(True)

    @function_tool
    def get_weather(city: str) -> str:
        """Weather for a city."""
        calls.append(city)
        return f"sunny in {city}"

    client = AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)
    return Agent(name="weather", instructions="Answer weather questions.", tools=[get_weather],
                 model=OpenAIResponsesModel(model=MODEL, openai_client=client))


def test_agent_calls_the_tool_and_answers(stack):
    calls: list[str] = []
    result = asyncio.run(Runner.run(make_agent(stack, calls), SCRIPT))
    assert calls == ["Paris"]
    assert result.final_output == "The weather in Paris is sunny."


def test_streamed_agent_run(stack):
    calls: list[str] = []

    async def run() -> tuple[str, list[str]]:
        streamed = Runner.run_streamed(make_agent(stack, calls), SCRIPT)
        kinds = [event.type async for event in streamed.stream_events()]
        return streamed.final_output, kinds

    final, kinds = asyncio.run(run())
    assert calls == ["Paris"] and final == "The weather in Paris is sunny."
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds


def test_agent_with_an_output_type_gets_a_valid_object(tiny_stack):
    """``output_type``: the SDK asks for its schema in ``text.format``; the worker constrains the
    tiny model (noise otherwise) to it."""
    from typing import Literal

    from conftest import TINY_LONG
    from pydantic import BaseModel, ConfigDict, Field

    class Person(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(max_length=12)
        age: int = Field(ge=0, le=130)
        role: Literal["admin", "editor", "viewer"]

    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=f"{tiny_stack.base_url}/v1", api_key="unused", max_retries=0)
    agent = Agent(name="people", instructions="Describe a person.", output_type=Person,
                  model=OpenAIResponsesModel(model=TINY_LONG, openai_client=client),
                  model_settings=ModelSettings(temperature=1.0, max_tokens=300))

    async def run() -> list[object]:
        return [(await Runner.run(agent, prompt)).final_output for prompt in ("Describe someone.", "Who is Ada?")]

    assert all(isinstance(output, Person) for output in asyncio.run(run()))
