"""The EventLog contract: what every log backend must do, tested through the protocol only.

A new backend adds one factory here and must pass every test unchanged: the factories live in
BACKENDS in tests/contract/conftest.py (today only "sqlite"; NATS JetStream and others add theirs
there). The `log` fixture is a fresh, empty log on each backend in turn; `backend.instance()` opens
another instance on the same storage (to reopen it, or to run two side by side).

Tests that need more than the protocol say so with `@pytest.mark.requires(...)` and are skipped for
backends without that capability:
  - `shared_storage`: two instances appending to one storage (one SQLite file) keep one chain;
  - `sqlite_file`: tamper detection, which edits the SQLite file with sqlite3 and runs `verify_file`
    and `charter log verify` on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from charter.bus.envelope import Envelope, seal
from charter.bus.log.base import GENESIS, ConsumerState, DuplicateIds, EventLog, LogEntry, Receipt, entry_hash
from charter.bus.log.sqlite import SqliteLog, verify_file
from charter.config import Home
from charter.encoding import canonical, loads
from charter.errors import NOT_FOUND, CharterError
from charter.identity.init import init_home
from charter.identity.keys import SigningKey

from .conftest import Backend

pytestmark = pytest.mark.anyio

KEY = SigningKey.generate()
SENDER = "agt_contract"


def env(n: int, *, sender: str = SENDER, ts: int | None = None, eid: str | None = None,
        subject: str | None = None) -> Envelope:
    return seal(KEY, sender=sender, subject=subject or f"agents.contract.n{n % 7}", payload={"n": n}, ts=ts, eid=eid)


def envs(count: int, start: int = 0) -> list[Envelope]:
    return [env(start + i) for i in range(count)]


async def fill(log: EventLog, count: int) -> list[Envelope]:
    """Append `count` envelopes, some singly and some in batches; return them in log order."""
    out = envs(count)
    i = 0
    while i < count:
        size = 1 if i % 3 == 0 else 3
        await log.append(out[i:i + size])
        i += size
    return out


def check_entry(entry: LogEntry, e: Envelope, seq: int, prev: bytes) -> None:
    assert entry.seq == seq
    assert (entry.id, entry.subject, entry.sender, entry.ts, entry.kind) == (e.id, e.subject, e.sender, e.ts, e.kind)
    assert entry.raw == e.raw
    assert entry.prev == prev
    assert entry.hash == entry_hash(prev, seq, e.raw)


async def all_entries(log: EventLog) -> list[LogEntry]:
    out: list[LogEntry] = []
    while batch := await log.read(out[-1].seq if out else 0, 100):
        out += batch
    return out


def assert_one_chain(entries: list[LogEntry]) -> None:
    prev = GENESIS
    for i, e in enumerate(entries, start=1):
        assert e.seq == i, f"seq {e.seq} where {i} was expected"
        assert e.prev == prev, f"entry {e.seq} does not link to {e.seq - 1}"
        assert e.hash == entry_hash(e.prev, e.seq, e.raw), f"entry {e.seq} hash is wrong"
        prev = e.hash


# -- appending and the head ------------------------------------------------------------------


async def test_empty_log_head_is_genesis(log: EventLog) -> None:
    assert isinstance(log, EventLog)
    assert await log.head() == (0, b"\x00" * 32)
    assert await log.read(0) == []
    assert await log.get(1) is None
    assert await log.recent_nonces(0) == []


async def test_append_returns_contiguous_receipts_with_chain_hashes(log: EventLog) -> None:
    single = [env(i) for i in range(3)]
    batch = envs(4, start=3)
    receipts: list[Receipt] = []
    for e in single:
        receipts += await log.append([e])
    receipts += await log.append(batch)
    everything = single + batch

    assert [r.seq for r in receipts] == list(range(1, 8))
    assert [r.id for r in receipts] == [e.id for e in everything]
    prev = GENESIS
    for r, e in zip(receipts, everything, strict=True):
        expected = entry_hash(prev, r.seq, e.raw)
        assert r.hash == expected.hex()
        assert r.to_dict() == {"seq": r.seq, "id": e.id, "hash": expected.hex()}
        prev = expected
    assert await log.head() == (7, prev)


async def test_appending_nothing_changes_nothing(log: EventLog) -> None:
    await log.append(envs(2))
    before = await log.head()
    assert await log.append([]) == []
    assert await log.head() == before


@pytest.mark.parametrize("where", ["existing", "within_batch"])
async def test_batch_with_duplicate_id_fails_as_a_whole(log: EventLog, where: str) -> None:
    old = envs(3)
    await log.append(old)
    head = await log.head()
    fresh = envs(3, start=100)
    clash = old[1].id if where == "existing" else fresh[0].id
    bad_batch = [fresh[0], fresh[1], env(999, eid=clash), fresh[2]]

    with pytest.raises(DuplicateIds) as refused:
        await log.append(bad_batch)
    assert refused.value.positions == {2}  # the reused id; a first occurrence in the batch is not a duplicate

    assert await log.head() == head
    assert [e.id for e in await log.read(0)] == [e.id for e in old]
    assert await log.get(head[0] + 1) is None
    nonces = {tuple(n) for n in await log.recent_nonces(0)}
    assert not nonces & {(e.sender, e.nonce, e.ts) for e in bad_batch}

    # The failure left no gap and no fork: the next append continues the chain where it was.
    (r,) = await log.append([fresh[0]])
    assert r.seq == head[0] + 1
    assert r.hash == entry_hash(head[1], r.seq, fresh[0].raw).hex()
    assert (await log.verify()).ok


async def test_read_returns_the_exact_window_in_order(log: EventLog) -> None:
    appended = await fill(log, 10)
    everything = await log.read(0)
    assert [e.seq for e in everything] == list(range(1, 11))
    prev = GENESIS
    for entry, e in zip(everything, appended, strict=True):
        check_entry(entry, e, entry.seq, prev)
        prev = entry.hash

    def seqs(entries: list[LogEntry]) -> list[int]:
        return [e.seq for e in entries]

    assert seqs(await log.read(3, 4)) == [4, 5, 6, 7]
    assert seqs(await log.read(0, 1)) == [1]
    assert seqs(await log.read(8, 100)) == [9, 10]
    assert seqs(await log.read(9)) == [10]
    assert await log.read(10) == []
    assert await log.read(50) == []
    assert await log.read(3, 4) == everything[3:7]


SUBJECTS = ("charter.decisions.x", "charter.decisions.y.z", "charter.decisionsx.a", "charter.agents.a.enrolled",
            "agents.a.b", "agents.a.b.c", "charter.decisions")


@pytest.mark.parametrize("patterns", [("charter.decisions.>",), ("agents.*.b",), ("agents.>", "charter.agents.>"),
                                      ("charter.*",), (">",), ("nothing.here",)])
async def test_read_matching_filters_exactly_by_pattern_in_both_directions(log: EventLog, patterns) -> None:
    """What the capsule builder and the reflector read: the log's own filter agrees with `matches`."""
    from charter.bus.log.scan import read_matching
    from charter.bus.subjects import matches

    await log.append([env(i, subject=SUBJECTS[i % len(SUBJECTS)]) for i in range(60)])
    every = await log.read(0, 100)
    want = [e.seq for e in every if any(matches(p, e.subject) for p in patterns)]

    def seqs(entries: list[LogEntry]) -> list[int]:
        return [e.seq for e in entries]

    assert seqs(await read_matching(log, patterns)) == want
    assert seqs(await read_matching(log, patterns, newest_first=True)) == want[::-1]
    assert seqs(await read_matching(log, patterns, limit=3)) == want[:3]
    assert seqs(await read_matching(log, patterns, limit=3, newest_first=True)) == want[::-1][:3]
    window = [s for s in want if 10 < s <= 40]
    assert seqs(await read_matching(log, patterns, after=10, upto=40)) == window
    assert seqs(await read_matching(log, patterns, after=10, upto=40, newest_first=True)) == window[::-1]
    assert await read_matching(log, patterns, limit=0) == []


async def test_read_matching_can_keep_one_sender(log: EventLog) -> None:
    from charter.bus.log.scan import read_matching

    await log.append([env(i, subject="charter.agents.x", sender=("operator", SENDER)[i % 2]) for i in range(40)])
    mine = [e.seq for e in await log.read(0, 100) if e.sender == "operator"]
    assert [e.seq for e in await read_matching(log, ("charter.>",), sender="operator")] == mine
    assert [e.seq for e in await read_matching(log, ("charter.>",), sender="operator", limit=5, newest_first=True)] \
        == mine[::-1][:5]
    assert await read_matching(log, ("charter.>",), sender="agt_nobody") == []


async def test_get_returns_one_entry_or_none(log: EventLog) -> None:
    appended = await fill(log, 6)
    everything = await log.read(0)
    for entry in everything:
        assert await log.get(entry.seq) == entry
    assert (await log.get(4)).id == appended[3].id  # type: ignore[union-attr]
    assert await log.get(0) is None
    assert await log.get(7) is None
    assert await log.get(10_000) is None


async def test_every_entry_links_to_the_one_before(log: EventLog) -> None:
    await fill(log, 25)
    entries = await log.read(0)
    assert_one_chain(entries)
    assert await log.head() == (25, entries[-1].hash)


# -- waiting and nonces ----------------------------------------------------------------------


async def test_wait_returns_promptly_when_another_task_appends(log: EventLog) -> None:
    await log.append(envs(2))

    async def append_later() -> None:
        await asyncio.sleep(0.1)
        await log.append([env(50)])

    t0 = time.monotonic()
    task = asyncio.create_task(append_later())
    head = await log.wait(2, timeout=5.0)
    elapsed = time.monotonic() - t0
    await task
    assert head == 3
    assert elapsed < 1.0, f"wait took {elapsed:.2f}s after an append at 0.1s"


async def test_wait_returns_at_once_when_the_head_is_already_past(log: EventLog) -> None:
    await log.append(envs(3))
    t0 = time.monotonic()
    assert await log.wait(1, timeout=5.0) == 3
    assert time.monotonic() - t0 < 0.5


async def test_wait_times_out_with_the_old_head(log: EventLog) -> None:
    await log.append(envs(2))
    t0 = time.monotonic()
    assert await log.wait(2, timeout=0.3) == 2
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 1.5
    t0 = time.monotonic()
    assert await log.wait(5, timeout=0.1) == 2  # after_seq beyond the head: times out with the head
    assert time.monotonic() - t0 >= 0.05


async def test_recent_nonces_since(log: EventLog) -> None:
    now = int(time.time() * 1000)
    old = env(1, ts=now - 60_000)
    edge = env(2, ts=now - 30_000)
    new = [env(3, ts=now - 10), env(4, ts=now, sender="agt_other")]
    await log.append([old])
    await log.append([edge, *new])
    got = {tuple(n) for n in await log.recent_nonces(now - 30_000)}
    assert got == {(e.sender, e.nonce, e.ts) for e in [edge, *new]}
    assert {tuple(n) for n in await log.recent_nonces(0)} == {(e.sender, e.nonce, e.ts) for e in [old, edge, *new]}
    assert await log.recent_nonces(now + 1) == []


# -- consumers -------------------------------------------------------------------------------


async def test_consumers_store_and_ack_cumulatively(log: EventLog) -> None:
    await log.append(envs(10))
    assert await log.consumer("agt_a", "jobs") is None
    await log.put_consumer(ConsumerState("agt_a", "jobs", "agents.>", 0))
    await log.put_consumer(ConsumerState("agt_b", "jobs", "tasks.>", 2))
    assert await log.consumer("agt_a", "jobs") == ConsumerState("agt_a", "jobs", "agents.>", 0)

    assert await log.ack("agt_a", "jobs", 5) == ConsumerState("agt_a", "jobs", "agents.>", 5)
    assert (await log.ack("agt_a", "jobs", 3)).acked_seq == 5  # never moves back
    assert (await log.ack("agt_a", "jobs", 5)).acked_seq == 5
    assert (await log.ack("agt_a", "jobs", 8)).acked_seq == 8
    assert (await log.consumer("agt_a", "jobs")).acked_seq == 8  # type: ignore[union-attr]
    # Consumers are per (owner, name): agt_b's "jobs" is its own.
    assert await log.consumer("agt_b", "jobs") == ConsumerState("agt_b", "jobs", "tasks.>", 2)
    assert await log.consumer("agt_a", "other") is None


async def test_ack_of_an_unknown_consumer_is_not_found(log: EventLog) -> None:
    await log.append(envs(2))
    with pytest.raises(CharterError) as info:
        await log.ack("agt_a", "nobody", 1)
    assert info.value.code == NOT_FOUND
    assert await log.consumer("agt_a", "nobody") is None
    await log.put_consumer(ConsumerState("agt_b", "nobody", ">", 0))
    with pytest.raises(CharterError) as info:  # another owner's consumer of that name is not yours
        await log.ack("agt_a", "nobody", 1)
    assert info.value.code == NOT_FOUND


# -- verification and durability -------------------------------------------------------------


async def test_verify_on_an_untouched_log(log: EventLog) -> None:
    empty = await log.verify()
    assert empty.ok and empty.checked == 0 and empty.head_seq == 0 and empty.first_bad is None
    await fill(log, 30)
    seq, head_hash = await log.head()
    seen: list[tuple[int, int]] = []
    report = await log.verify(lambda done, total: seen.append((done, total)))
    assert report.ok, report.breaks
    assert report.breaks == [] and report.first_bad is None
    assert report.checked == seq == 30
    assert (report.head_seq, report.head_hash) == (seq, head_hash.hex())
    if seen:  # progress is optional, but if reported it must end complete
        assert seen[-1] == (30, 30)


async def test_reopening_keeps_everything_and_continues_the_chain(backend: Backend, log: EventLog) -> None:
    appended = await fill(log, 12)
    await log.put_consumer(ConsumerState("agt_a", "jobs", "agents.>", 0))
    await log.ack("agt_a", "jobs", 7)
    head = await log.head()
    before = await log.read(0)
    await log.close()

    again = await backend.instance()
    assert await again.head() == head
    assert await again.read(0) == before
    assert [e.id for e in before] == [e.id for e in appended]
    assert await again.consumer("agt_a", "jobs") == ConsumerState("agt_a", "jobs", "agents.>", 7)
    assert {tuple(n) for n in await again.recent_nonces(0)} == {(e.sender, e.nonce, e.ts) for e in appended}

    more = envs(3, start=500)
    receipts = await again.append(more)
    assert [r.seq for r in receipts] == [13, 14, 15]
    assert receipts[0].hash == entry_hash(head[1], 13, more[0].raw).hex()
    with pytest.raises(DuplicateIds):  # ids stay unique across a reopen
        await again.append([env(0, eid=appended[0].id)])
    report = await again.verify()
    assert report.ok and report.checked == 15 and report.head_seq == 15
    assert_one_chain(await again.read(0))


@pytest.mark.requires("shared_storage")
async def test_two_instances_on_one_storage_keep_one_chain(backend: Backend, log: EventLog) -> None:
    other = await backend.instance()
    ids: list[str] = []
    for round_ in range(10):
        for inst, size in ((log, 1), (other, 2), (other, 1), (log, 3)):
            batch = envs(size, start=round_ * 100 + len(ids))
            receipts = await inst.append(batch)
            assert [r.seq for r in receipts] == list(range(len(ids) + 1, len(ids) + size + 1))
            ids += [e.id for e in batch]
    assert await log.head() == await other.head()
    entries = await all_entries(log)
    assert [e.id for e in entries] == ids
    assert_one_chain(entries)
    # Each instance sees its neighbour's appends (wait() may only notice them at its timeout).
    assert await other.wait(len(ids) - 1, 0.1) == len(ids)
    assert (await other.verify()).ok


_WRITER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from charter.bus.envelope import seal
    from charter.bus.log.sqlite import SqliteLog
    from charter.identity.keys import SigningKey

    path, name, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    key = SigningKey.generate()
    envs = [seal(key, sender=name, subject="agents." + name + ".n", payload={"i": i}) for i in range(count)]
    log = SqliteLog(path)
    sys.stdin.readline()  # start together
    out = []
    for i in range(0, count, 4):
        chunk = envs[i:i + (1 if i % 8 else 4)]
        out += [r.to_dict() for r in log.append_sync(chunk)]
    log.close_sync()
    print(json.dumps(out))
""")


@pytest.mark.requires("sqlite_file")
async def test_two_processes_appending_at_once_keep_one_chain(backend: Backend, log: EventLog) -> None:
    await log.append(envs(3))
    await log.close()
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(backend.path), name, "200"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for name in ("agt_w1", "agt_w2")
    ]
    outs = [p.communicate("go\n", timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    receipts = [r for out in outs for r in json.loads(out)]
    report = verify_file(backend.path)  # type: ignore[arg-type]
    assert report.ok, report.breaks
    assert report.checked == report.head_seq == 3 + len(receipts)
    again = await backend.instance()
    by_seq = {e.seq: e for e in await all_entries(again)}
    assert sorted(r["seq"] for r in receipts) == list(range(4, 4 + len(receipts)))
    for r in receipts:
        assert (by_seq[r["seq"]].id, by_seq[r["seq"]].hash.hex()) == (r["id"], r["hash"])
    senders = [by_seq[s].sender for s in sorted(by_seq) if s > 3]
    assert senders.count("agt_w1") == senders.count("agt_w2")


# -- tamper detection (SQLite: the file is edited behind the backend's back) -------------------

N_ENTRIES = 8


def _row(db: sqlite3.Connection, seq: int) -> dict:
    cur = db.execute("SELECT * FROM log WHERE seq = ?", (seq,))
    return dict(zip([c[0] for c in cur.description], cur.fetchone(), strict=True))


def _insert(db: sqlite3.Connection, row: dict) -> None:
    cols = ", ".join(row)
    db.execute(f"INSERT INTO log ({cols}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))


def _forged_row(db: sqlite3.Connection, seq: int, *, linked: bool) -> dict:
    """A new envelope, signed by a key the bus never issued, dressed as entry `seq`."""
    template = _row(db, seq)
    fake = seal(SigningKey.generate(), sender=template["sender"], subject=template["subject"],
                payload={"forged": True})
    prev = bytes(_row(db, seq - 1)["hash"]) if linked else bytes(template["prev"])
    digest = entry_hash(prev, seq, fake.raw) if linked else bytes(template["hash"])
    return {**template, "id": fake.id, "ts": fake.ts, "nonce": fake.nonce, "raw": fake.raw,
            "prev": prev, "hash": digest}


def _shift_up_from(db: sqlite3.Connection, seq: int) -> None:
    # Two steps, so the primary key never collides mid-update.
    db.execute("UPDATE log SET seq = -(seq + 1) WHERE seq >= ?", (seq,))
    db.execute("UPDATE log SET seq = -seq WHERE seq < 0")


def tamper_edit_payload(db: sqlite3.Connection) -> int:
    raw = _row(db, 4)["raw"]
    doc = loads(bytes(raw))
    doc["payload"] = {"n": 12345}
    db.execute("UPDATE log SET raw = ? WHERE seq = 4", (canonical(doc),))
    return 4


def tamper_edit_payload_byte(db: sqlite3.Connection) -> int:
    raw = bytearray(_row(db, 6)["raw"])
    i = raw.index(b'"n":') + 4
    raw[i] = ord("9") if raw[i] != ord("9") else ord("8")
    db.execute("UPDATE log SET raw = ? WHERE seq = 6", (bytes(raw),))
    return 6


def tamper_edit_indexed_column(db: sqlite3.Connection) -> int:
    db.execute("UPDATE log SET subject = 'agents.contract.elsewhere' WHERE seq = 5")
    return 5


def tamper_delete_middle(db: sqlite3.Connection) -> int:
    db.execute("DELETE FROM log WHERE seq = 5")
    return 5


def tamper_delete_first(db: sqlite3.Connection) -> int:
    db.execute("DELETE FROM log WHERE seq = 1")
    return 1


def tamper_insert_forged(db: sqlite3.Connection) -> int:
    # A forger who copies entry 4's chain fields onto its own envelope: entry 4 no longer adds up.
    row = _forged_row(db, 4, linked=False)
    _shift_up_from(db, 4)
    _insert(db, row)
    return 4


def tamper_insert_forged_linked(db: sqlite3.Connection) -> int:
    # A forger who also recomputes the forged entry's hash at its position: the chain (which checks
    # no signatures) first fails at the genuine entry it displaced, now seq 5, linking to seq 3.
    row = _forged_row(db, 4, linked=True)
    _shift_up_from(db, 4)
    _insert(db, row)
    return 5


def tamper_swap(db: sqlite3.Connection) -> int:
    db.execute("UPDATE log SET seq = -1 WHERE seq = 3")
    db.execute("UPDATE log SET seq = 3 WHERE seq = 4")
    db.execute("UPDATE log SET seq = 4 WHERE seq = -1")
    return 3


def tamper_change_hash(db: sqlite3.Connection) -> int:
    db.execute("UPDATE log SET hash = ? WHERE seq = 7", (hashlib.sha256(b"not it").digest(),))
    return 7


def tamper_change_last_hash(db: sqlite3.Connection) -> int:
    db.execute("UPDATE log SET hash = ? WHERE seq = ?", (hashlib.sha256(b"x").digest(), N_ENTRIES))
    return N_ENTRIES


def tamper_change_prev(db: sqlite3.Connection) -> int:
    db.execute("UPDATE log SET prev = ? WHERE seq = 2", (GENESIS,))
    return 2


TAMPERS: dict[str, Callable[[sqlite3.Connection], int]] = {
    name.removeprefix("tamper_"): fn for name, fn in globals().items() if name.startswith("tamper_")
}


async def _built_and_closed(backend: Backend, log: EventLog) -> Path:
    await fill(log, N_ENTRIES)
    assert (await log.verify()).ok
    await log.close()
    assert backend.path is not None
    return backend.path


def tamper(path: Path, fn: Callable[[sqlite3.Connection], int]) -> int:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN")
        bad = fn(db)
        db.execute("COMMIT")
    finally:
        db.close()
    return bad


@pytest.mark.requires("sqlite_file")
@pytest.mark.parametrize("how", sorted(TAMPERS))
async def test_verify_names_the_first_bad_seq(backend: Backend, log: EventLog, how: str) -> None:
    path = await _built_and_closed(backend, log)
    first_bad = tamper(path, TAMPERS[how])
    report = verify_file(path)
    assert not report.ok
    assert report.first_bad == first_bad, report.breaks
    assert all(b.seq >= first_bad for b in report.breaks)
    # The backend's own verify() says the same.
    again = await backend.instance()
    assert (await again.verify()).first_bad == first_bad


def forge_tail_entry(db: sqlite3.Connection) -> int:
    """A forged entry after the head, linked and hashed correctly: only a signature check sees it."""
    last = _row(db, N_ENTRIES)
    fake = seal(SigningKey.generate(), sender=last["sender"], subject=last["subject"], payload={"forged": True})
    prev = bytes(last["hash"])
    _insert(db, {**last, "seq": N_ENTRIES + 1, "id": fake.id, "ts": fake.ts, "nonce": fake.nonce,
                 "raw": fake.raw, "prev": prev, "hash": entry_hash(prev, N_ENTRIES + 1, fake.raw)})
    return N_ENTRIES + 1


@pytest.mark.requires("sqlite_file")
@pytest.mark.parametrize(("how", "chain_only"), [
    (forge_tail_entry, None),  # links alone cannot see a well-linked forged head
    (tamper_insert_forged_linked, 5),  # links alone see only the displaced genuine entry
])
async def test_signature_check_names_a_well_linked_forgery(backend: Backend, log: EventLog, how, chain_only) -> None:
    root = SigningKey.generate()  # entries written as the daemon writes its own, so all verify
    for i in range(N_ENTRIES):
        await log.append([seal(root, sender="operator", subject="charter.test.entry", payload={"n": i})])
    await log.close()
    path = backend.path
    assert path is not None
    assert verify_file(path, root=root.public).ok
    tamper(path, how)
    assert verify_file(path).first_bad == chain_only
    report = verify_file(path, root=root.public)
    forged = N_ENTRIES + 1 if how is forge_tail_entry else 4
    assert report.first_bad == forged, report.breaks


def _cli_verify(home: Home) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "charter", "--home", str(home.root), "log", "verify", "--json"],
        capture_output=True, text=True, timeout=60,
    )
    return proc.returncode, json.loads(proc.stdout)


async def test_cli_log_verify_exit_codes(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    init_home(home)
    root = SigningKey.load_pem(home.root_key_path)  # entries as the daemon writes its own: valid to every check
    log = SqliteLog(home.db_path)
    for i in range(N_ENTRIES):
        await log.append([seal(root, sender="operator", subject="charter.test.entry", payload={"n": i})])
    head_seq, head_hash = await log.head()
    await log.close()

    code, doc = _cli_verify(home)
    assert code == 0, doc
    assert doc["ok"] is True and doc["first_bad_seq"] is None and doc["breaks"] == []
    assert doc["checked"] == doc["head_seq"] == head_seq == N_ENTRIES
    assert doc["head_hash"] == head_hash.hex()

    tamper(home.db_path, tamper_edit_payload)
    code, doc = _cli_verify(home)
    assert code == 5, doc
    assert doc["ok"] is False
    assert doc["first_bad_seq"] == 4
    assert doc["breaks"][0]["seq"] == 4
