"""``python tests/scripted_worker.py [--script-log FILE] <worker args>``: the real worker, plus scripted output.

A request whose last user message with "SCRIPT:<text>" in it makes the model write <text> (see
tiny_model.scripted_logits_processors): a script of steps "a|||b|||c" writes step k when k tool
results follow that message; every other request is served normally.

For agents that compact their conversation (Claude Code), a compaction request (Claude Code's,
whose last user message asks for "a detailed summary of the conversation so far") is answered
with a summary that carries the script on, ``<summary>RESUME:<script id>:<step></summary>``: the
script (this worker keeps every script it has seen) from the first step whose tool result the
request does not hold, or, when the request no longer holds the scripted message (its head cut
off to fit), from the step after the last one this worker wrote. Claude Code puts the summary
in the continued conversation's first user message, and a user message with "RESUME:" plays on
like one with "SCRIPT:" (step s + k once k tool results follow it), so the session goes on.

``--answer TEXT``: every request without a script is answered with TEXT (a whole reply, then the
end of the turn), for suites whose prompts cannot carry one.

``--script-log FILE`` appends one JSON object a line for every request the model serves: ``kind``
("script", "summary" or "model": not scripted), ``step`` and ``steps`` (the step written, or
the first one a summary leaves to play, of how many), ``resumed`` (the script went on from a
summary), ``tool_results`` and ``messages``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_model import (  # noqa: E402
    HARNESS_TEXT,
    SCRIPT_PREFIX,
    STEP_SEPARATOR,
    forced_output,
    scripted_logits_processors,
)

RESUME_PREFIX = "RESUME:"
_RESUMED = re.compile(re.escape(RESUME_PREFIX) + r"([0-9a-f]{12}):(\d+)")
# Claude Code's compaction prompt (its last user message) asks for this.
COMPACTION_REQUEST = "summary of the conversation so far"


def _text(message: dict[str, Any]) -> str:
    return str(message.get("content") or "")


def _tool_results(messages: list[dict[str, Any]]) -> int:
    return sum(1 for m in messages if m.get("role") == "tool")


class ScriptedModel:
    """The logits-processor factory: scripted steps, compaction summaries, else the model."""

    def __init__(self, loaded: Any, log_path: Path | None, answer: str | None = None) -> None:
        self.tokenizer = loaded.tokenizer
        self.answer = answer  # --answer: what a request without a script gets (else the model's own)
        self.plain = scripted_logits_processors(loaded)
        self.log_path = log_path
        self.scripts: dict[str, list[str]] = {}  # every script seen, by id
        self.last_written: tuple[str, int] | None = None  # the last script played, and its next step

    def _position(self, message: dict[str, Any]) -> tuple[str, int, bool] | None:
        """A user message's script (its id), the step it starts at, and whether from a summary."""
        if message.get("role") != "user":
            return None
        text = _text(message)
        if SCRIPT_PREFIX in text:
            script = text.split(SCRIPT_PREFIX, 1)[1].split(HARNESS_TEXT)[0]
            key = hashlib.sha256(script.encode()).hexdigest()[:12]
            self.scripts.setdefault(key, script.split(STEP_SEPARATOR))
            return key, 0, False
        resumed = _RESUMED.search(text)
        if resumed and resumed[1] in self.scripts:
            return resumed[1], int(resumed[2]), True
        return None

    def _scripted(self, messages: list[dict[str, Any]]) -> tuple[int, tuple[str, int, bool]] | None:
        """The last user message that carries a script, and its position."""
        found = [(i, p) for i, m in enumerate(messages) if (p := self._position(m)) is not None]
        return found[-1] if found else None

    def __call__(self, request: Any) -> list[Any]:
        messages = list(request.messages or [])
        summary = self._summary(request, messages)
        if summary is not None:
            return [forced_output(self.tokenizer, summary)]
        scripted = self._scripted(messages)
        if scripted is None or (request.chat_template_kwargs or {}).get("test_script") is not None:
            processors = self.plain(request)
            if not processors and self.answer is not None:
                processors = [forced_output(self.tokenizer, self.answer)]
            self._log(kind="script" if processors else "model", step=None, steps=None, resumed=False,
                      tool_results=_tool_results(messages), messages=len(messages))
            return processors
        at, (key, start, resumed) = scripted
        steps = self.scripts[key]
        step = start + _tool_results(messages[at:])
        playing = step < len(steps)
        if playing:
            self.last_written = (key, step + 1)
        self._log(kind="script" if playing else "model", step=step if playing else None, steps=len(steps),
                  resumed=resumed, tool_results=_tool_results(messages[at:]), messages=len(messages))
        if resumed:  # played as the rest of the script in a "SCRIPT:" message
            messages[at] = {"role": "user", "content": SCRIPT_PREFIX + STEP_SEPARATOR.join(steps[start:])}
            request = dataclasses.replace(request, messages=messages)
        return self.plain(request)

    def _summary(self, request: Any, messages: list[dict[str, Any]]) -> str | None:
        """A compaction request's answer: where the script goes on, past the results it holds."""
        if not messages or messages[-1].get("role") != "user" or COMPACTION_REQUEST not in _text(messages[-1]):
            return None
        scripted = self._scripted(messages[:-1])
        position: tuple[str, int] | None = None
        if scripted is not None:
            at, (key, start, _) = scripted
            position = key, start + _tool_results(messages[at:-1])
        elif self.last_written is not None:  # the head, script and all, was cut off to fit
            position = self.last_written
        steps = self.scripts[position[0]] if position else []
        self._log(kind="summary", step=position[1] if position else None, steps=len(steps), resumed=False,
                  tool_results=_tool_results(messages), messages=len(messages))
        if position is not None and position[1] < len(steps):
            body = f"{RESUME_PREFIX}{position[0]}:{position[1]}"
        else:
            body = "The scripted session is done."
        think = "</think>" if (request.chat_template_kwargs or {}).get("enable_thinking") else ""
        return f"{think}<analysis>A scripted session.</analysis>\n<summary>\n{body}\n</summary>"

    def _log(self, **entry: Any) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write(json.dumps(entry) + "\n")


def main(argv: list[str]) -> int:
    options: dict[str, str] = {}
    for name in ("--script-log", "--answer"):
        if name in argv:
            at = argv.index(name)
            options[name] = argv[at + 1]
            argv = argv[:at] + argv[at + 2:]
    log_path = Path(options["--script-log"]) if "--script-log" in options else None
    from worker.cli import main as worker_main

    return worker_main(argv, make_logits_processors=lambda loaded: ScriptedModel(loaded, log_path,
                                                                                 options.get("--answer")))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
