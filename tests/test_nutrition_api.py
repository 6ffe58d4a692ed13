"""The service's numbers from USDA SR28: grounded items, POST /nutrition, GET /foods, /health."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from app import ConfigError, create_app
from meal import MAX_TEXT_READ
from nutrition import NUTRIENT_UNITS, NutritionTable
from tests import images
from tests.conftest import (
    SR28,
    analyze_over_socket,
    assert_json_error,
    cached_keys,
    post_photo,
    running_gunicorn,
)
from tests.fakes import ChatCompletionsServer, RedisServer, UserServiceServer
from tests.nutrition_labels import COMMON_FOODS, DISH_COMPONENTS, LABELLED_FOODS

ROOT = Path(__file__).resolve().parents[1]
SR28_FILES = ("FOOD_DES.txt", "FD_GROUP.txt", "ABBREV.txt", "ABBREV.columns", "NUTR_DEF.txt")


@pytest.fixture
def grounded(client_with: Callable[..., FlaskClient], table: NutritionTable) -> FlaskClient:
    """A client for an app that counts from the SR28 table."""
    return client_with(nutrition_source="usda-sr28")


def item(description: str, grams: float = 100, calories: float = 1, **extra: Any) -> dict[str, Any]:
    """A model's item with deliberately wrong numbers."""
    return {
        "name": description,
        "description": description,
        "cookingMethod": None,
        "grams": grams,
        "calories": calories,
        "protein": 0,
        "carbs": 0,
        "fat": 0,
        "confidence": 0.8,
        **extra,
    }


def answer(*items: dict[str, Any]) -> dict[str, Any]:
    """A model's full answer holding these items."""
    return {
        "isFood": True,
        "name": "A meal",
        "items": list(items),
        "caloriesRange": None,
        "servingSize": "one plate",
        "ingredients": [],
        "assumptions": [],
        "suggestions": [],
        "confidence": 0.8,
    }


def analysis_of(client: FlaskClient, auth_headers: dict[str, str], shade: int = 1) -> Any:
    """POST a photo and give the analysis of a 200 answer."""
    response = post_photo(client, auth_headers, images.jpeg(40, 30, color=(shade * 29 % 256, 5, 5)))
    assert response.status_code == 200, response.get_json()
    return response.get_json()["analysis"]


# ------------------------------------------------------------------ photos grounded in the table


def test_thirty_common_foods_are_counted_from_the_table(
    grounded: FlaskClient,
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
    table: NutritionTable,
) -> None:
    labels = {label.description: label for label in LABELLED_FOODS}
    model.analysis = answer(
        *(item(food, cookingMethod=labels[food].method) for food in COMMON_FOODS)
    )
    analysis = analysis_of(grounded, auth_headers)
    items = analysis["items"]
    assert len(items) == 30
    inside = []
    for food, counted in zip(COMMON_FOODS, items, strict=True):
        assert counted["nutritionSource"] == "usda-sr28", food
        assert len(counted["ndbNo"]) == 5
        assert counted["ndbNo"].isdigit()
        fitting = [table.food(number) for number in labels[food].acceptable]
        kcal = [candidate.kcal_per_100g for candidate in fitting if candidate]
        inside.append(min(kcal) <= counted["calories"] <= max(kcal))
    assert sum(inside) / len(inside) >= 0.85
    assert analysis["calories"] == sum(counted["calories"] for counted in items)
    for name in ("protein", "carbs", "fat"):
        assert analysis[name] == pytest.approx(sum(counted[name] for counted in items), abs=0.05)


def test_a_grounded_item_is_the_tables_values_scaled_to_its_grams(
    grounded: FlaskClient,
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
    table: NutritionTable,
) -> None:
    model.analysis = answer(item("Salmon, Atlantic, farmed, cooked, dry heat", grams=178))
    [salmon] = analysis_of(grounded, auth_headers)["items"]
    expected = table.nutrients("15237", 178)
    assert salmon["ndbNo"] == "15237"
    assert salmon["usdaDescription"] == "Fish, salmon, Atlantic, farmed, cooked, dry heat"
    assert salmon["calories"] == expected["calories"]
    assert (salmon["protein"], salmon["carbs"], salmon["fat"]) == pytest.approx(
        (expected["protein"], expected["carbs"], expected["fat"])
    )
    assert salmon["nutrients"] == expected["nutrients"]
    assert set(salmon["nutrients"]) == set(NUTRIENT_UNITS)


def test_an_item_the_table_does_not_know_keeps_the_models_numbers(
    grounded: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.analysis = answer(item("xqzt plate", grams=50, calories=120))
    [unknown] = analysis_of(grounded, auth_headers)["items"]
    assert unknown["nutritionSource"] == "model"
    assert unknown["calories"] == 120
    assert "ndbNo" not in unknown


def test_a_grounded_item_offers_alternatives_and_a_household_portion(
    grounded: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.analysis = answer(item("banana", grams=118))
    [banana] = analysis_of(grounded, auth_headers)["items"]
    assert 1 <= len(banana["alternatives"]) <= 3
    for other in banana["alternatives"]:
        assert set(other) == {"ndbNo", "usdaDescription", "kcalPer100g"}
        assert other["ndbNo"] != banana["ndbNo"]
    assert banana["portion"].endswith("g)")


def test_the_totals_carry_the_sums_of_the_nutrients(
    grounded: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.analysis = answer(item("banana", grams=100), item("whole milk", grams=244))
    analysis = analysis_of(grounded, auth_headers)
    for name in NUTRIENT_UNITS:
        values = [
            counted["nutrients"][name]
            for counted in analysis["items"]
            if counted["nutrients"][name] is not None
        ]
        assert analysis["nutrients"][name] == pytest.approx(sum(values), abs=0.051)


def test_a_service_started_with_no_nutrition_settings_counts_from_the_bundled_table(
    redis_server: RedisServer,
    model_server: ChatCompletionsServer,
    user_service_server: UserServiceServer,
    table: NutritionTable,
    tmp_path: Path,
) -> None:
    model_server.reset()
    model_server.analysis = answer(
        item("grilled salmon fillet", grams=150, cookingMethod="grilled"),
        item("steamed asparagus", grams=90, cookingMethod="steamed"),
    )
    with running_gunicorn(
        redis_server, model_server, user_service_server, tmp_path, NUTRITION_SOURCE=None
    ) as server:
        response = analyze_over_socket(server, images.jpeg(40, 30, color=(9, 99, 9)))
        health = server.session.get(f"{server.url}/health", timeout=5).json()
        output = server.output()
    assert response.status_code == 200, response.text
    salmon, asparagus = response.json()["analysis"]["items"]
    for counted in (salmon, asparagus):
        assert counted["nutritionSource"] == "usda-sr28"
        food = table.food(counted["ndbNo"])
        assert food is not None
        assert counted["calories"] == table.nutrients(food.ndb_no, counted["grams"])["calories"]
    assert "salmon" in salmon["usdaDescription"].lower()
    assert "asparagus" in asparagus["usdaDescription"].lower()
    assert health["checks"]["nutrition"] == f"usda-sr28 (8790 foods, bundled, {table.identity})"
    assert f"nutrition counted from usda-sr28 (8790 foods, {table.identity})" in output


def test_counting_off_and_another_copy_at_once_is_refused(
    make_config: Callable[..., Any],
) -> None:
    with pytest.raises(ConfigError, match="NUTRITION_SOURCE=model turns counting off"):
        make_config(usda_sr28_dir=str(SR28))


def test_pad_thai_listed_by_its_components_is_counted_item_by_item(
    grounded: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    components = DISH_COMPONENTS["pad thai"]
    model.analysis = {
        **answer(*(item(label.description, cookingMethod=label.method) for label in components)),
        "name": "Pad thai",
    }
    analysis = analysis_of(grounded, auth_headers)
    assert analysis["name"] == "Pad thai"
    for label, counted in zip(components, analysis["items"], strict=True):
        assert counted["nutritionSource"] == "usda-sr28", label.description
        assert counted["ndbNo"] in label.acceptable, label.description


def test_pad_thai_as_one_item_keeps_the_models_numbers(
    grounded: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.analysis = answer(item("pad thai", grams=350, calories=620))
    [dish] = analysis_of(grounded, auth_headers, 2)["items"]
    assert dish["nutritionSource"] == "model"
    assert dish["calories"] == 620
    assert "ndbNo" not in dish


def test_without_the_table_answers_are_the_models(
    client: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.analysis = answer(item("banana", grams=100, calories=1))
    analysis = analysis_of(client, auth_headers)
    assert analysis["items"][0]["calories"] == 1
    assert "nutrients" not in analysis
    assert "nutritionSource" not in analysis["items"][0]


def test_turning_the_table_on_does_not_serve_an_old_ungrounded_answer(
    make_config: Callable[..., Any],
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
    table: NutritionTable,
) -> None:
    model.analysis = answer(item("banana", grams=100, calories=1))
    config = make_config()
    analysis_of(create_app(config).test_client(), auth_headers, 3)
    with_table = create_app(dataclasses.replace(config, nutrition_source="usda-sr28"))
    again = analysis_of(with_table.test_client(), auth_headers, 3)
    assert len(model.calls) == 2
    assert again["items"][0]["nutritionSource"] == "usda-sr28"


def test_a_save_sends_the_grounded_items(
    grounded: FlaskClient,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    auth_headers: dict[str, str],
) -> None:
    model.analysis = answer(item("apple", grams=182))
    response = post_photo(grounded, auth_headers, images.jpeg(30, 30), "?save=true")
    assert response.status_code == 200
    entry = user_service.entries[-1]
    assert entry["items"][0]["ndbNo"] == response.get_json()["analysis"]["items"][0]["ndbNo"]
    assert entry["nutrients"] == response.get_json()["analysis"]["nutrients"]


# ------------------------------------------------------------------ POST /nutrition


def post_nutrition(client: FlaskClient, headers: dict[str, str], body: Any) -> Any:
    """POST a JSON body to /nutrition."""
    return client.post("/nutrition", json=body, headers=headers)


def test_nutrition_by_ndb_number_counts_from_the_table_without_a_model(
    grounded: FlaskClient,
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
    table: NutritionTable,
) -> None:
    response = post_nutrition(grounded, auth_headers, {"items": [{"ndbNo": "15237", "grams": 150}]})
    assert response.status_code == 200
    body = response.get_json()
    assert body["source"] == "usda-sr28"
    [salmon] = body["analysis"]["items"]
    assert salmon["calories"] == table.nutrients("15237", 150)["calories"]
    assert body["analysis"]["calories"] == salmon["calories"]
    assert model.calls == []


def test_nutrition_by_name_matches_and_sums(
    grounded: FlaskClient, auth_headers: dict[str, str]
) -> None:
    items = [
        {"name": "grilled chicken breast", "grams": 120},
        {"name": "white rice, cooked", "grams": 150},
    ]
    analysis = post_nutrition(grounded, auth_headers, {"items": items}).get_json()["analysis"]
    assert [found["nutritionSource"] for found in analysis["items"]] == ["usda-sr28"] * 2
    assert analysis["calories"] == sum(found["calories"] for found in analysis["items"])
    assert set(analysis) >= {
        "name",
        "calories",
        "protein",
        "carbs",
        "fat",
        "servingSize",
        "ingredients",
        "confidence",
        "items",
        "nutrients",
    }


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"items": []},
        {"items": [{"ndbNo": "99999", "grams": 100}]},
        {"items": [{"name": "xqzt plate", "grams": 100}]},
        {"items": [{"name": "banana", "grams": -5}]},
        {"items": [{"name": "banana"}]},
        {"items": ["banana"]},
        {"items": [{"grams": 100}]},
    ],
)
def test_nutrition_refuses_what_it_cannot_count(
    grounded: FlaskClient, auth_headers: dict[str, str], body: Any
) -> None:
    assert_json_error(post_nutrition(grounded, auth_headers, body), 400, "invalid_parameter")


def test_nutrition_without_the_table_answers_503(
    client: FlaskClient, auth_headers: dict[str, str]
) -> None:
    response = post_nutrition(client, auth_headers, {"items": [{"ndbNo": "15237", "grams": 150}]})
    assert_json_error(response, 503, "nutrition_not_configured")
    assert "NUTRITION_SOURCE=model" in response.get_json()["error"]


def test_nutrition_needs_a_token(grounded: FlaskClient) -> None:
    assert_json_error(post_nutrition(grounded, {}, {"items": []}), 401, "missing_token")


# ------------------------------------------------------------------ GET /foods


def test_foods_finds_salmon(grounded: FlaskClient, auth_headers: dict[str, str]) -> None:
    response = grounded.get("/foods?q=salmon&limit=5", headers=auth_headers)
    foods = response.get_json()["foods"]
    assert 1 <= len(foods) <= 5
    assert all("salmon" in food["usdaDescription"].lower() for food in foods)
    assert set(foods[0]) == {"ndbNo", "usdaDescription", "commonName", "group", "kcalPer100g"}


@pytest.mark.parametrize(
    "query", ["", "?q=", "?q=salmon&limit=0", "?q=salmon&limit=x", "?q=salmon&limit=51"]
)
def test_foods_refuses_a_bad_query(
    grounded: FlaskClient, auth_headers: dict[str, str], query: str
) -> None:
    assert_json_error(
        grounded.get(f"/foods{query}", headers=auth_headers), 400, "invalid_parameter"
    )


def test_foods_without_the_table_answers_503(
    client: FlaskClient, auth_headers: dict[str, str]
) -> None:
    assert_json_error(
        client.get("/foods?q=salmon", headers=auth_headers), 503, "nutrition_not_configured"
    )


# ------------------------------------------------------------------ health and start-up


def test_health_names_the_bundled_table_and_its_identity(
    grounded: FlaskClient, table: NutritionTable
) -> None:
    assert grounded.get("/health").get_json()["checks"]["nutrition"] == (
        f"usda-sr28 (8790 foods, bundled, {table.identity})"
    )


def test_health_names_another_copy_by_its_setting(
    client_with: Callable[..., FlaskClient], table: NutritionTable
) -> None:
    client = client_with(nutrition_source="usda-sr28", usda_sr28_dir=str(SR28))
    assert client.get("/health").get_json()["checks"]["nutrition"] == (
        f"usda-sr28 (8790 foods, USDA_SR28_DIR, {table.identity})"
    )


def test_health_says_when_counting_is_off(client: FlaskClient) -> None:
    assert client.get("/health").get_json()["checks"]["nutrition"] == (
        "off (NUTRITION_SOURCE=model)"
    )


def broken_copy(tmp_path: Path) -> Path:
    """SR28 with one line of FOOD_DES.txt cut short."""
    folder = tmp_path / "sr28"
    folder.mkdir()
    for name in (*SR28_FILES, "WEIGHT.txt"):
        shutil.copyfile(SR28 / name, folder / name)
    lines = (folder / "FOOD_DES.txt").read_bytes().split(b"\r\n")
    lines[3] = lines[3].split(b"^")[0]
    (folder / "FOOD_DES.txt").write_bytes(b"\r\n".join(lines))
    return folder


def test_a_malformed_table_stops_the_app(make_config: Callable[..., Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"FOOD_DES\.txt"):
        create_app(
            make_config(nutrition_source="usda-sr28", usda_sr28_dir=str(broken_copy(tmp_path)))
        )


def test_a_malformed_table_stops_gunicorn_with_one_line(tmp_path: Path) -> None:
    environment = {"PATH": "/usr/bin:/bin", "USDA_SR28_DIR": str(broken_copy(tmp_path))}
    result = subprocess.run(
        [str(Path(sys.executable).with_name("gunicorn")), "app:app"],
        cwd=ROOT,
        env={**environment, "SECRETS_DIR": str(tmp_path), "GUNICORN_BIND": "127.0.0.1:0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0
    assert len(output.splitlines()) == 1, output
    assert "USDA_SR28_DIR" in output
    assert "FOOD_DES.txt" in output


def test_foods_refuses_a_limit_in_other_digits(
    grounded: FlaskClient, auth_headers: dict[str, str]
) -> None:
    response = grounded.get("/foods?q=salmon&limit=\u00b2", headers=auth_headers)
    assert_json_error(response, 400, "invalid_parameter")


def test_nutrition_items_adding_up_past_any_meal_answer_400(
    grounded: FlaskClient, auth_headers: dict[str, str]
) -> None:
    items = [{"ndbNo": "01001", "grams": 5000}] * 3
    response = post_nutrition(grounded, auth_headers, {"items": items})
    assert_json_error(response, 400, "invalid_parameter")
    assert "kcal" in response.get_json()["error"]


def upload_twice(client: FlaskClient, headers: dict[str, str], shade: int) -> list[Any]:
    """POST the same photo twice; both responses."""
    photo = images.jpeg(40, 30, color=(shade * 29 % 256, 5, 5))
    return [post_photo(client, headers, photo) for _ in range(2)]


@pytest.mark.parametrize(
    ("foods", "named"),
    [
        ([item("olive oil", grams=5000), item("butter", grams=5000)], "kcal"),
        ([item("Sugars, granulated", grams=2100, calories=10)], "carbs"),
        ([item("Oil, olive, salad or cooking", grams=2100, calories=10)], "fat"),
    ],
    ids=["oil and butter past the calories", "sugar past the carbs", "oil past the fat"],
)
def test_a_photo_counted_past_the_limits_answers_502_and_is_not_cached(
    grounded: FlaskClient,
    model: ChatCompletionsServer,
    redis: RedisServer,
    auth_headers: dict[str, str],
    foods: list[dict[str, Any]],
    named: str,
) -> None:
    model.analysis = answer(*foods)
    responses = upload_twice(grounded, auth_headers, 9)
    for response in responses:
        assert_json_error(response, 502, "upstream_error")
        assert named in response.get_json()["error"]
    assert len(model.calls) == 2
    assert cached_keys(redis) == []


def test_a_photo_counted_within_the_limits_is_answered_and_cached(
    grounded: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.analysis = answer(item("olive oil", grams=100), item("butter", grams=1000))
    first, again = upload_twice(grounded, auth_headers, 10)
    assert first.status_code == 200
    assert first.get_json()["analysis"]["calories"] == 884 + 7170
    assert again.get_json()["source"] == "cache"
    assert len(model.calls) == 1


@pytest.mark.parametrize(
    ("items", "named"),
    [
        ([{"ndbNo": "19335", "grams": 2100}], "carbs"),
        ([{"ndbNo": "04053", "grams": 2100}], "fat"),
    ],
    ids=["sugar past the carbs", "oil past the fat"],
)
def test_nutrition_items_past_a_macronutrients_limit_answer_400(
    grounded: FlaskClient, auth_headers: dict[str, str], items: list[Any], named: str
) -> None:
    response = post_nutrition(grounded, auth_headers, {"items": items})
    assert_json_error(response, 400, "invalid_parameter")
    assert named in response.get_json()["error"]


@pytest.mark.parametrize(
    "grams",
    [
        "1e3",
        "2.5kg",
        "1,5",
        "\u22125",
        "0x10",
        "1e308",
        "150",
        "\u0661\u0665\u0660",
        True,
        None,
        [150],
        {"value": 150},
    ],
)
def test_nutrition_refuses_grams_that_are_not_a_json_number(
    grounded: FlaskClient, auth_headers: dict[str, str], grams: Any
) -> None:
    body = {"items": [{"ndbNo": "15237", "grams": 150}, {"name": "banana", "grams": grams}]}
    response = post_nutrition(grounded, auth_headers, body)
    assert_json_error(response, 400, "invalid_parameter")
    assert "item 2: grams" in response.get_json()["error"]


@pytest.mark.parametrize("grams", ["1e400", "-1e400", "NaN", "Infinity"])
def test_nutrition_refuses_grams_beyond_a_float(
    grounded: FlaskClient, auth_headers: dict[str, str], grams: str
) -> None:
    body = f'{{"items": [{{"ndbNo": "15237", "grams": {grams}}}]}}'
    response = grounded.post(
        "/nutrition", data=body, content_type="application/json", headers=auth_headers
    )
    assert_json_error(response, 400, "invalid_parameter")
    assert "grams" in response.get_json()["error"]


@pytest.mark.parametrize("grams", [0, 150, 150.5, 5000])
def test_nutrition_takes_grams_as_json_numbers(
    grounded: FlaskClient, auth_headers: dict[str, str], grams: float
) -> None:
    response = post_nutrition(
        grounded, auth_headers, {"items": [{"ndbNo": "09040", "grams": grams}]}
    )
    assert response.status_code == 200
    assert response.get_json()["analysis"]["items"][0]["grams"] == grams


def test_nutrition_reads_a_cooking_method_no_further_than_its_bound(
    grounded: FlaskClient, auth_headers: dict[str, str]
) -> None:
    def matched(method: str) -> Any:
        items = [{"name": "chicken breast", "grams": 100, "cookingMethod": method}]
        return post_nutrition(grounded, auth_headers, {"items": items}).get_json()["analysis"]

    plain = matched("")
    assert matched("x " * MAX_TEXT_READ + "fried")["items"] == plain["items"]
    assert matched("fried")["items"][0]["ndbNo"] != plain["items"][0]["ndbNo"]


def test_counting_replaces_the_models_consistency_warning_and_keeps_the_others(
    grounded: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.analysis = answer(*[item("banana", grams=10, calories=300, fat=0)] * 31)
    warnings = analysis_of(grounded, auth_headers, 11)["warnings"]
    assert warnings == ["the model listed 31 foods; the first 30 are kept and summed"]
