"""Serving customized policies: a continuous-batching engine over an adapter set, and an OpenAI-compatible HTTP server."""
