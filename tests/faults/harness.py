"""Machinery of the fault tests and ``bench/chaos.py``: private services, workers, a message stream.

Everything here is real: a PostgreSQL cluster of its own (``initdb`` into a temporary folder),
a ``redis-server`` of its own with AOF, ``crm-events worker`` processes. The faults are real too:
SIGKILL of pool children and of main worker processes, a graceful Redis restart (SHUTDOWN, which
fsyncs the AOF, then a new server on the same files), ``pg_ctl restart`` in fast and immediate
mode, every message published three times, several workers at once. The machine's shared
PostgreSQL and Redis are never touched, so restarting ours breaks no one else's run.

After a run, :func:`account` checks what a user would check: every published task id has an
outcome, the stored events are exactly the expected ones with the final state of each call and
visit, the tallies equal a recomputation from the events, and the workers still consume.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import kombu.exceptions
import kombu.pools
import redis
from celery import Celery
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from config.queues import BATCH_TASK, INGEST_TASKS, TASK_QUEUES
from config.settings import Settings
from models.base import utcnow
from models.db import create_db_engine, create_session_factory, snapshot, transaction
from models.events import CrmEvent
from models.ledger import FailedMessage, RejectedMessage
from models.migrate import install_default_catalogue, upgrade
from models.targets import RefreshRequest
from tasks.maintenance import reconcile
from tasks.store import STALE_REFRESH_REQUEST
from tests.master_data import email_message
from tests.messages import outbound_call
from tests.processes import free_port, service_env
from workers.app import create_app
from workers.publish import Outcome, wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

#: Worker timing small enough that a message held by a SIGKILLed main process comes back within
#: a test: the visibility timeout must exceed the time limit plus the longest backoff. The time
#: limit stays well above what a batch of the stream takes on a loaded machine (its soft limit,
#: workers.base.soft_time_limit, is 30 s: a task over it would be recorded as failed).
TASK_TIME_LIMIT_S = 40
RETRY_BACKOFF_MAX_S = 3
VISIBILITY_TIMEOUT_S = 44
#: Redis redelivers an unacknowledged message after the visibility timeout; kombu looks for
#: such messages every 10 s, so this is the longest a message waits after its holder died.
REDELIVERY_S = VISIBILITY_TIMEOUT_S + 15


class ServiceMissing(RuntimeError):
    """The PostgreSQL or Redis server binaries the fault tests run privately are not installed."""


def postgres_bin() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: [int(x) for x in Path(p).parts[-3].split(".") if x.isdigit()],
    )
    if not found:
        raise ServiceMissing(
            "the fault tests run a private PostgreSQL cluster but no server binaries were found"
            " under /usr/lib/postgresql/*/bin: install the postgresql package"
            " (tests/ensure_services.sh does it as root)"
        )
    return Path(found[-1]).parent


def redis_server_bin() -> Path:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if not found:
        raise ServiceMissing(
            "the fault tests run a private redis-server but none is installed:"
            " install the redis-server package (tests/ensure_services.sh does it as root)"
        )
    return Path(found)


def _wait(condition: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} (waited {timeout:.0f} s)")
        time.sleep(interval)


# -- private PostgreSQL -------------------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL cluster of our own on a free loopback port: fsync on, trust on loopback."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.port = free_port()
        # Under /tmp directly: the server runs as ``postgres``, who cannot enter pytest's folders.
        self.dir = Path(tempfile.mkdtemp(prefix="crm-faults-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
        self.admin: Engine | None = None

    def _run(self, *args: str, timeout: float = 120) -> None:
        result = subprocess.run(
            [*self.as_user, *args], capture_output=True, text=True, timeout=timeout, cwd=self.dir
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout}"
                f"\n{result.stderr}\n{self.tail()}"
            )

    def _ctl(self, *args: str, timeout: float = 120) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir}"
            " -c fsync=on -c max_connections=200 -c shared_buffers=32MB"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t",
            "90", "-o", options, *args, timeout=timeout,
        )  # fmt: skip

    def start(self) -> PrivatePostgres:
        if not self.data.exists():
            self._run(
                str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                "--auth=trust", "-E", "UTF8", "--locale=C", "--no-instructions",
            )  # fmt: skip
        self._ctl("start")
        self.admin = create_engine(
            self.url("postgres"), isolation_level="AUTOCOMMIT", pool_pre_ping=True
        )
        return self

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m fast`` (clean) or ``-m immediate`` (crash recovery at start)."""
        self._ctl("restart", "-m", mode)

    @contextmanager
    def down(self) -> Iterator[None]:
        """The server is stopped (fast shutdown) inside the block and started again after it."""
        self._ctl("stop", "-m", "fast")
        try:
            yield
        finally:
            self._ctl("start")

    def stop(self) -> None:
        if self.admin is not None:
            self.admin.dispose()
        try:
            self._ctl("stop", "-m", "fast", timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            self._ctl("stop", "-m", "immediate", timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        assert self.admin is not None
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        assert self.admin is not None
        with self.admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- private Redis ------------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of our own with AOF (everysec), noeviction and no RDB snapshots."""

    def __init__(self) -> None:
        self.bin = redis_server_bin()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="crm-faults-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> PrivateRedis:
        self.process = subprocess.Popen(
            [
                str(self.bin), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "everysec",
                "--maxmemory-policy", "noeviction", "--save", "", "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait(self._answers, 30, f"private redis-server on port {self.port} did not answer")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{self.tail()}")
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10)

    def restart(self, down_s: float = 1.0) -> None:
        """Graceful restart: SHUTDOWN (which fsyncs the AOF), a moment down, the same files."""
        assert self.process is not None
        client = self.client()
        try:
            client.shutdown(nosave=False)
        except redis.exceptions.ConnectionError:
            pass
        finally:
            client.close()
        self.process.wait(timeout=30)
        time.sleep(down_s)
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def tail(self, lines: int = 20) -> str:
        try:
            text_ = (self.dir / "redis.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text_.splitlines()[-lines:])


# -- workers ------------------------------------------------------------------------------------


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a worker with the fault tests' delivery settings."""
    return service_env(
        settings,
        CRM_TASK_TIME_LIMIT_S=str(settings.task_time_limit_s),
        CRM_VISIBILITY_TIMEOUT_S=str(settings.visibility_timeout_s),
        CRM_RETRY_BACKOFF_MAX_S=str(settings.retry_backoff_max_s),
        CRM_MAX_RETRIES=str(settings.max_retries),
        # A worker that dies this many times holding one message parks it as failed; random
        # kills must never park a good message.
        CRM_MAX_DELIVERIES="50",
        **extra,
    )


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (the prefork pool of a worker's main process)."""
    found: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            found += [int(p) for p in Path(path).read_text().split()]
        except OSError:
            continue
    return found


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text_ = Path(stat).read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp …; comm may hold spaces and parentheses.
        fields_ = text_[text_.rindex(")") + 2 :].split()
        if fields_[0] != "Z" and int(fields_[2]) == pgid:
            found.append(int(stat.split("/")[2]))
    return found


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes]
    hostname: str


@dataclass
class Workers:
    """``count`` real ``crm-events worker`` processes, each a session (process group) of its own."""

    env: dict[str, str]
    log_dir: Path
    count: int = 1
    concurrency: int = 2
    running: list[Worker] = field(default_factory=list)
    #: Process groups of main processes killed with SIGKILL (their orphans are cleaned up).
    dead_groups: list[int] = field(default_factory=list)
    kills: Counter[str] = field(default_factory=Counter)

    def start(self) -> Workers:
        for index in range(self.count):
            self.running.append(self._spawn(index))
        return self

    def _spawn(self, index: int) -> Worker:
        hostname = f"fault{index}-{uuid.uuid4().hex[:6]}@%h"
        with open(self.log_dir / f"worker-{index}.log", "ab") as handle:
            process = subprocess.Popen(
                [
                    sys.executable, "-m", "workers.cli", "worker",
                    "--concurrency", str(self.concurrency), "--hostname", hostname,
                ],
                env=self.env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                start_new_session=True,
            )  # fmt: skip
        return Worker(index, process, hostname)

    def wait_ready(self, app: Celery, timeout: float = 90) -> None:
        """Every running worker answers a ping and has its full pool."""

        def ready() -> bool:
            for worker in self.running:
                if worker.process.poll() is not None:
                    raise RuntimeError(f"worker {worker.index} exited:\n{self.tail(worker.index)}")
            try:
                # A connection of its own: a pooled one may date from before a broker restart.
                with app.connection_for_write() as connection:
                    replies = app.control.ping(timeout=1, connection=connection)
            except (redis.exceptions.ConnectionError, kombu.exceptions.OperationalError, OSError):
                return False
            answered = {name for reply in replies for name in reply}
            return len(answered) >= len(self.running) and all(
                len(children(w.process.pid)) >= self.concurrency for w in self.running
            )

        _wait(ready, timeout, "workers did not all answer a ping", interval=0.5)

    def kill_child(self, rng: random.Random) -> bool:
        """SIGKILL one random pool process of a random worker (the main process forks another)."""
        worker = rng.choice(self.running)
        pool = children(worker.process.pid)
        if not pool:
            return False
        try:
            os.kill(rng.choice(pool), signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.kills["child"] += 1
        return True

    def kill_main(self, rng: random.Random, restart: bool = True) -> None:
        """SIGKILL one random worker's main process; its orphaned pool goes a moment later (as
        a container's would), and a new main process starts in its place."""
        worker = rng.choice(self.running)
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait()
        self.kills["main"] += 1
        # The orphaned pool processes may still finish (and commit) what they hold, never to
        # be acknowledged; each leaves once it finds its parent gone. The rest are killed.
        with suppress(TimeoutError):
            _wait(lambda: not group_members(worker.process.pid), 10, "orphans", interval=0.05)
        self._kill_group(worker.process.pid)
        if restart:
            self.running[self.running.index(worker)] = self._spawn(worker.index)

    def exited(self) -> list[Worker]:
        """Main processes that exited although no one stopped them."""
        return [w for w in self.running if w.process.poll() is not None]

    def revive(self) -> int:
        """Start a new main process for every one that exited on its own, as a supervisor
        (``restart: unless-stopped``) would; how many were started."""
        revived = 0
        for position, worker in enumerate(self.running):
            if worker.process.poll() is not None:
                self._kill_group(worker.process.pid)
                self.running[position] = self._spawn(worker.index)
                self.kills["exited by itself"] += 1
                revived += 1
        return revived

    def _kill_group(self, pgid: int) -> None:
        with suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)

    def stop(self) -> None:
        for worker in self.running:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)  # warm shutdown
        for worker in self.running:
            try:
                worker.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._kill_group(worker.process.pid)
                worker.process.wait()
            self._kill_group(worker.process.pid)  # leftover pool processes, if any
        self.running = []

    def wait_log(self, text: str, timeout: float = 60) -> None:
        """Until a worker log has a line containing ``text`` (what a worker says it did)."""

        def logged() -> bool:
            return any(
                text in path.read_text(errors="replace")
                for path in self.log_dir.glob("worker-*.log")
            )

        try:
            _wait(logged, timeout, f"no worker logged {text!r}", interval=0.2)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.tail()}") from None

    def tail(self, index: int | None = None, lines: int = 20, about: tuple[str, ...] = ()) -> str:
        """The last lines of the worker logs, after their warnings and errors and every line
        that names one of ``about`` (task ids)."""
        out = []
        for path in sorted(self.log_dir.glob("worker-*.log")):
            if index is not None and path.name != f"worker-{index}.log":
                continue
            content = path.read_text(errors="replace").splitlines()
            notable = [
                line
                for line in content
                if " WARNING " in line or " ERROR " in line or any(a in line for a in about)
            ]
            out.append(
                f"== {path.name}: warnings, errors, the task ids\n" + "\n".join(notable[-60:])
            )
            out.append(f"== {path.name}: last lines\n" + "\n".join(content[-lines:]))
        return "\n".join(out)


# -- the message stream -------------------------------------------------------------------------


@dataclass
class Message:
    kind: str  # call | email | visit (the ingest task)
    body: dict[str, Any]
    bad: bool = False


@dataclass
class Stream:
    """A deterministic mixed stream and the events it must leave behind."""

    messages: list[Message]
    #: (source_kind, source_id) -> the fields the stored event must show.
    expected: dict[tuple[str, str], dict[str, Any]]

    @property
    def bad(self) -> int:
        return sum(1 for m in self.messages if m.bad)


def parties() -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = json.loads((EXAMPLES / "parties.json").read_text("utf-8"))
    return loaded


def bad_messages() -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = json.loads(
        (EXAMPLES / "bad" / "invalid-call.json").read_text("utf-8")
    )
    return loaded


def _pdf(size: int, seed: int) -> bytes:
    return b"%PDF-1.4\n" + random.Random(seed).randbytes(size) + b"\n%%EOF\n"


def email_with_attachment(n: int, run: str, day: int) -> tuple[dict[str, Any], str]:
    """A forwarded customer request with a PDF; returns the message and its Message-ID."""
    message_id = f"fault-{run}-{n}@pohjolankone.fi"
    encoded = base64.encodebytes(_pdf(1500 + n % 500, n)).decode("ascii").replace("\n", "\r\n")
    raw = (
        f"From: Asiakas {n} <asiakas{n}@pohjolankone.fi>\r\n"
        "To: Anna Lahtinen <anna.lahtinen@myyntitalo.fi>\r\n"
        "Cc: crm@myyntitalo.fi\r\n"
        f"Subject: Tarjouspyyntö {n}: huoltosopimus 2027\r\n"
        f"Date: {['Mon', 'Tue', 'Wed', 'Thu', 'Fri'][day % 5]}, {23 + day % 5} Nov 2026"
        f" 10:{n % 60:02d}:00 +0200\r\n"
        f"Message-ID: <{message_id}>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="=_fault"\r\n'
        "\r\n--=_fault\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n'
        f"Hei Anna,\r\n\r\npyydämme tarjousta huoltosopimuksesta ({n}). Liitteenä"
        " laiteluettelo.\r\n\r\nYstävällisin terveisin\r\nPohjolan Kone Oy\r\n"
        "--=_fault\r\n"
        'Content-Type: application/pdf; name="Laiteluettelo.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="Laiteluettelo.pdf"\r\n\r\n'
        f"{encoded}--=_fault--\r\n"
    ).encode()
    message = email_message(raw)
    message["mail_from"] = f"asiakas{n}@pohjolankone.fi"
    return message, message_id


def call_updates(
    n: int, run: str, day: int, rng: random.Random
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """2-4 status updates of one outbound call and the state they fold into."""
    call_id = f"fault-{run}-c{n}"
    start = datetime.fromisoformat(f"2026-11-{23 + day % 5:02d}T09:00:00+02:00") + timedelta(
        minutes=n % 480
    )
    seller = "anna" if n % 2 else "mikko"

    def update(seq: int, status: str, **fields: Any) -> dict[str, Any]:
        return outbound_call(
            call_id, start.isoformat(), agent=seller, status=status, sequence=seq, **fields
        )

    answered = (start + timedelta(seconds=15)).isoformat()
    if n % 7 == 0:  # not answered
        updates = [update(1, "ringing"), update(2, "missed", ended_at=answered)]
        return updates, {"status": "missed", "duration_s": None}
    talk = 30 + rng.randrange(900)
    ended = (start + timedelta(seconds=15 + talk)).isoformat()
    updates = [
        update(2, "answered", answered_at=answered),
        update(3, "completed", answered_at=answered, ended_at=ended, duration_s=talk),
    ]
    final = talk
    if n % 3:
        updates.insert(0, update(1, "ringing"))
    if n % 4 == 0:  # a corrected duration in a later update
        final = talk + 5
        updates.append(update(4, "completed", ended_at=ended, duration_s=final))
    return updates, {"status": "completed", "duration_s": final}


def visit_versions(n: int, run: str, day: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A visit and its later update (a new subject and memo): the update's values must win."""
    example = json.loads((EXAMPLES / "visits" / "visit-with-memo.json").read_text("utf-8"))
    start = datetime.fromisoformat(f"2026-11-{23 + day % 5:02d}T10:00:00+02:00") + timedelta(
        minutes=n % 300
    )
    first = example | {
        "visit_id": f"fault-{run}-v{n}",
        "seller": "anna" if n % 2 else "mikko",
        "attendees": ["anna", "mikko"],
        "started_at": start.isoformat(),
        "ended_at": (start + timedelta(hours=1)).isoformat(),
        "subject": f"Käynti {n}",
        "updated_at": (start + timedelta(hours=2)).isoformat(),
    }
    second = first | {
        "subject": f"Käynti {n} (päivitetty)",
        "memo": f"Päivitetty muistio {n}.",
        "updated_at": (start + timedelta(hours=3)).isoformat(),
    }
    return [first, second], {"subject": second["subject"]}


def build_stream(messages: int, seed: int = 1, run: str | None = None) -> Stream:
    """About ``messages`` messages: calls with 2-4 updates, emails with an attachment, visits
    with an update, and one bad message in about fifty; shuffled, so updates of one call or
    visit arrive out of order."""
    rng = random.Random(seed)
    run = run or uuid.uuid4().hex[:8]
    out: list[Message] = []
    expected: dict[tuple[str, str], dict[str, Any]] = {}
    bad = bad_messages()
    n = 0
    while len(out) < messages:
        n += 1
        day = rng.randrange(5)
        choice = n % 10
        if choice < 5:
            updates, final = call_updates(n, run, day, rng)
            out += [Message("call", u) for u in updates]
            expected[("call", updates[0]["call_id"])] = final
        elif choice < 8:
            email, message_id = email_with_attachment(n, run, day)
            out.append(Message("email", email))
            expected[("email", message_id)] = {}
        else:
            versions, final = visit_versions(n, run, day)
            out += [Message("visit", v) for v in versions]
            expected[("visit", versions[0]["visit_id"])] = final
        if n % 50 == 25:
            out.append(Message("call", bad[n % len(bad)], bad=True))
    rng.shuffle(out)
    return Stream(out, expected)


# -- one scenario: a fresh database, flushed broker, workers, publishing ------------------------


@dataclass
class Sent:
    """Task ids published, and which of them carried a bad message."""

    task_ids: list[str] = field(default_factory=list)
    bad_ids: set[str] = field(default_factory=set)
    messages: int = 0  # broker messages, redeliveries by the same task id included


@dataclass
class Scenario:
    name: str
    settings: Settings
    app: Celery
    engine: Engine
    sessions: sessionmaker[Session]
    workers: Workers
    sent: Sent = field(default_factory=Sent)
    started: float = field(default_factory=time.monotonic)

    def publish(
        self,
        stream: list[Message],
        *,
        copies: int = 1,
        same_id_copies: int = 0,
        rng: random.Random | None = None,
    ) -> list[str]:
        """Publish each message ``copies`` times. The first ``same_id_copies`` extra copies
        reuse the task id (as a broker redelivers a message), the others get their own (as a
        sender retries). Copies are spread over the stream, not sent back to back."""
        plan: list[tuple[Message, str]] = []
        for message in stream:
            first = str(uuid.uuid4())
            plan.append((message, first))
            for copy in range(copies - 1):
                plan.append((message, first if copy < same_id_copies else str(uuid.uuid4())))
        if copies > 1:
            (rng or random.Random(7)).shuffle(plan)
        ids: list[str] = []
        seen: set[str] = set()
        for message, task_id in plan:
            self.send(message.kind, message.body, task_id)
            if task_id not in seen:
                seen.add(task_id)
                ids.append(task_id)
                if message.bad:
                    self.sent.bad_ids.add(task_id)
        self.sent.task_ids += ids
        return ids

    def publish_batches(self, stream: list[Message], size: int) -> list[str]:
        """Publish the stream as ``crm.batch/1`` messages of ``size``, one kind per batch;
        returns (and accounts for) the id of each message in them."""
        from models.schemas.batch import item_id

        ids: list[str] = []
        by_kind: dict[str, list[Message]] = {}
        for message in stream:
            by_kind.setdefault(message.kind, []).append(message)
        for kind, messages in by_kind.items():
            for start in range(0, len(messages), size):
                chunk = messages[start : start + size]
                batch_id = str(uuid.uuid4())
                body = {
                    "schema": "crm.batch/1",
                    "source_system": "faults",
                    "kind": kind,
                    "messages": [m.body for m in chunk],
                }
                self.app.send_task(
                    BATCH_TASK, args=[body], task_id=batch_id, queue=TASK_QUEUES[BATCH_TASK]
                )
                self.sent.messages += 1
                for index, message in enumerate(chunk):
                    ids.append(item_id(batch_id, index))
                    if message.bad:
                        self.sent.bad_ids.add(ids[-1])
        self.sent.task_ids += ids
        return ids

    def send(self, kind: str, body: dict[str, Any], task_id: str) -> None:
        task_name = INGEST_TASKS[kind]
        self.app.send_task(task_name, args=[body], task_id=task_id, queue=TASK_QUEUES[task_name])
        self.sent.messages += 1

    def sweep_refreshes(self) -> None:
        """What beat sends every minute: re-send the seller refreshes whose claim went stale."""
        self.app.send_task("crm.refresh.sweep", queue=TASK_QUEUES["crm.refresh.sweep"])

    def outcomes(self) -> dict[str, Outcome]:
        return wait_for(self.sessions, self.sent.task_ids, 0)

    def wait_all(self, timeout: float, supervise: bool = False) -> dict[str, Outcome]:
        """Outcomes of every task id, waiting up to ``timeout``; with ``supervise`` a worker
        main process that exited by itself is started again meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            done = wait_for(self.sessions, self.sent.task_ids, min(5, timeout))
            if len(done) == len(self.sent.task_ids) or time.monotonic() > deadline:
                return done
            if supervise:
                self.workers.revive()
            elif self.workers.exited():
                return done  # no one restarts it here: waiting longer cannot help

    def wait_progress(self, fraction: float, timeout: float) -> int:
        """Wait until ``fraction`` of the published task ids have an outcome; how many have."""
        want = int(fraction * len(self.sent.task_ids))
        deadline = time.monotonic() + timeout
        while True:
            have = len(self.outcomes())
            if have >= want or time.monotonic() > deadline:
                return have
            time.sleep(0.2)


@contextmanager
def scenario(
    pg: PrivatePostgres,
    broker: PrivateRedis,
    work_dir: Path,
    name: str,
    *,
    workers: int = 1,
    concurrency: int = 2,
) -> Iterator[Scenario]:
    """A fresh database on the private cluster, an empty broker, ``workers`` worker processes
    and the sample parties (staff, customers, contacts) already processed."""
    database = f"crm_fault_{name}_{uuid.uuid4().hex[:6]}"
    url = pg.create_database(database)
    client = broker.client()
    client.flushall()
    client.close()
    data_dir = work_dir / name
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        data_dir=data_dir,
        database_url=url,
        broker_url=broker.url(),
        redis_url=broker.url(),
        task_time_limit_s=TASK_TIME_LIMIT_S,
        visibility_timeout_s=VISIBILITY_TIMEOUT_S,
        retry_backoff_max_s=RETRY_BACKOFF_MAX_S,
        max_retries=8,
    )
    engine = create_db_engine(settings)
    upgrade(engine)
    with transaction(create_session_factory(engine)) as session:
        install_default_catalogue(session)
    pool = Workers(worker_env(settings), data_dir, workers, concurrency)
    app = create_app(settings)
    run = Scenario(name, settings, app, engine, create_session_factory(engine), pool)
    try:
        pool.start()
        pool.wait_ready(app)
        run.publish([Message("party", p) for p in parties()])
        done = run.wait_all(60)
        assert len(done) == len(run.sent.task_ids), f"parties not processed:\n{pool.tail()}"
        run.sent = Sent()
        run.started = time.monotonic()
        yield run
    finally:
        pool.stop()
        kombu.pools.reset()  # the pools are shared by broker URL: the next scenario reuses it
        engine.dispose()
        pg.drop_database(database)


# -- accounting ---------------------------------------------------------------------------------


@dataclass
class Accounting:
    published: int = 0  # broker messages sent
    task_ids: int = 0
    accounted: int = 0  # task ids with an outcome
    unaccounted: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    events_expected: int = 0
    events_found: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    unexpected: list[tuple[str, str]] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    rejected: int = 0
    rejected_expected: int = 0
    rejected_wrong: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    drift: int = -1
    drift_details: list[Any] = field(default_factory=list)
    refresh_settled: bool = False
    consuming: bool = False
    exited: list[str] = field(default_factory=list)
    seconds: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.task_ids / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        found = []
        if self.accounted != self.task_ids:
            found.append(
                f"{self.task_ids - self.accounted} task id(s) without an outcome:"
                f" {self.unaccounted[:5]}"
            )
        if self.missing:
            found.append(f"{len(self.missing)} missing event(s), e.g. {self.missing[:5]}")
        if self.duplicates:
            found.append(f"{len(self.duplicates)} doubled event(s), e.g. {self.duplicates[:5]}")
        if self.unexpected:
            found.append(f"{len(self.unexpected)} unexpected event(s): {self.unexpected[:5]}")
        if self.wrong:
            found.append(f"{len(self.wrong)} event(s) with wrong values, e.g. {self.wrong[:5]}")
        if self.rejected != self.rejected_expected or self.rejected_wrong:
            found.append(
                f"rejected {self.rejected}, expected {self.rejected_expected}"
                f" {self.rejected_wrong[:5]}"
            )
        if self.failed:
            found.append(f"{len(self.failed)} failed message(s), e.g. {self.failed[:3]}")
        if self.drift != 0:
            found.append(f"tally drift {self.drift}: {self.drift_details[:5]}")
        if not self.refresh_settled:
            found.append("seller refreshes did not settle (refresh_request left)")
        if self.exited:
            found.append(f"worker main process(es) exited by themselves: {self.exited}")
        if not self.consuming:
            found.append("the workers did not consume a new message")
        return found

    def lines(self) -> list[str]:
        return [
            f"published           {self.published} broker messages, {self.task_ids} task ids",
            f"accounted for       {self.accounted} ({dict(sorted(self.outcomes.items()))})",
            f"events expected     {self.events_expected}",
            f"events found        {self.events_found}",
            f"missing             {len(self.missing)}",
            f"duplicates          {len(self.duplicates)} (+{len(self.unexpected)} unexpected)",
            f"wrong final state   {len(self.wrong)}",
            f"rejected            {self.rejected} (expected {self.rejected_expected})",
            f"failed              {len(self.failed)}",
            f"drift               {self.drift}",
            f"workers consuming   {'yes' if self.consuming else 'NO'}",
            f"faults              {dict(sorted(self.faults.items()))}",
            f"time                {self.seconds:.1f} s",
            f"rate                {self.rate:.1f} task ids/s",
        ]


#: How often the harness sends ``crm.refresh.sweep`` while refreshes settle after faults, as
#: beat does in production (workers/beat.py, every minute).
SWEEP_EVERY_S = 10


def wait_refresh_settled(
    sessions: sessionmaker[Session], timeout: float, sweep: Callable[[], None] | None = None
) -> bool:
    """True once no seller refresh is waiting (every requested refresh has run).

    ``sweep``: called every SWEEP_EVERY_S meanwhile, standing in for beat. A process killed
    between claiming a seller's refresh and publishing it leaves a request that only the sweep
    re-sends, once it is STALE_REFRESH_REQUEST old (the product's guarantee, docs/design.md).
    """
    last_sweep = time.monotonic()

    def settled() -> bool:
        nonlocal last_sweep
        with sessions() as session:
            requests = session.scalar(select(func.count()).select_from(RefreshRequest)) or 0
        if requests and sweep is not None and time.monotonic() - last_sweep >= SWEEP_EVERY_S:
            sweep()
            last_sweep = time.monotonic()
        return requests == 0

    try:
        _wait(settled, timeout, "refreshes", interval=0.3)
    except TimeoutError:
        return False
    return True


def account(
    run: Scenario,
    stream: Stream,
    *,
    timeout: float,
    probe_timeout: float = 60,
    supervise: bool = False,
) -> Accounting:
    """Wait for every task id's outcome (up to ``timeout``), then check everything."""
    result = Accounting(published=run.sent.messages, task_ids=len(run.sent.task_ids))
    done = run.wait_all(timeout, supervise=supervise)
    result.seconds = time.monotonic() - run.started
    result.accounted = len(done)
    result.unaccounted = [i for i in run.sent.task_ids if i not in done]
    result.outcomes = Counter(d.outcome for d in done.values())
    result.faults = Counter(run.workers.kills)
    result.exited = [
        f"worker-{w.index} (exit status {w.process.returncode})" for w in run.workers.exited()
    ]
    # A refresh message a killed main process held comes back only after the visibility timeout,
    # however early every ingest message was accounted for.
    settle: float = REDELIVERY_S + 30 if result.faults.get("main") else 30
    sweep = None
    if result.faults:
        # A process killed between a seller's refresh claim and its publish: the sweep re-sends
        # that refresh once the claim is stale, as beat's sweep does in production.
        settle = max(settle, STALE_REFRESH_REQUEST.total_seconds() + 3 * SWEEP_EVERY_S)
        sweep = run.sweep_refreshes
    result.refresh_settled = wait_refresh_settled(
        run.sessions, 5 if result.exited else settle, sweep
    )
    with run.sessions() as session:
        rows = session.execute(
            select(
                CrmEvent.source_kind, CrmEvent.source_id, CrmEvent.status, CrmEvent.duration_s,
                CrmEvent.subject,
            ).where(CrmEvent.source_kind.in_(["call", "email", "visit"]))
        ).all()  # fmt: skip
        rejected = session.execute(select(RejectedMessage.task_id, RejectedMessage.reason)).all()
        failed = session.execute(
            select(FailedMessage.task_id, FailedMessage.kind, FailedMessage.exception)
        ).all()
    seen: Counter[tuple[str, str]] = Counter()
    for kind, source_id, status, duration, subject in rows:
        key = (kind, source_id)
        seen[key] += 1
        want = stream.expected.get(key)
        if want is None:
            result.unexpected.append(key)
            continue
        got = {"status": status, "duration_s": duration, "subject": subject}
        for name, value in want.items():
            if got[name] != value:
                result.wrong.append(f"{kind} {source_id}: {name} {got[name]!r}, want {value!r}")
    result.events_expected = len(stream.expected)
    result.events_found = len(seen)
    result.missing = sorted(set(stream.expected) - set(seen))
    result.duplicates = sorted(k for k, c in seen.items() if c > 1)
    rejected_ids = {task_id for task_id, _ in rejected}
    result.rejected = len(rejected_ids)
    result.rejected_expected = len(run.sent.bad_ids)
    result.rejected_wrong = sorted(
        f"{task_id}: {reason[:80]}"
        for task_id, reason in rejected
        if task_id not in run.sent.bad_ids
    )
    result.failed = [f"{task_id} {kind}: {exc[:200]}" for task_id, kind, exc in failed]
    # Tallies against a recomputation from scratch; no key is left out as "recently touched".
    with snapshot(run.sessions) as session:
        reconciled = reconcile(session, now=utcnow() + 2 * STALE_REFRESH_REQUEST)
        result.drift = reconciled.drift
        result.drift_details = list(reconciled.details)
    result.consuming = probe(run, probe_timeout)
    return result


def probe(run: Scenario, timeout: float) -> bool:
    """Every worker answers, and a new message published now is processed."""
    try:
        run.workers.wait_ready(run.app, timeout=timeout)
    except (TimeoutError, RuntimeError):
        return False
    ids = []
    for index in range(2 * len(run.workers.running)):
        task_id = str(uuid.uuid4())
        body = outbound_call(f"probe-{uuid.uuid4().hex[:8]}-{index}", "2026-11-27T12:00:00+02:00")
        run.send("call", body, task_id)
        ids.append(task_id)
    done = wait_for(run.sessions, ids, timeout)
    return len(done) == len(ids) and all(d.outcome == "stored" for d in done.values())
