"""`make demo`: the spine, end to end, narrated for a newcomer.

Everything is real: a temporary CHARTER_HOME, the daemon as its own process on a spare loopback
port, the `charter` command as a user types it, and the SDK for what a command cannot do (forging
and replaying messages). Each step checks its own outcome; the demo exits non-zero if one fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.panel import Panel

from charter.bus.envelope import seal
from charter.config import Home
from charter.errors import CharterError
from charter.identity.keys import SigningKey
from charter.sdk import Agent

console = Console(highlight=False)


class DemoFailure(Exception):
    pass


def step(n: int, title: str, why: str) -> None:
    console.print()
    console.rule(f"[bold]{n}. {title}")
    console.print(f"[dim]{why}[/dim]")


def charter(home: Home, *args: str, expect: int = 0) -> str:
    """Run the real `charter` command and show it the way a user would see it."""
    shown = "charter " + " ".join(shlex.quote(a) for a in args)
    console.print(f"[bold cyan]$ {shown}[/bold cyan]")
    env = {**os.environ, "CHARTER_HOME": str(home.root), "COLUMNS": "110"}
    proc = subprocess.run([sys.executable, "-m", "charter", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL)
    text = (proc.stdout + proc.stderr).rstrip()
    if text:
        console.print(text, markup=False, soft_wrap=True)
    if proc.returncode != expect:
        raise DemoFailure(f"`{shown}` exited {proc.returncode}, expected {expect}")
    if expect:
        console.print(f"[dim](exit code {proc.returncode}, as expected)[/dim]")
    return proc.stdout


def refused(what: str, status: int, body: dict[str, Any], code: str) -> None:
    got = body.get("error", {}).get("code")
    if got != code:
        raise DemoFailure(f"{what}: expected refusal {code!r}, got HTTP {status} {body}")
    console.print(f"  [red]refused[/red] HTTP {status} [bold]{got}[/bold]: {body['error']['message']}")


async def post_raw(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/publish", data=body,
                                                     headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEMO_MODELS = """[models]
default_max_tokens = 512
midstream = "continue"

[models.backends.ollama]
kind = "ollama"
url = "http://127.0.0.1:{primary}"

[models.backends.backup]
kind = "ollama"
url = "http://127.0.0.1:{backup}"

[models.aliases]
default = ["ollama/llama3.2:3b", "backup/qwen2.5:0.5b", "degraded"]

[models.timeouts]
connect = "1s"
first_token = "3s"
cold_first_token = "10s"
idle = "2s"
total = "60s"

[models.breaker]
failures = 2
cooldown = "1s"
max_cooldown = "4s"

[models.probe]
interval = "1s"
timeout = "3s"

"""


def point_gateway_at(config: str, primary: int, backup: int) -> str:
    """Replace the [models] part of charter.toml with two stand-in Ollama servers on loopback."""
    start = config.index("# The model gateway.")
    end = config.index("# Roles: what an enrolled agent may do.")
    return config[:start] + DEMO_MODELS.format(primary=primary, backup=backup) + config[end:]


async def wait_for(predicate: Any, timeout: float = 15.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.2)
    return False


async def models_step(home: Home, alpha: Agent, n: int) -> None:
    import openai

    step(n, "The model is interchangeable",
         "Two stand-in Ollama servers (Ollama's wire format, run as real processes; a real Ollama cannot "
         "be installed here) sit behind the alias `default`: ollama -> backup -> degraded mode. alpha uses "
         "the unmodified `openai` client with the bearer key it got at enrolment.")
    charter(home, "models", "list")
    client = openai.AsyncOpenAI(base_url=alpha.openai_base_url, api_key=alpha.api_key, max_retries=0)
    console.print("[bold cyan]>>> stream = await client.chat.completions.create(model='default', stream=True, ...)[/bold cyan]")
    stream = await client.chat.completions.create(
        model="default", stream=True,
        messages=[{"role": "user", "content": "Tell a long story about a lighthouse. [[tokens=120]]"}])
    text, meta, killed = "", {}, False
    async for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
        meta = (chunk.model_extra or {}).get("charter") or meta
        if not killed and len(text.split()) >= 20:
            console.print(f"  after {len(text.split())} words: [red]kill -9 the primary Ollama[/red] (pid {primary.pid})")
            primary.kill()
            killed = True
    console.print(f"  the client received one unbroken answer of {len(text.split())} words; it ends: "
                  f"…{' '.join(text.split()[-8:])}")
    if not meta.get("continued_after") or meta.get("backend") != "backup/qwen2.5:0.5b":
        raise DemoFailure(f"the stream should have continued on the backup: {meta}")
    console.print(f"  metadata: answered by [bold]{meta['backend']}[/bold], continued after "
                  f"{', '.join(meta['continued_after'])} failed mid-stream")
    charter(home, "models", "health")

    console.print("[dim]Now the backup dies too: the last rung answers honestly instead of failing.[/dim]")
    backup.kill()
    r = await client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Status?"}])
    answer = r.choices[0].message.content or ""
    if "degraded mode" not in answer:
        raise DemoFailure(f"expected the degraded answer, got {answer!r}")
    console.print(f"  {answer[:230]}…")

    console.print("[dim]The primary comes back on its port; a deep probe (a tiny real generation) closes its "
                  "circuit and traffic returns.[/dim]")
    restart(primary, "llama3.2:3b")

    async def primary_closed() -> bool:
        from charter.cli.operator import OperatorClient

        async with OperatorClient(home) as op:
            data = await op.call("GET", "/v1/admin/models")
        return any(b["backend"] == "ollama" and b["state"] == "closed" for b in data["backends"])

    if not await wait_for(primary_closed):
        raise DemoFailure("the primary's circuit did not close after it came back")
    r = await client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hello again"}])
    meta = (r.model_extra or {}).get("charter") or {}
    console.print(f"  answered by [bold green]{meta.get('backend')}[/bold green]: {(r.choices[0].message.content or '')[:60]}…")
    if meta.get("backend") != "ollama/llama3.2:3b":
        raise DemoFailure(f"traffic did not return to the primary: {meta}")
    charter(home, "models", "health")
    await client.close()


primary: Any = None
backup: Any = None


def restart(proc: Any, model: str) -> None:
    from charter.models.standin import spawn_standin

    global primary
    primary = spawn_standin(port=proc.port, models=[model], token_delay=0.01)


async def scenario(home: Home, work: Path) -> None:
    step(1, "A fresh home", "`charter init` creates the config, the operator's root key (mode 0600), "
         "the database, and the default roles and policy. Running it twice changes nothing.")
    charter(home, "init")
    text = home.config_path.read_text()
    text = re.sub(r"(?m)^port = \d+", f"port = {free_port()}", text)
    home.config_path.write_text(point_gateway_at(text, primary.port, backup.port))
    charter(home, "init")

    step(2, "The daemon", "`charter up` serves the bus and the APIs on 127.0.0.1 only.")
    charter(home, "up", "--detach")
    charter(home, "status")

    step(3, "Invite and enrol two agents",
         "An invite is a single-use, expiring token bound to a role; only its hash is stored. The agent "
         "makes its own key, proves it holds it, and gets a charter signed by the root key: its id, "
         "scopes, policy binding, budget and sandbox.")
    token = charter(home, "invite", "--role", "worker", "--ttl", "15m").strip()
    alpha_creds = work / "alpha.creds.json"
    charter(home, "enroll", "--token", token, "--name", "alpha", "--creds", str(alpha_creds))
    console.print("[dim]The same token again is refused: it was single-use.[/dim]")
    charter(home, "enroll", "--token", token, "--name", "alpha2", "--creds", str(work / "alpha2.json"), expect=4)
    token2 = charter(home, "invite", "--role", "observer").strip()
    owl_creds = work / "owl.creds.json"
    charter(home, "enroll", "--token", token2, "--name", "owl", "--creds", str(owl_creds))
    charter(home, "agents", "list")

    alpha = Agent.load(alpha_creds)
    owl = Agent.load(owl_creds)
    url = alpha.creds.server
    seen: list[Any] = []

    async def watch() -> None:
        async for ev in owl.subscribe("agents.>"):
            seen.append(ev)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.3)

    step(4, "Signed messages, accepted",
         "alpha signs each envelope with its own key. The daemon checks identity, signature, replay and "
         "scope, appends it to the hash-chained log, and answers only once it is durable. owl, an "
         "observer, is subscribed to agents.> and receives them live.")
    charter(home, "publish", "agents.alpha.status", '{"state": "ready"}', "--creds", str(alpha_creds))
    receipt = await alpha.publish("agents.alpha.results", {"task": 1, "answer": 42})
    console.print(f"[bold cyan]>>> await alpha.publish('agents.alpha.results', {{...}})[/bold cyan]\n{receipt}")
    for _ in range(50):
        if len(seen) >= 2:
            break
        await asyncio.sleep(0.1)
    if len(seen) < 2:
        raise DemoFailure("owl did not receive alpha's messages")
    for ev in seen[:2]:
        console.print(f"  owl received seq {ev.seq} from {ev.sender[:12]}… on {ev.subject}: {ev.payload}")

    step(5, "A forged message", "mallory signs an envelope that claims to come from alpha. The key does "
         "not match alpha's charter.")
    mallory = SigningKey.generate()
    forged = seal(mallory, sender=alpha.id, subject="agents.alpha.results", payload={"answer": "pwned"})
    refused("forged", *(await post_raw(url, forged.raw)), "bad_signature")

    step(6, "A replayed message", "Someone captured alpha's genuine envelope and sends the same bytes again.")
    genuine = alpha.seal("agents.alpha.results", {"task": 2, "answer": 7})
    status, body = await post_raw(url, genuine.raw)
    console.print(f"  first time: HTTP {status} seq {body.get('seq')}")
    refused("replayed", *(await post_raw(url, genuine.raw)), "replay")

    step(7, "Out of scope", "alpha is a worker: it may publish to agents.alpha.> and tasks.results.>, "
         "not hand out tasks. The command exits 4, refused.")
    charter(home, "publish", "tasks.assign", '{"to": "owl"}', "--creds", str(alpha_creds), expect=4)

    step(8, "A risky action waits for a human",
         "boss, a coordinator, wants to deploy. The policy makes deploy.* a T3 action: it waits in a queue "
         "until the operator signs an approval with the root key, and then runs exactly once.")
    token3 = charter(home, "invite", "--role", "coordinator").strip()
    boss_creds = work / "boss.creds.json"
    charter(home, "enroll", "--token", token3, "--name", "boss", "--creds", str(boss_creds))
    boss = Agent.load(boss_creds)
    asked = await boss.act("deploy.prod", {"version": "1.4.0"})
    console.print(f"[bold cyan]>>> await boss.act('deploy.prod', {{'version': '1.4.0'}})[/bold cyan]\n"
                  f"  effect [bold]{asked['effect']}[/bold] (tier {asked['decision']['tier']}, rule "
                  f"{asked['decision']['rule']}): {asked['decision']['reason']}")
    if asked["effect"] != "approve":
        raise DemoFailure(f"deploy.prod should wait for an approval, got {asked}")
    waiting = asyncio.create_task(boss.wait_approval(asked["approval_id"], 30))
    charter(home, "approvals", "list")
    charter(home, "approvals", "approve", asked["approval_id"], "--note", "release 1.4.0")
    answer = await asyncio.wait_for(waiting, 10)
    if answer["effect"] != "allow":
        raise DemoFailure(f"the approved action was not allowed: {answer}")
    console.print(f"  boss was waiting; the answer is [bold green]{answer['effect']}[/bold green]: deploying 1.4.0, once.")
    again = await boss.wait_approval(asked["approval_id"], 0.1)
    console.print(f"  asking to use the same approval again: [bold]{again['effect']}[/bold] ({again['reason']})")
    await boss.close()

    step(9, "A budget that is never crossed",
         "alpha's role gives it $1 a day; the operator lowers alpha's own limit to $0.02 a day. Before a "
         "paid call the agent reserves the most it could cost; "
         "after it, it settles the real usage and the rest returns. A request that would cross the limit "
         "is refused before it runs, naming what is left and which free local models remain.")
    charter(home, "budget", "set", "--scope", "agent:alpha", "--limit", "0.02", "--period", "day")
    res = await alpha.reserve(model="openai/gpt-4o-mini", input_tokens=2_000, max_output_tokens=1_000)
    console.print(f"  reserved ${res['usd']:.6f} for openai/gpt-4o-mini (2,000 in, up to 1,000 out)")
    settled = await alpha.settle(res["reservation_id"], tokens_in=2_000, tokens_out=350)
    console.print(f"  settled ${settled['usd']:.6f} for the real usage (350 out); the rest is back")
    try:
        await alpha.reserve(model="openai/gpt-4o", input_tokens=8_000, max_output_tokens=4_000)
        raise DemoFailure("a reservation above the budget was admitted")
    except CharterError as exc:
        if exc.code != "budget_exceeded":
            raise DemoFailure(f"expected budget_exceeded, got {exc}") from None
        free = ", ".join((exc.details or {}).get("free_models", []))
        console.print(f"  [red]refused[/red] [bold]{exc.code}[/bold]: {exc.message}\n  free models still usable: {free}")
    charter(home, "budget", "show")

    await models_step(home, alpha, 10)

    step(11, "Revocation", "The operator revokes owl. Its very next message is refused, and its live "
         "subscription ends.")
    charter(home, "agents", "revoke", "owl", "--reason", "demo: decommissioned")
    charter(home, "publish", "agents.owl.notes", '{"still": "here?"}', "--creds", str(owl_creds), expect=4)
    try:
        await asyncio.wait_for(watcher, 5)
    except Exception as exc:  # noqa: BLE001 - the stream ends with the revocation error
        console.print(f"  owl's stream ended: {exc}")

    step(12, "The log, attributed and verified",
         "Every accepted message and every lifecycle step (by the operator) is in the log. "
         "`charter log verify` recomputes the hash chain and names the first bad entry if any.")
    charter(home, "tail", "-n", "12")
    charter(home, "log", "verify")

    step(13, "The supervisor: a crash detected, a restart, traffic back",
         "Charter runs a stand-in Ollama as a managed service, checks it with a deep generation probe every "
         "interval, and restarts it with backoff when it dies. (Its own home, so nothing above is disturbed.)")
    from charter.supervisor.demo_step import demo_supervisor

    try:
        await demo_supervisor(home, console)
    except RuntimeError as exc:
        raise DemoFailure(str(exc)) from None

    step(14, "The archivist: sealed, proven, mirrored, tamper-evident",
         "The log is sealed into signed, Merkle-rooted segments; any entry gets an inclusion proof that "
         "verifies offline; a mirror verifies on its own; a tampered copy names its first bad entry.")
    from charter.archive.demo_step import demo_archive

    try:
        await demo_archive(home, console)
    except RuntimeError as exc:
        raise DemoFailure(str(exc)) from None

    step(15, "Reflection and the capsule",
         "Declared truths are checked against the live system; each contradiction is named with its "
         "evidence and a fix (a critical one would make this exit 6). The AI_ALIGNMENT capsule is the "
         "context any model can be handed: rebuilt from the live system, signed, with its history.")
    console.print("[dim]The backup Ollama killed earlier has not come back, so the alias `default` has lost "
                  "its fallback: reflection should say so.[/dim]")
    charter(home, "reflect")
    env = {**os.environ, "CHARTER_HOME": str(home.root)}
    seen = subprocess.run([sys.executable, "-m", "charter", "reflect", "--json"], capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL)
    named = {c["truth"] for c in json.loads(seen.stdout or "{}").get("contradictions", [])}
    if "aliases-fall-back" not in named:
        raise DemoFailure(f"reflection should name the lost fallback of alias `default`; it named {sorted(named)}")
    built = charter(home, "capsule", "build", "AI_ALIGNMENT")
    latest = home.root / "capsules" / "AI_ALIGNMENT_LATEST.md"
    if not latest.exists() or str(latest) not in built:
        raise DemoFailure(f"the capsule was not written to {latest}")
    console.print(f"[bold]Capsule:[/bold] {latest}")
    await alpha.close()
    await owl.close()


def main() -> int:
    global primary, backup
    from charter.models.standin import spawn_standin

    primary = spawn_standin(models=["llama3.2:3b"], token_delay=0.01)
    backup = spawn_standin(models=["qwen2.5:0.5b"], token_delay=0.01)
    work = Path(tempfile.mkdtemp(prefix="charter-demo-"))
    home = Home(work / "home")
    console.print(Panel.fit(
        "[bold]Charter[/bold]: the model is interchangeable, but the bus is identity.\n"
        f"This demo runs in a throwaway home: {home.root}",
    ))
    code = 0
    try:
        asyncio.run(scenario(home, work))
        console.print()
        console.rule("[bold green]demo complete: every step behaved as it should")
    except DemoFailure as exc:
        console.print(f"\n[bold red]demo failed:[/bold red] {exc}")
        code = 1
    finally:
        from charter.server.daemon import stop

        stop(home)
        for proc in (primary, backup):
            proc.stop()
        if code == 0:
            console.print(f"[dim]The demo's home is kept for you to look around (the daemon is stopped): {home.root}; "
                          f"remove it with `rm -rf {work}`.[/dim]")
        else:
            console.print(f"[dim]Kept {work} for inspection; daemon log: {home.log_file}[/dim]")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
