"""Structured logs: with `daemon.log_format = "json"` every line the daemon writes is one JSON object,
and the request id in an access line is the one in the events that request caused."""

from __future__ import annotations

import json
import time
from pathlib import Path

import aiohttp
import pytest

from charter.identity.keys import SigningKey
from charter.identity.tokens import token_hash
from charter.identity.proofs import enroll_proof_message
from charter.server.daemon import stop
from tests.conftest import make_home, start_daemon

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def json_lines(path: Path) -> list[dict]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        assert line.strip(), f"line {n} is empty"
        try:
            obj = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {n} of the daemon's log is not JSON: {line!r}") from None
        assert isinstance(obj, dict), f"line {n} is not a JSON object"
        out.append(obj)
    return out


async def test_json_logs_carry_the_request_id_that_the_events_carry(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    text = home.config_path.read_text()
    assert 'log_format = "text"' in text
    home.config_path.write_text(text.replace('log_format = "text"', 'log_format = "json"\naccess_log = true', 1))
    daemon = start_daemon(home)
    try:
        token = await daemon.invite("worker")
        key = SigningKey.generate()
        ts = int(time.time() * 1000)
        body = {"token": token, "name": "alpha", "public_key": key.public.b64, "ts": ts,
                "proof": key.sign_b64(enroll_proof_message(token_hash(token), "alpha", key.public.b64, ts))}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{daemon.url}/v1/enroll", json=body, headers={"X-Request-Id": "enrol-alpha-42"}) as r:
                assert r.status == 201, await r.text()
                assert r.headers["X-Request-Id"] == "enrol-alpha-42"  # echoed
            # A refused request is logged (errors always are), with the id the daemon made up.
            async with http.get(f"{daemon.url}/v1/admin/agents", headers={"Authorization": "Bearer chd_wrong"}) as r:
                assert r.status == 401
                refused_id = r.headers["X-Request-Id"]
            # An insane id is replaced, not logged verbatim.
            async with http.get(f"{daemon.url}/v1/health", headers={"X-Request-Id": "bad id\twith spaces"}) as r:
                assert r.headers["X-Request-Id"] != "bad id\twith spaces" and len(r.headers["X-Request-Id"]) == 16

        enrolled = await daemon.admin("GET", "/v1/events", params={"pattern": "charter.agents.enrolled"})
        (event,) = [e["envelope"] for e in enrolled["events"]]
        assert event["payload"]["name"] == "alpha"
        assert event["payload"]["request_id"] == "enrol-alpha-42"
        invites = await daemon.admin("GET", "/v1/events", params={"pattern": "charter.invites.created"})
        invite_rid = invites["events"][0]["envelope"]["payload"]["request_id"]
    finally:
        stop(home)

    lines = json_lines(Path(home.log_file))
    assert {"ts", "level", "logger", "msg"} <= set(lines[0])
    started = [x for x in lines if x["logger"] == "charter.daemon" and "dashboard" in x]
    assert started and started[0]["url"] == daemon.url
    access = [x for x in lines if x["logger"] == "charter.access"]
    enrol = [x for x in access if x["path"] == "/v1/enroll"]
    assert len(enrol) == 1 and enrol[0]["request_id"] == "enrol-alpha-42"
    assert enrol[0]["method"] == "POST" and enrol[0]["status"] == 201 and enrol[0]["ms"] >= 0
    # The operator's invite: the id the daemon gave the request is in the log line and in its event.
    assert any(x["path"] == "/v1/admin/invites" and x["request_id"] == invite_rid for x in access)
    refused = [x for x in access if x["request_id"] == refused_id]
    assert refused and refused[0]["status"] == 401 and refused[0]["level"] == "info"
    assert "chd_wrong" not in Path(home.log_file).read_text()  # a credential never reaches the log
