"""A `make demo` step: the stand-in Ollama crashes, the crash is detected, it is restarted, traffic returns.

    from charter.supervisor.demo_step import demo_supervisor
    await demo_supervisor(home, console)

It runs in a home of its own next to the demo's (`<demo home>-supervisor`), with its own daemon, so
it disturbs nothing else the demo shows: Charter runs a stand-in Ollama as a managed service, checks
it with a deep generation probe, and the gateway's backend names it as its `managed_service`. An
agent chats through the gateway; the stand-in is killed with SIGKILL; `charter services list`
shows the crash, the restart with its backoff, and the state going back to passing; the backend's
circuit closes again and the same chat is answered by the restarted Ollama. Every step checks its
outcome and raises the demo's DemoFailure (or RuntimeError) if it does not hold.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LABEL = "ai.ollama.standin"

MODELS = """# The model gateway, for this step: one stand-in Ollama that Charter itself runs.
[models]
default_max_tokens = 128

[models.backends.ollama]
kind = "ollama"
url = "http://127.0.0.1:{port}"
managed_service = "{label}"

[models.aliases]
default = ["ollama/llama3.2:3b", "degraded"]

[models.timeouts]
connect = "1s"
first_token = "3s"
cold_first_token = "6s"
idle = "2s"
total = "30s"

[models.breaker]
failures = 2
cooldown = "1s"
max_cooldown = "4s"

[models.probe]
interval = "30s"
timeout = "3s"

"""

SERVICE = """label = "{label}"
name = "ollama (stand-in)"
why = "the local model the alias `default` starts with"
tier = "critical"
command = {command}
interval = "2s"                # the demo's pace; the default is 5m
retry_interval = "0.3s"
timeout = "5s"
port = {port}
restart = {{ base = "0.5s", cap = "30s", start_limit_burst = 5, start_limit_interval = "10m", start_period = "20s" }}
check = {{ kind = "model", backend = "ollama" }}   # a real generation must come back non-empty
"""


def _failure(msg: str) -> Exception:
    try:
        from charter.demo import DemoFailure

        return DemoFailure(msg)
    except ImportError:  # pragma: no cover - used outside the demo
        return RuntimeError(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def demo_supervisor(home: Any, console: Any) -> None:
    from charter.config import Home
    from charter.server.daemon import stop

    sub = Home(Path(str(home.root) + "-supervisor"))
    work = sub.root.parent

    def charter(*args: str, expect: int = 0, show: bool = True) -> str:
        shown = "charter " + " ".join(shlex.quote(a) for a in args)
        if show:
            from rich.markup import escape

            console.print(f"[bold cyan]$ {escape(shown)}[/bold cyan]")
        env = {**os.environ, "CHARTER_HOME": str(sub.root), "COLUMNS": "110"}
        proc = subprocess.run([sys.executable, "-m", "charter", *args], capture_output=True, text=True, env=env,
                              stdin=subprocess.DEVNULL, timeout=120)
        text = (proc.stdout + proc.stderr).rstrip()
        if show and text:
            console.print(text, markup=False, soft_wrap=True)
        if proc.returncode != expect:
            raise _failure(f"`{shown}` exited {proc.returncode}, expected {expect}: {text[-500:]}")
        return proc.stdout

    def service() -> dict[str, Any]:
        rows = json.loads(charter("services", "list", "--json", show=False))
        return next(r for r in rows if r["label"] == LABEL)

    async def until(pred: Any, what: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await asyncio.to_thread(pred)
            if value:
                return value
            await asyncio.sleep(0.2)
        raise _failure(f"{what} did not happen within {timeout:g}s")

    console.print()
    console.rule("[bold]Services watched, restarted and reported")
    console.print("[dim]Charter runs a stand-in Ollama as a service of its own and checks it the way users ask "
                  "for: a tiny real generation must come back non-empty (an open port proves nothing). The "
                  "gateway's backend names the service as its managed_service, so the router and the "
                  "supervisor share one view of its health. This step uses a home of its own: "
                  f"{sub.root}[/dim]")
    port = _free_port()
    charter("init", show=False)
    text = sub.config_path.read_text()
    text = re.sub(r"(?m)^port = \d+", f"port = {_free_port()}", text)
    start, end = text.index("# The model gateway."), text.index("# Roles: what an enrolled agent may do.")
    sub.config_path.write_text(text[:start] + MODELS.format(port=port, label=LABEL) + text[end:])
    command = json.dumps([sys.executable, "-m", "charter.models.standin", "--port", str(port),
                          "--models", "llama3.2:3b", "--token-delay", "0.01"])
    (sub.root / "services").mkdir(exist_ok=True)
    (sub.root / "services" / "ollama.toml").write_text(SERVICE.format(label=LABEL, command=command, port=port))
    console.print(f"[dim]{sub.root / 'services' / 'ollama.toml'}:[/dim]")
    console.print((sub.root / "services" / "ollama.toml").read_text().rstrip(), markup=False)
    try:
        charter("up", "--detach")
        await until(lambda: service()["state"] == "passing", "the stand-in Ollama passing its first probe")
        charter("services", "list")
        token = charter("invite", "--role", "worker", show=False).strip()
        creds = work / "sup-agent.creds.json"
        creds.unlink(missing_ok=True)
        charter("enroll", "--token", token, "--name", "scout", "--creds", str(creds), show=False)
        out = charter("models", "chat", "default", "Say hello. [[tokens=12]]", "--creds", str(creds))
        if "answered by ollama/llama3.2:3b" not in out:
            raise _failure(f"the first chat was not answered by the stand-in Ollama: {out[-300:]}")

        pid = service()["managed"]["pid"]
        console.print(f"[red]kill -9 {pid}[/red]  [dim](the stand-in Ollama dies on the spot)[/dim]")
        killed_ms = time.time() * 1000
        os.kill(pid, signal.SIGKILL)
        up = await until(lambda: (s := service())["state"] == "passing" and s["managed"]["pid"] != pid and s,
                         "the crash being detected and the service restarted", 30)
        evs = [json.loads(line)["envelope"] for line in
               charter("tail", "charter.services.>", "-n", "20", "--json", show=False).splitlines()]
        evs = [e for e in evs if e["ts"] >= killed_ms - 50]
        crit = next((e for e in evs if e["subject"] == "charter.services.health" and e["payload"]["state"] == "critical"), None)
        restart = next((e for e in evs if e["subject"] == "charter.services.restarts"), None)
        back = next((e for e in evs if e["subject"] == "charter.services.health" and e["payload"]["state"] == "passing"), None)
        if not (crit and restart and back):
            raise _failure(f"expected critical, restart and passing events after the kill, got {evs}")
        console.print(f"  crash detected {crit['ts'] - killed_ms:.0f} ms after the kill: [bold red]critical[/bold red] "
                      f"({crit['payload']['reason']})")
        console.print(f"  restarted after its {restart['payload']['delay_s']:g}s backoff "
                      f"(attempt {restart['payload']['attempt']}, {restart['payload']['detail']})")
        console.print(f"  [bold green]passing[/bold green] again {(back['ts'] - killed_ms) / 1000:.2f}s after the "
                      f"kill: {back['payload']['reason']} (pid {up['managed']['pid']})")
        charter("tail", "charter.services.>", "-n", "5")

        def circuit_closed() -> bool:
            data = json.loads(charter("models", "health", "--json", show=False))
            return any(b["backend"] == "ollama" and b["state"] == "closed" for b in data)

        await until(circuit_closed, "the gateway's circuit for ollama closing again", 15)
        charter("models", "health")
        answer = subprocess.run(
            [sys.executable, "-m", "charter", "models", "chat", "default", "Hello again. [[tokens=12]]", "--creds",
             str(creds), "--json"], capture_output=True, text=True, timeout=60,
            env={**os.environ, "CHARTER_HOME": str(sub.root)})
        meta = json.loads(answer.stdout or "{}").get("charter") or {}
        if meta.get("backend") != "ollama/llama3.2:3b":
            raise _failure(f"traffic did not return to the restarted Ollama: {answer.stdout[-300:]} {answer.stderr[-300:]}")
        console.print(f"  traffic is back: answered by [bold green]{meta['backend']}[/bold green]")
        charter("services", "history", LABEL, "-n", "8")
    finally:
        stop(sub)
