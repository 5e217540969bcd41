"""An agent's life after enrolment, through the real daemon: key rotation, renewal, and the
operator's lifecycle actions, each of which must show up on the bus as a root-signed event.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import itertools
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest

from charter.bus.envelope import from_dict, now_ms, seal
from charter.bus.log.sqlite import verify_file
from charter.encoding import b64d
from charter.errors import CharterError
from charter.identity.certificate import verify_charter
from charter.identity.keys import PublicKey, SigningKey
from charter.identity.request_auth import sign_request
from charter.identity.proofs import rotate_proof_message
from charter.sdk import Agent
from charter.sdk.credentials import Credentials
from charter.server.daemon import stop
from conftest import Daemon, make_home, start_daemon

pytestmark = pytest.mark.anyio

_names = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


@pytest.fixture
def daemon(shared_daemon: Daemon) -> Daemon:
    return shared_daemon


async def post_envelope(d: Daemon, raw: bytes) -> tuple[int, dict[str, Any]]:
    async with d.operator() as op:  # any client will do: publishing needs no Authorization
        async with op.session.post(d.url + "/v1/publish", data=raw) as r:
            return r.status, orjson.loads(await r.read())


async def get_signed(d: Daemon, agent_id: str, key: SigningKey, target: str) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": sign_request(key, agent_id, "GET", target)}
    async with d.operator() as op:
        async with op.session.get(d.url + target, headers=headers) as r:
            return r.status, orjson.loads(await r.read())


def root_public(d: Daemon) -> PublicKey:
    return SigningKey.load_pem(d.home.root_key_path).public


# -- key rotation ----------------------------------------------------------------------------


async def test_key_rotation_retires_the_old_key(daemon) -> None:
    agent = await daemon.enroll(unique("rotor"))
    assert agent.path is not None
    old_key = agent.creds.key
    old_charter = agent.creds.charter
    subject = f"agents.{agent.name}.events"
    signed_before = agent.seal(subject, {"n": "sealed with the old key before rotating"})

    new_charter = await agent.rotate_key()

    new_key = agent.creds.key
    assert new_key.public != old_key.public
    assert new_charter["public_key"] == new_key.public.b64 != old_charter["public_key"]
    assert new_charter["agent_id"] == agent.id and new_charter["serial"] != old_charter["serial"]
    assert verify_charter(root_public(daemon), new_charter)

    # Anything signed with the old key is refused from now on, sealed before or after.
    for env in (signed_before, seal(old_key, sender=agent.id, subject=subject, payload={"n": "after"})):
        status, body = await post_envelope(daemon, env.raw)
        assert (status, body["error"]["code"]) == (401, "bad_signature")
    status, body = await get_signed(daemon, agent.id, old_key, "/v1/agent/charter")
    assert (status, body["error"]["code"]) == (401, "bad_signature")

    # The new key works, for envelopes and for signed calls.
    assert (await agent.publish(subject, {"n": "new key"}))["seq"] > 0
    assert (await agent.charter())["public_key"] == new_key.public.b64

    # The credentials file now holds the new key and charter, and still loads and works.
    saved = Credentials.load(agent.path)
    assert saved.key.public == new_key.public
    assert saved.charter == new_charter
    saved.check()
    reloaded = Agent.load(agent.path)
    assert (await reloaded.publish(subject, {"n": "reloaded"}))["seq"] > 0

    async with daemon.operator() as op:
        shown = await op.call("GET", f"/v1/admin/agents/{agent.id}")
    assert shown["key_id"] == new_key.public.key_id
    await reloaded.close()
    await agent.close()


async def test_rotation_needs_proof_of_the_new_key(daemon) -> None:
    agent = await daemon.enroll(unique("rotor"))
    new, impostor = SigningKey.generate(), SigningKey.generate()
    ts = now_ms()
    proof = impostor.sign_b64(rotate_proof_message(agent.id, new.public.b64, ts))
    with pytest.raises(CharterError) as info:
        await agent.http.call("POST", "/v1/agent/rotate-key",
                              json={"new_public_key": new.public.b64, "ts": ts, "proof": proof})
    assert info.value.code == "bad_signature"
    # The old key still works: nothing was rotated.
    assert (await agent.charter())["public_key"] == agent.creds.key.public.b64
    assert (await agent.publish(f"agents.{agent.name}.x", {}))["seq"] > 0
    await agent.close()


# -- renewal ---------------------------------------------------------------------------------


async def test_renewal_moves_expiry_forward_under_the_root_signature(daemon) -> None:
    agent = await daemon.enroll(unique("renewer"))
    assert agent.path is not None
    old = agent.creds.charter
    await asyncio.sleep(0.02)

    new = await agent.renew()

    assert new["expires_at"] > old["expires_at"]
    assert new["issued_at"] > old["issued_at"]
    assert new["expires_at"] - new["issued_at"] == old["expires_at"] - old["issued_at"]
    assert new["serial"] != old["serial"]
    assert (new["agent_id"], new["name"], new["public_key"], new["role"]) == (
        old["agent_id"], old["name"], old["public_key"], old["role"])
    # The charter verifies offline with the root public key the agent was given at enrolment...
    root = PublicKey.from_b64(agent.creds.root_public_key)
    assert root == root_public(daemon)
    assert verify_charter(root, new)
    # ...and a charter with its expiry stretched by hand does not.
    assert not verify_charter(root, {**new, "expires_at": new["expires_at"] + 86_400_000})
    assert not verify_charter(SigningKey.generate().public, new)
    # The daemon enforces the new one and the credentials file holds it.
    assert await agent.charter() == new
    assert Credentials.load(agent.path).charter == new
    assert (await agent.publish(f"agents.{agent.name}.x", {}))["seq"] > 0
    await agent.close()


# -- lifecycle events ------------------------------------------------------------------------


async def operator_events(d: Daemon, pattern: str = "charter.>") -> list[dict[str, Any]]:
    async with d.operator() as op:
        answer = await op.call("GET", "/v1/events", params={"pattern": pattern, "limit": 5000})
    return answer["events"]


async def test_every_lifecycle_step_is_a_root_signed_event(daemon) -> None:
    async with daemon.operator() as op:
        created = await op.call("POST", "/v1/admin/invites", json={"role": "worker", "note": "lifecycle"})
    token, invite_id = created["token"], created["invite"]["id"]
    name = unique("lifer")
    agent = await Agent.enroll(daemon.url, token, name, daemon.home.root.parent / f"{name}.creds.json")
    old_key_id = agent.creds.key.public.key_id
    async with daemon.operator() as op:
        await op.call("POST", f"/v1/admin/agents/{name}/suspend", json={"reason": "audit"})
        await op.call("POST", f"/v1/admin/agents/{name}/resume")
    await agent.renew()
    await agent.rotate_key()
    new_key_id = agent.creds.key.public.key_id
    async with daemon.operator() as op:
        await op.call("POST", f"/v1/admin/agents/{agent.id}/revoke", json={"reason": "done"})

    events = await operator_events(daemon)
    mine = [e for e in events if e["envelope"]["payload"].get("agent_id") == agent.id
            or e["envelope"]["payload"].get("invite_id") == invite_id]
    assert [e["envelope"]["subject"] for e in mine] == [
        "charter.invites.created", "charter.agents.enrolled", "charter.agents.suspended",
        "charter.agents.resumed", "charter.agents.renewed", "charter.agents.key_rotated",
        "charter.agents.revoked",
    ]
    assert [e["seq"] for e in mine] == sorted(e["seq"] for e in mine)

    root = PublicKey.from_b64(agent.creds.root_public_key)
    for e in mine:
        env = from_dict(e["envelope"])
        assert env.sender == "operator"
        assert root.verify(b64d(env.sig), env.signed), env.subject
        assert token not in orjson.dumps(e).decode()
    payloads = {e["envelope"]["subject"].rsplit(".", 1)[1]: e["envelope"]["payload"] for e in mine}
    assert payloads["created"]["role"] == "worker"
    assert payloads["enrolled"]["name"] == name and payloads["enrolled"]["key_id"] == old_key_id
    assert payloads["suspended"]["reason"] == "audit"
    assert payloads["key_rotated"]["old_key_id"] == old_key_id
    assert payloads["key_rotated"]["new_key_id"] == new_key_id
    assert payloads["revoked"]["reason"] == "done"

    # The verification is not vacuous: change one event and its signature no longer holds.
    forged = from_dict({**mine[-1]["envelope"], "payload": {**mine[-1]["envelope"]["payload"], "reason": "oops"}})
    assert not root.verify(b64d(forged.sig), forged.signed)
    # The token appears nowhere on the bus, and the log's hash chain verifies.
    assert token.encode() not in orjson.dumps(await operator_events(daemon, ">"))
    assert verify_file(daemon.home.db_path).ok
    await agent.close()


async def test_no_agent_can_forge_a_lifecycle_event(daemon) -> None:
    agent = await daemon.enroll(unique("forger"), "coordinator")
    env = agent.seal("charter.agents.revoked", {"agent_id": agent.id})
    status, body = await post_envelope(daemon, env.raw)
    assert (status, body["error"]["code"]) == (403, "out_of_scope")
    disguised = seal(agent.creds.key, sender="operator", subject="charter.agents.revoked", payload={})
    status, body = await post_envelope(daemon, disguised.raw)
    assert (status, body["error"]["code"]) == (401, "bad_signature")
    await agent.close()


# -- streams end when the agent does -----------------------------------------------------------


@pytest.mark.parametrize("action, code", [("revoke", "revoked"), ("suspend", "suspended")])
async def test_an_open_subscription_ends_with_an_error_event(daemon, action, code) -> None:
    agent = await daemon.enroll(unique("listener"))
    subject = f"agents.{agent.name}.inbox"
    seen: list[int] = []
    live = asyncio.Event()

    async def listen() -> None:
        async for ev in agent.subscribe(f"agents.{agent.name}.>"):
            seen.append(ev.seq)
            live.set()

    task = asyncio.create_task(listen())
    # Publish until the stream has delivered something: then it is certainly open.
    for _ in range(50):
        await agent.publish(subject, {"ping": True})
        try:
            await asyncio.wait_for(asyncio.shield(live.wait()), 0.1)
            break
        except TimeoutError:
            continue
    assert seen, "the subscription never delivered"

    async with daemon.operator() as op:
        await op.call("POST", f"/v1/admin/agents/{agent.id}/{action}")
    with pytest.raises(CharterError) as info:
        await asyncio.wait_for(task, 5)
    assert info.value.code == code
    await agent.close()


async def test_the_error_event_is_on_the_wire(daemon) -> None:
    """What a non-SDK client sees: an `event: error` with the code, then the stream closes."""
    agent = await daemon.enroll(unique("wire"))
    target = "/v1/subscribe?" + urlencode({"pattern": f"agents.{agent.name}.>", "heartbeat": "100ms"})
    headers = {"Authorization": sign_request(agent.creds.key, agent.id, "GET", target)}
    async with daemon.operator() as op:
        async with op.session.get(daemon.url + target, headers=headers) as r:
            assert r.status == 200
            assert (await r.content.readline()).startswith(b": charter stream open")
            await op.call("POST", f"/v1/admin/agents/{agent.id}/revoke")
            rest = await asyncio.wait_for(r.content.read(), 5)
    assert b"event: error\n" in rest
    data = rest.split(b"event: error\ndata: ", 1)[1].split(b"\n", 1)[0]
    assert orjson.loads(data)["code"] == "revoked"
    await agent.close()


async def test_operator_renews_an_expired_charter(tmp_path) -> None:
    """An expired agent cannot renew itself; the operator can, and the agent then fetches its charter."""
    home = make_home(tmp_path / "h")
    home.config_path.write_text(home.config_path.read_text() + '\n[roles.brief]\npublish = ["agents.{name}.>"]\n'
                                'subscribe = ["agents.{name}.>"]\ncharter_ttl = "2s"\nmax_tier = "T0"\n')
    daemon = start_daemon(home)
    try:
        agent = await daemon.enroll("mayfly", "brief")
        await asyncio.sleep(2.3)
        with pytest.raises(CharterError) as exc:
            await agent.publish("agents.mayfly.hello", {})
        assert exc.value.code == "expired"
        with pytest.raises(CharterError) as exc:
            await agent.renew()
        assert exc.value.code == "expired"
        proc = subprocess.run([sys.executable, "-m", "charter", "--home", str(home.root), "agents", "renew", "mayfly",
                               "--json"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["agent_id"] == agent.id
        # The operator renewed under the role's 2 s TTL (2, not 1: the CLI's exit and this refresh
        # must fit in it on a busy host): the agent fetches its new charter at once.
        before = agent.creds.charter["expires_at"]
        charter = await agent.refresh()
        assert charter["expires_at"] > before
        answer = await daemon.admin("GET", "/v1/events", params={"pattern": "charter.agents.renewed"})
        assert [e["envelope"]["payload"]["by_operator"] for e in answer["events"]] == [True]
        await agent.close()
    finally:
        stop(home)
