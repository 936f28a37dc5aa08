"""Email stage benchmark: throughput of a typical email, and a worker's memory for a 25 MB one.

Three measurements on a scratch PostgreSQL database and a dedicated Redis database:

* **stage**: N distinct "typical" emails (about 100 kB: a short Finnish text and one 70 kB PDF
  attachment, base64) through ``ingest_email`` in this process, one transaction (commit) per
  email as a worker runs it, without the broker and without the after-commit seller refresh.
  Reported as emails/s (median of ``--repeats`` runs).
* **end to end**: N such emails published as ``crm.ingest.email`` messages (``raw_b64``) to a
  real ``crm-events worker --concurrency 2`` over Redis; the clock runs from the first publish
  until every message has its ``delivery`` row (stored). The seller refreshes the worker
  enqueues run in the same pool meanwhile. Reported as emails/s (median).
* **memory**: one 25 MB email (a text and one 18.5 MB attachment) through a worker with one
  prefork child, both as the SMTP gateway hands it over (stored first, ``raw_ref``) and inline
  (``raw_b64`` in the Redis message). The child's peak RSS (VmHWM, reset through
  ``/proc/PID/clear_refs`` just before the email) is compared with its RSS before the email
  and with the message size.

Setup: a scratch database created on the server of ``--database`` and dropped at the end, Redis
database ``--redis-db`` (flushed at start and end; refused when another run holds it), the
sample parties of ``examples/parties.json``. Senders vary over the customer's domain, as mail
from many people would (one sender would meet the mail-loop limit, by design).

    .venv/bin/python bench/email_throughput.py --emails 300 --e2e-emails 600 --repeats 3
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
# This file is named email.py: its folder must not shadow the standard library's email package.
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR)]

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

import redis  # noqa: E402
from sqlalchemy import create_engine, func, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from config.settings import Settings  # noqa: E402
from models.db import create_db_engine, create_session_factory, transaction  # noqa: E402
from models.ledger import Delivery  # noqa: E402
from models.migrate import install_default_catalogue, upgrade  # noqa: E402
from tasks.attach import store_blob  # noqa: E402
from tasks.context import StageContext  # noqa: E402
from tasks.ingest.email import ingest_email  # noqa: E402
from tasks.ingest.party import ingest_party  # noqa: E402
from workers.app import create_app  # noqa: E402

CLAIM_KEY = "crm-events-bench-email:claimed-by"
GOAL_RATE = 100.0
GOAL_RSS_RATIO = 4.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


@contextmanager
def world(args: argparse.Namespace) -> Iterator[Settings]:
    base = make_url(args.database)
    name = f"crm_bench_email_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    client = redis.Redis.from_url(f"{args.redis}/{args.redis_db}", socket_timeout=10)
    if not client.set(CLAIM_KEY, str(os.getpid()), nx=True, ex=3600):
        raise SystemExit(f"Redis database {args.redis_db} is in use: choose another --redis-db")
    client.flushdb()
    client.set(CLAIM_KEY, str(os.getpid()), ex=3600)
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    tmp = Path(tempfile.mkdtemp(prefix="crm-bench-email-"))
    settings = Settings(
        data_dir=tmp,
        database_url=base.set(database=name).render_as_string(hide_password=False),
        broker_url=f"{args.redis}/{args.redis_db}",
        redis_url=f"{args.redis}/{args.redis_db}",
        log_level="WARNING",
    )
    engine = create_db_engine(settings)
    try:
        upgrade(engine)
        sessions = create_session_factory(engine)
        with transaction(sessions) as session:
            install_default_catalogue(session)
            ctx = StageContext(settings, task_id="bench-parties")
            for party in json.loads((ROOT / "examples/parties.json").read_text()):
                ingest_party(session, ctx, party)
        log(f"scratch database {name}, Redis db {args.redis_db}, files in {tmp}")
        yield settings
    finally:
        engine.dispose()
        client.flushdb()
        client.close()
        if not args.keep:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    env.update(
        CRM_DATABASE_URL=settings.database_url,
        CRM_BROKER_URL=settings.broker_url,
        CRM_REDIS_URL=settings.redis_url,
        CRM_DATA_DIR=str(settings.data_dir),
        CRM_LOG_LEVEL="WARNING",
    )
    return env


@contextmanager
def worker(settings: Settings, concurrency: int) -> Iterator[subprocess.Popen[bytes]]:
    log_file = open(settings.data_dir / f"worker-{concurrency}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "worker",
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"bench-{uuid.uuid4().hex[:6]}@%h",
        ],
        env=worker_env(settings),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )
    app = create_app(settings)
    deadline = time.monotonic() + 120
    while not app.control.ping(timeout=1):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start; see {log_file.name}")
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log_file.close()


def publish_and_wait(settings: Settings, messages: list[dict[str, Any]], timeout: float) -> float:
    app = create_app(settings)
    engine = create_db_engine(settings)
    sessions = create_session_factory(engine)
    ids = [str(uuid.uuid4()) for _ in messages]
    started = time.perf_counter()
    for task_id, payload in zip(ids, messages, strict=True):
        app.send_task("crm.ingest.email", args=[payload], task_id=task_id, queue="crm.ingest.email")
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as session:
            done = session.scalar(
                select(func.count()).select_from(Delivery).where(Delivery.task_id.in_(ids))
            )
        if done == len(ids):
            elapsed = time.perf_counter() - started
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"only {done} of {len(ids)} emails processed in {timeout} s")
        time.sleep(0.02)
    with sessions() as session:
        outcomes = session.execute(
            select(Delivery.outcome, func.count())
            .where(Delivery.task_id.in_(ids))
            .group_by(Delivery.outcome)
        ).all()
    engine.dispose()
    if dict(outcomes) != {"stored": len(ids)}:
        raise SystemExit(f"unexpected outcomes: {dict(outcomes)}")
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


def e2e_rate(settings: Settings, count: int, run: str) -> float:
    attachment = pdf_bytes(70_000, 2)
    messages = [message(typical_email(n, run, attachment)) for n in range(count)]
    return count / publish_and_wait(settings, messages, timeout=600)


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
        raise SystemExit(f"expected one pool child, found {children}")
    return int(children[0])


def memory(settings: Settings, size: int) -> list[dict[str, Any]]:
    big_attachment = pdf_bytes(int(size * 0.74), 3)
    rows = []
    with worker(settings, 1) as process:
        child = pool_child(process.pid)
        warm = pdf_bytes(70_000, 4)
        publish_and_wait(settings, [message(typical_email(0, "warm", warm))], timeout=120)
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
            elapsed = publish_and_wait(settings, [payload], timeout=600)
            peak = status(child)["VmHWM"]
            rows.append(
                {"how": how, "size": len(raw), "before": before, "peak": peak, "seconds": elapsed}
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--emails", type=int, default=300, help="emails per stage run")
    parser.add_argument("--e2e-emails", type=int, default=600, help="emails per end-to-end run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-mb", type=float, default=25.0, help="size of the big email, MB")
    parser.add_argument(
        "--database", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--redis-db", type=int, default=4, help="Redis database (flushed!)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()

    with world(args) as settings:
        sample = typical_email(0, "size", pdf_bytes(70_000, 1))
        log(f"typical email: {len(sample)} bytes")
        stage = [stage_rate(settings, args.emails, f"s{r}") for r in range(args.repeats)]
        log(f"stage runs: {', '.join(f'{r:.1f}' for r in stage)} emails/s")
        with worker(settings, 2):
            end_to_end = [e2e_rate(settings, args.e2e_emails, f"e{r}") for r in range(args.repeats)]
        log(f"end-to-end runs: {', '.join(f'{r:.1f}' for r in end_to_end)} emails/s")
        rows = memory(settings, int(args.big_mb * 1_000_000))

    median_stage, median_e2e = statistics.median(stage), statistics.median(end_to_end)
    print(f"typical email: {len(sample) / 1000:.0f} kB with one {70_000 / 1000:.0f} kB attachment")
    print(
        f"stage (in process, commit per email): median {median_stage:.1f} emails/s"
        f" over {args.repeats} runs of {args.emails}; {median_stage / GOAL_RATE:.2f} × the goal"
    )
    print(
        f"end to end (Redis → worker, concurrency 2): median {median_e2e:.1f} emails/s"
        f" over {args.repeats} runs of {args.e2e_emails}; {median_e2e / GOAL_RATE:.2f} × the goal"
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
