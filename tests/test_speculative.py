"""Speculative decoding (worker/speculative.py), in process, on the tiny random-weight model.

``speculative="always"`` widens every step that has drafts (the measured cost model would often
not, on a model this small), so each test exercises drafting, verification and rollback. Greedy
random-weight models loop, which prompt lookup predicts: most tests see long accepted runs and
rejections both (each checks that drafts were made and kept).
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache
from mlx_lm.sample_utils import greedy_sampler
from test_engine import GREEDY, PROMPTS, chat, run
from test_kv_quantization import kv_model, kv_model_dir  # noqa: F401 (fixtures)

import worker.holey_cache as holey_cache
import worker.quantized_attention as quantized_attention
from protocol import Accepted, Generate, SamplingParams
from worker.engine import Engine
from worker.holey_cache import HoleyBatchKVCache
from worker.speculative import PromptLookup, Sampling, Speculator, StepCost


def requests(max_tokens: int = 48, **kwargs) -> list[Generate]:
    return [chat(str(i), p, max_tokens=max_tokens, **kwargs) for i, p in enumerate(PROMPTS)]


def compare(model, reqs: list[Generate], **engine_kwargs):
    """(plain texts, speculative texts, speculative finishes), each run on a fresh engine."""
    plain, plain_done = run(Engine(model, speculative="off", **engine_kwargs), *reqs)
    fast, fast_done = run(Engine(model, speculative="always", **engine_kwargs),
                          *[Generate(**{**r.__dict__}) for r in reqs])
    assert {k: f.completion_tokens for k, f in plain_done.items()} == {k: f.completion_tokens for k, f in fast_done.items()}
    assert {k: f.finish_reason for k, f in plain_done.items()} == {k: f.finish_reason for k, f in fast_done.items()}
    return plain, fast, fast_done


def drafted_and_kept(done) -> tuple[int, int]:
    return sum(f.drafted_tokens for f in done.values()), sum(f.accepted_tokens for f in done.values())


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_output_is_identical_with_speculation(tiny_model, batch):
    plain, fast, done = compare(tiny_model, requests()[:batch])
    assert fast == plain
    drafted, kept = drafted_and_kept(done)
    assert 0 < kept < drafted, "drafts were made, some kept and some rejected"


def test_auto_probes_drafts_at_a_large_batch(tiny_model):
    # Eight rows at the CPU's prior cost: unknown drafts are not worth a wide step at first, but a
    # probe now and then learns what they are worth; the output stays the same.
    reqs = [chat(str(i), PROMPTS[i % len(PROMPTS)] + " " * i, max_tokens=80) for i in range(8)]
    plain, _ = run(Engine(tiny_model, speculative="off"), *reqs)
    fast, done = run(Engine(tiny_model, speculative="auto"), *[Generate(**{**r.__dict__}) for r in reqs])
    assert fast == plain
    assert drafted_and_kept(done)[1] > 0


def test_a_request_can_turn_speculation_off(tiny_model):
    reqs = requests()[:2]
    reqs[1].speculative = False
    _, done = run(Engine(tiny_model, speculative="always"), *reqs)
    assert done["0"].drafted_tokens > 0
    assert (done["1"].drafted_tokens, done["1"].accepted_tokens) == (0, 0)


def test_with_prefix_cache_hits_and_chunked_prefill(tiny_model):
    history = [{"role": "system", "content": "You are terse. " * 12}, {"role": "user", "content": "Hello"}]
    engine = Engine(tiny_model, speculative="always", prefill_chunk=16)
    first, _ = run(engine, Generate("a", messages=history, max_tokens=40, sampling=GREEDY))
    # The same prefix again (a cache hit, its cache stored by a speculative run), beside a long
    # prompt prefilled in 16-token chunks while the others decode.
    again = [Generate("b", messages=history, max_tokens=40, sampling=GREEDY),
             chat("long", "Tell me everything about the sea. " * 10, max_tokens=30),
             chat("short", "Hi", max_tokens=30)]
    fast, done = run(engine, *again)
    assert done["b"].cached_tokens > 0
    plain, _ = run(Engine(tiny_model, speculative="off", prefill_chunk=16),
                   *[Generate(**{**r.__dict__}) for r in again])
    assert fast == plain
    assert fast["b"] == first["a"]
    assert drafted_and_kept(done)[1] > 0


def test_max_tokens_inside_an_accepted_run(tiny_model):
    for max_tokens in range(3, 30, 3):
        plain, fast, done = compare(tiny_model, [chat("a", PROMPTS[0], max_tokens=max_tokens)])
        assert fast == plain
        assert done["a"].completion_tokens == max_tokens


def steps_of(engine: Engine, request: Generate) -> list[tuple[int, str]]:
    """(tokens, text) of each engine step that advanced ``request``."""
    assert isinstance(engine.submit(request), Accepted)
    steps = []
    while engine.busy:
        steps += [(d.token_count, d.text) for d in engine.step().deltas]
    return steps


def test_stop_string_inside_an_accepted_run(tiny_model):
    # Token by token without speculation; then where a speculative step brought several tokens,
    # a stop string that first occurs ending on the second of them.
    pieces = [text for _, text in steps_of(Engine(tiny_model, speculative="off"), chat("a", PROMPTS[2], max_tokens=60))]
    text = "".join(pieces)
    counts = [n for n, _ in steps_of(Engine(tiny_model, speculative="always"), chat("a", PROMPTS[2], max_tokens=60))]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    stops = []
    for start, n in zip(starts, counts, strict=True):
        end = len("".join(pieces[: start + 2]))
        if n < 2 or end == len("".join(pieces[: start + 1])):
            continue
        for length in range(4, end, 2):
            stop = text[end - length: end]
            if stop.strip() and text.find(stop) == end - length:
                stops.append(stop)
                break
    assert stops, "no multi-token step to stop inside"
    for stop in stops[:3]:
        steps = steps_of(Engine(tiny_model, speculative="always"), chat("b", PROMPTS[2], max_tokens=60, stop=[stop]))
        assert "".join(t for _, t in steps) == text[: text.index(stop)]
        assert steps[-1][0] >= 2, "the stop string ended a step that brought several tokens"


def test_with_a_json_schema_constraint(tiny_model):
    # Six items of two choices: repeated text that prompt lookup drafts, kept where the grammar
    # and the model agree.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tags": {
        "type": "array", "items": {"enum": ["alpha beta", "gamma"]}, "minItems": 6, "maxItems": 6}},
        "required": ["ok", "tags"], "additionalProperties": False}
    reqs = [chat(f"j{i}", p, max_tokens=60, constraint={"type": "json_schema", "schema": schema})
            for i, p in enumerate(PROMPTS[:2])]
    plain, fast, done = compare(tiny_model, reqs)
    assert fast == plain
    for text in fast.values():
        assert len(json.loads(text)["tags"]) == 6
    assert drafted_and_kept(done)[1] > 0


def test_with_penalties(tiny_model):
    reqs = requests(sampling=SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3))[:2]
    plain, fast, done = compare(tiny_model, reqs)
    assert fast == plain
    assert drafted_and_kept(done)[1] > 0


def test_with_a_processor_that_is_not_shift_invariant(tiny_model):
    # mlx-lm's repetition penalty multiplies: it must see the raw logits, as in a plain step.
    from mlx_lm.sample_utils import make_repetition_penalty

    def hook(request):
        return [make_repetition_penalty(1.05, 20)]

    plain, fast, done = compare(tiny_model, requests()[:2], logits_processors=hook)
    assert fast == plain
    assert drafted_and_kept(done)[1] > 0


def test_sampled_requests_with_processors_speculate_and_finish(tiny_model):
    sampled = SamplingParams(temperature=0.3, top_k=3, presence_penalty=0.2)
    reqs = [chat(str(i), p, max_tokens=40, sampling=sampled) for i, p in enumerate(PROMPTS)]
    _, done = run(Engine(tiny_model, speculative="always"), *reqs)
    assert all(f.completion_tokens == 40 for f in done.values())
    assert drafted_and_kept(done)[0] > 0


@pytest.mark.parametrize("chunks", [False, True])
def test_with_quantized_kv(kv_model, chunks, monkeypatch):  # noqa: F811 (the fixture)
    """Both ways of attending to a quantized cache on the CPU (worker/quantized_attention.py):
    dequantized whole (a small cache) and in chunks, whose masks carry the holes."""
    if chunks:
        monkeypatch.setattr(quantized_attention, "DEQUANTIZED_BYTES", 0)
    reqs = requests(max_tokens=40)[:3]
    plain, fast, done = compare(kv_model, reqs, kv_bits=8)
    assert fast == plain
    assert drafted_and_kept(done)[1] > 0


def test_holes_are_squeezed_out_without_changing_output(tiny_model, monkeypatch):
    monkeypatch.setattr(holey_cache, "COMPACT_AT", 3)
    plain, fast, done = compare(tiny_model, requests(max_tokens=60))
    assert fast == plain
    assert drafted_and_kept(done)[1] > 0


def test_cancel_during_speculation_leaves_the_others_unchanged(tiny_model):
    plain, _ = run(Engine(tiny_model, speculative="off"), *requests()[:3])
    engine = Engine(tiny_model, speculative="always")
    texts = {str(i): "" for i in range(3)}
    for r in requests()[:3]:
        engine.submit(r)
    steps = 0
    while engine.busy:
        result = engine.step()
        steps += 1
        for delta in result.deltas:
            texts[delta.request_id] += delta.text
        if steps == 6:
            engine.cancel("1")
    assert texts["0"] == plain["0"] and texts["2"] == plain["2"]
    assert plain["1"].startswith(texts["1"]) and texts["1"] != plain["1"]


def test_rejected_positions_leave_the_cache_exactly(tiny_model):
    """Two rows fed past what they keep: with the rest turned into holes (and then squeezed
    out), the next step's logits are those of a cache that never saw the rejected tokens."""
    model = tiny_model.model
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    fed = [[20, 21, 22, 23], [24, 25, 26, 27]]
    kept = [1, 3]  # row 0 keeps 1 of its 4, row 1 keeps 3

    def fresh(tokens: list[int]) -> list[KVCache]:
        cache = [KVCache() for _ in model.layers]
        model(mx.array([tokens]), cache=cache)
        return cache

    batch = [type(c).merge([f[i] for f in (fresh(rows[0]), fresh(rows[1]))]) for i, c in enumerate(fresh(rows[0]))]
    for c in batch:
        c.__class__ = HoleyBatchKVCache
    model(mx.array(fed), cache=batch)
    rejected = [len(f) - k for f, k in zip(fed, kept, strict=True)]
    for c in batch:
        c.trim(min(rejected))
        c.reject([r - min(rejected) for r in rejected])
    nxt = mx.array([[30], [31]])
    holey = model(nxt, cache=batch)[:, -1]
    expected = [model(nxt[i:i + 1], cache=fresh(rows[i] + fed[i][:kept[i]]))[0, -1] for i in range(2)]
    for i in range(2):
        assert mx.allclose(holey[i], expected[i], atol=1e-4).item()
    # Squeezed and extracted: the same caches as if fed only what was kept (and the next token).
    for i in range(2):
        extracted = [c.extract(i) for c in batch]
        assert extracted[0].offset == len(rows[i]) + kept[i] + 1
        after = model(mx.array([[40]]), cache=extracted)[0, -1]
        reference = model(mx.array([[40]]), cache=fresh(rows[i] + fed[i][:kept[i]] + [30 + i]))[0, -1]
        assert mx.allclose(after, reference, atol=1e-4).item()
    for c in batch:
        c.compact()
    squeezed = model(mx.array([[50], [51]]), cache=batch)[:, -1]
    for i in range(2):
        reference = model(mx.array([[50 + i]]), cache=fresh(rows[i] + fed[i][:kept[i]] + [30 + i]))[0, -1]
        assert mx.allclose(squeezed[i], reference, atol=1e-4).item()


def test_sampled_drafts_keep_the_models_distribution():
    """The accept/reject rule: a draft kept with its probability, else a token drawn without it,
    leaves each position's token distributed as the sampler's own (chi-square-like bound)."""
    mx.random.seed(7)
    logits = mx.array([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]])
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    sampling = Sampling(temperature=0.8, top_k=4)
    target = mx.softmax(sampling.logits(logprobs), axis=-1)[0].tolist()
    speculator = Speculator()
    batch = SimpleNamespace(uids=[0], samplers=[None], fallback_sampler=greedy_sampler, logits_processors=[[]])
    speculator.register(0, None, sampling)
    draws = 4000
    for draft in (0, 2, 5):  # a likely draft, an unlikely one, one top-k rules out
        counts = [0] * 6
        both = mx.concatenate([logprobs, logprobs])  # the draft's position, and one after it (unused)
        for _ in range(draws):
            judged = speculator._judge_all(batch, 0, [draft], both)
            chance, uniform, residual, _ = (a.item() if a.size == 1 else a for a in judged)
            counts[draft if uniform < chance else int(residual)] += 1
        for token, p in enumerate(target):
            assert abs(counts[token] / draws - p) < 4 * (p * (1 - p) / draws) ** 0.5 + 1e-3, (draft, token, counts)
    assert target[5] == 0.0


def test_sampled_requests_speculate_and_finish(tiny_model):
    sampled = SamplingParams(temperature=0.3, top_k=3)
    reqs = [chat(str(i), p, max_tokens=40, sampling=sampled) for i, p in enumerate(PROMPTS)]
    _, done = run(Engine(tiny_model, speculative="always"), *reqs)
    assert all(f.completion_tokens == 40 for f in done.values())
    assert drafted_and_kept(done)[1] > 0


def test_prompt_lookup_proposes_what_followed_the_latest_occurrence():
    lookup = PromptLookup()
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7]
    assert lookup.draft(tokens, 4, 3) == []  # "7 4", "6 7 4", "4 6 7 4": never seen
    tokens += [4, 1, 2]
    assert lookup.draft(tokens, 3, 3) == [4, 5, 9]  # the longest match first: "1 2 3"
    latest = PromptLookup()
    tokens = [2, 3, 4, 9, 2, 3, 5, 1, 2]
    assert latest.draft(tokens, 3, 2) == [5, 1]  # "2 3": its latest occurrence
    assert latest.draft(tokens, 3, 6) == [5, 1, 2, 3]  # up to the pending token itself


def test_the_cost_model_widens_only_when_drafts_pay():
    cost = StepCost(beta=0.06)
    assert cost.choose([(0, 0.5)] * 4) == 1
    assert cost.choose([(8, 0.9)]) > 3  # one sequence copying text: wide
    assert cost.choose([(8, 0.05)]) == 1  # drafts that miss: plain
    assert cost.choose([(8, 0.9)] + [(0, 0.5)] * 15) == 1  # one drafting row does not widen 16
    cost.plain(1, 0.01)
    cost.wide(1, 9, 0.011)  # measured: a wide step is nearly free (a GPU)
    assert cost.beta < 0.06
    cost.plain(8, 0.02)
    cost.wide(8, 3, 0.1)  # eight rows: its own measurement, not one row's
    assert cost.beta_for(8) > 0.1 and cost.beta_for(1) < 0.06 and cost.beta_for(12) == cost.beta_for(8)


# --- through the gateway -------------------------------------------------------------


def test_through_the_gateway_off_per_request_and_reported(fresh_stack, tiny_model_dir):
    import httpx
    from conftest import TINY

    fresh_stack.start_gateway()
    fresh_stack.start_worker(str(tiny_model_dir), TINY, "--speculative", "always")
    fresh_stack.wait_for_models(TINY)
    body = {"model": TINY, "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 40, "temperature": 0}

    def reply(**extra) -> httpx.Response:
        return httpx.post(f"{fresh_stack.base_url}/v1/chat/completions", json={**body, **extra}, timeout=120)

    drafted = reply()
    plain = reply(speculative=False)
    assert drafted.status_code == plain.status_code == 200, drafted.text
    assert drafted.json()["choices"][0]["message"]["content"] == plain.json()["choices"][0]["message"]["content"]
    bad = reply(speculative="yes")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculative"
    # The worker's totals (counted as requests finish) reach /v1/workers and the metrics.
    deadline = time.monotonic() + 60
    while True:
        workers = httpx.get(f"{fresh_stack.base_url}/v1/workers", timeout=10).json()["data"]
        speculation = workers[0].get("speculation") or {}
        if speculation.get("accepted_tokens", 0) > 0:
            break
        assert time.monotonic() < deadline, workers
        time.sleep(0.3)
    assert 0 < speculation["accepted_tokens"] <= speculation["drafted_tokens"]
    metrics = httpx.get(f"{fresh_stack.base_url}/metrics", timeout=10).text
    assert f'mlxgw_worker_drafted_tokens{{model="{TINY}"' in metrics


# --- SmolLM2 ---------------------------------------------------------------------------


EDIT_SOURCE = "\n".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(12))


def edit_prompt(source: str = EDIT_SOURCE) -> str:
    """The agent pattern as a raw completion: a file, then its edited copy begun (SmolLM2-135M
    does not follow an instruction to copy a file, but continues a copy it sees begun)."""
    head = "\n".join(source.splitlines()[:2])
    return f"Original:\n```python\n{source}```\n\nThe same file with f3 renamed to g3:\n```python\n{head}\n"


@pytest.mark.slow
def test_smollm2_greedy_identical_and_edits_mostly_accepted():
    from worker.models import load

    smol = load("smollm2-135m", None)
    edit = [Generate(f"e{i}", prompt=edit_prompt(), max_tokens=120, sampling=GREEDY) for i in range(2)]
    chats = [chat(f"c{i}", p, max_tokens=40) for i, p in enumerate(PROMPTS)]
    for batch in (edit[:1], edit + chats):
        plain, fast, done = compare(smol, batch)
        assert fast == plain
    drafted, kept = drafted_and_kept({k: v for k, v in done.items() if k.startswith("e")})
    assert kept > 0.6 * drafted and kept > 60, (drafted, kept)


# --- a draft model ---------------------------------------------------------------------


def test_a_draft_model_drafts_and_greedy_output_is_unchanged(tiny_model):
    # The tiny model drafting for itself: every greedy draft is the target's own token, so all
    # are kept; sequences join and leave the batch (different lengths), and a request opts out.
    reqs = [chat(str(i), p, max_tokens=20 + 10 * i) for i, p in enumerate(PROMPTS)]
    reqs[3].speculative = False
    plain, _ = run(Engine(tiny_model, speculative="off"), *reqs)
    fast, done = run(Engine(tiny_model, speculative="always", draft_model=tiny_model, max_draft=4),
                     *[Generate(**{**r.__dict__}) for r in reqs])
    assert fast == plain
    for request_id in ("0", "1", "2"):
        assert done[request_id].accepted_tokens == done[request_id].drafted_tokens > 0
    assert done["3"].drafted_tokens == 0


def test_a_draft_model_with_prefix_hits_stops_and_cancel(tiny_model):
    engine = Engine(tiny_model, speculative="always", draft_model=tiny_model, prefill_chunk=16)
    plain_engine = Engine(tiny_model, speculative="off", prefill_chunk=16)
    history = [{"role": "system", "content": "You are terse. " * 12}, {"role": "user", "content": "Hello"}]
    for e in (engine, plain_engine):
        run(e, Generate("warm", messages=history, max_tokens=10, sampling=GREEDY))
    full, _ = run(plain_engine, chat("s", PROMPTS[2], max_tokens=40))
    stop = full["s"][12:16]
    reqs = [Generate("b", messages=history, max_tokens=30, sampling=GREEDY),
            chat("s", PROMPTS[2], max_tokens=40, stop=[stop]),
            chat("long", "Tell me everything about the sea. " * 10, max_tokens=30)]
    fast, done = run(engine, *reqs)
    plain, _ = run(plain_engine, *[Generate(**{**r.__dict__}) for r in reqs])
    assert fast == plain and done["b"].cached_tokens > 0
    assert fast["s"] == full["s"][: full["s"].index(stop)]


def test_a_draft_model_with_another_tokenizer_is_refused(tiny_model_dir, tiny_variant_dir, tmp_path):
    import subprocess
    import sys

    from processes import REPO_ROOT

    result = subprocess.run([sys.executable, "-m", "worker", "--model", str(tiny_model_dir), "--draft-model",
                             str(tiny_variant_dir("qwen")), "--gateway", f"ipc://{tmp_path / 'none.sock'}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "its tokenizer is not" in result.stderr
