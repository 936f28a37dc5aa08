"""Telephony through the live worker: `crm-events import cdr`, and a recording URL the guard
refuses."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from models.documents import EventDocument
from models.events import CrmEvent
from tests.conftest import EXAMPLES, load_example
from tests.integration.conftest import LiveSystem

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def loaded(live: LiveSystem) -> LiveSystem:
    assert {d.outcome for d in live.publish("party", load_example("parties.json"))} == {"done"}
    return live


def test_import_cdr_publishes_every_row_and_waits(loaded: LiveSystem, tmp_path: Path) -> None:
    csv_file = tmp_path / "Master.csv"
    rows = (EXAMPLES / "calls/asterisk-cdr.csv").read_text().splitlines()
    # A call record whose caller number no call update can carry (over 64 characters): the
    # worker rejects it with the reason, as any message; the other rows are stored.
    too_long = (
        rows[1]
        .replace("1764144300.161", "1764144300.999")
        .replace('"0401234567","202"', '"' + "0" * 70 + '","202"')
    )
    # Asterisk writes Master.csv without a header; a broken line is reported, not fatal.
    csv_file.write_text("\n".join([*rows[1:], '"only","two"', too_long]) + "\n")
    result = loaded.cli(
        "import", "cdr", str(csv_file), "--source-system", "pbx-csv", "--wait", "60", "--json"
    )
    assert result.returncode == 1, result.stderr  # one row could not be imported
    report = json.loads(result.stdout)
    assert [r["outcome"] for r in report["published"]] == ["stored", "stored", "rejected"]
    rejected = report["published"][2]
    assert rejected["source"] == "Master.csv:4" and rejected["call_id"] == "1764144300.999"
    assert "from" in rejected["detail"] and "64" in rejected["detail"], rejected
    assert report["errors"] == [
        {"source": "Master.csv:3", "line": 3, "error": "2 fields, expected 16-21"}
    ]
    assert "Master.csv:3: not imported" in result.stderr
    sample = str(EXAMPLES / "calls/asterisk-cdr.csv")
    again = loaded.cli("import", "cdr", sample, "--source-system", "pbx-csv2", "--wait", "60")
    assert again.returncode == 0, again.stderr
    with loaded.sessions() as session:
        sources = session.execute(
            select(CrmEvent.source_system, CrmEvent.status).where(
                CrmEvent.source_id == "1764144300.161",
                CrmEvent.source_system.in_(("pbx-csv", "pbx-csv2")),
            )
        ).all()
    assert sorted(sources) == [("pbx-csv", "completed"), ("pbx-csv2", "completed")]
    # The same file again: every row a duplicate.
    third = loaded.cli(
        "import", "cdr", sample, "--source-system", "pbx-csv2", "--wait", "60", "--json"
    )
    assert [r["outcome"] for r in json.loads(third.stdout)["published"]] == ["duplicate"] * 2


class CountingHandler(BaseHTTPRequestHandler):
    hits = 0

    def log_message(self, *_: Any) -> None:
        pass

    def do_GET(self) -> None:
        CountingHandler.hits += 1
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ID3")


@pytest.fixture
def loopback_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_recording_on_a_loopback_url_is_refused_by_the_worker(
    loaded: LiveSystem, loopback_server: str
) -> None:
    url = f"{loopback_server}/recordings/secret.mp3"
    [delivery] = loaded.publish(
        "call",
        [
            {
                "schema": "crm.call/1",
                "source_system": "pbx-rec",
                "call_id": "rec-live-1",
                "status": "completed",
                "direction": "inbound",
                "from": "040 123 4567",
                "recording": {"url": url},
            }
        ],
    )
    assert delivery.outcome == "stored"  # the call is stored first, whatever the recording does
    deadline = time.monotonic() + 30
    while True:
        with loaded.sessions() as session:
            note = session.scalar(
                select(EventDocument.note).where(
                    EventDocument.event_id == delivery.event_id, EventDocument.role == "recording"
                )
            )
        if note and "not fetched" in note:
            break
        assert time.monotonic() < deadline, f"recording still {note!r}:\n{loaded.tail()}"
        time.sleep(0.1)
    assert "127.0.0.1 is a loopback address" in note
    assert CountingHandler.hits == 0  # the worker never connected
    rejected = json.loads(loaded.cli("rejected", "--json").stdout)
    reasons = [r["reason"] for r in rejected if r["task"] == "crm.ingest.recording"]
    assert any("recording not fetched" in r and "loopback" in r for r in reasons)
    assert loaded.alive()
