"""Sandboxes: each agent's private directory, with a byte quota and no way out."""

from charter.sandbox.sandbox import Sandbox

__all__ = ["Sandbox"]
