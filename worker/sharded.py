"""One model across several machines: ``mlx.launch … worker --distributed tensor …``.

Every rank loads its share of the model (mlx-lm's ``sharded_load``: tensor parallelism through
the model's ``shard``). Rank 0 alone is a worker as the gateway knows it: it holds the ZeroMQ
link, registers one worker (the group's context length and capacity), builds prompts and
answers requests. The other ranks follow. Before each engine step rank 0 broadcasts the step's
work (``GroupEngine.step``): the requests it queued since the last step (the Generate and its
prompt's token ids) and the ones it cancelled, plus a digest of the previous step's output.
Every rank then applies the same changes to the same ``Engine`` and runs the same
``BatchGenerator`` step, whose model collectives keep them in lockstep; the tokens every rank
continues with are rank 0's (``Group.from_rank0`` inside each sampler). A rank whose output
digest differs from rank 0's has diverged, and the group stops.

Faults: a rank that dies makes the others' next collective fail ("connection to a peer was
lost"); one that hangs leaves them waiting, and the watchdog (``--group-timeout``) ends them.
Either way every rank exits at once, with no answer of its own to any request: the gateway sees
rank 0's connection close and fails or retries its requests as for any crashed worker, and the
supervisor restarts ``mlx.launch``, which starts the whole group again.

Each rank starts in ``worker/rank.py``; ``worker/distributed.py`` holds the group itself.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import Any, cast

import msgpack

from protocol.codec import decode, encode
from protocol.messages import ERROR_INTERNAL, Accepted, Error, Finished, Generate
from worker.distributed import Group, GroupFailed, describe_rank, fatal
from worker.engine import Engine, Sequence, StepResult

log = logging.getLogger("worker")

TICK_SECONDS = 1.0  # an idle rank 0 still broadcasts this often, so the others know it lives
# The first broadcast also waits for every rank to build its engine after loading (seconds).
FIRST_BROADCAST_TIMEOUT = 300.0


class GroupEngine(Engine):
    """The same Engine on every rank; rank 0's calls are recorded and replayed on the others."""

    speculates = False  # each rank would decide its own drafts by its own clock: the ranks would part

    # Every rank must take the same steps; chunks sized from each rank's own timings would not be.
    timed_chunks = False

    def __init__(self, *args: Any, group: Group, **kwargs: Any):
        self.group = group
        self._samplers: dict[tuple[Any, ...], Any] = {}
        self._ops: list[list[Any]] = []  # rank 0: changes since the last step, for the others
        self._given: dict[str, list[int]] = {}  # other ranks: prompts as rank 0 built them
        self._digest = 0  # of the last step's output
        self._next_tick = 0.0
        self._first = True
        super().__init__(*args, **kwargs)
        # The engine's settings (batch size, prefill chunk, cache budget, output cap, …): rank 0
        # sends its own with the first broadcast, and a rank built otherwise refuses to start.
        settings = sorted((k, v) for k, v in vars(self).items() if isinstance(v, (bool, int, float, str, type(None))))
        # The cache budget lives in the prefix cache, not among the scalars above.
        settings.append(("prefix_cache_bytes", self.prefix_cache.budget_bytes if self.prefix_cache is not None else 0))
        self._settings = zlib.crc32(repr(settings).encode())

    # Rank 0: what the worker does to the engine is recorded for the others.

    def enqueue(self, sequence: Sequence) -> Accepted | Error:
        reply = super().enqueue(sequence)
        if self.group.leader and isinstance(reply, Accepted):
            self._ops.append(["enqueue", encode(sequence.request), list(sequence.prompt)])
        return reply

    def cancel(self, request_id: str) -> Finished | None:
        finished = super().cancel(request_id)
        if self.group.leader and finished is not None:
            self._ops.append(["cancel", request_id])
        return finished

    @property
    def busy(self) -> bool:
        # An idle rank 0 still steps now and then: the broadcast tells the others it lives.
        return super().busy or (self.group.leader and time.monotonic() >= self._next_tick)

    def step(self) -> StepResult:
        """Rank 0: broadcast this step's work, then step with everyone."""
        work = {"ops": self._ops, "digest": self._digest, **({"settings": self._settings} if self._first else {})}
        payload = msgpack.packb(work, use_bin_type=True)
        self._ops = []
        try:
            self.group.broadcast(payload, "a step's broadcast", self._first_timeout())
        except GroupFailed as exc:
            fatal(f"{describe_rank(self.group.rank)}: lost the group ({exc})")
        self._next_tick = time.monotonic() + TICK_SECONDS
        return self.local_step()

    def cancel_all(self, code: str, message: str) -> list[Error]:
        """Shutting down (rank 0): fail what runs, and tell the other ranks to stop too."""
        errors = super().cancel_all(code, message)
        self._ops.append(["stop"])
        payload = msgpack.packb({"ops": self._ops, "digest": self._digest}, use_bin_type=True)
        try:
            self.group.broadcast(payload, "the stop broadcast")
        except GroupFailed as exc:
            log.warning("could not tell the other ranks to stop: %s", exc)
        return errors

    # Every rank.

    def _first_timeout(self) -> float | None:
        first, self._first = self._first, False
        return max(FIRST_BROADCAST_TIMEOUT, self.group.watchdog.timeout) if first else None

    def local_step(self) -> StepResult:
        """This rank's engine step (its collectives meet the other ranks')."""
        with self.group.watchdog.guard("an engine step"):
            result = super().step()
        failed = [e for e in result.errors if e.code == ERROR_INTERNAL]
        if failed:
            # The engine failed the batch and would serve on with a fresh generator; in a group
            # that would leave the ranks apart (and a peer lost is the usual cause): stop all.
            fatal(f"{describe_rank(self.group.rank)}: the engine step failed ({failed[0].message})")
        self._digest = _digest(result)
        return result

    def _sampler(self, request: Generate) -> Any:
        """Rank 0's token on every rank. One sampler per distinct setting, so that a batch whose
        requests sample alike makes one batched call (and one collective) per step."""
        asked, default = request.sampling, self.loaded.sampling
        key = tuple(default[n] if getattr(asked, n) is None else getattr(asked, n)
                    for n in ("temperature", "top_p", "min_p", "top_k"))
        sampler = self._samplers.get(key)
        if sampler is None:
            inner, group = super()._sampler(request), self.group

            def sampler(logprobs: Any) -> Any:
                import mlx.core as mx

                if group.leader:
                    tokens = inner(logprobs)
                else:  # zeros, but computed from the logits: after the model's collectives
                    tokens = mx.argmax(logprobs, axis=-1) * 0
                return group.from_rank0(tokens)

            if len(self._samplers) >= 64:  # clients' settings vary without bound; a batch needs few
                self._samplers.clear()
            self._samplers[key] = sampler
        return sampler

    def _prompt(self, request: Generate, forced_tool_call: bool) -> list[int] | Error:
        given = self._given.pop(request.request_id, None)  # the other ranks do not tokenize
        return given if given is not None else super()._prompt(request, forced_tool_call)

    # The other ranks.

    def follow(self) -> int:
        """Apply rank 0's broadcasts and step with it, until it says stop."""
        group = self.group
        while True:
            try:
                payload = group.broadcast(None, "waiting for rank 0", self._first_timeout())
            except GroupFailed as exc:
                fatal(f"{describe_rank(group.rank)}: lost the group ({exc})")
            work = msgpack.unpackb(payload, raw=False)
            if work.get("settings", self._settings) != self._settings:
                fatal(f"{describe_rank(group.rank)}: its engine's settings differ from rank 0's "
                      "(the same worker flags and version on every rank?)")
            if work["digest"] != self._digest:
                fatal(f"{describe_rank(group.rank)}: its output differs from rank 0's: the ranks diverged")
            for op in work["ops"]:
                if op[0] == "stop":
                    log.info("rank 0 stopped: stopping")
                    return 0
                if op[0] == "cancel":
                    super().cancel(op[1])
                elif op[0] == "enqueue":
                    self._replay_enqueue(cast(Generate, decode(op[1])), op[2])
            self.local_step()

    def _replay_enqueue(self, request: Generate, prompt: list[int]) -> None:
        self._given[request.request_id] = prompt
        sequence = self.prepare(request)
        self._given.pop(request.request_id, None)
        if not isinstance(sequence, Sequence) or sequence.prompt != prompt:
            reason = sequence.message if isinstance(sequence, Error) else "a different prompt"
            fatal(f"{describe_rank(self.group.rank)}: rank 0 queued {request.request_id}, which here gave {reason}")
        super().enqueue(sequence)


def _digest(result: StepResult) -> int:
    """What a step produced, in a number every rank can compare with rank 0's."""
    parts: list[Any] = [[d.request_id, d.text, d.reasoning, [(c.name, c.arguments) for c in d.tool_calls]]
                        for d in result.deltas]
    parts += [[f.request_id, f.finish_reason, f.completion_tokens] for f in result.finished]
    return zlib.crc32(msgpack.packb(parts, use_bin_type=True))
