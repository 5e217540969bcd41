"""Browser tests drive Debian's Chromium (headless) with Playwright's Python package.

Playwright's own browser downloads are never used: `make test` installs Debian's `chromium` when it
is missing (as root with apt-get). Without it these tests skip with the reason, except under
CI=true, where they fail. Screenshots go to test-artifacts/dashboard/ (gitignored): the ones the
tests take, and, when a browser test fails, `FAILED-<test>-<n>.png` of each of its tabs as it was
then, with the tab's console beside it (`.console.txt`).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from charter.server.daemon import dashboard_token, stop
from tests.conftest import Daemon, make_home, start_daemon
from tests.gateway.conftest import Fleet, gateway_home, start_fleet, stop_fleet

CHROMIUM = os.environ.get("CHARTER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
VIEWPORT = {"width": 1280, "height": 800}


def _unavailable(msg: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(msg + " (CI must have it: `make test` installs Debian's chromium as root)")
    pytest.skip(msg)


def require_browser() -> None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _unavailable(f"Debian's Chromium is not installed at {CHROMIUM}; `make test` (as root) or "
                     "`apt-get install chromium` installs it")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright package is not installed; `pip install -e '.[test]'` installs it")


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Any]:
    """A headless Chromium with a fresh profile (Playwright makes a new temporary user data dir per
    launch) and a fresh HOME, so nothing from the machine's own Chromium is read or written."""
    require_browser()
    from playwright.async_api import async_playwright

    home = tmp_path / "chromium-home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, env=env, timeout=30_000)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A daemon whose gateway fronts two stand-in Ollama processes (see tests/gateway/conftest.py)."""
    f = start_fleet(tmp_path / "home", probe="0.5s", cooldown="30s")
    yield f
    stop_fleet(f)


SERVICE = """
[[services]]
label = "ai.ollama.{which}"
name = "Ollama ({which} stand-in)"
interval = "0.5s"
timeout = "1s"
tier = "{tier}"
why = "the gateway's {which} model backend"
manager = "none"
category = "models"

[services.check]
kind = "http"
url = "http://127.0.0.1:{port}/api/version"
"""


@pytest.fixture
def supervised_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """The same fleet, with the supervisor watching both stand-ins (CHARTER_HOME/services/*.toml)."""
    from charter.models.standin import spawn_standin

    primary = spawn_standin(models=["llama3.2:3b"], control_port=True, token_delay=0.001)
    backup = spawn_standin(models=["qwen2.5:0.5b"], control_port=True, token_delay=0.001)
    home = gateway_home(tmp_path / "home", primary.port, backup.port, probe="0.5s", cooldown="30s")
    (home.root / "services").mkdir(exist_ok=True)
    for which, proc, tier in (("primary", primary, "critical"), ("backup", backup, "optional")):
        (home.root / "services" / f"{which}.toml").write_text(SERVICE.format(which=which, port=proc.port, tier=tier))
    f = Fleet(home, start_daemon(home), primary, backup)
    yield f
    stop_fleet(f)


@pytest.fixture
def unkept_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon with truths easy to break from a test: the coordinator role has no budget (so a
    coordinator, who may act up to T3, is a spender without one), and capsules are not built on a
    schedule (so AI_ALIGNMENT stays unbuilt until the test builds it)."""
    home = make_home(tmp_path / "home")
    text = home.config_path.read_text()
    role = text.index("[roles.coordinator]")
    text = text[:role] + re.sub(r"(?m)^budget_usd_per_day = .*\n", "", text[role:], count=1)
    assert "[capsules]" not in text
    home.config_path.write_text(text + "\n[capsules]\nenabled = false\n")
    d = start_daemon(home)
    yield d
    stop(home)


class Dash:
    """A dashboard tab, logged in with the token `charter up` printed."""

    def __init__(self, page: Any, url: str, token: str) -> None:
        self.page, self.url, self.token = page, url, token
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    async def open(self, view: str = "overview") -> None:
        await self.page.goto(f"{self.url}/dashboard#token={self.token}")
        await self.page.locator("#shell").wait_for(state="visible")
        if view != "overview":
            await self.go(view)

    async def go(self, view: str) -> None:
        await self.page.evaluate("v => { location.hash = '#/' + v }", view)
        await self.until("v => location.hash === '#/' + v", view)
        await self.page.locator("#main .view-head h1").first.wait_for()

    async def until(self, predicate: str, arg: Any = None, timeout: float = 10.0) -> Any:
        """Poll a JavaScript predicate. (Playwright's wait_for_function evaluates strings inside the
        page, which the dashboard's Content-Security-Policy forbids, as it should.)"""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.page.evaluate(predicate, arg)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"not true within {timeout}s: {predicate}")
            await asyncio.sleep(0.1)

    async def shot(self, name: str, *, full_page: bool = False) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def errors(self) -> list[str]:
        """Console errors and page errors, less the HTTP statuses the page expects: 404 from the
        optional panels' routes (hidden then), 401 and 403 that tests provoke on purpose."""
        return [c for c in self.console if (c.startswith("error") or c.startswith("pageerror"))
                and not re.search(r"status of 40[134]", c)]


REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """Keep each phase's report on the test, so a fixture's teardown can tell that the test failed."""
    report: pytest.TestReport = yield
    item.stash.setdefault(REPORTS, {})[report.when] = report
    return report


def failed(node: pytest.Item) -> bool:
    return any(r.failed for r in node.stash.get(REPORTS, {}).values())


def failure_stem(node: pytest.Item) -> str:
    return "FAILED-" + re.sub(r"[^\w-]+", "_", node.name)


async def shoot_failure(node: pytest.Item, dashes: list[Dash]) -> None:
    """What each tab showed when the test failed: the screen says more than the assertion does."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    stem = failure_stem(node)
    for n, d in enumerate(dashes, 1):
        notes = [d.page.url, *d.console]
        try:
            await d.page.screenshot(path=str(ARTIFACTS / f"{stem}-{n}.png"), full_page=True, timeout=10_000)
        except Exception as exc:  # noqa: BLE001 - a closed or hung page must not hide the test's own failure
            notes.append(f"(no screenshot: {exc})")
        (ARTIFACTS / f"{stem}-{n}.console.txt").write_text("\n".join(notes) + "\n")


@pytest.fixture
async def dash_factory(browser: Any, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    contexts: list[Any] = []
    dashes: list[Dash] = []
    for old in ARTIFACTS.glob(failure_stem(request.node) + "-*"):  # an earlier run's failure, now stale
        old.unlink()

    async def make(url: str, home: Any) -> Dash:
        ctx = await browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
        contexts.append(ctx)
        token = dashboard_token(home)
        assert token and token.startswith("chd_")
        dashes.append(Dash(await ctx.new_page(), url, token))
        return dashes[-1]

    yield make
    if failed(request.node):
        await shoot_failure(request.node, dashes)
    for c in contexts:
        await c.close()


class CuttableProxy:
    """A loopback TCP proxy in front of the daemon whose connections a test can cut, to see the
    dashboard's stream reconnect and resume from the last sequence number it saw."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.blocked = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()
                self._writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self, *, block: bool = True) -> None:
        """Drop every open connection; while blocked, refuse new ones."""
        self.blocked = block
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def unblock(self) -> None:
        self.blocked = False

    async def close(self) -> None:
        self.cut()
        if self._server:
            self._server.close()
