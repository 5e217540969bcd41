"""Every refusal, through the real daemon over real sockets.

Each test sends what an attacker or a broken client would send and checks what a user would check:
the HTTP status, the stable `error.code`, and that the log did not grow (the head sequence of
GET /v1/health is unchanged). One daemon serves the module; tests that change an agent's state
(suspend, revoke, expiry) enrol their own agent so that they cannot disturb the others.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson
import pytest
from yarl import URL

from charter.bus.envelope import FIELDS, Envelope, new_nonce, now_ms, seal
from charter.encoding import canonical
from charter.errors import CharterError
from charter.identity.keys import SigningKey
from charter.identity.request_auth import sign_request
from charter.identity.tokens import token_hash
from charter.identity.proofs import enroll_proof_message
from charter.sdk import Agent
from charter.server.daemon import stop
from conftest import Daemon, make_home, start_daemon

pytestmark = pytest.mark.anyio

EXTRA_ROLES = """
[roles.ephemeral]
description = "A charter that lives two seconds."
publish = ["agents.{name}.>"]
subscribe = ["agents.{name}.>"]
charter_ttl = "2s"

[roles.tiny]
description = "A one-kibibyte sandbox."
publish = ["agents.{name}.>"]
subscribe = ["agents.{name}.>"]
sandbox_quota = "1KiB"
"""

_names = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


# -- fixtures --------------------------------------------------------------------------------


@dataclass
class Fleet:
    daemon: Daemon
    creds: dict[str, Path]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = make_home(tmp_path_factory.mktemp("security") / "home")
    with open(home.config_path, "a", encoding="utf-8") as fh:
        fh.write(EXTRA_ROLES)
    d = start_daemon(home)

    async def enrol() -> dict[str, Path]:
        out = {}
        for name, role in (("alpha", "worker"), ("owl", "observer")):
            agent = await d.enroll(name, role)
            assert agent.path is not None
            out[name] = agent.path
            await agent.close()
        return out

    try:
        yield Fleet(d, asyncio.run(enrol()))
    finally:
        stop(home)


@pytest.fixture
def daemon(fleet: Fleet) -> Daemon:
    return fleet.daemon


@pytest.fixture
async def alpha(fleet: Fleet) -> AsyncIterator[Agent]:
    agent = Agent.load(fleet.creds["alpha"])
    yield agent
    await agent.close()


@pytest.fixture
async def owl(fleet: Fleet) -> AsyncIterator[Agent]:
    agent = Agent.load(fleet.creds["owl"])
    yield agent
    await agent.close()


# -- raw HTTP --------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: Any

    @property
    def code(self) -> str:
        assert isinstance(self.body, dict) and "error" in self.body, f"not an error reply: {self.status} {self.body!r}"
        return self.body["error"]["code"]


async def http(
    d: Daemon, method: str, target: str, *, body: bytes = b"", as_: tuple[str, SigningKey] | None = None,
    auth: str | None = None,
) -> Reply:
    """One request. `target` is sent byte for byte (no normalisation); `as_` signs it."""
    headers: dict[str, str] = {}
    if as_ is not None:
        headers["Authorization"] = sign_request(as_[1], as_[0], method, target, body)
    if auth is not None:
        headers["Authorization"] = auth
    if body:
        headers["Content-Type"] = "application/json"
    # A bounded wait: a stream opened where a refusal was expected fails fast instead of hanging.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.request(method, URL(d.url + target, encoded=True), data=body or None, headers=headers) as r:
            content = await r.read()
            status = r.status
    try:
        parsed = orjson.loads(content)
    except orjson.JSONDecodeError:
        parsed = content
    return Reply(status, parsed)


def signer(agent: Agent) -> tuple[str, SigningKey]:
    return (agent.id, agent.creds.key)


def root(d: Daemon) -> tuple[str, SigningKey]:
    return ("operator", SigningKey.load_pem(d.home.root_key_path))


async def head(d: Daemon) -> int:
    r = await http(d, "GET", "/v1/health")
    assert r.status == 200
    return r.body["head_seq"]


async def publish_raw(d: Daemon, data: bytes | Envelope) -> Reply:
    return await http(d, "POST", "/v1/publish", body=data.raw if isinstance(data, Envelope) else data)


def appended_by_agents(d: Daemon, after: int) -> int:
    """Entries after `after` not sent by the operator (the daemon's own events go on meanwhile)."""
    from charter.db import connect

    db = connect(d.home.db_path, readonly=True)
    try:
        return db.execute("SELECT COUNT(*) FROM log WHERE seq > ? AND sender != 'operator'", (after,)).fetchone()[0]
    finally:
        db.close()


async def assert_refused(d: Daemon, data: bytes | Envelope, status: int, code: str) -> Reply:
    """Publish `data`; it must be refused with `status`/`code`, and nothing an agent sent may land."""
    before = await head(d)
    r = await publish_raw(d, data)
    assert (r.status, r.code) == (status, code), r.body
    assert appended_by_agents(d, before) == 0
    return r


def doc_of(agent: Agent, subject: str | None = None, **kw: Any) -> dict[str, Any]:
    env = seal(agent.creds.key, sender=agent.id, subject=subject or f"agents.{agent.name}.events", payload={"n": 1}, **kw)
    return env.to_dict()


async def fresh(d: Daemon, role: str = "worker", prefix: str = "agent") -> Agent:
    return await d.enroll(unique(prefix), role)


# -- malformed and too_large -----------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{not json", b"", b"[]", b"42", b'"envelope"', b"null", b"\xff\xfe", b'{"v":1}'])
async def test_malformed_json_is_refused(daemon, body) -> None:
    await assert_refused(daemon, body, 400, "malformed")


async def test_missing_field_is_malformed(daemon, alpha) -> None:
    for field in sorted(FIELDS):
        doc = doc_of(alpha)
        del doc[field]
        r = await assert_refused(daemon, canonical(doc), 400, "malformed")
        assert field in r.body["error"]["message"]


async def test_extra_field_is_malformed(daemon, alpha) -> None:
    doc = doc_of(alpha)
    doc["admin"] = True
    r = await assert_refused(daemon, canonical(doc), 400, "malformed")
    assert "admin" in r.body["error"]["message"]


@pytest.mark.parametrize("field, value", [
    ("v", "1"), ("v", 2), ("v", True), ("ts", "1700000000000"), ("ts", 1.7e12), ("ts", None), ("id", 7),
    ("id", "not-a-ulid"), ("subject", ["agents", "alpha"]), ("subject", "agents.*.x"), ("sender", {"id": "x"}),
    ("nonce", "short"), ("kind", 1), ("kind", "UPPER"), ("sig", 12), ("sig", "not base64!"),
])
async def test_wrong_types_are_malformed(daemon, alpha, field, value) -> None:
    doc = doc_of(alpha)
    doc[field] = value
    r = await assert_refused(daemon, canonical(doc), 400, "malformed")
    assert r.body["error"].get("where") == field


async def test_envelope_over_max_envelope_bytes_is_too_large(daemon, alpha) -> None:
    big = seal(alpha.creds.key, sender=alpha.id, subject="agents.alpha.big", payload="x" * (64 * 1024))
    assert len(big.raw) > 64 * 1024
    r = await assert_refused(daemon, big, 413, "too_large")
    assert "65536" in r.body["error"]["message"]
    # The limit is where the config says: an envelope just under 64 KiB is accepted.
    near = seal(alpha.creds.key, sender=alpha.id, subject="agents.alpha.big", payload="x" * (64 * 1024 - 400))
    assert len(near.raw) <= 64 * 1024
    r = await publish_raw(daemon, near)
    assert r.status == 201, r.body


# -- identity, status and signature ----------------------------------------------------------


async def test_unknown_sender_is_refused(daemon) -> None:
    stranger = SigningKey.generate()
    env = seal(stranger, sender="agt_01JZZZZZZZZZZZZZZZZZZZZZZZ", subject="agents.alpha.events", payload={"hi": 1})
    await assert_refused(daemon, env, 401, "unknown_sender")


async def test_suspended_agent_is_refused_until_resumed(daemon) -> None:
    agent = await fresh(daemon, prefix="alpha")
    op = root(daemon)
    r = await http(daemon, "POST", f"/v1/admin/agents/{agent.name}/suspend", body=b'{"reason":"audit"}', as_=op)
    assert r.status == 200 and r.body["status"] == "suspended"

    await assert_refused(daemon, agent.seal(f"agents.{agent.name}.x", {"n": 1}), 403, "suspended")
    # A suspended agent's signed calls are refused too.
    r = await http(daemon, "GET", "/v1/agent/charter", as_=signer(agent))
    assert (r.status, r.code) == (403, "suspended")

    r = await http(daemon, "POST", f"/v1/admin/agents/{agent.name}/resume", as_=op)
    assert r.status == 200 and r.body["status"] == "active"
    before = await head(daemon)
    receipt = await agent.publish(f"agents.{agent.name}.x", {"n": 2})
    # Not necessarily before + 1: the daemon's own events about the resume may land in between.
    assert receipt["seq"] > before
    r = await http(daemon, "GET", "/v1/events?" + urlencode({"pattern": f"agents.{agent.name}.x", "limit": 10}),
                   as_=op)
    assert [(e["seq"], e["envelope"]["payload"]) for e in r.body["events"]] == [(receipt["seq"], {"n": 2})]
    await agent.close()


async def test_revocation_applies_to_the_very_next_message_and_is_final(daemon) -> None:
    agent = await fresh(daemon, prefix="alpha")
    op = root(daemon)
    assert (await agent.publish(f"agents.{agent.name}.x", {"n": 1}))["seq"] > 0
    sealed_before = agent.seal(f"agents.{agent.name}.x", {"n": "sealed before the revocation"})

    r = await http(daemon, "POST", f"/v1/admin/agents/{agent.name}/revoke", as_=op)
    assert r.status == 200 and r.body["status"] == "revoked"
    await assert_refused(daemon, agent.seal(f"agents.{agent.name}.x", {"n": 2}), 403, "revoked")
    await assert_refused(daemon, sealed_before, 403, "revoked")

    for action in ("resume", "suspend"):
        r = await http(daemon, "POST", f"/v1/admin/agents/{agent.id}/{action}", as_=op)
        assert (r.status, r.code) == (409, "conflict")
    r = await http(daemon, "GET", f"/v1/admin/agents/{agent.id}", as_=op)
    assert r.body["status"] == "revoked"
    await assert_refused(daemon, agent.seal(f"agents.{agent.name}.x", {"n": 3}), 403, "revoked")
    await agent.close()


async def test_expired_charter_is_refused(daemon) -> None:
    agent = await fresh(daemon, role="ephemeral", prefix="brief")
    expires_at = agent.creds.charter["expires_at"]
    assert expires_at - agent.creds.charter["issued_at"] == 2000
    r = await publish_raw(daemon, agent.seal(f"agents.{agent.name}.x", {"n": 1}))
    assert r.status == 201, r.body
    await asyncio.sleep(max(0.0, (expires_at - now_ms()) / 1000) + 0.05)
    await assert_refused(daemon, agent.seal(f"agents.{agent.name}.x", {"n": 2}), 403, "expired")
    r = await http(daemon, "GET", "/v1/agent/charter", as_=signer(agent))
    assert (r.status, r.code) == (403, "expired")
    await agent.close()


async def test_tampered_payload_is_bad_signature_and_burns_no_nonce(daemon, alpha) -> None:
    env = alpha.seal("agents.alpha.pay", {"amount": 10, "to": "bob"})
    doc = env.to_dict()
    doc["payload"] = {"amount": 10_000, "to": "mallory"}
    await assert_refused(daemon, canonical(doc), 401, "bad_signature")
    # One flipped byte inside the payload, everything else (the sig included) as signed.
    flipped = env.raw.replace(b'"bob"', b'"bpb"')
    assert flipped != env.raw and len(flipped) == len(env.raw)
    await assert_refused(daemon, flipped, 401, "bad_signature")
    # The forgeries did not use up the honest envelope's nonce: the original still goes through.
    r = await publish_raw(daemon, env)
    assert r.status == 201, r.body


async def test_signature_by_another_agents_key_is_bad_signature(daemon, alpha, owl) -> None:
    forged = seal(owl.creds.key, sender=alpha.id, subject="agents.alpha.events", payload={"from": "owl"})
    await assert_refused(daemon, forged, 401, "bad_signature")


async def test_same_envelope_twice_is_a_replay(daemon, alpha) -> None:
    env = alpha.seal("agents.alpha.once", {"n": 1})
    before = await head(daemon)
    r = await publish_raw(daemon, env)
    assert r.status == 201 and r.body["seq"] > before and appended_by_agents(daemon, before) == 1
    r = await assert_refused(daemon, env, 409, "replay")
    assert r.body["error"]["where"] == "nonce"
    # A new id with the old nonce is the same replay.
    again = seal(alpha.creds.key, sender=alpha.id, subject="agents.alpha.once", payload={"n": 2}, nonce=env.nonce)
    await assert_refused(daemon, again, 409, "replay")


@pytest.mark.parametrize("offset_ms", [-10 * 60_000, 10 * 60_000])
async def test_timestamp_outside_the_window_is_a_replay(daemon, alpha, offset_ms) -> None:
    env = seal(alpha.creds.key, sender=alpha.id, subject="agents.alpha.when", payload={}, ts=now_ms() + offset_ms)
    r = await assert_refused(daemon, env, 409, "replay")
    assert r.body["error"]["where"] == "ts"


@pytest.mark.parametrize("subject", ["tasks.assign", "agents.owl.events", "charter.agents.revoked"])
async def test_publish_outside_scope_is_refused(daemon, alpha, subject) -> None:
    await assert_refused(daemon, alpha.seal(subject, {"n": 1}), 403, "out_of_scope")


def _subscribe_target(pattern: str) -> str:
    return "/v1/subscribe?" + urlencode({"pattern": pattern})


@pytest.mark.parametrize("who, pattern", [
    ("owl", "secrets.>"), ("owl", ">"), ("owl", "*.>"), ("alpha", "agents.owl.>"), ("alpha", "charter.>"),
])
async def test_subscribe_outside_scope_is_refused(daemon, alpha, owl, who, pattern) -> None:
    agent = {"alpha": alpha, "owl": owl}[who]
    r = await http(daemon, "GET", _subscribe_target(pattern), as_=signer(agent))
    assert (r.status, r.code) == (403, "out_of_scope")


async def test_subscribe_inside_scope_opens_a_stream(daemon, owl) -> None:
    target = _subscribe_target("agents.>")
    headers = {"Authorization": sign_request(owl.creds.key, owl.id, "GET", target)}
    async with aiohttp.ClientSession() as s:
        async with s.get(URL(daemon.url + target, encoded=True), headers=headers) as r:
            assert r.status == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            first = await asyncio.wait_for(r.content.readline(), 5)
            assert first.startswith(b": charter stream open")


async def test_subscribe_with_a_bad_heartbeat_is_a_bad_request(daemon, alpha) -> None:
    target = "/v1/subscribe?" + urlencode({"pattern": "agents.alpha.>", "heartbeat": "soon"})
    r = await http(daemon, "GET", target, as_=signer(alpha))
    assert (r.status, r.code) == (400, "bad_request")


async def test_batch_mixes_accepted_and_refused_items(daemon, alpha, owl) -> None:
    good1 = alpha.seal("agents.alpha.batch", {"i": 1})
    tampered = good1.to_dict() | {"payload": {"i": 666}, "nonce": new_nonce()}
    good2 = alpha.seal("agents.alpha.batch", {"i": 2})
    scope = alpha.seal("tasks.assign", {"i": 3})
    stale = seal(alpha.creds.key, sender=alpha.id, subject="agents.alpha.batch", payload={}, ts=now_ms() - 600_000)
    forged = seal(owl.creds.key, sender=alpha.id, subject="agents.alpha.batch", payload={"i": 4})
    items = [good1.to_dict(), tampered, good2.to_dict(), {"not": "an envelope"}, scope.to_dict(),
             good1.to_dict(), stale.to_dict(), forged.to_dict(), 42]
    expected = [None, "bad_signature", None, "malformed", "out_of_scope", "replay", "replay", "bad_signature", "malformed"]

    before = await head(daemon)
    r = await http(daemon, "POST", "/v1/publish/batch", body=orjson.dumps(items))
    assert r.status == 200, r.body
    assert (r.body["accepted"], r.body["rejected"]) == (2, 7)
    results = r.body["results"]
    assert [res.get("error", {}).get("code") for res in results] == expected
    # One transaction: the two good items are neighbours, whatever the daemon appended before them.
    assert results[0]["seq"] > before and results[2]["seq"] == results[0]["seq"] + 1
    assert [results[0]["id"], results[2]["id"]] == [good1.id, good2.id]
    assert appended_by_agents(daemon, before) == 2
    # What was appended is exactly the two good envelopes, byte for byte.
    recent = await alpha.recent("agents.alpha.batch", limit=2)
    assert [e.envelope for e in recent] == [good1.to_dict(), good2.to_dict()]


async def test_batch_that_is_not_a_list_is_refused(daemon) -> None:
    before = await head(daemon)
    for body, status, code in ((b'{"v":1}', 400, "bad_request"), (b"[oops", 400, "malformed")):
        r = await http(daemon, "POST", "/v1/publish/batch", body=body)
        assert (r.status, r.code) == (status, code)
    assert appended_by_agents(daemon, before) == 0  # the daemon's own events may go on meanwhile


async def test_reused_envelope_id_is_refused_not_a_server_error(daemon, alpha) -> None:
    """A fresh nonce but an id already in the log: a rejection, never a 500, and nothing appended."""
    env = alpha.seal("agents.alpha.ids", {"n": 1})
    assert (await publish_raw(daemon, env)).status == 201
    same_id = seal(alpha.creds.key, sender=alpha.id, subject="agents.alpha.ids", payload={"n": 2}, eid=env.id)
    r = await assert_refused(daemon, same_id, 409, "replay")
    assert r.body["error"]["where"] == "id"

    # In a batch, only the offending items are refused; the good ones are still appended.
    good = alpha.seal("agents.alpha.ids", {"n": 3})
    twin_a = alpha.seal("agents.alpha.ids", {"n": 4})
    twin_b = seal(alpha.creds.key, sender=alpha.id, subject="agents.alpha.ids", payload={"n": 5}, eid=twin_a.id)
    again = seal(alpha.creds.key, sender=alpha.id, subject="agents.alpha.ids", payload={"n": 6}, eid=env.id)
    before = await head(daemon)
    r = await http(daemon, "POST", "/v1/publish/batch",
                   body=orjson.dumps([good.to_dict(), again.to_dict(), twin_a.to_dict(), twin_b.to_dict()]))
    assert r.status == 200, r.body
    codes = [res.get("error", {}).get("code") for res in r.body["results"]]
    assert codes[:2] == [None, "replay"]
    assert codes[2:].count("replay") == 1 and codes[2:].count(None) == 1  # one of the twins wins
    assert appended_by_agents(daemon, before) == 2


# -- request signing (the operator API) ------------------------------------------------------


async def _invite_count(d: Daemon) -> int:
    r = await http(d, "GET", "/v1/admin/invites", as_=root(d))
    assert r.status == 200
    return len(r.body["invites"])


@pytest.mark.parametrize("method, target, body", [
    ("GET", "/v1/admin/status", b""),
    ("GET", "/v1/admin/agents", b""),
    ("POST", "/v1/admin/invites", b'{"role":"coordinator"}'),
    ("POST", "/v1/admin/agents/owl/revoke", b""),
])
async def test_operator_endpoints_refuse_an_agents_signature(daemon, alpha, method, target, body) -> None:
    invites = await _invite_count(daemon)
    r = await http(daemon, method, target, body=body, as_=signer(alpha))
    assert (r.status, r.code) == (401, "unauthorized")
    assert await _invite_count(daemon) == invites
    r = await http(daemon, "GET", "/v1/admin/agents/owl", as_=root(daemon))
    assert r.body["status"] == "active"


@pytest.mark.parametrize("method, target, body", [
    ("GET", "/v1/admin/status", b""),
    ("GET", "/v1/admin/invites", b""),
    ("POST", "/v1/admin/invites", b'{"role":"worker"}'),
    ("POST", "/v1/admin/agents/owl/suspend", b""),
    ("GET", "/v1/agent/charter", b""),
])
async def test_unsigned_requests_are_unauthorized(daemon, method, target, body) -> None:
    for auth in (None, "Bearer hunter2", "Charter id=operator", ""):
        r = await http(daemon, method, target, body=body, auth=auth)
        assert (r.status, r.code) == (401, "unauthorized"), (auth, r.body)


async def test_a_replayed_request_signature_is_refused(daemon) -> None:
    op_id, key = root(daemon)
    auth = sign_request(key, op_id, "GET", "/v1/admin/status")
    first = await http(daemon, "GET", "/v1/admin/status", auth=auth)
    assert first.status == 200 and first.body["root_key_id"] == key.public.key_id
    second = await http(daemon, "GET", "/v1/admin/status", auth=auth)
    assert (second.status, second.code) == (409, "replay")

    # A state-changing call replayed does not happen twice.
    body = b'{"role":"worker","note":"once"}'
    invites = await _invite_count(daemon)
    auth = sign_request(key, op_id, "POST", "/v1/admin/invites", body)
    assert (await http(daemon, "POST", "/v1/admin/invites", body=body, auth=auth)).status == 201
    r = await http(daemon, "POST", "/v1/admin/invites", body=body, auth=auth)
    assert (r.status, r.code) == (409, "replay")
    assert await _invite_count(daemon) == invites + 1


async def test_a_request_signature_covers_path_and_body(daemon) -> None:
    op_id, key = root(daemon)
    auth = sign_request(key, op_id, "GET", "/v1/admin/status")
    r = await http(daemon, "GET", "/v1/admin/agents", auth=auth)
    assert (r.status, r.code) == (401, "bad_signature")

    invites = await _invite_count(daemon)
    auth = sign_request(key, op_id, "POST", "/v1/admin/invites", b'{"role":"observer"}')
    r = await http(daemon, "POST", "/v1/admin/invites", body=b'{"role":"coordinator"}', auth=auth)
    assert (r.status, r.code) == (401, "bad_signature")
    assert await _invite_count(daemon) == invites


async def test_a_request_signed_by_a_stranger_is_refused(daemon, alpha) -> None:
    stranger = SigningKey.generate()
    r = await http(daemon, "GET", "/v1/admin/status", as_=("operator", stranger))
    assert (r.status, r.code) == (401, "bad_signature")
    r = await http(daemon, "GET", "/v1/agent/charter", as_=(alpha.id, stranger))
    assert (r.status, r.code) == (401, "bad_signature")
    r = await http(daemon, "GET", "/v1/agent/charter", as_=("agt_01JZZZZZZZZZZZZZZZZZZZZZZZ", stranger))
    assert (r.status, r.code) == (401, "unknown_sender")


# -- enrolment -------------------------------------------------------------------------------


async def invite(d: Daemon, role: str = "worker", **kw: Any) -> str:
    r = await http(d, "POST", "/v1/admin/invites", body=orjson.dumps({"role": role, **kw}), as_=root(d))
    assert r.status == 201, r.body
    return r.body["token"]


def enrol_request(token: Any, name: str, *, key: SigningKey | None = None, prover: SigningKey | None = None,
                  proof_name: str | None = None, role: str | None = None) -> dict[str, Any]:
    key = key or SigningKey.generate()
    ts = now_ms()
    th = token_hash(token) if isinstance(token, str) else ""
    proof = (prover or key).sign_b64(enroll_proof_message(th, proof_name or name, key.public.b64, ts))
    req = {"token": token, "name": name, "public_key": key.public.b64, "ts": ts, "proof": proof}
    if role is not None:
        req["role"] = role
    return req


async def enrol_raw(d: Daemon, req: dict[str, Any]) -> Reply:
    return await http(d, "POST", "/v1/enroll", body=orjson.dumps(req))


async def agent_names(d: Daemon) -> list[str]:
    r = await http(d, "GET", "/v1/admin/agents", as_=root(d))
    return [a["name"] for a in r.body["agents"]]


async def test_a_single_use_token_cannot_be_used_twice(daemon) -> None:
    token = await invite(daemon)
    first, second = unique("once"), unique("twice")
    r = await enrol_raw(daemon, enrol_request(token, first))
    assert r.status == 201 and r.body["charter"]["name"] == first
    r = await enrol_raw(daemon, enrol_request(token, second))
    assert (r.status, r.code) == (403, "bad_token")
    names = await agent_names(daemon)
    assert first in names and second not in names


async def test_an_expired_token_is_refused(daemon) -> None:
    token = await invite(daemon, ttl="1s")
    await asyncio.sleep(1.1)
    name = unique("late")
    r = await enrol_raw(daemon, enrol_request(token, name))
    assert (r.status, r.code) == (403, "bad_token")
    assert "expired" in r.body["error"]["message"]
    assert name not in await agent_names(daemon)


async def test_a_token_for_another_role_is_refused_and_not_spent(daemon) -> None:
    token = await invite(daemon, "worker")
    r = await enrol_raw(daemon, enrol_request(token, unique("climber"), role="observer"))
    assert (r.status, r.code) == (403, "bad_token")
    # The refusal did not spend the token: it still enrols a worker.
    r = await enrol_raw(daemon, enrol_request(token, unique("honest"), role="worker"))
    assert r.status == 201 and r.body["charter"]["role"] == "worker"


@pytest.mark.parametrize("token", ["garbage", "", "chi_" + "A" * 32, "chi_" + "A" * 31, "CHI_" + "A" * 32, None, 12345, ["chi_"]])
async def test_unknown_or_garbage_tokens_are_refused(daemon, token) -> None:
    name = unique("nobody")
    r = await enrol_raw(daemon, enrol_request(token, name))
    assert (r.status, r.code) == (403, "bad_token")
    assert name not in await agent_names(daemon)


async def test_a_bad_proof_of_possession_is_refused(daemon) -> None:
    token = await invite(daemon)
    name = unique("thief")
    # Signed by a key other than the one being enrolled...
    r = await enrol_raw(daemon, enrol_request(token, name, prover=SigningKey.generate()))
    assert (r.status, r.code) == (401, "bad_signature")
    # ...or by the right key over a different name...
    r = await enrol_raw(daemon, enrol_request(token, name, proof_name="someone-else"))
    assert (r.status, r.code) == (401, "bad_signature")
    # ...or not a signature at all.
    req = enrol_request(token, name)
    req["proof"] = "!!"
    r = await enrol_raw(daemon, req)
    assert (r.status, r.code) == (401, "bad_signature")
    assert name not in await agent_names(daemon)
    # None of that spent the token.
    r = await enrol_raw(daemon, enrol_request(token, name))
    assert r.status == 201


async def test_an_enrolment_request_outside_the_window_is_refused(daemon) -> None:
    token = await invite(daemon)
    key = SigningKey.generate()
    name = unique("slow")
    ts = now_ms() - 10 * 60_000
    proof = key.sign_b64(enroll_proof_message(token_hash(token), name, key.public.b64, ts))
    req = {"token": token, "name": name, "public_key": key.public.b64, "ts": ts, "proof": proof}
    r = await enrol_raw(daemon, req)
    assert (r.status, r.code) == (409, "replay")


async def test_a_duplicate_live_name_is_refused(daemon) -> None:
    name = unique("twin")
    r = await enrol_raw(daemon, enrol_request(await invite(daemon), name))
    assert r.status == 201
    token = await invite(daemon)
    r = await enrol_raw(daemon, enrol_request(token, name))
    assert (r.status, r.code) == (409, "conflict")
    assert (await agent_names(daemon)).count(name) == 1
    r = await enrol_raw(daemon, enrol_request(token, unique("sibling")))
    assert r.status == 201


async def test_a_three_use_token_enrols_exactly_three_of_six_racers(daemon) -> None:
    token = await invite(daemon, uses=3)
    names = [unique("racer") for _ in range(6)]
    outcomes = await asyncio.gather(*(Agent.enroll(daemon.url, token, n) for n in names), return_exceptions=True)
    winners = [o for o in outcomes if isinstance(o, Agent)]
    losers = [o for o in outcomes if not isinstance(o, Agent)]
    assert len(winners) == 3
    assert all(isinstance(o, CharterError) and o.code == "bad_token" for o in losers), losers
    enrolled = [n for n in await agent_names(daemon) if n in names]
    assert sorted(enrolled) == sorted(w.name for w in winners)
    r = await http(daemon, "GET", "/v1/admin/invites", as_=root(daemon))
    (inv,) = [i for i in r.body["invites"] if i["uses"] == 3 and i["state"] == "used"]
    assert inv["uses_left"] == 0
    for w in winners:
        await w.close()


# -- the sandbox -----------------------------------------------------------------------------

ESCAPES = ["../x", "a/../../x", "../../../../../../tmp/x"]


def sandbox_of(agent: Agent) -> Path:
    return Path(agent.creds.charter["sandbox"]["path"])


def _outside_spots(agent: Agent) -> list[Path]:
    sb = sandbox_of(agent)
    return [sb.parent / "x", sb.parent.parent / "x", Path("/tmp/x")]


async def test_sandbox_traversal_is_refused_through_the_sdk(daemon, tmp_path) -> None:
    agent = await fresh(daemon, prefix="boxed")
    spots = [p for p in _outside_spots(agent) if not p.exists()]
    absolute = tmp_path / "outside.txt"
    # Control: an ordinary path works both ways.
    await agent.sandbox_write("notes/today.txt", b"fine")
    assert await agent.sandbox_read("notes/today.txt") == b"fine"

    for path in [*ESCAPES, str(absolute)]:
        with pytest.raises(CharterError) as info:
            await agent.sandbox_write(path, b"escaped")
        assert info.value.code == "sandbox_escape", path
    for path in [*ESCAPES, "/etc/passwd"]:
        with pytest.raises(CharterError) as info:
            await agent.sandbox_read(path)
        assert info.value.code == "sandbox_escape", path

    assert not absolute.exists()
    assert not any(p.exists() for p in spots)
    listing = await agent.sandbox_list()
    assert [f["path"] for f in listing["files"]] == ["notes/today.txt"]
    await agent.close()


@pytest.mark.parametrize("path", [
    "../x", "..%2Fx", "%2E%2E/x", "a/../../x", "a%2F..%2F..%2Fx", "/etc/passwd", "%2Fetc%2Fpasswd", "./../x",
])
async def test_sandbox_traversal_is_refused_over_raw_http(daemon, alpha, path) -> None:
    target = "/v1/agent/sandbox/files/" + path
    spots = [p for p in _outside_spots(alpha) if not p.exists()]
    r = await http(daemon, "GET", target, as_=signer(alpha))
    assert (r.status, r.code) == (403, "sandbox_escape")
    if "etc" in path:
        return  # never risk a write to /etc/passwd, even against a broken daemon
    r = await http(daemon, "PUT", target, body=b"escaped", as_=signer(alpha))
    assert (r.status, r.code) == (403, "sandbox_escape")
    assert not any(p.exists() for p in spots)


async def test_an_absolute_write_is_refused_over_raw_http(daemon, alpha, tmp_path) -> None:
    target_file = tmp_path / "abs.txt"
    r = await http(daemon, "PUT", "/v1/agent/sandbox/files/" + quote(str(target_file), safe=""), body=b"x",
                   as_=signer(alpha))
    assert (r.status, r.code) == (403, "sandbox_escape")
    assert not target_file.exists()


async def test_symlinks_out_of_the_sandbox_are_refused(daemon, tmp_path) -> None:
    agent = await fresh(daemon, prefix="linked")
    sb = sandbox_of(agent)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_bytes(b"TOP SECRET")
    os.symlink(secret, sb / "link")
    os.symlink(outside, sb / "dirlink")
    os.symlink("/etc/passwd", sb / "passwd")

    for path in ("link", "dirlink/secret.txt", "passwd"):
        with pytest.raises(CharterError) as info:
            await agent.sandbox_read(path)
        assert info.value.code == "sandbox_escape", path
        r = await http(daemon, "GET", "/v1/agent/sandbox/files/" + path, as_=signer(agent))
        assert (r.status, r.code) == (403, "sandbox_escape"), path
        assert b"TOP SECRET" not in orjson.dumps(r.body)
    for path in ("link", "dirlink/secret.txt", "dirlink/new.txt"):
        with pytest.raises(CharterError) as info:
            await agent.sandbox_write(path, b"overwritten")
        assert info.value.code == "sandbox_escape", path
        r = await http(daemon, "PUT", "/v1/agent/sandbox/files/" + path, body=b"overwritten", as_=signer(agent))
        assert (r.status, r.code) == (403, "sandbox_escape"), path

    assert secret.read_bytes() == b"TOP SECRET"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert os.path.islink(sb / "link") and os.readlink(sb / "link") == str(secret)
    await agent.close()


async def test_writes_past_the_quota_are_refused(daemon) -> None:
    agent = await fresh(daemon, role="tiny", prefix="small")
    listing = await agent.sandbox_list()
    assert listing["quota_bytes"] == 1024
    assert (await agent.sandbox_write("a.bin", b"a" * 600))["used_bytes"] == 600
    r = await http(daemon, "PUT", "/v1/agent/sandbox/files/b.bin", body=b"b" * 600, as_=signer(agent))
    assert (r.status, r.code) == (507, "quota_exceeded")
    assert not (sandbox_of(agent) / "b.bin").exists()
    # Replacing a file counts its new size only, and exactly the quota fits.
    assert (await agent.sandbox_write("a.bin", b"a" * 1024))["used_bytes"] == 1024
    with pytest.raises(CharterError) as info:
        await agent.sandbox_write("c.bin", b"c")
    assert info.value.code == "quota_exceeded"
    listing = await agent.sandbox_list()
    assert listing["used_bytes"] == 1024
    assert [f["path"] for f in listing["files"]] == ["a.bin"]
    await agent.close()


# -- secrets at rest -------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_sandbox_directories_are_private(daemon, alpha) -> None:
    sb = sandbox_of(alpha)
    assert _mode(sb) == 0o700
    await alpha.sandbox_write("deep/er/file.txt", b"x")
    assert _mode(sb / "deep") & 0o077 == 0
    assert _mode(sb / "deep" / "er") & 0o077 == 0
    assert _mode(sb / "deep" / "er" / "file.txt") & 0o077 == 0


async def test_keys_and_credentials_are_mode_0600(daemon, alpha) -> None:
    assert alpha.path is not None
    assert _mode(alpha.path) == 0o600
    assert _mode(daemon.home.root_key_path) == 0o600
    assert _mode(daemon.home.keys_dir) == 0o700
    assert _mode(daemon.home.db_path) == 0o600


async def test_invite_tokens_are_never_stored_or_logged(daemon) -> None:
    used = await invite(daemon, note="the token must not be kept")
    unused = await invite(daemon, "observer")
    name = unique("secretive")
    assert (await enrol_raw(daemon, enrol_request(used, name))).status == 201
    assert (await enrol_raw(daemon, enrol_request(used, unique("again")))).code == "bad_token"
    assert (await enrol_raw(daemon, enrol_request(unused, name, role="worker"))).code == "bad_token"

    home = daemon.home.root
    db_bytes = b"".join(p.read_bytes() for p in sorted(home.glob("charter.db*")))
    # The check can see what is stored: the hash of the token is there...
    assert token_hash(used).encode() in db_bytes
    for token in (used, unused):
        assert token.encode() not in db_bytes
        assert token[4:].encode() not in db_bytes
    assert daemon.home.log_file.exists()
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert used.encode() not in data and unused.encode() not in data, path
    # ...and the bus carries no token either.
    r = await http(daemon, "GET", "/v1/events?" + urlencode({"pattern": ">", "limit": 5000}), as_=root(daemon))
    assert r.status == 200 and r.body["events"]
    raw = orjson.dumps(r.body)
    assert used.encode() not in raw and unused.encode() not in raw


async def test_operator_listings_never_show_tokens(daemon) -> None:
    token = await invite(daemon)
    for target in ("/v1/admin/invites", "/v1/admin/status", "/v1/admin/agents"):
        r = await http(daemon, "GET", target, as_=root(daemon))
        assert r.status == 200
        assert token.encode() not in orjson.dumps(r.body)
        assert b"chi_" not in orjson.dumps(r.body)

