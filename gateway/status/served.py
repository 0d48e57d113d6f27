"""What a gateway serves, read over HTTP: for the commands that set up a client for it
(``mlx-gateway-codex``, ``mlx-gateway-claude``) and for the catalog ``/v1/models`` serves."""

from __future__ import annotations

import json
import sys
import urllib.parse
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
    vision: bool = False  # it sees images (a vision worker)


def served_models(workers: Iterable[Mapping[str, Any]]) -> list[ServedModel]:
    """The models ready workers serve, from ``GET /v1/workers`` entries, sorted by name; not
    embedding models (agents would offer them to chat with).

    Replicas of one model may differ (another ``--context-length``): the smallest window wins,
    and a capability counts only if every replica has it.
    """
    merged: dict[str, ServedModel] = {}
    for worker in workers:
        if worker.get("state", "ready") != "ready" or worker.get("kind") == "embedding":
            continue
        model = ServedModel(str(worker["model"]), int(worker["context_length"]),
                            bool(worker.get("tool_calls", False)), bool(worker.get("thinking", False)),
                            bool(worker.get("vision", False)))
        seen = merged.get(model.name)
        if seen is not None:
            model = ServedModel(model.name, min(model.context_window, seen.context_window),
                                model.tool_calls and seen.tool_calls, model.thinking and seen.thinking,
                                model.vision and seen.vision)
        merged[model.name] = model
    return [merged[name] for name in sorted(merged)]


def fetch_models(base_url: str, api_key: str | None, wanted: str | None = None) -> list[ServedModel]:
    """What a gateway serves, for a launcher about to use ``wanted`` (or its only model): the
    models its workers serve, and those of its model list (``--models``) that it could load. A
    listed model never loaded has no known window yet: the one the launcher will use is loaded
    now (``POST /v1/models/NAME/load``: the first request would load it anyway); others are
    listed with a window of 0."""
    reply = _call(base_url, api_key, "GET", "/v1/workers", 10)
    listed: dict[str, dict[str, Any]] = reply.get("models") or {}
    known = [{**state, "model": name, "state": "ready"} for name, state in listed.items()
             if state.get("state") != "loaded" and "context_length" in state]
    models = served_models([*reply["data"], *known])
    unsized = [name for name in sorted(listed) if name not in {m.name for m in models}]
    only = [*{m.name for m in models}, *unsized]
    target = wanted if wanted in unsized else (unsized[0] if wanted is None and len(only) == 1 and unsized else None)
    if target is not None:
        print(f"loading {target} on the gateway…", file=sys.stderr)
        _call(base_url, api_key, "POST", f"/v1/models/{urllib.parse.quote(target, safe='')}/load", 900)
        return fetch_models(base_url, api_key, wanted)
    return sorted([*models, *(ServedModel(name, 0) for name in unsized)], key=lambda m: m.name)


def _call(base_url: str, api_key: str | None, method: str, path: str, timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(f"{base_url.rstrip('/')}{path}", method=method)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        body: dict[str, Any] = json.load(reply)
    return body
