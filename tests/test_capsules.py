"""Capsules: the operator's format (front matter, sections, machine JSON, sidecar, 0600, history),
signatures and hashes that verify offline, and per-agent capsules that hold nothing outside the view."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time
import subprocess
import sys
import os
from pathlib import Path

import pytest

from charter.capsules.build import verify_capsule
from charter.errors import CharterError
from charter.identity.keys import SigningKey
from charter.server.daemon import stop
from tests.conftest import make_home, start_daemon

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


@pytest.fixture
def quiet_daemon(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A daemon that rebuilds no capsule on its own (its first build, just after its first append,
    or a rebuild 2 s after the enrolment): one between the test's build and its reading of the
    files would have replaced them."""
    home = make_home(tmp_path / "home")
    home.config_path.write_text(home.config_path.read_text() + '\n[capsules]\nenabled = false\n')
    d = start_daemon(home)
    yield d
    stop(home)


async def test_ai_alignment_capsule_matches_the_golden_structure(quiet_daemon) -> None:
    daemon = quiet_daemon
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
    sidecar = json.loads(path.with_suffix(".json").read_text())
    # The range it reflects: the state as of the head, the oldest event it quotes.
    quoted = [e["seq"] for e in sidecar["data"]["recent_events"]]
    assert quoted and meta["seq_from"] == min(quoted) and meta["seq_to"] == sidecar["data"]["log"]["head_seq"] >= 5
    assert sidecar["data"]["agents"][0]["name"] == "alpha" and sidecar["content_sha256"] == meta["content_sha256"]
    history = list((path.parent / "AI_ALIGNMENT_CAPSULES").glob("*.md"))
    assert len(history) == 1 and re.fullmatch(r"\d{4}-\d\d-\d\d\.md", history[0].name)
    build = Path(built["build"])
    assert build.parent == path.parent / "AI_ALIGNMENT_CAPSULES" / "builds" and build.read_text() == text
    for f in (path, path.with_suffix(".json"), history[0], history[0].with_suffix(".json"), build):
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


async def test_capsule_cli_build_show_list_diff(home) -> None:
    # The daemon's own rebuild after the enrolment below would land between the two CLI builds when a
    # CLI is slow to start: this test's builds are the CLI's alone.
    home.config_path.write_text(home.config_path.read_text() + '\n[capsules]\ndebounce = "1h"\n')
    daemon = start_daemon(home)
    try:
        await _cli_build_show_list_diff(daemon)
    finally:
        stop(home)


async def _cli_build_show_list_diff(daemon) -> None:
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

    # Two builds on the same day, with a change in between: the plain diff compares them.
    agent = await daemon.enroll("zed", "worker")
    assert cli("capsule", "build").returncode == 0
    diff = cli("capsule", "diff")
    assert diff.returncode == 0, diff.stderr
    assert "+- Agents: 1 active" in diff.stdout and "/builds/" in diff.stdout.splitlines()[0]
    # A build that does not exist is an error that names it, not an empty diff.
    missing = cli("capsule", "diff", "--against", "1999-12-31")
    assert missing.returncode == 4 and "1999-12-31" in missing.stderr
    # Per-agent capsules have their own history.
    await agent.capsule()
    await agent.publish("agents.zed.status", {"state": "busy"})
    await agent.capsule()
    per_agent = cli("capsule", "diff", "AGENT", "--agent", "zed")
    assert per_agent.returncode == 0 and "agents.zed.status" in per_agent.stdout
    await agent.close()


async def test_user_spec_template_override_schedule_and_freshness_after_restart(tmp_path: Path) -> None:
    """A spec of the user's, with its own template, is built on the schedule, signed like the others
    and injectable; a template of the same name as a built-in one overrides it; and the time of the
    last build survives a restart of the daemon."""
    from charter.server.daemon import stop
    from conftest import make_home, start_daemon

    home = make_home(tmp_path / "home")
    templates = home.root / "capsules" / "templates"
    templates.mkdir(parents=True)
    (templates / "brief.md.j2").write_text(
        "# Brief\n\n{{ agents | length }} agents; head {{ seq_to }}.\n"
        "{% for a in agents %}- {{ a.name }} ({{ a.role }})\n{% endfor %}")
    (templates / "mine.md.j2").write_text("# Mine: {{ agent.name }}\n\nscopes: {{ agent.scopes }}\n")
    (templates / "OPS_STATUS.md.j2").write_text("# Ops, the operator's way\n\nhead {{ seq_to }}\n")
    with home.config_path.open("a") as f:
        f.write('\n[capsules]\ninterval = 1\ndebounce = 0\n'
                '[capsules.specs.BRIEF]\ntemplate = "brief.md.j2"\ncapsule_type = "brief"\n'
                '[capsules.specs.MINE]\ntemplate = "mine.md.j2"\nscope = "agent"\n')
    daemon = start_daemon(home)
    try:
        alpha = await daemon.enroll("alpha", "worker")
        brief = home.root / "capsules" / "BRIEF_LATEST.md"
        for _ in range(100):  # the schedule builds it, nobody asks
            if brief.exists() and "alpha (worker)" in brief.read_text():
                break
            await asyncio.sleep(0.1)
        text = brief.read_text()
        assert "- alpha (worker)" in text and 'capsule_type: "brief"' in text
        root = SigningKey.load_pem(home.root_key_path).public
        assert verify_capsule(brief, root) == (True, "ok")
        assert brief.stat().st_mode & 0o777 == 0o600
        ops = (home.root / "capsules" / "OPS_STATUS_LATEST.md").read_text()
        assert "# Ops, the operator's way" in ops
        # A per-agent spec of the user's, for the agent itself; a global one is not the agent's to read.
        mine = await alpha.capsule("MINE")
        assert "# Mine: alpha" in mine["markdown"] and "agents.alpha.>" in mine["markdown"]
        with pytest.raises(CharterError) as refused:
            await alpha.capsule("BRIEF")
        assert refused.value.code == "not_found" and "MINE" in str(refused.value)
        listed = await daemon.admin("GET", "/v1/admin/capsules")
        built_at = listed["freshness"]["built_at"]
        assert built_at and abs(built_at - time.time()) < 60
        await alpha.close()
    finally:
        stop(home)
    # Restarted with the schedule off: the capsule's age is known at once, from its sidecar.
    text = home.config_path.read_text().replace("interval = 1\n", "interval = 1\nenabled = false\n", 1)
    home.config_path.write_text(text)
    daemon = start_daemon(home)
    try:
        after = (await daemon.admin("GET", "/v1/admin/capsules"))["freshness"]["built_at"]
        sidecar = json.loads((home.root / "capsules" / "AI_ALIGNMENT_LATEST.json").read_text())
        assert after == dt.datetime.fromisoformat(sidecar["generated_at"]).timestamp()
    finally:
        stop(home)


def test_a_bad_spec_or_injection_is_refused_naming_the_key(tmp_path: Path) -> None:
    from charter.errors import ConfigError
    from conftest import make_home

    home = make_home(tmp_path / "home")
    base = home.config_path.read_text()
    home.config_path.write_text(base + '\n[capsules.specs.brief]\ntemplate = "b.md.j2"\n')
    with pytest.raises(ConfigError) as bad_name:
        home.load_config()
    assert "capsules.specs" in str(bad_name.value) and "'brief'" in str(bad_name.value)
    home.config_path.write_text(base.replace("[models]\n", '[models]\ninject_capsule = { default = "NOPE" }\n', 1))
    with pytest.raises(ConfigError) as bad_inject:
        home.load_config()
    assert "inject_capsule.default" in str(bad_inject.value) and "'NOPE'" in str(bad_inject.value)
