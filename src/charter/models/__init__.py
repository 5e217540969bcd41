"""The model gateway: backends, circuit breakers, deep probes, and the router that falls back."""
