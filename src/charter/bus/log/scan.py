"""Reading the entries whose subjects match some patterns, without stalling the event loop.

The capsule builder and the reflector want a handful of operator events out of a log that is mostly
agents' traffic. Parsing thousands of entries in Python to find them holds the daemon's event loop
for hundreds of milliseconds, and every publish waits behind it. A backend that can filter in its
own engine (SQLite: `read_matching_native`, on a reader thread) does so; any other backend is read
in chunks with a yield to the loop between them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from charter.bus.log.base import EventLog, LogEntry
from charter.bus.subjects import matches

CHUNK = 500


def subject_glob(pattern: str) -> str:
    """A SQLite GLOB that every subject matching the NATS-style `pattern` also matches.

    `*` and `>` both become GLOB's `*`, which also crosses dots, so the GLOB is a superset; callers
    keep only the entries `matches` accepts. Subjects hold no GLOB metacharacters (see
    `subjects.validate_subject`), so nothing else needs escaping.
    """
    return ".".join("*" if tok in ("*", ">") else tok for tok in pattern.split("."))


def matching(entries: Sequence[LogEntry], patterns: Sequence[str], sender: str | None = None) -> list[LogEntry]:
    return [e for e in entries if (sender is None or e.sender == sender) and any(matches(p, e.subject) for p in patterns)]


async def read_matching(log: EventLog, patterns: Sequence[str], *, after: int = 0, upto: int | None = None,
                        limit: int = 1000, newest_first: bool = False, sender: str | None = None) -> list[LogEntry]:
    """Up to `limit` entries with `after < seq <= upto` whose subject matches any of `patterns`
    (and, given `sender`, sent by it: "operator" reads the daemon's own events off an index).

    Oldest first by default; `newest_first` walks back from `upto` (the head when None), for "the
    last N notable events".
    """
    if limit <= 0 or not patterns:
        return []
    if upto is None:
        upto = (await log.head())[0]
    native = getattr(log, "read_matching_native", None)
    if native is not None:
        return await native(tuple(patterns), after=after, upto=upto, limit=limit, newest_first=newest_first,
                            sender=sender)
    out: list[LogEntry] = []
    if newest_first:
        cursor = upto
        while cursor > after and len(out) < limit:
            start = max(cursor - CHUNK, after)
            out += reversed(matching(await log.read(start, cursor - start), patterns, sender))
            cursor = start
            await asyncio.sleep(0)
    else:
        cursor = after
        while cursor < upto and len(out) < limit:
            chunk = await log.read(cursor, min(CHUNK, upto - cursor))
            if not chunk:
                break
            out += matching([e for e in chunk if e.seq <= upto], patterns, sender)
            cursor = chunk[-1].seq
            await asyncio.sleep(0)
    return out[:limit]
