"""OpenAI's Chat Completions and (legacy) Completions APIs: bodies, conversion to the internal
request, and the chunk stream both share."""
