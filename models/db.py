"""Engine and session factories; nothing is created at import time."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from time import monotonic
from typing import Any, TypeVar, cast

from sqlalchemy import (
    JSON,
    CursorResult,
    Dialect,
    Engine,
    String,
    Table,
    TextClause,
    create_engine,
    event,
    exc,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import Null

from config.settings import Settings

#: The tasks' pooled connections are pinged before use after a rest this long.
PING_AFTER_REST_S = 1.0
_RESTED_SINCE = "crm.rested_since"


def create_db_engine(
    settings: Settings, *, ping_after_rest_s: float | None = None, **kwargs: Any
) -> Engine:
    """The engine of ``settings``' database.

    On a server, a pooled connection is pinged before every use (SQLAlchemy's pre-ping), or,
    given ``ping_after_rest_s``, only after it rested that long (``_ping_after_rest``: for code
    that retries a transaction that meets a lost connection, as every task does).

    A statement's values are kept out of its errors (``hide_parameters``): they are a message's
    contents, names and numbers, and an error goes to a log, a failure's record and a 500's
    trace, which name code and never what was asked (docs/security.md).
    """
    url = settings.effective_database_url
    kwargs.setdefault("hide_parameters", True)
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60}, **kwargs)
        _configure_sqlite(engine)
        return engine
    if ping_after_rest_s is None:
        engine = create_engine(url, pool_pre_ping=True, **kwargs)
    else:
        engine = create_engine(url, **kwargs)
        _ping_after_rest(engine, ping_after_rest_s)
    if engine.dialect.driver == "psycopg":
        _send_bytes_in_binary(engine)
    return engine


def _ping_after_rest(engine: Engine, rest_s: float) -> None:
    """Ping a pooled connection before use only when it rested ``rest_s`` or more.

    SQLAlchemy's ``pool_pre_ping`` pings at every checkout: a round trip per transaction, one
    in fourteen of a new call's. A connection that went back to the pool a moment ago is as
    good as the server's last answer on it; one that rested (the database restarted at night,
    an idle timeout) is pinged, and a dead one is replaced along with every other connection of
    the pool. A server that goes away while connections are in use fails the statements on
    them, with a ping or without; one that went away in the moment since a connection's last
    use fails its next transaction too, where a ping would have replaced it: the caller must
    retry (a task does: a transient error), and SQLAlchemy has then replaced the pool's
    connections as above.
    """

    @event.listens_for(engine, "checkin")
    def on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info[_RESTED_SINCE] = monotonic()

    @event.listens_for(engine, "checkout")
    def on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(_RESTED_SINCE)
        if since is None or monotonic() - since < rest_s:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            if engine.dialect.is_disconnect(error, dbapi_connection, None):
                raise exc.InvalidatePoolError(str(error)) from error
            raise


def _send_bytes_in_binary(engine: Engine) -> None:
    """Send ``bytes`` and list (array) parameters in PostgreSQL's binary format.

    psycopg's default is the text format: every byte escaped as two hex digits, so a 25 MB
    email became a 50 MB string in the worker and as much work for the server to parse; and
    every element of an array quoted and escaped by a regular expression in Python, fifteen
    times the cost of the binary form for the column arrays of a batch (``insert_rows``).
    """
    from psycopg.types.array import ListBinaryDumper
    from psycopg.types.string import BytesBinaryDumper

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.adapters.register_dumper(bytes, BytesBinaryDumper)
        dbapi_connection.adapters.register_dumper(list, ListBinaryDumper)


def _configure_sqlite(engine: Engine) -> None:
    """WAL, foreign keys, and BEGIN IMMEDIATE.

    Several worker processes write to the embedded SQLite file. A deferred transaction that
    reads and later writes fails at once with "database is locked" when another process wrote
    in between (the busy timeout does not cover a lock upgrade); taking the write lock at BEGIN
    makes SQLite queue the writers instead (SQLAlchemy's documented pysqlite recipe).
    """

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()
        # SQLAlchemy cuts multi-row inserts to the parameters SQLite takes by its version; a
        # build may take fewer (SQLITE_MAX_VARIABLE_NUMBER): the connection says how many.
        taken = dbapi_connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        if taken < engine.dialect.insertmanyvalues_max_parameters:
            engine.dialect.insertmanyvalues_max_parameters = taken

    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


#: ``session.info`` key: whether internal calls count toward cards, tallies, targets and
#: statistics (``CRM_COUNT_INTERNAL_CALLS``); absent means they do not.
COUNT_INTERNAL_CALLS = "crm.count_internal_calls"


def create_session_factory(
    engine: Engine, count_internal_calls: bool = False
) -> sessionmaker[Session]:
    return sessionmaker(
        engine, expire_on_commit=False, info={COUNT_INTERNAL_CALLS: count_internal_calls}
    )


def counts_internal_calls(session: Session) -> bool:
    return bool(session.info.get(COUNT_INTERNAL_CALLS, False))


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception."""
    with factory() as session, session.begin():
        yield session


def upsert_insert(session: Session, table: Any) -> Any:
    """A dialect-specific INSERT that supports ``on_conflict_do_nothing/do_update``."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def table_of(model: Any) -> Table:
    """A mapped class's table, for Core statements that skip the ORM's per-row work."""
    return cast(Table, model.__table__)


#: Statements built once per dialect by ``prepared_upsert``.
_PREPARED: dict[tuple[str, Any, Callable[[Any], Any]], Any] = {}


def prepared_upsert(session: Session, table: Any, configure: Callable[[Any], Any]) -> Any:
    """``configure(upsert_insert(session, table))``, built once per dialect and reused.

    For the hot paths: a statement executed with its values as parameters, rather than built
    with them each time, skips building the statement and its cache key, SQLAlchemy's largest
    cost per statement there. ``configure`` must be a module-level function: it is part of the
    key.
    """
    dialect = session.get_bind().dialect.name
    key = (dialect, table, configure)
    statement = _PREPARED.get(key)
    if statement is None:
        insert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
        statement = _PREPARED[key] = configure(insert)
    return statement


#: Values per ``IN (…)`` list read in slices: within the parameters any SQLite build takes in
#: one statement (SQLITE_MAX_VARIABLE_NUMBER; 999 was the default until 3.32), with room for
#: the statement's others.
IN_LIST_SIZE = 500

_T = TypeVar("_T")


def chunked(values: Sequence[_T], size: int = IN_LIST_SIZE) -> Iterator[Sequence[_T]]:
    """``values`` in consecutive slices of at most ``size``, for ``IN`` lists of any length."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


@contextmanager
def snapshot(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction that reads one snapshot (REPEATABLE READ on PostgreSQL).

    Events and tallies are then read as of the same instant: a refresh committing meanwhile
    cannot make a correct tally look drifted. SQLite serialises writers anyway.
    """
    with transaction(sessions) as session:
        if is_postgresql(session):
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        yield session


def insert_rows(
    session: Session, table: Table, rows: list[dict[str, Any]], suffix: str = ""
) -> list[Any]:
    """Insert ``rows`` (dicts with the same keys) in one statement; ``suffix`` is PostgreSQL's
    ``ON CONFLICT …`` clause and ``RETURNING …`` list, if any. Returns the rows returned.

    On PostgreSQL the values go as one array per column into ``INSERT … SELECT … FROM
    unnest(…)``: one short statement, parsed and executed once, where an ``executemany`` is
    an execution per row on the server and a round of the driver's per-row work in Python.
    A column whose rows all hold the same value (the batch's source, its time, the defaults:
    half of an event's columns in a backfill) goes as that one value instead of an array of
    it, in batches of ``SENT_ONCE_FROM`` rows or more: the driver converts and the server reads
    one value, not one per row. JSON goes as its text (a :class:`JsonText` as it is).
    Elsewhere (SQLite) ``executemany`` of the plain INSERT (``suffix`` must then be empty).
    """
    if not rows:
        return []
    if not is_postgresql(session):
        if suffix:
            raise ValueError("an ON CONFLICT or RETURNING suffix is PostgreSQL's alone here")
        if any(isinstance(v, JsonText) for row in rows for v in row.values()):
            rows = [{k: _parsed(v) for k, v in row.items()} for row in rows]
        session.execute(table.insert(), rows)
        return []
    dialect = session.get_bind().dialect
    names = tuple(rows[0])
    processors = _processors(dialect, table, names)
    values: dict[str, Any] = {}
    varying: list[bool] = []
    for position, name in enumerate(names):
        process = processors[position]
        column = [row[name] for row in rows]
        if process is not None:
            column = [process(v) for v in column]
        # Compared once processed (JSON as its text): 1 and 1.0 are equal but not the same JSON.
        first = column[0]
        if (
            len(rows) >= SENT_ONCE_FROM
            and column.count(first) == len(column)
            and _same_types(column, first)
        ):
            values[f"c{position}"] = first
            varying.append(False)
        else:
            values[f"c{position}"] = column
            varying.append(True)
    if not any(varying):
        values["c0"] = [values["c0"]] * len(rows)  # one array gives the statement its rows
        varying[0] = True
    statement = _unnest_insert(dialect, table, names, suffix, tuple(varying))
    result = cast(CursorResult[Any], session.execute(statement, values))
    return list(result.all()) if result.returns_rows else []


def _same_types(column: list[Any], first: Any) -> bool:
    """Whether every value is of ``first``'s type (``count`` took ``True`` for ``1``)."""
    kind = type(first)
    return kind is str or kind is type(None) or all(type(v) is kind for v in column)


#: Rows from which a column of one value is sent once. A smaller batch (a few calls drained at
#: a quiet moment) sends every column as an array: the saving is small there, and each set of
#: constant columns would be a statement of its own for the server to plan until prepared.
SENT_ONCE_FROM = 50

#: (table, columns) -> each column's bind processor, for ``insert_rows``.
_PROCESSORS: dict[tuple[Table, tuple[str, ...]], list[Any]] = {}

#: (table, columns, suffix, which columns vary) -> the statement of ``insert_rows``. Bounded:
#: each set of constant columns a caller meets is a statement of its own.
_UNNEST: dict[tuple[Table, tuple[str, ...], str, tuple[bool, ...]], TextClause] = {}
_UNNEST_MAX = 512


def _processors(dialect: Dialect, table: Table, names: tuple[str, ...]) -> list[Any]:
    key = (table, names)
    if (found := _PROCESSORS.get(key)) is None:
        found = _PROCESSORS[key] = [_processor(dialect, table.c[name].type) for name in names]
    return found


def _processor(dialect: Dialect, column_type: Any) -> Any:
    """How ``insert_rows`` sends a column's values: JSON as its text (``_json_text``), the rest
    by the type's own bind processor."""
    impl = column_type.dialect_impl(dialect)
    if isinstance(impl, postgresql.JSONB | postgresql.JSON):
        return _json_text
    return impl.bind_processor(dialect)


class JsonText(str):
    """A value's JSON text, made by its writer (a ledger row's payload is the text its key was
    hashed from): ``insert_rows`` sends it as it is into a JSON column."""


def _parsed(value: Any) -> Any:
    """A :class:`JsonText` as its value again, for a driver that serialises JSON itself."""
    return json.loads(value) if isinstance(value, JsonText) else value


def _json_text(value: Any) -> str | None:
    """A JSON column's value as text, cast to JSON by the statement: the server parses it once.
    The driver's own JSONB adapter sent binary JSONB that the text array then printed and the
    cast parsed again; and each adapter object was unequal to every other, so a column of one
    value (the candidates' empty list) went as an array. ``None`` is JSON's null, as the column
    type says (``none_as_null`` is off); SQL's NULL is ``null()``. Serialised as the driver
    did (``json.dumps``' defaults)."""
    if isinstance(value, JsonText):
        return value
    if isinstance(value, Null):
        return None
    return json.dumps(None if value is JSON.NULL else value)


def _unnest_insert(
    dialect: Dialect, table: Table, names: tuple[str, ...], suffix: str, varying: tuple[bool, ...]
) -> TextClause:
    key = (table, names, suffix, varying)
    if (found := _UNNEST.get(key)) is not None:
        return found
    arrays: list[str] = []
    aliases: list[str] = []
    picks: list[str] = []
    for position, name in enumerate(names):
        column_type = table.c[name].type
        impl = column_type.dialect_impl(dialect)
        if isinstance(impl, postgresql.JSONB | postgresql.JSON):
            # JSON goes as its text (``_json_text``), cast to the column's type.
            sent, kept = "text", impl.compile(dialect=dialect)
        elif isinstance(impl, String):
            # As text: an explicit cast to varchar(n) would cut a longer value silently, where
            # the INSERT's own assignment to the column refuses it.
            sent = kept = "text"
        else:
            sent = kept = column_type.compile(dialect=dialect)
        if varying[position]:
            arrays.append(f"CAST(:c{position} AS {sent}[])")
            aliases.append(f"c{position}")
            value = f"u.c{position}"
        else:
            value = f"CAST(:c{position} AS {sent})"
        picks.append(value if sent == kept else f"CAST({value} AS {kept})")
    columns = ", ".join(f'"{name}"' for name in names)
    statement = text(
        f'INSERT INTO "{table.name}" ({columns}) SELECT {", ".join(picks)}'
        f" FROM unnest({', '.join(arrays)}) AS u({', '.join(aliases)}) {suffix}"
    )
    if len(_UNNEST) >= _UNNEST_MAX:
        _UNNEST.clear()
    _UNNEST[key] = statement
    return statement
