"""Packaged foods by barcode, from Open Food Facts: ``ProductLookup.find`` answers a ``Product``.

One ``GET {url}/api/v2/product/{code}`` per barcode not already known, within a per-minute budget
that every worker and replica share through the store; products found and barcodes unknown are
both kept in the store, so a barcode scanned again costs Open Food Facts nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import requests

from errors import BadRequest, ProductLookupError, ProductsNotConfigured, UpstreamRateLimited
from json_values import parse_json
from outbound_http import AnswerTooLarge, http_json, public_url
from store import Store, StoreUnavailable

logger = logging.getLogger("image_service")

OPEN_FOOD_FACTS = "Open Food Facts"
SOURCE = "openfoodfacts"
# The product fields asked for: only what a Product is made of, as Open Food Facts asks clients
# to do. ``product_name_en`` is the fallback name, ``serving_quantity_unit`` says whether
# ``serving_quantity`` is in grams or millilitres.
PRODUCT_FIELDS = (
    "code",
    "product_name",
    "product_name_en",
    "brands",
    "serving_size",
    "serving_quantity",
    "serving_quantity_unit",
    "nutriments",
)
# The lookup form of a barcode: EAN-13 (UPC-A with a leading zero), or EAN-8.
BARCODE = re.compile(r"[0-9]{13}|[0-9]{8}")
KJ_PER_KCAL = 4.184
# Store keys: ``product:<code>`` holds a product or the word that Open Food Facts knows none;
# ``openfoodfacts_budget:<minute>`` counts the calls made in one minute since the epoch.
PRODUCT_KEY = "product:{code}"
BUDGET_KEY = "openfoodfacts_budget:{minute}"
WINDOW_SECONDS = 60
# A minute's counter outlives its minute, so replicas whose clocks differ a little share it.
BUDGET_TTL = 2 * WINDOW_SECONDS


@dataclass(frozen=True)
class Nutrient:
    """One nutrient: its Open Food Facts key stem, the factor to the contract's unit, and the
    most 100 g of any food can hold (in the contract's unit)."""

    stem: str
    factor: float
    most_per_100g: float


# The contract's nutrients per 100 g and per serving; the first four every product must have.
# Open Food Facts gives sodium in grams; the contract counts it in milligrams (pure salt is 39 g
# of sodium per 100 g).
NUTRIENTS = {
    "calories": Nutrient("energy-kcal", 1.0, 900.0),
    "protein": Nutrient("proteins", 1.0, 100.0),
    "carbs": Nutrient("carbohydrates", 1.0, 100.0),
    "fat": Nutrient("fat", 1.0, 100.0),
    "fiber": Nutrient("fiber", 1.0, 100.0),
    "sugars": Nutrient("sugars", 1.0, 100.0),
    "saturatedFat": Nutrient("saturated-fat", 1.0, 100.0),
    "sodium": Nutrient("sodium", 1000.0, 40_000.0),
}
REQUIRED = ("calories", "protein", "carbs", "fat")
# A serving is at most this heavy: beyond it a ``serving_quantity`` is a typing error.
MOST_SERVING_GRAMS = 5000.0
# Caps on the texts kept: one line each, cut to this many characters.
NAME_CHARACTERS = 200
BRAND_CHARACTERS = 200
SERVING_SIZE_CHARACTERS = 100
# Control characters and every Unicode line or paragraph break, read as a space.
LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
PLAIN_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")


@dataclass(frozen=True)
class Product:
    """A packaged food as Open Food Facts knows it, in the contract's names and units."""

    barcode: str
    name: str
    brand: str
    serving_size: str | None
    serving_grams: float | None
    per_100g: dict[str, float]
    per_serving: dict[str, float] | None

    def as_json(self) -> dict[str, Any]:
        """The contract's JSON for the product."""
        return {
            "barcode": self.barcode,
            "name": self.name,
            "brand": self.brand,
            "servingSize": self.serving_size,
            "servingGrams": self.serving_grams,
            "per100g": dict(self.per_100g),
            "perServing": None if self.per_serving is None else dict(self.per_serving),
            "source": SOURCE,
        }


# ---------------------------------------------------------------------------------------------
# Reading what Open Food Facts says of a product
# ---------------------------------------------------------------------------------------------


def number(value: object) -> float | None:
    """A finite, non-negative number given as a number or a plain decimal text; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        found = float(value)
    elif isinstance(value, str) and PLAIN_DECIMAL.fullmatch(value.strip()):
        found = float(value.strip())
    else:
        return None
    return found if math.isfinite(found) and found >= 0 else None


def one_line(value: object, limit: int) -> str:
    """A text as one line of at most ``limit`` characters, blanks collapsed; "" for no text."""
    if not isinstance(value, str):
        return ""
    text = " ".join(LINE_BREAKS.sub(" ", value[: limit * 4]).split())
    return text[:limit].rstrip()


def energy_kcal(nutriments: Mapping[str, Any], basis: str) -> float | None:
    """Energy in kcal for ``basis`` (``100g`` or ``serving``); one given only in kJ converted."""
    if f"energy-kcal_{basis}" in nutriments:
        return number(nutriments[f"energy-kcal_{basis}"])
    for key in (f"energy-kj_{basis}", f"energy_{basis}"):  # ``energy_*`` is in kJ
        if key in nutriments:
            kilojoules = number(nutriments[key])
            return None if kilojoules is None else kilojoules / KJ_PER_KCAL
    return None


def nutrients(
    nutriments: Mapping[str, Any], basis: str, most: Callable[[Nutrient], float]
) -> dict[str, float] | None:
    """The contract's nutrients for ``basis``, or None when a required one is missing or absurd.

    An optional nutrient that is absent, unreadable, negative or over ``most`` is left out.
    """
    found: dict[str, float] = {}
    for name, nutrient in NUTRIENTS.items():
        if name == "calories":
            value = energy_kcal(nutriments, basis)
        else:
            raw = number(nutriments.get(f"{nutrient.stem}_{basis}"))
            value = None if raw is None else raw * nutrient.factor
        if value is not None and value <= most(nutrient):
            found[name] = round(value, 1 if name in ("calories", "sodium") else 2)
        elif name in REQUIRED:
            return None
    return found


def serving_grams(product: Mapping[str, Any]) -> float | None:
    """``serving_quantity`` when it is in grams (or its unit is not given) and believable."""
    unit = product.get("serving_quantity_unit")
    if unit not in (None, "", "g"):
        return None
    grams = number(product.get("serving_quantity"))
    if grams is None or grams == 0 or grams > MOST_SERVING_GRAMS:
        return None
    return round(grams, 2)


def scaled(per_100g: Mapping[str, float], grams: float) -> dict[str, float]:
    """The nutrients of ``grams`` of a food, from its nutrients per 100 g."""
    return {
        name: round(value * grams / 100, 1 if name in ("calories", "sodium") else 2)
        for name, value in per_100g.items()
    }


def read_product(code: str, product: Mapping[str, Any]) -> Product | None:
    """The Product in Open Food Facts' ``product`` object, or None when it has no usable energy
    or macronutrients; ProductLookupError when its nutriments are not an object."""
    nutriments = product.get("nutriments", {})
    if not isinstance(nutriments, dict):
        raise ProductLookupError(
            f"{OPEN_FOOD_FACTS} answered barcode {code} with nutriments that are not an object"
        )
    per_100g = nutrients(nutriments, "100g", lambda nutrient: nutrient.most_per_100g)
    if per_100g is None:
        return None
    grams = serving_grams(product)
    # Per serving, at most what the heaviest believable serving of the food could hold.
    per_serving = nutrients(
        nutriments, "serving", lambda nutrient: nutrient.most_per_100g * MOST_SERVING_GRAMS / 100
    )
    if per_serving is None and grams is not None:
        per_serving = scaled(per_100g, grams)
    name = one_line(product.get("product_name"), NAME_CHARACTERS) or one_line(
        product.get("product_name_en"), NAME_CHARACTERS
    )
    serving_size = one_line(product.get("serving_size"), SERVING_SIZE_CHARACTERS)
    return Product(
        barcode=code,
        name=name or f"Product {code}",
        brand=one_line(product.get("brands"), BRAND_CHARACTERS),
        serving_size=serving_size or None,
        serving_grams=grams,
        per_100g=per_100g,
        per_serving=per_serving,
    )


# ---------------------------------------------------------------------------------------------
# What the store keeps
# ---------------------------------------------------------------------------------------------


def product_record(product: Product | None) -> str:
    """The store's record of a lookup: the product found, or that there is none."""
    if product is None:
        return json.dumps({"found": False})
    return json.dumps({"found": True, "product": product.as_json()})


def kept_nutrients(value: object, most: Callable[[Nutrient], float]) -> dict[str, float] | None:
    """Nutrients read back from a record, or None unless every one is known, sound and in bounds
    and the required ones are there."""
    if not isinstance(value, dict) or not set(REQUIRED) <= value.keys() <= NUTRIENTS.keys():
        return None
    found = {}
    for name, raw in value.items():
        amount = number(raw) if not isinstance(raw, str) else None
        if amount is None or amount > most(NUTRIENTS[name]):
            return None
        found[name] = amount
    return found


def read_record(code: str, raw: str | None) -> tuple[bool, Product | None]:
    """What a store's record says: (known, product). A record absent or unsound is not known."""
    if raw is None:
        return False, None
    try:
        record = parse_json(raw)
    except ValueError:
        record = None
    if isinstance(record, dict) and record.get("found") is False and len(record) == 1:
        return True, None
    kept = record.get("product") if isinstance(record, dict) and record.get("found") else None
    product = kept_product(code, kept)
    if product is None:
        logger.warning("Ignoring an unreadable product record for barcode %s", code)
        return False, None
    return True, product


def kept_product(code: str, kept: object) -> Product | None:
    """A Product read back from its contract JSON, or None when it is not exactly that."""
    if not isinstance(kept, dict) or kept.get("barcode") != code or kept.get("source") != SOURCE:
        return None
    name, brand, size = kept.get("name"), kept.get("brand"), kept.get("servingSize")
    if not isinstance(name, str) or not name or one_line(name, NAME_CHARACTERS) != name:
        return None
    if not isinstance(brand, str) or one_line(brand, BRAND_CHARACTERS) != brand:
        return None
    if size is not None and (
        not isinstance(size, str) or not size or one_line(size, SERVING_SIZE_CHARACTERS) != size
    ):
        return None
    grams = kept.get("servingGrams")
    if grams is not None:
        grams = number(grams) if not isinstance(grams, str) else None
        if grams is None or grams == 0 or grams > MOST_SERVING_GRAMS:
            return None
    per_100g = kept_nutrients(kept.get("per100g"), lambda nutrient: nutrient.most_per_100g)
    per_serving = kept.get("perServing")
    if per_serving is not None:
        per_serving = kept_nutrients(
            per_serving, lambda nutrient: nutrient.most_per_100g * MOST_SERVING_GRAMS / 100
        )
        if per_serving is None:
            return None
    if per_100g is None:
        return None
    return Product(code, name, brand, size, grams, per_100g, per_serving)


# ---------------------------------------------------------------------------------------------
# The lookup
# ---------------------------------------------------------------------------------------------


class ProductLookup:
    """Finds packaged foods by barcode in Open Food Facts, through the store's shared memory.

    ``find`` answers from the store when it can; otherwise it takes one unit of the minute's
    budget (``rate_per_minute`` calls, shared through ``store.count``) and asks Open Food Facts
    once, with no retry, as their rate limits ask.
    """

    def __init__(
        self,
        store: Store,
        session: requests.Session,
        *,
        url: str,
        user_agent: str,
        timeout: float,
        rate_per_minute: int,
        found_ttl: float,
        missing_ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.session = session
        self.url = url.rstrip("/")
        self.user_agent = user_agent
        self.timeout = timeout
        self.rate_per_minute = rate_per_minute
        self.found_ttl = found_ttl
        self.missing_ttl = missing_ttl
        self.clock = clock
        # A record claiming to live longer than either lifetime was not written here.
        self.longest_ttl = max(found_ttl, missing_ttl)
        # While the store fails, each process keeps to the budget on its own.
        self.local_lock = threading.Lock()
        self.local_window = (-1, 0)

    @property
    def configured(self) -> bool:
        """Whether there is an Open Food Facts to ask."""
        return bool(self.url)

    def find(self, code: str) -> Product | None:
        """The product with this barcode (13 digits, or 8), or None when Open Food Facts knows
        none or gives it no usable energy and macronutrients.

        Raises BadRequest for a code in another form, ProductsNotConfigured without a URL,
        UpstreamRateLimited when the minute's budget is spent, and ProductLookupError when Open
        Food Facts cannot be asked or answers something unusable (nothing is kept then).
        """
        if not BARCODE.fullmatch(code):
            raise BadRequest("A barcode is looked up as 13 digits (EAN-13, UPC-A) or 8 (EAN-8)")
        if not self.configured:
            raise ProductsNotConfigured(
                "product lookups are turned off: set OPENFOODFACTS_URL to ask Open Food Facts"
            )
        key = PRODUCT_KEY.format(code=code)
        try:
            known, product = read_record(code, self.store.get(key, self.longest_ttl))
        except StoreUnavailable:
            known, product = False, None
        if known:
            logger.info("Product cache hit for barcode %s", code)
            return product
        self.take_budget()
        product = self.ask(code)
        ttl = self.found_ttl if product is not None else self.missing_ttl
        with contextlib.suppress(StoreUnavailable):  # not kept: the next scan asks again
            self.store.set(key, product_record(product), ttl)
        return product

    def take_budget(self) -> None:
        """Count one call in this minute's window, or raise UpstreamRateLimited once it is full."""
        now = self.clock()
        minute = int(now // WINDOW_SECONDS)
        try:
            spent = self.store.count(BUDGET_KEY.format(minute=minute), BUDGET_TTL)
        except StoreUnavailable:
            spent = self.count_locally(minute)
        if spent > self.rate_per_minute:
            wait = (minute + 1) * WINDOW_SECONDS - now
            logger.warning(
                "The %s budget of %d lookups a minute is spent",
                OPEN_FOOD_FACTS,
                self.rate_per_minute,
            )
            raise UpstreamRateLimited(
                f"{OPEN_FOOD_FACTS} lookups are limited to {self.rate_per_minute} a minute;"
                " try again when the minute is over",
                retry_after=wait,
            )

    def count_locally(self, minute: int) -> int:
        """This process's own count for the minute, while the shared one cannot be reached."""
        with self.local_lock:
            window, spent = self.local_window
            spent = spent + 1 if window == minute else 1
            self.local_window = (minute, spent)
            return spent

    def ask(self, code: str) -> Product | None:
        """One call to Open Food Facts: the product, None when unknown, else ProductLookupError."""
        url = f"{self.url}/api/v2/product/{code}"
        started = time.monotonic()
        try:
            reply = http_json(
                self.session,
                "GET",
                f"{url}?fields={','.join(PRODUCT_FIELDS)}",
                headers={"User-Agent": self.user_agent, "Accept": "application/json"},
                timeout=self.timeout,
            )
        except requests.Timeout:
            raise self.failure(code, f"did not answer within {self.timeout:g}s") from None
        except AnswerTooLarge:
            raise self.failure(code, "answered more than any product needs") from None
        except requests.RequestException as error:
            where = public_url(self.url)
            raise self.failure(
                code, f"could not be reached at {where} ({type(error).__name__})"
            ) from None
        logger.info(
            "%s answered HTTP %d for barcode %s in %.2fs",
            OPEN_FOOD_FACTS,
            reply.status,
            code,
            time.monotonic() - started,
        )
        if reply.status == 429:
            raise self.failure(code, "asked to slow down (HTTP 429)")
        if reply.status >= 500:
            raise self.failure(code, f"failed (HTTP {reply.status})")
        answer = reply.json_or_none()
        answer = answer if isinstance(answer, dict) else {}
        status = answer.get("status")
        status = status if type(status) is int else None  # 1 found, 0 unknown; never a bool
        if reply.status in (200, 404) and status == 0:
            return None
        product = answer.get("product")
        if reply.status == 200 and status == 1 and isinstance(product, dict):
            return read_product(code, product)
        raise self.failure(code, f"answered HTTP {reply.status} without its product shape")

    @staticmethod
    def failure(code: str, what: str) -> ProductLookupError:
        """The error for a failed lookup, logged once."""
        logger.warning("%s lookup of barcode %s failed: %s", OPEN_FOOD_FACTS, code, what)
        return ProductLookupError(f"{OPEN_FOOD_FACTS} {what} for barcode {code}")
