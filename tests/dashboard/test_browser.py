"""The dashboard in a real browser (Debian's Chromium, headless, driven by Playwright) against a real
daemon whose gateway fronts two stand-in Ollama processes.

Each test keeps screenshots under test-artifacts/dashboard/ (gitignored) for a person to look at.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
import pytest

from charter.errors import CharterError
from tests.conftest import Daemon
from tests.dashboard.conftest import CuttableProxy, Dash
from tests.gateway.conftest import Fleet

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def seed_spend(agent: Any, models: dict[str, tuple[int, int]]) -> None:
    """Recorded spend: a reservation settled with the tokens used, per model."""
    for model, (tin, tout) in models.items():
        r = await agent.reserve(model=model, input_tokens=tin, max_output_tokens=tout)
        await agent.settle(r["reservation_id"], tokens_in=tin, tokens_out=tout)


async def test_overview_find_an_agent_and_suspend_it(fleet: Fleet, dash_factory: Any) -> None:
    d = fleet.daemon
    alpha, boss, owl = await d.enroll("alpha", "worker"), await d.enroll("boss", "coordinator"), await d.enroll("owl", "observer")
    await seed_spend(boss, {"openai/gpt-4o-mini": (120_000, 40_000), "openai/gpt-4o": (30_000, 9_000),
                            "anthropic/claude-sonnet-4": (20_000, 5_000)})
    await seed_spend(alpha, {"openai/gpt-4o-mini": (50_000, 20_000)})
    dash: Dash = await dash_factory(d.url, fleet.home)
    page = dash.page
    try:
        await dash.open()
        # The token left the address bar at once and lives in this tab's sessionStorage only.
        assert "token" not in page.url and page.url.endswith("/dashboard#/overview")
        assert await page.evaluate("sessionStorage.getItem('charter.dashboard.token')") == dash.token
        assert await page.evaluate("document.cookie") == ""

        agents = page.locator("#card-agents")
        for name in ("alpha", "boss", "owl"):
            await agents.locator(f"tr[data-agent='{name}']").wait_for()
        await page.locator("#card-models tr[data-backend='primary'][data-state='closed']").wait_for()
        await page.locator("#card-budgets [data-scope]").first.wait_for()
        assert "0.34" in await page.locator("#card-budgets").inner_text()  # boss's spend today
        await dash.shot("01-overview")

        # Spend over time: hand-drawn SVG charts by day and by model.
        await dash.go("spend")
        await page.locator("#chart-day svg rect.bar").first.wait_for()
        assert await page.locator("#chart-model svg rect.bar").count() == 3
        assert "openai/gpt-4o" in await page.locator("#chart-model svg").inner_html()
        await dash.shot("02-spend")

        # Find an agent.
        await dash.go("agents")
        await page.get_by_label("Find an agent").fill("alp")
        rows = page.locator("#main tbody tr[data-agent]")
        await dash.until("() => document.querySelectorAll('#main tbody tr[data-agent]').length === 1")
        assert await rows.first.get_attribute("data-agent") == "alpha"
        await rows.first.click()
        await dash.until("() => location.hash === '#/agents/alpha'")
        main = page.locator("#main")
        await main.locator("[data-agent-page='alpha']").wait_for()
        text = await main.inner_text()
        for expected in ("agents.alpha.>", "tasks.results.>", "default", "worker", "$0.02 used"):
            assert expected in text, expected
        await dash.shot("03-agent-alpha")

        # Suspend, with confirmation; the agent is refused at once; then resume.
        await page.get_by_role("button", name="Suspend agent alpha").click()
        dialog = page.locator("dialog#confirm")
        await dialog.wait_for(state="visible")
        assert "Suspend alpha" in await dialog.inner_text()
        await page.get_by_label("Reason (optional, recorded in the event)").fill("looks stuck")
        await dash.shot("04-confirm-suspend")
        await page.get_by_role("button", name="Confirm: Suspend alpha").click()
        await main.locator(".view-head .badge[data-state='suspended']").wait_for()
        assert (await d.admin("GET", "/v1/admin/agents/alpha"))["status"] == "suspended"
        with pytest.raises(CharterError) as refused:
            await alpha.publish("agents.alpha.status", {"state": "still here"})
        assert refused.value.code == "suspended"
        suspended = await d.admin("GET", "/v1/events", params={"pattern": "charter.agents.suspended"})
        assert suspended["events"][-1]["envelope"]["payload"]["reason"] == "looks stuck"

        # Cancelling the dialog changes nothing.
        await page.get_by_role("button", name="Resume agent alpha").click()
        await page.get_by_role("button", name="Cancel").click()
        await dialog.wait_for(state="hidden")
        assert (await d.admin("GET", "/v1/admin/agents/alpha"))["status"] == "suspended"
        await page.get_by_role("button", name="Resume agent alpha").click()
        await page.get_by_role("button", name="Confirm: Resume alpha").click()
        await main.locator(".view-head .badge[data-state='active']").wait_for()
        await alpha.publish("agents.alpha.status", {"state": "back"})
        assert dash.errors() == []
    finally:
        for a in (alpha, boss, owl):
            await a.close()


async def test_approve_a_pending_t3_action_and_the_agent_goes_on(fleet: Fleet, dash_factory: Any) -> None:
    d = fleet.daemon
    boss = await d.enroll("boss", "coordinator")
    dash: Dash = await dash_factory(d.url, fleet.home)
    page = dash.page
    try:
        waiting = asyncio.create_task(boss.act("deploy.prod", {"service": "api", "version": "1.4.2"}, wait=30))
        await dash.open()
        await page.locator("#pending-count").filter(has_text="1").wait_for()
        await dash.go("approvals")
        card = page.locator("article.approval[data-action='deploy.prod'][data-agent='boss']")
        await card.wait_for()
        assert "T3" in await card.inner_text() and "1.4.2" in await card.inner_text()
        assert await page.locator("#nav-pending").inner_text() == "1"
        await dash.shot("05-approval-pending")
        assert not waiting.done()

        await page.get_by_role("button", name="Approve deploy.prod for boss once").click()
        answer = await asyncio.wait_for(waiting, 15)
        assert answer["effect"] == "allow" and answer["state"] == "used"  # the waiting agent went on
        await card.wait_for(state="detached")
        await page.locator("tr[data-approval] .badge[data-state='used']").first.wait_for()
        await page.locator("#nav-pending").wait_for(state="hidden")
        await dash.shot("06-approval-decided")

        # The decision is signed by the root key (the daemon signs for the dashboard's operator).
        evs = await d.admin("GET", "/v1/events", params={"pattern": "charter.approvals.boss"})
        approved = [e["envelope"]["payload"] for e in evs["events"] if e["envelope"]["payload"]["state"] == "approved"]
        assert approved and approved[0]["decision"]["note"].endswith("(via the dashboard)")

        # Approve for an hour: the same action then runs without asking again.
        waiting = asyncio.create_task(boss.act("deploy.prod", {"service": "web"}, wait=30))
        await page.get_by_role("button", name="Approve deploy.prod for boss for one hour").click()
        assert (await asyncio.wait_for(waiting, 15))["effect"] == "allow"
        again = await boss.act("deploy.prod", {"service": "worker"})
        assert again["effect"] == "allow" and "window" in again["decision"]["reason"]

        # Deny: the agent is told no.
        waiting = asyncio.create_task(boss.act("shell.exec", {"command": "rm -rf /srv/old"}, wait=30))
        await page.get_by_role("button", name="Deny shell.exec for boss").click()
        assert (await asyncio.wait_for(waiting, 15))["effect"] == "deny"
        assert dash.errors() == []
    finally:
        await boss.close()


async def test_a_bus_event_appears_live_and_the_stream_resumes_after_a_cut(fleet: Fleet, dash_factory: Any) -> None:
    d = fleet.daemon
    alpha = await d.enroll("alpha", "worker")
    proxy = await CuttableProxy(int(d.url.rsplit(":", 1)[1])).start()
    dash: Dash = await dash_factory(f"http://127.0.0.1:{proxy.port}", fleet.home)
    page = dash.page
    try:
        await dash.open("events")
        await page.locator("#conn[data-state='live']").wait_for()
        receipt = await alpha.publish("agents.alpha.status", {"state": "working", "task": "index the docs"})
        row = page.locator(f"#events-body tr[data-seq='{receipt['seq']}']")
        await row.wait_for(timeout=10_000)
        cells = [await row.locator("td").nth(i).inner_text() for i in range(5)]
        assert cells[0] == f"#{receipt['seq']}"
        assert cells[1].count(":") == 2  # HH:MM:SS
        assert cells[2] == "alpha" and cells[3] == "agents.alpha.status"
        assert '"task":"index the docs"' in cells[4]
        await page.locator("#events-body tr").first.wait_for()
        assert await page.locator("#events-body tr").first.get_attribute("data-seq") == str(receipt["seq"])  # newest first
        await dash.shot("07-events-live")

        # Click for the whole payload.
        await row.click()
        await page.locator("#events-body tr.detail pre").filter(has_text="index the docs").wait_for()

        # Cut the connection; what is published meanwhile arrives once, after the reconnect.
        proxy.cut()
        await page.locator("#conn[data-state='down']").wait_for(timeout=10_000)
        missed = [(await alpha.publish("agents.alpha.progress", {"step": i}))["seq"] for i in (1, 2, 3)]
        await dash.shot("08-events-disconnected")
        proxy.unblock()
        for seq in missed:
            await page.locator(f"#events-body tr[data-seq='{seq}']").wait_for(timeout=15000)
        await page.locator("#conn[data-state='live']").wait_for()
        live = await alpha.publish("agents.alpha.progress", {"step": 4})
        await page.locator(f"#events-body tr[data-seq='{live['seq']}']").wait_for(timeout=10_000)
        seqs = await page.eval_on_selector_all("#events-body tr[data-seq]", "rows => rows.map(r => r.dataset.seq)")
        assert len(seqs) == len(set(seqs)), "an event was shown twice after the reconnect"
        assert [int(s) for s in seqs] == sorted((int(s) for s in seqs), reverse=True)
        await dash.shot("09-events-resumed")

        # The filter narrows the list.
        await page.get_by_label("Filter events by subject or sender").fill("progress")
        await dash.until(
            "() => [...document.querySelectorAll('#events-body tr[data-subject]')].every(r => r.dataset.subject.includes('progress'))")
        assert await page.locator("#events-body tr[data-subject]").count() == 4
        assert [e for e in dash.errors() if "net::ERR_" not in e] == []  # the cut's own network errors aside
    finally:
        await proxy.close()
        await alpha.close()


async def test_a_service_goes_down_live_and_its_circuit_opens(supervised_fleet: Fleet, dash_factory: Any) -> None:
    """The supervisor watches both stand-in Ollamas; one is killed. On screen, without a reload: the
    service turns critical, and the gateway's circuit for that backend opens."""
    f = supervised_fleet
    dash: Dash = await dash_factory(f.daemon.url, f.home)
    page = dash.page
    await dash.open("services")
    await page.locator("#main tr[data-service='ai.ollama.primary'][data-state='passing']").wait_for(timeout=10_000)
    await page.locator("#main tr[data-service='ai.ollama.backup'][data-state='passing']").wait_for(timeout=10_000)
    await page.evaluate("window.__sameDocument = true")
    await dash.shot("10-services-up")

    killed_at = time.monotonic()
    f.primary.kill()
    down = page.locator("#main tr[data-service='ai.ollama.primary'][data-state='critical']")
    await down.wait_for(timeout=15_000)
    took = time.monotonic() - killed_at
    assert await page.evaluate("window.__sameDocument === true"), "the page was reloaded"
    assert "critical" in await down.inner_text()
    assert await page.locator("#main tr[data-service='ai.ollama.backup'][data-state='passing']").count() == 1
    await dash.shot("11-service-down")
    assert took < 15, took

    await dash.go("models")
    await page.locator("#main tr[data-backend='primary'][data-state='open']").wait_for(timeout=10_000)
    assert "circuit open" in await page.locator("#main tr[data-backend='primary']").inner_text()
    assert await page.locator("#main tr[data-backend='backup'][data-state='closed']").count() == 1
    await dash.shot("12-model-circuit-open")

    await dash.go("overview")
    await page.locator("#card-services tr[data-service='ai.ollama.primary'][data-state='critical']").wait_for()
    await page.locator("#card-models tr[data-backend='primary'][data-state='open']").wait_for()
    await dash.shot("13-overview-service-down")
    assert await page.evaluate("window.__sameDocument === true")
    assert dash.errors() == []


async def test_contradictions_capsule_freshness_and_the_archive_move_on_screen(unkept_daemon: Daemon,
                                                                                 dash_factory: Any) -> None:
    """The overview's reflection, capsule and archive panels and the archive view show real values,
    and follow what the operator does without a reload: a contradiction raised by the reflector
    goes away once fixed, a capsule build shows its time, a seal shows its segment and checkpoint."""
    d = unkept_daemon
    boss = await d.enroll("boss", "coordinator")  # may act up to T3; its role has no budget here
    dash: Dash = await dash_factory(d.url, d.home)
    page = dash.page
    try:
        await dash.open()
        reflect, capsules, archive = page.locator("#card-reflect"), page.locator("#card-capsules"), page.locator("#card-archive")
        unbudgeted = reflect.locator("li[data-truth='spenders-budgeted']").filter(has_text="agent boss")
        unbuilt = reflect.locator("li[data-truth='capsule-fresh']")
        await unbudgeted.wait_for()
        await unbuilt.wait_for()
        assert "no USD budget" in await unbudgeted.inner_text()
        assert await unbudgeted.get_attribute("data-severity") == "warning"
        await page.locator("#card-capsules[data-state='unknown']").wait_for()
        assert "AI_ALIGNMENT built never" in await capsules.inner_text()
        await page.locator("#card-archive[data-segments='0'][data-archived-seq='0']").wait_for()
        await page.evaluate("window.__sameDocument = true")
        await dash.shot("15-overview-contradictions")

        # The operator gives boss a budget: the reflector no longer finds the contradiction.
        await d.admin("PUT", "/v1/admin/budget", json={"scope": "agent:boss", "unit": "usd", "period": "day", "limit": 2})
        await unbudgeted.wait_for(state="detached", timeout=10_000)
        resolved = await d.admin("GET", "/v1/events", params={"pattern": "charter.reflect.resolved"})
        assert any(e["envelope"]["payload"]["truth"] == "spenders-budgeted" for e in resolved["events"])

        # A capsule build: the freshness panel shows when, and that contradiction goes too.
        await d.admin("POST", "/v1/admin/capsules/build", json={"name": "AI_ALIGNMENT"})
        fresh = page.locator("#card-capsules[data-state='fresh']")
        await fresh.wait_for(timeout=10_000)
        built_at = (await d.admin("GET", "/v1/admin/capsules"))["freshness"]["built_at"]
        assert built_at and float(await fresh.get_attribute("data-built-at")) == pytest.approx(built_at)
        assert re.search(r"AI_ALIGNMENT built (just now|\d+s ago) \(max age 1h 0m\)", await fresh.inner_text())
        await fresh.locator("tr[data-capsule='AI_ALIGNMENT']").wait_for()
        await unbuilt.wait_for(state="detached", timeout=10_000)
        assert await reflect.locator("li[data-truth='spenders-budgeted'], li[data-truth='capsule-fresh']").count() == 0
        await dash.shot("16-overview-contradictions-resolved")

        # Seal the log: a segment and a signed checkpoint, on the overview and in the archive view.
        sealed = await d.admin("POST", "/v1/admin/archive/seal")
        assert sealed["sealed"] and sealed["checkpoint"]
        upto = sealed["archived_seq"]
        # (a render between the segment and its checkpoint shows the segment alone: wait for both)
        await page.locator(f"#card-archive[data-segments='1'][data-archived-seq='{upto}']"
                           ":not([data-checkpoints='0'])").wait_for(timeout=10_000)
        assert int(await archive.get_attribute("data-checkpoints")) >= 1
        report = await d.admin("POST", "/v1/admin/archive/verify")
        assert report["ok"], report
        await archive.get_by_role("link", name="details →").click()
        await dash.until("() => location.hash === '#/archive'")
        view = page.locator("#main #card-archive[data-verified='yes']")
        await view.wait_for()
        assert await view.get_attribute("data-segments") == "1"
        assert int(await view.get_attribute("data-checkpoints")) >= 1
        text = await view.inner_text()
        assert f"up to #{upto} of #" in text and "verified" in text
        everything = await page.locator("#main").inner_text()
        assert f"archived_seq\n{upto}" in everything and "segments\n1" in everything
        await dash.shot("17-archive-sealed", full_page=True)
        assert await page.evaluate("window.__sameDocument === true"), "the page was reloaded"
        assert dash.errors() == []
    finally:
        await boss.close()


async def test_the_overview_keeps_up_when_events_come_faster_than_it_renders(fleet: Fleet, dash_factory: Any) -> None:
    """On a loaded machine one render of the overview can take longer than the gap between two
    events, each of which asks for a refresh. The page must still move: one render at a time, the
    next once it ends, not a render per event, each thrown away for the next before it is shown."""
    d = fleet.daemon
    dash: Dash = await dash_factory(d.url, fleet.home)
    page = dash.page
    stop = asyncio.Event()

    async def slow_status(route: Any) -> None:  # every render of the overview waits ~1 s for it
        await asyncio.sleep(1.0)
        await route.continue_()

    async def events() -> None:  # a charter.* event every 0.3 s: each asks the overview for a refresh
        i = 0
        while not stop.is_set():
            await d.admin("PUT", "/v1/admin/budget",
                          json={"scope": "global", "unit": "tokens", "period": "hour", "limit": 10_000_000 + i})
            i += 1
            await asyncio.sleep(0.3)

    await dash.open()
    await page.locator("#card-agents").wait_for()
    await page.route("**/v1/admin/status", slow_status)
    churn = asyncio.create_task(events())
    try:
        await asyncio.sleep(1.0)  # the events are coming
        latecomer = await d.enroll("latecomer", "worker")
        await page.locator("#card-agents tr[data-agent='latecomer']").wait_for(timeout=10_000)
        assert not churn.done()  # still coming when it showed
        await latecomer.close()
    finally:
        stop.set()
        await churn


async def test_a_wrong_token_gets_401_and_the_login_prompt(fleet: Fleet, dash_factory: Any) -> None:
    d = fleet.daemon
    dash: Dash = await dash_factory(d.url, fleet.home)
    page = dash.page
    statuses: list[int] = []
    page.on("response", lambda r: statuses.append(r.status) if "/v1/admin/status" in r.url else None)
    await page.goto(f"{d.url}/dashboard#token=chd_not-the-token")
    await page.locator("#login").wait_for(state="visible")
    await page.locator("#login-message").filter(has_text="401").wait_for()
    assert statuses == [401]
    assert await page.locator("#shell").is_hidden()
    assert "token" not in page.url
    assert await page.evaluate("sessionStorage.getItem('charter.dashboard.token')") is None
    assert (await page.request.get(f"{d.url}/v1/admin/agents", headers={"Authorization": "Bearer chd_wrong"})).status == 401
    await dash.shot("14-login-refused")

    # The right token, typed in, logs in.
    await page.get_by_label("Dashboard token").fill(dash.token)
    await page.get_by_role("button", name="Log in with this token").click()
    await page.locator("#shell").wait_for(state="visible")
    await page.locator("#card-models").wait_for()
    # Log out: the token leaves the tab.
    await page.get_by_role("button", name="Log out of the dashboard").click()
    await page.locator("#login").wait_for(state="visible")
    assert await page.evaluate("sessionStorage.getItem('charter.dashboard.token')") is None


async def test_a_foreign_page_cannot_use_the_token(fleet: Fleet, dash_factory: Any) -> None:
    """A page from another origin that somehow holds the token still gets nothing: the browser's
    preflight finds no CORS grant, and the daemon refuses the foreign Origin (403)."""
    d = fleet.daemon
    dash: Dash = await dash_factory(d.url, fleet.home)
    page = dash.page
    await page.route("http://evil.test/**", lambda route: route.fulfill(
        status=200, content_type="text/html", body="<!doctype html><title>evil</title><p>hello</p>"))
    await page.goto("http://evil.test/")
    outcome = await page.evaluate("""async ([url, token]) => {
        try {
            const r = await fetch(url + '/v1/admin/agents', {headers: {Authorization: 'Bearer ' + token}});
            return 'status ' + r.status;
        } catch (e) { return 'refused: ' + e.name; }
    }""", [d.url, dash.token])
    assert outcome.startswith("refused"), outcome
    # Even without the browser's protection, the daemon refuses the foreign Origin outright.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{d.url}/v1/admin/agents", headers={"Authorization": f"Bearer {dash.token}",
                                                                "Origin": "http://evil.test"}) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden_origin"
