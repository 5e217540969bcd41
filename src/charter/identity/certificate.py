"""Charters: an agent's certificate, signed by the operator's root key.

A charter binds an agent id and name to a public key, a role, a scoped view, a policy binding
(id, version, content hash), a budget, a sandbox and a validity window. Anyone holding the root
public key can check one offline.
"""

from __future__ import annotations

from typing import Any

from charter.encoding import b64d, canonical
from charter.identity.keys import PublicKey, SigningKey

CHARTER_TYPE = "charter"


def sign_charter(root: SigningKey, body: dict[str, Any]) -> dict[str, Any]:
    """Return `body` with `issuer` and `sig` added; `body` must not already carry them."""
    doc = {**body, "v": 1, "type": CHARTER_TYPE, "issuer": root.public.key_id}
    doc.pop("sig", None)
    doc["sig"] = root.sign_b64(canonical(doc))
    return doc


def verify_charter(root_public: PublicKey, doc: dict[str, Any]) -> bool:
    """True if `doc` is a charter signed by `root_public`. Checks the signature, not the expiry."""
    if not isinstance(doc, dict) or doc.get("type") != CHARTER_TYPE:
        return False
    sig = doc.get("sig")
    if not isinstance(sig, str):
        return False
    try:
        raw_sig = b64d(sig)
    except ValueError:
        return False
    body = {k: v for k, v in doc.items() if k != "sig"}
    return root_public.verify(raw_sig, canonical(body))
