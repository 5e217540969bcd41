"""Routes for actions, approvals, policies and budgets (agent and operator sides)."""

from __future__ import annotations


import math
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from charter.budget.ledger import Limit
from charter.budget.prices import MICRO
from charter.encoding import dumps
from charter.errors import BAD_REQUEST, CharterError
from charter.identity.registry import AgentRecord
from charter.node import Node, decode_json_body
from charter.units import parse_duration

Auth = Callable[..., Awaitable[AgentRecord]]
JSON = "application/json"


def _json(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type=JSON)


def _object(body: bytes) -> dict[str, Any]:
    data = decode_json_body(body) if body else {}
    if not isinstance(data, dict):
        raise CharterError(BAD_REQUEST, "body must be a JSON object", "body")
    return data


def _wait_seconds(value: Any) -> float:
    if value in (None, "", 0):
        return 0.0
    try:
        return min(parse_duration(value), 300.0)
    except ValueError as exc:
        raise CharterError(BAD_REQUEST, str(exc), "wait") from None


def add_governance_routes(app: FastAPI, node: Node, caller: Auth, operator: Auth) -> None:
    gov = node.gov

    # -- agent side --------------------------------------------------------------------------

    @app.post("/v1/agent/act", tags=["policy"], summary="Ask whether an action may run; T3 waits for approval")
    async def act(request: Request) -> Response:
        body = await request.body()
        who = await caller(request, body)
        data = _object(body)
        action = data.get("action")
        if not isinstance(action, str):
            raise CharterError(BAD_REQUEST, "action is required, e.g. \"fs.write\"", "action")
        result = await gov.act(who, action, data.get("attrs") or {})
        wait = _wait_seconds(data.get("wait"))
        if result["effect"] == "approve" and wait > 0:
            result = {**result, **(await gov.wait_approval(who, result["approval_id"], wait))}
        return _json(result)

    @app.get("/v1/agent/approvals/{approval_id}", tags=["policy"],
             summary="The state of an approval; with wait, long-poll until decided. Approved: claimed once.")
    async def approval_state(approval_id: str, request: Request, wait: str | None = None) -> Response:
        who = await caller(request)
        return _json(await gov.wait_approval(who, approval_id, _wait_seconds(wait)))

    @app.get("/v1/agent/budget", tags=["budget"], summary="The caller's limits, what is used and what is left")
    async def my_budget(request: Request) -> Response:
        who = await caller(request)
        return _json(await gov.budget_view(who))

    @app.post("/v1/agent/budget/reserve", tags=["budget"], summary="Reserve before a paid call")
    async def reserve(request: Request) -> Response:
        body = await request.body()
        who = await caller(request, body)
        return _json(await gov.reserve(who, _object(body)), 201)

    @app.post("/v1/agent/budget/settle", tags=["budget"], summary="Settle with the actual usage; the rest returns")
    async def settle(request: Request) -> Response:
        body = await request.body()
        who = await caller(request, body)
        return _json(await gov.settle(who, _object(body)))

    @app.post("/v1/agent/budget/release", tags=["budget"], summary="Give a reservation back unused")
    async def release(request: Request) -> Response:
        body = await request.body()
        who = await caller(request, body)
        return _json(await gov.release(who, _object(body).get("reservation_id")))

    # -- operator side -----------------------------------------------------------------------

    @app.get("/v1/admin/approvals", tags=["operator"], summary="Approvals, newest first")
    async def approvals(request: Request, state: str | None = None) -> Response:
        await operator(request)
        await gov.expire_due()
        return _json({"approvals": [a.to_dict() for a in gov.approvals.list(state)]})

    @app.post("/v1/admin/approvals/{approval_id}/decide", tags=["operator"],
              summary="Approve or deny with a decision document signed by the root key")
    async def decide(approval_id: str, request: Request) -> Response:
        body = await request.body()
        await operator(request, body)
        doc = _object(body)
        if "sig" not in doc and node.is_dashboard_token(request.headers.get("authorization")):
            # The dashboard cannot hold the root key; the daemon, which does, signs for the logged-in operator.
            from charter.policy.approvals import decision_document, sign_decision

            window = doc.get("window_s")
            doc = sign_decision(node.root_key, decision_document(
                approval_id, str(doc.get("verdict")), float(window) if window else None,
                str(doc.get("note", "")) + " (via the dashboard)"))
        if doc.get("approval_id") != approval_id:
            raise CharterError(BAD_REQUEST, "the signed decision names another approval", "approval_id")
        return _json((await gov.decide_approval(doc)).to_dict())

    @app.post("/v1/admin/policy/explain", tags=["operator"], summary="The decision for an agent and action, and the path to it")
    async def explain(request: Request) -> Response:
        body = await request.body()
        await operator(request, body)
        data = _object(body)
        agent = node.registry.find(str(data.get("agent", "")))
        action = data.get("action")
        if not isinstance(action, str):
            raise CharterError(BAD_REQUEST, "action is required", "action")
        attrs = data.get("attrs") or {}
        if not isinstance(attrs, dict):
            raise CharterError(BAD_REQUEST, "attrs must be a JSON object", "attrs")
        d = gov.evaluate(agent, action, attrs, explain=True)
        policy = gov.bound_policy(agent)
        return _json({"agent": agent.name, "agent_id": agent.id, "action": action, "attrs": attrs,
                      "policy": agent.charter.get("policy"),
                      "policy_current": policy is not None and policy.id in gov.current
                      and gov.current[policy.id].hash == policy.hash,
                      "max_tier": agent.charter.get("max_tier"), **d.to_dict()})

    @app.get("/v1/admin/budget", tags=["operator"], summary="Every limit with its use in the current period")
    async def budget(request: Request) -> Response:
        await operator(request)
        agents = node.registry.all()
        names = {f"agent:{a.id}": a.name for a in agents}
        rows = await gov.budget_overview(agents)
        for r in rows:
            r["name"] = names.get(r["scope"], r["scope"])
        return _json({"budgets": rows, "timezone": node.config.budget.timezone})

    @app.put("/v1/admin/budget", tags=["operator"],
             summary="Set a limit: {scope, unit, period, limit, soft_ratio}; or {scope, unit, period, remove: true}")
    async def budget_set(request: Request) -> Response:
        body = await request.body()
        await operator(request, body)
        data = _object(body)
        remove = bool(data.get("remove"))
        scope = _budget_scope(data.get("scope"), removing=remove)
        unit, period = str(data.get("unit", "usd")), str(data.get("period", "day"))
        hard = 0
        if not remove or data.get("limit") is not None:
            try:
                amount = float(data["limit"])
            except KeyError:
                raise CharterError(BAD_REQUEST, "limit is required to set a limit (dollars for usd, a count "
                                   "for tokens); to remove one, send remove: true", "limit") from None
            except (TypeError, ValueError):
                raise CharterError(BAD_REQUEST, f"limit {data['limit']!r} is not a number (dollars for usd, "
                                   "a count for tokens)", "limit") from None
            if not math.isfinite(amount):
                raise CharterError(BAD_REQUEST, f"limit {data['limit']!r} is not a finite number", "limit")
            hard = int(round(amount * MICRO)) if unit == "usd" else int(amount)
        raw_soft = data.get("soft_ratio", node.config.budget.soft_ratio)
        try:
            soft = float(raw_soft)
        except (TypeError, ValueError):
            raise CharterError(BAD_REQUEST, f"soft_ratio {raw_soft!r} is not a number in (0, 1]", "soft_ratio") from None
        lim = Limit(scope, unit, period, hard, soft)
        if remove:
            await gov.ask_ledger(gov.ledger.remove_limit, lim.scope, lim.unit, lim.period)
        else:
            await gov.ask_ledger(gov.ledger.set_limit, lim)
        await node.emit("charter.budget.limits", {**lim.to_dict(), "removed": remove})
        return _json(lim.to_dict())

    def _budget_scope(raw: Any, *, removing: bool = False) -> str:
        """`global`, `role:NAME` of a configured role, or `agent:NAME|ID` of a known agent (stored by id).

        A typo must not set a limit that binds nobody; removing may name a role no longer configured.
        """
        scope = str(raw or "")
        kind, _, name = scope.partition(":")
        if scope == "global":
            return scope
        if kind == "role" and name:
            if name not in node.config.roles and not removing:
                raise CharterError(BAD_REQUEST, f"unknown role {name!r} in scope {scope!r}; roles in charter.toml: "
                                   f"{', '.join(sorted(node.config.roles)) or 'none'}", "scope")
            return scope
        if kind == "agent" and name:
            try:
                return f"agent:{node.registry.find(name).id}"
            except CharterError:
                raise CharterError(BAD_REQUEST, f"unknown agent {name!r} in scope {scope!r}: no agent has that "
                                   "name or id", "scope") from None
        raise CharterError(BAD_REQUEST, f"scope {scope!r} is not global, role:NAME or agent:NAME", "scope")

    @app.get("/v1/admin/budget/history", tags=["operator"], summary="Spend grouped by day, agent, model or role")
    async def budget_history(request: Request, by: str = "day", since_ms: int = 0, agent: str | None = None) -> Response:
        await operator(request)
        agent_id = node.registry.find(agent).id if agent else None
        rows = await gov.spend_history(by=by, since_ms=since_ms, agent_id=agent_id)
        if by == "agent":
            names = {a.id: a.name for a in node.registry.all()}
            for r in rows:
                r["name"] = names.get(r["agent"], r["agent"])
        return _json({"by": by, "history": rows})


