"""The archive's part of `make demo`: seal, verify, prove one entry, and catch a tampered copy.

    from charter.archive.demo_step import demo_archive
    await demo_archive(home, console)      # with or without a running daemon

Runs the real `charter` command as a user types it. Raises ArchiveDemoError if anything does not
behave as it should (the demo maps it to its own failure).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from charter.archive.layout import Layout
from charter.archive.segments import compress, decode, decompress, encode, load_meta


class ArchiveDemoError(RuntimeError):
    pass


def _charter(home: Any, console: Any, *args: str, expect: int = 0, show: bool = True, echo: bool = True) -> str:
    shown = "charter " + " ".join(shlex.quote(a) for a in args)
    if echo:
        console.print(f"[bold cyan]$ {shown}[/bold cyan]")
    code, stdout, stderr = _execute(home, args)
    text = (stdout + stderr).rstrip()
    if text and show:
        console.print(text, markup=False, soft_wrap=True)
    if code != expect:
        raise ArchiveDemoError(f"`{shown}` exited {code}, expected {expect}: {text[-500:]}")
    if expect:
        console.print(f"[dim](exit code {code}, as expected)[/dim]")
    return stdout


def _execute(home: Any, args: tuple[str, ...]) -> tuple[int, str, str]:
    """The real `charter` command in its own process (tests swap in an in-process runner)."""
    env = {**os.environ, "CHARTER_HOME": str(home.root), "COLUMNS": "110"}
    proc = subprocess.run([sys.executable, "-m", "charter", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def _pick(home: Any, console: Any) -> int:
    """An agent's message if there is one (more telling than a daemon event), else the first entry."""
    out = _charter(home, console, "log", "query", "--subject", "agents.>", "--first", "-n", "1", "--json", show=False,
                   echo=False)
    for line in out.splitlines():
        return int(json.loads(line)["seq"])
    return 1


def _tamper(copy: Path, seq: int) -> None:
    layout = Layout(copy)
    for number, path in layout.meta_files():
        meta = load_meta(path)
        if meta.first_seq <= seq <= meta.last_seq:
            seg = layout.segment_path(number)
            records = decode(decompress(seg.read_bytes()))
            out = []
            for s, h, p, raw in records:
                if s == seq:
                    edited = raw.replace(b'"payload":{', b'"payload":{"edited":true,', 1)
                    raw = edited if edited != raw else raw + b" "
                out.append((s, h, p, raw))
            seg.write_bytes(compress(encode(out)))
            return
    raise ArchiveDemoError(f"seq {seq} is in no segment")


async def demo_archive(home: Any, console: Any) -> None:
    work = Path(tempfile.mkdtemp(prefix="charter-demo-archive-"))
    console.print("[dim]The archivist seals the log into compressed segments, each with a Merkle root, and signs a "
                  "checkpoint with its own key (certified by the root key).[/dim]")
    _charter(home, console, "archive", "seal")
    _charter(home, console, "archive", "verify")

    seq = _pick(home, console)
    proof = work / f"proof-{seq}.json"
    console.print(f"[dim]An inclusion proof for entry {seq}: anyone can check it offline, with the root public key "
                  "and nothing else.[/dim]")
    _charter(home, console, "archive", "prove", str(seq), "--out", str(proof))
    doc = json.loads(proof.read_text())
    console.print(f"  entry {seq}: audit path of {len(doc['audit_path'])} hashes to the root of checkpoint "
                  f"{doc['checkpoint']['number']} ({doc['tree_size']} entries)")
    root_key = doc["archivist"]["certificate"]["root_public_key"]
    _charter(home, console, "archive", "check-proof", str(proof), "--root-key", root_key)

    mirror = work / "mirror"
    console.print("[dim]A mirror (a NAS, a Syncthing folder) gets a verified copy, and verifies on its own.[/dim]")
    _charter(home, console, "archive", "sync", "--to", str(mirror))
    _charter(home, console, "archive", "verify", "--path", str(mirror), "--root-key", root_key)

    tampered = work / "tampered"
    shutil.copytree(mirror, tampered)
    _tamper(tampered, seq)
    console.print(f"[dim]Someone edits entry {seq} inside a copy of the archive and recompresses the segment.[/dim]")
    out = _charter(home, console, "archive", "verify", "--path", str(tampered), "--root-key", root_key, "--json",
                   expect=5, show=False)
    report = json.loads(out)
    if report["first_bad_seq"] != seq:
        raise ArchiveDemoError(f"verify named seq {report['first_bad_seq']}, not the edited {seq}")
    first = report["breaks"][0]
    console.print(f"  [bold red]caught[/bold red]: first bad seq {report['first_bad_seq']}: {first['reason']}")
    shutil.rmtree(work, ignore_errors=True)
