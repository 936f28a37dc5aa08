"""A backfill of CDR rows through ``crm-events import cdr``, against its baselines of the same run.

Sets up the throw-away world of ``pipeline.py`` (scratch PostgreSQL database, claimed Redis
database, the sample parties through the worker), writes an Asterisk Master.csv of ``--rows``
distinct calls (answered and missed, from the sample contacts to agents 201 and 202, spread over
the last year), and measures, end to end:

* import: ``crm-events import cdr FILE --wait`` as a subprocess, from its start (reading and
  translating the file, publishing ``crm.batch/1`` batches of ``--batch-size``) until every row
  has its outcome in ``delivery``, processed by ``crm-events worker --concurrency 2`` (or
  ``--concurrency``: the baseline keeps 2, the issue's delivery settings). Reported as
  events/s, with the worker's and PostgreSQL's CPU per event;
* bare: ``--bare`` no-op tasks through ``bench/bare_worker.py`` (Celery itself, the same
  delivery settings: JSON, late acks, prefetch 1, concurrency 2): what one message per event
  would allow at best;
* a late file: ``--late`` rows of another PBX's file of the same year, imported after the
  first (its calls fall among the stored ones, as a second site's or an earlier month's file
  does): events/s against the first file's, which ought to be about the same, and its CPU
  per event. PostgreSQL's statistics are renewed first (``ANALYZE``), as autovacuum does
  within a minute or so of a large import; ``--stale-statistics`` imports it with those of
  before the first file (where autovacuum is off, as it may be on a bench machine);
* PostgreSQL: the same number of rows inserted by one client with ``executemany`` into a table
  of the call's main columns (one transaction): what the database takes batched, with nothing of
  the pipeline around it.

Then it checks that every row was stored exactly once and that the tallies agree with a recount.

    .venv/bin/python bench/bulk_import.py                       # 100,000 rows
    .venv/bin/python bench/bulk_import.py --rows 20000 --bare 5000

Inherited ``CRM_*`` variables are ignored; the workers get their own (see ``pipeline.py``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import random
import re
import resource
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [*(p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR), str(BENCH_DIR)]

import bare_worker  # noqa: E402
import pipeline  # noqa: E402

#: The sample contacts' numbers (examples/parties.json) and our agents' extensions.
CALLERS = ("0401234567", "0447654321", "0452223333", "094321000")
AGENTS = ("201", "202")
SUMMARY = re.compile(r"(\d+) CDR row\(s\) published in (\d+) batch\(es\): (.*)")


@dataclass
class Figures:
    rows: int
    batch_size: int
    concurrency: int
    load: float
    import_s: float
    outcomes: str
    worker_cpu_ms: float
    db_cpu_ms: float
    import_cpu_ms: float
    redis_cpu_ms: float
    bare_n: int
    bare_s: float
    bare_cpu_ms: float
    pg_s: float
    events_stored: int
    drift: int
    late_rows: int = 0
    late_s: float = 0.0
    late_stored: int = 0
    late_worker_cpu_ms: float = 0.0
    late_db_cpu_ms: float = 0.0
    late_import_cpu_ms: float = 0.0
    late_analyzed: bool = True

    @property
    def import_rate(self) -> float:
        return self.rows / self.import_s

    @property
    def total_cpu_ms(self) -> float:
        return self.worker_cpu_ms + self.db_cpu_ms + self.import_cpu_ms + self.redis_cpu_ms

    @property
    def bare_rate(self) -> float:
        return self.bare_n / self.bare_s

    @property
    def pg_rate(self) -> float:
        return self.rows / self.pg_s

    @property
    def late_rate(self) -> float:
        return self.late_rows / self.late_s if self.late_s else 0.0


def master_csv(rows: int, run_id: str, seed: int = 1) -> str:
    """Asterisk's Master.csv (no header, 18 columns) of ``rows`` distinct calls, in time order."""
    rng = random.Random(seed)
    now = datetime.now(UTC).replace(microsecond=0)
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_ALL)
    # Asterisk appends a row as each call ends: a file is in time order.
    starts = sorted(now - timedelta(seconds=rng.randrange(3600, 365 * 86400)) for _ in range(rows))
    for i, start in enumerate(starts):
        caller, agent = rng.choice(CALLERS), rng.choice(AGENTS)
        answered = rng.random() < 0.8
        talk = rng.randrange(20, 900) if answered else 0
        ring = rng.randrange(3, 25)
        end = start + timedelta(seconds=ring + talk)
        stamp = "%Y-%m-%d %H:%M:%S"
        writer.writerow(
            [
                "",
                caller,
                agent,
                "from-pstn",
                f'"{caller}" <{caller}>',
                f"PJSIP/trunk-{i:08x}",
                f"PJSIP/{agent}-{i:08x}",
                "Dial",
                f"PJSIP/{agent},30",
                start.strftime(stamp),
                (start + timedelta(seconds=ring)).strftime(stamp) if answered else "",
                end.strftime(stamp),
                ring + talk,
                talk,
                "ANSWERED" if answered else "NO ANSWER",
                "DOCUMENTATION",
                f"{run_id}.{i}",
                "",
            ]
        )
    return out.getvalue()


def run_import(
    world: pipeline.World, env: dict[str, str], path: Path, batch_size: int, timeout: float
) -> tuple[float, str, float]:
    """``crm-events import cdr`` with ``--wait``: its wall time, its outcome counts and its CPU
    seconds (reading, translating and publishing the file, then waiting)."""
    pipeline.renew_claim(world)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [
            pipeline.crm_events_command(),
            "import",
            "cdr",
            str(path),
            "--time-zone",
            "UTC",
            "--batch-size",
            str(batch_size),
            "--wait",
            str(timeout),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout + 120,
    )
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    if done.returncode != 0:
        raise pipeline.BenchError(
            f"crm-events import cdr exited with {done.returncode}:\n{done.stdout[-2000:]}"
            f"\n{done.stderr[-4000:]}"
        )
    found = SUMMARY.search(done.stdout)
    if not found:
        raise pipeline.BenchError(f"no summary from crm-events import cdr:\n{done.stdout}")
    return elapsed, found.group(3), cpu


PG_BASELINE_TABLE = """
CREATE TEMPORARY TABLE bench_call_rows (
    source_system text NOT NULL,
    call_id text NOT NULL,
    started_at timestamptz NOT NULL,
    direction text NOT NULL,
    status text NOT NULL,
    duration_s integer NOT NULL,
    contact_number text NOT NULL,
    agent text NOT NULL,
    PRIMARY KEY (source_system, call_id)
)
"""


def stored_calls(world: pipeline.World, run_id: str) -> int:
    """The call events stored from the rows of the file ``master_csv`` wrote for ``run_id``."""
    from sqlalchemy import text

    with world.engine.connect() as connection:
        count: int = connection.execute(
            text("SELECT count(*) FROM crm_event WHERE source_kind = 'call' AND source_id LIKE :p"),
            {"p": f"{run_id}.%"},
        ).scalar_one()
    return count


def run_pg_baseline(world: pipeline.World, rows: int) -> float:
    """Seconds one client takes to insert ``rows`` call rows with executemany, committed."""
    from sqlalchemy import create_engine, text

    engine = create_engine(world.database_url)
    rng = random.Random(2)
    now = datetime.now(UTC)
    data = [
        {
            "source_system": "pbx",
            "call_id": f"baseline-{i}",
            "started_at": now - timedelta(seconds=rng.randrange(3600, 365 * 86400)),
            "direction": "inbound",
            "status": "completed",
            "duration_s": rng.randrange(20, 900),
            "contact_number": rng.choice(CALLERS),
            "agent": rng.choice(AGENTS),
        }
        for i in range(rows)
    ]
    insert = text(
        "INSERT INTO bench_call_rows VALUES (:source_system, :call_id, :started_at, :direction, "
        ":status, :duration_s, :contact_number, :agent) ON CONFLICT DO NOTHING"
    )
    try:
        with engine.connect() as connection:
            connection.execute(text(PG_BASELINE_TABLE))
            connection.commit()
            start = time.perf_counter()
            with connection.begin():
                connection.execute(insert, data)
            return time.perf_counter() - start
    finally:
        engine.dispose()


def measure(args: argparse.Namespace) -> Figures:
    from sqlalchemy import create_engine

    from config.settings import Settings

    run_id = uuid.uuid4().hex[:8]
    world = pipeline.new_world(args)
    try:
        pipeline.create_world(world, args)
        env = pipeline.worker_env(world, args.log_level)
        pipeline.init_db(world, env)
        settings = Settings(
            database_url=world.database_url, broker_url=world.broker_url, data_dir=world.data_dir
        )
        world.app = pipeline.noop_worker.create_noop_app(settings)
        world.engine = create_engine(world.database_url, isolation_level="AUTOCOMMIT")
        worker = pipeline.start_worker(
            world,
            "pipeline",
            [pipeline.crm_events_command(), "worker"],
            env,
            concurrency=args.concurrency,
        )
        bare = pipeline.start_worker(
            world, "bare", pipeline.bare_command(world.broker_url, args.log_level), env
        )
        world.bare_app = bare_worker.create_bare_app(world.broker_url)
        pipeline.wait_ready(world)
        pipeline.load_parties(world, env)
        if args.warmup:
            warm = world.tmp / "warmup.csv"
            warm.write_text(master_csv(args.warmup, f"w{run_id}", seed=3))
            run_import(world, env, warm, args.batch_size, args.timeout)
            pipeline.run_bare(world, run_id, "w", min(args.warmup, args.bare), args.timeout)
            pipeline.log(f"warm-up done ({args.warmup} rows)")

        path = world.tmp / "Master.csv"
        path.write_text(master_csv(args.rows, run_id))
        load = pipeline.load_average()
        cpu_before, db_before = pipeline.cpu_seconds(worker), pipeline.database_cpu_seconds(world)
        redis_before = pipeline.redis_cpu_seconds()
        pipeline.log(f"importing {args.rows} rows")
        import_s, outcomes, import_cpu = run_import(world, env, path, args.batch_size, args.timeout)
        worker_cpu = pipeline.cpu_seconds(worker) - cpu_before
        db_cpu = pipeline.database_cpu_seconds(world) - db_before
        redis_cpu = pipeline.redis_cpu_seconds() - redis_before
        pipeline.log(f"import done in {import_s:.1f} s: {outcomes}")
        late_s = late_worker = late_db = late_import = 0.0
        if args.late:
            late = world.tmp / "Master-late.csv"
            late.write_text(master_csv(args.late, f"l{run_id}", seed=2))
            if not args.stale_statistics:
                with world.engine.connect() as connection:
                    connection.exec_driver_sql("ANALYZE")
            pipeline.log(f"importing a late file of {args.late} rows of the same year")
            cpu_before, db_before = (
                pipeline.cpu_seconds(worker),
                pipeline.database_cpu_seconds(world),
            )
            late_s, late_outcomes, late_import = run_import(
                world, env, late, args.batch_size, args.timeout
            )
            late_worker = pipeline.cpu_seconds(worker) - cpu_before
            late_db = pipeline.database_cpu_seconds(world) - db_before
            pipeline.log(f"late import done in {late_s:.1f} s: {late_outcomes}")

        bare_cpu_before = pipeline.cpu_seconds(bare)
        result = pipeline.run_bare(world, run_id, "b", args.bare, args.timeout)
        bare_cpu = pipeline.cpu_seconds(bare) - bare_cpu_before
        pg_s = run_pg_baseline(world, args.rows)
        stored, late_stored = (stored_calls(world, prefix) for prefix in (run_id, f"l{run_id}"))
        return Figures(
            rows=args.rows,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            load=load,
            import_s=import_s,
            outcomes=outcomes,
            worker_cpu_ms=worker_cpu * 1000 / args.rows,
            db_cpu_ms=db_cpu * 1000 / args.rows,
            import_cpu_ms=import_cpu * 1000 / args.rows,
            redis_cpu_ms=redis_cpu * 1000 / args.rows,
            bare_n=args.bare,
            bare_s=result.elapsed_s,
            bare_cpu_ms=bare_cpu * 1000 / args.bare,
            pg_s=pg_s,
            events_stored=stored,
            drift=pipeline.tally_drift(world),
            late_rows=args.late,
            late_s=late_s,
            late_stored=late_stored,
            late_worker_cpu_ms=late_worker * 1000 / max(args.late, 1),
            late_db_cpu_ms=late_db * 1000 / max(args.late, 1),
            late_import_cpu_ms=late_import * 1000 / max(args.late, 1),
            late_analyzed=not args.stale_statistics,
        )
    finally:
        pipeline.destroy_world(world, args.keep)


def report(f: Figures) -> None:
    cores = os.cpu_count() or 1
    print()
    print(
        f"import cdr: {f.rows} rows in {f.import_s:.1f} s = {f.import_rate:.0f} events/s "
        f"(batches of {f.batch_size}, {f.concurrency} worker processes; load average "
        f"{f.load:.1f} at the start): {f.outcomes}"
    )
    print(
        f"  CPU per event: worker {f.worker_cpu_ms:.2f} ms, PostgreSQL backends "
        f"{f.db_cpu_ms:.2f} ms, the import command {f.import_cpu_ms:.2f} ms, Redis "
        f"{f.redis_cpu_ms:.2f} ms; {f.total_cpu_ms:.2f} ms in all: at most "
        f"{cores * 1000 / f.total_cpu_ms:,.0f} events/s on this machine's {cores} cores"
    )
    if f.late_rows:
        print(
            f"a late file of the same year: {f.late_rows} rows in {f.late_s:.1f} s = "
            f"{f.late_rate:.0f} events/s ({f.late_rate / f.import_rate:.2f} x the first file's"
            + (", statistics renewed first)" if f.late_analyzed else ", stale statistics)")
            + ("" if f.late_stored == f.late_rows else "  WARNING: not exactly one per row")
        )
        print(
            f"  CPU per event: worker {f.late_worker_cpu_ms:.2f} ms, PostgreSQL backends "
            f"{f.late_db_cpu_ms:.2f} ms, the import command {f.late_import_cpu_ms:.2f} ms"
        )
    print(
        f"bare Celery: {f.bare_n} no-op tasks in {f.bare_s:.1f} s = {f.bare_rate:.0f} tasks/s "
        f"(worker CPU {f.bare_cpu_ms:.2f} ms per task)"
    )
    print(f"PostgreSQL executemany: {f.rows} rows in {f.pg_s:.2f} s = {f.pg_rate:.0f} rows/s")
    print(
        f"ratios: import / bare {f.import_rate / f.bare_rate:.2f}, "
        f"import / PostgreSQL executemany {f.import_rate / f.pg_rate:.3f}; goal 5000 events/s: "
        f"{f.import_rate / 5000:.2f}"
    )
    print(
        f"events stored: {f.events_stored} of {f.rows} rows"
        + ("" if f.events_stored == f.rows else "  WARNING: not exactly one per row")
    )
    print(
        "tallies agree with a recount of the events"
        if f.drift == 0
        else f"WARNING: {f.drift} tally key(s) differ from a recount"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="crm-events import cdr end to end vs bare Celery and PostgreSQL executemany.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=100_000, help="CDR rows to import")
    parser.add_argument("--batch-size", type=int, default=500, help="rows per crm.batch/1")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=2,
        help="processes of the importing worker (the bare baseline keeps 2)",
    )
    parser.add_argument("--bare", type=int, default=10_000, help="bare no-op tasks (baseline)")
    parser.add_argument("--warmup", type=int, default=1000, help="unmeasured rows first")
    parser.add_argument(
        "--late", type=int, default=20_000, help="rows of a late file of the same year (0: none)"
    )
    parser.add_argument(
        "--stale-statistics",
        action="store_true",
        help="import the late file without renewing PostgreSQL's statistics first",
    )
    parser.add_argument("--redis-db", type=int, default=13, help="Redis database index (flushed!)")
    parser.add_argument(
        "--redis",
        default=os.environ.get("CRM_BENCH_REDIS_URL", pipeline.DEFAULT_REDIS),
        help="Redis server URL (env CRM_BENCH_REDIS_URL)",
    )
    parser.add_argument(
        "--database-server",
        default=os.environ.get("CRM_BENCH_DATABASE_URL", pipeline.DEFAULT_DATABASE_SERVER),
        help="PostgreSQL server URL for CREATE/DROP DATABASE (env CRM_BENCH_DATABASE_URL)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the database and worker logs")
    parser.add_argument(
        "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the import")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)
    if min(args.rows, args.bare, args.concurrency) < 1 or min(args.warmup, args.late) < 0:
        parser.error("--rows, --bare and --concurrency positive, --warmup and --late not negative")
    if not 1 <= args.batch_size <= 1000:
        parser.error("--batch-size 1..1000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with pipeline.sigterm_as_exit():
        try:
            figures = measure(args)
        except pipeline.BenchError as exc:
            pipeline.log(f"bench failed: {exc}")
            return 1
    report(figures)
    if args.json:
        data = {
            **dataclasses.asdict(figures),
            "import_rate": figures.import_rate,
            "bare_rate": figures.bare_rate,
            "pg_rate": figures.pg_rate,
            "late_rate": figures.late_rate,
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    exact = figures.events_stored == figures.rows and figures.late_stored == figures.late_rows
    return 0 if exact and figures.drift == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
