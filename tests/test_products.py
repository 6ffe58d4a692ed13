"""Barcode lookups against a loopback Open Food Facts over real HTTP, through a real store.

Every test runs with the embedded store and with Redis, as the service would; the budget's window
is moved with the lookup's own clock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
from redis.backoff import NoBackoff
from redis.retry import Retry

from errors import BadRequest, ProductLookupError, ProductsNotConfigured, UpstreamRateLimited
from outbound_http import build_session
from products import PRODUCT_FIELDS, Product, ProductLookup
from store import CircuitBreaker, RedisSettings, RedisStore, Store, build_stores
from tests.conftest import REDIS_PASSWORD
from tests.fakes import RedisServer, Reply, free_port
from tests.open_food_facts import (
    COLA_CODE,
    NO_ENERGY_CODE,
    NUTELLA_CODE,
    OATCAKES_CODE,
    OpenFoodFactsServer,
    garbage,
    product_found,
    rate_limited,
    server_down,
    slow,
)

USER_AGENT = "ImageService/1.0 (food-tracker@example.com)"
# 15 seconds into a minute since the epoch.
START = 28_000_000 * 60 + 15.0


class Clock:
    """A wall clock the test moves."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def off() -> Iterator[OpenFoodFactsServer]:
    """A loopback Open Food Facts knowing the sample products."""
    with OpenFoodFactsServer() as server:
        yield server


@pytest.fixture(params=["embedded", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The store the service builds for its cache: the embedded file, or the tests' Redis."""
    settings = None
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis")
        settings = RedisSettings(server.url, 2.0, 3, 15.0, password=REDIS_PASSWORD)
    cache, _ = build_stores(settings, tmp_path / "store.sqlite3", 16 * 1024 * 1024)
    yield cache
    if isinstance(cache, RedisStore):
        cache.client.close()


@pytest.fixture
def clock() -> Clock:
    """The lookups' clock, 15 s into a minute."""
    return Clock()


@pytest.fixture
def make_lookup(
    store: Store, off: OpenFoodFactsServer, clock: Clock
) -> Iterator[Callable[..., ProductLookup]]:
    """Builds a ProductLookup on the store and the loopback Open Food Facts."""
    sessions = []

    def build(**overrides: Any) -> ProductLookup:
        session = build_session(4)
        sessions.append(session)
        settings: dict[str, Any] = {
            "url": off.url,
            "user_agent": USER_AGENT,
            "timeout": 2.0,
            "rate_per_minute": 100,
            "found_ttl": 3600.0,
            "missing_ttl": 600.0,
            "clock": clock,
        }
        settings.update(overrides)
        target = settings.pop("store", store)
        return ProductLookup(target, session, **settings)

    yield build
    for session in sessions:
        session.close()


@pytest.fixture
def lookup(make_lookup: Callable[..., ProductLookup]) -> ProductLookup:
    """A lookup with the default settings."""
    return make_lookup()


# ------------------------------------------------------------------ what a product is read as


def test_a_product_found_is_read_per_100g_and_per_serving(lookup: ProductLookup) -> None:
    product = lookup.find(NUTELLA_CODE)

    assert product == Product(
        barcode=NUTELLA_CODE,
        name="Nutella",
        brand="Ferrero",
        serving_size="15 g",
        serving_grams=15.0,
        per_100g={
            "calories": 539.0,
            "protein": 6.3,
            "carbs": 57.5,
            "fat": 30.9,
            "sugars": 56.3,
            "saturatedFat": 10.6,
            "sodium": 42.8,
        },
        per_serving={
            "calories": 80.8,
            "protein": 0.94,
            "carbs": 8.62,
            "fat": 4.63,
            "sugars": 8.44,
            "saturatedFat": 1.59,
            "sodium": 6.4,
        },
    )


def test_the_json_of_a_product_is_the_contracts(lookup: ProductLookup) -> None:
    product = lookup.find(NUTELLA_CODE)
    assert product is not None

    answer = product.as_json()

    assert list(answer) == [
        "barcode",
        "name",
        "brand",
        "servingSize",
        "servingGrams",
        "per100g",
        "perServing",
        "source",
    ]
    assert answer["barcode"] == NUTELLA_CODE
    assert answer["servingGrams"] == 15.0
    assert answer["per100g"]["calories"] == 539.0
    assert answer["perServing"]["sodium"] == 6.4
    assert answer["source"] == "openfoodfacts"


def test_energy_in_kj_only_is_converted_and_a_serving_computed(lookup: ProductLookup) -> None:
    product = lookup.find(OATCAKES_CODE)

    assert product is not None
    assert product.name == "Oat biscuits"  # product_name is empty: the English name stands in
    assert product.brand == "Some Mill, Another Brand"  # one line
    assert product.serving_grams == 30.0  # serving_quantity without a unit is in grams
    assert product.per_100g == {
        "calories": 450.0,  # 1883 kJ / 4.184
        "protein": 8.1,
        "carbs": 62.0,
        "fat": 18.3,
        "fiber": 7.9,
    }
    assert product.per_serving == {
        "calories": 135.0,
        "protein": 2.43,
        "carbs": 18.6,
        "fat": 5.49,
        "fiber": 2.37,
    }


def test_a_upc_a_is_looked_up_as_given(lookup: ProductLookup, off: OpenFoodFactsServer) -> None:
    product = lookup.find(COLA_CODE)

    assert [request.route for request in off.lookups] == [f"/api/v2/product/{COLA_CODE}"]
    assert product is not None
    assert product.barcode == COLA_CODE
    assert product.serving_size == "1 can (355 ml)"
    assert product.serving_grams is None  # a serving in millilitres has no weight
    assert product.per_100g["sodium"] == 12.7
    assert product.per_serving == {
        "calories": 149.0,
        "protein": 0.0,
        "carbs": 37.6,
        "fat": 0.0,
        "sugars": 37.6,
        "sodium": 45.0,
    }


def test_an_ean_8_is_looked_up_too(lookup: ProductLookup, off: OpenFoodFactsServer) -> None:
    off.products["40084107"] = {**off.products[NUTELLA_CODE], "code": "40084107"}

    product = lookup.find("40084107")

    assert product is not None
    assert product.barcode == "40084107"


def test_without_a_serving_there_is_nothing_per_serving(
    lookup: ProductLookup, off: OpenFoodFactsServer
) -> None:
    nutriments = {"energy-kcal_100g": 120, "proteins_100g": 3, "carbohydrates_100g": 20}
    off.products["2000000000008"] = {
        "code": "2000000000008",
        "product_name": "Bulk oats\u2028 rolled\n",
        "nutriments": {**nutriments, "fat_100g": 2.5},
    }

    product = lookup.find("2000000000008")

    assert product is not None
    assert product.name == "Bulk oats rolled"
    assert (product.brand, product.serving_size, product.serving_grams) == ("", None, None)
    assert product.per_serving is None


def test_a_product_without_a_name_is_named_by_its_barcode(
    lookup: ProductLookup, off: OpenFoodFactsServer
) -> None:
    del off.products[NUTELLA_CODE]["product_name"]
    del off.products[NUTELLA_CODE]["product_name_en"]

    product = lookup.find(NUTELLA_CODE)

    assert product is not None
    assert product.name == f"Product {NUTELLA_CODE}"


# ------------------------------------------------------------------ unknown and unusable products


def test_an_unknown_barcode_is_none_and_remembered(
    lookup: ProductLookup, off: OpenFoodFactsServer
) -> None:
    assert lookup.find("0000000000017") is None
    assert lookup.find("0000000000017") is None

    assert len(off.lookups_of("0000000000017")) == 1


def test_a_product_without_energy_is_not_found(
    lookup: ProductLookup, off: OpenFoodFactsServer
) -> None:
    assert lookup.find(NO_ENERGY_CODE) is None
    assert lookup.find(NO_ENERGY_CODE) is None

    assert len(off.lookups_of(NO_ENERGY_CODE)) == 1


@pytest.mark.parametrize(
    "nutriments",
    [
        {"energy-kcal_100g": -5},
        {"energy-kcal_100g": 2500},  # more than pure fat
        {"energy-kcal_100g": "lots"},
        {"energy-kcal_100g": True},
        {"fat_100g": 140},
        {"proteins_100g": -1},
        {"carbohydrates_100g": None},
    ],
    ids=["negative", "absurd", "text", "boolean", "fat-over-100g", "negative-macro", "no-carbs"],
)
def test_a_product_with_unusable_nutrients_is_not_found(
    lookup: ProductLookup, off: OpenFoodFactsServer, nutriments: dict[str, Any]
) -> None:
    off.products[NUTELLA_CODE]["nutriments"].update(nutriments)

    assert lookup.find(NUTELLA_CODE) is None


def test_an_unusable_optional_nutrient_is_left_out(
    lookup: ProductLookup, off: OpenFoodFactsServer
) -> None:
    off.products[NUTELLA_CODE]["nutriments"].update({"sugars_100g": -3, "sodium_100g": "NaN"})

    product = lookup.find(NUTELLA_CODE)

    assert product is not None
    assert "sugars" not in product.per_100g
    assert "sodium" not in product.per_100g


# ------------------------------------------------------------------ what is kept in the store


def test_a_product_found_is_remembered(lookup: ProductLookup, off: OpenFoodFactsServer) -> None:
    first = lookup.find(NUTELLA_CODE)
    second = lookup.find(NUTELLA_CODE)

    assert first is not None
    assert second == first
    assert len(off.lookups_of(NUTELLA_CODE)) == 1


def test_another_worker_finds_what_one_kept(
    make_lookup: Callable[..., ProductLookup], off: OpenFoodFactsServer
) -> None:
    kept = make_lookup().find(NUTELLA_CODE)

    assert make_lookup().find(NUTELLA_CODE) == kept
    assert len(off.lookups) == 1


def test_a_product_is_kept_under_its_barcode_for_its_lifetime(
    lookup: ProductLookup, store: Store
) -> None:
    lookup.find(NUTELLA_CODE)
    lookup.find("0000000000017")

    assert store.get(f"product:{NUTELLA_CODE}") is not None
    assert store.get("product:0000000000017") == '{"found": false}'


def test_an_answer_past_its_lifetime_is_asked_for_again(
    make_lookup: Callable[..., ProductLookup], off: OpenFoodFactsServer
) -> None:
    lookup = make_lookup(found_ttl=0.3, missing_ttl=0.3)
    lookup.find(NUTELLA_CODE)
    lookup.find("0000000000017")
    time.sleep(0.5)
    lookup.find(NUTELLA_CODE)
    lookup.find("0000000000017")

    assert len(off.lookups) == 4


# Each a whole record (text) or changes to the product's JSON in a record that says it was found.
PLANTED_RECORDS: dict[str, str | dict[str, Any]] = {
    "not-json": "{not json",
    "a-list": "[1, 2]",
    "found-without-product": '{"found": true}',
    "missing-with-extras": '{"found": false, "product": {"name": "Nutella"}}',
    "another-barcode": {"barcode": "0000000000017"},
    "negative-calories": {"per100g": {"calories": -999, "protein": 1, "carbs": 1, "fat": 1}},
    "calories-as-text": {"per100g": {"calories": "539", "protein": 1, "carbs": 1, "fat": 1}},
    "no-fat": {"per100g": {"calories": 539, "protein": 1, "carbs": 1}},
    "unknown-nutrient": {"per100g": {"calories": 1, "protein": 1, "carbs": 1, "fat": 1, "x": 1}},
    "long-name": {"name": "N" * 10_000},
    "two-line-name": {"name": "Nutella\nignore previous instructions"},
    "bad-serving-grams": {"servingGrams": -15},
    "bad-per-serving": {"perServing": {"calories": "a lot"}},
    "another-source": {"source": "usda"},
}


@pytest.mark.parametrize("planted", list(PLANTED_RECORDS), ids=list(PLANTED_RECORDS))
def test_a_bad_record_planted_in_the_store_is_ignored(
    lookup: ProductLookup, off: OpenFoodFactsServer, store: Store, planted: str
) -> None:
    expected = lookup.find(NUTELLA_CODE)
    assert expected is not None
    changes = PLANTED_RECORDS[planted]
    record = (
        changes
        if isinstance(changes, str)
        else json.dumps({"found": True, "product": {**expected.as_json(), **changes}})
    )
    store.set(f"product:{NUTELLA_CODE}", record, 3600)

    assert lookup.find(NUTELLA_CODE) == expected

    assert len(off.lookups_of(NUTELLA_CODE)) == 2  # asked again, and the record overwritten
    assert lookup.find(NUTELLA_CODE) == expected
    assert len(off.lookups_of(NUTELLA_CODE)) == 2


def test_a_failing_store_means_asking_open_food_facts(
    make_lookup: Callable[..., ProductLookup], off: OpenFoodFactsServer
) -> None:
    client = redis_py.Redis(
        port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    gone = RedisStore(client, CircuitBreaker(1000, 60))
    lookup = make_lookup(store=gone, rate_per_minute=2)

    assert lookup.find(NUTELLA_CODE) is not None
    assert lookup.find(NUTELLA_CODE) is not None
    with pytest.raises(UpstreamRateLimited):  # the process keeps to the budget on its own
        lookup.find(NUTELLA_CODE)
    assert len(off.lookups_of(NUTELLA_CODE)) == 2


# ------------------------------------------------------------------ failures of Open Food Facts


@pytest.mark.parametrize(
    ("reply", "said"),
    [
        (server_down(502), "failed (HTTP 502)"),
        (server_down(500), "failed (HTTP 500)"),
        (rate_limited(), "asked to slow down (HTTP 429)"),
        (garbage(), "answered HTTP 200 without its product shape"),
        (Reply(200, "<html>maintenance</html>"), "answered HTTP 200 without its product shape"),
        (Reply(404, "<html>not here</html>"), "answered HTTP 404 without its product shape"),
        (Reply(200, {"status": True, "product": {}}), "without its product shape"),
        (Reply(drop=True), "could not be reached"),
        (Reply(200, {"status": 1, "product": {"nutriments": []}}), "nutriments that are not"),
    ],
    ids=[
        "502",
        "500",
        "429",
        "garbage",
        "html",
        "404-html",
        "bool-status",
        "hang-up",
        "nutriments",
    ],
)
def test_a_failing_open_food_facts_is_a_lookup_error_and_nothing_is_kept(
    lookup: ProductLookup, off: OpenFoodFactsServer, store: Store, reply: Reply, said: str
) -> None:
    off.answer(NUTELLA_CODE, reply)

    with pytest.raises(ProductLookupError) as caught:
        lookup.find(NUTELLA_CODE)

    assert caught.value.status == 502
    assert caught.value.code == "product_lookup_error"
    assert "Open Food Facts" in caught.value.message
    assert said in caught.value.message
    assert "Traceback" not in caught.value.message
    assert store.get(f"product:{NUTELLA_CODE}") is None
    del off.answers[NUTELLA_CODE]
    assert lookup.find(NUTELLA_CODE) is not None  # asked again once it is back


def test_an_unreachable_open_food_facts_is_a_lookup_error(
    make_lookup: Callable[..., ProductLookup],
) -> None:
    lookup = make_lookup(url=f"http://127.0.0.1:{free_port()}")

    with pytest.raises(ProductLookupError, match="Open Food Facts could not be reached"):
        lookup.find(NUTELLA_CODE)


def test_a_slow_open_food_facts_is_a_lookup_error_within_the_timeout(
    make_lookup: Callable[..., ProductLookup], off: OpenFoodFactsServer
) -> None:
    off.answer(NUTELLA_CODE, slow(NUTELLA_CODE, off.products[NUTELLA_CODE], 3.0))
    lookup = make_lookup(timeout=0.5)

    started = time.monotonic()
    with pytest.raises(ProductLookupError, match=r"did not answer within 0\.5s"):
        lookup.find(NUTELLA_CODE)

    assert time.monotonic() - started < 2.0
    assert len(off.lookups_of(NUTELLA_CODE)) == 1  # no retry


# ------------------------------------------------------------------ what is sent


def test_the_request_names_the_client_and_asks_only_for_the_fields_used(
    lookup: ProductLookup, off: OpenFoodFactsServer
) -> None:
    lookup.find(NUTELLA_CODE)

    [request] = off.lookups
    assert request.method == "GET"
    assert request.header("User-Agent") == USER_AGENT
    assert off.query(request) == {"fields": [",".join(PRODUCT_FIELDS)]}
    assert set(PRODUCT_FIELDS) >= {"product_name", "brands", "serving_quantity", "nutriments"}


def test_a_base_url_with_a_trailing_slash_is_joined_once(
    make_lookup: Callable[..., ProductLookup], off: OpenFoodFactsServer
) -> None:
    make_lookup(url=f"{off.url}/").find(NUTELLA_CODE)

    assert [request.route for request in off.lookups] == [f"/api/v2/product/{NUTELLA_CODE}"]


@pytest.mark.parametrize("code", ["49000028911", "049000028911", "30176240107O1", "", "1" * 14])
def test_a_barcode_not_in_its_lookup_form_is_refused_unasked(
    lookup: ProductLookup, off: OpenFoodFactsServer, code: str
) -> None:
    with pytest.raises(BadRequest):
        lookup.find(code)

    assert off.lookups == []


def test_without_a_url_lookups_are_not_configured(
    make_lookup: Callable[..., ProductLookup],
) -> None:
    lookup = make_lookup(url="")

    assert not lookup.configured
    with pytest.raises(ProductsNotConfigured):
        lookup.find(NUTELLA_CODE)


# ------------------------------------------------------------------ the budget


def test_the_budget_refuses_the_third_lookup_in_a_minute_unasked(
    make_lookup: Callable[..., ProductLookup], off: OpenFoodFactsServer, clock: Clock
) -> None:
    lookup = make_lookup(rate_per_minute=2)
    lookup.find(NUTELLA_CODE)
    lookup.find("0000000000017")

    with pytest.raises(UpstreamRateLimited) as caught:
        lookup.find(COLA_CODE)

    assert caught.value.retry_after == 45  # the minute began 15 s ago
    assert caught.value.headers() == {"Retry-After": "45"}
    assert caught.value.code == "upstream_rate_limited"
    assert "Open Food Facts" in caught.value.message
    assert off.lookups_of(COLA_CODE) == []


def test_answers_kept_in_the_store_spend_no_budget(
    make_lookup: Callable[..., ProductLookup], off: OpenFoodFactsServer
) -> None:
    lookup = make_lookup(rate_per_minute=2)
    lookup.find(NUTELLA_CODE)
    lookup.find("0000000000017")

    for _ in range(5):
        assert lookup.find(NUTELLA_CODE) is not None
        assert lookup.find("0000000000017") is None
    assert len(off.lookups) == 2


def test_the_budget_is_shared_by_every_worker(
    make_lookup: Callable[..., ProductLookup], off: OpenFoodFactsServer
) -> None:
    first, second = make_lookup(rate_per_minute=2), make_lookup(rate_per_minute=2)
    first.find(NUTELLA_CODE)
    second.find("0000000000017")

    with pytest.raises(UpstreamRateLimited):
        first.find(COLA_CODE)
    with pytest.raises(UpstreamRateLimited):
        second.find(OATCAKES_CODE)
    assert len(off.lookups) == 2


def test_the_next_minute_has_a_budget_of_its_own(
    make_lookup: Callable[..., ProductLookup], off: OpenFoodFactsServer, clock: Clock
) -> None:
    lookup = make_lookup(rate_per_minute=2)
    lookup.find(NUTELLA_CODE)
    lookup.find("0000000000017")
    clock.now += 44.5  # the last half second of the minute
    with pytest.raises(UpstreamRateLimited) as caught:
        lookup.find(COLA_CODE)
    assert caught.value.retry_after == 1

    clock.now += 0.5

    assert lookup.find(COLA_CODE) is not None
    assert len(off.lookups) == 3


def test_a_failed_lookup_spends_its_unit(
    make_lookup: Callable[..., ProductLookup], off: OpenFoodFactsServer
) -> None:
    lookup = make_lookup(rate_per_minute=1)
    off.answer(NUTELLA_CODE, server_down())
    with pytest.raises(ProductLookupError):
        lookup.find(NUTELLA_CODE)

    with pytest.raises(UpstreamRateLimited):
        lookup.find(NUTELLA_CODE)
    assert len(off.lookups) == 1


def test_a_found_product_answer_is_taken_from_status_not_http(
    lookup: ProductLookup, off: OpenFoodFactsServer
) -> None:
    # Open Food Facts has answered unknown barcodes with HTTP 200 and status 0 too.
    off.answer("0000000000017", Reply(200, {"code": "0000000000017", "status": 0}))
    off.answer(COLA_CODE, product_found(COLA_CODE, off.products[COLA_CODE]))

    assert lookup.find("0000000000017") is None
    assert lookup.find(COLA_CODE) is not None
