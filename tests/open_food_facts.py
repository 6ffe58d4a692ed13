"""A loopback Open Food Facts: ``GET /api/v2/product/{code}`` answered in their documented shapes.

It knows the products in ``products`` (code → their ``product`` object) and answers any other code
as they do: HTTP 404 with ``status`` 0. ``answers`` tells it, per code, to answer something else
(slow, down, rate limited, garbage). Only the fields the request's ``fields`` names are sent back,
as Open Food Facts does, so a field the client forgets to ask for is missing here too.
"""

from __future__ import annotations

import copy
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes import RecordedRequest, RecordingServer, Reply

PRODUCT_ROUTE = "/api/v2/product/"

# Nutella 400 g (EAN-13), as Open Food Facts describes it: kcal and kJ per 100 g and per serving,
# the serving as text, ``serving_quantity`` as a numeric text, sodium in grams.
NUTELLA_CODE = "3017624010701"
NUTELLA: dict[str, Any] = {
    "code": NUTELLA_CODE,
    "product_name": "Nutella",
    "product_name_en": "Nutella",
    "brands": "Ferrero",
    "quantity": "400 g",
    "serving_size": "15 g",
    "serving_quantity": "15",
    "serving_quantity_unit": "g",
    "nutrition_data_per": "100g",
    "nutriments": {
        "carbohydrates": 57.5,
        "carbohydrates_100g": 57.5,
        "carbohydrates_serving": 8.62,
        "carbohydrates_unit": "g",
        "carbohydrates_value": 57.5,
        "energy": 2252,
        "energy-kcal": 539,
        "energy-kcal_100g": 539,
        "energy-kcal_serving": 80.8,
        "energy-kcal_unit": "kcal",
        "energy-kcal_value": 539,
        "energy-kj": 2252,
        "energy-kj_100g": 2252,
        "energy-kj_serving": 338,
        "energy-kj_unit": "kJ",
        "energy_100g": 2252,
        "energy_serving": 338,
        "energy_unit": "kJ",
        "fat": 30.9,
        "fat_100g": 30.9,
        "fat_serving": 4.63,
        "fat_unit": "g",
        "proteins": 6.3,
        "proteins_100g": 6.3,
        "proteins_serving": 0.945,
        "proteins_unit": "g",
        "salt": 0.107,
        "salt_100g": 0.107,
        "salt_serving": 0.016,
        "saturated-fat": 10.6,
        "saturated-fat_100g": 10.6,
        "saturated-fat_serving": 1.59,
        "sodium": 0.0428,
        "sodium_100g": 0.0428,
        "sodium_serving": 0.00642,
        "sugars": 56.3,
        "sugars_100g": 56.3,
        "sugars_serving": 8.44,
        "nova-group": 4,
    },
}

# Coca-Cola 12 fl oz can, a UPC-A (049000028911) looked up in its EAN-13 form with a leading
# zero; its serving is in millilitres, so it has no serving in grams.
COLA_CODE = "0049000028911"
COLA: dict[str, Any] = {
    "code": COLA_CODE,
    "product_name": "Coca-Cola Classic",
    "brands": "Coca-Cola",
    "serving_size": "1 can (355 ml)",
    "serving_quantity": 355,
    "serving_quantity_unit": "ml",
    "nutriments": {
        "energy-kcal_100g": 42,
        "energy-kcal_serving": 149,
        "energy_100g": 176,
        "carbohydrates_100g": 10.6,
        "carbohydrates_serving": 37.6,
        "sugars_100g": 10.6,
        "sugars_serving": 37.6,
        "fat_100g": 0,
        "fat_serving": 0,
        "proteins_100g": 0,
        "proteins_serving": 0,
        "sodium_100g": 0.0127,
        "sodium_serving": 0.045,
    },
}

# Oat biscuits whose energy was typed in kJ only (``energy_100g`` is kJ too), with macronutrients
# given as numeric texts, a serving with no unit and no ``_serving`` values.
OATCAKES_CODE = "5000168001142"
OATCAKES: dict[str, Any] = {
    "code": OATCAKES_CODE,
    "product_name": "",
    "product_name_en": "Oat biscuits",
    "brands": "Some Mill,\nAnother Brand",
    "serving_size": "2 biscuits (30 g)",
    "serving_quantity": 30,
    "nutriments": {
        "energy-kj_100g": 1883,
        "energy-kj_unit": "kJ",
        "energy_100g": 1883,
        "carbohydrates_100g": "62",
        "fat_100g": "18.3",
        "proteins_100g": "8.1",
        "fiber_100g": "7.9",
    },
}

# A product entered without any nutrition facts: Open Food Facts knows it, with no energy.
NO_ENERGY_CODE = "4000000000001"
NO_ENERGY: dict[str, Any] = {
    "code": NO_ENERGY_CODE,
    "product_name": "Mystery crackers",
    "brands": "Unknown",
    "nutriments": {"nova-group": 4},
}


def product_found(code: str, product: dict[str, Any]) -> Reply:
    """Their answer for a known product."""
    return Reply(
        200,
        {
            "code": code,
            "product": product,
            "status": 1,
            "status_verbose": "product found",
        },
    )


def product_unknown(code: str) -> Reply:
    """Their answer for an unknown barcode: HTTP 404 with ``status`` 0."""
    return Reply(404, {"code": code, "status": 0, "status_verbose": "product not found"})


def server_down(status: int = 502) -> Reply:
    """What their proxy answers while the servers behind it are down: an HTML error page."""
    page = f"<html><head><title>{status} Bad Gateway</title></head><body>nginx</body></html>"
    return Reply(status, page, headers={"Content-Type": "text/html"})


def rate_limited() -> Reply:
    """Their answer once a client asks too often."""
    return Reply(
        429,
        "<html><body><h1>429 Too Many Requests</h1></body></html>",
        headers={"Content-Type": "text/html", "Retry-After": "60"},
    )


def garbage() -> Reply:
    """A 200 that is JSON but not their shape."""
    return Reply(200, {"hello": "world", "status": "maybe"})


def slow(code: str, product: dict[str, Any], seconds: float) -> Reply:
    """Their answer for a known product, ``seconds`` late."""
    reply = product_found(code, product)
    reply.delay = seconds
    return reply


class OpenFoodFactsServer(RecordingServer):
    """Open Food Facts' product API on loopback, recording every request."""

    def restore_defaults(self) -> None:
        """Know the sample products again, with no special answers."""
        self.products: dict[str, dict[str, Any]] = {
            NUTELLA_CODE: copy.deepcopy(NUTELLA),
            COLA_CODE: copy.deepcopy(COLA),
            OATCAKES_CODE: copy.deepcopy(OATCAKES),
            NO_ENERGY_CODE: copy.deepcopy(NO_ENERGY),
        }
        self.answers: dict[str, Reply] = {}

    def answer(self, code: str, reply: Reply) -> None:
        """Answer every lookup of ``code`` with ``reply``."""
        with self._lock:
            self.answers[code] = reply

    @property
    def lookups(self) -> list[RecordedRequest]:
        """The product lookups received."""
        with self._lock:
            return [r for r in self.requests if r.route.startswith(PRODUCT_ROUTE)]

    def lookups_of(self, code: str) -> list[RecordedRequest]:
        """The lookups of one barcode."""
        return [r for r in self.lookups if r.route == f"{PRODUCT_ROUTE}{code}"]

    @staticmethod
    def query(request: RecordedRequest) -> dict[str, list[str]]:
        """A request's query string, read."""
        return parse_qs(urlsplit(request.path).query)

    def reply_to(self, request: RecordedRequest) -> Reply:
        """Record the request; answer a product lookup as Open Food Facts would."""
        if request.method != "GET" or not request.route.startswith(PRODUCT_ROUTE):
            return super().reply_to(request)  # recorded and answered 404/405
        with self._arrived:
            self.requests.append(request)
            self.events.append(("received", request))
            self._arrived.notify_all()
        code = request.route[len(PRODUCT_ROUTE) :]
        with self._lock:
            scripted = self.answers.get(code)
            product = copy.deepcopy(self.products.get(code))
        if scripted is not None:
            return copy.deepcopy(scripted)
        if product is None:
            return product_unknown(code)
        fields = self.query(request).get("fields")
        if fields:
            wanted = set(fields[0].split(","))
            product = {name: value for name, value in product.items() if name in wanted}
        return product_found(code, product)
