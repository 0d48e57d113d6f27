"""``mlx-gateway-claude``: start Claude Code against this gateway in one line (or print its setup).

    mlx-gateway-claude                      # claude, on the gateway's model, interactive
    mlx-gateway-claude -- -p "fix the bug"  # anything after -- goes to claude
    eval "$(mlx-gateway-claude --print)"    # or just set the environment in this shell

It asks the gateway which models its workers serve and their context windows, then sets what
Claude Code reads (its model-configuration settings for a gateway or custom model): the base
URL and key, the model for every tier Claude Code uses (main, and the small fast one for
background tasks), and the real context window (``CLAUDE_CODE_MAX_CONTEXT_TOKENS``, which
Claude Code honours for a model it does not know), so it never assumes a million tokens.

How it compacts depends on the window (Claude Code 2.1.x, read from its bundle):

- From 100k tokens up, ``CLAUDE_CODE_AUTO_COMPACT_WINDOW`` is the window too: Claude Code
  compacts ahead of time, about 33k tokens short of it (its output reserve, at most 20k, and a
  13k buffer), and, should a prompt still be too long, when the gateway says so.
- Below 100k (SmolLM2 has 8k) that reserve and buffer leave nothing: auto-compaction on such a
  window compacts before every turn, and Claude Code gives up ("Autocompact is thrashing").
  ``CLAUDE_CODE_DISABLE_UNKNOWN_MODEL_WINDOW_ENFORCEMENT`` keeps it from compacting ahead of
  time on the window it was told, so it sends each prompt, and when the gateway answers
  Anthropic's "prompt is too long: N tokens > M maximum" it compacts (reactive compaction,
  sized by the gap), then retries. ``DISABLE_COMPACT`` and ``DISABLE_AUTO_COMPACT`` would turn
  that off too, so neither is set. Its output cap is a quarter of the window.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import urllib.error

from gateway.status.served import fetch_models

# Claude Code's floor for CLAUDE_CODE_AUTO_COMPACT_WINDOW (a smaller value counts as this).
MIN_COMPACT_WINDOW = 100_000
# Claude Code's own prompt (system prompt and tools) is about this many tokens on a small model.
CLAUDE_CODE_PROMPT_TOKENS = 13_000


def claude_code_env(base_url: str, model: str, context_window: int, api_key: str | None) -> dict[str, str]:
    """The environment that points Claude Code at the gateway's ``model``."""
    env = {
        "ANTHROPIC_BASE_URL": base_url.rstrip("/"),
        "ANTHROPIC_API_KEY": api_key or "local",
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
        "ANTHROPIC_SMALL_FAST_MODEL": model,  # older Claude Code releases
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",  # no telemetry or update checks to the internet
        # Claude Code asks the gateway's GET /v1/models and lists every served model in /model.
        "CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY": "1",
        # The model's window, where Claude Code would assume 1M tokens for a name it does not know.
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS": str(context_window),
    }
    if context_window >= MIN_COMPACT_WINDOW:
        env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] = str(context_window)
    else:
        # Compact when the gateway says the prompt is too long, not ahead of time on a window
        # too small for Claude Code's 33k-token margin (see the module's docstring).
        env["CLAUDE_CODE_DISABLE_UNKNOWN_MODEL_WINDOW_ENFORCEMENT"] = "1"
        # Claude Code keeps room for its output (32k by default) inside the window.
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(context_window // 4)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx-gateway-claude", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("MLX_GATEWAY_URL", "http://127.0.0.1:8000"),
                        help="the gateway (default: http://127.0.0.1:8000, or MLX_GATEWAY_URL)")
    parser.add_argument("--model", default=None, help="the served model to use (default: the only one served)")
    parser.add_argument("--api-key", default=os.environ.get("MLX_GATEWAY_API_KEY"),
                        help="a gateway API key, if it requires one (or MLX_GATEWAY_API_KEY)")
    parser.add_argument("--print", action="store_true", help="print the environment as shell exports, start nothing")
    parser.add_argument("claude_args", nargs=argparse.REMAINDER, help="after --: arguments for claude")
    args = parser.parse_args(argv)
    claude_args = args.claude_args[1:] if args.claude_args[:1] == ["--"] else args.claude_args

    try:
        models = {m.name: m.context_window for m in fetch_models(args.url, args.api_key, args.model)}
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        print(f"mlx-gateway-claude: cannot ask {args.url} for its models: {exc}", file=sys.stderr)
        return 2
    model = args.model or (next(iter(models)) if len(models) == 1 else None)
    if model not in models:
        served = ", ".join(sorted(models)) or "none"
        print(f"mlx-gateway-claude: choose a served model with --model (served: {served})", file=sys.stderr)
        return 2
    window = models[model]
    env = claude_code_env(args.url, model, window, args.api_key)
    if window < CLAUDE_CODE_PROMPT_TOKENS * 2:
        print(f"mlx-gateway-claude: {model} has a {window}-token window and Claude Code's own prompt takes about "
              f"{CLAUDE_CODE_PROMPT_TOKENS}; offer it fewer tools (e.g. -- --tools Bash,Read,Edit) or use a "
              "model with a longer window", file=sys.stderr)
    if args.print:
        print("\n".join(f"export {name}={shlex.quote(value)}" for name, value in env.items()))
        return 0
    claude = shutil.which("claude")
    if claude is None:
        print("mlx-gateway-claude: claude not found; install it with: npm install -g @anthropic-ai/claude-code",
              file=sys.stderr)
        return 2
    os.execve(claude, [claude, *claude_args], {**os.environ, **env})
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
