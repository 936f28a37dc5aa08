"""``crm.target/1``: the ERP sets targets the way ``crm-events targets set`` does."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.parties import Staff
from models.targets import Target
from tasks.context import StageContext
from tasks.errors import BadInput
from tasks.targets import ingest_target, set_target, target_history
from tasks.views import target_in_force


def target(**fields: Any) -> dict[str, Any]:
    return {
        "schema": "crm.target/1",
        "source_system": "erp",
        "seller": "anna",
        "category": "sales_action",
        "kind": "weekly",
        "value": 5,
        "valid_from": "2026-11-02",
        **fields,
    }


def test_a_target_message_sets_the_target(world: Session, ctx: StageContext) -> None:
    result = ingest_target(world, ctx, target())
    anna = world.scalar(select(Staff).where(Staff.username == "anna"))
    assert anna is not None
    assert result.outcome == "done"
    assert result.sellers_to_refresh == {anna.id}
    assert "anna: sales_action weekly target 5 from 2026-11-02" in result.detail
    stored = world.scalar(select(Target).where(Target.seller_id == anna.id))
    assert stored is not None
    assert (stored.kind, stored.value, stored.valid_from, stored.source_system) == (
        "weekly",
        5,
        date(2026, 11, 2),
        "erp",
    )
    assert target_in_force(world, anna.id, "sales_action", "2026-W45") == 5
    assert target_in_force(world, anna.id, "sales_action", "2026-W44") is None


def test_the_same_task_delivered_twice_is_a_duplicate(world: Session, ctx: StageContext) -> None:
    assert ingest_target(world, ctx, target()).outcome == "done"
    assert ingest_target(world, ctx, target()).outcome == "duplicate"


@pytest.mark.parametrize("category", ["crm_event", "lead"])
def test_a_category_without_sales_target_is_rejected_with_the_reason(
    world: Session, ctx: StageContext, category: str
) -> None:
    with pytest.raises(BadInput) as rejected:
        ingest_target(world, ctx, target(category=category))
    assert rejected.value.reason == (
        f"category {category} does not take sales targets (Myynnin tavoite is off); "
        "targets can be set for: sales_action, customer_visit"
    )


def test_an_unknown_category_is_rejected(world: Session, ctx: StageContext) -> None:
    with pytest.raises(BadInput) as rejected:
        ingest_target(world, ctx, target(category="sales"))
    assert rejected.value.reason.startswith("no category 'sales'; targets can be set for:")


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"kind": "daily"}, "kind: Must be one of: weekly, monthly."),
        ({"value": -1}, "value: Must be greater than or equal to 0"),
        ({"value": "5"}, "value: Not a valid integer."),
        ({"valid_from": "2.11.2026"}, "valid_from: Not a valid date."),
        ({"colour": "red"}, "colour: Unknown field."),
        ({"schema": "crm.target/2"}, "schema must be 'crm.target/1'"),
    ],
)
def test_invalid_target_messages_are_rejected(
    world: Session, ctx: StageContext, fields: dict[str, Any], reason: str
) -> None:
    with pytest.raises(BadInput) as rejected:
        ingest_target(world, ctx, target(**fields))
    assert reason in rejected.value.reason


def test_an_unknown_seller_becomes_a_placeholder(world: Session, ctx: StageContext) -> None:
    assert ingest_target(world, ctx, target(seller="uusi.myyja")).outcome == "done"
    placeholder = world.scalar(select(Staff).where(Staff.username == "uusi.myyja"))
    assert placeholder is not None and placeholder.placeholder


def test_history_is_kept_and_a_mid_month_change_applies_to_that_month(
    world: Session, ctx: StageContext
) -> None:
    later = StageContext(ctx.settings, task_id="second-delivery")
    ingest_target(world, ctx, target(kind="monthly", value=20, valid_from="2026-10-01"))
    ingest_target(world, later, target(kind="monthly", value=30, valid_from="2026-11-15"))
    set_target(world, "anna", "sales_action", "weekly", 4, date(2026, 11, 2))
    anna = world.scalar(select(Staff).where(Staff.username == "anna"))
    assert anna is not None
    assert target_in_force(world, anna.id, "sales_action", "2026-10") == 20
    assert target_in_force(world, anna.id, "sales_action", "2026-11") == 30
    assert target_in_force(world, anna.id, "sales_action", "2026-12") == 30
    history = [
        (r["kind"], r["value"], r["valid_from"], r["valid_until"], r["source"])
        for r in target_history(world, "anna")
    ]
    assert history == [
        ("monthly", 20, "2026-10-01", "2026-11-15", "erp"),
        ("monthly", 30, "2026-11-15", None, "erp"),
        ("weekly", 4, "2026-11-02", None, "cli"),
    ]
