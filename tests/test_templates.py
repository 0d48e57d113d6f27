"""Chat template rendering is bounded: a client's own template (``chat_template_kwargs.chat_template``)
is refused unless the worker allows it (--allow-client-templates), and any render that outlives
--template-timeout fails its request alone (worker/prompts.py)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from processes import Stack
from tiny_model import CHAT_TEMPLATE, build_tokenizer

from protocol.messages import ERROR_TEMPLATE, Error, Generate
from worker import cli as worker_cli
from worker.config import WorkerConfig
from worker.prompts import (
    PromptBuilder,
    TemplatePolicy,
    TemplateTimeout,
    render_traced,
    render_watched,
)

STRICT = "tiny-strict"  # default flags: client templates refused
OPEN = "tiny-open"  # --allow-client-templates --template-timeout 1
TIMEOUT = 1.0
KEY_A, KEY_B = "key-a", "key-b"

# 20000 x 20000 iterations: 12 s on a fast core unbounded (minutes under a trace function).
NESTED_2 = "{% for i in range(20000) %}{% for j in range(20000) %}{% endfor %}{% endfor %}x"
NESTED_3 = ("{% for i in range(20000) %}{% for j in range(20000) %}{% for k in range(20000) %}"
            "{% endfor %}{% endfor %}{% endfor %}x")
FIXED = "<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant"  # whatever the messages
SHORT = [{"role": "user", "content": "Hi"}]
LONG = [{"role": "user", "content": "What is the capital of France? Tell me about its history, please."}]

# Generous limits for a loaded 2-core machine; each one still well below the unbounded render.
MARGIN = 6.0


def openai_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def anthropic_headers(key: str) -> dict[str, str]:
    return {"x-api-key": key, "anthropic-version": "2023-06-01"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("templates"))
    try:
        stack.start_gateway("--api-key", KEY_A, "--api-key", KEY_B)
        stack.start_worker(str(tiny_model_dir), STRICT)
        stack.start_worker(str(tiny_model_dir), OPEN, "--allow-client-templates", "--template-timeout", str(TIMEOUT))
        wait_for_models(stack, STRICT, OPEN)
        yield stack
    finally:
        stack.stop()


def wait_for_models(stack: Stack, *names: str, timeout: float = 180) -> None:
    """Stack.wait_for_models, with an API key (this gateway wants one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in stack.processes:
            if process.popen.poll() is not None:
                raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:\n{process.log()}")
        try:
            r = httpx.get(f"{stack.base_url}/v1/models", headers=openai_headers(KEY_A), timeout=2)
            if set(names) <= {m["id"] for m in r.json().get("data", [])}:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"models {names} not served within {timeout}s:\n" + stack.logs())


def chat(stack: Stack, model: str, messages=SHORT, key: str = KEY_A, timeout: float = 120, **kwargs) -> httpx.Response:
    body = {"model": model, "messages": messages, "max_tokens": 2, "temperature": 0, **kwargs}
    return httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, headers=openai_headers(key), timeout=timeout)


def template_kwargs(template: str) -> dict:
    return {"chat_template_kwargs": {"chat_template": template}}


def assert_openai_template_error(r: httpx.Response, *words: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == ERROR_TEMPLATE
    assert "chat_template_kwargs.chat_template" in error["message"]
    for word in words:
        assert word in error["message"]


# --- over HTTP: refused by default -----------------------------------------------------------


def test_client_template_refused_by_default_over_chat_completions(stack):
    r = chat(stack, STRICT, **template_kwargs(FIXED))
    assert_openai_template_error(r, "--allow-client-templates")
    assert r.json()["error"]["param"] == "messages"
    ok = chat(stack, STRICT)
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 2


def test_client_template_refused_by_default_over_messages(stack):
    body = {"model": STRICT, "max_tokens": 2, "messages": SHORT, **template_kwargs(FIXED)}
    url = f"{stack.base_url}/v1/messages"
    r = httpx.post(url, json=body, headers=anthropic_headers(KEY_A), timeout=120)
    assert r.status_code == 400, r.text
    refused = r.json()
    assert refused["type"] == "error" and refused["error"]["type"] == "invalid_request_error"
    assert "chat_template_kwargs.chat_template" in refused["error"]["message"]
    assert "--allow-client-templates" in refused["error"]["message"]
    counted = httpx.post(f"{url}/count_tokens", json=body, headers=anthropic_headers(KEY_A), timeout=120)
    assert counted.status_code == 400 and counted.json()["type"] == "error", counted.text
    del body["chat_template_kwargs"]
    ok = httpx.post(url, json=body, headers=anthropic_headers(KEY_A), timeout=120)
    assert ok.status_code == 200, ok.text
    assert ok.json()["type"] == "message"


def test_client_template_refused_by_default_over_responses(stack):
    body = {"model": STRICT, "input": "Hi", "max_output_tokens": 2, "store": False, **template_kwargs(FIXED)}
    r = httpx.post(f"{stack.base_url}/v1/responses", json=body, headers=openai_headers(KEY_A), timeout=120)
    assert_openai_template_error(r, "--allow-client-templates")


def test_the_models_own_template_is_not_a_client_template(stack):
    """Sending the model's own template text back is not refused: it renders what the worker would."""
    own = chat(stack, STRICT, **template_kwargs(CHAT_TEMPLATE))
    assert own.status_code == 200, own.text
    assert own.json()["usage"]["prompt_tokens"] == chat(stack, STRICT).json()["usage"]["prompt_tokens"]


# --- over HTTP: allowed, and bounded -----------------------------------------------------------


def test_allowed_client_template_is_rendered(stack):
    default_short = chat(stack, OPEN, SHORT).json()["usage"]["prompt_tokens"]
    default_long = chat(stack, OPEN, LONG).json()["usage"]["prompt_tokens"]
    assert default_long > default_short
    fixed_short = chat(stack, OPEN, SHORT, **template_kwargs(FIXED))
    fixed_long = chat(stack, OPEN, LONG, **template_kwargs(FIXED))
    assert fixed_short.status_code == 200 and fixed_long.status_code == 200, (fixed_short.text, fixed_long.text)
    # The prompt is the template's fixed text, whatever the messages.
    assert fixed_short.json()["usage"]["prompt_tokens"] == fixed_long.json()["usage"]["prompt_tokens"]
    assert fixed_short.json()["usage"]["prompt_tokens"] != default_short
    body = {"model": OPEN, "messages": LONG, **template_kwargs(FIXED)}
    counted = httpx.post(f"{stack.base_url}/v1/messages/count_tokens", json=body, headers=anthropic_headers(KEY_A),
                         timeout=120)
    assert counted.status_code == 200, counted.text
    assert counted.json()["input_tokens"] == fixed_long.json()["usage"]["prompt_tokens"]


def test_slow_client_template_fails_alone_and_others_go_on(stack):
    """Key A's endless template fails with a 400 after about --template-timeout; key B's request,
    sent while it renders (on the same worker's one prompt-builder thread), completes meanwhile."""
    results: dict[str, tuple[httpx.Response, float, float]] = {}

    def send(name: str, key: str, **kwargs) -> None:
        started = time.monotonic()
        r = chat(stack, OPEN, key=key, **kwargs)
        results[name] = (r, started, time.monotonic())

    bad = threading.Thread(target=send, args=("bad", KEY_A), kwargs=template_kwargs(NESTED_2))
    bad.start()
    time.sleep(0.3)  # the bad render is under way
    good = threading.Thread(target=send, args=("good", KEY_B))
    good.start()
    bad.join(120)
    good.join(120)
    bad_r, bad_start, bad_end = results["bad"]
    good_r, good_start, good_end = results["good"]
    assert_openai_template_error(bad_r, "--template-timeout")
    assert good_r.status_code == 200, good_r.text
    assert good_r.json()["usage"]["completion_tokens"] == 2
    assert good_start < bad_end  # it was sent while the bad render ran
    # Unbounded, the bad render holds the thread for 12 s or more; bounded, both end soon after the timeout.
    assert bad_end - bad_start < TIMEOUT + MARGIN
    assert good_end - good_start < TIMEOUT + MARGIN


def test_endless_client_template_fails(stack):
    started = time.monotonic()
    r = chat(stack, OPEN, **template_kwargs(NESTED_3))
    assert_openai_template_error(r, "--template-timeout")
    assert time.monotonic() - started < TIMEOUT + MARGIN
    assert chat(stack, OPEN).status_code == 200  # the worker serves on


# --- the bounded render itself -----------------------------------------------------------------


def _sentinel_tracer(frame, event, arg):
    return None


def _spin_swallowing() -> str:
    """Python code that swallows every Exception, and never ends on its own."""
    while True:
        try:
            sum(range(100))
        except Exception:
            pass


@pytest.mark.parametrize("bounded", [render_traced, render_watched])
def test_bounded_render_stops_a_loop_that_swallows_exceptions(bounded):
    started = time.monotonic()
    with pytest.raises(TemplateTimeout):
        bounded(_spin_swallowing, 0.3)
    assert 0.25 < time.monotonic() - started < 0.3 + MARGIN
    # Nothing lands later: a bounded render ends with its call.
    assert bounded(lambda: sum(range(1000)), 0.2) == 499500
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        sum(range(100))
    # And nothing is left behind: a traced render elsewhere still runs (an async exception
    # cancelled with NULL left CPython 3.11's eval breaker set for good, and that one spun forever).
    outcome: list[str] = []
    other = threading.Thread(target=lambda: outcome.append(render_traced(lambda: "done", 5)), daemon=True)
    other.start()
    other.join(30)
    assert outcome == ["done"]


def test_traced_render_restores_the_previous_tracer():
    previous = sys.gettrace()
    sys.settrace(_sentinel_tracer)
    try:
        assert render_traced(lambda: "done", 5) == "done"
        assert sys.gettrace() is _sentinel_tracer
        with pytest.raises(ZeroDivisionError):
            render_traced(lambda: 1 / 0, 5)
        assert sys.gettrace() is _sentinel_tracer
        with pytest.raises(TemplateTimeout):
            render_traced(_spin_swallowing, 0.2)
        assert sys.gettrace() is _sentinel_tracer
    finally:
        sys.settrace(previous)
    assert render_traced(lambda: "done", 5) == "done"
    assert sys.gettrace() is previous


def test_watchdog_serves_several_threads():
    """Each thread's deadline is its own: a fast render beside a stopped one is unaffected."""
    outcomes: dict[str, object] = {}

    def run(name: str, render, seconds: float) -> None:
        try:
            outcomes[name] = render_watched(render, seconds)
        except TemplateTimeout:
            outcomes[name] = "timeout"

    threads = [threading.Thread(target=run, args=("slow", _spin_swallowing, 0.5)),
               threading.Thread(target=run, args=("fast", lambda: time.sleep(0.8) or "ok", 30))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outcomes == {"slow": "timeout", "fast": "ok"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def generate(template: str | None = None, **kwargs) -> Generate:
    template_kwargs = {"chat_template": template} if template is not None else {}
    return Generate("r1", messages=LONG, chat_template_kwargs={**template_kwargs, **kwargs})


def test_prompt_builder_refuses_a_client_template_by_default(tokenizer):
    builder = PromptBuilder(tokenizer, None)
    refused = builder.build(generate(FIXED), False)
    assert isinstance(refused, Error) and refused.code == ERROR_TEMPLATE
    assert "chat_template_kwargs.chat_template" in refused.message and "--allow-client-templates" in refused.message
    own = builder.build(generate(), False)
    assert own == builder.build(generate(CHAT_TEMPLATE), False)  # the model's own text is no client template
    expected = tokenizer.apply_chat_template(LONG, add_generation_prompt=True, tokenize=False)
    assert own == tokenizer.encode(expected, add_special_tokens=False)  # bounding changes nothing


def test_prompt_builder_renders_allowed_templates_within_the_limit(tokenizer):
    builder = PromptBuilder(tokenizer, None)
    builder.configure(TemplatePolicy(allow_client_templates=True, timeout=0.5))
    assert builder.build(generate(FIXED), False) == tokenizer.encode(FIXED, add_special_tokens=False)
    started = time.monotonic()
    stopped = builder.build(generate(NESTED_2), False)
    assert isinstance(stopped, Error) and stopped.code == ERROR_TEMPLATE
    assert "chat_template_kwargs.chat_template" in stopped.message and "--template-timeout" in stopped.message
    assert time.monotonic() - started < 0.5 + MARGIN
    broken = builder.build(generate("{{ raise_exception('no') }}"), False)
    assert isinstance(broken, Error) and broken.code == ERROR_TEMPLATE and "no" in broken.message
    assert builder.build(generate(FIXED), False) == tokenizer.encode(FIXED, add_special_tokens=False)


def test_prompt_builder_bounds_the_models_own_template():
    slow = build_tokenizer(chat_template=NESTED_2)
    builder = PromptBuilder(slow, None, TemplatePolicy(timeout=0.5))
    started = time.monotonic()
    stopped = builder.build(generate(), False)
    assert isinstance(stopped, Error) and stopped.code == ERROR_TEMPLATE
    assert "the model's chat template" in stopped.message and "--template-timeout" in stopped.message
    assert time.monotonic() - started < 0.5 + MARGIN
    fine = build_tokenizer(chat_template="{{ messages[0]['content'] }}")
    assert PromptBuilder(fine, None, TemplatePolicy(timeout=0.5)).build(generate(), False) == fine.encode(
        LONG[0]["content"], add_special_tokens=False)


@pytest.mark.parametrize("seconds", [0, -1, float("inf"), float("nan")])
def test_template_timeout_must_be_positive_and_finite(seconds, monkeypatch):
    with pytest.raises(ValueError):
        TemplatePolicy(timeout=seconds)
    monkeypatch.setattr(worker_cli, "configure_logging", lambda *args: None)  # leave pytest's logging be
    assert worker_cli.main(["--template-timeout", str(seconds)]) == 2


def test_worker_flags():
    assert WorkerConfig.from_args(worker_cli.parse_args([])).template_policy() == TemplatePolicy(False, 5.0)
    args = worker_cli.parse_args(["--allow-client-templates", "--template-timeout", "0.5"])
    assert WorkerConfig.from_args(args).template_policy() == TemplatePolicy(True, 0.5)
