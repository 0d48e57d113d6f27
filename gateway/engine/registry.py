"""The live workers the gateway knows, and which one gets the next request."""

from __future__ import annotations

import asyncio
import enum
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from protocol import Ready


class WorkerState(str, enum.Enum):
    """What /v1/workers, /health and /metrics report, and what routing obeys."""

    READY = "ready"  # takes new requests
    DRAINING = "draining"  # finishing its work after SIGTERM: takes nothing new, is not serving


@dataclass
class WorkerInfo:
    identity: bytes  # the DEALER's routing id, which is also its worker id
    model: str
    pid: int
    max_sequences: int
    context_length: int
    fd: int | None = None  # the gateway-side connection, to match a disconnect to this worker
    tool_calls: bool = False  # the worker parses the model's tool calls (from its Ready)
    thinking: bool = False  # the model's chat template has a thinking switch
    vision: bool = False  # the model sees images (a vision worker)
    kind: str = "text"  # "text" (Generate) or "embedding" (Embed), from its Ready
    embedding_size: int = 0  # an embedding worker's vector size
    matryoshka: bool = False  # an embedding worker's vectors may be shortened (`dimensions`)
    state: WorkerState = WorkerState.READY
    registered_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    active: int = 0  # as the worker last reported
    queued: int = 0
    stats: dict[str, float] = field(default_factory=dict)  # engine figures from its last heartbeat
    in_flight: set[str] = field(default_factory=set)  # request ids the gateway sent it

    @property
    def serving(self) -> bool:
        return self.state is WorkerState.READY

    @property
    def worker_id(self) -> str:
        return self.identity.decode(errors="replace")


class WorkerRegistry:
    AFFINITY_KEYS = 10_000

    def __init__(self) -> None:
        self._workers: dict[bytes, WorkerInfo] = {}
        # prompt_cache_key -> the worker that last served it (and so holds its prefix cache)
        self._affinity: OrderedDict[str, bytes] = OrderedDict()
        self._known_models: set[str] = set()  # ever served: requests for them wait for a worker
        self._registered = asyncio.Event()  # set (and cleared) whenever a worker registers

    def register(self, identity: bytes, ready: Ready, fd: int | None) -> tuple[WorkerInfo, bool]:
        """Add or refresh a worker; returns it and whether it is new."""
        existing = self._workers.get(identity)
        if existing is not None and existing.model == ready.model:
            existing.last_seen = time.monotonic()
            existing.fd = fd if fd is not None else existing.fd
            return existing, False
        worker = WorkerInfo(identity, ready.model, ready.pid, ready.max_sequences, ready.context_length, fd,
                            tool_calls=ready.tool_calls, thinking=ready.thinking, vision=ready.vision, kind=ready.kind,
                            embedding_size=ready.embedding_size, matryoshka=ready.matryoshka)
        self._workers[identity] = worker
        self._known_models.add(ready.model)
        self._registered.set()
        self._registered.clear()
        return worker, True

    def get(self, identity: bytes) -> WorkerInfo | None:
        return self._workers.get(identity)

    def remove(self, identity: bytes) -> WorkerInfo | None:
        return self._workers.pop(identity, None)

    def all(self) -> list[WorkerInfo]:
        return list(self._workers.values())

    def with_fd(self, fd: int) -> list[WorkerInfo]:
        return [w for w in self._workers.values() if w.fd == fd]

    def models(self) -> list[str]:
        """Models with a worker taking requests."""
        return sorted({w.model for w in self._workers.values() if w.serving})

    def expect(self, model: str) -> None:
        """A model this gateway serves before any worker of it registered (one loaded on demand)."""
        self._known_models.add(model)

    def is_known(self, model: str) -> bool:
        return model in self._known_models

    def pick(self, model: str, affinity_key: str | None = None) -> WorkerInfo | None:
        """A worker serving ``model`` that takes new requests: the one that last served
        ``affinity_key`` (a client's prompt_cache_key) while it has a free slot, else the least loaded."""
        candidates = [w for w in self._workers.values() if w.model == model and w.serving]
        chosen = min(candidates, key=lambda w: len(w.in_flight), default=None)
        if affinity_key is not None and chosen is not None:
            preferred = self._workers.get(self._affinity.get(affinity_key, b""))
            if preferred in candidates and len(preferred.in_flight) < preferred.max_sequences:
                chosen = preferred
            self._affinity[affinity_key] = chosen.identity
            self._affinity.move_to_end(affinity_key)
            if len(self._affinity) > self.AFFINITY_KEYS:
                self._affinity.popitem(last=False)
        return chosen

    async def wait_for(self, model: str, timeout: float) -> WorkerInfo | None:
        """``pick(model)``, waiting up to ``timeout`` seconds for a worker to register."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (worker := self.pick(model)) is None:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._registered.wait(), remaining)
            except asyncio.TimeoutError:
                return None
        return worker

    def capacity(self, model: str) -> int:
        """Sequences the model's ready workers decode at once."""
        return sum(w.max_sequences for w in self._workers.values() if w.model == model and w.serving)

    def stale(self, timeout: float) -> list[WorkerInfo]:
        cutoff = time.monotonic() - timeout
        return [w for w in self._workers.values() if w.last_seen < cutoff]
