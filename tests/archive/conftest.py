"""An archive built the same way every time, so that every tamper names a known sequence number.

    seq 1          charter.archive.identity
    seq 2..21      20 test entries                      sealed: segments [1-10] [11-20] [21]
    seq 22         checkpoint 1 (tree 21, head 21)
    seq 23..42     20 test entries                      sealed: segments [22-31] [32-41] [42]
    seq 43         checkpoint 2 (tree 42, head 42)
    seq 44..48     5 live entries, never sealed
    seq 49         checkpoint 3 (tree 42, head 48)

Everything is signed by the home's root key (sender `operator`), as the daemon's own events are, so
that signature checks pass on the untouched archive.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from charter.archive.archivist import Archivist
from charter.archive.layout import Layout, read_json, write_json
from charter.archive.segments import Record, compress, decode, decompress, encode, load_meta
from charter.bus.log.base import entry_hash
from charter.config import Home
from charter.identity.init import init_home
from charter.identity.keys import SigningKey

ARCHIVED = 42
LIVE_HEAD = 49
SEGMENTS = 6


def configure(home: Home, **archive: Any) -> None:
    """Set [archive] keys in charter.toml (the section is appended if the file lacks it)."""
    text = home.config_path.read_text()
    if not re.search(r"(?m)^\[archive\]$", text):
        text += "\n[archive]\n"
    head, _, tail = text.partition("[archive]\n")
    m = re.search(r"(?m)^\[", tail)
    body, rest = (tail[:m.start()], tail[m.start():]) if m else (tail, "")
    for k in archive:
        body = re.sub(rf"(?m)^{k} = .*\n", "", body)

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str) and not v.startswith("["):
            return f'"{v}"'
        return str(v)

    lines = "".join(f"{k} = {value(v)}\n" for k, v in archive.items())
    home.config_path.write_text(head + "[archive]\n" + lines + body + rest)


def mirrors_toml(paths: list[Path]) -> str:
    return "[" + ", ".join(f'"{p}"' for p in paths) + "]"


async def emit_n(a: Archivist, n: int, start: int = 0, subject: str = "charter.test.entry") -> None:
    for i in range(start, start + n):
        await a.emit(subject, {"n": i, "note": f"entry number {i}"})


async def build(home: Home) -> None:
    a = Archivist.local(home)
    try:
        await a.ensure_identity()
        await emit_n(a, 20)
        await a.seal()
        await emit_n(a, 20, 20)
        await a.seal()
        await emit_n(a, 5, 40)
        await a.checkpoint()
    finally:
        await a.close()


def new_home(root: Path, **archive: Any) -> Home:
    home = Home(root)
    init_home(home)
    configure(home, segment_entries=10, **archive)
    return home


@pytest.fixture(scope="session")
def built_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per session; each test gets a copy."""
    root = tmp_path_factory.mktemp("archive-template") / "home"
    home = new_home(root)
    asyncio.run(build(home))
    return root


@pytest.fixture
def built(built_template: Path, tmp_path: Path) -> Home:
    dest = tmp_path / "home"
    shutil.copytree(built_template, dest)
    return Home(dest)


def root_key(home: Home) -> SigningKey:
    return SigningKey.load_pem(home.root_key_path)


def archive_of(home: Home) -> Layout:
    return Layout(home.root / "archive")


# -- tampering with sealed segments ---------------------------------------------------------------


def segment_holding(layout: Layout, seq: int) -> int:
    for number, path in layout.meta_files():
        meta = load_meta(path)
        if meta.first_seq <= seq <= meta.last_seq:
            return number
    raise LookupError(seq)


def rewrite_segment(layout: Layout, number: int, change: Callable[[list[Record]], list[Record]],
                    *, fix_index: bool = False) -> None:
    """Decompress a segment, change its records, compress it back (optionally fixing its index)."""
    path = layout.segment_path(number)
    records = change(decode(decompress(path.read_bytes())))
    blob = compress(encode(records))
    path.write_bytes(blob)
    if fix_index:
        import hashlib

        from charter.archive.merkle import leaf_hash, root_of

        meta = read_json(layout.meta_path(number))
        meta.update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob), raw_bytes=len(encode(records)),
                    root=root_of([leaf_hash(r[1]) for r in records]).hex(), count=len(records),
                    first_seq=records[0][0], last_seq=records[-1][0], prev_hash=records[0][2].hex(),
                    last_hash=records[-1][1].hex())
        write_json(layout.meta_path(number), meta)


def edited_raw(raw: bytes) -> bytes:
    return raw.replace(b'"note":"entry number', b'"note":"entry NUMBER')


def rehash_from(records: list[Record], index: int, prev: bytes) -> list[Record]:
    """Recompute the chain from records[index] on, as a careful forger would."""
    out = records[:index]
    for seq, _h, _p, raw in records[index:]:
        h = entry_hash(prev, seq, raw)
        out.append((seq, h, prev, raw))
        prev = h
    return out


def pytest_configure(config: pytest.Config) -> None:
    # test_tamper imports the contract suite's tamper helpers, whose tests carry this mark.
    config.addinivalue_line("markers", "requires(*capabilities): skip for log backends without them")
