"""Publishing from the HTTP service: a message is accepted only once the broker has it."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from config.queues import TASK_QUEUES

log = logging.getLogger(__name__)

#: Publishing gives up after these retries, so a dead broker answers 503 in about a second.
PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1,
}


class BrokerUnavailable(Exception):
    """The broker did not take every message; ``queued`` lists the task ids it did take."""

    def __init__(self, queued: list[str], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.queued = queued


class Publisher:
    """Publishes task messages through the Celery app, one request's messages at a time."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def publish(self, task_name: str, messages: list[Any]) -> list[str]:
        """Each message to its task's queue; the task ids, once the broker has all of them."""
        queued: list[str] = []
        with self.lock:
            for message in messages:
                task_id = str(uuid.uuid4())
                try:
                    # send_task returns once the broker has the message (or raises).
                    self.app.send_task(
                        task_name,
                        args=[message],
                        task_id=task_id,
                        queue=TASK_QUEUES[task_name],
                        retry=True,
                        retry_policy=PUBLISH_RETRY_POLICY,
                    )
                except Exception as exc:
                    log.warning("publishing to the broker failed: %s", type(exc).__name__)
                    raise BrokerUnavailable(queued, exc) from exc
                queued.append(task_id)
        return queued

    def broker_ok(self) -> bool:
        try:
            with self.lock, self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0, timeout=3)
        except Exception:
            return False
        return True
