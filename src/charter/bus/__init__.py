"""The governed bus: envelopes, subjects and scopes, the verification pipeline, the log."""
