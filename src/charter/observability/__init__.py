"""Observability: request ids, structured access logs, Prometheus metrics."""
