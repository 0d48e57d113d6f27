"""The live workers the gateway knows, and which one gets the next request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from protocol import Ready


@dataclass
class WorkerInfo:
    identity: bytes  # the DEALER's routing id, which is also its worker id
    model: str
    pid: int
    max_sequences: int
    context_length: int
    registered_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    active: int = 0  # as the worker last reported
    queued: int = 0
    in_flight: set[str] = field(default_factory=set)  # request ids the gateway sent it

    @property
    def worker_id(self) -> str:
        return self.identity.decode(errors="replace")


class WorkerRegistry:
    def __init__(self) -> None:
        self._workers: dict[bytes, WorkerInfo] = {}

    def register(self, identity: bytes, ready: Ready) -> WorkerInfo:
        existing = self._workers.get(identity)
        if existing is not None and existing.model == ready.model:
            existing.last_seen = time.monotonic()
            return existing
        worker = WorkerInfo(identity, ready.model, ready.pid, ready.max_sequences, ready.context_length)
        self._workers[identity] = worker
        return worker

    def get(self, identity: bytes) -> WorkerInfo | None:
        return self._workers.get(identity)

    def remove(self, identity: bytes) -> WorkerInfo | None:
        return self._workers.pop(identity, None)

    def all(self) -> list[WorkerInfo]:
        return list(self._workers.values())

    def models(self) -> list[str]:
        return sorted({w.model for w in self._workers.values()})

    def pick(self, model: str) -> WorkerInfo | None:
        """The least-loaded live worker serving ``model``."""
        candidates = [w for w in self._workers.values() if w.model == model]
        return min(candidates, key=lambda w: len(w.in_flight), default=None)

    def stale(self, timeout: float) -> list[WorkerInfo]:
        cutoff = time.monotonic() - timeout
        return [w for w in self._workers.values() if w.last_seen < cutoff]
