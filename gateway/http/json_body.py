"""The one check of every JSON text a client sends: request bodies and WebSocket frames.

Two things in valid JSON break the gateway further in, so both are refused here with a 400
naming the field (``param``, a dotted path such as ``messages.0.content``), before any route
reads the value:

- **Nesting deeper than ``MAX_DEPTH`` (64) arrays and objects.** Everything downstream that
  walks a value recurses (JSON Schema checks, pydantic, the worker's templates and grammars):
  150 levels of tool schema were a RecursionError. Real requests nest far less (the deepest
  captured client request: 13 levels). The depth is measured on the raw text, before the JSON
  is parsed, so even ``"[" * 100000`` never reaches a recursive parser.
- **Lone UTF-16 surrogates** (``"\\ud800"`` as an escape, or the bytes ``ED A0 80``, which
  Python's JSON reader lets through): such a string is no Unicode text, and it cannot be
  encoded for the worker (msgpack), for a log line or even for an error message that echoes it.

The middleware checks each request body with ``check_json`` (parsing it only when the text
could hold a surrogate at all; FastAPI parses it as usual afterwards); the WebSocket routes
parse each frame with ``load_json``, which checks the same way. Invalid JSON is left to the
parser that follows.

Request models take integers as JSON Schema defines them: ``463.0`` is the integer 463
(``Integer``), so the documented ``"type": "integer"`` and what the server accepts agree;
``463.5``, ``"463"`` and ``true`` are still refused.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Annotated, Any

from pydantic import BeforeValidator

from gateway.api.errors import APIError

MAX_DEPTH = 64  # arrays and objects, one inside another, in a body or frame

# A JSON string (an unterminated one runs to the end: linear time on any input), and what is
# left between strings.
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.S)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]++")
_TOKEN = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"?|[\[\]{},:]', re.S)
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1
# A surrogate escape, or a surrogate's bytes in UTF-8: without either, no string can hold one.
_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_PATH_PARTS = 8  # a too-deep value is named by its first levels
_PATH_SCAN_TOKENS = 500_000  # past this many tokens the path is not worth finding
_SHOWN = 40  # characters of a key shown in a path


def check_json(data: bytes, max_depth: int = MAX_DEPTH) -> None:
    """Raise a 400 ``APIError`` if ``data`` nests deeper than ``max_depth`` or has a string
    with a lone surrogate. Invalid JSON passes (its parser says so)."""
    text = _as_utf8(data)
    if text is None:
        return
    _check_depth(text, max_depth)
    if _SURROGATE_HINT.search(text) is None:
        return
    try:
        value = json.loads(text)
    except ValueError:
        return
    _check_strings(value)


def load_json(data: bytes | str, what: str = "frame", max_depth: int = MAX_DEPTH) -> Any:
    """``data`` parsed, with the checks of ``check_json``; a 400 if it is not JSON."""
    text = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else _as_utf8(data)
    invalid = APIError(400, f"The {what} is not valid JSON.")
    if text is None:
        raise invalid
    _check_depth(text, max_depth)
    try:
        value = json.loads(text)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise invalid from None
    if _SURROGATE_HINT.search(text) is not None:
        _check_strings(value)
    return value


def nesting_depth(data: bytes) -> int:
    """How deep arrays and objects nest in the JSON text ``data`` (ignoring strings): the depth
    a recursive parser would reach. Unbalanced text counts its unclosed brackets."""
    if data.count(b"[") + data.count(b"{") == 0:
        return 0
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", data))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def lone_surrogate_path(value: Any) -> str | None:
    """The dotted path of the first string (or key) in ``value`` holding a lone surrogate
    ("" for ``value`` itself); None if there is none."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if has_lone_surrogate(item):
                return _dotted(path)
        elif isinstance(item, dict):
            for key in item:
                if has_lone_surrogate(key):
                    return _dotted((*path, key))
            stack.extend((child, (*path, key)) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((child, (*path, index)) for index, child in reversed(list(enumerate(item))))
    return None


def has_lone_surrogate(text: str) -> bool:
    # Surrogates in a str are always lone: JSON's reader joins an escaped pair into one character.
    return not text.isascii() and _SURROGATE.search(text) is not None


def shown(text: str, limit: int = _SHOWN) -> str:
    """``text`` fit to be echoed in a message: surrogates escaped, cut at ``limit`` characters."""
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if has_lone_surrogate(text) else text


def quoted(value: Any, limit: int = 2 * _SHOWN) -> str:
    """``repr(value)`` for a message (which escapes surrogates), cut at ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _as_utf8(data: bytes) -> bytes | None:
    """``data`` as UTF-8, however it came (JSON readers accept UTF-16 and UTF-32 too), its
    surrogates kept as their UTF-8 bytes; None if it cannot be decoded."""
    encoding = json.detect_encoding(data)
    if encoding in ("utf-8", "utf-8-sig"):
        return data
    try:
        return data.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
    except UnicodeError:
        return None


def _check_depth(data: bytes, max_depth: int) -> None:
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return  # cannot nest deeper: the common case costs two counts
    if nesting_depth(data) <= max_depth:
        return
    path = _path_at_depth(data, max_depth)
    where = f" (at '{path}')" if path else ""
    raise APIError(400, f"The JSON nests arrays and objects more than {max_depth} levels deep{where}; "
                        f"the limit is {max_depth}.", param=path or None, code="nesting_too_deep")


def _check_strings(value: Any) -> None:
    path = lone_surrogate_path(value)
    if path is not None:
        raise APIError(400, "A string holds a lone UTF-16 surrogate (such as \\ud800), which is not Unicode text"
                            + (f" (at '{path}')" if path else "") + ".",
                       param=path or None, code="invalid_unicode")


def _path_at_depth(data: bytes, max_depth: int) -> str:
    """The path of the value whose array or object goes one level past ``max_depth``, named
    by its first ``_PATH_PARTS`` levels ("" if it is not found soon enough)."""
    stack: list[list[Any]] = []  # per open container: [is an object, current key or index]
    last_string = b'""'
    for count, match in enumerate(_TOKEN.finditer(data)):
        if count > _PATH_SCAN_TOKENS:
            return ""
        token = match.group()
        first = token[:1]
        if first == b'"':
            last_string = token
        elif first == b":":
            if stack and stack[-1][0]:
                stack[-1][1] = _key(last_string)
        elif first == b",":
            if stack and not stack[-1][0]:
                stack[-1][1] += 1
        elif first in (b"[", b"{"):
            if len(stack) >= max_depth:
                return _dotted(tuple(part for _, part in stack[:_PATH_PARTS]))
            stack.append([first == b"{", "" if first == b"{" else 0])
        elif stack:
            stack.pop()
    return ""


def _key(token: bytes) -> str:
    try:
        key = json.loads(token)
    except ValueError:
        return token.decode("utf-8", "replace").strip('"')
    return key if isinstance(key, str) else ""


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(part) if isinstance(part, int) else shown(part) for part in path)


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Integer fields: JSON Schema's integer, which includes 463.0 (strict models refuse floats).
# (The validator wraps the whole optional type: on the int alone, pydantic documents its bounds
# as "ge"/"le", which JSON Schema does not know.)
Integer = Annotated[int, BeforeValidator(_integral)]
OptionalInteger = Annotated[int | None, BeforeValidator(_integral)]
