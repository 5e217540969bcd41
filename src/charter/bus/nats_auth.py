"""Charter as the NATS operator: nkeys, JWTs, each agent's NATS permissions, revocation at the server.

NATS in operator mode trusts one operator key. Charter holds it (with the accounts' keys) under
`CHARTER_HOME/nats/`, writes the operator, account and user JWTs itself (no `nsc`), and gives every
enrolled agent a user JWT whose permissions are its charter's scopes:

    publish   in.<pattern>    for each publish pattern      (the agent sends signed envelopes here)
    subscribe ev.<pattern>    for each subscribe pattern    (Charter delivers accepted envelopes here)
              _INBOX.<agent id>.>                           (the answers to its own requests)

so the NATS server refuses out-of-scope traffic at the wire, before Charter sees it, while Charter
still verifies every envelope (signature, replay, scope, policy) before it reaches the log. The
user's NATS key IS the agent's Ed25519 key in nkey encoding: the agent signs the server's nonce
with the key it already holds, and its private key never leaves it.

Revoking (or suspending) an agent re-signs the account JWT with the agent's keys under
`revocations` (learnt from the log's lifecycle events, so every daemon of an installation computes
the same set) and pushes it to the servers (`$SYS.REQ.CLAIMS.UPDATE`, the `full` resolver); the
servers close that user's live connections and refuse new ones. A user JWT also expires with the
charter it was issued from.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from charter.errors import CharterError
from charter.fsutil import write_private

PUBLISH_PREFIX = "in"  # agents publish envelopes on in.<envelope subject>
DELIVER_PREFIX = "ev"  # Charter publishes accepted envelopes on ev.<envelope subject>
INGEST_QUEUE = "charter-ingest"
CLAIMS_UPDATE = "$SYS.REQ.CLAIMS.UPDATE"
CLAIMS_LOOKUP = "$SYS.REQ.ACCOUNT.{}.CLAIMS.LOOKUP"

_KEYS = {  # file in CHARTER_HOME/nats -> nkey role
    "operator.nk": nkeys.PREFIX_BYTE_OPERATOR,
    "system-account.nk": nkeys.PREFIX_BYTE_ACCOUNT,
    "account.nk": nkeys.PREFIX_BYTE_ACCOUNT,
    "charter-user.nk": nkeys.PREFIX_BYTE_USER,
    "system-user.nk": nkeys.PREFIX_BYTE_USER,
}
UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
             "conn": -1, "leaf": -1}
JETSTREAM_UNLIMITED = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def inbox_prefix(agent_id: str) -> str:
    return f"_INBOX.{agent_id}"


def user_public_key(raw_ed25519_public: bytes) -> str:
    """The nkey (U...) of an Ed25519 public key: the agent's Charter key is its NATS identity."""
    src = bytearray([nkeys.PREFIX_BYTE_USER]) + bytearray(raw_ed25519_public)
    src += nkeys.crc16(src).to_bytes(2, "little")
    return base64.b32encode(bytes(src)).decode().rstrip("=")


def user_seed(raw_ed25519_seed: bytes) -> str:
    """The nkey seed (SU...) of an Ed25519 private key: what the agent's NATS client signs with."""
    return nkeys.encode_seed(raw_ed25519_seed, nkeys.PREFIX_BYTE_USER).decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_jwt(claims: dict[str, Any], signer: nkeys.KeyPair) -> str:
    """A NATS JWT: header, claims with `jti` (base32 SHA-512/256 of the claims), Ed25519 by `signer`."""
    body = {**claims, "jti": ""}
    digest = hashlib.new("sha512_256", json.dumps(body, separators=(",", ":"), sort_keys=True).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}, separators=(",", ":")).encode())
    payload = _b64(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
    sig = signer.sign(f"{head}.{payload}".encode())
    return f"{head}.{payload}.{_b64(sig)}"


def decode_jwt(token: str) -> dict[str, Any]:
    """The claims of a JWT (not verified: the NATS server verifies; this is for display and tests)."""
    try:
        return json.loads(_b64d(token.split(".")[1]))
    except (IndexError, ValueError) as exc:
        raise CharterError("bad_request", f"not a NATS JWT: {exc}", "jwt") from None


def creds_text(jwt: str, seed: str) -> str:
    """The `.creds` format that NATS clients read (nats-py `user_credentials`, `nats --creds`)."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def agent_permissions(scopes: dict[str, Sequence[str]], agent_id: str) -> dict[str, Any]:
    """The NATS permissions that equal a charter's scoped view."""
    return {
        "pub": {"allow": [f"{PUBLISH_PREFIX}.{p}" for p in scopes.get("publish", [])]},
        "sub": {"allow": [f"{DELIVER_PREFIX}.{p}" for p in scopes.get("subscribe", [])]
                + [f"{inbox_prefix(agent_id)}.>"]},
    }


@dataclass(frozen=True)
class Issued:
    jwt: str
    user: str  # the user's public nkey
    expires_at: int  # ms


class NatsAuthority:
    """The operator's keys and every JWT Charter writes. Lives in `CHARTER_HOME/nats/` (mode 0700)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        missing = [name for name in _KEYS if not (directory / name).exists()]
        if missing:
            raise CharterError("not_initialised", f"{directory} has no NATS operator keys ({', '.join(missing)}); "
                               "run `charter nats setup`", str(directory))
        self._kp = {name: nkeys.from_seed(bytearray((directory / name).read_bytes().strip())) for name in _KEYS}

    @classmethod
    def create(cls, directory: Path) -> NatsAuthority:
        """Make the keys that do not exist yet (existing ones are kept: their JWTs stay valid)."""
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        for name, prefix in _KEYS.items():
            path = directory / name
            if not path.exists():
                write_private(path, nkeys.encode_seed(os.urandom(32), prefix) + b"\n")
        return cls(directory)

    def _pub(self, name: str) -> str:
        return self._kp[name].public_key.decode()

    operator = property(lambda self: self._pub("operator.nk"))
    system_account = property(lambda self: self._pub("system-account.nk"))
    account = property(lambda self: self._pub("account.nk"))

    def _iat(self, floor: int = 0) -> int:
        """Seconds, strictly later than any account JWT issued here before and than `floor` (the one the
        servers hold, which another daemon may have pushed): the servers keep only a newer one."""
        path = self.dir / "account.iat"
        try:
            last = int(path.read_text())
        except (OSError, ValueError):
            last = 0
        iat = max(int(time.time()), last + 1, floor + 1)
        write_private(path, str(iat).encode())
        return iat

    def operator_jwt(self) -> str:
        return encode_jwt({"iat": int(time.time()), "iss": self.operator, "sub": self.operator, "name": "charter",
                           "nats": {"type": "operator", "version": 2, "system_account": self.system_account}},
                          self._kp["operator.nk"])

    def system_account_jwt(self) -> str:
        return encode_jwt({"iat": int(time.time()), "iss": self.operator, "sub": self.system_account, "name": "SYS",
                           "nats": {"type": "account", "version": 2, "limits": UNLIMITED}},
                          self._kp["operator.nk"])

    def account_jwt(self, revocations: dict[str, int] | None = None, *, after_iat: int = 0) -> str:
        """The account every agent and Charter itself live in, with JetStream and the revoked users."""
        nats: dict[str, Any] = {"type": "account", "version": 2, "limits": {**UNLIMITED, **JETSTREAM_UNLIMITED},
                                "default_permissions": {"pub": {}, "sub": {}}}
        if revocations:
            nats["revocations"] = dict(sorted(revocations.items()))
        return encode_jwt({"iat": self._iat(after_iat), "iss": self.operator, "sub": self.account, "name": "CHARTER",
                           "nats": nats}, self._kp["operator.nk"])

    def _user_jwt(self, user: str, name: str, permissions: dict[str, Any], account_key: str,
                  expires_at_ms: int | None = None) -> str:
        claims: dict[str, Any] = {"iat": int(time.time()), "iss": self._pub(account_key), "sub": user, "name": name,
                                  "nats": {"type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1,
                                           **permissions}}
        if expires_at_ms is not None:
            claims["exp"] = expires_at_ms // 1000
        return encode_jwt(claims, self._kp[account_key])

    def agent_jwt(self, agent_id: str, name: str, public_key_raw: bytes, scopes: dict[str, Sequence[str]],
                  expires_at_ms: int) -> Issued:
        """A user JWT for an agent: its key, its scopes as NATS permissions, its charter's expiry."""
        user = user_public_key(public_key_raw)
        jwt = self._user_jwt(user, name, agent_permissions(scopes, agent_id), "account.nk", expires_at_ms)
        return Issued(jwt, user, expires_at_ms)

    def service_creds(self) -> str:
        """Credentials for Charter's own connections (the log, the ingest): everything in the account."""
        kp = self._kp["charter-user.nk"]
        return creds_text(self._user_jwt(kp.public_key.decode(), "charter", {}, "account.nk"), kp.seed.decode())

    def system_creds(self) -> str:
        """Credentials in the system account: only used to push account updates."""
        kp = self._kp["system-user.nk"]
        return creds_text(self._user_jwt(kp.public_key.decode(), "charter-system", {}, "system-account.nk"),
                          kp.seed.decode())

    def server_config(self, *, listen: str = "127.0.0.1:4222", store_dir: str | Path = "/var/lib/nats/jetstream",
                      resolver_dir: str | Path = "/var/lib/nats/resolver", extra: str = "") -> str:
        """A nats-server configuration in operator mode that trusts this operator (edit listen/cluster)."""
        return (
            "# nats-server in operator mode, written by `charter nats setup`. Charter pushes account updates\n"
            "# (revocations) to the full resolver; resolver_preload only seeds a new resolver directory.\n"
            f'listen: "{listen}"\n'
            f'jetstream {{ store_dir: "{store_dir}" }}\n'
            f'operator: "{self.operator_jwt()}"\n'
            f'system_account: "{self.system_account}"\n'
            f'resolver {{ type: full, dir: "{resolver_dir}", allow_delete: false, interval: "2m" }}\n'
            "resolver_preload {\n"
            f'  {self.system_account}: "{self.system_account_jwt()}"\n'
            f'  {self.account}: "{self.account_jwt()}"\n'
            "}\n"
            f"{extra}"
        )

    def write_files(self, **server: Any) -> dict[str, Path]:
        """server.conf, charter.creds and system.creds in the directory (0600)."""
        files = {
            "server.conf": self.server_config(**server),
            "charter.creds": self.service_creds(),
            "system.creds": self.system_creds(),
        }
        out = {}
        for name, text in files.items():
            write_private(self.dir / name, text.encode())
            out[name] = self.dir / name
        return out


class Revocations:
    """Which NATS users to refuse, learnt from the log's lifecycle events (signed by the root key).

    The log is shared by every daemon of an installation, so every daemon computes the same set:
    all user keys of an agent that is revoked or suspended, and every key an agent rotated away
    from. Each is revoked as of the event's second (JWTs issued up to then stop working; no JWT is
    issued to an agent that is not live, nor for a key it no longer holds).
    """

    def __init__(self) -> None:
        self.keys: dict[str, list[tuple[str, int]]] = {}  # agent -> [(user key, since s)], current last
        self.down: dict[str, int] = {}  # agent -> second it was revoked or suspended

    def learn(self, sender: str, subject: str, payload: Any, ts_ms: int) -> bool:
        """Take one log entry into account; True if the set of revocations may have changed."""
        if sender != "operator" or not subject.startswith("charter.agents.") or not isinstance(payload, dict):
            return False
        agent, sec = payload.get("agent_id"), ts_ms // 1000 + 1
        if not isinstance(agent, str):
            return False
        what = subject.rsplit(".", 1)[1]
        if what in ("enrolled", "key_rotated"):
            try:
                raw = base64.urlsafe_b64decode(payload["public_key"] + "=" * (-len(payload["public_key"]) % 4))
            except (KeyError, TypeError, ValueError):
                return False
            self.keys.setdefault(agent, []).append((user_public_key(raw), sec))
        elif what in ("revoked", "suspended"):
            self.down[agent] = sec
        elif what == "resumed":
            self.down.pop(agent, None)
        else:
            return False
        return True

    def current(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for agent, keys in self.keys.items():
            for (user, _), (_, replaced_at) in zip(keys, keys[1:]):  # keys rotated away from
                out[user] = replaced_at
            if agent in self.down:
                for user, _ in keys:
                    out[user] = max(out.get(user, 0), self.down[agent])
        return out


async def server_account_iat(nc: Any, account: str, timeout: float = 2.0) -> int:
    """The `iat` of the account JWT the servers hold now (0 if they cannot say)."""
    try:
        msg = await nc.request(CLAIMS_LOOKUP.format(account), b"", timeout=timeout)
        return int(decode_jwt(msg.data.decode()).get("iat", 0))
    except Exception:  # noqa: BLE001 - no answer, or not a JWT: fall back to the local counter
        return 0


async def push_account(nc: Any, jwt: str, timeout: float = 2.0) -> dict[str, Any]:
    """Send an account JWT to the servers' resolver over a system-account connection."""
    msg = await nc.request(CLAIMS_UPDATE, jwt.encode(), timeout=timeout)
    answer = json.loads(msg.data or b"{}")
    if "error" in answer:
        raise CharterError("nats_refused", f"the NATS server refused the account update: {answer['error']}", "nats")
    return answer
