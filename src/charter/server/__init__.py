"""The daemon's HTTP surface: agent API, operator API, OpenAPI description."""
