"""The HTTP webhook gateway for telephony: check, convert, enqueue; 2xx only once enqueued.

``crm-events http-gateway [--host 127.0.0.1] [--port 8080]`` serves a small WSGI application
with waitress (a maintained, pure-Python production WSGI server: a thread pool suits the
blocking publish to the broker, and it enforces request header and body limits and idle
timeouts itself). Endpoints (docs/telephony.md):

- ``POST /twilio/status``: Twilio call status callbacks (form posts), authenticated by
  ``X-Twilio-Signature`` (HMAC-SHA1 with ``CRM_TWILIO_AUTH_TOKEN`` over the public URL,
  ``CRM_PUBLIC_BASE_URL``, and the sorted form fields); 403 when it does not match.
- ``POST /calls``: ``crm.call/1`` JSON (one message or a list), and ``POST /asterisk/cdr``:
  Asterisk CDRs as JSON objects of the Master.csv columns (one or a list); both carry the shared
  secret ``CRM_WEBHOOK_SECRET`` in ``X-CRM-Webhook-Secret`` (401 without it).
- ``GET /healthz``: 200 when the broker answers, 503 when it does not.

Every accepted message is validated and published to ``crm.ingest.call``; the answer is 200 only
after the broker took every message, 503 otherwise (the sender retries; a repeated update is a
duplicate, never a second event). Bodies over ``CRM_HTTP_MAX_BODY_BYTES`` get 413. The gateway
never writes to the database. Secrets and request contents are never logged.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from config.settings import Settings
from models.schemas.call import SCHEMA, CallMessageSchema
from models.schemas.common import MessageInvalid, load_message
from tasks.telephony.adapters import (
    AdapterError,
    CdrContext,
    asterisk_cdr_to_call,
    twilio_to_call,
)

log = logging.getLogger("crm.http_gateway")

CALL_TASK = "crm.ingest.call"
CALL_QUEUE = "crm.ingest.call"
#: Messages in one JSON post; a larger batch is split by the sender.
MAX_BATCH = 1000
#: Form fields in one Twilio post (Twilio sends about 20).
MAX_FORM_FIELDS = 500
SECRET_HEADER = "HTTP_X_CRM_WEBHOOK_SECRET"
SIGNATURE_HEADER = "HTTP_X_TWILIO_SIGNATURE"
#: Publishing gives up after these retries, so a dead broker answers 503 in about a second.
PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1,
}

Publisher = Callable[[list[dict[str, Any]]], list[str]]


# -- Twilio's signature -------------------------------------------------------------------------


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


# -- the application ----------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    document: dict[str, Any]
    headers: list[tuple[str, str]] = field(default_factory=list)


REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class RequestError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.response = Response(status, {"error": message, **extra})


class TelephonyGateway:
    """The WSGI application. ``publish`` enqueues messages and returns their task ids."""

    def __init__(
        self, settings: Settings, publish: Publisher, broker_ok: Callable[[], bool]
    ) -> None:
        self.settings = settings
        self.publish = publish
        self.broker_ok = broker_ok
        self.routes: dict[str, tuple[str, Callable[[dict[str, Any]], Response]]] = {
            "/healthz": ("GET", self.healthz),
            "/twilio/status": ("POST", self.twilio_status),
            "/calls": ("POST", self.calls),
            "/asterisk/cdr": ("POST", self.asterisk_cdr),
        }

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        started = time.monotonic()
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        try:
            response = self.dispatch(method, path, environ)
        except RequestError as exc:
            response = exc.response
        except Exception:
            # The traceback names code, never the request's contents or the settings.
            log.exception("%s %s failed", method, path[:200])
            response = Response(500, {"error": "internal error"})
        body = json.dumps(response.document, ensure_ascii=False).encode("utf-8")
        headers = [
            ("Content-Type", "application/json; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *response.headers,
        ]
        status_line = f"{response.status} {REASONS.get(response.status, '')}".strip()
        start_response(status_line, headers)
        log.info(
            "%s %s %d %.1f ms",
            method,
            path[:200],
            response.status,
            (time.monotonic() - started) * 1000,
        )
        return [b"" if method == "HEAD" else body]

    def dispatch(self, method: str, path: str, environ: dict[str, Any]) -> Response:
        route = self.routes.get(path.rstrip("/") or "/")
        if route is None:
            raise RequestError(404, f"no such endpoint; try {', '.join(sorted(self.routes))}")
        allowed, handler = route
        if method != allowed and not (allowed == "GET" and method == "HEAD"):
            raise RequestError(405, f"use {allowed}", allowed=allowed) from None
        return handler(environ)

    # -- endpoints ------------------------------------------------------------------------------

    def healthz(self, environ: dict[str, Any]) -> Response:
        if self.broker_ok():
            return Response(200, {"status": "ok"})
        return Response(503, {"status": "broker unreachable"}, [("Retry-After", "5")])

    def twilio_status(self, environ: dict[str, Any]) -> Response:
        body = self.read_body(environ)
        content_type = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise RequestError(415, "Twilio callbacks are form posts")
        try:
            params = parse_qsl(
                body.decode("utf-8"),
                keep_blank_values=True,
                strict_parsing=False,
                max_num_fields=MAX_FORM_FIELDS,
            )
        except (UnicodeDecodeError, ValueError) as exc:
            raise RequestError(400, f"unreadable form: {exc}") from exc
        if not self.settings.twilio_auth_token:
            raise RequestError(403, "signature cannot be checked: CRM_TWILIO_AUTH_TOKEN is not set")
        signature = environ.get(SIGNATURE_HEADER, "")
        if not valid_twilio_signature(
            self.settings.twilio_auth_token, self.signed_url(environ), params, signature
        ):
            raise RequestError(403, "X-Twilio-Signature does not match")
        source = self.query(environ).get("source_system", "twilio")
        try:
            message = twilio_to_call(params, source_system=source)
        except AdapterError as exc:
            raise RequestError(400, exc.reason) from exc
        return self.enqueue([self.validated(message, 0)])

    def calls(self, environ: dict[str, Any]) -> Response:
        self.check_secret(environ)
        items = self.json_items(environ)
        return self.enqueue([self.validated(item, i) for i, item in enumerate(items)])

    def asterisk_cdr(self, environ: dict[str, Any]) -> Response:
        self.check_secret(environ)
        query = self.query(environ)
        zone = query.get("time_zone")
        if zone:
            try:
                ZoneInfo(zone)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise RequestError(400, f"unknown time_zone {zone[:64]!r}") from exc
        context = CdrContext(
            source_system=query.get("source_system", "asterisk"),
            own_numbers=self.settings.own_numbers,
            phone_region=self.settings.phone_region,
            time_zone=zone or None,
        )
        messages = []
        for index, item in enumerate(self.json_items(environ)):
            if not isinstance(item, dict):
                raise RequestError(400, "a CDR is a JSON object of the CSV columns", index=index)
            try:
                messages.append(self.validated(asterisk_cdr_to_call(item, context), index))
            except AdapterError as exc:
                raise RequestError(400, exc.reason, index=index) from exc
        return self.enqueue(messages)

    # -- pieces ---------------------------------------------------------------------------------

    def read_body(self, environ: dict[str, Any]) -> bytes:
        limit = self.settings.http_max_body_bytes
        length_text = environ.get("CONTENT_LENGTH") or ""
        stream = environ["wsgi.input"]
        if length_text:
            if not length_text.isdigit():
                raise RequestError(400, "malformed Content-Length")
            length = int(length_text)
            if length > limit:
                raise RequestError(413, f"the body is over {limit} bytes")
            body: bytes = stream.read(length)
        else:
            body = stream.read(limit + 1)
            if len(body) > limit:
                raise RequestError(413, f"the body is over {limit} bytes")
        return body

    def json_items(self, environ: dict[str, Any]) -> list[Any]:
        body = self.read_body(environ)
        content_type = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            raise RequestError(415, "send application/json")
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise RequestError(400, f"not JSON: {exc}") from exc
        items = document if isinstance(document, list) else [document]
        if not items:
            raise RequestError(400, "no messages")
        if len(items) > MAX_BATCH:
            raise RequestError(413, f"at most {MAX_BATCH} messages per request")
        return items

    def check_secret(self, environ: dict[str, Any]) -> None:
        expected = self.settings.webhook_secret
        given = environ.get(SECRET_HEADER, "")
        # Constant-time: the comparison does not reveal how much of a guess was right.
        if not expected or not hmac.compare_digest(
            given.encode("utf-8", "replace"), expected.encode("utf-8")
        ):
            raise RequestError(401, "X-CRM-Webhook-Secret missing or wrong")

    def signed_url(self, environ: dict[str, Any]) -> str:
        """The URL Twilio requested, as Twilio saw it: behind a proxy the public one."""
        query = environ.get("QUERY_STRING", "")
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        if self.settings.public_base_url:
            base = self.settings.public_base_url
        else:
            host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "")
            base = f"{environ.get('wsgi.url_scheme', 'http')}://{host}"
        return base + path + (f"?{query}" if query else "")

    @staticmethod
    def query(environ: dict[str, Any]) -> dict[str, str]:
        return dict(parse_qsl(environ.get("QUERY_STRING", ""), max_num_fields=20))

    @staticmethod
    def validated(message: Any, index: int) -> dict[str, Any]:
        """The message if it is a valid ``crm.call/1``; the sender learns at once otherwise."""
        try:
            load_message(CallMessageSchema(), message, SCHEMA)
        except MessageInvalid as exc:
            raise RequestError(400, exc.reason, index=index, errors=exc.errors) from exc
        assert isinstance(message, dict)
        return message

    def enqueue(self, messages: list[dict[str, Any]]) -> Response:
        try:
            task_ids = self.publish(messages)
        except Exception as exc:
            log.warning("publishing to the broker failed: %s", type(exc).__name__)
            raise RequestError(
                503, "the message could not be queued; try again", retry_after=5
            ) from exc
        return Response(200, {"enqueued": len(task_ids), "task_ids": task_ids})


# -- wiring -------------------------------------------------------------------------------------


class CeleryPublisher:
    """Publishes to ``crm.ingest.call`` through the Celery app; one publish at a time."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, messages: list[dict[str, Any]]) -> list[str]:
        task_ids = []
        with self.lock:
            for message in messages:
                task_id = str(uuid.uuid4())
                # send_task returns once the broker has the message (or raises).
                self.app.send_task(
                    CALL_TASK,
                    args=[message],
                    task_id=task_id,
                    queue=CALL_QUEUE,
                    retry=True,
                    retry_policy=PUBLISH_RETRY_POLICY,
                )
                task_ids.append(task_id)
        return task_ids

    def broker_ok(self) -> bool:
        try:
            with self.lock, self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0, timeout=3)
        except Exception:
            return False
        return True


def create_gateway_app(settings: Settings) -> TelephonyGateway:
    from workers.app import create_app

    app = create_app(settings)
    if not settings.embedded_broker:
        # Fail fast when Redis is unreachable: the sender gets a 503 and retries.
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            "socket_connect_timeout": 5,
            "socket_timeout": 5,
        }
    publisher = CeleryPublisher(app)
    return TelephonyGateway(settings, publisher, publisher.broker_ok)


def _channel_class() -> Any:
    """waitress's HTTP channel, answering ``Expect: 100-continue`` on a request without a body.

    waitress 3.0.2 sends ``100 Continue`` and then marks the request incomplete even when it
    already is (no body follows): it is never dispatched, and the client waits until
    ``channel_timeout`` closes the connection. A request complete before the ``100`` stays
    complete here, so it is answered at once.
    """
    from waitress.channel import HTTPChannel

    class Channel(HTTPChannel):
        def send_continue(self) -> None:
            completed = self.request.completed
            super().send_continue()
            if completed:
                self.request.completed = True

    return Channel


def serve(settings: Settings, host: str, port: int, threads: int) -> int:
    import waitress

    if not settings.twilio_auth_token:
        log.warning("CRM_TWILIO_AUTH_TOKEN is not set: /twilio/status refuses every request")
    if not settings.webhook_secret:
        log.warning("CRM_WEBHOOK_SECRET is not set: /calls and /asterisk/cdr refuse every request")
    gateway = create_gateway_app(settings)
    server = waitress.create_server(
        gateway,
        host=host,
        port=port,
        threads=threads,
        ident="crm-events",
        max_request_body_size=settings.http_max_body_bytes,
        max_request_header_size=64 * 1024,
        channel_timeout=30,
        connection_limit=200,
        clear_untrusted_proxy_headers=True,
        expose_tracebacks=False,
    )
    server.channel_class = _channel_class()

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(0)  # waitress finishes the requests in hand, then returns

    signal.signal(signal.SIGTERM, stop)
    effective = getattr(server, "effective_port", port)
    log.info("crm-events http-gateway listening on http://%s:%s", host, effective)
    server.run()
    return 0


def cmd_http_gateway(args: argparse.Namespace, runtime: Any) -> int:
    """``crm-events http-gateway``: serve the webhook gateway until SIGTERM or Ctrl-C."""
    return serve(runtime.settings, args.host, args.port, args.threads)
