"""Log backends. Every backend passes the contract suite in tests/contract/."""

from charter.bus.log.base import ChainBreak, EventLog, LogEntry, Receipt, VerifyReport, entry_hash

__all__ = ["ChainBreak", "EventLog", "LogEntry", "Receipt", "VerifyReport", "entry_hash"]
