"""How an MCP tool call becomes a Charter action name that NATS-style policy patterns can match.

    action = "mcp.<server>.<tool>"

Always exactly three tokens, so `mcp.>` matches every MCP tool, `mcp.github.*` every tool of one
server and `mcp.*.delete_file` one tool of any server. A token is letters, digits, `_` and `-`:
any other character of a server or tool name (`.`, `/`, spaces ...) becomes `_`, so `files.read`
is governed as `mcp.<server>.files_read`. Names that differ only in such characters share an action,
and so share a decision; that is the price of patterns that stay one token per tool.
"""

from __future__ import annotations

import re

PREFIX = "mcp"
_BAD = re.compile(r"[^A-Za-z0-9_-]")
MAX_TOKEN = 64


def token(name: str) -> str:
    """One subject token for `name` (never empty, at most 64 characters)."""
    out = _BAD.sub("_", name.strip())[:MAX_TOKEN]
    return out or "_"


def tool_action(server: str, tool: str) -> str:
    """The action the agent's policy decides for a call of `tool` on the downstream `server`."""
    return f"{PREFIX}.{token(server)}.{token(tool)}"
