"""POST /v1/embeddings end to end: the real gateway and embedding workers (tiny random-weight BERT
and Qwen3-Embedding models written by tests/tiny_embedding_model.py), through the real openai SDK.

The vectors the gateway returns are checked against the same model run in this process, one
input at a time: shapes, unit norms, token counts, base64 and float agreeing, token-id input,
Matryoshka ``dimensions``, requests batched together giving the vectors they give alone, every
error in OpenAI's shape, and a worker killed mid-request failing its request cleanly.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from processes import Stack

pytest.importorskip("mlx_embeddings")

from tiny_embedding_model import BERT_CONTEXT, BERT_HIDDEN, QWEN3_HIDDEN, write_tiny_bert, write_tiny_qwen3_embedding  # noqa: E402

BERT = "tiny-bert"  # an encoder: served as an embedding model without --embedding
QWEN3 = "tiny-qwen3-embedding"  # a decoder: --embedding; Matryoshka, so `dimensions` works
VICTIM = "tiny-bert-victim"  # killed by a test
TEXT = "tiny"  # the tiny text-generation model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "hello",
    "def add(a, b): return a + b",
    "Embeddings map text to vectors; similar texts get similar vectors, and the fox is quick.",
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("embedding-models")
    return {BERT: write_tiny_bert(base / "bert"), QWEN3: write_tiny_qwen3_embedding(base / "qwen3")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, Path], tiny_model_dir: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("embeddings-stack"))
    try:
        stack.start_gateway()
        stack.start_worker(str(model_dirs[BERT]), BERT)
        stack.start_worker(str(model_dirs[QWEN3]), QWEN3, "--embedding")
        stack.start_worker(str(model_dirs[BERT]), VICTIM)
        stack.start_worker(str(tiny_model_dir), TEXT)
        stack.wait_for_models(BERT, QWEN3, VICTIM, TEXT)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def local(model_dirs: dict[str, Path]) -> dict[str, Any]:
    """The same models in this process, to check what the gateway returns against."""
    from worker.embeddings import EmbeddingModel

    return {name: EmbeddingModel.load(str(path)) for name, path in model_dirs.items()}


@pytest.fixture
def client(stack: Stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=30)


def alone(model: Any, text: str) -> np.ndarray:
    """One input through the in-process model, by itself."""
    return np.asarray(model.embed([model.wrap(model.tokenize(text), False)[0]])[0])


def test_string_input_float(client: OpenAI, local: dict[str, Any]) -> None:
    reply = client.embeddings.create(model=BERT, input=TEXTS[0], encoding_format="float")
    assert reply.object == "list" and reply.model == BERT
    assert len(reply.data) == 1
    item = reply.data[0]
    assert item.object == "embedding" and item.index == 0
    vector = np.array(item.embedding)
    assert vector.shape == (BERT_HIDDEN,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(vector, alone(local[BERT], TEXTS[0]), atol=1e-5)
    model = local[BERT]
    tokens = len(model.tokenize(TEXTS[0])) + 2  # [CLS] ... [SEP]
    assert reply.usage.prompt_tokens == tokens and reply.usage.total_tokens == tokens


def test_list_input_base64_and_float_agree(client: OpenAI, local: dict[str, Any]) -> None:
    floats = client.embeddings.create(model=BERT, input=TEXTS, encoding_format="float")
    # No encoding_format: the SDK asks for base64 and decodes it (little-endian float32) itself.
    decoded = client.embeddings.create(model=BERT, input=TEXTS)
    assert [d.index for d in floats.data] == list(range(len(TEXTS))) == [d.index for d in decoded.data]
    for text, a, b in zip(TEXTS, floats.data, decoded.data, strict=True):
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=0, atol=1e-7)
        np.testing.assert_allclose(a.embedding, alone(local[BERT], text), atol=1e-5)
    model = local[BERT]
    assert floats.usage.prompt_tokens == sum(len(model.tokenize(t)) + 2 for t in TEXTS)


def test_base64_is_little_endian_float32(stack: Stack) -> None:
    body = {"model": BERT, "input": ["hello", "the quick brown fox"]}
    as_floats = httpx.post(f"{stack.base_url}/v1/embeddings", json=body, timeout=30).json()
    as_base64 = httpx.post(f"{stack.base_url}/v1/embeddings", json={**body, "encoding_format": "base64"},
                           timeout=30).json()
    for f, b in zip(as_floats["data"], as_base64["data"], strict=True):
        raw = base64.b64decode(b["embedding"])
        assert len(raw) == 4 * BERT_HIDDEN
        assert list(struct.unpack(f"<{BERT_HIDDEN}f", raw)) == f["embedding"]
    assert as_base64["usage"] == as_floats["usage"]


def test_token_id_input(client: OpenAI, local: dict[str, Any]) -> None:
    model = local[BERT]
    ids = [model.tokenize(t) for t in TEXTS[:3]]
    one = client.embeddings.create(model=BERT, input=ids[0], encoding_format="float")
    many = client.embeddings.create(model=BERT, input=ids, encoding_format="float")
    texts = client.embeddings.create(model=BERT, input=TEXTS[:3], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, texts.data[0].embedding, atol=1e-6)
    for a, b in zip(many.data, texts.data, strict=True):
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-6)
    assert many.usage.prompt_tokens == texts.usage.prompt_tokens


def test_dimensions_on_a_matryoshka_model(client: OpenAI, local: dict[str, Any]) -> None:
    full = client.embeddings.create(model=QWEN3, input=TEXTS[:2], encoding_format="float")
    short = client.embeddings.create(model=QWEN3, input=TEXTS[:2], encoding_format="float", dimensions=16)
    decoded = client.embeddings.create(model=QWEN3, input=TEXTS[:2], dimensions=16)  # base64, decoded by the SDK
    for text, f, s, d in zip(TEXTS[:2], full.data, short.data, decoded.data, strict=True):
        assert len(f.embedding) == QWEN3_HIDDEN and len(s.embedding) == 16
        np.testing.assert_allclose(f.embedding, alone(local[QWEN3], text), atol=1e-5)
        head = np.array(f.embedding[:16])
        np.testing.assert_allclose(s.embedding, head / np.linalg.norm(head), atol=1e-5)
        np.testing.assert_allclose(d.embedding, s.embedding, atol=1e-7)
    same = client.embeddings.create(model=QWEN3, input=TEXTS[0], encoding_format="float", dimensions=QWEN3_HIDDEN)
    np.testing.assert_allclose(same.data[0].embedding, full.data[0].embedding, atol=1e-5)


def test_requests_batched_together_equal_one_at_a_time(stack: Stack, local: dict[str, Any]) -> None:
    """A long request keeps the worker busy while short ones arrive: they go through the model
    together, in padded batches, and each gets the vectors it gets alone."""
    texts = [" ".join(TEXTS[: 1 + i % len(TEXTS)])[: 20 + 13 * i] for i in range(12)]
    long_input = [TEXTS[4] * 2] * 1500  # about a second of work for the tiny model

    async def run() -> tuple[list[Any], Any]:
        async with AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=60) as aclient:
            big = asyncio.ensure_future(aclient.embeddings.create(model=BERT, input=long_input, encoding_format="float"))
            await asyncio.sleep(0.1)
            small = await asyncio.gather(*(aclient.embeddings.create(model=BERT, input=t, encoding_format="float")
                                           for t in texts))
            return small, await big

    small, big = asyncio.run(run())
    for text, reply in zip(texts, small, strict=True):
        np.testing.assert_allclose(reply.data[0].embedding, alone(local[BERT], text), atol=1e-5)
    np.testing.assert_allclose(big.data[-1].embedding, alone(local[BERT], long_input[0]), atol=1e-5)
    log = next(p for p in stack.processes if p.name.endswith(f"-{BERT}")).log()
    batched = [int(line.rsplit("a batch of ", 1)[1].split()[0]) for line in log.splitlines() if "a batch of " in line]
    assert max(batched) > 1, "no two requests went through the model together"


def test_in_process_padding_does_not_change_vectors(local: dict[str, Any]) -> None:
    """One padded forward pass over inputs of many lengths equals each input run alone (both
    architectures: mean pooling and last-token pooling), also with small batches."""
    for model in local.values():
        rows = [model.wrap(model.tokenize(t * (1 + i % 3)), True)[0] for i, t in enumerate(TEXTS * 2)]
        together = model.embed(rows)
        in_pairs = model.embed(rows, max_batch_tokens=2 * max(len(r) for r in rows))
        for row, a, b in zip(rows, together, in_pairs, strict=True):
            one = model.embed([row])[0]
            np.testing.assert_allclose(a, one, atol=1e-5)
            np.testing.assert_allclose(b, one, atol=1e-5)


def test_truncate_cuts_to_the_window(client: OpenAI, local: dict[str, Any]) -> None:
    long_text = " ".join(TEXTS) * 4
    assert len(local[BERT].tokenize(long_text)) > BERT_CONTEXT
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=BERT, input=["hello", long_text], encoding_format="float")
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "context_length_exceeded" and error["param"] == "input"
    assert "input[1]" in error["message"] and "truncate" in error["message"]
    cut = client.embeddings.create(model=BERT, input=long_text, encoding_format="float", extra_body={"truncate": True})
    assert cut.usage.prompt_tokens == BERT_CONTEXT
    model = local[BERT]
    row, was_cut = model.wrap(model.tokenize(long_text), True)
    assert was_cut and len(row) == BERT_CONTEXT
    np.testing.assert_allclose(cut.data[0].embedding, model.embed([row])[0], atol=1e-5)


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"input": ""}, "input", "empty string"),
    ({"input": []}, "input", "must not be empty"),
    ({"input": ["a", ""]}, "input", "input[1] is an empty string"),
    ({"input": [[]]}, "input", "input[0] is an empty array"),
    ({"input": ["a", 1]}, "input", "not a mix"),
    ({"input": [[1, "a"]]}, "input", "token ids"),
    ({"input": [-1]}, "input", "input must be"),
    ({"input": {"text": "a"}}, "input", "input must be"),
    ({"input": ["a"] * 2049}, "input", "at most 2048"),
    ({"input": [[10**6]]}, None, "vocabulary"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", ""),
    ({"input": "a", "dimensions": 0}, "dimensions", ""),
    ({"input": "a", "dimensions": 16}, "dimensions", "does not support dimensions"),
    ({"input": "a", "dimensions": BERT_HIDDEN + 1}, "dimensions", f"at most {BERT_HIDDEN}"),
    ({"input": "a", "truncate": "yes"}, "truncate", ""),
])
def test_bad_requests_are_400s_in_openai_shape(stack: Stack, body: dict[str, Any], param: str | None,
                                               words: str) -> None:
    reply = httpx.post(f"{stack.base_url}/v1/embeddings", json={"model": BERT, **body}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]


def test_model_kinds_are_kept_apart(stack: Stack, client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as text_model:
        client.embeddings.create(model=TEXT, input="hello")
    assert isinstance(text_model.value.body, dict)
    assert text_model.value.body["param"] == "model" and "text-generation model" in text_model.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hello")
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model=BERT, messages=[{"role": "user", "content": "hi"}])
    assert isinstance(chat.value.body, dict) and "embedding model" in chat.value.body["message"]
    with pytest.raises(openai.BadRequestError) as responses:
        client.responses.create(model=BERT, input="hi")
    assert isinstance(responses.value.body, dict) and "embedding model" in responses.value.body["message"]
    messages = httpx.post(f"{stack.base_url}/v1/messages", timeout=30, json={
        "model": BERT, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    assert messages.status_code == 400
    assert messages.json()["type"] == "error" and "embedding model" in messages.json()["error"]["message"]
    kinds = {card["id"]: card["kind"] for card in httpx.get(f"{stack.base_url}/v1/models", timeout=30).json()["data"]}
    assert kinds[BERT] == "embedding" and kinds[TEXT] == "text"
    # Agents' model pickers list only models they can talk to: Codex's catalog, Anthropic's list.
    catalog = httpx.get(f"{stack.base_url}/v1/models", params={"client_version": "0.171.0"}, timeout=30).json()
    assert [m["slug"] for m in catalog["models"]] == [TEXT]
    anthropic = httpx.get(f"{stack.base_url}/v1/models", headers={"anthropic-version": "2023-06-01"}, timeout=30)
    assert [card["display_name"] for card in anthropic.json()["data"]] == [TEXT]
    workers = httpx.get(f"{stack.base_url}/v1/workers", timeout=30).json()["data"]
    assert {w["model"]: w["kind"] for w in workers if w["model"] in (BERT, QWEN3, TEXT)} == {
        BERT: "embedding", QWEN3: "embedding", TEXT: "text"}


def test_worker_killed_mid_request_fails_cleanly(stack: Stack, client: OpenAI) -> None:
    """The worker is stopped (SIGSTOP) so the request is certainly in flight on it, then killed:
    the request fails with worker_crashed (503), as generation requests do, and the others serve on."""
    victim = next(p for p in stack.processes if p.name.endswith(f"-{VICTIM}"))
    client.embeddings.create(model=VICTIM, input="warm", encoding_format="float")
    os.kill(victim.popen.pid, signal.SIGSTOP)
    outcome: dict[str, Any] = {}

    def request() -> None:
        try:
            client.embeddings.create(model=VICTIM, input=TEXTS, encoding_format="float")
        except openai.APIStatusError as exc:
            outcome["status"], outcome["body"] = exc.status_code, exc.body

    thread = threading.Thread(target=request)
    started = time.monotonic()
    thread.start()
    time.sleep(0.6)  # the request reaches the gateway and is sent to the stopped worker (silent for 1.5 s: not yet dead)
    victim.kill()
    thread.join(30)
    assert not thread.is_alive()
    assert outcome.get("status") == 503, outcome
    assert outcome["body"]["code"] == "worker_crashed"
    assert time.monotonic() - started < 10
    stack.processes.remove(victim)
    assert client.embeddings.create(model=BERT, input="still serving", encoding_format="float").data


def test_embed_messages_round_trip() -> None:
    from protocol.codec import ProtocolError, decode, encode
    from protocol.messages import Embed, Embeddings, Ready

    embed = Embed("r1", tokens=[[1, 2], [3]], dimensions=4, truncate=True, trace_id="t")
    assert decode(encode(embed)) == embed
    vectors = struct.pack("<4f", 1.0, 0.0, 0.0, -1.0)
    reply = Embeddings("r1", 2, vectors, prompt_tokens=7, truncated=1)
    assert decode(encode(reply)) == reply
    ready = decode(encode(Ready("w", "m", 5, 1, 64, 1)))
    assert isinstance(ready, Ready) and (ready.kind, ready.embedding_size, ready.matryoshka) == ("text", 0, False)
    for bad in (Embed("r", tokens=[["a"]]), Embed("r", texts=[1]), Embeddings("r", 1, "not bytes", 1)):  # type: ignore[list-item, arg-type]
        with pytest.raises(ProtocolError):
            decode(encode(bad))


def test_api_keys_and_metrics_apply(fresh_stack: Stack, model_dirs: dict[str, Path]) -> None:
    fresh_stack.start_gateway("--api-key", "secret-key")
    fresh_stack.start_worker(str(model_dirs[BERT]), BERT)
    url = f"{fresh_stack.base_url}/v1/embeddings"
    deadline = time.monotonic() + 60
    while True:  # wait_for_models lists /v1/models, which wants the key here
        try:
            models = httpx.get(f"{fresh_stack.base_url}/v1/models", headers={"Authorization": "Bearer secret-key"})
            if BERT in {m["id"] for m in models.json()["data"]}:
                break
        except httpx.HTTPError:
            pass  # the gateway is starting
        assert time.monotonic() < deadline, fresh_stack.logs()
        time.sleep(0.2)
    refused = httpx.post(url, json={"model": BERT, "input": "hi"}, timeout=30)
    assert refused.status_code == 401 and set(refused.json()["error"]) == {"message", "type", "param", "code"}
    keyed = OpenAI(base_url=f"{fresh_stack.base_url}/v1", api_key="secret-key", max_retries=0)
    assert len(keyed.embeddings.create(model=BERT, input="hi", encoding_format="float").data[0].embedding) == BERT_HIDDEN
    metrics = httpx.get(f"{fresh_stack.base_url}/metrics", timeout=10).text
    assert any("/v1/embeddings" in line and BERT in line for line in metrics.splitlines())


def test_a_large_float_reply_is_built_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """2048 vectors of 1024 floats take seconds to turn into JSON: not on the event loop's thread,
    where every other request would wait for it."""
    import json

    from gateway.embeddings import routes
    from gateway.embeddings.request import EmbeddingRequest
    from protocol.messages import Embeddings

    count, size = 4, 8
    vectors = struct.pack(f"<{count * size}f", *[float(i) for i in range(count * size)])

    class Client:
        async def embed(self, model: str, embed: Any) -> Embeddings:
            return Embeddings(embed.request_id, size, vectors, 7)

    built_on: list[int] = []
    real_reply_body = routes.reply_body

    def reply_body(*args: Any) -> dict[str, Any]:
        built_on.append(threading.get_ident())
        return real_reply_body(*args)

    monkeypatch.setattr(routes, "reply_body", reply_body)
    monkeypatch.setattr(routes, "engine", lambda request: Client())
    monkeypatch.setattr(routes, "bind_request_id", lambda request, request_id, model=None: request_id)
    monkeypatch.setattr(routes, "_check_model", lambda client, model, dimensions: None)

    async def call() -> tuple[Any, int]:
        body = EmbeddingRequest(model="m", input=["a", "b", "c", "d"])
        return await routes.create_embeddings(body, None), threading.get_ident()  # type: ignore[arg-type]

    response, loop_thread = asyncio.run(call())
    assert built_on and built_on[0] != loop_thread
    data = json.loads(response.body)["data"]
    assert [d["index"] for d in data] == [0, 1, 2, 3] and data[1]["embedding"][0] == float(size)
