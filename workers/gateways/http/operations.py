"""For operators: ``/livez``, ``/healthz`` and ``/metrics`` (Prometheus text format).

The figures of the workers are read where they are kept, at each scrape: the outcome of every
message from the ledger (``delivery``), rejections and failures, what waits in each queue and
unacknowledged in the broker, the oldest refresh not yet done, the events waiting in triage and
the reports sent. So any replica answers the same, and no worker process has to serve anything.
The service's own requests are counted in this process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from config.queues import QUEUES
from models.base import utcnow
from models.events import CrmEvent
from models.ledger import Delivery, FailedMessage, RejectedMessage
from models.targets import RefreshRequest, ReportRun

access = logging.getLogger("crm.http.access")


def service_of(request: Request) -> Any:
    return request.app.state.service


class StoredFigures(Collector):
    """The workers' figures, read from the database and the broker at each scrape."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        service = self.service
        with service.sessions() as session:
            outcomes = CounterMetricFamily(
                "crm_messages",
                "Messages with a recorded outcome, by task and outcome (the delivery ledger)",
                labels=["task", "outcome"],
            )
            for task, outcome, count in session.execute(
                select(Delivery.task_name, Delivery.outcome, func.count()).group_by(
                    Delivery.task_name, Delivery.outcome
                )
            ):
                outcomes.add_metric([task, outcome], count)
            yield outcomes
            rejected = CounterMetricFamily(
                "crm_rejected_messages", "Messages rejected as bad input", labels=["replayed"]
            )
            for replayed, count in session.execute(
                select(RejectedMessage.replayed_at.is_not(None), func.count()).group_by(
                    RejectedMessage.replayed_at.is_not(None)
                )
            ):
                rejected.add_metric(["yes" if replayed else "no"], count)
            yield rejected
            failed = CounterMetricFamily(
                "crm_failed_messages", "Messages whose processing failed", labels=["kind"]
            )
            for kind, count in session.execute(
                select(FailedMessage.kind, func.count()).group_by(FailedMessage.kind)
            ):
                failed.add_metric([kind], count)
            yield failed
            unlinked = session.scalar(
                select(func.count())
                .select_from(CrmEvent)
                .where(CrmEvent.link_state.in_(("unlinked", "ambiguous")))
            )
            yield GaugeMetricFamily(
                "crm_unlinked_events", "Events waiting in triage (unlinked or ambiguous)", unlinked
            )
            oldest = session.scalar(select(func.min(RefreshRequest.requested_at)))
            age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
            yield GaugeMetricFamily(
                "crm_oldest_pending_refresh_seconds",
                "How long the oldest requested seller refresh has waited",
                max(age, 0.0),
            )
            reports = CounterMetricFamily(
                "crm_reports", "Target reports, by kind and state", labels=["kind", "state"]
            )
            for kind, state, count in session.execute(
                select(ReportRun.kind, ReportRun.state, func.count()).group_by(
                    ReportRun.kind, ReportRun.state
                )
            ):
                reports.add_metric([kind, state], count)
            yield reports
        yield from self.broker_figures()

    def broker_figures(self) -> Iterator[Any]:
        depth = GaugeMetricFamily(
            "crm_queue_messages", "Messages waiting in each queue", labels=["queue"]
        )
        unacked = GaugeMetricFamily(
            "crm_unacked_messages", "Messages taken by a worker and not yet acknowledged"
        )
        settings = self.service.settings
        if settings.embedded_broker:
            folder = settings.broker_folder / "queue"
            for queue in QUEUES:
                depth.add_metric([queue], len(list(folder.glob(f"*.{queue}.msg"))))
            yield depth
            return
        client = self.service.redis_client()
        if client is None:
            return
        pipe = client.pipeline(transaction=False)
        for queue in QUEUES:
            pipe.llen(queue)
        pipe.hlen("unacked")
        *lengths, held = pipe.execute()
        for queue, length in zip(QUEUES, lengths, strict=True):
            depth.add_metric([queue], length)
        unacked.add_metric([], held)
        yield depth
        yield unacked


class Instruments:
    """The HTTP service's own figures, and the registry that serves them with the stored ones."""

    def __init__(self, service: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "crm_http_requests",
            "Requests answered by this HTTP service process",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "crm_http_request_seconds",
            "Time to answer a request, by route",
            ["route"],
            registry=self.registry,
        )
        self.streams = Gauge(
            "crm_http_open_streams",
            "Event streams this HTTP service process holds open (the screens' live updates)",
            registry=self.registry,
        )
        self.streams.set_function(lambda: service.streams.total)
        self.registry.register(StoredFigures(service))


def logged_path(scope: Any) -> str:
    """The request's path for a log line, as the client sent it: percent-encoded, so that a
    decoded line break or NUL (/sellers/a%0Ab) cannot split the line or forge another; without
    the query (a kiosk's sign-in carries its token there); at most 200 characters."""
    raw = scope.get("raw_path")
    text = raw.decode("ascii", "backslashreplace") if raw else str(scope.get("path", ""))
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text[:200]


class Measure:
    """ASGI middleware counting every request by method, route template and status."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "(no route)"
            instruments = scope["app"].state.service.instruments
            instruments.requests.labels(scope["method"], template, str(status)).inc()
            instruments.latency.labels(template).observe(seconds)
            client = scope.get("client") or ("-", 0)
            access.info(
                '%s "%s %s" %d %.1f ms',
                client[0],
                scope["method"],
                logged_path(scope),
                status,
                seconds * 1000,
            )


async def healthz(request: Request) -> JSONResponse:
    service = service_of(request)

    def check() -> dict[str, str]:
        found = {}
        try:
            with service.sessions() as session:
                session.execute(text("SELECT 1"))
            found["database"] = "ok"
        except Exception as exc:
            found["database"] = f"unreachable: {type(exc).__name__}"
        found["broker"] = "ok" if service.publisher.broker_ok() else "unreachable"
        return found

    found = await run_in_threadpool(check)
    healthy = all(value == "ok" for value in found.values())
    return JSONResponse(
        {"status": "ok" if healthy else "unavailable", **found},
        status_code=200 if healthy else 503,
        headers={} if healthy else {"Retry-After": "5"},
    )


async def livez(request: Request) -> JSONResponse:
    """The process answers (no database, no broker): for a liveness probe."""
    return JSONResponse({"status": "alive"})


async def metrics(request: Request) -> Response:
    registry = service_of(request).instruments.registry
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


ROUTES = [
    Route("/livez", livez, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
