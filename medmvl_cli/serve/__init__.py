"""`medmvl serve`: an OpenAI-compatible chat-completions server with dynamic batching.

`schemas` (request models, OpenAI's error body), `media` (content parts -> files the readers
take), `batcher` (concurrent requests -> one generate), `app` (FastAPI routes), `server` (loading
the model, binding, running uvicorn). See docs/serving.md.
"""
