"""Reflection: declared truths checked against the live system, each contradiction named."""
