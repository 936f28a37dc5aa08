"""Faults while a mixed stream is processed: nothing lost or doubled, no drift, still consuming.

Each scenario gets a fresh database on the private PostgreSQL cluster, an empty private Redis and
real ``crm-events worker`` processes, publishes a deterministic stream (calls with 2-4 updates
out of order, emails with a PDF attachment, visits with a later update, a few bad messages),
injects its fault while the stream is being processed, and then checks the accounting of
:func:`tests.faults.harness.account`: every task id has an outcome, the stored events are
exactly the expected ones with each call's final status and duration and each visit's latest
subject, the bad messages are rejected with a reason and nothing else is, nothing failed, the
tallies equal a recomputation from the events, and the workers process a new message.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from contextlib import suppress

import pytest
import redis
from sqlalchemy import func, select, text

from models.ledger import DeliveryAttempt, RejectedMessage
from models.parties import Staff
from tasks.store import TALLY_LOCK_NAMESPACE
from tests.faults.conftest import Services
from tests.faults.harness import (
    REDELIVERY_S,
    VISIBILITY_TIMEOUT_S,
    Accounting,
    Message,
    Scenario,
    Stream,
    account,
    bad_messages,
    build_stream,
    children,
    probe,
    scenario,
)
from tests.processes import wait_until
from workers.publish import wait_for
from workers.transport.drain import RECORD_PREFIX

pytestmark = pytest.mark.integration


def check(result: Accounting, run: Scenario) -> None:
    print(f"\n[{run.name}]\n" + "\n".join(result.lines()))  # shown with -s / -rP
    assert result.ok, (
        "\n".join(result.problems())
        + "\n\n"
        + "\n".join(result.lines())
        + "\n\n"
        + run.workers.tail(about=tuple(result.unaccounted[:5]))
    )
    assert result.events_found == result.events_expected > 0
    assert result.rejected_expected > 0


@pytest.mark.timeout(240)
def test_sigkill_of_pool_processes_and_main_processes(services: Services) -> None:
    """SIGKILL of pool processes at random moments, and of a main process (restarted)."""
    rng = random.Random(11)
    stream = build_stream(120, seed=11)
    with scenario(services.pg, services.redis, services.work_dir, "sigkill", workers=2) as run:
        run.publish(stream.messages)
        run.wait_progress(0.1, 60)
        run.workers.kill_main(rng)  # early: what it held comes back after the visibility timeout
        run.workers.wait_ready(run.app)
        deadline = time.monotonic() + 60
        while run.workers.kills["child"] < 6 and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.2, 1.5))
            run.workers.kill_child(rng)
        result = account(run, stream, timeout=REDELIVERY_S + 60)
        check(result, run)
        assert result.faults["main"] == 1 and result.faults["child"] >= 3


@pytest.mark.timeout(240)
def test_batches_under_sigkill_are_applied_exactly_once(services: Services) -> None:
    """A backfill sent as batches while pool processes are killed: a killed batch rolls back
    whole and runs again; each of its messages ends with one outcome and one event."""
    rng = random.Random(17)
    stream = build_stream(360, seed=17)
    with scenario(services.pg, services.redis, services.work_dir, "batches", workers=2) as run:
        run.publish_batches(stream.messages, size=30)
        # Kill while batches run, until one was killed in the middle (and so delivered again).
        deadline = time.monotonic() + 60
        while not redelivered(run) and time.monotonic() < deadline:
            run.wait_progress(0.02, 10)
            time.sleep(rng.uniform(0.05, 0.3))
            run.workers.kill_child(rng)
        result = account(run, stream, timeout=REDELIVERY_S + 60)
        check(result, run)
        assert redelivered(run), "no batch was killed while it ran"


@pytest.mark.timeout(240)
def test_a_burst_is_taken_by_the_first_call_and_email_tasks_each_with_its_own_outcome(
    services: Services,
) -> None:
    """Messages queued while the workers are down: a call task takes the calls queued behind
    it, an email task the emails, and each stores them with its own as one batch; every message
    still has its own outcome (a bad one rejected alone), and visits run as always."""
    stream = build_stream(120, seed=19)
    with scenario(services.pg, services.redis, services.work_dir, "burst") as run:
        run.workers.stop()
        run.publish(stream.messages)
        run.workers.start()
        result = account(run, stream, timeout=120)
        check(result, run)
        run.workers.wait_log("call batch of", timeout=0)
        run.workers.wait_log("email batch of", timeout=0)


@pytest.mark.timeout(300)
def test_messages_taken_from_their_queue_come_back_when_their_process_is_killed(
    services: Services,
) -> None:
    """Pool processes killed while they hold messages taken from the queue: the task, when it
    runs again, puts those back (marked redelivered, so each runs alone and is counted) without
    waiting for the visibility timeout; every message ends with one outcome."""
    stream = build_stream(400, seed=23)
    with scenario(services.pg, services.redis, services.work_dir, "drainkill") as run:
        run.workers.stop()
        run.publish(stream.messages)
        broker = redis.Redis.from_url(run.settings.broker_url, socket_timeout=5)
        run.workers.start()
        deadline = time.monotonic() + 60
        while not put_back(run) and time.monotonic() < deadline:
            # While a task holds messages it took, its list of them is in the broker: kill the
            # pool then, once, and wait for a killed task to run again (Celery put it at the
            # end of its queue) unless its list went with an acknowledgement in the meantime.
            wait_until(
                lambda: broker.keys(f"{RECORD_PREFIX}*"),
                "no task held messages it took from the queue",
                max(deadline - time.monotonic(), 0),
            )
            for worker in run.workers.running:
                for pid in children(worker.process.pid):
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        run.workers.kills["child"] += 1
            if broker.keys(f"{RECORD_PREFIX}*"):
                with suppress(AssertionError):
                    run.workers.wait_log("taken from the queue put back", timeout=60)
        broker.close()
        result = account(run, stream, timeout=VISIBILITY_TIMEOUT_S - 5)
        check(result, run)
        assert put_back(run), "no task put back what it had taken\n" + run.workers.tail()


def put_back(run: Scenario) -> bool:
    """Whether a task run again put back messages that its killed run had taken."""
    return any(
        "taken from the queue put back" in path.read_text(errors="replace")
        for path in run.workers.log_dir.glob("worker-*.log")
    )


@pytest.mark.timeout(240)
def test_email_batches_killed_before_their_commit_are_applied_exactly_once(
    services: Services,
) -> None:
    """Batches of new emails (stored set-based) whose pool processes are killed after they
    wrote everything, waiting for the seller's tallies: each runs again, whole, and every email
    is one event with its documents, counted once."""
    emails = build_stream(400, seed=23)
    bad = Message("email", {"schema": "crm.email/1", "source_system": "faults"}, bad=True)
    stream = Stream(
        [m for m in emails.messages if m.kind == "email"] + [bad],
        {key: fields for key, fields in emails.expected.items() if key[0] == "email"},
    )
    with scenario(services.pg, services.redis, services.work_dir, "emails", workers=2) as run:
        with run.engine.connect() as blocker:
            anna = blocker.scalar(select(Staff.id).where(Staff.username == "anna"))
            # What a recount takes: every move of Anna's tallies waits for it, uncommitted.
            blocker.execute(
                text("SELECT pg_advisory_lock(:ns, :seller)"),
                {"ns": TALLY_LOCK_NAMESPACE, "seller": anna},
            )
            run.publish_batches(stream.messages, size=10)
            wait_until(
                lambda: tally_waiters(run) >= 2, "no two email batches reached their tallies", 60
            )
            for worker in run.workers.running:
                for child in children(worker.process.pid):
                    with suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                        run.workers.kills["child"] += 1
            blocker.execute(
                text("SELECT pg_advisory_unlock(:ns, :seller)"),
                {"ns": TALLY_LOCK_NAMESPACE, "seller": anna},
            )
        result = account(run, stream, timeout=REDELIVERY_S + 60)
        check(result, run)
        assert redelivered(run) >= 2


def tally_waiters(run: Scenario) -> int:
    """Backends waiting for an advisory lock (the batches at their tally moves)."""
    with run.engine.connect() as connection:
        return int(
            connection.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
                )
            )
            or 0
        )


def redelivered(run: Scenario) -> int:
    """Batches delivered more than once (their worker process killed while they ran)."""
    with run.sessions() as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(DeliveryAttempt)
                .where(DeliveryAttempt.task_name == "crm.ingest.batch")
            )
            or 0
        )


@pytest.mark.timeout(300)
def test_graceful_redis_restart_with_aof(services: Services) -> None:
    """Redis is shut down (SHUTDOWN fsyncs the AOF) and started again on the same files, twice,
    while messages wait in the queues and are being worked on: the queued messages survive, the
    worker main process stays up and reconnects (the accounting fails on one that exited), and
    the messages it held when the connection dropped go back to their queues."""
    stream = build_stream(100, seed=12)
    with scenario(services.pg, services.redis, services.work_dir, "redis") as run:
        run.publish(stream.messages)
        run.wait_progress(0.2, 45)
        services.redis.restart()
        run.wait_progress(0.5, 45)
        services.redis.restart(down_s=3)
        result = account(run, stream, timeout=REDELIVERY_S + 45, probe_timeout=30)
        result.faults["redis restart"] = 2
        check(result, run)


@pytest.mark.timeout(240)
def test_postgresql_restart_fast_and_immediate(services: Services) -> None:
    """PostgreSQL restarts cleanly (-m fast) and after a crash (-m immediate) mid-stream: the
    tasks meet lost connections, retry with backoff, and every message ends up stored once."""
    stream = build_stream(100, seed=13)
    with scenario(services.pg, services.redis, services.work_dir, "postgres") as run:
        # The bad messages go first and are rejected before the restarts: a rejection that
        # meets the outage is test_bad_message_while_postgresql_is_down_is_recorded's case.
        bad = run.publish([m for m in stream.messages if m.bad])
        assert len(wait_for(run.sessions, bad, 60)) == len(bad)
        run.publish([m for m in stream.messages if not m.bad])
        run.wait_progress(0.2, 60)
        services.pg.restart("fast")
        run.wait_progress(0.5, 90)
        services.pg.restart("immediate")
        result = account(run, stream, timeout=120)
        result.faults["postgresql restart"] = 2
        check(result, run)


@pytest.mark.timeout(240)
def test_every_message_delivered_three_times(services: Services) -> None:
    """Each message three times: once more under the same task id (a broker redelivery) and once
    under a new one (a sender retrying), shuffled over the stream."""
    stream = build_stream(60, seed=14)
    with scenario(services.pg, services.redis, services.work_dir, "thrice") as run:
        ids = run.publish(stream.messages, copies=3, same_id_copies=1, rng=random.Random(14))
        assert run.sent.messages == 3 * len(stream.messages) and len(ids) == 2 * len(
            stream.messages
        )
        result = account(run, stream, timeout=120)
        check(result, run)
        assert result.outcomes["duplicate"] > 0


@pytest.mark.timeout(240)
def test_four_worker_processes_at_once(services: Services) -> None:
    """Four worker processes consume the same queues: updates of one call race each other."""
    stream = build_stream(120, seed=15)
    with scenario(
        services.pg, services.redis, services.work_dir, "four", workers=4, concurrency=1
    ) as run:
        run.publish(stream.messages)
        result = account(run, stream, timeout=120)
        check(result, run)


@pytest.mark.timeout(180)
def test_bad_message_while_postgresql_is_down_is_recorded(services: Services) -> None:
    """A bad message consumed while the database is unreachable: its rejection cannot be written
    yet, so it must be retried like any transient error and recorded once PostgreSQL is back."""
    with scenario(services.pg, services.redis, services.work_dir, "rejectdown") as run:
        with services.pg.down():
            (bad_id,) = run.publish([Message("call", bad_messages()[0], bad=True)])
            run.workers.wait_log(f"{bad_id}: outcome not recorded, the database is unavailable")
        done = run.wait_all(60)
        log = run.workers.tail(about=(bad_id,))
        assert bad_id in done, f"the bad message has no recorded outcome:\n{log}"
        assert done[bad_id].outcome == "rejected"


@pytest.mark.timeout(180)
def test_a_message_refused_while_postgresql_is_down_is_recorded_once_it_is_back(
    services: Services,
) -> None:
    """The consumer refuses a pickle before any task runs; while the database cannot take its
    record, the message stays unacknowledged and the record is retried until it is written."""
    with scenario(services.pg, services.redis, services.work_dir, "refusedown") as run:
        task_id = str(uuid.uuid4())
        queue = run.app.amqp.queues["crm.ingest.call"]
        with services.pg.down():
            with run.app.producer_or_acquire() as producer:
                producer.publish(
                    b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.",
                    exchange=queue.exchange,
                    routing_key=queue.routing_key,
                    headers={"id": task_id, "task": "crm.ingest.call", "lang": "py"},
                    content_type="application/x-python-serialize",
                    content_encoding="binary",
                    retry=True,
                )
            run.workers.wait_log(f"refused message {task_id} not recorded yet")
            run.workers.wait_log(f"refused message {task_id} still not recorded")
        done = wait_for(run.sessions, [task_id], 60)
        assert task_id in done, run.workers.tail(about=(task_id,))
        assert done[task_id].outcome == "rejected"
        with run.sessions() as session:
            rows = session.scalars(
                select(RejectedMessage).where(RejectedMessage.task_id == task_id)
            ).all()
        assert len(rows) == 1 and "pickle" in rows[0].reason
        assert probe(run, 60), run.workers.tail()
