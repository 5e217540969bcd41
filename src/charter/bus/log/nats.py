"""The `nats` log: the same hash chain, kept in one NATS JetStream stream.

Layout (stream `CHARTER` by default):

- the stream holds subject `_charter.<stream>.log`, file storage, no limits (nothing ever ages out),
  `deny_delete` and `deny_purge`, so that no client can remove a message through the API;
- **one JetStream message per append call**. A message holds the whole batch: its Charter sequence
  numbers, the `prev` hash of its first entry and each entry's hash and canonical envelope. JetStream
  stores a message or does not: a batch is all or nothing, exactly as one SQLite transaction is
  (JetStream 2.9 has no multi-message transaction; the batch has to fit in the server's
  `max_payload`, 1 MiB by default, or the append is refused before anything is written);
- every publish carries `Nats-Expected-Last-Sequence` = the stream sequence the writer built on. If
  another writer got there first, the server refuses it (`wrong last sequence`); the writer re-reads
  the new messages, recomputes `prev` and `seq`, and tries again. Two writers (two daemons on two
  machines) therefore build one chain and can never fork it;
- every publish also carries `Nats-Msg-Id`, a random token kept across the retries of one append. A
  retry after a lost acknowledgement (a server restart mid-publish) is answered from JetStream's
  duplicate window with the original message instead of storing it twice, and the token is in the
  message body too, so a writer recognises its own message when it re-reads the stream.

Named consumers (owner, name, pattern, acknowledged seq) live in a JetStream key-value bucket
`<stream>_consumers`: acknowledgements are compare-and-set updates on the key's revision, so they
are cumulative and never move back, even with several daemons acknowledging at once. (A JetStream
durable consumer counts stream messages, not Charter entries, and Charter delivers through
`read`/`wait` under its own scope checks, so the bucket is the faithful place for this state.)

Each instance keeps an index of the stream in memory: per stream message its first Charter seq and
its newest envelope timestamp (16 bytes), every envelope id (for `DuplicateIds`, which must hold
forever, not only within JetStream's duplicate window), and a bounded cache of decoded entries.
Opening an instance reads the stream once to build it. Other instances announce new messages on
`_charter.<stream>.head` (core NATS, best effort); `wait` also re-reads the stream head every
`poll` seconds, so a lost announcement only delays a waiter.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import os
import re
import struct
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from charter.bus.envelope import Envelope, parse
from charter.bus.log.base import (
    GENESIS,
    ChainBreak,
    ConsumerState,
    DuplicateIds,
    LogEntry,
    Receipt,
    VerifyReport,
    entry_hash,
)
from charter.encoding import EncodingError, canonical, loads
from charter.errors import NOT_FOUND, TOO_LARGE, CharterError
from charter.identity.keys import PublicKey

log = logging.getLogger("charter.bus.log.nats")

LOG_UNAVAILABLE = "log_unavailable"
_MAGIC = b"CHL1"
_HEAD = struct.Struct(">4s16sQIQ32s")  # magic, token, first seq, count, appended_at (ms), prev hash
_ENTRY = struct.Struct(">I32s")  # length of the raw envelope, its chain hash
_WRONG_LAST_SEQ = 10071  # JetStream's error code for a failed Nats-Expected-Last-Sequence
_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_KEY_PART = re.compile(r"[A-Za-z0-9_-]+")
_FETCH_WINDOW = 256  # direct gets in flight at once


def encode_message(token: bytes, first: int, appended_at: int, prev: bytes,
                   items: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The body of one log message: a header, then (length, hash, raw) per entry."""
    parts = [_HEAD.pack(_MAGIC, token, first, len(items), appended_at, prev)]
    for digest, raw in items:
        parts.append(_ENTRY.pack(len(raw), digest))
        parts.append(raw)
    return b"".join(parts)


@dataclass(slots=True)
class Decoded:
    token: bytes
    first: int
    appended_at: int
    prev: bytes
    items: list[tuple[bytes, bytes]]  # (hash, raw)


def decode_message(data: bytes) -> Decoded:
    """Raises ValueError on anything that is not a well-formed log message."""
    if len(data) < _HEAD.size:
        raise ValueError("shorter than a log message header")
    magic, token, first, count, appended_at, prev = _HEAD.unpack_from(data, 0)
    if magic != _MAGIC:
        raise ValueError("not a Charter log message")
    pos, items = _HEAD.size, []
    for _ in range(count):
        if pos + _ENTRY.size > len(data):
            raise ValueError("truncated entry header")
        size, digest = _ENTRY.unpack_from(data, pos)
        pos += _ENTRY.size
        if pos + size > len(data):
            raise ValueError("truncated entry")
        items.append((digest, bytes(data[pos:pos + size])))
        pos += size
    if pos != len(data):
        raise ValueError("trailing bytes after the last entry")
    return Decoded(token, first, appended_at, prev, items)


def _entry_from(seq: int, digest: bytes, prev: bytes, raw: bytes, appended_at: int) -> LogEntry:
    doc = loads(raw)
    if not isinstance(doc, dict):
        raise EncodingError("an entry is not a JSON object")
    return LogEntry(seq, doc["id"], doc["subject"], doc["sender"], doc["ts"], doc["kind"], raw, digest, prev,
                    appended_at)


def _entries(d: Decoded) -> list[LogEntry]:
    """The entries of a decoded message, with their links checked (ValueError if they do not hold)."""
    out, prev = [], d.prev
    for i, (digest, raw) in enumerate(d.items):
        seq = d.first + i
        if entry_hash(prev, seq, raw) != digest:
            raise ValueError(f"entry {seq}: hash does not match its content")
        try:
            out.append(_entry_from(seq, digest, prev, raw, d.appended_at))
        except (EncodingError, KeyError, TypeError) as exc:
            raise ValueError(f"entry {seq}: not an envelope ({exc})") from None
        prev = digest
    return out


@dataclass(slots=True)
class _Call:
    envelopes: list[Envelope]
    future: asyncio.Future[list[Receipt]]
    size: int = 0


@dataclass(slots=True)
class _Index:
    """What an instance knows of the stream, up to stream sequence `sseq`."""

    sseq: int = 0
    seq: int = 0
    head: bytes = GENESIS
    firsts: array = field(default_factory=lambda: array("Q"))  # per stream message: its first Charter seq
    max_ts: array = field(default_factory=lambda: array("q"))  # per stream message: its newest envelope ts
    ids: set[str] = field(default_factory=set)
    skipped: set[int] = field(default_factory=set)  # stream seqs that are not part of the chain
    tokens: OrderedDict[bytes, int] = field(default_factory=OrderedDict)  # recent append tokens -> sseq


class NatsLog:
    """EventLog on NATS JetStream. Use from one event loop; open lazily on first use (or `await open()`)."""

    def __init__(
        self,
        url: str | Sequence[str] = "nats://127.0.0.1:4222",
        stream: str = "CHARTER",
        *,
        creds: str | None = None,
        replicas: int = 1,
        request_timeout: float = 2.0,
        append_timeout: float = 30.0,
        poll: float = 0.5,
        cache_entries: int = 20_000,
        connect_options: dict[str, Any] | None = None,
    ) -> None:
        if not _STREAM_NAME.fullmatch(stream):
            raise CharterError("config", f"stream name {stream!r}: use letters, digits, '_' or '-'", "bus.stream")
        self.url = url
        self.stream = stream
        self.subject = f"_charter.{stream}.log"
        self.notify_subject = f"_charter.{stream}.head"
        self.bucket = f"{stream}_consumers"
        self.creds = creds
        self.replicas = replicas
        self.request_timeout = request_timeout
        self.append_timeout = append_timeout
        self.poll = poll
        self.cache_entries = cache_entries
        self._connect_options = connect_options or {}
        self._nc: Any = None
        self._js: Any = None
        self._kv: Any = None
        self._direct = True
        self._max_payload = 1024 * 1024
        self._ix = _Index()
        self._cache: OrderedDict[int, list[LogEntry]] = OrderedDict()
        self._cached = 0
        self._lock = asyncio.Lock()  # guards the index and the stream head we build on
        self._open_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._queue: list[_Call] = []
        self._writer: asyncio.Task[None] | None = None
        self._syncer: asyncio.Task[None] | None = None
        self._closed = False
        self._last_error = ""

    # -- connection and setup -------------------------------------------------------------

    async def open(self) -> NatsLog:
        await self._ensure()
        return self

    async def _ensure(self) -> None:
        if self._nc is not None:
            return
        if self._closed:
            raise CharterError(LOG_UNAVAILABLE, "this log instance is closed", "bus")
        async with self._open_lock:
            if self._nc is not None:
                return
            import nats

            opts: dict[str, Any] = {
                "name": f"charter-log-{self.stream}",
                "max_reconnect_attempts": 2,  # while connecting for the first time; forever after
                "reconnect_time_wait": 0.2,
                "connect_timeout": 2,
                "error_cb": self._on_error,
            }
            if self.creds:
                opts["user_credentials"] = self.creds
            opts.update(self._connect_options)
            servers = [self.url] if isinstance(self.url, str) else list(self.url)
            try:
                nc = await nats.connect(servers=servers, **opts)
            except Exception as exc:  # noqa: BLE001 - every way of failing to connect reads the same
                raise CharterError(LOG_UNAVAILABLE, f"cannot reach NATS at {self.url}: {exc!r}", "bus.nats_url") from None
            nc.options["max_reconnect_attempts"] = -1  # once up, ride out server restarts
            try:
                self._js = nc.jetstream(timeout=self.request_timeout)
                self._max_payload = nc.max_payload or self._max_payload
                await self._setup()
                await nc.subscribe(self.notify_subject, cb=self._on_notify)
                self._nc = nc
                async with self._lock:
                    await self._sync_locked()
            except BaseException as exc:
                self._nc = None
                await nc.close()
                if isinstance(exc, Exception) and not isinstance(exc, CharterError):
                    raise CharterError(LOG_UNAVAILABLE, f"could not open the log on {self.url}: {exc!r} (is JetStream "
                                       "enabled, and may this user manage streams?)", "bus") from None
                raise

    async def _on_error(self, exc: Exception) -> None:
        said = repr(exc)
        if said != self._last_error:  # a server down for a while says the same thing every 200 ms
            self._last_error = said
            log.warning("nats (log %s): %s", self.stream, said)

    async def _setup(self) -> None:
        from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
        from nats.js.errors import APIError, BucketNotFoundError

        cfg = StreamConfig(
            name=self.stream, subjects=[self.subject], storage=StorageType.FILE, retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.NEW, max_msgs=-1, max_bytes=-1, max_age=0, deny_delete=True, deny_purge=True,
            allow_direct=True, duplicate_window=120.0, num_replicas=self.replicas,
            description="Charter's hash-chained bus log: one message per append",
        )
        try:
            await self._js.add_stream(cfg)
        except APIError:  # it exists with another configuration: say what is wrong with it
            pass
        info = await self._js.stream_info(self.stream)
        c = info.config
        problems = []
        if self.subject not in (c.subjects or []):
            problems.append(f"its subjects are {c.subjects}, not [{self.subject!r}]")
        if c.storage != StorageType.FILE:
            problems.append("it is not file storage")
        if not (c.deny_delete and c.deny_purge):
            problems.append("it allows deleting or purging messages")
        if (c.max_msgs or -1) > 0 or (c.max_bytes or -1) > 0 or (c.max_age or 0) > 0 or \
                (c.max_msgs_per_subject or -1) > 0:
            problems.append("it has a limit that would drop old entries")
        if problems:
            raise CharterError(
                "conflict", f"JetStream stream {self.stream!r} exists but cannot hold the log: " + "; ".join(problems),
                "bus.stream")
        self._direct = bool(c.allow_direct)
        try:
            self._kv = await self._js.key_value(self.bucket)
        except BucketNotFoundError:
            try:
                self._kv = await self._js.create_key_value(KeyValueConfig(
                    bucket=self.bucket, history=1, storage=StorageType.FILE, replicas=self.replicas,
                    description="Charter's named consumers: acknowledged position per (owner, name)"))
            except APIError:  # created by another instance in the meantime
                self._kv = await self._js.key_value(self.bucket)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None and not self._writer.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), self.append_timeout)
            except (TimeoutError, asyncio.CancelledError):
                self._writer.cancel()
        if self._syncer is not None:
            self._syncer.cancel()
        if self._nc is not None:
            nc, self._nc = self._nc, None
            try:
                await nc.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    async def delete_storage(self) -> None:
        """Delete the stream and the consumer bucket (tests and benchmarks; never called by Charter itself)."""
        await self._ensure()
        for name in (self.stream, f"KV_{self.bucket}"):
            try:
                await self._js.delete_stream(name)
            except Exception:  # noqa: BLE001 - already gone
                pass

    # -- the index ------------------------------------------------------------------------

    def _unavailable(self, exc: BaseException, doing: str) -> CharterError:
        return CharterError(LOG_UNAVAILABLE, f"NATS JetStream did not answer while {doing}: {exc!r}", "bus")

    async def _stream_last(self) -> int:
        try:
            info = await self._js.stream_info(self.stream)
        except Exception as exc:  # noqa: BLE001 - nats-py raises several unrelated types here
            raise self._unavailable(exc, "reading the stream head") from None
        return int(info.state.last_seq)

    async def _get(self, sseq: int) -> bytes | None:
        from nats.js.errors import NotFoundError

        try:
            msg = await self._js.get_msg(self.stream, seq=sseq, direct=self._direct)
        except NotFoundError:
            return None
        return msg.data or b""

    async def _fetch(self, seqs: Sequence[int]) -> list[bytes | None]:
        """Message bodies by stream seq, many requests in flight at once."""
        out: list[bytes | None] = []
        try:
            for i in range(0, len(seqs), _FETCH_WINDOW):
                out += await asyncio.gather(*(self._get(s) for s in seqs[i:i + _FETCH_WINDOW]))
        except CharterError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._unavailable(exc, "reading log messages") from None
        return out

    def _remember(self, sseq: int, entries: list[LogEntry]) -> None:
        if not entries or self.cache_entries <= 0:
            return
        self._cache[sseq] = entries
        self._cached += len(entries)
        while self._cached > self.cache_entries and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old)

    def _index(self, sseq: int, token: bytes, entries: list[LogEntry]) -> None:
        ix = self._ix
        assert sseq == ix.sseq + 1, (sseq, ix.sseq)
        ix.sseq = sseq
        ix.firsts.append(entries[0].seq if entries else ix.seq + 1)
        ix.max_ts.append(max((e.ts for e in entries), default=-(2**62)))
        if entries:
            ix.seq, ix.head = entries[-1].seq, entries[-1].hash
            ix.ids.update(e.id for e in entries)
            self._remember(sseq, entries)
        if token:
            ix.tokens[token] = sseq
            if len(ix.tokens) > 10_000:
                ix.tokens.popitem(last=False)
        self._changed.set()
        self._changed = asyncio.Event()

    def _ingest(self, sseq: int, data: bytes | None) -> None:
        """Add one stream message read from the server to the index (or skip it, saying why)."""
        ix = self._ix
        try:
            if data is None:
                raise ValueError("missing from the stream")
            d = decode_message(data)
            if d.first != ix.seq + 1 or d.prev != ix.head:
                raise ValueError(f"starts at seq {d.first} on another head than the log's {ix.seq}")
            entries = _entries(d)
            if any(e.id in ix.ids for e in entries) or len({e.id for e in entries}) != len(entries):
                raise ValueError("repeats an envelope id already in the log")
        except ValueError as exc:
            log.error("stream %s message %d is not part of the chain: %s", self.stream, sseq, exc)
            ix.skipped.add(sseq)
            self._index(sseq, b"", [])
            return
        self._index(sseq, d.token, entries)

    async def _sync_locked(self) -> None:
        last = await self._stream_last()
        while self._ix.sseq < last:
            upto = min(last, self._ix.sseq + 4 * _FETCH_WINDOW)
            seqs = list(range(self._ix.sseq + 1, upto + 1))
            for s, data in zip(seqs, await self._fetch(seqs), strict=True):
                self._ingest(s, data)

    async def _sync(self) -> None:
        async with self._lock:
            await self._sync_locked()

    async def _on_notify(self, msg: Any) -> None:
        try:
            announced = int(msg.data)
        except ValueError:
            return
        if announced > self._ix.sseq and (self._syncer is None or self._syncer.done()):
            self._syncer = asyncio.get_running_loop().create_task(self._quiet_sync())

    async def _quiet_sync(self) -> None:
        try:
            await self._sync()
        except CharterError:
            pass

    async def _messages(self, sseqs: Sequence[int]) -> list[list[LogEntry]]:
        """Decoded entries of the given stream messages (indexed ones only), from the cache or the server."""
        out: dict[int, list[LogEntry]] = {}
        missing = []
        for s in sseqs:
            if s in self._ix.skipped:
                out[s] = []
            elif (hit := self._cache.get(s)) is not None:
                out[s] = hit
            else:
                missing.append(s)
        if missing:
            for s, data in zip(missing, await self._fetch(missing), strict=True):
                try:
                    out[s] = _entries(decode_message(data or b""))
                except ValueError:
                    out[s] = []
                self._remember(s, out[s])
        return [out[s] for s in sseqs]

    # -- writing --------------------------------------------------------------------------

    def _frame_size(self, envelopes: Sequence[Envelope]) -> int:
        return sum(_ENTRY.size + len(e.raw) for e in envelopes)

    async def append(self, envelopes: Sequence[Envelope]) -> list[Receipt]:
        if not envelopes:
            return []
        await self._ensure()
        envs = list(envelopes)
        size = self._frame_size(envs)
        if _HEAD.size + size > self._max_payload:
            raise CharterError(
                TOO_LARGE, f"this batch is {_HEAD.size + size} bytes as one JetStream message; the NATS server "
                f"takes at most {self._max_payload} (max_payload): send smaller batches", "batch")
        dups = self._duplicates(envs, set())
        if dups:
            raise DuplicateIds(dups)
        call = _Call(envs, asyncio.get_running_loop().create_future(), size)
        self._queue.append(call)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drain())
        return await asyncio.shield(call.future)

    def _duplicates(self, envs: Sequence[Envelope], taken: set[str]) -> set[int]:
        known, seen, dups = self._ix.ids, set(), set()
        for i, e in enumerate(envs):
            if e.id in known or e.id in taken or e.id in seen:
                dups.add(i)
            seen.add(e.id)
        return dups

    async def _drain(self) -> None:
        """Group commit: appends that arrive while one is being published go out together in the next message."""
        while self._queue:
            group, size = [], _HEAD.size
            while self._queue and (not group or size + self._queue[0].size <= self._max_payload):
                call = self._queue.pop(0)
                group.append(call)
                size += call.size
            try:
                await self._commit(group)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
                for c in group:
                    if not c.future.done():
                        c.future.set_exception(exc if isinstance(exc, Exception) else
                                               CharterError(LOG_UNAVAILABLE, "the append was cancelled", "bus"))
                if not isinstance(exc, Exception):
                    raise

    async def _commit(self, group: list[_Call]) -> None:
        import nats.errors
        from nats.js.errors import APIError

        async with self._lock:
            deadline = time.monotonic() + self.append_timeout
            attempts: dict[bytes, list[_Call]] = {}
            token, composition = b"", None
            delay = 0.05
            while True:
                # Resolve calls whose message is already in the stream (a retry after a lost ack).
                for t, calls in attempts.items():
                    if t in self._ix.tokens:
                        await self._resolve(self._ix.tokens[t], calls)
                        return
                live, taken = [], set()
                for c in group:
                    if c.future.done():
                        continue
                    dups = self._duplicates(c.envelopes, taken)
                    if dups:
                        c.future.set_exception(DuplicateIds(dups))
                        continue
                    taken.update(e.id for e in c.envelopes)
                    live.append(c)
                if not live:
                    return
                if composition != [id(c) for c in live]:  # a new token whenever the content changes
                    composition, token = [id(c) for c in live], os.urandom(16)
                    attempts[token] = live
                ix = self._ix
                seq, prev, items = ix.seq, ix.head, []
                for c in live:
                    for e in c.envelopes:
                        seq += 1
                        prev = entry_hash(prev, seq, e.raw)
                        items.append((prev, e.raw))
                now = time.time_ns() // 1_000_000
                body = encode_message(token, ix.seq + 1, now, ix.head, items)
                headers = {"Nats-Expected-Last-Sequence": str(ix.sseq), "Nats-Msg-Id": token.hex()}
                try:
                    ack = await self._js.publish(self.subject, body, timeout=self.request_timeout, headers=headers)
                except APIError as exc:
                    if exc.err_code == _WRONG_LAST_SEQ:
                        await self._sync_locked()  # another writer appended: build on its head
                        continue
                    if exc.code and exc.code < 500 and exc.code != 408:
                        raise CharterError(LOG_UNAVAILABLE, f"JetStream refused the append: {exc.description}",
                                           "bus") from None
                    error: BaseException = exc
                except (nats.errors.Error, OSError, TimeoutError) as exc:
                    error = exc
                else:
                    if ack.duplicate or ack.seq != ix.sseq + 1:
                        await self._sync_locked()
                        if token not in self._ix.tokens:  # stored, yet not in the chain: never retry that
                            raise CharterError(LOG_UNAVAILABLE, f"JetStream stored this append as message {ack.seq}, "
                                               "which does not continue the chain (see `charter log verify`)", "bus")
                        continue  # resolved through the token at the top of the loop
                    entries = []
                    p = ix.head
                    for i, (digest, raw) in enumerate(items):
                        entries.append(_entry_from(ix.seq + 1 + i, digest, p, raw, now))
                        p = digest
                    self._index(ack.seq, token, entries)
                    self._hand_out(entries, live)
                    await self._announce(ack.seq)
                    return
                # No answer: the message may or may not be stored. Retry with the same token until the
                # deadline; JetStream's duplicate window or a re-read of the stream tells which.
                if time.monotonic() + delay > deadline:
                    raise CharterError(LOG_UNAVAILABLE, f"no acknowledgement from JetStream within "
                                       f"{self.append_timeout:g}s: {error!r}", "bus")
                log.warning("append not acknowledged (%r); retrying", error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                try:
                    await self._sync_locked()
                except CharterError:
                    pass

    async def _resolve(self, sseq: int, calls: list[_Call]) -> None:
        (entries,) = await self._messages([sseq])
        self._hand_out(entries, calls)

    @staticmethod
    def _hand_out(entries: list[LogEntry], calls: list[_Call]) -> None:
        i = 0
        for c in calls:
            n = len(c.envelopes)
            if not c.future.done():
                c.future.set_result([e.receipt() for e in entries[i:i + n]])
            i += n

    async def _announce(self, sseq: int) -> None:
        try:  # core NATS: buffered, not waited for
            await self._nc.publish(self.notify_subject, str(sseq).encode())
        except Exception:  # noqa: BLE001 - best effort; waiters also poll
            pass

    # -- reading --------------------------------------------------------------------------

    def head_sync(self) -> tuple[int, bytes]:
        """The head as this instance last saw it (its own appends included), without a round trip."""
        return self._ix.seq, self._ix.head

    async def head(self) -> tuple[int, bytes]:
        await self._ensure()
        await self._sync()
        return self._ix.seq, self._ix.head

    async def read(self, after_seq: int, limit: int = 1000) -> list[LogEntry]:
        await self._ensure()
        if limit <= 0:
            return []
        after_seq = max(after_seq, 0)
        if after_seq + limit > self._ix.seq:
            await self._sync()
        ix = self._ix
        end = min(after_seq + limit, ix.seq)
        if end <= after_seq:
            return []
        k = bisect.bisect_right(ix.firsts, after_seq + 1) - 1  # the message holding after_seq + 1
        sseqs = []
        while k < len(ix.firsts) and ix.firsts[k] <= end:
            sseqs.append(k + 1)
            k += 1
        out = []
        for entries in await self._messages(sseqs):
            out += [e for e in entries if after_seq < e.seq <= end]
        return out

    async def get(self, seq: int) -> LogEntry | None:
        if seq < 1:
            return None
        got = await self.read(seq - 1, 1)
        return got[0] if got and got[0].seq == seq else None

    async def wait(self, after_seq: int, timeout: float) -> int:
        await self._ensure()
        if self._ix.seq > after_seq:
            return self._ix.seq
        deadline = time.monotonic() + timeout
        while True:
            changed = self._changed
            left = deadline - time.monotonic()
            if left <= 0:
                return self._ix.seq
            try:
                await asyncio.wait_for(changed.wait(), min(left, self.poll))
            except TimeoutError:
                try:
                    await self._sync()
                except CharterError:
                    pass
            if self._ix.seq > after_seq:
                return self._ix.seq

    async def recent_nonces(self, since_ms: int) -> list[tuple[str, str, int]]:
        await self._ensure()
        await self._sync()
        sseqs = [k + 1 for k, ts in enumerate(self._ix.max_ts) if ts >= since_ms]
        out = []
        for entries in await self._messages(sseqs):
            for e in entries:
                if e.ts >= since_ms:
                    out.append((e.sender, loads(e.raw)["nonce"], e.ts))
        return out

    async def verify(self, progress: Callable[[int, int], None] | None = None,
                     root: PublicKey | None = None) -> VerifyReport:
        """Re-read every stream message from the server and recompute the chain; names every break.

        With the root public key, every entry's signature is checked as well (see `KeyWitness`).
        """
        from charter.bus.log.witness import KeyWitness

        witness = KeyWitness(root) if root is not None else None
        await self._ensure()
        last = await self._stream_last()
        total = self._ix.seq
        report = VerifyReport()
        expected, prev = 1, GENESIS
        for start in range(1, last + 1, 4 * _FETCH_WINDOW):
            seqs = list(range(start, min(last, start + 4 * _FETCH_WINDOW - 1) + 1))
            for sseq, data in zip(seqs, await self._fetch(seqs), strict=True):
                if data is None:
                    report.breaks.append(ChainBreak(expected, f"stream message {sseq} is missing"))
                    continue
                try:
                    d = decode_message(data)
                except ValueError as exc:
                    report.breaks.append(ChainBreak(expected, f"stream message {sseq} is not a log message: {exc}"))
                    continue
                if d.first != expected:
                    report.breaks.append(ChainBreak(expected, f"sequence jumps from {expected - 1} to {d.first} "
                                                              f"at stream message {sseq}"))
                if d.prev != prev:
                    report.breaks.append(ChainBreak(d.first, "prev_hash does not match the previous entry's hash"))
                p = d.prev
                for i, (digest, raw) in enumerate(d.items):
                    seq = d.first + i
                    if entry_hash(p, seq, raw) != digest:
                        report.breaks.append(ChainBreak(seq, "hash does not match the entry's content"))
                    else:
                        try:
                            env = parse(raw, max_bytes=2**31)
                            if witness is not None and (why := witness.check(env)):
                                report.breaks.append(ChainBreak(seq, why))
                        except CharterError as exc:
                            report.breaks.append(ChainBreak(seq, f"stored envelope does not parse: {exc.message}"))
                    p = digest
                    report.checked += 1
                    report.head_seq, report.head_hash = seq, digest.hex()
                if d.items:
                    prev, expected = d.items[-1][0], d.first + len(d.items)
            if progress:
                progress(report.checked, max(total, report.checked))
        return report

    # -- consumers ------------------------------------------------------------------------

    @staticmethod
    def _key(owner: str, name: str) -> str:
        if _KEY_PART.fullmatch(owner) and _KEY_PART.fullmatch(name):
            return f"c.{owner}.{name}"
        return "x." + hashlib.sha256(canonical([owner, name])).hexdigest()

    async def _kv_get(self, owner: str, name: str) -> tuple[ConsumerState, int] | None:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self._kv.get(self._key(owner, name))
        except KeyNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001
            raise self._unavailable(exc, "reading a consumer") from None
        doc = loads(entry.value)
        return ConsumerState(doc["owner"], doc["name"], doc["pattern"], int(doc["acked_seq"])), entry.revision

    @staticmethod
    def _kv_value(state: ConsumerState) -> bytes:
        return canonical({"owner": state.owner, "name": state.name, "pattern": state.pattern,
                          "acked_seq": state.acked_seq, "updated_at": time.time_ns() // 1_000_000})

    async def consumer(self, owner: str, name: str) -> ConsumerState | None:
        await self._ensure()
        got = await self._kv_get(owner, name)
        return got[0] if got else None

    async def put_consumer(self, state: ConsumerState) -> None:
        await self._ensure()
        try:
            await self._kv.put(self._key(state.owner, state.name), self._kv_value(state))
        except Exception as exc:  # noqa: BLE001
            raise self._unavailable(exc, "storing a consumer") from None

    async def ack(self, owner: str, name: str, seq: int) -> ConsumerState:
        """Acknowledge every entry up to `seq` (cumulative); a compare-and-set, so it never moves back."""
        from nats.js.errors import KeyWrongLastSequenceError

        await self._ensure()
        while True:
            got = await self._kv_get(owner, name)
            if got is None:
                raise CharterError(NOT_FOUND, f"no consumer named {name!r}; subscribe with it first", "consumer")
            state, revision = got
            if seq <= state.acked_seq:
                return state
            new = ConsumerState(state.owner, state.name, state.pattern, seq)
            try:
                await self._kv.update(self._key(owner, name), self._kv_value(new), last=revision)
            except KeyWrongLastSequenceError:
                continue  # another daemon acknowledged in between: re-read and take the larger
            except Exception as exc:  # noqa: BLE001
                raise self._unavailable(exc, "acknowledging") from None
            return new
