"""One real worker process per test session: PostgreSQL + Redis, the production wiring."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from config.queues import INGEST_TASKS, TASK_QUEUES
from config.settings import Settings
from models.db import create_session_factory
from models.ledger import RejectedMessage
from tests.conftest import CLAIM_KEY, ROOT, TemporaryDatabase, migrated
from tests.processes import run_cli, service_env, stop_process, wait_for_worker
from tests.smtp_sink import SmtpSink
from workers.app import create_app
from workers.publish import Outcome, wait_for


@dataclass
class LiveSystem:
    settings: Settings
    app: Celery
    engine: Engine
    sessions: sessionmaker[Session]
    worker: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]

    def publish(self, kind: str, messages: list[Any], timeout: float = 60) -> list[Outcome]:
        """Publish ingest messages and wait until every one has an outcome."""
        task_name = INGEST_TASKS[kind]
        ids = []
        for message in messages:
            task_id = str(uuid.uuid4())
            self.app.send_task(
                task_name, args=[message], task_id=task_id, queue=TASK_QUEUES[task_name]
            )
            ids.append(task_id)
        done = wait_for(self.sessions, ids, timeout)
        missing = [i for i in ids if i not in done]
        assert not missing, f"{len(missing)} message(s) not processed; worker log:\n{self.tail()}"
        return [done[i] for i in ids]

    def rejected(self, task_id: str, timeout: float = 30) -> RejectedMessage:
        """The rejection recorded for a task, once its outcome is in (which must be rejected)."""
        done = wait_for(self.sessions, [task_id], timeout)
        assert task_id in done, f"no outcome for {task_id}; worker log:\n{self.tail()}"
        assert done[task_id].outcome == "rejected", done[task_id].detail
        with self.sessions() as session:
            row = session.scalars(
                select(RejectedMessage).where(RejectedMessage.task_id == task_id)
            ).one()
            session.expunge(row)
        return row

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_cli(self.env, *args, timeout=timeout)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        replies = self.app.control.ping(timeout=2)
        return self.worker.poll() is None and bool(replies)


@pytest.fixture(scope="session")
def smtp_sink() -> Iterator[SmtpSink]:
    """A real SMTP server on loopback, started before the worker so its port is in the env."""
    sink = SmtpSink().start()
    yield sink
    sink.stop()


@pytest.fixture(scope="session")
def live(
    tmp_path_factory: pytest.TempPathFactory,
    redis_client: redis.Redis,
    redis_database: str,
    smtp_sink: SmtpSink,
) -> Iterator[LiveSystem]:
    database = TemporaryDatabase("live")
    data_dir = tmp_path_factory.mktemp("live-var")
    settings = Settings(
        data_dir=data_dir,
        database_url=database.url,
        broker_url=redis_database,
        redis_url=redis_database,
    )
    engine = migrated(settings)
    # No stale messages from an earlier run in this session's Redis database (keep the claim).
    for key in redis_client.scan_iter():
        if key != CLAIM_KEY.encode():
            redis_client.delete(key)
    env = service_env(settings)
    env.update(CRM_SMTP_HOST=smtp_sink.host, CRM_SMTP_PORT=str(smtp_sink.port))
    log = data_dir / "worker.log"
    with open(log, "wb") as handle:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers.cli",
                "worker",
                "--concurrency",
                "2",
                "--hostname",
                f"test-{uuid.uuid4().hex[:6]}@%h",
            ],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    app = create_app(settings)
    system = LiveSystem(settings, app, engine, create_session_factory(engine), worker, log, env)
    try:
        # Stopped however the setup ends: a worker left running would take the next
        # session's messages from this Redis database into a database that is gone.
        wait_for_worker(app, worker, system.tail)
        yield system
    finally:
        stop_process(worker)
        engine.dispose()
        database.drop()
