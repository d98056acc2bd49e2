"""The HTTP API (FastAPI). Never imports docker: it talks to the store, manifest and queue."""
