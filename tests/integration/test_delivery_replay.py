"""``crm-events failed`` and ``crm-events replay ID|--all [--kind]`` against the live worker.

The failed messages are put in the ledger as the worker records them (a transient failure whose
retries ran out, a poison message, one replayed already); replaying publishes their payloads
through Redis to the real worker, which stores them this time.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from models.base import utcnow
from models.db import transaction
from models.ledger import FailedMessage
from models.parties import Staff
from tests.integration.conftest import LiveSystem
from workers.publish import wait_for

pytestmark = pytest.mark.integration


def staff_message(username: str) -> dict[str, Any]:
    return {
        "schema": "crm.party/1",
        "source_system": "erp",
        "kind": "staff",
        "username": username,
        "name": f"Replay {username}",
        "email": f"{username}@myyntitalo.fi",
        "role": "seller",
        "time_zone": "Europe/Helsinki",
    }


def add_failed(live: LiveSystem, kind: str, payload: Any, *, replayed: bool = False) -> int:
    with transaction(live.sessions) as session:
        row = FailedMessage(
            task_name="crm.ingest.party",
            task_id=str(uuid.uuid4()),
            kind=kind,
            exception=f"{kind}: as recorded by the worker",
            attempts=1,
            payload=payload,
            queue="crm.ingest.party",
            replayed_at=utcnow() if replayed else None,
        )
        session.add(row)
        session.flush()
        return row.id


def replay(live: LiveSystem, *args: str) -> list[dict[str, str]]:
    result = live.cli("replay", *args, "--json")
    assert result.returncode == 0, result.stderr
    entries: list[dict[str, str]] = json.loads(result.stdout)
    done = wait_for(live.sessions, [e["task_id"] for e in entries], 60)
    assert {done[e["task_id"]].outcome for e in entries} <= {"done"}, live.tail()
    assert len(done) == len(entries), live.tail()
    return entries


def usernames(live: LiveSystem) -> set[str]:
    with live.sessions() as session:
        return set(session.scalars(select(Staff.username).where(Staff.username.like("replay-%"))))


@pytest.fixture
def only_these_failures(live: LiveSystem) -> Iterator[None]:
    """Failures other tests left in the shared live database are set aside meanwhile (marked
    replayed) and given back afterwards, so ``--all`` here sends this test's rows only."""
    with transaction(live.sessions) as session:
        others = list(
            session.scalars(select(FailedMessage.id).where(FailedMessage.replayed_at.is_(None)))
        )
        session.execute(
            update(FailedMessage).where(FailedMessage.id.in_(others)).values(replayed_at=utcnow())
        )
    try:
        yield
    finally:
        with transaction(live.sessions) as session:
            session.execute(
                update(FailedMessage).where(FailedMessage.id.in_(others)).values(replayed_at=None)
            )


@pytest.mark.usefixtures("only_these_failures")
def test_replay_all_republishes_each_pending_failure_once(live: LiveSystem) -> None:
    tag = uuid.uuid4().hex[:6]
    transient = add_failed(live, "transient", staff_message(f"replay-{tag}-transient"))
    poison = add_failed(live, "poison", staff_message(f"replay-{tag}-poison"))
    done_before = add_failed(live, "bug", staff_message(f"replay-{tag}-old"), replayed=True)

    # --kind narrows --all: only the poison message goes.
    entries = replay(live, "--all", "--kind", "poison")
    assert [e["id"] for e in entries] == [f"failed:{poison}"]
    assert f"replay-{tag}-poison" in usernames(live)
    assert f"replay-{tag}-transient" not in usernames(live)

    # --all takes the rest that was not replayed yet; the one replayed before stays as it is.
    entries = replay(live, "--all")
    ids = [e["id"] for e in entries]
    assert f"failed:{transient}" in ids
    assert f"failed:{poison}" not in ids and f"failed:{done_before}" not in ids
    assert f"replay-{tag}-transient" in usernames(live)
    assert f"replay-{tag}-old" not in usernames(live)

    # Nothing is left: a second --all sends nothing.
    assert replay(live, "--all") == []

    listed = json.loads(live.cli("failed", "--json").stdout)
    by_id = {row["id"]: row for row in listed}
    assert by_id[f"failed:{transient}"]["replayed_at"] is not None
    assert by_id[f"failed:{poison}"]["replayed_at"] is not None
    assert by_id[f"failed:{poison}"]["kind"] == "poison"

    # One id replays even a row replayed before (an operator's explicit choice).
    [entry] = replay(live, f"failed:{done_before}")
    assert entry["id"] == f"failed:{done_before}"
    assert f"replay-{tag}-old" in usernames(live)


def test_replay_refuses_ambiguous_or_unknown_requests(live: LiveSystem) -> None:
    both = live.cli("replay", "failed:1", "--all")
    assert both.returncode == 2 and "give one id" in both.stderr
    neither = live.cli("replay")
    assert neither.returncode == 2 and "give one id" in neither.stderr
    kind_alone = live.cli("replay", "failed:1", "--kind", "poison")
    assert kind_alone.returncode == 2 and "--kind goes with --all" in kind_alone.stderr
    missing = live.cli("replay", "failed:999999")
    assert missing.returncode == 1 and "no failed:999999" in missing.stderr


def test_retention_runs_nightly_and_a_payload_it_deleted_is_not_replayed(
    live: LiveSystem,
) -> None:
    """A rejection older than CRM_RETAIN_REJECTED_DAYS (90 by default) loses its payload to
    the nightly task, run by the real worker, which reports what it deleted; the row stays
    listed, and replaying it is refused with the reason."""
    from config.queues import RETENTION_TASK, TASK_QUEUES
    from models.ledger import RejectedMessage

    task_id = str(uuid.uuid4())
    live.app.send_task(
        "crm.ingest.party",
        args=[{**staff_message("ret-bad"), "role": "emperor"}],
        task_id=task_id,
        queue="crm.ingest.party",
    )
    row = live.rejected(task_id)
    with transaction(live.sessions) as session:
        session.execute(
            update(RejectedMessage)
            .where(RejectedMessage.id == row.id)
            .values(rejected_at=utcnow() - timedelta(days=91))
        )
    dry = live.cli("retention", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = {k["kind"]: k["deleted"] for k in json.loads(dry.stdout)["kinds"]}
    assert planned["rejected_payloads"] >= 1

    nightly = str(uuid.uuid4())
    live.app.send_task(RETENTION_TASK, task_id=nightly, queue=TASK_QUEUES[RETENTION_TASK])
    done = wait_for(live.sessions, [nightly], 60)
    assert nightly in done, live.tail()
    assert done[nightly].outcome == "done"
    assert "retention deleted: " in done[nightly].detail
    assert "rejected_payloads " in done[nightly].detail

    with live.sessions() as session:
        kept = session.get(RejectedMessage, row.id)
        assert kept is not None and kept.reason == row.reason
        assert kept.payload["payload"] == "deleted by retention"
    refused = live.cli("replay", f"rejected:{row.id}")
    assert refused.returncode != 0
    assert "payload was deleted" in refused.stderr and "after 90 days" in refused.stderr
