"""One status snapshot: the workers, the models, the requests running now, recent throughput and
failures. ``/v1/workers`` and the status page read it; both see what the engine client, the
registry and the model manager hold, never a copy kept on the side.

``Activity`` keeps the only figures nothing else keeps: output tokens per second over the last
minutes, and the last failures with their request ids (the engine client reports both through
its observer, ``status/metrics.py``).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any

from gateway.engine.client import EngineClient, RequestStream
from gateway.engine.registry import WorkerInfo
from gateway.models.manager import ModelManager, memory_of

HISTORY_S = 300  # seconds of throughput kept
FAILURES_KEPT = 20
_FAMILIES = (("resp_", "responses"), ("chatcmpl-", "chat"), ("cmpl-", "completions"), ("msg_", "messages"),
             ("count", "messages"))


@dataclass
class Failure:
    at: float  # wall clock
    request_id: str
    model: str
    code: str
    message: str


class Activity:
    def __init__(self) -> None:
        self._per_second: collections.deque[list[int]] = collections.deque()  # [second, tokens]
        self.failures: collections.deque[Failure] = collections.deque(maxlen=FAILURES_KEPT)

    def tokens(self, count: int) -> None:
        second = int(time.time())
        if self._per_second and self._per_second[-1][0] == second:
            self._per_second[-1][1] += count
        else:
            self._per_second.append([second, count])
            while self._per_second and self._per_second[0][0] < second - HISTORY_S:
                self._per_second.popleft()

    def failed(self, model: str, request_id: str, code: str, message: str) -> None:
        self.failures.append(Failure(time.time(), request_id, model, code, message[:500]))

    def throughput(self) -> list[list[int]]:
        """[second, output tokens] for each of the last ``HISTORY_S`` seconds that had any."""
        cutoff = int(time.time()) - HISTORY_S
        return [list(entry) for entry in self._per_second if entry[0] >= cutoff]


def worker_view(w: WorkerInfo, now: float) -> dict[str, Any]:
    return {
        "id": w.worker_id,
        "model": w.model,
        "pid": w.pid,
        "state": w.state.value,
        "context_length": w.context_length,
        "tool_calls": w.tool_calls,
        "thinking": w.thinking,
        "max_sequences": w.max_sequences,
        "in_flight": len(w.in_flight),
        "active": w.active,
        "queued": w.queued,
        "last_heartbeat_s": round(now - w.last_seen, 3),
        "memory_bytes": memory_of(w),
        # prompt tokens served from the prefix cache, by tier, and the disk tier's size
        "prompt_cache": {key: w.stats[key] for key in ("cached_tokens", "cached_tokens_ram", "cached_tokens_disk",
                                                       "disk_cache_bytes", "disk_cache_entries") if key in w.stats},
    }


def request_view(stream: RequestStream, now: float) -> dict[str, Any]:
    request_id = stream.request_id
    started = stream.started_output_at
    if stream.worker is None:
        state = "waiting"  # for a worker, or for its model to load
    elif not stream.prompt_tokens:
        state = "queued"
    elif started is None:
        state = "prefilling"
    else:
        state = "decoding"
    decoding_s = now - started if started is not None else 0.0
    return {
        "id": stream.request.trace_id or request_id,
        "request_id": request_id,
        "family": next((name for prefix, name in _FAMILIES if request_id.startswith(prefix)), "other"),
        "model": stream.model,
        "key": stream.request.cache_scope[:8],  # the caller's key, hashed (http/middleware.owner_of)
        "state": state,
        "prompt_tokens": stream.prompt_tokens,
        "output_tokens": stream.output_tokens,
        "tokens_per_second": round(stream.output_tokens / decoding_s, 1) if decoding_s > 0.5 else None,
        "elapsed_s": round(now - stream.opened_at, 1),
        "worker_pid": stream.worker.pid if stream.worker is not None else None,
    }


def snapshot(engine: EngineClient, models: ModelManager | None, activity: Activity) -> dict[str, Any]:
    now = time.monotonic()
    workers = engine.registry.all()
    listed = models.states() if models is not None else {}
    served: dict[str, dict[str, Any]] = {name: {"name": name, **state} for name, state in listed.items()}
    for worker in workers:
        entry = served.setdefault(worker.model, {"name": worker.model, "state": "loaded", "pinned": False,
                                                 "pids": [], "memory_bytes": 0, "external": True})
        if worker.pid not in entry["pids"]:
            entry["pids"] = [*entry["pids"], worker.pid]
        entry.setdefault("context_length", worker.context_length)
        entry.setdefault("tool_calls", worker.tool_calls)
        entry.setdefault("thinking", worker.thinking)
        if worker.model not in listed:
            entry["memory_bytes"] += memory_of(worker)
    for name, entry in served.items():
        entry["requests"] = engine.load(name)  # running, queued in a worker, or waiting for one
    return {
        "time": time.time(),
        "models": [served[name] for name in sorted(served)],
        "memory": {"budget_bytes": models.budget, "used_bytes": models.used_bytes()} if models is not None else None,
        "workers": [worker_view(w, now) for w in workers],
        "requests": [request_view(s, now) for s in sorted(engine.streams(), key=lambda s: s.opened_at)],
        "throughput": activity.throughput(),
        "failures": [vars(f) for f in reversed(activity.failures)],
    }
