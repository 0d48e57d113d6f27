"""HTTP plumbing under every route: the middleware (request ids, API keys, body limit), error
handlers, the SSE and WebSocket senders, the OpenAPI rewrite and uvicorn's idle timeout."""
