"""Images in: a vision worker (worker/vision.py) on a tiny random-weight LLaVA, through every API
family with the real SDKs; the prefix cache keyed by image; the operator's limits, each a 400 in the
family's shape; URLs refused unless allowed; a text-only model refusing images; a worker killed
mid-image-request failing it cleanly.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("mlx_vlm")

import anthropic  # noqa: E402
import openai  # noqa: E402
from conftest import TINY  # noqa: E402
from processes import Stack  # noqa: E402
from tiny_vlm import IMAGE_TOKENS, png, write_tiny_vlm  # noqa: E402

VLM = "tiny-vlm"
MAX_IMAGES = 3
MAX_PIXELS = 100 * 100
MAX_IMAGE_KB = 40


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_vlm_dir: Path, tiny_model_dir: Path) -> Iterator[Stack]:
    """A gateway with small image limits, a vision worker and a text-only one."""
    stack = Stack(tmp_path_factory.mktemp("images"))
    try:
        stack.start_gateway("--max-images", str(MAX_IMAGES), "--max-image-pixels", str(MAX_PIXELS),
                            "--max-image-mb", str(MAX_IMAGE_KB / 1024))
        stack.start_worker(str(tiny_vlm_dir), VLM, "--temperature", "0", "--max-output-tokens", "16")
        stack.start_worker(str(tiny_model_dir), TINY)
        stack.wait_for_models(VLM, TINY)
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def oai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def claude(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60)


def chat_image(image: bytes | str, text: str = "What is in this picture?") -> list[dict[str, Any]]:
    url = image if isinstance(image, str) else data_url(image)
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def responses_image(image: bytes | str, text: str = "Describe it.") -> list[dict[str, Any]]:
    url = image if isinstance(image, str) else data_url(image)
    return [{"role": "user", "content": [{"type": "input_text", "text": text},
                                         {"type": "input_image", "image_url": url}]}]


def messages_image(image: bytes, text: str = "What is this?") -> list[dict[str, Any]]:
    source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(image).decode()}
    return [{"role": "user", "content": [{"type": "image", "source": source}, {"type": "text", "text": text}]}]


# --- every family, with the real SDKs ------------------------------------------------


def test_chat_completions_with_an_image_url_part(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model=VLM, messages=chat_image(png(1)), max_tokens=6)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.prompt_tokens > IMAGE_TOKENS  # the image's tokens count
    assert reply.usage.completion_tokens == 6


def test_responses_with_an_input_image(oai: openai.OpenAI) -> None:
    reply = oai.responses.create(model=VLM, input=responses_image(png(2)), max_output_tokens=6)  # type: ignore[arg-type]
    assert reply.status == "incomplete" and reply.output_text
    assert reply.usage is not None and reply.usage.input_tokens > IMAGE_TOKENS


def test_messages_with_an_image_block(claude: anthropic.Anthropic) -> None:
    reply = claude.messages.create(model=VLM, max_tokens=6, messages=messages_image(png(3)))  # type: ignore[arg-type]
    assert reply.content and reply.content[0].type == "text" and reply.content[0].text
    assert reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0) > IMAGE_TOKENS


def test_streaming_chat_with_an_image(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(model=VLM, messages=chat_image(png(4)), max_tokens=5, stream=True,  # type: ignore[arg-type]
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_the_image_changes_the_reply_and_the_same_image_gives_the_same_one(oai: openai.OpenAI) -> None:
    def answer(image: bytes) -> str:
        reply = oai.chat.completions.create(model=VLM, messages=chat_image(image, "Same words."),  # type: ignore[arg-type]
                                            max_tokens=8)
        return reply.choices[0].message.content or ""

    first, again, other = answer(png(10)), answer(png(10)), answer(png(11))
    assert first == again
    assert first != other


def test_a_conversation_turn_that_mentions_the_image_again_keeps_it(claude: anthropic.Anthropic) -> None:
    image = png(12)
    first = claude.messages.create(model=VLM, max_tokens=4, messages=messages_image(image))  # type: ignore[arg-type]
    history = [*messages_image(image), {"role": "assistant", "content": first.content[0].text},  # type: ignore[union-attr]
               {"role": "user", "content": "And now?"}]
    second = claude.messages.create(model=VLM, max_tokens=4, messages=history)  # type: ignore[arg-type]
    assert (second.usage.cache_read_input_tokens or 0) > IMAGE_TOKENS  # the image's tokens came from the cache


def test_the_open_responses_image_input_request_is_served(stack: Stack) -> None:
    """The shape of the Open Responses suite's image-input test: an input_text and a 32x32 RGBA PNG
    as a data URL, typed items, no max_output_tokens (the worker's cap ends the tiny model's reply;
    the suite, on a real model, also wants it to end by itself: ``completed``)."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGBA", (32, 32), (220, 20, 60, 255)).save(out, "PNG")
    body = {"model": VLM, "input": [{"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "What do you see in this image? Answer in one sentence."},
        {"type": "input_image", "image_url": data_url(out.getvalue())}]}]}
    reply = _post(stack, "/v1/responses", body)
    assert reply.status_code == 200, reply.text
    response = openai.types.responses.Response.model_validate(reply.json())
    assert response.output and response.output[0].type == "message"
    assert response.usage is not None and response.usage.input_tokens > IMAGE_TOKENS


def test_a_stored_response_with_an_image_continues_with_its_image_cached(oai: openai.OpenAI) -> None:
    first = oai.responses.create(model=VLM, input=responses_image(png(13)), max_output_tokens=3)  # type: ignore[arg-type]
    items = oai.responses.input_items.list(first.id)
    assert [part.type for part in items.data[0].content] == ["input_text", "input_image"]  # type: ignore[union-attr]
    second = oai.responses.create(model=VLM, input="And the colours?", previous_response_id=first.id,
                                  max_output_tokens=3)
    assert second.usage is not None and second.usage.input_tokens_details.cached_tokens > IMAGE_TOKENS


def test_an_image_in_a_tool_result_reaches_the_model(claude: anthropic.Anthropic) -> None:
    """Claude Code's screenshots and image reads come back as images inside tool_result blocks."""
    source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png(14)).decode()}
    messages = [
        {"role": "user", "content": "Take a screenshot."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "screenshot", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": [{"type": "text", "text": "here"}, {"type": "image", "source": source}]}]},
    ]
    tools = [{"name": "screenshot", "description": "Take one", "input_schema": {"type": "object", "properties": {}}}]
    reply = claude.messages.create(model=VLM, max_tokens=3, messages=messages, tools=tools)  # type: ignore[arg-type]
    assert reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0) > IMAGE_TOKENS


def test_count_tokens_counts_the_image(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model=VLM, messages=messages_image(png(8)))  # type: ignore[arg-type]
    text_only = claude.messages.count_tokens(model=VLM, messages=[{"role": "user", "content": "What is this?"}])
    assert counted.input_tokens >= text_only.input_tokens + IMAGE_TOKENS


# --- the prefix cache: the same image hits, a different one never does ---------------------


def _chat_cached(oai: openai.OpenAI, image: bytes) -> tuple[int, int]:
    reply = oai.chat.completions.create(model=VLM, messages=chat_image(image, "Cache me."), max_tokens=2)  # type: ignore[arg-type]
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    return usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens or 0


def test_the_same_image_is_a_prefix_cache_hit_and_a_different_one_is_not(oai: openai.OpenAI) -> None:
    prompt, _ = _chat_cached(oai, png(20))
    _, cached = _chat_cached(oai, png(20))
    assert cached == prompt - 1  # all but the last token: the image's tokens too
    _, other = _chat_cached(oai, png(21))  # same text, same size, other pixels
    image_starts = prompt - IMAGE_TOKENS - 4  # the template's tokens after the image are ~4
    assert other < image_starts, f"{other} cached tokens: a different image hit the cache"


def test_responses_report_the_image_cache_hit(oai: openai.OpenAI) -> None:
    first = oai.responses.create(model=VLM, input=responses_image(png(22)), max_output_tokens=2)  # type: ignore[arg-type]
    second = oai.responses.create(model=VLM, input=responses_image(png(22)), max_output_tokens=2)  # type: ignore[arg-type]
    other = oai.responses.create(model=VLM, input=responses_image(png(23)), max_output_tokens=2)  # type: ignore[arg-type]
    assert first.usage and second.usage and other.usage
    assert second.usage.input_tokens_details.cached_tokens == second.usage.input_tokens - 1
    assert other.usage.input_tokens_details.cached_tokens < other.usage.input_tokens - IMAGE_TOKENS


def test_messages_report_the_image_cache_hit(claude: anthropic.Anthropic) -> None:
    claude.messages.create(model=VLM, max_tokens=2, messages=messages_image(png(24)))  # type: ignore[arg-type]
    again = claude.messages.create(model=VLM, max_tokens=2, messages=messages_image(png(24)))  # type: ignore[arg-type]
    other = claude.messages.create(model=VLM, max_tokens=2, messages=messages_image(png(25)))  # type: ignore[arg-type]
    assert (again.usage.cache_read_input_tokens or 0) > IMAGE_TOKENS
    assert (other.usage.cache_read_input_tokens or 0) < IMAGE_TOKENS


# --- limits, each a 400 in each family's shape ----------------------------------------


def _post(stack: Stack, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{stack.base_url}{path}", json=body, timeout=30)


def _openai_error(reply: httpx.Response, param_start: str) -> dict[str, Any]:
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert str(error["param"]).startswith(param_start), error
    return error


def _anthropic_error(reply: httpx.Response) -> dict[str, Any]:
    assert reply.status_code == 400, reply.text
    body = reply.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    return body["error"]


TOO_MANY_PIXELS = png(0, 200, 200, noise=False)  # 40,000 pixels, a few hundred bytes
LIMITS = {
    "bytes": (png(5, 99, 99) + b"\0" * (MAX_IMAGE_KB << 10), "--max-image-mb"),
    "pixels": (TOO_MANY_PIXELS, "--max-image-pixels"),
}


@pytest.mark.parametrize("limit", sorted(LIMITS))
def test_each_image_limit_is_a_400_in_each_family(stack: Stack, limit: str) -> None:
    image, flag = LIMITS[limit]
    chat = _openai_error(_post(stack, "/v1/chat/completions", {"model": VLM, "messages": chat_image(image)}),
                         "messages.0.content.1.image_url")
    assert flag in chat["message"]
    responses = _openai_error(_post(stack, "/v1/responses", {"model": VLM, "input": responses_image(image)}),
                              "input[0].content[1].image_url")
    assert flag in responses["message"]
    messages = _anthropic_error(_post(stack, "/v1/messages", {"model": VLM, "max_tokens": 4,
                                                              "messages": messages_image(image)}))
    assert flag in messages["message"] and messages["message"].startswith("messages.0.content.0.source.data: ")


def test_too_many_images_is_a_400_in_each_family(stack: Stack) -> None:
    image = png(6)
    count = MAX_IMAGES + 1
    chat_parts = [{"type": "image_url", "image_url": {"url": data_url(image)}}] * count
    error = _openai_error(_post(stack, "/v1/chat/completions",
                                {"model": VLM, "messages": [{"role": "user", "content": chat_parts}]}), "messages")
    assert "--max-images" in error["message"]
    responses_parts = [{"type": "input_image", "image_url": data_url(image)}] * count
    error = _openai_error(_post(stack, "/v1/responses",
                                {"model": VLM, "input": [{"role": "user", "content": responses_parts}]}), "input")
    assert "--max-images" in error["message"]
    blocks = messages_image(image)[0]["content"][:1] * count
    error = _anthropic_error(_post(stack, "/v1/messages", {"model": VLM, "max_tokens": 4,
                                                           "messages": [{"role": "user", "content": blocks}]}))
    assert "--max-images" in error["message"]


def test_an_image_that_is_not_an_image_is_a_400(stack: Stack) -> None:
    bad = "data:image/png;base64," + base64.b64encode(b"not a picture at all").decode()
    _openai_error(_post(stack, "/v1/chat/completions", {"model": VLM, "messages": chat_image(bad)}),
                  "messages.0.content.1.image_url")


def test_a_file_id_input_image_is_a_400_naming_it(stack: Stack) -> None:
    body = {"model": VLM, "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-123"}]}]}
    _openai_error(_post(stack, "/v1/responses", body), "input[0].content[0].file_id")


def test_an_http_image_url_is_refused_without_allow_image_urls(stack: Stack) -> None:
    url = "http://127.0.0.1:9/cat.png"  # nothing is fetched: refused before
    chat = _openai_error(_post(stack, "/v1/chat/completions", {"model": VLM, "messages": chat_image(url)}),
                         "messages.0.content.1.image_url")
    assert "--allow-image-urls" in chat["message"]
    responses = _openai_error(_post(stack, "/v1/responses", {"model": VLM, "input": responses_image(url)}),
                              "input[0].content[1].image_url")
    assert "--allow-image-urls" in responses["message"]
    block = {"type": "image", "source": {"type": "url", "url": url}}
    messages = _anthropic_error(_post(stack, "/v1/messages", {"model": VLM, "max_tokens": 4,
                                                              "messages": [{"role": "user", "content": [block]}]}))
    assert "--allow-image-urls" in messages["message"]
    assert messages["message"].startswith("messages.0.content.0.source.url: ")


@pytest.mark.parametrize("stream", [False, True])
def test_a_text_only_model_refuses_images_in_every_family(stack: Stack, stream: bool) -> None:
    image = png(7)
    chat = _openai_error(_post(stack, "/v1/chat/completions", {"model": TINY, "messages": chat_image(image),
                                                               "stream": stream}), "messages")
    assert "text only" in chat["message"]
    responses = _openai_error(_post(stack, "/v1/responses", {"model": TINY, "input": responses_image(image),
                                                             "stream": stream}), "input")
    assert "text only" in responses["message"]
    messages = _anthropic_error(_post(stack, "/v1/messages", {"model": TINY, "max_tokens": 4, "stream": stream,
                                                              "messages": messages_image(image)}))
    assert "text only" in messages["message"]


def test_codexs_catalog_and_the_worker_list_say_which_model_sees_images(stack: Stack) -> None:
    catalog = httpx.get(f"{stack.base_url}/v1/models", params={"client_version": "0.171.0"}, timeout=10).json()
    modalities = {m["slug"]: m["input_modalities"] for m in catalog["models"]}
    assert modalities[VLM] == ["text", "image"]
    assert modalities[TINY] == ["text"]
    workers = httpx.get(f"{stack.base_url}/v1/workers", timeout=10).json()
    entries = workers["data"] if isinstance(workers, dict) else workers
    assert {w["model"]: w["vision"] for w in entries} == {VLM: True, TINY: False}


# --- fetching allowed, and a worker killed mid-request -----------------------------------


@contextlib.contextmanager
def _image_server(body: Callable[[str], bytes]) -> Iterator[str]:
    """A local HTTP server answering every GET with ``body(path)`` as a PNG; yields its base URL."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            data = body(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_allowed_image_urls_are_fetched_with_the_limits(tmp_path: Path, tiny_vlm_dir: Path) -> None:
    image = png(30)
    big = png(31, 99, 99) + b"\0" * 60_000
    with _image_server(lambda path: image if path == "/cat.png" else big) as base:
        stack = Stack(tmp_path)
        try:
            stack.start_gateway("--allow-image-urls", "--max-image-mb", "0.04", "--image-url-timeout", "5")
            stack.start_worker(str(tiny_vlm_dir), VLM, "--temperature", "0")
            stack.wait_for_models(VLM)
            ok = _post(stack, "/v1/chat/completions", {"model": VLM, "messages": chat_image(f"{base}/cat.png"),
                                                       "max_tokens": 3})
            assert ok.status_code == 200, ok.text
            assert ok.json()["usage"]["prompt_tokens"] > IMAGE_TOKENS
            too_big = _post(stack, "/v1/chat/completions", {"model": VLM, "messages": chat_image(f"{base}/big.png")})
            assert "--max-image-mb" in _openai_error(too_big, "messages.0.content.1.image_url")["message"]
        finally:
            stack.stop()


def test_a_worker_killed_during_an_image_request_fails_it_cleanly(tmp_path: Path, tiny_vlm_dir: Path) -> None:
    stack = Stack(tmp_path)
    try:
        stack.start_gateway()
        worker = stack.start_worker(str(tiny_vlm_dir), VLM, "--temperature", "0", "--context-length", "100000",
                                    "--max-output-tokens", "0")
        stack.wait_for_models(VLM)
        body = {"model": VLM, "messages": chat_image(png(40)), "max_tokens": 50_000, "stream": True}
        events: list[Any] = []
        with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=60) as reply:
            assert reply.status_code == 200
            killed_at = None
            for line in reply.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    events.append("[DONE]")
                    break
                events.append(json.loads(line[6:]))
                if killed_at is None and len(events) >= 3:
                    os.kill(worker.popen.pid, signal.SIGKILL)
                    killed_at = time.monotonic()
        assert killed_at is not None
        assert time.monotonic() - killed_at < 10
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        assert errors and errors[-1]["error"]["code"] == "worker_crashed", events[-3:]
        assert events[-1] == "[DONE]"
    finally:
        stack.stop()


# --- in process: the engine, the cache keys, image headers --------------------------------


@pytest.fixture(scope="module")
def vlm(tiny_vlm_dir: Path) -> Any:
    from worker.vision import load_vision

    return load_vision(str(tiny_vlm_dir), VLM)


def _generate(request_id: str, images: list[bytes], text: str = "Look.", max_tokens: int = 8, **fields: Any) -> Any:
    from protocol import Generate, SamplingParams

    parts: list[dict[str, Any]] = [{"type": "image", "data": image, "media_type": "image/png"} for image in images]
    content: Any = [*parts, {"type": "text", "text": text}] if images else text  # as the gateway sends them
    messages = [{"role": "user", "content": content}]
    return Generate(request_id, max_tokens=max_tokens, messages=messages, sampling=SamplingParams(temperature=0.0),
                    **fields)


def _run(engine: Any, *requests: Any) -> dict[str, tuple[str, Any]]:
    from protocol import Accepted

    for request in requests:
        assert isinstance(engine.submit(request), Accepted)
    texts: dict[str, str] = {}
    ends: dict[str, Any] = {}
    while engine.busy:
        result = engine.step()
        assert not result.errors, result.errors
        for delta in result.deltas:
            texts[delta.request_id] = texts.get(delta.request_id, "") + delta.text
        for finished in result.finished:
            ends[finished.request_id] = finished
    return {rid: (texts.get(rid, ""), ends[rid]) for rid in ends}


def test_image_tokens_split_across_prefill_chunks_give_the_same_reply(vlm: Any) -> None:
    from worker.vision import VisionEngine

    whole = _run(VisionEngine(vlm, 4, prefill_chunk=0, prompt_cache_bytes=0), _generate("a", [png(50), png(51)]))
    chunked = _run(VisionEngine(vlm, 4, prefill_chunk=7, prompt_cache_bytes=0), _generate("a", [png(50), png(51)]))
    assert whole["a"][0] == chunked["a"][0]
    assert whole["a"][1].prompt_tokens > 2 * IMAGE_TOKENS


def test_batched_image_requests_match_single_ones_and_share_cached_images(vlm: Any) -> None:
    from worker.vision import VisionEngine

    alone = {rid: _run(VisionEngine(vlm, 4), _generate(rid, [png(seed)]))[rid][0]
             for rid, seed in (("x", 60), ("y", 61))}
    engine = VisionEngine(vlm, 4)
    together = _run(engine, _generate("x", [png(60)]), _generate("y", [png(61)]),
                    _generate("t", [], max_tokens=3))  # a text-only request beside them
    assert together["x"][0] == alone["x"] and together["y"][0] == alone["y"]
    again = _run(engine, _generate("x2", [png(60)]))
    assert again["x2"][0] == alone["x"]
    assert again["x2"][1].cached_tokens == again["x2"][1].prompt_tokens - 1
    assert engine.timings["x2"].encode_s == 0.0  # its features were still in the table: no encoding
    assert engine.parts.features.nbytes > 0 and not engine.parts.features.pinned


def test_an_idefics3_model_whose_images_are_tiles_hits_only_for_the_same_image(tmp_path: Path) -> None:
    """SmolVLM's architecture: the processor cuts an image into tiles (several runs of image tokens
    between marker tokens), keyed together by the request's images."""
    from tiny_vlm import write_tiny_idefics3

    from worker.vision import VisionEngine, load_vision

    loaded = load_vision(str(write_tiny_idefics3(tmp_path / "idefics3")), "tiny-idefics3")
    engine = VisionEngine(loaded, 4)
    image, other = png(80, 150, 100), png(81, 150, 100)
    first = _run(engine, _generate("a", [image]))["a"]
    again = _run(engine, _generate("b", [image]))["b"]
    different = _run(engine, _generate("c", [other]))["c"]
    assert first[1].prompt_tokens > 20  # tiles and a global view
    assert again[0] == first[0] and again[1].cached_tokens == again[1].prompt_tokens - 1
    assert different[1].cached_tokens < 8  # the template's text before the image, no more
    chunked = _run(VisionEngine(loaded, 4, prefill_chunk=5, prompt_cache_bytes=0), _generate("d", [image]))["d"]
    assert chunked[0] == first[0]


def test_penalties_and_json_output_work_with_images(vlm: Any) -> None:
    from protocol import SamplingParams
    from worker.vision import VisionEngine

    engine = VisionEngine(vlm, 4)
    penalised = _generate("p", [png(70)])
    penalised.sampling = SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.5)
    constrained = _generate("j", [png(71)], max_tokens=60, constraint={"type": "json_object"})
    out = _run(engine, penalised, constrained)
    assert out["p"][1].completion_tokens == 8
    if out["j"][1].finish_reason == "stop":
        json.loads(out["j"][0])
    else:  # cut by max_tokens mid-object: still a prefix of one
        assert out["j"][0].startswith("{")


def test_virtual_ids_depend_on_the_image_alone() -> None:
    from worker.vision import VIRTUAL_BASE, virtual_ids

    a, b = "ab" * 32, "cd" * 32
    assert list(virtual_ids(a, 16)) == list(virtual_ids(a, 16))
    assert not set(virtual_ids(a, 16)) & set(virtual_ids(b, 16))
    assert all(VIRTUAL_BASE <= t < 2 * VIRTUAL_BASE for t in virtual_ids(a, 64))


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "GIF", "WEBP"])
def test_image_headers_give_the_size_without_decoding(kind: str) -> None:
    import io

    from PIL import Image

    from gateway.api.images import image_size

    out = io.BytesIO()
    Image.new("RGB", (123, 45), (10, 20, 30)).save(out, kind)
    media, width, height = image_size(out.getvalue()) or ("", 0, 0)
    assert (media, width, height) == (f"image/{kind.lower()}", 123, 45)
    assert image_size(b"GIF8") is None and image_size(b"\x89PNG\r\n\x1a\n") is None


def test_image_ids_with_no_features_never_reach_the_embedding_table(vlm: Any) -> None:
    """Speculative decoding drafts tokens from the prompt, image ids among them: fed to the model for
    checking (never accepted), they must not index past the embeddings."""
    import mlx.core as mx
    import numpy as np

    from worker.vision import VIRTUAL_BASE

    model = vlm.model
    tokens = mx.array([[5, VIRTUAL_BASE + 123, 7]])
    plain = model(tokens)  # nothing pinned: clipped
    assert plain.shape[:2] == (1, 3) and bool(mx.all(mx.isfinite(plain)).item())
    table = model._features
    table.put("k", np.array([VIRTUAL_BASE + 1]), mx.ones((1, 64)))
    table.pin("k")
    try:
        mixed = model(mx.array([[5, VIRTUAL_BASE + 1, VIRTUAL_BASE + 999]]))  # one known, one unknown
        assert bool(mx.all(mx.isfinite(mixed)).item())
    finally:
        table.unpin("k")


# --- review fixes: templates, BOS, the feature table, prepared images, limits ---------------


def _prepare(engine: Any, request: Any) -> Any:
    from worker.engine import Sequence

    sequence = engine.prepare(request)
    assert isinstance(sequence, Sequence), sequence
    return sequence


def _with_system(request: Any, system: str = "Be brief.") -> Any:
    request.messages = [{"role": "system", "content": system}, *request.messages]
    return request


def test_string_contents_render_through_a_parts_only_template_with_one_bos(vlm: Any) -> None:
    """Real VLM templates (tests/tiny_vlm.py's, like SmolVLM's) loop over content parts: a plain
    string must reach them as a text part, with and without images; and the tokenizer adds a BOS
    the template already wrote: never two."""
    from worker.vision import VisionEngine

    engine = VisionEngine(vlm, 4)
    bos = vlm.tokenizer.bos_token_id
    text_only = _prepare(engine, _with_system(_generate("t", [], text="Hello there")))
    with_image = _prepare(engine, _with_system(_generate("i", [png(95)], text="Look here")))
    vocab = engine.loaded.model.vocab_size
    for sequence, words in ((text_only, "Hello there"), (with_image, "Look here")):
        shown = vlm.tokenizer.decode([t for t in sequence.prompt if t < vocab])
        assert "Be brief." in shown and words in shown, shown
        assert sequence.prompt[0] == bos and sequence.prompt[1] != bos, sequence.prompt[:4]
    assert text_only.images is None and with_image.images is not None


def test_a_chat_template_kept_only_by_the_processor_is_used(tmp_path: Path) -> None:
    """Older VLM directories keep the template in the processor's chat_template.json alone."""
    from tiny_vlm import CHAT_TEMPLATE

    from worker.vision import VisionEngine, load_vision

    directory = write_tiny_vlm(tmp_path / "vlm")
    (directory / "chat_template.jinja").unlink()
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    vlm = load_vision(str(directory), VLM)
    engine = VisionEngine(vlm, 4)
    for request in (_generate("t", [], text="Plain words"), _generate("i", [png(96)], text="Plain words")):
        sequence = _prepare(engine, request)
        assert "Plain words" in vlm.tokenizer.decode([t for t in sequence.prompt if t < engine.loaded.model.vocab_size])


def test_features_are_pinned_before_they_are_put_so_no_budget_evicts_them(vlm: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A request's features are in the table through its prefill even when they alone are over the
    table's budget (put before pinned, they were evicted at once and read back as zeros)."""
    from worker.vision import VisionEngine

    images = [png(97), png(98)]
    monkeypatch.setattr(vlm.vision.features, "budget", 1)
    tight = _run(VisionEngine(vlm, 4, prompt_cache_bytes=0), _generate("a", images))["a"][0]
    monkeypatch.setattr(vlm.vision.features, "budget", 512 << 20)
    roomy = _run(VisionEngine(vlm, 4, prompt_cache_bytes=0), _generate("a", images))["a"][0]
    assert tight == roomy
    assert not vlm.vision.features.pinned


def test_a_pinned_image_id_missing_from_the_table_fails_instead_of_reading_zeros() -> None:
    import mlx.core as mx
    import numpy as np

    from worker.image_features import FeatureError, FeatureTable
    from worker.vision import VIRTUAL_BASE

    table = FeatureTable(1 << 20)
    ids = np.array([VIRTUAL_BASE + 5, VIRTUAL_BASE + 6])
    table.pin("k", ids)
    with pytest.raises(FeatureError):
        table.rows(ids, 8)
    table.put("k", ids, mx.ones((2, 8)))
    assert table.rows(ids, 8).shape == (2, 8)
    assert float(table.rows(np.array([VIRTUAL_BASE + 99]), 8).sum().item()) == 0.0  # a draft: zeros


def test_a_virtual_id_maps_to_one_live_image() -> None:
    """Two images whose ids collide: the newer evicts an unpinned older one (never reads its rows),
    and is refused while the older one is pinned."""
    import mlx.core as mx
    import numpy as np

    from worker.image_features import FeatureError, FeatureTable
    from worker.vision import VIRTUAL_BASE

    table = FeatureTable(1 << 20)
    a, b = np.array([VIRTUAL_BASE + 1, VIRTUAL_BASE + 2]), np.array([VIRTUAL_BASE + 2, VIRTUAL_BASE + 3])
    table.put("a", a, mx.ones((2, 4)))
    table.pin("b", b)
    table.put("b", b, mx.full((2, 4), 2.0))
    assert "a" not in table and "b" in table
    assert table.rows(np.array([VIRTUAL_BASE + 2]), 4).tolist() == [[2.0] * 4]
    assert float(table.rows(np.array([VIRTUAL_BASE + 1]), 4).sum().item()) == 0.0  # a's id: gone, not b's row
    with pytest.raises(FeatureError):
        table.pin("a", a)  # b is pinned and holds id +2
    with pytest.raises(FeatureError):
        table.put("a", a, mx.ones((2, 4)))
    assert table.rows(b, 4).tolist() == [[2.0] * 4] * 2
    table.unpin("b")
    table.put("a", a, mx.ones((2, 4)))  # b unpinned: evicted
    assert "b" not in table and table.rows(a, 4).tolist() == [[1.0] * 4] * 2


def test_virtual_ids_are_distinct_within_an_image() -> None:
    from worker.vision import virtual_ids

    ids = virtual_ids("ef" * 32, 70_000)  # ~2.3 collisions expected among 30-bit hashes
    assert len(set(ids.tolist())) == len(ids)


def test_the_same_image_from_another_cache_scope_is_neither_shared_nor_a_hit(vlm: Any) -> None:
    from worker.vision import VisionEngine

    engine = VisionEngine(vlm, 4)
    image = png(99)
    mine = _prepare(engine, _generate("a", [image], cache_scope="key-a"))
    theirs = _prepare(engine, _generate("b", [image], cache_scope="key-b"))
    vocab = engine.loaded.model.vocab_size
    assert {t for t in mine.prompt if t >= vocab}.isdisjoint(t for t in theirs.prompt if t >= vocab)
    out = _run(engine, _generate("a1", [image], cache_scope="key-a"), _generate("a2", [image], cache_scope="key-a"))
    assert out["a1"][0] == out["a2"][0]
    _run(engine, _generate("b1", [image], cache_scope="key-b"))
    assert engine.timings["b1"].encode_s > 0  # key-a's features were not used for key-b


def test_prepared_images_travel_with_their_sequence(vlm: Any) -> None:
    """However far prompt building runs ahead of queueing, a request keeps its images; one whose
    prompt holds image ids without them is refused, never run on no features."""
    from protocol import Accepted, Error
    from worker.vision import VisionEngine

    engine = VisionEngine(vlm, 4, prompt_cache_bytes=0)
    reference = _run(VisionEngine(vlm, 4, prompt_cache_bytes=0), _generate("r", [png(100)]))["r"][0]
    sequences = [_prepare(engine, _generate(f"s{i}", [png(100)])) for i in range(70)]
    assert isinstance(engine.enqueue(sequences[0]), Accepted)
    texts = ""
    while engine.busy:
        result = engine.step()
        assert not result.errors, result.errors
        texts += "".join(d.text for d in result.deltas)
    assert texts == reference
    orphan = sequences[1]
    orphan.images = None
    refused = engine.enqueue(orphan)
    assert isinstance(refused, Error) and "image" in refused.message


def _gif_outgrowing_its_header(width: int = 3000, height: int = 2000) -> bytes:
    """A GIF whose logical screen is 1x1 and whose one frame is ``width`` x ``height``."""
    import struct

    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0, 0, 0)
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x4c\x01\x00"
    return header + frame + b"\x3b"


def test_a_gif_frame_larger_than_its_header_counts_against_the_pixel_limit(stack: Stack) -> None:
    from gateway.api.images import image_size

    gif = _gif_outgrowing_its_header()
    assert image_size(gif) == ("image/gif", 3000, 2000)
    url = "data:image/gif;base64," + base64.b64encode(gif).decode()
    error = _openai_error(_post(stack, "/v1/chat/completions", {"model": VLM, "messages": chat_image(url)}),
                          "messages.0.content.1.image_url")
    assert "3000x2000" in error["message"] and "--max-image-pixels" in error["message"]


def test_the_worker_checks_the_decoded_size_again(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.vision as vision

    monkeypatch.setattr(vision, "MAX_DECODED_PIXELS", 1000)
    with pytest.raises(vision.ImageError, match="3000x2000"):
        vision._decode_image({"data": _gif_outgrowing_its_header()}, 0)
    assert vision._decode_image({"data": png(1, 20, 20)}, 0)[1].size == (20, 20)


def test_a_jpeg_header_scan_is_capped() -> None:
    import io

    from PIL import Image

    from gateway.api.images import image_size

    out = io.BytesIO()
    Image.new("RGB", (10, 20)).save(out, "JPEG")
    jpeg = out.getvalue()
    assert image_size(jpeg[:2] + b"\xff" * 1000 + jpeg[2:]) == ("image/jpeg", 10, 20)  # a few fill bytes: fine
    started = time.monotonic()
    assert image_size(jpeg[:2] + b"\xff" * 3_000_000 + jpeg[2:]) is None
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("url", ["http://[::1", "http://" + "a" * 64 + ".example/x.png", "https://xn--/x"])
def test_a_malformed_image_url_is_a_400_naming_the_field(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.api import images
    from gateway.api.errors import APIError

    monkeypatch.setattr(images, "_limits", images.ImageLimits(allow_urls=True, url_timeout=5))
    with pytest.raises(APIError) as caught:
        images.from_url(url, "messages.0.content.1.image_url")
    assert caught.value.status == 400 and caught.value.param == "messages.0.content.1.image_url"


def test_image_urls_are_counted_before_fetching_and_a_slow_server_holds_neither_the_loop_nor_past_the_deadline(
        tmp_path: Path, tiny_vlm_dir: Path) -> None:
    import http.server

    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(200):  # a byte every 0.1 s: no single read ever times out
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stack = Stack(tmp_path)
    try:
        stack.start_gateway("--allow-image-urls", "--image-url-timeout", "2", "--max-images", "2")
        stack.start_worker(str(tiny_vlm_dir), VLM, "--temperature", "0")
        stack.wait_for_models(VLM)
        base = f"http://127.0.0.1:{server.server_address[1]}"
        many = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{base}/{i}.png"}}
                                             for i in range(3)]}]
        error = _openai_error(_post(stack, "/v1/chat/completions", {"model": VLM, "messages": many}), "messages")
        assert "--max-images" in error["message"] and hits == []  # counted before any was fetched
        parts = [{"type": "input_image", "image_url": f"{base}/{i}.png"} for i in range(3)]
        error = _openai_error(_post(stack, "/v1/responses", {"model": VLM, "input": [{"role": "user",
                                                                                     "content": parts}]}), "input")
        assert "--max-images" in error["message"] and hits == []
        blocks = [{"type": "image", "source": {"type": "url", "url": f"{base}/{i}.png"}} for i in range(3)]
        error = _anthropic_error(_post(stack, "/v1/messages", {"model": VLM, "max_tokens": 4, "messages": [
            {"role": "user", "content": blocks}]}))
        assert "--max-images" in error["message"] and hits == []

        outcome: dict[str, Any] = {}

        def slow() -> None:
            started = time.monotonic()
            outcome["reply"] = _post(stack, "/v1/chat/completions",
                                     {"model": VLM, "messages": chat_image(f"{base}/slow.png")})
            outcome["took"] = time.monotonic() - started

        thread = threading.Thread(target=slow)
        thread.start()
        deadline = time.monotonic() + 5
        while not hits and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hits, "the image was never fetched"
        for _ in range(3):  # the gateway answers meanwhile
            started = time.monotonic()
            assert httpx.get(f"{stack.base_url}/health", timeout=5).status_code == 200
            assert time.monotonic() - started < 0.5
            time.sleep(0.2)
        thread.join(15)
        error = _openai_error(outcome["reply"], "messages.0.content.1.image_url")
        assert "--image-url-timeout" in error["message"], error
        assert outcome["took"] < 4.5, outcome["took"]  # the 2 s deadline is the request's, not a read's
    finally:
        stack.stop()
        server.shutdown()
        server.server_close()


def test_a_requests_fetched_images_share_one_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.api import images
    from gateway.api.errors import APIError

    image = png(33)
    monkeypatch.setattr(images, "_limits", images.ImageLimits(max_bytes=len(image) + 10, allow_urls=True,
                                                              url_timeout=10))
    with _image_server(lambda _path: image) as base:
        url = f"{base}/x.png"
        with images.one_request():
            for _ in range(images.FETCHED_BYTES_FACTOR):
                assert images.from_url(url, "p").data == image
            with pytest.raises(APIError, match="together") as caught:
                images.from_url(url, "p")
            assert caught.value.param == "p"
        with images.one_request():  # the next request has its own budget
            assert images.from_url(url, "p").data == image
