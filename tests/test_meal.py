"""The typed meal: built in one place, turned into the contract's JSON in one place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from errors import BadRequest, NotFood
from meal import (
    NOT_FOOD,
    Analysis,
    NotFoodVerdict,
    as_cached,
    as_contract,
    final_analysis,
    food_entry,
    from_cached,
    normalise_analysis,
    nutrition_analysis,
    stored_analysis_is_sound,
)
from nutrition import NutritionTable

CORE_KEYS = [
    "name",
    "calories",
    "protein",
    "carbs",
    "fat",
    "servingSize",
    "ingredients",
    "confidence",
    "items",
]
STATEMENT_KEYS = ["assumptions", "suggestions", "warnings"]


def salmon_answer(**changes: Any) -> dict[str, Any]:
    """A model's answer with two items, the way the schema asks for it."""
    answer: dict[str, Any] = {
        "name": "Salmon and rice",
        "servingSize": "1 plate",
        "ingredients": ["salmon", "rice"],
        "confidence": 0.9,
        "items": [
            {
                "name": "grilled salmon",
                "description": "Fish, salmon, Atlantic, farmed, cooked, dry heat",
                "cookingMethod": "grilled",
                "grams": 150.0,
                "calories": 310,
                "protein": 33.0,
                "carbs": 0,
                "fat": 18.5,
                "confidence": 0.9,
            },
            {
                "name": "white rice",
                "description": "Rice, white, long-grain, regular, cooked",
                "grams": 180,
                "calories": 234,
                "protein": 4.8,
                "carbs": 51.2,
                "fat": 0.5,
                "confidence": 0.8,
            },
        ],
    }
    answer.update(changes)
    return answer


def contract_json(analysis: Analysis) -> str:
    """The bytes the service sends for an analysis."""
    return json.dumps(as_contract(analysis), separators=(",", ":"))


def test_an_analysis_is_built_in_the_contracts_key_order() -> None:
    analysis = normalise_analysis(salmon_answer(caloriesRange={"low": 600, "high": 400}))
    assert list(as_contract(analysis)) == [*CORE_KEYS, "caloriesRange", *STATEMENT_KEYS]
    assert analysis["caloriesRange"] == {"low": 400, "high": 600}


def test_an_absent_optional_field_stays_absent_not_null() -> None:
    answer = as_contract(normalise_analysis(salmon_answer()))
    assert list(answer) == [*CORE_KEYS, *STATEMENT_KEYS]
    assert "caloriesRange" not in answer
    assert "nutrients" not in answer


def test_whole_grams_stay_whole_in_the_json() -> None:
    text = contract_json(normalise_analysis(salmon_answer()))
    assert '"grams":150,' in text
    assert '"protein":37.8,' in text
    assert '"carbs":51.2,' in text
    assert '"fat":19,' in text


def test_the_entry_id_goes_last_and_leaves_the_analysis_as_it_was() -> None:
    analysis = normalise_analysis(salmon_answer())
    answer = as_contract(analysis, "entry-7")
    assert list(answer)[-1] == "entryId"
    assert answer["entryId"] == "entry-7"
    assert "entryId" not in as_contract(analysis)


def test_a_cached_analysis_reads_back_byte_for_byte() -> None:
    analysis = normalise_analysis(salmon_answer(caloriesRange={"low": 500, "high": 600}))
    stored = json.loads(json.dumps(as_cached(analysis), separators=(",", ":")))
    assert stored_analysis_is_sound(stored)
    read_back = from_cached(stored)
    assert not isinstance(read_back, NotFoodVerdict)
    assert contract_json(read_back) == contract_json(analysis)


def test_a_grounded_analysis_reads_back_byte_for_byte(table: NutritionTable) -> None:
    analysis = final_analysis(normalise_analysis(salmon_answer()), table)
    stored = json.loads(json.dumps(as_cached(analysis)))
    assert stored_analysis_is_sound(stored)
    read_back = from_cached(stored)
    assert not isinstance(read_back, NotFoodVerdict)
    assert contract_json(read_back) == contract_json(analysis)


def test_not_food_is_a_typed_verdict_cached_as_the_same_bytes_as_ever() -> None:
    with pytest.raises(NotFood):
        normalise_analysis(salmon_answer(isFood=False))
    assert json.dumps(as_cached(NOT_FOOD), separators=(",", ":")) == '{"isFood":false}'
    stored = json.loads('{"isFood":false}')
    assert stored_analysis_is_sound(stored)
    assert from_cached(stored) is NOT_FOOD
    assert isinstance(NOT_FOOD.refusal(), NotFood)


def test_grounding_counts_the_items_and_puts_the_nutrients_last(table: NutritionTable) -> None:
    analysis = normalise_analysis(salmon_answer())
    analysis["model"] = "gpt-test"
    grounded = as_contract(final_analysis(analysis, table))
    assert list(grounded) == [*CORE_KEYS, *STATEMENT_KEYS, "model", "nutrients"]
    assert [item["nutritionSource"] for item in grounded["items"]] == ["usda-sr28", "usda-sr28"]
    assert grounded["calories"] == sum(item["calories"] for item in grounded["items"])


def test_the_items_a_caller_names_are_counted_with_the_nutrients_before_the_statements(
    table: NutritionTable,
) -> None:
    analysis = nutrition_analysis(table, [{"ndbNo": "15237", "grams": 150}])
    answer = as_contract(analysis)
    assert list(answer) == [*CORE_KEYS, "nutrients", *STATEMENT_KEYS]
    assert answer["items"][0]["ndbNo"] == "15237"
    assert answer["servingSize"] == "150 g"


def test_the_items_a_caller_names_past_one_meal_are_refused(table: NutritionTable) -> None:
    with pytest.raises(BadRequest):
        nutrition_analysis(table, [{"name": "butter", "grams": 5000}] * 2)


def test_the_food_entry_is_the_contracts_fields_then_the_richer_analysis() -> None:
    analysis = normalise_analysis(salmon_answer())
    entry = food_entry(analysis, "user-42", "abc", ["abc"])
    assert list(entry) == [
        "userId",
        *CORE_KEYS[:-1],
        "source",
        "imageHash",
        "imageHashes",
        "items",
        *STATEMENT_KEYS,
    ]
    assert entry["items"] == as_contract(analysis)["items"]


def test_the_meal_imports_neither_flask_nor_the_app() -> None:
    probe = "import sys, meal; print(sorted({'flask', 'app'} & set(sys.modules)))"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
