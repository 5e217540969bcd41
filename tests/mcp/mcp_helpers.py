"""What the MCP tests share: how to reach Charter's MCP server on each transport, the proxy, the log.

Every client here is the official SDK's `mcp.Client`; every server is a real process.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from charter.sdk import Agent

HERE = Path(__file__).resolve().parent
FS_SERVER = HERE / "fs_server.py"


def creds_path(agent: Agent) -> str:
    assert agent.path is not None
    return str(agent.path)


def charter_stdio(agent: Agent) -> StdioServerParameters:
    """`charter mcp --creds FILE`, as an assistant's MCP config starts it."""
    return StdioServerParameters(command=sys.executable, args=["-m", "charter", "mcp", "--creds", creds_path(agent)])


@asynccontextmanager
async def http_client(url: str, api_key: str | None, **kw: Any) -> AsyncIterator[Client]:
    """The daemon's /mcp endpoint over streamable HTTP, with the agent's bearer key."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=60.0)) as http:
        async with Client(streamable_http_client(url + "/mcp", http_client=http), **kw) as client:
            yield client


@asynccontextmanager
async def charter_client(transport: str, daemon_url: str, agent: Agent) -> AsyncIterator[Client]:
    if transport == "stdio":
        async with Client(charter_stdio(agent)) as client:
            yield client
    else:
        async with http_client(daemon_url, agent.api_key) as client:
            yield client


def proxy_params(agent: Agent, log: Path, *extra: str, home: Path, env: dict[str, str] | None = None,
                 url: str | None = None) -> StdioServerParameters:
    """`charter mcp proxy --creds FILE --name fs ... -- python fs_server.py` (or `--url URL`).

    `home` is the CHARTER_HOME the proxy sees: the daemon's (the downstream then starts through the
    supervisor's `charter run` machinery, jailed where bubblewrap works), or an empty directory (no
    home on this machine: the plain sandbox launch).
    """
    args = ["-m", "charter", "mcp", "proxy", "--creds", creds_path(agent), "--name", "fs", "--env", f"FS_LOG={log}",
            *extra]
    args += ["--url", url] if url else ["--", sys.executable, str(FS_SERVER)]
    return StdioServerParameters(command=sys.executable, args=args, env={"CHARTER_HOME": str(home), **(env or {})})


def log_in_sandbox(agent: Agent, name: str) -> Path:
    """A call log the downstream can write even in a jail, where only its sandbox is writable."""
    logs = sandbox(agent) / ".logs"
    logs.mkdir(exist_ok=True)
    return logs / name


def direct_params(agent: Agent, log: Path) -> StdioServerParameters:
    """The same downstream server, started directly in the agent's sandbox (no Charter in between)."""
    return StdioServerParameters(command=sys.executable, args=[str(FS_SERVER)], env={"FS_LOG": str(log)},
                                 cwd=sandbox(agent))


def sandbox(agent: Agent) -> Path:
    return Path(agent.creds.charter["sandbox"]["path"])


def calls(log: Path) -> list[dict[str, Any]]:
    """What the downstream server received, in order (its own log)."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def text(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)
