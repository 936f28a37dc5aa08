"""The /v1 API: producers post messages, readers read events, documents, histories, views.

Producers (scope ``ingest``): ``POST /v1/calls|visits|parties|targets|emails`` takes one message
or a JSON list of them (an email also as ``message/rfc822``), validates every one with the
worker's own schemas (``models.schemas.kinds``) before anything is enqueued (a list is
all-or-nothing) and answers 202 ``{"accepted": n, "task_ids": [...]}`` once the broker has them,
503 when it has not.

Readers (scope ``read``) answer from the same query functions as the command line: the events
search (``tasks.search``), an event (``tasks.views``), a customer's history (``tasks.history``),
a seller's cards for any period and the targets' progress (``tasks.views``). A document is
streamed from the document store with its media type and a ``Content-Disposition`` built from
its sanitised name.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from config.queues import INGEST_TASKS
from models.base import utcnow
from models.db import snapshot
from models.documents import DocumentBlob, EventDocument
from models.events import CrmEvent, EventParticipant, FollowUp
from models.invalid import BadInput
from models.limits import MAX_ROW_ID
from models.parties import Customer, Staff
from models.schemas.common import MessageInvalid
from models.schemas.kinds import MESSAGE_KINDS
from tasks.attach import blob_chunks, store_blob
from tasks.history import customer_history
from tasks.periods import validate_period, view_moment
from tasks.search import MAX_LIMIT, filters_from, search_events
from tasks.views import events_json, seller_cards, staff_by_username, targets_progress, zone_of
from tasks.work import task_rows
from workers.gateways.http.auth import COOKIE, bearer, identify, require
from workers.gateways.http.limits import Problem, media_type, parse_json, read_body
from workers.gateways.http.publisher import BrokerUnavailable
from workers.publish import email_message_from_raw

#: Every document served, with the token that asked for it (docs/security.md).
downloads = logging.getLogger("crm.http.downloads")

#: The path of each kind: ``/v1/calls`` takes ``crm.call/1``.
PLURALS = {
    "calls": "call",
    "visits": "visit",
    "parties": "party",
    "targets": "target",
    "emails": "email",
    "documents": "document",
    "tasks": "task",
}
#: Messages in one post; a larger batch is split by the sender.
MAX_BATCH = 1000


def service_of(request: Request) -> Any:
    return request.app.state.service


async def principal_for(request: Request, action: str) -> Any:
    principal = await run_in_threadpool(identify, service_of(request), request)
    return require(principal, action)


# -- producers -----------------------------------------------------------------------------------


def producer(kind: str) -> Any:
    async def endpoint(request: Request) -> JSONResponse:
        return await post_messages(request, kind)

    endpoint.__name__ = f"post_{kind}"
    return endpoint


async def post_messages(request: Request, kind: str) -> JSONResponse:
    if bearer(request) is None and COOKIE in request.cookies:
        # A browser's session cookie rides along on another site's request too; no page of
        # ours posts messages, so only a token that the sender itself holds may.
        raise Problem(403, "messages are posted with a token (Authorization: Bearer), not a "
                      "browser's session")  # fmt: skip
    await principal_for(request, "ingest")
    service = service_of(request)
    settings = service.settings
    if kind == "email" and media_type(request) == "message/rfc822":
        raw = await read_body(request, settings.max_email_bytes)
        if not raw:
            raise Problem(400, "an empty message")
        messages = [await run_in_threadpool(wrap_raw_email, service, raw)]
    else:
        body = await read_body(request, settings.http_max_body_bytes)
        if media_type(request) != "application/json":
            accepted = "application/json" + (" or message/rfc822" if kind == "email" else "")
            raise Problem(415, f"send {accepted}")
        document = parse_json(body)
        messages = document if isinstance(document, list) else [document]
        if not messages:
            raise Problem(400, "no messages")
        if len(messages) > MAX_BATCH:
            raise Problem(413, f"at most {MAX_BATCH} messages per request")
    load = MESSAGE_KINDS[kind].load
    for index, message in enumerate(messages):
        try:
            load(message)
        except MessageInvalid as exc:
            raise Problem(400, exc.reason, index=index, errors=exc.errors) from exc
    try:
        task_ids = await run_in_threadpool(service.publisher.publish, INGEST_TASKS[kind], messages)
    except BrokerUnavailable as exc:
        problem = Problem(503, "the broker did not take the messages; try again", queued=exc.queued)
        problem.headers["Retry-After"] = "5"
        raise problem from exc
    return JSONResponse({"accepted": len(task_ids), "task_ids": task_ids}, status_code=202)


def wrap_raw_email(service: Any, raw: bytes) -> dict[str, Any]:
    """A raw message as ``crm.email/1``: inline, or stored first and sent by reference when it
    is over ``CRM_EMAIL_INLINE_MAX_BYTES`` (as the SMTP gateway does)."""
    settings = service.settings
    message = email_message_from_raw(raw, settings, source_system="http")
    message["received_at"] = utcnow().isoformat()
    if len(raw) > settings.email_inline_max_bytes:
        with service.sessions.begin() as session:
            message["raw_ref"] = store_blob(session, settings, raw, "message/rfc822")
        del message["raw_b64"]
    return message


# -- readers -------------------------------------------------------------------------------------


async def list_events(request: Request) -> JSONResponse:
    await principal_for(request, "read")
    arguments = dict(request.query_params)
    try:
        limit = int(arguments.pop("limit", "100"))
    except ValueError:
        raise Problem(400, "limit is a whole number") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise Problem(400, f"limit must be from 1 to {MAX_LIMIT}")
    cursor = arguments.pop("cursor", None)
    if "class" in arguments:
        arguments["class_"] = arguments.pop("class")
    unknown = sorted(set(arguments) - set(filters_from({}).names()))
    if unknown:
        raise Problem(400, f"unknown filters: {', '.join(unknown)}")
    service = service_of(request)

    def page() -> dict[str, Any]:
        filters = filters_from(arguments)
        with service.sessions() as session:
            found = search_events(
                session, filters, service.settings.zone, limit=limit, cursor=cursor
            )
            events = events_json(session, found.events, service.settings.zone)
        return {"events": events, "next": found.next}

    return JSONResponse(await run_in_threadpool(page))


async def get_event(request: Request) -> JSONResponse:
    await principal_for(request, "read")
    service = service_of(request)
    event_id = request.path_params["event_id"]
    if event_id > MAX_ROW_ID:
        raise Problem(404, f"no event {event_id}")

    def load() -> dict[str, Any] | None:
        with service.sessions() as session:
            event = session.get(CrmEvent, event_id)
            if event is None:
                return None
            [document] = events_json(session, [event], service.settings.zone)
            document["participants"] = [
                username
                for (username,) in session.execute(
                    select(Staff.username)
                    .join(EventParticipant, EventParticipant.staff_id == Staff.id)
                    .where(EventParticipant.event_id == event_id)
                    .order_by(Staff.username)
                )
            ]
            document["follow_ups"] = [
                {
                    "state": f.state,
                    "reason": f.reason,
                    "created_at": f.created_at.astimezone(service.settings.zone).isoformat(),
                    "closed_at": f.closed_at.astimezone(service.settings.zone).isoformat()
                    if f.closed_at
                    else None,
                }
                for f in session.scalars(
                    select(FollowUp).where(FollowUp.event_id == event_id).order_by(FollowUp.id)
                )
            ]
            return document

    document = await run_in_threadpool(load)
    if document is None:
        raise Problem(404, f"no event {event_id}")
    return JSONResponse(document)


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII name any client shows and the exact name (RFC 6266, 5987).

    The name is already sanitised (no path, no control characters); the ASCII form also drops
    quotes and backslashes, so no header can be injected and no path can be named.
    """
    fallback = (
        "".join(c if 32 <= ord(c) < 127 and c not in '"\\;' else "_" for c in filename).strip()
        or "document"
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


async def get_document(request: Request) -> Response:
    principal = await principal_for(request, "read")
    service = service_of(request)
    event_id = request.path_params["event_id"]
    document_id = request.path_params["document_id"]
    if max(event_id, document_id) > MAX_ROW_ID:
        raise Problem(404, f"event {event_id} has no stored document {document_id}")

    def find() -> tuple[EventDocument, DocumentBlob] | None:
        with service.sessions() as session:
            row = session.execute(
                select(EventDocument, DocumentBlob)
                .join(DocumentBlob, DocumentBlob.sha256 == EventDocument.sha256)
                .where(EventDocument.id == document_id, EventDocument.event_id == event_id)
            ).first()
            if row is None:
                return None
            session.expunge_all()
            return row[0], row[1]

    found = await run_in_threadpool(find)
    if found is None:
        raise Problem(404, f"event {event_id} has no stored document {document_id}")
    document, blob = found
    # Who read whose document, for a person's access request or an audit: by ids, not names.
    downloads.info(
        "document %s (sha256 %s…) of event %s downloaded by token %r (staff %s)",
        document.id,
        blob.sha256[:12],
        event_id,
        principal.name,
        principal.staff or "-",
    )
    headers = {
        "Content-Disposition": content_disposition(document.filename),
        "X-Content-Type-Options": "nosniff",
        # Opened in a browser anyway, a document can run nothing and reach nothing.
        "Content-Security-Policy": "sandbox; default-src 'none'",
        "Cache-Control": "private, max-age=3600",
    }
    if blob.stored_in == "filesystem":
        path = service.settings.effective_document_dir / blob.sha256[:2] / blob.sha256
        return FileResponse(path, media_type=document.media_type, headers=headers)
    headers["Content-Length"] = str(blob.size)
    return StreamingResponse(
        blob_chunks(service.sessions, service.settings, blob.sha256, blob.size),
        media_type=document.media_type,
        headers=headers,
    )


async def get_history(request: Request) -> JSONResponse:
    await principal_for(request, "read")
    service = service_of(request)
    number = request.path_params["number"]

    def load() -> dict[str, Any] | None:
        with service.sessions() as session:
            customer = session.scalar(select(Customer).where(Customer.customer_number == number))
            if customer is None:
                return None
            return customer_history(session, customer, service.settings.zone)

    history = await run_in_threadpool(load)
    if history is None:
        raise Problem(404, f"no customer {number[:40]}")
    return JSONResponse(history)


def moment_of(period: str | None, zone: Any) -> Any:
    """The moment a view is computed at (``tasks.periods.view_moment``); 400 for a bad period."""
    try:
        return view_moment(period, zone)
    except ValueError as exc:
        raise BadInput(f"not a period {(period or '')[:20]!r} ({exc})") from exc


async def get_seller_view(request: Request) -> JSONResponse:
    await principal_for(request, "read")
    service = service_of(request)
    username = request.path_params["username"]
    period = request.query_params.get("period")

    def load() -> list[dict[str, Any]] | None:
        with snapshot(service.sessions) as session:
            staff = staff_by_username(session, username)
            if staff is None:
                return None
            moment = moment_of(period, zone_of(staff))
            return seller_cards(session, staff, now=moment, cards=service.settings.seller_cards)

    cards = await run_in_threadpool(load)
    if cards is None:
        raise Problem(404, f"no staff member {username[:40]!r}")
    return JSONResponse(cards)


async def get_targets_progress(request: Request) -> JSONResponse:
    await principal_for(request, "read")
    service = service_of(request)
    seller = request.query_params.get("seller")
    period = request.query_params.get("period")
    if period:
        try:
            validate_period(period)
        except ValueError as exc:
            raise Problem(400, f"not a period {period[:20]!r} ({exc})") from exc

    def load() -> list[dict[str, Any]]:
        with service.sessions() as session:
            return targets_progress(session, seller=seller, period=period)

    return JSONResponse(await run_in_threadpool(load))


async def get_tasks(request: Request) -> JSONResponse:
    await principal_for(request, "read")
    service = service_of(request)
    assignee = request.query_params.get("assignee")
    state = request.query_params.get("state") or "open"
    if state not in ("open", "done", "all"):
        raise Problem(400, f"state is open, done or all, not {state[:20]!r}")

    def load() -> list[dict[str, Any]]:
        with service.sessions() as session:
            return task_rows(session, assignee=assignee, state=state)

    return JSONResponse(await run_in_threadpool(load))


async def tasks_endpoint(request: Request) -> Response:
    """``/v1/tasks``: the list (GET) and new work tasks (POST) are one route, so that a method
    neither takes is answered 405 with both in ``Allow``."""
    if request.method == "POST":
        return await post_messages(request, PLURALS["tasks"])
    return await get_tasks(request)


ROUTES = [
    *(
        Route(f"/v1/{plural}", producer(kind), methods=["POST"])
        for plural, kind in PLURALS.items()
        if plural != "tasks"
    ),
    Route("/v1/tasks", tasks_endpoint, methods=["GET", "POST"]),
    Route("/v1/events", list_events, methods=["GET"]),
    Route("/v1/events/{event_id:id}", get_event, methods=["GET"]),
    Route("/v1/events/{event_id:id}/documents/{document_id:id}", get_document, methods=["GET"]),
    Route("/v1/customers/{number:name}/history", get_history, methods=["GET"]),
    Route("/v1/sellers/{username:name}/view", get_seller_view, methods=["GET"]),
    Route("/v1/targets/progress", get_targets_progress, methods=["GET"]),
]
