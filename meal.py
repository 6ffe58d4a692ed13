"""The meal: a model's answer checked and tidied, counted from USDA SR28, and turned into JSON.

Made in one place (``build_analysis``: from a model's answer, from the items a caller names),
counted anew from the table (``ground_in_table``), read back from the cache (``from_cached``),
and turned into the contract's JSON in one place (``as_contract``), the food entry included.

The analysis and its items are ``TypedDict``s rather than dataclasses: the contract's JSON *is*
these dicts, so key order is insertion order, an optional field absent stays absent (never
``null``) and a whole number of grams stays ``40``, not ``40.0``, with no field-by-field
serializer to keep in step. "Not food" is a typed verdict (``NotFoodVerdict``), cached as the
same bytes as ever (``{"isFood":false}``) so old cache entries still read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict, cast

from errors import BadRequest, NotFood, ServiceError, UpstreamError
from nutrition import NUTRIENT_UNITS, FoodMatch, NutritionTable
from products import Product

# ---------------------------------------------------------------------------------------------
# The typed meal
# ---------------------------------------------------------------------------------------------


class Alternative(TypedDict):
    """A runner-up of a table match, for "did you mean"."""

    ndbNo: str
    usdaDescription: str
    kcalPer100g: float | None


class NutritionLabel(TypedDict):
    """What a nutrition facts panel in the photo says, as the model read it."""

    per: str  # "100g" or "serving"
    servingGrams: float | int | None
    calories: int
    protein: float | int
    carbs: float | int
    fat: float | int


class CalorieRange(TypedDict):
    """The calorie range, ``low <= calories <= high``."""

    low: int
    high: int


class Item(TypedDict):
    """One food on the plate, as the model estimated it or as the table counted it."""

    name: str
    grams: float | int
    calories: int
    protein: float | int
    carbs: float | int
    fat: float | int
    confidence: float
    description: NotRequired[str]
    cookingMethod: NotRequired[str]
    photos: NotRequired[list[int]]
    barcode: NotRequired[str]
    label: NotRequired[NutritionLabel]
    nutrients: NotRequired[dict[str, float | None]]
    ndbNo: NotRequired[str]
    usdaDescription: NotRequired[str]
    nutritionSource: NotRequired[str]
    portion: NotRequired[str]
    matchConfidence: NotRequired[float]
    alternatives: NotRequired[list[Alternative]]


class Totals(TypedDict):
    """A meal's calories and macronutrients."""

    calories: int
    protein: float | int
    carbs: float | int
    fat: float | int


class Analysis(TypedDict):
    """The analysis of one meal: the contract's ``analysis`` object, in its key order."""

    name: str
    calories: int
    protein: float | int
    carbs: float | int
    fat: float | int
    servingSize: str
    ingredients: list[str]
    confidence: float
    items: list[Item]
    caloriesRange: NotRequired[CalorieRange]
    nutrients: NotRequired[dict[str, float | None]]
    assumptions: list[str]
    suggestions: list[str]
    warnings: list[str]
    photoCount: NotRequired[int]
    model: NotRequired[str]
    promptVersion: NotRequired[str]


@dataclass(frozen=True)
class NotFoodVerdict:
    """The model's verdict that the photo shows no food; cached so a retry asks no model."""

    def refusal(self) -> NotFood:
        """The error the caller gets for it (422 ``not_food``)."""
        return NotFood("no food was found in this photo")


NOT_FOOD = NotFoodVerdict()
# How a not-food verdict is cached: the bytes every earlier version wrote.
NOT_FOOD_CACHED: dict[str, Any] = {"isFood": False}

# What an item must hold; the description and cooking method help the table, when they come.
ITEM_FIELDS = ("name", "grams", "calories", "protein", "carbs", "fat", "confidence")
# What every answer must hold; the totals may come as items or, from servers that ignore the
# schema, as top-level numbers.
REQUIRED_ANSWER_FIELDS = ("name", "servingSize", "ingredients", "confidence")
TOTAL_FIELDS = ("calories", "protein", "carbs", "fat")


def build_analysis(
    name: str,
    totals: Totals,
    serving_size: str,
    ingredients: list[str],
    confidence: float,
    items: list[Item],
    *,
    calories_range: CalorieRange | None = None,
    nutrients: dict[str, float | None] | None = None,
    assumptions: list[str] | None = None,
    suggestions: list[str] | None = None,
    warnings: list[str] | None = None,
) -> Analysis:
    """The one place an analysis is made, in the contract's key order; absent stays absent."""
    fields: dict[str, Any] = {
        "name": name,
        **totals,
        "servingSize": serving_size,
        "ingredients": ingredients,
        "confidence": confidence,
        "items": items,
    }
    if calories_range is not None:
        fields["caloriesRange"] = calories_range
    if nutrients is not None:
        fields["nutrients"] = nutrients
    fields["assumptions"] = assumptions or []
    fields["suggestions"] = suggestions or []
    fields["warnings"] = warnings or []
    return cast(Analysis, fields)


def as_contract(analysis: Analysis, entry_id: str | None = None) -> dict[str, Any]:
    """The one place an analysis becomes the contract's JSON object (with its saved entry's id)."""
    answer: dict[str, Any] = dict(analysis)
    if entry_id is not None:
        answer["entryId"] = entry_id
    return answer


def as_cached(verdict: Analysis | NotFoodVerdict) -> dict[str, Any]:
    """What the cache holds for a verdict: the contract's JSON, or ``{"isFood": false}``."""
    if isinstance(verdict, NotFoodVerdict):
        return dict(NOT_FOOD_CACHED)
    return as_contract(verdict)


def from_cached(stored: Mapping[str, Any]) -> Analysis | NotFoodVerdict:
    """The verdict a cache entry encodes: ``as_cached`` undone, once the entry is vetted."""
    if stored == NOT_FOOD_CACHED:
        return NOT_FOOD
    # The cache holds the contract's JSON in its written order: read back, it is the Analysis.
    return cast(Analysis, dict(stored))


# ---------------------------------------------------------------------------------------------
# The model's answer, checked and tidied
# ---------------------------------------------------------------------------------------------


# A number the model wrote as text: ASCII digits with an optional minus and decimal point, then
# the field's own unit if any ("450 kcal", "12.5 g", "92%"); "1e3", "1,5" or "2.5kg" are not read.
DECIMAL_TEXT = re.compile(
    r"\s*(-?(?:[0-9]+\.?[0-9]*|\.[0-9]+))\s*([a-z%]*)\s*", re.ASCII | re.IGNORECASE
)
MAX_NUMBER_TEXT = 30
ENERGY_UNIT = "kcal"
MASS_UNIT = "g"
PERCENT = "%"
# How much of any one string from the model is looked at; every text field keeps far less.
MAX_TEXT_READ = 1_000
# Bounds beyond which a model's estimate for one photographed meal is not believable.
MAX_CALORIES = 10_000
MAX_GRAMS = 2_000
MAX_NAME_LENGTH = 200
MAX_INGREDIENTS = 50
MAX_INGREDIENT_LENGTH = 100
MAX_ITEMS = 30
MAX_ITEM_GRAMS = 5_000
MAX_ASSUMPTIONS = 10
MAX_SUGGESTIONS = 3
MAX_STATEMENT_LENGTH = 200
MAX_ENERGY_GAP = 0.25
# What one meal holds: the meal's totals, and each item's grams, calories and macronutrients.
MEAL_LIMITS = (
    ("calories", MAX_CALORIES, ENERGY_UNIT),
    ("protein", MAX_GRAMS, MASS_UNIT),
    ("carbs", MAX_GRAMS, MASS_UNIT),
    ("fat", MAX_GRAMS, MASS_UNIT),
)
ITEM_LIMITS = (("grams", MAX_ITEM_GRAMS, MASS_UNIT), *MEAL_LIMITS)
RANGE_LIMITS = (("low", MAX_CALORIES, ENERGY_UNIT), ("high", MAX_CALORIES, ENERGY_UNIT))
MAX_PROBLEMS_SHOWN = 3
# How many photo numbers of an item are looked at; a set holds at most ten photos.
MAX_PHOTO_NUMBERS = 10
# A product code as products are looked up: EAN-13, or EAN-8.
BARCODE_PATTERN = re.compile(r"[0-9]{13}|[0-9]{8}", re.ASCII)
LABEL_BASES = ("100g", "serving")
# No food holds more energy than fat: 900 kcal per 100 g.
MAX_LABEL_KCAL = 900
# How sure an answer from a package's declared values is: the numbers are the maker's, the
# amount eaten is one serving.
PRODUCT_CONFIDENCE = 0.9
# Declared energy may differ from the measured by this much either way (EU and US label rules
# tolerate 20%; most products are within 10%).
DECLARED_ENERGY_TOLERANCE = 0.1


def normalise_analysis(raw: Mapping[str, Any], photo_count: int = 1) -> Analysis:
    """Check and tidy a model's analysis of ``photo_count`` photos into the contract's shape;
    refuse what is unusable.

    The totals are the sums of the items (the model's own totals are used only when it gave no
    items); the calorie range is widened to hold the total; a total that disagrees with the
    energy of its macronutrients is reported in ``warnings``.
    """
    if raw.get("isFood") is False:
        raise NotFood("no food was found in this photo")
    items = clean_items(raw.get("items"), photo_count)
    missing = [name for name in REQUIRED_ANSWER_FIELDS if name not in raw]
    if not items:
        missing += [name for name in TOTAL_FIELDS if name not in raw]
    if missing:
        raise UpstreamError(f"the vision model's answer lacks {', '.join(missing)}")
    name = clean_text(raw["name"], MAX_NAME_LENGTH)
    if not name:
        raise UpstreamError("the vision model's answer names no dish")
    totals = sum_items(items) if items else model_totals(raw)
    serving_size = clean_text(raw["servingSize"], MAX_NAME_LENGTH)
    ingredients = clean_ingredients(raw["ingredients"])
    confidence = clean_confidence(raw["confidence"])
    warnings = consistency_warnings(totals)
    listed = raw.get("items")
    if isinstance(listed, list) and len(listed) > MAX_ITEMS:
        warnings.append(
            f"the model listed {len(listed)} foods; the first {MAX_ITEMS} are kept and summed"
        )
    analysis = build_analysis(
        name,
        totals,
        serving_size,
        ingredients,
        confidence,
        items,
        calories_range=clean_range(raw.get("caloriesRange"), totals["calories"]),
        assumptions=clean_strings(raw.get("assumptions"), MAX_ASSUMPTIONS),
        suggestions=clean_strings(raw.get("suggestions"), MAX_SUGGESTIONS),
        warnings=warnings,
    )
    return believable(analysis, UpstreamError, "the vision model's answer")


def model_totals(raw: Mapping[str, Any]) -> Totals:
    """The totals as the model gave them, from servers that answer without items."""
    return {
        "calories": round(bounded_number(raw["calories"], "calories", MAX_CALORIES, ENERGY_UNIT)),
        "protein": grams(bounded_number(raw["protein"], "protein", MAX_GRAMS, MASS_UNIT)),
        "carbs": grams(bounded_number(raw["carbs"], "carbs", MAX_GRAMS, MASS_UNIT)),
        "fat": grams(bounded_number(raw["fat"], "fat", MAX_GRAMS, MASS_UNIT)),
    }


def clean_items(value: Any, photo_count: int = 1) -> list[Item]:
    """The foods on the plate, each checked like the totals."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise UpstreamError("the vision model's items are not a list")
    items: list[Item] = []
    for raw in value[:MAX_ITEMS]:
        if not isinstance(raw, dict):
            raise UpstreamError("the vision model's items are not objects")
        missing = [name for name in ITEM_FIELDS if name not in raw]
        if missing:
            raise UpstreamError(f"an item of the vision model's answer lacks {', '.join(missing)}")
        fields: dict[str, Any] = {
            "name": clean_text(raw["name"], MAX_NAME_LENGTH) or "unnamed food",
            **item_numbers(raw),
            "confidence": clean_confidence(raw["confidence"]),
            **described(raw),
        }
        photos = clean_photos(raw.get("photos"), photo_count)
        if photos:
            fields["photos"] = photos
        barcode = raw.get("barcode")
        if isinstance(barcode, str) and BARCODE_PATTERN.fullmatch(barcode):
            fields["barcode"] = barcode
        label = clean_label(raw.get("label"))
        if label is not None:
            fields["label"] = label
        items.append(cast(Item, fields))
    return items


def clean_label(value: Any) -> NutritionLabel | None:
    """A nutrition label the model read, when it is whole and believable; else None.

    Per 100 g, energy is at most 900 kcal and each macronutrient at most 100 g; per serving, the
    serving's grams are needed to scale it and it is held to one item's limits.
    """
    if not isinstance(value, dict) or value.get("per") not in LABEL_BASES:
        return None
    serving = value.get("servingGrams")
    serving_grams = json_number(serving) if serving is not None else None
    if value["per"] == "serving" and not (serving_grams and 0 < serving_grams <= MAX_ITEM_GRAMS):
        return None
    per_100g = value["per"] == "100g"
    limits = (
        ("calories", MAX_LABEL_KCAL if per_100g else MAX_CALORIES),
        *((name, 100 if per_100g else MAX_GRAMS) for name in ("protein", "carbs", "fat")),
    )
    numbers: dict[str, float] = {}
    for name, high in limits:
        number = json_number(value.get(name))
        if number is None or not 0 <= number <= high:
            return None
        numbers[name] = number
    return {
        "per": value["per"],
        "servingGrams": grams(serving_grams) if serving_grams else None,
        "calories": round(numbers["calories"]),
        "protein": grams(numbers["protein"]),
        "carbs": grams(numbers["carbs"]),
        "fat": grams(numbers["fat"]),
    }


def clean_photos(value: Any, photo_count: int) -> list[int]:
    """The photos (1 to ``photo_count``) that show an item; every photo shows it when one was sent.

    Numbers outside the set, or not whole, are dropped; what is left is sorted, each once.
    """
    if photo_count == 1:
        return [1]
    if not isinstance(value, list):
        return []
    return sorted(
        {
            number
            for number in value[:MAX_PHOTO_NUMBERS]
            if type(number) is int and 1 <= number <= photo_count
        }
    )


def in_upload_order(analysis: Analysis, positions: Sequence[Sequence[int]]) -> Analysis:
    """The analysis with each item's photos renumbered from the fixed order to the caller's.

    ``positions[i]`` lists where the caller put the photo the model saw as number ``i + 1`` (a
    photo sent twice is at two places). A number the set does not have is dropped.
    """
    items: list[Item] = []
    for item in analysis["items"]:
        if "photos" in item:
            numbers = {
                place
                for number in item["photos"]
                if 1 <= number <= len(positions)
                for place in positions[number - 1]
            }
            item = cast(Item, {**item, "photos": sorted(numbers)})
        items.append(item)
    return cast(Analysis, {**analysis, "items": items})


def item_numbers(raw: Mapping[str, Any]) -> dict[str, float | int]:
    """An item's grams, calories and macronutrients, each within what one meal holds."""
    numbers: dict[str, float | int] = {}
    for name, high, unit in ITEM_LIMITS:
        number = bounded_number(raw[name], f"item {name}", high, unit)
        numbers[name] = round(number) if unit == ENERGY_UNIT else grams(number)
    return numbers


def described(raw: Mapping[str, Any]) -> dict[str, str]:
    """An item's table-style description and cooking method, when the model gave them."""
    found = {}
    for name in ("description", "cookingMethod"):
        value = raw.get(name)
        if isinstance(value, str) and value.strip():
            found[name] = clean_text(value, MAX_NAME_LENGTH)
    return found


def sum_items(items: list[Item]) -> Totals:
    """The meal's totals: the sums over its items."""
    return {
        "calories": sum(item["calories"] for item in items),
        "protein": grams(sum(item["protein"] for item in items)),
        "carbs": grams(sum(item["carbs"] for item in items)),
        "fat": grams(sum(item["fat"] for item in items)),
    }


def clean_range(value: Any, calories: int) -> CalorieRange | None:
    """The calorie range, ordered and widened so that ``low <= calories <= high``."""
    if not isinstance(value, dict) or "low" not in value or "high" not in value:
        return None
    low = round(bounded_number(value["low"], "calorie range", MAX_CALORIES, ENERGY_UNIT))
    high = round(bounded_number(value["high"], "calorie range", MAX_CALORIES, ENERGY_UNIT))
    low, high = min(low, high), max(low, high)
    return {"low": min(low, calories), "high": max(high, calories)}


def clean_strings(value: Any, limit: int) -> list[str]:
    """Up to ``limit`` short, single-line strings."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise UpstreamError("the vision model's answer holds a non-list where a list belongs")
    texts = (
        " ".join(item[:MAX_TEXT_READ].split())[:MAX_STATEMENT_LENGTH]
        for item in value
        if isinstance(item, str)
    )
    return [text for text in texts if text][:limit]


def consistency_warnings(totals: Mapping[str, Any]) -> list[str]:
    """Say so when the calories and the macronutrients' energy (4/4/9 kcal per g) disagree."""
    energy = 4 * totals["protein"] + 4 * totals["carbs"] + 9 * totals["fat"]
    calories = totals["calories"]
    if max(calories, energy) == 0:
        return []
    gap = abs(energy - calories) / max(calories, 1)
    if gap <= MAX_ENERGY_GAP:
        return []
    return [
        f"calories ({calories} kcal) differ from the energy of the macronutrients "
        f"({round(energy)} kcal, 4/4/9 kcal per g) by {round(gap * 100)}%"
    ]


def parse_number(value: Any, unit: str = "") -> float | None:
    """A finite number from a JSON number, or from plain decimal text in the field's own unit.

    Text is read only as ASCII digits with an optional minus and decimal point, so that "1e3",
    "1,5", "2.5kg", "0x10" or another script's digits are never taken for some other number.
    """
    if isinstance(value, str):
        return decimal_text(value, unit)
    return json_number(value)


def json_number(value: Any) -> float | None:
    """A JSON number (not a boolean) as a finite float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def decimal_text(text: str, unit: str) -> float | None:
    """The number in a short plain decimal text, bare or in ``unit``, else None."""
    found = DECIMAL_TEXT.fullmatch(text) if len(text) <= MAX_NUMBER_TEXT else None
    if found is None or found.group(2).lower() not in ("", unit):
        return None
    return json_number(float(found.group(1)))


def bounded_number(value: Any, name: str, high: float, unit: str) -> float:
    """A non-negative, believable number (text only plain decimal in ``unit``), or UpstreamError."""
    number = parse_number(value, unit)
    if number is None:
        shown = str(value)[:MAX_NUMBER_TEXT]
        raise UpstreamError(f"the vision model's {name} ({shown!r}) is not a number in {unit}")
    if number < 0 or number > high:
        raise UpstreamError(f"the vision model's {name} ({number:g}) is not believable")
    return number


def beyond_limits(analysis: Mapping[str, Any]) -> list[str]:
    """Each number of a final answer outside the limits a model's own estimate is held to.

    Whoever counted the answer (the model, the table, or anything later that changes numbers),
    the same bounds hold, so no way of computing a meal serves what no meal holds.
    """
    problems = numbers_outside(analysis, MEAL_LIMITS, "the meal's")
    items = analysis.get("items", [])
    if not isinstance(items, list):
        return [*problems, "the items are not a list"]
    for number, item in enumerate(items, 1):
        problems += numbers_outside(item, ITEM_LIMITS, f"item {number}'s")
    calories_range = analysis.get("caloriesRange")
    if calories_range is not None:
        problems += numbers_outside(calories_range, RANGE_LIMITS, "the calorie range's")
    return problems


def numbers_outside(
    values: Any, limits: tuple[tuple[str, float, str], ...], whose: str
) -> list[str]:
    """The fields of ``values`` that are not JSON numbers from 0 to their limit, in words."""
    if not isinstance(values, Mapping):
        return [f"{whose} numbers are not an object"]
    problems = []
    for name, high, unit in limits:
        number = json_number(values.get(name))
        if number is None:
            problems.append(f"{whose} {name}: not a number")
        elif not 0 <= number <= high:
            problems.append(f"{whose} {name}: {number:.10g} {unit}, not within 0 to {high} {unit}")
    return problems


def believable(
    analysis: Analysis,
    refusal: type[ServiceError] = UpstreamError,
    whose: str = "the analysis",
) -> Analysis:
    """The answer unchanged when its numbers are within one meal's limits, else ``refusal``."""
    problems = beyond_limits(analysis)
    if problems:
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
        raise refusal(f"{whose}: not believable as one meal ({shown})")
    return analysis


def grams(value: float) -> float | int:
    """Grams with at most one decimal; a whole number stays whole (``40``, not ``40.0``)."""
    rounded = round(float(value), 1)
    return int(rounded) if rounded.is_integer() else rounded


def clean_text(value: Any, limit: int) -> str:
    """A single-line string of at most ``limit`` characters."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise UpstreamError("the vision model's answer holds a non-text value where text belongs")
    return " ".join(value[:MAX_TEXT_READ].split())[:limit]


def clean_ingredients(value: Any) -> list[str]:
    """A list of distinct ingredient names; a comma-separated string is accepted too."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        raise UpstreamError("the vision model's ingredients are not a list")
    kept: dict[str, str] = {}
    for item in value:
        if len(kept) == MAX_INGREDIENTS:
            break
        if isinstance(item, str):
            text = " ".join(item[:MAX_TEXT_READ].split())[:MAX_INGREDIENT_LENGTH]
            if text:
                kept.setdefault(text.lower(), text)
    return list(kept.values())


def clean_confidence(value: Any) -> float:
    """A confidence in [0, 1]; a percentage such as 92 or "92%" is read as 0.92."""
    number = parse_number(value, PERCENT)
    if number is None:
        raise UpstreamError("the vision model's confidence is not a number")
    looks_like_percent = (isinstance(value, str) and "%" in value) or number.is_integer()
    if 1 < number <= 100 and looks_like_percent:
        number /= 100
    return round(min(1.0, max(0.0, number)), 2)


# The fields of a stored analysis that the model answer's checks must leave as they are.
CHECKED_FIELDS = ("name", *TOTAL_FIELDS, "servingSize", "ingredients", "confidence")
# The longest text a stored analysis holds: a name, an SR28 description, a warning.
MAX_STORED_TEXT = 2 * MAX_STATEMENT_LENGTH
MAX_STORED_DEPTH = 6


def stored_analysis_is_sound(stored: Mapping[str, Any], photo_count: int | None = None) -> bool:
    """Whether an analysis read back from the store is one the service could have written.

    It passes the checks a model's answer passes, unchanged by them, and holds nothing else
    beyond them: no negative or endless number, no text longer than the service writes, no
    photo number outside its set (of ``photo_count`` photos, when the reader knows the set).
    """
    if stored == NOT_FOOD_CACHED:
        return True
    count = stored.get("photoCount", 1)
    if type(count) is not int or not 1 <= count <= MAX_PHOTO_NUMBERS:
        return False
    if photo_count is not None and count != photo_count:
        return False
    try:
        checked = normalise_analysis(stored, count)
    except (UpstreamError, NotFood):
        return False
    items = stored.get("items")
    if not isinstance(items, list) or len(items) != len(checked["items"]):
        return False
    checked_items: list[Mapping[str, Any]] = list(checked["items"])
    same_items = all(
        item.get(name) == clean.get(name)
        for item, clean in zip(items, checked_items, strict=True)
        for name in (*ITEM_FIELDS, "photos")
    )
    answer = as_contract(checked)
    same = all(stored.get(name) == answer[name] for name in CHECKED_FIELDS)
    return same and same_items and is_plain_value(stored, MAX_STORED_DEPTH)


def is_plain_value(value: Any, depth: int) -> bool:
    """Whether a stored value holds only short texts, finite non-negative numbers, shallow nests."""
    if isinstance(value, dict):
        return depth > 0 and all(
            isinstance(key, str) and len(key) <= MAX_NAME_LENGTH and is_plain_value(item, depth - 1)
            for key, item in value.items()
        )
    if isinstance(value, list):
        return depth > 0 and all(is_plain_value(item, depth - 1) for item in value)
    if isinstance(value, str):
        return len(value) <= MAX_STORED_TEXT
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isfinite(value) and value >= 0
    return value is None or isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Counted from USDA SR28 (the table in nutrition.py)
# ---------------------------------------------------------------------------------------------


def ground_in_table(
    analysis: Analysis,
    table: NutritionTable | None,
    products: Mapping[str, Product] | None = None,
) -> Analysis:
    """Each item counted from its best source; the totals (and ``nutrients``) their sums.

    The sources, most trusted first: the product its barcode names (Open Food Facts), the
    nutrition label read in the photo, the SR28 table, else the model's own numbers; each item
    says which in ``nutritionSource``. The counted analysis is the model's with its numbers
    replaced, so its fields keep their places and ``nutrients`` comes last, where the contract
    has always had it on this path.
    """
    products = products or {}
    labelled = any("label" in item for item in analysis["items"])
    if not analysis["items"] or (table is None and not products and not labelled):
        return analysis
    items = [count_item(item, table, products) for item in analysis["items"]]
    totals = sum_items(items)
    grounded = cast(Analysis, {**analysis, **totals, "items": items})
    grounded["nutrients"] = total_nutrients(items)
    if "caloriesRange" in analysis:
        counted_range = clean_range(analysis["caloriesRange"], totals["calories"])
        if counted_range is not None:
            grounded["caloriesRange"] = counted_range
    # The model's totals' consistency gives way to the counted totals'; other warnings stay.
    stale = consistency_warnings(analysis)
    kept = [warning for warning in analysis["warnings"] if warning not in stale]
    grounded["warnings"] = consistency_warnings(totals) + kept
    return grounded


def final_analysis(
    analysis: Analysis,
    table: NutritionTable | None,
    products: Mapping[str, Product] | None = None,
) -> Analysis:
    """The model's analysis counted from its sources, refused as absurd past one meal's limits."""
    return believable(
        ground_in_table(analysis, table, products), whose="the analysis counted from its sources"
    )


def count_item(item: Item, table: NutritionTable | None, products: Mapping[str, Product]) -> Item:
    """The item counted from the most trusted source it has (see ``ground_in_table``)."""
    product = products.get(item.get("barcode", ""))
    if product is not None:
        return cast(Item, {**item, **product_numbers(product, item["grams"])})
    label = item.get("label")
    if label is not None:
        return cast(Item, {**item, **label_numbers(label, item["grams"])})
    if table is not None:
        return ground_item(item, table)
    return cast(Item, {**item, "nutritionSource": "model"})


def product_numbers(product: Product, weight: float) -> dict[str, Any]:
    """A product's values per 100 g scaled to the grams eaten."""
    return {
        **scaled_numbers(product.per_100g, weight / 100),
        "nutrients": {
            name: round(value * weight / 100, 1)
            if (value := product.per_100g.get(name)) is not None
            else None
            for name in NUTRIENT_UNITS
        },
        "nutritionSource": "openfoodfacts",
    }


def label_numbers(label: NutritionLabel, weight: float) -> dict[str, Any]:
    """A nutrition label's values scaled to the grams eaten: per 100 g, or per serving."""
    serving = label["servingGrams"]
    factor = weight / 100 if label["per"] == "100g" or not serving else weight / serving
    return {**scaled_numbers(cast(Mapping[str, float], label), factor), "nutritionSource": "label"}


def scaled_numbers(values: Mapping[str, float | None], factor: float) -> dict[str, Any]:
    """Calories (whole) and macronutrients (one decimal) of ``values`` times ``factor``."""
    return {
        "calories": round((values.get("calories") or 0) * factor),
        **{name: grams((values.get(name) or 0) * factor) for name in ("protein", "carbs", "fat")},
    }


def products_analysis(shown: Sequence[tuple[Product, list[int]]], photo_count: int) -> Analysis:
    """The answer for photos that each show a product found by its barcode, made without a model.

    One item per product (with the photos that show it), one serving of each: the product's
    serving size, else 100 g and an assumption that says so.
    """
    items: list[Item] = []
    assumptions = ["one serving of each product, as its package declares it"]
    for product, photos in shown:
        name = clean_text(
            f"{product.name} ({product.brand})" if product.brand else product.name,
            MAX_NAME_LENGTH,
        )
        weight = product.serving_grams or 100
        if not product.serving_grams:
            assumptions.append(f"{name}: no serving size is known; 100 g assumed")
        # The numbers' places kept for count_item, which fills them from the product.
        shown_item = {
            "name": name,
            "grams": grams(weight),
            **dict.fromkeys(TOTAL_FIELDS, 0),
            "confidence": PRODUCT_CONFIDENCE,
            "photos": photos,
            "barcode": product.barcode,
        }
        items.append(count_item(cast(Item, shown_item), None, {product.barcode: product}))
    totals = sum_items(items)
    analysis = build_analysis(
        clean_text(", ".join(item["name"] for item in items), MAX_NAME_LENGTH),
        totals,
        clean_text(
            ", ".join(
                product.serving_size or f"{grams(product.serving_grams or 100)} g"
                for product, _ in shown
            ),
            MAX_NAME_LENGTH,
        ),
        [],
        PRODUCT_CONFIDENCE,
        items,
        calories_range={
            "low": round(totals["calories"] * (1 - DECLARED_ENERGY_TOLERANCE)),
            "high": round(totals["calories"] * (1 + DECLARED_ENERGY_TOLERANCE)),
        },
        nutrients=total_nutrients(items),
        assumptions=assumptions[:MAX_ASSUMPTIONS],
        warnings=consistency_warnings(totals),
    )
    analysis["photoCount"] = photo_count
    return believable(analysis, UpstreamError, "the products' declared values")


def ground_item(item: Item, table: NutritionTable) -> Item:
    """The item with SR28's numbers when its description matches a food, else the model's."""
    found = table.match(item.get("description") or item["name"], method=item.get("cookingMethod"))
    if found is None:
        return cast(Item, {**item, "nutritionSource": "model"})
    grounded = {**item, **counted(table, found.ndb_no, item["grams"]), **match_fields(found)}
    return cast(Item, grounded)


def counted(table: NutritionTable, ndb_no: str, weight: float) -> dict[str, Any]:
    """SR28's per-100-g values scaled to the grams, with a household portion when one fits."""
    values = table.nutrients(ndb_no, weight)
    food = table.food(ndb_no)
    found: dict[str, Any] = {
        "calories": int(values["calories"]),
        **{name: grams(values[name]) for name in ("protein", "carbs", "fat")},
        "nutrients": dict(values["nutrients"]),
        "ndbNo": ndb_no,
        "usdaDescription": food.description if food else "",
        "nutritionSource": "usda-sr28",
    }
    portion = table.portion(ndb_no, weight)
    if portion:
        found["portion"] = portion
    return found


def match_fields(found: FoodMatch) -> dict[str, Any]:
    """How sure the match is, and the runners-up an app can offer as "did you mean"."""
    return {
        "matchConfidence": round(found.confidence, 2),
        "alternatives": [
            {
                "ndbNo": other.ndb_no,
                "usdaDescription": other.description,
                "kcalPer100g": other.kcal_per_100g,
            }
            for other in found.alternatives
        ],
    }


def total_nutrients(items: list[Item]) -> dict[str, float | None]:
    """The sums over the grounded items; None for a nutrient none of them has a value for."""
    totals: dict[str, float | None] = {}
    for name in NUTRIENT_UNITS:
        values = [
            value for item in items if (value := item.get("nutrients", {}).get(name)) is not None
        ]
        totals[name] = round(sum(values), 1) if values else None
    return totals


# ---------------------------------------------------------------------------------------------
# The items a caller names (POST /nutrition)
# ---------------------------------------------------------------------------------------------


def nutrition_analysis(table: NutritionTable, asked: list[Mapping[str, Any]]) -> Analysis:
    """The analysis of the items a caller names or picks, counted from the table alone."""
    items = [nutrition_item(table, number, item) for number, item in enumerate(asked, 1)]
    totals = sum_items(items)
    analysis = build_analysis(
        ", ".join(item["name"] for item in items)[:MAX_NAME_LENGTH],
        totals,
        ", ".join(item.get("portion") or f"{item['grams']} g" for item in items),
        [item["name"] for item in items],
        min(item["confidence"] for item in items),
        items,
        nutrients=total_nutrients(items),
        warnings=consistency_warnings(totals),
    )
    return believable(analysis, BadRequest, "the items' grams")


def nutrition_item(table: NutritionTable, number: int, asked: Mapping[str, Any]) -> Item:
    """One item of ``POST /nutrition``: the food picked by ``ndbNo``, or matched by its name."""
    weight = json_number(asked.get("grams"))
    if weight is None or not 0 <= weight <= MAX_ITEM_GRAMS:
        raise BadRequest(
            f"item {number}: grams must be a JSON number (not text) from 0 to {MAX_ITEM_GRAMS}"
        )
    ndb_no, name = asked.get("ndbNo"), asked.get("name")
    if isinstance(ndb_no, str) and ndb_no:
        food = table.food(ndb_no)
        if food is None:
            raise BadRequest(f"item {number}: no USDA SR28 food has ndbNo {ndb_no[:10]!r}")
        label = clean_text(name, MAX_NAME_LENGTH) if isinstance(name, str) else ""
        picked = {
            "name": label or food.description,
            "grams": grams(weight),
            "confidence": 1.0,
            **counted(table, ndb_no, weight),
            "matchConfidence": 1.0,
        }
        return cast(Item, picked)
    if not isinstance(name, str) or not name.strip():
        raise BadRequest(f"item {number}: give a name or an ndbNo")
    method = asked.get("cookingMethod")
    name = clean_text(name, MAX_NAME_LENGTH)
    method = clean_text(method, MAX_NAME_LENGTH) if isinstance(method, str) else None
    found = table.match(name, method=method)
    if found is None:
        raise BadRequest(
            f"item {number}: no USDA SR28 food matches {name[:60]!r}; pick one with GET /foods?q="
        )
    matched = {
        "name": clean_text(name, MAX_NAME_LENGTH),
        "grams": grams(weight),
        "confidence": round(found.confidence, 2),
        **counted(table, found.ndb_no, weight),
        **match_fields(found),
    }
    return cast(Item, matched)


# ---------------------------------------------------------------------------------------------
# The User Service's food entry
# ---------------------------------------------------------------------------------------------


# The contract's fields of an entry, then the richer analysis, which a User Service that does not
# know those fields ignores.
ENTRY_FIELDS = (
    "name",
    "calories",
    "protein",
    "carbs",
    "fat",
    "servingSize",
    "ingredients",
    "confidence",
)
ENTRY_DETAIL_FIELDS = (
    "items",
    "nutrients",
    "caloriesRange",
    "assumptions",
    "suggestions",
    "warnings",
    "photoCount",
    "model",
    "promptVersion",
)


def food_entry(
    analysis: Analysis, user_id: str, digest: str, digests: Sequence[str]
) -> dict[str, Any]:
    """The entry the User Service stores: the contract's fields, then the richer analysis.

    ``digest`` is the photos' set digest (a single photo's own), ``digests`` each photo's.
    """
    answer = as_contract(analysis)
    return {
        "userId": user_id,
        **{name: answer[name] for name in ENTRY_FIELDS},
        "source": "image-analysis",
        "imageHash": digest,
        "imageHashes": list(digests),
        **{name: answer[name] for name in ENTRY_DETAIL_FIELDS if name in answer},
    }
