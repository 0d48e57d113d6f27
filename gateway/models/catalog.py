"""The models a machine can serve on demand: the operator's list, read once at start.

A TOML file of ``[[model]]`` tables::

    [[model]]
    name = "qwen3-coder"                  # the name clients ask for
    model = "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit"   # worker --model: dir, repo id, .gguf, built-in
    args = ["--max-sequences", "8"]       # more worker options this model needs
    pin = true                            # loaded at start, never unloaded to make room or when idle
    idle_ttl = "30m"                      # unloaded after this long without requests (default: never)
    memory = "20G"                        # optional: what to plan for before its first load
    load_timeout = "10m"                  # optional: longer (or shorter) than gateway --load-timeout

Durations are seconds or a number with ``s``/``m``/``h``; sizes are bytes or a number with
``K``/``M``/``G``/``T`` (powers of 1024). Before a model's first load the gateway plans with
``memory``, else the size of its weights on disk; after a load it plans with what the worker
measured.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*([smh]?)\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}
_BYTES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class CatalogError(ValueError):
    """The model list cannot be used; the message names the entry and the field."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model: str  # what ``worker --model`` loads
    args: tuple[str, ...] = ()
    pin: bool = False
    idle_ttl: float | None = None  # seconds; None: unloaded only to make room
    memory: int | None = None  # bytes to plan for before the first load
    load_timeout: float | None = None  # seconds; None: the gateway's --load-timeout
    # The program to run instead of ``python -m worker`` (e.g. a wrapper script); the gateway adds
    # --model, --served-name, --gateway and --exit-with-parent, then ``args``.
    command: tuple[str, ...] = ()

    def worker_command(self, gateway_address: str) -> list[str]:
        program = list(self.command) or [sys.executable, "-m", "worker"]
        return [*program, "--model", self.model, "--served-name", self.name, "--gateway", gateway_address,
                "--exit-with-parent", *self.args]

    def weights_bytes(self) -> int:
        """The size of the weights on disk, when ``model`` is a local path (else 0)."""
        path = Path(self.model).expanduser()
        try:
            if path.is_file():
                return path.stat().st_size
            if path.is_dir():
                return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()
                           and p.suffix in (".safetensors", ".gguf", ".npz", ".bin"))
        except OSError:
            pass
        return 0


@dataclass
class Catalog:
    models: dict[str, ModelSpec] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.models

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self.models.values())


def parse_duration(value: Any, what: str) -> float | None:
    """Seconds from ``30``, ``"90s"``, ``"5m"``, ``"1h"``; a negative value: None (forever)."""
    if isinstance(value, bool):
        raise CatalogError(f"{what}: a number of seconds or a duration such as '5m', not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise CatalogError(f"{what}: a number of seconds or a duration such as '5m', not {value!r}")
        seconds = float(match.group(1)) * _SECONDS[match.group(2)]
    return None if seconds < 0 else seconds


def parse_size(value: Any, what: str) -> int:
    """Bytes from ``1073741824``, ``"512M"``, ``"20G"``, ``"1.5GB"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    match = _SIZE.match(str(value))
    if match is None or isinstance(value, bool):
        raise CatalogError(f"{what}: a size such as '20G' or '512M', not {value!r}")
    return int(float(match.group(1)) * _BYTES[match.group(2).upper()])


_FIELDS = {"name", "model", "args", "pin", "idle_ttl", "memory", "load_timeout", "command"}


def load_catalog(path: Path) -> Catalog:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"cannot read the model list {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"the model list {path} is not valid TOML: {exc}") from exc
    unknown = set(data) - {"model"}
    if unknown:
        raise CatalogError(f"{path}: unknown top-level keys {sorted(unknown)} (expected [[model]] tables)")
    entries = data.get("model", [])
    if not isinstance(entries, list) or not entries:
        raise CatalogError(f"{path}: no [[model]] entries")
    catalog = Catalog()
    for index, entry in enumerate(entries):
        spec = _spec(entry, f"{path}: model #{index + 1}")
        if spec.name in catalog.models:
            raise CatalogError(f"{path}: the name {spec.name!r} is listed twice")
        catalog.models[spec.name] = spec
    return catalog


def _spec(entry: Any, where: str) -> ModelSpec:
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: expected a table")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise CatalogError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_FIELDS)})")
    name, model = entry.get("name"), entry.get("model")
    if not isinstance(name, str) or not _NAME.match(name):
        raise CatalogError(f"{where}: 'name' must be a model name (letters, digits, . _ : / -), not {name!r}")
    where = f"{where} ({name})"
    if not isinstance(model, str) or not model:
        raise CatalogError(f"{where}: 'model' (what the worker loads) is required")
    return ModelSpec(
        name=name,
        model=model,
        args=_words(entry.get("args", []), f"{where}: args"),
        pin=_flag(entry.get("pin", False), f"{where}: pin"),
        idle_ttl=parse_duration(entry["idle_ttl"], f"{where}: idle_ttl") if "idle_ttl" in entry else None,
        memory=parse_size(entry["memory"], f"{where}: memory") if "memory" in entry else None,
        load_timeout=_positive(entry["load_timeout"], f"{where}: load_timeout") if "load_timeout" in entry else None,
        command=_words(entry.get("command", []), f"{where}: command"),
    )


def _positive(value: Any, what: str) -> float:
    seconds = parse_duration(value, what)
    if not seconds:
        raise CatalogError(f"{what}: a duration of more than 0 seconds")
    return seconds


def _words(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(shlex.split(value))
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise CatalogError(f"{what}: a list of strings (or one string, split like a shell would)")


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise CatalogError(f"{what}: true or false")
    return value
