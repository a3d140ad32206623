"""Statements that run for every job, compiled once per database and sent on the connection's
DBAPI cursor.

SQLAlchemy's `Connection.execute` of a Core statement, even one it has compiled before, costs
about 80-100 µs of Python above the driver: it builds the statement's cache key, looks the
compiled form up, makes an execution context, processes each parameter and wraps the result.
The claim and the finish of a job run about a dozen statements, so that was most of what the
worker's database work cost (bench/statement_cost.py). A `Prepared` statement does that work
once per dialect: the SQL text, the order of its parameters, the constants it carries, and the
type processing of each parameter and result column, so that a run is the cursor's `execute`
with a few conversions around it.

What it keeps of SQLAlchemy's behaviour: the types' own conversions (they come from the same
type objects, so a `UTCDateTime` or JSON value reads and writes as through `execute`), the
connection's transaction (a statement runs only inside one, on its connection), the engine's
`before_cursor_execute` and `after_cursor_execute` listeners (tests and bench/statement_cost.py
watch the statements through them), and its exceptions: a driver error comes out as the
`sqlalchemy.exc.DBAPIError` subclass `execute` would raise, and one that means the connection
is gone invalidates it, so `core.db.retry_transient` and the pool treat it as before.

Column defaults and `onupdate` values set in Python (a constant, or a function of no arguments
such as `utcnow`) are made per run, as SQLAlchemy makes them, for the columns a statement does
not give. What it refuses, when it is built (each would need SQLAlchemy's execution context):
a default function that takes the context, IN lists that expand per call, and parameters
computed by a callable.
"""

from __future__ import annotations

import contextlib
import threading
from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound, StatementError
from sqlalchemy.sql.elements import TextClause

_Processor = Callable[[Any], Any] | None
# A parameter's value when the caller must give one.
_MISSING = object()


class Ran:
    """What a run returned: its rows (named tuples, with `_mapping` as SQLAlchemy's rows
    have) and the driver's row count."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def all(self) -> list[Any]:
        return self.rows

    def first(self) -> Any:
        return self.rows[0] if self.rows else None

    def one(self) -> Any:
        if len(self.rows) != 1:
            raise (MultipleResultsFound if self.rows else NoResultFound)(
                f"{len(self.rows)} rows where exactly one was required"
            )
        return self.rows[0]

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None

    def scalar_one(self) -> Any:
        return self.one()[0]


def _row_class(keys: Sequence[str], *, rename: bool = False) -> type:
    """A named tuple class for rows of these columns (`rename`: a name that is no identifier,
    as a driver may give an unnamed column, becomes _<position>)."""
    base = namedtuple("Row", keys, rename=rename)  # type: ignore[misc,arg-type]  # noqa: PYI024

    class Row(base):  # type: ignore[misc,valid-type]
        __slots__ = ()

        @property
        def _mapping(self) -> dict[str, Any]:
            return dict(zip(self._fields, self, strict=True))

    return Row


class _Form:
    """A statement as compiled for one dialect."""

    def __init__(self, statement: Any, dialect: Dialect, keys: Sequence[str] | None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(keys) if keys else None)
        what = f"statement {compiled.string.split(chr(10))[0][:60]!r}"
        if "__[POSTCOMPILE" in compiled.string:
            raise ValueError(f"{what}: parameters rendered per call are not supported")
        self.dialect = dialect
        self.sql: str = compiled.string
        # Columns whose Python-side default (an INSERT's) or onupdate (an UPDATE's) fills a
        # value the statement does not give: the default's value or function, by column key.
        made: dict[str, Callable[[], Any]] = {}
        for column in compiled.insert_prefetch:
            made[column.key] = _default_maker(column.default, what)
        for column in compiled.update_prefetch:
            made[column.key] = _default_maker(column.onupdate, what)
        # (name in the SQL, caller's key, value when the caller gives none, the function
        # that makes it per run, type processor)
        self.params: list[tuple[str, str, Any, Callable[[], Any] | None, _Processor]] = []
        seen: set[str] = set()  # (a parameter used twice, as the claim's `now`, binds once)
        for bind, name in compiled.bind_names.items():
            if bind.expanding or bind.callable is not None:
                raise ValueError(f"{what}: parameter {bind.key!r} is computed per call")
            if name in seen:
                continue
            seen.add(name)
            value = _MISSING if bind.required else bind.value
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            self.params.append((name, bind.key, value, made.pop(bind.key, None), processor))
        if made:
            raise ValueError(f"{what}: no parameter for the default of {sorted(made)}")
        self.positions: list[str] | None = (
            list(compiled.positiontup) if compiled.positional else None
        )
        # The result's columns and their types, where the statement names them (a SELECT, a
        # RETURNING, a text() with .columns()); a text() without them returns its rows as
        # the driver gives them, named as the driver names them.
        self.columns: list[Any] | None = list(getattr(statement, "exported_columns", ())) or None
        self.row_class: Any = None
        if self.columns is not None:
            self.row_class = _row_class([column.key for column in self.columns])
        # By the driver's column types, known at the first run (which also tells whether a
        # text() returns rows: None until then).
        self.result_processors: list[_Processor] | None = None
        self.returns_rows: bool | None = True if self.columns is not None else None
        if self.columns is None and not isinstance(statement, TextClause):
            self.returns_rows = False

    def bound(self, params: Mapping[str, Any]) -> Any:
        values = {}
        for name, key, default, make, processor in self.params:
            value = params.get(key, default) if make is None or key in params else make()
            if value is _MISSING:
                raise KeyError(f"{self.sql[:60]!r} needs a value for parameter {key!r}")
            values[name] = processor(value) if processor is not None else value
        if self.positions is None:
            return values
        return tuple(values[name] for name in self.positions)

    def rows(self, cursor: Any) -> list[Any]:
        processors = self.result_processors
        if processors is None:
            description = cursor.description
            if self.columns is None:  # a text() without columns: learnt from its first run
                self.returns_rows = description is not None
                if description is None:
                    return []
                self.row_class = _row_class([desc[0] for desc in description], rename=True)
                processors = [None] * len(description)
            elif description is None or len(description) != len(self.columns):
                raise ValueError(f"{self.sql[:60]!r}: the cursor returned other columns")
            else:
                processors = [
                    column.type.dialect_impl(self.dialect).result_processor(self.dialect, desc[1])
                    for column, desc in zip(self.columns, description, strict=True)
                ]
            self.result_processors = processors
        fetched = cursor.fetchall()
        make = self.row_class._make  # type: ignore[union-attr]
        if not any(processors):
            return [make(row) for row in fetched]
        return [
            make(
                [value if p is None else p(value) for p, value in zip(processors, row, strict=True)]
            )
            for row in fetched
        ]


def _default_maker(default: Any, what: str) -> Callable[[], Any]:
    """A function that makes a column default's value per run: a constant, or a function of
    no arguments (SQLAlchemy wraps those, keeping them as `__wrapped__`); one that reads
    SQLAlchemy's execution context is refused."""
    if default is not None and default.is_scalar:
        value = default.arg
        return lambda: value
    if default is not None and default.is_callable and hasattr(default.arg, "__wrapped__"):
        return cast(Callable[[], Any], default.arg.__wrapped__)
    raise ValueError(f"{what}: a column default that needs the execution context")


class Prepared:
    """A Core statement, compiled once per dialect and run on the DBAPI cursor of a
    connection that is in a transaction. `keys`: the columns an INSERT without `.values()`
    is given (each run gives them all)."""

    def __init__(self, statement: Any, *, keys: Iterable[str] | None = None) -> None:
        self.statement = statement
        self.keys = tuple(keys) if keys is not None else None
        self._forms: dict[str, _Form] = {}
        self._lock = threading.Lock()

    def _form(self, dialect: Dialect) -> _Form:
        form = self._forms.get(dialect.name)
        if form is None:
            with self._lock:
                form = self._forms.get(dialect.name)
                if form is None:
                    form = self._forms[dialect.name] = _Form(self.statement, dialect, self.keys)
        return form

    def run(self, conn: Connection, params: Mapping[str, Any] | None = None) -> Ran:
        """Run it with `params` (by the names of its bound parameters) on `conn`."""
        if not conn.in_transaction():
            raise RuntimeError("a prepared statement runs inside a transaction")
        form = self._form(conn.dialect)
        return _execute(conn, form, form.bound(params or {}))


def _execute(conn: Connection, form: _Form, args: Any) -> Ran:
    sql = form.sql
    fairy = conn.connection
    cursor = fairy.driver_connection.cursor()  # type: ignore[union-attr]
    dispatch = conn.dispatch
    try:
        for listener in dispatch.before_cursor_execute:
            sql, args = listener(conn, cursor, sql, args, None, False)
        cursor.execute(sql, args)
        # (Only a statement with result columns fetches; the cursor's description, which
        # psycopg builds anew at each access, is read once, for the column types.)
        rows = form.rows(cursor) if form.returns_rows is not False else []
        rowcount = cursor.rowcount
        for listener in dispatch.after_cursor_execute:
            listener(conn, cursor, sql, args, None, False)
    except form.dialect.loaded_dbapi.Error as exc:
        raise _wrapped(conn, form.dialect, exc, sql, args, cursor) from exc
    finally:
        with contextlib.suppress(Exception):  # (a lost connection's cursor may not close)
            cursor.close()
    return Ran(rows, rowcount)


def _wrapped(
    conn: Connection, dialect: Dialect, exc: Any, sql: str, args: Any, cursor: Any
) -> StatementError:
    """The SQLAlchemy exception `Connection.execute` would raise for the driver's `exc`; a
    lost connection is invalidated first (the pool then replaces it)."""
    gone = dialect.is_disconnect(exc, conn.connection.dbapi_connection, cursor)
    if gone:
        conn.invalidate(exc)
    dbapi_error = dialect.loaded_dbapi.Error
    return DBAPIError.instance(
        sql, args, exc, dbapi_error, connection_invalidated=gone, dialect=dialect
    )
