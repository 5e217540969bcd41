"""Prometheus `/metrics`: scraped before and after things happen, the values move as they should."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from charter.bus import envelope as envmod
from charter.errors import CharterError
from charter.server.daemon import dashboard_token
from tests.gateway.conftest import Fleet

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

PRIMARY = {"backend": "primary", "model": "llama3.2:3b"}
BACKUP = {"backend": "backup", "model": "qwen2.5:0.5b"}
NOBODY = {"backend": "", "model": ""}  # a call no backend completed: empty labels, not a made-up backend


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples


ROOT = Path(__file__).resolve().parents[2]
DOCS, README = ROOT / "docs" / "dashboard.md", ROOT / "README.md"


def documented_families() -> set[str]:
    """The family names in docs/dashboard.md's metrics table, which must name every one exported."""
    section = DOCS.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"(?m)^\| `(charter_\w+)` \|", section))
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `GET /metrics`"))
    assert names == set(re.findall(r"`(charter_\w+)`", row)), "README's /metrics row and docs/dashboard.md differ"
    return names


def exported_families(m: Scrape) -> set[str]:
    """The families in a scrape, less the `_created` series prometheus_client adds to its own counters."""
    types = set(re.findall(r"(?m)^# TYPE (\S+) ", m.text))
    created = {t for t in types if t.endswith("_created")
               and {t.removesuffix("_created"), t.removesuffix("_created") + "_total"} & types}
    return types - created


async def scrape(url: str) -> Scrape:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape(await r.text())


async def eventually(url: str, check: Any, timeout: float = 10.0) -> Scrape:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        m = await scrape(url)
        if check(m):
            return m
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the metrics did not move as expected:\n" + m.text)
        await asyncio.sleep(0.2)


async def test_metrics_move_as_things_happen(supervised_fleet: Fleet) -> None:
    f = supervised_fleet
    d, url = f.daemon, f.daemon.url
    alpha, boss = await d.enroll("alpha", "worker"), await d.enroll("boss", "coordinator")
    client = openai.AsyncOpenAI(base_url=alpha.openai_base_url, api_key=alpha.api_key, max_retries=0)
    try:
        m0 = await eventually(url, lambda m: m.get("charter_service_up", service="ai.ollama.primary", tier="critical") == 1)
        assert m0.get("charter_agents", status="active") == 2
        assert m0.get("charter_gateway_circuit_state", backend="primary") == 0
        assert m0.get("charter_approvals_pending") == 0
        assert m0.get("charter_log_head_seq") >= 1
        assert exported_families(m0) == documented_families()  # the supervisor's and the archive's included

        # The bus: accepted, and refused by code.
        await alpha.publish("agents.alpha.status", {"ok": True})
        with pytest.raises(CharterError):
            await alpha.publish("agents.owl.notes", {"not": "mine"})  # out of scope
        env = envmod.seal(alpha.creds.key, sender=alpha.creds.agent_id, subject="agents.alpha.once", payload={"n": 1})
        await alpha.publish_envelope(env)
        with pytest.raises(CharterError):
            await alpha.publish_envelope(env)  # the same envelope again: a replay
        forged = envmod.seal(alpha.creds.key, sender=alpha.creds.agent_id, subject="agents.alpha.x", payload={"n": 1})
        raw = {**forged.to_dict(), "payload": {"n": 2}}  # changed after signing
        async with aiohttp.ClientSession() as http, http.post(f"{url}/v1/publish", json=raw) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "bad_signature"
        m1 = await scrape(url)
        bus = "charter_bus_messages_total"
        assert m1.get(bus, result="accepted", code="") >= m0.get(bus, result="accepted", code="") + 2
        for code in ("out_of_scope", "replay", "bad_signature"):
            assert m1.get(bus, result="refused", code=code) == m0.get(bus, result="refused", code=code) + 1, code
        assert m1.get("charter_log_head_seq") > m0.get("charter_log_head_seq")

        # The gateway: requests and latency by the backend and model that answered, labelled apart,
        # the backend with the same value as its circuit's.
        await client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}])
        m2 = await scrape(url)
        assert m2.get("charter_gateway_requests_total", **PRIMARY, outcome="ok") == \
            m1.get("charter_gateway_requests_total", **PRIMARY, outcome="ok") + 1
        assert m2.get("charter_gateway_latency_seconds_count", **PRIMARY) == \
            m1.get("charter_gateway_latency_seconds_count", **PRIMARY) + 1
        assert m2.get("charter_gateway_latency_seconds_sum", **PRIMARY) > 0
        assert m2.has("charter_gateway_circuit_state", backend=PRIMARY["backend"])
        assert not [k for k in m2.samples if k[0].startswith("charter_gateway_") and "/" in dict(k[1]).get("backend", "")]

        # The primary dies: its circuit opens, its service goes down, calls fall back to the backup.
        f.primary.kill()
        m3 = await eventually(url, lambda m: m.get("charter_gateway_circuit_state", backend="primary") == 2
                              and m.get("charter_service_up", service="ai.ollama.primary", tier="critical") == 0)
        assert m3.get("charter_gateway_circuit_state", backend="backup") == 0
        assert m3.get("charter_service_up", service="ai.ollama.backup", tier="optional") == 1
        assert m3.get("charter_service_state", service="ai.ollama.primary", state="critical") == 1
        answer = await client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content
        m4 = await scrape(url)
        assert m4.get("charter_gateway_requests_total", **BACKUP, outcome="ok") == \
            m3.get("charter_gateway_requests_total", **BACKUP, outcome="ok") + 1
        fallbacks = {k: v for k, v in m4.samples.items() if k[0] == "charter_gateway_fallbacks_total"
                     and dict(k[1]).get("backend") == "primary"}
        before = sum(v for k, v in m3.samples.items() if k[0] == "charter_gateway_fallbacks_total"
                     and dict(k[1]).get("backend") == "primary")
        assert sum(fallbacks.values()) == before + 1, fallbacks
        assert {dict(k[1])["model"] for k in fallbacks} == {"llama3.2:3b"}

        # Budgets: what a settled paid call used comes off what is left.
        scope = {"scope": "agent:alpha", "unit": "usd", "period": "day"}
        r = await alpha.reserve(model="openai/gpt-4o-mini", input_tokens=100_000, max_output_tokens=50_000)
        await alpha.settle(r["reservation_id"], tokens_in=100_000, tokens_out=50_000)  # $0.015 + $0.03
        m5 = await scrape(url)
        assert m5.get("charter_budget_used", **scope) == pytest.approx(m4.get("charter_budget_used", **scope) + 0.045)
        assert m5.get("charter_budget_left", **scope) == pytest.approx(m4.get("charter_budget_left", **scope) - 0.045)
        assert m5.get("charter_budget_used", **scope) + m5.get("charter_budget_left", **scope) == pytest.approx(1.0)

        # Approvals pending: one T3 request waits, the dashboard's operator decides it.
        asked = await boss.act("deploy.prod", {"service": "api"})
        m6 = await scrape(url)
        assert m6.get("charter_approvals_pending") == 1
        token = dashboard_token(f.home)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/admin/approvals/{asked['approval_id']}/decide",
                                 headers={"Authorization": f"Bearer {token}"},
                                 json={"verdict": "deny", "window_s": None, "note": "not today"}) as resp:
                assert resp.status == 200, await resp.text()
        m7 = await scrape(url)
        assert m7.get("charter_approvals_pending") == 0

        # Agents by status.
        await d.admin("POST", "/v1/admin/agents/alpha/suspend", json={"reason": "metrics test"})
        m8 = await scrape(url)
        assert m8.get("charter_agents", status="suspended") == 1 and m8.get("charter_agents", status="active") == 1

        # Both backends down: a call on an alias without degraded mode fails on every rung. It counts
        # as an error with no backend, and each rung's failure as a fallback of its own backend.
        f.backup.kill()
        owl = await d.enroll("owl", "worker")  # alpha is suspended now
        strict = openai.AsyncOpenAI(base_url=owl.openai_base_url, api_key=owl.api_key, max_retries=0)
        try:
            with pytest.raises(openai.APIStatusError):
                await strict.chat.completions.create(model="strict", messages=[{"role": "user", "content": "hi"}])
        finally:
            await strict.close()
            await owl.close()
        m9 = await scrape(url)
        assert m9.get("charter_gateway_requests_total", **NOBODY, outcome="error") == \
            m8.get("charter_gateway_requests_total", **NOBODY, outcome="error") + 1
        assert m9.get("charter_gateway_latency_seconds_count", **NOBODY) == \
            m8.get("charter_gateway_latency_seconds_count", **NOBODY) + 1
        assert not [k for k in m9.samples if k[0].startswith("charter_gateway_") and dict(k[1]).get("backend") == "none"]
        backup_falls = sum(v for k, v in m9.samples.items() if k[0] == "charter_gateway_fallbacks_total"
                           and dict(k[1]).get("backend") == "backup" and dict(k[1]).get("model") == "qwen2.5:0.5b")
        assert backup_falls >= 1
        assert m9.get("charter_gateway_requests_total", **BACKUP, outcome="ok") == \
            m8.get("charter_gateway_requests_total", **BACKUP, outcome="ok")
        assert exported_families(m9) == documented_families()
    finally:
        await client.close()
        await alpha.close()
        await boss.close()


async def test_archive_lag_and_verification_move_when_the_log_is_sealed_and_verified(daemon) -> None:
    alpha = await daemon.enroll("alpha", "worker")
    try:
        for i in range(5):
            await alpha.publish("agents.alpha.n", {"i": i})
        m0 = await scrape(daemon.url)
        assert m0.get("charter_archive_lag_entries") >= 5
        assert m0.get("charter_archive_verified") == 0  # not verified since the daemon started
        await daemon.admin("POST", "/v1/admin/archive/seal")
        m1 = await scrape(daemon.url)
        assert m1.get("charter_archive_lag_entries") < m0.get("charter_archive_lag_entries")
        assert m1.get("charter_archive_lag_entries") == \
            m1.get("charter_log_head_seq") - (await daemon.admin("GET", "/v1/admin/archive/status"))["archived_seq"]
        assert (await daemon.admin("POST", "/v1/admin/archive/verify"))["ok"]
        m2 = await scrape(daemon.url)
        assert m2.get("charter_archive_verified") == 1
    finally:
        await alpha.close()
