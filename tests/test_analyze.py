"""POST /analyze-food through HTTP: the answer, the cache, saving entries and the HTTP edges."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import (
    CACHE_PREFIX,
    LOG_FILTER,
    PROMPT_VERSION,
    AnalysisCache,
    Config,
)
from store import EmbeddedStore
from tests import images
from tests.conftest import MEAL, AnalyzeActions, assert_json_error, post_photo
from tests.fakes import (
    DEFAULT_ANALYSIS,
    ChatCompletionsServer,
    RedisServer,
    Reply,
    UserServiceServer,
    free_port,
    json_error,
)

if TYPE_CHECKING:
    from tests.conftest import RecordHandler

MEAL_DIGEST = hashlib.sha256(MEAL).hexdigest()
ENTRY_FIELDS = ("name", "calories", "protein", "carbs", "fat", "servingSize", "ingredients")
CONTRACT_FIELDS = {*ENTRY_FIELDS, "confidence"}
GENERATED_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
# What the service answers for DEFAULT_ANALYSIS, an answer given as totals without items.
EXPECTED_ANALYSIS = {
    **DEFAULT_ANALYSIS,
    "items": [],
    "assumptions": [],
    "suggestions": [],
    "warnings": [],
    "photoCount": 1,
    "model": "gpt-6-luna",
    "promptVersion": PROMPT_VERSION,
}


def meal_key(config: Config) -> str:
    """The cache key of MEAL: the upload's digest with the inputs that change the answer."""
    inputs = (
        MEAL_DIGEST,
        config.openai_model,
        PROMPT_VERSION,
        config.openai_image_detail,
        str(config.image_max_side),
        "table=no-table",
        "products=off",
        "lang=en",
        "note=",
    )
    return CACHE_PREFIX + hashlib.sha256("\n".join(inputs).encode()).hexdigest()


# ------------------------------------------------------------------ the answer


def test_first_analysis_answers_the_model_analysis_from_the_api(
    api: AnalyzeActions,
) -> None:
    assert api.analyze().get_json() == {"analysis": EXPECTED_ANALYSIS, "source": "api"}
    assert set(EXPECTED_ANALYSIS) >= CONTRACT_FIELDS


def test_success_body_values_have_the_contract_types(api: AnalyzeActions) -> None:
    analysis = api.analyze().get_json()["analysis"]
    assert isinstance(analysis["name"], str)
    assert isinstance(analysis["calories"], int)
    for grams in ("protein", "carbs", "fat"):
        assert isinstance(analysis[grams], int | float)
    assert isinstance(analysis["servingSize"], str)
    assert all(isinstance(item, str) for item in analysis["ingredients"])
    assert 0 <= analysis["confidence"] <= 1


def test_second_identical_upload_comes_from_the_cache(api: AnalyzeActions) -> None:
    first = api.analyze().get_json()
    second = api.analyze().get_json()
    assert second["source"] == "cache"
    assert second["analysis"] == first["analysis"]


def test_cache_hit_skips_the_model(api: AnalyzeActions, model: ChatCompletionsServer) -> None:
    api.analyze()
    api.analyze()
    assert len(model.calls) == 1


def test_different_images_are_analysed_separately(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    api.analyze()
    other = api.analyze(images.jpeg(64, 48, color=(20, 200, 90)))
    assert other.get_json()["source"] == "api"
    assert len(model.calls) == 2


def test_cache_key_is_the_prefix_and_a_sha256_of_the_upload_and_the_answer_inputs(
    api: AnalyzeActions, redis: RedisServer, config: Config
) -> None:
    api.analyze()
    with redis.client() as connection:
        assert connection.keys("*") == [meal_key(config).encode()]
    assert CACHE_PREFIX == "food_analysis:"


def test_cache_ttl_follows_config(
    api: AnalyzeActions, client_with: Callable[..., FlaskClient], redis: RedisServer, config: Config
) -> None:
    api.analyze(client=client_with(cache_ttl_seconds=120))
    with redis.client() as connection:
        assert 0 < connection.ttl(meal_key(config)) <= 120


def test_cached_value_is_the_analysis_without_entry_id(
    api: AnalyzeActions, redis: RedisServer, config: Config
) -> None:
    response = api.analyze(save=True)
    assert "entryId" in response.get_json()["analysis"]
    with redis.client() as connection:
        cached = json.loads(connection.get(meal_key(config)))
    assert cached == EXPECTED_ANALYSIS


def test_cache_in_redis_is_shared_by_a_new_app(
    api: AnalyzeActions, client_with: Callable[..., FlaskClient], model: ChatCompletionsServer
) -> None:
    api.analyze()
    again = api.analyze(client=client_with())
    assert again.get_json()["source"] == "cache"
    assert len(model.calls) == 1


# ------------------------------------------------------------------ without Redis


def test_without_redis_second_upload_comes_from_the_memory_cache(
    api: AnalyzeActions, client_with: Callable[..., FlaskClient], model: ChatCompletionsServer
) -> None:
    client = client_with(with_redis=False)
    first = api.analyze(client=client).get_json()
    second = api.analyze(client=client).get_json()
    assert (first["source"], second["source"]) == ("api", "cache")
    assert second["analysis"] == first["analysis"]
    assert len(model.calls) == 1


def test_without_redis_health_says_redis_not_configured(
    client_with: Callable[..., FlaskClient],
) -> None:
    response = client_with(with_redis=False).get("/health")
    assert response.get_json()["checks"]["redis"] == "not configured"


def embedded(
    tmp_path: Path, table: str = "analyses", max_bytes: int | None = None
) -> EmbeddedStore:
    """An embedded store of the test's own."""
    return EmbeddedStore(tmp_path / "store.sqlite3", table, max_bytes)


def expiry(store: EmbeddedStore, key: str) -> float:
    """When the key's row in the records table expires, as the table holds it."""
    row = store.connection().execute("SELECT expires FROM records WHERE key = ?", (key,))
    return float(row.fetchone()[0])


def test_embedded_cache_returns_what_was_stored(tmp_path: Path) -> None:
    cache = AnalysisCache(embedded(tmp_path), ttl_seconds=60)
    cache.set("a", DEFAULT_ANALYSIS)
    assert cache.get("a") == DEFAULT_ANALYSIS


def test_embedded_cache_evicts_the_oldest_entries_beyond_its_bound(tmp_path: Path) -> None:
    cache = AnalysisCache(embedded(tmp_path, max_bytes=1000), ttl_seconds=60)
    for key in range(20):
        cache.set(f"k{key}", {"name": "x" * 80})
    assert cache.get("k0") is None
    assert cache.get("k19") == {"name": "x" * 80}
    kept = [key for key in range(20) if cache.get(f"k{key}") is not None]
    assert kept == list(range(kept[0], 20))


def test_embedded_store_add_stores_only_when_absent(tmp_path: Path) -> None:
    store = embedded(tmp_path, "records")
    assert store.add("lock", "first", 60)
    assert not store.add("lock", "second", 60)
    assert store.get("lock") == "first"


def test_embedded_store_add_takes_over_an_expired_key(tmp_path: Path) -> None:
    store = embedded(tmp_path, "records")
    assert store.add("lock", "dead holder", -1)  # its time ran out a second ago
    assert store.add("lock", "new holder", 60)
    assert store.get("lock") == "new holder"


def test_embedded_store_delete_if_leaves_a_value_it_does_not_hold(tmp_path: Path) -> None:
    store = embedded(tmp_path, "records")
    store.set("lock", "theirs", 60)
    store.delete_if("lock", "mine")
    assert store.get("lock") == "theirs"
    store.delete_if("lock", "theirs")
    assert store.get("lock") is None


def test_embedded_store_extend_if_renews_only_its_own_value(tmp_path: Path) -> None:
    store = embedded(tmp_path, "records")
    store.set("lock", "theirs", 60)
    store.extend_if("lock", "mine", -1)
    assert store.get("lock") == "theirs"
    store.extend_if("lock", "theirs", -1)  # its holder ends it now
    assert store.get("lock") is None
    store.set("lock", "mine", 60)
    first = expiry(store, "lock")
    store.extend_if("lock", "mine", 3600)
    assert expiry(store, "lock") > first
    assert store.get("lock") == "mine"


def test_embedded_cache_entry_past_its_ttl_is_a_miss(tmp_path: Path) -> None:
    cache = AnalysisCache(embedded(tmp_path), ttl_seconds=0)
    cache.set("a", {"name": "a"})
    assert cache.get("a") is None


def test_embedded_tables_are_shared_by_two_stores_on_one_file(tmp_path: Path) -> None:
    one, other = embedded(tmp_path, "records"), embedded(tmp_path, "records")
    assert one.add("lock", "first", 60)
    assert not other.add("lock", "second", 60)


def test_an_unwritable_store_is_a_miss_not_an_error(
    client_with: Callable[..., FlaskClient],
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
    tmp_path: Path,
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    client = client_with(with_redis=False, store_path=str(blocked / "store.sqlite3"))
    assert post_photo(client, auth_headers, MEAL).status_code == 200
    assert post_photo(client, auth_headers, MEAL).status_code == 200
    assert len(model.calls) == 2


# ------------------------------------------------------------------ saving to the User Service


def test_save_posts_the_entry_to_the_user_service(
    api: AnalyzeActions, user_service: UserServiceServer
) -> None:
    api.analyze(save=True)
    [call] = user_service.calls
    assert (call.method, call.route) == ("POST", "/food-entries")
    assert call.json() == {
        "userId": "user-42",
        **{name: DEFAULT_ANALYSIS[name] for name in ENTRY_FIELDS},
        "confidence": DEFAULT_ANALYSIS["confidence"],
        "source": "image-analysis",
        "imageHash": MEAL_DIGEST,
        "imageHashes": [MEAL_DIGEST],
        **{
            name: EXPECTED_ANALYSIS[name]
            for name in ("items", "assumptions", "suggestions", "warnings", "photoCount", "model")
        },
        "promptVersion": PROMPT_VERSION,
    }


def test_save_forwards_the_callers_authorization_header(
    api: AnalyzeActions, user_service: UserServiceServer, auth_headers: dict[str, str]
) -> None:
    api.analyze(save=True)
    assert user_service.calls[0].header("authorization") == auth_headers["Authorization"]


def test_save_sends_the_request_id_of_the_response(
    api: AnalyzeActions, user_service: UserServiceServer
) -> None:
    response = api.analyze(save=True)
    assert user_service.calls[0].header("x-request-id") == response.headers["X-Request-ID"]


def test_save_answers_the_stored_entry_id(
    api: AnalyzeActions, user_service: UserServiceServer
) -> None:
    response = api.analyze(save=True)
    assert response.status_code == 200
    assert response.get_json()["analysis"]["entryId"] == user_service.entries[0]["id"]


def test_save_on_a_cache_hit_saves_a_new_entry(
    api: AnalyzeActions, model: ChatCompletionsServer, user_service: UserServiceServer
) -> None:
    first = api.analyze(save=True).get_json()
    second = api.analyze(save=True).get_json()
    assert second["source"] == "cache"
    assert len(user_service.entries) == 2
    assert first["analysis"]["entryId"] != second["analysis"]["entryId"]
    assert len(model.calls) == 1


@pytest.mark.parametrize("value", ["true", "1", "yes", "TRUE", "Yes"])
def test_save_words_that_mean_yes_save(
    api: AnalyzeActions, user_service: UserServiceServer, value: str
) -> None:
    response = api.analyze(query=f"?save={value}")
    assert response.status_code == 200
    assert len(user_service.entries) == 1
    assert "entryId" in response.get_json()["analysis"]


@pytest.mark.parametrize("query", ["?save=false", "?save=0", "?save=no", "?save=FALSE", ""])
def test_save_words_that_mean_no_or_no_save_do_not_save(
    api: AnalyzeActions, user_service: UserServiceServer, query: str
) -> None:
    response = api.analyze(query=query)
    assert response.status_code == 200
    assert user_service.calls == []
    assert "entryId" not in response.get_json()["analysis"]


def test_save_with_an_unknown_word_answers_400_without_calling_the_model(
    api: AnalyzeActions, model: ChatCompletionsServer, user_service: UserServiceServer
) -> None:
    response = api.analyze(query="?save=maybe")
    assert_json_error(response, 400, "invalid_parameter")
    assert model.calls == []
    assert user_service.calls == []


# ------------------------------------------------------------------ User Service failures


USER_SERVICE_FAILURES = {
    "server error": json_error(500, "database down"),
    "created without id": Reply(201, {"name": "Grilled Salmon with Asparagus"}),
    "created with empty id": Reply(201, {"id": ""}),
    "ok but not json": Reply(200, "stored"),
    "bad request": json_error(400, "invalid entry"),
}


@pytest.mark.parametrize("reply", USER_SERVICE_FAILURES.values(), ids=USER_SERVICE_FAILURES.keys())
def test_user_service_failure_answers_502_with_the_analysis(
    api: AnalyzeActions, user_service: UserServiceServer, reply: Reply
) -> None:
    user_service.enqueue(reply)
    response = api.analyze(save=True)
    assert_json_error(response, 502, "user_service_error")
    assert response.get_json()["analysis"] == EXPECTED_ANALYSIS


def test_unreachable_user_service_answers_502_with_the_analysis(
    api: AnalyzeActions, client_with: Callable[..., FlaskClient]
) -> None:
    client = client_with(user_service_url=f"http://127.0.0.1:{free_port()}")
    response = api.analyze(save=True, client=client)
    assert_json_error(response, 502, "user_service_error")
    assert response.get_json()["analysis"] == EXPECTED_ANALYSIS


def test_slow_user_service_answers_502_with_the_analysis(
    api: AnalyzeActions, client_with: Callable[..., FlaskClient], user_service: UserServiceServer
) -> None:
    user_service.enqueue(Reply(201, {"id": "too-late"}, delay=1.0))
    response = api.analyze(save=True, client=client_with(user_service_timeout=0.3))
    assert_json_error(response, 502, "user_service_error")
    assert response.get_json()["analysis"] == EXPECTED_ANALYSIS


def test_user_service_answer_with_entry_id_instead_of_id_is_success(
    api: AnalyzeActions, user_service: UserServiceServer
) -> None:
    user_service.enqueue(Reply(200, {"entryId": "entry-7"}))
    response = api.analyze(save=True)
    assert response.status_code == 200
    assert response.get_json()["analysis"]["entryId"] == "entry-7"


def test_analysis_is_cached_even_when_saving_failed(
    api: AnalyzeActions, model: ChatCompletionsServer, user_service: UserServiceServer
) -> None:
    user_service.enqueue(json_error(500, "database down"))
    api.analyze(save=True)
    retry = api.analyze(save=True)
    assert retry.status_code == 200
    assert retry.get_json()["source"] == "cache"
    assert retry.get_json()["analysis"]["entryId"] == user_service.entries[0]["id"]
    assert len(model.calls) == 1


# ------------------------------------------------------------------ request ids


def test_callers_request_id_is_echoed(api: AnalyzeActions, auth_headers: dict[str, str]) -> None:
    response = api.analyze(headers={**auth_headers, "X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"


def test_request_id_is_made_when_none_is_sent(api: AnalyzeActions) -> None:
    response = api.analyze()
    assert GENERATED_REQUEST_ID.fullmatch(response.headers["X-Request-ID"])


@pytest.mark.parametrize(
    "supplied",
    ["abc 123", "a" * 500, "abc-123\n", "abc\r\nSet-Cookie: x=1", "<script>", ""],
    ids=["space", "500 chars", "trailing newline", "header injection", "markup", "empty"],
)
def test_malformed_request_id_is_replaced(
    api: AnalyzeActions, client: FlaskClient, supplied: str
) -> None:
    # Through the WSGI environ: the test client itself refuses header values with newlines.
    response = api.analyze(environ_overrides={"HTTP_X_REQUEST_ID": supplied})
    assert response.status_code == 200
    assert GENERATED_REQUEST_ID.fullmatch(response.headers["X-Request-ID"])


# ------------------------------------------------------------------ HTTP edges


def test_body_over_max_upload_answers_413_payload_too_large(
    api: AnalyzeActions, client_with: Callable[..., FlaskClient]
) -> None:
    photo = images.jpeg(800, 600, pattern="photo")
    assert len(photo) > 150_000
    response = api.analyze(photo, client=client_with(max_upload_mb=0.1))
    assert_json_error(response, 413, "payload_too_large")


def test_body_over_max_upload_never_reaches_the_model(
    api: AnalyzeActions, client_with: Callable[..., FlaskClient], model: ChatCompletionsServer
) -> None:
    photo = images.jpeg(800, 600, pattern="photo")
    api.analyze(photo, client=client_with(max_upload_mb=0.1))
    assert model.calls == []


def test_unknown_path_answers_404_json(client: FlaskClient, auth_headers: dict[str, str]) -> None:
    assert_json_error(client.get("/no-such-thing", headers=auth_headers), 404, "not_found")


def test_get_on_analyze_food_answers_405_json(
    client: FlaskClient, auth_headers: dict[str, str]
) -> None:
    response = client.get("/analyze-food", headers=auth_headers)
    assert_json_error(response, 405, "method_not_allowed")


def test_405_names_the_allowed_methods(client: FlaskClient, auth_headers: dict[str, str]) -> None:
    response = client.get("/analyze-food", headers=auth_headers)
    assert "POST" in {method.strip() for method in response.headers["Allow"].split(",")}


# ------------------------------------------------------------------ CORS

PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "Authorization",
}


def test_preflight_from_an_allowed_origin_is_allowed(
    client_with: Callable[..., FlaskClient],
) -> None:
    client = client_with(cors_origins=("https://app.example",))
    response = client.options(
        "/analyze-food", headers={**PREFLIGHT, "Origin": "https://app.example"}
    )
    assert response.headers.get("Access-Control-Allow-Origin") == "https://app.example"


def test_preflight_from_another_origin_is_not_allowed(
    client_with: Callable[..., FlaskClient],
) -> None:
    client = client_with(cors_origins=("https://app.example",))
    response = client.options("/analyze-food", headers={**PREFLIGHT, "Origin": "https://evil.test"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_cors_allows_any_origin_by_default(client: FlaskClient) -> None:
    response = client.options("/analyze-food", headers={**PREFLIGHT, "Origin": "https://any.test"})
    # "*" or the caller's own origin echoed back: both let any site call the service.
    assert response.headers.get("Access-Control-Allow-Origin") in {"*", "https://any.test"}


# ------------------------------------------------------------------ log lines


def test_cache_miss_then_cache_hit_are_logged(api: AnalyzeActions, logs: RecordHandler) -> None:
    api.analyze()
    api.analyze()
    misses = [i for i, line in enumerate(logs.lines) if "Cache miss" in line]
    hits = [i for i, line in enumerate(logs.lines) if "Cache hit" in line]
    assert len(misses) == 1
    assert len(hits) == 1
    assert misses[0] < hits[0]


def test_one_request_line_names_method_path_status_and_request_id(
    api: AnalyzeActions, logs: RecordHandler, auth_headers: dict[str, str]
) -> None:
    api.analyze(headers={**auth_headers, "X-Request-ID": "abc-123"})
    request_lines = [line for line in logs.lines if "POST /analyze-food 200" in line]
    assert len(request_lines) == 1
    assert "[abc-123]" in request_lines[0]


# Every character str.splitlines breaks a line at: CR, LF, VT, FF, FS, GS, RS, NEL, U+2028, U+2029.
LINE_BREAKS = "".join(
    character
    for character in map(chr, range(sys.maxunicode + 1))
    if len(f"a{character}b".splitlines()) > 1
)


def test_a_log_message_holding_any_line_break_stays_one_line() -> None:
    record = logging.LogRecord(
        "image_service", logging.INFO, __file__, 1, "path %s", (f"/x{LINE_BREAKS}y",), None
    )

    LOG_FILTER.filter(record)

    message = record.getMessage()
    assert message.splitlines() == [message]
    assert "\\u2028" in message
    assert "\\u2029" in message
    assert "\\x85" in message


def test_a_path_holding_a_unicode_line_break_gives_one_log_line(
    client: FlaskClient, logs: RecordHandler
) -> None:
    client.get("/meal\u2028INFO [forged] GET /health 200", headers={"X-Request-ID": "one-line"})

    lines = [line for line in logs.lines if "[one-line]" in line]
    assert len(lines) == 1
    assert lines[0].splitlines() == [lines[0]]
    assert "/meal\\u2028INFO [forged]" in lines[0]


# ------------------------------------------------------------------ a note is private


def test_another_users_identical_photo_and_note_is_analysed_afresh(
    api: AnalyzeActions, model: ChatCompletionsServer, make_token: Callable[..., str]
) -> None:
    other_user = {"Authorization": f"Bearer {make_token(sub='user-7')}"}
    api.analyze(form={"note": "after my chemotherapy"})

    response = api.analyze(form={"note": "after my chemotherapy"}, headers=other_user)

    assert response.get_json()["source"] == "api"
    assert len(model.calls) == 2


def test_the_same_users_identical_photo_and_note_comes_from_the_cache(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    api.analyze(form={"note": "after my chemotherapy"})

    response = api.analyze(form={"note": "after my chemotherapy"})

    assert response.get_json()["source"] == "cache"
    assert len(model.calls) == 1


def test_a_photo_without_a_note_is_shared_across_users(
    api: AnalyzeActions, model: ChatCompletionsServer, make_token: Callable[..., str]
) -> None:
    other_user = {"Authorization": f"Bearer {make_token(sub='user-7')}"}
    api.analyze()

    response = api.analyze(headers=other_user)

    assert response.get_json()["source"] == "cache"
    assert len(model.calls) == 1


def test_two_users_sending_one_photo_and_note_at_once_each_ask_the_model(
    app: Flask, model: ChatCompletionsServer, make_token: Callable[..., str]
) -> None:
    slow = dataclasses.replace(model.completion(json.dumps(model.analysis)), delay=0.5)
    model.enqueue(slow, slow)

    def post(user_id: str) -> str:
        headers = {"Authorization": f"Bearer {make_token(sub=user_id)}"}
        response = post_photo(app.test_client(), headers, MEAL, form={"note": "no dressing"})
        return str(response.get_json()["source"])

    with ThreadPoolExecutor(max_workers=2) as pool:
        sources = list(pool.map(post, ["user-42", "user-7"]))

    assert sources == ["api", "api"]
    assert len(model.calls) == 2
