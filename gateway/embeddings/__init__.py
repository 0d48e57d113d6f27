"""POST /v1/embeddings: OpenAI's Embeddings API, served by embedding workers (worker/embeddings.py)."""
