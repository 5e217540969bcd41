"""Two sealers at once: `charter archive seal` beside the daemon's own. Whichever takes the archive's
lock second seals from where the first stopped: it never fails on rows the other sealed meanwhile,
and never seals an entry twice."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from charter.archive.archivist import Archivist, seal_waiting
from charter.archive.layout import Layout
from charter.archive.segments import archive_head
from charter.archive.verify import verify_archive
from charter.bus.envelope import seal
from charter.config import Home
from charter.identity.registry import OPERATOR_ID
from tests.conftest import make_home

from .conftest import configure, root_key

pytestmark = pytest.mark.anyio

SEGMENT = 50
ENTRIES = 160


@pytest.fixture
async def home(tmp_path: Path) -> Home:
    home = make_home(tmp_path / "home")
    configure(home, segment_entries=SEGMENT)
    a = Archivist.local(Home(home.root))
    try:
        await a.ensure_identity()
        key = root_key(a.home)
        await a.log.append([seal(key, sender=OPERATOR_ID, subject="charter.test.entry", payload={"n": i})
                            for i in range(ENTRIES)])
    finally:
        await a.close()
    return home


def other_sealer_first(monkeypatch: pytest.MonkeyPatch, other: Callable[[], object]) -> list[int]:
    """The first time anyone asks for the archive's lock, another sealer gets it just before."""
    real = Layout.locked
    heads: list[int] = []

    @contextmanager
    def locked(self: Layout) -> Iterator[None]:
        if not heads:
            heads.append(-1)  # once: the other sealer's own locks are the real ones
            other()
            heads.append(archive_head(self)[0])
        with real(self):
            yield

    monkeypatch.setattr(Layout, "locked", locked)
    return heads


async def test_a_seal_of_charter_db_continues_from_another_sealers_segments(
        home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    root, db = home.root / "archive", home.db_path
    heads = other_sealer_first(monkeypatch, lambda: seal_waiting(root, db, segment_entries=SEGMENT, partial=False,
                                                                  upto_seq=SEGMENT, level=3))
    made = seal_waiting(root, db, segment_entries=SEGMENT, partial=False, upto_seq=None, level=3)
    assert heads[-1] == SEGMENT  # the other sealer sealed the first segment while this one started
    assert [(m.first_seq, m.last_seq) for m in made] == [(SEGMENT + 1, 2 * SEGMENT), (2 * SEGMENT + 1, 3 * SEGMENT)]
    assert archive_head(Layout(root))[0] == 3 * SEGMENT
    report = verify_archive(root, db_path=db)
    assert report.ok, report.sorted_breaks()[:3]


async def test_a_seal_through_the_event_log_continues_from_another_sealers_segments(
        home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log other than charter.db (NATS) is read on the loop, before the lock is taken."""
    root, db = home.root / "archive", home.db_path
    a = Archivist.local(Home(home.root))
    a.sqlite = False  # read through the EventLog, as on NATS
    try:
        await a.ensure_identity()  # its lock taken now: the next one is the seal's
        heads = other_sealer_first(monkeypatch, lambda: seal_waiting(
            root, db, segment_entries=SEGMENT, partial=False, upto_seq=SEGMENT + 10, level=3))
        result = await a.seal(partial=False)
    finally:
        await a.close()
    assert heads[-1] == SEGMENT  # the other sealer sealed the first segment after this one read its rows
    first_segments = [(s["first_seq"], s["last_seq"]) for s in result["sealed"]][:2]
    assert first_segments == [(SEGMENT + 1, 2 * SEGMENT), (2 * SEGMENT + 1, 3 * SEGMENT)]
    assert archive_head(Layout(root))[0] >= 3 * SEGMENT
    report = verify_archive(root, db_path=db)
    assert report.ok, report.sorted_breaks()[:3]


async def test_the_checkpoint_event_finds_the_state_already_showing_it(home: Home) -> None:
    """The dashboard reads `state()` as soon as a charter.archive event arrives; read then, the state
    must already count the new checkpoint and segments, or the screen keeps the old numbers."""
    a = Archivist.local(Home(home.root))
    seen: list[dict[str, object]] = []
    emit = a.emit

    async def watching(subject: str, payload: object, kind: str = "event") -> object:
        if subject == "charter.archive.checkpoints":
            seen.append(a.state())
        return await emit(subject, payload, kind)

    a.emit = watching
    try:
        result = await a.seal(partial=True)
    finally:
        await a.close()
    assert result["checkpoint"]["number"] == 1
    (state,) = seen
    assert state["checkpoints"] == 1
    assert state["archived_seq"] == result["archived_seq"] == ENTRIES + 1  # the identity event, then the entries
    assert state["segments"] == len(result["sealed"]) == -(-(ENTRIES + 1) // SEGMENT)
