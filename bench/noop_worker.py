"""A baseline worker: the crm-events Celery app plus one no-op task on a queue of its own.

The app is built exactly as ``crm-events worker`` builds it (``workers.app.create_app`` with the
settings of the ``CRM_*`` environment: broker, JSON only, late acks, prefetch 1, …). One task is
added: ``bench.noop``, routed to queue ``bench.noop``, which only increments a Redis counter so
that a benchmark can see when every message has been processed. Whatever the pipeline costs on
top of this worker is the work of the pipeline itself.

Run it like ``crm-events worker`` (same ``CRM_*`` variables); further options go to Celery::

    CRM_BROKER_URL=redis://127.0.0.1:6379/13 CRM_DATABASE_URL=... \\
        .venv/bin/python bench/noop_worker.py --concurrency 2

``bench/pipeline.py`` starts it for you.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

# Run as a script, Python puts bench/ first on sys.path, where a script could shadow a standard
# module or a dependency's: bench/ goes last (as in the other scripts; ``python -P`` leaves it
# off).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [*(p for p in sys.path if Path(p or ".").resolve() != _HERE), str(_HERE)]

NOOP_TASK = "bench.noop"
NOOP_QUEUE = "bench.noop"

_redis_clients: dict[int, Any] = {}


def _redis(url: str) -> Any:
    """One Redis client per process (pool processes are forked from the worker)."""
    import redis

    pid = os.getpid()
    if pid not in _redis_clients:
        _redis_clients[pid] = redis.Redis.from_url(url, socket_timeout=10)
    return _redis_clients[pid]


def create_noop_app(settings: Any) -> Any:
    """``workers.app.create_app(settings)`` plus the ``bench.noop`` task and queue."""
    from kombu import Queue

    from workers.app import create_app

    app = create_app(settings)
    app.conf.task_queues = [
        *app.conf.task_queues,
        Queue(NOOP_QUEUE, routing_key=NOOP_QUEUE),
    ]
    app.conf.task_routes = {
        **app.conf.task_routes,
        NOOP_TASK: {"queue": NOOP_QUEUE, "routing_key": NOOP_QUEUE},
    }
    redis_url = settings.effective_redis_url
    if not redis_url:
        raise SystemExit("bench.noop needs a Redis broker (CRM_BROKER_URL=redis://...)")

    @app.task(name=NOOP_TASK)
    def noop(counter_key: str, payload: Any = None) -> None:
        # ``payload`` is carried and ignored: what a message of that size costs the worker.
        _redis(redis_url).incr(counter_key)

    return app


def main(argv: list[str]) -> int:
    from config.logging import configure_logging
    from config.settings import ConfigError, load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure_logging(settings)
    app = create_noop_app(settings)
    # The same options `crm-events worker` adds, with the queue narrowed to the no-op one.
    worker_argv = ["worker", "-Q", NOOP_QUEUE, *argv]
    if not any(a.startswith(("-l", "--loglevel")) for a in argv):
        worker_argv += ["--loglevel", settings.log_level]
    app.worker_main(worker_argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
