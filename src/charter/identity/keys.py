"""Ed25519 keys: generation, storage with mode 0600, signing and verification.

Public keys and signatures travel as unpadded base64url of their raw bytes. A key id is the first
16 bytes of the SHA-256 of the raw public key, so it can be printed without revealing anything.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from charter.encoding import b64d, b64e, sha256
from charter.fsutil import write_private


class SigningKey:
    """A private key that can sign; its raw bytes are never printed or logged."""

    __slots__ = ("_key", "public")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = PublicKey(key.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def seed(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def sign_b64(self, data: bytes) -> str:
        return b64e(self._key.sign(data))

    def save_pem(self, path: Path) -> None:
        """Write the key as PKCS#8 PEM, mode 0600; refuses to overwrite an existing key."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private(path, pem, exclusive=True)

    @classmethod
    def load_pem(cls, path: Path) -> SigningKey:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        return cls(key)

    def __repr__(self) -> str:
        return f"SigningKey(public={self.public.key_id})"


class PublicKey:
    """A verifying key."""

    __slots__ = ("_key", "raw", "b64", "key_id")

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key
        self.raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.b64 = b64e(self.raw)
        self.key_id = b64e(sha256(self.raw)[:16])

    @classmethod
    def from_b64(cls, text: str) -> PublicKey:
        return _public_from_b64(text)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Pickled as its base64 text (a child process verifying the archive gets the pinned root key)."""
        return (_public_from_b64, (self.b64,))

    def verify(self, sig: bytes, data: bytes) -> bool:
        try:
            self._key.verify(sig, data)
            return True
        except InvalidSignature:
            return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.key_id})"


@lru_cache(maxsize=4096)
def _public_from_b64(text: str) -> PublicKey:
    raw = b64d(text)
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return PublicKey(Ed25519PublicKey.from_public_bytes(raw))
