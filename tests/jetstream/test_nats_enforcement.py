"""NATS-native enforcement: Charter is the NATS operator, and the NATS server itself refuses what an
agent's charter does not allow. The test runs its own nats-server in operator mode (JWTs written by
`charter nats setup`, no `nsc`) and a real daemon whose log is on that server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from charter.bus.nats_auth import (
    NatsAuthority,
    Revocations,
    agent_permissions,
    decode_jwt,
    user_public_key,
    user_seed,
)
from charter.errors import OUT_OF_SCOPE, CharterError
from charter.identity.keys import SigningKey
from charter.sdk.nats import NatsAgent
from charter.server.daemon import stop
from conftest import Daemon, aclose, make_home, start_daemon

from .support import NatsServer, free_port

pytestmark = pytest.mark.anyio


def charter_cli(home: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "charter", "--home", str(home), *args, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def operator_mode(tmp_path: Path) -> Iterator[tuple[Daemon, NatsServer]]:
    home = make_home(tmp_path / "home")
    port = free_port()
    setup = charter_cli(home.root, "nats", "setup", "--listen", f"127.0.0.1:{port}")
    server = NatsServer(tmp_path / "nats", port=port,
                        whole_config=Path(setup["files"]["server.conf"]).read_text()).start()
    text = home.config_path.read_text()
    home.config_path.write_text(text.replace("[bus]\n", (
        f'[bus]\nbackend = "nats"\nnats_url = "{server.url}"\nnats_creds = "nats/charter.creds"\n'
        "nats_agents = true\n"), 1))
    d = start_daemon(home)
    yield d, server
    stop(home)
    server.stop()


async def test_the_nats_server_enforces_each_agents_charter(operator_mode, tmp_path: Path) -> None:
    import nats

    d, server = operator_mode
    alpha = await d.enroll("alpha", "worker")  # publish agents.alpha.>, tasks.results.>
    owl = await d.enroll("owl", "observer")  # subscribe agents.>, tasks.>, charter.>
    a = o = raw = None
    try:
        a = await NatsAgent.connect(alpha)
        o = await NatsAgent.connect(owl)
        seen: list = []

        async def on_event(msg) -> None:
            seen.append(msg)

        await o.subscribe("agents.>", cb=on_event)

        # In scope: the server lets it through, Charter verifies it and appends it to the log.
        receipt = await a.publish("agents.alpha.status", {"state": "ready"})
        assert receipt["seq"] > 0
        [event] = [e for e in await owl.recent("agents.alpha.>") if e.seq == receipt["seq"]]
        assert event.sender == alpha.id
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.02)
        assert seen and seen[0].subject == "ev.agents.alpha.status"
        assert seen[0].headers["Charter-Seq"] == str(receipt["seq"])

        # Out of scope: the NATS server itself refuses the publish; Charter never sees it.
        head = (await d.admin("GET", "/v1/admin/status"))["log"]["head_seq"]
        with pytest.raises(CharterError) as info:
            await a.publish("agents.owl.status", {"state": "forged"})
        assert info.value.code == OUT_OF_SCOPE and "NATS server refused" in info.value.message
        assert any('permissions violation for publish to "in.agents.owl.status"' in e for e in a.errors)
        assert not [e for e in await owl.recent("agents.owl.>") if e.sender == alpha.id]

        # Subscriptions too: a worker may not listen to another agent's subjects.
        with pytest.raises(CharterError) as info:
            await a.subscribe("agents.owl.>")
        assert info.value.code == OUT_OF_SCOPE

        # Any NATS client with the .creds file gets the same treatment (here plain nats-py), and
        # the JetStream API is out of reach: the log cannot be deleted by an agent.
        creds_doc = charter_cli(d.home.root, "agents", "nats-creds", "--creds",
                                str(d.home.root.parent / "alpha.creds.json"))
        creds_path = Path(creds_doc["creds"])
        assert creds_path.stat().st_mode & 0o777 == 0o600
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        raw = await nats.connect(server.url, user_credentials=str(creds_path), error_cb=on_error,
                                 inbox_prefix=creds_doc["inbox_prefix"], max_reconnect_attempts=0)
        await raw.publish("in.tasks.secret", b"{}")
        await raw.publish("$JS.API.STREAM.DELETE.CHARTER", b"")
        await raw.publish("_charter.CHARTER.log", b"forged")
        await raw.flush()
        for subject in ("in.tasks.secret", "$JS.API.STREAM.DELETE.CHARTER", "_charter.CHARTER.log"):
            said = f'permissions violation for publish to "{subject}"'.lower()  # nats-py lower-cases it
            for _ in range(100):  # the refusal can come a little after the PONG
                if any(said in e.lower() for e in errors):
                    break
                await asyncio.sleep(0.01)
            assert any(said in e.lower() for e in errors), (subject, errors)
        assert not [e for e in await owl.recent("tasks.>") if e.sender == alpha.id]
        assert (await d.admin("GET", "/v1/admin/status"))["log"]["head_seq"] >= head  # the stream is still there

        # Inside its NATS permissions but lying about the subject: Charter refuses the envelope.
        env = alpha.seal("agents.alpha.a", {"n": 1})
        with pytest.raises(CharterError) as info:
            await a.publish_envelope(env, subject="agents.alpha.b")
        assert info.value.code == OUT_OF_SCOPE and "envelope's subject" in info.value.message
        # A forged signature inside its NATS permissions: Charter's own check refuses it.
        forged = alpha.seal("agents.alpha.c", {"n": 2})
        forged = type(forged)(**{**{f: getattr(forged, f) for f in forged.__slots__}, "raw": forged.raw.replace(
            b'"n":2', b'"n":3')})
        with pytest.raises(CharterError) as info:
            await a.publish_envelope(forged)
        assert info.value.code == "bad_signature"

        # Revoked: the account JWT with the revocation reaches the server, which drops the live
        # connections at once and refuses new ones.
        t0 = time.monotonic()
        await d.admin("POST", f"/v1/admin/agents/{alpha.id}/revoke", json={"reason": "test"})
        await asyncio.wait_for(a.disconnected.wait(), 2.0)
        dropped_after = time.monotonic() - t0
        assert dropped_after < 1.0, dropped_after
        for _ in range(100):
            if raw.is_closed:
                break
            await asyncio.sleep(0.02)
        assert raw.is_closed
        with pytest.raises(Exception) as refused:
            await nats.connect(server.url, user_credentials=str(creds_path), max_reconnect_attempts=0,
                               connect_timeout=2, allow_reconnect=False)
        assert "authorization" in repr(refused.value).lower() or "NoServers" in repr(refused.value)
        # Its daemon credentials are refused too, and it gets no fresh NATS credentials.
        with pytest.raises(CharterError):
            await NatsAgent.connect(alpha)

        # The observer is unaffected.
        assert (await o.publish("agents.owl.note", {"still": "here"}))["seq"] > receipt["seq"]
    finally:
        for c in (a, o):
            if c is not None:
                await c.close()
        if raw is not None and not raw.is_closed:
            await raw.close()
        await aclose(alpha, owl)


def test_jwts_keys_and_revocations(tmp_path: Path) -> None:
    auth = NatsAuthority.create(tmp_path / "nats")
    assert (tmp_path / "nats").stat().st_mode & 0o777 == 0o700
    assert all((tmp_path / "nats" / n).stat().st_mode & 0o777 == 0o600 for n in ("operator.nk", "account.nk"))
    again = NatsAuthority.create(tmp_path / "nats")  # kept, not replaced
    assert again.operator == auth.operator and again.account == auth.account

    key = SigningKey.generate()
    import nkeys

    # The agent's Charter key is its NATS key: its seed signs, its public key is the JWT's subject.
    assert nkeys.from_seed(bytearray(user_seed(key.seed()).encode())).public_key.decode() == user_public_key(key.public.raw)
    scopes = {"publish": ["agents.alpha.>", "tasks.results.>"], "subscribe": ["tasks.>"]}
    issued = auth.agent_jwt("agt_X", "alpha", key.public.raw, scopes, expires_at_ms=2_000_000_000_000)
    claims = decode_jwt(issued.jwt)
    assert claims["sub"] == issued.user == user_public_key(key.public.raw)
    assert claims["iss"] == auth.account and claims["exp"] == 2_000_000_000
    assert claims["nats"]["pub"] == {"allow": ["in.agents.alpha.>", "in.tasks.results.>"]}
    assert claims["nats"]["sub"] == {"allow": ["ev.tasks.>", "_INBOX.agt_X.>"]}
    assert agent_permissions(scopes, "agt_X") == {k: claims["nats"][k] for k in ("pub", "sub")}

    acc1 = decode_jwt(auth.account_jwt())
    acc2 = decode_jwt(auth.account_jwt({issued.user: 5}))
    assert acc2["iat"] > acc1["iat"]  # the server only takes a newer account JWT
    assert acc2["nats"]["revocations"] == {issued.user: 5}
    assert acc2["nats"]["limits"]["disk_storage"] == -1 and "memory_storage" not in acc2["nats"]["limits"]

    # Revocations come from the log's lifecycle events, so every daemon computes the same set.
    revs = Revocations()
    a, b, c, old, new = (SigningKey.generate() for _ in range(5))

    def learn(subject: str, agent: str, key: SigningKey | None = None, *, ts: int, sender: str = "operator") -> bool:
        payload = {"agent_id": agent, **({"public_key": key.public.b64} if key else {})}
        return revs.learn(sender, f"charter.agents.{subject}", payload, ts)

    assert learn("enrolled", "agt_A", a, ts=1_000)
    assert learn("enrolled", "agt_S", b, ts=2_000)
    assert learn("enrolled", "agt_V", c, ts=3_000)
    assert learn("enrolled", "agt_R", old, ts=4_000)
    assert revs.current() == {}
    assert learn("suspended", "agt_S", ts=10_500) and learn("revoked", "agt_V", ts=11_000)
    assert learn("key_rotated", "agt_R", new, ts=12_000)
    assert not learn("revoked", "agt_A", ts=13_000, sender="agt_A")  # only the root key's events count
    assert not revs.learn("operator", "charter.agents.renewed", {"agent_id": "agt_A"}, 14_000)
    u = user_public_key
    assert revs.current() == {u(b.public.raw): 11, u(c.public.raw): 12, u(old.public.raw): 13}
    assert learn("resumed", "agt_S", ts=15_000)
    assert revs.current() == {u(c.public.raw): 12, u(old.public.raw): 13}
