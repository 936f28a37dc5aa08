"""A message that kills its worker process is parked; one over the hard time limit is recorded.

Both need a task that misbehaves on purpose, which the product does not have: this module is
also a worker (``python -m tests.integration.test_delivery_poison``) built like
``crm-events worker`` (``workers.app.create_app``, the production base task ``CrmTask``) plus two
tasks on a queue of their own, next to the session's live worker on the same PostgreSQL
database and Redis:

- ``tests.delivery.die`` kills its own pool process (as an out-of-memory kill or a crash in a C
  extension would) until the file named in its message exists, the "fix";
- ``tests.delivery.stall`` ignores the soft time limit, as a stage stuck in C code would, so
  only the hard time limit stops it.

The worker runs with a 10 s task time limit and ``CRM_MAX_DELIVERIES=3``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.conftest import ROOT
from tests.integration.conftest import LiveSystem
from tests.processes import stop_process, wait_for_log, wait_for_worker

QUEUE = "tests.delivery"
DIE_TASK = "tests.delivery.die"
STALL_TASK = "tests.delivery.stall"
#: The test worker's time limit, and the lower one the stalling messages ask for themselves.
TIME_LIMIT_S = 10
STALL_LIMIT_S = 3
MAX_DELIVERIES = 3


def create_test_app(settings: Any) -> Any:
    """``create_app(settings)`` plus the two misbehaving tasks and their queue."""
    from celery.exceptions import SoftTimeLimitExceeded

    from models.db import transaction
    from tasks.store import record_delivery
    from workers.app import create_app, named_queue
    from workers.base import CrmTask

    app = create_app(settings)
    app.conf.task_queues = [*app.conf.task_queues, named_queue(QUEUE)]
    app.conf.task_routes = {
        **app.conf.task_routes,
        DIE_TASK: {"queue": QUEUE, "routing_key": QUEUE},
        STALL_TASK: {"queue": QUEUE, "routing_key": QUEUE},
    }

    @app.task(name=DIE_TASK, base=CrmTask, bind=True)
    def die_until_fixed(self: CrmTask, message: dict[str, Any]) -> str:
        if not Path(message["fixed_when"]).exists():
            os.kill(os.getpid(), signal.SIGKILL)
        with transaction(self.sessions) as session:
            record_delivery(session, task_id=self.request.id, task_name=self.name, outcome="done")
        return "done"

    @app.task(name=STALL_TASK, base=CrmTask, bind=True)
    def stall(self: CrmTask, message: dict[str, Any]) -> str:
        deadline = time.monotonic() + float(message["seconds"])
        while time.monotonic() < deadline:
            try:
                time.sleep(0.05)
            except SoftTimeLimitExceeded:
                continue
        with transaction(self.sessions) as session:
            record_delivery(session, task_id=self.request.id, task_name=self.name, outcome="done")
        return "done"

    return app


def main(argv: list[str]) -> int:
    from config.logging import configure_logging
    from config.settings import load_settings

    settings = load_settings()
    configure_logging(settings)
    app = create_test_app(settings)
    app.worker_main(["worker", "-Q", QUEUE, "--loglevel", "INFO", *argv])
    return 0


@pytest.fixture(scope="module")
def misbehaving(live: LiveSystem, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The test worker: one pool process, a 10 s time limit, parked after 3 deliveries."""
    env = dict(live.env)
    env.update(CRM_TASK_TIME_LIMIT_S=str(TIME_LIMIT_S), CRM_MAX_DELIVERIES=str(MAX_DELIVERIES))
    node = f"delivery-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    log = tmp_path_factory.mktemp("delivery-worker") / "worker.log"
    with open(log, "wb") as handle:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration.test_delivery_poison",
                "--concurrency",
                "1",
                "--hostname",
                node,
            ],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    # The publisher's time limits travel in each message and win over the worker's: publish
    # with the worker's settings.
    app = create_test_app(
        replace(live.settings, task_time_limit_s=TIME_LIMIT_S, max_deliveries=MAX_DELIVERIES)
    )
    app.worker = worker
    app.log_path = log
    app.node = node
    wait_for_worker(app, worker, lambda: log.read_text(errors="replace"), node)
    try:
        yield app
    finally:
        stop_process(worker)


def publish_and_wait(
    live: LiveSystem, app: Any, task: str, message: Any, timeout: float, **options: Any
) -> Any:
    from workers.publish import wait_for

    task_id = str(uuid.uuid4())
    app.send_task(task, args=[message], task_id=task_id, queue=QUEUE, **options)
    done = wait_for(live.sessions, [task_id], timeout)
    log = Path(app.log_path).read_text(errors="replace")
    assert task_id in done, f"{task} {task_id} has no outcome; test worker log:\n{log[-4000:]}"
    return done[task_id]


def failures_of(live: LiveSystem, task_id: str) -> list[Any]:
    from models.ledger import FailedMessage

    with live.sessions() as session:
        return list(session.scalars(select(FailedMessage).where(FailedMessage.task_id == task_id)))


def test_a_message_that_kills_its_worker_is_parked_and_can_be_replayed(
    live: LiveSystem, misbehaving: Any, tmp_path: Path
) -> None:
    from models.ledger import DeliveryAttempt
    from workers.publish import wait_for

    fix = tmp_path / "fixed"
    delivery = publish_and_wait(live, misbehaving, DIE_TASK, {"fixed_when": str(fix)}, 90)

    # Delivered 1 + 3 times: three deaths, and the fourth delivery was not run but parked.
    assert delivery.outcome == "failed"
    assert delivery.detail.startswith("poison: ")
    [failed] = failures_of(live, delivery.task_id)
    assert failed.kind == "poison"
    assert failed.attempts == MAX_DELIVERIES + 1
    assert f"delivered {MAX_DELIVERIES + 1} times" in failed.exception
    assert f"CRM_MAX_DELIVERIES={MAX_DELIVERIES}" in failed.exception
    assert "worker process running it died" in failed.exception
    assert failed.payload == {"fixed_when": str(fix)}
    assert failed.queue == QUEUE
    with live.sessions() as session:
        attempt = session.get(DeliveryAttempt, delivery.task_id)
        assert attempt is not None and attempt.deliveries == MAX_DELIVERIES + 1
    assert misbehaving.worker.poll() is None, "the test worker itself must survive"

    listed = live.cli("failed", "--json", "--kind", "poison")
    assert listed.returncode == 0, listed.stderr
    assert f'"failed:{failed.id}"' in listed.stdout

    # After the fix, replaying publishes it as a new task, whose count starts from zero.
    fix.touch()
    replayed = live.cli("replay", f"failed:{failed.id}", "--json")
    assert replayed.returncode == 0, replayed.stderr
    [entry] = json.loads(replayed.stdout)
    assert entry["id"] == f"failed:{failed.id}" and entry["task_id"] != delivery.task_id
    done = wait_for(live.sessions, [entry["task_id"]], 60)
    assert done[entry["task_id"]].outcome == "done"
    [failed_again] = failures_of(live, delivery.task_id)
    assert failed_again.replayed_at is not None


def test_a_task_over_the_hard_time_limit_is_recorded_as_timeout(
    live: LiveSystem, misbehaving: Any
) -> None:
    delivery = publish_and_wait(
        live,
        misbehaving,
        STALL_TASK,
        {"seconds": 60},
        45,
        time_limit=STALL_LIMIT_S,
        soft_time_limit=STALL_LIMIT_S - 1,
    )

    assert delivery.outcome == "failed"
    assert delivery.detail.startswith("timeout: ")
    [failed] = failures_of(live, delivery.task_id)
    assert failed.kind == "timeout"
    assert f"hard time limit of {STALL_LIMIT_S} s (the message's own)" in failed.exception
    assert failed.payload == {"seconds": 60}
    assert failed.queue == QUEUE

    # The worker carries on, and the timed-out message never runs (or is recorded) again.
    after = publish_and_wait(live, misbehaving, STALL_TASK, {"seconds": 0.1}, 30)
    assert after.outcome == "done"
    # The killed message went back to its queue; its redelivery finds the outcome and stops.
    wait_for_log(
        misbehaving.log_path,
        f"{delivery.task_id} redelivered after its outcome (failed) was recorded: not run again",
    )
    assert len(failures_of(live, delivery.task_id)) == 1
    assert misbehaving.worker.poll() is None


def test_a_message_cannot_ask_for_more_time_than_the_worker_gives(
    live: LiveSystem, misbehaving: Any
) -> None:
    # Past the worker's limit it could outlive the visibility timeout and run twice.
    delivery = publish_and_wait(
        live,
        misbehaving,
        STALL_TASK,
        {"seconds": 600},
        90,
        time_limit=100_000,
        soft_time_limit=99_000,
    )
    assert delivery.outcome == "failed" and delivery.detail.startswith("timeout: ")
    [failed] = failures_of(live, delivery.task_id)
    assert f"hard time limit of {TIME_LIMIT_S} s (CRM_TASK_TIME_LIMIT_S)" in failed.exception


def healthcheck(live: LiveSystem, node: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.healthcheck", "--node", node, "--stuck-after", "1"],
        env=live.env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_the_health_check_tells_a_pool_that_makes_no_progress(
    live: LiveSystem, misbehaving: Any
) -> None:
    from workers.publish import wait_for

    assert healthcheck(live, misbehaving.node).returncode == 0
    # A message done proves a live pool process; one killed just before (the time limit tests)
    # may linger as a zombie until the main process reaps it, so it is not the one to stop.
    assert publish_and_wait(live, misbehaving, STALL_TASK, {"seconds": 0}, 60).outcome == "done"
    [pool_process] = [pid for pid in children(misbehaving.worker.pid) if not zombie(pid)]
    os.kill(pool_process, signal.SIGSTOP)  # it answers nothing, starts nothing
    try:
        task_id = str(uuid.uuid4())
        misbehaving.send_task(STALL_TASK, args=[{"seconds": 0}], task_id=task_id, queue=QUEUE)
        deadline = time.monotonic() + 60
        while True:
            checked = healthcheck(live, misbehaving.node)
            if checked.returncode == 1:
                break
            assert time.monotonic() < deadline, checked.stdout
        # The worker still answers a ping: only the pool's progress says it is stuck.
        assert "answered ping, but its pool makes no progress" in checked.stdout
        assert task_id in checked.stdout
    finally:
        os.kill(pool_process, signal.SIGCONT)
    assert wait_for(live.sessions, [task_id], 60)[task_id].outcome == "done"
    assert healthcheck(live, misbehaving.node).returncode == 0


def children(pid: int) -> list[int]:
    found: list[int] = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(p) for p in path.read_text().split()]
    return found


def zombie(pid: int) -> bool:
    """Dead and not yet reaped by its parent (or gone already)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
