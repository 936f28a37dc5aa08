"""``GET /v1/stream/sellers/{username}``: server-sent events, one each time the seller's view
changes, for screens (a browser cannot subscribe to Redis); ``/v1/stream/teams/{username}`` the
same for every seller whose manager that is (the board).

Each seller refresh publishes a notification on the Redis channel ``crm.seller.<username>``
(``tasks.refresh.publish_notification``); the stream passes each one on as an event ``view``
whose data is that notification. Without Redis (the embedded default) the stream watches the
seller's cards in the database instead, twice a second. The stream starts with an event
``ready`` (a client that reconnects reads the view again then: what changed while it was away
is in it) and keeps the connection open with a comment every 15 s.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from models.parties import Staff
from models.targets import SellerView
from tasks.views import staff_by_username
from workers.gateways.http.api import principal_for, service_of
from workers.gateways.http.limits import Problem

KEEPALIVE_S = 15.0
#: How often the embedded default looks at the seller's cards.
POLL_S = 0.5
#: What the browser waits before reconnecting (EventSource's ``retry``).
RETRY_MS = 2000


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def seller_stream(request: Request) -> StreamingResponse:
    await principal_for(request, "read")
    username = request.path_params["username"]
    return await stream_of(request, username, lambda staff: [staff])


async def team_stream(request: Request) -> StreamingResponse:
    """The manager's board: one stream for all the sellers whose manager they are."""
    await principal_for(request, "read")
    username = request.path_params["username"]
    return await stream_of(request, username, team_of)


def team_of(manager: Staff) -> list[Staff]:
    from sqlalchemy.orm import object_session

    session = object_session(manager)
    assert session is not None
    return list(
        session.scalars(select(Staff).where(Staff.manager_id == manager.id, Staff.active.is_(True)))
    )


async def stream_of(request: Request, username: str, whom: Any) -> StreamingResponse:
    service = service_of(request)

    def sellers() -> list[tuple[int, str]] | None:
        with service.sessions() as session:
            staff = staff_by_username(session, username)
            return None if staff is None else [(s.id, s.username) for s in whom(staff)]

    found = await run_in_threadpool(sellers)
    if found is None:
        raise Problem(404, f"no staff member {username[:40]!r}")
    url = service.settings.effective_redis_url
    changes = (
        redis_changes(url, [name for _, name in found])
        if url
        else polled_changes(service, dict(found))
    )

    async def allowed() -> bool:
        try:
            await principal_for(request, "read")
        except Problem:
            return False
        return True

    return StreamingResponse(
        events(changes, username, allowed),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def events(
    changes: AsyncIterator[Any], username: str, allowed: Callable[[], Awaitable[bool]]
) -> AsyncIterator[bytes]:
    """The stream's bytes; a change of None is a moment without one (a keep-alive comment).

    The token that opened the stream is asked again (``allowed``, one indexed read) before
    each event and keep-alive: once it is revoked (or the session has ended), the stream ends
    there, and the browser's reconnection meets the 401."""
    yield f"retry: {RETRY_MS}\n".encode() + sse("ready", {"seller": username})
    async for change in changes:
        if not await allowed():
            return
        yield b": keepalive\n\n" if change is None else sse("view", change)


async def redis_changes(url: str, usernames: list[str]) -> AsyncIterator[Any]:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    pubsub = client.pubsub()
    try:
        if not usernames:
            while True:  # no one to follow: keep the stream open, quietly
                await asyncio.sleep(KEEPALIVE_S)
                yield None
        await pubsub.subscribe(*(f"crm.seller.{name}" for name in usernames))
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=KEEPALIVE_S)
            if message is None:
                yield None
                continue
            try:
                yield json.loads(message["data"])
            except ValueError:
                continue
    finally:
        await pubsub.aclose()
        await client.aclose()


async def polled_changes(service: Any, sellers: dict[int, str]) -> AsyncIterator[Any]:
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
            if quiet >= KEEPALIVE_S:
                quiet = 0.0
                yield None


ROUTES = [
    Route("/v1/stream/sellers/{username:str}", seller_stream, methods=["GET"]),
    Route("/v1/stream/teams/{username:str}", team_stream, methods=["GET"]),
]
