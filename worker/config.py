"""What a worker is told to do, as one typed object (built from the command line in cli.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from worker.prompts import DEFAULT_TEMPLATE_TIMEOUT, TemplatePolicy


@dataclass(frozen=True)
class WorkerConfig:
    max_sequences: int = 16  # sequences decoded together
    # Prompt tokens per engine step, all prompts together (--prefill-chunk; worker/batching.py): None,
    # auto (sized from measured step times); 0, mlx-lm's own prefill scheduling.
    prefill_chunk: int | None = None
    prompt_cache_mb: int = 1024  # KV cache kept for later prompts with the same prefix (0: off)
    # The prefix cache's disk tier (worker/disk_cache.py): entries leaving RAM are written under
    # prompt_cache_dir (None: off), at most prompt_cache_disk_mb; on stop, RAM entries are written
    # for up to prompt_cache_save_timeout seconds.
    prompt_cache_dir: str | None = None
    prompt_cache_disk_mb: float = 8192
    prompt_cache_save_timeout: float = 10.0
    memory_limit_gb: float | None = None  # MLX memory limit
    cache_limit_gb: float | None = None  # MLX buffer cache limit
    wired_limit_gb: float | None = None  # Metal wired-memory limit
    heartbeat_interval: float = 1.0  # seconds between heartbeats
    drain_timeout: float = 30.0  # on SIGTERM, seconds to finish running requests
    stall_timeout: float = 300.0  # exit if one engine step hangs this long
    # Output tokens for a request that sets no max_tokens (None: up to the context window). A
    # small model may never end its turn: SmolLM2 uncapped looped to its whole 8k context, and a
    # client that waited for the end timed out after 300 s. A request's own max_tokens is clamped to it.
    max_output_tokens: int | None = 8192
    # Chat template rendering (worker/prompts.py): a request's own template
    # (chat_template_kwargs.chat_template) is refused unless allowed, and any render is stopped
    # after template_timeout seconds (the request fails; the prompt-builder thread goes on).
    allow_client_templates: bool = False
    template_timeout: float = DEFAULT_TEMPLATE_TIMEOUT
    # Quantized KV caches for running sequences (--kv-bits, --kv-group-size; worker/quantized_cache.py):
    # None keeps them unquantized.
    kv_bits: int | None = None
    kv_group_size: int = 64
    # Speculative decoding (--speculative, --max-draft; worker/speculative.py): "auto", "always" or "off".
    speculative: str = "auto"
    max_draft: int = 8

    def template_policy(self) -> TemplatePolicy:
        return TemplatePolicy(self.allow_client_templates, self.template_timeout)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WorkerConfig:
        return cls(
            max_sequences=args.max_sequences,
            prefill_chunk=args.prefill_chunk,
            prompt_cache_mb=args.prompt_cache_mb,
            prompt_cache_dir=getattr(args, "prompt_cache_dir", None),
            prompt_cache_disk_mb=getattr(args, "prompt_cache_disk_mb", 8192),
            memory_limit_gb=args.memory_limit,
            cache_limit_gb=args.cache_limit,
            wired_limit_gb=args.wired_limit,
            heartbeat_interval=args.heartbeat_interval,
            drain_timeout=args.drain_timeout,
            stall_timeout=args.stall_timeout,
            max_output_tokens=args.max_output_tokens or None,
            allow_client_templates=args.allow_client_templates,
            template_timeout=args.template_timeout,
            kv_bits=getattr(args, "kv_bits", None),
            kv_group_size=getattr(args, "kv_group_size", 64),
            speculative=getattr(args, "speculative", "auto"),
            max_draft=getattr(args, "max_draft", 8),
        )
