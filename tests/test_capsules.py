"""Capsules: the operator's format (front matter, sections, machine JSON, sidecar, 0600, history),
signatures and hashes that verify offline, and per-agent capsules that hold nothing outside the view."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import os
from pathlib import Path

import pytest

from charter.capsules.build import verify_capsule
from charter.identity.keys import SigningKey

pytestmark = pytest.mark.anyio
GOLDEN = Path(__file__).parent / "golden"


def structure(markdown: str) -> dict:
    """What must not change: front-matter keys, section headings in order, the fenced JSON's top keys."""
    head, _, body = markdown[4:].partition("\n---\n\n")
    keys = [line.split(":", 1)[0] for line in head.splitlines()]
    headings = [line for line in body.splitlines() if line.startswith("#")]
    block = re.search(r"```json\n(.*?)\n```", body, re.S)
    machine = sorted(json.loads(block.group(1))) if block else None
    return {"front_matter": keys, "headings": headings, "machine_context_keys": machine}


async def test_ai_alignment_capsule_matches_the_golden_structure(daemon) -> None:
    alpha = await daemon.enroll("alpha", "worker")
    await alpha.publish("agents.alpha.status", {"state": "ready"})
    built = await daemon.admin("POST", "/v1/admin/capsules/build", json={"name": "AI_ALIGNMENT"})
    path = Path(built["path"])
    assert path == daemon.home.root / "capsules" / "AI_ALIGNMENT_LATEST.md"
    text = path.read_text()
    golden = json.loads((GOLDEN / "ai_alignment.structure.json").read_text())
    assert structure(text) == golden
    meta = built["meta"]
    assert meta["capsule_type"] == "ai_alignment" and meta["privacy"] == "private-local"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", meta["generated_at"])  # ISO-8601 with zone
    assert meta["seq_from"] == 1 and meta["seq_to"] >= 5
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["data"]["agents"][0]["name"] == "alpha" and sidecar["content_sha256"] == meta["content_sha256"]
    history = list((path.parent / "AI_ALIGNMENT_CAPSULES").glob("*.md"))
    assert len(history) == 1 and re.fullmatch(r"\d{4}-\d\d-\d\d\.md", history[0].name)
    for f in (path, path.with_suffix(".json"), history[0], history[0].with_suffix(".json")):
        assert f.stat().st_mode & 0o777 == 0o600, f
    root = SigningKey.load_pem(daemon.home.root_key_path).public
    assert verify_capsule(path, root) == (True, "ok")
    # An edit anywhere in the text, or a re-signing by another key, is caught offline.
    path.write_text(text.replace("Agents: 1 active", "Agents: 9 active"))
    assert verify_capsule(path, root)[0] is False
    path.write_text(text)
    assert verify_capsule(path, SigningKey.generate().public)[0] is False
    await alpha.close()


async def test_agent_capsule_holds_nothing_outside_its_view(daemon) -> None:
    alpha = await daemon.enroll("alpha", "worker")
    bravo = await daemon.enroll("bravo", "worker")
    await alpha.publish("agents.alpha.notes", {"secret": "alpha-only-7f3a"})
    await bravo.publish("agents.bravo.notes", {"secret": "bravo-only-c91e"})
    await bravo.act("fs.write", {"path": "x"})
    capsule = await alpha.capsule()
    text = capsule["markdown"]
    assert "agents.alpha.notes" in text and "alpha-only-7f3a" in text
    assert "bravo-only-c91e" not in text and "agents.bravo" not in text
    assert bravo.id not in text and "charter.decisions.bravo" not in text
    sidecar = json.loads(Path(capsule["path"]).with_suffix(".json").read_text())
    for ev in sidecar["data"]["recent_events"]:
        assert ev["subject"].startswith(("agents.alpha.", "tasks.", "charter.decisions.alpha",
                                         "charter.approvals.alpha", "charter.budget.alpha")), ev["subject"]
    golden = json.loads((GOLDEN / "agent.structure.json").read_text())
    assert structure(text) == golden
    await alpha.close()
    await bravo.close()


async def test_capsule_cli_build_show_list_diff(daemon) -> None:
    env = {**os.environ, "CHARTER_HOME": str(daemon.home.root)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "charter", *args], capture_output=True, text=True, env=env, timeout=60)

    assert cli("capsule", "build").returncode == 0
    shown = cli("capsule", "show")
    assert shown.returncode == 0 and shown.stdout.startswith("---\ncapsule_type: \"ai_alignment\"")
    listed = json.loads(cli("capsule", "list", "--json").stdout)
    assert {c["name"] for c in listed["capsules"]} >= {"AI_ALIGNMENT"}
    assert cli("capsule", "show", "NOPE").returncode == 4
    # Make the dated history differ from the latest build, then diff them.
    base = daemon.home.root / "capsules"
    old = base / "AI_ALIGNMENT_CAPSULES" / "2000-01-01.md"
    old.write_text((base / "AI_ALIGNMENT_LATEST.md").read_text().replace("Agents: 0 active", "Agents: 5 active"))
    diff = cli("capsule", "diff", "--against", "2000-01-01")
    assert diff.returncode == 0 and "-- Agents: 5 active" in diff.stdout and "+- Agents: 0 active" in diff.stdout
