"""The archivist's child processes: forked from a fork server that imported the archive's modules
(and the CLI) once, niced relative to the daemon, and gone with the daemon. Each check runs in a
fresh interpreter: the fork server is one per process, and another test in this one may have
started it already."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")

JOB = textwrap.dedent("""
    import os, sys, time

    def probe():  # in the child: who it is, how nice, and what was imported before this job
        return {"pid": os.getpid(), "ppid": os.getppid(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
                "preloaded": all(m in sys.modules for m in ("charter.archive.archivist", "charter.cli.main"))}

    def fail():
        return 1 / 0

    def linger():
        time.sleep(30)
""")

MAIN = textwrap.dedent("""
    import asyncio, json, os, sys
    with open("imports.log", "a") as f:  # once per process that runs this script: this one, and each child
        f.write(f"{os.getpid()} {'charter.cli.main' in sys.modules}\\n")
    import charter.cli.main  # as the `charter` console script does
    from charter.archive import children
    import job

    async def main():
        if sys.argv[1] == "warm":  # as the daemon's archivist does when it starts
            await asyncio.get_running_loop().run_in_executor(None, children.warm)
        if sys.argv[1] == "linger":
            print(os.getpid(), flush=True)
            await children.run_in_child(job.linger)
        jobs = [await children.run_in_child(job.probe) for _ in range(2)]
        server_nice = os.getpriority(os.PRIO_PROCESS, jobs[0]["ppid"])
        try:
            await children.run_in_child(job.fail)
        except ZeroDivisionError as exc:
            failed = str(exc)
        print(json.dumps({"parent": os.getpid(), "parent_nice": os.getpriority(os.PRIO_PROCESS, 0),
                          "server_nice": server_nice, "jobs": jobs, "failed": failed}))

    if __name__ == "__main__":  # (each child runs this script again, as it does the `charter` script)
        asyncio.run(main())
""")


def script(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    (tmp_path / "job.py").write_text(JOB)
    (tmp_path / "main.py").write_text(MAIN)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    return [sys.executable, "main.py"], {**os.environ, "PYTHONPATH": path}


def run(tmp_path: Path, how: str) -> dict[str, Any]:
    cmd, env = script(tmp_path)
    done = subprocess.run([*cmd, how], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("how", ["warm", "cold"])
def test_each_job_runs_in_a_niced_child_forked_from_a_server_that_imported_the_archive(
        tmp_path: Path, how: str) -> None:
    """Warmed first (the daemon) or not (the CLI's `charter archive verify`): each job runs in a
    process of its own, 10 nicer than its caller, forked by the one fork server, which is niced
    too and has imported the archive and the CLI already: starting a child costs a fork, not a
    Python start and its imports."""
    doc = run(tmp_path, how)
    first, second = doc["jobs"]
    mine = os.getpriority(os.PRIO_PROCESS, 0)  # (the test may itself run niced)
    assert len({first["pid"], second["pid"], doc["parent"]}) == 3  # a process per job
    assert first["ppid"] == second["ppid"] != doc["parent"]  # both forked by the fork server
    assert doc["parent_nice"] == mine  # the caller keeps its own
    assert first["nice"] == second["nice"] == doc["server_nice"] == min(19, mine + 10)
    assert first["preloaded"] and second["preloaded"]
    assert doc["failed"] == "division by zero"  # a job's exception comes back as itself


def test_a_child_running_the_callers_script_again_finds_the_cli_imported(tmp_path: Path) -> None:
    """Run as a script (as `charter up` is), the caller's script is run again in each child
    before its job, and the `charter` script imports the whole CLI: the fork server has it
    already, so that costs the child next to nothing."""
    doc = run(tmp_path, "warm")
    runs = [line.split() for line in (tmp_path / "imports.log").read_text().splitlines()]
    assert runs[0] == [str(doc["parent"]), "False"]  # the caller imported it itself
    assert len(runs) == 1 + 3 and all(had == "True" for _, had in runs[1:])  # each of its three children


def test_a_child_does_not_outlive_a_killed_caller(tmp_path: Path) -> None:
    """The caller (the daemon) is killed with a job running: the job's process exits at once, and
    the fork server with it, instead of sitting there for good."""
    cmd, env = script(tmp_path)
    caller = subprocess.Popen([*cmd, "linger"], stdout=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    family: list[psutil.Process] = []
    try:
        assert caller.stdout is not None and int(caller.stdout.readline()) == caller.pid
        me = psutil.Process(caller.pid)
        deadline = time.monotonic() + 30
        while len(me.children(recursive=True)) < 3:  # the resource tracker, the server, the job's child
            assert time.monotonic() < deadline, me.children(recursive=True)
            time.sleep(0.05)
    finally:
        family = psutil.Process(caller.pid).children(recursive=True)
        caller.send_signal(signal.SIGKILL)
        caller.wait()
    try:
        deadline = time.monotonic() + 10
        while (alive := [p for p in family if running(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive, [p.pid for p in alive]
    finally:
        for p in family:  # (whatever a failure left: not on the host for good)
            if running(p):
                p.kill()


def running(p: psutil.Process) -> bool:
    """Alive and not a zombie (an orphan's parent may be slow to reap it, or not reap it at all)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
