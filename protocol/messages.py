"""The messages the gateway and the workers exchange, as plain dataclasses.

Every message is one ZeroMQ frame holding a msgpack map: ``{"v": PROTOCOL_VERSION,
"t": <message type>, ...fields}``. See ``protocol/README.md`` for the lifecycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

PROTOCOL_VERSION = 5


# --- worker -> gateway -------------------------------------------------------------


@dataclass
class Ready:
    """A worker announces itself (on start, and again when the gateway seems to be gone)."""

    TYPE: ClassVar[str] = "ready"
    worker_id: str
    model: str
    protocol_version: int
    max_sequences: int
    context_length: int
    pid: int
    # What the gateway tells clients about the model (Codex's model catalog, /v1/workers):
    tool_calls: bool = False  # the worker knows the model's tool-call format (calls come out parsed)
    thinking: bool = False  # the chat template has a thinking switch (enable_thinking)
    vision: bool = False  # the model sees images: Generate.messages may carry image parts
    # What the worker serves: "text" (Generate) or "embedding" (Embed); an embedding worker also
    # says its vectors' size and whether `dimensions` may shorten them (a Matryoshka-trained model).
    kind: str = "text"
    embedding_size: int = 0
    matryoshka: bool = False


@dataclass
class Accepted:
    """The worker tokenized a request and it fits: it will run (now or after those queued)."""

    TYPE: ClassVar[str] = "accepted"
    request_id: str
    prompt_tokens: int


@dataclass
class ToolCall:
    """A complete tool call the worker parsed from the model's output."""

    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class Delta:
    """New output of one request in one engine step, already split by kind."""

    request_id: str
    text: str = ""  # visible content
    reasoning: str = ""  # thinking-block text
    tool_calls: list[ToolCall] = field(default_factory=list)
    token_count: int = 0


@dataclass
class Output:
    """Everything one engine step produced, for all the requests it advanced."""

    TYPE: ClassVar[str] = "output"
    deltas: list[Delta] = field(default_factory=list)


@dataclass
class Finished:
    """A request ended normally; its last text came in an earlier Output."""

    TYPE: ClassVar[str] = "finished"
    request_id: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache, both tiers
    reasoning_tokens: int = 0
    stop_sequence: str | None = None  # the client's stop string that ended it, if one did
    cached_tokens_disk: int = 0  # of cached_tokens, those restored from the disk tier (--prompt-cache-dir)
    drafted_tokens: int = 0  # speculative decoding: tokens drafted for it, and of those, accepted
    accepted_tokens: int = 0


@dataclass
class Error:
    """A request failed (request_id set) or the whole worker did (request_id None)."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    request_id: str | None = None
    # context_length_exceeded: the numbers, for APIs whose clients read them (Claude Code compacts
    # by the gap in Anthropic's "prompt is too long: N tokens > M maximum").
    prompt_tokens: int | None = None
    context_length: int | None = None


@dataclass
class Embeddings:
    """An Embed's vectors: ``len(inputs)`` vectors of ``dimensions`` little-endian float32s each,
    one after another in ``vectors``, in the order of the inputs."""

    TYPE: ClassVar[str] = "embeddings"
    request_id: str
    dimensions: int
    vectors: bytes
    prompt_tokens: int  # tokens of all the inputs together, as the model read them
    truncated: int = 0  # inputs cut to the model's window (Embed.truncate)


# --- both ways ---------------------------------------------------------------------


@dataclass
class Heartbeat:
    """Liveness, about once a second each way. A worker's also carries its load."""

    TYPE: ClassVar[str] = "heartbeat"
    sender: str
    active: int = 0
    queued: int = 0
    stats: dict[str, Any] = field(default_factory=dict)  # a worker's engine figures, for /metrics


# --- gateway -> worker -------------------------------------------------------------


@dataclass
class SamplingParams:
    """What the client asked for; None means the worker's default for its model."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    # OpenAI's additive penalties (-2..2) on tokens already seen; None or 0: off
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


@dataclass
class Generate:
    """Start one request. Exactly one of ``messages`` (chat) or ``prompt`` (raw text) is set."""

    TYPE: ClassVar[str] = "generate"
    request_id: str
    max_tokens: int | None = None  # None: the worker's --max-output-tokens cap, within the context window
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    tools: list[dict[str, Any]] | None = None  # chat-template tool definitions
    tool_choice: str = "auto"  # "auto" | "required" (the gateway resolves "none" and named tools)
    parallel_tool_calls: bool = True  # False: at most one call (where a grammar constrains calls)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    prompt_cache_key: str | None = None  # the client's conversation id: a prefix-cache hint
    # Whose prefix cache this request may read and add to: the gateway's hash of the caller's API
    # key ("" with no keys: one shared scope). A prompt never hits another scope's entries.
    cache_scope: str = ""
    trace_id: str | None = None  # the id the gateway logs this request under (x-request-id)
    count_only: bool = False  # only count the prompt's tokens: Accepted, then Finished; nothing runs
    # Structured output: the whole reply must match (protocol/README.md, "Constraints"):
    # {"type": "json_schema", "schema": {...}} | {"type": "json_object"} | {"type": "regex", "pattern": "..."}
    # | {"type": "lark", "grammar": "..."}; None: free text. Tools marked "strict" are constrained too.
    constraint: dict[str, Any] | None = None
    speculative: bool = True  # False: no speculative decoding for this request (the worker's --speculate decides otherwise)


@dataclass
class Embed:
    """Embed inputs (an embedding worker's request): exactly one of ``texts`` or ``tokens`` is
    set. Answered with Embeddings, or an Error (``context_length_exceeded`` for an input over the
    model's window unless ``truncate``, ``invalid_request`` for a ``dimensions`` it cannot give)."""

    TYPE: ClassVar[str] = "embed"
    request_id: str
    texts: list[str] | None = None
    tokens: list[list[int]] | None = None
    dimensions: int | None = None  # None: the model's own size; else truncated and renormalised
    truncate: bool = False  # an input over the window is cut to it (its end dropped), not refused
    trace_id: str | None = None


@dataclass
class Cancel:
    """Stop a request; the worker frees its slot at the next engine step."""

    TYPE: ClassVar[str] = "cancel"
    request_id: str


Message = Ready | Accepted | Output | Finished | Error | Heartbeat | Generate | Cancel | Embed | Embeddings

MESSAGE_TYPES: dict[str, type] = {
    cls.TYPE: cls for cls in (Ready, Accepted, Output, Finished, Error, Heartbeat, Generate, Cancel, Embed,
                              Embeddings)
}

# The codes a worker sends in Error; gateway/errors.py maps each to every API's error (and
# holds the codes the gateway itself gives, such as worker_crashed).
ERROR_INVALID_REQUEST = "invalid_request"
ERROR_CONTEXT_LENGTH = "context_length_exceeded"
ERROR_TEMPLATE = "template_error"
ERROR_INVALID_SCHEMA = "invalid_schema"  # the output constraint cannot be applied (the API's format field)
ERROR_INVALID_TOOL_SCHEMA = "invalid_tool_schema"  # a strict tool's schema cannot be applied ("tools")
ERROR_INTERNAL = "internal_error"
ERROR_SHUTTING_DOWN = "worker_shutting_down"  # request_id None: the whole worker is draining
