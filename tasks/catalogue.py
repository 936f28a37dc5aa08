"""The classification settings as a document: show, export, and apply with a dry run."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.catalogue import Category, EventClass, EventProperty, EventType
from models.events import CrmEvent
from models.invalid import BadInput
from models.schemas.catalogue import load_catalogue_document
from models.targets import Target
from tasks.views import CardDefinition, card_definitions

#: One of the code-and-names models (a type variable, so helpers keep the concrete class).
Named = TypeVar("Named", bound=EventClass | EventType | EventProperty)

NAMED: tuple[tuple[str, type[EventClass] | type[EventType] | type[EventProperty]], ...] = (
    ("classes", EventClass),
    ("types", EventType),
    ("properties", EventProperty),
)
SINGULAR = {"classes": "class", "types": "type", "properties": "property"}
CATEGORY_FIELDS = ("fi", "en", "default_class", "default_type", "allow_selection", "sales_target")


def catalogue_document(session: Session) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, model in NAMED:
        document[key] = _named_document(session, model)
    document["categories"] = [
        {
            "code": c.code,
            "fi": c.name_fi,
            "en": c.name_en,
            "default_class": c.default_class,
            "default_type": c.default_type,
            "allow_selection": c.allow_selection,
            "sales_target": c.sales_target,
        }
        for c in session.scalars(select(Category).order_by(Category.position, Category.code))
    ]
    return document


def _named_document(session: Session, model: type[Named]) -> list[dict[str, Any]]:
    return [
        {"code": row.code, "fi": row.name_fi, "en": row.name_en}
        for row in session.scalars(select(model).order_by(model.code))
    ]


def _apply_named(
    session: Session,
    key: str,
    model: type[Named],
    items: Iterable[dict[str, Any]],
    changes: list[str],
) -> None:
    """Add or rename the ``key`` entries (classes, types or properties), noting each change."""
    for item in items:
        row = session.get(model, item["code"])
        if row is None:
            missing = [name for name in ("fi", "en") if not item.get(name)]
            if missing:
                raise BadInput(f"new {SINGULAR[key]} {item['code']} needs {' and '.join(missing)}")
            session.add(model(code=item["code"], name_fi=item["fi"], name_en=item["en"]))
            changes.append(f"add {SINGULAR[key]} {item['code']}")
            continue
        for attr, field_name in (("name_fi", "fi"), ("name_en", "en")):
            if field_name in item and getattr(row, attr) != item[field_name]:
                old, new = getattr(row, attr), item[field_name]
                changes.append(f"{model.__tablename__} {row.code}: {field_name} {old!r} -> {new!r}")
                setattr(row, attr, item[field_name])


@dataclass
class CatalogueChange:
    """What applying a catalogue document changes, and what that does to the sales tools."""

    #: The fields changed ("category lead: sales_target False -> True").
    changes: list[str] = field(default_factory=list)
    #: What the changes do to existing events, targets and cards, in words.
    impacts: list[str] = field(default_factory=list)
    #: Whether some impact takes something away (targets that stop counting, events left with
    #: a class or type no new event gets): applying it needs an explicit go-ahead.
    destructive: bool = False


def apply_catalogue(
    session: Session,
    document: dict[str, Any],
    cards: Sequence[tuple[str, str]] = (),
    today: date | None = None,
) -> CatalogueChange:
    """Add or change what the document says (nothing is deleted), in ``session``'s transaction;
    returns the changes and their impact on targets, existing events and the seller view's
    cards (``cards``: ``CRM_SELLER_CARDS``). The caller commits, or rolls back a dry run or a
    destructive change not confirmed."""
    document = load_catalogue_document(document)
    result = CatalogueChange()
    changes = result.changes
    cards_before = card_definitions(session, cards)
    for key, model in NAMED:
        _apply_named(session, key, model, document.get(key, []), changes)
    session.flush()
    for position, item in enumerate(document.get("categories", [])):
        row = session.get(Category, item["code"])
        values = {
            "name_fi": item.get("fi"),
            "name_en": item.get("en"),
            "default_class": item.get("default_class"),
            "default_type": item.get("default_type"),
            "allow_selection": item.get("allow_selection"),
            "sales_target": item.get("sales_target"),
        }
        for ref, model in (("default_class", EventClass), ("default_type", EventType)):
            if values[ref] is not None and session.get(model, values[ref]) is None:
                raise BadInput(f"category {item['code']}: unknown {ref} {values[ref]!r}")
        if row is None:
            missing = [k for k, v in values.items() if v is None]
            if missing:
                raise BadInput(f"new category {item['code']} needs {', '.join(missing)}")
            session.add(Category(code=item["code"], position=position, **values))
            changes.append(f"add category {item['code']}")
            continue
        for attr, value in values.items():
            if value is not None and getattr(row, attr) != value:
                changes.append(f"category {row.code}: {attr} {getattr(row, attr)!r} -> {value!r}")
                _impact(session, row, attr, value, result, today or date.today())
                setattr(row, attr, value)
    session.flush()
    result.impacts += _card_changes(cards_before, card_definitions(session, cards))
    return result


def _impact(
    session: Session,
    category: Category,
    attr: str,
    value: Any,
    result: CatalogueChange,
    today: date,
) -> None:
    """What changing one field of ``category`` does to what is already there."""
    code = category.code
    if attr == "sales_target" and value is False:
        in_force = session.execute(
            select(Target.seller_id, Target.kind)
            .where(Target.category_code == code, Target.valid_from <= today)
            .distinct()
        ).all()
        sellers = len({seller for seller, _ in in_force})
        if in_force:
            result.destructive = True
            result.impacts.append(
                f"category {code}: {len(in_force)} target(s) in force for {sellers} seller(s) stop "
                "counting: the category leaves the cards' targets, targets progress and the "
                "managers' reports (the targets are kept, and count again if it is switched back)"
            )
        else:
            result.impacts.append(f"category {code}: no target in force; nothing stops counting")
    elif attr in ("default_class", "default_type"):
        column = CrmEvent.class_code if attr == "default_class" else CrmEvent.type_code
        old = getattr(category, attr)
        kept = session.scalar(
            select(func.count()).where(CrmEvent.category_code == code, column == old)
        )
        word = "class" if attr == "default_class" else "type"
        if kept:
            result.destructive = True
            result.impacts.append(
                f"category {code}: {kept} existing event(s) keep {word} {old} (events are not "
                f"reclassified); new events get {value}, so statistics by {word} split the "
                "category between the two"
            )
        else:
            result.impacts.append(f"category {code}: no existing event has {word} {old}")
    elif attr == "allow_selection" and value is False:
        chosen = session.scalar(
            select(func.count()).where(
                CrmEvent.category_code == code, CrmEvent.class_code != category.default_class
            )
        )
        result.impacts.append(
            f"category {code}: {chosen} existing event(s) with a class chosen by their sender keep "
            "it; a class named in later messages is refused with a note"
        )


def _card_changes(before: Sequence[CardDefinition], after: Sequence[CardDefinition]) -> list[str]:
    """The seller view's cards that appear, go or change their title."""
    old = {card.key: card for card in before}
    new = {card.key: card for card in after}
    lines = [f"card added: {new[key].title} ({key})" for key in new if key not in old]
    lines += [f"card removed: {old[key].title} ({key})" for key in old if key not in new]
    lines += [
        f"card {key}: title {old[key].title!r} -> {new[key].title!r}"
        for key in new
        if key in old and old[key].title != new[key].title
    ]
    return lines
