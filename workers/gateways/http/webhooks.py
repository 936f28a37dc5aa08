"""The telephony webhooks: Twilio's status callbacks, ``crm.call/1`` JSON and Asterisk CDRs.

Their paths and answers are those of the first gateway, which producers are configured with:

- ``POST /twilio/status``: Twilio call status callbacks (form posts), authenticated by
  ``X-Twilio-Signature`` (HMAC-SHA1 with ``CRM_TWILIO_AUTH_TOKEN`` over the public URL,
  ``CRM_PUBLIC_BASE_URL``, and the sorted form fields); 403 when it does not match.
- ``POST /calls``: ``crm.call/1`` JSON (one message or a list), and ``POST /asterisk/cdr``:
  Asterisk CDRs as JSON objects of the Master.csv columns (one or a list); both carry the shared
  secret ``CRM_WEBHOOK_SECRET`` in ``X-CRM-Webhook-Secret`` (401 without it).

Every accepted message is validated and published to ``crm.ingest.call``; the answer is 200
``{"enqueued": n, "task_ids": [...]}`` only after the broker took every message, 503 otherwise
(the sender retries; a repeated update is a duplicate, never a second event). Secrets and
request contents are never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from config.queues import CALL_TASK
from config.settings import known_zone
from models.schemas.call import SCHEMA, CallMessageSchema
from models.schemas.common import MessageInvalid, load_message, shared_schema
from tasks.telephony.adapters import (
    AdapterError,
    CdrContext,
    asterisk_cdr_to_call,
    twilio_to_call,
)
from workers.gateways.http.auth import same_secret
from workers.gateways.http.limits import Problem, form_fields, media_type, parse_json, read_body
from workers.gateways.http.publisher import BrokerUnavailable

#: Messages in one JSON post; a larger batch is split by the sender.
MAX_BATCH = 1000
#: Form fields in one Twilio post (Twilio sends about 20).
MAX_FORM_FIELDS = 500
SECRET_HEADER = "x-crm-webhook-secret"
SIGNATURE_HEADER = "x-twilio-signature"


def twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """X-Twilio-Signature as Twilio computes it: base64(HMAC-SHA1(token, URL + fields)).

    The fields are appended sorted by name, each name followed by its value; a name sent more
    than once contributes each of its distinct values, in sorted order.
    """
    by_name: dict[str, list[str]] = {}
    for name, value in params:
        by_name.setdefault(name, []).append(value)
    text = url + "".join(
        name + value for name in sorted(by_name) for value in sorted(set(by_name[name]))
    )
    digest = hmac.new(auth_token.encode("utf-8"), text.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def url_variants(url: str) -> list[str]:
    """The URL as given, without and with its default port: Twilio signs either form
    depending on how the webhook URL was written, so both are accepted (as Twilio's own
    libraries do)."""
    parts = urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = userinfo + "@" if userinfo else ""
    variants = [url]
    try:
        port = parts.port
    except ValueError:
        return variants
    if port in (None, default):
        for netloc in (prefix + host, f"{prefix}{host}:{default}"):
            variant = urlunsplit(parts._replace(netloc=netloc))
            if variant not in variants:
                variants.append(variant)
    return variants


def valid_twilio_signature(
    auth_token: str, url: str, params: list[tuple[str, str]], signature: str
) -> bool:
    if not auth_token or not signature:
        return False
    given = signature.strip().encode("ascii", "replace")
    return any(
        hmac.compare_digest(twilio_signature(auth_token, u, params).encode("ascii"), given)
        for u in url_variants(url)
    )


# -- the endpoints -------------------------------------------------------------------------------


def service_of(request: Request) -> Any:
    return request.app.state.service


async def twilio_status(request: Request) -> JSONResponse:
    service = service_of(request)
    settings = service.settings
    body = await read_body(request, settings.http_max_body_bytes)
    if media_type(request) != "application/x-www-form-urlencoded":
        raise Problem(415, "Twilio callbacks are form posts")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Problem(400, f"unreadable form: {exc}") from exc
    params = form_fields(text, MAX_FORM_FIELDS, keep_blank=True)
    if not settings.twilio_auth_token:
        raise Problem(403, "signature cannot be checked: CRM_TWILIO_AUTH_TOKEN is not set")
    signature = request.headers.get(SIGNATURE_HEADER, "")
    if not valid_twilio_signature(
        settings.twilio_auth_token, signed_url(request, settings.public_base_url), params, signature
    ):
        raise Problem(403, "X-Twilio-Signature does not match")
    source = query(request).get("source_system", "twilio")
    try:
        message = twilio_to_call(params, source_system=source)
    except AdapterError as exc:
        raise Problem(400, exc.reason) from exc
    return await enqueue(request, [validated(message, 0)])


async def calls(request: Request) -> JSONResponse:
    check_secret(request)
    items = await json_items(request)
    return await enqueue(request, [validated(item, i) for i, item in enumerate(items)])


async def asterisk_cdr(request: Request) -> JSONResponse:
    check_secret(request)
    settings = service_of(request).settings
    arguments = query(request)
    zone = arguments.get("time_zone")
    if zone:
        try:
            known_zone(zone)
        except ValueError as exc:
            raise Problem(400, f"unknown time_zone {zone[:64]!r}") from exc
    context = CdrContext(
        source_system=arguments.get("source_system", "asterisk"),
        own_numbers=settings.own_numbers,
        phone_region=settings.phone_region,
        time_zone=zone or None,
    )
    messages = []
    for index, item in enumerate(await json_items(request)):
        if not isinstance(item, dict):
            raise Problem(400, "a CDR is a JSON object of the CSV columns", index=index)
        try:
            messages.append(validated(asterisk_cdr_to_call(item, context), index))
        except AdapterError as exc:
            raise Problem(400, exc.reason, index=index) from exc
    return await enqueue(request, messages)


# -- pieces --------------------------------------------------------------------------------------


async def json_items(request: Request) -> list[Any]:
    body = await read_body(request, service_of(request).settings.http_max_body_bytes)
    if media_type(request) != "application/json":
        raise Problem(415, "send application/json")
    document = parse_json(body)
    items = document if isinstance(document, list) else [document]
    if not items:
        raise Problem(400, "no messages")
    if len(items) > MAX_BATCH:
        raise Problem(413, f"at most {MAX_BATCH} messages per request")
    return items


def check_secret(request: Request) -> None:
    expected = service_of(request).settings.webhook_secret
    given = request.headers.get(SECRET_HEADER, "")
    if not expected or not same_secret(given, expected):
        raise Problem(401, "X-CRM-Webhook-Secret missing or wrong")


def signed_url(request: Request, public_base_url: str) -> str:
    """The URL Twilio requested, as Twilio saw it: behind a proxy the public one."""
    raw_query = request.url.query
    path = request.scope.get("root_path", "") + request.url.path
    if public_base_url:
        base = public_base_url
    else:
        base = f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"
    return base + path + (f"?{raw_query}" if raw_query else "")


def query(request: Request) -> dict[str, str]:
    return dict(form_fields(request.url.query, 20, "query"))


def validated(message: Any, index: int) -> dict[str, Any]:
    """The message if it is a valid ``crm.call/1``; the sender learns at once otherwise."""
    try:
        load_message(shared_schema(CallMessageSchema), message, SCHEMA)
    except MessageInvalid as exc:
        raise Problem(400, exc.reason, index=index, errors=exc.errors) from exc
    assert isinstance(message, dict)
    return message


async def enqueue(request: Request, messages: list[dict[str, Any]]) -> JSONResponse:
    publisher = service_of(request).publisher
    try:
        task_ids = await run_in_threadpool(publisher.publish, CALL_TASK, messages)
    except BrokerUnavailable as exc:
        problem = Problem(
            503,
            "the message could not be queued; try again",
            retry_after=5,
            queued=exc.queued,
        )
        problem.headers["Retry-After"] = "5"
        raise problem from exc
    return JSONResponse({"enqueued": len(task_ids), "task_ids": task_ids})


ROUTES = [
    Route("/twilio/status", twilio_status, methods=["POST"]),
    Route("/calls", calls, methods=["POST"]),
    Route("/asterisk/cdr", asterisk_cdr, methods=["POST"]),
]
