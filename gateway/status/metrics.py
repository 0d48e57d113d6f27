"""Prometheus metrics for ``GET /metrics``: the gateway's own, and every worker's engine figures.

Counters and histograms are updated as requests are served (the engine client reports token
timings through ``GatewayMetrics`` as its observer). Gauges (live workers, queues, the store,
each worker's batch, throughput and memory from its last heartbeat) are read when scraped, so
a worker that is gone leaves no stale series behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.engine.client import EngineClient
from gateway.models.manager import ModelManager, ModelState
from gateway.status.snapshot import Activity

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mlxgw_requests", "HTTP requests served", ["route", "model", "status"],
                                registry=self.registry)
        self.time_to_first_token = Histogram("mlxgw_time_to_first_token_seconds",
                                             "From dispatch to the first output", ["model"],
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("mlxgw_inter_token_latency_seconds",
                                             "Between consecutive output tokens of a request", ["model"],
                                             buckets=TOKEN_BUCKETS, registry=self.registry)
        self.output_tokens = Counter("mlxgw_output_tokens", "Tokens generated", ["model"], registry=self.registry)
        self.worker_restarts = Counter("mlxgw_worker_restarts", "Workers that registered after one of the same "
                                       "model was lost", ["model"], registry=self.registry)
        self.worker_losses = Counter("mlxgw_worker_losses", "Workers declared gone", ["model", "reason"],
                                     registry=self.registry)
        self.compactions = Counter("mlxgw_compactions", "Conversations compacted (/responses/compact and "
                                   "compaction_trigger), by outcome", ["model", "outcome"], registry=self.registry)
        self.compaction_seconds = Histogram("mlxgw_compaction_seconds", "How long a compaction took, start to item",
                                            ["model"], buckets=LATENCY_BUCKETS + (300, 600), registry=self.registry)
        self.model_loads = Counter("mlxgw_model_loads", "On-demand model loads, by outcome (loaded, failed)",
                                   ["model", "outcome"], registry=self.registry)
        self.model_load_seconds = Histogram("mlxgw_model_load_seconds", "How long a model load took (waiting for "
                                            "room included)", ["model"], buckets=LATENCY_BUCKETS + (300, 600),
                                            registry=self.registry)
        self.model_unloads = Counter("mlxgw_model_unloads", "On-demand models unloaded, by reason (idle, keep_alive, "
                                     "making room, over the budget, requested, exited)", ["model", "reason"],
                                     registry=self.registry)
        self.activity = Activity()  # throughput history and recent failures, for the status page
        self._lost: dict[str, int] = {}  # model -> losses not yet made up by a new registration
        self._token_metrics: dict[str, tuple] = {}

    def attach(self, engine: EngineClient, stored_responses: Callable[[], int]) -> None:
        """Read when scraped: the engine's state, and how many responses the store holds."""
        self.registry.register(_LiveState(engine, stored_responses))

    def watch_models(self, models: ModelManager) -> None:
        """Read when scraped: each listed model's state and memory, and the budget."""
        self.registry.register(_ModelState(models))

    def model_loaded(self, model: str, outcome: str, seconds: float) -> None:
        self.model_loads.labels(model, outcome).inc()
        if outcome == "loaded":
            self.model_load_seconds.labels(model).observe(seconds)

    def model_unloaded(self, model: str, reason: str) -> None:
        self.model_unloads.labels(model, reason).inc()

    def count_request(self, route: str, model: str, status: str) -> None:
        self.requests.labels(route, model, status).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- the engine client's observer interface ---------------------------------------

    def first_token(self, model: str, seconds: float) -> None:
        self.time_to_first_token.labels(model).observe(seconds)

    def tokens(self, model: str, count: int, seconds_since_previous: float | None) -> None:
        # Once per token: the labelled children are looked up once per model.
        children = self._token_metrics.get(model)
        if children is None:
            children = self._token_metrics[model] = (self.output_tokens.labels(model),
                                                     self.inter_token_latency.labels(model))
        children[0].inc(count)
        self.activity.tokens(count)
        # One observation per gap between two tokens, as the client sees them: tokens that come in
        # one delta (several per step with speculative decoding) arrive together.
        gaps = [seconds_since_previous] if seconds_since_previous is not None and count else []
        for seconds in gaps + [0.0] * max(count - 1, 0):
            children[1].observe(seconds)

    def compaction(self, model: str, outcome: str, seconds: float) -> None:
        self.compactions.labels(model, outcome).inc()
        self.compaction_seconds.labels(model).observe(seconds)

    def request_failed(self, model: str, request_id: str, code: str, message: str) -> None:
        self.activity.failed(model, request_id, code, message)

    def worker_registered(self, model: str) -> None:
        if self._lost.get(model, 0) > 0:
            self._lost[model] -= 1
            self.worker_restarts.labels(model).inc()

    def worker_lost(self, model: str, reason: str) -> None:
        self._lost[model] = self._lost.get(model, 0) + 1
        self.worker_losses.labels(model, reason).inc()


class _LiveState(Collector):
    def __init__(self, engine: EngineClient, stored_responses: Callable[[], int]):
        self._engine = engine
        self._stored_responses = stored_responses

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine = self._engine
        workers = engine.registry.all()
        models = sorted({w.model for w in workers} | engine.models_with_requests())
        live = GaugeMetricFamily("mlxgw_live_workers", "Workers taking requests", labels=["model"])
        in_flight = GaugeMetricFamily("mlxgw_in_flight_requests", "Requests running or queued", labels=["model"])
        queued = GaugeMetricFamily("mlxgw_queue_depth", "Requests waiting for a slot or a worker", labels=["model"])
        for model in models:
            mine = [w for w in workers if w.model == model]
            live.add_metric([model], sum(1 for w in mine if w.serving))
            in_flight.add_metric([model], engine.load(model))
            queued.add_metric([model], sum(w.queued for w in mine) + engine.waiting_for_worker(model))
        yield from (live, in_flight, queued)
        yield GaugeMetricFamily("mlxgw_stored_responses", "Responses in the store", value=self._stored_responses())

        per_worker = {
            "batch_size": ("mlxgw_worker_batch_size", "Sequences the worker is decoding"),
            "tokens_per_second": ("mlxgw_worker_tokens_per_second", "Output tokens/s over the last heartbeat"),
            "generated_tokens": ("mlxgw_worker_generated_tokens", "Tokens generated since the worker started"),
            "prompt_tokens": ("mlxgw_worker_prompt_tokens", "Prompt tokens accepted since the worker started"),
            "cached_tokens": ("mlxgw_worker_cached_prompt_tokens", "Prompt tokens served from the prefix cache"),
            "cached_tokens_ram": ("mlxgw_worker_cached_prompt_tokens_ram", "Prompt tokens served from the prefix cache in RAM"),
            "cached_tokens_disk": ("mlxgw_worker_cached_prompt_tokens_disk",
                                   "Prompt tokens restored from the prefix cache's disk tier (--prompt-cache-dir)"),
            "drafted_tokens": ("mlxgw_worker_drafted_tokens", "Tokens drafted by speculative decoding (finished requests)"),
            "accepted_tokens": ("mlxgw_worker_accepted_tokens",
                                "Drafted tokens the model accepted (finished requests); over drafted: the acceptance rate"),
            "disk_cache_bytes": ("mlxgw_worker_disk_cache_bytes", "Bytes in the prefix cache's disk tier"),
            "disk_cache_entries": ("mlxgw_worker_disk_cache_entries", "Entries in the prefix cache's disk tier"),
            "disk_cache_writes": ("mlxgw_worker_disk_cache_writes", "Prefix-cache entries written to disk since start"),
            "disk_cache_restores": ("mlxgw_worker_disk_cache_restores", "Prefix-cache entries restored from disk since start"),
            "active_memory_bytes": ("mlxgw_worker_active_memory_bytes", "MLX memory in use"),
            "cache_memory_bytes": ("mlxgw_worker_cache_memory_bytes", "MLX buffer cache (freed, kept for reuse)"),
            "peak_memory_bytes": ("mlxgw_worker_peak_memory_bytes", "MLX peak memory"),
        }
        families = {key: GaugeMetricFamily(name, doc, labels=["model", "worker"])
                    for key, (name, doc) in per_worker.items()}
        for worker in workers:
            stats = {**worker.stats, "batch_size": worker.active}
            for key, family in families.items():
                if key in stats:
                    family.add_metric([worker.model, worker.worker_id], float(stats[key]))
        yield from families.values()


class _ModelState(Collector):
    def __init__(self, models: ModelManager):
        self._models = models

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states = GaugeMetricFamily("mlxgw_model_state", "1 for each listed model's current state",
                                   labels=["model", "state"])
        memory = GaugeMetricFamily("mlxgw_model_memory_bytes", "Memory a listed model's workers report",
                                   labels=["model"])
        for name, view in self._models.states().items():
            for state in ModelState:
                states.add_metric([name, state.value], 1.0 if view["state"] == state.value else 0.0)
            memory.add_metric([name], float(view["memory_bytes"]))
        yield from (states, memory)
        yield GaugeMetricFamily("mlxgw_memory_budget_bytes", "Memory the models may hold together (--memory-budget)",
                                value=float(self._models.budget))
        yield GaugeMetricFamily("mlxgw_memory_used_bytes", "Memory the workers report, plus loads in progress",
                                value=float(self._models.used_bytes()))
