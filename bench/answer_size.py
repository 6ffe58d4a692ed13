"""How long the model's visible answer is: the answer schema filled with 3, 10 and 30 items.

Run: .venv/bin/python bench/answer_size.py
The characters, and tokens at 3 to 4 characters a token (JSON with English words), bound what
OPENAI_MAX_OUTPUT_TOKENS must leave room for.
"""

from __future__ import annotations

import json

ITEM = {
    "name": "Grilled salmon fillet",
    "grams": 150,
    "calories": 312,
    "protein": 33.5,
    "carbs": 0,
    "fat": 19.8,
    "confidence": 0.85,
}


def answer(items: int) -> dict[str, object]:
    """A full answer with this many items, worded as a model words one."""
    return {
        "isFood": True,
        "name": "Grilled Salmon with Asparagus and Rice",
        "items": [ITEM] * items,
        "caloriesRange": {"low": 600, "high": 900},
        "servingSize": "1 fillet, 6 spears, 1 cup rice",
        "ingredients": ["salmon", "asparagus", "rice", "olive oil", "lemon", "garlic"],
        "assumptions": [
            "cooked in about 1 tbsp olive oil",
            "rice portion is about 1 cup",
            "no sauce beyond what is visible",
        ],
        "suggestions": [
            "Add a leafy green salad",
            "Swap white rice for brown rice",
            "Add a side of beans",
        ],
        "confidence": 0.8,
    }


def main() -> None:
    """Print the size of answers of 3, 10 and 30 items."""
    for items in (3, 10, 30):
        size = len(json.dumps(answer(items), separators=(",", ":")))
        print(f"{items:>2} items: {size:>5} characters, {size // 4}-{size // 3} tokens")


if __name__ == "__main__":
    main()
