"""Operator routes for the archive: status, seal, checkpoint, sync, prune, verify, proofs, queries."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from charter.archive.layout import ArchiveError
from charter.archive.proofs import inclusion_proof
from charter.archive.query import Query, events, resolve_sender
from charter.bus.subjects import SubjectError, validate_pattern
from charter.encoding import dumps
from charter.errors import BAD_REQUEST, CONFLICT, CharterError
from charter.identity.registry import AgentRecord
from charter.node import Node, decode_json_body

Auth = Callable[..., Awaitable[AgentRecord]]
JSON = "application/json"


def _json(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type=JSON)


def _refused(exc: ArchiveError) -> CharterError:
    return CharterError(CONFLICT, str(exc), "archive")


def add_archive_routes(app: FastAPI, node: Node, operator: Auth) -> None:
    archivist = node.archivist

    async def as_operator(request: Request) -> dict[str, Any]:
        body = await request.body()
        await operator(request, body)
        data = decode_json_body(body) if body else {}
        if not isinstance(data, dict):
            raise CharterError(BAD_REQUEST, "body must be a JSON object", "body")
        return data

    @app.get("/v1/admin/archive/status", tags=["archive"], summary="Archived entries, checkpoints, mirrors, last verification")
    async def status(request: Request) -> Response:
        await operator(request)
        return _json({**archivist.state(), "head_seq": (await node.log.head())[0],
                      "retention_boundary": archivist.retention_boundary()[0]})

    @app.post("/v1/admin/archive/seal", tags=["archive"], summary="Seal what waits and sign a checkpoint")
    async def seal(request: Request) -> Response:
        await as_operator(request)
        try:
            return _json(await archivist.seal(partial=True))
        except ArchiveError as exc:
            raise _refused(exc) from None

    @app.post("/v1/admin/archive/checkpoint", tags=["archive"], summary="Sign a checkpoint of the live head now")
    async def checkpoint(request: Request) -> Response:
        await as_operator(request)
        try:
            return _json({"checkpoint": await archivist.checkpoint()})
        except ArchiveError as exc:
            raise _refused(exc) from None

    @app.post("/v1/admin/archive/sync", tags=["archive"], summary="Copy to every configured mirror and verify the copies")
    async def sync(request: Request) -> Response:
        await as_operator(request)
        return _json({"mirrors": await archivist.sync()})

    @app.post("/v1/admin/archive/prune", tags=["archive"], summary="Remove archived, mirrored, old entries from charter.db")
    async def prune(request: Request) -> Response:
        await as_operator(request)
        try:
            return _json(await archivist.prune())
        except ArchiveError as exc:
            raise _refused(exc) from None

    @app.post("/v1/admin/archive/verify", tags=["archive"], summary="Recompute the archive and the live log (exit code 5 in the CLI)")
    async def verify(request: Request) -> Response:
        data = await as_operator(request)
        report = await archivist.verify(signatures=bool(data.get("signatures")))
        return _json(report.to_dict())

    @app.get("/v1/admin/archive/proofs/{seq}", tags=["archive"], summary="An inclusion proof for one entry, checkable offline")
    async def prove(seq: int, request: Request, checkpoint: int | None = None) -> Response:
        await operator(request)
        try:
            return _json(await asyncio.to_thread(inclusion_proof, archivist.layout, seq, checkpoint))
        except ArchiveError as exc:
            raise CharterError("not_found", str(exc), "seq") from None

    @app.get("/v1/admin/archive/events", tags=["archive"], summary="Query archived and live events together")
    async def query(request: Request, subject: str | None = None, sender: str | None = None,
                    since: int | None = None, until: int | None = None, text: str | None = None,
                    limit: int = 100) -> Response:
        await operator(request)
        if subject is not None:
            try:
                validate_pattern(subject)
            except SubjectError as exc:
                raise CharterError(BAD_REQUEST, str(exc), "subject") from None
        q = Query(subject=subject, sender=resolve_sender(node.home.db_path, sender) if sender else None,
                  since_ms=since, until_ms=until, text=text)
        limit = max(1, min(limit, 10_000))

        def run() -> list[dict[str, Any]]:
            from collections import deque

            return list(deque(events(archivist.layout.root, node.home.db_path, q), maxlen=limit))

        return _json({"events": await asyncio.to_thread(run)})
