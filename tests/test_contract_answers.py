"""The contract's answers, byte for byte, against fixtures recorded before app.py was restructured.

Each case sends photos, notes and model replies through HTTP and compares, with the files in
tests/fixtures/answers/: every response's status and exact body bytes, the JSON bodies the
service posted to the model and to the User Service. Run ``RECORD_ANSWERS=1 pytest
tests/test_contract_answers.py`` to write the files afresh instead of comparing (then commit them
with the change that explains why the answers moved).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests import images
from tests.conftest import post_photo
from tests.fakes import DEFAULT_ANALYSIS, ChatCompletionsServer, Reply, UserServiceServer

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "answers"
RECORDING = os.environ.get("RECORD_ANSWERS") == "1"
REQUEST_ID = "contract-answers-request-0001"
DATA_URL = re.compile(r'"data:[^"]*"')  # an image sent inline, as a JSON string
ENTRY_ID = "5f0c6c1e-0000-4000-8000-00000000e001"  # the id the User Service answers a save with

PHOTOS: dict[str, Callable[[], bytes]] = {
    "plain-jpeg": lambda: images.jpeg(64, 48),
    "photo-jpeg": lambda: images.jpeg(96, 72, pattern="photo", seed=3, noise=8),
    "png": lambda: images.png(80, 60),
}
NOTES: dict[str, tuple[str, dict[str, str]]] = {
    "no-note": ("", {}),
    "note": ("", {"note": "no sauce,   half portion"}),
    "note-lang-pt-BR": ("?lang=pt-BR", {"note": "sem molho"}),
}
ITEMS: list[dict[str, Any]] = [
    {"name": "grilled salmon", "grams": 150, "calories": 310, "protein": 34, "carbs": 0, "fat": 19},
    {
        "name": "white rice",
        "grams": 180,
        "calories": 234,
        "protein": 4.3,
        "carbs": 51.5,
        "fat": 0.5,
    },
]
FULL_ANSWER: dict[str, Any] = {
    "isFood": True,
    "name": "Salmon with rice",
    "items": [{**food, "confidence": 0.85} for food in ITEMS],
    "caloriesRange": {"low": 480, "high": 640},
    "servingSize": "1 plate",
    "ingredients": ["salmon", "rice", "olive oil"],
    "assumptions": ["salmon grilled with about 1 tsp of oil"],
    "suggestions": ["a side of steamed broccoli"],
    "confidence": 0.82,
}
NOT_FOOD: dict[str, Any] = {
    "isFood": False,
    "name": "",
    "items": [],
    "caloriesRange": None,
    "servingSize": "",
    "ingredients": [],
    "assumptions": [],
    "suggestions": [],
    "confidence": 0,
}


def grounded_item(description: str, grams: float) -> dict[str, Any]:
    """A model's item with deliberately wrong numbers, for the table to replace."""
    return {
        "name": description,
        "description": description,
        "cookingMethod": None,
        "grams": grams,
        "calories": 1,
        "protein": 0,
        "carbs": 0,
        "fat": 0,
        "confidence": 0.8,
    }


GROUNDED_ANSWER: dict[str, Any] = {
    **NOT_FOOD,
    "isFood": True,
    "name": "Salmon, banana and an unknown plate",
    "items": [
        grounded_item("Salmon, Atlantic, farmed, cooked, dry heat", 178),
        grounded_item("banana", 118),
        grounded_item("xqzt plate", 50),
    ],
    "servingSize": "one plate",
    "confidence": 0.8,
}


# ------------------------------------------------------------------ what a case records


@dataclass
class Contract:
    """The clients and collaborators a case talks to, and what it has seen so far."""

    client: FlaskClient
    grounded: Callable[[], FlaskClient]
    model: ChatCompletionsServer
    user_service: UserServiceServer
    headers: dict[str, str]

    def __post_init__(self) -> None:
        self.exchanges: list[dict[str, Any]] = []

    def keep(self, response: Any) -> None:
        """Record one answer: its status and exact body (the bytes as text)."""
        # Decoding is strict, so equal text is equal bytes.
        self.exchanges.append(
            {"status": response.status_code, "body": response.get_data().decode("utf-8")}
        )

    def analyze(
        self, photo: bytes, query: str = "", form: dict[str, str] | None = None, **kw: Any
    ) -> None:
        """POST a photo to /analyze-food on the client (or ``client=``) and keep the answer."""
        client = kw.pop("client", self.client)
        self.keep(post_photo(client, self.headers, photo, query, form))

    def outbound(self) -> dict[str, Any]:
        """The exact bodies the service posted to the model and to the User Service, as text."""
        return {
            "model": [without_image_bytes(call.body.decode("utf-8")) for call in self.model.calls],
            "userService": [call.body.decode("utf-8") for call in self.user_service.calls],
        }


def without_image_bytes(body: str) -> str:
    """The model's request with each data: URL replaced by its SHA-256, to keep fixtures small.

    The photo's bytes are still compared (through the digest); only their spelling is shortened.
    """
    return DATA_URL.sub(lambda found: f'"sha256:{sha256(found[0].encode()).hexdigest()}"', body)


# ------------------------------------------------------------------ the cases


def reply_case(
    answer: dict[str, Any], photo: str = "plain-jpeg", notes: str = "no-note"
) -> Callable[[Contract], None]:
    """A case: the model answers ``answer`` (as its JSON content) to one photo."""

    def run(contract: Contract) -> None:
        contract.model.analysis = answer
        query, form = NOTES[notes]
        contract.analyze(PHOTOS[photo](), query, form)

    return run


def fenced(contract: Contract) -> None:
    """The model's answer in a Markdown JSON fence."""
    fence = f"```json\n{json.dumps(DEFAULT_ANALYSIS)}\n```"
    contract.model.enqueue(ChatCompletionsServer.completion(fence))
    contract.analyze(PHOTOS["plain-jpeg"]())


def cache_hit(contract: Contract) -> None:
    """The same photo twice: the second answer comes from the cache."""
    contract.model.analysis = FULL_ANSWER
    photo = PHOTOS["photo-jpeg"]()
    contract.analyze(photo, "", {"note": "lunch"})
    contract.analyze(photo, "", {"note": "lunch"})


def fixed_entry(contract: Contract) -> None:
    """The User Service answers the next save with a fixed id, as it stores the entry."""
    contract.user_service.enqueue(Reply(201, {"id": ENTRY_ID}))


def save(contract: Contract) -> None:
    """save=true: the entry the User Service receives and the id it gives."""
    contract.model.analysis = FULL_ANSWER
    fixed_entry(contract)
    contract.analyze(PHOTOS["plain-jpeg"](), "?save=true", {"note": "dinner"})


def grounded(contract: Contract) -> None:
    """The model's items counted from SR28: ndbNo, alternatives, portion, nutrients."""
    contract.model.analysis = GROUNDED_ANSWER
    contract.analyze(PHOTOS["plain-jpeg"](), client=contract.grounded())


def grounded_save(contract: Contract) -> None:
    """A grounded answer saved: the entry carries the table's numbers."""
    contract.model.analysis = GROUNDED_ANSWER
    fixed_entry(contract)
    contract.analyze(PHOTOS["png"](), "?save=true", client=contract.grounded())


def nutrition(contract: Contract) -> None:
    """POST /nutrition by name and by ndbNo, and one it cannot count."""
    client = contract.grounded()
    bodies = [
        {"items": [{"name": "grilled chicken breast", "grams": 120}, {"name": "white rice"}]},
        {
            "items": [
                {"name": "grilled chicken breast", "grams": 120},
                {"name": "banana", "grams": 118},
            ]
        },
        {"items": [{"ndbNo": "15237", "grams": 150}]},
        {"items": [{"ndbNo": "99999", "grams": 100}]},
    ]
    for body in bodies:
        contract.keep(client.post("/nutrition", json=body, headers=contract.headers))


def foods(contract: Contract) -> None:
    """GET /foods for a few queries, one refused."""
    client = contract.grounded()
    for query in ("q=salmon&limit=5", "q=banana", "q=whole%20milk&limit=3", "q="):
        contract.keep(client.get(f"/foods?{query}", headers=contract.headers))


CASES: dict[str, Callable[[Contract], None]] = {
    **{
        f"default-{photo}-{notes}": reply_case(DEFAULT_ANALYSIS, photo, notes)
        for photo in PHOTOS
        for notes in NOTES
    },
    "plain-items": reply_case({**DEFAULT_ANALYSIS, "items": ITEMS}),
    "numbers-as-text": reply_case(
        {
            **DEFAULT_ANALYSIS,
            "calories": "450 kcal",
            "protein": "40 g",
            "carbs": "10.5g",
            "fat": "25",
        }
    ),
    "item-numbers-as-text": reply_case(
        DEFAULT_ANALYSIS
        | {
            "items": [
                {"name": "rice", "grams": "180 g", "calories": "234kcal", "protein": "4.3 g"}
                | {"carbs": "51.5", "fat": ".5", "confidence": "80%"}
            ]
        }
    ),
    "code-fenced": fenced,
    "not-food": reply_case(NOT_FOOD, "png", "note"),
    "assumptions-suggestions-range": reply_case(FULL_ANSWER, "photo-jpeg", "note-lang-pt-BR"),
    "grounded-sr28": grounded,
    "cache-hit": cache_hit,
    "save": save,
    "save-grounded": grounded_save,
    "nutrition": nutrition,
    "foods": foods,
}


# ------------------------------------------------------------------ the test


@pytest.mark.parametrize("case", list(CASES))
def test_answers_are_the_recorded_ones(
    case: str,
    client: FlaskClient,
    client_with: Callable[..., FlaskClient],
    sr28_dir: Path,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    auth_headers: dict[str, str],
) -> None:
    contract = Contract(
        client=client,
        grounded=lambda: client_with(nutrition_source="usda-sr28"),
        model=model,
        user_service=user_service,
        headers={**auth_headers, "X-Request-ID": REQUEST_ID},
    )
    CASES[case](contract)
    seen = {"exchanges": contract.exchanges, **contract.outbound()}
    path = FIXTURES / f"{case}.json"
    if RECORDING:
        FIXTURES.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(seen, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    recorded = json.loads(path.read_text(encoding="utf-8"))
    assert len(seen["exchanges"]) == len(recorded["exchanges"])
    for answer, expected in zip(seen["exchanges"], recorded["exchanges"], strict=True):
        assert answer["status"] == expected["status"]
        assert_same_text(answer["body"], expected["body"])
    for peer in ("model", "userService"):
        assert len(seen[peer]) == len(recorded[peer]), f"requests to the {peer}"
        for sent, expected in zip(seen[peer], recorded[peer], strict=True):
            assert_same_text(sent, expected)


def assert_same_text(seen: str, recorded: str) -> None:
    """Equal text: first as parsed JSON, for a readable difference, then character for character."""
    assert json.loads(seen) == json.loads(recorded)
    assert seen == recorded
