"""``worker --model X``: load one model and serve it to the gateway over ZeroMQ."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocol.logs import configure as configure_logging
from protocol.security import CurveClient
from protocol.transport import check_address, default_address
from worker.blas import enable_fast_blas
from worker.prompts import DEFAULT_TEMPLATE_TIMEOUT

# Modules that import mlx (worker.models, worker.core) are imported inside main(), once
# enable_fast_blas() has chosen the BLAS.

log = logging.getLogger("worker")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="worker", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m",
                        help="model directory, Hugging Face repo id, .gguf file, or built-in name (default: smollm2-135m)")
    parser.add_argument("--gateway", default=None, help=f"gateway ZeroMQ address (default: {default_address()})")
    parser.add_argument("--served-name", default=None, help="model name clients use (default: derived from --model)")
    parser.add_argument("--max-sequences", type=int, default=16, help="sequences decoded together (default: 16)")
    parser.add_argument("--context-length", type=int, default=None, help="override the model's context window")
    parser.add_argument("--max-output-tokens", type=int, default=8192, metavar="N",
                        help="output tokens for a request that sets no max_tokens (it ends with finish_reason "
                             "'length'); a small model may otherwise never stop until its context is full "
                             "(0: no cap but the context; default 8192)")
    parser.add_argument("--prefill-chunk", "--prefill-step-size", dest="prefill_chunk", type=_parse_prefill_chunk,
                        default=None, metavar="auto|N",
                        help="prompt tokens per engine step, all waiting prompts together: a running stream waits "
                             "at most one chunk between two tokens while a long prompt is prefilled. auto (the "
                             "default): each chunk takes about 40 decode steps, sized from measured step times; "
                             "N: a fixed chunk; 0: mlx-lm's own prefill, 512 tokens of every waiting prompt per step")
    parser.add_argument("--prompt-cache-mb", type=int, default=1024,
                        help="KV cache kept for reuse by later prompts with the same prefix (0: off; default 1024)")
    parser.add_argument("--kv-bits", type=int, default=None, choices=(2, 3, 4, 5, 6, 8), metavar="8|4",
                        help="quantize the running sequences' KV caches (and the prefix cache's entries) to this many "
                             "bits: 8 holds a token in about half the memory, 4 in about a quarter, with attention "
                             "on the quantized cache (default: unquantized)")
    parser.add_argument("--kv-group-size", type=int, default=64, choices=(32, 64, 128),
                        help="with --kv-bits: values sharing one scale and bias (the head dimension must divide by "
                             "it; default 64)")
    parser.add_argument("--speculative", default="auto", choices=["auto", "always", "off"],
                        help="speculative decoding with prompt-lookup drafts, verified in the batch's forward pass: "
                             "auto (a step is widened when its measured cost pays; default), always, or off")
    parser.add_argument("--draft-model", default=None, metavar="MODEL",
                        help="draft with this smaller model (same tokenizer) instead of prompt lookup")
    parser.add_argument("--max-draft", type=int, default=8, metavar="N",
                        help="tokens drafted per sequence per step, at most (default: 8)")
    parser.add_argument("--prompt-cache-dir", default=None, metavar="DIR",
                        help="a disk tier for the prefix cache: entries leaving RAM (evicted, or the worker stopping) "
                             "are written here and restored by later prompts with the same prefix, also after a "
                             "restart; one subdirectory per model fingerprint, files 0600 (default: off)")
    parser.add_argument("--prompt-cache-disk-mb", type=float, default=8192, metavar="MB",
                        help="with --prompt-cache-dir: the most it holds, least recently used out first (default 8192)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="default temperature when a request sets none (default: the model's, else 1.0)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="default top_p when a request sets none (default: the model's, else 1.0)")
    parser.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                        help="Linux CPU only: OpenBLAS threads (default: one per core); when several workers "
                             "share a CPU, split its cores between them")
    parser.add_argument("--memory-limit", type=float, default=None, metavar="GB",
                        help="MLX memory limit: past it this worker's allocations fail, not the machine's")
    parser.add_argument("--cache-limit", type=float, default=None, metavar="GB",
                        help="MLX buffer cache limit (freed buffers kept for reuse)")
    parser.add_argument("--wired-limit", type=float, default=None, metavar="GB",
                        help="Metal wired-memory limit for this worker (default: mlx-lm's recommended size; "
                             "with several workers, split the machine's limit between them)")
    parser.add_argument("--allow-client-templates", action="store_true",
                        help="render a chat template a request sends (chat_template_kwargs.chat_template); off "
                             "by default, when such a request fails with a 400. A client's template runs on the "
                             "worker (sandboxed Jinja, bounded by --template-timeout, but free to use its memory): "
                             "allow it only for clients you trust")
    parser.add_argument("--template-timeout", type=float, default=DEFAULT_TEMPLATE_TIMEOUT, metavar="SECONDS",
                        help="seconds one chat template render may take, the model's template or a client's; "
                             "past it the request fails with a 400 and other requests go on (default: "
                             f"{DEFAULT_TEMPLATE_TIMEOUT:g})")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds to finish running requests before failing them (default: 30)")
    parser.add_argument("--stall-timeout", type=float, default=300.0,
                        help="exit (for the supervisor to restart us) if one engine step hangs this long")
    parser.add_argument("--curve-secret-key", type=Path, default=None, metavar="FILE",
                        help="this worker's CURVE key pair (.key_secret), for a tcp:// gateway on another machine")
    parser.add_argument("--curve-server-key", type=Path, default=None, metavar="FILE",
                        help="the gateway's CURVE public key (.key)")
    parser.add_argument("--distributed", default=None, choices=["tensor", "pipeline"],
                        help="one model across the ranks mlx.launch started (one per Mac): each loads its share, "
                             "rank 0 alone talks to the gateway (see deploy/README.md)")
    parser.add_argument("--group-timeout", type=float, default=60.0, metavar="S",
                        help="with --distributed: stop the whole group when a rank gives no answer this long "
                             "(hung, or its network is; default: 60)")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="exit when the process that started this worker exits (the gateway starts workers of "
                             "on-demand models this way, so none outlives it)")
    parser.add_argument("--embedding", action="store_true",
                        help="serve the model for POST /v1/embeddings (mlx-embeddings: BERT, XLM-RoBERTa, ModernBERT, "
                             "Qwen3-Embedding, EmbeddingGemma) instead of text generation; implied for a model "
                             "directory of an encoder-only type (bert, xlm-roberta, modernbert)")
    parser.add_argument("--max-batch-tokens", type=int, default=8192, metavar="N",
                        help="embedding worker: padded tokens (rows x longest row) in one forward pass; requests "
                             "waiting together are batched up to it (default 8192)")
    parser.add_argument("--matryoshka", default="auto", choices=["auto", "on", "off"],
                        help="embedding worker: whether a request's `dimensions` may shorten the vectors (truncated "
                             "and renormalised, right only for Matryoshka-trained models); auto: on for Qwen3-Embedding "
                             "and EmbeddingGemma, off otherwise (default auto)")
    parser.add_argument("--vision", action="store_true",
                        help="serve a vision-language model (mlx-vlm; images in): implied for a model directory "
                             "whose config.json has a vision_config (see worker/vision.py)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    return parser.parse_args(argv)


def _parse_prefill_chunk(text: str) -> int | None:
    """``auto`` (None: sized as the worker runs) or a token count."""
    return None if text == "auto" else int(text)


def main(argv: list[str] | None = None, make_logits_processors: Callable | None = None) -> int:
    """Run a worker. ``make_logits_processors(loaded_model)`` is a hook for tests that script output."""
    args = parse_args(argv)
    configure_logging("worker", args.log_level, args.log_format)
    if args.max_output_tokens < 0:
        log.error("--max-output-tokens must be 0 (no cap) or more")
        return 2
    if args.prefill_chunk is not None and args.prefill_chunk < 0:
        log.error("--prefill-chunk must be 0 (mlx-lm's own prefill) or more")
        return 2
    if not 1 <= args.max_draft <= 64:
        log.error("--max-draft must be between 1 and 64")
        return 2
    if not 0 < args.template_timeout < float("inf"):
        log.error("--template-timeout must be a number of seconds more than 0")
        return 2
    if args.cpu_threads is not None and args.cpu_threads < 1:
        log.error("--cpu-threads must be at least 1")
        return 2
    if args.exit_with_parent:
        _exit_with_parent()
    log.info("BLAS: %s", enable_fast_blas(args.cpu_threads))
    if args.embedding or _is_embedding_model(args.model):
        return _run_embedding_worker(args)
    vision = args.vision or _is_vision_model(args.model)
    if vision and args.distributed:
        log.error("--distributed serves text models only")
        return 2
    if args.distributed:  # one rank of a sharded worker
        from worker.rank import run_rank

        return run_rank(args, make_logits_processors)
    from worker.gguf import ModelLoadError
    from worker.models import load

    try:
        address, curve = _gateway_link(args)
        operator = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None}
        loaded = (_load_vision if vision else load)(args.model, args.served_name, args.context_length, operator)
    except (ModelLoadError, ValueError, PermissionError) as exc:
        log.error("%s", exc)
        return 2
    from worker.config import WorkerConfig
    from worker.core import Worker, build_engine

    config = WorkerConfig.from_args(args)
    processors = make_logits_processors(loaded) if make_logits_processors else None
    try:
        draft = _load_draft(args.draft_model, loaded) if args.draft_model else None
        engine = build_engine(loaded, config, processors, **_vision_engine(vision), draft=draft)
    except (ValueError, ModelLoadError) as exc:  # e.g. --kv-bits on a model whose heads cannot be grouped so
        log.error("%s", exc)
        return 2
    if config.prompt_cache_dir:
        from worker.disk_cache import open_disk_cache

        disk = open_disk_cache(config.prompt_cache_dir, args.model, loaded, config.prompt_cache_disk_mb,
                               getattr(engine, "kv_bits", None), getattr(engine, "kv_group_size", None))
        if disk is not None:
            engine.attach_disk_cache(disk)
    worker = Worker(engine, address, config, curve)
    worker.ready.vision = vision  # Ready says the model sees images (the gateway's model catalog)
    return worker.run()


def _load_draft(spec: str, target: Any) -> Any:
    """``--draft-model``: loaded as any model; its tokenizer must be the target's (drafts are token ids)."""
    from worker.models import load

    draft = load(spec, None, None, {})
    if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise ValueError(f"--draft-model {spec}: its tokenizer is not {target.name}'s (drafts are token ids)")
    return draft


def _is_vision_model(spec: str) -> bool:
    from worker.vision import is_vision_model

    return is_vision_model(spec)


def _load_vision(*args: Any) -> Any:
    from worker.vision import load_vision

    return load_vision(*args)


def _vision_engine(vision: bool) -> dict[str, Any]:
    """``build_engine``'s engine type for a vision worker (worker/vision.py)."""
    if not vision:
        return {}
    from worker.vision import VisionEngine

    return {"engine_type": VisionEngine}


def _is_embedding_model(spec: str) -> bool:
    from worker.embeddings import is_embedding_model

    return is_embedding_model(spec)


def _gateway_link(args: argparse.Namespace) -> tuple[str, CurveClient | None]:
    """The gateway's address and, with both key files, the CURVE keys (ValueError, PermissionError)."""
    address = check_address(args.gateway or default_address())
    if not (args.curve_secret_key or args.curve_server_key):
        return address, None
    if not (args.curve_secret_key and args.curve_server_key):
        raise ValueError("CURVE needs both --curve-secret-key and --curve-server-key")
    return address, CurveClient.load(args.curve_secret_key, args.curve_server_key)


def _run_embedding_worker(args: argparse.Namespace) -> int:
    """``--embedding`` (or an encoder-only model): the embedding worker, worker/embeddings.py."""
    from worker.embeddings import run_embedding_worker

    try:
        address, curve = _gateway_link(args)
    except (ValueError, PermissionError) as exc:
        log.error("%s", exc)
        return 2
    if args.distributed:
        log.error("--distributed serves text models only")
        return 2
    return run_embedding_worker(args, address, curve)


def _exit_with_parent() -> None:
    """Exit (also mid-load) once the parent is gone: the gateway that started this worker died,
    and a new one starts its own. Polling the parent's pid works on macOS and Linux alike."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        log.warning("the gateway that started this worker (pid %d) is gone: exiting", parent)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
