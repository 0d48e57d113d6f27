"""Model names clients ask for -> the models workers serve.

Claude Code asks for its own model names (a main model and a small fast one) unless told
otherwise; ``--model-alias 'claude-*=qwen3-coder'`` lets an operator answer them with a local
model. Patterns are shell-style (``fnmatch``), tried in the order given; a name a worker
serves is never rewritten.

Claude Code's model discovery keeps only ids that mention "claude" or "anthropic": the
gateway lists each served model to it also as ``claude-local/<model>`` (``DISCOVERY_PREFIX``),
and that name always means ``<model>``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

DISCOVERY_PREFIX = "claude-local/"


class ModelAliases:
    def __init__(self, rules: Iterable[tuple[str, str]] = ()):
        self.rules = list(rules)  # (pattern, served model)

    @classmethod
    def parse(cls, specs: Iterable[str]) -> ModelAliases:
        """From ``PATTERN=MODEL`` strings; ValueError names a malformed one."""
        rules = []
        for spec in specs:
            pattern, _, model = spec.partition("=")
            if not pattern.strip() or not model.strip():
                raise ValueError(f"--model-alias {spec!r}: expected PATTERN=MODEL, e.g. 'claude-*=smollm2-135m'")
            rules.append((pattern.strip(), model.strip()))
        return cls(rules)

    def resolve(self, name: str) -> str:
        if name.startswith(DISCOVERY_PREFIX):
            return name[len(DISCOVERY_PREFIX):]
        for pattern, model in self.rules:
            if fnmatch.fnmatchcase(name, pattern):
                return model
        return name
