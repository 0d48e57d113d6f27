#!/usr/bin/env bash
# Install (into .venv), lint (ruff), type-check (mypy) and run the whole test suite.
# Arguments go to pytest, e.g.
#   bash tests/run.sh -m "not slow"     # the fast set only (no model download)
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh worker,test
# OpenAI's Codex CLI, the truest client test (tests/test_codex.py skips without it).
if command -v npm >/dev/null && ! grep -qs '"version": "0.171.0"' .tools/node_modules/@openai/codex/package.json; then
    npm install --silent --no-audit --no-fund --prefix .tools @openai/codex@0.171.0 >/dev/null \
        || echo "warning: could not install the Codex CLI; its tests will be skipped" >&2
fi
# Claude Code, likewise (tests/test_claude_code.py skips without it).
if command -v npm >/dev/null && [ ! -x .tools/node_modules/.bin/claude ]; then
    npm install --silent --no-audit --no-fund --prefix .tools @anthropic-ai/claude-code@2.1.328 >/dev/null \
        || echo "warning: could not install Claude Code; its tests will be skipped" >&2
fi
# The Open Responses compliance suite (tests/test_open_responses.py skips without it) is on GitHub
# only: where a checkout of it is in .tools/openresponses/suite, what it runs on comes from npm.
if command -v npm >/dev/null && [ -f .tools/openresponses/suite/bin/compliance-test.ts ] \
        && [ ! -x .tools/openresponses/node_modules/.bin/bun ]; then
    npm install --silent --no-audit --no-fund --prefix .tools/openresponses bun@1.3.12 zod@3.25.76 >/dev/null \
        || echo "warning: could not install Bun for the Open Responses suite; its test will be skipped" >&2
fi
# A browser for the status page's tests (tests/test_status_page.py skips without one): Debian's
# chromium, which Playwright drives; as root where apt is, else whatever chromium is on PATH.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: could not install chromium; the status page's tests will be skipped" >&2
fi
# The linter and the type checker first: a few seconds, and they catch what tests miss.
.venv/bin/ruff check protocol gateway worker tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
