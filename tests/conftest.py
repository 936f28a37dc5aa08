"""Shared fixtures: real PostgreSQL and Redis on loopback, a savepoint per unit test.

Services come from CRM_TEST_DATABASE_URL (a server URL; each run creates and drops its own
databases) and CRM_TEST_REDIS_URL, defaulting to the loopback ports. A missing service fails
the run: ``tests/ensure_services.sh`` (``make test``) starts or installs them first.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from config.settings import Settings
from models.db import create_db_engine, transaction
from models.migrate import install_default_catalogue, upgrade
from tasks.context import StageContext

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"


def server_url() -> str:
    return os.environ.get("CRM_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)


def redis_url_for_tests() -> str:
    """The Redis database this test session owns (see :func:`_claim_redis_database`)."""
    return _claimed_redis_url or os.environ.get("CRM_TEST_REDIS_URL", DEFAULT_REDIS_URL)


_claimed_redis_url: str | None = None
CLAIM_KEY = "crm-events-tests:claimed-by"


def _claim_redis_database() -> str:
    """Own one Redis database for the session, so two test runs on one machine never flush or
    consume each other's queues: CRM_TEST_REDIS_URL when given, else the first of databases
    15, 14, … 8 on the loopback server that no other live session has claimed."""
    if "CRM_TEST_REDIS_URL" in os.environ:
        return os.environ["CRM_TEST_REDIS_URL"]
    url = claim_first_free([f"redis://127.0.0.1:6379/{index}" for index in range(15, 7, -1)])
    if url is None:
        raise RuntimeError("no free Redis test database among 8-15 (other test runs hold them)")
    return url


def claim_first_free(urls: list[str]) -> str | None:
    """Claim the first of these Redis databases that no live test session holds (the claim
    expires after an hour; flushing the database drops it)."""
    for url in urls:
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            if client.set(CLAIM_KEY, str(os.getpid()), nx=True, ex=3600):
                return url
        finally:
            client.close()
    return None


class TemporaryDatabase:
    """A database of its own on the test server, dropped at the end of the session."""

    def __init__(self, purpose: str) -> None:
        base = make_url(server_url())
        self.name = f"crm_test_{purpose}_{uuid.uuid4().hex[:10]}"
        self.admin: Engine = create_engine(base, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.url = base.set(database=self.name).render_as_string(hide_password=False)

    def drop(self) -> None:
        with self.admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


def migrated(settings: Settings) -> Engine:
    engine = create_db_engine(settings)
    upgrade(engine)
    with transaction(__import__("models.db", fromlist=["x"]).create_session_factory(engine)) as s:
        install_default_catalogue(s)
    return engine


@pytest.fixture(scope="session")
def unit_database() -> Iterator[TemporaryDatabase]:
    database = TemporaryDatabase("unit")
    yield database
    database.drop()


@pytest.fixture(scope="session")
def settings(
    unit_database: TemporaryDatabase, tmp_path_factory: pytest.TempPathFactory, redis_database: str
) -> Settings:
    return Settings(
        data_dir=tmp_path_factory.mktemp("unit-var"),
        database_url=unit_database.url,
        broker_url=redis_database,
    )


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    engine = migrated(settings)
    yield engine
    engine.dispose()


@pytest.fixture
def db(engine: Engine) -> Iterator[Session]:
    """A session whose work is rolled back after the test (stage code never commits)."""
    with engine.connect() as connection:
        outer = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint")
        try:
            yield session
        finally:
            session.close()
            outer.rollback()


@pytest.fixture
def ctx(settings: Settings) -> StageContext:
    return StageContext(settings, task_id=str(uuid.uuid4()), task_name="test")


def load_example(relative: str) -> Any:
    return json.loads((EXAMPLES / relative).read_text(encoding="utf-8"))


@pytest.fixture
def world(db: Session, ctx: StageContext) -> Session:
    """The sample world of examples/parties.json: staff, customers and contacts."""
    from tasks.ingest.party import ingest_party

    for message in load_example("parties.json"):
        ingest_party(db, ctx, message)
    db.flush()
    return db


@pytest.fixture
def sqlite_world(tmp_path: Path) -> Iterator[tuple[Session, StageContext]]:
    """The sample world on the embedded database (SQLite), rolled back at the end."""
    from tasks.ingest.party import ingest_party

    settings = Settings.embedded(tmp_path)
    engine = migrated(settings)
    ctx = StageContext(settings, "sqlite-world", "test")
    with engine.connect() as connection:
        outer = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint")
        for message in load_example("parties.json"):
            ingest_party(session, ctx, message)
        session.flush()
        try:
            yield session, ctx
        finally:
            session.close()
            outer.rollback()
    engine.dispose()


@pytest.fixture(scope="session", autouse=True)
def redis_database() -> Iterator[str]:
    """Claim this session's Redis database before anything uses it; release it at the end."""
    global _claimed_redis_url
    _claimed_redis_url = _claim_redis_database()
    yield _claimed_redis_url
    client = redis.Redis.from_url(_claimed_redis_url, socket_timeout=5)
    client.flushdb()  # also drops the claim
    client.close()
    _claimed_redis_url = None


@pytest.fixture(scope="session")
def redis_client(redis_database: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_database, socket_timeout=5)
    client.ping()  # fails the run when Redis is missing: never a skip
    yield client
    client.close()


@contextmanager
def statements_run(session: Session) -> Iterator[list[str]]:
    """The SQL statements the session's connection runs inside the block, as a list."""
    from sqlalchemy import event

    statements: list[str] = []
    connection = session.connection()

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(connection, "before_cursor_execute", before)
    try:
        yield statements
    finally:
        event.remove(connection, "before_cursor_execute", before)
