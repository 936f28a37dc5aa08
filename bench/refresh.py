"""Seller-view refresh latency and report generation time at a million stored events.

Builds a scratch PostgreSQL database (migrated like production), bulk-loads N events (COPY)
for S sellers of one manager over the past year, builds the tallies with the reconcile, sets
targets, then measures:

- refresh latency: a real worker process (prefork, concurrency 2, Redis broker) ingests a call;
  the figure is the time from the event's commit (its delivery record) to the notification on
  ``crm.seller.<username>``, which the refresh publishes after committing the seller's tallies
  and cards: p50/p95 over sequential events, then over a burst (all published at once);
- report generation: the manager's weekly report (every seller × every category, the week
  just closed and the current one: tallies, targets, pace, HTML, chart PNG, CSV, MIME);
- the nightly reconcile over all events;
- EXPLAIN ANALYZE of the statistics and search queries (``--explain FILE`` keeps the plans).

Not a test: run it by hand (about 5-8 minutes on a 2-core machine at the defaults):

    .venv/bin/python bench/refresh.py --events 1000000 --sellers 200
"""

from __future__ import annotations

# ruff: noqa: E402  (the path is fixed before the other imports)
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder would come first on the path, where a script could hide a
# standard module or a dependency's: the project root takes its place.
sys.path[0] = str(ROOT)

import argparse
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import redis
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.engine import make_url

from config.settings import Settings
from models.catalogue import Category
from models.db import create_db_engine, create_session_factory, snapshot, transaction
from models.ledger import Delivery
from models.migrate import install_default_catalogue, upgrade
from models.parties import Staff
from tasks.maintenance import reconcile
from tasks.reports import build_target_report, report_email
from tasks.search import events_query, filters_from
from tasks.stats import statistics_query
from tasks.targets import set_target
from workers.app import create_app

CATEGORIES = {
    # category: (class, type, share of events)
    "crm_event": ("events", "crm_event", 0.45),
    "lead": ("marketing", "lead", 0.10),
    "sales_action": ("sales", "sales_action", 0.30),
    "customer_visit": ("sales", "customer_visit", 0.15),
}
SUBJECTS = [
    "Huoltosopimuksen uusiminen",
    "Tarjous varaosista",
    "Soitto: toimitusaika",
    "Reklamaatio laskutuksesta",
    "Uuden linjan esittely",
    "Vuosisopimus 2027",
    "Koulutuspäivän sopiminen",
    "Asennuksen aikataulu",
    "Takuuasia",
    "Hinnankorotus",
    "Varaosatilaus",
    "Kysely huoltokäynnistä",
]
WORDS = [
    "asiakas",
    "tarjous",
    "huolto",
    "sopimus",
    "toimitus",
    "lasku",
    "kone",
    "laite",
    "varaosa",
    "asennus",
    "takuu",
    "hinta",
    "aikataulu",
    "koulutus",
    "vasteaika",
    "kriittinen",
    "linja",
    "tuotanto",
    "pumppu",
    "moottori",
    "venttiili",
    "kompressori",
    "anturi",
    "ohjelmisto",
    "päivitys",
    "käyttöönotto",
    "tilaus",
    "vahvistus",
    "muistio",
    "palaveri",
    "seuraava",
    "askel",
    "soittaa",
    "takaisin",
    "viikolla",
    "kuukauden",
    "lopussa",
    "budjetti",
    "hyväksyntä",
    "johto",
    "tekninen",
    "kysymys",
    "dokumentaatio",
    "piirustus",
    "mittaus",
    "testaus",
    "raportti",
    "ongelma",
    "ratkaisu",
]
PROPERTIES = ("customer_feedback", "commercial", "advisory")


def server_url() -> str:
    return os.environ.get(
        "CRM_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


@contextmanager
def timed(label: str, figures: dict[str, float]) -> Iterator[None]:
    started = time.perf_counter()
    yield
    figures[label] = time.perf_counter() - started
    print(f"  {label}: {figures[label]:.2f} s", flush=True)


@contextmanager
def scratch_database(keep: bool) -> Iterator[str]:
    base = make_url(server_url())
    name = f"crm_bench_refresh_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        if keep:
            print(f"kept database {name}")
        else:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def event_rows(
    count: int,
    sellers: list[int],
    customers: list[int],
    now: datetime,
    start: datetime | None = None,
    prefix: str = "b",
) -> Iterator[tuple[Any, ...]]:
    """Events in time order from ``start`` (a year before ``now``) up to ``now``, as the ingest
    would have written them; their source ids are ``<prefix>-<n>``."""
    rng = random.Random(7)
    names = list(CATEGORIES)
    weights = [CATEGORIES[c][2] for c in names]
    start = start or now - timedelta(days=365)
    step = (now - start) / count
    for number in range(count):
        occurred = start + step * number
        category = rng.choices(names, weights)[0]
        class_code, type_code, _ = CATEGORIES[category]
        body = " ".join(rng.choices(WORDS, k=rng.randint(8, 24)))
        if number % 20_000 == 0:
            body += " vikakoodi E4711"  # a rare term: 50 events in a million
        yield (
            "bench",
            "call" if category != "customer_visit" else "visit",
            f"{prefix}-{number}",
            rng.choice(customers),
            rng.choice(sellers),
            "linked",
            "auto",
            "",
            "[]",
            category,
            class_code,
            type_code,
            "",
            rng.choice(SUBJECTS),
            body.capitalize() + ".",
            "outbound",
            "completed",
            occurred,
            rng.random() < 0.01,
            "{}",
            occurred,
            occurred,
        )


EVENT_COLUMNS = (
    "source_system, source_kind, source_id, customer_id, seller_id, link_state, linked_by, "
    "match_note, candidates, category_code, class_code, type_code, classification_note, "
    "subject, body, direction, status, occurred_at, cancelled, details, created_at, updated_at"
)


def copy_events(cursor: psycopg.Cursor[Any], rows: Iterator[tuple[Any, ...]]) -> None:
    """COPY ``rows`` (of :func:`event_rows`) into ``crm_event``.

    The generated rows reference existing customers, staff and catalogue codes: the per-row
    foreign-key triggers are skipped during the load (needs a superuser, as on a scratch server).
    """
    cursor.execute("SET session_replication_role = replica")
    with cursor.copy(f"COPY crm_event ({EVENT_COLUMNS}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    cursor.execute("SET session_replication_role = DEFAULT")


def load(url: str, sellers: int, events: int, figures: dict[str, float]) -> dict[str, Any]:
    settings = Settings(database_url=url, data_dir=Path(tempfile.mkdtemp(prefix="crm-bench-")))
    engine = create_db_engine(settings)
    upgrade(engine)
    sessions = create_session_factory(engine)
    with transaction(sessions) as session:
        install_default_catalogue(session)
        # Worst case for reports and cards: every category takes targets.
        session.execute(update(Category).values(sales_target=True))
        boss = Staff(username="bench-boss", name="Bench Boss", role="manager",
                     email="bench-boss@myyntitalo.fi")  # fmt: skip
        session.add(boss)
        session.flush()
        people = [
            Staff(
                username=f"bench-s{n:03d}",
                name=f"Seller {n:03d}",
                role="seller",
                manager_id=boss.id,
                extension=str(5000 + n),
            )
            for n in range(1, sellers + 1)
        ]
        session.add_all(people)
        session.flush()
        seller_ids = [p.id for p in people]
        session.execute(
            text(
                "INSERT INTO customer (customer_number, name, placeholder, updated_at) "
                "SELECT 'B' || n, 'Asiakas ' || n, false, now() FROM generate_series(1, 2000) n"
            )
        )
        customer_ids = list(session.scalars(text("SELECT id FROM customer")))
    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    now = datetime.now(UTC)
    with psycopg.connect(plain, autocommit=True) as connection:
        definitions = [
            row[0]
            for row in connection.execute(
                "SELECT indexdef FROM pg_indexes WHERE tablename = 'crm_event' AND indexname "
                "NOT IN (SELECT conname FROM pg_constraint)"
            )
        ]
        print(f"loading {events:,} events (secondary indexes rebuilt after the load)", flush=True)
        for definition in definitions:
            connection.execute(f"DROP INDEX {definition.split(' INDEX ')[1].split(' ON ')[0]}")
        with timed("bulk load (COPY)", figures), connection.cursor() as cursor:
            copy_events(cursor, event_rows(events, seller_ids, customer_ids, now))
            cursor.execute("SET session_replication_role = replica")
            cursor.execute(
                "INSERT INTO event_property_link (event_id, property_code) "
                "SELECT id, (ARRAY['customer_feedback','commercial','advisory'])[1 + id % 3] "
                "FROM crm_event WHERE id % 4 = 0"
            )
            cursor.execute("SET session_replication_role = DEFAULT")
        with timed("index build", figures):
            connection.execute("SET maintenance_work_mem = '512MB'")
            for definition in definitions:
                connection.execute(definition)
            connection.execute("VACUUM ANALYZE crm_event")
            connection.execute("VACUUM ANALYZE event_property_link")
    with timed("reconcile, first (builds every tally)", figures), snapshot(sessions) as session:
        first = reconcile(session)
    print(f"    {first.keys_checked:,} tally keys")
    with timed("reconcile, nightly (no drift)", figures), snapshot(sessions) as session:
        nightly = reconcile(session)
    assert nightly.drift == 0, nightly.details[:5]
    with transaction(sessions) as session:
        month_start = now.date().replace(day=1) - timedelta(days=40)
        for person in people:
            for category in CATEGORIES:
                set_target(session, person.username, category, "weekly", 20, month_start)
                set_target(session, person.username, category, "monthly", 80, month_start)
    return {"settings": settings, "engine": engine, "sessions": sessions, "people": people}


def start_worker(settings: Settings, redis_url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    env.update(
        CRM_DATABASE_URL=settings.database_url,
        CRM_BROKER_URL=redis_url,
        CRM_DATA_DIR=str(settings.data_dir),
        CRM_LOG_LEVEL="WARNING",
    )
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker", "--concurrency", "2",
             "-Q", "crm.ingest.call,crm.refresh", "--hostname", f"bench-{uuid.uuid4().hex[:6]}@%h"],
            env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )  # fmt: skip


def call_message(seller: str, number: int) -> dict[str, Any]:
    return {
        "schema": "crm.call/1",
        "source_system": "bench-pbx",
        "call_id": f"bench-live-{number}-{uuid.uuid4().hex[:6]}",
        "status": "completed",
        "direction": "outbound",
        "from": "5001",
        "to": "+358 40 700 9999",
        "agent": seller,
        "started_at": datetime.now(UTC).isoformat(),
        "category": "sales_action",
    }


def measure_refresh(
    loaded: dict[str, Any], redis_url: str, samples: int, burst: int
) -> dict[str, list[float]]:
    settings: Settings = loaded["settings"]
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    app = create_app(Settings(database_url=settings.database_url, broker_url=redis_url))
    log = settings.data_dir / "worker.log"
    worker = start_worker(settings, redis_url, log)
    subscriber = client.pubsub()
    subscriber.psubscribe("crm.seller.*")
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=1):
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
        notified: list[tuple[str, float]] = []

        def drain(until: float) -> None:
            while time.time() < until:
                message = subscriber.get_message(timeout=0.01)
                if message and message["type"] == "pmessage":
                    notified.append((json.loads(message["data"])["seller"], time.time()))

        def run(batch: list[tuple[str, dict[str, Any]]], settle: float) -> list[float]:
            ids = {}
            for seller, message in batch:
                task_id = str(uuid.uuid4())
                app.send_task("crm.ingest.call", args=[message], task_id=task_id,
                              queue="crm.ingest.call")  # fmt: skip
                ids[task_id] = seller
            end = time.time() + 180
            latencies: list[float] = []
            while time.time() < end:
                drain(time.time() + settle)
                with loaded["sessions"]() as session:
                    done = {
                        d.task_id: d.finished_at.timestamp()
                        for d in session.scalars(
                            select(Delivery).where(Delivery.task_id.in_(list(ids)))
                        )
                    }
                latencies = []
                for task_id, stored in done.items():
                    after = [t for s, t in notified if s == ids[task_id] and t >= stored]
                    if after:
                        latencies.append(min(after) - stored)
                if len(latencies) == len(ids):
                    return latencies
            raise AssertionError(
                f"{len(ids) - len(latencies)} of {len(ids)} events not refreshed in 180 s"
                f" ({len(done)} stored, {len(notified)} notifications)"
            )

        people = [p.username for p in loaded["people"]]
        rng = random.Random(11)
        run([(people[0], call_message(people[0], -1))], 0.2)  # warm up both processes
        sequential: list[float] = []
        for number in range(samples):
            seller = rng.choice(people)
            sequential += run([(seller, call_message(seller, number))], 0.02)
        chosen = [rng.choice(people[:20]) for _ in range(burst)]
        bursty = run(
            [(seller, call_message(seller, 10_000 + n)) for n, seller in enumerate(chosen)], 0.05
        )
        return {"sequential": sequential, "burst": bursty}
    finally:
        subscriber.close()
        client.flushdb()
        client.close()
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


def measure_report(loaded: dict[str, Any], runs: int) -> list[float]:
    durations = []
    with loaded["sessions"]() as session:
        boss = session.scalar(select(Staff).where(Staff.username == "bench-boss"))
        assert boss is not None
        for _ in range(runs):
            started = time.perf_counter()
            report = build_target_report(session, boss, "weekly")
            message = report_email(report, loaded["settings"])
            size = len(message.as_bytes())
            durations.append(time.perf_counter() - started)
        print(f"    {len(report.rows):,} rows, email {size / 1024:.0f} KiB")
    return durations


EXPLAINED = {
    "stats --by class": ("class", None),
    "stats --by class --period <month>": ("class", "month"),
    "stats --by category --period <week>": ("category", "week"),
    "stats --by seller --period <month>": ("seller", "month"),
    "stats --by property --period <month>": ("property", "month"),
}
SEARCHES: dict[str, dict[str, Any]] = {
    "events --text e4711 (50 matches)": {"text": "e4711"},
    "events --text huoltosop (1 in 12)": {"text": "huoltosop"},
    "events --text huoltosopimus (stem huoltosopimu, 1 in 12)": {"text": "huoltosopimus"},
    "events --text huoltosopimuksen uusiminen (two stems)": {"text": "huoltosopimuksen uusiminen"},
    "events --text sopimuksia (stem sopimu, in compounds too)": {"text": "sopimuksia"},
    "events --class sales --text takuu": {"class_": "sales", "text": "takuu"},
    "events --seller bench-s001": {"seller": "bench-s001"},
    "events --category lead --since <month>": {"category": "lead", "since": "month"},
}


def explain(loaded: dict[str, Any], out: Path | None) -> dict[str, float]:
    from zoneinfo import ZoneInfo

    from tasks.periods import period_keys

    zone = ZoneInfo("Europe/Helsinki")
    week, month = period_keys(datetime.now(UTC) - timedelta(days=30), zone)
    plans: list[str] = []
    timings: dict[str, float] = {}
    engine = loaded["engine"]
    with engine.connect() as connection:
        queries: dict[str, str] = {}
        for label, (by, period) in EXPLAINED.items():
            statement = statistics_query(by, {"week": week, "month": month}.get(period or ""), zone)
            compiled = statement.compile(engine, compile_kwargs={"literal_binds": True})
            queries[label] = str(compiled)
        for label, filters in SEARCHES.items():
            arguments: dict[str, Any] = dict(filters)
            if arguments.get("since") == "month":
                arguments["since"] = (datetime.now(UTC) - timedelta(days=30)).date().isoformat()
            statement = events_query(filters_from(arguments), zone).limit(1000)
            compiled = statement.compile(engine, compile_kwargs={"literal_binds": True})
            queries[label] = str(compiled)
        for label, sql in queries.items():
            escaped = sql.replace("%", "%%")  # the driver's placeholders
            rows = connection.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {escaped}").all()
            plan = "\n".join(r[0] for r in rows)
            timings[label] = float(plan.rsplit("Execution Time: ", 1)[1].split(" ms")[0])
            plans.append(f"-- {label}\n{sql}\n{plan}\n")
            print(f"  {label}: {timings[label]:.1f} ms", flush=True)
    if out:
        out.write_text("\n".join(plans), encoding="utf-8")
        print(f"  plans written to {out}")
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--sellers", type=int, default=200)
    parser.add_argument("--samples", type=int, default=100, help="sequential refreshes")
    parser.add_argument("--burst", type=int, default=200, help="events published at once")
    parser.add_argument("--report-runs", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/5")
    parser.add_argument("--explain", type=Path, help="write the EXPLAIN ANALYZE plans here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()
    figures: dict[str, float] = {}
    print(f"scratch database on {make_url(server_url()).host}; {args.sellers} sellers × 4 "
          f"categories, {args.events:,} events", flush=True)  # fmt: skip
    started = time.perf_counter()
    with scratch_database(args.keep) as url:
        loaded = load(url, args.sellers, args.events, figures)
        print("EXPLAIN ANALYZE (statistics and search):", flush=True)
        explain(loaded, args.explain)
        print("report generation (weekly, every seller and category, HTML + PNG + CSV + MIME):")
        reports = measure_report(loaded, args.report_runs)
        print("refresh latency (event stored → tallies and cards committed, notification):")
        latencies = measure_refresh(loaded, args.redis_url, args.samples, args.burst)
        loaded["engine"].dispose()
    print("\nfigures")
    for label, seconds in figures.items():
        print(f"  {label}: {seconds:.1f} s")
    for kind, values in latencies.items():
        p50, p95 = percentile(values, 0.5) * 1000, percentile(values, 0.95) * 1000
        print(
            f"  refresh latency, {kind} ({len(values)} events): p50 {p50:.0f} ms, "
            f"p95 {p95:.0f} ms, max {max(values) * 1000:.0f} ms"
        )
    print(
        f"  report generation ({args.report_runs} runs): median "
        f"{statistics.median(reports):.2f} s, max {max(reports):.2f} s"
    )
    print(f"  whole run: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
