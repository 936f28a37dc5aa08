"""Replies share one thread key with the earlier emails of their conversation, in any arrival
order and whether the client sets References or only In-Reply-To."""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy.orm import Session

from tasks.context import StageContext
from tests.unit.test_samples_emails import EXAMPLES, event_json, ingest_raw, simple_email


def email(message_id: str, answers: str = "", references: str = "") -> bytes:
    extra = ""
    if answers:
        extra += f"In-Reply-To: <{answers}>\r\n"
    if references:
        extra += f"References: {references}\r\n"
    return simple_email(message_id=f"<{message_id}>", extra_headers=extra)


CONVERSATION = {
    "a": email("a@pohjolankone.fi"),
    # A full References chain.
    "b": email("b@myyntitalo.fi", answers="a@pohjolankone.fi", references="<a@pohjolankone.fi>"),
    # Only In-Reply-To, naming b rather than the first email.
    "c": email("c@pohjolankone.fi", answers="b@myyntitalo.fi"),
}


@pytest.mark.parametrize("order", list(itertools.permutations("abc")), ids="".join)
def test_one_conversation_is_one_thread_in_any_order(
    world: Session, ctx: StageContext, order: tuple[str, ...]
) -> None:
    events = {name: ingest_raw(world, ctx, CONVERSATION[name]) for name in order}
    keys = {name: world_key(world, ctx, events[name]["id"]) for name in "abc"}
    assert set(keys.values()) == {"a@pohjolankone.fi"}, (order, keys)
    unrelated = ingest_raw(world, ctx, email("z@pohjolankone.fi"))
    assert unrelated["thread_key"] == "z@pohjolankone.fi"


def world_key(world: Session, ctx: StageContext, event_id: int) -> str | None:
    # Read back from the database: a later email may have moved an earlier one's key.
    world.expire_all()
    return event_json(world, event_id, ctx)["thread_key"]


def test_forwarded_memo_and_the_offer_answering_it_share_a_thread(
    world: Session, ctx: StageContext
) -> None:
    offer = ingest_raw(world, ctx, (EXAMPLES / "emails" / "bcc-offer-with-pdf.eml").read_bytes())
    memo = ingest_raw(world, ctx, (EXAMPLES / "emails" / "forwarded-memo-rfc822.eml").read_bytes())
    assert world_key(world, ctx, offer["id"]) == world_key(world, ctx, memo["id"]) is not None
