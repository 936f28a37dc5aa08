"""``crm-events erase``: after it, a plain dump of the whole database and the document store hold
none of the person's name, address or number, in any form they arrived in; the counts stay.

A database of its own (the erasure rewrites what it finds anywhere), with the sample world put in
by the stages themselves and documents on the filesystem store: Matti Virtanen of customer 10001
has calls (one with a recording), an email with a PDF attachment, a visit and a rejected message;
an unknown caller is only in triage. The commands run as a user runs them.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from models.db import create_session_factory, transaction
from models.documents import EventDocument
from models.ledger import RejectedMessage
from tasks.batch import ingest_batch
from tasks.context import StageContext
from tasks.erasure import ErasedPerson
from tasks.ingest.call import ingest_call
from tasks.ingest.email import ingest_email
from tasks.ingest.party import ingest_party
from tasks.ingest.visit import ingest_visit
from tasks.ledger import kept_payload
from tests.conftest import ROOT, TemporaryDatabase, load_example, migrated
from tests.messages import outbound_call
from tests.processes import cli_json, run_cli, service_env
from workers.publish import email_message_from_raw

pytestmark = pytest.mark.integration

MATTI = (
    "Matti Virtanen",
    "Virtanen, Matti",
    "matti.virtanen@pohjolankone.fi",
    "040 123 4567",
    "0401234567",
    "040-123 4567",
    "+358401234567",
    "+358 40 123 4567",
    "358401234567",
)
STRANGER = ("+358 40 900 0001", "+358409000001", "040 900 0001", "0409000001")


@dataclass
class World:
    database: TemporaryDatabase
    settings: Settings
    sessions: sessionmaker[Session]
    env: dict[str, str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(self.env, *args)

    def json(self, *args: str) -> Any:
        return cli_json(self.env, *args)

    def ctx(self) -> StageContext:
        return StageContext(self.settings, str(uuid.uuid4()), "test")

    def dump(self) -> str:
        """Every row of every table, as pg_dump writes them, and every stored file."""
        url = self.settings.database_url.replace("postgresql+psycopg://", "postgresql://")
        dump = subprocess.run(
            ["pg_dump", "--no-owner", url], capture_output=True, text=True, check=True
        ).stdout
        files = [
            path.read_bytes().decode("utf-8", errors="replace")
            for path in sorted(self.settings.effective_document_dir.rglob("*"))
            if path.is_file()
        ]
        return "\n".join([dump, *files])


def holding(text: str, forms: tuple[str, ...]) -> list[str]:
    lowered = text.lower()
    return [form for form in forms if form.lower() in lowered]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    database = TemporaryDatabase("erasure")
    data_dir = tmp_path_factory.mktemp("erasure-var")
    settings = Settings(data_dir=data_dir, database_url=database.url, document_store="filesystem")
    engine = migrated(settings)
    world = World(
        database,
        settings,
        create_session_factory(engine),
        service_env(settings, CRM_DOCUMENT_STORE="filesystem"),
    )
    with transaction(world.sessions) as session:
        for message in load_example("parties.json"):
            ingest_party(session, world.ctx(), message)
        calls = load_example("calls/inbound-answered.json")
        calls[-1]["recording"] = {
            "content_b64": base64.b64encode(b"RIFF\x00\x00WAVEfmt a recorded call").decode(),
            "filename": "c-2026-11-23-0001.wav",
            "media_type": "audio/wav",
        }
        for message in calls:
            ingest_call(session, world.ctx(), message)
        ingest_call(
            session,
            world.ctx(),
            {
                "schema": "crm.call/1",
                "source_system": "pbx-hki",
                "call_id": "c-stranger",
                "status": "missed",
                "direction": "inbound",
                "from": "+358 40 900 0001",
                "to": "+358 9 111 000",
                "started_at": "2026-11-24T12:00:00+02:00",
            },
        )
        liisa = outbound_call("c-liisa", "2026-11-25T10:00:00+02:00", note="Liisa soitti")
        liisa["recording"] = {
            "content_b64": base64.b64encode(b"RIFF\x00\x00WAVEfmt Liisa's call").decode(),
            "filename": "c-liisa.wav",
            "media_type": "audio/wav",
        }
        ingest_call(session, world.ctx(), liisa)
        raw = (ROOT / "examples/emails/bcc-offer-with-pdf.eml").read_bytes()
        ingest_email(session, world.ctx(), email_message_from_raw(raw, settings))
        ingest_visit(session, world.ctx(), load_example("visits/visit-with-memo.json"))
        # Someone else's email naming him, with a note that names him too: not his, but it goes.
        note = EmailMessage()
        note["From"] = "Anna Lahtinen <anna.lahtinen@myyntitalo.fi>"
        note["To"] = "Liisa Korhonen <liisa.korhonen@pohjolankone.fi>"
        note["Bcc"] = "crm@myyntitalo.fi"
        note["Subject"] = "Soittopyyntö"
        note["Message-ID"] = "<soittopyynto-1@myyntitalo.fi>"
        note["Date"] = "Wed, 25 Nov 2026 12:00:00 +0200"
        note.set_content("Hei Liisa, Matti Virtanen pyysi soittamaan numeroon 040-123 4567.")
        note.add_attachment(
            b"Muistio: Matti Virtanen, +358 40 123 4567",
            maintype="text",
            subtype="plain",
            filename="muistio.txt",
        )
        ingest_email(session, world.ctx(), email_message_from_raw(note.as_bytes(), settings))
        bad = {**calls[0], "call_id": "c-bad", "status": 7}
        session.add(
            RejectedMessage(
                task_name="crm.ingest.call",
                task_id="erasure-bad",
                reason="status: Not a valid string.",
                errors={},
                payload=kept_payload(session, settings, bad),
            )
        )
    yield world
    engine.dispose()
    database.drop()


def figures(world: World) -> tuple[Any, Any, Any]:
    return (
        world.json("targets", "progress", "--period", "2026-11"),
        world.json("stats", "--by", "category", "--period", "2026-11"),
        world.json("stats", "--by", "seller", "--period", "2026-11"),
    )


def test_an_erased_contact_is_nowhere_and_the_counts_stay(world: World) -> None:
    before = world.dump()
    # The world holds them to begin with.
    assert {"Matti Virtanen", MATTI[2], "040 123 4567"} <= set(holding(before, MATTI))
    counts_before = figures(world)

    planned = world.json("erase", "contact", "10001", "Matti Virtanen", "--dry-run")
    assert planned["dry_run"] is True and planned["erasure"] is not None
    assert planned["counts"]["contact"] == 1 and planned["counts"]["documents"] >= 3
    assert {d["role"] for d in planned["documents"]} >= {"recording", "raw_message", "attachment"}
    assert planned["counts"]["crm_event"] >= 2
    assert holding(world.dump(), MATTI[:1]) == ["Matti Virtanen"]  # nothing changed

    done = world.json("erase", "contact", "10001", "Matti Virtanen", "--by", "dpo")
    assert done["data_kinds"] == ["name", "email", "phone"]
    assert (done["counts"], done["documents"]) == (planned["counts"], planned["documents"])

    after = world.dump()
    assert holding(after, MATTI) == []
    assert figures(world) == counts_before
    events = world.json("events", "--customer", "10001")
    contacts = {e["contact"] for e in events if e["contact"]}
    assert any(re.fullmatch(r"erased contact #\d+", c) for c in contacts), contacts
    assert "Matti Virtanen" not in contacts
    with world.sessions() as session:
        stubs = session.scalars(
            select(EventDocument).where(EventDocument.note.contains("erasure"))
        ).all()
    assert {d.role for d in stubs} >= {"recording", "raw_message", "attachment"}
    assert all(d.sha256 is None for d in stubs)
    # The erasure is recorded, without the person.
    assert "dpo" in after and "erased contact #" in after

    # A late update of the erased number is refused, kept without it; so is the batch's.
    late = {**load_example("calls/inbound-answered.json")[-1], "sequence": 4}
    with pytest.raises(ErasedPerson) as refused, transaction(world.sessions) as session:
        ingest_call(session, world.ctx(), late)
    assert "crm-events erase release" in refused.value.reason
    assert holding(json.dumps(refused.value.kept(late)), MATTI) == []
    with transaction(world.sessions) as session:
        result = ingest_batch(
            session,
            StageContext(world.settings, "erasure-batch", "crm.ingest.batch"),
            {
                "schema": "crm.batch/1",
                "source_system": "import",
                "kind": "call",
                "messages": [{**late, "call_id": "c-late-batch"}],
            },
            queue_of=lambda name: name,
        )
        assert dict(result.outcomes) == {"rejected": 1}
    # So is a later email to them, kept without its bytes.
    raw = (ROOT / "examples/emails/bcc-offer-with-pdf.eml").read_bytes()
    raw = raw.replace(b"<offer-2026-118@", b"<offer-2026-118-again@")
    email_message = email_message_from_raw(raw, world.settings)
    with pytest.raises(ErasedPerson) as mailed, transaction(world.sessions) as session:
        ingest_email(session, world.ctx(), email_message)
    assert holding(json.dumps(mailed.value.kept(email_message)), MATTI) == []
    assert mailed.value.kept(email_message)["raw_b64"].startswith("<not kept")
    # And a visit naming them among its contacts.
    visit = {**load_example("visits/visit-with-memo.json"), "visit_id": "v-after-erasure"}
    with pytest.raises(ErasedPerson), transaction(world.sessions) as session:
        ingest_visit(session, world.ctx(), visit)
    # Re-importing the contact is refused too, until the erasure is released.
    contact = next(m for m in load_example("parties.json") if m.get("name") == "Matti Virtanen")
    # (As the worker runs a stage: its transaction rolls back, the rejection keeps the rest.)
    with pytest.raises(ErasedPerson) as again, transaction(world.sessions) as session:
        ingest_party(session, world.ctx(), contact)
    assert holding(json.dumps(again.value.kept(contact)), MATTI) == []
    by_name = {**contact, "email": None, "emails": [], "phones": []}  # the name alone
    with pytest.raises(ErasedPerson), transaction(world.sessions) as session:
        ingest_party(session, world.ctx(), by_name)
    assert holding(world.dump(), MATTI) == []

    world.json("erase", "release", str(done["erasure"]))
    with transaction(world.sessions) as session:
        assert ingest_party(session, world.ctx(), contact).outcome == "done"
    assert "Matti Virtanen" in world.dump()


def test_an_unknown_caller_erased_by_number_leaves_triage_without_it(world: World) -> None:
    assert holding(world.dump(), STRANGER[:1]) == ["+358 40 900 0001"]
    triage_before = world.json("triage")
    counts_before = figures(world)
    done = world.json("erase", "number", "040 900 0001")
    assert done["data_kinds"] == ["phone"] and done["counts"]["crm_event"] >= 1
    assert holding(world.dump(), STRANGER) == []
    triage_after = world.json("triage")
    assert len(triage_after) == len(triage_before)  # the event stays, unlinked
    assert figures(world) == counts_before


def test_a_person_s_data_is_exported_to_one_folder(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Liisa Korhonen of 10001 asks what is held about her: her contact record, her call (with
    its recording's bytes) and the messages that name her, with a README of the files."""
    out = tmp_path_factory.mktemp("export") / "liisa"
    done = world.json("export", "person", "--contact", "10001", "Liisa Korhonen", "--out", str(out))
    assert done["events"] >= 1 and done["documents"] >= 1 and done["messages"] >= 1
    assert {"README.txt", "person.json", "events.json", "messages.json"} <= set(done["files"])
    person = json.loads((out / "person.json").read_text())
    [contact] = person["contacts"]
    assert contact["name"] == "Liisa Korhonen" and contact["customer_number"] == "10001"
    events = json.loads((out / "events.json").read_text())
    [call] = [e for e in events if e["source_id"] == "c-liisa"]
    assert call["contact"] == "Liisa Korhonen"
    recordings = list((out / "documents").glob(f"{call['id']}-*-c-liisa.wav"))
    assert [r.read_bytes() for r in recordings] == [b"RIFF\x00\x00WAVEfmt Liisa's call"]
    messages = json.loads((out / "messages.json").read_text())
    assert any(
        m["kind"] == "received" and m["message"].get("call_id") == "c-liisa" for m in messages
    )
    assert "events.json" in (out / "README.txt").read_text()
    again = world.cli("export", "person", "--number", "+358 44 765 4321", "--out", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr
