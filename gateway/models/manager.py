"""Models on demand: which listed models are loaded, loading them when a request needs one,
and unloading them when idle or to make room under the memory budget.

Each model runs in its own worker process (``launcher.WorkerProcess``), so a crash still takes
down one model only and an unload gives back all of its memory (the process exits). The engine
client asks ``ensure_loaded`` when a request finds no live worker of a listed model; everyone
who asks during a load waits for that same load. Memory is what the workers measure and report
in their heartbeats (MLX's active and cached memory: weights, running sequences' KV, the prefix
cache); before a model's first load the plan uses the size the list gives, else its weights on
disk.

Unloading never touches a model with requests running or waiting, nor a pinned one: to make
room for a load the least recently used idle models go first, and a load that finds every
other model busy waits (up to ``load_timeout``) for one to fall idle.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.api.errors import MODEL_LOAD_FAILED, MODEL_TOO_LARGE, EngineError
from gateway.engine.registry import WorkerInfo, WorkerRegistry, WorkerState
from gateway.models.catalog import Catalog, ModelSpec
from gateway.models.launcher import WorkerProcess
from protocol.logs import current_request_id

log = logging.getLogger(__name__)

GB = 1 << 30


class ModelState(str, enum.Enum):
    LOADED = "loaded"
    LOADING = "loading"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"
    FAILED = "failed"  # the last load failed (``reason`` says why); the next request tries again


class ModelEvents(Protocol):
    """Where loads and unloads are reported (``gateway.status.metrics.GatewayMetrics``)."""

    def model_loaded(self, model: str, outcome: str, seconds: float) -> None: ...
    def model_unloaded(self, model: str, reason: str) -> None: ...


class _NoEvents:
    def model_loaded(self, model: str, outcome: str, seconds: float) -> None:
        pass

    def model_unloaded(self, model: str, reason: str) -> None:
        pass


@dataclass
class ModelEntry:
    spec: ModelSpec
    state: ModelState = ModelState.UNLOADED
    reason: str | None = None  # why the last load failed, or why it was last unloaded
    process: WorkerProcess | None = None
    loading: asyncio.Task | None = None  # the one load every waiting request shares
    last_used: float = 0.0  # monotonic: the last request's start or end
    keep_alive: float | None = None  # seconds, from the last request that set one; None: the list's idle_ttl
    # What its worker reported first after its last load (weights and engine, before requests add
    # KV and prefix cache): what the next load is planned at. Its memory while loaded grows with
    # its prefix cache, up to the worker's --prompt-cache-mb.
    loaded_bytes: int = 0
    measuring: bool = False  # loaded, its first memory report not in yet
    loads: int = 0
    load_seconds: float | None = None  # how long the last successful load took
    loaded_at: float | None = None  # wall clock
    # What its worker said of the model when it last registered (context_length, tool_calls,
    # thinking, vision, kind): /v1/models and Codex's catalog describe it while it is unloaded.
    described: dict[str, Any] = field(default_factory=dict)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)  # set while no unload is in progress
    pinned: bool = False  # the list's pin, or the operator's (POST /v1/models/NAME/pin)
    weights_bytes: int = 0  # its weights on disk, when local (read at start)

    def __post_init__(self) -> None:
        self.stopped.set()
        self.pinned = self.spec.pin

    @property
    def idle_ttl(self) -> float | None:
        """Seconds without requests before an idle unload; None: never."""
        ttl = self.keep_alive if self.keep_alive is not None else self.spec.idle_ttl
        return None if ttl is None or math.isinf(ttl) else ttl


def memory_of(worker: WorkerInfo) -> int:
    """What a worker holds, as its last heartbeat reported it."""
    stats = worker.stats
    return int(stats.get("memory_bytes", stats.get("active_memory_bytes", 0)))


def default_budget() -> int:
    """Three quarters of the machine's memory (on a Mac, the unified memory Metal uses too):
    room for the system, the gateway and what else runs."""
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 16 * GB
    return int(total * 0.75)


async def _untraced(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` outside the request that happened to start it: its logs are the model's,
    not that request's (a task runs in a copy of its creator's context)."""
    current_request_id.set(None)
    await work


class ModelManager:
    CHECK_INTERVAL_S = 1.0

    def __init__(
        self,
        catalog: Catalog,
        registry: WorkerRegistry,
        requests: Callable[[str], int],
        gateway_address: str,
        budget: int,
        load_timeout: float = 300.0,
        stop_timeout: float = 45.0,
    ):
        self.catalog = catalog
        self.budget = budget
        self.load_timeout = load_timeout
        self.events: ModelEvents = _NoEvents()
        self._registry = registry
        self._requests = requests  # the engine client's count of a model's requests running or waiting
        self._address = gateway_address
        self._stop_timeout = stop_timeout
        self._entries = {spec.name: ModelEntry(spec) for spec in catalog}
        for entry in self._entries.values():  # read once: /v1/models and each plan read it
            entry.weights_bytes = entry.spec.weights_bytes()
            if not entry.weights_bytes and entry.spec.memory is None:
                log.warning("model %s: no local weights to size its first load by (a hub id?); give it a "
                            "'memory' in the list, or its first load is planned at 0 bytes", entry.spec.name)
        self._plan = asyncio.Lock()  # one load at a time decides what to unload
        self._changed = asyncio.Event()  # a request ended or a model went: room may have appeared
        self._tasks: set[asyncio.Task] = set()
        self._checker: asyncio.Task | None = None

    # --- lifetime --------------------------------------------------------------------------

    async def start(self) -> None:
        for name in self._entries:
            self._registry.expect(name)
        self._checker = asyncio.create_task(self._check_loop(), name="model-check")
        for entry in self._entries.values():
            if entry.spec.pin:
                self._background(self._preload(entry.spec.name), f"preload-{entry.spec.name}")
        log.info("serving %d models on demand within a memory budget of %.1f GB: %s", len(self._entries),
                 self.budget / GB, ", ".join(self._entries))

    async def close(self) -> None:
        """Stop every worker this gateway started (each drains first)."""
        tasks = [*self._tasks, *([self._checker] if self._checker else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(e.process.stop(self._stop_timeout) for e in self._entries.values()
                               if e.process is not None), return_exceptions=True)

    # --- what the engine client asks -----------------------------------------------------------

    def manages(self, model: str) -> bool:
        return model in self._entries

    def needs_load(self, model: str) -> bool:
        """A listed model with no worker taking requests: its next request waits for a load."""
        return model in self._entries and not self._serving_workers(model)

    async def ensure_loaded(self, model: str) -> None:
        """Return once a worker of ``model`` takes requests, loading it (or joining the load in
        progress) if none does. Raises EngineError when the load fails."""
        entry = self._entries[model]
        while not self._serving_workers(model):
            if entry.state is ModelState.UNLOADING:
                await entry.stopped.wait()
                continue
            if entry.loading is None:
                entry.loading = self._background(self._load(entry), f"load-{model}")
            # shield: a client that leaves does not stop the load the others wait for
            await asyncio.shield(entry.loading)

    def request_started(self, model: str) -> None:
        entry = self._entries.get(model)
        if entry is not None:
            entry.last_used = time.monotonic()

    def request_ended(self, model: str, keep_alive: float | None) -> None:
        entry = self._entries.get(model)
        if entry is None:
            return
        entry.last_used = time.monotonic()
        if keep_alive is not None:
            entry.keep_alive = keep_alive
        self._notify()
        if entry.idle_ttl == 0 and self._requests(model) == 0:
            self._unload_if_idle(entry, "keep_alive 0")

    # --- operator actions --------------------------------------------------------------------

    async def load(self, model: str) -> None:
        await self.ensure_loaded(model)
        self._entries[model].last_used = time.monotonic()

    async def unload(self, model: str) -> str | None:
        """Unload now; returns why it cannot (requests in flight, not started here), else None."""
        entry = self._entries[model]
        if self._requests(model):
            return f"model '{model}' has {self._requests(model)} requests running or waiting"
        if entry.loading is not None:
            return f"model '{model}' is loading; unload it once it has loaded"
        if entry.process is None or not entry.process.running:
            external = self._serving_workers(model)
            if external:
                return f"model '{model}' is served by a worker this gateway did not start (pid {external[0].pid})"
            return None  # already unloaded
        await self._unload(entry, "requested")
        return None

    def pin(self, model: str, pinned: bool) -> None:
        """Pin (never unloaded on its own) or unpin, until the gateway restarts (the list decides then)."""
        self._entries[model].pinned = pinned

    # --- what the status routes and the metrics read -----------------------------------------

    def states(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {name: self._describe(entry, now) for name, entry in sorted(self._entries.items())}

    def used_bytes(self) -> int:
        """Memory the workers report (every worker, on demand or not), plus what loads in progress
        are expected to take."""
        used = sum(memory_of(w) for w in self._registry.all())
        for entry in self._entries.values():
            if entry.state is ModelState.LOADING or (entry.state is ModelState.LOADED
                                                     and not self._model_memory(entry.spec.name)):
                used += self._planned_bytes(entry)  # no heartbeat with its figures yet
        return used

    def _describe(self, entry: ModelEntry, now: float) -> dict[str, Any]:
        name = entry.spec.name
        workers = [w for w in self._registry.all() if w.model == name]
        state = entry.state
        if workers and state is not ModelState.UNLOADING and any(w.serving for w in workers):
            state = ModelState.LOADED  # also when a worker this gateway did not start serves it
        view: dict[str, Any] = {
            "state": state.value,
            "pinned": entry.pinned,
            "pids": [w.pid for w in workers] or ([entry.process.pid] if entry.process and entry.process.running
                                                 else []),
            "memory_bytes": self._model_memory(name),
            "planned_bytes": self._planned_bytes(entry),
            "idle_ttl_s": entry.idle_ttl,
            **entry.described,
            "requests": self._requests(name),
            "loads": entry.loads,
            "last_load_seconds": None if entry.load_seconds is None else round(entry.load_seconds, 3),
            "idle_s": round(now - entry.last_used, 3) if entry.last_used else None,
            # served by a worker this gateway did not start (``worker --model`` under the supervisor)
            "external": bool(workers) and all(entry.process is None or w.pid != entry.process.pid for w in workers),
        }
        if entry.reason and state in (ModelState.FAILED, ModelState.UNLOADED):
            view["reason"] = entry.reason
        return view

    # --- loading -------------------------------------------------------------------------------

    async def _preload(self, model: str) -> None:
        try:
            await self.ensure_loaded(model)
        except EngineError as exc:
            log.error("could not preload the pinned model %s: %s", model, exc.message)

    async def _load(self, entry: ModelEntry) -> None:
        name = entry.spec.name
        started = time.monotonic()
        timeout = entry.spec.load_timeout or self.load_timeout
        deadline = started + timeout
        try:
            try:  # another load may be waiting for room: wait for it within this load's own time
                await asyncio.wait_for(self._plan.acquire(), timeout)
            except asyncio.TimeoutError:
                raise EngineError(MODEL_LOAD_FAILED, f"model '{name}' could not start loading within {timeout:g}s: "
                                                     "other loads were waiting for room") from None
            try:
                planned = self._planned_bytes(entry)
                if planned > self.budget:
                    raise EngineError(MODEL_TOO_LARGE, f"model '{name}' needs about {planned / GB:.1f} GB, more "
                                                       f"than this machine's memory budget of {self.budget / GB:.1f} "
                                                       "GB for models (gateway --memory-budget)")
                await self._make_room(entry, planned, deadline, timeout)
                if entry.process is not None and entry.process.running:
                    # Its worker was declared dead (hung) but still runs: stop it, and count its memory out.
                    await entry.process.stop(self._stop_timeout)
                entry.state, entry.reason = ModelState.LOADING, None
                entry.process = WorkerProcess(name, entry.spec.worker_command(self._address))
                await entry.process.start()
            finally:
                self._plan.release()
            await self._wait_registered(entry, deadline, timeout)
        except EngineError as exc:
            await self._failed(entry, exc.message)
            self.events.model_loaded(name, "failed", time.monotonic() - started)
            raise
        except Exception as exc:  # e.g. the command cannot start: the waiting requests get why
            log.exception("loading %s failed", name)
            failure = EngineError(MODEL_LOAD_FAILED, f"model '{name}' failed to load: {exc}")
            await self._failed(entry, failure.message)
            self.events.model_loaded(name, "failed", time.monotonic() - started)
            raise failure from None
        except BaseException:
            await self._failed(entry, "the load was stopped")
            raise
        finally:
            entry.loading = None
        worker = next(iter(self._serving_workers(name)), None)
        if worker is not None:
            entry.described = {"context_length": worker.context_length, "tool_calls": worker.tool_calls,
                               "thinking": worker.thinking, "vision": worker.vision, "kind": worker.kind}
        entry.state, entry.loads, entry.measuring = ModelState.LOADED, entry.loads + 1, True
        entry.load_seconds, entry.loaded_at = time.monotonic() - started, time.time()
        entry.last_used = time.monotonic()
        self._background(self._watch_exit(entry, entry.process), f"watch-{name}")
        self.events.model_loaded(name, "loaded", entry.load_seconds)
        log.info("loaded %s in %.1fs (pid %s)", name, entry.load_seconds, entry.process.pid)

    async def _wait_registered(self, entry: ModelEntry, deadline: float, timeout: float) -> None:
        process = entry.process
        assert process is not None
        registered = asyncio.ensure_future(self._registry.wait_for(entry.spec.name, deadline - time.monotonic()))
        exited = asyncio.ensure_future(process.exited.wait())
        try:
            await asyncio.wait({registered, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (registered, exited):
                waiter.cancel()
        if registered.done() and not registered.cancelled() and registered.result() is not None:
            return
        if process.exited.is_set():
            raise EngineError(MODEL_LOAD_FAILED, f"model '{entry.spec.name}' failed to load: {process.reason()}")
        raise EngineError(MODEL_LOAD_FAILED, f"model '{entry.spec.name}' did not load within {timeout:g}s "
                                             "(its load_timeout, else gateway --load-timeout)")

    async def _failed(self, entry: ModelEntry, reason: str) -> None:
        log.error("%s", reason)
        entry.state, entry.reason = ModelState.FAILED, reason
        if entry.process is not None:
            await entry.process.stop(self._stop_timeout)
            entry.process = None
        self._notify()

    async def _make_room(self, entry: ModelEntry, planned: int, deadline: float, timeout: float) -> None:
        """Unload least recently used idle models until ``planned`` more bytes fit; while every
        other model is busy, wait for one to fall idle."""
        while self.used_bytes() + planned > self.budget:
            victim = self._least_recently_used(exclude=entry)
            if victim is not None:
                await self._unload(victim, f"making room for {entry.spec.name}")
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineError(MODEL_LOAD_FAILED, f"no room for model '{entry.spec.name}' (about "
                                                     f"{planned / GB:.2f} GB) within the memory budget of "
                                                     f"{self.budget / GB:.1f} GB: the models loaded had requests "
                                                     f"for {timeout:g}s")
            log.info("waiting for room for %s: %.2f of %.2f GB used, every other model busy or pinned",
                     entry.spec.name, self.used_bytes() / GB, self.budget / GB)
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), min(remaining, self.CHECK_INTERVAL_S))
            except asyncio.TimeoutError:
                pass

    def _least_recently_used(self, exclude: ModelEntry | None = None) -> ModelEntry | None:
        idle = [e for e in self._entries.values()
                if e is not exclude and not e.pinned and e.state is ModelState.LOADED and e.loading is None
                and e.process is not None and e.process.running and self._requests(e.spec.name) == 0]
        return min(idle, key=lambda e: e.last_used, default=None)

    # --- unloading -----------------------------------------------------------------------------

    def _unload_if_idle(self, entry: ModelEntry, reason: str) -> None:
        """Unload an idle, unpinned model (its TTL or keep_alive ran out). No request can reach it
        in between: ``_unload`` marks it unloading before its first await."""
        if (entry.state is ModelState.LOADED and entry.process is not None and not entry.pinned
                and self._requests(entry.spec.name) == 0):
            self._background(self._unload(entry, reason, if_idle=True), f"unload-{entry.spec.name}")

    async def _unload(self, entry: ModelEntry, reason: str, if_idle: bool = False) -> None:
        """``if_idle``: only if it has no requests now (a scheduled idle unload, which a request
        may have overtaken)."""
        if entry.state is ModelState.UNLOADING:
            await entry.stopped.wait()  # unloading already: its memory is given back once it has exited
            return
        process = entry.process
        if process is None or (if_idle and (self._requests(entry.spec.name) or entry.state is not ModelState.LOADED)):
            return
        name = entry.spec.name
        log.info("unloading %s (%s)", name, reason)
        entry.state, entry.reason = ModelState.UNLOADING, f"unloaded: {reason}"
        entry.stopped.clear()
        for worker in self._registry.all():
            if worker.model == name and worker.pid == process.pid:
                worker.state = WorkerState.DRAINING  # no new request reaches it from now on
        try:
            await process.stop(self._stop_timeout)
        finally:
            for worker in self._registry.all():
                if worker.pid == process.pid and worker.model == name and not worker.in_flight:
                    self._registry.remove(worker.identity)  # gone on purpose: not a lost worker
            entry.process = None
            entry.state = ModelState.UNLOADED
            entry.keep_alive = None
            entry.stopped.set()
            self.events.model_unloaded(name, reason.split(" ")[0])
            self._notify()

    async def _watch_exit(self, entry: ModelEntry, process: WorkerProcess) -> None:
        """A loaded worker that exits on its own (a crash): the model is unloaded, and its next
        request loads it again."""
        await process.exited.wait()
        if entry.process is process and entry.state is ModelState.LOADED:
            log.warning("model %s: %s", entry.spec.name, process.reason())
            entry.process, entry.state, entry.reason = None, ModelState.UNLOADED, process.reason()
            self.events.model_unloaded(entry.spec.name, "exited")
            self._notify()

    async def _check_loop(self) -> None:
        """Idle unloads past their TTL, and the budget once loads report what they really take."""
        while True:
            await asyncio.sleep(self.CHECK_INTERVAL_S)
            try:
                await self._check()
            except Exception:  # one bad round must not end the checks
                log.exception("checking the models failed")

    async def _check(self) -> None:
        now = time.monotonic()
        for entry in self._entries.values():
            if entry.measuring and (measured := self._model_memory(entry.spec.name)):
                entry.loaded_bytes, entry.measuring = measured, False
            ttl = entry.idle_ttl
            if ttl is not None and now - entry.last_used >= ttl:
                self._unload_if_idle(entry, f"idle for {ttl:g}s")
        if not self._plan.locked() and self.used_bytes() > self.budget:
            victim = self._least_recently_used()
            if victim is not None:
                log.info("%.2f GB used, over the budget of %.2f GB", self.used_bytes() / GB, self.budget / GB)
                await self._unload(victim, "over the memory budget")

    # --- helpers -------------------------------------------------------------------------------

    def _serving_workers(self, model: str) -> list[WorkerInfo]:
        return [w for w in self._registry.all() if w.model == model and w.serving]

    def _model_memory(self, model: str) -> int:
        return sum(memory_of(w) for w in self._registry.all() if w.model == model)

    def _planned_bytes(self, entry: ModelEntry) -> int:
        """What a load of this model is expected to take: what its last load took, else what the
        list says, else its weights on disk."""
        return entry.loaded_bytes or entry.spec.memory or entry.weights_bytes

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _background(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task:
        task = asyncio.create_task(_untraced(work), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), EngineError):
            log.error("%s failed: %r", task.get_name(), task.exception())
