"""Charter as an MCP server: the tools of `tools.py` and two resources, on the SDK's low-level `Server`.

The same server object serves both transports; what differs is how a request finds its agent:

* stdio (`charter mcp --creds FILE`): one agent for the whole process, an `SdkBackend`;
* streamable HTTP (`/mcp` on the daemon): the bearer key on each HTTP request, a `NodeBackend`.

A refusal (out of scope, denied by policy, revoked ...) is a tool result with `isError` and a text
`<code>: <message>` that the model can read and act on; `structuredContent.error` carries the same
`{code, message, where}` as the HTTP API. Unknown tools and resources are protocol errors.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import mcp.types as mt
from mcp.server import Server, ServerRequestContext
from mcp.shared.exceptions import MCPError

from charter import __version__
from charter.encoding import dumps
from charter.errors import CharterError
from charter.mcp.backend import Backend, require_allowed
from charter.mcp.tools import BY_NAME, TOOLS, Text

log = logging.getLogger("charter.mcp")
CAPSULE_URI = "charter://agent/capsule"
CHARTER_URI = "charter://agent/charter"
RESOURCE_NOT_FOUND = -32002
INSTRUCTIONS = (
    "Charter governs this agent: every tool here acts as the enrolled agent and is checked by its scope "
    "and policy. Refusals name their reason (out_of_scope, policy_denied, revoked ...). Use `act` before "
    "risky actions; hand work to another agent with `handoff`; read the capsule for context."
)

BackendFor = Callable[[ServerRequestContext[Any]], Awaitable[Backend]]


def text_result(data: Any, *, error: bool = False) -> mt.CallToolResult:
    """JSON text for the model, and the same object as structured content (wrapped when not an object)."""
    if isinstance(data, Text):
        return mt.CallToolResult(content=[mt.TextContent(text=data.text)], structured_content=data.data, is_error=error)
    structured = data if isinstance(data, dict) else {"result": data}
    return mt.CallToolResult(content=[mt.TextContent(text=dumps(data).decode())], structured_content=structured,
                             is_error=error)


def refusal(exc: CharterError) -> mt.CallToolResult:
    return mt.CallToolResult(content=[mt.TextContent(text=str(exc))], structured_content={"error": exc.to_dict()},
                             is_error=True)


def build_server(backend_for: BackendFor, *, name: str = "charter") -> Server[Any]:
    tool_list = [mt.Tool(name=t.name, title=t.title, description=t.description, input_schema=t.input_schema,
                         annotations=mt.ToolAnnotations(read_only_hint=t.read_only, destructive_hint=False,
                                                        open_world_hint=False))
                 for t in TOOLS]
    resources = [
        mt.Resource(uri=CAPSULE_URI, name="capsule", title="This agent's capsule", mime_type="text/markdown",
                    description="Context rebuilt from the agent's own view: charter, budget, approvals, events."),
        mt.Resource(uri=CHARTER_URI, name="charter", title="This agent's charter", mime_type="application/json",
                    description="The signed certificate: identity, scopes, policy binding, budget, sandbox, expiry."),
    ]

    async def list_tools(ctx: ServerRequestContext[Any], params: mt.PaginatedRequestParams | None) -> mt.ListToolsResult:
        return mt.ListToolsResult(tools=tool_list)

    async def call_tool(ctx: ServerRequestContext[Any], params: mt.CallToolRequestParams) -> mt.CallToolResult:
        spec = BY_NAME.get(params.name)
        if spec is None:
            raise MCPError(mt.INVALID_PARAMS, f"unknown tool {params.name!r}; Charter's tools: "
                           + ", ".join(t.name for t in TOOLS))
        try:
            backend = await backend_for(ctx)
            return text_result(await spec.handler(backend, dict(params.arguments or {})))
        except CharterError as exc:
            return refusal(exc)

    async def list_resources(ctx: ServerRequestContext[Any], params: mt.PaginatedRequestParams | None
                             ) -> mt.ListResourcesResult:
        return mt.ListResourcesResult(resources=resources)

    async def read_resource(ctx: ServerRequestContext[Any], params: mt.ReadResourceRequestParams) -> mt.ReadResourceResult:
        uri = str(params.uri)
        try:
            backend = await backend_for(ctx)
            if uri == CAPSULE_URI:
                require_allowed(await backend.check("capsule.read"), "capsule.read")
                doc = await backend.capsule()
                text, mime = str(doc.get("markdown", "")), "text/markdown"
            elif uri == CHARTER_URI:
                require_allowed(await backend.check("state.read", {"pattern": "charter"}), "state.read")
                text, mime = dumps(await backend.charter()).decode(), "application/json"
            else:
                raise MCPError(RESOURCE_NOT_FOUND, f"no resource {uri!r}; Charter has {CAPSULE_URI} and {CHARTER_URI}")
        except CharterError as exc:
            raise MCPError(mt.INVALID_REQUEST, str(exc), exc.to_dict()) from None
        return mt.ReadResourceResult(contents=[mt.TextResourceContents(uri=uri, mime_type=mime, text=text)])

    return Server(name, version=__version__, title="Charter", instructions=INSTRUCTIONS,
                  on_list_tools=list_tools, on_call_tool=call_tool,
                  on_list_resources=list_resources, on_read_resource=read_resource)


async def serve_stdio(creds: str) -> None:
    """`charter mcp --creds FILE`: this process is the agent; stdin/stdout carry MCP."""
    from charter.mcp.stdio import stdio_transport

    from charter.mcp.backend import SdkBackend
    from charter.sdk import Agent

    agent = Agent.load(creds)
    backend = SdkBackend(agent)

    async def fixed(ctx: ServerRequestContext[Any]) -> Backend:
        return backend

    server = build_server(fixed)
    try:
        async with stdio_transport() as (read, write):
            await server.run(read, write, server.create_initialization_options())
    finally:
        await agent.close()
