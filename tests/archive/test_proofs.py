"""Inclusion and consistency proofs, checked offline: from the proof file alone, with no database."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from charter.archive.layout import ArchiveError
from charter.archive.proofs import check_proof, consistency_proof, inclusion_proof
from charter.config import Home
from charter.encoding import b64e
from charter.identity.keys import SigningKey

from .conftest import ARCHIVED, archive_of, root_key


def test_every_archived_entry_has_a_proof_that_checks(built: Home) -> None:
    layout, root = archive_of(built), root_key(built).public
    for seq in (1, 2, 15, 21, 22, 41, ARCHIVED):
        proof = inclusion_proof(layout, seq)
        assert proof["leaf_index"] == seq - 1 and proof["tree_size"] == ARCHIVED
        assert proof["checkpoint"]["number"] == 3  # the latest that covers it
        result = check_proof(json.loads(json.dumps(proof)), root=root)
        assert result.ok, result.problems
        assert (result.seq, result.tree_size, result.checkpoint) == (seq, ARCHIVED, 3)
        assert "pinned" in result.trust


def test_a_proof_against_an_older_checkpoint(built: Home) -> None:
    proof = inclusion_proof(archive_of(built), 7, checkpoint=1)
    assert proof["tree_size"] == 21
    assert check_proof(proof, root=root_key(built).public).ok
    with pytest.raises(ArchiveError):
        inclusion_proof(archive_of(built), 30, checkpoint=1)  # checkpoint 1 covers 1..21
    with pytest.raises(ArchiveError):
        inclusion_proof(archive_of(built), 45)  # live, not sealed yet


def test_unpinned_check_says_so(built: Home) -> None:
    result = check_proof(inclusion_proof(archive_of(built), 5))
    assert result.ok and "not pinned" in result.trust


def _bad(proof: dict[str, Any], change: Any) -> dict[str, Any]:
    forged = copy.deepcopy(proof)
    change(forged)
    return forged


def _operator_envelope_edit(p: dict[str, Any]) -> None:
    env = p["entry"]["envelope"]
    env["payload"]["n"] = 999
    from charter.encoding import canonical

    p["entry"]["raw"] = b64e(canonical(env))


def _flip_path(p: dict[str, Any]) -> None:
    h = p["audit_path"][0]
    p["audit_path"][0] = ("0" if h[0] != "0" else "1") + h[1:]


def _resign_checkpoint(p: dict[str, Any]) -> None:
    from charter.archive import checkpoints as cp

    other = SigningKey.generate()
    body = {k: v for k, v in p["checkpoint"].items() if k not in ("sig", "key_id")}
    p["checkpoint"] = cp.sign(other, body)


FORGERIES = {
    "raw_edited": _operator_envelope_edit,
    "readable_envelope_differs": lambda p: p["entry"]["envelope"].update(subject="charter.elsewhere"),
    "audit_path_bent": _flip_path,
    "audit_path_short": lambda p: p["audit_path"].pop(),
    "wrong_leaf_index": lambda p: p.update(leaf_index=p["leaf_index"] + 1),
    "tree_size_changed": lambda p: p.update(tree_size=p["tree_size"] - 1),
    "checkpoint_root_edited": lambda p: p["checkpoint"].update(root="ab" * 32),
    "checkpoint_signed_by_another_key": _resign_checkpoint,
    "certificate_edited": lambda p: p["archivist"]["certificate"].update(issued_at=1),
    "not_a_proof": lambda p: p.clear(),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_inclusion_proofs_fail(built: Home, name: str) -> None:
    proof = inclusion_proof(archive_of(built), 15)
    forged = _bad(proof, FORGERIES[name])
    result = check_proof(forged, root=root_key(built).public)
    assert not result.ok and result.problems, name


def test_pinning_another_root_fails(built: Home) -> None:
    proof = inclusion_proof(archive_of(built), 15)
    assert not check_proof(proof, root=SigningKey.generate().public).ok
    assert not check_proof(proof, archivist=SigningKey.generate().public).ok
    archivist = SigningKey.load_pem(built.keys_dir / "archivist.key").public
    assert check_proof(proof, archivist=archivist).ok


def test_consistency_between_checkpoints(built: Home) -> None:
    layout, root = archive_of(built), root_key(built).public
    for a, b in ((1, 2), (1, 3), (2, 3), (1, 1)):
        proof = consistency_proof(layout, a, b)
        result = check_proof(json.loads(json.dumps(proof)), root=root)
        assert result.ok, (a, b, result.problems)
    proof = consistency_proof(layout, 1, 2)
    assert proof["first"]["tree_size"] == 21 and proof["second"]["tree_size"] == 42 and proof["proof"]
    assert not check_proof(_bad(proof, lambda p: p["proof"].pop()), root=root).ok
    assert not check_proof(_bad(proof, lambda p: p["first"].update(root="cd" * 32)), root=root).ok
    with pytest.raises(ArchiveError):
        consistency_proof(layout, 2, 1)


# -- the CLI, offline -----------------------------------------------------------------------------------


def charter(home: Home | Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real command, in its own process."""
    root = home.root if isinstance(home, Home) else home
    return subprocess.run([sys.executable, "-m", "charter", "--home", str(root), *args], capture_output=True,
                          text=True, timeout=60, input=stdin)


def cli(home: Home | Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The same command run in this process (typer's runner): same code, exit codes and output, no start-up."""
    from typer.testing import CliRunner

    from charter.cli.main import app

    root = home.root if isinstance(home, Home) else home
    r = CliRunner().invoke(app, ["--home", str(root), *args], input=stdin)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(["charter", *args], r.exit_code, r.stdout, r.stderr)


def test_prove_then_check_offline_in_an_empty_home(built: Home, tmp_path: Path) -> None:
    proof_file = tmp_path / "proof.json"
    done = cli(built, "archive", "prove", "15", "--out", str(proof_file))
    assert done.returncode == 0, done.stderr
    printed = cli(built, "archive", "prove", "15")
    assert json.loads(printed.stdout)["entry"]["seq"] == 15

    elsewhere = tmp_path / "nobody"  # no database, no archive, no keys: offline
    root = root_key(built).public.b64
    ok = charter(elsewhere, "archive", "check-proof", str(proof_file), "--root-key", root, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    assert not elsewhere.exists()

    forged = json.loads(proof_file.read_text())
    _flip_path(forged)
    bad = cli(elsewhere, "archive", "check-proof", "-", "--root-key", root, stdin=json.dumps(forged))
    assert bad.returncode == 5, bad.stdout + bad.stderr
    assert "proof fails" in bad.stderr

    wrong_root = cli(elsewhere, "archive", "check-proof", str(proof_file), "--root-key",
                         SigningKey.generate().public.b64)
    assert wrong_root.returncode == 5

    cons = tmp_path / "cons.json"
    assert cli(built, "archive", "consistency", "1", "3", "--out", str(cons)).returncode == 0
    assert cli(elsewhere, "archive", "check-proof", str(cons), "--root-key", root).returncode == 0

    missing = cli(built, "archive", "prove", "46")
    assert missing.returncode == 1 and "no checkpoint covers seq 46" in missing.stderr
