"""Model names clients ask for -> the models workers serve.

Claude Code asks for its own model names (a main model and a small fast one) unless told
otherwise; ``--model-alias 'claude-*=qwen3-coder'`` lets an operator answer them with a local
model. Patterns are shell-style (``fnmatch``), tried in the order given; a name a worker
serves is never rewritten.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable


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
        for pattern, model in self.rules:
            if fnmatch.fnmatchcase(name, pattern):
                return model
        return name
