"""What other OpenAI-compatible servers need: learnt request fields, error shapes, waits, dates.

``VisionModel`` in ``app.py`` makes the call (its loop and tenacity); this module decides what to
send (``RequestFields``: the fields and the output cap, given what the server refused, kept by
``LearntProfile``) and where, with which key (``ModelEndpoint``), reads what the server says back
(its error in any of five vendors' shapes, the wait it asks for, the tokens it spent, the model's
shutdown date) and classes a failure (``model_error``, ``connection_failure``: retried, refused
for good, or a wait). No Flask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlencode

import requests

from errors import (
    ServiceError,
    TransientUpstreamError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from logs import redact
from outbound_http import AnswerTooLarge, UpstreamReply, public_url

logger = logging.getLogger("image_service")

# Every failed call to the model says so in one form, whatever failed.
MODEL_FAILED = "OpenAI API request failed: "


def log_model_failure(what: str, *args: object) -> None:
    """A WARNING that a call to the model failed, and how (``what`` is a %-format)."""
    logger.warning(MODEL_FAILED + what, *args)


# ---------------------------------------------------------------------------------------------
# What a server takes (learnt, and shared with the other workers through a store)
# ---------------------------------------------------------------------------------------------


TOKEN_CAP_FIELDS = ("max_tokens", "max_completion_tokens")
# Request fields a server may refuse: the output cap goes under its other name, the rest are left
# out. Nothing else is changed behind the caller's back.
ADJUSTABLE_FIELDS = (*TOKEN_CAP_FIELDS, "temperature", "reasoning_effort")
# Reasoning models known by their family (the last path segment, so "openai/gpt-6-luna" counts
# too); others show it in their answers: a refused max_tokens, or reasoning tokens in the usage.
REASONING_MODEL_PATTERN = re.compile(r"(?:gpt-5(?!-chat)|gpt-6|o[0-9]+)(?![a-z0-9])", re.IGNORECASE)
PROFILE_PREFIX = "model_profile:"
PROFILE_TTL_SECONDS = 30 * 86400


def reasoning_family(model: str) -> bool:
    """Whether a model is of a reasoning family: ``gpt-5*`` (not ``gpt-5-chat*``), ``gpt-6*``, o."""
    return REASONING_MODEL_PATTERN.match(model.rsplit("/", 1)[-1]) is not None


@dataclass(frozen=True)
class ServerProfile:
    """What one server takes for one model: the output cap's field, a temperature, an effort."""

    cap_field: str = "max_tokens"
    temperature: bool = True
    reasoning_effort: bool = True
    reasoning: bool = False

    @classmethod
    def assumed(cls, model: str, effort: str) -> ServerProfile:
        """What is assumed before the server has said anything: reasoning models by family.

        They refuse ``max_tokens`` whatever the effort, and take a temperature only at ``none``.
        """
        if reasoning_family(model):
            return cls("max_completion_tokens", temperature=effort == "none", reasoning=True)
        return cls()

    @classmethod
    def from_json(cls, raw: str | None) -> ServerProfile | None:
        """A stored profile, or None when absent or unreadable."""
        stored = stored_object(raw)
        if stored is None or stored.get("cap_field") not in TOKEN_CAP_FIELDS:
            return None
        flags = ("temperature", "reasoning_effort", "reasoning")
        return cls(stored["cap_field"], *(stored.get(name) is True for name in flags))

    def to_json(self) -> str:
        """The profile as stored."""
        return json.dumps(dataclasses.asdict(self))

    def without(self, field_name: str, effort: str = "") -> ServerProfile | None:
        """The profile once the server refused this field; None when nothing is left to try.

        A reasoning model that refuses the effort ``none`` reasons at its own default, where it
        takes no temperature.
        """
        if field_name == self.cap_field:
            other = TOKEN_CAP_FIELDS[1 - TOKEN_CAP_FIELDS.index(field_name)]
            # OpenAI refuses max_tokens for its reasoning models only.
            reasoning = self.reasoning or field_name == "max_tokens"
            return dataclasses.replace(self, cap_field=other, reasoning=reasoning)
        if field_name == "temperature" and self.temperature:
            return dataclasses.replace(self, temperature=False)
        if field_name == "reasoning_effort" and self.reasoning_effort:
            sampled = self.temperature and not (self.reasoning and effort == "none")
            return dataclasses.replace(self, reasoning_effort=False, temperature=sampled)
        return None


def stored_object(raw: str | None) -> dict[str, Any] | None:
    """A JSON object read back from the store, or None when absent or unreadable (as the cache)."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        logger.warning("Ignoring an unreadable cache entry")
        return None
    return value if isinstance(value, dict) else None


class ProfileStore(Protocol):
    """The part of the service's store a profile needs."""

    def get(self, key: str) -> str | None:
        """The value kept under ``key``, or None."""

    def set(self, key: str, value: str, ttl: float) -> None:
        """Keep ``value`` under ``key`` for ``ttl`` seconds."""


class LearntProfile:
    """What the workers have learnt about one server, model and effort, kept in the store.

    What a server takes depends on the effort (GPT-6 takes a temperature at none only). A store
    that fails (raising ``unavailable``) leaves this process with what it learnt itself.
    """

    def __init__(
        self,
        store: ProfileStore,
        base_url: str,
        model: str,
        effort: str,
        unavailable: type[Exception],
    ) -> None:
        self.store = store
        self.model = model
        identity = "\n".join((base_url, model, effort))
        self.key = PROFILE_PREFIX + hashlib.sha256(identity.encode()).hexdigest()
        self.learnt = ServerProfile.assumed(model, effort)
        self.unavailable = unavailable

    def current(self) -> ServerProfile:
        """The shared profile, or this process's own when the store fails or holds none."""
        try:
            shared = ServerProfile.from_json(self.store.get(self.key))
        except self.unavailable:
            return self.learnt
        if shared is not None:
            self.learnt = shared
        return self.learnt

    def learn(self, profile: ServerProfile, reason: str) -> ServerProfile:
        """Keep a new profile for this process and the others, and say so once."""
        logger.info(
            "The vision model's server %s for %s: now sending %s%s%s",
            reason,
            self.model,
            profile.cap_field,
            "" if profile.temperature else ", no temperature",
            ", as a reasoning model" if profile.reasoning else "",
        )
        self.learnt = profile
        with contextlib.suppress(self.unavailable):
            self.store.set(self.key, profile.to_json(), PROFILE_TTL_SECONDS)
        return profile


# ---------------------------------------------------------------------------------------------
# What to send a server: the fields its profile takes, the output cap, a larger cap once
# ---------------------------------------------------------------------------------------------


REASONING_CAP_GROWTH = 2


class RequestFields:
    """The fields to send one model at one effort, given the ``ServerProfile`` learnt for it.

    The output cap (its field and its size), a temperature, the effort; what to try once a field
    is refused; and when an answer cut short while reasoning is worth one more, larger cap.
    """

    def __init__(
        self,
        model: str,
        effort: str,
        max_output_tokens: int,
        reasoning_max_output_tokens: int,
        largest_cap: int,
        extra_body: Mapping[str, Any],
    ) -> None:
        self.family = reasoning_family(model)
        self.effort = effort
        self.max_output_tokens = max_output_tokens
        self.reasoning_max_output_tokens = reasoning_max_output_tokens
        self.largest_cap = largest_cap
        self.extra_body = extra_body

    def without_refused(
        self, profile: ServerProfile, field_name: str, refused: set[str]
    ) -> ServerProfile | None:
        """The profile without a refused field; None when that leaves nothing new to try."""
        if field_name in refused:
            return None
        revised = profile.without(field_name, self.effort)
        if revised is None or revised.cap_field in refused:
            return None
        return revised

    def body(self, base: Mapping[str, Any], profile: ServerProfile, cap: int) -> dict[str, Any]:
        """The request for this server: the output cap under the field it takes, and so on."""
        body: dict[str, Any] = {**base, profile.cap_field: cap}
        if profile.temperature:
            body["temperature"] = 0
        effort = self.effort_for(profile)
        if effort:
            body["reasoning_effort"] = effort
        body.update(self.extra_body)
        return body

    def effort_for(self, profile: ServerProfile) -> str | None:
        """The effort to send; ``none`` only to a model known or shown to reason."""
        # A model that does not reason needs no telling, and a plain server may refuse the field.
        effort = self.effort
        if not profile.reasoning_effort or (effort == "none" and not profile.reasoning):
            return None
        return effort

    def reasons(self, profile: ServerProfile) -> bool:
        """Whether the model spends output tokens reasoning: not a family model told ``none``."""
        return profile.reasoning and not (self.family and self.effort_for(profile) == "none")

    def output_cap(self, profile: ServerProfile) -> int:
        """The output-token cap: reasoning models need room to reason before they answer."""
        if self.reasons(profile):
            return self.reasoning_max_output_tokens
        return self.max_output_tokens

    def larger_cap(self, profile: ServerProfile, cap: int, usage: Mapping[str, int]) -> int | None:
        """A cap worth one more try: only when reasoning spent what the answer needed."""
        if not (profile.reasoning and usage.get("reasoning_tokens")):
            return None
        bigger = max(self.output_cap(profile), min(cap * REASONING_CAP_GROWTH, self.largest_cap))
        return bigger if bigger > cap else None

    def out_of_tokens(
        self, profile: ServerProfile, cap: int, usage: Mapping[str, int]
    ) -> UpstreamError:
        """The error for an answer cut short, naming the setting to raise."""
        reasoning = usage.get("reasoning_tokens", 0)
        spent = f"{cap} output tokens" + (f", {reasoning} of them reasoning" if reasoning else "")
        log_model_failure("the answer ran out of output tokens (%s)", spent)
        if self.reasons(profile):
            setting = (
                "raise OPENAI_REASONING_MAX_OUTPUT_TOKENS (the cap for reasoning models; "
                "OPENAI_MAX_OUTPUT_TOKENS is the cap for the others) or lower "
                "OPENAI_REASONING_EFFORT"
            )
        else:
            setting = "raise OPENAI_MAX_OUTPUT_TOKENS"
        return UpstreamError(
            f"the vision model's answer ran out of output tokens before its JSON was complete "
            f"({spent}); {setting}"
        )


# ---------------------------------------------------------------------------------------------
# OpenAI's Responses API: the same request and answer in its other wire format
# ---------------------------------------------------------------------------------------------


# Where each API takes a request, under OPENAI_BASE_URL.
API_PATHS = {"chat": "chat/completions", "responses": "responses"}
# The request fields a profile learns, by the names a Responses server gives them in an error.
# Its one output cap, max_output_tokens, has no other name to try, so a refused cap is final.
RESPONSES_FIELD_NAMES = {
    "reasoning.effort": "reasoning_effort",
    "reasoning": "reasoning_effort",
    "temperature": "temperature",
}
# Why a Responses answer is incomplete, as a Chat Completions finish_reason.
INCOMPLETE_REASONS = {"max_output_tokens": "length", "content_filter": "content_filter"}


def as_responses_body(chat_body: Mapping[str, Any]) -> dict[str, Any]:
    """A finished Chat Completions body as a Responses body, asking for the same answer.

    The system message becomes ``instructions``, the others ``input`` messages (text parts
    ``input_text``, images ``input_image``); the schema moves to ``text.format``, the output cap
    to ``max_output_tokens``, the effort to ``reasoning.effort``; nothing is stored.
    """
    body = dict(chat_body)
    instructions: list[str] = []
    inputs: list[dict[str, Any]] = []
    for message in body.pop("messages", []):
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer") and isinstance(content, str):
            instructions.append(content)
        else:
            inputs.append({"role": role, "content": responses_content(content)})
    if instructions:
        body["instructions"] = "\n\n".join(instructions)
    body["input"] = inputs
    response_format = body.pop("response_format", None)
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        schema = response_format.get("json_schema")
        if kind == "json_schema" and isinstance(schema, dict):
            body["text"] = {"format": {"type": "json_schema", **schema}}
        else:
            body["text"] = {"format": {"type": kind}}
    for cap_field in TOKEN_CAP_FIELDS:
        if cap_field in body:
            body["max_output_tokens"] = body.pop(cap_field)
    if "reasoning_effort" in body:
        body["reasoning"] = {"effort": body.pop("reasoning_effort")}
    body.setdefault("store", False)
    return body


def responses_content(content: Any) -> Any:
    """A Chat message's content as Responses input: ``input_text`` and ``input_image`` parts."""
    if not isinstance(content, list):
        return content
    parts: list[Any] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "input_text", "text": part.get("text", "")})
        elif kind == "image_url":
            image = part.get("image_url") or {}
            converted = {"type": "input_image", "image_url": image.get("url")}
            if "detail" in image:
                converted["detail"] = image["detail"]
            parts.append(converted)
        else:
            parts.append(part)
    return parts


def as_chat_completion(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A Responses answer in the Chat Completions shape the rest of the service reads.

    The text of the ``message`` output items (``reasoning`` items and the like are passed over)
    is the content, a ``refusal`` part the refusal; ``status: incomplete`` gives
    ``finish_reason`` ``length`` or ``content_filter``; the usage keeps the same counts.
    """
    texts: list[str] = []
    refusals: list[str] = []
    output = payload.get("output")
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict) or item.get("type") != "message":
            continue
        content = item.get("content")
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, dict):
                continue
            if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                refusals.append(part["refusal"])
    finish = "stop"
    if payload.get("status") == "incomplete":
        details = payload.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        finish = INCOMPLETE_REASONS.get(str(reason), str(reason or "incomplete"))
    message = {
        "role": "assistant",
        "content": "".join(texts) if texts else None,
        "refusal": " ".join(refusals) if refusals else None,
    }
    completion: dict[str, Any] = {
        "id": payload.get("id"),
        "object": "chat.completion",
        "model": payload.get("model"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
    }
    usage = payload.get("usage")
    if isinstance(usage, dict):
        completion["usage"] = chat_usage(usage)
    return completion


def chat_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    """A Responses usage under the Chat Completions names ``token_usage`` reads."""
    counts: dict[str, Any] = {
        "prompt_tokens": usage.get("input_tokens"),
        "completion_tokens": usage.get("output_tokens"),
        "total_tokens": usage.get("total_tokens"),
    }
    output_details = usage.get("output_tokens_details")
    if isinstance(output_details, dict):
        reasoning = output_details.get("reasoning_tokens")
        counts["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    input_details = usage.get("input_tokens_details")
    if isinstance(input_details, dict):
        counts["prompt_tokens_details"] = {"cached_tokens": input_details.get("cached_tokens")}
    return counts


def chat_problem(problem: UpstreamProblem) -> UpstreamProblem:
    """A Responses server's error naming a refused field by the name the profile learns."""
    param = RESPONSES_FIELD_NAMES.get(problem.param or "", problem.param)
    message = problem.message.replace("reasoning.effort", "reasoning_effort")
    return dataclasses.replace(problem, param=param, message=message)


# ---------------------------------------------------------------------------------------------
# What a server says went wrong (OpenAI, vLLM, Mistral, Gemini, LM Studio, plain text)
# ---------------------------------------------------------------------------------------------


QUOTED_NAME = "(?:^|[^A-Za-z0-9_]){}(?![A-Za-z0-9_])"


@dataclass(frozen=True)
class UpstreamProblem:
    """An error as a server reported it, whatever its shape: its words, code and field."""

    message: str
    code: str | None = None
    param: str | None = None
    status: int | None = None


def upstream_problem(payload: Any, raw: bytes) -> UpstreamProblem | None:
    """The error in any shape compatible servers send, or None when the body holds none.

    OpenAI's ``{"error": {...}}``; vLLM's and Mistral's top-level ``{"object": "error",
    "message": ...}`` (the message may be an object); Gemini's ``[{"error": {...}}]``; LM
    Studio's ``{"error": "text"}``; and plain text.
    """
    if isinstance(payload, list) and payload and isinstance(payload[0], dict):
        payload = payload[0]
    if not isinstance(payload, dict):
        text = raw.decode("utf-8", "replace").strip()
        return UpstreamProblem(text) if text else None
    error = payload.get("error")
    if isinstance(error, str):
        return UpstreamProblem(error)
    if isinstance(error, dict):
        fields = error
    elif payload.get("object") == "error" or "message" in payload or "detail" in payload:
        fields = payload
    else:
        return None
    message = fields.get("message", fields.get("detail"))
    code = fields.get("code")
    status = code if isinstance(code, int) and 400 <= code <= 599 else None
    kind = fields.get("status") or fields.get("type")
    param = fields.get("param")
    return UpstreamProblem(
        message=problem_words(message),
        code=str(code) if isinstance(code, str) and code else (str(kind) if kind else None),
        param=str(param) if param else None,
        status=status,
    )


def problem_words(message: Any) -> str:
    """An error message as text; a validation list reads ``body.field: what is wrong``."""
    if isinstance(message, str):
        return message
    if isinstance(message, dict) and "detail" in message:
        return problem_words(message["detail"])
    if isinstance(message, list):
        parts = []
        for entry in message:
            if isinstance(entry, dict) and "msg" in entry:
                where = ".".join(str(part) for part in entry.get("loc") or ())
                parts.append(f"{where}: {entry['msg']}" if where else str(entry["msg"]))
            else:
                parts.append(problem_words(entry))
        return "; ".join(parts)
    return "" if message is None else json.dumps(message)


def rejected_field(problem: UpstreamProblem, body: Mapping[str, Any]) -> str | None:
    """Which adjustable field of the request a 400 or 422 refuses, if it names one."""
    sent = [name for name in ADJUSTABLE_FIELDS if name in body]
    if problem.param in sent:
        return problem.param
    text = problem.message
    named = [
        (found.start(), name)
        for name in sent
        if (found := re.search(QUOTED_NAME.format(re.escape(name)), text))
    ]
    return min(named)[1] if named else None


# ---------------------------------------------------------------------------------------------
# How long a server asks to wait
# ---------------------------------------------------------------------------------------------


DURATION_PART_PATTERN = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
DURATION_PATTERN = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait a server asked for: ``retry-after-ms``, ``Retry-After``, or a rate-limit reset."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            value = float(milliseconds) / 1000
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    header = headers.get("Retry-After")
    if not header:
        return rate_limit_reset_seconds(headers)
    try:
        value = float(header)
    except ValueError:
        try:
            value = parsedate_to_datetime(header).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return max(0.0, value) if math.isfinite(value) else None


def rate_limit_reset_seconds(headers: Mapping[str, str]) -> float | None:
    """When an exhausted limit resets, from OpenAI's ``x-ratelimit-reset-*`` (``6m0s``)."""
    waits = []
    for kind in ("requests", "tokens"):
        remaining = headers.get(f"x-ratelimit-remaining-{kind}")
        reset = duration_seconds(headers.get(f"x-ratelimit-reset-{kind}", ""))
        if reset is not None and remaining in (None, "0"):
            waits.append(reset)
    return max(waits) if waits else None


def duration_seconds(text: str) -> float | None:
    """Seconds in a Go-style duration (``1h2m3.5s``, ``20ms``) or a plain number of seconds."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        if not DURATION_PATTERN.fullmatch(text):
            return None
        value = sum(
            float(amount) * DURATION_UNITS[unit]
            for amount, unit in DURATION_PART_PATTERN.findall(text)
        )
    return value if math.isfinite(value) and value >= 0 else None


# ---------------------------------------------------------------------------------------------
# What an error answer, or none, means for the call: retried, refused for good, or a wait
# ---------------------------------------------------------------------------------------------

RETRYABLE_STATUSES = frozenset({408, 409, 429})
MAX_UPSTREAM_WORDS = 300


def server_words(text: str) -> str:
    """A server's words on one short line."""
    line = " ".join(text.split())
    if len(line) > MAX_UPSTREAM_WORDS:
        line = line[:MAX_UPSTREAM_WORDS] + "…"
    return line


def model_error(
    status: int,
    problem: UpstreamProblem,
    headers: Mapping[str, str],
    body: Mapping[str, Any],
    *,
    words: str,
    model: str,
    base_url: str,
    versioned: bool,
    retry_after_cap: float,
) -> ServiceError:
    """Class an error answer: retried, refused for good, or a wait the caller should make."""
    detail = f"HTTP {status}: {words}" if words else f"HTTP {status}"
    if status == 429 and problem.code == "insufficient_quota":
        return UpstreamError(f"the vision model's account has no quota left ({detail})")
    retryable = status in RETRYABLE_STATUSES or status >= 500
    advice = headers.get("x-should-retry", "").strip().lower()
    retryable = {"true": True, "false": False}.get(advice, retryable)
    wait = retry_after_seconds(headers)
    too_long = wait is not None and wait > retry_after_cap
    if wait is not None and (status == 429 or retryable) and (too_long or not retryable):
        return UpstreamRateLimited(
            f"the vision model's server asks to wait {math.ceil(wait)}s before the next "
            f"request ({detail})",
            retry_after=wait,
        )
    if retryable:
        return TransientUpstreamError(f"the vision model failed ({detail})", retry_after=wait)
    if status == 401:
        return UpstreamError(
            f"the vision model's server rejected the API key ({detail}); check OPENAI_API_KEY"
        )
    if status == 403:
        return UpstreamError(
            f"the vision model's server refused this API key access ({detail}); check that "
            f"the key may use {model}"
        )
    if status == 404:
        return UpstreamError(not_found_message(detail, model, base_url, versioned))
    if status == 429 or status >= 500:
        return UpstreamError(f"the vision model failed ({detail}); its server asked not to retry")
    rejected = UpstreamError(f"the vision model rejected the request ({detail})")
    if status in (400, 422):
        rejected.rejected_parameter = rejected_field(problem, body)
    return rejected


def not_found_message(detail: str, model: str, base_url: str, versioned: bool) -> str:
    """What a 404 usually means: the model's name, or a base URL without ``/v1``."""
    message = (
        f"the vision model's server has no such model or path ({detail}); check "
        f"OPENAI_MODEL ({model}) and OPENAI_BASE_URL ({base_url})"
    )
    if not versioned and not re.search(r"/v\d+(?:beta)?(?:/|$)", base_url):
        message += ": OpenAI-compatible servers serve under /v1, so the base URL likely "
        message += "needs to end in /v1"
    return message


def connection_failure(error: Exception, timeout: float) -> ServiceError:
    """The service's error for a failed attempt; a ServiceError stays as it is."""
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, requests.Timeout):
        log_model_failure("no answer within %gs", timeout)
        return UpstreamTimeout("the vision model did not answer in time")
    if isinstance(error, AnswerTooLarge):
        log_model_failure("the answer is too large")
        return UpstreamError("the vision model's answer is too large")
    log_model_failure("%s", type(error).__name__)
    return TransientUpstreamError("the vision model could not be reached")


# ---------------------------------------------------------------------------------------------
# Where the server is, how it takes the key, and what its reply holds
# ---------------------------------------------------------------------------------------------


class ModelEndpoint:
    """The model's server as one call meets it: its URLs, its headers and its replies read.

    Azure's ``api-version`` and ``api-key`` header when configured; ``api`` is the wire format,
    ``chat`` (Chat Completions) or ``responses`` (the Responses API, its answers read back as
    completions). A reply is the completion, or the error it holds in the server's own words
    (never the key's), classed by ``model_error``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        key_header: str,
        api_version: str | None,
        retry_after_cap: float,
        request_id_pattern: re.Pattern[str],
        api: str = "chat",
    ) -> None:
        self.api = api
        self.base_url = base_url
        self.model = model
        self.api_key = api_key
        self.key_header = key_header
        self.api_version = api_version
        self.retry_after_cap = retry_after_cap
        self.request_id_pattern = request_id_pattern

    @property
    def answer_path(self) -> str:
        """Where the model is asked: ``chat/completions``, or ``responses``."""
        return API_PATHS[self.api]

    def wire_body(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """The request as this API takes it, from its Chat Completions body."""
        return as_responses_body(body) if self.api == "responses" else body

    def completion_in(self, payload: Any) -> dict[str, Any] | None:
        """The completion a 200 answer holds, in the Chat Completions shape; None if none."""
        if not isinstance(payload, dict):
            return None
        if self.api != "responses":
            return payload if "choices" in payload else None
        if not isinstance(payload.get("output"), list) or payload.get("status") == "failed":
            return None
        return as_chat_completion(payload)

    def url(self, path: str) -> str:
        """A URL on the model's server, with Azure's ``api-version`` when configured."""
        url = f"{self.base_url}/{path}"
        if self.api_version:
            url += "?" + urlencode({"api-version": self.api_version})
        return url

    def headers(self, request_id: str | None = None) -> dict[str, str]:
        """The API key (as a bearer token, or in Azure's ``api-key`` header) and the request id."""
        key = self.api_key
        name = self.key_header
        headers = {name: f"Bearer {key}" if name.lower() == "authorization" else key}
        if request_id:
            headers["X-Client-Request-Id"] = request_id
        return headers

    def read_reply(
        self, reply: UpstreamReply, body: Mapping[str, Any], seconds: float
    ) -> dict[str, Any]:
        """The completion in a reply, or the error it holds, in the server's own words.

        ``body`` is the request as Chat Completions takes it, whatever the API.
        """
        where = self.request_note(reply)
        payload = reply.json_or_none()
        completion = self.completion_in(payload) if reply.status == 200 else None
        if completion is not None:
            logger.info("The vision model answered HTTP 200 in %.2fs%s", seconds, where)
            return completion
        problem = upstream_problem(payload, reply.body)
        if reply.status == 200:
            if problem is None:
                log_model_failure("the answer is not a completion%s", where)
                if payload is None:
                    raise UpstreamError("the vision model answered something that is not JSON")
                raise UpstreamError("the vision model answered an unexpected shape")
            if problem.status is None:
                words = self.redacted(problem.message)
                log_model_failure("HTTP 200 error %s%s", words, where)
                raise UpstreamError(
                    f"the vision model answered an error instead of a completion: {words}"
                )
            status = problem.status
        else:
            status = reply.status
            problem = problem or UpstreamProblem("")
        raise self.http_error(status, problem, reply, body)

    def http_error(
        self,
        status: int,
        problem: UpstreamProblem,
        reply: UpstreamReply,
        body: Mapping[str, Any],
    ) -> ServiceError:
        """Log an error answer and class it (``model_error``)."""
        words = self.redacted(problem.message)
        log_model_failure(
            "HTTP %s %s %s%s",
            status,
            problem.code or "",
            words,
            self.request_note(reply),
        )
        return model_error(
            status,
            chat_problem(problem) if self.api == "responses" else problem,
            reply.headers,
            body,
            words=words,
            model=self.model,
            base_url=public_url(self.base_url),
            versioned=bool(self.api_version),
            retry_after_cap=self.retry_after_cap,
        )

    def redacted(self, text: str) -> str:
        """The server's words on one short line, with no part of the API key."""
        return redact(server_words(text), (self.api_key,))

    def request_note(self, reply: UpstreamReply) -> str:
        """`` (upstream request id …)`` for the log line, when the server sent a usable one."""
        value = reply.headers.get("x-request-id") or reply.headers.get("request-id") or ""
        return f" (upstream request id {value})" if self.request_id_pattern.fullmatch(value) else ""


# ---------------------------------------------------------------------------------------------
# What a completion reports besides its answer
# ---------------------------------------------------------------------------------------------


MAX_TOKEN_COUNT = 10**9


def finish_reason(payload: Mapping[str, Any]) -> str | None:
    """Why the model stopped writing: ``stop``, ``length``, ``content_filter``…"""
    try:
        reason = payload["choices"][0]["finish_reason"]
    except (KeyError, IndexError, TypeError):
        return None
    return reason if isinstance(reason, str) else None


def token_usage(payload: Mapping[str, Any]) -> dict[str, int]:
    """The token counts a completion reports, each a whole number within reason."""
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return {}
    found = {
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "total_tokens": usage.get("total_tokens"),
    }
    details = usage.get("completion_tokens_details")
    if isinstance(details, dict):
        found["reasoning_tokens"] = details.get("reasoning_tokens")
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        found["cached_tokens"] = details.get("cached_tokens")
    return {
        name: value
        for name, value in found.items()
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_COUNT
    }


# ---------------------------------------------------------------------------------------------
# The /health probe's verdicts and the model's shutdown date
# ---------------------------------------------------------------------------------------------


SHUTDOWN_UNKNOWN = "unknown"
NO_SHUTDOWN_ANNOUNCED = "none announced"
DAY_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def listed_model_names(payload: Any) -> frozenset[str]:
    """The models a ``GET /models`` answer lists, by id and by every alias or name it gives.

    OpenAI's ``{"object": "list", "data": [{"id": ...}]}``; llama.cpp adds ``aliases`` to its
    entries and a ``models`` list with ``name`` and ``model``, as Ollama's own API does.
    """
    if not isinstance(payload, dict):
        return frozenset()
    names: set[str] = set()
    for listing, keys in (("data", ("id",)), ("models", ("name", "model", "id"))):
        entries = payload.get(listing)
        if not isinstance(entries, list):
            continue
        for entry in entries[:MAX_LISTED_MODELS]:
            if not isinstance(entry, dict):
                continue
            names.update(value for key in keys if isinstance(value := entry.get(key), str))
            aliases = entry.get("aliases")
            if isinstance(aliases, list):
                names.update(alias for alias in aliases if isinstance(alias, str))
    return frozenset(names)


# How many entries of a model listing are read; a server that lists more is a directory.
MAX_LISTED_MODELS = 10_000


def probe_verdict(status: int) -> str:
    """What a ``GET /models/{model}`` answer says about the server."""
    if status == 200:
        return "reachable"
    if status in (401, 403):
        return "key rejected"
    if status == 404:
        return "model not found"
    return f"error (HTTP {status})"


def utc_today() -> date:
    """Today's date in UTC, the calendar of OpenAI's shutdown dates."""
    return datetime.now(UTC).date()


def shutdown_in(described: Any) -> str:
    """A model object's ``shutdown_date`` as /health shows it: the date, none announced, unknown.

    ``described`` is the probe's answer as read from JSON (None when it was not JSON).
    """
    if not isinstance(described, dict) or "shutdown_date" not in described:
        return SHUTDOWN_UNKNOWN
    shown = described["shutdown_date"]
    if shown is None:
        return NO_SHUTDOWN_ANNOUNCED
    return shown if day_of(shown) is not None else SHUTDOWN_UNKNOWN


def day_of(text: Any) -> date | None:
    """The date a strict ``YYYY-MM-DD`` names, or None for anything else."""
    if not isinstance(text, str) or not DAY_PATTERN.fullmatch(text):
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def warn_of_shutdown(model: str, shown: str, days_left: int) -> None:
    """A WARNING while the model's shutdown nears; an ERROR once it is past."""
    if days_left < 0:
        logger.error(
            "The vision model %s was shut down on %s: photos fail until OPENAI_MODEL names a "
            "current model (see OpenAI's deprecations page) and the service restarts",
            model,
            shown,
        )
        return
    logger.warning(
        "The vision model %s shuts down on %s, in %d days: set OPENAI_MODEL to its replacement "
        "(see OpenAI's deprecations page) and restart the service before then",
        model,
        shown,
        days_left,
    )


class ShutdownWatch:
    """What the server says of the model's shutdown: kept for /health, said, warned of as it nears.

    ``today`` is the clock (UTC dates, OpenAI's calendar); ``count_days`` reports the days left.
    """

    def __init__(
        self,
        model: str,
        warn_days: int,
        count_days: Callable[[int], None],
        today: Callable[[], date] | None = None,
    ) -> None:
        self.model = model
        self.warn_days = warn_days
        self.count_days = count_days
        self.today = today or utc_today
        self.lock = threading.Lock()
        self.shutdown = SHUTDOWN_UNKNOWN
        self.shutdown_read = False
        self.shutdown_warned: date | None = None

    def announced(self) -> str:
        """The model's shutdown date as the latest answer gave it, or what stands for none."""
        with self.lock:
            return self.shutdown

    def watch(self, shown: str) -> None:
        """Keep what the server says of the model's shutdown; say it, and warn as it nears."""
        with self.lock:
            changed = not self.shutdown_read or shown != self.shutdown
            self.shutdown, self.shutdown_read = shown, True
        model = self.model
        shutdown = day_of(shown)
        if shutdown is None:
            if changed:
                unsaid = shown == SHUTDOWN_UNKNOWN
                said = "does not say when it shuts down" if unsaid else "announces no shutdown date"
                logger.info("The vision model %s: its server %s", model, said)
            return
        today = self.today()
        days_left = (shutdown - today).days
        self.count_days(days_left)
        if changed:
            logger.info(
                "The vision model %s shuts down on %s (%d days from today), its server says",
                model,
                shown,
                days_left,
            )
        if days_left <= self.warn_days and self.shutdown_warned != today:
            self.shutdown_warned = today
            warn_of_shutdown(model, shown, days_left)
