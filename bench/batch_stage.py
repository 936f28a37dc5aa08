"""The set-based call stage in process: CPU per event of ``ingest_batch`` and of its database.

Creates a scratch PostgreSQL database (the schema and the sample parties), writes the CDR calls
of ``bulk_import.py``'s Master.csv (``--calls``, translated by the import's own reader), and
stores them through ``tasks.batch.ingest_batch`` in ``crm.batch/1`` batches of
``--batch-size``, one transaction each, as a pool process of the worker does (its garbage
collector set the same way). No broker, no worker process, no import command: what is left is
the stage and PostgreSQL, the two largest parts of an imported event's CPU.

For each batch it takes the process's CPU time and that of the session's PostgreSQL backend
(from ``/proc``), and between batches it times a fixed loop of Python arithmetic, the
reference. This machine's speed varies by half within minutes (a bare Celery task has cost
1.0 to 2.0 ms of CPU in one evening), so a figure is printed twice: in milliseconds per event,
and in units of the reference (per event, ×1000), which changes little when the machine slows
down as a whole. To compare two versions of the code, run this in each alternately, several
times, and compare the medians of the normalised figures.

    .venv/bin/python bench/batch_stage.py                    # 10,000 calls in batches of 500
    .venv/bin/python bench/batch_stage.py --repeats 3 --profile stage.prof

Inherited ``CRM_*`` variables are ignored.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path[:] = [*(p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR), str(BENCH_DIR)]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bulk_import  # noqa: E402
import pipeline  # noqa: E402


def reference_seconds() -> float:
    """CPU seconds of a fixed loop of Python arithmetic (a few milliseconds)."""
    start = time.process_time()
    sum(i * i for i in range(60_000))
    return time.process_time() - start


def backend_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--calls", type=int, default=10_000, help="calls measured per repeat")
    parser.add_argument("--batch-size", type=int, default=500, help="calls per crm.batch/1")
    parser.add_argument("--warmup", type=int, default=1000, help="unmeasured calls first")
    parser.add_argument("--repeats", type=int, default=1, help="measured passes (new calls each)")
    parser.add_argument(
        "--database-server",
        default=os.environ.get("CRM_BENCH_DATABASE_URL", pipeline.DEFAULT_DATABASE_SERVER),
        help="PostgreSQL server URL for CREATE/DROP DATABASE (env CRM_BENCH_DATABASE_URL)",
    )
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the passes here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args(argv)

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from config.settings import Settings
    from models.db import create_db_engine, create_session_factory, transaction
    from models.migrate import init_database
    from tasks.batch import ingest_batch
    from tasks.context import StageContext
    from tasks.ingest.party import ingest_party
    from tasks.telephony.adapters import CdrContext
    from workers.base import GC_THRESHOLDS
    from workers.cli.telephony import read_cdr_messages

    name = f"crm_bench_stage_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(args.database_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(args.database_server).set(database=name).render_as_string(hide_password=False)
    engine = None
    try:
        settings = Settings(database_url=url)
        engine = create_db_engine(settings)
        sessions = create_session_factory(engine)
        init_database(engine, sessions)
        with transaction(sessions) as session:
            setup = StageContext(settings, "bench-parties", "crm.ingest.party")
            parties = json.loads((ROOT / "examples" / "parties.json").read_text("utf-8"))
            for party in parties:
                ingest_party(session, setup, party)

        total = args.warmup + args.calls * args.repeats
        errors: list[dict[str, object]] = []
        csv_text = bulk_import.master_csv(total, uuid.uuid4().hex[:8])
        calls = [m for _label, m in read_cdr_messages(csv_text, CdrContext(), "bench", errors)]
        if errors or len(calls) != total:
            raise SystemExit(f"the Master.csv gave {len(calls)} calls and {len(errors)} errors")

        # As a pool process of the worker (workers.base.collect_less_often).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)

        def store(part: list[dict[str, object]]) -> tuple[float, float, list[float]]:
            client = backend = 0.0
            references: list[float] = []
            for start in range(0, len(part), args.batch_size):
                message = {
                    "schema": "crm.batch/1",
                    "source_system": "bench",
                    "kind": "call",
                    "messages": part[start : start + args.batch_size],
                }
                context = StageContext(settings, f"bench-{uuid.uuid4().hex}", "crm.ingest.batch")
                with transaction(sessions) as session:
                    pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
                    client_before, backend_before = time.process_time(), backend_cpu_seconds(pid)
                    ingest_batch(session, context, message, queue_of=lambda queue: queue)
                    session.flush()
                    client += time.process_time() - client_before
                    backend += backend_cpu_seconds(pid) - backend_before
                references.append(reference_seconds())
            return client, backend, references

        store(calls[: args.warmup])
        profile = cProfile.Profile() if args.profile else None
        rows = []
        for repeat in range(args.repeats):
            part = calls[
                args.warmup + repeat * args.calls : args.warmup + (repeat + 1) * args.calls
            ]
            if profile:
                profile.enable()
            client, backend, references = store(part)
            if profile:
                profile.disable()
            reference = statistics.mean(references)
            per_client, per_backend = client / len(part), backend / len(part)
            rows.append((per_client, per_backend, reference))
            print(
                f"pass {repeat + 1}: {len(part)} calls; CPU per event: stage {per_client * 1e3:.4f}"
                f" ms, PostgreSQL backend {per_backend * 1e3:.4f} ms; reference"
                f" {reference * 1e3:.3f} ms; normalised (per event / reference x 1000): stage"
                f" {per_client / reference * 1e3:.2f},"
                f" PostgreSQL {per_backend / reference * 1e3:.2f};"
                f" load average {pipeline.load_average():.2f}",
                flush=True,
            )
        if profile:
            profile.dump_stats(args.profile)
        if args.repeats > 1:
            print(
                "median normalised: stage"
                f" {statistics.median(c / r * 1e3 for c, _b, r in rows):.2f}, PostgreSQL"
                f" {statistics.median(b / r * 1e3 for _c, b, r in rows):.2f}"
            )
        return 0
    finally:
        if engine is not None:
            engine.dispose()
        if not args.keep:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        else:
            print(f"kept database {name}")
        admin.dispose()


if __name__ == "__main__":
    sys.exit(main())
