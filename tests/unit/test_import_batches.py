"""`crm-events import messages` cuts its batches by count, and email batches also by the inline
email they carry, so that no broker message grows to tens of megabytes."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError

from config.settings import Settings
from models.db import create_session_factory
from models.ledger import Delivery
from tests.conftest import migrated
from workers.cli.bulk import BATCH_INLINE_BYTES, Item, batches_of
from workers.publish import wait_for

MIB = 1024 * 1024


def email(n: int, size: int) -> Item:
    return Item(f"f:{n}", "email", {"schema": "crm.email/1", "raw_b64": "A" * size})


def sizes(batches: Any) -> list[int]:
    return [len(batch) for batch in batches]


def test_batches_are_cut_by_count() -> None:
    calls = [Item(f"f:{n}", "call", {"call_id": str(n)}) for n in range(1200)]
    batches = list(batches_of(calls, 500))
    assert sizes(batches) == [500, 500, 200]
    assert [i for batch in batches for i in batch] == calls


def test_email_batches_carry_at_most_eight_mebibytes_inline() -> None:
    emails = [email(n, MIB) for n in range(20)]
    batches = list(batches_of(emails, 500))
    assert BATCH_INLINE_BYTES == 8 * MIB
    assert sizes(batches) == [8, 8, 4]
    assert [i for batch in batches for i in batch] == emails


def test_an_email_larger_than_a_batch_goes_alone_and_in_its_place() -> None:
    emails = [email(0, 100), email(1, 9 * MIB), email(2, 100), email(3, 100)]
    assert [[i.source for i in batch] for batch in batches_of(emails, 500)] == [
        ["f:0"],
        ["f:1"],
        ["f:2", "f:3"],
    ]


def test_emails_by_reference_weigh_nothing() -> None:
    refs = [Item(f"f:{n}", "email", {"raw_ref": "0" * 64}) for n in range(600)]
    assert sizes(batches_of(refs, 500)) == [500, 100]


def test_an_import_waits_for_more_outcomes_than_an_sqlite_built_for_999_parameters_takes(
    tmp_path: Path,
) -> None:
    # `--wait` on the embedded database reads the outcomes of a whole file at once: the ids go
    # in IN lists short enough for an SQLite built to take 999 parameters (the default until 3.32).
    settings = Settings.embedded(tmp_path)
    engine = migrated(settings)

    @event.listens_for(engine, "connect")
    def old_limit(connection: sqlite3.Connection, _record: Any) -> None:
        connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)

    engine.dispose()  # connections opened from now on have the limit
    sessions = create_session_factory(engine)
    ids = [f"task-{n:04d}" for n in range(1200)]
    with sessions.begin() as session:
        session.add_all(
            Delivery(task_id=i, task_name="crm.ingest.call", outcome="stored") for i in ids
        )
    with sessions() as session, pytest.raises(OperationalError, match="too many SQL variables"):
        session.execute(select(Delivery.task_id).where(Delivery.task_id.in_(ids))).all()
    outcomes = wait_for(sessions, ids, 0)
    assert sorted(outcomes) == ids
    assert {o.outcome for o in outcomes.values()} == {"stored"}
    engine.dispose()


def test_the_summary_of_a_file_with_no_usable_row_has_no_empty_outcome_list(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from workers.cli.bulk import ImportReport, print_report

    error = {"source": "f.csv:1", "line": 1, "error": "1 fields, expected 16-21"}
    report = ImportReport([], [error], waited=True)
    assert print_report(report, "CDR row(s)") == 1
    out, err = capsys.readouterr()
    assert out == "0 CDR row(s) published in 0 batch(es); 1 not imported\n"
    assert err == "f.csv:1: not imported: 1 fields, expected 16-21\n"
