"""The archivist: the daemon's component that seals, checkpoints, mirrors and trims the log.

It works in the background of `charter up` (a task on the daemon's loop; seals, syncs and
verifications run in child processes, the rest of the file work in threads), and the CLI drives the
same class directly (in threads) when no daemon is running. Every step it takes that matters is an
event on the bus, signed by the root key like other daemon events:

    charter.archive.identity      the archivist's key and its root-signed certificate
    charter.archive.checkpoints   each checkpoint ({"checkpoint": {...}})
    charter.archive.synced        a mirror received files, or failed to verify
    charter.archive.pruned        entries removed from charter.db, and the new horizon

Its schedule, each poll: seal when `segment_entries` wait or the oldest waiting entry is older than
`seal_interval` (then checkpoint); otherwise checkpoint the live head every `checkpoint_interval`
if it moved; sync to the mirrors after a seal and every `sync_interval`; prune after a sync; verify
everything every `verify_interval`. One writer at a time: an asyncio lock in the process and a file
lock (archive/.lock) across processes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from charter.archive import checkpoints as cp
from charter.archive.children import run_in_child, warm
from charter.archive.identity import ensure_identity
from charter.archive.layout import ArchiveError, Layout, load_state, save_state
from charter.archive.retention import horizon_of, prune
from charter.archive.segments import Row, SegmentError, SegmentMeta, archive_head, seal_rows
from charter.archive.sync import sync_mirror
from charter.archive.verify import ArchiveReport, verify_archive
from charter.config import ArchiveConfig, Home
from charter.db import connect
from charter.identity.keys import PublicKey, SigningKey

log = logging.getLogger("charter.archive")
T = TypeVar("T")


def _log_failed_warm(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:  # each child's start will say it again
        log.warning("archivist: the fork server for its children did not start: %s", done.exception())


def seal_waiting(root: Path, db_path: Path, *, segment_entries: int, partial: bool, upto_seq: int | None,
                 level: int) -> list[SegmentMeta]:
    """Seal the entries of charter.db that the archive at `root` lacks: whole segments, and with
    `partial` what is left too, up to `upto_seq` if given. Reads charter.db on a connection of its
    own, so it runs as well in a child process as in a thread.

    Each segment's start is read under the archive's lock: another sealer (`charter archive seal`
    beside the daemon's child) may have sealed those entries meanwhile, and rows read before it
    did would no longer continue the archive."""
    layout = Layout(root)
    made: list[SegmentMeta] = []
    db = connect(db_path, readonly=True)
    try:
        while True:
            with layout.locked():
                after = archive_head(layout)[0]
                want = segment_entries if upto_seq is None else min(segment_entries, upto_seq - after)
                if want <= 0:
                    return made
                rows: list[Row] = [(seq, bytes(h), bytes(p), bytes(raw), ts) for seq, h, p, raw, ts in db.execute(
                    "SELECT seq, hash, prev, raw, ts FROM log WHERE seq > ? ORDER BY seq LIMIT ?", (after, want))]
                if not rows or (len(rows) < segment_entries and not partial):
                    return made
                made.append(seal_rows(layout, rows, level))
    finally:
        db.close()


def prune_archived(db_path: Path, root: Path, *, safe_seq: int, cutoff_ts: int, root_key: PublicKey) -> dict[str, Any]:
    """Remove from charter.db what the archive at `root` holds, up to `safe_seq` and older than
    `cutoff_ts`, a batch (`retention.BATCH`) at a time, each entry compared with its archived copy
    first."""
    layout = Layout(root)
    total = 0
    while True:
        with layout.locked():
            r = prune(db_path, layout, safe_seq=safe_seq, cutoff_ts=cutoff_ts, root=root_key)
        total += r["pruned"]
        if not r["pruned"]:
            return {"pruned": total, "horizon_seq": r["horizon_seq"]}


Emit = Callable[..., Awaitable[Any]]


class Archivist:
    def __init__(self, home: Home, config: ArchiveConfig, root_key: SigningKey, log_: Any, emit: Emit,
                 *, sqlite: bool = True, isolated: bool = False) -> None:
        self.home, self.config, self.root_key, self.log, self.emit = home, config, root_key, log_, emit
        self.sqlite = sqlite  # the live log is charter.db (retention and the live cross-check need it)
        self.isolated = isolated  # seal and sync in a child process: the event loop keeps the GIL
        self.layout = Layout(home.root / "archive")
        self.db_path = home.db_path
        self.key: SigningKey | None = None
        self._lock = asyncio.Lock()
        self._sync_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._own_log: Any = None
        self.last_error: str | None = None
        self.last_verify: dict[str, Any] | None = None
        now = time.time()
        self._last_sync = 0.0
        self._next_verify = now + min(60.0, config.verify_interval)
        self._archived, self._segments, self._last_cp = 0, 0, None
        try:
            self._refresh()
        except Exception as exc:  # noqa: BLE001 - a damaged archive must not stop the daemon; verify names it
            self.last_error = f"cannot read the archive: {exc}"

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def for_node(cls, node: Any) -> Archivist:
        archivist = cls(node.home, node.config.archive, node.root_key, node.log, node.emit,
                        sqlite=node.config.bus.backend == "sqlite", isolated=True)
        providers = getattr(node, "state_providers", None)
        if isinstance(providers, dict):
            providers["archive"] = archivist.live_state
        return archivist

    @classmethod
    def local(cls, home: Home) -> Archivist:
        """For the CLI without a daemon: events are appended to charter.db directly, signed by the root key."""
        from charter.bus.envelope import seal
        from charter.bus.log.backends import open_log
        from charter.identity.registry import OPERATOR_ID

        config = home.load_config()
        root_key = SigningKey.load_pem(home.root_key_path)
        log_ = open_log(config.bus, home.db_path)

        async def emit(subject: str, payload: Any, kind: str = "event") -> Any:
            env = seal(root_key, sender=OPERATOR_ID, subject=subject, payload=payload, kind=kind)
            return (await log_.append([env]))[0]

        archivist = cls(home, config.archive, root_key, log_, emit, sqlite=config.bus.backend == "sqlite")
        archivist._own_log = log_
        return archivist

    @property
    def mirrors(self) -> list[Path]:
        out = []
        for m in self.config.mirrors:
            p = Path(m).expanduser()
            out.append(p if p.is_absolute() else self.home.root / p)
        return out

    # -- lifecycle (daemon) ----------------------------------------------------------------------

    @property
    def poll(self) -> float:
        c = self.config
        return max(0.05, min(5.0, c.seal_interval / 4, c.checkpoint_interval / 4))

    def start(self) -> None:
        if self.config.enabled and self._task is None:
            loop = asyncio.get_running_loop()
            if self.isolated:  # the fork server starts beside the daemon, not in its first seal
                loop.run_in_executor(None, warm).add_done_callback(_log_failed_warm)
            self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        # The identity (key, certificate, event) is set up by the first seal or checkpoint, so that a
        # daemon that never has anything to archive adds nothing to the log.
        while True:
            await asyncio.sleep(self.poll)
            try:
                await self.tick()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep going; the next poll retries
                message = str(exc)
                if message != self.last_error:
                    log.error("archivist: %s", message, exc_info=not isinstance(exc, (ArchiveError, SegmentError)))
                    if isinstance(exc, (ArchiveError, SegmentError)):
                        self._next_verify = 0.0  # a refusal to seal: verify now, so reflection names it
                self.last_error = message

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._task = None
        if self._own_log is not None:
            await self._own_log.close()
            self._own_log = None

    async def tick(self) -> None:
        """One round of the daemon's schedule."""
        c = self.config
        now = time.time()
        if now >= self._next_verify:  # first: a refusal below must not keep the verdict from reflection
            self._next_verify = now + c.verify_interval
            await self.verify()
        self._refresh()  # another process (`charter archive seal` without the daemon) may have sealed
        head_seq, _ = await self.log.head()
        pending = head_seq - self._archived
        only_own = self._last_cp is not None and pending == 1 and head_seq == self._last_cp["head"]["seq"] + 1
        sealed = False
        if pending > 0 and not only_own:
            full = pending >= c.segment_entries
            first = await self.log.get(self._archived + 1)
            stale = first is not None and now * 1000 - first.appended_at >= c.seal_interval * 1000
            if full or stale:
                result = await self.seal(partial=stale)
                sealed = bool(result["sealed"])
        if not sealed and self._checkpoint_due(head_seq, now):
            await self.checkpoint()
        if self.mirrors and (sealed or now - self._last_sync >= c.sync_interval):
            await self.sync()
            if c.hot_retention > 0:
                await self.prune()
        elif sealed and c.hot_retention > 0 and not self.mirrors and c.prune_unmirrored:
            await self.prune()

    def _checkpoint_due(self, head_seq: int, now: float) -> bool:
        last = self._last_cp
        if last is None:
            return head_seq > 0 and self._archived > 0
        moved = head_seq > last["head"]["seq"] + 1  # +1: its own checkpoint event
        return moved and now * 1000 - last["ts"] >= self.config.checkpoint_interval * 1000

    # -- the work --------------------------------------------------------------------------------

    def _refresh(self) -> None:
        self._archived, _h, _f, self._segments = archive_head(self.layout)
        latest = cp.latest(self.layout)
        self._last_cp = latest if latest is not None and not cp.malformed(latest) else None

    async def ensure_identity(self) -> dict[str, Any]:
        def work() -> tuple[SigningKey, dict[str, Any]]:
            with self.layout.locked():
                key, cert, _new = ensure_identity(self.layout, self.home.keys_dir, self.root_key)
                return key, cert

        self.key, cert = await asyncio.to_thread(work)
        state = load_state(self.layout)
        published = state.get("identity_published", [])
        if cert["key_id"] not in published:
            await self.emit("charter.archive.identity", {"key_id": cert["key_id"], "public_key": cert["public_key"],
                                                         "certificate": cert})
            self._update_state(lambda s: s.setdefault("identity_published", []).append(cert["key_id"]))
        return cert

    def _update_state(self, change: Callable[[dict[str, Any]], Any]) -> None:
        with self.layout.locked():
            state = load_state(self.layout)
            change(state)
            save_state(self.layout, state)

    async def seal(self, *, partial: bool = True, upto_seq: int | None = None) -> dict[str, Any]:
        """Seal what waits (full segments; the rest too with `partial`), then sign a checkpoint."""
        async with self._lock:
            if self.key is None:
                await self.ensure_identity()
            made = await self._seal_from_log(partial, upto_seq)
            self._refresh()
            doc = None
            head_seq = (await self.log.head())[0]
            last = self._last_cp
            if made or last is None or head_seq > last["head"]["seq"] + 1:
                doc = await self._checkpoint()
        return {
            "sealed": [{"segment": m.segment, "first_seq": m.first_seq, "last_seq": m.last_seq, "count": m.count,
                        "bytes": m.bytes, "raw_bytes": m.raw_bytes, "root": m.root} for m in made],
            "checkpoint": doc, "archived_seq": self._archived,
        }

    async def _offload(self, job: Callable[[], T]) -> T:
        """Run long Python work (a seal, a mirror's sync and its verification) in a child process
        when this is the daemon (`isolated`), else in a thread: see `verify`."""
        if self.isolated:
            return await run_in_child(job)
        return await asyncio.to_thread(job)

    async def _seal_from_log(self, partial: bool, upto_seq: int | None) -> list[Any]:
        """Seal what waits, one segment at a time.

        On SQLite the work reads charter.db itself (`seal_waiting`), in a child process when this is
        the daemon: reading and hashing a segment of 10,000 entries is ~0.2 s of Python, and in a
        thread it held the GIL against the event loop that long (`gateway_compare --priced
        --concurrency 16`, 12,000 requests a side, a seal in each daemon: added p99 x0.66 in a
        child; with the seal switched off, x0.86). Any other log is read through the EventLog, here.
        """
        c = self.config
        if self.sqlite:
            job = functools.partial(seal_waiting, self.layout.root, self.db_path, segment_entries=c.segment_entries,
                                    partial=partial, upto_seq=upto_seq, level=c.compression_level)
            return await self._offload(job)
        made: list[Any] = []
        after = archive_head(self.layout)[0]
        while True:
            want = c.segment_entries if upto_seq is None else min(c.segment_entries, upto_seq - after)
            rows: list[Row] = []
            cursor = after
            while len(rows) < want:
                batch = await self.log.read(cursor, min(250, want - len(rows)))
                if not batch:
                    break
                rows += [(e.seq, e.hash, e.prev, e.raw, e.ts) for e in batch]
                cursor = batch[-1].seq
                await asyncio.sleep(0)  # a log that reads on the loop (NATS decoding, say): publishes in between
            if want <= 0 or not rows or (len(rows) < c.segment_entries and not partial):
                return made

            def work(rows: list[Row] = rows) -> tuple[SegmentMeta | None, int]:
                # Read on the loop, before the lock: another sealer may have sealed some meanwhile.
                with self.layout.locked():
                    head = archive_head(self.layout)[0]
                    rows = [r for r in rows if r[0] > head]
                    if not rows or (len(rows) < c.segment_entries and not partial):
                        return None, head
                    meta = seal_rows(self.layout, rows, c.compression_level)
                    return meta, meta.last_seq

            meta, after = await asyncio.to_thread(work)
            if meta is not None:
                made.append(meta)

    async def checkpoint(self) -> dict[str, Any]:
        async with self._lock:
            if self.key is None:
                await self.ensure_identity()
            return await self._checkpoint()

    async def _checkpoint(self) -> dict[str, Any]:
        assert self.key is not None
        head = await self.log.head()
        key = self.key

        def work() -> dict[str, Any]:
            with self.layout.locked():
                return cp.make(self.layout, key, self.root_key.public.key_id, head)

        doc = await asyncio.to_thread(work)
        self._refresh()  # before the event: its readers (the dashboard) ask `state()` at once
        await self.emit(cp.SUBJECT, {"checkpoint": doc})
        return doc

    async def sync(self) -> list[dict[str, Any]]:
        """Copy to every mirror, verify each copy; record the results (retention reads them)."""
        results = []
        async with self._sync_lock:
            for mirror in self.mirrors:
                r = await self._offload(functools.partial(sync_mirror, self.layout.root, mirror,
                                                          root=self.root_key.public))
                key = str(mirror)

                def record(state: dict[str, Any], r: Any = r, key: str = key) -> None:
                    mirrors = state.setdefault("mirrors", {})
                    before = mirrors.get(key, {})
                    mirrors[key] = {
                        "ok": r.ok, "at": r.at, "first_bad_seq": r.first_bad_seq, "error": r.error,
                        "conflicts": r.conflicts[:5],
                        "synced_seq": r.archived if r.ok else before.get("synced_seq", 0),
                        "last_ok_at": r.at if r.ok else before.get("last_ok_at"),
                    }

                await asyncio.to_thread(self._update_state, record)
                if r.copied or not r.ok:
                    await self.emit("charter.archive.synced", {
                        "mirror": key, "ok": r.ok, "files": len(r.copied), "bytes": r.copied_bytes,
                        "resumed_bytes": r.resumed_bytes, "verified": r.verified, "first_bad_seq": r.first_bad_seq,
                        "archived": r.archived, "conflicts": r.conflicts[:5], "error": r.error,
                    })
                results.append(r.to_dict())
            self._last_sync = time.time()
        return results

    def retention_boundary(self) -> tuple[int, str | None]:
        """The highest seq that may leave charter.db as far as safety goes, and why not more."""
        c = self.config
        if self._last_cp is None:
            return 0, "no checkpoint yet"
        safe = min(self._last_cp["tree_size"], self._archived)
        if not self.mirrors:
            if not c.prune_unmirrored:
                return 0, "no mirror is configured ([archive] mirrors); set prune_unmirrored = true to prune anyway"
            return safe, None
        mirrors = load_state(self.layout).get("mirrors", {})
        for m in self.mirrors:
            st = mirrors.get(str(m))
            if not st or not st.get("last_ok_at"):
                return 0, f"mirror {m} has no verified copy yet"
            safe = min(safe, int(st.get("synced_seq") or 0))
        return safe, None

    async def prune(self, now_ms: int | None = None) -> dict[str, Any]:
        c = self.config
        if not self.sqlite:
            return {"pruned": 0, "horizon_seq": 0,
                    "reason": "retention trims charter.db; a JetStream stream keeps to its own limits"}
        if c.hot_retention <= 0:
            return {"pruned": 0, "horizon_seq": horizon_of(self.db_path),
                    "reason": "hot_retention is 0: every entry stays in charter.db"}
        async with self._lock:
            safe, why = self.retention_boundary()
            if why:
                return {"pruned": 0, "horizon_seq": horizon_of(self.db_path), "reason": why}
            cutoff = (now_ms if now_ms is not None else int(time.time() * 1000)) - int(c.hot_retention * 1000)

            # In a thread, not a child: its DELETEs hold charter.db's write lock, which the daemon's
            # appends wait for on the loop; a niced child, preempted meanwhile, would hold it longer.
            result = await asyncio.to_thread(prune_archived, self.db_path, self.layout.root, safe_seq=safe,
                                             cutoff_ts=cutoff, root_key=self.root_key.public)
        if result["pruned"]:
            await self.emit("charter.archive.pruned", result)
        return result

    async def verify(self, *, signatures: bool = False) -> ArchiveReport:
        """A full verification, in a child process at a lower priority.

        It recomputes every hash of the archive and the live log in Python: in a thread of the
        daemon it held the GIL against the event loop for as long as it ran (seconds on a big log),
        and every model call and publish meanwhile waited for it. A process of its own competes
        only for a core, and loses it to the daemon when they share one.

        Under the archivist's lock: the child reads the archive, then charter.db, and a seal and a
        prune in between (a segment whose index it had not seen yet, then the same entries pruned
        from charter.db) would read as entries that exist nowhere. Seals wait meanwhile; requests
        do not.
        """
        async with self._lock:  # (and `charter archive verify` holds the layout's lock: `Layout.reading`)
            report = await run_in_child(functools.partial(
                verify_archive, self.layout.root, db_path=self.db_path if self.sqlite else None,
                root=self.root_key.public, signatures=signatures))
        first = report.sorted_breaks()[0] if report.breaks else None
        self.last_verify = {"ok": report.ok, "at": time.time(), "first_bad_seq": report.first_bad,
                            "reason": first.reason if first else None}
        return report

    # -- what others read --------------------------------------------------------------------------

    async def live_state(self) -> dict[str, Any]:
        """`node.state_providers["archive"]`: what reflection and the capsules read."""
        return self.state()

    def state(self) -> dict[str, Any]:
        """The archive's live state for reflection and capsules (cheap: no verification here)."""
        mirrors = load_state(self.layout).get("mirrors", {}) if self.mirrors else {}
        syncs = [mirrors.get(str(m), {}).get("last_ok_at") for m in self.mirrors]
        last_cp = self._last_cp
        v = self.last_verify
        return {
            "enabled": self.config.enabled,
            "archived_seq": self._archived,
            "segments": self._segments,
            "checkpoints": last_cp["number"] if last_cp else 0,
            "last_checkpoint_at": last_cp["ts"] / 1000 if last_cp else None,
            "verified": v["ok"] if v else None,
            "verified_at": v["at"] if v else None,
            "first_bad_seq": v["first_bad_seq"] if v else None,
            "reason": v["reason"] if v else None,
            "mirrors": [str(m) for m in self.mirrors],
            "last_sync_at": None if not syncs or None in syncs else min(syncs),
            "sync_max_age_s": self.config.sync_max_age,
            "last_error": self.last_error,
        }
