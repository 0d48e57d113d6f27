"""Codex's model catalog (gateway/codex.py): the builder, the config.toml merge, the
``mlx-gateway-codex`` command against a stand-in gateway, and ``GET /v1/models?client_version=``
on the gateway app with stand-in workers. The real Codex reads both in tests/test_codex.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_engine_client import run

from gateway.agents.codex import config_settings, main, merge_config
from gateway.app import create_app
from gateway.engine.client import EngineClient
from gateway.responses.store import MemoryStore
from gateway.status.codex_catalog import AGENT_INSTRUCTIONS, CHAT_INSTRUCTIONS, model_catalog
from gateway.status.served import ServedModel, served_models

# Fields Codex 0.171 refuses a catalog entry without (found by loading catalogs into the real binary).
REQUIRED = {"slug", "display_name", "supported_reasoning_levels", "shell_type", "visibility", "supported_in_api",
            "priority", "support_verbosity", "truncation_policy", "experimental_supported_tools", "base_instructions"}


def read_toml(text: str) -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config: dict[str, Any] = tomllib.loads(text)
    return config


def worker(model: str, context: int, tool_calls: bool = False, thinking: bool = False, state: str = "ready") -> dict:
    return {"model": model, "context_length": context, "tool_calls": tool_calls, "thinking": thinking, "state": state}


def test_a_tool_calling_thinking_model_gets_freeform_apply_patch_its_window_and_reasoning_levels():
    (info,) = model_catalog([ServedModel("qwen", 32768, tool_calls=True, thinking=True)])["models"]
    assert REQUIRED <= set(info)
    assert info["slug"] == info["display_name"] == "qwen"
    assert (info["context_window"], info["auto_compact_token_limit"]) == (32768, 27852)
    assert info["apply_patch_tool_type"] == "freeform" and info["shell_type"] == "shell_command"
    assert info["supports_parallel_tool_calls"] is True
    assert [level["effort"] for level in info["supported_reasoning_levels"]] == ["none", "medium"]
    assert info["default_reasoning_level"] == "medium"
    assert info["truncation_policy"] == {"mode": "tokens", "limit": 4096}
    assert info["input_modalities"] == ["text"] and info["visibility"] == "list"
    assert info["base_instructions"] == AGENT_INSTRUCTIONS and "apply_patch" in AGENT_INSTRUCTIONS


def test_a_model_without_tool_calls_or_thinking_gets_no_patch_tool_and_no_reasoning():
    (info,) = model_catalog([ServedModel("smollm2-135m", 8192)])["models"]
    assert REQUIRED <= set(info)
    assert info["apply_patch_tool_type"] is None and info["shell_type"] == "default"
    assert info["supports_parallel_tool_calls"] is False
    assert info["supported_reasoning_levels"] == [] and "default_reasoning_level" not in info
    assert info["context_window"] == 8192 and info["auto_compact_token_limit"] == 6963
    assert info["truncation_policy"]["limit"] == 1024  # an eighth of a small window
    assert info["base_instructions"] == CHAT_INSTRUCTIONS


def test_served_models_merge_replicas_and_skip_draining_workers():
    models = served_models([
        worker("b", 8192, tool_calls=True, thinking=True),
        worker("a", 4096),
        worker("b", 4096, tool_calls=True),  # a replica with a shorter window and no thinking
        worker("c", 100_000, state="draining"),
    ])
    assert models == [ServedModel("a", 4096), ServedModel("b", 4096, tool_calls=True, thinking=False)]
    assert [m["priority"] for m in model_catalog(models)["models"]] == [1, 2]
    assert model_catalog(models, instructions="Be brief.")["models"][0]["base_instructions"] == "Be brief."


def settings(model: str = "qwen", **options: Any) -> tuple[dict[str, str], str]:
    return config_settings("http://127.0.0.1:8000", model, Path("/home/u/.codex/mlx-gateway-models.json"), **options)


def test_config_lines_name_the_provider_the_catalog_and_the_model():
    top, table = settings(env_key="MLX_GATEWAY_API_KEY")
    config = read_toml("".join(f"{k} = {v}\n" for k, v in top.items()) + table)
    assert config["model"] == "qwen" and config["model_provider"] == "mlx-gateway"
    assert config["model_catalog_json"] == "/home/u/.codex/mlx-gateway-models.json"
    assert config["model_providers"]["mlx-gateway"] == {
        "name": "mlx-gateway", "base_url": "http://127.0.0.1:8000/v1", "wire_api": "responses",
        "supports_websockets": True, "env_key": "MLX_GATEWAY_API_KEY"}
    _, table = settings(websockets=False)
    assert read_toml(table)["model_providers"]["mlx-gateway"]["supports_websockets"] is False


def test_merging_keeps_the_users_settings_and_replaces_only_ours():
    existing = (
        '# my Codex\nmodel = "gpt-5.5"\napproval_policy = "never"\n\n'
        '[model_providers.mlx-gateway]\nname = "old"\nbase_url = "http://old/v1"\n\n'
        '[model_providers.mlx-gateway.http_headers]\nX-Old = "1"\n\n'
        '[model_providers.other]\nname = "other"\nbase_url = "http://other/v1"\n\n'
        '[tui]\nnotifications = true\n'
    )
    top, table = settings()
    merged = merge_config(existing, top, "mlx-gateway", table)
    config = read_toml(merged)
    assert config["model"] == "qwen" and config["approval_policy"] == "never"
    assert config["model_providers"]["other"] == {"name": "other", "base_url": "http://other/v1"}
    assert config["model_providers"]["mlx-gateway"]["base_url"] == "http://127.0.0.1:8000/v1"
    assert "http_headers" not in config["model_providers"]["mlx-gateway"]
    assert config["tui"] == {"notifications": True}
    assert "# my Codex" in merged and "gpt-5.5" not in merged
    assert merge_config(merged, top, "mlx-gateway", table) == merged  # idempotent
    assert read_toml(merge_config("", top, "mlx-gateway", table))["model"] == "qwen"


def test_a_config_the_merge_cannot_handle_is_refused_not_rewritten():
    pytest.importorskip("tomllib")  # the merge checks itself with it
    top, table = settings()
    with pytest.raises(ValueError, match="not valid TOML"):
        merge_config("model = \n", top, "mlx-gateway", table)
    with pytest.raises(ValueError, match="--print"):  # an inline table cannot be extended by a [table]
        merge_config('model_providers = { mlx-gateway = { name = "x" } }\n', top, "mlx-gateway", table)


@pytest.fixture
def fake_gateway() -> Iterator[tuple[str, list[dict]]]:
    """A stand-in gateway that answers GET /v1/workers with the list the test fills."""
    workers: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = json.dumps({"object": "list", "data": workers}).encode()
            self.send_response(200 if self.path == "/v1/workers" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", workers
    finally:
        server.shutdown()
        server.server_close()


def test_the_command_writes_the_catalog_and_merges_config_toml(fake_gateway, tmp_path, capsys):
    url, workers = fake_gateway
    workers.append(worker("qwen", 32768, tool_calls=True, thinking=True) | {"id": "w1", "pid": 1})
    (tmp_path / "config.toml").write_text('model = "gpt-5.5"\n[tui]\nnotifications = true\n')
    assert main(["--url", url, "--codex-home", str(tmp_path), "--no-websockets", "--no-run"]) == 0
    catalog = json.loads((tmp_path / "mlx-gateway-models.json").read_text())
    assert [m["slug"] for m in catalog["models"]] == ["qwen"]
    assert catalog["models"][0]["apply_patch_tool_type"] == "freeform"
    config = read_toml((tmp_path / "config.toml").read_text())
    assert (config["model"], config["model_provider"]) == ("qwen", "mlx-gateway")
    assert config["model_catalog_json"] == str(tmp_path / "mlx-gateway-models.json")
    assert config["model_providers"]["mlx-gateway"]["supports_websockets"] is False
    assert config["tui"] == {"notifications": True}
    assert (tmp_path / "config.toml.bak").read_text().startswith('model = "gpt-5.5"')
    assert "config.toml.bak" in capsys.readouterr().err


def test_the_command_prints_instead_of_merging_and_asks_which_model(fake_gateway, tmp_path, capsys):
    url, workers = fake_gateway
    workers.extend([worker("a", 4096), worker("b", 8192, tool_calls=True)])
    home = ["--url", url, "--codex-home", str(tmp_path)]
    assert main(home) == 2
    assert "choose a served model with --model (served: a, b)" in capsys.readouterr().err
    assert main([*home, "--model", "a", "--print", "--api-key", "k"]) == 0
    printed = capsys.readouterr()
    config = read_toml(printed.out)
    assert config["model"] == "a" and config["model_providers"]["mlx-gateway"]["env_key"] == "MLX_GATEWAY_API_KEY"
    assert "k" not in printed.out.split('"')  # the key itself is never written
    assert not (tmp_path / "config.toml").exists()
    assert [m["slug"] for m in json.loads((tmp_path / "mlx-gateway-models.json").read_text())["models"]] == ["a", "b"]
    assert "Codex can chat with it but not run commands" in printed.err


def test_the_command_says_when_the_gateway_cannot_be_reached(tmp_path, capsys):
    assert main(["--url", "http://127.0.0.1:9", "--codex-home", str(tmp_path)]) == 2
    assert "cannot ask http://127.0.0.1:9 for its models" in capsys.readouterr().err


def test_the_gateway_serves_codexs_catalog_for_client_version_and_openais_list_otherwise(tmp_path):
    async def test(client: EngineClient, new_worker) -> None:
        app = create_app(client, MemoryStore())
        await new_worker("qwen-1", model="qwen", context_length=32768, tool_calls=True, thinking=True)
        await new_worker("qwen-2", model="qwen", context_length=16384, tool_calls=True, thinking=True)
        await new_worker("smol-1", model="smol", context_length=8192)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            workers = {w["id"]: w for w in (await http.get("/v1/workers")).json()["data"]}
            assert (workers["qwen-1"]["tool_calls"], workers["qwen-1"]["thinking"]) == (True, True)
            assert (workers["smol-1"]["tool_calls"], workers["smol-1"]["thinking"]) == (False, False)
            listed = (await http.get("/v1/models")).json()
            assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["qwen", "smol"]
            reply = await http.get("/v1/models", params={"client_version": "0.171.0"})
            assert reply.status_code == 200
            catalog = reply.json()
            assert list(catalog) == ["models"]
            qwen, smol = catalog["models"]
            assert (qwen["slug"], qwen["context_window"], qwen["apply_patch_tool_type"]) == ("qwen", 16384, "freeform")
            assert (smol["slug"], smol["context_window"], smol["apply_patch_tool_type"]) == ("smol", 8192, None)
            assert catalog == model_catalog(served_models(workers.values()))

    run(test, tmp_path)


def test_worker_capabilities_come_from_the_tokenizer(tiny_model, tiny_variant_dir):
    from worker.models import load

    assert (tiny_model.tool_calls, tiny_model.thinking) == (False, False)
    qwen = load(str(tiny_variant_dir("qwen")), "qwen")
    assert (qwen.tool_calls, qwen.thinking) == (True, True)
    mistral = load(str(tiny_variant_dir("mistral")), "mistral")
    assert (mistral.tool_calls, mistral.thinking) == (True, False)
