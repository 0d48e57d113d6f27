"""Generate requests -> prompt token ids: the chat template rendered and tokenized, or a raw
prompt tokenized as it is.

Touches no MLX state: the worker builds prompts off the engine thread (a 4 MB prompt takes
seconds to tokenize, and running sequences keep decoding meanwhile).

Rendering a chat template runs template code, on the one prompt-builder thread every request's
prompt is built on: a template that loops for minutes would hold up every other client. So every
render has a time limit (``--template-timeout``), and a client's own template
(``chat_template_kwargs.chat_template``) is refused unless the operator allows it
(``--allow-client-templates``). A Jinja template compiles to Python code, so a render can be
stopped from inside: a client's template runs under a trace function that raises
``TemplateTimeout`` once its deadline passes (checked at every line and call: nothing it does in
Python escapes the check, but it costs 3-5 times the render); the model's own template, trusted
and rendered for every request, runs at full speed under a watchdog thread that raises the same
exception in the builder thread at the deadline (``PyThreadState_SetAsyncExc``). Either way the
exception is a BaseException, so no ``except Exception`` in Jinja, transformers or a filter
swallows it. Neither stops a single long C call (a huge string repetition, say): a client's
template is trusted with the worker's memory and with such calls.
"""

from __future__ import annotations

import ctypes
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

from protocol.messages import ERROR_INVALID_REQUEST, ERROR_TEMPLATE, Error, Generate
from worker.tool_formats import ToolFormat

T = TypeVar("T")

DEFAULT_TEMPLATE_TIMEOUT = 5.0  # seconds a chat template may render (--template-timeout)
CLIENT_TEMPLATE = "chat_template_kwargs.chat_template"


@dataclass(frozen=True)
class TemplatePolicy:
    """What the operator allows a chat template render (--allow-client-templates, --template-timeout)."""

    allow_client_templates: bool = False  # render a request's own chat_template
    timeout: float = DEFAULT_TEMPLATE_TIMEOUT  # seconds one render may take, any template (> 0)

    def __post_init__(self) -> None:
        if not 0 < self.timeout < float("inf"):
            raise ValueError("the template timeout must be a number of seconds more than 0")


class TemplateTimeout(BaseException):
    """A render outlived its time limit. A BaseException: ``except Exception`` (Jinja's, transformers',
    a filter's) lets it through, up to ``PromptBuilder.build``."""


class PromptBuilder:
    """One model's prompts, from its tokenizer (mlx-lm's wrapper) and tool-call format."""

    def __init__(self, tokenizer: Any, tool_format: ToolFormat | None, policy: TemplatePolicy | None = None):
        self.tokenizer = tokenizer
        self.tool_format = tool_format
        self.policy = policy or TemplatePolicy()

    def configure(self, policy: TemplatePolicy) -> None:
        """The operator's template policy (the worker's flags; the default refuses client templates)."""
        self.policy = policy

    def build(self, request: Generate, forced_tool_call: bool) -> list[int] | Error:
        """The prompt's token ids, or the request's error if the template or tokenizer fails."""
        try:
            return self.tokenize(request, forced_tool_call)
        except TemplateTimeout:
            # Caught here, around the whole bounded render: the watchdog's exception may land
            # anywhere in it, even just after the template returned.
            which = CLIENT_TEMPLATE if self.client_template(request) is not None else "the model's chat template"
            message = (f"rendering {which} took longer than {self.policy.timeout:g}s (the worker's "
                       "--template-timeout) and was stopped")
            return Error(ERROR_TEMPLATE, message, request.request_id)
        except ClientTemplateRefused as exc:
            return Error(ERROR_TEMPLATE, str(exc), request.request_id)
        except Exception as exc:  # jinja and tokenizer errors come in many types
            code = ERROR_TEMPLATE if request.messages is not None else ERROR_INVALID_REQUEST
            return Error(code, f"could not build the prompt: {exc}", request.request_id)

    def tokenize(self, request: Generate, forced_tool_call: bool) -> list[int]:
        tokenizer = self.tokenizer
        if request.messages is None:
            return list(tokenizer.encode(request.prompt or ""))
        if any(isinstance(m.get("content"), list) for m in request.messages):  # parts: images (worker/vision.py)
            raise ValueError("image input is not supported: this model reads text only (serve a vision-language "
                             "model for images)")
        client_template = self.client_template(request)
        if client_template is not None and not self.policy.allow_client_templates:
            raise ClientTemplateRefused(
                f"{CLIENT_TEMPLATE}: this worker does not render templates sent by clients (its operator can "
                "allow them with the worker flag --allow-client-templates); leave it out to use the model's own")

        def render() -> str:
            return tokenizer.apply_chat_template(
                [template_message(m) for m in request.messages or ()],
                tools=request.tools or None,
                add_generation_prompt=True,
                tokenize=False,
                **request.chat_template_kwargs,
            )

        # A client's template: checked at every line and call; the model's own: the watchdog.
        bounded = render_traced if client_template is not None else render_watched
        text = bounded(render, self.policy.timeout)
        if forced_tool_call and self.tool_format is not None:
            # tool_choice "required": the reply starts inside a tool call.
            text += self.tool_format.forced_prefix
        # The template writes any BOS itself.
        return list(tokenizer.encode(text, add_special_tokens=False))

    def client_template(self, request: Generate) -> object | None:
        """The request's own chat template, if it sends one that is not the model's: the model's
        template text, or the name of one of its named templates, is the model's own."""
        sent = request.chat_template_kwargs.get("chat_template")
        if sent is None:
            return None
        own = getattr(self.tokenizer, "chat_template", None)
        if sent == own or (isinstance(own, dict) and isinstance(sent, str) and sent in own):
            return None
        return sent

    def forces_tool_call(self, request: Generate) -> bool:
        """tool_choice "required" by prefilling the format's opening marker: for formats with no
        grammar (elsewhere the constraint makes the whole reply a call, thinking first if on)."""
        return (request.tool_choice == "required" and bool(request.tools) and self.tool_format is not None
                and self.tool_format.call_syntax is None)

    def initial_state(self, prompt: list[int]) -> str:
        """"reasoning" when the template left a thinking block open for the reply."""
        tokenizer = self.tokenizer
        if tokenizer.has_thinking and tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
            return "reasoning"
        return tokenizer.response_initial_state or "normal"


class ClientTemplateRefused(Exception):
    """A request sent its own chat template, which this worker does not render."""


def render_traced(render: Callable[[], T], seconds: float) -> T:
    """``render()``, stopped with ``TemplateTimeout`` once it has run ``seconds``: a trace function
    in this thread checks the clock at every line, call and return of every Python frame the render
    runs, so a loop in template code cannot run past the deadline. The trace function this thread
    had before (a debugger's, coverage's) is back afterwards, whatever happened."""
    deadline = time.monotonic() + seconds
    clock = time.monotonic

    def check(frame: FrameType, event: str, arg: Any) -> Callable[..., Any]:
        if clock() > deadline:
            raise TemplateTimeout  # also turns tracing off in this thread (CPython does)
        return check

    previous = sys.gettrace()
    sys.settrace(check)
    try:
        return render()
    finally:
        sys.settrace(previous)


def render_watched(render: Callable[[], T], seconds: float) -> T:
    """``render()``, stopped with ``TemplateTimeout`` once it has run ``seconds``: the watchdog
    thread raises it in this thread (it lands at the next call or loop iteration of Python code
    this thread runs). Costs a few microseconds a render, not a trace
    function's 3-5 times. The caller catches ``TemplateTimeout`` around this whole call: once the
    deadline has passed, it may land anywhere up to the moment the watchdog is disarmed."""
    ident = _WATCHDOG.arm(time.monotonic() + seconds)
    try:
        return render()
    finally:
        _WATCHDOG.disarm(ident)


def _raise_in_thread(ident: int) -> None:
    """Schedule ``TemplateTimeout`` in thread ``ident``: it lands at the next instruction there that
    checks for one (a call or a loop's jump back). Never cancelled with NULL: CPython 3.11 then leaves
    the interpreter's eval-breaker flag set for good, which slows every thread and hangs the next
    traced render. A scheduled exception is let land instead (``_Watchdog.disarm``)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(TemplateTimeout))


def _let_it_land() -> None:
    """Run a few checked instructions, so that a TemplateTimeout scheduled in this thread lands now."""
    for _ in range(8):
        pass


class _Watchdog:
    """One daemon thread that raises ``TemplateTimeout`` in any thread whose render is past its
    deadline. It wakes at the earliest deadline only, so steady traffic costs it one wake-up a
    timeout period, not one a request."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, float] = {}  # thread ident -> deadline
        self._fired: set[int] = set()  # threads it raised in since they armed
        self._wake_at: float | None = None  # when the thread next looks (None: only when notified)
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float) -> int:
        ident = threading.get_ident()
        with self._cond:
            self._fired.discard(ident)
            self._armed[ident] = deadline
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="template-watchdog", daemon=True)
                self._thread.start()
            elif self._wake_at is None or deadline < self._wake_at:
                self._cond.notify()
        return ident

    def disarm(self, ident: int) -> None:
        """Called by thread ``ident`` itself: after this returns, no TemplateTimeout is pending for
        it, and none comes. One the watchdog raised lands by the end of this call at the latest
        (the render may have just returned), for the caller to catch."""
        with self._cond:
            self._armed.pop(ident, None)
            fired = ident in self._fired
            self._fired.discard(ident)
        if fired:
            _let_it_land()

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for ident in [i for i, deadline in self._armed.items() if deadline <= now]:
                    del self._armed[ident]
                    self._fired.add(ident)
                    _raise_in_thread(ident)
                self._wake_at = min(self._armed.values(), default=None)
                self._cond.wait(None if self._wake_at is None else min(self._wake_at - now, threading.TIMEOUT_MAX))


_WATCHDOG = _Watchdog()


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """Chat templates index tool-call arguments as a mapping; the APIs carry them as JSON text."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                arguments = json.loads(function["arguments"])
            except json.JSONDecodeError:
                arguments = function["arguments"]
            call = {**call, "function": {**function, "arguments": arguments}}
        fixed.append(call)
    return {**message, "tool_calls": fixed}
