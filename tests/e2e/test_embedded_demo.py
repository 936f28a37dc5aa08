"""The embedded default end to end: `crm-events demo` on SQLite and the filesystem broker,
with real worker processes, then the command line reading what it left behind."""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from config import catalogue
from tests.conftest import ROOT
from tests.processes import run_cli, stop_process


def run(data_dir: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    env["CRM_DATA_DIR"] = str(data_dir)
    return run_cli(env, *args, timeout=timeout)


def run_json(data_dir: Path, *args: str) -> Any:
    result = run(data_dir, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # exactly one JSON document on stdout


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, datetime]:
    """The demo's data folder, by how many days it moved the samples' times, and the latest
    moment it says they have now."""
    data_dir = tmp_path_factory.mktemp("embedded")
    result = run(data_dir, "demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Myyjän näkymä" in result.stdout
    assert "make screens" in result.stdout  # not a terminal: it says how to see the screens
    assert (data_dir / "crm.sqlite3").exists()
    moved = re.search(
        r"the samples' times moved by (-?\d+) day\(s\): the latest at (\S+ \S+)", result.stdout
    )
    assert moved, result.stdout[:2000]
    return data_dir, int(moved[1]), datetime.fromisoformat(moved[2])


@pytest.fixture(scope="module")
def demo_dir(demo_run: tuple[Path, int, datetime]) -> Path:
    return demo_run[0]


def test_the_samples_are_dated_so_that_the_latest_is_today(
    demo_run: tuple[Path, int, datetime],
) -> None:
    data_dir, _days, said = demo_run
    events = run_json(data_dir, "events")
    zone = ZoneInfo("Europe/Helsinki")  # the demo's zone (CRM_TIME_ZONE's default)
    latest = max(datetime.fromisoformat(e["occurred_at"]) for e in events).astimezone(zone)
    now = datetime.now(zone)
    week_start = now.date() - timedelta(days=now.weekday())
    # Within the day before now; in a Monday's first hours, later today (not last week).
    assert latest.date() >= week_start
    assert (latest <= now and now - latest < timedelta(days=1)) or latest.date() == now.date()
    # The latest moment the demo names (of any sample: an event's, a header's) is no earlier.
    assert said.replace(tzinfo=zone) >= latest.replace(second=0, microsecond=0)
    assert said.date() >= week_start
    this_week = [c["count_week"] for c in run_json(data_dir, "seller-view", "anna")]
    assert sum(this_week) > 0  # the seller view's current week has the samples in it


def test_demo_stores_every_sample_once(demo_run: tuple[Path, int, datetime]) -> None:
    demo_dir, days, _said = demo_run
    events = run_json(demo_dir, "events")
    by_source = {(e["source_kind"], e["source_id"]) for e in events}
    assert len(by_source) == len(events) == 13
    call = next(e for e in events if e["source_id"] == "c-2026-11-23-0001")
    assert (call["status"], call["duration_s"], call["seller"]) == ("completed", 448, "anna")
    # The telephony samples in their systems' own formats, through the adapters.
    twilio = next(e for e in events if e["source_id"] == "CA1f0d2c3b4a5968778695a4b3c2d1e0f9")
    assert (twilio["status"], twilio["duration_s"], twilio["contact"]) == (
        "completed",
        398,
        "Liisa Korhonen",
    )
    answered = next(e for e in events if e["source"] == "asterisk" and e["duration_s"])
    assert (answered["contact"], answered["seller"]) == ("Matti Virtanen", "mikko")
    unanswered = next(e for e in events if e["source"] == "asterisk" and not e["duration_s"])
    assert (unanswered["link_state"], unanswered["customer_number"]) == ("unlinked", None)
    forwarded = next(e for e in events if e["source_id"] == "fwd-20261120090500.77@myyntitalo.fi")
    sampled = datetime.fromisoformat("2026-11-20T08:41:03+02:00")  # the forwarded mail's date
    assert forwarded["occurred_at"] == (sampled + timedelta(days=days)).isoformat()
    assert "Laiteluettelo_kevät_2027.pdf" in [d["filename"] for d in forwarded["documents"]]
    # mikko's Google Calendar invitation: a meeting at its start time, still to be held.
    [meeting] = [e for e in events if e["source_kind"] == "meeting"]
    start = datetime.fromisoformat("2026-11-26T08:00:00+00:00") + timedelta(days=days)
    assert datetime.fromisoformat(meeting["occurred_at"]) == start
    assert (meeting["seller"], meeting["customer_number"], meeting["contact"]) == (
        "mikko",
        "10002",
        "Sanna Heikkinen",
    )
    assert (meeting["category"], meeting["state"], meeting["subject"]) == (
        "crm_event",
        "scheduled",
        "Vuosisopimus 2027",
    )


def test_catalogue_is_the_design_default(demo_dir: Path) -> None:
    document = run_json(demo_dir, "catalogue", "show")
    assert [(c["code"], c["fi"], c["en"]) for c in document["classes"]] == sorted(
        (c.code, c.name_fi, c.name_en) for c in catalogue.CLASSES
    )
    categories = {c["code"]: c for c in document["categories"]}
    assert categories["crm_event"]["allow_selection"] is True
    assert categories["sales_action"]["sales_target"] is True
    assert categories["customer_visit"]["fi"] == "Asiakaskäynti"
    assert categories["lead"]["default_class"] == "marketing"


def test_rejections_have_reasons(demo_dir: Path) -> None:
    rejected = run_json(demo_dir, "rejected")
    reasons = [r["reason"] for r in rejected]
    assert len(rejected) == 3
    assert any(r.startswith("auto-reply") for r in reasons)
    assert any("schema must be 'crm.call/1'" in r for r in reasons)


def test_seller_view_counts_equal_lists_and_progress_has_targets(demo_dir: Path) -> None:
    cards = run_json(demo_dir, "seller-view", "anna")
    assert [c["card"] for c in cards] == [
        "CRM-tapahtumat",
        "Liidit",
        "Myyntitoimenpiteet",
        "Asiakaskäynnit",
    ]
    for card in cards:
        assert card["count_week"] == sum(e["in_week"] for e in card["events"])
        assert card["count_month"] == sum(e["in_month"] for e in card["events"])
    # The field-app visit and the crm+visit@ memo, counted in the months they fall in.
    visits = run_json(demo_dir, "events", "--seller", "anna", "--category", "customer_visit")
    assert len(visits) == 2
    months = {e["occurred_at"][:7] for e in visits}
    counted = 0
    for month in months:
        rows = run_json(demo_dir, "targets", "progress", "--seller", "anna", "--period", month)
        row = next(r for r in rows if r["category"] == "customer_visit")
        assert {"seller", "category", "period", "target", "actual"} <= set(row)
        counted += row["actual"]
    assert counted == 2


def test_the_sample_targets_are_in_force_and_a_past_month_can_be_viewed(demo_dir: Path) -> None:
    targets = json.loads((ROOT / "examples" / "targets.json").read_text())
    cards = {c["category"]: c for c in run_json(demo_dir, "seller-view", "anna")}
    [weekly] = [t for t in targets if (t["seller"], t["kind"]) == ("anna", "weekly")]
    assert cards[weekly["category"]]["target"]["weekly"] == weekly["value"]
    [mikko] = [t for t in targets if t["seller"] == "mikko"]
    cards = {c["category"]: c for c in run_json(demo_dir, "seller-view", "mikko")}
    assert cards[mikko["category"]]["target"]["monthly"] == mikko["value"]

    # The cards of the month of anna's earliest visit, as they stood at its end.
    visits = run_json(demo_dir, "events", "--seller", "anna", "--category", "customer_visit")
    month = min(e["occurred_at"][:7] for e in visits)
    cards = run_json(demo_dir, "seller-view", "anna", "--period", month)
    card = next(c for c in cards if c["category"] == "customer_visit")
    assert card["month"] == month
    assert card["count_month"] == sum(e["occurred_at"][:7] == month for e in visits) > 0
    wrong = run(demo_dir, "seller-view", "anna", "--period", "2026-13")
    assert wrong.returncode == 2 and "not a period '2026-13'" in wrong.stderr


def test_history_and_reconcile(demo_dir: Path) -> None:
    history = run_json(demo_dir, "history", "10001")
    times = [e["occurred_at"] for e in history["events"]]
    assert times == sorted(times, reverse=True)
    assert {"anna", "mikko"} <= {s for e in history["events"] for s in e["staff"]}
    assert run_json(demo_dir, "reconcile")["drift"] == 0


def test_deeply_nested_messages_do_not_stop_the_embedded_worker(
    demo_dir: Path, tmp_path: Path
) -> None:
    """The filesystem broker too: two messages nested 600 levels deep (as many as the worker
    has pool processes) are refused and recorded, and the next message is processed. They are
    sent straight to the broker, as a producer of its own would: ``crm-events publish`` refuses
    such a file itself, saying why."""
    deep: Any = 1
    for _ in range(600):
        deep = [deep]
    call = json.loads((ROOT / "examples/calls/missed-from-switchboard.json").read_text())[1]
    deep_file = tmp_path / "deep.json"
    deep_file.write_text(
        json.dumps([{**call, "call_id": f"deep-{i}", "extra": deep} for i in (0, 1)])
    )
    after = tmp_path / "after.json"
    after.write_text(json.dumps({**call, "call_id": "after-deep"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    env["CRM_DATA_DIR"] = str(demo_dir)
    refused = run(demo_dir, "publish", "call", str(deep_file))
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"crm-events: {deep_file}: the JSON is nested deeper than 32 levels"
    )
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker", "--concurrency", "2"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        sent = subprocess.run(
            [sys.executable, "-c", SEND_AND_WAIT, str(deep_file), "120"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert sent.returncode == 0, sent.stderr
        outcomes = json.loads(sent.stdout)
        assert [o["outcome"] for o in outcomes] == ["rejected", "rejected"]
        assert all("nested deeper than" in o["detail"] for o in outcomes)
        published = run(demo_dir, "publish", "call", str(after), "--wait", "120", "--json")
        assert published.returncode == 0, (published.stderr, (tmp_path / "worker.log").read_text())
        assert json.loads(published.stdout)[0]["outcome"] == "stored"
    finally:
        stop_process(worker)


#: Sends each message of a JSON file (argv[1]) to the call task through the broker, waits up to
#: argv[2] seconds for their outcomes and prints them as JSON (the fields of ``Outcome``).
SEND_AND_WAIT = """
import json, sys
from pathlib import Path
from config.queues import INGEST_TASKS
from config.settings import load_settings
from models.db import create_db_engine, create_session_factory
from workers.app import create_app
from workers.publish import publish, wait_for

settings = load_settings()
app = create_app(settings)
messages = json.loads(Path(sys.argv[1]).read_text())
ids = [publish(app, INGEST_TASKS["call"], m, "deep").task_id for m in messages]
sessions = create_session_factory(create_db_engine(settings))
done = wait_for(sessions, ids, float(sys.argv[2]))
print(json.dumps([done[i]._asdict() if i in done else {"outcome": "pending"} for i in ids],
                 default=str))
"""


def test_a_document_is_copied_out_as_it_arrived(demo_dir: Path, tmp_path: Path) -> None:
    sample = email.message_from_bytes(
        (ROOT / "examples" / "emails" / "forwarded-memo-rfc822.eml").read_bytes(),
        policy=email.policy.default,
    )
    pdf = next(
        part.get_content()
        for part in sample.walk()
        if part.get_filename() == "Laiteluettelo_kevät_2027.pdf"
    )
    [forwarded] = [
        e
        for e in run_json(demo_dir, "events", "--source-kind", "email")
        if e["source_id"] == "fwd-20261120090500.77@myyntitalo.fi"
    ]
    event = str(forwarded["id"])
    [document] = [d for d in forwarded["documents"] if d["filename"].endswith(".pdf")]

    out = tmp_path / "copy.pdf"
    done = run(demo_dir, "document", "get", event, document["filename"], "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == pdf
    again = run(demo_dir, "document", "get", event, document["filename"], "--out", str(out))
    assert again.returncode == 2 and "exists: give --force" in again.stderr
    # --force replaces a file, never a device or a pipe (as /dev/null would have been).
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    forced = run(demo_dir, "document", "get", event, document["filename"], "--out", str(pipe),
                 "--force")  # fmt: skip
    assert (forced.returncode, forced.stderr.strip()) == (
        2,
        f"crm-events: {pipe} is not a file: give a file or a folder",
    )
    assert stat.S_ISFIFO(pipe.stat().st_mode)
    nowhere = tmp_path / "no-such-folder" / "x.pdf"
    lost = run(demo_dir, "document", "get", event, document["filename"], "--out", str(nowhere))
    assert lost.returncode == 2 and "cannot be written: No such file or directory" in lost.stderr
    to_stdout = subprocess.run(
        [sys.executable, "-m", "workers.cli", "document", "get", event, str(document["id"]),
         "--out", "-"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("CRM_")},
             "CRM_DATA_DIR": str(demo_dir)},
        capture_output=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert to_stdout.returncode == 0 and to_stdout.stdout == pdf
    missing = run(demo_dir, "document", "get", event, "no-such.pdf")
    assert missing.returncode == 1 and document["filename"] in missing.stderr


def test_a_catalogue_change_says_what_it_does_to_the_sample_world(
    demo_dir: Path, tmp_path: Path
) -> None:
    """Visits stop taking targets and get another type; a new category `negotiation` of the
    sales actions' type. The preview says which targets stop counting, which events keep their
    type, which cards change; applying it needs --force."""
    change = tmp_path / "catalogue.json"
    change.write_text(
        json.dumps(
            {
                "categories": [
                    {"code": "customer_visit", "sales_target": False, "default_type": "crm_event"},
                    {
                        "code": "negotiation",
                        "fi": "Neuvottelu",
                        "en": "Negotiation",
                        "default_class": "sales",
                        "default_type": "sales_action",
                        "allow_selection": False,
                        "sales_target": True,
                    },
                ]
            }
        )
    )
    visits = run_json(demo_dir, "events", "--category", "customer_visit")
    targets = json.loads((ROOT / "examples" / "targets.json").read_text())
    visit_targets = [t for t in targets if t["category"] == "customer_visit"]

    preview = run_json(demo_dir, "catalogue", "apply", str(change), "--dry-run")
    assert preview["destructive"] is True and preview["applied"] is False
    impacts = "\n".join(preview["impacts"])
    assert (
        f"category customer_visit: {len(visit_targets)} target(s) in force for "
        f"{len({t['seller'] for t in visit_targets})} seller(s) stop counting"
    ) in impacts
    assert (
        f"category customer_visit: {len(visits)} existing event(s) keep type customer_visit"
    ) in impacts
    assert "card added: Neuvottelu (negotiation)" in impacts
    # Two categories of one type: each card is titled by its category, not twice by the type.
    assert "card sales_action: title 'Myyntitoimenpiteet' -> 'Myyntitoimenpide'" in impacts

    # Without --force nothing changes; with it, the change is made.
    refused = run(demo_dir, "catalogue", "apply", str(change))
    assert refused.returncode == 2 and "give --force to apply it" in refused.stderr
    assert run_json(demo_dir, "catalogue", "show")["categories"][-1]["code"] != "negotiation"
    copy = tmp_path / "copy"
    shutil.copytree(demo_dir, copy)
    forced = run(copy, "catalogue", "apply", str(change), "--force")
    assert forced.returncode == 0, forced.stderr
    shown = {c["code"]: c for c in run_json(copy, "catalogue", "show")["categories"]}
    assert shown["customer_visit"]["sales_target"] is False and "negotiation" in shown


def test_a_work_task_by_hand_shows_on_the_seller_view_until_done(demo_dir: Path) -> None:
    event = run_json(demo_dir, "events", "--seller", "anna")[0]["id"]
    yesterday = (datetime.now().date() - timedelta(days=1)).isoformat()
    added = run(
        demo_dir, "task", "add", str(event), "--title", "Lähetä tarjous", "--due", yesterday
    )
    assert added.returncode == 0, added.stderr
    [task] = [t for t in run_json(demo_dir, "task", "list") if t["title"] == "Lähetä tarjous"]
    assert (task["assignee"], task["event_id"], task["overdue"]) == ("anna", event, True)
    view = run(demo_dir, "seller-view", "anna").stdout
    assert "Lähetä tarjous" in view and "myöhässä / overdue" in view

    assert run(demo_dir, "task", "done", str(task["id"])).returncode == 0
    assert "Lähetä tarjous" not in run(demo_dir, "seller-view", "anna").stdout
    [done] = run_json(demo_dir, "task", "list", "--state", "done")
    assert (done["id"], done["state"], done["done_by"][:3]) == (task["id"], "done", "cli")
    # Staff named as messages name them: here by email address.
    by_address = run(
        demo_dir, "task", "add", str(event), "--title", "Soita", "--assignee",
        "mikko.nieminen@myyntitalo.fi",
    )  # fmt: skip
    assert by_address.returncode == 0, by_address.stderr
    assert [t["title"] for t in run_json(demo_dir, "task", "list", "--assignee", "mikko")] == [
        "Soita"
    ]
    refused = run(demo_dir, "task", "add", str(event), "--title", "x", "--assignee", "nobody")
    assert refused.returncode == 1 and "no staff member 'nobody'" in refused.stderr
