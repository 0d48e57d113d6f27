"""The OpenAI Responses API: request normalization, events, the response store."""
