"""The baseline of every benchmark: a bare Celery worker with one no-op task.

Nothing of ours: a plain ``Celery()`` app on kombu's own Redis transport, Celery's own
consumer, no task events, no signal handlers, no logging setup; only the delivery settings the
crm-events worker uses (JSON, late acknowledgement, prefetch 1, results ignored), so whatever
the app's own no-op costs on top of this is the app's, and whatever the pipeline costs on top
of that is the pipeline's. The task ``bench.bare`` (queue ``bench.bare``) increments a Redis
counter, so a benchmark sees when every message has been processed.

    .venv/bin/python bench/bare_worker.py redis://127.0.0.1:6379/13 --concurrency 2

``bench/pipeline.py`` and ``bench/run.py`` start it for you.
"""

from __future__ import annotations

import os
import sys
from typing import Any

BARE_TASK = "bench.bare"
BARE_QUEUE = "bench.bare"

_redis_clients: dict[int, Any] = {}


def create_bare_app(broker_url: str) -> Any:
    import redis
    from celery import Celery
    from kombu import Queue

    app = Celery("bench_bare", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        task_queues=[Queue(BARE_QUEUE, routing_key=BARE_QUEUE)],
        task_default_queue=BARE_QUEUE,
    )

    @app.task(name=BARE_TASK)
    def bare(counter_key: str, payload: Any = None) -> None:
        # One Redis client per process: pool processes are forked from the worker.
        pid = os.getpid()
        if pid not in _redis_clients:
            _redis_clients[pid] = redis.Redis.from_url(broker_url, socket_timeout=10)
        _redis_clients[pid].incr(counter_key)

    return app


def main(argv: list[str]) -> int:
    if not argv or not argv[0].startswith("redis://"):
        print("usage: bare_worker.py REDIS_URL [celery worker options]", file=sys.stderr)
        return 2
    app = create_bare_app(argv[0])
    worker_argv = ["worker", "-Q", BARE_QUEUE, *argv[1:]]
    if not any(a.startswith(("-l", "--loglevel")) for a in argv):
        worker_argv += ["--loglevel", "WARNING"]
    app.worker_main(worker_argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
