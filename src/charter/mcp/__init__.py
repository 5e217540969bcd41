"""Agents that speak MCP (the Model Context Protocol), with the official `mcp` SDK.

* `server`  Charter as an MCP server: an enrolled agent's tools (publish, recent events, capsule,
            action decisions, budget, hand-offs) and resources (capsule, charter). Served over stdio by
            `charter mcp --creds FILE`, and over streamable HTTP by the daemon at `/mcp` (`http`).
* `proxy`   the governing proxy: `charter mcp proxy --creds FILE -- COMMAND...` puts the agent's
            policy in front of another MCP server's tools (`mcp.<server>.<tool>` actions).
* `naming`, `visibility`, `handoff`, `backend`, `tools`, `launch`: the small parts they share.

The SDK is imported only by the modules that speak the protocol, so the daemon starts without it
being touched until an MCP client arrives.
"""
