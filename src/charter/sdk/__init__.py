"""The agent-side client: `from charter.sdk import Agent`."""

from charter.sdk.agent import Agent, Event
from charter.sdk.credentials import Credentials

__all__ = ["Agent", "Credentials", "Event"]
