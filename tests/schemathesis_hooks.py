"""schemathesis hooks (``SCHEMATHESIS_HOOKS``) for the hardening run: besides the bodies the
schema describes, send the same bodies with a lone surrogate appended to one of their strings,
and with one of their values buried 100 arrays deep.

Hypothesis never makes a lone surrogate itself (it generates valid Unicode), and no schema of
ours asks for deep nesting, yet both are JSON a client can send: each must be a 400, never a
500. The bodies go out as ``json.dumps`` writes them, so a surrogate travels as ``\\ud800``.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import strategies as st

LONE_SURROGATE = "\ud800"
DEPTH = 100


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], bool]]:
    """Every value's path inside ``value``, and whether it is a string."""
    found = [(path, isinstance(value, str))] if path else []
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*path, index))
    return found


def _replace(value: Any, path: tuple[Any, ...], change) -> Any:
    if not path:
        return change(value)
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, change)}
    copy = list(value)
    copy[head] = _replace(copy[head], rest, change)
    return copy


def _bury(value: Any) -> Any:
    for _ in range(DEPTH):
        value = [value]
    return value


@schemathesis.hook
def flatmap_body(context, body):
    if not isinstance(body, (dict, list)):
        return st.just(body)
    paths = _paths(body)
    strings = [path for path, is_string in paths if is_string]
    variants = [st.just(body), st.just(_bury(body))]
    if paths:
        variants.append(st.sampled_from([path for path, _ in paths]).map(lambda path: _replace(body, path, _bury)))
    if strings:
        variants.append(st.sampled_from(strings).map(
            lambda path: _replace(body, path, lambda text: text + LONE_SURROGATE)))
    return st.one_of(variants)
