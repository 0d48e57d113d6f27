"""``mlx-gateway-codex``: set up OpenAI's Codex CLI for this gateway, with a model catalog, and run it.

    mlx-gateway-codex                  # merge a provider into ~/.codex/config.toml, write the catalog, run codex
    mlx-gateway-codex -- exec "..."    # the same, then codex with these arguments
    mlx-gateway-codex --no-run         # configure only (then run codex yourself)
    mlx-gateway-codex --print          # write the catalog, print the config.toml lines instead

Codex knows its own models only; for any other name it prints "Model metadata for `NAME` not
found. Defaulting to fallback metadata", assumes a 272,000-token window, compacts too late and
never offers its freeform ``apply_patch`` tool. This command asks the live gateway what its
workers serve (``GET /v1/workers``: each model's context window, whether its tool calls are
parsed, whether its template has a thinking switch) and writes Codex's model catalog for them
(the file that Codex's ``model_catalog_json`` names), then the provider and the model in
``config.toml``, merged into an existing file (its other settings kept, the old file saved as
``config.toml.bak``).

The gateway serves the same catalog at ``GET /v1/models?client_version=...`` (Codex's own request
shape); both come from ``status/codex_catalog.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

from gateway.status.codex_catalog import model_catalog
from gateway.status.served import fetch_models

PROVIDER = "mlx-gateway"
CATALOG_FILE = "mlx-gateway-models.json"
API_KEY_ENV = "MLX_GATEWAY_API_KEY"
# --- the command ----------------------------------------------------------------------------


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's


def config_settings(base_url: str, model: str, catalog: Path, provider: str = PROVIDER,
                    websockets: bool = True, env_key: str | None = None) -> tuple[dict[str, str], str]:
    """The top-level keys (name -> TOML value) and the provider table, as TOML text."""
    top = {"model": _toml_string(model), "model_provider": _toml_string(provider),
           "model_catalog_json": _toml_string(str(catalog))}
    lines = [f"[model_providers.{_toml_key(provider)}]",
             f"name = {_toml_string(provider)}",
             f"base_url = {_toml_string(base_url.rstrip('/') + '/v1')}",
             'wire_api = "responses"',
             f"supports_websockets = {'true' if websockets else 'false'}"]
    if env_key:
        lines.append(f"env_key = {_toml_string(env_key)}")
    return top, "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


_HEADER = re.compile(r"^\s*\[\[?\s*([^\[\]#]+?)\s*\]\]?\s*(#.*)?$")


def merge_config(existing: str, top: dict[str, str], provider: str, table: str) -> str:
    """``existing`` config.toml text with ``top`` keys set and the provider's table replaced.

    Everything else is kept as written (comments too). Raises ValueError when the result would
    not read back as intended (checked with tomllib where Python has it).
    """
    lines = existing.splitlines()
    first_table = next((i for i, line in enumerate(lines) if _HEADER.match(line)), len(lines))
    head, tables = lines[:first_table], lines[first_table:]
    # Top-level keys: replace ours where they are, else add them first.
    pending = dict(top)
    for i, line in enumerate(head):
        match = re.match(r"^\s*([A-Za-z0-9_-]+)\s*=", line)
        if match and match.group(1) in pending:
            head[i] = f"{match.group(1)} = {pending.pop(match.group(1))}"
    head = [f"{key} = {value}" for key, value in pending.items()] + head
    # Our provider's table (and any sub-table of it) goes; the new one is appended.
    names = {f"model_providers.{provider}", f'model_providers."{provider}"'}
    kept: list[str] = []
    dropping = False
    for line in tables:
        match = _HEADER.match(line)
        if match:
            name = re.sub(r"\s*\.\s*", ".", match.group(1))
            dropping = any(name == n or name.startswith(n + ".") for n in names)
        if not dropping:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    body = "\n".join(head + kept).strip("\n")
    merged = (body + "\n\n" if body else "") + table
    _check_merge(existing, merged, top, provider)
    return merged


def _check_merge(existing: str, merged: str, top: dict[str, str], provider: str) -> None:
    try:
        import tomllib
    except ImportError:  # Python 3.10: no reader to check with
        return
    try:
        before = tomllib.loads(existing)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"the existing file is not valid TOML ({exc}); fix it or use --print") from None
    try:
        after = tomllib.loads(merged)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"merging would not give valid TOML ({exc}); use --print and edit it by hand") from None
    wanted = {key: json.loads(value) for key, value in top.items()}
    providers = dict(before.get("model_providers", {}))
    providers.pop(provider, None)
    unchanged = all(after.get(k) == v for k, v in before.items() if k not in wanted and k != "model_providers")
    if ({k: after.get(k) for k in wanted} != wanted or not unchanged
            or {k: v for k, v in after.get("model_providers", {}).items() if k != provider} != providers):
        raise ValueError("the file is laid out in a way this command cannot merge into; use --print and edit it by hand")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx-gateway-codex", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("MLX_GATEWAY_URL", "http://127.0.0.1:8000"),
                        help="the gateway (default: http://127.0.0.1:8000, or MLX_GATEWAY_URL)")
    parser.add_argument("--model", default=None,
                        help="Codex's model (default: the only one served); the catalog lists every served model")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"a gateway API key, if it requires one (or {API_KEY_ENV}); Codex is told to read "
                             f"it from ${API_KEY_ENV}, never from the file")
    parser.add_argument("--codex-home", type=Path, default=None,
                        help="Codex's directory (default: $CODEX_HOME, else ~/.codex)")
    parser.add_argument("--config", type=Path, default=None,
                        help="the config.toml to merge into (default: CODEX_HOME/config.toml)")
    parser.add_argument("--catalog", type=Path, default=None,
                        help=f"where to write the model catalog (default: CODEX_HOME/{CATALOG_FILE})")
    parser.add_argument("--provider", default=PROVIDER, help=f"the provider's name in config.toml (default: {PROVIDER})")
    parser.add_argument("--instructions", type=Path, default=None, metavar="FILE",
                        help="base instructions for the catalog's models (default: a short built-in agent prompt)")
    parser.add_argument("--no-websockets", action="store_true",
                        help="supports_websockets = false: Codex talks HTTP/SSE only (for a gateway without "
                             "the Responses WebSocket)")
    parser.add_argument("--print", action="store_true",
                        help="write the catalog, but print the config.toml lines instead of merging them; run nothing")
    parser.add_argument("--no-run", action="store_true", help="configure Codex, but do not run it")
    parser.add_argument("codex_args", nargs=argparse.REMAINDER, help="after --: arguments for codex")
    args = parser.parse_args(argv)
    codex_args = args.codex_args[1:] if args.codex_args[:1] == ["--"] else args.codex_args

    home = (args.codex_home or Path(os.environ.get("CODEX_HOME") or Path.home() / ".codex")).expanduser()
    catalog_path = (args.catalog or home / CATALOG_FILE).expanduser().absolute()
    config_path = (args.config or home / "config.toml").expanduser()
    try:
        models = [m for m in fetch_models(args.url, args.api_key, args.model) if m.context_window]
    except urllib.error.HTTPError as exc:
        hint = " (pass --api-key)" if exc.code == 401 else ""
        print(f"mlx-gateway-codex: {args.url} answered {exc.code} to GET /v1/workers{hint}", file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        print(f"mlx-gateway-codex: cannot ask {args.url} for its models: {exc}", file=sys.stderr)
        return 2
    names = [m.name for m in models]
    model = args.model or (names[0] if len(names) == 1 else None)
    if model not in names:
        served = ", ".join(names) or "none"
        print(f"mlx-gateway-codex: choose a served model with --model (served: {served})", file=sys.stderr)
        return 2
    instructions = args.instructions.read_text() if args.instructions else None

    catalog_path.parent.mkdir(parents=True, exist_ok=True)
    catalog_path.write_text(json.dumps(model_catalog(models, instructions), indent=2) + "\n")
    top, table = config_settings(args.url, model, catalog_path, args.provider, not args.no_websockets,
                                 API_KEY_ENV if args.api_key else None)
    block = "".join(f"{key} = {value}\n" for key, value in top.items()) + "\n" + table
    for m in models:
        print(f"mlx-gateway-codex: {m.name}: {m.context_window:,}-token window, "
              f"tool calls {'yes' if m.tool_calls else 'no'}, thinking {'yes' if m.thinking else 'no'}", file=sys.stderr)
    print(f"mlx-gateway-codex: wrote the model catalog to {catalog_path}", file=sys.stderr)
    if args.api_key:
        print(f"mlx-gateway-codex: Codex reads the key from ${API_KEY_ENV}: export it before running codex",
              file=sys.stderr)
    if not next(m for m in models if m.name == model).tool_calls:
        print(f"mlx-gateway-codex: {model} has no tool-call format the gateway knows: Codex can chat with it but "
              "not run commands or edit files", file=sys.stderr)
    if args.print:
        print(block, end="")
        return 0
    written = _write_config(config_path, top, args.provider, table)
    if written != 0 or args.no_run:
        return written
    return _run_codex(home, codex_args, args.api_key)


def _run_codex(home: Path, codex_args: list[str], api_key: str | None) -> int:
    """Become ``codex`` with ``codex_args``, reading the configuration just written."""
    codex = shutil.which("codex")
    if codex is None:
        print("mlx-gateway-codex: codex not found; install it with: npm install -g @openai/codex", file=sys.stderr)
        return 2
    env = {**os.environ, "CODEX_HOME": str(home)}
    if api_key:
        env[API_KEY_ENV] = api_key
    os.execve(codex, [codex, *codex_args], env)
    return 0  # not reached


def _write_config(path: Path, top: dict[str, str], provider: str, table: str) -> int:
    """Merge into ``path``, keeping the previous file as ``<name>.bak``."""
    existing = path.read_text() if path.exists() else ""
    try:
        merged = merge_config(existing, top, provider, table)
    except ValueError as exc:
        print(f"mlx-gateway-codex: {path}: {exc}", file=sys.stderr)
        return 2
    if merged == existing:
        print(f"mlx-gateway-codex: {path} already has these settings", file=sys.stderr)
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    if existing:
        path.with_name(path.name + ".bak").write_text(existing)
    path.write_text(merged)
    saved = f" (the previous file is now {path.name}.bak)" if existing else ""
    print(f"mlx-gateway-codex: set model = {json.loads(top['model'])!r} and provider {provider!r} in {path}{saved}",
          file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())
