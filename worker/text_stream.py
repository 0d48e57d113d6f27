"""Per-request text output: stop strings matched on decoded text, not on token ids.

A stop string can be split across tokens, and the same string can tokenize differently
in context, so we match on text. Text that might be the start of a stop string is held
back until the next token settles it; the stop string itself is never emitted.
"""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str]):
        self._stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the text, once one did

    def push(self, text: str) -> tuple[str, bool]:
        """Feed new text; return (text safe to emit, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        buffer = self._held + text
        hits = [(position, stop) for stop in self._stops if (position := buffer.find(stop)) >= 0]
        if hits:
            self._held = ""
            position, self.matched = min(hits, key=lambda hit: hit[0])
            return buffer[:position], True
        keep = self._partial_match_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """The generation ended for another reason: what was held back is plain text."""
        held, self._held = self._held, ""
        return held

    def _partial_match_length(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that begins some stop string."""
        longest = min(len(buffer), max(len(s) for s in self._stops) - 1)
        for k in range(longest, 0, -1):
            tail = buffer[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
