"""Policies: files that are versioned and content-hashed, and the decision hook on the bus."""
