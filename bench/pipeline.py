"""Throughput of the call pipeline against a no-op Celery task on the same broker and settings.

Sets up a throw-away world, runs real worker processes and measures, end to end:

* pipeline: N ``crm.ingest.call`` messages (distinct calls, "completed", from a known contact,
  agent 201) published to ``crm.ingest.call``; the clock runs from the first publish until every
  message has its row in ``delivery`` *and* ``refresh_request`` is empty (the events are
  counted and the seller's screens told). Reported as events/s. A call task takes the calls
  queued behind it (``--call-drain``, the worker's ``CRM_CALL_DRAIN``; 0: each one alone).
* no-op: N ``bench.noop`` messages (``bench/noop_worker.py``: the same app, one task that only
  increments a Redis counter) published to ``bench.noop``; the clock runs from the first publish
  until the counter reaches N. Reported as tasks/s.

Each measurement is repeated (pipeline and no-op alternating); the medians and their ratio are
printed. Setup: a scratch PostgreSQL database (created, ``crm-events init-db``, dropped at the
end unless ``--keep``), a dedicated Redis database index (claimed, FLUSHDB at start and end),
the sample parties of ``examples/parties.json`` loaded through the worker, ``crm-events worker
--concurrency 2`` and ``bench/noop_worker.py --concurrency 2`` as subprocesses (SIGTERM at the
end, SIGKILL after a timeout). Events accumulate over the runs, so later pipeline runs start
with more of the seller's events in the current month (printed with each run).

    .venv/bin/python bench/pipeline.py                      # 300 of each, 3 runs of each
    .venv/bin/python bench/pipeline.py --events 200 --repeats 1

Inherited ``CRM_*`` variables are ignored; the workers get their own (see ``worker_env``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
EXAMPLES = ROOT / "examples"

# Run as a script, Python puts bench/ first on sys.path, where a script could shadow a standard
# module or a dependency's: bench/ goes last, so its scripts import one another by name
# (``import noop_worker``) and never hide anything else. The other scripts do the same.
sys.path[:] = [*(p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR), str(BENCH_DIR)]

import bare_worker  # noqa: E402
import noop_worker  # noqa: E402

DEFAULT_DATABASE_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379"
POLL_INTERVAL_S = 0.05
STOP_TIMEOUT_S = 30.0
#: How tools of this project sharing one Redis server mark a database index as theirs: the test
#: suite claims one of 15..8 with this key (SET NX) and flushes it when done, so a database
#: without the claim may be taken and flushed under a running benchmark.
CLAIM_KEY = "crm-events-tests:claimed-by"
CLAIM_TTL_S = 3600
CLAIM_PREFIX = "crm-events-bench:"
READY_TIMEOUT_S = 120.0
#: A run that makes no progress for this long has lost messages or a worker: fail it early.
STALL_S = 120.0

#: Our switchboard, the sample contact Matti Virtanen (customer 10001) and seller anna's extension.
SWITCHBOARD = "+358 9 111 000"
CONTACT_NUMBER = "040 123 4567"
AGENT = "201"
NOTES = (
    "Kysyi huoltosopimuksen jatkamisesta, lähetetään tarjous.",
    "Toimitusaika varmistettu, ei jatkotoimia.",
    "Laskutusosoite muuttunut, päivitetään ERP:hen.",
    "Sovittiin käynti ensi viikolle.",
    "",
)

SUCCEEDED = re.compile(r"Task (crm\.[\w.]+)\[[^\]]+\] succeeded in ([0-9.]+)s")


class BenchError(Exception):
    """The benchmark could not run or a run did not complete; the message says why."""


def noop_command() -> list[str]:
    """The command of a no-op worker (``bench/noop_worker.py``); Celery options may follow."""
    return [sys.executable, "-P", str(BENCH_DIR / "noop_worker.py")]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the throw-away world ------------------------------------------------------------------------


@dataclass
class Worker:
    label: str
    nodename: str
    process: subprocess.Popen[bytes]
    log_path: Path
    peak_rss_kib: dict[str, int] = field(default_factory=dict)


@dataclass
class World:
    database_name: str
    database_url: str
    broker_url: str
    tmp: Path
    admin: Any = None  # SQLAlchemy engine on the server's maintenance database
    redis: Any = None
    database_created: bool = False
    redis_claimed: bool = False
    workers: list[Worker] = field(default_factory=list)
    engine: Any = None
    app: Any = None
    #: A publisher of bench.bare tasks (a plain Celery app, like the bare worker's).
    bare_app: Any = None

    @property
    def data_dir(self) -> Path:
        return self.tmp / "var"


def with_db_index(url: str, index: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{index}", parts.query, parts.fragment))


def worker_env(world: World, log_level: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    env.update(
        CRM_DATABASE_URL=world.database_url,
        CRM_BROKER_URL=world.broker_url,
        CRM_DATA_DIR=str(world.data_dir),
        CRM_LOG_LEVEL=log_level,
        PYTHONUNBUFFERED="1",
    )
    return env


def crm_events_command() -> str:
    beside = Path(sys.executable).parent / "crm-events"
    found = str(beside) if beside.exists() else shutil.which("crm-events")
    if not found:
        raise BenchError("no crm-events command: run with the project's .venv/bin/python")
    return found


def new_world(args: argparse.Namespace) -> World:
    """Names and a temporary folder; :func:`create_world` acquires the rest."""
    from sqlalchemy.engine import make_url

    name = f"crm_bench_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"
    world = World(
        database_name=name,
        database_url=make_url(args.database_server)
        .set(database=name)
        .render_as_string(hide_password=False),
        broker_url=with_db_index(args.redis, args.redis_db),
        tmp=Path(tempfile.mkdtemp(prefix="crm-bench-")),
    )
    world.data_dir.mkdir()
    return world


def create_world(world: World, args: argparse.Namespace) -> None:
    """Claim and flush the Redis database, create the PostgreSQL database (undone by
    :func:`destroy_world`, also when this fails half-way)."""
    import redis
    from sqlalchemy import create_engine, text

    name = world.database_name
    world.redis = redis.Redis.from_url(world.broker_url, socket_timeout=10)
    try:
        world.redis.ping()
    except redis.RedisError as exc:
        raise BenchError(f"Redis at {args.redis} does not answer: {exc}") from exc
    claim_redis(world, args.redis_db)
    world.admin = create_engine(args.database_server, isolation_level="AUTOCOMMIT")
    try:
        with world.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        raise BenchError(f"cannot create database {name} on {args.database_server}: {exc}") from exc
    world.database_created = True
    log(f"scratch database {name}, Redis db {args.redis_db}, files in {world.tmp}")


def _stale_claim(holder: str) -> bool:
    """A claim left by a benchmark that is no longer running on this machine."""
    if not holder.startswith(CLAIM_PREFIX):
        return False
    try:
        os.kill(int(holder.removeprefix(CLAIM_PREFIX)), 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        return False
    return False


def claim_redis(world: World, index: int) -> None:
    """Claim the Redis database and FLUSHDB it, atomically; refuse one another process holds."""
    import redis

    pipe = world.redis.pipeline()
    try:
        pipe.watch(CLAIM_KEY)
        holder = pipe.get(CLAIM_KEY)
        if holder is not None and not _stale_claim(holder.decode()):
            raise BenchError(
                f"Redis database {index} is in use ({CLAIM_KEY} = {holder.decode()!r}): "
                "choose another --redis-db"
            )
        pipe.multi()
        pipe.flushdb()
        pipe.set(CLAIM_KEY, f"{CLAIM_PREFIX}{os.getpid()}", ex=CLAIM_TTL_S)
        pipe.execute()
    except redis.WatchError as exc:
        raise BenchError(f"Redis database {index} was claimed by another process") from exc
    finally:
        pipe.reset()
    world.redis_claimed = True


def renew_claim(world: World) -> None:
    world.redis.set(CLAIM_KEY, f"{CLAIM_PREFIX}{os.getpid()}", ex=CLAIM_TTL_S)


def destroy_world(world: World, keep: bool) -> None:
    """Stop the workers, empty the Redis database, drop the database: whatever happened before."""
    for worker in world.workers:
        stop_worker(worker)
    if world.engine is not None:
        world.engine.dispose()
    if world.redis is not None:
        if world.redis_claimed:
            try:
                world.redis.flushdb()  # also drops the claim
            except Exception as exc:
                log(f"warning: FLUSHDB failed: {exc}")
        world.redis.close()
    if world.admin is not None:
        if world.database_created and not keep:
            from sqlalchemy import text

            try:
                with world.admin.connect() as connection:
                    connection.execute(
                        text(f'DROP DATABASE IF EXISTS "{world.database_name}" WITH (FORCE)')
                    )
            except Exception as exc:
                log(f"warning: could not drop database {world.database_name}: {exc}")
        world.admin.dispose()
    if keep:
        log(f"kept database {world.database_name} and worker logs in {world.tmp}")
    else:
        shutil.rmtree(world.tmp, ignore_errors=True)


def init_db(world: World, env: dict[str, str]) -> None:
    done = subprocess.run(
        [crm_events_command(), "init-db"], env=env, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        raise BenchError(f"crm-events init-db failed:\n{done.stderr[-4000:]}")


def start_worker(
    world: World, label: str, command: list[str], env: dict[str, str], concurrency: int = 2
) -> Worker:
    nodename = f"bench-{label}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    log_path = world.tmp / f"{label}-worker.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [*command, "--concurrency", str(concurrency), "-n", nodename],
            env=env,
            cwd=world.tmp,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the pool can be killed with it
        )
    worker = Worker(label, nodename, process, log_path)
    world.workers.append(worker)
    return worker


def log_tail(worker: Worker, lines: int = 30) -> str:
    try:
        text = worker.log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def check_alive(world: World) -> None:
    for worker in world.workers:
        if worker.process.poll() is not None:
            raise BenchError(
                f"{worker.label} worker exited with status {worker.process.returncode}:\n"
                + log_tail(worker)
            )


def wait_ready(world: World) -> None:
    pending = {w.nodename for w in world.workers}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while pending:
        check_alive(world)
        if time.monotonic() > deadline:
            raise BenchError(f"workers not ready after {READY_TIMEOUT_S:.0f} s: {sorted(pending)}")
        for reply in world.app.control.ping(destination=sorted(pending), timeout=1.0) or []:
            pending -= set(reply)


def stop_worker(worker: Worker) -> None:
    """SIGTERM to the main process (warm shutdown), SIGKILL to its process group on timeout."""
    process = worker.process
    pool = descendants(process.pid) if process.poll() is None else []
    if process.poll() is None:
        with suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log(f"{worker.label} worker did not stop in {STOP_TIMEOUT_S:.0f} s: SIGKILL")
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the main process and its pool
            process.wait(timeout=10)
    # Pool processes that outlived their main process (still in its process group).
    for pid in pool:
        with suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == process.pid:
                os.kill(pid, signal.SIGKILL)


# -- peak memory --------------------------------------------------------------------------------


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(worker: Worker) -> float:
    """User + system CPU time so far of the worker's main process and its pool."""
    return process_cpu_seconds([worker.process.pid, *descendants(worker.process.pid)])


def process_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time so far of these processes (gone ones count nothing)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _pids_whose_command(contains: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, UnicodeDecodeError):
                continue
            if contains in command:
                found.append(int(entry.name))
    return found


def cpu_parts(world: World, worker: Worker) -> dict[str, float]:
    """CPU seconds so far of each part a message goes through, for a per-message account.

    PostgreSQL counts the backends serving the scratch database (not the server's background
    writers); Redis counts the whole server; the bench process is the publisher.
    """
    return {
        "worker main process (consumer)": process_cpu_seconds([worker.process.pid]),
        "worker pool processes (tasks)": process_cpu_seconds(descendants(worker.process.pid)),
        "PostgreSQL backends": process_cpu_seconds(_pids_whose_command(world.database_name)),
        "Redis server": redis_cpu_seconds(),
        "bench process (publisher)": process_cpu_seconds([os.getpid()]),
    }


def database_cpu_seconds(world: World) -> float:
    """CPU seconds so far of the PostgreSQL backends serving the scratch database."""
    return process_cpu_seconds(_pids_whose_command(world.database_name))


def redis_cpu_seconds() -> float:
    """CPU seconds so far of the Redis server (the broker), whoever it served."""
    return process_cpu_seconds(_pids_whose_command("redis-server"))


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def record_peak_rss(worker: Worker) -> None:
    if worker.process.poll() is not None:
        return
    main = vm_hwm_kib(worker.process.pid)
    pool = [v for pid in descendants(worker.process.pid) if (v := vm_hwm_kib(pid)) is not None]
    if main is not None:
        worker.peak_rss_kib = {"main": main, "pool_max": max(pool, default=0), "pool_n": len(pool)}
        worker.peak_rss_kib["total"] = main + sum(pool)


# -- messages -----------------------------------------------------------------------------------


def week_so_far(zone: ZoneInfo) -> tuple[datetime, timedelta]:
    """Monday 00:00 of the current week (local) and the span up to half an hour ago."""
    now = datetime.now(zone)
    monday = (now - timedelta(days=now.weekday())).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    return monday, max(now - monday - timedelta(minutes=30), timedelta(minutes=1))


def call_message(call_id: str, started: datetime, rng: random.Random) -> dict[str, Any]:
    """The last ("completed") status update of an answered inbound call, as a PBX sends it."""
    answered = started + timedelta(seconds=rng.randint(3, 25))
    duration = rng.randint(20, 1200)
    ended = answered + timedelta(seconds=duration)
    return {
        "schema": "crm.call/1",
        "source_system": "pbx-hki",
        "call_id": call_id,
        "sequence": 3,
        "status": "completed",
        "direction": "inbound",
        "from": CONTACT_NUMBER,
        "to": SWITCHBOARD,
        "agent": AGENT,
        "started_at": started.isoformat(timespec="seconds"),
        "answered_at": answered.isoformat(timespec="seconds"),
        "ended_at": ended.isoformat(timespec="seconds"),
        "duration_s": duration,
        "note": rng.choice(NOTES),
    }


def call_messages(run_id: str, tag: str, n: int, zone: ZoneInfo) -> list[dict[str, Any]]:
    monday, span = week_so_far(zone)
    rng = random.Random(f"{run_id}-{tag}")
    return [
        call_message(f"bench-{run_id}-{tag}-{i:06d}", monday + span * ((i + 0.5) / n), rng)
        for i in range(n)
    ]


# -- measurements -------------------------------------------------------------------------------


@dataclass
class Result:
    kind: str
    tag: str
    n: int
    elapsed_s: float
    publish_s: float
    stored_s: float | None = None
    #: Events already stored before the run (all of them in the seller's current month).
    prior_events: int = 0
    log_offset: int = 0
    log_end: int | None = None
    outcomes: dict[str, int] = field(default_factory=dict)
    #: CPU time the worker (main process and pool) spent during the run, per message.
    cpu_ms_per_message: float | None = None
    #: CPU time of the PostgreSQL backends serving the scratch database, per message.
    db_cpu_ms_per_message: float | None = None
    #: 1-minute load average of the machine when the run started.
    load: float = float("nan")

    @property
    def rate(self) -> float:
        return self.n / self.elapsed_s


class Watchdog:
    """Fails a run that is over its time, stalled, or whose workers died."""

    def __init__(self, world: World, what: str, timeout: float) -> None:
        self.world, self.what, self.timeout = world, what, timeout
        self.progress: Any = None
        self.changed = 0.0

    def check(self, progress: Any, now: float, status: str) -> None:
        if progress != self.progress:
            self.progress, self.changed = progress, now
        if now > self.timeout:
            raise BenchError(f"{self.what}: not done after {self.timeout:.0f} s: {status}")
        if now - self.changed > STALL_S:
            raise BenchError(
                f"{self.what}: no progress for {STALL_S:.0f} s: {status}; {queue_state(self.world)}"
            )
        check_alive(self.world)


def queue_state(world: World) -> str:
    from config.queues import QUEUES

    queued = {q: world.redis.llen(q) for q in (*QUEUES, noop_worker.NOOP_QUEUE)}
    waiting = ", ".join(f"{q} {n}" for q, n in queued.items() if n) or "none"
    return f"messages waiting in queues: {waiting}; unacknowledged: {world.redis.hlen('unacked')}"


POLL_PIPELINE = """
SELECT (SELECT count(*) FROM delivery WHERE task_id LIKE :prefix),
       (SELECT count(*) FROM refresh_request)
"""


def run_pipeline(world: World, run_id: str, tag: str, n: int, timeout: float) -> Result:
    from sqlalchemy import text

    zone = world.app.conf.crm_settings.zone
    messages = call_messages(run_id, tag, n, zone)
    prefix = f"bench-{run_id}-{tag}-"
    task_ids = [f"{prefix}{uuid.uuid4()}" for _ in range(n)]
    pipeline_worker = next(w for w in world.workers if w.label == "pipeline")
    log_offset = pipeline_worker.log_path.stat().st_size
    poll = text(POLL_PIPELINE)
    renew_claim(world)
    watchdog = Watchdog(world, f"pipeline run {tag}", timeout)
    with world.engine.connect() as connection:
        prior = connection.execute(text("SELECT count(*) FROM crm_event")).scalar_one()
        start = time.perf_counter()
        for message, task_id in zip(messages, task_ids, strict=True):
            world.app.send_task(
                "crm.ingest.call", args=[message], queue="crm.ingest.call", task_id=task_id
            )
        published = time.perf_counter() - start
        stored = None
        while True:
            done, requests = connection.execute(poll, {"prefix": prefix + "%"}).one()
            now = time.perf_counter() - start
            if done >= n and stored is None:
                stored = now
            if done >= n and requests == 0:
                break
            watchdog.check(
                (done, requests),
                now,
                f"{done}/{n} delivered, {requests} refresh requests pending",
            )
            time.sleep(POLL_INTERVAL_S)
        outcomes = dict(
            connection.execute(
                text(
                    "SELECT outcome, count(*) FROM delivery WHERE task_id LIKE :prefix "
                    "GROUP BY outcome"
                ),
                {"prefix": prefix + "%"},
            ).all()
        )
    return Result("pipeline", tag, n, now, published, stored, prior, log_offset, outcomes=outcomes)


def run_noop(world: World, run_id: str, tag: str, n: int, timeout: float) -> Result:
    bench = noop_worker
    key = f"bench:noop:{run_id}:{tag}"
    renew_claim(world)
    watchdog = Watchdog(world, f"no-op run {tag}", timeout)
    start = time.perf_counter()
    for _ in range(n):
        world.app.send_task(bench.NOOP_TASK, args=[key], queue=bench.NOOP_QUEUE)
    published = time.perf_counter() - start
    while True:
        done = int(world.redis.get(key) or 0)
        now = time.perf_counter() - start
        if done >= n:
            break
        watchdog.check(done, now, f"{done}/{n} done")
        time.sleep(POLL_INTERVAL_S)
    return Result("no-op", tag, n, now, published, outcomes={"done": done})


def run_bare(world: World, run_id: str, tag: str, n: int, timeout: float) -> Result:
    """N ``bench.bare`` tasks through ``bench/bare_worker.py``: Celery itself, nothing of ours."""
    key = f"bench:bare:{run_id}:{tag}"
    renew_claim(world)
    watchdog = Watchdog(world, f"bare run {tag}", timeout)
    start = time.perf_counter()
    for _ in range(n):
        world.bare_app.send_task(bare_worker.BARE_TASK, args=[key], queue=bare_worker.BARE_QUEUE)
    published = time.perf_counter() - start
    while True:
        done = int(world.redis.get(key) or 0)
        now = time.perf_counter() - start
        if done >= n:
            break
        watchdog.check(done, now, f"{done}/{n} done")
        time.sleep(POLL_INTERVAL_S)
    return Result("bare", tag, n, now, published, outcomes={"done": done})


def bare_command(broker_url: str, log_level: str) -> list[str]:
    """The bare worker, logging at the level the other workers log at (INFO logs two lines per
    task, which costs a worker as much as anything else it does for a no-op)."""
    return [sys.executable, str(BENCH_DIR / "bare_worker.py"), broker_url, "-l", log_level]


def load_parties(world: World, env: dict[str, str]) -> None:
    done = subprocess.run(
        [
            crm_events_command(),
            "publish",
            "party",
            str(EXAMPLES / "parties.json"),
            "--wait",
            "120",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise BenchError(f"loading examples/parties.json failed:\n{done.stderr[-4000:]}")
    rows = json.loads(done.stdout)
    bad = [r for r in rows if r["outcome"] != "done"]
    if bad:
        raise BenchError(f"parties not loaded: {bad}")
    log(f"loaded {len(rows)} parties through the worker")


def task_times(worker: Worker, start: int, end: int | None) -> dict[str, list[float]]:
    """Task run times the worker logged (INFO) between two offsets of its log."""
    with worker.log_path.open("rb") as handle:
        handle.seek(start)
        chunk = handle.read(None if end is None else end - start).decode("utf-8", "replace")
    times: dict[str, list[float]] = {}
    for name, seconds in SUCCEEDED.findall(chunk):
        times.setdefault(name, []).append(float(seconds))
    return times


def tally_drift(world: World) -> int:
    """Stored tallies that differ from the recount ``crm-events reconcile`` does (read only)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from models.targets import Tally
    from tasks.maintenance import expected_tallies

    # One snapshot for both reads (the polling engine is in autocommit mode).
    engine = world.engine.execution_options(isolation_level="REPEATABLE READ")
    with Session(engine) as session:
        expected = expected_tallies(session)
        stored = {
            (t.seller_id, t.category_code, t.period): t.count
            for t in session.scalars(select(Tally))
        }
    return sum(1 for k in set(expected) | set(stored) if expected.get(k, 0) != stored.get(k, 0))


# -- reporting ----------------------------------------------------------------------------------


def describe(result: Result, world: World) -> list[str]:
    unit = "events" if result.kind == "pipeline" else "tasks"
    # The kind, padded for the table: pipeline, no-op (the app's) or bare (Celery's).
    lines = [
        f"{result.kind:8} {result.n} {unit} in {result.elapsed_s:7.2f} s = "
        f"{rate(result.rate):>5} {unit}/s (published in {result.publish_s:.2f} s"
        f"; load average {result.load:.1f} at the start)"
    ]
    if result.cpu_ms_per_message is not None:
        line = f"{result.kind} worker CPU {result.cpu_ms_per_message:.2f} ms per {unit[:-1]}"
        if result.db_cpu_ms_per_message is not None:
            line += f", PostgreSQL backends {result.db_cpu_ms_per_message:.2f} ms"
        lines.append(line)
    if result.kind == "pipeline":
        lines.append(
            f"all stored at {result.stored_s:.2f} s; {result.prior_events} events of the same "
            "seller this month before the run"
        )
        worker = next(w for w in world.workers if w.label == "pipeline")
        times = task_times(worker, result.log_offset, result.log_end)
        ingest = times.get("crm.ingest.call", [])
        refresh = times.get("crm.refresh.seller", [])
        if ingest:
            detail = f"ingest task median {statistics.median(ingest) * 1000:.0f} ms"
            if refresh:
                detail += (
                    f"; {len(refresh)} refresh tasks, median "
                    f"{statistics.median(refresh) * 1000:.0f} ms, max {max(refresh) * 1000:.0f} ms"
                )
            lines.append(detail)
        other = {k: v for k, v in result.outcomes.items() if k != "stored"}
        if other:
            lines.append(f"WARNING: not every message was stored: {other}")
    return lines


def rate(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


def summary(results: list[Result]) -> dict[str, Any]:
    """The medians of the runs, for ``--json`` (``bench/run.py`` reads them)."""

    def median(kind: str, value: str = "rate") -> float:
        return statistics.median(getattr(r, value) for r in results if r.kind == kind)

    return {
        "events": results[0].n,
        "runs": sum(1 for r in results if r.kind == "pipeline"),
        "pipeline_rate": median("pipeline"),
        "noop_rate": median("no-op"),
        "bare_rate": median("bare"),
        "pipeline_cpu_ms": median("pipeline", "cpu_ms_per_message"),
        "pipeline_db_cpu_ms": median("pipeline", "db_cpu_ms_per_message"),
        "noop_cpu_ms": median("no-op", "cpu_ms_per_message"),
        "bare_cpu_ms": median("bare", "cpu_ms_per_message"),
        "load": [r.load for r in results],
    }


def report(results: list[Result], world: World, repeats: int) -> None:
    pipeline_runs = [r for r in results if r.kind == "pipeline"]
    for i, result in enumerate(pipeline_runs):
        result.log_end = pipeline_runs[i + 1].log_offset if i + 1 < len(pipeline_runs) else None
    print()
    for result in results:
        run = int(result.tag.lstrip("pnb"))
        first, *more = describe(result, world)
        print(f"run {run}/{repeats}  {first}")
        for line in more:
            print(f"{'':18}{line}")

    def median(kind: str, value: str = "rate") -> float:
        return statistics.median(getattr(r, value) for r in results if r.kind == kind)

    pipeline, noop, bare = median("pipeline"), median("no-op"), median("bare")
    n = results[0].n
    print()
    print(f"median of {repeats} run(s) of {n}:")
    print(
        f"  pipeline {rate(pipeline)} events/s, the app's no-op {rate(noop)} tasks/s, "
        f"bare Celery {rate(bare)} tasks/s"
    )
    print(f"  pipeline / bare {pipeline / bare:.3f}, the app's no-op / bare {noop / bare:.3f}")
    cpu = {kind: median(kind, "cpu_ms_per_message") for kind in ("pipeline", "no-op", "bare")}
    print(
        f"  worker CPU per message: pipeline {cpu['pipeline']:.2f} ms"
        f" (+ PostgreSQL {median('pipeline', 'db_cpu_ms_per_message'):.2f} ms),"
        f" the app's no-op {cpu['no-op']:.2f} ms ({cpu['no-op'] / cpu['bare']:.2f} x bare),"
        f" bare {cpu['bare']:.2f} ms"
    )
    for worker in world.workers:
        rss = worker.peak_rss_kib
        if rss:
            print(
                f"  peak RSS (VmHWM) of the {worker.label} worker: main {mib(rss['main'])}, "
                f"largest of {rss['pool_n']} pool processes {mib(rss['pool_max'])}, "
                f"all together {mib(rss['total'])}"
            )


# -- main ---------------------------------------------------------------------------------------


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """A SIGTERM to the benchmark still stops the workers and drops the database."""

    def handler(signum: int, _frame: Any) -> None:
        log("terminated: stopping the workers and cleaning up")
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="crm.ingest.call pipeline throughput vs a no-op Celery task (real workers).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=300, metavar="N", help="messages per run")
    parser.add_argument("--repeats", type=int, default=3, metavar="R", help="runs of each kind")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured messages of each kind")
    parser.add_argument("--redis-db", type=int, default=13, help="Redis database index (flushed!)")
    parser.add_argument(
        "--redis",
        default=os.environ.get("CRM_BENCH_REDIS_URL", DEFAULT_REDIS),
        help="Redis server URL (env CRM_BENCH_REDIS_URL)",
    )
    parser.add_argument(
        "--database-server",
        default=os.environ.get("CRM_BENCH_DATABASE_URL", DEFAULT_DATABASE_SERVER),
        help="PostgreSQL server URL for CREATE/DROP DATABASE (env CRM_BENCH_DATABASE_URL)",
    )
    parser.add_argument(
        "--call-drain",
        type=int,
        default=100,
        metavar="N",
        help="CRM_CALL_DRAIN of the pipeline worker (0: every call message alone)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the database and worker logs")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="CRM_LOG_LEVEL of both workers (INFO also gives the task times)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--json", metavar="FILE", help="also write the medians to FILE as JSON")
    args = parser.parse_args(argv)
    if args.events < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--events and --repeats must be positive, --warmup not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    create_noop_app = noop_worker.create_noop_app
    from sqlalchemy import create_engine

    from config.settings import Settings

    run_id = uuid.uuid4().hex[:8]
    world: World | None = None
    with sigterm_as_exit():
        try:
            world = new_world(args)
            create_world(world, args)
            env = worker_env(world, args.log_level)
            init_db(world, env)
            settings = Settings(
                database_url=world.database_url,
                broker_url=world.broker_url,
                data_dir=world.data_dir,
            )
            world.app = create_noop_app(settings)
            world.engine = create_engine(world.database_url, isolation_level="AUTOCOMMIT")
            pipeline_env = {**env, "CRM_CALL_DRAIN": str(args.call_drain)}
            start_worker(world, "pipeline", [crm_events_command(), "worker"], pipeline_env)
            start_worker(world, "no-op", noop_command(), env)
            start_worker(world, "bare", bare_command(world.broker_url, args.log_level), env)
            world.bare_app = bare_worker.create_bare_app(world.broker_url)
            wait_ready(world)
            log("workers ready: " + ", ".join(w.nodename for w in world.workers))
            load_parties(world, env)
            if args.warmup:
                run_pipeline(world, run_id, "w", args.warmup, args.timeout)
                run_noop(world, run_id, "w", args.warmup, args.timeout)
                run_bare(world, run_id, "w", args.warmup, args.timeout)
                log(f"warm-up done ({args.warmup} of each)")
            results = []
            for i in range(1, args.repeats + 1):
                for index, (kind, run) in enumerate(
                    (("p", run_pipeline), ("n", run_noop), ("b", run_bare))
                ):
                    worker = world.workers[index]
                    load, cpu_before = load_average(), cpu_seconds(worker)
                    db_before = database_cpu_seconds(world)
                    result = run(world, run_id, f"{kind}{i}", args.events, args.timeout)
                    cpu = cpu_seconds(worker) - cpu_before
                    result.load, result.cpu_ms_per_message = load, cpu * 1000 / args.events
                    if kind == "p":
                        db_cpu = database_cpu_seconds(world) - db_before
                        result.db_cpu_ms_per_message = db_cpu * 1000 / args.events
                    log(f"run {i}/{args.repeats} {result.kind}: {rate(result.rate)}/s")
                    results.append(result)
            for worker in world.workers:
                record_peak_rss(worker)
            report(results, world, args.repeats)
            drift: int | None = None
            try:
                drift = tally_drift(world)
            except Exception as exc:
                print(f"  tallies not checked: {type(exc).__name__}: {exc}")
            else:
                if drift:
                    print(f"  WARNING: {drift} tally key(s) differ from a recount of the events")
                else:
                    print("  tallies agree with a recount of the events")
            if args.json:
                figures = {**summary(results), "drift": drift}
                Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
            return 0
        except BenchError as exc:
            log(f"bench failed: {exc}")
            return 1
        finally:
            if world is not None:
                destroy_world(world, args.keep)


if __name__ == "__main__":
    sys.exit(main())
