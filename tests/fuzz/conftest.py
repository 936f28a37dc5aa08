"""Fixtures of the fuzz tests: a database of their own and the real ingest tasks, run in-process.

Every example goes through ``CrmTask.run_ingest`` of the registered task, exactly as in a
worker: the stage in one transaction that commits, bad input recorded as a rejection, anything
else recorded as a failure and raised. The database is a PostgreSQL database of its own (the
examples commit, so they stay out of the unit tests' database); the broker is the embedded
filesystem one under a temporary folder, where the follow-up work (refreshes, recording
fetches) lands and nobody consumes it. Documents are stored as files, so that the tests can
check where files are written.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery import _state as celery_state
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

import tests.fuzz.profiles  # noqa: F401  (registers and loads the Hypothesis profile)
from config.queues import INGEST_TASKS
from config.settings import Settings
from models.db import create_session_factory
from models.ledger import Delivery, FailedMessage, RejectedMessage
from tasks.ingest.call import ingest_call
from tasks.ingest.document import ingest_document
from tasks.ingest.email import ingest_email
from tasks.ingest.party import ingest_party
from tasks.ingest.visit import ingest_visit
from tasks.targets import ingest_target
from tasks.work import ingest_task
from tests.conftest import TemporaryDatabase, load_example, migrated
from workers.app import create_app

STAGES: dict[str, Callable[..., Any]] = {
    "call": ingest_call,
    "email": ingest_email,
    "visit": ingest_visit,
    "party": ingest_party,
    "target": ingest_target,
    "document": ingest_document,
    "task": ingest_task,
}

#: What a message may end as: an event outcome, or a rejection with its reason.
EVENT_OUTCOMES = {"stored", "done", "duplicate", "outdated"}


@dataclass
class Processed:
    task_id: str
    outcome: str
    event_id: int | None
    reason: str | None
    seconds: float


@dataclass
class IngestRunner:
    settings: Settings
    app: Celery
    engine: Engine
    sessions: sessionmaker[Session]

    def run(self, kind: str, message: Any) -> Processed:
        """Process one message as a worker would; raises whatever escapes the task."""
        task: Any = self.app.tasks[INGEST_TASKS[kind]]
        task_id = str(uuid.uuid4())
        task.push_request(id=task_id, retries=0)
        started = time.monotonic()
        try:
            task.run_ingest(STAGES[kind], message)
        finally:
            task.pop_request()
        seconds = time.monotonic() - started
        with self.sessions() as session:
            delivery = session.get(Delivery, task_id)
            assert delivery is not None, f"no delivery recorded for {kind} {task_id}"
            reason = session.scalar(
                select(RejectedMessage.reason).where(RejectedMessage.task_id == task_id)
            )
            failure = session.scalar(
                select(FailedMessage.exception).where(FailedMessage.task_id == task_id)
            )
        assert failure is None, f"recorded as failed: {failure}"
        return Processed(task_id, delivery.outcome, delivery.event_id, reason, seconds)

    def check(self, kind: str, message: Any) -> Processed:
        """Process one message and assert that it ended as an event or a reasoned rejection."""
        result = self.run(kind, message)
        if result.outcome == "rejected":
            assert result.reason and result.reason.strip(), "a rejection without a reason"
        else:
            assert result.outcome in EVENT_OUTCOMES, f"unexpected outcome {result.outcome!r}"
        return result


@pytest.fixture(scope="session")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="session")
def runner(fuzz_root: Path) -> Iterator[IngestRunner]:
    database = TemporaryDatabase("fuzz")
    settings = Settings(
        data_dir=fuzz_root / "var",
        database_url=database.url,
        document_store="filesystem",
    )
    settings.data_dir.mkdir()
    engine = migrated(settings)
    # The app must not become the process's current app: other tests' apps stay theirs.
    previous = celery_state.get_current_app()
    app = create_app(settings)
    previous.set_current()
    system = IngestRunner(settings, app, engine, create_session_factory(engine))
    for message in load_example("parties.json"):
        assert system.check("party", message).outcome == "done"
    try:
        yield system
    finally:
        engine.dispose()
        database.drop()
