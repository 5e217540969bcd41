"""A small filesystem MCP server for the tests and the benchmark, written with the official SDK.

It serves the files under its working directory (the proxy starts it in the agent's sandbox) and
appends every call it receives to the file named by FS_LOG, one JSON object a line, before acting:
the log is the proof of which calls reached it.

    python fs_server.py                 # stdio
    python fs_server.py --http PORT     # streamable HTTP on 127.0.0.1:PORT/mcp
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

LOG = Path(os.environ.get("FS_LOG") or "fs_calls.log")
ROOT = Path.cwd()
server = MCPServer("fs", instructions="Files under the working directory.")


def logged(tool: str, **args: object) -> None:
    with LOG.open("a", encoding="utf-8") as f:
        probe = os.environ.get("FS_PROBE")  # a path the test wants to know whether this process can read
        f.write(json.dumps({"tool": tool, "args": args, "pid": os.getpid(), "cwd": str(ROOT),
                            "home": os.environ.get("HOME"), "secret": os.environ.get("FS_TEST_SECRET"),
                            "probe_readable": os.access(probe, os.R_OK) if probe else None}) + "\n")


def inside(path: str) -> Path:
    p = (ROOT / path).resolve()
    if ROOT.resolve() not in (p, *p.parents):
        raise ToolError(f"{path} is outside the served directory")
    return p


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def read_file(path: str) -> str:
    """Read a text file."""
    logged("read_file", path=path)
    return inside(path).read_text(encoding="utf-8")


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def list_directory(path: str = ".") -> list[str]:
    """List a directory."""
    logged("list_directory", path=path)
    return sorted(p.name for p in inside(path).iterdir())


@server.tool()
def write_file(path: str, content: str) -> str:
    """Write a text file."""
    logged("write_file", path=path, content=content)
    inside(path).write_text(content, encoding="utf-8")
    return f"wrote {len(content)} characters to {path}"


@server.tool(annotations=ToolAnnotations(destructive_hint=True))
def delete_file(path: str) -> str:
    """Delete a file."""
    logged("delete_file", path=path)
    inside(path).unlink()
    return f"deleted {path}"


@server.tool()
def echo(text: str) -> str:
    """Return the text (the benchmark's call)."""
    return text


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
