"""The group of a sharded worker: MLX's own distributed backend (``mlx.launch``), plus what we
add on top of it: rank 0's broadcast of each step's work, and a watchdog that stops the whole
group when a rank dies or hangs.

No tensors travel through here: the model's own collectives (mlx-lm's ``shard``) move those.
We only send a few bytes per engine step (``Group.broadcast``), and the sampled tokens of rank 0
(``Group.from_rank0``) so that every rank continues with exactly the same tokens.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

log = logging.getLogger("worker")

EXIT_GROUP_FAILED = 70  # a rank exits with this when the group broke (another rank died or hung)
EXIT_STARTUP_FAILED = 2  # as the single worker: the model or the arguments are wrong
JOINING = "joining the group"


class GroupFailed(RuntimeError):
    """A collective failed: a peer's connection was lost."""


def in_launched_group() -> bool:
    """Whether ``mlx.launch`` (or MPI) started this process as one rank of a group."""
    return any(name in os.environ for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "MLX_HOSTFILE"))


def rank_addresses() -> list[str]:
    """Each rank's ring address as mlx.launch wrote it (``MLX_HOSTFILE``), for error messages."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return []
    try:
        with open(path) as file:
            hosts = json.load(file)
    except (OSError, ValueError):
        return []
    return [",".join(h) if isinstance(h, list) else str(h) for h in hosts]


def describe_rank(rank: int) -> str:
    addresses = rank_addresses()
    where = addresses[rank] if rank < len(addresses) else socket.gethostname()
    return f"rank {rank} ({where})"


class Watchdog:
    """A thread that ends the process when the group stops answering.

    ``guard(what)`` marks the start of a collective region (a broadcast, an engine step); if it
    has not ended after ``timeout`` seconds, a rank has hung (or the network has): the process
    exits with ``EXIT_GROUP_FAILED``, mlx.launch stops the other ranks, and on rank 0 the gateway
    sees the worker's connection close. When the launcher that started rank 0 is gone (its parent
    changed: a supervisor stopped mlx.launch, which does not pass signals on), rank 0 drains and
    stops the group as on SIGTERM, so no rank outlives its launcher.
    """

    def __init__(self, rank: int, timeout: float):
        self.rank = rank
        self.timeout = timeout
        self._since: float | None = None
        self._what = ""
        self._limit = timeout
        self._parent = os.getppid()
        self._orphaned = False
        self.on_orphaned: Callable[[], None] | None = None  # rank 0: drain, as on SIGTERM
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="group-watchdog", daemon=True).start()

    def guard(self, what: str, timeout: float | None = None) -> _Guarded:
        return _Guarded(self, what, timeout or self.timeout)

    def _enter(self, what: str, timeout: float) -> None:
        with self._lock:
            self._since, self._what, self._limit = time.monotonic(), what, timeout

    def _leave(self) -> None:
        with self._lock:
            self._since = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(0.25, self.timeout / 4))
            with self._lock:
                since, what, limit = self._since, self._what, self._limit
            if since is not None and time.monotonic() - since > limit:
                why = ("a rank did not join: its host unreachable, ssh refused, or its process failed to start "
                       "(see mlx.launch's warnings)" if what == JOINING else
                       "another rank hung, or the network between the ranks did")
                fatal(f"{describe_rank(self.rank)}: no answer from the group for {limit:.0f}s during {what}: {why}")
            if os.getppid() != self._parent and not self._orphaned:
                self._orphaned = True
                if self.on_orphaned is not None:
                    log.warning("%s: the launcher that started this rank is gone", describe_rank(self.rank))
                    self.on_orphaned()


class _Guarded:
    def __init__(self, watchdog: Watchdog, what: str, timeout: float):
        self.watchdog, self.what, self.timeout = watchdog, what, timeout

    def __enter__(self) -> None:
        self.watchdog._enter(self.what, self.timeout)

    def __exit__(self, *exc: object) -> None:
        self.watchdog._leave()


def fatal(message: str) -> NoReturn:
    """The group is broken: say why and exit at once. No request gets an answer of its own: on
    rank 0 the gateway sees the connection close and fails (or retries) them as for any crash."""
    log.error("%s; the whole group stops", message)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    os._exit(EXIT_GROUP_FAILED)


class Group:
    """One rank's view of the group: rank 0 decides, the others follow."""

    def __init__(self, group: Any, watchdog: Watchdog):
        self.group = group
        self.rank: int = group.rank()
        self.size: int = group.size()
        self.watchdog = watchdog
        from mlx_lm.generate import generation_stream

        # The stream the BatchGenerator runs the model on: a step's collectives may still be in
        # flight there (it evaluates one step ahead), and ours must queue behind them in the same
        # order on every rank.
        self.stream = generation_stream

    @classmethod
    def join(cls, timeout: float) -> Group:
        """Join the group mlx.launch started (``mx.distributed.init``), under the watchdog: a rank
        that never starts (a host unreachable, ssh refused) stops the others after ``timeout``."""
        import mlx.core as mx

        rank = int(os.environ.get("MLX_RANK", "0"))
        watchdog = Watchdog(rank, timeout)
        # The ring backend connects inside init() without releasing the GIL, so the watchdog's
        # thread cannot run: faulthandler's C thread ends the process instead (exit code 1).
        log.info("%s: joining the group (exiting if a rank has not joined within %.0fs: its host "
                 "unreachable, ssh refused, or its process failed to start)", describe_rank(rank), timeout)
        faulthandler.dump_traceback_later(timeout, exit=True)
        try:
            with watchdog.guard(JOINING):
                group = mx.distributed.init(strict=True)
                mx.eval(mx.distributed.all_sum(mx.array(1), group=group, stream=mx.cpu))
        finally:
            faulthandler.cancel_dump_traceback_later()
        watchdog.rank = group.rank()
        return cls(group, watchdog)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def _all_sum(self, array: Any) -> Any:
        import mlx.core as mx

        try:
            result = mx.distributed.all_sum(array, group=self.group, stream=self.stream)
            mx.eval(result)
        except RuntimeError as exc:  # the ring backend: "connection to a peer was lost"
            raise GroupFailed(str(exc)) from None
        return result

    def broadcast(self, payload: bytes | None, what: str = "a broadcast", timeout: float | None = None) -> bytes:
        """Rank 0's ``payload`` on every rank (the others pass None): its length, then its bytes,
        each as an ``all_sum`` to which only rank 0 adds anything."""
        import mlx.core as mx
        import numpy as np

        with self.watchdog.guard(what, timeout):
            data = (payload or b"") if self.leader else b""
            length = int(self._all_sum(mx.array([len(data)], dtype=mx.int32)).item())
            if length == 0:
                return b""
            buffer = np.frombuffer(data, dtype=np.uint8) if self.leader else np.zeros(length, dtype=np.uint8)
            return bytes(np.array(self._all_sum(mx.array(buffer)), copy=False).tobytes())

    def gather_status(self, ok: bool, message: str) -> list[tuple[bool, str]]:
        """Every rank's (ok, message), on every rank: how startup failures reach rank 0's log."""
        import mlx.core as mx
        import numpy as np

        width = 1024
        encoded = (b"\x01" if ok else b"\x00") + message.encode()[: width - 1]
        row = np.zeros((self.size, width), dtype=np.uint8)
        row[self.rank, : len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
        with self.watchdog.guard("checking every rank's model"):
            table = np.array(self._all_sum(mx.array(row)), copy=False)
        statuses = []
        for line in table:
            raw = bytes(line).rstrip(b"\x00")
            statuses.append((raw[:1] == b"\x01", raw[1:].decode(errors="replace")))
        return statuses

    def from_rank0(self, tokens: Any) -> Any:
        """Rank 0's sampled tokens on every rank (lazy: it joins the step's own graph). The other
        ranks pass zeros that depend on the step's logits, so that on every rank this collective
        runs after the model's own."""
        import mlx.core as mx

        return mx.distributed.all_sum(tokens.astype(mx.int32), group=self.group).astype(mx.uint32)
