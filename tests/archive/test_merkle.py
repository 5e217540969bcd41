"""RFC 6962 trees, property-tested against a naive reference written straight from the RFC's text."""

from __future__ import annotations

import hashlib

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from charter.archive.merkle import (
    EMPTY_ROOT,
    CompactRange,
    ProofError,
    Tree,
    leaf_hash,
    node_hash,
    root_from_inclusion,
    root_of,
    verify_consistency,
    verify_inclusion,
)

# -- the reference: RFC 6962 section 2.1, recursion on lists, no cleverness ----------------------


def H(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def k_of(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: list[bytes]) -> bytes:
    if not d:
        return H(b"")
    if len(d) == 1:
        return H(b"\x00" + d[0])
    k = k_of(len(d))
    return H(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:]))


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) <= 1:
        return []
    k = k_of(len(d))
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = k_of(n)
    if m <= k:
        return ref_subproof(m, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(m - k, d[k:], False) + [ref_mth(d[:k])]


def ref_proof(m: int, d: list[bytes]) -> list[bytes]:
    return ref_subproof(m, d, True) if 0 < m < len(d) else []


data_lists = st.lists(st.binary(min_size=0, max_size=8), min_size=0, max_size=70)
nonempty = st.lists(st.binary(min_size=0, max_size=8), min_size=1, max_size=70)


def leaves_of(d: list[bytes]) -> list[bytes]:
    return [leaf_hash(x) for x in d]


# -- roots --------------------------------------------------------------------------------------------


def test_hashing_is_domain_separated() -> None:
    assert leaf_hash(b"x") == H(b"\x00x")
    assert node_hash(b"a" * 32, b"b" * 32) == H(b"\x01" + b"a" * 32 + b"b" * 32)
    assert EMPTY_ROOT == H(b"")
    # A leaf can never pass for an inner node: the prefixes differ.
    assert leaf_hash(b"a" * 32 + b"b" * 32) != node_hash(b"a" * 32, b"b" * 32)


@given(data_lists)
def test_every_way_to_a_root_agrees_with_the_reference(d: list[bytes]) -> None:
    leaves = leaves_of(d)
    expected = ref_mth(d)
    assert root_of(leaves) == expected
    assert root_of(b"".join(leaves)) == expected
    assert Tree(leaves).root() == expected
    growing = CompactRange()
    for i, leaf in enumerate(leaves):
        growing.append(leaf)
        assert growing.root() == ref_mth(d[:i + 1])
    assert growing.root() == expected
    again = CompactRange.from_hex(growing.size, growing.to_hex())
    assert again.root() == expected


@given(nonempty, st.data())
def test_tree_roots_of_every_prefix(d: list[bytes], data: st.DataObject) -> None:
    tree = Tree(leaves_of(d))
    size = data.draw(st.integers(0, len(d)))
    assert tree.root(size) == ref_mth(d[:size])


# -- inclusion ---------------------------------------------------------------------------------------


@given(nonempty, st.data())
def test_inclusion_proofs_match_the_reference_and_verify(d: list[bytes], data: st.DataObject) -> None:
    tree = Tree(leaves_of(d))
    size = data.draw(st.integers(1, len(d)))
    m = data.draw(st.integers(0, size - 1))
    path = tree.inclusion_proof(m, size)
    assert path == ref_path(m, d[:size])
    root = ref_mth(d[:size])
    assert verify_inclusion(leaf_hash(d[m]), m, size, path, root)
    assert root_from_inclusion(leaf_hash(d[m]), m, size, path) == root


@given(nonempty, st.data())
def test_inclusion_proofs_fail_when_anything_changes(d: list[bytes], data: st.DataObject) -> None:
    tree = Tree(leaves_of(d))
    n = len(d)
    m = data.draw(st.integers(0, n - 1))
    path = tree.inclusion_proof(m)
    root = tree.root()
    leaf = leaf_hash(d[m])
    assert not verify_inclusion(leaf_hash(d[m] + b"!"), m, n, path, root)  # another entry
    assert not verify_inclusion(leaf, m, n, path, H(root))  # another root
    if path:
        i = data.draw(st.integers(0, len(path) - 1))
        bent = path[:i] + [H(path[i])] + path[i + 1:]
        assert not verify_inclusion(leaf, m, n, bent, root)
        assert not verify_inclusion(leaf, m, n, path[:-1], root)  # too short
    assert not verify_inclusion(leaf, m, n, path + [root], root)  # too long
    other = data.draw(st.integers(0, n - 1))
    assume(other != m and d[other] != d[m])
    assert not verify_inclusion(leaf, other, n, path, root)  # claimed at another index


@given(st.integers(0, 100), st.integers(0, 100))
def test_inclusion_rejects_impossible_positions(m: int, n: int) -> None:
    assume(m >= n)
    assert not verify_inclusion(leaf_hash(b"x"), m, n, [], EMPTY_ROOT)


def test_inclusion_root_raises_proof_error_on_bad_hash_sizes() -> None:
    import pytest

    with pytest.raises(ProofError):
        root_from_inclusion(leaf_hash(b"a"), 0, 2, [b"short"])


# -- consistency -------------------------------------------------------------------------------------


@given(nonempty, st.data())
def test_consistency_proofs_match_the_reference_and_verify(d: list[bytes], data: st.DataObject) -> None:
    tree = Tree(leaves_of(d))
    n = data.draw(st.integers(1, len(d)))
    m = data.draw(st.integers(0, n))
    proof = tree.consistency_proof(m, n)
    assert proof == ref_proof(m, d[:n])
    assert verify_consistency(m, n, ref_mth(d[:m]), ref_mth(d[:n]), proof)


@settings(max_examples=200)
@given(nonempty, st.data())
def test_consistency_proofs_fail_for_a_rewritten_history(d: list[bytes], data: st.DataObject) -> None:
    n = len(d)
    m = data.draw(st.integers(1, n))
    tree = Tree(leaves_of(d))
    proof = tree.consistency_proof(m, n)
    old, new = tree.root(m), tree.root(n)
    # The old tree had a different entry somewhere: no proof from the real tree fits it.
    j = data.draw(st.integers(0, m - 1))
    forged = d[:j] + [d[j] + b"*"] + d[j + 1:m]
    assert not verify_consistency(m, n, ref_mth(forged), new, proof)
    assert not verify_consistency(m, n, old, H(new), proof)
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1))
        assert not verify_consistency(m, n, old, new, proof[:i] + [H(proof[i])] + proof[i + 1:])
    if m < n:
        assert not verify_consistency(n, m, new, old, proof)  # backwards


def test_consistency_edge_cases() -> None:
    d = [bytes([i]) for i in range(5)]
    tree = Tree(leaves_of(d))
    assert verify_consistency(0, 5, EMPTY_ROOT, tree.root(), [])
    assert verify_consistency(5, 5, tree.root(), tree.root(), [])
    assert not verify_consistency(5, 5, tree.root(), tree.root(), [tree.root()])
    assert not verify_consistency(3, 5, tree.root(3), tree.root(), [])
