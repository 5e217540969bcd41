"""Per alias, the gateway puts the agent's capsule in front of the conversation as a system message."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from charter.models.standin import spawn_standin
from charter.server.daemon import stop
from tests.conftest import start_daemon
from tests.gateway.conftest import gateway_home

pytestmark = pytest.mark.anyio


async def test_capsule_injected_as_system_message(tmp_path: Path) -> None:
    primary = spawn_standin(models=["llama3.2:3b"], token_delay=0.0)
    backup = spawn_standin(models=["qwen2.5:0.5b"], token_delay=0.0)
    home = gateway_home(tmp_path / "home", primary.port, backup.port)
    text = home.config_path.read_text().replace(
        'midstream = "continue"', 'midstream = "continue"\nlog_content = true\ninject_capsule = { default = "agent" }', 1)
    home.config_path.write_text(text)
    daemon = start_daemon(home)
    try:
        alpha = await daemon.enroll("alpha", "worker")
        client = openai.AsyncOpenAI(base_url=alpha.openai_base_url, api_key=alpha.api_key, max_retries=0)
        for alias in ("default", "solo"):
            r = await client.chat.completions.create(model=alias, messages=[{"role": "user", "content": "hi"}])
            assert r.choices[0].message.content
        calls = (await daemon.admin("GET", "/v1/events", params={"pattern": "charter.models.calls"}))["events"]
        injected, plain = (c["envelope"]["payload"]["prompt"] for c in calls)
        assert injected[0]["role"] == "system" and injected[0]["content"].startswith("# Agent Capsule: alpha")
        assert injected[1] == {"role": "user", "content": "hi"}
        assert plain == [{"role": "user", "content": "hi"}]  # `solo` is not configured to inject
        await client.close()
        await alpha.close()
    finally:
        stop(home)
        primary.stop()
        backup.stop()
