"""The worker's engine loop: requests in from the gateway link, one engine step, outputs out.

Everything MLX happens on the thread that runs ``Worker.run`` (the one that loaded the model).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from protocol import PROTOCOL_VERSION, Accepted, Cancel, Error, Finished, Generate, Output, Ready
from protocol.messages import ERROR_INTERNAL, ERROR_SHUTTING_DOWN
from protocol.security import CurveClient
from worker.config import WorkerConfig
from worker.engine import Engine, LogitsProcessorsFactory, Sequence
from worker.link import GatewayLink
from worker.models import LoadedModel

log = logging.getLogger("worker")


class Worker:
    """The engine loop: requests in from the link, one engine step, outputs out, repeat.

    SIGTERM (or SIGINT) drains: the gateway is told to send nothing new, running requests get
    up to ``drain_timeout`` to finish, the rest fail cleanly; a second signal stops at once.
    """

    def __init__(self, engine: Engine, address: str, config: WorkerConfig, curve: CurveClient | None = None):
        """``engine``: from ``build_engine`` (rank 0 of a sharded worker: its GroupEngine)."""
        self.engine = engine
        loaded = engine.loaded
        worker_id = f"{loaded.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        ready = Ready(worker_id, loaded.name, PROTOCOL_VERSION, config.max_sequences, loaded.context_length,
                      os.getpid(), tool_calls=loaded.tool_calls, thinking=loaded.thinking)
        self.ready = ready
        self.max_output_tokens = config.max_output_tokens
        self.stats = EngineStats()
        self.link = GatewayLink(address, ready, load=self._load, heartbeat_interval=config.heartbeat_interval,
                                stalled_for=self._stalled_for, stall_timeout=config.stall_timeout, curve=curve)
        self.loaded = loaded
        self._requests: dict[str, tuple[str, float]] = {}  # request id -> (log id, start time)
        # Prompts are built (template, tokenizer) on this thread, one at a time, in arrival order.
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompt-builder")
        self._building: set[str] = set()  # request ids whose prompt is being built
        self.drain_timeout = config.drain_timeout
        self.prompt_cache_save_timeout = config.prompt_cache_save_timeout
        self.stats.disk_cache = getattr(engine, "disk_cache", None)
        self.drain_deadline: float | None = None  # set once draining
        self.stop_now = False
        self._tick = time.monotonic()

    def _load(self) -> tuple[int, int, dict[str, Any]]:
        """For heartbeats (read from the link's thread: plain numbers, and the engine thread's last
        list of its requests)."""
        return self.engine.active, self.engine.queued, self.stats.snapshot(time.monotonic())

    def _stalled_for(self) -> float:
        return time.monotonic() - self._tick

    def _on_signal(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.drain_deadline is None:
            log.info("received %s: draining (up to %.0fs); send it again to stop now", name, self.drain_timeout)
            self.drain_deadline = time.monotonic() + self.drain_timeout
        else:
            log.info("received %s again: stopping now", name)
            self.stop_now = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.link.start()
        loaded = self.loaded
        log.info("serving %s (context %d, output cap %s, %d sequences, tool calls %s, thinking switch %s, "
                 "default sampling %s) as %s", loaded.name, loaded.context_length, self.max_output_tokens or "none",
                 self.engine.max_sequences, self.ready.tool_calls, self.ready.thinking, loaded.sampling,
                 self.link.worker_id)
        announced = False
        engine = self.engine
        try:
            while not self.stop_now:
                self._tick = time.monotonic()
                self.stats.sample_memory(self._tick)
                self.stats.sample_requests(engine, self._tick)
                if self.drain_deadline is not None:
                    if not announced:
                        self.link.send(Error(ERROR_SHUTTING_DOWN, "draining before shutdown"))
                        announced = True
                    if not engine.busy or time.monotonic() > self.drain_deadline:
                        break
                self._drain_inbox(block=not engine.busy)
                if not engine.busy:
                    continue
                result = engine.step()
                if result.deltas:
                    self.stats.generated_tokens += sum(d.token_count for d in result.deltas)
                    self.link.send(Output(result.deltas))
                ended: list[Finished | Error] = [*result.finished, *result.errors]
                for message in ended:
                    self._record_end(message)
                    self.link.send(message)
        finally:
            for error in engine.cancel_all(ERROR_SHUTTING_DOWN, "the worker is shutting down"):
                self.link.send(error)
            self._builder.shutdown(wait=False, cancel_futures=True)
            self.link.close()
            self._save_prompt_cache()
            log.info("stopped")
        return 0

    def _save_prompt_cache(self) -> None:
        """Stopping (or unloaded): the prefix cache's RAM entries go to its disk tier, if any,
        for at most ``prompt_cache_save_timeout`` seconds."""
        disk = getattr(self.engine, "disk_cache", None)
        if disk is None:
            return
        started = time.monotonic()
        try:
            written = self.engine.save_to_disk(self.prompt_cache_save_timeout)
            log.info("prompt cache: %d entries written to disk in %.1fs", written, time.monotonic() - started)
        except Exception:
            log.exception("writing the prompt cache to disk failed")
        disk.close()

    def _drain_inbox(self, block: bool) -> None:
        """Apply every waiting Generate/Cancel (and built prompt); wait briefly for one when the
        engine is idle."""
        link = self.link
        try:
            message = link.inbox.get(timeout=0.2) if block else link.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(message)
            try:
                message = link.inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, message: object) -> None:
        link, engine = self.link, self.engine
        if isinstance(message, Generate):
            log_id = message.trace_id or message.request_id
            self._requests[message.request_id] = (log_id, time.monotonic())
            if self.drain_deadline is not None:
                self._refuse(message)
                return
            # Building the prompt (template, tokenizer) runs beside the engine loop; the result
            # comes back through the inbox as a _Built.
            self._building.add(message.request_id)
            work = engine.count if message.count_only else engine.prepare
            built: Future[Sequence | Accepted | Error] = self._builder.submit(work, message)
            built.add_done_callback(partial(_post_built, link.inbox, message))
        elif isinstance(message, _Built):
            request = message.request
            if request.request_id not in self._building:
                self._requests.pop(request.request_id, None)  # cancelled while its prompt was built
                return
            self._building.discard(request.request_id)
            reply: Accepted | Error
            if self.drain_deadline is not None:
                self._refuse(request)
                return
            if request.count_only:
                self._count(request, message.outcome)
                return
            reply = engine.enqueue(message.outcome) if isinstance(message.outcome, Sequence) else message.outcome
            log_id = request.trace_id or request.request_id
            if isinstance(reply, Accepted):
                self.stats.prompt_tokens += reply.prompt_tokens
                note = f" ({request.request_id})" if log_id != request.request_id else ""
                log.info("accepted%s: %d prompt tokens, %d running, %d waiting", note, reply.prompt_tokens,
                         engine.active, engine.queued, extra={"request_id": log_id})
            else:
                self._record_end(reply)
            link.send(reply)
        elif isinstance(message, Cancel):
            if message.request_id in self._building:  # dropped when its prompt is built
                self._building.discard(message.request_id)
                return
            finished = engine.cancel(message.request_id)
            if finished is not None:
                self._record_end(finished)
                link.send(finished)
        else:
            log.debug("ignoring %s from the gateway", type(message).__name__)

    def _refuse(self, request: Generate) -> None:
        reply = Error(ERROR_SHUTTING_DOWN, "this worker is shutting down", request.request_id)
        self._record_end(reply)
        self.link.send(reply)

    def _count(self, request: Generate, counted: Sequence | Accepted | Error) -> None:
        """A token count: the prompt was built and measured, and the request ends at once."""
        if isinstance(counted, Sequence):  # not what count() returns; for the type checker
            counted = Accepted(request.request_id, len(counted.prompt))
        self.link.send(counted)
        end = Finished(request.request_id, "stop", counted.prompt_tokens, 0) if isinstance(counted, Accepted) else counted
        if isinstance(end, Finished):
            self.link.send(end)
        self._record_end(end)

    def _record_end(self, message: Finished | Error) -> None:
        """A request ended (finished, cancelled or failed): count it and log one line."""
        request_id = message.request_id or ""
        log_id, started = self._requests.pop(request_id, (request_id, time.monotonic()))
        seconds = time.monotonic() - started
        self.stats.ended(request_id)  # before its cache hits count: a heartbeat never counts them twice
        if isinstance(message, Finished):
            self.stats.cached_tokens += message.cached_tokens
            self.stats.cached_tokens_disk += message.cached_tokens_disk
            self.stats.drafted_tokens += message.drafted_tokens
            self.stats.accepted_tokens += message.accepted_tokens
            rate = message.completion_tokens / seconds if seconds > 0 else 0.0
            log.info("finished (%s): %d prompt (%d cached) + %d completion tokens in %.2fs, %.1f tokens/s",
                     message.finish_reason, message.prompt_tokens, message.cached_tokens, message.completion_tokens,
                     seconds, rate, extra={"request_id": log_id})
        else:
            log.warning("failed (%s): %s", message.code, message.message, extra={"request_id": log_id})


def build_engine(loaded: LoadedModel, config: WorkerConfig, logits_processors: LogitsProcessorsFactory | None = None,
                 engine_type: Callable[..., Engine] = Engine, draft: LoadedModel | None = None) -> Engine:
    """The engine ``config`` describes, then MLX's memory limits (after the engine: its
    BatchGenerator sets mlx-lm's wired limit). Every rank of a sharded worker builds its own
    (``engine_type``: a GroupEngine, worker/sharded.py)."""
    engine = engine_type(loaded, config.max_sequences, config.prefill_chunk, logits_processors,
                         prompt_cache_bytes=config.prompt_cache_mb << 20, max_output_tokens=config.max_output_tokens,
                         speculative=config.speculative, max_draft=config.max_draft,
                         **({"draft_model": draft} if draft is not None else {}),
                         **({"kv_bits": config.kv_bits, "kv_group_size": config.kv_group_size}
                            if config.kv_bits is not None else {}))
    engine.prompts.configure(config.template_policy())  # --allow-client-templates, --template-timeout
    apply_memory_limits(config)
    return engine


def apply_memory_limits(config: WorkerConfig) -> None:
    import mlx.core as mx

    limits = {"memory": (config.memory_limit_gb, mx.set_memory_limit),
              "cache": (config.cache_limit_gb, mx.set_cache_limit),
              "wired": (config.wired_limit_gb, mx.set_wired_limit)}
    for gigabytes, setter in limits.values():
        if gigabytes is not None:
            setter(int(gigabytes * (1 << 30)))
    chosen = {name: gigabytes for name, (gigabytes, _) in limits.items() if gigabytes is not None}
    if chosen:
        log.info("memory limits (GB): %s", chosen)


@dataclass
class _Built:
    """A Generate whose prompt was built off the engine thread, back in the inbox."""

    request: Generate
    outcome: Sequence | Accepted | Error  # prepare(): a Sequence; count(): Accepted; or why not


def _post_built(inbox: queue.Queue[object], request: Generate, done: Future[Sequence | Accepted | Error]) -> None:
    """On the builder thread: hand the built prompt (or why there is none) to the engine loop."""
    try:
        outcome = done.result()
    except Exception as exc:  # a bug of ours: the request fails, the worker serves on
        log.exception("building a prompt failed")
        outcome = Error(ERROR_INTERNAL, f"could not build the prompt: {exc}", request.request_id)
    inbox.put(_Built(request, outcome))


REQUESTS_REPORTED = 64  # requests a heartbeat describes (Engine.progress), at most
REQUESTS_SAMPLE_S = 0.2  # how often the engine thread lists them


class EngineStats:
    """Every engine figure the heartbeat reports, kept here alone. The engine thread counts and
    samples memory (MLX's thread); the link's thread reads a ``snapshot`` once a heartbeat."""

    def __init__(self) -> None:
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.cached_tokens_disk = 0  # of cached_tokens, restored from the disk tier
        self.drafted_tokens = 0  # speculative decoding, finished requests: tokens drafted, and of those accepted
        self.accepted_tokens = 0
        self.disk_cache: Any = None  # the prefix cache's disk tier (worker/disk_cache.py), for its figures
        self.active_memory_bytes = 0
        self.cache_memory_bytes = 0  # freed buffers MLX keeps for reuse: still this process's memory
        self.peak_memory_bytes = 0
        self._next_sample = 0.0
        # Where each request stands (Engine.progress), sampled on the engine thread; the link's
        # thread reads the last list (replaced whole, never changed in place).
        self.requests: list[dict[str, Any]] = []
        self._next_requests_sample = 0.0
        self._rate_sample: tuple[float, int] | None = None  # (when, generated_tokens) at the last snapshot

    def sample_memory(self, now: float) -> None:
        if now < self._next_sample:
            return
        import mlx.core as mx

        self.active_memory_bytes = mx.get_active_memory()
        self.cache_memory_bytes = mx.get_cache_memory()
        self.peak_memory_bytes = mx.get_peak_memory()
        self._next_sample = now + 0.5

    def sample_requests(self, engine: Engine, now: float) -> None:
        """On the engine thread, between steps: at most every ``REQUESTS_SAMPLE_S``."""
        if now < self._next_requests_sample:
            return
        self.requests = engine.progress(REQUESTS_REPORTED) if engine.busy else []
        self._next_requests_sample = now + REQUESTS_SAMPLE_S

    def ended(self, request_id: str) -> None:
        """A request ended: it leaves the list at once (its figures now count in the totals)."""
        if any(row["request_id"] == request_id for row in self.requests):
            self.requests = [row for row in self.requests if row["request_id"] != request_id]

    def snapshot(self, now: float) -> dict[str, Any]:
        """The figures, with tokens/s since the previous snapshot, and the requests now."""
        generated = self.generated_tokens
        stats: dict[str, Any] = {
            "generated_tokens": generated,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "cached_tokens_ram": self.cached_tokens - self.cached_tokens_disk,
            "cached_tokens_disk": self.cached_tokens_disk,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "active_memory_bytes": self.active_memory_bytes,
            "cache_memory_bytes": self.cache_memory_bytes,
            # what the gateway's memory budget counts for this worker (gateway/models/manager.py)
            "memory_bytes": self.active_memory_bytes + self.cache_memory_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
        }
        disk = self.disk_cache
        if disk is not None:  # plain numbers, read without its lock
            stats.update(disk_cache_bytes=disk.nbytes, disk_cache_entries=len(disk), disk_cache_writes=disk.writes,
                         disk_cache_restores=disk.hits)
        if self._rate_sample is not None:
            then, before = self._rate_sample
            stats["tokens_per_second"] = (generated - before) / max(now - then, 1e-6)
        self._rate_sample = (now, generated)
        stats["requests"] = self.requests  # the first REQUESTS_REPORTED, in arrival order
        return stats
