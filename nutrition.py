"""USDA SR28 nutrition table: load the ASCII files, match food descriptions, compute nutrients.

Pure and Flask-free: `NutritionTable.load(folder)` reads USDA's SR28 files once, builds an SQLite
FTS5 index, and answers `match`, `nutrients`, `portion`, `food` and `search`. Raises
`NutritionDataError` when the folder is missing a file, unreadable or malformed.
"""

from __future__ import annotations

import hashlib
import lzma
import math
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

from sqlite_connections import ProcessConnections

# --- constants -------------------------------------------------------------------------------

#: Below this confidence `match` answers None and callers keep the model's own numbers.
MATCH_THRESHOLD: Final = 0.5

#: The extra nutrients `nutrients()` reports, with their units as SR28's NUTR_DEF gives them.
#: A value is None when USDA has no figure for that food.
NUTRIENT_UNITS: Final[Mapping[str, str]] = {
    "fiber": "g",
    "sugars": "g",
    "saturatedFat": "g",
    "cholesterol": "mg",
    "sodium": "mg",
    "potassium": "mg",
    "calcium": "mg",
    "iron": "mg",
    "vitaminC": "mg",
    "vitaminD": "µg",
}

SOURCE: Final = "usda-sr28"

# The files read (USDA's SR28 documentation, sr28_doc.pdf, describes each).
_FOOD_DES, _FD_GROUP, _ABBREV, _NUTR_DEF, _WEIGHT = (
    "FOOD_DES.txt",
    "FD_GROUP.txt",
    "ABBREV.txt",
    "NUTR_DEF.txt",
    "WEIGHT.txt",
)
_ABBREV_COLUMNS = "ABBREV.columns"

# Our key -> (ABBREV.columns name, NUTR_DEF Nutr_No that gives its unit).
_MACRO_COLUMNS: Final = {
    "calories": ("Energ_Kcal", "208"),
    "protein": ("Protein_(g)", "203"),
    "fat": ("Lipid_Tot_(g)", "204"),
    "carbs": ("Carbohydrt_(g)", "205"),
}
_NUTRIENT_COLUMNS: Final = {
    "fiber": ("Fiber_TD_(g)", "291"),
    "sugars": ("Sugar_Tot_(g)", "269"),
    "saturatedFat": ("FA_Sat_(g)", "606"),
    "cholesterol": ("Cholestrl_(mg)", "601"),
    "sodium": ("Sodium_(mg)", "307"),
    "potassium": ("Potassium_(mg)", "306"),
    "calcium": ("Calcium_(mg)", "301"),
    "iron": ("Iron_(mg)", "303"),
    "vitaminC": ("Vit_C_(mg)", "401"),
    "vitaminD": ("Vit_D_µg", "328"),
}
_TENTH = Decimal("0.1")
_WHOLE = Decimal(1)

# --- errors ----------------------------------------------------------------------------------


class NutritionDataError(Exception):
    """The SR28 folder is missing a file, unreadable or malformed; the message says which."""


# The SR28 files this repository carries, xz-compressed, with the SHA-256 of each as USDA
# publishes it (SHA256SUMS).
BUNDLED_SR28: Final = Path(__file__).resolve().with_name("usda-sr28")


_CHECKSUMS = "SHA256SUMS"


def unpack_sr28(bundle: Path, folder: Path) -> Path:
    """The bundled files written into ``folder`` as USDA publishes them, each checksum checked."""
    folder.mkdir(parents=True, exist_ok=True)
    checksums = _checksums(bundle)
    for name in checksums:
        (folder / name).write_bytes(_read_bytes(bundle, name, checksums))
    return folder


def _checksums(folder: Path) -> dict[str, str]:
    """File name -> SHA-256 from the folder's SHA256SUMS, or {} when it has none."""
    try:
        text = (folder / _CHECKSUMS).read_text(encoding="ascii")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise NutritionDataError(
            f"USDA SR28 folder {folder}: {_CHECKSUMS} is unreadable ({error})"
        ) from None
    checksums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not re.fullmatch(r"[0-9a-f]{64}", fields[0]):
            raise NutritionDataError(
                f"USDA SR28 folder {folder}: {_CHECKSUMS}:{number}: expected a SHA-256 and a name"
            )
        checksums[fields[1].lstrip("*")] = fields[0]
    return checksums


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Food:
    """One SR28 food: its description and the per-100-g values the service uses."""

    ndb_no: str
    description: str
    common_name: str
    group: str
    kcal_per_100g: int
    per_100g: Mapping[str, float | None] = field(repr=False)


@dataclass(frozen=True, slots=True)
class Alternative:
    """Another candidate for a description, for a "did you mean"."""

    ndb_no: str
    description: str
    kcal_per_100g: int


@dataclass(frozen=True, slots=True)
class FoodMatch:
    """The SR28 food chosen for a description, how sure the choice is, and the runners-up."""

    ndb_no: str
    description: str
    kcal_per_100g: int
    confidence: float
    alternatives: tuple[Alternative, ...] = ()


@dataclass(frozen=True, slots=True)
class _Measure:
    amount: float
    description: str
    grams: float


# --- reading USDA's ASCII layout -------------------------------------------------------------


def _read_bytes(folder: Path, name: str, checksums: Mapping[str, str]) -> bytes:
    """A file as USDA publishes it: ``name``, else ``name.xz`` unpacked; its checksum checked."""
    path = folder / name
    try:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            packed = folder / f"{name}.xz"
            raw = lzma.decompress(packed.read_bytes())
    except FileNotFoundError:
        raise NutritionDataError(f"USDA SR28 folder {folder}: {name} is missing") from None
    except OSError as error:
        raise NutritionDataError(
            f"USDA SR28 folder {folder}: {name} is unreadable ({error.strerror})"
        ) from None
    except lzma.LZMAError:
        raise NutritionDataError(
            f"USDA SR28 folder {folder}: {name}.xz is not xz-compressed data"
        ) from None
    expected = checksums.get(name)
    if expected is not None and hashlib.sha256(raw).hexdigest() != expected:
        raise NutritionDataError(
            f"USDA SR28 folder {folder}: {name}'s SHA-256 is not the one in {_CHECKSUMS}"
        )
    return raw


def _decode(folder: Path, name: str, raw: bytes) -> str:
    if name != _ABBREV_COLUMNS:
        return raw.decode("latin-1")  # SR28's text files; every byte is a character
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NutritionDataError(f"USDA SR28 folder {folder}: {name} is not UTF-8 text") from None


def _records(
    folder: Path, name: str, text: str, fields: int, *, unquote: bool = True
) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields, with the ~ text delimiters removed if asked) for each line."""
    # Split on "\n" only: str.splitlines would also break at Latin-1's \x85 and \x1c-\x1e.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line:
            continue
        values = line.split("^")
        if len(values) != fields:
            raise NutritionDataError(
                f"USDA SR28 folder {folder}: {name}:{number}: "
                f"expected {fields} ^-separated fields, found {len(values)}"
            )
        if line.count("~") % 2:
            raise NutritionDataError(
                f"USDA SR28 folder {folder}: {name}:{number}: a ~text~ field is not closed"
            )
        if unquote:
            values = [value[1:-1] if value[:1] == "~" else value for value in values]
        yield number, values


def _key(folder: Path, name: str, number: int, value: str) -> str:
    if len(value) != 5 or not value.isdigit() or not value.isascii():
        raise NutritionDataError(
            f"USDA SR28 folder {folder}: {name}:{number}: NDB_No {value!r} is not 5 digits"
        )
    return value


def _numbers(folder: Path, name: str, number: int, values: Sequence[str]) -> list[float | None]:
    """Non-negative numbers or None for empty fields; NutritionDataError names a bad one."""
    try:
        parsed: list[float | None] | None = [float(value) if value else None for value in values]
    except ValueError:
        parsed = None
    if parsed is not None:
        present = [value for value in parsed if value is not None]
        # fsum is finite only when every value is; min catches a negative one.
        if not present or (math.isfinite(math.fsum(present)) and min(present) >= 0):
            return parsed
    return [_number(folder, name, number, value) for value in values]  # raises at the bad one


def _number(folder: Path, name: str, number: int, value: str) -> float | None:
    if value == "":
        return None
    try:
        parsed = float(value)
    except ValueError:
        parsed = math.nan
    if not math.isfinite(parsed) or parsed < 0:
        raise NutritionDataError(
            f"USDA SR28 folder {folder}: {name}:{number}: {value!r} is not a number"
        )
    return parsed


# --- text normalisation shared by the index and the ranking ----------------------------------


def _stem(word: str) -> str:
    """A light plural stemmer mapping singular and plural alike: cookie(s), cherry/cherries."""
    if len(word) <= 3 or "-" in word or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-1]
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ie"
    if word.endswith(("oes", "ches", "shes", "xes", "sses")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def _stems(words: str) -> frozenset[str]:
    return frozenset(_stem(word) for word in words.split())


# Vision-model wordings mapped onto SR28's, on both sides, before stemming.
_PHRASES: Final = {
    "french fried": "frenchfry",
    "french fries": "frenchfry cooked",
    "fries": "frenchfry cooked",
    "soft drink": "carbonated cola",
    "soda": "carbonated cola",
    "coke": "carbonated cola",
    "black coffee": "coffee brewed",
    "ketchup": "catsup",
    "yoghurt": "yogurt",
    "donut": "doughnut",
    "donuts": "doughnuts",
    "oatmeal": "oats cereal",
    "porridge": "oats cereal",
    "sunny side up": "fried",
    "over easy": "fried",
    "over medium": "fried",
    "soft boiled": "boiled",
    "soft-boiled": "boiled",
    "angel hair": "pasta",
    "bow tie": "pasta",
    "hard boiled": "hard-boiled",
    "garbanzo": "chickpeas",
    "garbanzos": "chickpeas",
    "stir fried": "stir-fried",
    "sautéed": "sauteed",
    "dry heat": "dryheat",
    "moist heat": "moistheat",
    "fast food": "fastfood",
    "fast foods": "fastfood",
    "commercially prepared": "commercial",
    "salad dressing": "saladdressing",
    "chocolate bar": "chocolate candies",
    "candy bar": "candies",
    "calcium propionate": "calciumpropionate",  # a preservative, and SR28's "ca prop"
    "ca prop": "calciumpropionate",
    # everyday names of foods SR28 words otherwise
    "half and half": "halfandhalf cream",
    "half-and-half": "halfandhalf cream",
    "soy milk": "soymilk",
    "cherry tomato": "tomato",
    "cherry tomatoes": "tomatoes",
    "grape tomato": "tomato",
    "grape tomatoes": "tomatoes",
    "baby spinach": "spinach",
    "bean sprout": "mung bean sprouted",
    "bean sprouts": "mung beans sprouted",
    "tomato sauce": "tomato products canned sauce",
    "sushi rice": "rice white short-grain cooked",
    "nori": "seaweed laver",
    "bell pepper": "pepper sweet",
    "whole wheat": "whole-wheat",
    "yellow squash": "squash summer crookneck",
    "snow peas": "peas edible-podded",
    "black-eyed peas": "cowpeas blackeyes",
    "black eyed peas": "cowpeas blackeyes",
    "ghee": "butter oil anhydrous",
    "whole grain": "whole-grain",
    "jasmine rice": "rice white long-grain",
    "basmati rice": "rice white long-grain",
    "toast": "bread toasted",  # a slice of toast is toasted bread
    "french toast": "frenchtoast",
    "hamburger bun": "rolls hamburger",
    "hamburger buns": "rolls hamburger",
    "hot dog bun": "rolls hotdog",
    "hot dog buns": "rolls hotdog",
    "bell peppers": "peppers sweet",
    "string cheese": "mozzarella low moisture part-skim",
    "cheese stick": "mozzarella low moisture part-skim",
    "cheese sticks": "mozzarella low moisture part-skim",
    # skin as a qualifier of a cut, in SR28's words
    "skinless": "meat only",
    "skin-on": "meat and skin",
    "with peel": "with skin",
    # fat-free in SR28's word
    "fat-free": "nonfat",
    "low fat": "lowfat",
    "fat free": "nonfat",
    "0% fat": "nonfat",
    "0% milkfat": "nonfat",
}
_PHRASE = re.compile(
    r"\b(?:" + "|".join(sorted(map(re.escape, _PHRASES), key=len, reverse=True)) + r")\b"
)
_CANONICAL: Final = {
    "bbq": "barbecue",
    "scallion": "onion",
    "prawn": "shrimp",
    "aubergine": "eggplant",
    "courgette": "zucchini",
    "mince": "ground",
    "minced": "ground",
    "omelette": "omelet",
    "chilli": "chili",
    "veggie": "vegetable",
    "filet": "fillet",
    "salted": "salt",
    "unsalted": "unsalt",
    "toast": "toasted",
    "pearl": "pearled",
    "crawfish": "crayfish",
    "calamari": "squid",
    # pasta shapes SR28 counts as its one "Pasta"
    "linguine": "pasta",
    "fettuccine": "pasta",
    "rigatoni": "pasta",
    "fusilli": "pasta",
    "orzo": "pasta",
    "ziti": "pasta",
    "tagliatelle": "pasta",
    "burger": "patty",
    "low-fat": "lowfat",
    "0%": "nonfat",  # a burger on a plate is the patty: "Beef, ground, ..., patty"
}
# Words about the serving, not the food: no weight in the match, and no cost as SR28 extras.
_FILLERS: Final = _stems(
    "a an the of with and or in on to for some piece pieces serving portion plate bowl glass "
    "cup mug bottle can side small medium large homemade home made typical style photo picture "
    "image food meal dish fresh cut sliced slices slice chopped topped served fillet scoop "
    "handful wedge chunk table tray spoon fork knife napkin hand person background wooden "
    "one two three four five six half-dozen dozen few couple crumbled crumbles diced cubed "
    "halved quartered pitted deveined shelled floret cubes bone halves half shavings pat "
    "slivers"
)
# Words that weigh little in the match: "plain yogurt" should still find an unplain one.
_SOFT: Final = _stems("plain regular whole shredded peeled")
# How a food was prepared; these steer the raw/cooked choice, not the text match.
_COOKED_WORDS: Final = _stems(
    "cooked roasted boiled fried baked broiled grilled braised stewed steamed prepared toasted "
    "scrambled poached heated microwaved simmered sauteed stir-fried pan-fried deep-fried "
    "hard-boiled dryheat moistheat smoked barbecued rotisserie omelet oven-heated pan-broiled "
    "microwave seared pan-seared charred air-fried blackened"
)
_RAW_WORDS: Final = _stems("raw uncooked unprepared")
_WEAK: Final = _SOFT | _COOKED_WORDS | _RAW_WORDS
# Forms sold to be made into the food: powders, concentrates, mixes.
_PROCESSED_WORDS: Final = _stems(
    "dry dehydrated powder concentrate condensed evaporated undiluted mix freeze-dried dough"
)
# The close SR28 wordings of a method a model names, best first.
_METHOD_KIN: Final = {
    "grilled": ("grilled", "broiled", "roasted", "dryheat", "pan-broiled"),
    "broiled": ("broiled", "grilled", "pan-broiled", "roasted", "dryheat"),
    "roasted": ("roasted", "baked", "broiled", "dryheat"),
    "baked": ("baked", "roasted", "dryheat"),
    "fried": ("fried", "pan-fried", "deep-fried", "stir-fried"),
    "pan-fried": ("pan-fried", "fried"),
    "deep-fried": ("fried", "deep-fried"),
    "stir-fried": ("stir-fried", "fried", "sauteed"),
    "sauteed": ("sauteed", "fried", "pan-fried", "stir-fried"),
    "boiled": ("boiled", "moistheat", "stewed", "simmered", "hard-boiled"),
    "steamed": ("steamed", "moistheat", "boiled"),
    "poached": ("poached", "moistheat", "boiled"),
    "stewed": ("stewed", "braised", "moistheat", "simmered"),
    "braised": ("braised", "stewed", "moistheat"),
    "scrambled": ("scrambled",),
    "toasted": ("toasted",),
    "microwaved": ("microwaved", "microwave"),
    "smoked": ("smoked",),
    "seared": ("pan-fried", "fried", "broiled", "dryheat", "pan-broiled"),
    "pan-seared": ("pan-fried", "fried", "broiled", "dryheat", "pan-broiled"),
    "charred": ("grilled", "broiled", "roasted", "dryheat"),
    "blackened": ("grilled", "broiled", "pan-fried", "dryheat"),
    "air-fried": ("roasted", "baked", "fried", "dryheat"),
}
# Groups whose foods are eaten cooked: a plated one named with no cooking word is cooked.
_PLATED_GROUPS: Final = frozenset(
    {
        "Poultry Products",
        "Pork Products",
        "Beef Products",
        "Lamb, Veal, and Game Products",
        "Finfish and Shellfish Products",
        "Legumes and Legume Products",
        "Cereal Grains and Pasta",
    }
)
# Ways of cooking that add fat or make another product (smoked fish): a plated food named
# with no method is not assumed to be one.
_FRIED_WORDS: Final = _stems("fried pan-fried deep-fried batter breaded flour smoked")
# Parts of a food a description says it comes with: "thigh with skin", "cucumber with peel".
_PART_WORDS: Final = _stems("skin peel bone bones rind shell seeds")
# Foods of other groups eaten cooked, by their first word: eggs.
_PLATED_HEADS: Final = _stems("egg")
# SR28 words that say little about which food it is; they cost nothing as extras.
_NEUTRAL: Final = (
    _FILLERS
    | _SOFT
    | _stems(
        "without all types type commercial commercially varieties variety enriched unenriched "
        "salt unsalt added includes include fluid drained solids liquids only mixed "
        "species usda commodity ns nfs as purchased ready-to-eat ready ready-to-serve serve "
        "edible vitamin vitamins a d ascorbic acid fortified unfortified milkfat grade grades "
        "choice select year round average boneless bone-in separable lean trimmed flesh cured "
        "brewed unsweetened broiler fryer class classes calciumpropionate"
    )
)
# Generic first words of SR28 descriptions: the food itself is named after them.
_GENERIC_HEADS: Final = _stems(
    "fish beverages snacks fastfood fast foods cereals ready-to-eat alcoholic candies "
    "crustaceans mollusks babyfood restaurant soup sauce desserts spices nuts saladdressing"
)
# Generic first words naming another food than what follows: "Sauce, oyster" is no oyster.
_OTHER_FOOD_HEADS: Final = _stems("sauce soup alcoholic")
# The animal a meat comes from: SR28 names it first, a model often leaves it out.
_SPECIES_HEADS: Final = _stems("beef pork chicken turkey lamb veal")
# Meat and fish a dish is made of: a food without the one named is another dish.
_PROTEIN_WORDS: Final = _SPECIES_HEADS | _stems("fish seafood shrimp salmon tuna crab lobster")
# Classes SR28 names first and a model leaves out: the animal, or "Cheese, parmesan".
_CLASS_HEADS: Final = _SPECIES_HEADS | _stems("cheese")
# Words of SR28's catch-all entries ("all types", "mixed species", "year round average").
_GENERIC_MARKERS: Final = _stems("all average mixed")
# SR28's ordinary kind, where it stands as a part of its own: "Rice, white, long-grain, regular".
_ORDINARY: Final = ("regular",)
# Diet and special variants: a plain description means the ordinary food.
# A coating that adds to what a food is: "Shrimp, cooked, breaded and fried".
_COATED: Final = _stems("breaded battered")
_VARIANT_WORDS: Final = _stems(
    "reduced low lowfat nonfat non-fat fat-free free light lite diet dietary special "
    "sugar-free gluten-free decaffeinated imitation substitute sweetened "
    "whole-wheat whole-grain multigrain multi-grain mixed-grain reduced-calorie vegetarian "
    "meatless vegan breaded battered"
)
# Cured and luncheon meats, whose ordinary kind is pork or beef; their poultry kinds are variants.
_RED_MEAT_GROUPS: Final = frozenset({"Sausages and Luncheon Meats"})
_POULTRY: Final = _stems("turkey chicken poultry")
_PREPARED_GROUPS: Final = frozenset(
    {"Fast Foods", "Restaurant Foods", "Meals, Entrees, and Side Dishes"}
)
# Groups whose foods rank lower unless the description asks for them (by these words).
_ASKED_GROUPS: Final = {
    "Baby Foods": (0.5, _stems("baby babyfood infant toddler")),
    "American Indian/Alaska Native Foods": (0.6, _stems("alaska native indian navajo hopi")),
    "Fast Foods": (0.85, _stems("fastfood restaurant")),
    "Restaurant Foods": (0.85, _stems("fastfood restaurant")),
}
_WORD = re.compile(r"[a-z0-9%]+(?:[-.][a-z0-9%]+)*")
# Percentages, as SR28 and labels write them: "70-85%" and "45- 59%" ranges, "3.25 %", "80/20".
_PERCENT_RANGE = re.compile(r"\b(\d{1,2})\s*-\s*(\d{1,2})\s*%")
_PERCENT = re.compile(r"\b(\d+(?:\.\d+)?)\s+%")
_LEAN_FAT = re.compile(r"\b(\d{2})\s*/\s*(\d{1,2})\b(?!\s*%)")
_BRAND = re.compile(r"\b[A-Z][A-Z'&.]{2,}\b")
_PARENTHESES = re.compile(r"\([^)]*\)?")
_DIGIT = re.compile(r"\d")
_NOTE = re.compile(r"(?i)(includes?\b|usda\b|nfsmi\b|urmis\b)")
_CONNECTORS: Final = frozenset({"with", "in", "and", "or", "on"})
# Extras weigh by where they stand: "Yogurt, vanilla" is another food, "..., 8 ounce" is not.
_EXTRA_WEIGHTS: Final = (1.0, 0.7, 0.4)
_LATE_EXTRA: Final = 0.15
# A diet or grain variant the description does not ask for weighs more than other extras.
_VARIANT_COST: Final = 1.5
# Confidence lost when the description's noun is not the food's, when the food is a maker's
# the description does not name, and when a naming word of the description is not in the food.
_UNNAMED_HEAD: Final = 0.85
_UNNAMED_MEAT: Final = 0.8
_UNASKED_BRAND: Final = 0.75
_UNCOVERED_WORD: Final = 0.88
# A cooking word SR28 rarely or never uses ("seared") weighs no more than a common one.
_METHOD_IDF_CAP: Final = 3.0


def _percent_range(found: re.Match[str]) -> str:
    """ "70-85%" as every whole percentage it spans, so "72% cacao" is found inside it."""
    low, high = int(found.group(1)), int(found.group(2))
    if not low < high:
        return found.group()
    return " ".join(f"{percent}%" for percent in range(low, high + 1))


def _lean_fat(found: re.Match[str]) -> str:
    """ "80/20" ground meat is 80% lean meat / 20% fat, as SR28 words it."""
    lean, fat = int(found.group(1)), int(found.group(2))
    if lean + fat != 100:
        return found.group()
    return f"{lean}% lean {fat}% fat"


def _words(text: str) -> list[str]:
    """The normalised whole words of a description, in order."""
    lowered = _PERCENT.sub(r"\1%", text.lower())
    lowered = _LEAN_FAT.sub(_lean_fat, _PERCENT_RANGE.sub(_percent_range, lowered))
    lowered = _PHRASE.sub(lambda found: _PHRASES[found.group()], lowered)
    words: list[str] = []
    for word in _WORD.findall(lowered):
        stemmed = _stem(_CANONICAL.get(word, word))
        words.append(_CANONICAL.get(stemmed, stemmed))
    return words


def _with_parts(words: Iterable[str]) -> list[str]:
    """Words plus the parts of hyphenated ones: "long-grain" is also found by "grain"."""
    expanded: list[str] = []
    for word in words:
        expanded.append(word)
        if "-" in word:
            expanded.extend(_stem(part) for part in word.split("-") if part)
    return expanded


def _terms(text: str) -> list[str]:
    """The words of a description as the index and the ranking see them."""
    return _with_parts(_words(text))


def _fts_query(terms: Iterable[str]) -> str:
    return " OR ".join(f'"{term}"' for term in dict.fromkeys(terms))


# --- the ranking -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Profile:
    """What the ranking needs to know about one food, worked out when it is first a candidate."""

    terms: frozenset[str]
    group_terms: frozenset[str]
    segments: tuple[frozenset[str], ...]
    common: frozenset[str]
    heated: bool
    head: str
    head_noun: str
    other_food: frozenset[str]
    nouns: frozenset[str]  # the head noun, and after a bare animal its cut: "Pork, cured, bacon"
    variants: frozenset[str]  # poultry kinds of a cured meat: "Turkey bacon"
    added: frozenset[str]  # what the food has "with": "Potato salad with egg"
    leading: tuple[frozenset[str], ...]  # the naming words of each part: "Chicken, skin"
    lacking: frozenset[str]  # what the food is "without": "without skin and bones"
    # Words only found inside a cooking word: the oil of "Peanuts, oil-roasted" is not its food.
    medium: frozenset[str]
    extras: Mapping[str, float]
    cooked: bool
    raw: bool
    plated: bool
    fried: bool
    processed: frozenset[str]
    prior: float
    asked_by: frozenset[str]
    unasked: float
    brand: frozenset[str]


@lru_cache(maxsize=64)
def _group_terms(group: str) -> frozenset[str]:
    return frozenset(_terms(group))


@lru_cache(maxsize=32768)
def _segment_words(segment: str) -> tuple[str, ...]:
    """The words of one comma-separated part of an SR28 description; parts repeat a lot."""
    return tuple(_words(segment))


@lru_cache(maxsize=32768)
def _segment_terms(segment: str) -> frozenset[str]:
    return frozenset(_with_parts(_segment_words(segment)))


@lru_cache(maxsize=32768)
def _says_little(word: str) -> bool:
    """Whether an SR28 word not in the description should cost nothing as an extra."""
    if _DIGIT.search(word):
        return True
    if word in _NEUTRAL or word in _RAW_WORDS or word in _SPECIES_HEADS:
        return True  # the animal is free where it leads: "Pork, cured, bacon"
    parts = word.split("-")
    # "dry-roasted" says how it was cooked; "whole-wheat" is more than "whole".
    return any(part in _COOKED_WORDS for part in parts) or (
        len(parts) > 1 and all(_says_little(part) for part in parts if part)
    )


def _names_only(common_name: str) -> str:
    """ComName without its notes ("includes Capri Sun", "USDA Commodity A532")."""
    return ",".join(part for part in common_name.split(",") if not _NOTE.match(part.strip()))


def _head_noun(words: Iterable[str]) -> str:
    """The last naming word of a phrase, where English puts its noun: "chocolate milk"."""
    named: list[str] = []
    for word in words:
        if word in _CONNECTORS and named:
            break  # "rice bowl with chicken" is rice
        if word not in _FILLERS and word not in _COOKED_WORDS and word not in _RAW_WORDS:
            named.append(word)
    return named[-1] if named else ""


def _qualifiers(words: Sequence[str]) -> frozenset[str]:
    """The parts of the food a description keeps "with" it ("with skin"): not another food."""
    if "with" not in words:
        return frozenset()
    return frozenset(words[words.index("with") + 1 :]) & _PART_WORDS


def _profile(food: Food, manufacturer: str, survey: bool) -> _Profile:
    parts = [part for part in food.description.split(",") if _segment_words(part)] or [""]
    segments = [_segment_words(part) or ("",) for part in parts]
    named = [segment for segment in segments if not set(segment) <= _GENERIC_HEADS]
    head_at = segments.index(named[0]) if named else 0
    words = [word for segment in segments for word in segment]
    word_set = frozenset(words)
    terms = _with_parts(words)
    common = _terms(_names_only(food.common_name)) if food.common_name else []
    group = _group_terms(food.group)
    # Extras and the head noun leave out notes such as "(includes oyster, soda, soup)".
    if "(" in food.description:
        stated = [
            _segment_words(part) for part in _PARENTHESES.sub("", food.description).split(",")
        ]
        stated = [segment for segment in stated if segment] or [("",)]
    else:
        stated = segments
    stated_at = next(
        (at for at, segment in enumerate(stated) if not set(segment) <= _GENERIC_HEADS), 0
    )
    extras: dict[str, float] = {}
    for position, segment in enumerate(stated[stated_at:]):
        weight = _EXTRA_WEIGHTS[position] if position < len(_EXTRA_WEIGHTS) else _LATE_EXTRA
        if segment[0] == "with" and segment[1:2] != ("added",):
            weight = max(weight, 0.7)  # "Cheese, cottage, with vegetables": another dish
        for index, word in enumerate(segment):
            if word in _VARIANT_WORDS:
                extras[word] = 1.0
            elif not _says_little(word) or (
                word in _SPECIES_HEADS and (position or index)  # "burrito, with beef"
            ):
                extras.setdefault(word, weight)
    # Bacon, hot dogs and salami are pork or beef unless the description names the bird.
    poultry = word_set & _POULTRY if food.group in _RED_MEAT_GROUPS else frozenset()
    for word in poultry:
        extras[word] = 1.0
    heads = [word for word in segments[head_at] if word not in _GENERIC_HEADS]
    term_set = frozenset(terms)
    cooked = (bool(term_set & _COOKED_WORDS) and not word_set & _RAW_WORDS - {"raw"}) or (
        food.group in _PREPARED_GROUPS
    )
    prior = (1.0 if survey else 0.9) * (
        0.75 if manufacturer or _BRAND.search(food.description) else 1.0
    )
    if word_set & _GENERIC_MARKERS or _ORDINARY in stated:
        prior *= 1.1
    group_factor, asked_by = _ASKED_GROUPS.get(food.group, (1.0, frozenset()))
    medium = (
        frozenset(
            _stem(part)
            for word in word_set
            if "-" in word and any(part in _COOKED_WORDS for part in word.split("-"))
            for part in word.split("-")
            if part and part not in _COOKED_WORDS
        )
        - word_set
        - frozenset(common)
    )
    return _Profile(
        terms=term_set | frozenset(common),
        medium=medium,
        group_terms=group,
        segments=tuple(_segment_terms(part) for part in parts),
        common=frozenset(common),
        heated=bool(term_set & _COOKED_WORDS - {"prepared"}),
        head=heads[0] if heads else segments[head_at][0],
        head_noun=_head_noun(stated[stated_at]),
        other_food=frozenset(segments[0]) & _OTHER_FOOD_HEADS if head_at else frozenset(),
        nouns=frozenset(
            _head_noun(segment)
            for segment in (
                stated[stated_at:]
                if set(stated[stated_at]) <= _CLASS_HEADS
                else stated[stated_at : stated_at + 1]
            )
        ),
        variants=poultry,
        added=frozenset(word for segment in stated[stated_at:] for word in _qualifiers(segment)),
        leading=tuple(
            part for part in (frozenset(segment) - _FILLERS for segment in stated) if part
        ),
        lacking=frozenset(
            word
            for segment in stated
            if segment[0] == "without"
            for word in segment[1:]
            if word not in _FILLERS
        ),
        extras=extras,
        cooked=cooked,
        raw=not cooked and bool(word_set & _RAW_WORDS),
        plated=food.group in _PLATED_GROUPS or segments[0][0] in _PLATED_HEADS,
        fried=bool(term_set & _FRIED_WORDS),
        processed=word_set & _PROCESSED_WORDS if not cooked else frozenset(),
        prior=prior * group_factor,
        asked_by=asked_by,
        unasked=group_factor,
        brand=frozenset(word for name in _BRAND.findall(food.description) for word in _terms(name))
        or (frozenset({"brand"}) if manufacturer else frozenset()),
    )


@dataclass(frozen=True, slots=True)
class _Query:
    terms: tuple[str, ...]
    weights: Mapping[str, float]
    cooked: bool | None
    methods: tuple[str, ...]
    all_words: frozenset[str]
    head_noun: str
    naming: frozenset[str] = frozenset()  # the words that name the food, not how it was made
    qualifiers: frozenset[str] = frozenset()  # what follows "with": "thigh with skin"

    @property
    def searched(self) -> tuple[str, ...]:
        """The words the index is asked for: "cooked" or "raw" alone would find thousands."""
        strong = tuple(term for term in self.terms if term not in _WEAK)
        return strong or self.terms


def _state_factor(profile: _Profile, query: _Query) -> float:
    """How well the food's raw or prepared state fits the description's."""
    factor = 0.75 if profile.processed - query.all_words else 1.0
    if query.cooked is None and profile.plated:  # chicken, rice, eggs on a plate: cooked
        if profile.raw:
            return factor * 0.6
        # Fried, breaded or smoked only when the description says so.
        return factor * (0.85 if not profile.cooked or profile.fried else 1.0)
    if query.cooked is None:  # a banana, a glass of milk: as sold
        return factor * (0.95 if profile.heated else 1.0)
    if not query.cooked:
        return factor * (1.05 if profile.raw else 0.7 if profile.cooked else 0.95)
    if profile.raw:
        return factor * 0.6
    factor *= 1.0 if profile.cooked else 0.85
    if _COATED & profile.terms - query.all_words:
        return factor  # a coat of breading is more than a way of cooking: only when asked
    for rank, method in enumerate(query.methods):
        kin = _METHOD_KIN.get(method, (method,))
        hits = [position for position, word in enumerate(kin) if word in profile.terms]
        if hits:
            return factor * (1.2 - 0.04 * min(hits) - 0.02 * rank)
    return factor


def _extra_cost(profile: _Profile, query: _Query) -> float:
    """What the food's words beyond the description cost: each qualifying part once."""
    by_weight: dict[float, bool] = {}
    variants = 0.0
    by_common_name = bool(profile.common & query.all_words)
    for word, weight in profile.extras.items():
        if (
            word in query.all_words
            or ("-" in word and _found_in_parts(word, query.all_words))
            or (by_common_name and word == profile.head)
        ):
            continue  # "Pasta, cooked" is what "spaghetti" means, by its common name
        if word in _COATED:
            variants += 2 * _VARIANT_COST  # breading about doubles what a portion holds
        elif word in _VARIANT_WORDS or word in profile.variants:
            variants += _VARIANT_COST
        else:
            by_weight[weight] = True
    return variants + sum(by_weight)


def _found_in_parts(term: str, terms: frozenset[str]) -> bool:
    """Whether a hyphenated word is in a food as separate words: "low-fat" in "low fat"."""
    return "-" in term and all(_stem(part) in terms for part in term.split("-") if part)


def _score(profile: _Profile, query: _Query) -> tuple[float, float]:
    """(ranking score, confidence in [0, 1]) of one food for one description."""
    total = sum(query.weights.values()) or 1.0
    covered = sum(
        (weight / 2 if term == query.head_noun and term in profile.medium else weight)
        if (term in profile.terms and term not in profile.lacking)
        or ("-" in term and _found_in_parts(term, profile.terms))
        else weight / 2
        if term in profile.group_terms
        else 0.0
        for term, weight in query.weights.items()
    )
    coverage = covered / total
    together = max(
        sum(query.weights[term] for term in query.terms if term in segment)
        for segment in (*profile.segments, profile.common)
    )
    phrase = 0.85 + 0.15 * together / total
    same_noun = bool(query.head_noun) and query.head_noun in profile.nouns
    if query.qualifiers and any(part <= query.qualifiers for part in profile.leading):
        head = 0.85  # "chicken thigh with skin" is a thigh, not "Chicken, skin"
    elif profile.other_food and not profile.other_food & query.all_words:
        head = 0.75  # "oysters" are not oyster sauce
    elif profile.head in query.all_words or profile.common & query.all_words:
        head = 1.0
    else:
        head = 0.85
        if profile.head in _CLASS_HEADS:  # "bacon" is "Pork, cured, bacon"
            head = 1.0 if same_noun else 0.95
    named = head == 1.0 or same_noun or profile.head in _CLASS_HEADS
    if same_noun:
        head *= 1.08  # "chocolate milk" is milk, "milk chocolate" is chocolate
    extras = _extra_cost(profile, query)
    specificity = 1.0 / (1.0 + 0.12 * extras)
    prior = profile.prior
    asked = 1.0
    if profile.asked_by and profile.asked_by & query.all_words:
        prior = 1.0
    elif profile.asked_by:
        asked = profile.unasked  # baby food for "oat milk": only the nearest of weak matches
    state = _state_factor(profile, query)
    fit = coverage * head * phrase
    # Sure only when the description names the food itself, not just one of its qualifiers.
    confidence = fit * min(state, 1.0) * (0.6 + 0.4 * specificity) * (0.7 + 0.3 * prior)
    if not named:
        confidence *= 0.8
    confidence *= asked
    score = coverage * fit * state * specificity * prior
    return score, max(0.0, min(1.0, confidence))


def _doubt(profile: _Profile, query: _Query) -> float:
    """What the best food's confidence keeps when it may be another dish than the described.

    Worked out for the best-ranked food only: it never changes the order.
    """
    doubt = 1.0
    if query.head_noun and query.head_noun not in profile.terms:
        doubt *= _UNNAMED_HEAD  # "cabbage rolls" are not cabbage
    if profile.brand and not profile.brand & query.all_words:
        doubt *= _UNASKED_BRAND  # a maker's dish only for its name
    missing = [
        term
        for term in query.naming
        if (term not in profile.terms and term not in profile.group_terms)
        or (term in profile.added and term not in query.qualifiers)  # "egg salad"
    ]
    if missing:
        doubt *= _UNCOVERED_WORD  # "coconut shrimp": a dish of shrimp, not plain shrimp
    if any(term in _PROTEIN_WORDS for term in missing):
        doubt *= _UNNAMED_MEAT  # "pork dumplings" are not cheese dumplings
    return doubt


# --- per-process index connections -----------------------------------------------------------


class _Connections:
    """Read-only copies of the serialized FTS5 index, one per thread at a time, per process.

    The table is loaded once (in gunicorn's master with preload_app) and forked; a connection
    is opened lazily in the process that uses it, so no SQLite handle crosses a fork in use.
    """

    _MAX_IDLE = 8

    def __init__(self, image: bytes) -> None:
        self._image = image
        self._state = ProcessConnections(self._new_state)
        self._state.here()

    @staticmethod
    def _new_state() -> tuple[threading.Lock, list[sqlite3.Connection]]:
        return threading.Lock(), []

    @contextmanager
    def lend(self) -> Iterator[sqlite3.Connection]:
        lock, idle = self._state.here()  # forked: the parent's lock and connections are not ours
        with lock:
            connection = idle.pop() if idle else None
        if connection is None:
            connection = sqlite3.connect(":memory:", check_same_thread=False)
            connection.deserialize(self._image)
            connection.execute("PRAGMA query_only = ON")
        try:
            yield connection
        finally:
            with lock:
                keep = len(idle) < self._MAX_IDLE
                if keep:
                    idle.append(connection)
            if not keep:
                connection.close()


@dataclass(frozen=True, slots=True)
class _Index:
    image: bytes  # the serialized SQLite database
    document_frequency: Mapping[str, int]


def _index_text(food: Food) -> tuple[str, str, str, str]:
    words = [word for part in food.description.split(",") for word in _segment_words(part)]
    common = _terms(_names_only(food.common_name)) if food.common_name else []
    return (food.ndb_no, " ".join(_with_parts(words)), " ".join(common), _group_text(food.group))


@lru_cache(maxsize=64)
def _group_text(group: str) -> str:
    return " ".join(_terms(group))


def _build_index(foods: Iterable[Food]) -> _Index:
    connection = sqlite3.connect(":memory:")
    try:
        connection.execute(
            "CREATE VIRTUAL TABLE foods USING fts5("
            "ndb_no UNINDEXED, description, common_name, food_group, "
            "tokenize = 'unicode61 remove_diacritics 2 tokenchars ''-%.''')"
        )
        connection.executemany("INSERT INTO foods VALUES (?, ?, ?, ?)", map(_index_text, foods))
        connection.execute("INSERT INTO foods(foods) VALUES ('optimize')")
        connection.commit()
        connection.execute(
            "CREATE VIRTUAL TABLE temp.vocabulary USING fts5vocab(main, foods, 'row')"
        )
        document_frequency = dict(
            connection.execute("SELECT term, doc FROM temp.vocabulary").fetchall()
        )
        connection.execute("DROP TABLE temp.vocabulary")
        return _Index(connection.serialize(), document_frequency)
    finally:
        connection.close()


# --- the table -------------------------------------------------------------------------------


class NutritionTable:
    """USDA SR28 foods, a text index over them, and the arithmetic from per-100-g values."""

    _CANDIDATES = 200

    def __init__(
        self,
        foods: Mapping[str, Food],
        facts: Mapping[str, _Facts],
        measures: Mapping[str, tuple[_Measure, ...]],
        index: _Index,
        identity: str,
    ) -> None:
        self._foods = foods
        self._facts = facts
        # Filled as foods turn up as candidates: each process ranks with its own copy.
        self._profiles: dict[str, _Profile] = {}
        self._measures = measures
        self._connections = _Connections(index.image)
        self._identity = identity
        count = max(len(foods), 1)
        self._idf = {
            term: math.log(1 + count / df) for term, df in index.document_frequency.items()
        }
        self._unknown_idf = math.log(1 + count)

    # --- loading

    @classmethod
    def load(cls, directory: str | Path) -> NutritionTable:
        """Read the SR28 files in `directory` and build the index; NutritionDataError if bad."""
        folder = Path(directory)
        if not folder.is_dir():
            raise NutritionDataError(f"USDA SR28 folder {folder}: not a readable folder")
        checksums = _checksums(folder)
        raw = {
            name: _read_bytes(folder, name, checksums)
            for name in (_FOOD_DES, _FD_GROUP, _ABBREV, _ABBREV_COLUMNS, _NUTR_DEF, _WEIGHT)
        }
        texts = {name: _decode(folder, name, content) for name, content in raw.items()}
        groups = {
            key: description
            for _, (key, description) in _records(folder, _FD_GROUP, texts[_FD_GROUP], 2)
        }
        units = {
            values[0]: values[1] for _, values in _records(folder, _NUTR_DEF, texts[_NUTR_DEF], 6)
        }
        _check_units(folder, units)
        described = _descriptions(folder, texts[_FOOD_DES], groups)
        foods, facts = _foods(folder, texts[_ABBREV], texts[_ABBREV_COLUMNS], described)
        measures = _measures(folder, texts[_WEIGHT], foods)
        digest = hashlib.sha256()
        for name, content in sorted(raw.items()):
            digest.update(f"{name}\0{len(content)}\0".encode())
            digest.update(content)
        identity = f"{SOURCE}:{digest.hexdigest()[:16]}"
        return cls(foods, facts, measures, _build_index(foods.values()), identity)

    # --- properties

    @property
    def food_count(self) -> int:
        """How many foods the table holds."""
        return len(self._foods)

    @property
    def identity(self) -> str:
        """A short stable string naming this exact table, for cache keys."""
        return self._identity

    @property
    def label(self) -> str:
        """What /health shows: "usda-sr28 (8790 foods)"."""
        return f"{SOURCE} ({self.food_count} foods)"

    # --- lookups

    def food(self, ndb_no: str) -> Food | None:
        """The food with this NDB number, or None."""
        return self._foods.get(ndb_no)

    def match(
        self, description: str, *, cooked: bool | None = None, method: str | None = None
    ) -> FoodMatch | None:
        """The best SR28 food for a description, or None below MATCH_THRESHOLD."""
        ranked = self._rank(description, cooked=cooked, method=method)
        if not ranked or ranked[0][1] < MATCH_THRESHOLD:
            return None
        best, confidence, _ = ranked[0]
        alternatives = tuple(
            Alternative(food.ndb_no, food.description, food.kcal_per_100g)
            for food, _, _ in ranked[1:4]
        )
        return FoodMatch(
            ndb_no=best.ndb_no,
            description=best.description,
            kcal_per_100g=best.kcal_per_100g,
            confidence=round(confidence, 2),
            alternatives=alternatives,
        )

    def search(self, query: str, limit: int = 10) -> list[Food]:
        """Foods for a picker, best first; the last word may be unfinished ("salm")."""
        if limit <= 0:
            return []
        ranked = self._rank(query, cooked=None, method=None, prefix_last=True)
        return [food for food, _, _ in ranked[:limit]]

    def nutrients(self, ndb_no: str, grams: float) -> dict[str, Any]:
        """Calories, macros and NUTRIENT_UNITS nutrients of `grams` of a food.

        Per-100-g value * grams / 100, computed in decimal and rounded half up: whole kcal;
        protein, carbs, fat and every nutrient (g, mg or µg) to one decimal. A nutrient USDA
        has no value for is None; a missing macro counts as 0. KeyError for an unknown NDB
        number, ValueError for negative or non-finite grams.
        """
        if not math.isfinite(grams) or grams < 0:
            raise ValueError(f"grams must be a finite number >= 0, not {grams!r}")
        food = self._foods[ndb_no]
        values = food.per_100g
        return {
            "calories": int(_scaled(food.kcal_per_100g, grams, _WHOLE)),
            "protein": _scaled(values["protein"] or 0.0, grams, _TENTH),
            "carbs": _scaled(values["carbs"] or 0.0, grams, _TENTH),
            "fat": _scaled(values["fat"] or 0.0, grams, _TENTH),
            "nutrients": {
                key: None if (value := values[key]) is None else _scaled(value, grams, _TENTH)
                for key in NUTRIENT_UNITS
            },
        }

    def portion(self, ndb_no: str, grams: float) -> str | None:
        """A household measure from WEIGHT.txt within 10% of `grams`: "2 slices (44 g)"."""
        if grams <= 0:
            return None
        best: tuple[float, str] | None = None
        for measure in self._measures.get(ndb_no, ()):
            unit_grams = measure.grams / measure.amount
            for count in _PORTION_COUNTS:
                error = abs(grams - count * unit_grams) / grams
                if error > _PORTION_TOLERANCE:
                    continue
                # Closest first; then whole, few and plainly named units: "2 slices".
                cost = error + 0.03 * (count != int(count)) + 0.01 * count
                cost += 0.001 * len(measure.description)
                if best is None or cost < best[0]:
                    text = f"{_amount(count)} {_plural(measure.description, count)}"
                    best = (cost, f"{text} ({round(count * unit_grams)} g)")
        return None if best is None else best[1]

    # --- ranking

    def _query(self, description: str, cooked: bool | None, method: str | None) -> _Query | None:
        words = _terms(description)
        method_words = [word for word in _terms(method or "") if word in _COOKED_WORDS | {"raw"}]
        methods = tuple(
            dict.fromkeys(w for w in [*method_words, *words] if w in _METHOD_KIN or w == "raw")
        )
        if cooked is None and methods:
            cooked = methods[0] != "raw"
        if cooked is None and any(word in _COOKED_WORDS for word in words):
            cooked = True
        if cooked is None and "raw" in words:
            cooked = False
        terms = tuple(
            dict.fromkeys(word for word in [*words, *method_words] if word not in _FILLERS)
        )
        if not any(word not in _COOKED_WORDS and word not in _RAW_WORDS for word in terms):
            return None
        # Soft words and methods weigh little: "fried rice" is rice, but the fried kind.
        qualifiers = _qualifiers(_words(description.split(",", 1)[0]))
        # The parts of a hyphenated cooking word ("pan" of "pan-seared") say how, not what.
        method_parts = {
            part
            for word in terms
            if word in _COOKED_WORDS and "-" in word
            for part in word.split("-")
        }
        weights = {
            term: (
                0.3 * min(self._idf.get(term, self._unknown_idf), _METHOD_IDF_CAP)
                if term in _WEAK or term in method_parts or term in qualifiers
                else self._idf.get(term, self._unknown_idf)
            )
            for term in terms
        }
        return _Query(
            terms,
            weights,
            cooked,
            methods,
            frozenset(words) | frozenset(method_words),
            _head_noun(_words(description.split(",", 1)[0])),
            frozenset(
                term
                for term in terms
                # a hyphenated word is found by its parts: "low-fat" in "low fat"
                if term not in _WEAK
                and term not in method_parts
                and term not in qualifiers  # "with skin" qualifies the fillet
                and "-" not in term
                and not _DIGIT.search(term)
            ),
            qualifiers,
        )

    def _rank(
        self,
        description: str,
        *,
        cooked: bool | None,
        method: str | None,
        prefix_last: bool = False,
    ) -> list[tuple[Food, float, float]]:
        """(food, confidence, score) for the index's candidates, best first.

        Only the best food's confidence is complete: the others' only rank it.
        """
        query = self._query(description, cooked, method)
        if query is None:
            return []
        if prefix_last:
            query = self._expand_prefix(query)
        with self._connections.lend() as connection:
            rows = connection.execute(
                "SELECT ndb_no FROM foods WHERE foods MATCH ? "
                "ORDER BY bm25(foods, 0.0, 10.0, 4.0, 1.0) LIMIT ?",
                (_fts_query(query.searched), self._CANDIDATES),
            ).fetchall()
        scored: list[tuple[Food, float, float]] = []
        for (ndb_no,) in rows:
            score, confidence = _score(self._profile(ndb_no), query)
            scored.append((self._foods[ndb_no], confidence, score))
        scored.sort(key=lambda item: (-item[2], len(item[0].description), item[0].ndb_no))
        if scored:  # the best food's confidence in full; the others' only rank
            best, confidence, score = scored[0]
            scored[0] = (best, confidence * _doubt(self._profile(best.ndb_no), query), score)
        return scored

    def _profile(self, ndb_no: str) -> _Profile:
        profile = self._profiles.get(ndb_no)
        if profile is None:  # two threads may both build it: the same value, harmlessly
            manufacturer, survey = self._facts[ndb_no]
            profile = self._profiles[ndb_no] = _profile(self._foods[ndb_no], manufacturer, survey)
        return profile

    def _expand_prefix(self, query: _Query) -> _Query:
        """Complete an unfinished last word with the commonest indexed word it begins."""
        last = query.terms[-1]
        if last in self._idf:
            return query
        completions = [term for term in self._idf if term.startswith(last)]
        if not completions:
            return query
        completed = min(completions, key=lambda term: (self._idf[term], term))
        terms = (*query.terms[:-1], completed)
        weights = {term: self._idf.get(term, self._unknown_idf) for term in terms}
        return _Query(
            terms,
            weights,
            query.cooked,
            query.methods,
            query.all_words | {completed},
            completed if query.head_noun == last else query.head_noun,
        )


# --- loading, file by file -------------------------------------------------------------------


def _check_units(folder: Path, units: Mapping[str, str]) -> None:
    for key, (_, nutr_no) in {**_MACRO_COLUMNS, **_NUTRIENT_COLUMNS}.items():
        expected = "kcal" if key == "calories" else NUTRIENT_UNITS.get(key, "g")
        if units.get(nutr_no) != expected:
            raise NutritionDataError(
                f"USDA SR28 folder {folder}: {_NUTR_DEF}: nutrient {nutr_no} ({key}) should be "
                f"in {expected}, found {units.get(nutr_no)!r}"
            )


_Described = tuple[str, str, str, str, bool]
_Facts = tuple[str, bool]  # ManufacName, in USDA's dietary survey


def _descriptions(folder: Path, text: str, groups: Mapping[str, str]) -> dict[str, _Described]:
    """NDB_No -> (Long_Desc, ComName, group name, ManufacName, in USDA's dietary survey)."""
    described: dict[str, _Described] = {}
    for number, values in _records(folder, _FOOD_DES, text, 14):
        ndb_no = _key(folder, _FOOD_DES, number, values[0])
        group = groups.get(values[1])
        if group is None:
            raise NutritionDataError(
                f"USDA SR28 folder {folder}: {_FOOD_DES}:{number}: "
                f"food group {values[1]!r} is not in {_FD_GROUP}"
            )
        if not values[2]:
            raise NutritionDataError(
                f"USDA SR28 folder {folder}: {_FOOD_DES}:{number}: empty Long_Desc"
            )
        described[ndb_no] = (values[2], values[4], group, values[5], values[6] == "Y")
    return described


def _foods(
    folder: Path,
    text: str,
    column_text: str,
    described: Mapping[str, _Described],
) -> tuple[dict[str, Food], dict[str, _Facts]]:
    columns = [line.strip() for line in column_text.splitlines() if line.strip()]
    wanted = {**_MACRO_COLUMNS, **_NUTRIENT_COLUMNS}
    positions: dict[str, int] = {}
    for key, (column, _) in wanted.items():
        if column not in columns:
            raise NutritionDataError(
                f"USDA SR28 folder {folder}: {_ABBREV_COLUMNS} lacks the column {column!r}"
            )
        positions[key] = columns.index(column)
    at_positions = list(positions.values())
    foods: dict[str, Food] = {}
    facts: dict[str, _Facts] = {}
    for number, values in _records(folder, _ABBREV, text, len(columns), unquote=False):
        ndb_no = _key(folder, _ABBREV, number, values[0].strip("~"))
        per_100g = dict(
            zip(
                positions,
                _numbers(folder, _ABBREV, number, [values[at] for at in at_positions]),
                strict=True,
            )
        )
        kcal = per_100g.pop("calories")
        if kcal is None:
            raise NutritionDataError(f"USDA SR28 folder {folder}: {_ABBREV}:{number}: no energy")
        # SR28's abbreviated file lists one food FOOD_DES.txt lacks; its short name stands in.
        long_desc, common_name, group, manufacturer, survey = described.get(
            ndb_no, (values[1].strip("~"), "", "", "", False)
        )
        foods[ndb_no] = Food(ndb_no, long_desc, common_name, group, round(kcal), per_100g)
        facts[ndb_no] = (manufacturer, survey)
    missing = sorted(set(described) - set(foods))
    if missing:
        raise NutritionDataError(
            f"USDA SR28 folder {folder}: {_ABBREV} has no nutrients for {len(missing)} "
            f"foods of {_FOOD_DES}, e.g. {missing[0]}"
        )
    return foods, facts


def _measures(
    folder: Path, text: str, foods: Mapping[str, Food]
) -> dict[str, tuple[_Measure, ...]]:
    measures: dict[str, list[_Measure]] = {}
    for number, values in _records(folder, _WEIGHT, text, 7):
        ndb_no = _key(folder, _WEIGHT, number, values[0])
        try:
            amount, grams = float(values[2]), float(values[4])
        except ValueError:
            amount = grams = math.nan
        if not (0 < amount < math.inf and 0 < grams < math.inf and values[3]):
            _numbers(folder, _WEIGHT, number, (values[2], values[4]))  # names a non-number
            raise NutritionDataError(
                f"USDA SR28 folder {folder}: {_WEIGHT}:{number}: "
                "a measure needs an amount, a description and a weight"
            )
        if ndb_no not in foods:
            raise NutritionDataError(
                f"USDA SR28 folder {folder}: {_WEIGHT}:{number}: unknown food {ndb_no}"
            )
        if values[3].split(" ", 1)[0].strip(",") in _WEIGHT_UNITS:
            continue  # "3 oz": the grams already say that
        description = values[3]
        if "(" in description:  # "medium (7\" to 7-7/8\" long)" reads as "medium" by the grams
            description = _PARENTHESES.sub("", description).strip(" ,") or description
        measures.setdefault(ndb_no, []).append(_Measure(amount, description, grams))
    return {ndb_no: tuple(found) for ndb_no, found in measures.items()}


# --- arithmetic and wording ------------------------------------------------------------------


def _scaled(per_100g: float, grams: float, quantum: Decimal) -> float:
    """per_100g * grams / 100 from the decimal digits as written, rounded half up."""
    exact = Decimal(repr(float(per_100g))) * Decimal(repr(float(grams))) / 100
    return float(exact.quantize(quantum, rounding=ROUND_HALF_UP))


_WEIGHT_UNITS: Final = frozenset({"oz", "lb", "g", "kg"})
_PORTION_TOLERANCE: Final = 0.10
_PORTION_COUNTS: Final = (0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 12)
_FRACTIONS: Final = {0.25: "1/4", 0.5: "1/2", 0.75: "3/4"}
_UNCOUNTED: Final = frozenset(
    {"oz", "fl", "tbsp", "tsp", "large", "medium", "small", "extra", "jumbo", "very", "thin"}
)


def _amount(count: float) -> str:
    whole, fraction = int(count), count - int(count)
    if not fraction:
        return str(whole)
    return f"{whole} {_FRACTIONS[fraction]}" if whole else _FRACTIONS[fraction]


def _plural(description: str, count: float) -> str:
    """ "slice" -> "slices" when more than one; measures led by a size or unit stay as they are."""
    if count <= 1:
        return description
    leading = re.match(r"([A-Za-z]+)(.*)", description, re.DOTALL)
    if leading is None or leading.group(1).lower() in _UNCOUNTED:
        return description
    head, rest = leading.groups()
    if head.endswith("y") and head[-2:-1] not in "aeiou":
        head = head[:-1] + "ies"
    elif head.endswith(("s", "x", "ch", "sh")):
        head += "es"
    else:
        head += "s"
    return head + rest
