"""The batching engine, in process, on the tiny random-weight model."""

from __future__ import annotations

import pytest

from protocol import Accepted, Error, Generate, SamplingParams
from worker.engine import Engine

GREEDY = SamplingParams(temperature=0.0)


def chat(request_id: str, text: str, **kwargs) -> Generate:
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("sampling", GREEDY)
    return Generate(request_id, messages=[{"role": "user", "content": text}], **kwargs)


def run(engine: Engine, *requests: Generate, max_steps: int = 10_000):
    texts = {r.request_id: "" for r in requests}
    finished = {}
    for request in requests:
        assert isinstance(engine.submit(request), Accepted)
    for _ in range(max_steps):
        if not engine.busy:
            break
        result = engine.step()
        assert not result.errors
        for delta in result.deltas:
            texts[delta.request_id] += delta.text
        for f in result.finished:
            finished[f.request_id] = f
    return texts, finished


PROMPTS = ["What is the capital of France?", "Write a poem about the sea.", "def add(a, b):", "Café 日本 🎉"]


def test_batched_greedy_output_equals_each_request_alone(tiny_model):
    alone = {}
    for i, prompt in enumerate(PROMPTS):
        texts, _ = run(Engine(tiny_model, max_sequences=8), chat(str(i), prompt))
        alone.update(texts)
    together, finished = run(Engine(tiny_model, max_sequences=8), *[chat(str(i), p) for i, p in enumerate(PROMPTS)])
    assert together == alone
    assert len(set(alone.values())) > 1, "different prompts should give different outputs"
    assert all(f.finish_reason in ("length", "stop") for f in finished.values())


def test_max_tokens_ends_with_length_and_counts_tokens(tiny_model):
    _, finished = run(Engine(tiny_model), chat("a", "Hello", max_tokens=5))
    assert finished["a"].finish_reason == "length"
    assert finished["a"].completion_tokens == 5
    assert finished["a"].prompt_tokens > 3


def test_the_operators_output_cap_is_a_ceiling(tiny_model):
    # The tiny model never ends its turn (greedy): uncapped, it would fill its context.
    _, finished = run(Engine(tiny_model, max_output_tokens=7), chat("a", "Hello", max_tokens=None))
    assert (finished["a"].finish_reason, finished["a"].completion_tokens) == ("length", 7)
    # A request that asks for more gets the cap, and hears it ended at its length.
    _, finished = run(Engine(tiny_model, max_output_tokens=7), chat("b", "Hello", max_tokens=9))
    assert (finished["b"].finish_reason, finished["b"].completion_tokens) == ("length", 7)
    _, finished = run(Engine(tiny_model, max_output_tokens=7), chat("d", "Hello", max_tokens=3))
    assert finished["d"].completion_tokens == 3
    _, finished = run(Engine(tiny_model), chat("c", "Hello", max_tokens=None))  # no cap: the context window
    assert finished["c"].completion_tokens == tiny_model.context_length - finished["c"].prompt_tokens


def test_stop_string_truncates_output(tiny_model):
    texts, _ = run(Engine(tiny_model), chat("a", "Hello", max_tokens=20))
    full = texts["a"]
    stop = full[5:8]
    assert stop and stop not in full[:5], "pick a stop string that first occurs at offset 5"
    texts, finished = run(Engine(tiny_model), chat("b", "Hello", max_tokens=20, stop=[stop]))
    assert texts["b"] == full[: full.index(stop)]
    assert finished["b"].finish_reason == "stop"


def test_cancel_frees_the_slot_for_a_waiting_request(tiny_model):
    engine = Engine(tiny_model, max_sequences=1)
    assert isinstance(engine.submit(chat("first", "Hello", max_tokens=200)), Accepted)
    assert isinstance(engine.submit(chat("second", "Hello", max_tokens=3)), Accepted)
    engine.step()
    assert (engine.active, engine.queued) == (1, 1)
    finished = engine.cancel("first")
    assert finished is not None and finished.finish_reason == "cancelled"
    assert (engine.active, engine.queued) == (0, 1)
    done = {}
    while engine.busy:
        result = engine.step()
        done.update({f.request_id: f for f in result.finished})
    assert set(done) == {"second"}
    assert engine.cancel("first") is None, "cancelling twice is harmless"


def test_cancel_of_a_queued_request(tiny_model):
    engine = Engine(tiny_model, max_sequences=1)
    engine.submit(chat("a", "Hello", max_tokens=50))
    engine.submit(chat("b", "Hello", max_tokens=50))
    engine.step()
    assert engine.cancel("b").finish_reason == "cancelled"
    assert (engine.active, engine.queued) == (1, 0)


@pytest.mark.parametrize(
    "request_, code",
    [
        (chat("long", "word " * 300), "context_length_exceeded"),
        (Generate("tmpl", messages=[{"role": "bogus", "content": "x"}]), "template_error"),
        (Generate("empty", prompt=""), "invalid_request"),
        (chat("zero", "Hello", max_tokens=0), "invalid_request"),
    ],
    ids=["context", "template", "empty-prompt", "zero-max-tokens"],
)
def test_bad_requests_fail_alone_and_the_engine_keeps_serving(tiny_model, request_, code):
    engine = Engine(tiny_model)
    engine.submit(chat("good", "Hello", max_tokens=4))
    result = engine.submit(request_)
    assert isinstance(result, Error) and result.code == code and result.request_id == request_.request_id
    finished = {}
    while engine.busy:
        step = engine.step()
        finished.update({f.request_id: f for f in step.finished})
    assert set(finished) == {"good"}


def test_duplicate_request_id_is_refused(tiny_model):
    engine = Engine(tiny_model)
    engine.submit(chat("a", "Hello"))
    assert engine.submit(chat("a", "Hello")).code == "invalid_request"


def test_max_tokens_is_clipped_to_the_context_window(tiny_model):
    engine = Engine(tiny_model)
    texts, finished = run(engine, Generate("a", prompt="Hello", max_tokens=None, sampling=GREEDY))
    assert finished["a"].prompt_tokens + finished["a"].completion_tokens <= tiny_model.context_length


def test_streaming_detokenizer_never_splits_a_character(tiny_model):
    tokenizer = tiny_model.tokenizer
    text = "Café naïve 日本語 🎉🚀 déjà vu"
    tokens = tokenizer.encode(text, add_special_tokens=False)
    assert len(tokens) > len(text.split()), "multi-byte characters should span several tokens"
    detokenizer = tokenizer.detokenizer
    pieces = []
    for token in tokens:
        detokenizer.add_token(token)
        pieces.append(detokenizer.last_segment)
    detokenizer.finalize()
    pieces.append(detokenizer.last_segment)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_chat_template_kwargs_reach_the_template(tiny_model):
    engine = Engine(tiny_model)
    plain = engine.submit(chat("a", "Hello"))
    extended = engine.submit(chat("b", "Hello", chat_template_kwargs={"preamble": "Be brief and kind."}))
    assert extended.prompt_tokens > plain.prompt_tokens + 3


def test_raw_completions_keep_the_leading_space(tiny_model):
    tokenizer = tiny_model.tokenizer
    script = " Paris."
    from tiny_model import forced_output

    engine = Engine(tiny_model, logits_processors=lambda request: [forced_output(tokenizer, script)])
    texts, _ = run(engine, Generate("raw", prompt="The capital of France is", sampling=GREEDY))
    assert texts["raw"] == " Paris."


def test_presence_and_frequency_penalties_change_greedy_output(tiny_model):
    plain, _ = run(Engine(tiny_model), chat("a", "Hello", max_tokens=24))
    off, _ = run(Engine(tiny_model), chat("b", "Hello", max_tokens=24, sampling=SamplingParams(
        temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0)))
    assert off["b"] == plain["a"]
    for name in ("presence_penalty", "frequency_penalty"):
        sampling = SamplingParams(temperature=0.0, **{name: 2.0})
        penalised, _ = run(Engine(tiny_model), chat("c", "Hello", max_tokens=24, sampling=sampling))
        assert penalised["c"] != plain["a"], name


def test_penalties_leave_the_test_hook_the_last_word(tiny_model):
    from tiny_model import forced_output

    script = "Same words, same words."
    engine = Engine(tiny_model, logits_processors=lambda request: [forced_output(tiny_model.tokenizer, script)])
    sampling = SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)
    texts, _ = run(engine, chat("a", "Hello", max_tokens=50, sampling=sampling))
    assert texts["a"] == script


def test_requests_without_sampling_use_the_model_then_operator_defaults(tiny_model_dir, tmp_path):
    import json
    import shutil

    from worker.models import load

    model_dir = tmp_path / "with-generation-config"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "top_p": 0.5}))
    loaded = load(str(model_dir))
    assert loaded.sampling["temperature"] == 0.0 and loaded.sampling["top_p"] == 0.5
    unspecified = Generate("u", messages=[{"role": "user", "content": "Hello"}], max_tokens=12)
    greedy = Generate("g", messages=[{"role": "user", "content": "Hello"}], max_tokens=12, sampling=GREEDY)
    first, _ = run(Engine(loaded), unspecified)
    second, _ = run(Engine(loaded), unspecified)
    reference, _ = run(Engine(loaded), greedy)
    assert first["u"] == second["u"] == reference["g"]
    assert load(str(model_dir), sampling={"temperature": 0.7}).sampling["temperature"] == 0.7
    assert load(str(tiny_model_dir)).sampling["temperature"] == 1.0


def test_prefix_cache_hits_give_the_same_greedy_output(tiny_model):
    conversation = [{"role": "system", "content": "You are terse. " * 20}, {"role": "user", "content": "Hello"}]
    first_turn = Generate("t1", messages=conversation, max_tokens=16, sampling=GREEDY)
    cached = Engine(tiny_model)
    texts, done = run(cached, first_turn)
    assert done["t1"].cached_tokens == 0
    again, done_again = run(cached, Generate("t1b", messages=conversation, max_tokens=16, sampling=GREEDY))
    assert done_again["t1b"].cached_tokens == done_again["t1b"].prompt_tokens - 1, "all but the last token"
    assert again["t1b"] == texts["t1"]
    # The next turn resends the history: only its new tail is prefilled, and nothing changes.
    next_turn = conversation + [{"role": "assistant", "content": texts["t1"]}, {"role": "user", "content": "More"}]
    with_cache, done2 = run(cached, Generate("t2", messages=next_turn, max_tokens=16, sampling=GREEDY))
    without, done3 = run(Engine(tiny_model, prompt_cache_bytes=0),
                         Generate("t2", messages=next_turn, max_tokens=16, sampling=GREEDY))
    assert done2["t2"].cached_tokens > done2["t2"].prompt_tokens // 2
    assert done3["t2"].cached_tokens == 0
    assert with_cache["t2"] == without["t2"]
    assert cached.prompt_cache_bytes > 0


def test_prefix_cache_with_a_batch_and_stop_strings(tiny_model):
    engine = Engine(tiny_model)
    texts, _ = run(engine, chat("a", "Hello", max_tokens=20))
    stop = texts["a"][5:8]
    requests = [chat("b", "Hello", max_tokens=20, stop=[stop]), chat("c", "Hello", max_tokens=20),
                chat("d", "Other prompt", max_tokens=20)]
    batch, done = run(engine, *requests)
    assert batch["b"] == texts["a"][: texts["a"].index(stop)] and batch["c"] == texts["a"]
    assert done["c"].cached_tokens > 0 and done["b"].cached_tokens > 0
    fresh, _ = run(Engine(tiny_model, prompt_cache_bytes=0), chat("d", "Other prompt", max_tokens=20))
    assert batch["d"] == fresh["d"]


def test_prefix_cache_memory_is_what_it_accounts_for(tiny_model):
    """A finished sequence's cache is a slice of the batch's KV arrays: kept unevaluated, it
    would pin those whole arrays, and the cache's byte budget would bound a fraction of it."""
    import mlx.core as mx

    engine = Engine(tiny_model, max_sequences=8)

    def batch(round_: int) -> None:
        run(engine, *(chat(f"{round_}-{i}", f"Prompt {round_} {i}: " + "many words " * 40, max_tokens=24)
                      for i in range(8)))

    batch(0)
    memory, accounted = mx.get_active_memory(), engine.prompt_cache_bytes
    for round_ in range(1, 4):
        batch(round_)
    grown, accounted_growth = mx.get_active_memory() - memory, engine.prompt_cache_bytes - accounted
    assert accounted_growth > 0
    assert grown <= 1.2 * accounted_growth, (grown, accounted_growth)  # unevaluated slices: ~1.8x here
