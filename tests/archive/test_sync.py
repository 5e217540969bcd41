"""Mirrors: incremental, resumable after an interruption (injected, or a killed process), verified
after the copy, and verifiable on their own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from charter.archive.archivist import Archivist
from charter.archive.layout import read_json
from charter.archive.sync import plan, sync_mirror
from charter.archive.verify import verify_archive
from charter.config import Home

from .conftest import ARCHIVED, archive_of, configure, emit_n, mirrors_toml, root_key
from .test_proofs import charter, cli


class Interrupted(Exception):
    pass


def test_sync_copies_everything_and_the_mirror_verifies_alone(built: Home, tmp_path: Path) -> None:
    mirror = tmp_path / "nas" / "charter-archive"
    result = sync_mirror(archive_of(built).root, mirror, root=root_key(built).public)
    assert result.ok and result.verified and result.archived == ARCHIVED, result
    assert len(result.copied) == len(plan(archive_of(built)))
    manifest = read_json(mirror / "MANIFEST.json")
    assert manifest["verified"]["ok"] is True and set(manifest["files"]) == set(result.copied)
    assert not (mirror / ".partial").exists()

    # On its own: another machine, no home, no database; pinned to the operator's root key, or not.
    alone = charter(tmp_path / "elsewhere", "archive", "verify", "--path", str(mirror), "--json")
    assert alone.returncode == 0, alone.stdout + alone.stderr
    doc = json.loads(alone.stdout)
    assert doc["ok"] and doc["archived"] == ARCHIVED and "not pinned" in doc["trust"]
    pinned = cli(tmp_path / "elsewhere", "archive", "verify", "--path", str(mirror), "--root-key",
                     root_key(built).public.b64)
    assert pinned.returncode == 0 and "(pinned)" in pinned.stdout


def test_second_sync_copies_only_what_is_new(built: Home, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    first = sync_mirror(archive_of(built).root, mirror)
    again = sync_mirror(archive_of(built).root, mirror)
    assert again.ok and again.copied == [] and again.skipped == len(first.copied)

    async def more() -> None:
        a = Archivist.local(built)
        try:
            await emit_n(a, 12, 100)
            await a.seal()
        finally:
            await a.close()

    asyncio.run(more())
    third = sync_mirror(archive_of(built).root, mirror)
    assert third.ok and third.verified
    new_files = {p.split("/")[0] for p in third.copied}
    assert new_files == {"segments", "checkpoints"}
    assert len([p for p in third.copied if p.endswith(".seg.zst")]) == 2  # [43-52] and the rest
    assert third.archived > ARCHIVED


@pytest.mark.parametrize("damage", ["none", "truncate_part", "garble_part"])
def test_interrupted_sync_resumes(built: Home, tmp_path: Path, damage: str) -> None:
    source, mirror = archive_of(built).root, tmp_path / "mirror"
    target = "segments/000005.seg.zst"  # after segment 4, which holds checkpoint 1's event (seq 22)
    size = (source / target).stat().st_size
    chunk = max(64, size // 8)

    def crash(rel: str, done: int, total: int) -> None:
        if rel == target and done >= total // 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        sync_mirror(source, mirror, chunk=chunk, on_chunk=crash)
    part = mirror / ".partial" / "segments__000005.seg.zst.part"
    assert part.exists() and 0 < part.stat().st_size < size
    assert not (mirror / target).exists()
    # What the mirror has so far is an older archive that still verifies on its own.
    partial = verify_archive(mirror)
    assert partial.ok and partial.archived == 31 and partial.checkpoints == 1, partial.to_dict()

    written = part.stat().st_size
    if damage == "truncate_part":
        with open(part, "r+b") as f:
            f.truncate(written // 2)
        written //= 2
    elif damage == "garble_part":
        data = bytearray(part.read_bytes())
        data[0] ^= 0xFF
        part.write_bytes(bytes(data))

    result = sync_mirror(source, mirror, root=root_key(built).public, chunk=chunk)
    assert result.ok and result.verified, result
    if damage == "garble_part":
        assert result.resumed_bytes == 0  # not a prefix of the source: copied again from the start
    else:
        assert result.resumed_bytes == written
    assert (mirror / target).read_bytes() == (source / target).read_bytes()
    assert verify_archive(mirror, root=root_key(built).public).archived == ARCHIVED


def test_killed_sync_process_resumes(built: Home, tmp_path: Path) -> None:
    source, mirror = archive_of(built).root, tmp_path / "mirror"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from charter.archive.sync import sync_mirror
        def slow(rel, done, total):
            time.sleep(0.02)
        sync_mirror(Path({str(source)!r}), Path({str(mirror)!r}), chunk=256, on_chunk=slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    partial = mirror / ".partial"
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if (mirror / "segments" / "000001.seg.zst").exists() and partial.exists() and any(partial.iterdir()):
                break
            time.sleep(0.01)
        else:
            pytest.fail("the sync never got going")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    parts = list(partial.iterdir())
    assert parts and parts[0].stat().st_size > 0

    result = sync_mirror(source, mirror, root=root_key(built).public)
    assert result.ok and result.verified and result.resumed_bytes > 0, result
    assert result.archived == ARCHIVED


def test_a_mirror_keeps_its_copy_when_the_source_was_tampered_with(built: Home, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    assert sync_mirror(archive_of(built).root, mirror).ok
    seg = archive_of(built).segment_path(2)
    good = seg.read_bytes()
    seg.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    (mirror / "MANIFEST.json").unlink()  # even without its manifest the mirror will not overwrite
    result = sync_mirror(archive_of(built).root, mirror)
    assert not result.ok and result.conflicts and "segments/000002.seg.zst" in result.conflicts[0]
    assert (mirror / "segments" / "000002.seg.zst").read_bytes() == good
    assert verify_archive(mirror).ok


def test_cli_sync_exit_codes(built: Home, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    done = cli(built, "archive", "sync", "--to", str(mirror), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["mirrors"][0]["verified"] is True
    # A mirror damaged in place: the copy is kept (conflict: exit 1) and its verification fails (exit 5).
    path = mirror / "segments" / "000004.meta.json"
    meta = json.loads(path.read_text())
    meta["root"] = "00" * 32
    path.write_text(json.dumps(meta))
    broken = cli(built, "archive", "sync", "--to", str(mirror))
    assert broken.returncode == 5, broken.stdout + broken.stderr
    assert cli(built, "archive", "verify", "--path", str(mirror)).returncode == 5
    no_mirrors = cli(built, "archive", "sync")
    assert no_mirrors.returncode == 2 and "no mirrors" in no_mirrors.stderr


def test_configured_mirrors_are_synced_and_recorded(built: Home, tmp_path: Path) -> None:
    mirrors = [tmp_path / "m1", tmp_path / "m2"]
    configure(built, mirrors=mirrors_toml(mirrors))

    async def go() -> tuple[list, dict]:
        a = Archivist.local(built)
        try:
            results = await a.sync()
            return results, a.state()
        finally:
            await a.close()

    results, state = asyncio.run(go())
    assert [r["ok"] for r in results] == [True, True]
    assert state["mirrors"] == [str(m) for m in mirrors] and state["last_sync_at"] is not None
    for m in mirrors:
        assert verify_archive(m).ok


def test_a_mirror_cut_off_after_any_file_verifies_on_its_own(built: Home, tmp_path: Path) -> None:
    import shutil

    source = archive_of(built).root
    order = plan(archive_of(built))
    assert order[0] == "identity.json" and order.index("checkpoints/00000001.json") < order.index(
        "segments/000004.seg.zst")  # checkpoint 1's event (seq 22) is in segment 4
    for cut in range(len(order) + 1):
        mirror = tmp_path / f"cut{cut}"
        for rel in order[:cut]:
            (mirror / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / rel, mirror / rel)
        mirror.mkdir(exist_ok=True)
        report = verify_archive(mirror, root=root_key(built).public)
        assert report.ok, (cut, order[:cut], report.to_dict())
