"""Targets: management sets weekly or monthly count targets per seller and category."""

from __future__ import annotations

from datetime import date

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.catalogue import Category
from models.db import upsert_insert
from models.parties import Staff
from models.targets import Target
from tasks.errors import BadInput


def set_target(
    session: Session, username: str, category_code: str, kind: str, value: int, valid_from: date
) -> set[int]:
    """Add a target valid from ``valid_from``; earlier targets stay for the periods before it.

    Returns the seller whose view should refresh.
    """
    if kind not in ("weekly", "monthly"):
        raise BadInput(f"a target is weekly or monthly, not {kind!r}")
    if value < 0:
        raise BadInput("a target is a count: 0 or more")
    staff = session.scalar(select(Staff).where(Staff.username == username))
    if staff is None:
        raise BadInput(f"no staff member {username!r}")
    category = session.get(Category, category_code)
    if category is None:
        raise BadInput(f"no category {category_code!r}")
    if not category.sales_target:
        raise BadInput(
            f"category {category_code} does not take sales targets (Myynnin tavoite is off); "
            "targets can be set for: "
            + ", ".join(
                session.scalars(select(Category.code).where(Category.sales_target.is_(True)))
            )
        )
    statement = upsert_insert(session, Target.__table__).values(
        seller_id=staff.id,
        category_code=category_code,
        kind=kind,
        value=value,
        valid_from=valid_from,
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["seller_id", "category_code", "kind", "valid_from"],
            set_={"value": value},
        )
    )
    return {staff.id}
