"""Constrained decoding: structured output that is always valid, as a per-request logits mask.

A request may carry a ``constraint`` (a JSON schema, any JSON object, a regex or a Lark
grammar) and tools marked ``strict``; ``plan`` turns them into one ``ConstraintProcessor``, an
mlx-lm logits processor that sits in the sequence's list next to the penalties. Constrained and
free requests share every batch step: a processor only masks its own row of logits.

The grammar engine is llguidance (chosen by measurement: README, "Structured output"). Its
tokenizer is built once per worker from the model's Hugging Face tokenizer, when the engine is
made, before the worker connects (it holds the GIL for ~0.6 s with SmolLM2's 49k tokens: on a
background thread it stalled the link's heartbeats). A request's grammars are compiled when its
prompt is prepared, beside the engine thread (about 1-12 ms for real schemas, bounded by
llguidance's parser limits; llguidance releases the GIL meanwhile), and kept in an LRU cache of
ready matchers, so a schema seen before costs one ``deep_copy`` (tens of microseconds).

Where the constraint starts:

- a whole-output constraint (``text.format``, ``response_format``, a forced tool call) starts
  at the first token, or, when the chat template left a thinking block open (or the model opens
  one itself as its first token), right after the block ends;
- a strict tool's arguments are constrained once the model opens a call (its format's marker
  appears in the output), until the call closes; then the output is free again.

A schema the engine cannot compile raises ``ConstraintError`` before anything is generated
(the worker answers ``invalid_schema`` / ``invalid_tool_schema``).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.messages import ERROR_INVALID_REQUEST, ERROR_INVALID_SCHEMA, ERROR_INVALID_TOOL_SCHEMA
from worker.tool_formats import CallSyntax, ToolFormat

log = logging.getLogger(__name__)

# JSON as models write it (Python's json.dumps separators), and no free whitespace: a small
# model left free to add whitespace can pad an object until it runs out of tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256  # compiled grammars kept (one ready matcher each)
_AFTER_THINKING_WS = r"/[ \t\r\n]{0,4}/"  # what a model may write between </think> and its answer
CONSTRAINT_TYPES = ("json_schema", "json_object", "regex", "lark")


class ConstraintError(ValueError):
    """A constraint the engine cannot apply; ``code`` is the worker error code to answer."""

    def __init__(self, message: str, code: str = ERROR_INVALID_SCHEMA):
        super().__init__(message)
        self.code = code


# --- grammars ----------------------------------------------------------------------


class Grammars:
    """llguidance for one model: its tokenizer and an LRU cache of compiled grammars, each kept
    as a matcher that requests get a copy of."""

    def __init__(self, tokenizer: Any, cache_size: int = CACHE_SIZE):
        self._wrapper = tokenizer
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # prompts are prepared (and grammars compiled) beside the engine thread
        self._cache_size = cache_size
        self._ll_tokenizer: Any = None
        self._failure: str | None = None
        self.compiled = 0  # grammars compiled (cache misses)
        self.compile_seconds = 0.0
        self._build()

    def _build(self) -> None:
        try:
            import llguidance.hf
            from transformers import PreTrainedTokenizerFast

            hf = getattr(self._wrapper, "_tokenizer", self._wrapper)
            if not isinstance(hf, PreTrainedTokenizerFast):
                raise TypeError(f"{type(hf).__name__} is not a fast tokenizer")
            started = time.perf_counter()
            eos = sorted(getattr(self._wrapper, "eos_token_ids", None) or [hf.eos_token_id])
            self._ll_tokenizer = llguidance.hf.from_tokenizer(hf, eos_token=eos)
            log.info("grammar engine ready (llguidance, %d tokens) in %.2fs", self._ll_tokenizer.vocab_size,
                     time.perf_counter() - started)
        except Exception as exc:  # no llguidance, or a tokenizer it cannot read
            self._failure = f"{type(exc).__name__}: {exc}"
            log.warning("constrained decoding is unavailable for this model: %s", self._failure)

    @property
    def tokenizer(self) -> Any:
        """llguidance's tokenizer."""
        if self._ll_tokenizer is None:
            raise ConstraintError(f"constrained decoding is unavailable for this model ({self._failure})",
                                  ERROR_INVALID_REQUEST)
        return self._ll_tokenizer

    def matcher(self, lark: str, code: str) -> Any:
        """A fresh matcher for the Lark grammar ``lark``; ConstraintError(code) if it does not compile."""
        import llguidance

        with self._lock:
            ready = self._cache.get(lark)
            if ready is not None:
                self._cache.move_to_end(lark)
        if ready is not None:
            return ready.deep_copy()
        tokenizer = self.tokenizer
        started = time.perf_counter()
        matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0,
                                       limits=llguidance.LLParserLimits(verbose_errors=False))
        if matcher.is_error():
            raise ConstraintError(_short_error(matcher.get_error()), code)
        # The first mask builds the lexer; the cached matcher keeps it for every copy.
        matcher.compute_bitmask()
        if matcher.is_error():
            raise ConstraintError(_short_error(matcher.get_error()), code)
        with self._lock:
            self.compiled += 1
            self.compile_seconds += time.perf_counter() - started
            self._cache[lark] = matcher
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher.deep_copy()

    @property
    def wrapper(self) -> Any:
        """The model's tokenizer (mlx-lm's wrapper): thinking markers."""
        return self._wrapper

    def literal(self, text: str) -> str:
        """``text`` as a Lark item: a special token by id if it is one, else a string."""
        tokenizer = self.tokenizer
        ids = tokenizer.tokenize_str(text, parse_special=True)
        if len(ids) == 1 and tokenizer.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return json.dumps(text)

    def special_id(self, text: str | None) -> int | None:
        """The id of ``text`` when it is one special token (e.g. ``<think>``), else None."""
        if not text:
            return None
        tokenizer = self.tokenizer
        ids = tokenizer.tokenize_str(text, parse_special=True)
        return ids[0] if len(ids) == 1 and tokenizer.is_special_token(ids[0]) else None


def _short_error(error: str) -> str:
    """llguidance's first line, without its position and the grammar it quotes."""
    first = error.strip().splitlines()[0] if error.strip() else "invalid grammar"
    if first.startswith("at ") and ": " in first:
        first = first.split(": ", 1)[1]
    return first


# --- what to constrain -------------------------------------------------------------


def check_constraint(constraint: dict[str, Any]) -> None:
    """The shape of a Generate's ``constraint`` (the gateway builds it; a bad one is our bug or a
    foreign client's)."""
    kind = constraint.get("type")
    if kind not in CONSTRAINT_TYPES:
        raise ConstraintError(f"unknown constraint type {kind!r} (one of {', '.join(CONSTRAINT_TYPES)})")
    field, expected = {"json_schema": ("schema", dict), "regex": ("pattern", str), "lark": ("grammar", str)}.get(
        kind, ("", None))
    if expected is not None and not isinstance(constraint.get(field), expected):
        raise ConstraintError(f"a {kind} constraint needs '{field}' ({expected.__name__})")


def _json_rule(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


def _format_rule(constraint: dict[str, Any]) -> str:
    """The right-hand side of a Lark rule for a json_schema / json_object / regex constraint."""
    import llguidance

    kind = constraint["type"]
    if kind == "json_schema":
        return _json_rule(constraint["schema"])
    if kind == "json_object":
        return _json_rule({"type": "object"})
    return "/" + llguidance.regex_to_lark(constraint["pattern"], "dw") + "/"


def _tool_rules(syntax: CallSyntax, tools: list[dict[str, Any]]) -> list[str]:
    """Lark rules ``call`` (one call of any offered tool) and one ``args_N`` per tool: a strict
    tool's schema, any JSON object for the others."""
    alternatives, rules = [], []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        name = function["name"]
        head = '{"name": ' + json.dumps(name, ensure_ascii=False) + f', "{syntax.arguments_key}": '
        alternatives.append(f"{json.dumps(head, ensure_ascii=False)} args_{index} \"}}\"")
        schema = function.get("parameters") if function.get("strict") is True else None
        rules.append(f"args_{index}: {_json_rule(schema if schema else {'type': 'object'})}")
    if not alternatives:
        raise ConstraintError("no function tools to call", ERROR_INVALID_REQUEST)
    return ["call: " + " | ".join(alternatives), *rules]


def _calls_grammar(grammars: Grammars, syntax: CallSyntax, tools: list[dict[str, Any]], opened: bool,
                   parallel: bool) -> list[str]:
    """Rules whose ``calls`` is the output of one call (or several, if ``parallel``): from the
    opening marker, or (``opened``) from just after it, when the model wrote the marker itself."""
    rules = _tool_rules(syntax, tools)
    if syntax.json_list:
        body = '"[" call (", " call)* "]"' if parallel else '"[" call "]"'
        rules.append(f"calls: {body}" if opened else f"calls: {grammars.literal(syntax.open)} {body}")
    elif syntax.close:
        close = grammars.literal(syntax.close)
        if opened:
            rules.append(f'calls: "\\n"? call "\\n"? {close}')
        else:
            more = ' ("\\n"? block)*' if parallel else ""
            rules.append(f'calls: block{more}\nblock: {grammars.literal(syntax.open)} "\\n"? call "\\n"? {close}')
    else:  # Llama: a bare JSON call, or after <|python_tag|>
        rules.append("calls: call")
    return rules


@dataclass(frozen=True)
class Trigger:
    """In free text: when ``marker`` appears, constrain to ``grammar`` (the rest of a call)."""

    marker: bytes  # b"" for "the reply's first non-blank character is {" (Llama's bare JSON)
    grammar: str
    then_free: bool  # the output is free again once the grammar completes (else only EOS)


def plan(request: Any, tool_format: ToolFormat | None, grammars: Grammars, forced_tool_call: bool,
         initial_state: str) -> ConstraintProcessor | None:
    """The request's constraint as a logits processor (None: nothing to constrain); raises
    ConstraintError for anything the engine cannot apply, before the request is queued.

    ``forced_tool_call``: tool_choice "required" and a format with a ``call_syntax``: the whole
    output is one or more calls (in place of prefilling the opening marker). ``initial_state``:
    the output parser's ("reasoning" when the template left a thinking block open)."""
    constraint = getattr(request, "constraint", None)
    tools = request.tools or []
    parallel = getattr(request, "parallel_tool_calls", True)
    strict = [t for t in tools if isinstance(t, dict) and (t.get("function") or {}).get("strict") is True]
    syntax = tool_format.call_syntax if tools and tool_format is not None else None
    if constraint is not None:
        check_constraint(constraint)
    if strict and tool_format is not None and syntax is None:
        names = ", ".join(str((t.get("function") or {}).get("name")) for t in strict)
        raise ConstraintError(f"strict tools ({names}) need a tool-call format the worker can constrain (Hermes "
                              "<tool_call> JSON, Mistral [TOOL_CALLS], Llama 3 JSON); this model's is not one: "
                              "send strict: false", ERROR_INVALID_TOOL_SCHEMA)
    # Each part on its own first, so that an error names it (all cached: a repeat costs nothing).
    for tool in strict if syntax is not None else []:
        function = tool["function"]
        schema = function.get("parameters")
        if schema is not None and not isinstance(schema, dict):
            raise ConstraintError(f"tool '{function.get('name')}': parameters is not a JSON schema",
                                  ERROR_INVALID_TOOL_SCHEMA)
        try:
            grammars.matcher(f"start: {_json_rule(schema or {'type': 'object'})}", ERROR_INVALID_TOOL_SCHEMA)
        except ConstraintError as exc:
            raise ConstraintError(f"tool '{function.get('name')}': {exc}", ERROR_INVALID_TOOL_SCHEMA) from None
    whole: str | None = None
    triggers: list[Trigger] = []
    if forced_tool_call and syntax is not None:
        whole = "\n".join(["start: calls", *_calls_grammar(grammars, syntax, tools, False, parallel)])
    elif constraint is not None and constraint["type"] == "lark":
        if syntax is not None:
            raise ConstraintError("a Lark grammar cannot be combined with tools", ERROR_INVALID_REQUEST)
        whole = constraint["grammar"]
        grammars.matcher(whole, ERROR_INVALID_SCHEMA)
    elif constraint is not None:
        rules = [f"fmt: {_format_rule(constraint)}"]
        grammars.matcher("\n".join(["start: fmt", *rules]), ERROR_INVALID_SCHEMA)
        if syntax is not None:  # the reply is the format, or tool calls
            rules += _calls_grammar(grammars, syntax, tools, False, parallel)
            whole = "\n".join(["start: fmt | calls", *rules])
        else:
            whole = "\n".join(["start: fmt", *rules])
    elif strict and syntax is not None:
        body = "\n".join(["start: calls", *_calls_grammar(grammars, syntax, tools, True, parallel)])
        # After a call closes the reply goes on freely (another call may follow, if parallel).
        triggers.append(Trigger(syntax.open.encode(), body, then_free=bool(syntax.close) and parallel))
        if tool_format is not None and tool_format.bare_json:  # Llama: a reply that opens with "{" is a call
            triggers.append(Trigger(b"", body, then_free=False))
    if whole is None and not triggers:
        return None
    wrapper = grammars.wrapper
    thinking = bool(getattr(wrapper, "has_thinking", False))
    after_thinking = thinking and initial_state == "reasoning"
    think_start = grammars.special_id(wrapper.think_start) if thinking and not after_thinking else None
    waits = after_thinking or think_start is not None
    code = ERROR_INVALID_SCHEMA if constraint is not None else ERROR_INVALID_TOOL_SCHEMA
    if whole is not None:
        grammars.matcher(whole, code)
        if waits:
            grammars.matcher(_after_thinking(whole), code)
    for trigger in triggers:
        grammars.matcher(trigger.grammar, ERROR_INVALID_TOOL_SCHEMA)
    think_end = (wrapper.think_end or "").encode() if waits else b""
    return ConstraintProcessor(grammars, whole, triggers, think_end, after_thinking, think_start,
                               label=str(getattr(request, "request_id", "")))


def _after_thinking(grammar: str) -> str:
    """``grammar`` with a little whitespace allowed first (``</think>\\n\\n{...}``)."""
    lines = grammar.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("start:")), None)
    if start is None:
        return grammar
    lines[start] = f"start: {_AFTER_THINKING_WS} start_after\nstart_after: {lines[start][len('start:'):].strip()}"
    return "\n".join(lines)


# --- the logits processor ----------------------------------------------------------


class ConstraintProcessor:
    """One sequence's mask, called by mlx-lm's BatchGenerator as ``processor(tokens, logits)``
    before each sampling. ``tokens`` ends with the token sampled last time, which the matcher
    consumes first (or, in free text, which is scanned for a trigger)."""

    def __init__(self, grammars: Grammars, whole: str | None, triggers: list[Trigger], think_end: bytes,
                 thinking: bool, think_start: int | None, label: str = ""):
        self._grammars = grammars
        self._tokenizer = grammars.tokenizer
        self._whole = whole
        self._triggers = triggers
        self._think_end = think_end
        self._think_start = think_start  # allowed as the first token (the model may open a block)
        self._label = label
        self._calls = 0
        self._thinking = thinking
        self._matcher: Any = None
        self._then_free = False
        self._text = b""  # free text since the last constrained part (or the thinking block)
        self._seen_text = False  # any non-blank free text yet (for Llama's bare-JSON trigger)
        self._failed = False
        if not thinking and whole is not None:
            self._start(whole, b"")
        self._bitmask = np.full((1, (self._tokenizer.vocab_size + 31) // 32), -1, dtype=np.int32)

    def __call__(self, tokens: Any, logits: Any) -> Any:
        if self._calls:
            self._consume(int(tokens[-1].item()))
        first = self._calls == 0
        self._calls += 1
        if self._failed or self._matcher is None:
            return logits
        return self._mask(logits, allow=self._think_start if first else None)

    def _consume(self, token: int) -> None:
        if self._failed:
            return
        if self._matcher is not None:
            if self._calls == 1 and token == self._think_start and self._whole is not None:
                # The model opened a thinking block: the constraint waits for its end.
                self._matcher, self._thinking, self._text = None, True, b""
                return
            if not self._matcher.consume_token(token):
                self._fail(f"token {token} does not fit the grammar ({_short_error(self._matcher.get_error())})")
                return
            if self._then_free and self._matcher.is_stopped():
                self._matcher, self._text, self._seen_text = None, b"", True
            return
        piece = self._tokenizer.decode_bytes([token])
        self._text += piece
        if self._thinking:
            position = self._text.find(self._think_end)
            if position >= 0:
                self._thinking = False
                rest, self._text = self._text[position + len(self._think_end):], b""
                if self._whole is not None:
                    self._start(_after_thinking(self._whole), rest)
            else:
                self._text = self._text[-len(self._think_end):]
            return
        for trigger in self._triggers:
            if trigger.marker:
                position = self._text.find(trigger.marker)
                if position < 0:
                    continue
                rest = self._text[position + len(trigger.marker):]
            else:  # the reply's first non-blank character opens a bare JSON call
                if self._seen_text:
                    continue
                stripped = self._text.lstrip()
                if not stripped:
                    continue
                self._seen_text = True
                if not stripped.startswith(b"{"):
                    continue
                rest = stripped
            self._then_free = trigger.then_free
            self._start(trigger.grammar, rest)
            return
        if self._text.strip():
            self._seen_text = True
        # Keep only what may still hold the start of a marker.
        keep = max([len(t.marker) for t in self._triggers] + [len(self._think_end), 1])
        self._text = self._text[-keep:]

    def _start(self, grammar: str, rest: bytes) -> None:
        """Constrain from here; ``rest``: what the token that ended the marker wrote after it."""
        self._matcher = self._grammars.matcher(grammar, ERROR_INVALID_SCHEMA)
        self._text = b""
        if rest and not self._matcher.consume_tokens(self._tokenizer.tokenize_bytes(rest)):
            self._fail(f"{rest!r} after the marker does not fit the grammar")

    def _fail(self, why: str) -> None:
        # Only a processor after ours (a test hook) or a marker merged into an odd token gets here.
        log.warning("constraint abandoned%s: %s", f" ({self._label})" if self._label else "", why)
        self._failed, self._matcher = True, None

    def _mask(self, logits: Any, allow: int | None) -> Any:
        import mlx.core as mx

        bitmask = self._bitmask
        self._matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)
        if allow is not None:
            bitmask.view(np.uint32)[0, allow // 32] |= np.uint32(1 << (allow % 32))
        # The bits are unpacked in the step's own graph: a 6 KB copy here, not 49k booleans.
        words = mx.array(bitmask[0])
        allowed = ((words[:, None] >> _shifts()) & 1).reshape(-1)
        vocab = logits.shape[-1]
        if allowed.size < vocab:
            allowed = mx.concatenate([allowed, mx.zeros(vocab - allowed.size, dtype=allowed.dtype)])
        return mx.where(allowed[:vocab].astype(mx.bool_), logits, mx.array(-float("inf"), dtype=logits.dtype))


@functools.cache
def _shifts() -> Any:
    """0..31, to unpack 32 mask bits per word (made on first use: the gateway's tests import this
    module without needing mlx)."""
    import mlx.core as mx

    return mx.arange(32, dtype=mx.int32)
