"""The pieces behind the delivery guarantees: the setting, the counter, the recorded arguments and
the broker check (the worker-level behaviour is in tests/integration/test_delivery_poison.py)."""

from __future__ import annotations

import inspect
import logging
import sqlite3
from typing import Any

import pytest
import redis
from sqlalchemy.orm import Session

from config.settings import ConfigError, Settings, load_settings, sqlite_problem
from workers.base import count_delivery, payload_of
from workers.broker_check import broker_durability_problems, warn_about_broker
from workers.cli.messages import replay_arguments


def test_max_deliveries_defaults_to_five_and_is_validated() -> None:
    assert load_settings({}).max_deliveries == 5
    assert load_settings({"CRM_MAX_DELIVERIES": "3"}).max_deliveries == 3
    for bad in ("0", "-1", "many"):
        with pytest.raises(ConfigError, match="CRM_MAX_DELIVERIES"):
            load_settings({"CRM_MAX_DELIVERIES": bad})


def test_an_sqlite_too_old_for_the_embedded_database_is_named_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every store is an INSERT … RETURNING, which SQLite has from 3.35: with an older library
    # each message would fail in the worker, one by one; the configuration says so at start.
    assert sqlite_problem(Settings(), sqlite3.sqlite_version_info) is None  # this machine's
    postgres = Settings(database_url="postgresql+psycopg://crm@db/crm")
    assert sqlite_problem(postgres, (3, 34, 1)) is None
    embedded = sqlite_problem(Settings(), (3, 34, 1))
    assert embedded is not None and "unset (the embedded SQLite) needs SQLite 3.35" in embedded
    assert "has 3.34.1" in embedded
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    with pytest.raises(ConfigError, match="CRM_DATABASE_URL: set to an SQLite file needs"):
        load_settings({"CRM_DATABASE_URL": "sqlite:////tmp/crm.sqlite3"})
    assert load_settings({"CRM_DATABASE_URL": "postgresql+psycopg://crm@db/crm"}).database_url


def test_the_counter_starts_at_the_first_redelivery_and_adds_one_each_time(db: Session) -> None:
    assert count_delivery(db, "task-a", "crm.ingest.call") == 2
    assert count_delivery(db, "task-a", "crm.ingest.call") == 3
    assert count_delivery(db, "task-b", "crm.ingest.call") == 2
    assert count_delivery(db, "task-a", "crm.ingest.call") == 4


@pytest.fixture(scope="module")
def app(settings: Settings) -> Any:
    from workers.app import create_app

    return create_app(settings)


@pytest.mark.parametrize(
    ("task_name", "args", "kwargs", "recorded"),
    [
        ("crm.ingest.visit", ({"schema": "crm.visit/1"},), {}, {"schema": "crm.visit/1"}),
        ("crm.refresh.seller", (7,), {}, 7),
        (
            "crm.reports.targets",
            ("weekly",),
            {},
            {"kind": "weekly", "period": None, "manager": None},
        ),
        ("crm.maintenance.reconcile", (), {}, {}),
        ("crm.maintenance.retention", (), {}, {}),
    ],
)
def test_recorded_arguments_replay_as_the_same_call(
    app: Any, task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any], recorded: Any
) -> None:
    task = app.tasks[task_name]
    assert payload_of(task, args, kwargs) == recorded
    call_args, call_kwargs = replay_arguments(app, task_name, recorded)
    signature = inspect.signature(task.run)
    replayed = signature.bind(*call_args, **call_kwargs)
    original = signature.bind(*args, **kwargs)
    replayed.apply_defaults()
    original.apply_defaults()
    assert replayed.arguments == original.arguments


def test_broker_settings_that_can_lose_messages_are_named() -> None:
    good = {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}
    assert broker_durability_problems(good) == []
    assert broker_durability_problems({**good, "appendfsync": "always"}) == []
    problems = broker_durability_problems(
        {"appendonly": "no", "appendfsync": "no", "maxmemory-policy": "allkeys-lru"}
    )
    assert [p.split(" ")[3] for p in problems] == ["appendonly", "appendfsync", "maxmemory-policy"]
    assert "evict" in problems[2]


def test_the_worker_check_reads_the_real_broker(
    redis_database: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    actual: dict[str, str] = {}
    for setting in ("appendonly", "appendfsync", "maxmemory-policy"):
        for name, value in redis_client.config_get(setting).items():
            actual[name.decode() if isinstance(name, bytes) else str(name)] = (
                value.decode() if isinstance(value, bytes) else str(value)
            )
    with caplog.at_level(logging.WARNING, logger="workers.broker_check"):
        problems = warn_about_broker(Settings(broker_url=redis_database))
    assert problems == broker_durability_problems(actual)
    assert [r.getMessage() for r in caplog.records] == [
        f"{p} (docs/operations.md)" for p in problems
    ]
    # The embedded broker has nothing to check.
    assert warn_about_broker(Settings()) == []
