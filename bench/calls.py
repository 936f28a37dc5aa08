"""Call status updates per second, end to end through a real worker, against bare Celery tasks.

Measures, in the same run and on the same broker, database and settings:

* calls: N calls of four ``crm.ingest.call`` updates each (ringing, answered, completed, and the
  completed update once more, as a webhook retry does), published round by round as a PBX
  with many calls in progress sends them (every call's ringing, then every call's answer, …),
  all from one sample contact. The clock runs from the first publish until every update has
  its ``delivery`` row and the sellers' views are refreshed (``refresh_request`` empty).
  Reported as updates/s.
* no-op: N×4 ``bench.noop`` tasks (bench/noop_worker.py: the same Celery app and delivery
  settings, a task that only increments a Redis counter). Reported as tasks/s.
* bare: N×4 bare Celery tasks (bench/bare_worker.py: Celery itself, the same delivery
  settings), the baseline of the throughput goal.

Runs alternate; the medians, the ratios and the CPU per message (the worker's processes, and
PostgreSQL's backends for the calls) are printed, and every run is checked: exactly N events,
all completed, every update stored or a duplicate; then the tallies against a recount. The
throw-away world (a scratch PostgreSQL database, a Redis database index, ``crm-events worker
--concurrency 2``, the no-op and the bare worker) comes from bench/pipeline.py's helpers.

    .venv/bin/python bench/calls.py --calls 500 --repeats 3
    .venv/bin/python bench/calls.py --json figures.json   # also the medians as JSON
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
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import datetime, timedelta  # noqa: E402
from typing import Any  # noqa: E402

import pipeline as helpers  # noqa: E402  (bench/pipeline.py)

UPDATES_PER_CALL = 4


@dataclass
class Run:
    kind: str
    n: int
    elapsed_s: float
    stored_s: float | None = None
    detail: str = ""
    cpu_ms: float = 0.0  # the worker's CPU per message
    db_cpu_ms: float | None = None  # PostgreSQL's, for the calls
    load: float = 0.0  # the 1-minute load average at the run's start

    @property
    def rate(self) -> float:
        return self.n / self.elapsed_s


def call_updates(call_id: str, started: datetime) -> list[dict[str, Any]]:
    base = {
        "schema": "crm.call/1",
        "source_system": "pbx-bench",
        "call_id": call_id,
        "direction": "inbound",
        "from": helpers.CONTACT_NUMBER,
        "to": helpers.SWITCHBOARD,
        "agent": helpers.AGENT,
    }
    answered = started + timedelta(seconds=7)
    ended = answered + timedelta(seconds=240)
    completed = {
        **base,
        "sequence": 3,
        "status": "completed",
        "started_at": started.isoformat(timespec="seconds"),
        "answered_at": answered.isoformat(timespec="seconds"),
        "ended_at": ended.isoformat(timespec="seconds"),
        "duration_s": 240,
        "note": "Kysyi huoltosopimuksen jatkamisesta.",
    }
    return [
        {**base, "sequence": 1, "status": "ringing", "started_at": started.isoformat()},
        {**base, "sequence": 2, "status": "answered", "answered_at": answered.isoformat()},
        completed,
        completed,  # the provider's retry of the last callback: a duplicate
    ]


def run_calls(world: Any, run_id: str, tag: str, calls: int, timeout: float) -> Run:
    from sqlalchemy import text

    zone = world.app.conf.crm_settings.zone
    monday, span = helpers.week_so_far(zone)
    prefix = f"bench-{run_id}-{tag}-"
    per_call = [
        call_updates(f"{prefix}{i:06d}", monday + span * ((i + 0.5) / calls)) for i in range(calls)
    ]
    # As a PBX sends them: a call's updates are seconds or minutes apart, so the queue holds
    # the updates of many calls interleaved (round by round), not one call's back to back
    # (that worst case is tests/integration/test_calls_parallel.py).
    messages = [updates[k] for k in range(UPDATES_PER_CALL) for updates in per_call]
    task_ids = [f"{prefix}{uuid.uuid4()}" for _ in messages]
    worker = next(w for w in world.workers if w.label == "pipeline")
    log_offset = worker.log_path.stat().st_size
    poll = text(helpers.POLL_PIPELINE)
    with world.engine.connect() as connection:
        start = time.perf_counter()
        for message, task_id in zip(messages, task_ids, strict=True):
            world.app.send_task(
                "crm.ingest.call", args=[message], queue="crm.ingest.call", task_id=task_id
            )
        stored = None
        while True:
            done, requests = connection.execute(poll, {"prefix": prefix + "%"}).one()
            now = time.perf_counter() - start
            if done >= len(messages) and stored is None:
                stored = now
            if done >= len(messages) and requests == 0:
                break
            if now > timeout:
                raise helpers.BenchError(
                    f"calls run {tag}: after {timeout:.0f} s only {done}/{len(messages)} updates"
                )
            helpers.check_alive(world)
            time.sleep(helpers.POLL_INTERVAL_S)
        outcomes = dict(
            connection.execute(
                text(
                    "SELECT outcome, count(*) FROM delivery WHERE task_id LIKE :prefix "
                    "GROUP BY outcome"
                ),
                {"prefix": prefix + "%"},
            ).all()
        )
        events = dict(
            connection.execute(
                text(
                    "SELECT status, count(*) FROM crm_event WHERE source_id LIKE :prefix "
                    "GROUP BY status"
                ),
                {"prefix": prefix + "%"},
            ).all()
        )
    expected = {"stored": calls * 3, "duplicate": calls}
    if outcomes != expected or events != {"completed": calls}:
        raise helpers.BenchError(f"calls run {tag}: outcomes {outcomes}, events {events}")
    # With --log-level INFO the worker logs every task's run time: where the time went.
    times = helpers.task_times(worker, log_offset, None)
    detail = ""
    for name in ("crm.ingest.call", "crm.refresh.seller"):
        if times.get(name):
            detail += (
                f"; {len(times[name])} × {name} median "
                f"{statistics.median(times[name]) * 1000:.0f} ms"
            )
    return Run("calls", len(messages), now, stored, detail)


def run_noop(world: Any, run_id: str, tag: str, n: int, timeout: float) -> Run:
    result = helpers.run_noop(world, run_id, tag, n, timeout)
    return Run("no-op", n, result.elapsed_s)


def run_bare(world: Any, run_id: str, tag: str, n: int, timeout: float) -> Run:
    result = helpers.run_bare(world, run_id, tag, n, timeout)
    return Run("bare", n, result.elapsed_s)


def measured(world: Any, label: str, run: Any, *args: Any) -> Run:
    """``run(world, *args)``, with its worker's CPU per message (and PostgreSQL's)."""
    worker = next(w for w in world.workers if w.label == label)
    load = helpers.load_average()
    cpu_before, db_before = helpers.cpu_seconds(worker), helpers.database_cpu_seconds(world)
    result: Run = run(world, *args)
    result.cpu_ms = (helpers.cpu_seconds(worker) - cpu_before) * 1000 / result.n
    if result.kind == "calls":
        db_cpu = helpers.database_cpu_seconds(world) - db_before
        result.db_cpu_ms = db_cpu * 1000 / result.n
    result.load = load
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per run (4 updates each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=25, help="unmeasured calls first")
    parser.add_argument("--redis-db", type=int, default=6, help="Redis database index (flushed!)")
    parser.add_argument(
        "--redis", default=os.environ.get("CRM_BENCH_REDIS_URL", helpers.DEFAULT_REDIS)
    )
    parser.add_argument(
        "--database-server",
        default=os.environ.get("CRM_BENCH_DATABASE_URL", helpers.DEFAULT_DATABASE_SERVER),
    )
    parser.add_argument("--keep", action="store_true", help="keep the database and worker logs")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING"],
        help="of the workers; INFO also reports the task times",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--json", metavar="FILE", help="also write the medians to FILE as JSON")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        parser.error("--calls and --repeats must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sqlalchemy import create_engine

    from config.settings import Settings

    run_id = uuid.uuid4().hex[:8]
    world = None
    with helpers.sigterm_as_exit():
        try:
            world = helpers.new_world(args)
            helpers.create_world(world, args)
            env = helpers.worker_env(world, args.log_level)
            helpers.init_db(world, env)
            settings = Settings(
                database_url=world.database_url,
                broker_url=world.broker_url,
                data_dir=world.data_dir,
            )
            world.app = helpers.noop_worker.create_noop_app(settings)
            world.engine = create_engine(world.database_url, isolation_level="AUTOCOMMIT")
            helpers.start_worker(world, "pipeline", [helpers.crm_events_command(), "worker"], env)
            helpers.start_worker(world, "no-op", helpers.noop_command(), env)
            bare = helpers.bare_command(world.broker_url, args.log_level)
            helpers.start_worker(world, "bare", bare, env)
            world.bare_app = helpers.bare_worker.create_bare_app(world.broker_url)
            helpers.wait_ready(world)
            helpers.load_parties(world, env)
            if args.warmup:
                run_calls(world, run_id, "w", args.warmup, args.timeout)
                run_noop(world, run_id, "w", args.warmup * UPDATES_PER_CALL, args.timeout)
                run_bare(world, run_id, "w", args.warmup * UPDATES_PER_CALL, args.timeout)
            runs: list[Run] = []
            n = args.calls * UPDATES_PER_CALL
            for i in range(1, args.repeats + 1):
                for run in (
                    measured(
                        world, "pipeline", run_calls, run_id, f"c{i}", args.calls, args.timeout
                    ),
                    measured(world, "no-op", run_noop, run_id, f"n{i}", n, args.timeout),
                    measured(world, "bare", run_bare, run_id, f"b{i}", n, args.timeout),
                ):
                    unit = "updates" if run.kind == "calls" else "tasks"
                    extra = f", all stored at {run.stored_s:.2f} s" if run.stored_s else ""
                    extra += f"; worker CPU {run.cpu_ms:.2f} ms per message"
                    if run.db_cpu_ms is not None:
                        extra += f", PostgreSQL {run.db_cpu_ms:.2f} ms"
                    extra += run.detail + f"; load {run.load:.2f}"
                    print(
                        f"run {i}/{args.repeats} {run.kind:6} {run.n} {unit} in "
                        f"{run.elapsed_s:6.2f} s = {run.rate:6.0f} {unit}/s{extra}",
                        flush=True,
                    )
                    runs.append(run)

            def median(kind: str, figure: str = "rate") -> float:
                return statistics.median(getattr(r, figure) for r in runs if r.kind == kind)

            figures = {
                "calls": args.calls,
                "updates": n,
                "repeats": args.repeats,
                "calls_rate": median("calls"),
                "noop_rate": median("no-op"),
                "bare_rate": median("bare"),
                "calls_cpu_ms": median("calls", "cpu_ms"),
                "calls_db_cpu_ms": median("calls", "db_cpu_ms"),
                "noop_cpu_ms": median("no-op", "cpu_ms"),
                "bare_cpu_ms": median("bare", "cpu_ms"),
                "loads": [r.load for r in runs if r.kind == "calls"],
                "drift": helpers.tally_drift(world),
            }
            print()
            print(f"median of {args.repeats} run(s) of {args.calls} calls ({n} updates):")
            print(
                f"  call updates {figures['calls_rate']:.0f}/s, the app's no-op tasks "
                f"{figures['noop_rate']:.0f}/s, bare Celery tasks {figures['bare_rate']:.0f}/s; "
                f"ratio to bare {figures['calls_rate'] / figures['bare_rate']:.2f}"
            )
            print(
                f"  worker CPU per update {figures['calls_cpu_ms']:.2f} ms (bare Celery "
                f"{figures['bare_cpu_ms']:.2f} ms per task), PostgreSQL "
                f"{figures['calls_db_cpu_ms']:.2f} ms; tally drift {figures['drift']}"
            )
            if args.json:
                with open(args.json, "w", encoding="utf-8") as handle:
                    json.dump(figures, handle, indent=2)
            return 0 if figures["drift"] == 0 else 1
        except helpers.BenchError as exc:
            helpers.log(f"bench failed: {exc}")
            return 1
        finally:
            if world is not None:
                helpers.destroy_world(world, args.keep)


if __name__ == "__main__":
    sys.exit(main())
