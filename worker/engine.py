"""Continuous batching over mlx-lm's ``BatchGenerator``.

``Engine`` admits requests into the running batch (up to ``max_sequences`` at once, the rest
wait in arrival order), and on each ``step()`` advances every admitted sequence by one token (or
one prefill chunk), returning the new text per request and the requests that finished. Prompts
are built by ``worker/prompts.py``, and reuse the KV caches of earlier ones through
``worker/prefix_cache.py``. Everything here but ``prepare`` and ``count`` runs on the one
thread that loaded the model.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

from protocol.messages import (
    ERROR_CONTEXT_LENGTH,
    ERROR_INTERNAL,
    ERROR_INVALID_REQUEST,
    Accepted,
    Delta,
    Error,
    Finished,
    Generate,
)
from worker import tool_formats
from worker.batching import (
    UNCHUNKED_PREFILL_STEP,
    ChunkedBatchGenerator,
    ChunkSizer,
    KVQuantizedBatchGenerator,
    default_prefill_chunk,
)
from worker.constraints import ConstraintError, ConstraintProcessor, Grammars, plan
from worker.disk_cache import DiskCache, Restored, load_cache
from worker.models import LoadedModel
from worker.output_parser import OutputParser
from worker.prefix_cache import PrefixCache
from worker.prompts import PromptBuilder
from worker.speculative import MAX_DRAFT, Sampling, Speculator, supports_speculation
from worker.text_stream import StopStrings

log = logging.getLogger(__name__)

DISK_MIN_GAIN = 16  # prompt tokens a disk entry must supply beyond the RAM cache's to be read


@dataclass
class Sequence:
    """One request's state between steps."""

    request: Generate
    prompt: list[int]
    max_tokens: int
    detokenizer: Any
    stops: StopStrings
    parser: OutputParser
    uid: int | None = None  # BatchGenerator's id, once admitted
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    constraint: ConstraintProcessor | None = None  # structured output: its grammar's mask (worker/constraints.py)
    disk_hit: tuple[Any, int] | None = None  # (the disk tier's entry for its prompt, tokens it would supply)
    restored_tokens: int = 0  # the prefix restored from disk for it (its cached tokens up to this came from disk)
    restore_started: float = 0.0
    drafted_tokens: int = 0  # speculative decoding: tokens drafted for it, and of those accepted
    accepted_tokens: int = 0


@dataclass
class StepResult:
    deltas: list[Delta] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)
    errors: list[Error] = field(default_factory=list)


LogitsProcessorsFactory = Callable[[Generate], list[Any]]


class Engine:
    timed_chunks = True  # --prefill-chunk auto sizes chunks from this process's own step times
    # Speculative decoding (worker/speculative.py) decides each step from this process's own step
    # times and draws; a sharded worker's ranks would have to agree on every decision (not done).
    speculates = True

    def __init__(
        self,
        loaded: LoadedModel,
        max_sequences: int = 16,
        # Prompt tokens per engine step, all prompts together (worker/batching.py); None: sized as it
        # runs (ChunkSizer); 0: mlx-lm's own prefill (512 tokens of every waiting prompt per step).
        prefill_chunk: int | None = None,
        logits_processors: LogitsProcessorsFactory | None = None,
        prompt_cache_bytes: int = 1 << 30,  # the prefix cache's budget (0: off; worker/prefix_cache.py)
        max_output_tokens: int | None = None,  # the most a request may generate (None: up to the context)
        kv_bits: int | None = None,  # quantized KV caches (worker/quantized_cache.py); None: unquantized
        kv_group_size: int = 64,
        # Prompt-lookup drafts verified in the batch's forward pass (worker/speculative.py): "auto"
        # (when measured to pay), "always" (whenever there are drafts) or "off".
        speculative: str = "auto",
        max_draft: int = MAX_DRAFT,
        draft_model: LoadedModel | None = None,  # drafts from this model (same tokenizer), not the prompt
    ):
        self.loaded = loaded
        if kv_bits is not None:
            from worker.quantized_cache import check_kv_quantization, kv_bytes_per_token

            check_kv_quantization(loaded.model, kv_group_size, kv_bits)
            log.info("KV cache: %d bits in groups of %d, %d bytes per 1,000 tokens of context (unquantized: %d)",
                     kv_bits, kv_group_size, round(1000 * kv_bytes_per_token(loaded.model, kv_group_size, kv_bits)),
                     round(1000 * kv_bytes_per_token(loaded.model)))
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self._max_output_tokens = max_output_tokens
        self.prefix_cache = PrefixCache(prompt_cache_bytes) if prompt_cache_bytes else None
        self.disk_cache: DiskCache | None = None  # the prefix cache's disk tier (attach_disk_cache)
        self._restoring: dict[str, tuple[Sequence, Future[Restored | None]]] = {}  # reading their prefix from disk
        self.max_sequences = max_sequences
        self._prefill_chunk = default_prefill_chunk() if prefill_chunk is None else prefill_chunk
        # Kept across generators: what it measured still holds after a failed step's fresh start.
        self._chunk_sizer = ChunkSizer(self._prefill_chunk) if prefill_chunk is None and self.timed_chunks else None
        self._logits_processors = logits_processors
        self._tool_format = tool_formats.detect(loaded.tokenizer)
        self.prompts = PromptBuilder(loaded.tokenizer, self._tool_format)
        self._grammars = Grammars(loaded.tokenizer)  # structured output (worker/constraints.py)
        self._warned_no_tools = False
        self._eos = StopSequences([(t,) for t in loaded.tokenizer.eos_token_ids])
        if speculative not in ("auto", "always", "off"):
            raise ValueError(f"speculative must be auto, always or off, not {speculative!r}")
        self.max_draft = max_draft
        self.draft_model = draft_model
        self.speculative = speculative if self._speculation_possible(speculative != "off") else "off"

        self.speculator: Speculator | None = None  # the current generator's (_new_generator)
        self._generator = self._new_generator()
        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}  # uid -> sequence
        self._by_request: dict[str, Sequence] = {}

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._waiting) + len(self._restoring)

    @property
    def busy(self) -> bool:
        return bool(self._running or self._waiting or self._restoring)

    def submit(self, request: Generate) -> Accepted | Error:
        """Queue a request; an Error if it cannot run (the engine is unaffected)."""
        prepared = self.prepare(request)
        return self.enqueue(prepared) if isinstance(prepared, Sequence) else prepared

    def prepare(self, request: Generate) -> Sequence | Error:
        """Build and tokenize the prompt: all a request needs before it can wait for a slot.
        Touches no MLX state, so the worker runs it off the engine thread (worker/prompts.py)."""
        if request.tools and self._tool_format is None and not self._warned_no_tools:
            self._warned_no_tools = True
            log.warning("%s has no tool-call format mlx-lm knows; tools go to its template, calls stay text",
                        self.loaded.name)
        forced = self.prompts.forces_tool_call(request)
        prompt = self._prompt(request, forced)
        if isinstance(prompt, Error):
            return prompt
        if not prompt:
            return Error(ERROR_INVALID_REQUEST, "the prompt is empty", request.request_id)
        context = self.loaded.context_length
        if len(prompt) >= context:
            message = f"the prompt is {len(prompt)} tokens; this model's context window is {context} tokens"
            return Error(ERROR_CONTEXT_LENGTH, message, request.request_id, prompt_tokens=len(prompt),
                         context_length=context)
        if request.max_tokens is not None and request.max_tokens < 1:
            return Error(ERROR_INVALID_REQUEST, "max_tokens must be at least 1", request.request_id)
        room = context - len(prompt)
        initial_state = self.prompts.initial_state(prompt) if request.messages is not None else "normal"
        try:  # compiles the request's grammar, if new: here too, off the engine thread
            constraint = plan(request, self._tool_format if request.messages is not None else None, self._grammars,
                              forced_tool_call=request.tool_choice == "required" and not forced,
                              initial_state=initial_state)
        except ConstraintError as exc:
            return Error(exc.code, str(exc), request.request_id)
        sequence = Sequence(
            request=request,
            prompt=prompt,
            # The operator's cap is a ceiling, and what a request that names no max_tokens gets.
            max_tokens=min(request.max_tokens or room, self._max_output_tokens or room, room),
            detokenizer=self._detokenizer(raw=request.messages is None),
            stops=StopStrings(request.stop),
            parser=OutputParser(
                self.loaded.tokenizer,
                self._tool_format,
                request.tools,
                initial_state=initial_state,
                forced_tool_call=forced,
            ),
            constraint=constraint,
        )
        if self.disk_cache is not None:  # the disk tier's index, read here off the engine thread
            sequence.disk_hit = self.disk_cache.lookup(request.cache_scope, prompt)
        return sequence

    def enqueue(self, sequence: Sequence) -> Accepted | Error:
        """Queue a prepared request (on the engine thread)."""
        request_id = sequence.request.request_id
        if request_id in self._by_request:
            return Error(ERROR_INVALID_REQUEST, "duplicate request id", request_id)
        self._by_request[request_id] = sequence
        if not self._restore(sequence):
            self._waiting.append(sequence)
        return Accepted(request_id, len(sequence.prompt))

    def count(self, request: Generate) -> Accepted | Error:
        """The prompt's length in tokens, exactly as ``submit`` would build it; nothing runs."""
        prompt = self._prompt(request, self.prompts.forces_tool_call(request))
        return prompt if isinstance(prompt, Error) else Accepted(request.request_id, len(prompt))

    def _prompt(self, request: Generate, forced_tool_call: bool) -> list[int] | Error:
        """The request's prompt (a sharded worker's other ranks take rank 0's instead)."""
        return self.prompts.build(request, forced_tool_call)

    def cancel(self, request_id: str) -> Finished | None:
        """Drop a request wherever it is; its slot is free for the next step."""
        sequence = self._by_request.pop(request_id, None)
        if sequence is None:
            return None
        if self._restoring.pop(request_id, None) is not None:
            pass  # its read finishes unused
        elif sequence.uid is None:
            self._waiting.remove(sequence)
        else:  # decoding, prefilling or waiting to: its KV cache goes with it
            self._generator.remove([sequence.uid])
            self._release(sequence.uid)
            if self.prefix_cache is not None:
                self.prefix_cache.drop_peek(sequence.uid)
        return self._finished(sequence, "cancelled")

    def cancel_all(self, code: str, message: str) -> list[Error]:
        errors = [Error(code, message, request_id) for request_id in list(self._by_request)]
        for request_id in list(self._by_request):
            self.cancel(request_id)
        return errors

    def step(self) -> StepResult:
        self._take_restored()
        self._admit()
        result = StepResult()
        if not self._running:
            return result
        try:
            _, responses = self._generator.next()
        except Exception as exc:
            # A failure inside a batched step cannot be pinned on one request: fail the batch,
            # start a fresh generator, and keep serving.
            log.exception("engine step failed; failing %d running requests", len(self._running))
            for sequence in list(self._running.values()):
                self._by_request.pop(sequence.request.request_id, None)
                result.errors.append(Error(ERROR_INTERNAL, f"generation failed: {exc}", sequence.request.request_id))
            self._running.clear()
            if self.prefix_cache is not None:
                self.prefix_cache.drop_peeks()
            self._generator = self._new_generator()
            return result
        if isinstance(generator := self._generator, ChunkedBatchGenerator):
            self._fail_prefills(generator, result)

        stopped_early: list[int] = []
        scopes: dict[int, Sequence] = {}  # stopped early: whose caches come back below
        deltas: dict[str, Delta] = {}  # a request's tokens of this step as one delta (speculation gives several)
        for response in responses:
            running = self._running.get(response.uid)
            if running is None:
                continue  # finished earlier in this step: the rest of its accepted drafts are dropped
            delta, finish_reason, hit_stop = self._advance(running, response)
            _merge_delta(deltas, delta)
            if finish_reason is None:
                continue
            if hit_stop and response.finish_reason is None:
                stopped_early.append(response.uid)  # still in the batch: removed below
            else:
                self._remember(running, response.all_tokens, response.prompt_cache)
            if hit_stop and response.finish_reason is None:
                scopes[response.uid] = running
            self._release(response.uid)
            del self._by_request[running.request.request_id]
            result.finished.append(self._finished(running, finish_reason))
        result.deltas = list(deltas.values())
        if stopped_early:
            caches = self._generator.remove(stopped_early, return_prompt_caches=self.prefix_cache is not None)
            for uid, (cache, tokens) in caches.items():
                self._remember(scopes[uid], tokens, cache)
        return result

    def _release(self, uid: int) -> Sequence | None:
        """A sequence leaves the batch (finished, cancelled or failed)."""
        if self.speculator is not None:
            self.speculator.forget(uid)
        return self._running.pop(uid, None)

    def _advance(self, sequence: Sequence, response: Any) -> tuple[Delta, str | None, bool]:
        """One new token of one sequence -> (its delta, its finish reason if it ended, whether a
        stop string ended it). Detokenizes, holds back a possible stop string, parses thinking
        and tool calls."""
        sequence.completion_tokens += 1
        detokenizer = sequence.detokenizer
        if response.finish_reason != "stop":  # never decode the end-of-sequence token
            detokenizer.add_token(response.token)
        if response.finish_reason is not None:
            detokenizer.finalize()
        text, hit_stop = sequence.stops.push(detokenizer.last_segment)
        finish_reason = "stop" if hit_stop else response.finish_reason
        if finish_reason is not None and not hit_stop:
            text += sequence.stops.flush()
        parsed = sequence.parser.feed(text)
        if sequence.parser.state == "reasoning" or parsed.reasoning:
            sequence.reasoning_tokens += 1
        if finish_reason is not None:
            rest = sequence.parser.finish()
            parsed.content += rest.content
            parsed.reasoning += rest.reasoning
            parsed.tool_calls += rest.tool_calls
        delta = Delta(sequence.request.request_id, text=parsed.content, reasoning=parsed.reasoning,
                      tool_calls=parsed.tool_calls, token_count=1)
        return delta, finish_reason, hit_stop

    def _remember(self, sequence: Sequence, tokens: list[int] | None, cache: list[Any] | None) -> None:
        """Keep a sequence's KV cache for later prompts of its scope that share its prefix."""
        if self.prefix_cache is None or not tokens or cache is None:
            return
        self.prefix_cache.store(sequence.request.cache_scope, tokens, cache,
                                running_bytes=self._generator.prompt_cache_nbytes)

    def _prompts_prefilled(self, uids: list[int]) -> None:
        """Prompts finished their (chunked) prefill: each is cached at once, for requests that share
        its prefix while it still decodes, or that waited behind it."""
        fresh = [uid for uid in uids if uid in self._running
                 and self._running[uid].cached_tokens < len(self._running[uid].prompt) - 1]
        if self.prefix_cache is None or not fresh:
            return
        for uid, (cache, tokens) in self._generator.extract_cache(fresh).items():
            self._remember(self._running[uid], tokens, cache)

    def _fail_prefills(self, generator: ChunkedBatchGenerator, result: StepResult) -> None:
        """After a chunked step: prompts whose prefill raised fail alone (the generator dropped them
        and their caches; decoding went on)."""
        for uids, exc in generator.take_failures():
            log.error("prefill failed; failing %d prompts: %s", len(uids), exc, exc_info=exc)
            for uid in uids:
                sequence = self._release(uid)
                if sequence is not None:
                    self._by_request.pop(sequence.request.request_id, None)
                    result.errors.append(Error(ERROR_INTERNAL, f"prefill failed: {exc}", sequence.request.request_id))

    @property
    def prompt_cache_bytes(self) -> int:
        return self.prefix_cache.nbytes if self.prefix_cache is not None else 0

    # --- the prefix cache's disk tier (worker/disk_cache.py) ---------------------------

    def attach_disk_cache(self, disk_cache: DiskCache) -> None:
        """Entries leaving the prefix cache go to ``disk_cache``; prompts restore from it."""
        if self.prefix_cache is None:
            log.warning("--prompt-cache-dir needs the prefix cache (--prompt-cache-mb above 0): not used")
            return
        self.disk_cache = disk_cache
        self.prefix_cache.on_evict = disk_cache.spill

    def _restore(self, sequence: Sequence) -> bool:
        """Start reading a queued prompt's disk entry if it would supply more than RAM does (the
        prompt waits, out of the queue, until it is read). False: nothing to read."""
        hit, sequence.disk_hit = sequence.disk_hit, None
        if hit is None or self.disk_cache is None or self.prefix_cache is None:
            return False
        entry, tokens = hit
        in_ram = self.prefix_cache.cached_length(sequence.request.cache_scope, sequence.prompt)
        if tokens < in_ram + DISK_MIN_GAIN:
            return False
        self._restoring[sequence.request.request_id] = (sequence, self.disk_cache.restore(entry))
        sequence.restore_started = time.monotonic()
        return True

    def _take_restored(self) -> None:
        """Entries read from disk go into the prefix cache, and their prompts into the queue.
        With nothing else to do, wait briefly for a read."""
        if not self._restoring:
            return
        if not (self._running or self._waiting):
            wait_for_futures([f for _, f in self._restoring.values()], timeout=0.05, return_when=FIRST_COMPLETED)
        for request_id, (sequence, future) in list(self._restoring.items()):
            if not future.done():
                continue
            del self._restoring[request_id]
            self._store_restored(sequence, future)
            if request_id in self._by_request:
                self._waiting.append(sequence)

    def _store_restored(self, sequence: Sequence, future: Future[Restored | None]) -> None:
        try:
            restored = future.result()
            if restored is None or self.prefix_cache is None:
                return
            read_s = time.monotonic() - sequence.restore_started
            cache = load_cache(restored)
        except Exception:
            log.exception("restoring a prefix from disk failed; prefilling it")
            return
        self.prefix_cache.store(sequence.request.cache_scope, restored.entry.tokens, cache,
                                running_bytes=self._generator.prompt_cache_nbytes)
        sequence.restored_tokens = len(restored.entry.tokens)
        log.info("restored %d prompt tokens from disk in %.2fs (%.2fs reading and checking)", sequence.restored_tokens,
                 time.monotonic() - sequence.restore_started, read_s,
                 extra={"request_id": sequence.request.trace_id or sequence.request.request_id})

    def save_to_disk(self, timeout: float) -> int:
        """The worker stops: write the prefix cache's entries (most recently used first) to the
        disk tier, for up to ``timeout`` seconds. Returns how many were written."""
        if self.disk_cache is None or self.prefix_cache is None:
            return 0
        deadline = time.monotonic() + timeout
        queued = 0
        for scope, tokens, cache in self.prefix_cache.entries():
            if time.monotonic() > deadline or not self.disk_cache.flush(max(deadline - time.monotonic(), 0)):
                break
            queued += self.disk_cache.spill(scope, tokens, cache)
        self.disk_cache.flush(max(deadline - time.monotonic(), 0))
        return queued

    def _admit(self) -> None:
        """Move waiting requests into the batch while there are free slots."""
        batch: list[Sequence] = []
        while self._waiting and len(self._running) + len(batch) < self.max_sequences:
            batch.append(self._waiting.popleft())
        if not batch:
            return
        caches: list[Any] = []  # a sequence's cached prefix, or None
        rests: list[list[int]] = []
        chunked = isinstance(self._generator, ChunkedBatchGenerator)
        for sequence in batch:
            # Chunked, the prefix cache is read when the prompt's prefill starts (_fetch_prefix).
            cache, rest = (None, sequence.prompt) if chunked else self._cached_prefix(sequence)
            sequence.cached_tokens = len(sequence.prompt) - len(rest)
            caches.append(cache)
            rests.append(rest)
        uids = self._generator.insert(
            rests,
            caches=caches,
            all_tokens=[s.prompt[: s.cached_tokens] for s in batch],
            max_tokens=[s.max_tokens for s in batch],
            samplers=[self._sampler(s.request) for s in batch],
            logits_processors=[self._processors(s.request) for s in batch],
            stop_sequences=[self._eos] * len(batch),
        )
        for uid, sequence in zip(uids, batch, strict=True):
            sequence.uid = uid
            self._running[uid] = sequence
            if self.speculator is not None:
                self.speculator.register(uid, sequence, self._sampling(sequence.request),
                                         enabled=sequence.request.speculative)

    def _peek_prefix(self, uid: int) -> int:
        """How many of a waiting prompt's tokens the prefix cache would supply now (nothing copied)."""
        sequence = self._running.get(uid)
        if self.prefix_cache is None or sequence is None:
            return 0
        return self.prefix_cache.peek(uid, sequence.request.cache_scope, sequence.prompt)

    def _fetch_prefix(self, uid: int, prompt: list[int]) -> tuple[list[Any] | None, int]:
        """A prompt starts its prefill: (a copy of its longest cached prefix or None, that prefix's length)."""
        if self.prefix_cache is not None:
            self.prefix_cache.drop_peek(uid)
        sequence = self._running.get(uid)
        if sequence is None or self.prefix_cache is None:
            return None, 0
        cache, rest = self.prefix_cache.fetch(sequence.request.cache_scope, prompt)
        sequence.cached_tokens = cached = len(prompt) - len(rest)
        return cache, cached

    def _cached_prefix(self, sequence: Sequence) -> tuple[list[Any] | None, list[int]]:
        """(a KV cache for the longest cached prefix of its prompt, in its scope, or None; the
        tokens still to prefill)."""
        if self.prefix_cache is None:
            return None, sequence.prompt
        return self.prefix_cache.fetch(sequence.request.cache_scope, sequence.prompt)

    def _detokenizer(self, raw: bool) -> Any:
        detokenizer = self.loaded.tokenizer.detokenizer
        if raw and type(detokenizer) is BPEStreamingDetokenizer:
            # mlx-lm drops the first space of a reply, which suits chat; a raw completion
            # continues the prompt, where " Paris" after "The capital is" must keep it.
            detokenizer.__class__ = _UntrimmedBPEDetokenizer
        return detokenizer

    def _sampling_params(self, request: Generate) -> dict[str, Any]:
        asked, default = request.sampling, self.loaded.sampling
        return {name: default[name] if getattr(asked, name) is None else getattr(asked, name)
                for name in ("temperature", "top_p", "min_p", "top_k")}

    def _sampler(self, request: Generate) -> Any:
        p = self._sampling_params(request)
        return make_sampler(temp=p["temperature"], top_p=p["top_p"], min_p=p["min_p"], top_k=p["top_k"])

    def _sampling(self, request: Generate) -> Sampling | None:
        """What the request's sampler draws from, for judging drafts (None: greedy)."""
        p = self._sampling_params(request)
        if p["temperature"] == 0:
            return None
        return Sampling(p["temperature"], p["top_p"], p["min_p"], p["top_k"])

    def _draft(self) -> Any:
        if self.draft_model is None:
            return None
        from worker.draft_model import DraftModel

        return DraftModel(self.draft_model.model, vocab_size(self.loaded.tokenizer))

    def _speculation_possible(self, asked: bool) -> bool:
        if not asked or not self.speculates:
            return False
        if not self._prefill_chunk:
            log.info("speculative decoding is off: it needs chunked prefill (--prefill-chunk above 0)")
            return False
        if not supports_speculation(self.loaded.model):
            log.info("speculative decoding is off: %s has layers whose cache cannot give positions back "
                     "(sliding window or recurrent)", self.loaded.name)
            return False
        return True

    def _processors(self, request: Generate) -> list[Any]:
        """The sequence's logits processors: OpenAI's presence/frequency penalties (mlx-lm's, over
        the last 20 tokens), the request's constraint (its grammar's mask), then the test hook's,
        which must see (and may override) the result."""
        sampling = request.sampling
        processors: list[Any] = make_logits_processors(presence_penalty=sampling.presence_penalty,
                                                       frequency_penalty=sampling.frequency_penalty)
        sequence = self._by_request.get(request.request_id)
        if sequence is not None and sequence.constraint is not None:  # after the penalties: masked stays masked
            processors.append(sequence.constraint)
        if self._logits_processors is not None:
            processors += self._logits_processors(request)
        return processors

    def _finished(self, sequence: Sequence, reason: str) -> Finished:
        return Finished(
            request_id=sequence.request.request_id,
            finish_reason=reason,
            prompt_tokens=len(sequence.prompt),
            completion_tokens=sequence.completion_tokens,
            cached_tokens=sequence.cached_tokens,
            cached_tokens_disk=min(sequence.cached_tokens, sequence.restored_tokens),
            reasoning_tokens=sequence.reasoning_tokens,
            stop_sequence=sequence.stops.matched,
            drafted_tokens=sequence.drafted_tokens,
            accepted_tokens=sequence.accepted_tokens,
        )

    def progress(self, limit: int = 64) -> list[dict[str, Any]]:
        """Where each request stands, for the worker's heartbeat (the first ``limit``, in arrival
        order): its state, its prompt's tokens in its KV cache so far (cached + prefilled), those
        that came from the prefix cache (and of those, from its disk tier), its output so far.
        On the engine thread; reads the generator's prefill batch, changes nothing."""
        prompt_batch = getattr(self._generator, "_prompt_batch", None)
        in_cache: dict[int, int] = {}  # uid -> tokens in its cache, for the prompts being prefilled
        if prompt_batch is not None:
            in_cache = {uid: len(tokens) for uid, tokens in zip(prompt_batch.uids, prompt_batch.tokens, strict=False)}
        generation_batch = getattr(self._generator, "_generation_batch", None)
        decoding = set(getattr(generation_batch, "uids", ()))
        rows: list[dict[str, Any]] = []
        for request_id, sequence in self._by_request.items():
            if len(rows) >= limit:
                break
            uid, prompt_tokens = sequence.uid, len(sequence.prompt)
            if request_id in self._restoring:
                state, prefilled = "restoring", 0
            elif uid is not None and uid in in_cache:
                state, prefilled = "prefilling", min(in_cache[uid], prompt_tokens)
            elif uid is not None and (uid in decoding or sequence.completion_tokens > 0):
                state, prefilled = "decoding", prompt_tokens
            else:  # waiting for a slot, or in the generator's queue
                state, prefilled = "queued", 0
            rows.append({
                "request_id": request_id,
                "state": state,
                "prompt_tokens": prompt_tokens,
                "prefilled_tokens": prefilled,
                "cached_tokens": sequence.cached_tokens,
                "cached_tokens_disk": min(sequence.cached_tokens, sequence.restored_tokens),
                "completion_tokens": sequence.completion_tokens,
                "drafted_tokens": sequence.drafted_tokens,
                "accepted_tokens": sequence.accepted_tokens,
            })
        return rows

    def _new_generator(self) -> BatchGenerator:
        batch, prefill_batch = self.max_sequences, min(self.max_sequences, 8)
        if not self._prefill_chunk and self.kv_bits is not None:
            return KVQuantizedBatchGenerator(self.loaded.model, kv_bits=self.kv_bits, kv_group_size=self.kv_group_size,
                                             completion_batch_size=batch, prefill_batch_size=prefill_batch,
                                             prefill_step_size=UNCHUNKED_PREFILL_STEP)
        if not self._prefill_chunk:  # 0: mlx-lm's own prefill scheduling, as before chunking
            return BatchGenerator(self.loaded.model, completion_batch_size=batch, prefill_batch_size=prefill_batch,
                                  prefill_step_size=UNCHUNKED_PREFILL_STEP)
        self.speculator = (Speculator(self.max_draft, always=self.speculative == "always",
                                      draft_model=self._draft())
                           if self.speculative != "off" else None)
        return ChunkedBatchGenerator(self.loaded.model, prefill_chunk=self._prefill_chunk, sizer=self._chunk_sizer,
                                     peek_prefix=self._peek_prefix, fetch_prefix=self._fetch_prefix,
                                     prompt_done=self._prompts_prefilled, kv_bits=self.kv_bits,
                                     kv_group_size=self.kv_group_size, speculator=self.speculator,
                                     completion_batch_size=batch, prefill_batch_size=prefill_batch)


def vocab_size(tokenizer: Any) -> int:
    """Every token id the tokenizer can decode, added (special) tokens included."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    return len(inner)


def _merge_delta(deltas: dict[str, Delta], delta: Delta) -> None:
    """Add one token's delta to its request's delta of this step, in order."""
    earlier = deltas.get(delta.request_id)
    if earlier is None:
        deltas[delta.request_id] = delta
        return
    earlier.text += delta.text
    earlier.reasoning += delta.reasoning
    earlier.tool_calls += delta.tool_calls
    earlier.token_count += delta.token_count


class _UntrimmedBPEDetokenizer(BPEStreamingDetokenizer):
    def _maybe_trim_space(self, current_text: str) -> str:
        return current_text
