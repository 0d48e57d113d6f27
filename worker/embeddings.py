"""An embedding worker (``worker --model X --embedding``): one embedding model, served to the
gateway's ``/v1/embeddings`` over the same link and protocol as a text worker.

The model is loaded with mlx-embeddings (PyPI ``mlx-embeddings``: BERT, XLM-RoBERTa,
ModernBERT, Qwen3-Embedding, EmbeddingGemma, ...), which pools each sequence's hidden states
the model's way (mean over the tokens for BERT, the last token for Qwen3) and L2-normalises
them. The loop here batches across requests: every Embed waiting when the model is free goes
through it together, its inputs sorted by length and cut into padded forward passes of at
most ``max_batch_tokens`` (rows x longest row), each with an attention mask, so padding never
changes a vector. ``Generate`` is answered with a clear ``invalid_request``: this model cannot chat.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocol.messages import (
    ERROR_CONTEXT_LENGTH,
    ERROR_INTERNAL,
    ERROR_INVALID_REQUEST,
    ERROR_SHUTTING_DOWN,
    PROTOCOL_VERSION,
    Cancel,
    Embed,
    Embeddings,
    Error,
    Generate,
    Ready,
)
from protocol.security import CurveClient

log = logging.getLogger("worker")

# Model types mlx-embeddings loads that are encoders only: a model of one of these types is an
# embedding model whether or not --embedding is given. (Decoder-based embedding models, such as
# Qwen3-Embedding, share a model type with chat models: they need --embedding.)
ENCODER_TYPES = frozenset({"bert", "xlm-roberta", "xlm_roberta", "modernbert"})
# Model types trained with Matryoshka representation learning, so that a prefix of a vector is
# itself an embedding: `dimensions` may shorten theirs (--matryoshka auto). Qwen3-Embedding and
# EmbeddingGemma are; a BERT sentence-transformer (all-MiniLM-L6-v2, bge) is not.
MATRYOSHKA_TYPES = frozenset({"qwen3", "gemma3_text"})
# Position-embedding tables that start after a padding offset (RoBERTa's family): two fewer tokens fit.
_OFFSET_POSITIONS = frozenset({"xlm-roberta", "xlm_roberta", "roberta"})


class EmbeddingLoadError(Exception):
    """The model could not be loaded as an embedding model (the worker exits with status 2)."""


def model_type(spec: str) -> str | None:
    """The ``model_type`` of a local model directory's config.json (None: not a local model)."""
    try:
        config = json.loads((Path(spec).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    kind = config.get("model_type") if isinstance(config, dict) else None
    return kind if isinstance(kind, str) else None


def is_embedding_model(spec: str) -> bool:
    """A local model directory holding an encoder-only model: the worker serves it for embeddings."""
    return model_type(spec) in ENCODER_TYPES


class EmbeddingModel:
    """An mlx-embeddings model and its tokenizer: token lists in, unit vectors out."""

    def __init__(self, model: Any, tokenizer: Any, config: dict[str, Any], name: str,
                 context_length: int | None = None, matryoshka: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer  # a Hugging Face tokenizer
        self.name = name
        self.model_type = str(config.get("model_type", ""))
        window = int(config.get("max_position_embeddings") or 512)
        if self.model_type in _OFFSET_POSITIONS:
            window -= 2
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < window:
            window = limit
        self.context_length = context_length or window
        self.matryoshka = self.model_type in MATRYOSHKA_TYPES if matryoshka is None else matryoshka
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad) if isinstance(pad, int) else 0
        self.vocab_size = int(config.get("vocab_size") or len(tokenizer))  # rows of the embedding table
        self.prefix, self.suffix = _special_tokens(tokenizer)
        probe = self.embed([[*self.prefix, *self.suffix] or [self.pad_token_id]])
        self.size = int(probe.shape[1])

    @classmethod
    def load(cls, spec: str, served_name: str | None = None, context_length: int | None = None,
             matryoshka: bool | None = None) -> EmbeddingModel:
        """``spec``: a model directory (config.json, safetensors, tokenizer files), or a Hugging Face
        repo id that mlx-embeddings downloads (to the Hugging Face cache)."""
        import mlx.core as mx
        from mlx_embeddings.utils import load as load_embedding_model

        path = Path(spec).expanduser()
        if path.exists() and not (path / "config.json").is_file():
            raise EmbeddingLoadError(f"{path} is not a model directory (no config.json)")
        log.info("loading embedding model %s", spec)
        try:
            model, wrapper = load_embedding_model(str(path) if path.exists() else spec)
        except Exception as exc:
            raise EmbeddingLoadError(f"cannot load {spec!r} as an embedding model: {type(exc).__name__}: {exc}") from None
        tokenizer = getattr(wrapper, "_tokenizer", wrapper)
        if not callable(getattr(tokenizer, "encode", None)):
            raise EmbeddingLoadError(f"{spec!r} has no text tokenizer (a vision model?): not an embedding model here")
        config = model.config
        raw: dict[str, Any] = dict(vars(config)) if not isinstance(config, dict) else dict(config)
        if path.exists():
            raw.update(json.loads((path / "config.json").read_text()))
        if mx.default_device() == mx.cpu:
            # float32 on the CPU: half-precision matmuls there are slow (quantized layers stay as they are)
            model.set_dtype(mx.float32)
        mx.eval(model.parameters())
        name = served_name or (path.name if path.exists() else spec)
        return cls(model, tokenizer, raw, name, context_length, matryoshka)

    # --- tokens -----------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """The text's tokens without the model's special tokens (``wrap`` adds them)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def wrap(self, tokens: list[int], truncate: bool) -> tuple[list[int], bool]:
        """The tokens the model reads for one input (its special tokens around them), cut to the
        window if ``truncate`` (its end dropped); and whether it was cut."""
        room = self.context_length - len(self.prefix) - len(self.suffix)
        cut = truncate and len(tokens) > room
        if cut:
            tokens = tokens[:max(room, 0)]
        return [*self.prefix, *tokens, *self.suffix], cut

    # --- vectors ----------------------------------------------------------------------

    def embed(self, inputs: list[list[int]], max_batch_tokens: int = 8192,
              on_batch: Callable[[], None] | None = None) -> np.ndarray:
        """One unit vector per input (float32, shape ``(len(inputs), size)``). Inputs are sorted by
        length and run in padded batches of at most ``max_batch_tokens`` (rows x longest row);
        ``on_batch()`` after each (the worker's stall watchdog sees progress)."""
        import mlx.core as mx

        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        out: list[np.ndarray | None] = [None] * len(inputs)
        start = 0
        while start < len(order):
            end = start + 1
            # sorted by length: the batch's longest row is its last one
            while end < len(order) and (end + 1 - start) * len(inputs[order[end]]) <= max_batch_tokens:
                end += 1
            rows = [inputs[i] for i in order[start:end]]
            width = max(len(r) for r in rows)
            ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int32)
            mask = np.zeros((len(rows), width), dtype=np.int32)
            for row, tokens in enumerate(rows):
                ids[row, :len(tokens)] = tokens
                mask[row, :len(tokens)] = 1
            vectors = self.model(mx.array(ids), attention_mask=mx.array(mask)).text_embeds
            result = np.array(vectors.astype(mx.float32))
            for row, index in enumerate(order[start:end]):
                out[index] = result[row]
            start = end
            if on_batch is not None:
                on_batch()
        return np.stack([v for v in out if v is not None]).astype(np.float32)


def shorten(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka: the first ``dimensions`` components of each vector, L2-normalised again."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    head = vectors[:, :dimensions]
    norms = np.maximum(np.linalg.norm(head, axis=1, keepdims=True), 1e-12)
    return (head / norms).astype(np.float32)


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The tokens the tokenizer puts before and after a text ([CLS] and [SEP] for BERT, maybe none
    for a decoder), found by encoding a probe with and without them."""
    probe = "hello"
    bare = list(tokenizer.encode(probe, add_special_tokens=False))
    full = list(tokenizer.encode(probe, add_special_tokens=True))
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []


# --- the worker ---------------------------------------------------------------------


@dataclass
class _Pending:
    """An Embed waiting for the model, its inputs already tokenized as the model reads them."""

    request: Embed
    rows: list[list[int]]
    truncated: int
    received: float = field(default_factory=time.monotonic)


class EmbeddingWorker:
    """The loop: take every Embed that arrived, run them through the model together, reply."""

    def __init__(self, model: EmbeddingModel, address: str, args: argparse.Namespace,
                 curve: CurveClient | None = None):
        from worker.core import EngineStats
        from worker.link import GatewayLink

        self.model = model
        self.max_batch_tokens = max(int(args.max_batch_tokens), model.context_length)
        self.max_inputs = int(args.max_sequences)  # Ready.max_sequences: requests in one batch, for routing
        worker_id = f"{model.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ready = Ready(worker_id, model.name, PROTOCOL_VERSION, self.max_inputs, model.context_length,
                           os.getpid(), kind="embedding", embedding_size=model.size, matryoshka=model.matryoshka)
        self.stats = EngineStats()
        self.drain_timeout = float(args.drain_timeout)
        self.drain_deadline: float | None = None
        self.stop_now = False
        self._tick = time.monotonic()
        self._pending: list[_Pending] = []
        self._running = 0
        self.link = GatewayLink(address, self.ready, load=self._load, heartbeat_interval=args.heartbeat_interval,
                                stalled_for=lambda: time.monotonic() - self._tick,
                                stall_timeout=args.stall_timeout, curve=curve)

    def _touch(self) -> None:
        """Progress within a long batch: the stall watchdog measures from here."""
        self._tick = time.monotonic()

    def _load(self) -> tuple[int, int, dict[str, float]]:
        return self._running, len(self._pending), self.stats.snapshot(time.monotonic())

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.drain_deadline is None:
            log.info("received %s: draining", signal.Signals(signum).name)
            self.drain_deadline = time.monotonic() + self.drain_timeout
        else:
            self.stop_now = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.link.start()
        log.info("serving embedding model %s (%d dimensions%s, window %d tokens, batches of up to %d tokens) as %s",
                 self.model.name, self.model.size, ", Matryoshka" if self.model.matryoshka else "",
                 self.model.context_length, self.max_batch_tokens, self.link.worker_id)
        announced = False
        try:
            while not self.stop_now:
                self._tick = time.monotonic()
                self.stats.sample_memory(self._tick)
                if self.drain_deadline is not None:
                    if not announced:
                        self.link.send(Error(ERROR_SHUTTING_DOWN, "draining before shutdown"))
                        announced = True
                    if not self._pending or time.monotonic() > self.drain_deadline:
                        break
                self._drain_inbox(block=not self._pending)
                if self._pending:
                    self._run_batch()
        finally:
            for pending in self._pending:
                self.link.send(Error(ERROR_SHUTTING_DOWN, "the worker is shutting down", pending.request.request_id))
            self._pending.clear()
            self.link.close()
            log.info("stopped")
        return 0

    def _drain_inbox(self, block: bool) -> None:
        inbox = self.link.inbox
        try:
            message = inbox.get(timeout=0.2) if block else inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(message)
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, message: object) -> None:
        if isinstance(message, Embed):
            if self.drain_deadline is not None:
                self.link.send(Error(ERROR_SHUTTING_DOWN, "this worker is shutting down", message.request_id))
                return
            try:
                outcome = self._prepare(message)
            except Exception as exc:  # a bug of ours, or a tokenizer that cannot take this text
                log.exception("tokenizing an embedding request failed")
                outcome = Error(ERROR_INTERNAL, f"could not tokenize the input: {exc}", message.request_id)
            if isinstance(outcome, Error):
                log.warning("refused (%s): %s", outcome.code, outcome.message,
                            extra={"request_id": message.trace_id or message.request_id})
                self.link.send(outcome)
            else:
                self._pending.append(outcome)
        elif isinstance(message, Generate):
            self.link.send(Error(ERROR_INVALID_REQUEST,
                                 f"'{self.model.name}' is an embedding model: it serves POST /v1/embeddings only, "
                                 "not chat, completions, responses or messages", message.request_id))
        elif isinstance(message, Cancel):  # its client left: drop it if it has not run yet
            self._pending = [p for p in self._pending if p.request.request_id != message.request_id]

    def _prepare(self, request: Embed) -> _Pending | Error:
        model = self.model
        if request.dimensions is not None:
            if request.dimensions < 1 or request.dimensions > model.size:
                return Error(ERROR_INVALID_REQUEST, f"dimensions must be between 1 and {model.size} for "
                                                    f"'{model.name}'", request.request_id)
            if request.dimensions != model.size and not model.matryoshka:
                return Error(ERROR_INVALID_REQUEST, f"'{model.name}' does not support dimensions: its vectors "
                                                    f"have {model.size} dimensions", request.request_id)
        if request.texts is not None:
            bodies = [model.tokenize(text) for text in request.texts]
        else:
            bodies = [list(tokens) for tokens in request.tokens or []]
        if not bodies:
            return Error(ERROR_INVALID_REQUEST, "input must not be empty", request.request_id)
        limit = model.vocab_size
        rows, truncated = [], 0
        for index, body in enumerate(bodies):
            if any(not 0 <= t < limit for t in body):
                return Error(ERROR_INVALID_REQUEST, f"input[{index}] has a token id outside the model's "
                                                    f"vocabulary (0 to {limit - 1})", request.request_id)
            row, cut = model.wrap(body, request.truncate)
            if not row:
                return Error(ERROR_INVALID_REQUEST, f"input[{index}] has no tokens", request.request_id)
            if len(row) > model.context_length:
                return Error(ERROR_CONTEXT_LENGTH,
                             f"input[{index}] has {len(row)} tokens, more than the model's window of "
                             f"{model.context_length} tokens (send \"truncate\": true to cut it to the window)",
                             request.request_id, prompt_tokens=len(row), context_length=model.context_length)
            rows.append(row)
            truncated += cut
        return _Pending(request, rows, truncated)

    def _run_batch(self) -> None:
        """Every request waiting now, through the model together."""
        batch, self._pending = self._pending, []
        self._running = len(batch)
        started = time.monotonic()
        rows = [row for pending in batch for row in pending.rows]
        try:
            vectors = self.model.embed(rows, self.max_batch_tokens, on_batch=self._touch)
        except Exception as exc:
            log.exception("an embedding batch failed")
            for pending in batch:
                self.link.send(Error(ERROR_INTERNAL, f"the embedding model failed: {exc}", pending.request.request_id))
            self._running = 0
            return
        seconds = time.monotonic() - started
        offset = 0
        for pending in batch:
            request = pending.request
            own = shorten(vectors[offset:offset + len(pending.rows)], request.dimensions)
            offset += len(pending.rows)
            tokens = sum(len(row) for row in pending.rows)
            self.stats.prompt_tokens += tokens
            self.link.send(Embeddings(request.request_id, int(own.shape[1]), own.astype("<f4").tobytes(), tokens,
                                      pending.truncated))
            log.info("embedded %d inputs (%d tokens) in %.3fs, in a batch of %d requests", len(pending.rows), tokens,
                     time.monotonic() - pending.received, len(batch),
                     extra={"request_id": request.trace_id or request.request_id})
        log.debug("batch of %d inputs in %.3fs", len(rows), seconds)
        self._running = 0


def run_embedding_worker(args: argparse.Namespace, address: str, curve: CurveClient | None) -> int:
    """Load ``args.model`` as an embedding model and serve it (``worker/cli.py``)."""
    from worker.core import apply_memory_limits

    matryoshka = {"auto": None, "on": True, "off": False}[args.matryoshka]
    try:
        model = EmbeddingModel.load(args.model, args.served_name, args.context_length, matryoshka)
    except EmbeddingLoadError as exc:
        log.error("%s", exc)
        return 2
    from worker.config import WorkerConfig

    apply_memory_limits(WorkerConfig.from_args(args))
    return EmbeddingWorker(model, address, args, curve).run()
