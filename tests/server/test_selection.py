"""``server.selection``: which devices a selection holds, tag syntax, and the stored form."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.selection import MAX_TAG_VALUE, Selection, parse_tag, tag_pairs
from shared.errors import UserInputError


@dataclass
class FakeDevice:
    name: str
    profile_name: str
    tags: dict[str, str] | None = field(default_factory=dict)


PI_LAB = FakeDevice("pi-lab", "rpi4", {"site": "lab", "ring": "canary"})
PI_FIELD = FakeDevice("pi-field", "rpi4", {"site": "field"})
NANO_LAB = FakeDevice("nano-lab", "jetson-nano", {"site": "lab"})
BARE = FakeDevice("bare", "x86-64", {})
UNTAGGED = FakeDevice("untagged", "x86-64", None)  # a row from before tags
FLEET = (PI_LAB, PI_FIELD, NANO_LAB, BARE, UNTAGGED)


def held(selection: Selection) -> set[str]:
    return {d.name for d in FLEET if selection.matches(d)}


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        # profiles: any of them
        (Selection(profiles=("rpi4",)), {"pi-lab", "pi-field"}),
        (Selection(profiles=("rpi4", "jetson-nano")), {"pi-lab", "pi-field", "nano-lab"}),
        (Selection(profiles=("rpi5",)), set()),
        # tags: every one of them, on any profile when no profile is given
        (Selection(tags=(("site", "lab"),)), {"pi-lab", "nano-lab"}),
        (Selection(tags=(("site", "lab"), ("ring", "canary"))), {"pi-lab"}),
        (Selection(tags=(("ring", "stable"),)), set()),
        (Selection(tags=(("site", "LAB"),)), set()),  # values compare exactly
        # profile AND tags
        (Selection(profiles=("rpi4",), tags=(("site", "lab"),)), {"pi-lab"}),
        (Selection(profiles=("jetson-nano",), tags=(("site", "field"),)), set()),
        (Selection(profiles=("rpi4", "jetson-nano"), tags=(("site", "lab"),)), {"pi-lab", "nano-lab"}),
        # names are always included, whatever the filters say
        (Selection(devices=("bare",)), {"bare"}),
        (Selection(devices=("bare", "untagged")), {"bare", "untagged"}),
        (Selection(profiles=("rpi4",), devices=("bare",)), {"pi-lab", "pi-field", "bare"}),
        (Selection(tags=(("site", "lab"),), devices=("pi-field",)), {"pi-lab", "nano-lab", "pi-field"}),
        (Selection(profiles=("rpi5",), devices=("nano-lab",)), {"nano-lab"}),
        (Selection(devices=("ghost",)), set()),
        # nothing given: nothing held (a rollout stored before selections must not grow to the whole fleet)
        (Selection(), set()),
    ],
    ids=lambda v: v.describe() if isinstance(v, Selection) else None,
)
def test_matches(selection: Selection, expected: set[str]) -> None:
    assert held(selection) == expected


def test_a_device_without_tags_matches_no_tag_filter_but_a_profile() -> None:
    assert not Selection(tags=(("site", "lab"),)).matches(UNTAGGED)
    assert Selection(profiles=("x86-64",)).matches(UNTAGGED)


def test_a_tag_key_present_with_another_value_does_not_match() -> None:
    assert not Selection(tags=(("site", "lab"),)).matches(PI_FIELD)


def test_is_empty_and_filters() -> None:
    assert Selection().is_empty and not Selection().filters
    assert not Selection(devices=("a",)).is_empty and not Selection(devices=("a",)).filters
    assert Selection(tags=(("a", "b"),)).filters and Selection(profiles=("rpi4",)).filters


def test_the_canonical_form_sorts_and_drops_repeats() -> None:
    one = Selection(profiles=("rpi5", "rpi4", "rpi4"), tags=(("site", "lab"), ("ring", "a"), ("site", "lab")),
                    devices=("b", "a", "b"))
    assert one == Selection(profiles=("rpi4", "rpi5"), tags=(("ring", "a"), ("site", "lab")), devices=("a", "b"))
    assert one.profiles == ("rpi4", "rpi5") and one.devices == ("a", "b")


def test_one_key_with_two_values_is_refused() -> None:
    with pytest.raises(UserInputError, match="tag 'site' given twice"):
        Selection(tags=(("site", "lab"), ("site", "field")))


def test_the_stored_form() -> None:
    selection = Selection(profiles=("rpi4",), tags=(("site", "lab"),), devices=("cam-1",))
    assert selection.to_json() == {"profiles": ["rpi4"], "tags": {"site": "lab"}, "devices": ["cam-1"]}
    assert Selection.from_json(selection.to_json()) == selection
    assert Selection.from_json({}) == Selection()  # what migration 0004 stored for older rollouts
    assert Selection.from_json({"profiles": ["rpi4"]}) == Selection(profiles=("rpi4",))


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"profile": ["rpi4"]}, "unknown key(s) in a selection: profile"),
        ({"tags": [["site", "lab"]]}, "tags are an object"),
        ({"tags": {"bad key": "x"}}, "invalid tag key"),
        ({"devices": "cam-1"}, "devices must be a list of names"),
        ({"profiles": [1]}, "profiles must be a list of names"),
        ([], "a selection is a JSON object"),
    ],
)
def test_a_malformed_stored_form_is_refused(data: object, fragment: str) -> None:
    with pytest.raises(UserInputError) as caught:
        Selection.from_json(data)  # type: ignore[arg-type]
    assert fragment in str(caught.value)


KEYS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,20}", fullmatch=True)
VALUES = st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "S")), min_size=1, max_size=20)
NAMES = st.lists(st.from_regex(r"[a-z0-9][a-z0-9-]{0,10}", fullmatch=True), max_size=4)


@given(profiles=NAMES, tags=st.dictionaries(KEYS, VALUES, max_size=4), devices=NAMES)
def test_the_stored_form_round_trips(profiles: list[str], tags: dict[str, str], devices: list[str]) -> None:
    selection = Selection(tuple(profiles), tuple(tags.items()), tuple(devices))
    assert Selection.from_json(selection.to_json()) == selection


@given(name=st.sampled_from([d.name for d in FLEET]), tags=st.dictionaries(KEYS, VALUES, max_size=3))
def test_a_named_device_is_held_whatever_else_is_asked(name: str, tags: dict[str, str]) -> None:
    device = next(d for d in FLEET if d.name == name)
    assert Selection(profiles=("no-such-profile",), tags=tuple(tags.items()), devices=(name,)).matches(device)


# -- tag syntax ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("site=lab", ("site", "lab")),
        ("k8s.io/zone=eu-west-1", ("k8s.io/zone", "eu-west-1")),
        ("rack:row=3", ("rack:row", "3")),
        ("note=a=b", ("note", "a=b")),  # the key ends at the first '='
        ("owner=Zoë Müller", ("owner", "Zoë Müller")),
        ("x=" + "v" * MAX_TAG_VALUE, ("x", "v" * MAX_TAG_VALUE)),
        ("K" + "k" * 62 + "=v", ("K" + "k" * 62, "v")),
    ],
)
def test_parse_tag(text: str, expected: tuple[str, str]) -> None:
    assert parse_tag(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("site", "expected a tag as KEY=VALUE"),
        ("=lab", "invalid tag key ''"),
        ("-site=lab", "invalid tag key"),
        ("si te=lab", "invalid tag key"),
        ("k" * 64 + "=v", "invalid tag key"),
        ("sïte=lab", "invalid tag key"),
        ("site=", "invalid value '' for tag 'site'"),
        ("site= lab", "leading or trailing spaces"),
        ("site=lab\n", "invalid value"),
        ("site=a\tb", "invalid value"),
        ("site=" + "v" * (MAX_TAG_VALUE + 1), f"1-{MAX_TAG_VALUE} printable characters"),
    ],
)
def test_parse_tag_refuses(text: str, fragment: str) -> None:
    with pytest.raises(UserInputError) as caught:
        parse_tag(text)
    assert fragment in str(caught.value)


def test_tag_pairs_checks_what_did_not_come_through_parse_tag() -> None:
    with pytest.raises(UserInputError, match="invalid tag key"):
        tag_pairs([("bad key", "x")])
    assert tag_pairs([("b", "1"), ("a", "2"), ("b", "1")]) == (("a", "2"), ("b", "1"))
