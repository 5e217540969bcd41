"""What an agent signs to prove it holds a key: at enrolment, at a key rotation, when it enrols a
sub-agent. The daemon checks these and the SDK signs them, so they live here, apart from the Node:
an agent importing the SDK must not import the daemon (its policy engine, config, governance)."""

from __future__ import annotations

from charter.encoding import canonical

ENROLL_PURPOSE = "charter.enroll"
ROTATE_PURPOSE = "charter.rotate-key"
SUBAGENT_PURPOSE = "charter.enroll-subagent"


def enroll_proof_message(token_hash_hex: str, name: str, public_key: str, ts: int) -> bytes:
    return canonical({"purpose": ENROLL_PURPOSE, "token_hash": token_hash_hex, "name": name,
                      "public_key": public_key, "ts": ts})


def rotate_proof_message(agent_id: str, new_public_key: str, ts: int) -> bytes:
    return canonical({"purpose": ROTATE_PURPOSE, "agent_id": agent_id, "new_public_key": new_public_key, "ts": ts})


def subagent_proof_message(parent_id: str, name: str, public_key: str, ts: int) -> bytes:
    return canonical({"purpose": SUBAGENT_PURPOSE, "parent_id": parent_id, "name": name,
                      "public_key": public_key, "ts": ts})
