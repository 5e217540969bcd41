"""Inclusion and consistency proofs that anyone can check offline, with nothing but the proof file.

An inclusion proof (`charter archive prove SEQ`):

    {v: 1, type: "charter.inclusion_proof",
     entry: {seq, hash, prev, raw (base64url of the stored bytes), envelope (the same, decoded)},
     leaf_index (seq - 1), tree_size, leaf_hash, audit_path: [hex...],
     checkpoint: {...the signed checkpoint...},
     archivist: {key_id, public_key, certificate (signed by the root key)}}

A consistency proof (`charter archive consistency A B`):

    {v: 1, type: "charter.consistency_proof", first: {checkpoint A}, second: {checkpoint B},
     proof: [hex...], archivist: {...}}

`check_proof` recomputes: the entry's chain hash from its raw bytes, the leaf hash, the root from
the audit path (RFC 9162), the checkpoint's signature with the archivist key, the archivist's
certificate with the root key, and (for an entry the operator signed) the envelope's signature.
What anchors trust is the root key: pin it (`--root-key`), or it is taken from the certificate
itself and the result says that it was not pinned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from charter.archive import checkpoints as cp
from charter.archive import identity
from charter.archive.layout import ArchiveError, Layout, read_json
from charter.archive.merkle import Tree, leaf_hash, root_from_inclusion, ProofError, verify_consistency
from charter.archive.segments import committed, read_records
from charter.bus.envelope import parse
from charter.bus.log.base import entry_hash
from charter.encoding import b64d, b64e, loads
from charter.errors import CharterError
from charter.identity.keys import PublicKey


@dataclass
class ProofCheck:
    ok: bool
    kind: str = ""
    problems: list[str] = field(default_factory=list)
    trust: str = ""
    seq: int | None = None
    tree_size: int | None = None
    checkpoint: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "type": self.kind, "problems": self.problems, "trust": self.trust, "seq": self.seq,
                "tree_size": self.tree_size, "checkpoint": self.checkpoint}


# -- building -----------------------------------------------------------------------------------


def _leaves(layout: Layout, size: int) -> tuple[bytes, dict[int, tuple[int, bytes, bytes, bytes]]]:
    """Leaf hashes of the first `size` archived entries (and a way to look entries up)."""
    leaves = bytearray()
    records: dict[int, Any] = {}
    for meta in committed(layout):
        if meta.first_seq > size:
            break
        for rec in read_records(layout, meta):
            if rec[0] > size:
                break
            leaves += leaf_hash(rec[1])
            records[rec[0]] = rec
    if len(leaves) != 32 * size:
        raise ArchiveError(f"the archive holds {len(leaves) // 32} entries, fewer than the checkpoint's {size}: "
                           "run `charter archive verify`")
    return bytes(leaves), records


def _checkpoint_for(layout: Layout, seq: int | None = None, number: int | None = None) -> dict[str, Any]:
    docs = [d for _, d in cp.load_all(layout) if d is not None and not cp.malformed(d)]
    if number is not None:
        for d in docs:
            if d["number"] == number:
                return d
        raise ArchiveError(f"there is no checkpoint {number}")
    docs = [d for d in docs if seq is None or d["tree_size"] >= seq]
    if not docs:
        raise ArchiveError(f"no checkpoint covers seq {seq} yet: seal it first (`charter archive seal`)")
    return docs[-1]


def _archivist(layout: Layout, key_id: str) -> dict[str, Any]:
    for cert in identity.load_certificates(layout):
        if isinstance(cert, dict) and cert.get("key_id") == key_id:
            return {"key_id": key_id, "public_key": cert.get("public_key"), "certificate": cert}
    raise ArchiveError(f"no certificate for archivist key {key_id} in identity.json")


def inclusion_proof(layout: Layout, seq: int, checkpoint: int | None = None) -> dict[str, Any]:
    doc = _checkpoint_for(layout, seq=seq, number=checkpoint)
    size = doc["tree_size"]
    if not 1 <= seq <= size:
        raise ArchiveError(f"checkpoint {doc['number']} covers seq 1 to {size}, not {seq}")
    leaves, records = _leaves(layout, size)
    tree = Tree(leaves)
    if tree.root().hex() != doc["root"]:
        raise ArchiveError(f"the archive no longer matches checkpoint {doc['number']}: run `charter archive verify`")
    s, h, prev, raw = records[seq]
    try:
        envelope = loads(raw)
    except ValueError:
        envelope = None
    return {
        "v": 1, "type": "charter.inclusion_proof",
        "entry": {"seq": s, "hash": h.hex(), "prev": prev.hex(), "raw": b64e(raw), "envelope": envelope},
        "leaf_index": seq - 1, "tree_size": size, "leaf_hash": leaf_hash(h).hex(),
        "audit_path": [p.hex() for p in tree.inclusion_proof(seq - 1, size)],
        "checkpoint": doc, "archivist": _archivist(layout, doc["key_id"]),
    }


def consistency_proof(layout: Layout, first: int, second: int) -> dict[str, Any]:
    a = _checkpoint_for(layout, number=first)
    b = _checkpoint_for(layout, number=second)
    if a["tree_size"] > b["tree_size"]:
        raise ArchiveError(f"checkpoint {first} covers more entries than checkpoint {second}")
    leaves, _ = _leaves(layout, b["tree_size"])
    tree = Tree(leaves)
    if tree.root().hex() != b["root"] or tree.root(a["tree_size"]).hex() != a["root"]:
        raise ArchiveError("the archive no longer matches these checkpoints: run `charter archive verify`")
    archivists = {d["key_id"]: _archivist(layout, d["key_id"]) for d in (a, b)}
    return {
        "v": 1, "type": "charter.consistency_proof", "first": a, "second": b,
        "proof": [p.hex() for p in tree.consistency_proof(a["tree_size"], b["tree_size"])],
        "archivists": list(archivists.values()),
    }


# -- checking (offline) -------------------------------------------------------------------------


def _hex(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != 64:
        raise ValueError(f"{what} must be 64 hex characters")
    return bytes.fromhex(value)


def _trusted_archivist(info: Any, pinned_root: PublicKey | None, pinned_archivist: PublicKey | None,
                       check: ProofCheck) -> PublicKey | None:
    if not isinstance(info, dict):
        check.problems.append("the proof names no archivist")
        return None
    cert = info.get("certificate")
    try:
        declared = PublicKey.from_b64(cert["root_public_key"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        check.problems.append("the archivist certificate names no valid root key")
        return None
    root = pinned_root or declared
    key, why = identity.check_certificate(cert, root)
    if key is None:
        check.problems.append(why or "bad certificate")
        return None
    if pinned_archivist is not None and key != pinned_archivist:
        check.problems.append(f"the proof's archivist key {key.key_id} is not the pinned {pinned_archivist.key_id}")
        return None
    if info.get("public_key") != key.b64 or info.get("key_id") != key.key_id:
        check.problems.append("the archivist's key differs from its certificate's")
        return None
    if pinned_root is not None:
        check.trust = f"root key {root.key_id} (pinned)"
    elif pinned_archivist is not None:
        check.trust = f"archivist key {key.key_id} (pinned)"
    else:
        check.trust = (f"root key {root.key_id} as the proof itself declares it (not pinned: compare this key id "
                       "with the operator's, or pass --root-key)")
    return key


def _checkpoint_ok(doc: Any, keys: dict[str, PublicKey], check: ProofCheck, what: str = "checkpoint") -> bool:
    if bad := cp.malformed(doc):
        check.problems.append(f"{what}: {bad}")
        return False
    if why := cp.signature_problem(doc, keys):
        check.problems.append(f"{what} {doc['number']}: {why}")
        return False
    return True


def check_proof(proof: Any, *, root: PublicKey | None = None, archivist: PublicKey | None = None) -> ProofCheck:
    """Verify an inclusion or consistency proof offline. Never raises on bad input."""
    kind = proof.get("type") if isinstance(proof, dict) else None
    check = ProofCheck(False, str(kind or "unknown"))
    try:
        if kind == "charter.inclusion_proof":
            _check_inclusion(proof, root, archivist, check)
        elif kind == "charter.consistency_proof":
            _check_consistency(proof, root, archivist, check)
        else:
            check.problems.append("not a Charter proof (type)")
    except (KeyError, TypeError, ValueError, ProofError) as exc:
        check.problems.append(f"malformed proof: {exc}")
    check.ok = not check.problems
    return check


def _check_inclusion(proof: dict[str, Any], root: PublicKey | None, pinned: PublicKey | None, check: ProofCheck) -> None:
    entry = proof["entry"]
    seq = entry["seq"]
    if type(seq) is not int or seq < 1:
        raise ValueError("entry seq must be a positive integer")
    check.seq = seq
    raw = b64d(entry["raw"])
    h, prev = _hex(entry["hash"], "entry hash"), _hex(entry["prev"], "entry prev")
    if entry_hash(prev, seq, raw) != h:
        check.problems.append(f"entry {seq}: its hash does not match its raw bytes")
    try:
        decoded = loads(raw)
    except ValueError:
        decoded = None
    if entry.get("envelope") != decoded:
        check.problems.append("the readable envelope differs from the raw bytes the hash covers")
    if proof["leaf_index"] != seq - 1 or leaf_hash(h).hex() != proof["leaf_hash"]:
        check.problems.append("leaf index or leaf hash does not belong to this entry")
    doc = proof["checkpoint"]
    key = _trusted_archivist(proof.get("archivist"), root, pinned, check)
    if key is None or not _checkpoint_ok(doc, {key.key_id: key}, check):
        return
    check.tree_size, check.checkpoint = doc["tree_size"], doc["number"]
    if proof["tree_size"] != doc["tree_size"]:
        check.problems.append("the proof's tree size is not the checkpoint's")
        return
    path = [_hex(p, "audit path hash") for p in proof["audit_path"]]
    try:
        got = root_from_inclusion(leaf_hash(h), seq - 1, doc["tree_size"], path)
    except ProofError as exc:
        check.problems.append(f"audit path: {exc}")
        return
    if got.hex() != doc["root"]:
        check.problems.append(f"the audit path leads to another root than checkpoint {doc['number']}'s")
    if isinstance(decoded, dict) and decoded.get("sender") == "operator":
        certified_root = root or PublicKey.from_b64(proof["archivist"]["certificate"]["root_public_key"])
        try:
            env = parse(raw, max_bytes=2**31)
            if not certified_root.verify(b64d(env.sig), env.signed):
                check.problems.append("the operator's signature on the envelope does not verify with the root key")
        except CharterError as exc:
            check.problems.append(f"the envelope does not parse: {exc.message}")


def _check_consistency(proof: dict[str, Any], root: PublicKey | None, pinned: PublicKey | None,
                       check: ProofCheck) -> None:
    keys: dict[str, PublicKey] = {}
    for info in proof["archivists"]:
        key = _trusted_archivist(info, root, pinned, check)
        if key is not None:
            keys[key.key_id] = key
    a, b = proof["first"], proof["second"]
    if not (_checkpoint_ok(a, keys, check, "first checkpoint") and _checkpoint_ok(b, keys, check, "second checkpoint")):
        return
    if a["origin"] != b["origin"]:
        check.problems.append("the two checkpoints belong to different installations")
    check.tree_size, check.checkpoint = b["tree_size"], b["number"]
    path = [_hex(p, "proof hash") for p in proof["proof"]]
    if not verify_consistency(a["tree_size"], b["tree_size"], bytes.fromhex(a["root"]), bytes.fromhex(b["root"]), path):
        check.problems.append(f"checkpoint {b['number']}'s tree does not extend checkpoint {a['number']}'s")


def load_proof(path: Any) -> Any:
    return read_json(path)
