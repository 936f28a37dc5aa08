"""Whether a worker's pool makes progress, as its health check asks it.

A worker that answers a ping can still be useless: its consumer receives messages and hands them
to the pool, and no pool process ever starts them (a hand-off that failed half-way, a pool
process that hangs before it accepts its job). Every request handed to the pool is noted here
with the time; a request that no pool process has accepted after ``stuck_after`` seconds means
the pool makes no progress, and ``python -m workers.healthcheck`` says unhealthy.

Celery leaks a pool slot when handing a request to the pool raises anything but a revoked
task (``WorkController._process_task``); :func:`guard_hand_off` gives the slot back and lets
the consumer record the message instead, so one bad message cannot take a slot with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery.worker import state as worker_state
from celery.worker.control import inspect_command

log = logging.getLogger(__name__)

#: Requests handed to the pool: task id -> (monotonic time of the hand-off, the request).
_handed: dict[str, tuple[float, Any]] = {}
#: Past this many notes, those already started or finished are forgotten.
PRUNE_AT = 1000


def _settled(request: Any) -> bool:
    """Started by a pool process, or no longer reserved (finished, failed, revoked)."""
    return request.time_start is not None or request not in worker_state.reserved_requests


def _prune() -> None:
    for task_id, (_, request) in list(_handed.items()):
        if _settled(request):
            _handed.pop(task_id, None)


def guard_hand_off(
    controller: Any, on_error: Callable[[Any, BaseException], None]
) -> Callable[[Any], Any]:
    """Wrap the worker's hand-off of a request to its pool: note it for the health check, and
    when handing it over raises, give the pool slot back and pass the request to ``on_error``
    (which records and acknowledges its message) instead of leaving both taken for good."""
    hand_off = controller._process_task

    def process_task(request: Any) -> Any:
        if len(_handed) >= PRUNE_AT:
            _prune()
        _handed[request.id] = (time.monotonic(), request)
        try:
            return hand_off(request)
        except Exception as exc:
            _handed.pop(request.id, None)
            log.error(
                "%s %s could not be handed to a pool process: %s: %s",
                request.name,
                request.id,
                type(exc).__name__,
                exc,
            )
            release = getattr(controller, "_quick_release", None)
            if release is not None:
                release()
            worker_state.task_ready(request)
            on_error(request, exc)
            return None

    controller._process_task = process_task
    return process_task


def stuck_requests(stuck_after: float, now: float | None = None) -> list[dict[str, Any]]:
    """Requests handed to the pool over ``stuck_after`` seconds ago that no process started."""
    now = time.monotonic() if now is None else now
    _prune()
    return [
        {"task": request.name, "id": task_id, "waiting_s": round(now - since, 1)}
        for task_id, (since, request) in sorted(_handed.items(), key=lambda item: item[1][0])
        if now - since > stuck_after
    ]


@inspect_command(args=[("stuck_after", float)], signature="[stuck_after=60]")
def crm_pool(state: Any, stuck_after: float = 60.0, **_: Any) -> dict[str, Any]:
    """The pool's progress: its processes, the requests running, and those stuck."""
    pool = getattr(state.consumer, "pool", None)
    return {
        "processes": getattr(pool, "num_processes", None),
        "active": len(worker_state.active_requests),
        "reserved": len(worker_state.reserved_requests),
        "stuck": stuck_requests(float(stuck_after)),
    }
