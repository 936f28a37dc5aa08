"""Targets: management sets weekly or monthly count targets per seller and category.

Two ways in, one rule: ``crm-events targets set`` and the ERP's ``crm.target/1`` message
(``crm.ingest.target`` on the master-data queue ``crm.ingest.party``). Only categories with
``sales_target`` (Myynnin tavoite) take targets. A target applies from its ``valid_from`` date
until a later one replaces it, so the history is kept and past periods keep their target.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.base import utcnow
from models.catalogue import Category
from models.db import upsert_insert
from models.invalid import BadInput
from models.parties import Staff
from models.targets import Target, TargetChange
from tasks.context import StageContext
from tasks.store import StageResult, record_inbound, upsert_key
from tasks.views import known_staff


def set_target(
    session: Session,
    username: str,
    category_code: str,
    kind: str,
    value: int,
    valid_from: date,
    *,
    source_system: str = "cli",
    changed_by: str | None = None,
    create_missing_seller: bool = False,
) -> set[int]:
    """Add a target valid from ``valid_from``; earlier targets stay for the periods before it.

    A target with the same seller, category, kind and start date replaces that one's value; a
    :class:`TargetChange` keeps what it was, what it became, who (``changed_by``, else
    ``source_system``) and when. Returns the seller whose view should refresh.
    ``create_missing_seller``: an unknown username becomes a placeholder staff member (master
    data may arrive in any order), as party messages do.
    """
    if kind not in ("weekly", "monthly"):
        raise BadInput(f"a target is weekly or monthly, not {kind!r}")
    if value < 0:
        raise BadInput("a target is a count: 0 or more")
    category = session.get(Category, category_code)
    if category is None:
        raise BadInput(
            f"no category {category_code!r}; targets can be set for: "
            + ", ".join(_target_categories(session))
        )
    if not category.sales_target:
        raise BadInput(
            f"category {category_code} does not take sales targets (Myynnin tavoite is off); "
            "targets can be set for: " + ", ".join(_target_categories(session))
        )
    staff = session.scalar(select(Staff).where(Staff.username == username))
    if staff is None and create_missing_seller:
        from tasks.ingest.party import ensure_staff

        staff = ensure_staff(session, username)
    if staff is None:
        raise BadInput(f"no staff member {username!r}")
    before = session.scalar(
        select(Target.value)
        .where(
            Target.seller_id == staff.id,
            Target.category_code == category_code,
            Target.kind == kind,
            Target.valid_from == valid_from,
        )
        .with_for_update()
    )
    statement = upsert_insert(session, Target.__table__).values(
        seller_id=staff.id,
        category_code=category_code,
        kind=kind,
        value=value,
        valid_from=valid_from,
        source_system=source_system,
        created_at=utcnow(),
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["seller_id", "category_code", "kind", "valid_from"],
            set_={"value": value, "source_system": source_system, "created_at": utcnow()},
        )
    )
    if before != value:
        session.add(
            TargetChange(
                seller_id=staff.id,
                category_code=category_code,
                kind=kind,
                valid_from=valid_from,
                old_value=before,
                new_value=value,
                changed_by=changed_by or source_system,
                changed_at=utcnow(),
            )
        )
    return {staff.id}


def target_changes(session: Session, seller: str | None = None) -> list[dict[str, Any]]:
    """Every target set or changed, oldest first: before and after, who and when."""
    query = (
        select(TargetChange, Staff.username)
        .join(Staff, Staff.id == TargetChange.seller_id)
        .order_by(TargetChange.changed_at, TargetChange.id)
    )
    if seller:
        known_staff(session, seller)
        query = query.where(Staff.username == seller)
    return [
        {
            "seller": username,
            "category": change.category_code,
            "kind": change.kind,
            "valid_from": change.valid_from.isoformat(),
            "old_value": change.old_value,
            "new_value": change.new_value,
            "changed_by": change.changed_by,
            "changed_at": change.changed_at.isoformat(),
        }
        for change, username in session.execute(query)
    ]


def _target_categories(session: Session) -> list[str]:
    return list(
        session.scalars(
            select(Category.code)
            .where(Category.sales_target.is_(True))
            .order_by(Category.position, Category.code)
        )
    )


def target_history(session: Session, seller: str | None = None) -> list[dict[str, Any]]:
    """Every target with its validity: each applies until the next one of its kind starts."""
    query = (
        select(Target, Staff.username)
        .join(Staff, Staff.id == Target.seller_id)
        .order_by(Staff.username, Target.category_code, Target.kind, Target.valid_from)
    )
    if seller:
        known_staff(session, seller)
        query = query.where(Staff.username == seller)
    rows: list[dict[str, Any]] = []
    for target, username in session.execute(query):
        previous = rows[-1] if rows else None
        if previous and (previous["seller"], previous["category"], previous["kind"]) == (
            username,
            target.category_code,
            target.kind,
        ):
            previous["valid_until"] = target.valid_from.isoformat()
        rows.append(
            {
                "seller": username,
                "category": target.category_code,
                "kind": target.kind,
                "value": target.value,
                "valid_from": target.valid_from.isoformat(),
                "valid_until": None,
                "source": target.source_system,
                "set_at": target.created_at.isoformat(),
            }
        )
    return rows


def ingest_target(session: Session, ctx: StageContext, payload: Any) -> StageResult:
    """``crm.target/1``: validate, record in the ledger, set the target (one transaction)."""
    # The schema is imported here, not with the module: the command line's listings read
    # through this module and start sooner without marshmallow (docs/design.md).
    from models.schemas.target import SCHEMA, load_target_message

    message = load_target_message(payload)
    inbound = record_inbound(
        session,
        idempotency_key=upsert_key("target", ctx, payload),
        schema=SCHEMA,
        source_kind="target",
        source_system=message["source_system"],
        source_id=(
            f"{message['seller']}/{message['category']}/{message['kind']}/{message['valid_from']}"
        ),
        payload=payload,
    )
    if inbound is None:
        return StageResult("duplicate", detail="this target message was already accepted")
    sellers = set_target(
        session,
        message["seller"],
        message["category"],
        message["kind"],
        message["value"],
        message["valid_from"],
        source_system=message["source_system"],
        create_missing_seller=True,
    )
    detail = (
        f"{message['seller']}: {message['category']} {message['kind']} target "
        f"{message['value']} from {message['valid_from']}"
    )
    return StageResult("done", detail=detail, sellers_to_refresh=sellers)
