"""How well the SR28 matcher picks a fitting food, on each labelled set.

    python bench/matching.py

Loads the repository's own SR28 copy and prints for each set (the held-out wording set was
written before the matcher's later changes and never used to tune them) its size,
precision (matches that fit / all matches made; a mixed dish matched to anything is a wrong
match) and recall (foods matched to a fitting food / foods), then every miss: the description
and what it matched, or None. Never fails on the figures.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nutrition import BUNDLED_SR28, NutritionTable  # noqa: E402
from tests import held_out_wording  # noqa: E402
from tests.nutrition_labels import (  # noqa: E402
    DISH_COMPONENTS,
    HELD_OUT_FOODS,
    LABELLED_FOODS,
    TUNING_DISHES,
    TUNING_FOODS,
    Label,
)


@dataclass(frozen=True)
class Figures:
    """A set's size, precision and recall, and its misses ("description -> matched food")."""

    foods: int
    dishes: int
    precision: float
    recall: float
    misses: tuple[str, ...]


def figures(table: NutritionTable, foods: Sequence[Label], dishes: Sequence[str] = ()) -> Figures:
    """Match every food and dish once; a dish is right only when nothing matches it."""
    made = fitting = 0
    misses: list[str] = []
    for label in foods:
        found = table.match(label.description, method=label.method)
        made += found is not None
        if found is not None and found.ndb_no in label.acceptable:
            fitting += 1
        else:
            misses.append(f"{label.description!r} -> {found.description if found else None}")
    for dish in dishes:
        found = table.match(dish)
        if found is not None:
            made += 1
            misses.append(f"{dish!r} (a dish) -> {found.description}")
    return Figures(
        foods=len(foods),
        dishes=len(dishes),
        precision=fitting / made if made else 1.0,
        recall=fitting / len(foods) if foods else 1.0,
        misses=tuple(misses),
    )


def report(name: str, found: Figures) -> str:
    """One set's figures and misses, as printed."""
    lines = [
        f"{name}: {found.foods} foods, {found.dishes} dishes; "
        f"precision {found.precision:.1%}, recall {found.recall:.1%}, "
        f"{len(found.misses)} misses"
    ]
    lines += [f"  {miss}" for miss in found.misses]
    return "\n".join(lines)


def main() -> None:
    table = NutritionTable.load(BUNDLED_SR28)
    components = [label for labels in DISH_COMPONENTS.values() for label in labels]
    sets = (
        ("labelled set (LABELLED_FOODS)", figures(table, LABELLED_FOODS)),
        ("earlier held-out set (HELD_OUT_FOODS)", figures(table, HELD_OUT_FOODS)),
        ("tuning set (TUNING_FOODS, TUNING_DISHES)", figures(table, TUNING_FOODS, TUNING_DISHES)),
        ("components of the mixed dishes (DISH_COMPONENTS)", figures(table, components)),
        (
            "held-out wording set (held_out_wording)",
            figures(table, held_out_wording.HELD_OUT_FOODS, held_out_wording.HELD_OUT_DISHES),
        ),
    )
    for name, found in sets:
        print(report(name, found))


if __name__ == "__main__":
    main()
