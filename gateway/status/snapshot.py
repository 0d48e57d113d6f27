"""One status snapshot: the workers, the models, the requests running now, recent throughput and
failures. ``/v1/workers`` and the status page read it; both see what the engine client, the
registry and the model manager hold, never a copy kept on the side.

Where each running request stands inside its worker (prefill progress, prefix-cache hits,
speculation) comes from the worker's heartbeat (``stats["requests"]``, protocol/README.md), joined
here with the engine client's table by request id (the id the gateway sent in ``generate``).

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


_PROGRESS_FIELDS = ("prompt_tokens", "prefilled_tokens", "cached_tokens", "cached_tokens_disk", "completion_tokens",
                    "drafted_tokens", "accepted_tokens")
_WORKER_STATES = ("queued", "restoring", "prefilling", "decoding")


def _rate(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole > 0 else None


def worker_requests(workers: list[WorkerInfo]) -> dict[str, dict[str, Any]]:
    """request id -> where it stands in its worker, from each worker's last heartbeat (rows that
    are not what protocol/README.md describes are left out)."""
    rows: dict[str, dict[str, Any]] = {}
    for worker in workers:
        listed: Any = worker.stats.get("requests")
        if not isinstance(listed, list):
            continue
        for row in listed:
            if not isinstance(row, dict) or not isinstance(row.get("request_id"), str):
                continue
            entry: dict[str, Any] = {"state": row["state"] if row.get("state") in _WORKER_STATES else None}
            for name in _PROGRESS_FIELDS:
                value = row.get(name)
                entry[name] = value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
            rows[row["request_id"]] = entry
    return rows


def cache_and_speculation(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """A model's prefix-cache hits (prompt tokens served from it, by tier, of all its prompt
    tokens) and, where its workers report them, its speculation figures, over its workers.

    A worker counts a prompt's tokens when it accepts the request, and its cache hits and drafts
    when the request ends: those of the requests running now come from their own rows."""

    def total(key: str) -> int:
        return int(sum(s[key] for s in stats if isinstance(s.get(key), (int, float))))

    def running(key: str) -> int:
        rows = [row for s in stats if isinstance(s.get("requests"), list) for row in s["requests"]]
        return sum(row[key] for row in rows if isinstance(row, dict) and isinstance(row.get(key), int))

    prompt = total("prompt_tokens")
    cached = total("cached_tokens") + running("cached_tokens")
    disk = min(total("cached_tokens_disk") + running("cached_tokens_disk"), cached)
    view: dict[str, Any] = {"prompt_cache": {"prompt_tokens": prompt, "cached_tokens": cached,
                                             "cached_tokens_ram": cached - disk, "cached_tokens_disk": disk,
                                             "hit_rate": _rate(cached, prompt)}}
    if any("drafted_tokens" in s for s in stats):
        drafted = total("drafted_tokens") + running("drafted_tokens")
        accepted = total("accepted_tokens") + running("accepted_tokens")
        view["speculation"] = {"drafted_tokens": drafted, "accepted_tokens": accepted,
                               "acceptance_rate": _rate(accepted, drafted)}
    return view


def worker_view(w: WorkerInfo, now: float) -> dict[str, Any]:
    return {
        "id": w.worker_id,
        "model": w.model,
        "pid": w.pid,
        "state": w.state.value,
        "context_length": w.context_length,
        "tool_calls": w.tool_calls,
        "thinking": w.thinking,
        "vision": w.vision,
        "kind": w.kind,
        "max_sequences": w.max_sequences,
        "in_flight": len(w.in_flight),
        "active": w.active,
        "queued": w.queued,
        "last_heartbeat_s": round(now - w.last_seen, 3),
        "memory_bytes": memory_of(w),
        # prompt tokens served from the prefix cache, by tier, and the disk tier's size
        "prompt_cache": {key: w.stats[key] for key in ("prompt_tokens", "cached_tokens", "cached_tokens_ram",
                                                       "cached_tokens_disk", "disk_cache_bytes", "disk_cache_entries")
                         if key in w.stats},
        # speculative decoding's totals, once the worker reports them
        **({"speculation": {key: w.stats[key] for key in ("drafted_tokens", "accepted_tokens") if key in w.stats}}
           if "drafted_tokens" in w.stats else {}),
    }


def request_view(stream: RequestStream, now: float, inside: dict[str, Any] | None = None) -> dict[str, Any]:
    """One request the gateway holds; ``inside``: where its worker's last heartbeat says it stands."""
    request_id = stream.request_id
    started = stream.started_output_at
    if stream.worker is None:
        state = "waiting"  # for a worker, or for its model to load
    elif started is not None:
        state = "decoding"  # (the gateway has its output: fresher than a heartbeat)
    elif inside is not None and inside["state"] is not None:
        state = inside["state"]  # queued, restoring (its prefix, from disk), prefilling or decoding
    elif not stream.prompt_tokens:
        state = "queued"
    else:
        state = "prefilling"
    prompt_tokens = stream.prompt_tokens or (inside["prompt_tokens"] if inside is not None else 0)
    if state == "decoding":
        prefilled = prompt_tokens
    elif state == "prefilling" and inside is not None:
        prefilled = min(inside["prefilled_tokens"], prompt_tokens)
    else:
        prefilled = 0
    cached = inside["cached_tokens"] if inside is not None else 0
    cached_disk = min(inside["cached_tokens_disk"], cached) if inside is not None else 0
    drafted = inside["drafted_tokens"] if inside is not None else 0
    accepted = inside["accepted_tokens"] if inside is not None else 0
    decoding_s = now - started if started is not None else 0.0
    return {
        "id": stream.request.trace_id or request_id,
        "request_id": request_id,
        "family": next((name for prefix, name in _FAMILIES if request_id.startswith(prefix)), "other"),
        "model": stream.model,
        "key": stream.request.cache_scope[:8],  # the caller's key, hashed (http/middleware.owner_of)
        "state": state,
        "prompt_tokens": prompt_tokens,
        # of its prompt, the tokens in its KV cache so far (served from the prefix cache or prefilled)
        "prefilled_tokens": prefilled,
        "prefill_progress": round(prefilled / prompt_tokens, 4) if prompt_tokens else None,
        # of its prompt, the tokens served from the prefix cache, by tier
        "cached_tokens": cached,
        "cached_tokens_ram": cached - cached_disk,
        "cached_tokens_disk": cached_disk,
        "output_tokens": stream.output_tokens,
        "drafted_tokens": drafted,  # speculative decoding: tokens drafted for it, and of those accepted
        "accepted_tokens": accepted,
        "acceptance_rate": _rate(accepted, drafted),
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
        entry.update(cache_and_speculation([w.stats for w in workers if w.model == name]))
    inside = worker_requests(workers)
    return {
        "time": time.time(),
        "models": [served[name] for name in sorted(served)],
        "memory": {"budget_bytes": models.budget, "used_bytes": models.used_bytes()} if models is not None else None,
        "workers": [worker_view(w, now) for w in workers],
        "requests": [request_view(s, now, inside.get(s.request_id))
                     for s in sorted(engine.streams(), key=lambda s: s.opened_at)],
        "throughput": activity.throughput(),
        "failures": [vars(f) for f in reversed(activity.failures)],
    }
