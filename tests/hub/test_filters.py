"""Filters are pure: property tests over the CloudEvents Subscriptions API dialects."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keel.errors import InvalidFilter
from keel.hub import compile_filter

NAMES = st.sampled_from(["type", "source", "subject", "priority", "tenant"])
VALUES = st.text(alphabet="abc.-*", max_size=6)
ATTRS = st.dictionaries(NAMES, VALUES, max_size=5)


def leaf() -> st.SearchStrategy[dict[str, Any]]:
    pairs = st.dictionaries(NAMES, VALUES, min_size=1, max_size=2)
    return st.one_of(
        pairs.map(lambda p: {"exact": p}),
        pairs.map(lambda p: {"prefix": p}),
        pairs.map(lambda p: {"suffix": p}),
    )


FILTERS = st.recursive(
    leaf(),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda f: {"all": f}),
        st.lists(inner, max_size=3).map(lambda f: {"any": f}),
        inner.map(lambda f: {"not": f}),
    ),
    max_leaves=6,
)


def match(f: dict[str, Any], attrs: dict[str, str]) -> bool:
    return compile_filter({"filters": [f]})(attrs)


@given(FILTERS, ATTRS)
def test_not_inverts(f: dict[str, Any], attrs: dict[str, str]) -> None:
    assert match({"not": f}, attrs) is (not match(f, attrs))


@given(st.lists(FILTERS, max_size=3), ATTRS)
def test_all_is_conjunction(fs: list[dict[str, Any]], attrs: dict[str, str]) -> None:
    assert match({"all": fs}, attrs) is all(match(f, attrs) for f in fs)


@given(st.lists(FILTERS, max_size=3), ATTRS)
def test_any_is_disjunction(fs: list[dict[str, Any]], attrs: dict[str, str]) -> None:
    assert match({"any": fs}, attrs) is any(match(f, attrs) for f in fs)


@given(NAMES, VALUES, ATTRS)
def test_exact_prefix_suffix(name: str, value: str, attrs: dict[str, str]) -> None:
    present = name in attrs
    assert match({"exact": {name: value}}, attrs) is (present and attrs[name] == value)
    assert match({"prefix": {name: value}}, attrs) is (present and attrs[name].startswith(value))
    assert match({"suffix": {name: value}}, attrs) is (present and attrs[name].endswith(value))


@given(NAMES, ATTRS)
def test_empty_prefix_matches_exactly_the_present_attributes(
    name: str, attrs: dict[str, str]
) -> None:
    assert match({"prefix": {name: ""}}, attrs) is (name in attrs)


@given(st.text(alphabet="ab.", max_size=8), st.text(alphabet="ab.", max_size=8))
def test_type_wildcard_star_matches_any_run(head: str, tail: str) -> None:
    pred = compile_filter({"types": [head + "*" + tail]})
    assert pred({"type": head + "xyz" + tail})
    assert pred({"type": head + tail})


def test_type_wildcard_is_literal_otherwise() -> None:
    pred = compile_filter({"types": ["compute.instance.*"]})
    assert pred({"type": "compute.instance.create.end"})
    assert not pred({"type": "computeXinstance.create"})
    assert not pred({"type": "volume.create"})
    assert not pred({})


def test_top_level_fields_all_hold() -> None:
    pred = compile_filter(
        {"types": ["a.*"], "source": "s", "subject": "i-1", "priority": ["info", "error"]}
    )
    good = {"type": "a.b", "source": "s", "subject": "i-1", "priority": "info"}
    assert pred(good)
    for key, bad in [("type", "b"), ("source", "t"), ("subject", "i-2"), ("priority", "debug")]:
        assert not pred({**good, key: bad})


def test_empty_all_matches_and_empty_any_does_not() -> None:
    assert match({"all": []}, {})
    assert not match({"any": []}, {})


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"filters": [{"sql": "type = 'x'"}]}, "sql dialect is not supported"),
        ({"filters": [{"nope": {}}]}, "unknown dialect"),
        ({"filters": [{"exact": {"type": 1}}]}, "must be a string"),
        ({"filters": [{"exact": {"Type": "x"}}]}, "lowercase"),
        ({"filters": [{"exact": {}}]}, "must map attribute names"),
        ({"filters": [{"exact": {"a": "b"}, "prefix": {"a": "b"}}]}, "exactly one dialect"),
        ({"filters": {"exact": {"a": "b"}}}, "must be a list"),
        ({"types": []}, "1 to 100 strings"),
        ({"types": "compute.*"}, "1 to 100 strings"),
        ({"filters": [{"all": {"exact": {"a": "b"}}}]}, "list of filters"),
    ],
)
def test_bad_filters_name_the_problem(spec: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidFilter, match=words):
        compile_filter(spec)


def test_deep_nesting_is_refused() -> None:
    f: dict[str, Any] = {"exact": {"type": "x"}}
    for _ in range(10):
        f = {"not": f}
    with pytest.raises(InvalidFilter, match="deeper"):
        compile_filter({"filters": [f]})


def reference_glob(pattern: str, text: str) -> bool:
    """The textbook dynamic programme: ``*`` is any run, every other character literal."""
    ok = [True] + [False] * len(text)
    for ch in pattern:
        if ch == "*":
            for i in range(1, len(ok)):
                ok[i] = ok[i] or ok[i - 1]
        else:
            ok = [False] + [ok[i] and text[i] == ch for i in range(len(text))]
    return ok[-1]


@given(st.text(alphabet="ab.*", max_size=10), st.text(alphabet="ab.", max_size=12))
def test_type_glob_matches_as_the_reference(pattern: str, text: str) -> None:
    pred = compile_filter({"types": [pattern]})
    assert pred({"type": text}) is reference_glob(pattern, text)


def test_repeated_stars_match_in_linear_time() -> None:
    # A backtracking regex of adjacent ``.*`` took seconds here, exponential in the stars
    # (0.33 s for 8 stars on 30 characters; this one never finished).
    started = time.perf_counter()
    for stars in (10, 64, 250):
        pred = compile_filter({"types": ["*" * stars + "x", "a*" * 100 + "x"]})
        for n in (30, 500):
            assert not pred({"type": "a" * n})
    assert time.perf_counter() - started < 0.05


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"types": ["a" * 257]}, "longer than 256"),
        ({"types": ["x"] * 101}, "1 to 100 strings"),
        ({"types": ["a" * 250] * 17}, "more than 4096 characters"),
        ({"filters": [{"exact": {"type": "a" * 1000}}] * 5}, "more than 4096 characters"),
        ({"filters": [{"any": [{"exact": {"a": "b"}}] * 101}]}, "more than 100 nodes"),
    ],
)
def test_patterns_are_bounded_in_length_and_count(spec: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidFilter, match=words):
        compile_filter(spec)


class _CountingAttrs(dict[str, str]):
    reads = 0

    def __getitem__(self, key: str) -> str:
        type(self).reads += 1
        return super().__getitem__(key)


def test_repeated_and_listed_prefix_tests_cost_one_read_per_event() -> None:
    """A hostile tenant's `not any` of twenty prefix tests was twenty calls on every event
    routed to its subscriptions (15% of the hub's CPU under the bench's flood)."""
    spec = {"filters": [{"not": {"any": [{"prefix": {"type": "z" * 150}}] * 20}}]}
    listed = {"filters": [{"any": [{"prefix": {"type": p}} for p in ("x", "y", "a")]}]}
    attrs = _CountingAttrs(type="a" * 400, source="s", id="1", specversion="1.0")
    assert compile_filter(spec)(attrs)
    assert compile_filter(listed)(attrs)
    assert not compile_filter(listed)(_CountingAttrs(type="b", source="s"))
    _CountingAttrs.reads = 0
    compile_filter(spec)(attrs)
    compile_filter(listed)(attrs)
    assert _CountingAttrs.reads == 2


# Reference semantics (CloudEvents Subscriptions API): exact/prefix/suffix hold when every
# listed attribute is present and matches; all is a conjunction, any a disjunction, not a
# negation. Written independently of the compiler's merging and de-duplication.
def reference(f: dict[str, Any], attrs: dict[str, str]) -> bool:
    ((dialect, arg),) = f.items()
    if dialect == "exact":
        return all(k in attrs and attrs[k] == v for k, v in arg.items())
    if dialect == "prefix":
        return all(k in attrs and attrs[k].startswith(v) for k, v in arg.items())
    if dialect == "suffix":
        return all(k in attrs and attrs[k].endswith(v) for k, v in arg.items())
    if dialect == "all":
        return all(reference(s, attrs) for s in arg)
    if dialect == "any":
        return any(reference(s, attrs) for s in arg)
    assert dialect == "not"
    return not reference(arg, attrs)


R_NAMES = st.sampled_from(["type", "source", "subject"])
R_VALUES = st.sampled_from(["", "a", "ab", "abc", "b", "ba"])
R_ATTRS = st.dictionaries(R_NAMES, R_VALUES, max_size=3)


def r_leaf() -> st.SearchStrategy[dict[str, Any]]:
    one = st.builds(lambda k, v: {k: v}, R_NAMES, R_VALUES)
    several = st.dictionaries(R_NAMES, R_VALUES, min_size=2, max_size=3)
    pairs = st.one_of(one, several)
    return st.one_of(
        pairs.map(lambda p: {"exact": p}),
        pairs.map(lambda p: {"prefix": p}),
        pairs.map(lambda p: {"suffix": p}),
    )


def _with_repeats(inner: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4).flatmap(
        lambda xs: st.permutations(xs + xs[: len(xs) // 2]) if xs else st.just([])
    )


R_FILTERS = st.recursive(
    r_leaf(),
    lambda inner: st.one_of(
        _with_repeats(inner).map(lambda f: {"all": list(f)}),
        _with_repeats(inner).map(lambda f: {"any": list(f)}),
        inner.map(lambda f: {"not": f}),
    ),
    max_leaves=12,
)


@given(R_FILTERS, R_ATTRS)
def test_compiled_filter_agrees_with_the_reference_evaluator(
    f: dict[str, Any], attrs: dict[str, str]
) -> None:
    assert match(f, attrs) is reference(f, attrs)


@given(st.lists(r_leaf(), max_size=6), R_ATTRS)
def test_any_of_prefixes_and_repeats_agrees_with_the_reference(
    fs: list[dict[str, Any]], attrs: dict[str, str]
) -> None:
    f = {"any": fs + fs}
    assert match(f, attrs) is reference(f, attrs)
    assert match({"not": f}, attrs) is (not reference(f, attrs))
    assert match({"all": fs + fs}, attrs) is reference({"all": fs}, attrs)
