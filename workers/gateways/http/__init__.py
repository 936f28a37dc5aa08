"""The HTTP service (DESIGN §11): producers post messages, readers read, operators scrape.

``crm-events serve [--host 127.0.0.1] [--port 8080]`` runs one Starlette application under
uvicorn. It is stateless: any number of replicas can run behind a load balancer (browser sessions
are signed with a key the replicas share through the database). What it serves:

- the telephony webhooks of the first gateway, on their paths (``webhooks``);
- the /v1 API for producers and readers (``api``), and the seller's stream (``stream``);
- ``/openapi.json`` and ``/docs`` (``openapi``), ``/healthz`` and ``/metrics`` (``operations``);
- ``/login`` for browsers (``pages``).

Every request has a total deadline and a body limit (``limits``); every error is JSON with a
reason, never a traceback. Blocking work (the database, the broker) runs in worker threads.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote, unquote

from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Match, Mount
from starlette.staticfiles import StaticFiles

from config.settings import Settings
from models.db import create_db_engine, create_session_factory
from models.invalid import BadInput
from workers.gateways.http import api, openapi, operations, pages, screens, stream, webhooks
from workers.gateways.http.auth import Sessions
from workers.gateways.http.limits import DeadlineProtocol, Problem
from workers.gateways.http.operations import Instruments, Measure, logged_path
from workers.gateways.http.publisher import Publisher

log = logging.getLogger("crm.http")

#: Connections served at once; more are answered 503 until one closes.
MAX_CONNECTIONS = 1000


class Service:
    """What every request of one process shares: settings, database, broker, keys, figures."""

    def __init__(self, settings: Settings, celery_app: Any | None = None) -> None:
        from workers.app import create_app

        self.settings = settings
        self.engine = create_db_engine(settings)
        self.sessions: sessionmaker[Session] = create_session_factory(
            self.engine, settings.count_internal_calls
        )
        self.celery = celery_app or create_app(settings)
        if not settings.embedded_broker:
            # Fail fast when Redis is unreachable: the sender gets a 503 and retries.
            self.celery.conf.broker_transport_options = {
                **self.celery.conf.broker_transport_options,
                "socket_connect_timeout": 5,
                "socket_timeout": 5,
            }
        self.publisher = Publisher(self.celery)
        self.browser_sessions = Sessions(self)
        self.templates = pages.environment()
        self.instruments = Instruments(self)
        self.streams = stream.OpenStreams()
        #: Set when the process is told to stop (SIGTERM, Ctrl-C): open streams end then, and
        #: the requests in hand are finished.
        self.stopping = False
        self._redis: Any = None

    def redis_client(self) -> Any:
        url = self.settings.effective_redis_url
        if not url:
            return None
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(url, socket_timeout=5)
        return self._redis

    def close(self) -> None:
        self.engine.dispose()
        if self._redis is not None:
            self._redis.close()


async def problem_answer(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return JSONResponse(exc.document, status_code=exc.status, headers=exc.headers)


async def bad_input_answer(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadInput)
    return JSONResponse({"error": exc.reason, "errors": exc.errors}, status_code=400)


async def http_answer(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404 and (found := without_slash(request)) is not None:
        return RedirectResponse(found, status_code=307)
    reasons = {404: "no such endpoint (see /docs)", 405: "method not allowed here"}
    document = {"error": reasons.get(exc.status_code, str(exc.detail))}
    return JSONResponse(document, status_code=exc.status_code, headers=exc.headers)


def without_slash(request: Request) -> str | None:
    """``/board/`` is ``/board``: the address without its trailing slashes, if a route has it.

    Relative (the path and query alone), where Starlette's own redirect names the host the
    client's Host header gave: a cache in front would keep and serve that to everyone."""
    path = request.scope["path"]
    bare = path.rstrip("/")
    if not bare or bare == path:
        return None
    scope = {**request.scope, "path": bare}
    if not any(route.matches(scope)[0] is not Match.NONE for route in request.app.router.routes):
        return None
    raw = request.scope.get("raw_path")  # as the client encoded it
    location = raw.rstrip(b"/").decode("latin-1") if raw else quote(bare)
    if location.startswith("//") or unquote(location) != bare:
        return None  # another host, to a browser; or an encoded slash ("%2F") that stays
    query = request.scope.get("query_string", b"").decode("latin-1")
    return f"{location}?{query}" if query else location


async def gone_answer(request: Request, exc: Exception) -> Response:
    """The client left, or its body did not arrive in time (``DeadlineProtocol``), while the
    body was read: nothing can be answered, and it is not the service's failure."""
    log.info("%s %s: the client went away before its body arrived", request.method,
             logged_path(request.scope))  # fmt: skip
    return JSONResponse({"error": "the request did not arrive whole"}, status_code=408)


async def error_answer(request: Request, exc: Exception) -> Response:
    # The traceback goes to the log; it names code, never the request's contents.
    log.error("%s %s failed", request.method, logged_path(request.scope), exc_info=exc)
    return JSONResponse({"error": "internal error"}, status_code=500)


def create_service(settings: Settings, celery_app: Any | None = None) -> Starlette:
    service = Service(settings, celery_app)
    routes = [
        *webhooks.ROUTES,
        *api.ROUTES,
        *stream.ROUTES,
        *operations.ROUTES,
        *openapi.ROUTES,
        *pages.ROUTES,
        *screens.ROUTES,
        Mount("/static", StaticFiles(packages=[("workers.gateways.http", "static")])),
    ]
    application = Starlette(
        routes=routes,
        middleware=[Middleware(Measure)],
        exception_handlers={
            Problem: problem_answer,
            BadInput: bad_input_answer,
            HTTPException: http_answer,
            ClientDisconnect: gone_answer,
            Exception: error_answer,
        },
    )
    application.router.redirect_slashes = False  # relative, by http_answer instead
    application.state.service = service
    return application


class CannotListen(Exception):
    """The address given to serve on is not one this host can listen on."""


def serve(settings: Settings, host: str, port: int) -> int:
    """Serve until SIGTERM or Ctrl-C (the requests in hand are finished first)."""
    import socket

    import uvicorn

    if not settings.twilio_auth_token:
        log.warning("CRM_TWILIO_AUTH_TOKEN is not set: /twilio/status refuses every request")
    if not settings.webhook_secret:
        log.warning("CRM_WEBHOOK_SECRET is not set: /calls and /asterisk/cdr refuse every request")
    application = create_service(settings)

    class Protocol(DeadlineProtocol):
        deadline_s = float(settings.http_request_deadline_s)

    config = uvicorn.Config(
        application,
        host=host,
        port=port,
        http=Protocol,
        lifespan="off",
        limit_concurrency=MAX_CONNECTIONS,
        timeout_keep_alive=5,
        server_header=False,
        proxy_headers=False,
        log_config=None,
        access_log=False,  # logged by Measure, without query strings
    )
    service = application.state.service

    class Server(uvicorn.Server):
        """SIGTERM and SIGINT: finish what is in hand, end the event streams, then stop."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            service.stopping = True
            super().handle_exit(sig, frame)

    server = Server(config)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so, and without it a
    # kept-alive connection waits 40 ms for each answer (Nagle's algorithm, a delayed ACK).
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:  # an unknown host name, an address in use or not this host's
        listener.close()
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    listener.listen(2048)  # connections wait in the backlog until the server serves them
    bound = listener.getsockname()[1]  # port 0 picks a free one
    log.info("crm-events serve listening on http://%s:%s", host, bound)
    try:
        server.run(sockets=[listener])
    finally:
        application.state.service.close()
    return 0
