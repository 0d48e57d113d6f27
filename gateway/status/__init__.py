"""What the gateway serves and how it is doing: /v1/models (and Codex's catalog), /v1/workers,
/health and /metrics."""
