"""The gateway process: OpenAI-compatible HTTP in front of model workers on ZeroMQ."""
