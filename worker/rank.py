"""One rank of a sharded worker, from ``worker --distributed …`` under ``mlx.launch`` to serving.

Every rank joins the group, checks it can find the model (rank 0 names each rank that cannot),
loads its share and builds the same ``GroupEngine`` (worker/sharded.py). Rank 0 then runs the
worker loop as a single worker does (worker/core.py); the other ranks follow its broadcasts.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from protocol.logs import configure as configure_logging
from protocol.security import CurveClient
from protocol.transport import check_address, default_address
from worker.config import WorkerConfig
from worker.distributed import EXIT_STARTUP_FAILED, Group, GroupFailed, describe_rank, fatal, in_launched_group

# Modules that import mlx-lm (and transformers) are imported once the group is joined: every rank
# must join within --group-timeout of the others, and those imports take seconds (1 s quiet,
# 10-15 s on a busy 2-core machine), so a rank that imported them faster gave up on a slower one.

log = logging.getLogger("worker")


def run_rank(args: argparse.Namespace, make_logits_processors: Callable | None = None) -> int:
    """Run one rank of a sharded worker (cli.main hands over here with ``--distributed``)."""
    if not in_launched_group():
        log.error("--distributed runs one rank of a group: start every rank with mlx.launch "
                  "(e.g. mlx.launch --hostfile hosts.json -- worker --distributed tensor …); see deploy/README.md")
        return EXIT_STARTUP_FAILED
    group = Group.join(args.group_timeout)
    rank, size = group.rank, group.size
    configure_logging("worker" if rank == 0 else f"worker-rank{rank}", args.log_level, args.log_format)
    if size < 2:
        log.error("--distributed needs a group of at least 2 ranks: start it with mlx.launch "
                  "(e.g. mlx.launch --hostfile hosts.json -- worker --distributed tensor …); see deploy/README.md")
        return EXIT_STARTUP_FAILED
    log.info("%s of %d, pid %d on %s", describe_rank(rank), size, os.getpid(), socket.gethostname())
    from worker.core import Worker, build_engine
    from worker.gguf import ModelLoadError
    from worker.models import load, resolve
    from worker.sharded import GroupEngine

    # Every rank finds its model files first, and rank 0 reports each rank's problem by rank.
    problem = ""
    try:
        resolve(args.model)
    except (ModelLoadError, ValueError, OSError) as exc:
        problem = str(exc)
    statuses = _gather(group, not problem, problem)
    if not all(ok for ok, _ in statuses):
        for other, (ok, message) in enumerate(statuses):
            if not ok:
                log.error("%s cannot serve %s: %s", describe_rank(other), args.model, message)
        return EXIT_STARTUP_FAILED

    operator = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None}
    try:
        loaded = load(args.model, args.served_name, args.context_length, operator,
                      loader=_sharded_loader(group, args.distributed))
    except ModelLoadError as exc:
        fatal(f"{describe_rank(rank)}: {exc}")
    log.info("%s holds its share of %s (%s parallel over %d ranks)", describe_rank(rank), loaded.name,
             args.distributed, size)

    config = WorkerConfig.from_args(args)
    processors = make_logits_processors(loaded) if make_logits_processors else None
    group_engine = partial(GroupEngine, group=group)

    if rank == 0:
        curve = None
        if args.curve_secret_key and args.curve_server_key:
            curve = CurveClient.load(args.curve_secret_key, args.curve_server_key)
        address = check_address(args.gateway or default_address())
        worker = Worker(build_engine(loaded, config, processors, group_engine), address, config, curve)

        def drain() -> None:  # the launcher is gone (a supervisor stopped mlx.launch): drain, then stop all
            if worker.drain_deadline is None:
                log.info("draining (up to %.0fs), then stopping the group", worker.drain_timeout)
                worker.drain_deadline = time.monotonic() + worker.drain_timeout

        group.watchdog.on_orphaned = drain
        return worker.run()

    # The other ranks stop when rank 0 says so (it drains first), when the group breaks, or when
    # their launcher is gone; a SIGTERM of their own (a supervisor stopping the process group)
    # waits for rank 0's word.
    signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: stopping when rank 0 does"))
    signal.signal(signal.SIGINT, lambda *_: log.info("SIGINT: stopping when rank 0 does"))
    engine = cast(GroupEngine, build_engine(loaded, config, processors, group_engine))
    return engine.follow()


def _gather(group: Group, ok: bool, message: str) -> list[tuple[bool, str]]:
    try:
        return group.gather_status(ok, message)
    except GroupFailed as exc:
        fatal(f"{describe_rank(group.rank)}: lost the group while starting ({exc})")


def _sharded_loader(group: Group, mode: str) -> Callable[[str], tuple[Any, Any, dict[str, Any]]]:
    def load_share(location: str) -> tuple[Any, Any, dict[str, Any]]:
        from mlx_lm.utils import sharded_load

        # Not under the watchdog: a large model takes minutes to read. A rank that fails to load
        # exits, and the others' closing all_sum in sharded_load then fails.
        groups = {"pipeline_group" if mode == "pipeline" else "tensor_group": group.group}
        return cast(tuple[Any, Any, dict[str, Any]], sharded_load(location, return_config=True, **groups))

    return load_share
