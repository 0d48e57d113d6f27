"""End to end on the default model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI) through
separate gateway and worker processes, driven by the official openai SDK."""

from __future__ import annotations

import re
import threading

import pytest

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"  # served by the session's smol_stack (conftest.py)
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(smol_stack):
    return openai.OpenAI(base_url=f"{smol_stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_streamed_chat_completion_knows_paris(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=40, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3, "tokens should stream"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 3


def test_chat_completion_and_models(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=40)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10


def test_completion(client):
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert reply.choices[0].text.strip()
    assert reply.usage.completion_tokens == 8


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=FRANCE)


def test_concurrent_streams_match_alone(client):
    questions = ["What is the capital of France?", "Name three colors.", "What is 2 plus 2?", "Say hello."]

    def ask(question: str) -> str:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    alone = [ask(q) for q in questions]
    together: list[str] = [""] * len(questions)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(questions[i])))
               for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert together == alone


def test_worker_uses_an_optimized_blas_on_linux(smol_stack):
    import platform

    if platform.system() != "Linux":
        pytest.skip("Metal on macOS")
    log = next(p for p in smol_stack.processes if p.name.startswith("worker")).log()
    assert re.search(r"BLAS: OpenBLAS", log), log


def test_responses_api_streams_paris(smol_stack):
    from responses_sse import check_stream, post_stream

    client = openai.OpenAI(base_url=f"{smol_stack.base_url}/v1", api_key="unused", max_retries=0,
                           timeout=120, _strict_response_validation=True)
    response = client.responses.create(model=MODEL, input="What is the capital of France?", temperature=0,
                                       instructions="Answer in one sentence.")
    assert "Paris" in response.output_text and response.status == "completed"
    final = check_stream(post_stream(smol_stack.base_url, {
        "model": MODEL, "input": "What is the capital of France?", "temperature": 0}))
    assert "Paris" in final["output"][0]["content"][0]["text"]
    chained = client.responses.create(model=MODEL, previous_response_id=response.id, temperature=0,
                                      input="And what is the capital of Italy?", max_output_tokens=30)
    assert chained.usage.input_tokens > response.usage.input_tokens + response.usage.output_tokens


# Structured output (worker/constraints.py): ten different prompts, ten valid objects, through
# each API's own SDK helper; the requests run at once, in one batch.
CITY_PROMPTS = [f"Tell me about {city}." for city in
                ("Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Nairobi", "Sydney", "Toronto", "Mumbai")]


def _city_model():
    from typing import Annotated

    from pydantic import BaseModel, ConfigDict, Field

    # Bounded strings: a greedy 135M model can repeat itself inside a string ("100000...").
    class City(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(max_length=30)
        country: str = Field(max_length=30)
        population_millions: int = Field(ge=0, le=100)
        landmarks: list[Annotated[str, Field(max_length=30)]] = Field(max_length=3)

    return City


def _all_at_once(function, prompts):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(function, prompts))


def test_responses_parse_gives_ten_valid_objects(client):
    city = _city_model()
    slow = client.with_options(timeout=900)
    replies = _all_at_once(lambda prompt: slow.responses.parse(
        model=MODEL, input=prompt, text_format=city, max_output_tokens=200), CITY_PROMPTS)
    assert all(isinstance(reply.output_parsed, city) for reply in replies), [r.output_text for r in replies]
    assert len({reply.output_parsed.name for reply in replies}) > 1


def test_chat_response_format_gives_ten_valid_objects(client):
    city = _city_model()
    slow = client.with_options(timeout=900)
    replies = _all_at_once(lambda prompt: slow.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": prompt}], response_format=city, max_tokens=200),
        CITY_PROMPTS)
    assert all(isinstance(reply.choices[0].message.parsed, city) for reply in replies), \
        [r.choices[0].message.content for r in replies]
