"""Charter: a local-first control plane for a fleet of AI agents.

The model is interchangeable, but the bus is identity.
"""

__version__ = "0.1.0"
