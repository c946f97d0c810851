"""The OpenAI-compatible HTTP server and its chat page (FastAPI + uvicorn), an engine client."""
