"""The governing MCP proxy, against a real downstream MCP server process (fs_server.py) whose own log
says which calls reached it. Clients are the official SDK's; the daemon, the proxy and the server are
real processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mcp import Client

from charter.supervisor.run import bwrap_path, bwrap_problem

from tests.conftest import Daemon, aclose, free_port
from tests.mcp.mcp_helpers import FS_SERVER, calls, direct_params, log_in_sandbox, proxy_params, sandbox, text

pytestmark = pytest.mark.anyio


async def decisions(agent, action: str) -> list[dict]:
    return [e.payload for e in await agent.recent(f"charter.decisions.{agent.name}", 500)
            if e.payload.get("action") == action]


async def test_allowed_passes_through_unchanged_denied_never_reaches_the_server(daemon: Daemon, tmp_path: Path) -> None:
    alpha = await daemon.enroll("alpha", "worker")
    (sandbox(alpha) / "notes.txt").write_text("hello from the sandbox\n")
    log, direct_log = log_in_sandbox(alpha, "proxied.log"), log_in_sandbox(alpha, "direct.log")
    env = {"FS_TEST_SECRET": "must-not-leak"}
    root_key = daemon.home.root_key_path
    try:
        async with (Client(proxy_params(alpha, log, "--env", f"FS_PROBE={root_key}", home=daemon.home.root,
                                        env=env)) as p,
                    Client(direct_params(alpha, direct_log)) as d):
            # The list is filtered: deleting is T3, above a worker's T2, so every call of it would be denied.
            shown = {t.name for t in (await p.list_tools()).tools}
            assert shown == {"read_file", "list_directory", "write_file", "echo"}
            assert "delete_file" in {t.name for t in (await d.list_tools()).tools}

            # Allowed (T1 read, T2 write): the downstream's answer, unchanged.
            for tool, args in (("read_file", {"path": "notes.txt"}), ("list_directory", {"path": "."}),
                               ("write_file", {"path": "out.txt", "content": "x"})):
                via, direct = await p.call_tool(tool, args), await d.call_tool(tool, args)
                assert not via.is_error, text(via)
                assert via.content == direct.content and via.structured_content == direct.structured_content
            assert [c["tool"] for c in calls(log)] == ["read_file", "list_directory", "write_file"]

            # The downstream runs as the agent (`charter run`): in its sandbox, with a scrubbed environment.
            first = calls(log)[0]
            assert Path(first["cwd"]).resolve() == Path(first["home"]).resolve() == sandbox(alpha).resolve()
            assert first["secret"] is None
            if bwrap_path() and bwrap_problem(bwrap_path()) is None:  # jailed: the Charter home is hidden
                assert first["probe_readable"] is False and os.access(root_key, os.R_OK)

            # Denied: a clear refusal, and the downstream never sees the call (its log proves it).
            before = len(calls(log))
            refused = await p.call_tool("delete_file", {"path": "notes.txt"})
            assert refused.is_error
            assert text(refused).startswith("policy_denied: Charter denied mcp.fs.delete_file: ")
            assert "rule mcp-delete, T3" in text(refused)
            assert refused.structured_content["error"]["details"]["decision"]["rule"] == "mcp-delete"
            assert len(calls(log)) == before and (sandbox(alpha) / "notes.txt").exists()

            # Arguments are the action's attributes: a rule can look at them (here, a path outside
            # the served directory is the downstream's own error, passed through as an error result).
            bad = await p.call_tool("read_file", {"path": "../../etc/passwd"})
            assert bad.is_error and "outside the served directory" in text(bad)

            # Each call and its decision is an event on the bus.
            assert [e["effect"] for e in await decisions(alpha, "mcp.fs.read_file")] == ["allow", "allow"]
            assert [(e["effect"], e["rule"]) for e in await decisions(alpha, "mcp.fs.delete_file")] == [
                ("deny", "mcp-delete")]

            # Revoked: the very next call is refused and does not reach the downstream.
            await daemon.admin("POST", "/v1/admin/agents/alpha/revoke", json={"reason": "test"})
            gone = await p.call_tool("read_file", {"path": "notes.txt"})
            assert gone.is_error and text(gone).startswith("revoked: ")
            assert len(calls(log)) == before + 1
    finally:
        await aclose(alpha)


async def approve(daemon: Daemon, action: str, timeout: float = 20.0) -> str:
    """Wait until `action` has a pending approval, and approve it with `charter approvals approve`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = (await daemon.admin("GET", "/v1/admin/approvals", params={"state": "pending"}))["approvals"]
        mine = [a for a in pending if a["action"] == action]
        if mine:
            aid = mine[0]["id"]
            env = {**os.environ, "CHARTER_HOME": str(daemon.home.root)}
            done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "charter", "approvals", "approve", aid],
                                           capture_output=True, text=True, env=env, timeout=60)
            assert done.returncode == 0, done.stderr
            return aid
        await asyncio.sleep(0.05)
    raise AssertionError(f"no pending approval for {action}")


async def test_a_t3_call_waits_and_runs_once_after_approval(daemon: Daemon, tmp_path: Path) -> None:
    boss = await daemon.enroll("boss", "coordinator")  # T3: deleting waits for the operator
    for name in ("a.txt", "b.txt"):
        (sandbox(boss) / name).write_text(name)
    log = log_in_sandbox(boss, "fs.log")
    try:
        async with Client(proxy_params(boss, log, "--approval-wait", "30", home=daemon.home.root)) as p:
            assert "delete_file" in {t.name for t in (await p.list_tools()).tools}

            # The call waits; the operator approves; it runs exactly once.
            call = asyncio.create_task(p.call_tool("delete_file", {"path": "a.txt"}))
            aid = await approve(daemon, "mcp.fs.delete_file")
            done = await asyncio.wait_for(call, 30)
            assert not done.is_error, text(done)
            assert [c["tool"] for c in calls(log)] == ["delete_file"]
            assert not (sandbox(boss) / "a.txt").exists()
            states = {a["id"]: a["state"] for a in (await daemon.admin("GET", "/v1/admin/approvals"))["approvals"]}
            assert states[aid] == "used"

            # The same call again is a new request for approval: denied, it never runs.
            again = asyncio.create_task(p.call_tool("delete_file", {"path": "b.txt"}))
            deadline = time.monotonic() + 20
            while True:
                pending = (await daemon.admin("GET", "/v1/admin/approvals", params={"state": "pending"}))["approvals"]
                if pending:
                    break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            env = {**os.environ, "CHARTER_HOME": str(daemon.home.root)}
            denied = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "charter", "approvals", "deny",
                                                              pending[0]["id"]], capture_output=True, text=True, env=env)
            assert denied.returncode == 0, denied.stderr
            refused = await asyncio.wait_for(again, 30)
            assert refused.is_error and "the operator denied it" in text(refused)
            assert [c["tool"] for c in calls(log)] == ["delete_file"] and (sandbox(boss) / "b.txt").exists()

        # Nobody decides within --approval-wait: refused with the approval's id; approved later, the same
        # call asked again waits on that approval (no second request) and runs once. (This proxy sees no
        # Charter home, so it starts the downstream in the sandbox itself; and it passes one variable on
        # purpose: --pass-env is the only way one reaches the downstream.)
        nohome = tmp_path / "no-home"
        nohome.mkdir()
        async with Client(proxy_params(boss, log, "--approval-wait", "0.5", "--pass-env", "FS_TEST_SECRET",
                                       home=nohome, env={"FS_TEST_SECRET": "passed-on-purpose"})) as p:
            first = await p.call_tool("delete_file", {"path": "b.txt"})
            assert first.is_error and text(first).startswith("approval_pending: ")
            aid = first.structured_content["error"]["details"]["approval_id"]
            assert aid in text(first) and f"charter approvals approve {aid}" in text(first)
            assert await approve(daemon, "mcp.fs.delete_file") == aid
            second = await p.call_tool("delete_file", {"path": "b.txt"})
            assert not second.is_error, text(second)
            assert [c["tool"] for c in calls(log)] == ["delete_file", "delete_file"]
            assert [c["secret"] for c in calls(log)] == [None, "passed-on-purpose"]
            pending = (await daemon.admin("GET", "/v1/admin/approvals", params={"state": "pending"}))["approvals"]
            assert pending == []
    finally:
        await aclose(boss)


async def test_a_downstream_over_streamable_http(daemon: Daemon, tmp_path: Path) -> None:
    alpha = await daemon.enroll("alpha", "worker")
    served = tmp_path / "served"
    served.mkdir()
    (served / "notes.txt").write_text("over http")
    log = tmp_path / "http.log"
    port = free_port()
    server = subprocess.Popen([sys.executable, str(FS_SERVER), "--http", str(port)], cwd=served,
                              env={**os.environ, "FS_LOG": str(log)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "the HTTP downstream did not start"
                await asyncio.sleep(0.1)
        url = f"http://127.0.0.1:{port}/mcp"
        async with Client(proxy_params(alpha, log, "--header", "X-Test: 1", home=daemon.home.root, url=url)) as p:
            assert "delete_file" not in {t.name for t in (await p.list_tools()).tools}
            ok = await p.call_tool("read_file", {"path": "notes.txt"})
            assert not ok.is_error and text(ok) == "over http"
            refused = await p.call_tool("delete_file", {"path": "notes.txt"})
            assert refused.is_error and "policy_denied" in text(refused)
            assert [c["tool"] for c in calls(log)] == ["read_file"] and (served / "notes.txt").exists()
    finally:
        server.terminate()
        server.wait(10)
        await aclose(alpha)


async def test_the_relay_lets_no_call_through_ungoverned(daemon: Daemon) -> None:
    """Raw JSON-RPC lines, as a careless or hostile client could write them, to the proxy's stdin."""
    alpha = await daemon.enroll("alpha", "worker")
    (sandbox(alpha) / "keep.txt").write_text("x")
    log = log_in_sandbox(alpha, "fs.log")
    params = proxy_params(alpha, log, home=daemon.home.root)
    proc = await asyncio.create_subprocess_exec(params.command, *params.args, stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, env={**os.environ, **params.env})
    assert proc.stdin is not None and proc.stdout is not None

    async def send(obj: object) -> None:
        proc.stdin.write((obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n")
        await proc.stdin.drain()

    async def answer(rid: object) -> dict:
        while True:
            msg = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
            if msg.get("id") == rid:
                return msg

    def call(rid: object, tool: str, **args: object) -> dict:
        return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": tool, "arguments": args}}

    try:
        await send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})
        init = await answer(1)
        assert init["result"]["serverInfo"]["name"] == "fs"
        assert not {"resources", "prompts", "completions"} & set(init["result"]["capabilities"])
        await send({"jsonrpc": "2.0", "method": "notifications/initialized"})

        await send([call(2, "delete_file", path="keep.txt")])  # a batch
        assert (await answer(None))["error"]["code"] == -32600
        await send({k: v for k, v in call(3, "write_file", path="w.txt", content="x").items() if k != "id"})  # no id
        await send(b'{"jsonrpc": "2.0", "id": 4, "method": "tools/call", '  # one method for us, another for them?
                   b'"params": {"name": "delete_file", "arguments": {"path": "keep.txt"}}, "method": "ping"}')
        assert "result" in await answer(4)  # read as the ping it ends with, and passed on as exactly that
        await send(b"{not json")
        assert (await answer(None))["error"]["code"] == -32700
        await send({"jsonrpc": "2.0", "id": 5, "method": "resources/list"})
        assert (await answer(5))["error"]["code"] == -32601
        await send(call(6, "delete_file", path="keep.txt"))
        denied = (await answer(6))["result"]
        assert denied["isError"] and denied["structuredContent"]["error"]["code"] == "policy_denied"
        await send(call(7, "read_file", path="keep.txt"))
        ok = (await answer(7))["result"]
        assert not ok.get("isError") and ok["content"][0]["text"] == "x"
        await send({"jsonrpc": "2.0", "id": 8, "method": "tools/list"})
        listed = {t["name"] for t in (await answer(8))["result"]["tools"]}
        assert listed == {"read_file", "list_directory", "write_file", "echo"}
        assert [c["tool"] for c in calls(log)] == ["read_file"]
        assert (sandbox(alpha) / "keep.txt").exists() and not (sandbox(alpha) / "w.txt").exists()
    finally:
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 30)
        await aclose(alpha)
