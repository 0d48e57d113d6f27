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


def decode(frame: bytes) -> Message:
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
    cls = MESSAGE_TYPES.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    return _build(cls, wire, kind)


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        # Fields left at their default are not sent (decode restores them): most deltas
        # carry only text, and this keeps the per-token frames small.
        wire = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.default is not dataclasses.MISSING and item == f.default:
                continue
            if f.default_factory is not dataclasses.MISSING and not item and item == f.default_factory():
                continue
            wire[f.name] = _to_wire(item)
        return wire
    if isinstance(value, list):
        return [_to_wire(v) for v in value]
    return value


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


def _build(cls: type, wire: Any, path: str) -> Any:
    if not isinstance(wire, dict):
        raise ProtocolError(f"{path}: expected a map")
    types_by_name = _field_types(cls)
    unknown = wire.keys() - types_by_name.keys()
    if unknown:
        raise ProtocolError(f"{path}: unknown fields {sorted(unknown)}")
    missing = _required_fields(cls) - wire.keys()
    if missing:
        raise ProtocolError(f"{path}: missing fields {sorted(missing)}")
    values = {name: _check(value, types_by_name[name], f"{path}.{name}") for name, value in wire.items()}
    return cls(**values)


def _check(value: Any, tp: Any, path: str) -> Any:
    """Return ``value`` converted to ``tp`` (nested dataclasses built), or raise ProtocolError."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ProtocolError(f"{path}: must not be null")
        (inner,) = [o for o in options if o is not type(None)]
        return _check(value, inner, path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{path}: expected a list")
        (item_type,) = typing.get_args(tp)
        return [_check(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{path}: expected a map")
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ProtocolError(f"{path}: expected a number")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ProtocolError(f"{path}: expected an integer")
    if isinstance(value, tp):
        return value
    raise ProtocolError(f"{path}: expected {tp.__name__}")
