"""The archivist's child processes: forked, niced, from a fork server that imported the archive's
modules once. Each check runs in a fresh interpreter: the fork server is one per process, and
another test in this one may have started it already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")

JOB = textwrap.dedent("""
    import os, sys

    def probe():  # in the child: who it is, how nice, and what was imported before this job
        return {"pid": os.getpid(), "ppid": os.getppid(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
                "preloaded": "charter.archive.archivist" in sys.modules}

    def fail():
        return 1 / 0
""")

MAIN = textwrap.dedent("""
    import asyncio, json, os, sys
    from charter.archive import children
    import job

    async def main():
        if sys.argv[1] == "warm":  # as the daemon's archivist does when it starts
            await asyncio.get_running_loop().run_in_executor(None, children.warm)
        jobs = [await children.run_in_child(job.probe) for _ in range(2)]
        server_nice = os.getpriority(os.PRIO_PROCESS, jobs[0]["ppid"])
        try:
            await children.run_in_child(job.fail)
        except ZeroDivisionError as exc:
            failed = str(exc)
        print(json.dumps({"parent": os.getpid(), "parent_nice": os.getpriority(os.PRIO_PROCESS, 0),
                          "server_nice": server_nice, "jobs": jobs, "failed": failed}))

    if __name__ == "__main__":  # (a script's children import it again, as they do the `charter` script)
        asyncio.run(main())
""")


def run(tmp_path: Path, how: str) -> dict[str, Any]:
    (tmp_path / "job.py").write_text(JOB)
    (tmp_path / "main.py").write_text(MAIN)
    done = subprocess.run([sys.executable, "main.py", how], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("how", ["warm", "cold"])
def test_each_job_runs_in_a_niced_child_forked_from_a_server_that_imported_the_archive(
        tmp_path: Path, how: str) -> None:
    """Warmed first (the daemon) or not (the CLI's `charter archive verify`): each job runs in a
    process of its own at nice 10, forked by the one fork server, with the archive's modules
    imported already, so that starting it costs a fork, not a Python start and its imports."""
    doc = run(tmp_path, how)
    first, second = doc["jobs"]
    assert len({first["pid"], second["pid"], doc["parent"]}) == 3  # a process per job
    assert first["ppid"] == second["ppid"] != doc["parent"]  # both forked by the fork server
    assert first["nice"] == second["nice"] == 10 and doc["parent_nice"] == 0  # the caller keeps its own
    assert first["preloaded"] and second["preloaded"]
    assert doc["failed"] == "division by zero"  # a job's exception comes back as itself
    if how == "warm":  # started niced: its children are niced from their first instruction
        assert doc["server_nice"] == 10
