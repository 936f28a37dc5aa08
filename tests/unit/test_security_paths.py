"""No sender-controlled value reaches a filesystem path.

With the filesystem document store, an email whose Message-ID and attachment filenames look like
paths stores its documents under the document directory, named by SHA-256 only; the names are
kept (sanitised) for display.
"""

from __future__ import annotations

import dataclasses
import re
from email.message import EmailMessage
from pathlib import Path

from sqlalchemy.orm import Session

from tasks.context import StageContext
from tests.unit.test_samples_emails import documents, ingest_raw

HOSTILE_NAMES = (
    "../../../escape-one.txt",
    "..\\..\\..\\escape-two.txt",
    "/tmp/escape-three.txt",
    "....//....//escape-four.txt",
    "\x00escape-five.txt",
)


def test_path_like_names_never_leave_the_document_dir(
    world: Session, ctx: StageContext, tmp_path: Path
) -> None:
    document_dir = tmp_path / "a" / "b" / "c" / "documents"
    settings = dataclasses.replace(
        ctx.settings,
        document_store="filesystem",
        document_dir=document_dir,
        data_dir=tmp_path / "a" / "b" / "c" / "var",
    )
    context = StageContext(settings, task_id=ctx.task_id, task_name=ctx.task_name)
    mail = EmailMessage()
    mail["From"] = "Matti Virtanen <matti.virtanen@pohjolankone.fi>"
    mail["To"] = "crm@myyntitalo.fi"
    mail["Subject"] = "Liitteet"
    mail["Date"] = "Tue, 24 Nov 2026 10:00:00 +0200"
    mail["Message-ID"] = "<../../../escape-mid/../x@pohjolankone.fi>"
    mail.set_content("Liitteenä tiedostot.")
    for index, name in enumerate(HOSTILE_NAMES):
        mail.add_attachment(
            f"sisältö {index}".encode(), maintype="text", subtype="plain", filename=name
        )
    event = ingest_raw(world, context, mail.as_bytes())

    attachments = documents(event, "attachment")
    assert len(attachments) == len(HOSTILE_NAMES)
    for document in attachments:
        assert "/" not in document["filename"] and "\\" not in document["filename"]
        assert "\x00" not in document["filename"]
    stored = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert stored, "nothing was written to the filesystem store"
    for path in stored:
        relative = path.relative_to(tmp_path).as_posix()
        assert re.fullmatch(r"a/b/c/documents/[0-9a-f]{2}/[0-9a-f]{64}", relative), relative
    assert not [p for p in tmp_path.rglob("*escape*")]
