"""The Celery app factory: queues, routes, JSON only (or signed), delivery settings (DESIGN §5, §8).

Nothing is created at import time; every process calls :func:`create_app` with its settings.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from config.queues import PARTY_QUEUE, QUEUES, TASK_QUEUES
from config.settings import Settings, soft_time_limit
from workers.beat import BEAT_SCHEDULE
from workers.exposure import POOL_ARGUMENTS_FILTER

#: The module that defines every task (imported by each process that builds the app).
TASK_MODULES = ("workers.pipeline",)


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    if settings.embedded_broker:
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            # The virtual transport polls; 1 s (the default) would dominate the latency.
            "polling_interval": 0.05,
        }
    return {
        # Must exceed the longest task plus its longest retry backoff, or Redis redelivers a
        # message that is still being worked on (checked by config.load_settings).
        "visibility_timeout": settings.visibility_timeout_s,
    }


def named_queue(name: str) -> Queue:
    """A queue as the workers declare it: bound to a direct exchange of its own name, with its
    name as the routing key, which is what a producer gets from ``send_task(..., queue=NAME)``
    in any language (docs/messages.md). Without an exchange of its own, a queue would be bound
    to the default queue's exchange.
    """
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def create_app(settings: Settings, *, tasks: bool = True) -> Celery:
    """The app of a worker, beat or the HTTP service; with ``tasks=False``, an app that only
    sends messages by task name (the commands that publish), without importing the tasks, the
    stages and what they need: an import then starts publishing about half a second sooner,
    while the workers wait for its first batch."""
    # Messages show their kind, source and ids, never their contents (workers/exposure.py).
    app = Celery("crm_events", set_as_current=True, amqp="workers.exposure:SummarisingAMQP")
    logging.getLogger("celery.pool").addFilter(POOL_ARGUMENTS_FILTER)
    app.conf.update(
        broker_url=settings.effective_broker_url,
        # The embedded broker is kombu's filesystem transport with atomic writes (broker_fs);
        # redis:// gets kombu's Redis transport surviving a broker restart (broker_redis).
        broker_transport="workers.transport.broker_fs:Transport"
        if settings.embedded_broker
        else "workers.transport.broker_redis:Transport"
        if settings.effective_broker_url.startswith("redis://")
        else None,
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=soft_time_limit(settings.task_time_limit_s),
        task_queues=[named_queue(name) for name in QUEUES],
        task_default_queue=PARTY_QUEUE,
        task_routes={
            name: {"queue": queue, "routing_key": queue} for name, queue in TASK_QUEUES.items()
        },
        task_create_missing_queues=False,
        # Checks every message, and records every one the worker refuses (another content type,
        # an undecodable body, an unknown task, an envelope it does not take) as a
        # rejected_message before acknowledging it (workers/transport/consumer.py).
        worker_consumer="workers.transport.consumer:RecordingConsumer",
        worker_concurrency=settings.worker_concurrency,
        worker_hijack_root_logger=False,
        # Task events cost a worker about half a millisecond of CPU per message (bench/README.md):
        # on demand, a worker sends them once a monitor asks (Flower does while it runs).
        worker_send_task_events=settings.task_events == "always" and not settings.embedded_broker,
        task_send_sent_event=settings.task_events == "always" and not settings.embedded_broker,
        timezone=settings.time_zone,
        enable_utc=True,
        beat_schedule=BEAT_SCHEDULE,
        beat_schedule_filename=str((settings.data_dir / "celerybeat-schedule").resolve()),
    )
    app.conf.crm_settings = settings
    if settings.signing_enabled:
        from workers.transport.signing import configure_signing

        configure_signing(app, settings)
    if tasks:
        for module in TASK_MODULES:
            __import__(module)
    app.finalize()
    return app
