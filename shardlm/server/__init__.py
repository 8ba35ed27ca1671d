"""OpenAI-compatible server: FastAPI app, engine replicas in threads, Prometheus metrics."""
