"""Checkpoints: what the archivist signs, and how each one links to the one before.

    {v: 1, type: "charter.checkpoint", origin, number, tree_size, root, head: {seq, hash},
     segments, ts, prev, key_id, sig}

- `origin`: the root key id of the installation, so that checkpoints of another one never pass;
- `number`: 1, 2, 3... without gaps; `prev`: SHA-256 of the canonical JSON of checkpoint number-1
  (all zeros for the first), so a removed or replaced checkpoint breaks the links;
- `tree_size` and `root`: the RFC 6962 root over the first `tree_size` archived entries (every
  archived entry, in order; leaf i is entry i+1's chain hash);
- `head`: the live log's head (seq and chain hash) when the checkpoint was made, which may be past
  the archived entries: a log truncated below it shows;
- `sig`: Ed25519 by the archivist key `key_id` over the canonical JSON of every other field.

Each checkpoint is a file `checkpoints/NNNNNNNN.json` and an event `charter.archive.checkpoints`
(payload: the checkpoint) on the bus, so the log itself remembers every checkpoint.
"""

from __future__ import annotations

import hashlib
from typing import Any

from charter.archive.layout import ArchiveError, Layout, read_json, write_json
from charter.archive.segments import archive_head
from charter.encoding import b64d, canonical
from charter.identity.keys import PublicKey, SigningKey
from charter.identity.registry import now_ms

TYPE = "charter.checkpoint"
SUBJECT = "charter.archive.checkpoints"
ZERO = "0" * 64
FIELDS = {"v", "type", "origin", "number", "tree_size", "root", "head", "segments", "ts", "prev", "key_id", "sig"}


def checkpoint_hash(doc: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(doc)).hexdigest()


def malformed(doc: Any) -> str | None:
    """Why `doc` is not a well-formed checkpoint, or None."""
    if not isinstance(doc, dict) or set(doc) != FIELDS:
        return "not a checkpoint document (fields)"
    if doc["v"] != 1 or doc["type"] != TYPE:
        return "unknown checkpoint version or type"
    for name in ("number", "tree_size", "segments", "ts"):
        if type(doc[name]) is not int or doc[name] < 0:
            return f"checkpoint {name} must be a non-negative integer"
    head = doc["head"]
    if not isinstance(head, dict) or set(head) != {"seq", "hash"} or type(head["seq"]) is not int \
            or not _hex32(head["hash"]):
        return "checkpoint head must be {seq, hash}"
    if not (_hex32(doc["root"]) and _hex32(doc["prev"])):
        return "checkpoint root and prev must be 64 hex characters"
    if doc["number"] < 1:
        return "checkpoint numbers start at 1"
    if head["seq"] < doc["tree_size"]:
        return "checkpoint head is behind its tree size"
    if not all(isinstance(doc[k], str) for k in ("origin", "key_id", "sig")):
        return "checkpoint origin, key_id and sig are strings"
    return None


def _hex32(value: Any) -> bool:
    if not isinstance(value, str) or len(value) != 64:
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


def signature_problem(doc: dict[str, Any], keys: dict[str, PublicKey]) -> str | None:
    key = keys.get(doc["key_id"])
    if key is None:
        return f"signed by key {doc['key_id']}, which no root-signed archivist certificate names"
    try:
        sig = b64d(doc["sig"])
    except ValueError:
        return "signature is not base64url"
    body = {k: v for k, v in doc.items() if k != "sig"}
    if not key.verify(sig, canonical(body)):
        return f"signature does not verify with archivist key {doc['key_id']}"
    return None


def sign(key: SigningKey, body: dict[str, Any]) -> dict[str, Any]:
    body = {**body, "key_id": key.public.key_id}
    return {**body, "sig": key.sign_b64(canonical(body))}


def latest(layout: Layout) -> dict[str, Any] | None:
    files = layout.checkpoint_files()
    if not files:
        return None
    return read_json(files[-1][1])


def load_all(layout: Layout) -> list[tuple[int, Any]]:
    """(number in the file name, the parsed document or None if unreadable), in order."""
    out: list[tuple[int, Any]] = []
    for number, path in layout.checkpoint_files():
        try:
            out.append((number, read_json(path)))
        except (OSError, ValueError):
            out.append((number, None))
    return out


def make(layout: Layout, key: SigningKey, origin: str, head: tuple[int, bytes]) -> dict[str, Any]:
    """Sign and store the next checkpoint over everything archived. The caller holds the lock."""
    size, _last_hash, frontier, segments = archive_head(layout)
    if head[0] < size:
        raise ArchiveError(f"the live log ends at seq {head[0]} but the archive holds {size} entries: "
                           "refusing to sign a checkpoint; run `charter archive verify`")
    prev = latest(layout)
    if prev is not None and (bad := malformed(prev)):
        raise ArchiveError(f"the latest checkpoint is unreadable ({bad}); run `charter archive verify`")
    body = {
        "v": 1, "type": TYPE, "origin": origin,
        "number": prev["number"] + 1 if prev else 1,
        "tree_size": size, "root": frontier.root().hex(),
        "head": {"seq": head[0], "hash": head[1].hex()},
        "segments": segments, "ts": now_ms(),
        "prev": checkpoint_hash(prev) if prev else ZERO,
    }
    doc = sign(key, body)
    layout.create()
    write_json(layout.checkpoint_path(doc["number"]), doc)
    return doc
