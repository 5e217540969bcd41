"""`charter models`: the gateway's aliases, the health of its backends, and a quick chat."""

from __future__ import annotations


import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from charter.cli.common import emit_json, out, run, state
from charter.cli.operator import OperatorClient
from charter.errors import CharterError

models_app = typer.Typer(help="The model gateway: aliases, backend health, a quick chat.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of text.")]


async def _health() -> dict[str, Any]:
    async with OperatorClient(state.home) as client:
        return await client.call("GET", "/v1/admin/models")


@models_app.command("list")
def models_list(as_json: JsonOpt = False) -> None:
    """Aliases and the chain each one walks."""
    data = run(_health)
    if as_json:
        emit_json(data["aliases"])
        return
    table = Table("alias", "chain (tried in order)")
    for alias, chain in data["aliases"].items():
        table.add_row(alias, " -> ".join(chain))
    out.print(table)


@models_app.command("health")
def models_health(as_json: JsonOpt = False) -> None:
    """Each backend's circuit (closed, open, half_open) and its last deep probe."""
    data = run(_health)
    if as_json:
        emit_json(data["backends"])
        return
    table = Table("backend", "kind", "circuit", "retry in", "last probe", "reason")
    colour = {"closed": "green", "open": "red", "half_open": "yellow"}
    for b in data["backends"]:
        probe = b.get("probe") or {}
        p = "-" if not probe else ("ok" if probe.get("ok") else "n/a" if probe.get("ok") is None else "failed")
        if probe.get("ms") is not None:
            p += f" ({probe['ms']} ms)"
        table.add_row(b["backend"], b["kind"], f"[{colour.get(b['state'], 'white')}]{b['state']}[/]",
                      f"{b['retry_in_s']}s" if b["state"] == "open" else "-", p,
                      b["last_reason"] or (probe.get("reason") or ""))
    out.print(table)


@models_app.command("chat")
def models_chat(
    alias: Annotated[str, typer.Argument(help="An alias (e.g. default) or BACKEND/MODEL.")],
    prompt: Annotated[str, typer.Argument(help="The prompt, or - for standard input.")],
    creds: Annotated[Path, typer.Option("--creds", help="Ask as this agent (its policy and budget apply).")],
    max_tokens: Annotated[Optional[int], typer.Option(help="Most tokens to generate.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Send one prompt through the gateway as an agent and stream the answer."""
    import aiohttp
    import orjson

    from charter.sdk import Agent

    text = sys.stdin.read() if prompt == "-" else prompt

    async def body() -> dict[str, Any]:
        agent = Agent.load(creds)
        if not agent.api_key:
            raise CharterError("unauthorized", "these credentials hold no API key; run `charter agents api-key --creds FILE`")
        req: dict[str, Any] = {"model": alias, "messages": [{"role": "user", "content": text}], "stream": True}
        if max_tokens:
            req["max_tokens"] = max_tokens
        meta: dict[str, Any] = {}
        answer = ""
        async with aiohttp.ClientSession() as s, s.post(agent.openai_base_url + "/chat/completions",
                                                         json=req, headers={"Authorization": f"Bearer {agent.api_key}"}) as r:
            if r.status != 200:
                err = (await r.json()).get("error", {})
                raise CharterError(err.get("code") or "http_error", err.get("message") or f"HTTP {r.status}")
            async for line in r.content:
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = orjson.loads(line[5:])
                if "error" in chunk:
                    raise CharterError(chunk["error"].get("code") or "midstream_failure", chunk["error"]["message"])
                for c in chunk.get("choices", []):
                    piece = (c.get("delta") or {}).get("content") or ""
                    answer += piece
                    if not as_json:
                        sys.stdout.write(piece)
                        sys.stdout.flush()
                meta = chunk.get("charter") or meta
        await agent.close()
        return {"answer": answer, "charter": meta}

    result = run(body)
    if as_json:
        emit_json(result)
        return
    meta = result["charter"]
    sys.stdout.write("\n")
    note = f"answered by {meta.get('backend')}"
    if meta.get("fallbacks"):
        note += "; fell back from " + ", ".join(f"{f['ref']} ({f['reason']})" for f in meta["fallbacks"])
    out.print(f"[dim]{note}[/dim]")

