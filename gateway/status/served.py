"""What a gateway serves, read over HTTP: for the commands that set up a client for it
(``mlx-gateway-codex``, ``mlx-gateway-claude``) and for the catalog ``/v1/models`` serves."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServedModel:
    """What a client needs to know about one served model."""

    name: str
    context_window: int
    tool_calls: bool = False  # the gateway returns its tool calls parsed
    thinking: bool = False  # its chat template has a thinking switch (reasoning.effort turns it)


def served_models(workers: Iterable[Mapping[str, Any]]) -> list[ServedModel]:
    """The models ready workers serve, from ``GET /v1/workers`` entries, sorted by name.

    Replicas of one model may differ (another ``--context-length``): the smallest window wins,
    and a capability counts only if every replica has it.
    """
    merged: dict[str, ServedModel] = {}
    for worker in workers:
        if worker.get("state", "ready") != "ready":
            continue
        model = ServedModel(str(worker["model"]), int(worker["context_length"]),
                            bool(worker.get("tool_calls", False)), bool(worker.get("thinking", False)))
        seen = merged.get(model.name)
        if seen is not None:
            model = ServedModel(model.name, min(model.context_window, seen.context_window),
                                model.tool_calls and seen.tool_calls, model.thinking and seen.thinking)
        merged[model.name] = model
    return [merged[name] for name in sorted(merged)]


def fetch_workers(base_url: str, api_key: str | None) -> list[dict[str, Any]]:
    request = urllib.request.Request(f"{base_url.rstrip('/')}/v1/workers")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=10) as reply:
        workers: list[dict[str, Any]] = json.load(reply)["data"]
    return workers
