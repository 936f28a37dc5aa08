"""Every input error of the command line is one line on stderr and exit status 2, never a
traceback: arguments argparse or Celery refuse, values that do not parse, files that are not
what the command reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.processes import run_cli


def crm_events(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    env["CRM_DATA_DIR"] = str(data_dir)
    return run_cli(env, *args)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli-errors")
    done = crm_events(folder, "init-db")
    assert done.returncode == 0, done.stderr
    (folder / "no-code.json").write_text(json.dumps({"categories": [{"fi": "Neuvottelu"}]}))
    (folder / "no-fi.json").write_text(json.dumps({"properties": [{"code": "urgent", "en": "U"}]}))
    (folder / "not-json.json").write_text("{categories: [")
    (folder / "latin-1.json").write_bytes(b'{"categories": [{"code": "k", "fi": "K\xe4ynti"}]}')
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    escape = {"classes": [{"code": "c\u001b[31m", "fi": "Punainen", "en": "Red"}]}
    (folder / "escape-code.json").write_text(json.dumps(escape))
    return folder


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["events", "--limit=-1"], "argument --limit: must be 0 to 2147483647, not -1"),
        (["events", "--limit", "9" * 30], "argument --limit: must be 0 to 2147483647"),
        (["delete-event", "99999999999999999999"], "argument EVENT_ID: must be 0 to 2147483647"),
        (["link", "9" * 20, "--customer", "1"], "argument EVENT: must be 0 to 2147483647"),
        (["erase", "release", "9" * 20], "argument N: must be 0 to 2147483647"),
        (["document", "get", "9" * 20, "1"], "argument EVENT: must be 0 to 2147483647"),
        (["serve", "--port", "99999"], "argument --port: a port is 0 to 65535, not 99999"),
        (["demo", "--examples", "{dir}/none", "--no-serve"], "not a folder of example messages"),
        # nan was never reached: the command waited for ever.
        (["publish", "call", "x.json", "--wait", "nan"], "a number of seconds from 0, not 'nan'"),
        (["import", "messages", "x.jsonl", "--wait", "-5"], "a number of seconds from 0"),
        (["import", "cdr", "x.csv", "--source-system", ""], "1 to 100 printable characters"),
        (["import", "cdr", "x.csv", "--batch-size", "0"], "--batch-size: must be 1 to 1000, not 0"),
        (["import", "cdr", "x.csv", "--batch-size", "²"], "--batch-size: not a whole number"),
        (["events", "--limit", "many"], "argument --limit: not a whole number: 'many'"),
        (["events", "--since", "yesterday"], "not a date (YYYY-MM-DD): 'yesterday'"),
        (
            ["targets", "set", "anna", "sales_action", "--weekly", "4", "--from", "2026-13-45"],
            "argument --from: not a date (YYYY-MM-DD): '2026-13-45'",
        ),
        (
            ["targets", "set", "anna", "sales_action", "--weekly", "4", "--from", "tomorrow"],
            "argument --from: not a date (YYYY-MM-DD): 'tomorrow'",
        ),
        (["targets", "set", "anna", "sales_action", "--weekly", "-3"], "must be 0 to 2147483647"),
        (["targets", "progress", "--period", "2026-13"], "not a period '2026-13'"),
        (["stats", "--by", "class", "--period", "last week"], "not a period 'last week'"),
        (["report", "targets", "--kind", "weekly", "--period", "2026-11"], "not a weekly period"),
        (["catalogue", "apply", "{dir}/no-code.json"], "categories: 0: code: Missing data"),
        (["catalogue", "apply", "{dir}/no-code.json", "--dry-run"], "code: Missing data"),
        (["catalogue", "apply", "{dir}/no-fi.json"], "new property urgent needs fi"),
        (["catalogue", "apply", "{dir}/no-fi.json", "--dry-run"], "new property urgent needs fi"),
        (["catalogue", "apply", "{dir}/not-json.json"], "not-json.json: not JSON: Expecting"),
        (["catalogue", "apply", "{dir}/latin-1.json"], "not JSON: 'utf-8' codec can't decode"),
        (["catalogue", "apply", "{dir}/deep.json"], "deep.json: the JSON is nested deeper than"),
        # A code is typed in filters and shown in tables: no escape sequence, no space.
        (["catalogue", "apply", "{dir}/escape-code.json"], "code: A code is letters, digits"),
        (["catalogue", "apply", "{dir}/missing.json"], "No such file or directory"),
        (["catalogue", "apply"], "catalogue apply needs a FILE"),
        (["import", "cdr", "{dir}/no-code.json", "--time-zone", "Europe"], "unknown time zone"),
        (["worker", "--bogus-opt"], "No such option '--bogus-opt'"),
        (["worker", "-Q", "nosuch"], "-Q: no queue 'nosuch'; the queues are crm.ingest.call, "),
        (["worker", "--queues=crm.refresh,crm.bogus"], "-Q: no queue 'crm.bogus'"),
        (["worker", "-Qcrm.refresh", "-X", "crm.reportz"], "-X: no queue 'crm.reportz'"),
        (["worker", "--exclude-queues", ","], "-X names no queue; the queues are crm.ingest"),
        # Celery keeps the spaces: " crm.reports" is no queue, and an exclusion of it none.
        (["worker", "-Q", "crm.refresh, crm.reports"], "-Q: no queue ' crm.reports'"),
        (["worker", "-X", "crm.refresh "], "-X: no queue 'crm.refresh '"),
        (["worker", "-Q", "crm.refresh,"], "-Q: no queue ''"),
        (["worker", "-Q", "crm.refresh", "-X", "crm.refresh"], "-X leaves no queue to consume"),
        (["beat", "--bogus-opt"], "No such option '--bogus-opt'"),
        (["seller-view"], "the following arguments are required: username"),
        (["no-such-command"], "invalid choice: 'no-such-command'"),
    ],
)
def test_an_input_error_is_one_line_and_status_2(
    data_dir: Path, args: list[str], said: str
) -> None:
    done = crm_events(data_dir, *(a.replace("{dir}", str(data_dir)) for a in args))
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert said in lines[0]
    assert done.stdout == ""


HEAVY_MODULES = ("sqlalchemy", "celery", "kombu", "redis", "marshmallow", "models", "tasks")


def test_an_address_the_service_cannot_listen_on_is_said_in_one_line(data_dir: Path) -> None:
    # 192.0.2.1 is for documentation (RFC 5737): no host has it, and no name is looked up.
    done = crm_events(data_dir, "serve", "--host", "192.0.2.1", "--port", "0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "crm-events: cannot listen on 192.0.2.1:0: Cannot assign requested address"
    )


def test_files_to_publish_are_all_read_before_any_is_sent(data_dir: Path) -> None:
    good = data_dir / "good-call.json"
    good.write_text((ROOT / "examples/calls/outbound-sales-action.json").read_text())
    bad = data_dir / "bad-call.json"
    bad.write_text("{not json")
    queued = data_dir / "broker"
    before = sorted(queued.rglob("*")) if queued.exists() else []
    done = crm_events(data_dir, "publish", "call", str(good), str(bad))
    assert done.returncode == 1 and "bad-call.json: not JSON" in done.stderr
    assert (sorted(queued.rglob("*")) if queued.exists() else []) == before


@pytest.mark.parametrize("args", [["--help"], ["import", "cdr", "--help"], ["events", "--help"]])
def test_help_loads_neither_the_database_layer_nor_celery(args: list[str]) -> None:
    """--help answers at once: the parser is built without the database layer, Celery or the
    stages, which took most of a second to load (what was loaded is read, not timed)."""
    probe = (
        "import sys\n"
        "from workers.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY_MODULES!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "usage: crm-events" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


#: What a listing need not load: the broker's and Redis's clients, Celery, the message schemas.
WORKER_MODULES = ("celery", "kombu", "redis", "marshmallow", "icalendar", "jinja2", "matplotlib")


@pytest.mark.parametrize(
    "args",
    [
        ["events", "--state", "open"],
        ["triage"],
        ["rejected"],
        ["targets", "list"],
        ["task", "list"],
    ],
)
def test_listings_load_the_database_layer_and_nothing_of_the_worker(
    data_dir: Path, args: list[str]
) -> None:
    """A listing starts in about twice the time SQLAlchemy's ORM takes to import: it reads
    through the models without the worker's libraries (what was loaded is read, not timed)."""
    probe = (
        "import sys\n"
        "from workers.cli import main\n"
        f"code = main({args!r})\n"
        f"print(code, sorted({{m.split('.')[0] for m in sys.modules}} & set({WORKER_MODULES!r})))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    env["CRM_DATA_DIR"] = str(data_dir)
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 []"


def test_each_catalogue_action_has_its_own_help(data_dir: Path) -> None:
    done = crm_events(data_dir, "catalogue", "show", "--help")
    assert done.returncode == 0
    assert done.stdout.startswith("usage: crm-events catalogue show [-h] [--json]")
    assert "categories (kategoria)" in done.stdout
    done = crm_events(data_dir, "catalogue", "apply", "--help")
    assert (
        "usage: crm-events catalogue apply [-h] [--dry-run] [--force] [--json] [FILE]"
        in done.stdout
    )


def test_worker_help_shows_celery_s_options_too(data_dir: Path) -> None:
    done = crm_events(data_dir, "worker", "--help")
    assert done.returncode == 0, done.stderr
    ours, celery = done.stdout.split("Celery's options, given after worker and passed on", 1)
    assert "run a worker (all queues unless -Q narrows)" in ours
    assert "--concurrency" in celery and "--queues" in celery


def test_the_rejected_table_shows_a_long_reason_whole(data_dir: Path) -> None:
    """A reason is not cut in the middle of a word, nor after 100 characters."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from models.ledger import RejectedMessage

    reason = (
        "to: 'crm+myynti@myyntitalo.fi' is not one of the CRM addresses; the gateway accepts "
        "mail for crm@, crm+lead@ and crm+palaute@ only, so this message was kept as it came"
    )
    engine = create_engine(f"sqlite:///{data_dir / 'crm.sqlite3'}")
    with Session(engine) as session, session.begin():
        session.add(
            RejectedMessage(
                task_name="crm.ingest.email", task_id="long-reason", reason=reason, payload={}
            )
        )
    engine.dispose()
    done = crm_events(data_dir, "rejected")
    assert done.returncode == 0, done.stderr
    shown = " ".join(line.strip(" │┃|").strip() for line in done.stdout.splitlines() if "│" in line)
    assert "kept as it came" in done.stdout
    assert "crm+palaute@" in shown


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--class", "bogus"], "no class 'bogus': the class is one of events (Tapahtumat), "),
        (["--category", "nonsense"], "no category 'nonsense': the category is one of "),
        (["--seller", "nobody"], "no staff member with the username 'nobody'"),
        (["--customer", "99999"], "no customer with the number '99999'"),
    ],
)
def test_an_events_filter_that_names_nothing_says_so(
    data_dir: Path, args: list[str], said: str
) -> None:
    done = crm_events(data_dir, "events", *args)
    assert done.returncode == 1
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"crm-events: {said}")


@pytest.mark.parametrize("command", [["progress"], ["list"], ["changes"]])
def test_a_targets_seller_that_names_no_one_says_so(data_dir: Path, command: list[str]) -> None:
    """An empty table was the answer, as if the seller had no targets."""
    done = crm_events(data_dir, "targets", *command, "--seller", "%")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.strip() == "crm-events: no staff member with the username '%'"


def test_a_target_set_again_leaves_a_trace_and_reports_go_to_managers(tmp_path: Path) -> None:
    assert crm_events(tmp_path, "init-db").returncode == 0
    loaded = crm_events(tmp_path, "import", "parties", str(ROOT / "examples" / "parties.json"))
    assert loaded.returncode == 0, loaded.stderr
    for value in ("4", "4", "6"):  # the same again changes nothing; then a new value
        done = crm_events(
            tmp_path, "targets", "set", "anna", "sales_action", "--weekly", value,
            "--from", "2026-11-02",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    listed = json.loads(crm_events(tmp_path, "targets", "list", "--json").stdout)
    assert [(t["kind"], t["value"]) for t in listed] == [("weekly", 6)]
    changes = json.loads(crm_events(tmp_path, "targets", "changes", "--json").stdout)
    assert [(c["old_value"], c["new_value"]) for c in changes] == [(None, 4), (4, 6)]
    assert all(c["changed_by"].startswith("cli") for c in changes)
    table = crm_events(tmp_path, "targets", "changes", "--seller", "anna").stdout
    assert "sales_action" in table and "cli" in table

    refused = crm_events(tmp_path, "report", "targets", "--kind", "weekly", "--manager", "anna")
    assert refused.returncode == 1 and refused.stdout == ""
    assert "anna is a seller, not a manager; reports go to the managers: helena" in refused.stderr


def test_an_old_schema_says_to_run_init_db(tmp_path: Path) -> None:
    """An upgrade without init-db: commands and the worker say what to do, not which table
    is missing."""
    from alembic import command

    from config.settings import Settings
    from models.db import create_db_engine
    from models.migrate import alembic_config

    engine = create_db_engine(Settings.embedded(tmp_path))
    cfg = alembic_config(engine)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0009_target_changes")
    engine.dispose()
    from alembic.script import ScriptDirectory

    [head] = ScriptDirectory.from_config(cfg).get_heads()
    said = f"the database schema is at 0009_target_changes; this release needs {head}"
    for args in (["task", "list"], ["worker"]):
        old = crm_events(tmp_path, *args)
        assert old.returncode == 2, old.stderr
        assert said in old.stderr and "run crm-events init-db" in old.stderr
    assert crm_events(tmp_path, "init-db").returncode == 0
    listed = crm_events(tmp_path, "task", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
