"""Crash tests through a real daemon: SIGKILL it while agents publish, and SIGSTOP it.

What a receipt promises is that the envelope is durable and chained. So: several enrolled agents
publish (single `/v1/publish` and `/v1/publish/batch` requests) and record every receipt they are
given; the daemon is killed with SIGKILL mid-stream, restarted on the same home, and then

  - every acknowledged seq is in the log with the same id and hash;
  - the chain verifies, seqs run 1..head with no gap, and a request that was in flight at the kill
    is either wholly in the log or not at all;
  - the restarted daemon appends onto the same chain;
  - an acknowledged envelope sent again is refused as `replay`: the replay guard is rebuilt;
  - an unacknowledged one sent again is accepted once, or refused as `replay` if it had landed.

Nothing is mocked: the daemon is `python -m charter up`, the signal is real.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from charter.bus.envelope import Envelope
from charter.bus.log.sqlite import verify_file
from charter.config import Home
from charter.errors import REPLAY, CharterError
from charter.identity.keys import SigningKey
from charter.sdk import Agent
from charter.sdk.http import UNREACHABLE, SignedClient
from charter.server.daemon import read_daemon_file, spawn

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]

ROUNDS = 3
PUBLISHERS = 4


@dataclass
class Ledger:
    """What the publishers were told: receipts, and the requests that got no answer."""

    acked: dict[int, tuple[str, str]] = field(default_factory=dict)  # seq -> (id, hash)
    acked_at: list[float] = field(default_factory=list)
    singles: list[Envelope] = field(default_factory=list)  # acknowledged, sent alone
    batches: list[list[Envelope]] = field(default_factory=list)  # acknowledged, sent as one batch
    unanswered: list[list[Envelope]] = field(default_factory=list)  # one request's envelopes each
    errors: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)  # unanswered requests per sender

    def record(self, envs: list[Envelope], results: list[dict]) -> None:
        assert len(results) == len(envs)
        for e, r in zip(envs, results, strict=True):
            assert "error" not in r, f"a fresh envelope was refused: {r}"
            assert r["id"] == e.id
            assert r["seq"] not in self.acked, f"seq {r['seq']} acknowledged twice"
            self.acked[r["seq"]] = (r["id"], r["hash"])
        self.acked_at.append(time.monotonic())


async def send(agent: Agent, envs: list[Envelope], *, batch: bool) -> list[dict]:
    if not batch:
        return [await agent.publish_envelope(envs[0])]
    body = b"[" + b",".join(e.raw for e in envs) + b"]"
    answer = await agent.http.call("POST", "/v1/publish/batch", body=body, signed=False)
    return answer["results"]


def expected_failure(exc: BaseException) -> str | None:
    """A name for the failures a dead or frozen daemon causes; None for anything else."""
    if isinstance(exc, CharterError):
        return exc.code if exc.code in (UNREACHABLE, "timeout") else None
    return None


async def publisher(agent: Agent, ledger: Ledger, stop: asyncio.Event, batch_size: int) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        batch = i % 2 == 0
        envs = [agent.seal(f"agents.{agent.name}.crash", {"i": i, "j": j}) for j in range(batch_size if batch else 1)]
        try:
            results = await send(agent, envs, batch=batch)
        except Exception as exc:  # noqa: BLE001 - sorted below
            name = expected_failure(exc)
            if name is None:
                raise
            ledger.errors[name] += 1
            ledger.failed[agent.id] += 1
            ledger.unanswered.append(envs)
            await asyncio.sleep(0.01)
            continue
        ledger.record(envs, results)
        if batch:
            ledger.batches.append(envs)
        else:
            ledger.singles.append(envs[0])


async def publish_during(agents: list[Agent], ledger: Ledger, scenario: Callable[[], Awaitable[None]]) -> None:
    """Run one publisher per agent (batches of 3, 5, 7...) for as long as `scenario` runs."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(publisher(a, ledger, stop, batch_size=3 + 2 * k)) for k, a in enumerate(agents)]
    try:
        await scenario()
    finally:
        stop.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    for r in results:
        if isinstance(r, BaseException):
            raise r


def log_rows(db_path: Path) -> dict[int, tuple[str, str, bytes, str]]:
    """seq -> (id, hash hex, prev, subject), read-only."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT seq, id, hash, prev, subject FROM log ORDER BY seq").fetchall()
    finally:
        db.close()
    return {r[0]: (r[1], bytes(r[2]).hex(), bytes(r[3]), r[4]) for r in rows}


def check_log(home: Home, ledger: Ledger) -> tuple[int, str, dict[int, tuple[str, str, bytes, str]]]:
    """The chain verifies, seqs are 1..head, and every receipt is in it unchanged. Returns the head."""
    report = verify_file(home.db_path)
    assert report.ok, report.breaks[:5]
    # A running daemon may append its own events between the two reads: compare up to the verified head.
    rows = {seq: row for seq, row in log_rows(home.db_path).items() if seq <= report.head_seq}
    assert list(rows) == list(range(1, len(rows) + 1)), "seqs are not contiguous from 1"
    assert report.checked == report.head_seq == len(rows)
    lost = {seq: ack for seq, ack in ledger.acked.items() if rows.get(seq, (None, None))[:2] != ack}
    assert not lost, f"{len(lost)} acknowledged entries lost or changed, e.g. {sorted(lost.items())[:3]}"
    ids = {r[0] for r in rows.values()}
    for envs in ledger.unanswered:  # a request is atomic: all of it landed or none of it
        present = [e.id in ids for e in envs]
        assert all(present) or not any(present), "a batch was half-written"
    return report.head_seq, report.head_hash, rows


async def resend_unanswered(agent_of: dict[str, Agent], ledger: Ledger, ids: set[str]) -> Counter[str]:
    """Send every unanswered request again: replay if it had landed, a receipt if it had not."""
    outcome: Counter[str] = Counter()
    pending, ledger.unanswered = ledger.unanswered, []
    for envs in pending:
        agent = agent_of[envs[0].sender]
        landed = envs[0].id in ids
        if len(envs) == 1:
            try:
                results = [await agent.publish_envelope(envs[0])]
            except CharterError as exc:
                assert landed and exc.code == REPLAY, f"{envs[0].id} (landed={landed}) refused: {exc}"
                outcome["replay"] += 1
                continue
        else:
            results = await send(agent, envs, batch=True)
            if landed:
                assert all(r.get("error", {}).get("code") == REPLAY for r in results), results
                outcome["replay"] += len(envs)
                continue
        assert not landed, f"{envs[0].id} was in the log yet accepted again"
        ledger.record(envs, results)
        outcome["accepted"] += len(envs)
    return outcome


def kill9(home: Home, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    # The record is left behind; once the process is dead (or a zombie) it must count as stale.
    deadline = time.monotonic() + 5
    while read_daemon_file(home) is not None:
        assert time.monotonic() < deadline, "a SIGKILLed daemon still looks alive"
        time.sleep(0.02)
    assert home.daemon_file.exists(), "the killed daemon cannot have removed its record"


async def test_sigkill_loses_no_acknowledged_message(daemon) -> None:
    home: Home = daemon.home
    agents = [await daemon.enroll(f"pub{k}") for k in range(PUBLISHERS)]
    agent_of = {a.id: a for a in agents}
    ledger = Ledger()
    pid = daemon.pid
    acked_before = 0
    try:
        for round_ in range(ROUNDS):
            async def publish_then_kill(seconds: float = 0.8 + 0.2 * round_, victim: int = pid) -> None:
                await asyncio.sleep(seconds)
                before = Counter(ledger.failed)
                await asyncio.to_thread(kill9, home, victim)
                # Publishers go on until each has hit the dead daemon at least once.
                deadline = time.monotonic() + 5
                while any(ledger.failed[a.id] <= before[a.id] for a in agents):
                    assert time.monotonic() < deadline, "a publisher never noticed the kill"
                    await asyncio.sleep(0.005)

            await publish_during(agents, ledger, publish_then_kill)
            in_round = len(ledger.acked) - acked_before
            assert in_round > 50, f"round {round_}: only {in_round} receipts before the kill"

            # On the dead daemon's files: nothing acknowledged is missing, nothing is half-written.
            head_seq, head_hash, rows = check_log(home, ledger)

            # The stale run/daemon.json does not stop a new daemon on the same home. (In a thread, so the
            # loop keeps turning and the agents' pooled connections to the dead daemon are dropped.)
            info = await asyncio.to_thread(spawn, home)
            assert info["pid"] != pid and info["url"] == daemon.url
            pid = info["pid"]

            # The new daemon's first entry (its start event) continues the same chain.
            rows = log_rows(home.db_path)
            first = rows[head_seq + 1]
            assert first[2].hex() == head_hash and first[3] == "charter.daemon.started"

            # Replay protection survived: envelopes acknowledged before the kill are refused.
            for env in ledger.singles[-3:]:
                with pytest.raises(CharterError) as refused:
                    await agent_of[env.sender].publish_envelope(env)
                assert refused.value.code == REPLAY
            last_batch = ledger.batches[-1]
            results = await send(agent_of[last_batch[0].sender], last_batch, batch=True)
            assert [r["error"]["code"] for r in results] == [REPLAY] * len(last_batch)

            # What got no answer (in flight at the kill, or sent after it) lands exactly once.
            outcome = await resend_unanswered(agent_of, ledger, {r[0] for r in rows.values()})
            assert outcome["accepted"] + outcome["replay"] >= PUBLISHERS

            # And the restarted daemon keeps appending onto the chain.
            receipt = await agents[round_ % PUBLISHERS].publish(f"agents.pub{round_ % PUBLISHERS}.after", {"r": round_})
            ledger.acked[receipt["seq"]] = (receipt["id"], receipt["hash"])
            assert receipt["seq"] > head_seq + 1
            check_log(home, ledger)
            acked_before = len(ledger.acked)
    finally:
        for a in agents:
            await a.close()
    assert set(ledger.errors) == {UNREACHABLE}, ledger.errors
    # Once, at the end (it costs a signature check per entry): every entry is signed by its sender.
    signed = verify_file(home.db_path, root=SigningKey.load_pem(home.root_key_path).public)
    assert signed.ok, signed.breaks[:5]


async def test_sigstop_loses_no_acknowledged_message(daemon) -> None:
    home: Home = daemon.home
    enrolled = [await daemon.enroll(f"stop{k}") for k in range(3)]
    agents = []
    for a in enrolled:  # the same agents with a short client timeout
        fast = Agent(a.creds)
        fast.http = SignedClient(daemon.url, a.id, a.creds.key, timeout=0.3)
        agents.append(fast)
    agent_of = {a.id: a for a in enrolled}  # resent with the usual timeout: the daemon may still be catching up
    ledger = Ledger()
    proc = psutil.Process(daemon.pid)
    resumed_at = 0.0

    async def freeze() -> None:
        nonlocal resumed_at
        await asyncio.sleep(0.5)
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 2
            while proc.status() != psutil.STATUS_STOPPED:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            await asyncio.sleep(1.0)
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        await asyncio.sleep(2.0)  # (long enough for a busy host to answer a 0.3 s request again)

    try:
        await publish_during(agents, ledger, freeze)
        assert set(ledger.errors) == {"timeout"}, ledger.errors  # nothing else went wrong, and it was stopped
        assert ledger.acked_at and ledger.acked_at[-1] > resumed_at, "nothing was acknowledged after SIGCONT"

        # Let the daemon finish what it read after SIGCONT, then check while it runs.
        for _ in range(50):
            before = log_rows(home.db_path)
            await asyncio.sleep(0.05)
            if log_rows(home.db_path).keys() == before.keys():
                break
        _, _, rows = check_log(home, ledger)
        outcome = await resend_unanswered(agent_of, ledger, {r[0] for r in rows.values()})
        assert sum(outcome.values()) > 0
        check_log(home, ledger)
        assert proc.status() != psutil.STATUS_STOPPED
    finally:
        for a in agents + enrolled:
            await a.close()
