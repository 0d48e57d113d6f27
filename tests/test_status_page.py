"""The status page in a real browser: Debian's chromium, headless, driven by Playwright, against
real gateway and worker processes on the tiny model. Every request the page makes must go to the
gateway (offline: no CDN); the API key is asked for in a form and kept in session storage.

With MLXGW_STATUS_SCREENSHOT=PATH the run saves its screenshot there (README's is made so).
"""

from __future__ import annotations

import json
import os
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

    def __init__(self, stack: Stack, model: str, tokens: int = 40_000):
        super().__init__(daemon=True)
        self.stack, self.model, self.tokens = stack, model, tokens
        self.lines: list[str] = []

    def run(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "go on"}], "max_tokens": self.tokens,
                "stream": True}
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
    screenshot = os.environ.get("MLXGW_STATUS_SCREENSHOT")
    page.screenshot(path=screenshot or str(stack.workdir / "status.png"), full_page=True)
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
