"""Log backends. Every backend passes the contract suite in tests/contract/."""

from charter.bus.log.base import ChainBreak, DuplicateIds, EventLog, LogEntry, Receipt, VerifyReport, entry_hash

__all__ = ["ChainBreak", "DuplicateIds", "EventLog", "LogEntry", "Receipt", "VerifyReport", "entry_hash"]
