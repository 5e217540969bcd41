"""The tamper matrix: every kind of tampering, on the sealed archive and on the live database, is
detected and the first bad sequence number is named; the untouched archive verifies.

The fixture's layout (see conftest.py): entries 1..42 sealed in six segments of up to ten, 43..49
live only; checkpoints 1 (tree 21), 2 (tree 42) and 3 (tree 42, live head 48).
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from collections.abc import Callable

import pytest
from contract.test_log_contract import TAMPERS, tamper

from charter.archive import checkpoints as cp
from charter.archive.identity import issue_certificate
from charter.archive.layout import read_json, write_json
from charter.archive.segments import Record
from charter.archive.verify import verify_archive
from charter.bus.envelope import seal
from charter.bus.log.base import entry_hash
from charter.bus.log.sqlite import verify_file
from charter.config import Home
from charter.identity.keys import SigningKey

from .conftest import (
    ARCHIVED,
    LIVE_HEAD,
    SEGMENTS,
    archive_of,
    edited_raw,
    rehash_from,
    rewrite_segment,
    root_key,
    segment_holding,
)


def check(home: Home, *, db: bool = True, signatures: bool = True):
    return verify_archive(archive_of(home).root, db_path=home.db_path if db else None,
                          root=root_key(home).public, signatures=signatures)


def test_untouched_archive_verifies(built: Home) -> None:
    report = check(built)
    assert report.ok, report.to_dict()
    assert (report.archived, report.segments, report.checkpoints) == (ARCHIVED, SEGMENTS, 3)
    assert report.head_seq == LIVE_HEAD and report.live_checked == LIVE_HEAD
    assert report.first_bad is None and "pinned" in report.trust
    alone = check(built, db=False)
    assert alone.ok, alone.to_dict()
    assert verify_file(built.db_path, root=root_key(built).public).ok


# -- the sealed archive ------------------------------------------------------------------------------


def _at(seq: int, change: Callable[[list[Record], int], list[Record]]) -> Callable[[Home], None]:
    def do(home: Home) -> None:
        layout = archive_of(home)
        number = segment_holding(layout, seq)
        rewrite_segment(layout, number, lambda recs: change(recs, [r[0] for r in recs].index(seq)))
    return do


def _edit(recs: list[Record], i: int) -> list[Record]:
    seq, h, p, raw = recs[i]
    return recs[:i] + [(seq, h, p, edited_raw(raw))] + recs[i + 1:]


def _edit_and_rehash_archive(home: Home) -> None:
    """A careful forger: edits entry 15 and recomputes every hash and index after it, archive-wide."""
    layout = archive_of(home)
    prev = None
    for number in range(segment_holding(layout, 15), SEGMENTS + 1):
        def change(recs: list[Record]) -> list[Record]:
            nonlocal prev
            if prev is None:
                i = [r[0] for r in recs].index(15)
                recs = _edit(recs, i)
                out = rehash_from(recs, i, recs[i][2])
            else:
                out = rehash_from(recs, 0, prev)
            prev = out[-1][1]
            return out
        rewrite_segment(layout, number, change, fix_index=True)


def _forged_record(recs: list[Record], i: int) -> list[Record]:
    seq, _h, p, _raw = recs[i]
    fake = seal(SigningKey.generate(), sender="operator", subject="charter.test.entry", payload={"forged": True})
    shifted = [(s + 1, h, pp, raw) for s, h, pp, raw in recs[i:]]
    return recs[:i] + [(seq, entry_hash(p, seq, fake.raw), p, fake.raw)] + shifted


def _delete_segment(number: int) -> Callable[[Home], None]:
    def do(home: Home) -> None:
        layout = archive_of(home)
        layout.segment_path(number).unlink()
        layout.meta_path(number).unlink()
    return do


def _garble_segment(home: Home) -> None:
    path = archive_of(home).segment_path(2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_tail_of_segment(home: Home) -> None:
    rewrite_segment(archive_of(home), 5, lambda recs: recs[:-2], fix_index=True)  # 40 and 41 gone


def _edit_index_root(home: Home) -> None:
    path = archive_of(home).meta_path(4)
    meta = read_json(path)
    meta["root"] = hashlib.sha256(b"another root").hexdigest()
    write_json(path, meta)


# name: (tamper, first bad seq with the live database, first bad seq from the archive alone)
ARCHIVE_TAMPERS: dict[str, tuple[Callable[[Home], None], int, int]] = {
    "edit_entry": (_at(15, _edit), 15, 15),
    # alone, the signature check names it (without signatures, see the test below)
    "edit_entry_and_rehash_everything": (_edit_and_rehash_archive, 15, 15),
    "delete_entry": (_at(15, lambda r, i: r[:i] + r[i + 1:]), 15, 15),
    "insert_forged_entry": (_at(15, _forged_record), 15, 15),
    "reorder_entries": (_at(15, lambda r, i: r[:i] + [r[i + 1], r[i]] + r[i + 2:]), 15, 15),
    "swap_entries_keeping_seqs": (_at(15, lambda r, i: r[:i] + [(r[i][0], *r[i + 1][1:]), (r[i + 1][0], *r[i][1:])]
                                           + r[i + 2:]), 15, 15),
    "delete_middle_segment": (_delete_segment(2), 11, 11),
    "truncate_last_segment": (_delete_segment(6), 42, 42),
    "truncate_inside_a_segment": (_drop_tail_of_segment, 40, 40),
    "corrupt_segment_bytes": (_garble_segment, 11, 11),
    "edit_segment_index": (_edit_index_root, 22, 22),
}


@pytest.mark.parametrize("name", sorted(ARCHIVE_TAMPERS))
def test_tampered_archive_names_the_first_bad_seq(built: Home, name: str) -> None:
    how, with_db, alone = ARCHIVE_TAMPERS[name]
    how(built)
    report = check(built)
    assert not report.ok
    assert report.first_bad == with_db, report.to_dict()
    report = check(built, db=False)
    assert not report.ok
    assert report.first_bad == alone, report.to_dict()


def test_rehashed_forgery_seen_only_by_checkpoints_is_pinned_to_their_range(built: Home) -> None:
    """No live copy, no signature check: the checkpoints still catch it, and name the first entry
    they no longer vouch for (checkpoint 1 covers 1..21, and entry 15 is among them)."""
    _edit_and_rehash_archive(built)
    report = check(built, db=False, signatures=False)
    assert report.first_bad == 1
    assert all(b.kind == "checkpoint" for b in report.breaks)
    assert "checkpoint 1's root does not match the archived entries 1 to 21" in {b.reason for b in report.breaks}


# -- the live database -------------------------------------------------------------------------------

# The contract suite's tampers (seqs 1..8 are in the archive too): the same first bad seq, except that
# a forged entry whose hash was recomputed in place is now caught at its own seq, by the archived copy.
LIVE_EXPECTED = {"insert_forged_linked": 4}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampered_live_database_names_the_first_bad_seq(built: Home, name: str) -> None:
    expected = tamper(built.db_path, TAMPERS[name])
    report = check(built)
    assert not report.ok
    assert report.first_bad == LIVE_EXPECTED.get(name, expected), report.to_dict()
    assert check(built, db=False).ok  # the archive itself is intact


def _sql(home: Home, *statements: str) -> None:
    db = sqlite3.connect(home.db_path, isolation_level=None)
    try:
        for s in statements:
            db.execute(s)
    finally:
        db.close()


@pytest.mark.parametrize(("statements", "first_bad"), [
    (["DELETE FROM log WHERE seq >= 46"], 46),  # the tail truncated below what checkpoint 3 saw
    (["DELETE FROM log WHERE seq >= 44"], 44),
    (["UPDATE log SET raw = CAST(replace(CAST(raw AS TEXT), 'entry number', 'entry NUMBER') AS BLOB) WHERE seq = 45"], 45),
    (["DELETE FROM log WHERE seq = 30"], 30),  # archived, then deleted from the live database
])
def test_live_only_tampering(built: Home, statements: list[str], first_bad: int) -> None:
    _sql(built, *statements)
    report = check(built)
    assert report.first_bad == first_bad, report.to_dict()


def test_plain_log_verify_cannot_see_a_truncated_tail_but_the_archive_can(built: Home) -> None:
    _sql(built, "DELETE FROM log WHERE seq >= 46")
    assert verify_file(built.db_path).ok  # the chain alone is fine
    report = check(built)
    assert report.first_bad == 46
    assert any(b.kind == "truncation" and "checkpoint 3" in b.reason for b in report.breaks)


# -- checkpoints -------------------------------------------------------------------------------------


def _resign(home: Home, number: int, key: SigningKey, **changes: object) -> None:
    path = archive_of(home).checkpoint_path(number)
    doc = read_json(path)
    body = {k: v for k, v in doc.items() if k not in ("sig", "key_id")}
    body.update(changes)
    write_json(path, cp.sign(key, body))


def test_checkpoint_signed_by_another_key_is_forged(built: Home) -> None:
    _resign(built, 2, SigningKey.generate())
    report = check(built)
    assert report.first_bad == 22, report.to_dict()  # checkpoint 1 still vouches for 1..21
    assert any("checkpoint 2 is forged" in b.reason and "no root-signed archivist certificate" in b.reason
               for b in report.breaks)


def test_checkpoint_edited_after_signing(built: Home) -> None:
    path = archive_of(built).checkpoint_path(1)
    doc = read_json(path)
    doc["tree_size"] = 20
    write_json(path, doc)
    report = check(built, db=False)
    assert report.first_bad == 1
    assert any("signature does not verify" in b.reason for b in report.breaks)


def test_forger_with_own_certificate_and_fake_root(built: Home) -> None:
    """A forger adds a certificate for his key, signed by a root key of his own: not the pinned one."""
    fake_root, fake_archivist = SigningKey.generate(), SigningKey.generate()
    layout = archive_of(built)
    ident = read_json(layout.identity_path)
    ident["certificates"].append(issue_certificate(fake_root, fake_archivist.public))
    write_json(layout.identity_path, ident)
    _resign(built, 3, fake_archivist)
    report = check(built)
    assert not report.ok and report.first_bad == 43, report.to_dict()
    assert any(b.kind == "identity" for b in report.breaks)


@pytest.mark.parametrize(("number", "first_bad"), [(2, 22), (3, 43), (1, 1)])
def test_missing_checkpoint(built: Home, number: int, first_bad: int) -> None:
    """Removed from the middle (a gap, a broken link) or the newest (the log published it)."""
    archive_of(built).checkpoint_path(number).unlink()
    report = check(built)
    assert not report.ok and report.first_bad == first_bad, report.to_dict()
    assert any(f"checkpoint {number} is missing" in b.reason for b in report.breaks)


def test_checkpoint_replaced_by_a_validly_signed_other_one(built: Home) -> None:
    """The archivist key itself misused: a re-signed checkpoint 2 with another root breaks the links."""
    key = SigningKey.load_pem(built.keys_dir / "archivist.key")
    _resign(built, 2, key, root=hashlib.sha256(b"x").hexdigest())
    report = check(built)
    assert report.first_bad == 22, report.to_dict()
    assert any("does not match the archived entries" in b.reason for b in report.breaks)
    assert any("differs from the one the log published" in b.reason for b in report.breaks)


def test_checkpoints_removed_altogether_are_named_by_the_log(built: Home) -> None:
    shutil.rmtree(archive_of(built).checkpoints_dir)
    report = check(built)
    assert report.first_bad == 1
    assert {b.reason for b in report.breaks} >= {"checkpoint 1 is missing: the log published it at seq 22"}
