"""Schema migrations (Alembic) and the default catalogue installation behind ``init-db``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from config import catalogue as defaults
from models.base import Base
from models.catalogue import Category, EventClass, EventProperty, EventType
from models.db import transaction

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


def upgrade(engine: Engine) -> None:
    cfg = alembic_config(engine)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        # "heads": independent migration branches (one per capability) all apply.
        command.upgrade(cfg, "heads")


def schema_behind(engine: Engine) -> str | None:
    """What is wrong when the database's schema is not this release's (never migrated, or
    migrated by an older release), else None: a worker or a command on an old schema fails
    at its first new table, far from the cause."""
    from alembic.script import ScriptDirectory

    wanted = set(ScriptDirectory.from_config(alembic_config(engine)).get_heads())
    with engine.connect() as connection:
        current = set(MigrationContext.configure(connection).get_current_heads())
    if current == wanted:
        return None
    if not current:
        return "the database has no schema yet"
    have, need = ", ".join(sorted(current)), ", ".join(sorted(wanted))
    return f"the database schema is at {have}; this release needs {need}"


def schema_drift(engine: Engine) -> list[object]:
    """Differences between the models and the migrated schema (empty when they agree)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "render_as_batch": True,
                "include_object": include_for_dialect(connection.dialect.name),
            },
        )
        return list(compare_metadata(context, Base.metadata))


def include_for_dialect(dialect: str) -> Callable[..., bool]:
    """An Alembic ``include_object`` hook that honours ``ddl_if(dialect=...)`` on model objects.

    Some indexes exist on PostgreSQL only (the pg_trgm GIN indexes of the text search): the
    models declare them with ``.ddl_if(dialect="postgresql")`` and the migrations create them
    only there, so on SQLite they are neither expected nor reported as missing.
    """

    def include_object(
        obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
    ) -> bool:
        condition = getattr(obj, "_ddl_if", None)
        if condition is None or reflected:
            return True
        wanted = condition.dialect
        if wanted is None:
            return True
        return dialect == wanted if isinstance(wanted, str) else dialect in wanted

    return include_object


def install_default_catalogue(session: Session) -> list[str]:
    """Insert the default catalogue rows that are missing; never overwrite an edited row.

    Returns what was added, so a second run reports (and changes) nothing.
    """
    added: list[str] = []
    for model, rows in (
        (EventClass, defaults.CLASSES),
        (EventType, defaults.TYPES),
        (EventProperty, defaults.PROPERTIES),
    ):
        existing = set(session.scalars(select(model.code)))
        for row in rows:
            if row.code not in existing:
                session.add(model(code=row.code, name_fi=row.name_fi, name_en=row.name_en))
                added.append(f"{model.__tablename__}:{row.code}")
        session.flush()
    existing = set(session.scalars(select(Category.code)))
    for position, cat in enumerate(defaults.CATEGORIES):
        if cat.code not in existing:
            session.add(
                Category(
                    code=cat.code,
                    name_fi=cat.name_fi,
                    name_en=cat.name_en,
                    default_class=cat.default_class,
                    default_type=cat.default_type,
                    allow_selection=cat.allow_selection,
                    sales_target=cat.sales_target,
                    position=position,
                )
            )
            added.append(f"category:{cat.code}")
    session.flush()
    return added


def init_database(engine: Engine, sessions: sessionmaker[Session]) -> list[str]:
    """``crm-events init-db``: the schema at head and the default catalogue's missing rows
    (returned). Safe to run again: a current database gains nothing."""
    upgrade(engine)
    with transaction(sessions) as session:
        return install_default_catalogue(session)
