"""`charter up` prints the dashboard link with this start's login token, and that link logs in.

The daemon is started by the real command line (`charter up --detach`, which spawns `charter up` in
the background with its stdout going to the daemon's log, as the other tests' daemons do), so both
what the foreground daemon prints and what `--detach` prints are read as a user would see them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from charter.server.daemon import read_daemon_file, stop
from tests.conftest import make_home

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

LINK = re.compile(r"^Dashboard: (http://\S+/dashboard#token=(chd_[A-Za-z0-9_-]+))$", re.M)


def charter(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "charter", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=60, check=False)


async def test_charter_up_prints_the_dashboard_link_holding_the_login_token(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    try:
        started = charter(home.root, "up", "--detach")
        assert started.returncode == 0, started.stderr
        info = read_daemon_file(home)
        assert info is not None
        token = (home.run_dir / "dashboard.token").read_text().strip()
        assert token.startswith("chd_")

        # What the foreground `charter up` printed (its stdout is the daemon's log here): two lines,
        # where it listens, then the link.
        log = Path(home.log_file).read_text()
        assert f"Charter is up at {info['url']} (pid {info['pid']}).\nDashboard: {info['url']}/dashboard#token={token}\n" in log
        # What `charter up --detach` printed, and `charter dashboard` prints again: the same link.
        (detach_link, detach_token), = LINK.findall(started.stdout)
        assert started.stdout.startswith(f"Charter is up at {info['url']} (pid {info['pid']}); logs: ")
        (log_link, log_token), = LINK.findall(log)
        again = charter(home.root, "dashboard")
        assert again.returncode == 0 and again.stdout.strip() == log_link == detach_link
        assert log_token == detach_token == token

        # The link logs in: its page is served, and its token is accepted as the page sends it.
        parts = urlsplit(log_link)
        assert parts.fragment == f"token={token}" and parts.path == "/dashboard"
        base = f"{parts.scheme}://{parts.netloc}"
        assert base == info["url"]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/dashboard") as r:
                assert r.status == 200 and r.content_type == "text/html"
            async with http.get(f"{base}/v1/admin/status", headers={"Authorization": f"Bearer {log_token}"}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["pid"] == info["pid"]
            async with http.get(f"{base}/v1/admin/status", headers={"Authorization": f"Bearer {log_token}x"}) as r:
                assert r.status == 401
    finally:
        stop(home)
