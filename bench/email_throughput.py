"""Email stage benchmark: throughput of a typical email, and a worker's memory for a 25 MB one.

Three measurements on a scratch PostgreSQL database and a dedicated Redis database:

* **stage**: N distinct "typical" emails (about 100 kB: a short Finnish text and one 70 kB PDF
  attachment, base64) through ``ingest_email`` in this process, one transaction (commit) per
  email as a worker runs it, without the broker and without the after-commit seller refresh.
  Reported as emails/s (median of ``--repeats`` runs).
* **end to end**: N such emails published as ``crm.ingest.email`` messages (``raw_b64``) to a
  real ``crm-events worker --concurrency 2`` over Redis; the clock runs from the first publish
  until every message has its ``delivery`` row (stored) and the sellers' tallies are refreshed
  (``refresh_request`` empty). Reported as emails/s (median).
* **batch path**, after each end-to-end run: the same number of such emails as ``crm.batch/1``
  messages of ``--batch-size`` (50) emails to the same worker, twice: inline (``raw_b64``, a
  batch message of about 6.5 MB) and by reference (each batch's raw emails stored first in one
  transaction, as the SMTP gateway stores mail, then the batch of ``raw_ref`` messages; the
  storing is on the clock). The clock and the wait are those of the end-to-end runs, over the
  delivery rows of the batches' messages.
* **no-op baseline**, alternating with the end-to-end runs: N ``bench.noop`` tasks through
  bench/noop_worker.py (the same Celery app and delivery settings, a task that only increments
  a Redis counter): the ceiling the broker and the prefork pool give on this machine now.
* **memory**: one 25 MB email (a text and one 18.5 MB attachment) through a worker with one
  prefork child, both as the SMTP gateway hands it over (stored first, ``raw_ref``) and inline
  (``raw_b64`` in the Redis message). The child's peak RSS (VmHWM, reset through
  ``/proc/PID/clear_refs`` just before the email) is compared with its RSS before the email
  and with the message size. As a baseline, the same inline message is also carried by the
  no-op task of a one-child no-op worker: what Celery itself holds for a message that size.

The throw-away world comes from bench/pipeline.py's helpers: a scratch database on the server of
``--database-server``, dropped at the end; Redis database ``--redis-db``, claimed and flushed at
start and end; the workers; the sample parties of ``examples/parties.json``, loaded through the
worker. Senders vary over the customer's domain, as mail from many people would (one sender
would meet the mail-loop limit, by design).

    .venv/bin/python bench/email_throughput.py --emails 300 --e2e-emails 600 --repeats 3
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
# The project root first; bench/ last, so that its scripts import one another by name
# (``import pipeline``) and none can hide a standard module or a dependency.
sys.path[:] = [
    str(ROOT),
    *(p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR),
    str(BENCH_DIR),
]

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

import pipeline as helpers  # noqa: E402  (bench/pipeline.py)
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from config.settings import Settings  # noqa: E402
from models.db import create_db_engine, create_session_factory, transaction  # noqa: E402
from tasks.attach import store_blob  # noqa: E402
from tasks.context import StageContext  # noqa: E402
from tasks.ingest.email import ingest_email  # noqa: E402

GOAL_RATE = 100.0
GOAL_RSS_RATIO = 4.0


# -- the emails ---------------------------------------------------------------------------------


def typical_email(n: int, run: str, attachment: bytes) -> bytes:
    """About 100 kB: headers, a short Finnish text and one PDF attachment."""
    encoded = base64.encodebytes(attachment).decode("ascii").replace("\n", "\r\n")
    return (
        f"From: Asiakas {n} <asiakas{n}@pohjolankone.fi>\r\n"
        "To: Anna Lahtinen <anna.lahtinen@myyntitalo.fi>\r\n"
        "Cc: crm@myyntitalo.fi\r\n"
        f"Subject: Tarjouspyyntö {n}: huoltosopimus 2027\r\n"
        "Date: Wed, 25 Nov 2026 10:00:00 +0200\r\n"
        f"Message-ID: <bench-{run}-{n}@pohjolankone.fi>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="=_bench"\r\n'
        "\r\n"
        "--=_bench\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Hei Anna,\r\n\r\npyydämme tarjousta huoltosopimuksesta vuodelle 2027. Liitteenä"
        " laiteluettelo.\r\n\r\nYstävällisin terveisin\r\nPohjolan Kone Oy\r\n"
        "--=_bench\r\n"
        'Content-Type: application/pdf; name="Laiteluettelo.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="Laiteluettelo.pdf"\r\n'
        "\r\n"
        f"{encoded}"
        "--=_bench--\r\n"
    ).encode()


def pdf_bytes(size: int, seed: int) -> bytes:
    body = random.Random(seed).randbytes(size)
    return b"%PDF-1.4\n" + body + b"\n%%EOF\n"


def message(raw: bytes) -> dict[str, Any]:
    return {
        "schema": "crm.email/1",
        "source_system": "bench",
        "raw_b64": base64.b64encode(raw).decode("ascii"),
        "mail_from": "asiakas@pohjolankone.fi",
        "rcpt_to": ["crm@myyntitalo.fi"],
        "received_at": "2026-11-25T10:00:05+02:00",
    }


# -- the world ----------------------------------------------------------------------------------


def publish_and_wait(
    world: Any,
    messages: list[dict[str, Any]],
    tag: str,
    timeout: float,
    batch_size: int = 0,
    by_reference: Settings | None = None,
) -> float:
    """Publish, then wait for every delivery row and for the sellers' refreshes; seconds.

    ``batch_size`` > 0: the emails go as ``crm.batch/1`` messages of that many emails each (the
    batch path), else one ``crm.ingest.email`` message each. ``by_reference``: each batch's raw
    emails are stored first, as the SMTP gateway stores mail, and the batch refers to them
    (``raw_ref``); on the clock.
    """
    prefix = f"bench-email-{tag}-"
    # A batch's messages have delivery rows of their own, ``<batch id>/<index>``.
    pattern = prefix + ("%/%" if batch_size else "%")
    poll = text(helpers.POLL_PIPELINE)
    helpers.renew_claim(world)
    with world.engine.connect() as connection:
        started = time.perf_counter()
        if batch_size:
            for start in range(0, len(messages), batch_size):
                chunk = messages[start : start + batch_size]
                if by_reference is not None:
                    chunk = stored_first(world, by_reference, chunk)
                batch = {
                    "schema": "crm.batch/1",
                    "source_system": "bench",
                    "kind": "email",
                    "messages": chunk,
                }
                world.app.send_task(
                    "crm.ingest.batch",
                    args=[batch],
                    task_id=f"{prefix}{uuid.uuid4()}",
                    queue="crm.ingest.bulk",
                )
        else:
            for payload in messages:
                world.app.send_task(
                    "crm.ingest.email",
                    args=[payload],
                    task_id=f"{prefix}{uuid.uuid4()}",
                    queue="crm.ingest.email",
                )
        while True:
            done, requests = connection.execute(poll, {"prefix": pattern}).one()
            elapsed = time.perf_counter() - started
            if done >= len(messages) and requests == 0:
                break
            if elapsed > timeout:
                raise helpers.BenchError(f"only {done} of {len(messages)} emails in {timeout} s")
            helpers.check_alive(world)
            time.sleep(helpers.POLL_INTERVAL_S)
        outcomes = dict(
            connection.execute(
                text(
                    "SELECT outcome, count(*) FROM delivery WHERE task_id LIKE :prefix"
                    " GROUP BY outcome"
                ),
                {"prefix": pattern},
            ).all()
        )
    if outcomes != {"stored": len(messages)}:
        raise helpers.BenchError(f"unexpected outcomes: {outcomes}")
    return elapsed


# -- the measurements ---------------------------------------------------------------------------


def stage_rate(settings: Settings, count: int, run: str) -> float:
    attachment = pdf_bytes(70_000, 1)
    messages = [message(typical_email(n, run, attachment)) for n in range(count)]
    engine = create_db_engine(settings)
    sessions = create_session_factory(engine)
    started = time.perf_counter()
    for n, payload in enumerate(messages):
        with transaction(sessions) as session:
            result = ingest_email(session, StageContext(settings, f"{run}-{n}"), payload)
            assert result.outcome == "stored", result
    elapsed = time.perf_counter() - started
    engine.dispose()
    return count / elapsed


def stored_first(
    world: Any, settings: Settings, messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The messages with their raw emails stored in one transaction, referred to by SHA-256."""
    referring = []
    with Session(world.engine.execution_options(isolation_level="READ COMMITTED")) as session:
        for payload in messages:
            raw = base64.b64decode(payload["raw_b64"])
            digest = store_blob(session, settings, raw, "message/rfc822")
            referring.append(
                {k: v for k, v in payload.items() if k != "raw_b64"} | {"raw_ref": digest}
            )
        session.commit()
    return referring


def e2e_rate(
    world: Any, count: int, run: str, batch_size: int = 0, by_reference: Settings | None = None
) -> float:
    attachment = pdf_bytes(70_000, 2)
    messages = [message(typical_email(n, run, attachment)) for n in range(count)]
    elapsed = publish_and_wait(world, messages, run, 600, batch_size, by_reference)
    return count / elapsed


def measured(
    world: Any,
    pipeline: Any,
    cpu: dict[str, float],
    count: int,
    run: str,
    batch_size: int = 0,
    by_reference: Settings | None = None,
) -> float:
    """One end-to-end run (emails/s); the CPU each part spent on it is added to ``cpu``."""
    before = helpers.cpu_parts(world, pipeline)
    rate = e2e_rate(world, count, run, batch_size, by_reference)
    after = helpers.cpu_parts(world, pipeline)
    for part, seconds in after.items():
        cpu[part] = cpu.get(part, 0.0) + seconds - before[part]
    return rate


def print_cpu(cpu: dict[str, float], emails: int) -> None:
    total, cores = sum(cpu.values()), os.cpu_count() or 1
    for part, seconds in cpu.items():
        print(f"  {part:32s} {seconds * 1000 / emails:6.1f} ms  {seconds / total:4.0%}")
    print(
        f"  {'total':32s} {total * 1000 / emails:6.1f} ms: {cores} cores give at most"
        f" {cores * emails / total:.0f} emails/s at this cost"
    )


def status(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def pool_child(parent: int) -> int:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    if len(children) != 1:
        raise helpers.BenchError(f"expected one pool child, found {children}")
    return int(children[0])


def memory(world: Any, settings: Settings, env: dict[str, str], size: int) -> list[dict[str, Any]]:
    """Peak RSS of a one-child worker for one big email, by reference and inline."""
    big_attachment = pdf_bytes(int(size * 0.74), 3)
    worker = helpers.start_worker(
        world, "memory", [helpers.crm_events_command(), "worker"], env, concurrency=1
    )
    helpers.wait_ready(world)
    child = pool_child(worker.process.pid)
    rows = []
    warm = pdf_bytes(70_000, 4)
    publish_and_wait(world, [message(typical_email(0, "warm", warm))], "mw", timeout=120)
    for how in ("raw_ref", "raw_b64"):
        raw = typical_email(1, f"big-{how}", big_attachment)
        payload = message(raw)
        if how == "raw_ref":
            # As the SMTP gateway does for mail over the inline limit.
            engine = create_db_engine(settings)
            with transaction(create_session_factory(engine)) as session:
                payload.pop("raw_b64")
                payload["raw_ref"] = store_blob(session, settings, raw, "message/rfc822")
            engine.dispose()
        before = status(child)["VmRSS"]
        Path(f"/proc/{child}/clear_refs").write_text("5")  # reset the peak (VmHWM)
        elapsed = publish_and_wait(world, [payload], f"m-{how}", timeout=600)
        peak = status(child)["VmHWM"]
        rows.append(
            {"how": how, "size": len(raw), "before": before, "peak": peak, "seconds": elapsed}
        )
    helpers.stop_worker(worker)
    world.workers.remove(worker)
    rows.append(noop_memory(world, env, message(typical_email(1, "big-noop", big_attachment))))
    return rows


def noop_memory(world: Any, env: dict[str, str], payload: dict[str, Any]) -> dict[str, Any]:
    """The same inline message carried by the no-op task: what Celery itself holds for it."""
    bench = helpers.noop_worker
    command = helpers.noop_command()
    worker = helpers.start_worker(world, "memory-noop", command, env, concurrency=1)
    helpers.wait_ready(world)
    child = pool_child(worker.process.pid)
    key = f"bench:noop:memory:{uuid.uuid4()}"
    world.app.send_task(bench.NOOP_TASK, args=[key, {"warm": True}], queue=bench.NOOP_QUEUE)
    wait_counter(world, key, 1)
    before = status(child)["VmRSS"]
    Path(f"/proc/{child}/clear_refs").write_text("5")
    started = time.perf_counter()
    world.app.send_task(bench.NOOP_TASK, args=[key, payload], queue=bench.NOOP_QUEUE)
    wait_counter(world, key, 2)
    peak = status(child)["VmHWM"]
    helpers.stop_worker(worker)
    world.workers.remove(worker)
    size = len(base64.b64decode(payload["raw_b64"]))
    seconds = time.perf_counter() - started
    return {
        "how": "raw_b64, no-op task",
        "size": size,
        "before": before,
        "peak": peak,
        "seconds": seconds,
    }


def wait_counter(world: Any, key: str, count: int, timeout: float = 300) -> None:
    deadline = time.perf_counter() + timeout
    while int(world.redis.get(key) or 0) < count:
        if time.perf_counter() > deadline:
            raise helpers.BenchError(f"the no-op task did not run within {timeout} s")
        helpers.check_alive(world)
        time.sleep(helpers.POLL_INTERVAL_S)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--emails", type=int, default=300, help="emails per stage run")
    parser.add_argument("--e2e-emails", type=int, default=600, help="emails per end-to-end run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured emails and tasks first")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=50,
        help="emails per crm.batch/1 message of the batch-path runs (0: none)",
    )
    parser.add_argument("--big-mb", type=float, default=25.0, help="size of the big email, MB")
    parser.add_argument(
        "--database-server",
        default=os.environ.get("CRM_BENCH_DATABASE_URL", helpers.DEFAULT_DATABASE_SERVER),
    )
    parser.add_argument(
        "--redis", default=os.environ.get("CRM_BENCH_REDIS_URL", helpers.DEFAULT_REDIS)
    )
    parser.add_argument("--redis-db", type=int, default=4, help="Redis database index (flushed!)")
    parser.add_argument("--keep", action="store_true", help="keep the database and worker logs")
    parser.add_argument("--json", type=Path, help="also write the figures to this file (run.py)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = None
    with helpers.sigterm_as_exit():
        try:
            world = helpers.new_world(args)
            helpers.create_world(world, args)
            env = helpers.worker_env(world, "WARNING")
            helpers.init_db(world, env)
            settings = Settings(
                database_url=world.database_url,
                broker_url=world.broker_url,
                data_dir=world.data_dir,
                log_level="WARNING",
            )
            world.app = helpers.noop_worker.create_noop_app(settings)
            world.engine = create_engine(world.database_url, isolation_level="AUTOCOMMIT")
            pipeline = helpers.start_worker(
                world, "pipeline", [helpers.crm_events_command(), "worker"], env
            )
            noop = helpers.start_worker(world, "no-op", helpers.noop_command(), env)
            helpers.wait_ready(world)
            helpers.load_parties(world, env)

            sample = typical_email(0, "size", pdf_bytes(70_000, 1))
            helpers.log(f"typical email: {len(sample)} bytes")
            stage = [stage_rate(settings, args.emails, f"s{r}") for r in range(args.repeats)]
            helpers.log(f"stage runs: {', '.join(f'{r:.1f}' for r in stage)} emails/s")
            if args.warmup:
                e2e_rate(world, args.warmup, "ew")
                helpers.run_noop(world, "email", "nw", args.warmup, 600)
                if args.batch_size:
                    e2e_rate(world, args.warmup, "bw", args.batch_size)
            end_to_end, noop_rates = [], []
            batched: dict[str, list[float]] = {"inline": [], "by reference": []}
            cpu: dict[str, float] = {}
            batch_cpu: dict[str, dict[str, float]] = {how: {} for how in batched}
            for r in range(args.repeats):
                end_to_end.append(measured(world, pipeline, cpu, args.e2e_emails, f"e{r}"))
                for how, rates in batched.items() if args.batch_size else ():
                    reference = settings if how == "by reference" else None
                    rates.append(
                        measured(
                            world,
                            pipeline,
                            batch_cpu[how],
                            args.e2e_emails,
                            f"b{r}{how[0]}",
                            args.batch_size,
                            reference,
                        )
                    )
                result = helpers.run_noop(world, "email", f"n{r}", args.e2e_emails, 600)
                noop_rates.append(args.e2e_emails / result.elapsed_s)
                helpers.log(
                    f"run {r + 1}: end to end {end_to_end[-1]:.1f} emails/s"
                    + "".join(
                        f", batches {how} {rates[-1]:.1f} emails/s"
                        for how, rates in batched.items()
                        if rates
                    )
                    + f", no-op {noop_rates[-1]:.0f} tasks/s, load {helpers.load_average():.1f}"
                )
            for worker in (pipeline, noop):
                helpers.stop_worker(worker)
                world.workers.remove(worker)
            rows = memory(world, settings, env, int(args.big_mb * 1_000_000))
        except helpers.BenchError as exc:
            helpers.log(f"bench failed: {exc}")
            return 1
        finally:
            if world is not None:
                helpers.destroy_world(world, args.keep)

    median_stage, median_e2e = statistics.median(stage), statistics.median(end_to_end)
    median_noop = statistics.median(noop_rates)
    print(f"typical email: {len(sample) / 1000:.0f} kB with one {70_000 / 1000:.0f} kB attachment")
    print(
        f"stage (in process, commit per email): median {median_stage:.1f} emails/s"
        f" over {args.repeats} runs of {args.emails}; {median_stage / GOAL_RATE:.2f} × the goal"
    )
    print(
        f"end to end (Redis → worker, concurrency 2, tallies refreshed): median"
        f" {median_e2e:.1f} emails/s over {args.repeats} runs of {args.e2e_emails};"
        f" {median_e2e / GOAL_RATE:.2f} × the goal"
    )
    print(
        f"no-op baseline (same broker and worker settings): median {median_noop:.0f} tasks/s;"
        f" ratio end to end / no-op {median_e2e / median_noop:.2f}"
    )
    emails = args.e2e_emails * args.repeats
    print(f"CPU per email end to end (all {emails} emails of the runs above):")
    print_cpu(cpu, emails)
    median_batched = {how: statistics.median(rates) for how, rates in batched.items() if rates}
    for how, median in median_batched.items():
        print(
            f"batch path, emails {how} (crm.batch/1 of {args.batch_size} emails, same worker):"
            f" median {median:.1f} emails/s over {args.repeats} runs of {args.e2e_emails};"
            f" {median / GOAL_RATE:.2f} × the goal; CPU per email:"
        )
        print_cpu(batch_cpu[how], emails)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "stage_rate": median_stage,
                    "e2e_rate": median_e2e,
                    "noop_rate": median_noop,
                    "emails": args.e2e_emails,
                    "repeats": args.repeats,
                    "cpu_ms": sum(cpu.values()) * 1000 / emails,
                    "batch_rate": median_batched.get("inline"),
                    "batch_ref_rate": median_batched.get("by reference"),
                    "batch_size": args.batch_size,
                    "email_bytes": len(sample),
                    "memory": rows,
                    "load": helpers.load_average(),
                }
            )
        )
    for row in rows:
        mb = 1_000_000
        growth = row["peak"] - row["before"]
        print(
            f"{row['size'] / mb:.1f} MB email via {row['how']}: worker child RSS before"
            f" {row['before'] / mb:.0f} MB, peak {row['peak'] / mb:.0f} MB, growth"
            f" {growth / mb:.0f} MB = {growth / row['size']:.2f} × the message"
            f" (peak {row['peak'] / row['size']:.2f} × the message); {row['seconds']:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
