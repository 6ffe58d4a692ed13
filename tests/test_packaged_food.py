"""Packaged food through HTTP: barcodes read from the photos, products looked up in a loopback
Open Food Facts, nutrition labels read by the loopback model, and GET /products/{barcode}."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import Any

import pytest
import zxingcpp
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests.barcode_photos import THREE_MP, Label, bad_check_digit_ean13, bars, package_photo
from tests.conftest import assert_json_error
from tests.fakes import DEFAULT_ANALYSIS, ChatCompletionsServer, json_error
from tests.open_food_facts import (
    NUTELLA,
    NUTELLA_CODE,
    OATCAKES_CODE,
    OpenFoodFactsServer,
    server_down,
    slow,
)

UNKNOWN_CODE = "4006381333931"
PLATE_ITEM = {
    "name": "apple",
    "description": "Apples, raw, with skin",
    "cookingMethod": None,
    "grams": 150,
    "calories": 78,
    "protein": 0.4,
    "carbs": 21,
    "fat": 0.3,
    "confidence": 0.8,
    "photos": [1],
    "barcode": None,
    "label": None,
}


@functools.cache
def product_photo(code: str, seed: int = 1) -> bytes:
    """A 3 MP photo of a package with this EAN-13 on it, a little turned and blurred."""
    label = Label(bars(zxingcpp.BarcodeFormat.EAN13, code[:12]), share=0.3)
    return package_photo(THREE_MP, [label], seed=seed)


@functools.cache
def plate_photo() -> bytes:
    """A 3 MP photo with no code on it."""
    return package_photo(THREE_MP, seed=3)


@functools.cache
def bad_code_photo() -> tuple[str, bytes]:
    """A package whose EAN-13 has a wrong check digit, and the digits it carries."""
    digits, symbol = bad_check_digit_ean13("400638133393")
    return digits, package_photo(THREE_MP, [Label(symbol, share=0.3)], seed=4)


@pytest.fixture
def shop(
    client_with: Callable[..., FlaskClient], open_food_facts: OpenFoodFactsServer
) -> FlaskClient:
    """A client for an app that reads barcodes and asks the loopback Open Food Facts."""
    return client_with(nutrition_source="usda-sr28", openfoodfacts_url=open_food_facts.url)


def post_photos(
    client: FlaskClient, headers: dict[str, str], *photos: bytes, note: str | None = None
) -> TestResponse:
    form: dict[str, Any] = {
        "image": [(io.BytesIO(photo), f"photo-{at}.jpg") for at, photo in enumerate(photos, 1)]
    }
    if note is not None:
        form["note"] = note
    return client.post(
        "/analyze-food", data=form, headers=headers, content_type="multipart/form-data"
    )


def answer(*items: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULT_ANALYSIS, "items": list(items)}


def user_texts(model: ChatCompletionsServer) -> str:
    content = model.calls[-1].json()["messages"][1]["content"]
    return "\n".join(part["text"] for part in content if part["type"] == "text")


# ------------------------------------------------------------------ known products


def test_a_known_product_alone_is_answered_without_the_model_then_from_the_cache(
    shop: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    open_food_facts: OpenFoodFactsServer,
) -> None:
    first = post_photos(shop, auth_headers, product_photo(NUTELLA_CODE))
    again = post_photos(shop, auth_headers, product_photo(NUTELLA_CODE))

    assert first.status_code == 200, first.get_json()
    assert model.calls == []
    assert len(open_food_facts.lookups_of(NUTELLA_CODE)) == 1
    assert (first.get_json()["source"], again.get_json()["source"]) == ("openfoodfacts", "cache")
    analysis = first.get_json()["analysis"]
    [item] = analysis["items"]
    assert item["barcode"] == NUTELLA_CODE
    assert item["nutritionSource"] == "openfoodfacts"
    assert item["name"] == "Nutella (Ferrero)"
    assert item["grams"] == 15  # one serving, as the package declares it
    per_100g = NUTELLA["nutriments"]["energy-kcal_100g"]
    assert item["calories"] == round(per_100g * 15 / 100)
    assert analysis["calories"] == item["calories"]
    assert (
        analysis["caloriesRange"]["low"]
        <= analysis["calories"]
        <= analysis["caloriesRange"]["high"]
    )
    assert "model" not in analysis


def test_a_product_without_a_serving_size_counts_100_g_and_says_so(
    shop: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    open_food_facts: OpenFoodFactsServer,
) -> None:
    open_food_facts.products[OATCAKES_CODE].pop("serving_quantity")
    open_food_facts.products[OATCAKES_CODE].pop("serving_size")

    analysis = post_photos(shop, auth_headers, product_photo(OATCAKES_CODE)).get_json()["analysis"]

    assert analysis["items"][0]["grams"] == 100
    assert any("100 g assumed" in assumption for assumption in analysis["assumptions"])
    assert analysis["items"][0]["calories"] == round(1883 / 4.184)  # kJ only, converted


def test_a_note_sends_even_known_products_to_the_model(
    shop: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
) -> None:
    half = {**PLATE_ITEM, "name": "Nutella", "grams": 7.5, "barcode": NUTELLA_CODE}
    model.analysis = answer(half)

    response = post_photos(shop, auth_headers, product_photo(NUTELLA_CODE), note="half a spoon")

    assert response.get_json()["source"] == "api"
    [item] = response.get_json()["analysis"]["items"]
    assert item["nutritionSource"] == "openfoodfacts"
    assert item["calories"] == round(NUTELLA["nutriments"]["energy-kcal_100g"] * 7.5 / 100)
    assert "Nutella" in user_texts(model)


# ------------------------------------------------------------------ the model, told what codes say


def test_a_plate_and_a_product_make_one_call_naming_the_product_counted_from_its_values(
    shop: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    spread = {**PLATE_ITEM, "name": "hazelnut spread", "grams": 20, "barcode": NUTELLA_CODE}
    model.analysis = answer(PLATE_ITEM, spread)

    response = post_photos(shop, auth_headers, plate_photo(), product_photo(NUTELLA_CODE))

    assert response.status_code == 200, response.get_json()
    assert len(model.calls) == 1
    texts = user_texts(model)
    assert "<products>" in texts
    assert NUTELLA_CODE in texts
    assert "Ferrero" in texts
    apple, counted = response.get_json()["analysis"]["items"]
    assert counted["nutritionSource"] == "openfoodfacts"
    assert counted["calories"] == round(NUTELLA["nutriments"]["energy-kcal_100g"] * 20 / 100)
    assert apple["nutritionSource"] in {"usda-sr28", "model"}


def test_an_unknown_code_asks_the_model_once_with_a_warning(
    shop: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    open_food_facts: OpenFoodFactsServer,
) -> None:
    response = post_photos(shop, auth_headers, product_photo(UNKNOWN_CODE))

    assert response.get_json()["source"] == "api"
    assert len(model.calls) == 1
    assert len(open_food_facts.lookups_of(UNKNOWN_CODE)) == 1
    warnings = response.get_json()["analysis"]["warnings"]
    assert any(UNKNOWN_CODE in warning and "no product" in warning for warning in warnings)


@pytest.mark.parametrize(
    "failure", [server_down(), json_error(429, "slow down")], ids=["down", "rate limited"]
)
def test_open_food_facts_failing_asks_the_model_and_caches_nothing(
    shop: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    open_food_facts: OpenFoodFactsServer,
    failure: Any,
) -> None:
    open_food_facts.answer(NUTELLA_CODE, failure)

    first = post_photos(shop, auth_headers, product_photo(NUTELLA_CODE))
    again = post_photos(shop, auth_headers, product_photo(NUTELLA_CODE))

    assert (first.status_code, first.get_json()["source"]) == (200, "api")
    assert any("Open Food Facts" in warning for warning in first.get_json()["analysis"]["warnings"])
    assert again.get_json()["source"] == "api"  # the degraded answer was not kept
    assert len(model.calls) == 2


def test_a_code_whose_check_digit_fails_is_ignored(
    shop: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    open_food_facts: OpenFoodFactsServer,
) -> None:
    digits, photo = bad_code_photo()

    response = post_photos(shop, auth_headers, photo)

    assert response.get_json()["source"] == "api"
    assert open_food_facts.lookups == []
    assert digits not in user_texts(model)


# ------------------------------------------------------------------ nutrition labels


def test_a_label_the_model_reads_counts_the_item_per_serving(
    shop: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    label = {
        "per": "serving",
        "servingGrams": 40,
        "calories": 150,
        "protein": 5,
        "carbs": 24,
        "fat": 3.5,
    }
    granola = {**PLATE_ITEM, "name": "granola", "grams": 60, "calories": 999, "label": label}
    model.analysis = answer(granola)

    [item] = post_photos(shop, auth_headers, plate_photo()).get_json()["analysis"]["items"]

    assert item["nutritionSource"] == "label"
    assert item["label"] == label
    assert (item["calories"], item["protein"], item["carbs"], item["fat"]) == (225, 7.5, 36, 5.2)


def test_a_label_per_100_g_scales_by_the_grams_and_a_product_outranks_it(
    shop: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    label = {
        "per": "100g",
        "servingGrams": None,
        "calories": 400,
        "protein": 10,
        "carbs": 60,
        "fat": 12,
    }
    by_label = {**PLATE_ITEM, "name": "crackers", "grams": 30, "label": label}
    by_code = {**by_label, "name": "spread", "grams": 20, "barcode": NUTELLA_CODE}
    model.analysis = answer(by_label, by_code)

    response = post_photos(shop, auth_headers, plate_photo(), product_photo(NUTELLA_CODE))

    crackers, spread = response.get_json()["analysis"]["items"]
    assert (crackers["nutritionSource"], crackers["calories"], crackers["fat"]) == (
        "label",
        120,
        3.6,
    )
    assert spread["nutritionSource"] == "openfoodfacts"


def test_an_unbelievable_label_is_dropped(
    shop: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    label = {
        "per": "100g",
        "servingGrams": None,
        "calories": 2500,
        "protein": 10,
        "carbs": 60,
        "fat": 12,
    }
    model.analysis = answer({**PLATE_ITEM, "label": label})

    [item] = post_photos(shop, auth_headers, plate_photo()).get_json()["analysis"]["items"]

    assert "label" not in item
    assert item["nutritionSource"] != "label"


# ------------------------------------------------------------------ GET /products/{barcode}


def test_a_product_by_its_barcode(shop: FlaskClient, auth_headers: dict[str, str]) -> None:
    response = shop.get(f"/products/{NUTELLA_CODE}", headers=auth_headers)

    assert response.status_code == 200
    product = response.get_json()["product"]
    assert (product["barcode"], product["name"], product["brand"]) == (
        NUTELLA_CODE,
        "Nutella",
        "Ferrero",
    )
    assert product["source"] == "openfoodfacts"
    assert product["servingGrams"] == 15


def test_a_upc_a_code_is_looked_up_as_ean_13(
    shop: FlaskClient, auth_headers: dict[str, str], open_food_facts: OpenFoodFactsServer
) -> None:
    response = shop.get("/products/049000028911", headers=auth_headers)

    assert response.status_code == 200
    assert response.get_json()["product"]["barcode"] == "0049000028911"
    assert len(open_food_facts.lookups_of("0049000028911")) == 1


@pytest.mark.parametrize("code", ["3017624010702", "12345", "30176240107011", "abcdefghijklm"])
def test_a_code_that_is_not_one_answers_400(
    shop: FlaskClient, auth_headers: dict[str, str], code: str
) -> None:
    assert_json_error(shop.get(f"/products/{code}", headers=auth_headers), 400, "invalid_parameter")


def test_an_unknown_product_answers_404(shop: FlaskClient, auth_headers: dict[str, str]) -> None:
    response = shop.get(f"/products/{UNKNOWN_CODE}", headers=auth_headers)
    assert_json_error(response, 404, "product_not_found")


def test_open_food_facts_down_answers_502(
    shop: FlaskClient, auth_headers: dict[str, str], open_food_facts: OpenFoodFactsServer
) -> None:
    open_food_facts.answer(NUTELLA_CODE, server_down())
    response = shop.get(f"/products/{NUTELLA_CODE}", headers=auth_headers)
    assert_json_error(response, 502, "product_lookup_error")


def test_open_food_facts_too_slow_answers_502(
    client_with: Callable[..., FlaskClient],
    auth_headers: dict[str, str],
    open_food_facts: OpenFoodFactsServer,
) -> None:
    client = client_with(openfoodfacts_url=open_food_facts.url, openfoodfacts_timeout=0.3)
    open_food_facts.answer(NUTELLA_CODE, slow(NUTELLA_CODE, NUTELLA, 1.0))
    response = client.get(f"/products/{NUTELLA_CODE}", headers=auth_headers)
    assert_json_error(response, 502, "product_lookup_error")


def test_lookups_turned_off_answer_503(client: FlaskClient, auth_headers: dict[str, str]) -> None:
    response = client.get(f"/products/{NUTELLA_CODE}", headers=auth_headers)
    assert_json_error(response, 503, "products_not_configured")
    assert client.get("/health").get_json()["checks"]["products"] == "off"


def test_a_spent_budget_answers_503_with_retry_after(
    client_with: Callable[..., FlaskClient],
    auth_headers: dict[str, str],
    open_food_facts: OpenFoodFactsServer,
) -> None:
    client = client_with(openfoodfacts_url=open_food_facts.url, openfoodfacts_rate=1)
    assert client.get(f"/products/{NUTELLA_CODE}", headers=auth_headers).status_code == 200

    response = client.get(f"/products/{OATCAKES_CODE}", headers=auth_headers)

    assert_json_error(response, 503, "upstream_rate_limited")
    assert "Open Food Facts" in response.get_json()["error"]
    assert 0 < int(response.headers["Retry-After"]) <= 60
    assert len(open_food_facts.lookups) == 1


def test_products_need_a_token(shop: FlaskClient) -> None:
    assert_json_error(shop.get(f"/products/{NUTELLA_CODE}"), 401, "missing_token")


def test_health_says_lookups_are_configured_without_calling_them(
    shop: FlaskClient, open_food_facts: OpenFoodFactsServer
) -> None:
    assert shop.get("/health").get_json()["checks"]["products"] == "openfoodfacts"
    assert open_food_facts.requests == []
