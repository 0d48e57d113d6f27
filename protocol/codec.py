"""One msgpack codec for every message, with validation on the way in.

``decode`` raises ``ProtocolError`` for anything it cannot turn into a well-typed message
(bad msgpack, wrong protocol version, unknown type, missing or mistyped fields). Callers
log and drop such frames; a bad frame never takes a process down.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any, Union

import msgpack

from protocol.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


def encode(message: Message) -> bytes:
    wire = _to_wire(message)
    wire["v"] = PROTOCOL_VERSION
    wire["t"] = message.TYPE
    return msgpack.packb(wire, use_bin_type=True)


def decode(frame: bytes | memoryview) -> Message:
    try:
        wire = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"undecodable frame: {exc}") from None
    if not isinstance(wire, dict):
        raise ProtocolError("frame is not a map")
    version = wire.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    kind = wire.pop("t", None)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    try:
        return _builder(cls)(wire)
    except ProtocolError as exc:
        raise ProtocolError(f"{kind}{exc}") from None


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Fields left at their default are not sent (decode restores them): most deltas
        # carry only text, and this keeps the per-token frames small.
        wire = {}
        for name, default, default_factory in _wire_fields(type(value)):
            item = getattr(value, name)
            if default is not dataclasses.MISSING and item == default:
                continue
            if default_factory is not dataclasses.MISSING and not item and item == default_factory():
                continue
            wire[name] = _to_wire(item)
        return wire
    if isinstance(value, list):
        return [_to_wire(v) for v in value]
    return value


@functools.cache
def _wire_fields(cls: type) -> tuple[tuple[str, Any, Any], ...]:
    """(name, default, default_factory) per field: encode runs for every token frame."""
    return tuple((f.name, f.default, f.default_factory) for f in dataclasses.fields(cls))


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def _required_fields(cls: type) -> frozenset[str]:
    return frozenset(
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )


# Checkers are built once per type (the typing introspection is slow) and raise ProtocolError
# with the path below them (".field", "[]"); callers prepend their own part of the path.


@functools.cache
def _builder(cls: type) -> Callable[[Any], Any]:
    checkers = {name: _checker(tp) for name, tp in _field_types(cls).items()}
    names = frozenset(checkers)
    required = _required_fields(cls)

    def build(wire: Any) -> Any:
        if not isinstance(wire, dict):
            raise ProtocolError(": expected a map")
        keys = wire.keys()
        if not keys <= names:
            raise ProtocolError(f": unknown fields {sorted(keys - names)}")
        if not required <= keys:
            raise ProtocolError(f": missing fields {sorted(required - keys)}")
        values = {}
        for name, value in wire.items():
            try:
                values[name] = checkers[name](value)
            except ProtocolError as exc:
                raise ProtocolError(f".{name}{exc}") from None
        return cls(**values)

    return build


@functools.cache
def _checker(tp: Any) -> Callable[[Any], Any]:
    """A function returning a value converted to ``tp`` (nested dataclasses built), or raising."""
    if tp is Any:
        return _identity
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _builder(tp)
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        options = typing.get_args(tp)
        (inner,) = [o for o in options if o is not type(None)]
        inner_check = _checker(inner)
        nullable = type(None) in options

        def check_optional(value: Any) -> Any:
            if value is None:
                if nullable:
                    return None
                raise ProtocolError(": must not be null")
            return inner_check(value)

        return check_optional
    if origin is list:
        (item_type,) = typing.get_args(tp)
        item_check = _checker(item_type)

        def check_list(value: Any) -> Any:
            if not isinstance(value, list):
                raise ProtocolError(": expected a list")
            try:
                return [item_check(item) for item in value]
            except ProtocolError as exc:
                raise ProtocolError(f"[]{exc}") from None

        return check_list
    if origin is dict:
        return _check_map
    if tp is float:
        return _check_float
    if tp is int:
        return _check_int
    name = tp.__name__

    def check_plain(value: Any) -> Any:
        if isinstance(value, tp):
            return value
        raise ProtocolError(f": expected {name}")

    return check_plain


def _identity(value: Any) -> Any:
    return value


def _check_map(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ProtocolError(": expected a map")
    return value


def _check_float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ProtocolError(": expected a number")


def _check_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ProtocolError(": expected an integer")
