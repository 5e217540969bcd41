"""An agent's credentials file: its private key, its charter, and where its daemon is. Mode 0600.

The file is written where the agent runs; the private key in it never leaves that machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charter.encoding import b64d, b64e
from charter.errors import CharterError
from charter.fsutil import write_private
from charter.identity.certificate import verify_charter
from charter.identity.keys import PublicKey, SigningKey

FORMAT = "charter-credentials/1"


@dataclass
class Credentials:
    agent_id: str
    name: str
    server: str
    key: SigningKey
    charter: dict[str, Any]
    root_public_key: str
    api_key: str | None = None  # bearer key for unmodified OpenAI/Ollama clients

    def check(self) -> None:
        """The charter must be signed by the root key and name this key; refuse otherwise."""
        root = PublicKey.from_b64(self.root_public_key)
        if not verify_charter(root, self.charter):
            raise CharterError("bad_signature", "the charter in these credentials is not signed by the root key", "charter")
        if self.charter.get("public_key") != self.key.public.b64:
            raise CharterError("bad_signature", "the charter names a different key than the one held", "charter")

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "agent_id": self.agent_id,
            "name": self.name,
            "server": self.server,
            "private_key": b64e(self.key.seed()),
            "root_public_key": self.root_public_key,
            "api_key": self.api_key,
            "charter": self.charter,
        }
        return json.dumps(doc, indent=2).encode() + b"\n"

    def save(self, path: Path) -> None:
        write_private(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Credentials:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise CharterError("not_found", f"no credentials file at {path}", str(path)) from None
        if os.stat(path).st_mode & 0o077:
            raise CharterError(
                "unauthorized", f"{path} is readable by others; run `chmod 600 {path}`", str(path)
            )
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
            creds = cls(
                agent_id=doc["agent_id"], name=doc["name"], server=doc["server"],
                key=SigningKey.from_seed(b64d(doc["private_key"])), charter=doc["charter"],
                root_public_key=doc["root_public_key"], api_key=doc.get("api_key"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CharterError("malformed", f"credentials file is damaged: {exc}", str(path)) from None
        return creds
