"""Settings: the parsers a Config field declares, and the one word list every flag is read in."""

from __future__ import annotations

import pytest

from settings import EnvReader, Setting, boolean_flag, decimal, flag_value, one_of, whole_number


@pytest.mark.parametrize(
    ("word", "value"),
    [
        ("TRUE", True),
        ("1", True),
        ("Yes", True),
        ("on", True),
        (" yes ", True),
        ("false", False),
        ("0", False),
        ("NO", False),
        ("Off", False),
        ("", False),
        ("maybe", None),
    ],
)
def test_a_flag_is_read_in_one_word_list(word: str, value: bool | None) -> None:
    assert flag_value(word) is value


def read(setting: Setting[object], raw: str, default: object) -> tuple[object, list[str]]:
    """The value read for one setting from its variable, and the problems noted."""
    problems: list[str] = []
    return EnvReader({setting.variable: raw}, problems).read(setting, default), problems


def test_an_unreadable_value_is_named_and_the_default_stands() -> None:
    value, problems = read(Setting("WORKERS", whole_number(low=1, high=8)), "4.5", 2)

    assert value == 2
    assert problems == ["WORKERS must be a whole number, got '4.5'"]


def test_a_value_out_of_bounds_is_read_then_refused_by_its_check() -> None:
    declared = Setting("WAIT", decimal(low=0, high=60))
    value, problems = read(declared, "90", 1.0)

    assert (value, problems) == (90.0, [])
    assert declared.problem(90.0) == "WAIT must be from 0 to 60, got 90.0"


def test_a_choice_is_read_in_its_choices_case() -> None:
    value, _ = read(Setting("LEVEL", one_of(("DEBUG", "INFO"), case=str.upper)), "info", "DEBUG")

    assert value == "INFO"


def test_a_flag_setting_refuses_other_words() -> None:
    value, problems = read(Setting("STRICT", boolean_flag), "maybe", True)

    assert value is True
    assert problems == ["STRICT must be true or false, got 'maybe'"]
