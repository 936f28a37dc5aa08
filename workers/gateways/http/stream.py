"""``GET /v1/stream/sellers/{username}``: server-sent events, one each time the seller's view
changes, for screens (a browser cannot subscribe to Redis); ``/v1/stream/teams/{username}`` the
same for every seller whose manager that is (the board).

Each seller refresh publishes a notification on the Redis channel ``crm.seller.<username>``
(``tasks.refresh.publish_notification``); the stream passes each one on as an event ``view``
whose data is that notification. Without Redis (the embedded default) the stream watches the
seller's cards in the database instead, twice a second. The stream starts with an event
``ready`` (a client that reconnects reads the view again then: what changed while it was away
is in it) and keeps the connection open with a comment every 15 s.

Streams are held, so they are counted: one process keeps at most ``CRM_HTTP_MAX_STREAMS`` open
(503 above it, leaving the rest of its connections to the API) and at most
``CRM_HTTP_STREAMS_PER_TOKEN`` of one token or its browser sessions (429 above it). A stream
ends after ``CRM_HTTP_STREAM_LIFETIME_S``; the browser reconnects after ``retry`` and its token
is asked again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from models.parties import Staff
from models.targets import SellerView
from tasks.views import staff_by_username
from workers.gateways.http.api import principal_for, service_of
from workers.gateways.http.limits import Problem
from workers.gateways.http.operations import logged_path

log = logging.getLogger("crm.http")

KEEPALIVE_S = 15.0
#: How long a source of changes waits at most before it looks whether its stream has ended.
STEP_S = 1.0
#: How often the embedded default looks at the seller's cards.
POLL_S = 0.5
#: What the browser waits before reconnecting (EventSource's ``retry``).
RETRY_MS = 2000
#: What a refused stream's ``Retry-After`` says.
REFUSED_RETRY_S = 30
STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


class OpenStreams:
    """The streams one process holds, in all and by token (only the event loop touches it)."""

    def __init__(self) -> None:
        self.total = 0
        self.by_token: Counter[int] = Counter()

    def take(self, token_id: int, settings: Any) -> Callable[[], None]:
        """Count a stream of ``token_id``, or refuse it; the callable lets it go (once)."""
        if self.total >= settings.http_max_streams:
            raise _refused(
                503, "the service holds as many event streams as it may; try again later"
            )
        if self.by_token[token_id] >= settings.http_streams_per_token:
            raise _refused(
                429,
                f"this token has {self.by_token[token_id]} event streams open already, as many "
                "as one token may: close one (a screen's tab) or try again later",
            )
        self.total += 1
        self.by_token[token_id] += 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.total -= 1
                self.by_token[token_id] -= 1
                if not self.by_token[token_id]:
                    del self.by_token[token_id]

        return release


def _refused(status: int, error: str) -> Problem:
    problem = Problem(status, error)
    problem.headers["Retry-After"] = str(REFUSED_RETRY_S)
    return problem


class HeldStream(StreamingResponse):
    """A stream that lets its count go when it ends, however it ends (finished, the client gone,
    or never started)."""

    def __init__(
        self, content: AsyncIterator[bytes], release: Callable[[], None], send_within_s: float
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=STREAM_HEADERS)
        self.release = release
        self.send_within_s = send_within_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            # A client that stops reading blocks the write once the buffers are full, and the
            # stream would never reach its lifetime's end or its next check of the token.
            await asyncio.wait_for(send(message), self.send_within_s)

        try:
            await super().__call__(scope, receive, sending)
        except TimeoutError:
            # The connection is closed (the server says the answer was left unfinished).
            log.info("%s: the client read nothing for %.0f s; its stream ends",
                     logged_path(scope), self.send_within_s)  # fmt: skip
        finally:
            self.release()


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def seller_stream(request: Request) -> Response:
    principal = await principal_for(request, "read")
    username = request.path_params["username"]
    return await stream_of(request, principal.token_id, username, lambda staff: [staff])


async def team_stream(request: Request) -> Response:
    """The manager's board: one stream for all the sellers whose manager they are."""
    principal = await principal_for(request, "read")
    username = request.path_params["username"]
    return await stream_of(request, principal.token_id, username, team_of)


def team_of(manager: Staff) -> list[Staff]:
    from sqlalchemy.orm import object_session

    session = object_session(manager)
    assert session is not None
    return list(
        session.scalars(select(Staff).where(Staff.manager_id == manager.id, Staff.active.is_(True)))
    )


async def stream_of(request: Request, token_id: int, username: str, whom: Any) -> Response:
    service = service_of(request)

    def sellers() -> list[tuple[int, str]] | None:
        with service.sessions() as session:
            staff = staff_by_username(session, username)
            return None if staff is None else [(s.id, s.username) for s in whom(staff)]

    found = await run_in_threadpool(sellers)
    if found is None:
        raise Problem(404, f"no staff member {username[:40]!r}")
    if request.method == "HEAD":
        # Its headers alone: no stream to hold (a HEAD's body is never written, so a client
        # gone would not be noticed and its place would be held for the stream's lifetime).
        return Response(media_type="text/event-stream", headers=STREAM_HEADERS)
    release = service.streams.take(token_id, service.settings)
    loop = asyncio.get_running_loop()
    until = loop.time() + service.settings.http_stream_lifetime_s

    def ended() -> bool:
        """Past the stream's lifetime, or the service is stopping (SIGTERM): each source of
        changes says so within STEP_S (a moment without a change, None), and it ends there."""
        return service.stopping or loop.time() >= until

    url = service.settings.effective_redis_url
    changes = (
        redis_changes(url, [name for _, name in found], ended)
        if url
        else polled_changes(service, dict(found), ended)
    )

    async def allowed() -> bool:
        try:
            await principal_for(request, "read")
        except Problem:
            return False
        return True

    send_within_s = float(service.settings.http_request_deadline_s)
    return HeldStream(events(changes, username, allowed, ended), release, send_within_s)


async def events(
    changes: AsyncGenerator[Any, None],
    username: str,
    allowed: Callable[[], Awaitable[bool]],
    ended: Callable[[], bool],
) -> AsyncIterator[bytes]:
    """The stream's bytes; a change of None is a moment without one (a keep-alive comment).

    The token that opened the stream is asked again (``allowed``, one indexed read) before
    each event and keep-alive: once it is revoked (or the session has ended), the stream ends
    there, and the browser's reconnection meets the 401. When ``ended()`` it ends too."""
    try:
        yield f"retry: {RETRY_MS}\n".encode() + sse("ready", {"seller": username})
        async for change in changes:
            if ended() or not await allowed():
                return
            yield b": keepalive\n\n" if change is None else sse("view", change)
    finally:
        await changes.aclose()


async def redis_changes(
    url: str, usernames: list[str], ended: Callable[[], bool]
) -> AsyncGenerator[Any, None]:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    pubsub = client.pubsub()
    quiet = 0.0
    try:
        if usernames:
            await pubsub.subscribe(*(f"crm.seller.{name}" for name in usernames))
        while True:
            message = None
            if usernames:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=STEP_S)
            else:
                await asyncio.sleep(STEP_S)  # no one to follow: keep the stream open, quietly
            if message is not None:
                quiet = 0.0
                try:
                    yield json.loads(message["data"])
                except ValueError:
                    continue
                continue
            quiet += STEP_S
            if quiet >= KEEPALIVE_S or ended():
                quiet = 0.0
                yield None
    finally:
        await pubsub.aclose()
        await client.aclose()


async def polled_changes(
    service: Any, sellers: dict[int, str], ended: Callable[[], bool]
) -> AsyncGenerator[Any, None]:
    """Without Redis: each seller's latest refresh, looked up twice a second."""

    def latest() -> dict[int, datetime]:
        if not sellers:
            return {}
        with service.sessions() as session:
            return dict(
                session.execute(
                    select(SellerView.seller_id, SellerView.refreshed_at).where(
                        SellerView.seller_id.in_(list(sellers))
                    )
                ).all()
            )

    seen = await run_in_threadpool(latest)
    quiet = 0.0
    while True:
        await asyncio.sleep(POLL_S)
        current = await run_in_threadpool(latest)
        changed = [s for s, moment in current.items() if seen.get(s) != moment]
        seen = current
        for seller_id in changed:
            quiet = 0.0
            yield {
                "seller": sellers[seller_id],
                "seller_id": seller_id,
                "refreshed_at": current[seller_id].isoformat(),
            }
        if not changed:
            quiet += POLL_S
            if quiet >= KEEPALIVE_S or ended():
                quiet = 0.0
                yield None


ROUTES = [
    Route("/v1/stream/sellers/{username:name}", seller_stream, methods=["GET"]),
    Route("/v1/stream/teams/{username:name}", team_stream, methods=["GET"]),
]
