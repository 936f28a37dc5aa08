"""``crm-events demo``: the embedded end-to-end run with real worker processes.

Starts a worker and beat as child processes, publishes the bundled examples (parties, calls with
several status updates, Twilio status callbacks and Asterisk CDRs, forwarded emails with
attachments, a calendar invitation, visits with memos, and a few bad messages), waits until
every one is processed, and prints the seller views and target progress. The samples' times are
moved by whole days so that the latest of them is today's: the seller views' week and month are
the current ones.
Run in a terminal, it then serves the screens (``crm-events serve``) until Ctrl-C, with the
worker still running; otherwise it says how to see them.
The data stays under the data directory for the other commands to explore.
"""

from __future__ import annotations

import email.utils
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select

from models.db import transaction
from models.parties import Staff
from workers.publish import Published, publish, publish_files, wait_for


def default_examples() -> Path:
    """The sample world: ``examples/`` of the source checkout, else the copy installed with the
    package (``<prefix>/share/crm-events/examples``, pyproject.toml's data-files)."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "examples").is_dir():
        return checkout / "examples"
    return Path(sys.prefix) / "share" / "crm-events" / "examples"


#: A moment in the samples: an ISO date and time (JSON, CSV), an RFC 5322 date (mail headers,
#: Twilio's Timestamp) or an iCalendar one (invitations). Plain dates stay: they are also parts
#: of ids (c-2026-11-24-0042).
ISO_MOMENT = re.compile(r"\b(\d{4}-\d{2}-\d{2})([T ]\d{2}:\d{2})")
RFC_MOMENT = re.compile(
    r"\b(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{1,2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}"
)
#: An iCalendar date and time (an invitation's DTSTART, DTEND, DTSTAMP), local or UTC.
ICS_MOMENT = re.compile(r"\b(\d{8})T(\d{6})(Z?)\b")
SAMPLE_SUFFIXES = (".json", ".eml", ".csv")


def sample_moments(text: str) -> list[datetime]:
    """The wall-clock moments a sample names (offsets left out: they are one zone's days)."""
    found = [datetime.fromisoformat(m[1] + "T" + m[2][1:]) for m in ISO_MOMENT.finditer(text)]
    for match in RFC_MOMENT.finditer(text):
        found.append(email.utils.parsedate_to_datetime(match[0]).replace(tzinfo=None))
    found += [datetime.strptime(m[1] + m[2], "%Y%m%d%H%M%S") for m in ICS_MOMENT.finditer(text)]
    return found


def shifted(text: str, days: int) -> str:
    """The sample with every moment moved by ``days`` whole days (the clock times kept)."""

    def iso(match: re.Match[str]) -> str:
        day = date.fromisoformat(match[1]) + timedelta(days=days)
        return day.isoformat() + match[2]

    def rfc(match: re.Match[str]) -> str:
        moment = email.utils.parsedate_to_datetime(match[0]) + timedelta(days=days)
        return email.utils.format_datetime(moment)

    def ics(match: re.Match[str]) -> str:
        day = datetime.strptime(match[1], "%Y%m%d") + timedelta(days=days)
        return f"{day:%Y%m%d}T{match[2]}{match[3]}"

    return ICS_MOMENT.sub(ics, RFC_MOMENT.sub(rfc, ISO_MOMENT.sub(iso, text)))


def redated_examples(
    examples: Path, target: Path, zone: ZoneInfo
) -> tuple[Path, int, datetime | None]:
    """A copy of the samples moved by whole days (their clock times kept) so that the latest
    moment falls within the day before now, at or before it; or, where that day is in the
    previous week (the first hours of a Monday), later today: the seller view and the board
    then show the samples in the current week whenever the demo runs. Returns the copy, the
    days moved and the latest moment after the move (local time)."""
    files = [p for p in sorted(examples.rglob("*")) if p.suffix in SAMPLE_SUFFIXES]
    # Latin-1 keeps every byte of a mail as it is through the text round trip.
    texts = {path: path.read_bytes().decode("latin-1") for path in files}
    moments = [moment for text in texts.values() for moment in sample_moments(text)]
    now = datetime.now(zone).replace(tzinfo=None)
    days = int((now - max(moments)) / timedelta(days=1)) if moments else 0
    week_start = now.date() - timedelta(days=now.weekday())
    if moments and (max(moments) + timedelta(days=days)).date() < week_start:
        days += 1
    shutil.rmtree(target, ignore_errors=True)
    for path in sorted(examples.rglob("*")):
        destination = target / path.relative_to(examples)
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
        elif path in texts:
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(shifted(texts[path], days).encode("latin-1"))
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)
    return target, days, max(moments) + timedelta(days=days) if moments else None


def _start(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 (owned by the child for its lifetime)
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
        start_new_session=True,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    # Signal the main process only: Celery's warm shutdown lets children finish their task.
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def publish_telephony(app: Any, settings: Any, files: list[Path]) -> list[Published]:
    """Twilio callback samples (a JSON list of the callbacks' form fields) and Asterisk CDR
    files, turned into ``crm.call/1`` updates as the HTTP gateway and ``import cdr`` do."""
    from config.queues import CALL_TASK
    from tasks.telephony.adapters import CdrContext, twilio_to_call
    from workers.cli.telephony import cdr_messages
    from workers.render import console

    published = []
    for path in files:
        if path.suffix == ".csv":
            context = CdrContext(
                source_system="asterisk",
                own_numbers=settings.own_numbers,
                phone_region=settings.phone_region,
                time_zone=None,
            )
            text = path.read_text(encoding="utf-8", errors="replace").lstrip("\ufeff")
            messages, errors = cdr_messages(text, context, path.name)
            for error in errors:  # as `import cdr` reports them
                console.print(f"{error['source']}: not imported: {error['error']}")
        else:
            callbacks = json.loads(path.read_text(encoding="utf-8"))
            messages = [
                (f"{path.name}#{n + 1}", twilio_to_call(fields))
                for n, fields in enumerate(callbacks)
            ]
        published += [publish(app, CALL_TASK, message, label) for label, message in messages]
    return published


def free_port(preferred: int) -> int:
    import socket

    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            found: int = probe.getsockname()[1]
            return found
    raise OSError("no free port on 127.0.0.1")


def serve_screens(rt: Any, logs: Path) -> None:
    """Serve the screens on the demo's data until Ctrl-C (the worker keeps running, so new
    messages show up live), with a sign-in address for a token made for this run."""
    from tasks.access import create_token
    from workers.render import console

    with transaction(rt.sessions) as session:
        _, token = create_token(
            session, f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}", "admin", "anna"
        )
    port = free_port(8080)
    server = _start(["serve", "--port", str(port)], logs / "serve.log")
    base = f"http://127.0.0.1:{port}"
    console.print(
        f"\n[bold]The screens[/bold] (Ctrl-C stops them):\n"
        f"  Myyjän näkymä: {base}/login?token={token}&next=/sellers/anna\n"
        f"  the board: {base}/board · triage: {base}/triage · customer: {base}/customers/10001"
        f" · API: {base}/docs"
    )
    try:
        while server.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        _stop(server)


def run_demo(rt: Any, examples: Path | None, timeout: float, serve: bool = True) -> int:
    from models.migrate import init_database
    from workers.render import brief, console, progress, seller_view, table

    settings = rt.settings
    console.print(f"[bold]CRM events demo[/bold] — data in {settings.data_dir.resolve()}")
    if examples is None:
        samples = default_examples()
        if not (samples / "parties.json").is_file():
            console.print(f"[red]no sample data in {samples}: give --examples FOLDER[/red]")
            return 2
        examples, days, latest = redated_examples(
            samples, settings.data_dir / "demo-examples", settings.zone
        )
        when = f": the latest at {latest:%Y-%m-%d %H:%M}" if latest else ""
        console.print(f"the samples' times moved by {days} day(s){when}")
    if not settings.embedded_broker:
        console.print(f"broker: {settings.effective_broker_url.split('@')[-1]}")

    added = init_database(rt.engine, rt.sessions)
    print(f"schema at head; catalogue rows added: {len(added)}", file=sys.stderr)
    logs = settings.data_dir / "log"
    worker = _start(
        ["worker", "--concurrency", str(settings.worker_concurrency)], logs / "worker.log"
    )
    beat = _start(["beat"], logs / "beat.log")
    try:
        outcomes: Counter[str] = Counter()
        calls = examples / "calls"
        steps = [
            ("party", [examples / "parties.json"]),
            ("target", [examples / "targets.json"]),
            ("call", [f for f in sorted(calls.glob("*.json")) if not f.name.startswith("twilio")]),
            # Twilio status callbacks and Asterisk CDRs, through the telephony adapters.
            ("telephony", [*sorted(calls.glob("twilio*.json")), *sorted(calls.glob("*.csv"))]),
            ("email", sorted((examples / "emails").glob("*.eml"))),
            ("visit", sorted((examples / "visits").glob("*.json"))),
            ("call", sorted((examples / "bad").glob("*.json"))),
        ]
        started = time.monotonic()
        for kind, files in steps:
            if not files:
                continue
            if kind == "telephony":
                published = publish_telephony(rt.app, settings, files)
            else:
                published = publish_files(rt.app, settings, kind, files)
            done = wait_for(rt.sessions, [p.task_id for p in published], timeout)
            missing = [p for p in published if p.task_id not in done]
            for delivery in done.values():
                outcomes[delivery.outcome] += 1
            console.print(
                f"published {len(published)} {kind} message(s) from {len(files)} file(s): "
                + ", ".join(
                    f"{k} {v}" for k, v in sorted(Counter(d.outcome for d in done.values()).items())
                )
            )
            if missing:
                console.print(
                    f"[red]{len(missing)} message(s) not processed within {timeout:g} s;"
                    f" see {logs / 'worker.log'}[/red]"
                )
                return 3
        console.print(
            f"all processed in {time.monotonic() - started:.1f} s: "
            + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        )

        from tasks.reports import build_target_report, write_report_files
        from tasks.views import seller_cards, targets_progress

        with rt.sessions() as session:
            sellers = session.scalars(
                select(Staff).where(Staff.role == "seller").order_by(Staff.username)
            ).all()
            for seller in sellers:
                cards = seller_cards(session, seller, cards=settings.seller_cards)
                console.print()
                seller_view(seller.username, seller.name, cards)
            console.print()
            progress(targets_progress(session))
            from models.ledger import RejectedMessage

            rejected = session.scalars(select(RejectedMessage).order_by(RejectedMessage.id)).all()
            table(
                "rejected messages (crm-events rejected)",
                ["id", "reason"],
                [[f"rejected:{r.id}", brief(r.reason)] for r in rejected],
            )
            managers = session.scalars(select(Staff).where(Staff.role == "manager")).all()
            written = []
            for manager in managers:
                report = build_target_report(session, manager, "weekly", period=None)
                written += write_report_files(report, settings.data_dir / "reports")
        for path in written:
            console.print(f"sample report: {path}")
        console.print(
            "\nExplore: crm-events events · history 10001 · seller-view anna"
            " · targets progress · rejected"
        )
        if serve and sys.stdin.isatty() and sys.stdout.isatty():
            serve_screens(rt, logs)
        else:
            console.print(
                "The screens (Myyjän näkymä, the board): [bold]make screens[/bold], then open"
                " the address it prints."
            )
        return 0
    finally:
        _stop(worker)
        _stop(beat)
