"""Capsules rendered from the live state: Markdown with YAML front matter, a sidecar JSON, signed.

Layout under CHARTER_HOME/capsules (every file mode 0600):

    AI_ALIGNMENT_LATEST.md / .json            the latest build
    AI_ALIGNMENT_CAPSULES/YYYY-MM-DD.md/.json the day's latest build, kept as history (the
                                              operator's own tooling reads these)
    AI_ALIGNMENT_CAPSULES/builds/STAMP.md     every build, the last `keep_builds` kept (`capsule diff`)
    OPS_STATUS_LATEST.md ...                  the same for each other spec
    agents/NAME/AGENT_LATEST.md ...           per-agent capsules, limited to the agent's view

Each capsule names the log range it reflects: its state is as of `seq_to` (the head when it was
built), and `seq_from` is the oldest entry among the events it quotes (`seq_to` when it quotes none).

Templates are Jinja2; a file of the same name in CHARTER_HOME/capsules/templates overrides the
built-in one, and `[capsules.specs.NAME]` adds a spec with its own template.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from charter.bus.log.scan import read_matching
from charter.capsules.state import agent_state, live_state
from charter.encoding import b64d, canonical, sha256_hex
from charter.fsutil import private_dir, write_private
from charter.identity.keys import PublicKey
from charter.identity.registry import OPERATOR_ID

if TYPE_CHECKING:
    from charter.identity.registry import AgentRecord
    from charter.node import Node

log = logging.getLogger("charter.capsules")
TRIGGERS = ("charter.agents.>", "charter.approvals.>", "charter.models.health", "charter.budget.>",
            "charter.services.>", "charter.archive.>", "charter.reflect.>")


@dataclass(frozen=True)
class Spec:
    name: str
    capsule_type: str
    template: str
    scope: str = "global"  # global | agent


BUILT_IN = {
    "AI_ALIGNMENT": Spec("AI_ALIGNMENT", "ai_alignment", "AI_ALIGNMENT.md.j2"),
    "OPS_STATUS": Spec("OPS_STATUS", "ops_status", "OPS_STATUS.md.j2"),
    "AGENT": Spec("AGENT", "agent", "AGENT.md.j2", "agent"),
}


def _front_matter(fields: dict[str, Any]) -> str:
    # JSON scalars are valid YAML scalars: strings come out quoted and escaped.
    return "---\n" + "".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()) + "---\n\n"


def signed_fields(meta: dict[str, Any]) -> bytes:
    return canonical({k: meta[k] for k in ("capsule_type", "generated_at", "seq_from", "seq_to", "content_sha256",
                                           "data_sha256")})


def verify_capsule(md_path: Path, root: PublicKey) -> tuple[bool, str]:
    """Check a capsule's content hash and the root signature over its front matter; offline."""
    text = md_path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return False, "no front matter"
    head, _, body = text[4:].partition("\n---\n\n")
    meta = {}
    for line in head.splitlines():
        key, _, value = line.partition(": ")
        meta[key] = json.loads(value)
    if sha256_hex(body.encode()) != meta.get("content_sha256"):
        return False, "content does not match content_sha256"
    sidecar = json.loads(md_path.with_suffix(".json").read_text())
    if sha256_hex(canonical(sidecar["data"])) != meta.get("data_sha256"):
        return False, "sidecar data does not match data_sha256"
    try:
        ok = root.verify(b64d(meta["signature"]), signed_fields(meta))
    except (KeyError, ValueError):
        ok = False
    return (True, "ok") if ok else (False, "signature does not verify with the root key")


class CapsuleBuilder:
    def __init__(self, node: Node) -> None:
        self.node = node
        cfg = node.config.capsules
        self.dir = node.home.root / "capsules"
        self.specs = dict(BUILT_IN)
        for name, spec in cfg.specs.items():
            self.specs[name] = Spec(name, spec.capsule_type or name.lower(), spec.template, spec.scope)
        self.env = jinja2.Environment(
            loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(str(self.dir / "templates")),
                                        jinja2.PackageLoader("charter.capsules", "templates")]),
            autoescape=False, undefined=jinja2.ChainableUndefined, keep_trailing_newline=True,
            trim_blocks=False, lstrip_blocks=False)
        self.built_at: dict[str, float] = self._built_on_disk()
        self._task: asyncio.Task[None] | None = None

    def _built_on_disk(self) -> dict[str, float]:
        """When the global capsules were last built, from their sidecars: freshness survives a restart."""
        out: dict[str, float] = {}
        for spec in self.specs.values():
            if spec.scope != "global":
                continue
            sidecar = self.dir / f"{spec.name}_LATEST.json"
            try:
                when = json.loads(sidecar.read_text(encoding="utf-8"))["generated_at"]
                out[spec.name] = dt.datetime.fromisoformat(when).timestamp()
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return out

    def freshness(self) -> dict[str, Any]:
        return {"built_at": self.built_at.get("AI_ALIGNMENT"), "max_age_s": self.node.config.capsules.max_age}

    def _paths(self, spec: Spec, agent: AgentRecord | None) -> tuple[Path, Path, Path]:
        """The latest build, the day's build, and this build's own timestamped copy."""
        base = self.dir / "agents" / agent.name if agent else self.dir
        now = dt.datetime.now().astimezone()
        history = base / f"{spec.name}_CAPSULES"
        stamp = now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H%M%S.%fZ")
        return base / f"{spec.name}_LATEST.md", history / f"{now:%Y-%m-%d}.md", history / "builds" / f"{stamp}.md"

    async def build(self, name: str = "AI_ALIGNMENT", agent: AgentRecord | None = None) -> dict[str, Any]:
        spec = self.specs.get(name)
        if spec is None:
            from charter.errors import NOT_FOUND, CharterError

            raise CharterError(NOT_FOUND, f"no capsule spec {name!r}; known: {', '.join(sorted(self.specs))}", "name")
        if spec.scope == "agent" and agent is None:
            from charter.errors import BAD_REQUEST, CharterError

            raise CharterError(BAD_REQUEST, f"capsule {name} is per agent: name the agent", "agent")
        if spec.scope == "global" and agent is not None:
            from charter.errors import BAD_REQUEST, CharterError

            raise CharterError(BAD_REQUEST, f"capsule {name} is global, not per agent: leave out the agent", "agent")
        if spec.scope == "agent":
            state = await agent_state(self.node, agent)  # type: ignore[arg-type]
        else:
            from charter.reflect.engine import reflect

            state = await live_state(self.node)
            state["contradictions"] = (await reflect(self.node))["contradictions"]
        seq_to = state["log"]["head_seq"]
        seq_from = min((e["seq"] for e in state["recent_events"]), default=seq_to)
        data = json.loads(json.dumps(state, default=str))
        machine = json.dumps(data, indent=2, sort_keys=True)
        body = self.env.get_template(spec.template).render(**state, seq_from=seq_from, seq_to=seq_to,
                                                           machine_json=machine)
        meta: dict[str, Any] = {
            "capsule_type": spec.capsule_type,
            "capsule": spec.name if not agent else f"{spec.name}:{agent.name}",
            "privacy": "private-local",
            "generated_at": state["generated_at"],
            "source": f"charter {state['charter_version']}",
            "seq_from": seq_from,
            "seq_to": seq_to,
            "content_sha256": sha256_hex(body.encode()),
            "data_sha256": sha256_hex(canonical(data)),
            "signed_by": self.node.root_key.public.key_id,
        }
        meta["signature"] = self.node.root_key.sign_b64(signed_fields(meta))
        text = _front_matter(meta) + body
        sidecar = json.dumps({**meta, "data": data}, indent=2, sort_keys=True).encode() + b"\n"
        latest, dated, build = self._paths(spec, agent)
        keep = self.node.config.capsules.keep_builds

        def write() -> None:  # five fsyncs: off the event loop
            private_dir(self.dir)
            for md in (latest, dated):
                private_dir(md.parent)
                write_private(md, text.encode())
                write_private(md.with_suffix(".json"), sidecar)
            private_dir(build.parent)
            write_private(build, text.encode())
            for old in sorted(build.parent.glob("*.md"))[:-keep]:
                old.unlink(missing_ok=True)

        await asyncio.to_thread(write)
        key = spec.name if not agent else f"{spec.name}:{agent.name}"
        self.built_at[key] = time.time()
        await self.node.emit("charter.capsules.built", {"capsule": key, "path": str(latest), "seq_to": seq_to,
                                                         "content_sha256": meta["content_sha256"]})
        return {"capsule": key, "path": str(latest), "history": str(dated), "build": str(build), "meta": meta,
                "markdown": text}

    async def context(self, which: str, agent: AgentRecord, max_age: float = 60.0) -> str:
        """A capsule's Markdown body for injection as a system message; rebuilt when older than `max_age`.

        `which` is "agent" (the caller's own capsule) or a spec name; a per-agent spec is built for
        the caller, so an agent never gets another agent's view."""
        name = "AGENT" if which == "agent" else which
        spec = self.specs[name]
        whose = agent if spec.scope == "agent" else None
        key = f"{name}:{agent.name}" if whose else name
        latest = self._paths(spec, whose)[0]
        if time.time() - self.built_at.get(key, 0) > max_age or not latest.exists():
            await self.build(name, whose)
        text = latest.read_text(encoding="utf-8")
        return text.partition("\n---\n\n")[2] if text.startswith("---\n") else text

    def list(self) -> list[dict[str, Any]]:
        out = []
        for md in sorted(self.dir.rglob("*_LATEST.md")) if self.dir.exists() else []:
            st = md.stat()
            folder = md.parent / md.name.replace("_LATEST.md", "_CAPSULES")
            history = sorted(folder.glob("*.md"))
            builds = sorted((folder / "builds").glob("*.md"))
            out.append({"builds": len(builds), "last_build": builds[-1].stem if builds else None,"path": str(md), "name": md.name.removesuffix("_LATEST.md"),
                        "agent": md.parent.name if md.parent.parent.name == "agents" else None,
                        "modified": st.st_mtime, "age_s": round(time.time() - st.st_mtime, 1),
                        "history": [h.stem for h in history]})
        return out

    async def run_forever(self) -> None:
        """Rebuild the global capsules (AI_ALIGNMENT, OPS_STATUS and the user's global specs) on a
        schedule and, debounced, after relevant events."""
        cfg = self.node.config.capsules
        last_seq = self.node.log.head_sync()[0]
        next_due = 0.0
        dirty_since: float | None = None
        while True:
            head = await self.node.log.wait(last_seq, 1.0)
            if head > last_seq:
                # Look at a quarter-second of appends at once, not at each one: under load that is
                # one wake-up per 250 ms instead of two per model call.
                await asyncio.sleep(0.25)
                head = max(head, (await self.node.log.head())[0])
            if head > last_seq:
                # Only the operator's events trigger a rebuild, never the agents' traffic; once
                # dirty, no need to look at more entries until the rebuild.
                if dirty_since is None and await read_matching(self.node.log, TRIGGERS, after=last_seq, upto=head,
                                                                limit=1, sender=OPERATOR_ID):
                    dirty_since = time.monotonic()
                last_seq = head
            now = time.monotonic()
            due = now >= next_due or (dirty_since is not None and now - dirty_since >= cfg.debounce)
            if due:
                for spec in [s for s in self.specs.values() if s.scope == "global"]:
                    try:
                        await self.build(spec.name)
                    except Exception:  # noqa: BLE001 - keep the schedule; the next round retries
                        log.exception("capsule %s: build failed", spec.name)
                last_seq = self.node.log.head_sync()[0]  # our own events are not triggers
                next_due = now + cfg.interval
                dirty_since = None

    def start(self) -> None:
        if self.node.config.capsules.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run_forever())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
