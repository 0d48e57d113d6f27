"""Anthropic's Messages API (what Claude Code speaks): body, conversion, events; no transport."""
