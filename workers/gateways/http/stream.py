"""``GET /v1/stream/sellers/{username}``: server-sent events, one each time the seller's view
changes, for screens (a browser cannot subscribe to Redis).

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
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from models.targets import SellerCard
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
    service = service_of(request)
    username = request.path_params["username"]

    def seller_id() -> int | None:
        with service.sessions() as session:
            staff = staff_by_username(session, username)
            return staff.id if staff else None

    found = await run_in_threadpool(seller_id)
    if found is None:
        raise Problem(404, f"no staff member {username!r}")
    url = service.settings.effective_redis_url
    changes = redis_changes(url, username) if url else polled_changes(service, found, username)
    return StreamingResponse(
        events(changes, username),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def events(changes: AsyncIterator[Any], username: str) -> AsyncIterator[bytes]:
    """The stream's bytes; a change of None is a moment without one (a keep-alive comment)."""
    yield f"retry: {RETRY_MS}\n".encode() + sse("ready", {"seller": username})
    async for change in changes:
        yield b": keepalive\n\n" if change is None else sse("view", change)


async def redis_changes(url: str, username: str) -> AsyncIterator[Any]:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(f"crm.seller.{username}")
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


async def polled_changes(service: Any, seller_id: int, username: str) -> AsyncIterator[Any]:
    def latest() -> datetime | None:
        with service.sessions() as session:
            return session.scalar(
                select(func.max(SellerCard.computed_at)).where(SellerCard.seller_id == seller_id)
            )

    seen = await run_in_threadpool(latest)
    quiet = 0.0
    while True:
        await asyncio.sleep(POLL_S)
        current = await run_in_threadpool(latest)
        if current is not None and current != seen:
            seen, quiet = current, 0.0
            yield {"seller": username, "seller_id": seller_id, "computed_at": current.isoformat()}
        else:
            quiet += POLL_S
            if quiet >= KEEPALIVE_S:
                quiet = 0.0
                yield None


ROUTES = [Route("/v1/stream/sellers/{username:str}", seller_stream, methods=["GET"])]
