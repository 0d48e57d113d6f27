"""The prefix cache's disk tier (worker/disk_cache.py): in process on the tiny model, and with
real gateway and worker processes restarted between turns."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import httpx
import pytest
from conftest import TINY
from test_engine import GREEDY, run

from protocol import Generate
from worker.disk_cache import SUFFIX, DiskCache, model_fingerprint
from worker.engine import Engine

SYSTEM = "You are a careful assistant. " + " ".join(f"fact{i} is {i * 7}." for i in range(14))


def turn(request_id: str, question: str, scope: str = "", max_tokens: int = 8) -> Generate:
    return Generate(request_id, max_tokens=max_tokens, sampling=GREEDY, cache_scope=scope,
                    messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


def fingerprint(model, model_dir: Path, kv_bits: int | None = None) -> str:
    return model_fingerprint(model_dir, model.tokenizer.chat_template, kv_bits)


def disk_engine(model, model_dir: Path, root: Path, max_bytes: int = 1 << 30, **kwargs) -> Engine:
    engine = Engine(model, **kwargs)
    engine.attach_disk_cache(DiskCache(root, max_bytes, fingerprint(model, model_dir)))
    return engine


def entry_files(root: Path) -> list[Path]:
    return sorted(root.glob(f"*/*{SUFFIX}"))


def written(engine: Engine) -> int:
    count = engine.save_to_disk(10)
    assert engine.disk_cache is not None
    engine.disk_cache.close()
    return count


def test_a_prefix_is_restored_after_a_restart_and_greedy_output_is_unchanged(tiny_model, tiny_model_dir, tmp_path):
    first = disk_engine(tiny_model, tiny_model_dir, tmp_path)
    run(first, turn("t1", "What is fact3?"))
    assert written(first) >= 1
    # A new engine (the worker restarted): RAM is empty, the disk has the first turn.
    second = disk_engine(tiny_model, tiny_model_dir, tmp_path)
    texts, done = run(second, turn("t2", "What is fact5?"))
    uncached_texts, uncached = run(Engine(tiny_model, prompt_cache_bytes=0), turn("t2", "What is fact5?"))
    assert done["t2"].cached_tokens_disk > 20 and done["t2"].cached_tokens == done["t2"].cached_tokens_disk
    assert uncached["t2"].cached_tokens == 0
    assert texts == uncached_texts
    assert second.disk_cache is not None and second.disk_cache.hits == 1
    # The restored entry is in RAM now: the next turn is a RAM hit.
    _, again = run(second, turn("t3", "What is fact5?"))
    assert again["t3"].cached_tokens > 20 and again["t3"].cached_tokens_disk == 0


def test_files_are_private(tiny_model, tiny_model_dir, tmp_path):
    root = tmp_path / "cache"
    engine = disk_engine(tiny_model, tiny_model_dir, root)
    run(engine, turn("t1", "What is fact3?"))
    written(engine)
    files = entry_files(root)
    assert files
    for directory in (root, files[0].parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


def test_an_entry_restored_after_a_restart_is_a_hit_for_its_own_scope_only(tiny_model, tiny_model_dir, tmp_path):
    first = disk_engine(tiny_model, tiny_model_dir, tmp_path)
    run(first, turn("a1", "What is fact3?", scope="key-a"))
    written(first)
    second = disk_engine(tiny_model, tiny_model_dir, tmp_path)
    _, other = run(second, turn("b1", "What is fact3?", scope="key-b"))
    assert other["b1"].cached_tokens == 0
    _, mine = run(second, turn("a2", "What is fact3?", scope="key-a"))
    assert mine["a2"].cached_tokens_disk >= mine["a2"].prompt_tokens - 1


def test_entries_evicted_from_ram_are_written_in_the_background(tiny_model, tiny_model_dir, tmp_path):
    # A RAM budget that holds about one entry: each new prompt pushes the previous one out.
    engine = disk_engine(tiny_model, tiny_model_dir, tmp_path, prompt_cache_bytes=200_000)
    for i in range(4):
        run(engine, Generate(f"r{i}", max_tokens=2, sampling=GREEDY,
                             messages=[{"role": "user", "content": f"{i} " + SYSTEM}]))
    disk = engine.disk_cache
    assert disk is not None and disk.flush(10)
    assert disk.writes >= 2 and len(entry_files(tmp_path)) == len(disk) >= 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
def test_a_damaged_entry_is_deleted_and_never_used(tiny_model, tiny_model_dir, tmp_path, damage):
    first = disk_engine(tiny_model, tiny_model_dir, tmp_path)
    run(first, turn("t1", "What is fact3?"))
    written(first)
    [path] = entry_files(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip":  # in the payload: only its digest tells
        data[-100] ^= 0xFF
    elif damage == "truncate":  # a crash mid-write that somehow got its final name
        data = data[: len(data) // 2]
    else:
        data[60] ^= 0xFF
    path.write_bytes(bytes(data))
    (path.parent / ".leftover.tmp").write_bytes(b"half a write")  # an interrupted write's temp file
    second = disk_engine(tiny_model, tiny_model_dir, tmp_path)
    texts, done = run(second, turn("t2", "What is fact3?"))
    assert done["t2"].cached_tokens == 0
    assert not path.exists() and not (path.parent / ".leftover.tmp").exists()
    uncached, _ = run(Engine(tiny_model, prompt_cache_bytes=0), turn("t2", "What is fact3?"))
    assert texts == uncached


def test_another_models_entries_are_never_read(tiny_model, tiny_model_dir, tmp_path):
    first = disk_engine(tiny_model, tiny_model_dir, tmp_path)
    run(first, turn("t1", "What is fact3?"))
    written(first)
    [path] = entry_files(tmp_path)
    # A changed chat template, or other KV bits: another fingerprint, another directory.
    assert fingerprint(tiny_model, tiny_model_dir, kv_bits=8) != fingerprint(tiny_model, tiny_model_dir)
    changed = model_fingerprint(tiny_model_dir, str(tiny_model.tokenizer.chat_template) + " ", None)
    assert changed != fingerprint(tiny_model, tiny_model_dir)
    other = Engine(tiny_model)
    other.attach_disk_cache(DiskCache(tmp_path, 1 << 30, changed))
    _, done = run(other, turn("t2", "What is fact3?"))
    assert done["t2"].cached_tokens == 0
    # A foreign file moved into this model's directory fails its fingerprint check.
    assert other.disk_cache is not None
    foreign = other.disk_cache.dir / path.name
    os.replace(path, foreign)
    again = DiskCache(tmp_path, 1 << 30, changed)
    assert len(again) == 0 and not foreign.exists() and again.dropped == 1


def test_the_disk_limit_holds_least_recently_used_out_first(tiny_model, tiny_model_dir, tmp_path):
    engine = disk_engine(tiny_model, tiny_model_dir, tmp_path)
    run(engine, turn("t0", "What is fact0?"))
    written(engine)
    one = entry_files(tmp_path)[0].stat().st_size
    limit = int(one * 2.5)  # room for two entries
    engine = disk_engine(tiny_model, tiny_model_dir, tmp_path, max_bytes=limit)
    for i in range(1, 5):
        run(engine, Generate(f"r{i}", max_tokens=2, sampling=GREEDY,
                             messages=[{"role": "user", "content": f"{i} " + SYSTEM}]))
        time.sleep(0.01)
        engine.save_to_disk(10)
        assert sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()) <= limit
    disk = engine.disk_cache
    assert disk is not None and len(disk) == 2 and disk.nbytes <= limit
    # The two kept are the last two written; a restart finds the same.
    assert len(DiskCache(tmp_path, limit, disk.fingerprint)) == 2


# --- real processes: the worker restarted between turns ----------------------------

KEY, OTHER_KEY = "sk-disk-a", "sk-disk-b"


def chat(stack, key: str, question: str) -> dict:
    body = {"model": TINY, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for_a_worker(stack) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            workers = httpx.get(f"{stack.base_url}/v1/workers", headers={"Authorization": f"Bearer {KEY}"}).json()
            if workers.get("data"):
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.1)


def test_a_restarted_worker_restores_its_prefix_from_disk(fresh_stack, tiny_model_dir, tmp_path):
    cache_dir = tmp_path / "kv"
    fresh_stack.start_gateway("--api-key", KEY, "--api-key", OTHER_KEY)
    worker = fresh_stack.start_worker(str(tiny_model_dir), TINY, "--prompt-cache-dir", str(cache_dir))
    wait_for_a_worker(fresh_stack)
    chat(fresh_stack, KEY, "What is fact3?")
    fresh_stack.remove(worker)  # SIGTERM: the RAM entries are written out
    files = entry_files(cache_dir)
    assert files, fresh_stack.logs()
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)

    fresh_stack.start_worker(str(tiny_model_dir), TINY, "--prompt-cache-dir", str(cache_dir))
    wait_for_a_worker(fresh_stack)
    uncached = chat(fresh_stack, OTHER_KEY, "What is fact9?")  # the other key: never served from A's entry
    restored = chat(fresh_stack, KEY, "What is fact9?")
    assert uncached["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert restored["usage"]["prompt_tokens_details"]["cached_tokens"] > 20
    # the tier, in usage: all of it came from disk
    assert restored["usage"]["prompt_tokens_details"]["cached_tokens_disk"] == \
        restored["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert "cached_tokens_disk" not in uncached["usage"]["prompt_tokens_details"]
    assert restored["choices"][0]["message"]["content"] == uncached["choices"][0]["message"]["content"]
    deadline = time.monotonic() + 10
    while True:  # the heartbeat brings the worker's figures
        metrics = httpx.get(f"{fresh_stack.base_url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        lines = [line for line in metrics.splitlines() if line.startswith("mlxgw_worker_cached_prompt_tokens_disk{")]
        if lines and float(lines[0].split()[-1]) > 20:
            break
        assert time.monotonic() < deadline, metrics
        time.sleep(0.2)
    assert "mlxgw_worker_disk_cache_entries{" in metrics


def test_a_restore_in_flight_never_holds_up_decoding(tiny_model, tiny_model_dir, tmp_path):
    first = disk_engine(tiny_model, tiny_model_dir, tmp_path)
    run(first, turn("t1", "What is fact3?"))
    written(first)
    engine = disk_engine(tiny_model, tiny_model_dir, tmp_path, max_sequences=4)
    disk = engine.disk_cache
    assert disk is not None
    read = disk._restore

    def slow_read(entry):  # a slow disk
        time.sleep(1.0)
        return read(entry)

    disk._restore = slow_read  # type: ignore[method-assign]
    engine.submit(Generate("stream", max_tokens=200, sampling=GREEDY, messages=[{"role": "user", "content": "Hi"}]))
    for _ in range(5):
        engine.step()
    engine.submit(turn("restoring", "What is fact3?"))
    started, tokens = time.monotonic(), 0
    while engine._restoring:
        result = engine.step()
        tokens += sum(d.token_count for d in result.deltas if d.request_id == "stream")
    assert time.monotonic() - started > 0.9
    assert tokens > 10, "the stream decoded while the entry was read"
    done: dict = {}
    while engine.busy:
        result = engine.step()
        done.update({f.request_id: f for f in result.finished})
    assert done["restoring"].cached_tokens_disk > 20


def test_quantized_kv_entries_round_trip_under_their_own_fingerprint(tmp_path):
    """--kv-bits: entries are the quantized cache's, written and restored whole; the KV bits are
    part of the fingerprint."""
    pytest.importorskip("worker.quantized_cache")
    import json

    import mlx.core as mx
    from tiny_model import build_tokenizer, model_config, random_weights

    from worker.models import load

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tokenizer = build_tokenizer()
    config = model_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<|im_end|>"), 2048)
    config["head_dim"] = 64  # mx.quantize's smallest group is 32; the plain tiny model's head is 16
    mx.save_safetensors(str(model_dir / "model.safetensors"), random_weights(config), metadata={"format": "mlx"})
    (model_dir / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(str(model_dir))
    model = load(str(model_dir), "tiny-kv", 2048)
    fingerprint = model_fingerprint(model_dir, model.tokenizer.chat_template, 8)

    def engine() -> Engine:
        made = Engine(model, kv_bits=8, kv_group_size=32)
        made.attach_disk_cache(DiskCache(tmp_path / "kv", 1 << 30, fingerprint))
        return made

    first = engine()
    run(first, turn("t1", "What is fact3?"))
    assert written(first) == 1
    second = engine()
    texts, done = run(second, turn("t2", "What is fact5?"))
    uncached, _ = run(Engine(model, kv_bits=8, kv_group_size=32, prompt_cache_bytes=0), turn("t2", "What is fact5?"))
    assert done["t2"].cached_tokens_disk > 20 and texts == uncached
    assert second.prefix_cache is not None
    assert type(second.prefix_cache.entries()[0][2][0]).__name__ == "QuantizedKVCache"
