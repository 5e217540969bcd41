"""Prometheus `/metrics`: scraped before and after things happen, the values move as they should."""

from __future__ import annotations

import asyncio
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

PRIMARY, BACKUP = "primary/llama3.2:3b", "backup/qwen2.5:0.5b"


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

        # The gateway: requests and latency by the backend that answered.
        await client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}])
        m2 = await scrape(url)
        assert m2.get("charter_gateway_requests_total", backend=PRIMARY, outcome="ok") == \
            m1.get("charter_gateway_requests_total", backend=PRIMARY, outcome="ok") + 1
        assert m2.get("charter_gateway_latency_seconds_count", backend=PRIMARY) == \
            m1.get("charter_gateway_latency_seconds_count", backend=PRIMARY) + 1
        assert m2.get("charter_gateway_latency_seconds_sum", backend=PRIMARY) > 0

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
        assert m4.get("charter_gateway_requests_total", backend=BACKUP, outcome="ok") == \
            m3.get("charter_gateway_requests_total", backend=BACKUP, outcome="ok") + 1
        fallbacks = {k: v for k, v in m4.samples.items() if k[0] == "charter_gateway_fallbacks_total"
                     and dict(k[1]).get("backend") == "primary"}
        before = sum(v for k, v in m3.samples.items() if k[0] == "charter_gateway_fallbacks_total"
                     and dict(k[1]).get("backend") == "primary")
        assert sum(fallbacks.values()) == before + 1, fallbacks

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
    finally:
        await client.close()
        await alpha.close()
        await boss.close()


async def test_archive_lag_moves_when_the_log_is_sealed(daemon) -> None:
    import aiohttp

    async def lag() -> float:
        async with aiohttp.ClientSession() as s, s.get(daemon.url + "/metrics") as r:
            text = await r.text()
        line = next(ln for ln in text.splitlines() if ln.startswith("charter_archive_lag_entries "))
        return float(line.split()[1])

    alpha = await daemon.enroll("alpha", "worker")
    for i in range(5):
        await alpha.publish("agents.alpha.n", {"i": i})
    before = await lag()
    assert before >= 5
    await daemon.admin("POST", "/v1/admin/archive/seal")
    assert await lag() < before
    await alpha.close()
