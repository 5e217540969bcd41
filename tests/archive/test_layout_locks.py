"""A check of the archive holds off its writers, not other checks, and creates nothing.

`charter archive verify` reads the archive, then the live log; a live daemon's seal and prune in
between (a segment not yet indexed when listed, then its entries pruned from charter.db) read as
entries that exist nowhere. `Layout.reading` takes the archive's lock shared for the whole check:
the daemon's writers (`Layout.locked`, exclusive) wait; other checks do not.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from charter.archive.layout import Layout


def _locked_within(layout: Layout, seconds: float) -> bool:
    """Whether a writer gets the lock within `seconds` (from another thread, another descriptor)."""
    got = threading.Event()

    def writer() -> None:
        with layout.locked():
            got.set()

    threading.Thread(target=writer, daemon=True).start()
    return got.wait(seconds)


def test_a_check_holds_off_a_writer_until_it_ends(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "archive")
    with layout.locked():  # an archive a live archivist has written: it has its lock file
        pass
    release = threading.Event()
    reading = threading.Event()

    def check() -> None:
        with layout.reading():
            reading.set()
            release.wait(10)

    threading.Thread(target=check, daemon=True).start()
    assert reading.wait(5)
    started = time.monotonic()
    got = threading.Event()

    def writer() -> None:
        with layout.locked():
            got.set()

    threading.Thread(target=writer, daemon=True).start()
    assert not got.wait(0.3), "a seal or prune got in while a check was reading"
    release.set()
    assert got.wait(5) and time.monotonic() - started >= 0.3


def test_checks_do_not_wait_for_one_another(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "archive")
    with layout.locked():
        pass
    with layout.reading():
        inner = threading.Event()

        def other_check() -> None:
            with layout.reading():
                inner.set()

        threading.Thread(target=other_check, daemon=True).start()
        assert inner.wait(5)
    assert _locked_within(layout, 5)  # and once both are done, a writer goes on


def test_a_check_of_an_archive_never_written_here_creates_nothing(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with Layout(mirror).reading():
        pass
    assert list(mirror.iterdir()) == []
