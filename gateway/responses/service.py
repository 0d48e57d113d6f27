"""Running a response: from a validated request to events, a stored result, and background runs.

``prepare`` does everything that can fail with a 4xx before any generation (model lookup,
``previous_response_id``, item references, input and tool validation) and returns a ``Run``.
``events(run)`` then drives the worker and yields the Responses events; the route streams
them, drains them for a JSON reply, or ``start_background`` drains them in a task that GET
and cancel can see.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.api import images
from gateway.api.errors import APIError
from gateway.api.family import RESPONSES
from gateway.api.generation import event_batches
from gateway.api.request import ModelRequest, to_generate
from gateway.engine.client import EngineClient, RequestStream
from gateway.responses import compaction
from gateway.responses.compaction_item import carried_history
from gateway.responses.convert import item_type, normalize_input, to_request
from gateway.responses.events import Event, ResponseEvents
from gateway.responses.objects import ResponseState
from gateway.responses.request import ResponsesRequest
from gateway.responses.store import INTERRUPTED, ResponseStore, StoredResponse
from gateway.responses.tools import resolve_tools
from protocol import Finished

log = logging.getLogger(__name__)


@dataclass
class Run:
    state: ResponseState
    request: ModelRequest
    input_items: list[dict[str, Any]]
    context: list[dict[str, Any]]  # everything the model sees before its output
    builder: ResponseEvents
    trace_id: str | None = None  # the id its logs go under (the client's x-request-id, if any)
    owner: str = ""  # who may see it: a hash of the API key that made it ("" with no keys)
    task: asyncio.Task | None = None  # background runs only
    events: list[Event] = field(default_factory=list)  # background runs keep theirs for streaming GETs
    stream: RequestStream | None = None  # submitted already (constrained runs: see ResponsesService.prepare)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def remembered(self) -> StoredResponse | None:
        """What a WebSocket connection keeps for ``previous_response_id``: a response that
        ended well, whether or not it was stored."""
        if self.state.status not in ("completed", "incomplete"):
            return None
        return StoredResponse(self.state.to_dict(), self.input_items, self.context, self.owner)


class ResponsesService:
    def __init__(self, engine: EngineClient, store: ResponseStore):
        self.engine = engine
        self.store = store
        self._background: dict[str, Run] = {}
        self._closing = False
        # Told of each compaction: (model, outcome, seconds); the metrics count and time them.
        self.on_compaction: Callable[[str, str, float], None] | None = None

    async def prepare(self, body: ResponsesRequest, response_id: str, trace_id: str | None = None,
                      local: StoredResponse | None = None, owner: str = "") -> Run:
        """``trace_id``: the id this request is logged under (the client's x-request-id, if any);
        ``local``: a response kept outside the store (a WebSocket connection's last one, which
        ``previous_response_id`` may name even with ``store: false``); ``owner``: the caller
        (``middleware.owner_of``), who sees only what it stored itself."""
        self.engine.admit(body.model)  # again when it runs; checked here to answer with a 4xx
        if body.background and body.store is False:
            raise APIError(400, "background responses must be stored (store: true)", param="background")
        for unsupported in ("conversation", "prompt"):
            # Server-side conversation objects and stored prompt templates live at OpenAI; failing
            # loudly beats answering without the context the client thinks it sent.
            if getattr(body, unsupported, None):
                raise APIError(400, f"'{unsupported}' is not supported by this server; send the items in "
                               "'input' or use previous_response_id", param=unsupported)
        earlier: list[dict[str, Any]] = []
        if body.previous_response_id:
            if local is not None and local.response["id"] == body.previous_response_id:
                previous: StoredResponse | None = local
            else:
                previous = await self.store.get(body.previous_response_id, owner)
            if previous is None:
                raise APIError(400, f"Previous response with id '{body.previous_response_id}' not found.",
                               param="previous_response_id", code="previous_response_not_found")
            earlier = carried_history(previous.context, previous.response.get("output", []))
        items = await self._resolve_references(await images.convert(normalize_input, body.input), owner)
        context = earlier + items
        _check_tool_outputs(context, len(earlier))
        tools = resolve_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
        request = to_request(body, context, tools)
        state = ResponseState(response_id, body, status="queued")
        builder: ResponseEvents
        compacting = compaction.summary_run(items, context, request, body, state)
        if compacting is not None:  # the answer is one compaction item: see compaction.py
            request, builder = compacting
        else:
            builder = ResponseEvents(state, tools, "reasoning.encrypted_content" in (body.include or []))
        run = Run(state, request, items, context, builder, trace_id, owner)
        if request.constraint is not None or request.strict_tools or any(m.images for m in request.messages):
            # A schema the worker cannot apply (or images for a text-only model) is a 400 even for a
            # stream, whose first event would otherwise go out before the worker has seen the request.
            run.stream = await self._submit(run)
        return run

    async def _submit(self, run: Run) -> RequestStream:
        generate = to_generate(run.request, run.state.id, run.trace_id, cache_scope=run.owner)
        return await self.engine.submit(run.request.model, generate, run.request.keep_alive)

    async def _resolve_references(self, items: list[dict[str, Any]], owner: str) -> list[dict[str, Any]]:
        resolved = []
        for index, item in enumerate(items):
            if item_type(item) == "item_reference":
                found = await self.store.get_item(str(item.get("id")), owner)
                if found is None:
                    raise APIError(400, f"Item with id '{item.get('id')}' not found.", param=f"input[{index}]")
                item = found
            resolved.append(item)
        return resolved

    async def events(self, run: Run) -> AsyncGenerator[list[Event], None]:
        """Generate, yielding the events in batches (what one wake-up produced, so a transport
        can write them at once); store the result when it ends (not if abandoned)."""
        if run.state.request.generate is False:
            # Codex's WebSocket prewarm: the response exists (to continue from), nothing runs.
            yield run.builder.start()
            yield run.builder.finish(Finished(run.state.id, "stop", 0, 0))
            await self._save(run)
            return
        batches = event_batches(run.builder, RESPONSES, run.stream or self._submit(run))
        started = time.monotonic()
        try:
            async for batch in batches:
                yield batch
        finally:
            await batches.aclose()
            if isinstance(run.builder, compaction.CompactionEvents):
                self._compacted(run, time.monotonic() - started)
        await self._save(run)

    def _compacted(self, run: Run, seconds: float) -> None:
        """A compaction can take minutes (a long prefill on a large model): each is logged and metered."""
        state = run.state
        usage = state.usage or {}
        log.info("compaction %s: %s in %.1f s (%s prompt tokens, %s cached, %s summary tokens)", state.id, state.status,
                 seconds, usage.get("input_tokens", "?"), (usage.get("input_tokens_details") or {}).get("cached_tokens", "?"),
                 usage.get("output_tokens", "?"))
        if self.on_compaction is not None:
            self.on_compaction(state.request.model, state.status, seconds)

    async def _save(self, run: Run) -> None:
        if run.state.request.store is False:
            return
        try:
            await self.store.put(StoredResponse(run.state.to_dict(), run.input_items, run.context, run.owner))
        except Exception:  # a full disk must not turn a finished answer into an error
            log.exception("could not store response %s", run.state.id)

    # --- background ---------------------------------------------------------------------

    async def start_background(self, run: Run) -> None:
        """Run it in a task that GET and cancel can see. It is stored (queued) before the client
        hears of it, so a gateway that dies meanwhile leaves a failed response, not a 404
        (``store.fail_interrupted`` at the next start)."""
        await self._save(run)
        self._background[run.state.id] = run
        run.task = asyncio.create_task(self._drain(run), name=f"background-{run.state.id}")

    async def _drain(self, run: Run) -> None:
        try:
            async for events in self.events(run):
                run.events.extend(events)
                run.changed.set()
        except asyncio.CancelledError:
            if self._closing:  # not the client's doing: the gateway is stopping
                run.events.extend(run.builder.fail_with(INTERRUPTED["code"], INTERRUPTED["message"]))
            else:
                run.builder.cancel()
            await self._save(run)
        finally:
            run.changed.set()
            self._background.pop(run.state.id, None)

    async def follow(self, run: Run, after: int = -1) -> AsyncGenerator[list[Event], None]:
        """A background run's events with ``sequence_number > after``, live until it ends."""
        position = after + 1
        while True:
            if position < len(run.events):
                yield run.events[position:]
                position = len(run.events)
            if run.task is None or run.task.done():
                return
            run.changed.clear()
            if position < len(run.events):
                continue
            await run.changed.wait()

    def background_run(self, response_id: str, owner: str = "") -> Run | None:
        run = self._background.get(response_id)
        return run if run is not None and run.owner == owner else None

    async def cancel(self, response_id: str, owner: str = "") -> dict[str, Any]:
        run = self.background_run(response_id, owner)
        if run is not None and run.task is not None:
            run.task.cancel()
            await asyncio.gather(run.task, return_exceptions=True)
            return run.state.to_dict()
        stored = await self.store.get(response_id, owner)
        if stored is None:
            raise response_not_found(response_id)
        if not stored.response.get("background"):
            raise APIError(400, "Only background responses can be cancelled.", param="response_id")
        return stored.response  # already finished: nothing to cancel

    async def retrieve(self, response_id: str, owner: str = "") -> dict[str, Any]:
        run = self.background_run(response_id, owner)
        if run is not None:
            return run.state.to_dict()
        stored = await self.store.get(response_id, owner)
        if stored is None:
            raise response_not_found(response_id)
        return stored.response

    async def start(self) -> None:
        """Background runs the last gateway process lost are failed, and say so."""
        lost = await self.store.fail_interrupted()
        if lost:
            log.warning("%d background responses were running when the gateway last stopped: marked failed", lost)

    async def close(self) -> None:
        self._closing = True
        tasks = [run.task for run in self._background.values() if run.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _check_tool_outputs(context: list[dict[str, Any]], first_input: int) -> None:
    """Every tool output answers a call made earlier in the conversation (this input, or the
    ``previous_response_id`` chain), as OpenAI requires: an output for a call that does not
    exist is a client's bug, not something to show the model. A compaction item hides the calls
    it summarised, so a conversation holding one is taken as it is."""
    if any(item_type(item) == "compaction" for item in context):
        return
    calls: set[str] = set()
    for index, item in enumerate(context):
        kind = item_type(item)
        if kind in ("function_call", "custom_tool_call"):
            calls.add(item["call_id"])
        elif kind in ("function_call_output", "custom_tool_call_output") and item["call_id"] not in calls:
            raise APIError(400, f"No tool call found for function call output with call_id {item['call_id']}.",
                           param=f"input[{index - first_input}]" if index >= first_input else "input")


def response_not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param="response_id", code="not_found")
