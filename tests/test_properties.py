"""Property tests of the pure parts of the wire contract: canonical JSON, the envelope parser,
subject matching and the human units.

Each property is stated the way a user of the bus relies on it: the bytes that get signed do not
depend on how a dict happened to be built, the one door from bytes into an Envelope never throws
anything but a Rejection, and subject patterns mean exactly what NATS says they mean.
"""

from __future__ import annotations

import json
import math
import random
import re
import string

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from charter.bus.envelope import FIELDS, Envelope, from_dict, parse, seal
from charter.bus.subjects import SubjectError, matches, pattern_within, validate_pattern, validate_subject
from charter.encoding import EncodingError, b64d, canonical, loads
from charter.errors import MALFORMED, TOO_LARGE, Rejection
from charter.identity.keys import SigningKey
from charter.units import format_duration, parse_duration, parse_size

# Local settings (not a global profile: other modules keep theirs). No deadline: a slow CI box
# must not turn a correct property into a flaky failure.
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEY = SigningKey.from_seed(bytes(range(32)))
OTHER_KEY = SigningKey.from_seed(bytes(range(1, 33)))
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)

scalars = st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)
# The same without floats: their text form is orjson's (shortest round-trip), not Python's repr.
json_no_floats = st.recursive(
    st.none() | st.booleans() | INT64 | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


def shuffled(value, rnd: random.Random):
    """The same value with every dict (at any depth) rebuilt in a random insertion order."""
    if isinstance(value, dict):
        keys = list(value)
        rnd.shuffle(keys)
        return {k: shuffled(value[k], rnd) for k in keys}
    if isinstance(value, list):
        return [shuffled(v, rnd) for v in value]
    return value


# -- canonical encoding ------------------------------------------------------------------------


@PROPS
@given(json_values, st.randoms(use_true_random=False))
def test_canonical_bytes_do_not_depend_on_key_insertion_order(value, rnd) -> None:
    assert canonical(shuffled(value, rnd)) == canonical(value)


@PROPS
@given(st.dictionaries(st.text(max_size=6), st.dictionaries(st.text(max_size=6), INT64, max_size=6), min_size=1, max_size=6),
       st.randoms(use_true_random=False))
def test_nested_dicts_in_reversed_order_encode_identically(value, rnd) -> None:
    reversed_ = {k: dict(reversed(list(v.items()))) for k, v in reversed(list(value.items()))}
    assert canonical(reversed_) == canonical(value) == canonical(shuffled(value, rnd))


@PROPS
@given(json_values)
def test_canonical_round_trips(value) -> None:
    data = canonical(value)
    assert loads(data) == value
    # ...and is a fixed point: encoding what was decoded gives the same bytes.
    assert canonical(loads(data)) == data


@PROPS
@given(json_no_floats)
def test_canonical_is_sorted_compact_unescaped_utf8(value) -> None:
    """Sorted keys, no whitespace, non-ASCII kept as UTF-8: what any other implementation must produce."""
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert canonical(value) == expected


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 2**64, -(2**63) - 1, {1: "x"}, {b"k": 1}, object()])
def test_canonical_refuses_what_has_no_canonical_form(bad) -> None:
    with pytest.raises(EncodingError):
        canonical(bad)
    with pytest.raises(EncodingError):
        canonical({"payload": [bad]})


@PROPS
@given(st.binary() | st.text())
def test_loads_raises_only_encoding_error(data) -> None:
    try:
        loads(data)
    except EncodingError:
        pass


# -- the envelope parser ----------------------------------------------------------------------


def parse_or_reject(data, **kw) -> Envelope | Rejection:
    """parse() must return an Envelope or raise Rejection(malformed|too_large); anything else fails."""
    try:
        return parse(data, **kw)
    except Rejection as exc:
        assert exc.code in (MALFORMED, TOO_LARGE), exc.code
        assert exc.message
        return exc


def valid_envelope(**kw) -> Envelope:
    args = {"sender": "agt_01TEST", "subject": "agents.alpha.events", "payload": {"n": 1}}
    args.update(kw)
    return seal(KEY, **args)


@PROPS
@given(st.binary(max_size=300))
def test_parse_arbitrary_bytes_only_rejects(data) -> None:
    out = parse_or_reject(data)
    assert isinstance(out, Rejection)


@PROPS
@given(st.text(max_size=300))
def test_parse_arbitrary_text_only_rejects(data) -> None:
    out = parse_or_reject(data)
    assert isinstance(out, Rejection)


@PROPS
@given(json_values)
def test_parse_arbitrary_json_only_rejects(value) -> None:
    out = parse_or_reject(canonical(value))
    assert isinstance(out, Rejection) and out.code == MALFORMED


@pytest.mark.parametrize("data", [
    b"", b"\x00", b"\xff\xfe", "\ud800", '"\\ud800"', b"[" * 5000 + b"]" * 5000, b"1e400", b"-",
    b"18446744073709551616", bytearray(b"{}"), memoryview(b"null"), None, 42, object(),
])
def test_parse_odd_inputs_only_reject(data) -> None:
    assert isinstance(parse_or_reject(data), Rejection)


def test_parse_refuses_oversized_input_before_reading_it() -> None:
    env = valid_envelope(payload="x" * 2000)
    out = parse_or_reject(env.raw, max_bytes=1000)
    assert isinstance(out, Rejection) and out.code == TOO_LARGE
    assert isinstance(parse_or_reject(env.raw, max_bytes=len(env.raw)), Envelope)


def test_parse_counts_encoded_bytes_not_characters() -> None:
    # 600 three-byte characters: 600 characters of text but over 1800 bytes on the wire.
    env = valid_envelope(payload="€" * 600)
    text = env.raw.decode("utf-8")
    assert len(text) < 1000 < len(env.raw)
    out = parse_or_reject(text, max_bytes=1000)
    assert isinstance(out, Rejection) and out.code == TOO_LARGE


def _type_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    return type(value).__name__


@PROPS
@given(st.sampled_from(sorted(FIELDS)))
def test_dropping_any_field_is_malformed(field) -> None:
    doc = valid_envelope().to_dict()
    del doc[field]
    out = parse_or_reject(canonical(doc))
    assert isinstance(out, Rejection) and out.code == MALFORMED
    assert field in out.message


@PROPS
@given(st.text(min_size=1, max_size=10).filter(lambda k: k not in FIELDS), json_values)
def test_adding_any_field_is_malformed(key, value) -> None:
    doc = valid_envelope().to_dict()
    doc[key] = value
    out = parse_or_reject(canonical(doc))
    assert isinstance(out, Rejection) and out.code == MALFORMED


@PROPS
@given(st.sampled_from(sorted(FIELDS - {"payload"})), json_values)
def test_changing_a_field_to_another_type_is_malformed(field, value) -> None:
    doc = valid_envelope().to_dict()
    assume(_type_of(value) != _type_of(doc[field]))
    doc[field] = value
    out = parse_or_reject(canonical(doc))
    assert isinstance(out, Rejection) and out.code == MALFORMED


@PROPS
@given(st.sampled_from(sorted(FIELDS - {"payload"})), st.text(max_size=40) | INT64)
def test_any_other_value_of_a_field_parses_or_is_malformed(field, value) -> None:
    doc = valid_envelope().to_dict()
    doc[field] = value
    out = parse_or_reject(canonical(doc))
    if isinstance(out, Envelope):
        assert getattr(out, field) == value


@PROPS
@given(json_values)
def test_any_payload_is_allowed(value) -> None:
    doc = valid_envelope().to_dict()
    doc["payload"] = value
    out = parse_or_reject(canonical(doc))
    assert isinstance(out, Envelope) and out.payload == value


@PROPS
@given(st.data())
def test_byte_mutations_of_a_valid_envelope_only_reject_or_parse(data) -> None:
    raw = bytearray(valid_envelope(payload={"text": "héllo", "n": [1, 2.5, None]}).raw)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        i = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "delete":
            del raw[i]
        else:
            raw.insert(i, data.draw(st.integers(0, 255)))
    parse_or_reject(bytes(raw))


@PROPS
@given(json_values, st.integers(0, 5))
def test_from_dict_on_mangled_dicts_only_rejects(value, n) -> None:
    doc = valid_envelope().to_dict()
    for k in sorted(FIELDS)[:n]:
        doc[k] = value
    try:
        from_dict(doc)
    except Rejection as exc:
        assert exc.code in (MALFORMED, TOO_LARGE)


# -- sealing -----------------------------------------------------------------------------------

tokens = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=8)
subjects = st.lists(tokens, min_size=1, max_size=6).map(".".join)
senders = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
kinds = st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True)


@PROPS
@given(subjects, senders, kinds, json_values)
def test_sealed_envelope_parses_back_identically(subject, sender, kind, payload) -> None:
    env = seal(KEY, sender=sender, subject=subject, payload=payload, kind=kind)
    back = parse(env.raw, max_bytes=2**31)
    assert back.to_dict() == env.to_dict()
    assert (back.subject, back.sender, back.kind, back.payload) == (subject, sender, kind, payload)
    assert back.raw == env.raw
    assert back.signed == env.signed
    assert canonical(back.to_dict()) == env.raw
    assert KEY.public.verify(b64d(back.sig), back.signed)
    assert not OTHER_KEY.public.verify(b64d(back.sig), back.signed)


@PROPS
@given(json_values, json_values)
def test_signature_covers_the_payload(a, b) -> None:
    assume(canonical(a) != canonical(b))
    env = valid_envelope(payload=a)
    doc = env.to_dict()
    doc["payload"] = b
    forged = parse(canonical(doc), max_bytes=2**31)
    assert forged.sig == env.sig
    assert not KEY.public.verify(b64d(forged.sig), forged.signed)


def test_seal_refuses_what_parse_would_refuse() -> None:
    for bad in ({"subject": "a..b"}, {"subject": "a.*"}, {"sender": "has space"}, {"kind": "Event"},
                {"payload": float("nan")}, {"payload": {"a": [1, float("inf")]}}, {"ts": 0}, {"nonce": "short"},
                {"eid": "not-a-ulid"}):
        with pytest.raises(Rejection) as info:
            valid_envelope(**bad)
        assert info.value.code == MALFORMED


# -- subjects ---------------------------------------------------------------------------------

# A tiny alphabet, so that generated patterns and subjects actually collide.
sub_tokens = st.sampled_from(["a", "b", "c"])
small_subjects = st.lists(sub_tokens, min_size=1, max_size=5).map(".".join)
small_patterns = st.builds(
    lambda toks, tail: ".".join(toks + ([">"] if tail else [])) if toks or tail else "a",
    st.lists(st.sampled_from(["a", "b", "c", "*"]), max_size=5),
    st.booleans(),
)


def reference_match(pattern: str, subject: str) -> bool:
    """NATS semantics as a regular expression: `*` is one token, a final `>` one or more."""
    rx = []
    for tok in pattern.split("."):
        if tok == "*":
            rx.append(r"[^.]+")
        elif tok == ">":
            rx.append(r"[^.]+(?:\.[^.]+)*")
        else:
            rx.append(re.escape(tok))
    return re.fullmatch(r"\.".join(rx), subject) is not None


@PROPS
@given(small_patterns, small_subjects)
def test_matches_agrees_with_reference(pattern, subject) -> None:
    validate_pattern(pattern)
    validate_subject(subject)
    assert matches(pattern, subject) == reference_match(pattern, subject)


@PROPS
@given(small_subjects)
def test_pattern_without_wildcards_matches_only_itself(pattern) -> None:
    assert matches(pattern, pattern)
    assert not matches(pattern, pattern + ".a")
    assert not matches(pattern + ".a", pattern)


@PROPS
@given(small_patterns, small_patterns, st.lists(small_subjects, min_size=1, max_size=30))
def test_pattern_within_is_sound(inner, outer, subjects_) -> None:
    if pattern_within(inner, outer):
        for s in subjects_:
            if matches(inner, s):
                assert matches(outer, s), (inner, outer, s)


def _instances(pattern: str, max_len: int) -> list[str]:
    """Concrete subjects matching `pattern`, with wildcards filled by a token no pattern uses."""
    toks = pattern.split(".")
    base = ["q" if t == "*" else t for t in toks]
    if toks[-1] != ">":
        return [".".join(base)]
    return [".".join(base[:-1] + ["q"] * n) for n in range(1, max_len + 2)]


@PROPS
@given(small_patterns, small_patterns)
def test_pattern_within_is_exact(inner, outer) -> None:
    """If inner is not within outer, some subject shows it (so scopes are not narrowed needlessly)."""
    witnesses = [s for s in _instances(inner, len(outer.split("."))) if not matches(outer, s)]
    for s in _instances(inner, len(outer.split("."))):
        assert matches(inner, s)
    assert pattern_within(inner, outer) == (not witnesses), (inner, outer, witnesses)


@PROPS
@given(small_patterns)
def test_pattern_within_is_reflexive_and_everything_is_within_gt(p) -> None:
    assert pattern_within(p, p)
    assert pattern_within(p, ">")


@pytest.mark.parametrize("bad", ["", "a..b", ".a", "a.", "a.>.b", "a b", "a.*x", ">x", "a." * 20 + "a", "x" * 300, None, 5])
def test_invalid_patterns_are_refused(bad) -> None:
    with pytest.raises(SubjectError):
        validate_pattern(bad)


@pytest.mark.parametrize("bad", ["a.*", "a.>", "*", ">", "a..b", "", "ä", None])
def test_wildcards_are_not_subjects(bad) -> None:
    with pytest.raises(SubjectError):
        validate_subject(bad)


# -- units ------------------------------------------------------------------------------------

durations = (
    st.integers(0, 10**9).map(float)
    | st.integers(0, 10**9).map(lambda ms: ms / 1000)
    | st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False)
)


@PROPS
@given(durations)
def test_parse_duration_reads_what_format_duration_writes(seconds) -> None:
    text = format_duration(seconds)
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seconds", [0, 1, 59, 60, 90, 3600, 86400, 1000001, 1e-5, 0.1, 0.001, 1e16])
def test_format_duration_examples_round_trip(seconds) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@PROPS
@given(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["ms", "s", "m", "h", "d", "w"])), min_size=1, max_size=4))
def test_parse_duration_sums_compound_units(parts) -> None:
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_duration(text) == pytest.approx(sum(n * unit[u] for n, u in parts))


@PROPS
@given(st.integers(0, 10**12), st.sampled_from(["", "B", "KB", "KiB", "MB", "MiB", "GB", "GiB", "TB", "TiB"]))
def test_parse_size_units(n, unit) -> None:
    mult = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[unit]
    assert parse_size(f"{n}{unit}") == n * mult
    assert parse_size(n * mult) == n * mult


junk = (
    st.text(max_size=20)
    | st.none() | st.booleans() | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)
    | st.integers(max_value=-1) | st.floats()
)


@PROPS
@given(junk)
def test_parse_duration_accepts_a_finite_duration_or_raises_value_error(value) -> None:
    try:
        out = parse_duration(value)
    except ValueError:
        return
    assert isinstance(out, float) and math.isfinite(out) and out >= 0


@PROPS
@given(junk)
def test_parse_size_accepts_a_size_or_raises_value_error(value) -> None:
    try:
        out = parse_size(value)
    except ValueError:
        return
    assert type(out) is int and out >= 0


@pytest.mark.parametrize("bad", ["", " ", "m", "1x", "-5s", "s5", "1.s", "1e3s", "nan", "inf",
                                 "1" + "0" * 400 + "s", float("nan"), float("inf"), -1, True, None, [], "5 mm"])
def test_parse_duration_rejects_junk(bad) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("bad", ["", "KiB", "-1", "1 KiBs", "10 GB extra", -1, True, 1.0, None])
def test_parse_size_rejects_junk(bad) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


# -- a backend's streamed body, however the network cuts it -----------------------------------------

@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=12),
       cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=10), trailing_newline=st.booleans())
def test_read_lines_yields_the_same_lines_however_the_body_is_chunked(lines: list[bytes], cuts: list[int],
                                                                      trailing_newline: bool) -> None:
    """aiohttp's own StreamReader is fed the body in arbitrary chunks; `read_lines` yields exactly
    the non-empty stripped lines, a last line without its newline included, and says `more` only
    when another line follows (so a caller flushing on `more=False` never holds a line back)."""
    import asyncio
    from unittest.mock import Mock

    import aiohttp

    from charter.models.backends.base import read_lines

    body = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    points = sorted({c for c in cuts if 0 < c < len(body)})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True) if body[a:b]]

    async def run() -> list[tuple[bytes, bool]]:
        reader = aiohttp.StreamReader(Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        resp = Mock(content=reader)
        loop = asyncio.get_running_loop()
        return [line async for line in read_lines(resp, first_token=5, idle=5, deadline=loop.time() + 10)]

    expected = [line.strip() for line in body.split(b"\n") if line.strip()]
    got = asyncio.run(run())
    assert [line for line, _ in got] == expected
    assert not got or got[-1][1] is False


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), json_values.map(canonical), json_values.map(lambda e: canonical({"error": e}))))
def test_decode_event_classifies_any_line_and_never_raises(raw: bytes) -> None:
    """A streamed line is an object to use, or exactly one of the errors the router knows: never an
    exception of its own (a JSON list or number used to raise AttributeError in the backends)."""
    from charter.models.backends.base import decode_event

    obj, bad = decode_event(raw, "line")
    if bad is None:
        assert isinstance(obj, dict) and "error" not in obj
    else:
        assert bad.kind in ("malformed", "midstream_error")
        assert (bad.kind == "midstream_error") == (isinstance(obj, dict) and "error" in obj)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), json_values.map(canonical),
                 st.builds(lambda vs, n: canonical({"embeddings": vs, "prompt_eval_count": n}), json_values, json_values),
                 st.builds(lambda d, u: canonical({"data": d, "usage": u}), json_values, json_values)),
       st.integers(min_value=1, max_value=3))
def test_an_embeddings_answer_is_vectors_or_a_malformed_failure_never_a_crash(raw: bytes, count: int) -> None:
    """Whatever a backend answers under HTTP 200 to an embeddings call, in Ollama's shape or
    OpenAI's, it is one vector per input or the backend's `malformed` failure, marked as answered
    (its inputs were read): never an exception of its own, which would end the call, not fail over."""
    from charter.models.backends import ollama, openai
    from charter.models.backends.base import embed_answer
    from charter.models.types import BackendError

    for backend in (ollama, openai):
        try:
            vectors, tokens = backend.embeddings_of(embed_answer(raw), count)
        except BackendError as err:
            assert err.kind == "malformed" and err.answered
            continue
        assert len(vectors) == count and all(isinstance(v, list) and v for v in vectors) and tokens >= 0


# -- budget periods ------------------------------------------------------------------------------

ZONES = ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe", "Asia/Kathmandu",
         "America/St_Johns", "Pacific/Chatham"]


@PROPS
@given(st.sampled_from(["hour", "day", "month"]), st.sampled_from(ZONES),
       st.integers(min_value=0, max_value=4_102_444_800_000), st.integers(min_value=-3_600_000, max_value=3_600_000))
def test_a_period_key_is_the_zones_calendar_whatever_was_asked_before(period: str, zone: str, now_ms: int,
                                                                     step_ms: int) -> None:
    """The key of an instant is its period in the zone's local calendar, also when the key of a
    nearby instant (the same second, the other side of a boundary) was asked just before."""
    import datetime as dt
    from zoneinfo import ZoneInfo

    from charter.budget.periods import period_key

    tz = ZoneInfo(zone)
    fmt = {"hour": "%Y-%m-%dT%H", "day": "%Y-%m-%d", "month": "%Y-%m"}[period]
    for t in (now_ms + step_ms, now_ms, now_ms - now_ms % 1000, now_ms - now_ms % 1000 - 1):
        if t >= 0:
            assert period_key(period, t, tz) == dt.datetime.fromtimestamp(t / 1000, tz).strftime(fmt)
