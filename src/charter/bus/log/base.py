"""The log interface: append-only, hash-chained, durable, with named consumers.

Each entry commits to the one before it: `hash = SHA-256(prev_hash || seq as 8 bytes || SHA-256(raw))`
where `raw` is the canonical envelope, signature included. The first entry's `prev_hash` is 32 zero
bytes. Any backend (SQLite today, NATS JetStream later) must keep exactly this chain, so that a log
verified on one verifies on the other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from charter.bus.envelope import Envelope

GENESIS = b"\x00" * 32


def entry_hash(prev: bytes, seq: int, raw: bytes) -> bytes:
    return hashlib.sha256(prev + seq.to_bytes(8, "big") + hashlib.sha256(raw).digest()).digest()


class DuplicateIds(Exception):
    """Some envelopes reuse an id already in the log (or earlier in the same batch); nothing was appended."""

    def __init__(self, positions: set[int]) -> None:
        super().__init__(f"{len(positions)} envelope id(s) already in the log")
        self.positions = positions


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a publisher gets back once its envelope is durable."""

    seq: int
    id: str
    hash: str  # hex

    def to_dict(self) -> dict[str, object]:
        return {"seq": self.seq, "id": self.id, "hash": self.hash}


@dataclass(frozen=True, slots=True)
class LogEntry:
    seq: int
    id: str
    subject: str
    sender: str
    ts: int
    kind: str
    raw: bytes
    hash: bytes
    prev: bytes
    appended_at: int

    def receipt(self) -> Receipt:
        return Receipt(self.seq, self.id, self.hash.hex())


@dataclass(slots=True)
class ChainBreak:
    seq: int
    reason: str


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    head_seq: int = 0
    head_hash: str = ""
    horizon_seq: int = 0  # entries up to here were archived and removed (retention); the chain starts after
    breaks: list[ChainBreak] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaks

    @property
    def first_bad(self) -> int | None:
        return self.breaks[0].seq if self.breaks else None


@dataclass(frozen=True, slots=True)
class ConsumerState:
    owner: str
    name: str
    pattern: str
    acked_seq: int


@runtime_checkable
class EventLog(Protocol):
    """What the bus needs from a log. Async so that networked backends fit the same shape."""

    async def append(self, envelopes: Sequence[Envelope]) -> list[Receipt]:
        """Append atomically, in order; return only once every entry is durable.

        Raises DuplicateIds (appending nothing) if an envelope id is already in the log.
        """

    async def head(self) -> tuple[int, bytes]:
        """(last seq, its hash); (0, GENESIS) when empty."""

    async def read(self, after_seq: int, limit: int = 1000) -> list[LogEntry]:
        """Entries with seq > after_seq, in order."""

    async def get(self, seq: int) -> LogEntry | None: ...

    async def wait(self, after_seq: int, timeout: float) -> int:
        """Return the head seq as soon as it passes `after_seq`, or after `timeout` seconds."""

    async def recent_nonces(self, since_ms: int) -> list[tuple[str, str, int]]:
        """(sender, nonce, ts) of entries with ts >= since_ms: rebuilds the replay guard."""

    async def verify(self, progress: Callable[[int, int], None] | None = None) -> VerifyReport: ...

    async def consumer(self, owner: str, name: str) -> ConsumerState | None: ...

    async def put_consumer(self, state: ConsumerState) -> None: ...

    async def ack(self, owner: str, name: str, seq: int) -> ConsumerState: ...

    async def close(self) -> None: ...
