"""Backends: Ollama's native API, any OpenAI-compatible server, and the degraded last rung."""
