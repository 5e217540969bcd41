"""Subjects and subject patterns, with NATS semantics.

A subject is dot-separated tokens (`agents.alpha.events`). A pattern may use `*` for exactly one
token and `>` as its last token for one or more remaining tokens. Keeping NATS semantics exactly
lets a scoped view become a NATS permission unchanged when the bus moves onto JetStream.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MAX_SUBJECT_LEN = 256
MAX_TOKENS = 16
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


class SubjectError(ValueError):
    """A subject or pattern that does not follow the grammar; the message says which token."""


def validate_subject(subject: object) -> str:
    """Return `subject` if it is a concrete subject (no wildcards); raise SubjectError otherwise."""
    if not isinstance(subject, str) or not subject:
        raise SubjectError("subject must be a non-empty string")
    if len(subject) > MAX_SUBJECT_LEN:
        raise SubjectError(f"subject is longer than {MAX_SUBJECT_LEN} characters")
    tokens = subject.split(".")
    if len(tokens) > MAX_TOKENS:
        raise SubjectError(f"subject has more than {MAX_TOKENS} tokens")
    for i, tok in enumerate(tokens):
        if not _TOKEN.fullmatch(tok):
            raise SubjectError(
                f"token {i + 1} of subject {subject!r} is {tok!r}: tokens are letters, digits, '_' or '-'"
            )
    return subject


def validate_pattern(pattern: object) -> str:
    """Return `pattern` if it is a valid subscription pattern; raise SubjectError otherwise."""
    if not isinstance(pattern, str) or not pattern:
        raise SubjectError("pattern must be a non-empty string")
    if len(pattern) > MAX_SUBJECT_LEN:
        raise SubjectError(f"pattern is longer than {MAX_SUBJECT_LEN} characters")
    tokens = pattern.split(".")
    if len(tokens) > MAX_TOKENS:
        raise SubjectError(f"pattern has more than {MAX_TOKENS} tokens")
    for i, tok in enumerate(tokens):
        if tok == ">":
            if i != len(tokens) - 1:
                raise SubjectError(f"'>' must be the last token of pattern {pattern!r}")
        elif tok != "*" and not _TOKEN.fullmatch(tok):
            raise SubjectError(f"token {i + 1} of pattern {pattern!r} is {tok!r}")
    return pattern


def matches(pattern: str, subject: str) -> bool:
    """True if the concrete `subject` matches `pattern`."""
    p = pattern.split(".")
    s = subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s):
            return False
        if tok != "*" and tok != s[i]:
            return False
    return len(s) == len(p)


def pattern_within(inner: str, outer: str) -> bool:
    """True if every subject matched by `inner` is also matched by `outer` (used to narrow scopes)."""
    a = inner.split(".")
    b = outer.split(".")
    for i, tok in enumerate(b):
        if tok == ">":
            return len(a) > i
        if i >= len(a):
            return False
        if a[i] == ">":
            return False
        if tok == "*":
            continue
        if a[i] == "*" or a[i] != tok:
            return False
    return len(a) == len(b)


class SubjectSet:
    """A set of patterns with a memo of answers: the scope check on the hot path is a dict hit."""

    __slots__ = ("patterns", "_memo")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns: tuple[str, ...] = tuple(validate_pattern(p) for p in patterns)
        self._memo: dict[str, bool] = {}

    def allows(self, subject: str) -> bool:
        hit = self._memo.get(subject)
        if hit is None:
            hit = any(matches(p, subject) for p in self.patterns)
            if len(self._memo) > 4096:
                self._memo.clear()
            self._memo[subject] = hit
        return hit

    def covers(self, pattern: str) -> bool:
        """True if a subscription to `pattern` stays entirely within this set."""
        return any(pattern_within(pattern, p) for p in self.patterns)

    def __repr__(self) -> str:
        return f"SubjectSet({list(self.patterns)!r})"
