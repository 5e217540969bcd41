"""Merkle trees as RFC 6962 (Certificate Transparency) defines them, with RFC 9162's verifiers.

    leaf hash  = SHA-256(0x00 || data)
    node hash  = SHA-256(0x01 || left || right)
    MTH(D[n])  = H(MTH(D[0:k]), MTH(D[k:n]))  with k the largest power of two smaller than n

A leaf of the archive is the entry's chain hash (32 bytes), so a leaf commits to the entry's raw
bytes, its sequence number and everything before it.

`CompactRange` keeps the roots of the perfect subtrees that make up a tree of n leaves (at most
log2(n) hashes), so the root over everything archived so far grows with each entry and never needs
the old leaves again. `Tree` keeps every level (as one bytes object per level, 32 bytes a node) and
answers roots, inclusion proofs and consistency proofs for any size up to its own in O(log^2 n).
The verifiers need nothing but the proof: they are what `charter archive check-proof` runs offline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

_sha256 = hashlib.sha256
EMPTY_ROOT = _sha256(b"").digest()  # MTH of the empty list (RFC 6962 section 2.1)


class ProofError(ValueError):
    """A proof is malformed or does not verify."""


def leaf_hash(data: bytes) -> bytes:
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _next_level(level: bytes) -> bytes:
    """Hash adjacent pairs of a level; an odd last node is carried up unchanged (RFC 6962's MTH)."""
    n = len(level) // 32
    out = [_sha256(b"\x01" + level[i:i + 64]).digest() for i in range(0, (n - n % 2) * 32, 64)]
    if n % 2:
        out.append(level[-32:])
    return b"".join(out)


def root_of(leaf_hashes: Sequence[bytes] | bytes) -> bytes:
    """MTH over leaf hashes (a sequence of 32-byte hashes, or their concatenation)."""
    level = leaf_hashes if isinstance(leaf_hashes, (bytes, bytearray)) else b"".join(leaf_hashes)
    if len(level) % 32:
        raise ValueError("leaf hashes are 32 bytes each")
    if not level:
        return EMPTY_ROOT
    level = bytes(level)
    while len(level) > 32:
        level = _next_level(level)
    return level


class CompactRange:
    """The right edge of a growing tree: roots of its perfect subtrees, largest first."""

    __slots__ = ("size", "hashes")

    def __init__(self, size: int = 0, hashes: Iterable[bytes] = ()) -> None:
        self.size = size
        self.hashes = list(hashes)
        if len(self.hashes) != bin(size).count("1"):
            raise ValueError(f"a compact range of size {size} holds {bin(size).count('1')} hashes, not {len(self.hashes)}")

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash (already `leaf_hash`ed)."""
        hashes = self.hashes
        hashes.append(leaf)
        n = self.size
        while n & 1:  # each trailing 1 bit of the old size is a perfect subtree that now has a twin
            right = hashes.pop()
            hashes[-1] = _sha256(b"\x01" + hashes[-1] + right).digest()
            n >>= 1
        self.size += 1

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        r = self.hashes[-1]
        for h in reversed(self.hashes[:-1]):
            r = _sha256(b"\x01" + h + r).digest()
        return r

    def copy(self) -> CompactRange:
        return CompactRange(self.size, self.hashes)

    def to_hex(self) -> list[str]:
        return [h.hex() for h in self.hashes]

    @classmethod
    def from_hex(cls, size: int, hashes: Sequence[str]) -> CompactRange:
        return cls(size, [bytes.fromhex(h) for h in hashes])


class Tree:
    """Every level of a tree over a fixed list of leaf hashes; proofs for any size up to it."""

    def __init__(self, leaf_hashes: Sequence[bytes] | bytes) -> None:
        level = leaf_hashes if isinstance(leaf_hashes, (bytes, bytearray)) else b"".join(leaf_hashes)
        if len(level) % 32:
            raise ValueError("leaf hashes are 32 bytes each")
        self.size = len(level) // 32
        self.levels = [bytes(level)]
        while len(self.levels[-1]) > 32:
            # Only complete pairs: a node at level j covers 2**j leaves exactly (no carried nodes).
            cur = self.levels[-1]
            n = len(cur) // 64
            self.levels.append(b"".join(_sha256(b"\x01" + cur[i:i + 64]).digest() for i in range(0, n * 64, 64)))

    def _perfect(self, start: int, height: int) -> bytes:
        i = (start >> height) * 32
        return self.levels[height][i:i + 32]

    def subtree(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]) for a range that starts on a boundary of its own size class, as proofs need."""
        n = hi - lo
        if n <= 0:
            raise ValueError("empty range")
        if n & (n - 1) == 0 and lo % n == 0:
            return self._perfect(lo, n.bit_length() - 1)
        k = _split(n)
        return node_hash(self.subtree(lo, lo + k), self.subtree(lo + k, hi))

    def root(self, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        self._check_size(size)
        return EMPTY_ROOT if size == 0 else self.subtree(0, size)

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ValueError(f"tree size {size} is outside 0..{self.size}")

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 6962 PATH(index, D[size]): the audit path, from the leaf upwards."""
        size = self.size if size is None else size
        self._check_size(size)
        if not 0 <= index < size:
            raise ValueError(f"leaf index {index} is outside a tree of size {size}")
        path: list[bytes] = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                path.append(self.subtree(lo + k, hi))
                hi = lo + k
            else:
                path.append(self.subtree(lo, lo + k))
                lo += k
        path.reverse()
        return path

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        """RFC 6962 PROOF(first, D[second]): that the tree of `second` leaves extends the one of `first`."""
        second = self.size if second is None else second
        self._check_size(second)
        if not 0 <= first <= second:
            raise ValueError(f"first size {first} must be between 0 and {second}")
        if first == 0 or first == second:
            return []
        out: list[bytes] = []
        lo, hi, m, whole = 0, second, first, True
        while True:
            n = hi - lo
            if m == n:
                if not whole:
                    out.append(self.subtree(lo, hi))
                break
            k = _split(n)
            if m <= k:
                out.append(self.subtree(lo + k, hi))
                hi = lo + k
            else:
                out.append(self.subtree(lo, lo + k))
                lo, m, whole = lo + k, m - k, False
        out.reverse()
        return out


# -- verifiers (RFC 9162 sections 2.1.3.2 and 2.1.4.2) ----------------------------------------


def root_from_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes:
    """The root that `path` proves `leaf` (a leaf hash) to be under; raises ProofError if malformed."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if len(p) != 32:
            raise ProofError("a proof hash is 32 bytes")
        if sn == 0:
            raise ProofError("the audit path is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = _sha256(b"\x01" + p + r).digest()
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = _sha256(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the audit path is shorter than the tree is deep")
    return r


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes) -> bool:
    try:
        return root_from_inclusion(leaf, index, size, path) == root
    except ProofError:
        return False


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """True if the tree of `second` leaves with `second_root` extends the one of `first` with `first_root`."""
    if not 0 <= first <= second:
        return False
    if any(len(p) != 32 for p in proof):
        return False
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        return not proof and first_root == EMPTY_ROOT
    path = list(proof)
    if first & (first - 1) == 0:  # a power of two: the old root is itself a node of the new tree
        path.insert(0, first_root)
    if not path:
        return False
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = _sha256(b"\x01" + c + fr).digest()
            sr = _sha256(b"\x01" + c + sr).digest()
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = _sha256(b"\x01" + sr + c).digest()
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root
