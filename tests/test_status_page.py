"""The status page in a real browser: Debian's chromium, headless, driven by Playwright, against
real gateway and worker processes on the tiny model. Every request the page makes must go to the
gateway (offline: no CDN); the API key is asked for in a form and kept in session storage.

With MLXGW_STATUS_SCREENSHOT=PATH the run saves its screenshot there (README's is made so).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from processes import Stack

KEY = "status-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LONG = "tiny-long"  # an always-loaded worker (`worker --model`), a huge window: long generations
CRASHY = "tiny-crashy"
PREFILL = "tiny-prefill"  # a small fixed prefill chunk: a long prompt takes many steps
LONG_PROMPT = " ".join(f"word{i}" for i in range(2000))  # about 9,000 tokens of the tiny model's

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover
    sync_playwright = None  # type: ignore[assignment]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    if sync_playwright is None or CHROMIUM is None:
        pytest.skip("needs playwright and chromium (tests/run.sh installs both)")
    stack = Stack(tmp_path_factory.mktemp("status"))
    (stack.workdir / "models.toml").write_text(f'[[model]]\nname = "listed"\nmodel = "{tiny_model_dir}"\n')
    try:
        stack.start_gateway("--api-key", KEY, "--models", str(stack.workdir / "models.toml"))
        stack.start_worker(str(tiny_model_dir), LONG, "--context-length", "100000", "--max-output-tokens", "0")
        _wait(lambda: LONG in _status(stack, "models"), 120, "the worker")
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    """A fresh tab (a fresh session storage) that may reach the gateway and nothing else."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.elsewhere = []  # type: ignore[attr-defined]

    def only_the_gateway(route: Any) -> None:
        if route.request.url.startswith(stack.base_url + "/"):
            route.continue_()
        else:
            page.elsewhere.append(route.request.url)  # type: ignore[attr-defined]
            route.abort()

    page.route("**/*", only_the_gateway)
    page.on("dialog", lambda dialog: dialog.accept())  # every action asks to confirm
    try:
        yield page
    finally:
        context.close()


def _status(stack: Stack, part: str) -> Any:
    try:
        status = httpx.get(stack.base_url + "/v1/status", headers=AUTH, timeout=10).json()
    except httpx.HTTPError:
        return {}
    return {m["name"]: m for m in status["models"]} if part == "models" else status[part]


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.2)


def _log_in(page: Page, stack: Stack) -> None:
    page.goto(stack.base_url + "/status")
    page.wait_for_selector("#login:not([hidden])")
    page.fill("#key", KEY)
    page.click("#login button")
    page.wait_for_selector("#panels:not([hidden])")


class LongStream(threading.Thread):
    """A streamed chat completion read to its end (or its error) in the background."""

    def __init__(self, stack: Stack, model: str, tokens: int = 40_000, content: str = "go on"):
        super().__init__(daemon=True)
        self.stack, self.model, self.tokens, self.content = stack, model, tokens, content
        self.lines: list[str] = []

    def run(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": self.content}],
                "max_tokens": self.tokens, "stream": True}
        try:
            with httpx.stream("POST", self.stack.base_url + "/v1/chat/completions", json=body, headers=AUTH,
                              timeout=300) as reply:
                self.lines.extend(line for line in reply.iter_lines() if line)
        except httpx.HTTPError as exc:
            self.lines.append(f"transport error: {exc}")


def test_the_page_loads_offline_and_shows_nothing_without_the_key(page: Page, stack: Stack):
    page.goto(stack.base_url + "/")
    page.wait_for_selector("#login:not([hidden])")
    assert page.is_hidden("#panels")
    assert httpx.get(stack.base_url + "/v1/status", timeout=10).status_code == 401
    page.fill("#key", "not-the-key")
    page.click("#login button")
    page.wait_for_selector("#login-error:has-text('That key was refused.')")
    assert page.is_hidden("#panels")
    page.fill("#key", KEY)
    page.click("#login button")
    page.wait_for_selector(f"#models tr[data-model='{LONG}']")
    assert page.evaluate("sessionStorage.getItem('mlx-gateway-key')") == KEY
    assert KEY not in page.url
    assert page.elsewhere == []  # type: ignore[attr-defined]


def test_a_running_stream_shows_its_tokens_climbing_and_can_be_cancelled(page: Page, stack: Stack):
    _log_in(page, stack)
    stream = LongStream(stack, LONG)
    stream.start()
    row = f"#requests tr[data-model='{LONG}']"
    page.wait_for_selector(f"{row} td.state-decoding", timeout=60_000)
    first = int(page.inner_text(f"{row} td.output"))
    # (no wait_for_function: the page's Content-Security-Policy forbids evaluating strings)
    _wait(lambda: int(page.inner_text(f"{row} td.output")) > first, 30, "the output tokens to climb")
    _wait(lambda: _status(stack, "throughput"), 10, "throughput")
    time.sleep(1.5)  # a second snapshot: the chart has a line
    page.screenshot(path=str(stack.workdir / "status-stream.png"), full_page=True)
    page.click(f"{row} button:text('Cancel')")
    stream.join(60)
    assert any("request_cancelled" in line and "cancelled by the operator" in line for line in stream.lines), \
        stream.lines[-3:]
    page.wait_for_selector("#no-requests:not([hidden])")


def test_a_model_unloaded_with_a_click_shows_its_new_state(page: Page, stack: Stack):
    loaded = httpx.post(stack.base_url + "/v1/models/listed/load", headers=AUTH, timeout=120)
    assert loaded.status_code == 200, loaded.text
    pid = loaded.json()["pids"][0]
    _log_in(page, stack)
    row = "#models tr[data-model='listed']"
    page.wait_for_selector(f"{row} td.state-loaded")
    assert str(pid) in page.inner_text(row)
    page.click(f"{row} button:text('Unload')")
    page.wait_for_selector(f"{row} td.state-unloaded", timeout=60_000)
    page.click(f"{row} button:text('Pin')")
    page.wait_for_selector(f"{row} button:text('Unpin')")
    assert _status(stack, "models")["listed"]["pinned"] is True


def test_a_crashed_workers_request_shows_as_failed(page: Page, stack: Stack, tiny_model_dir: Path):
    worker = stack.start_worker(str(tiny_model_dir), CRASHY, "--context-length", "100000",
                                "--max-output-tokens", "0")
    _wait(lambda: CRASHY in _status(stack, "models"), 120, "the second worker")
    _log_in(page, stack)
    stream = LongStream(stack, CRASHY)
    stream.start()
    _wait(lambda: any(r["model"] == CRASHY and r["output_tokens"] for r in _status(stack, "requests")), 60,
          "its stream to start")
    request_id = next(r["id"] for r in _status(stack, "requests") if r["model"] == CRASHY)
    os.kill(worker.popen.pid, signal.SIGKILL)
    row = f"#failures tr[data-request='{request_id}']"
    page.wait_for_selector(row, timeout=30_000)
    assert "worker_crashed" in page.inner_text(row)
    stream.join(60)
    assert any("worker_crashed" in line for line in stream.lines), stream.lines[-3:]
    json.dumps(_status(stack, "failures"))  # the snapshot stays plain JSON


def _prefill_shown(page: Page, row: str) -> tuple[int, int, int] | None:
    """What the page shows of a prefilling prompt: (tokens in its cache, of its tokens, percent)."""
    shown = re.fullmatch(r"\s*(\d+) / (\d+) \((\d+)%\)\s*", page.inner_text(f"{row} td.prompt"))
    return (int(shown[1]), int(shown[2]), int(shown[3])) if shown else None


def _request(stack: Stack, model: str, started_after: set[str]) -> dict[str, Any] | None:
    return next((r for r in _status(stack, "requests") if r["model"] == model and r["request_id"] not in started_after),
                None)


def test_a_long_prompts_prefill_progress_rises_and_a_repeat_shows_its_cached_tokens(page: Page, stack: Stack,
                                                                                      tiny_model_dir: Path):
    stack.start_worker(str(tiny_model_dir), PREFILL, "--context-length", "100000", "--max-output-tokens", "0",
                       "--prefill-chunk", "2")
    _wait(lambda: PREFILL in _status(stack, "models"), 120, "the worker")
    _log_in(page, stack)
    first = LongStream(stack, PREFILL, content=LONG_PROMPT)
    first.start()
    row = f"#requests tr[data-model='{PREFILL}']"
    page.wait_for_selector(f"{row} td.state-prefilling", timeout=60_000)
    # Read from the page as it climbs: at least two different values, strictly increasing, below 100%.
    shown: list[tuple[int, int, int]] = []
    seen_in_json: dict[str, Any] | None = None
    deadline = time.monotonic() + 120
    while page.query_selector(f"{row} td.state-decoding") is None and time.monotonic() < deadline:
        reading = _prefill_shown(page, row)
        if reading is not None and (not shown or reading != shown[-1]):
            shown.append(reading)
        if seen_in_json is None:
            request = _request(stack, PREFILL, set())
            if request is not None and request["state"] == "prefilling" and request["prefilled_tokens"]:
                seen_in_json = request
        time.sleep(0.2)
    assert len(shown) >= 2 and shown[-1][0] > 0, shown
    assert all(a[0] < b[0] and a[2] <= b[2] for a, b in zip(shown, shown[1:], strict=False)), shown
    total = shown[0][1]
    assert total > 5000 and all(t == total and p < 100 and n < total for n, t, p in shown), shown
    page.wait_for_selector(f"{row} td.state-decoding")  # then done: the whole prompt
    assert page.inner_text(f"{row} td.prompt").strip() == str(total)
    # /v1/status: the same figures (the page renders them)
    assert seen_in_json is not None, shown
    assert 0 < seen_in_json["prefilled_tokens"] < seen_in_json["prompt_tokens"] == total
    assert seen_in_json["prefill_progress"] == round(seen_in_json["prefilled_tokens"] / total, 4)
    assert seen_in_json["cached_tokens"] == seen_in_json["cached_tokens_disk"] == 0
    assert seen_in_json["drafted_tokens"] == seen_in_json["accepted_tokens"] == 0
    assert seen_in_json["acceptance_rate"] is None
    first_id = _request(stack, PREFILL, set())["request_id"]  # type: ignore[index]

    # The same prompt again, beside the first: served from the prefix cache, as the page shows.
    repeat = LongStream(stack, PREFILL, content=LONG_PROMPT)
    repeat.start()
    _wait(lambda: _request(stack, PREFILL, {first_id}) is not None, 30, "the repeat to start")
    repeat_id = _request(stack, PREFILL, {first_id})["request_id"]  # type: ignore[index]
    repeat_row = f"#requests tr[data-request='{repeat_id}']"

    def cached_shown() -> int:
        text = page.inner_text(f"{repeat_row} td.cached")
        return int(text.split()[0]) if text[:1].isdigit() else 0

    _wait(lambda: cached_shown() > 0, 30, "the repeat's cached tokens on the page")
    assert cached_shown() >= total - 64
    assert f"RAM {cached_shown()} / disk 0" in page.inner_text(f"{repeat_row} td.cached")
    view = _request(stack, PREFILL, {first_id})
    assert view is not None and view["cached_tokens"] == view["cached_tokens_ram"] == cached_shown()
    assert view["cached_tokens_disk"] == 0 and view["prompt_tokens"] == total
    page.wait_for_selector(f"{repeat_row} td.state-decoding")
    assert _request(stack, PREFILL, {first_id})["prefill_progress"] == 1.0  # type: ignore[index]

    # A third, new prompt prefilling beside both: the screenshot README shows.
    other = LongStream(stack, PREFILL, content=" ".join(f"other{i}" for i in range(2000)))
    other.start()
    _wait(lambda: _request(stack, PREFILL, {first_id, repeat_id}) is not None, 30, "the third to start")
    other_id = _request(stack, PREFILL, {first_id, repeat_id})["request_id"]  # type: ignore[index]
    other_row = f"#requests tr[data-request='{other_id}']"
    _wait(lambda: (_prefill_shown(page, other_row) or (0, 0, 0))[2] >= 20, 60, "the third's prefill to show")
    screenshot = os.environ.get("MLXGW_STATUS_SCREENSHOT")
    page.screenshot(path=screenshot or str(stack.workdir / "status.png"), full_page=True)

    seen = [r for r in _status(stack, "requests") if r["model"] == PREFILL]
    assert len(seen) == 3
    # The model's line counts the hits of the requests running now (a worker counts them as they end).
    assert _status(stack, "models")[PREFILL]["prompt_cache"]["cached_tokens"] >= total - 64
    for request_id in (first_id, repeat_id, other_id):
        cancelled = httpx.post(f"{stack.base_url}/v1/requests/{request_id}/cancel", headers=AUTH, timeout=10)
        assert cancelled.status_code == 200, cancelled.text
    for stream in (first, repeat, other):
        stream.join(60)
    # The model's line: its worker's prefix-cache hits (counted as its requests end).
    _wait(lambda: _status(stack, "models")[PREFILL]["requests"] == 0, 30, "the requests to end")
    time.sleep(1.2)  # the worker's next heartbeats
    cache = _status(stack, "models")[PREFILL]["prompt_cache"]
    assert cache["prompt_tokens"] > 2 * total and cache["cached_tokens_ram"] == cache["cached_tokens"]
    assert 0.2 < cache["hit_rate"] < 0.5
    worker = next(w for w in _status(stack, "workers") if w["model"] == PREFILL)
    assert worker["prompt_cache"]["cached_tokens"] == cache["cached_tokens"]
    model_row = f"#models tr[data-model='{PREFILL}']"
    line = f"{int(cache['hit_rate'] * 100)}% of {cache['prompt_tokens']} prompt tokens (RAM {cache['cached_tokens']} / disk 0)"
    page.wait_for_selector(f"{model_row} td.cache:has-text('{line}')")
    # Speculation's figures, where the worker drafted: per request (accepted of drafted), per model.
    for view in seen:
        if view["drafted_tokens"]:
            assert view["acceptance_rate"] == round(view["accepted_tokens"] / view["drafted_tokens"], 4)
        else:
            assert view["acceptance_rate"] is None
    speculation = _status(stack, "models")[PREFILL].get("speculation")
    assert page.is_hidden("#models th.speculation") == (speculation is None)
    assert page.elsewhere == []  # type: ignore[attr-defined]


def test_the_workers_request_rows_are_checked_before_they_are_joined():
    from types import SimpleNamespace

    from gateway.status.snapshot import cache_and_speculation, worker_requests

    good = {"request_id": "chatcmpl-1", "state": "prefilling", "prompt_tokens": 100, "prefilled_tokens": 40,
            "cached_tokens": 30, "cached_tokens_disk": 10, "completion_tokens": 0, "drafted_tokens": 0,
            "accepted_tokens": 0}
    rows = [good, "junk", {"state": "decoding"}, {"request_id": "chatcmpl-2", "state": "sleeping",
                                                  "prompt_tokens": -5, "cached_tokens": True}]
    workers = [SimpleNamespace(stats={"requests": rows}), SimpleNamespace(stats={"requests": "junk"}),
               SimpleNamespace(stats={})]
    joined = worker_requests(workers)  # type: ignore[arg-type]
    assert set(joined) == {"chatcmpl-1", "chatcmpl-2"}
    assert joined["chatcmpl-1"] == {key: value for key, value in good.items() if key != "request_id"}
    assert joined["chatcmpl-2"]["state"] is None and joined["chatcmpl-2"]["prompt_tokens"] == 0
    assert joined["chatcmpl-2"]["cached_tokens"] == 0
    # a model's figures: finished requests' hits plus the running ones'; speculation only where reported
    stats = [{"prompt_tokens": 300, "cached_tokens": 50, "cached_tokens_disk": 0, "requests": [good]}]
    view = cache_and_speculation(stats)
    assert view == {"prompt_cache": {"prompt_tokens": 300, "cached_tokens": 80, "cached_tokens_ram": 70,
                                     "cached_tokens_disk": 10, "hit_rate": round(80 / 300, 4)}}
    running = {**good, "drafted_tokens": 10, "accepted_tokens": 0}
    view = cache_and_speculation([{**stats[0], "drafted_tokens": 30, "accepted_tokens": 30, "requests": [running]}])
    assert view["speculation"] == {"drafted_tokens": 40, "accepted_tokens": 30, "acceptance_rate": 0.75}
    assert cache_and_speculation([])["prompt_cache"]["hit_rate"] is None
