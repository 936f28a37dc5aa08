"""Flat in a busy month and in history: call events end to end, and how soon they are seen.

The call pipeline of ``bench/pipeline.py`` (``crm.ingest.call`` up to counted tallies and told
screens), measured in one world in three phases, each with ``--repeats`` runs of ``--events``
calls alternating with as many bare Celery tasks (``bench/bare_worker.py``, the baseline of the
same moment):

1. **empty**: the database holds the sample parties and nothing else (besides a warm-up);
2. **history**: ``--history`` events (default 1,000,000) of twenty sellers (seller anna, the
   calls' agent, among them) and 2,000 customers over the year before this month, loaded by
   COPY, their tallies built by ``reconcile``;
3. **month**: ``--month`` more events (default 100,000) of seller anna this month, up to an
   hour ago: the seller the calls go to already has that many events this month.

It prints each phase's median rate and the ratios history / empty (a million stored events
against an empty database) and month / history (a seller's busy month against the same seller
with an empty month), raw and against the bare rate of the same phase (what the machine's load
did meanwhile). In the empty and the month phase it also publishes ``--latency-events`` calls
at half the empty phase's rate, one by one at an even pace, and prints the p50 and p95 from
publishing a call to

- **stored**: its ``delivery`` row (written in the event's own transaction);
- **visible**: the first notification on ``crm.seller.anna`` whose tallies count it (the
  seller view's live screens reload on it; cards are read from the events and tallies).

A call counts as seen when the week's tallies in a notification reach the number of calls stored
before it (calls in the order of their delivery rows) plus one.

    .venv/bin/python bench/flat.py                                  # 1,000,000 and 100,000
    .venv/bin/python bench/flat.py --history 100000 --month 10000   # a first look

The world (scratch database, claimed Redis database, workers, sample parties) comes from
``bench/pipeline.py``'s helpers and is removed at the end.
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
import logging  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from typing import Any  # noqa: E402

import pipeline as helpers  # noqa: E402  (bench/pipeline.py)
import psycopg  # noqa: E402
import refresh as loader  # noqa: E402  (bench/refresh.py: the generated events and their COPY)
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from config.settings import Settings  # noqa: E402
from models.db import create_db_engine, create_session_factory, snapshot  # noqa: E402
from tasks.maintenance import reconcile  # noqa: E402

SELLER = "anna"  # agent 201, the calls' seller
HISTORY_SELLERS = 20
HISTORY_CUSTOMERS = 2000


# -- loading ------------------------------------------------------------------------------------


def preload(
    world: helpers.World,
    count: int,
    sellers: list[int],
    customers: list[int],
    start: datetime,
    end: datetime,
    prefix: str,
) -> float:
    """COPY ``count`` generated events between ``start`` and ``end``, analyse, and build their
    tallies with the reconcile the nightly beat task runs; returns the seconds it took."""
    began = time.perf_counter()
    plain = make_url(world.database_url).set(drivername="postgresql")
    with psycopg.connect(plain.render_as_string(hide_password=False), autocommit=True) as db:
        with db.cursor() as cursor:
            rows = loader.event_rows(count, sellers, customers, end, start=start, prefix=prefix)
            loader.copy_events(cursor, rows)
        db.execute("VACUUM ANALYZE crm_event")
    engine = create_db_engine(Settings(database_url=world.database_url, data_dir=world.data_dir))
    # Loaded events have no tallies yet: the reconcile's warning about the drift it repairs
    # is expected here.
    logging.getLogger("tasks.maintenance").setLevel(logging.ERROR)
    try:
        with snapshot(create_session_factory(engine)) as session:
            reconcile(session)
    finally:
        engine.dispose()
    return time.perf_counter() - began


def history_parties(world: helpers.World) -> tuple[list[int], list[int]]:
    """Sellers (anna and 19 more) and 2,000 more customers for the year's events."""
    with world.engine.begin() as db:
        db.execute(
            text(
                "INSERT INTO staff (username, name, role, time_zone, active, placeholder, "
                "updated_at) SELECT 'bench-s' || n, 'Myyjä ' || n, 'seller', "
                "'Europe/Helsinki', true, false, now() "
                "FROM generate_series(1, :n) n"
            ),
            {"n": HISTORY_SELLERS - 1},
        )
        db.execute(
            text(
                "INSERT INTO customer (customer_number, name, placeholder, updated_at) "
                "SELECT 'B' || n, 'Asiakas ' || n, false, now() FROM generate_series(1, :n) n"
            ),
            {"n": HISTORY_CUSTOMERS},
        )
        sellers = list(
            db.scalars(
                text("SELECT id FROM staff WHERE username = :u OR username LIKE 'bench-s%'"),
                {"u": SELLER},
            )
        )
        customers = list(db.scalars(text("SELECT id FROM customer")))
    return sellers, customers


def seller_id(world: helpers.World) -> int:
    with world.engine.connect() as db:
        return db.scalar(text("SELECT id FROM staff WHERE username = :u"), {"u": SELLER})


# -- measuring ----------------------------------------------------------------------------------


def phase(world: helpers.World, run_id: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``--repeats`` pipeline runs alternating with bare runs; their medians."""
    pipeline_worker = world.workers[0]
    rates: dict[str, list[float]] = {"pipeline": [], "bare": []}
    cpu: list[float] = []
    loads: list[float] = []
    for i in range(1, args.repeats + 1):
        loads.append(helpers.load_average())
        before = helpers.cpu_seconds(pipeline_worker)
        result = helpers.run_pipeline(world, run_id, f"{name[0]}p{i}", args.events, args.timeout)
        cpu.append((helpers.cpu_seconds(pipeline_worker) - before) * 1000 / args.events)
        other = {k: v for k, v in result.outcomes.items() if k != "stored"}
        if other:
            raise helpers.BenchError(f"{name} run {i}: not every call was stored: {other}")
        rates["pipeline"].append(result.rate)
        rates["bare"].append(
            helpers.run_bare(world, run_id, f"{name[0]}b{i}", args.events, args.timeout).rate
        )
        helpers.log(
            f"{name} run {i}/{args.repeats}: pipeline {helpers.rate(result.rate)} events/s "
            f"({result.prior_events:,} events stored before), bare "
            f"{helpers.rate(rates['bare'][-1])} tasks/s, load {loads[-1]:.2f}"
        )
    return {
        "pipeline_rate": statistics.median(rates["pipeline"]),
        "bare_rate": statistics.median(rates["bare"]),
        "pipeline_cpu_ms": statistics.median(cpu),
        "runs": rates,
        "load": loads,
    }


class Notifications:
    """Every notification on ``crm.seller.<SELLER>`` with the time it arrived."""

    def __init__(self, world: helpers.World) -> None:
        self.seen: list[tuple[float, dict[str, Any]]] = []
        self.pubsub = world.redis.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(f"crm.seller.{SELLER}")
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.running = True
        self.thread.start()

    def _listen(self) -> None:
        while self.running:
            message = self.pubsub.get_message(timeout=0.1)
            if message is not None:
                self.seen.append((time.time(), json.loads(message["data"])))

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.pubsub.close()


def week_count(notification: dict[str, Any]) -> int:
    suffix = "/" + notification["week"]
    return sum(n for key, n in notification["tallies"].items() if key.endswith(suffix))


def latency(
    world: helpers.World, run_id: str, tag: str, n: int, rate: float, timeout: float
) -> dict[str, float]:
    """``n`` calls at ``rate`` per second; p50/p95 of publish → stored and publish → visible."""
    zone = world.app.conf.crm_settings.zone
    messages = helpers.call_messages(run_id, tag, n, zone)
    prefix = f"bench-{run_id}-{tag}-"
    task_ids = [f"{prefix}{i:06d}" for i in range(n)]
    helpers.renew_claim(world)
    listener = Notifications(world)
    try:
        time.sleep(0.2)  # the subscription is in place before the first call
        with world.engine.connect() as db:
            week = db.execute(
                text(
                    "SELECT coalesce(sum(t.count), 0) FROM tally t JOIN staff s "
                    "ON s.id = t.seller_id WHERE s.username = :u AND t.period = :week"
                ),
                {"u": SELLER, "week": week_of(messages[0], zone)},
            ).scalar_one()
        published: dict[str, float] = {}
        start = time.perf_counter()
        for i, (message, task_id) in enumerate(zip(messages, task_ids, strict=True)):
            pause = start + i / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            published[task_id] = time.time()
            world.app.send_task(
                "crm.ingest.call", args=[message], queue="crm.ingest.call", task_id=task_id
            )
        watchdog = helpers.Watchdog(world, f"latency run {tag}", timeout)
        poll = text(helpers.POLL_PIPELINE)
        while True:
            with world.engine.connect() as db:
                done, requests = db.execute(poll, {"prefix": prefix + "%"}).one()
            if (
                done >= n
                and requests == 0
                and listener.seen
                and (week_count(listener.seen[-1][1]) >= week + n)
            ):
                break
            watchdog.check((done, requests, len(listener.seen)), time.perf_counter() - start, (
                f"{done}/{n} delivered, {requests} refresh requests pending"
            ))  # fmt: skip
            time.sleep(helpers.POLL_INTERVAL_S)
        with world.engine.connect() as db:
            stored = db.execute(
                text(
                    "SELECT task_id, finished_at FROM delivery WHERE task_id LIKE :prefix "
                    "ORDER BY finished_at"
                ),
                {"prefix": prefix + "%"},
            ).all()
    finally:
        listener.close()
    to_stored, to_visible = [], []
    notifications = iter(listener.seen)
    arrived, notification = next(notifications)
    for rank, (task_id, finished) in enumerate(stored, start=1):
        finished_at = finished.replace(tzinfo=UTC).timestamp()
        to_stored.append(finished_at - published[task_id])
        while week_count(notification) < week + rank:
            arrived, notification = next(notifications)
        to_visible.append(arrived - published[task_id])
    return {
        "rate": rate,
        "stored_p50_ms": percentile(to_stored, 0.50) * 1000,
        "stored_p95_ms": percentile(to_stored, 0.95) * 1000,
        "visible_p50_ms": percentile(to_visible, 0.50) * 1000,
        "visible_p95_ms": percentile(to_visible, 0.95) * 1000,
        "notifications": len(listener.seen),
    }


def bare_latency(world: helpers.World, tag: str, n: int, rate: float) -> dict[str, float]:
    """The baseline: ``n`` bare Celery tasks at ``rate`` per second; p50/p95 from publishing a
    task to its counter increment (polled every millisecond: tasks done in order)."""
    key = f"bench:bare:latency:{tag}"
    helpers.renew_claim(world)
    published: list[float] = []
    done: list[float] = []

    def poll() -> None:
        client = world.redis.__class__.from_url(world.broker_url)
        deadline = time.time() + n / rate + 60
        while len(done) < n and time.time() < deadline:
            count = int(client.get(key) or 0)
            now = time.time()
            while len(done) < count:
                done.append(now)
            time.sleep(0.001)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start = time.perf_counter()
    for i in range(n):
        pause = start + i / rate - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        published.append(time.time())
        world.bare_app.send_task(
            helpers.bare_worker.BARE_TASK, args=[key], queue=helpers.bare_worker.BARE_QUEUE
        )
    poller.join()
    if len(done) < n:
        raise helpers.BenchError(f"bare latency run: {len(done)} of {n} tasks done")
    waits = [d - p for d, p in zip(done, published, strict=True)]
    return {"p50_ms": percentile(waits, 0.50) * 1000, "p95_ms": percentile(waits, 0.95) * 1000}


def week_of(message: dict[str, Any], zone: Any) -> str:
    from tasks.periods import period_keys

    return period_keys(datetime.fromisoformat(message["started_at"]), zone)[0]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Call events end to end in an empty database, with a year of history and "
        "with a busy month; publish-to-stored and publish-to-visible latency.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=300, metavar="N", help="calls per run")
    parser.add_argument("--repeats", type=int, default=3, metavar="R", help="runs per phase")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured calls first")
    parser.add_argument("--history", type=int, default=1_000_000, help="events of the past year")
    parser.add_argument("--month", type=int, default=100_000, help="the seller's events this month")
    parser.add_argument("--latency-events", type=int, default=300, help="calls of each latency run")
    parser.add_argument(
        "--latency-rate", type=float, help="calls/s of the latency runs (half the empty rate)"
    )
    parser.add_argument("--redis-db", type=int, default=13, help="Redis database index (flushed!)")
    parser.add_argument("--redis", default=helpers.DEFAULT_REDIS, help="Redis server URL")
    parser.add_argument(
        "--database-server", default=helpers.DEFAULT_DATABASE_SERVER, help="PostgreSQL server URL"
    )
    parser.add_argument("--keep", action="store_true", help="keep the database and worker logs")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)
    if min(args.events, args.repeats, args.history, args.month, args.latency_events) < 1:
        parser.error("counts must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_id = uuid.uuid4().hex[:8]
    world = None
    figures: dict[str, Any] = {"history_events": args.history, "month_events": args.month}
    with helpers.sigterm_as_exit():
        try:
            world = helpers.new_world(args)
            helpers.create_world(world, args)
            env = helpers.worker_env(world, "INFO")
            helpers.init_db(world, env)
            settings = Settings(
                database_url=world.database_url, broker_url=world.broker_url,
                data_dir=world.data_dir,
            )  # fmt: skip
            world.app = helpers.noop_worker.create_noop_app(settings)
            world.engine = create_engine(world.database_url, isolation_level="AUTOCOMMIT")
            helpers.start_worker(world, "pipeline", [helpers.crm_events_command(), "worker"], env)
            helpers.start_worker(world, "bare", helpers.bare_command(world.broker_url, "INFO"), env)
            world.bare_app = helpers.bare_worker.create_bare_app(world.broker_url)
            helpers.wait_ready(world)
            helpers.load_parties(world, env)
            if args.warmup:
                helpers.run_pipeline(world, run_id, "w", args.warmup, args.timeout)
                helpers.run_bare(world, run_id, "w", args.warmup, args.timeout)

            figures["empty"] = phase(world, run_id, "empty", args)
            half = args.latency_rate or figures["empty"]["pipeline_rate"] / 2
            figures["empty"]["latency"] = latency(
                world, run_id, "le", args.latency_events, half, args.timeout
            )
            figures["empty"]["bare_latency"] = bare_latency(world, "le", args.latency_events, half)

            now = datetime.now(UTC)
            zone = world.app.conf.crm_settings.zone
            month_start = now.astimezone(zone).replace(
                day=1, hour=0, minute=0, second=0, microsecond=0
            )
            sellers, customers = history_parties(world)
            helpers.log(f"loading {args.history:,} events of the past year (COPY, reconcile)")
            seconds = preload(
                world, args.history, sellers, customers,
                month_start - timedelta(days=365), month_start - timedelta(minutes=1), "h",
            )  # fmt: skip
            helpers.log(f"loaded in {seconds:.0f} s")
            figures["history"] = phase(world, run_id, "history", args)

            helpers.log(f"loading {args.month:,} events of {SELLER} this month (COPY, reconcile)")
            seconds = preload(
                world, args.month, [seller_id(world)], customers,
                month_start, now - timedelta(hours=1), "m",
            )  # fmt: skip
            helpers.log(f"loaded in {seconds:.0f} s")
            figures["month"] = phase(world, run_id, "month", args)
            figures["month"]["latency"] = latency(
                world, run_id, "lm", args.latency_events, half, args.timeout
            )
            figures["month"]["bare_latency"] = bare_latency(world, "lm", args.latency_events, half)
            figures["drift"] = helpers.tally_drift(world)
        except helpers.BenchError as exc:
            helpers.log(f"bench failed: {exc}")
            return 1
        finally:
            if world is not None:
                helpers.destroy_world(world, args.keep)
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["drift"] == 0 else 1


def report(figures: dict[str, Any]) -> None:
    empty, history, month = figures["empty"], figures["history"], figures["month"]

    def normalised(phase: dict[str, Any]) -> float:
        return phase["pipeline_rate"] / phase["bare_rate"]

    print()
    print("| phase | pipeline events/s | worker CPU per event | bare tasks/s | load at the runs |")
    print("|---|---|---|---|---|")
    for name, label in (
        ("empty", "empty database"),
        ("history", f"{figures['history_events']:,} events of the past year"),
        ("month", f"and {figures['month_events']:,} of the seller this month"),
    ):
        p = figures[name]
        loads = " ".join(f"{x:.2f}" for x in p["load"])
        print(
            f"| {label} | {helpers.rate(p['pipeline_rate'])} | {p['pipeline_cpu_ms']:.2f} ms "
            f"| {helpers.rate(p['bare_rate'])} | {loads} |"
        )
    print()
    print(
        f"history / empty: {history['pipeline_rate'] / empty['pipeline_rate']:.2f} "
        f"({normalised(history) / normalised(empty):.2f} against the bare rate of each phase)"
    )
    print(
        f"busy month / empty month: {month['pipeline_rate'] / history['pipeline_rate']:.2f} "
        f"({normalised(month) / normalised(history):.2f} against the bare rate of each phase)"
    )
    for name in ("empty", "month"):
        lat, bare = figures[name]["latency"], figures[name]["bare_latency"]
        print(
            f"{name}: {lat['rate']:.0f} calls/s (half the empty rate): publish -> stored p50 "
            f"{lat['stored_p50_ms']:.0f} ms, p95 {lat['stored_p95_ms']:.0f} ms; publish -> "
            f"visible p50 {lat['visible_p50_ms']:.0f} ms, p95 {lat['visible_p95_ms']:.0f} ms "
            f"({lat['notifications']} notifications); bare Celery at the same pace: publish -> "
            f"done p50 {bare['p50_ms']:.0f} ms, p95 {bare['p95_ms']:.0f} ms"
        )
    drift = figures["drift"]
    print("tallies agree with a recount" if drift == 0 else f"WARNING: {drift} tally keys drift")


if __name__ == "__main__":
    sys.exit(main())
