"""Row l: a photo of a known packaged product, answered from Open Food Facts without the model.

The loopback Open Food Facts of the bench's stack learns one product per request, each with its
own EAN-13 code and Nutella's values, and each product gets a 12 MP photo of its package with
the code on it, a quarter of the photo wide (`tests/barcode_photos.py`). On the real gunicorn
(`app:app`), one client sends requests one after another: a package photo (its barcode read,
its product looked up, the answer made from it) and, interleaved with them, a new 12 MP meal
photo without a code, which goes to the model. Every photo is sent once, so every request is a
cache miss.
"""

from __future__ import annotations

import copy
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from bench import photo_sets
from bench.load import Client
from bench.photos import PhotoLibrary, PhotoSpec
from bench.stack import DelayedModel
from tests.open_food_facts import NUTELLA, PRODUCT_ROUTE, OpenFoodFactsServer
from tests.servers import Gunicorn

# Codes starting 200 to 299 are for restricted circulation (a shop's own labels): no real product
# carries them, so a lookup that reached the real Open Food Facts would find nothing.
CODE_PREFIX = "2009"
PACKAGE_SEED = 7000  # package photos: this plus the code's number
MEAL_SEED = 7100  # meal photos without a code: this plus the request's number
BARS_SHARE = 0.25  # the bars' width as a share of the photo's width


def ean13(first_twelve: str) -> str:
    """The 13-digit EAN-13 code: the twelve digits and their check digit (weights 1 and 3)."""
    if len(first_twelve) != 12 or not first_twelve.isdigit():
        raise ValueError(f"an EAN-13 code starts with twelve digits, not {first_twelve!r}")
    total = sum(int(digit) * (3 if index % 2 else 1) for index, digit in enumerate(first_twelve))
    return first_twelve + str(-total % 10)


def product(code: str, number: int) -> dict[str, Any]:
    """A product in Open Food Facts' shape: Nutella's values, under this code and its own name."""
    found = copy.deepcopy(NUTELLA)
    found["code"] = code
    found["product_name"] = found["product_name_en"] = f"Hazelnut spread no. {number}"
    return found


def package_photo(code: str, seed: int) -> bytes:
    """A 12 MP JPEG of a package with this EAN-13 code on a label, a quarter of the width."""
    import zxingcpp

    from tests import barcode_photos

    bars = barcode_photos.bars(zxingcpp.BarcodeFormat.EAN13, code[:12])
    label = barcode_photos.Label(bars, share=BARS_SHARE)
    return barcode_photos.package_photo(barcode_photos.TWELVE_MP, [label], seed=seed)


@dataclass(frozen=True)
class Plan:
    """Which photos row l sends: one untimed request of each kind, then `requests` of each."""

    requests: int

    def codes(self) -> list[str]:
        """One code per known-product request, the untimed one first."""
        return [ean13(f"{CODE_PREFIX}{number:08d}") for number in range(self.requests + 1)]

    def meal_specs(self) -> list[PhotoSpec]:
        """One new 12 MP meal photo without a code per model-path request, the untimed one first."""
        return [photo_sets.photo_spec(MEAL_SEED + number) for number in range(self.requests + 1)]

    def package_photos(self) -> list[bytes]:
        """Every known-product photo, in the order of `codes`, drawn one process per core (about
        1.5 s each)."""
        codes = self.codes()
        seeds = [PACKAGE_SEED + number for number in range(len(codes))]
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            return list(pool.map(package_photo, codes, seeds))


@dataclass(frozen=True)
class Request:
    """One request as the client, the fake model and the fake Open Food Facts saw it."""

    sent: photo_sets.Sent
    code: str | None  # the code on the photo; None for a meal photo
    looked_up: list[str]  # the codes Open Food Facts was asked for during the request
    to_lookup: float  # from sending to the first lookup's arrival; NaN without a lookup


def send(
    client: Client,
    model: DelayedModel,
    open_food_facts: OpenFoodFactsServer,
    workers: list[int],
    photo: bytes,
    code: str | None,
) -> Request:
    """POST one photo and wait for the answer; pair it with the model calls and the product
    lookups it made."""
    lookups_before = len(open_food_facts.lookups)
    started = time.monotonic()
    sent = photo_sets.send(client, model, workers, [photo])
    lookups = open_food_facts.lookups[lookups_before:]
    return Request(
        sent,
        code,
        [lookup.route.removeprefix(PRODUCT_ROUTE) for lookup in lookups],
        lookups[0].received_at - started if lookups else float("nan"),
    )


@dataclass(frozen=True)
class Requests:
    """Row l's timed requests of each kind, and the fakes' counts over the whole row."""

    known: list[Request]
    misses: list[Request]
    model_calls: int  # every call the fake model received during the row, a late one included
    misses_sent: int  # model-path requests sent, the untimed one included
    lookups: Counter[str]  # lookups per code during the row


def send_requests(
    server: Gunicorn,
    model: DelayedModel,
    open_food_facts: OpenFoodFactsServer,
    token: str,
    library: PhotoLibrary,
    plan: Plan,
    packages: Sequence[bytes],
) -> Requests:
    """One client, one request at a time: an untimed request of each kind, then known-product
    and model-path requests interleaved, the order alternating."""
    codes = plan.codes()
    meals = library.load(plan.meal_specs())
    for number, registered in enumerate(codes):
        open_food_facts.products[registered] = product(registered, number)
    client = Client(server.port, token, timeout=60)
    workers = server.worker_pids()
    calls_before = len(model.calls)
    lookups_before = len(open_food_facts.lookups)
    known: list[Request] = []
    misses: list[Request] = []
    try:
        client.connect()
        send(client, model, open_food_facts, workers, packages[0], codes[0])
        send(client, model, open_food_facts, workers, meals[0], None)
        for number in range(1, plan.requests + 1):
            kinds: list[tuple[list[Request], bytes, str | None]] = [
                (known, packages[number], codes[number]),
                (misses, meals[number], None),
            ]
            for found, photo, code in kinds if number % 2 else reversed(kinds):
                found.append(send(client, model, open_food_facts, workers, photo, code))
    finally:
        client.close()
    time.sleep(0.2)  # a late model call or lookup would still be counted
    lookups = Counter(
        lookup.route.removeprefix(PRODUCT_ROUTE)
        for lookup in open_food_facts.lookups[lookups_before:]
    )
    return Requests(known, misses, len(model.calls) - calls_before, plan.requests + 1, lookups)
