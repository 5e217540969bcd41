"""The operator's client: signs each call with the root key from CHARTER_HOME."""

from __future__ import annotations

from typing import Any

from charter.config import Home
from charter.errors import CharterError
from charter.identity.keys import SigningKey
from charter.identity.registry import OPERATOR_ID
from charter.sdk.http import SignedClient
from charter.server.daemon_file import read_daemon_file


def daemon_url(home: Home) -> str:
    info = read_daemon_file(home)
    if info:
        return str(info["url"])
    return home.url()


class OperatorClient(SignedClient):
    def __init__(self, home: Home) -> None:
        if not home.exists():
            raise CharterError("not_initialised", f"{home.root} is not a Charter home; run `charter init`", str(home.root))
        super().__init__(daemon_url(home), OPERATOR_ID, SigningKey.load_pem(home.root_key_path))

    async def __aenter__(self) -> OperatorClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
