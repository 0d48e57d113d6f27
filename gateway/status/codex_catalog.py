"""Codex's model catalog for the models a gateway serves.

Codex knows its own models only; for any other name it assumes a 272,000-token window,
compacts too late and never offers its freeform ``apply_patch`` tool. The catalog tells it each
served model's real window, whether its tool calls are parsed, and whether its template has a
thinking switch. The gateway serves it at ``GET /v1/models?client_version=...`` (Codex's own
request shape) and ``mlx-gateway-codex`` (``agents/codex.py``) writes it to Codex's
``model_catalog_json`` file.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.status.served import ServedModel

# Codex compacts the conversation past this share of the window (its own default is 90%); the
# rest is room for the reply and for the compaction turn itself.
AUTO_COMPACT_FRACTION = 0.85
# Tool output Codex keeps in the history, per call: what Codex's own models use, but at most an
# eighth of a small window.
TOOL_OUTPUT_TOKENS = 10_000

# The instructions Codex sends first, as its first developer message. A catalog entry must carry
# them (Codex 0.171 refuses one without): Codex's own 17 KB prompt comes only with its fallback
# metadata. Ours are short, for small local models and windows (SmolLM2's first Codex turn: 587
# prompt tokens).
AGENT_INSTRUCTIONS = """\
You are Codex, a coding agent in the user's terminal (the Codex CLI), running on a local model \
served by mlx-gateway. You and the user share one machine and one workspace.

- Carry the user's task through to the end, then say briefly what you changed and how you checked it.
- Use the shell tool to read files, search (prefer `rg`), and run commands and tests. Look before you edit.
- Edit files with the `apply_patch` tool. Its input is a patch (not JSON), for example:
*** Begin Patch
*** Add File: notes/todo.txt
+first line
*** Update File: src/app.py
@@ def main():
-    return 1
+    return 0
*** Delete File: old.txt
*** End Patch
  Paths are relative to the working directory; each added line starts with "+", each removed one with "-".
- Keep changes small and focused. Do not undo changes you did not make, and do not commit unless asked.
"""
CHAT_INSTRUCTIONS = """\
You are a coding assistant in the user's terminal (the Codex CLI), running on a local model served \
by mlx-gateway. This model cannot run commands or edit files: answer in text, with code in fenced \
blocks and the file each block belongs to. Be brief and concrete.
"""


def model_info(model: ServedModel, priority: int = 1, instructions: str | None = None) -> dict[str, Any]:
    """One Codex ``ModelInfo`` (codex-rs/protocol/src/openai_models.rs), as Codex 0.171 reads it."""
    window = model.context_window
    tools = model.tool_calls
    features = ", ".join(f for f, on in (("tool calls", tools), ("thinking", model.thinking)) if on)
    info: dict[str, Any] = {
        "slug": model.name,
        "display_name": model.name,
        "description": f"{model.name} on mlx-gateway: {window:,}-token context" + (f", {features}" if features else ""),
        # reasoning.effort switches the template's thinking: "none" (and "minimal") off, others on.
        "supported_reasoning_levels": [
            {"effort": "none", "description": "Thinking off: answer directly"},
            {"effort": "medium", "description": "Thinking on: the model thinks before it answers"},
        ] if model.thinking else [],
        # Codex's own tool choice for its models; it may still offer its unified exec tool instead.
        "shell_type": "shell_command" if tools else "default",
        "visibility": "list",
        "supported_in_api": True,
        "priority": priority,
        "upgrade": None,
        "base_instructions": instructions if instructions is not None else (
            AGENT_INSTRUCTIONS if tools else CHAT_INSTRUCTIONS),
        "supports_reasoning_summaries": False,  # thinking comes back as reasoning text, not summaries
        "support_verbosity": False,
        "default_verbosity": None,
        # The freeform patch tool: the gateway gives a custom tool to the template as a function with
        # one string argument, and the model's call comes back to Codex as a custom_tool_call.
        "apply_patch_tool_type": "freeform" if tools else None,
        "truncation_policy": {"mode": "tokens", "limit": min(TOOL_OUTPUT_TOKENS, window // 8)},
        "supports_parallel_tool_calls": tools,
        "context_window": window,
        "auto_compact_token_limit": int(window * AUTO_COMPACT_FRACTION),
        "effective_context_window_percent": 95,
        "experimental_supported_tools": [],
        "input_modalities": ["text", "image"] if model.vision else ["text"],  # images: a vision worker
    }
    if model.thinking:
        info["default_reasoning_level"] = "medium"
    return info


def model_catalog(models: Iterable[ServedModel], instructions: str | None = None) -> dict[str, Any]:
    """Codex's model catalog (``{"models": [ModelInfo, ...]}``): the ``model_catalog_json`` file,
    and the gateway's reply to ``GET /v1/models?client_version=...``."""
    return {"models": [model_info(m, i, instructions) for i, m in enumerate(models, start=1)]}
