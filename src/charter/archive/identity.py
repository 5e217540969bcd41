"""The archivist's identity: its own Ed25519 key, certified by the operator's root key.

The key lives at `CHARTER_HOME/keys/archivist.key` (PKCS#8 PEM, mode 0600) and never leaves the
machine. Its certificate is a small document signed by the root key:

    {v: 1, type: "charter.archivist", key_id, public_key, root_key_id, root_public_key, issued_at, sig}

kept in `archive/identity.json` (every certificate ever issued, newest last, so old checkpoints
still verify after a key change) and announced on the bus as a root-signed
`charter.archive.identity` event. A checkpoint is trusted only if its signer has a certificate that
verifies with the root key the verifier trusts.

Why not an enrolled agent? An agent's charter expires, carries scopes, a policy binding, a budget
and a sandbox, and would sign bus envelopes through the gate: none of which an archivist needs. What
it needs is one long-lived signing key whose authority is traceable to the root key offline, from
files alone (a mirror on a NAS has no registry to ask). A certificate gives exactly that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from charter.archive.layout import Layout, read_json, write_json
from charter.encoding import b64d, canonical
from charter.identity.keys import PublicKey, SigningKey
from charter.identity.registry import now_ms

CERT_TYPE = "charter.archivist"
KEY_FILE = "archivist.key"
_CERT_FIELDS = {"v", "type", "key_id", "public_key", "root_key_id", "root_public_key", "issued_at", "sig"}


def key_path(keys_dir: Path) -> Path:
    return keys_dir / KEY_FILE


def load_or_create_key(path: Path) -> tuple[SigningKey, bool]:
    if path.exists():
        return SigningKey.load_pem(path), False
    key = SigningKey.generate()
    key.save_pem(path)
    return key, True


def issue_certificate(root: SigningKey, archivist: PublicKey, issued_at: int | None = None) -> dict[str, Any]:
    body = {
        "v": 1, "type": CERT_TYPE, "key_id": archivist.key_id, "public_key": archivist.b64,
        "root_key_id": root.public.key_id, "root_public_key": root.public.b64,
        "issued_at": now_ms() if issued_at is None else issued_at,
    }
    return {**body, "sig": root.sign_b64(canonical(body))}


def check_certificate(cert: Any, root: PublicKey) -> tuple[PublicKey | None, str | None]:
    """(the certified key, None) if `cert` is signed by `root`; else (None, why not)."""
    if not isinstance(cert, dict) or set(cert) != _CERT_FIELDS or cert.get("type") != CERT_TYPE:
        return None, "not an archivist certificate"
    try:
        key = PublicKey.from_b64(cert["public_key"])
        sig = b64d(cert["sig"])
    except (ValueError, TypeError):
        return None, "certificate holds a malformed key or signature"
    if key.key_id != cert["key_id"]:
        return None, "certificate key_id does not match its public key"
    body = {k: v for k, v in cert.items() if k != "sig"}
    if not root.verify(sig, canonical(body)):
        return None, f"certificate for archivist key {cert['key_id']} is not signed by root key {root.key_id}"
    return key, None


def load_certificates(layout: Layout) -> list[Any]:
    try:
        doc = read_json(layout.identity_path)
    except FileNotFoundError:
        return []
    except ValueError:
        return [None]  # unreadable: reported by verify as a bad certificate
    certs = doc.get("certificates") if isinstance(doc, dict) else None
    return certs if isinstance(certs, list) else [None]


def declared_root(layout: Layout) -> PublicKey | None:
    """The root key the archive's own certificates name: trust on first use, when nothing is pinned."""
    for cert in load_certificates(layout):
        if isinstance(cert, dict):
            try:
                return PublicKey.from_b64(cert["root_public_key"])
            except (KeyError, ValueError, TypeError):
                continue
    return None


def trusted_keys(layout: Layout, root: PublicKey) -> tuple[dict[str, PublicKey], list[str]]:
    """Archivist keys certified by `root`, by key id; and why any certificate was refused."""
    keys: dict[str, PublicKey] = {}
    problems: list[str] = []
    for i, cert in enumerate(load_certificates(layout)):
        key, why = check_certificate(cert, root)
        if key is None:
            problems.append(f"identity.json certificate {i + 1}: {why}")
        else:
            keys[key.key_id] = key
    return keys, problems


def ensure_identity(layout: Layout, keys_dir: Path, root: SigningKey) -> tuple[SigningKey, dict[str, Any], bool]:
    """The archivist's key and its certificate, creating either if missing. The caller holds the lock.

    Returns (key, certificate, whether a new certificate was issued).
    """
    key, _ = load_or_create_key(key_path(keys_dir))
    certs = load_certificates(layout)
    for cert in certs:
        got, _why = check_certificate(cert, root.public)
        if got is not None and got == key.public:
            return key, cert, False
    cert = issue_certificate(root, key.public)
    layout.create()
    write_json(layout.identity_path, {"v": 1, "certificates": [c for c in certs if c is not None] + [cert]})
    return key, cert, True
