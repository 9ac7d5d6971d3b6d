"""SQL against a task's SQLite database (Spider/BIRD layout), read-only by construction.

The guard is SQLite itself, not the parser: the file is opened read-only and immutable by URI, an
authorizer allows only reads of the task database (no ATTACH, PRAGMA, DML, DDL, temp objects,
transactions, VACUUM or extension functions), no database can be attached, and values, SQL text
and the SQLite heap are limited. A progress handler installed once per connection enforces the
time limit, and rows are fetched one at a time under row and byte caps, so a bomb stops early
instead of being materialised. sqlglot only gives the helpful first-line error (a single read
query) and transpiles other dialects (option ``dialect``); what runs is the SQL it generated.
"""

from __future__ import annotations

import asyncio
import math
import re
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlglot
from sqlglot import exp

from agentrl.tool import Tool, ToolContext, ToolError

READ_ROOTS = (exp.Select, exp.Union, exp.Intersect, exp.Except)
FORBIDDEN = (exp.Insert, exp.Update, exp.Delete, exp.Create, exp.Drop, exp.Alter, exp.Command,
             exp.Pragma, exp.Attach, exp.Detach, exp.Merge, exp.TruncateTable)

# Functions that reach outside the query (files, extensions, tokenizer pointers) are refused even
# though most are absent from Python's SQLite build: a build that has them must not expose them.
DENIED_FUNCTIONS = frozenset({"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"})
ACTION_NAMES = {getattr(sqlite3, name): name.removeprefix("SQLITE_") for name in (
    "SQLITE_ALTER_TABLE", "SQLITE_ANALYZE", "SQLITE_ATTACH", "SQLITE_CREATE_INDEX", "SQLITE_CREATE_TABLE",
    "SQLITE_CREATE_TEMP_INDEX", "SQLITE_CREATE_TEMP_TABLE", "SQLITE_CREATE_TEMP_TRIGGER",
    "SQLITE_CREATE_TEMP_VIEW", "SQLITE_CREATE_TRIGGER", "SQLITE_CREATE_VIEW", "SQLITE_CREATE_VTABLE",
    "SQLITE_DELETE", "SQLITE_DETACH", "SQLITE_DROP_INDEX", "SQLITE_DROP_TABLE", "SQLITE_DROP_TEMP_INDEX",
    "SQLITE_DROP_TEMP_TABLE", "SQLITE_DROP_TEMP_TRIGGER", "SQLITE_DROP_TEMP_VIEW", "SQLITE_DROP_TRIGGER",
    "SQLITE_DROP_VIEW", "SQLITE_DROP_VTABLE", "SQLITE_FUNCTION", "SQLITE_INSERT", "SQLITE_PRAGMA",
    "SQLITE_READ", "SQLITE_REINDEX", "SQLITE_SAVEPOINT", "SQLITE_TRANSACTION", "SQLITE_UPDATE",
) if hasattr(sqlite3, name)}

# SQLite's heap is process-wide; this bounds what all open queries together can allocate (a sort
# or a wide row of large values), so a bomb gets "out of memory" instead of the host's memory.
SQLITE_HEAP_LIMIT_BYTES = 1 << 30


@dataclass(frozen=True)
class Limits:
    """What one query may use. ``max_value_bytes`` is SQLite's ``SQLITE_LIMIT_LENGTH`` (any
    string, blob or row); ``max_bytes`` caps the fetched result."""

    timeout_s: float = 5.0
    max_rows: int = 20
    max_bytes: int = 1 << 20
    max_value_bytes: int = 1 << 20
    max_sql_chars: int = 100_000


@dataclass
class Result:
    columns: list[str]
    rows: list[tuple]
    cut: bool  # more rows (or bytes) than the caps: only the first ones are kept
    nbytes: int


def check_read_only(query: str, dialect: str | None = None) -> str:
    """Return the query as SQLite SQL if it is exactly one read query; raise :class:`ToolError`.

    The returned text is sqlglot's rendering of what it checked, never the raw input."""
    if not query.strip():
        raise ToolError("the query is empty")
    try:
        statements = [s for s in sqlglot.parse(query, read=dialect or "sqlite") if s is not None]
    except sqlglot.errors.ParseError as error:
        first = error.errors[0] if error.errors else {}
        where = f" at line {first.get('line')}, column {first.get('col')}" if first else ""
        raise ToolError(f"SQL syntax error{where}: {first.get('description', str(error))}") from None
    if len(statements) != 1:
        raise ToolError(f"send exactly one statement per call (got {len(statements)})")
    statement = statements[0]
    if not isinstance(statement, READ_ROOTS):
        raise ToolError(f"only read queries (SELECT) are allowed, not {statement.key.upper()}")
    for node in statement.walk():
        if isinstance(node, FORBIDDEN):
            raise ToolError(f"only read queries are allowed; {node.key.upper()} is refused")
    return statement.sql(dialect="sqlite")


class GuardedConnection(sqlite3.Connection):
    """A connection with one query at a time, a deadline that only :func:`run_query` moves,
    and a record of what the authorizer last refused."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.query_lock = threading.Lock()
        self.deadline = math.inf
        self.refused: str | None = None
        self.function_error: str | None = None

    def reporting(self, function):
        """``function`` as a SQL function whose refusal message reaches the caller (SQLite itself
        only says that a user-defined function raised)."""
        def call(*args: Any) -> Any:
            try:
                return function(*args)
            except ValueError as error:
                self.function_error = str(error)
                raise

        return call

    def past_deadline(self) -> int:
        return int(time.monotonic() > self.deadline)

    def authorize(self, action: int, arg1: str | None, arg2: str | None, database: str | None,
                  _source: str | None) -> int:
        """Allow reads of the task database only (the ``main`` schema), and pure functions."""
        if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_RECURSIVE):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_READ and database in ("main", None):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() not in DENIED_FUNCTIONS:
            return sqlite3.SQLITE_OK
        name = ACTION_NAMES.get(action, str(action))
        detail = arg2 if action == sqlite3.SQLITE_FUNCTION else arg1
        self.refused = f"{name} {detail}" if detail else name
        return sqlite3.SQLITE_DENY


PRINTF_SPEC = re.compile(r"%[-+ 0#,!]*(\*|\d+)?(?:\.(\*|\d+))?([a-zA-Z%])")


def guarded_printf(max_value_bytes: int):
    """SQLite's ``printf``/``format``, refusing a width or precision over the value limit first.

    The built-in spends time linear in a ``%.*c`` precision (up to 2^31) inside one step, where
    neither the progress handler nor the length limit stops it; this checks the format, then
    renders with the built-in on a private in-memory connection."""
    local = threading.local()

    def printf(template: Any, *args: Any) -> Any:
        if template is None:
            return None
        position = 0
        for width, precision, kind in PRINTF_SPEC.findall(str(template)):
            for part in (width, precision):
                if part == "*":
                    value = args[position] if position < len(args) else 0
                    position += 1
                    try:
                        size = abs(int(float(value)))
                    except (TypeError, ValueError):
                        size = 0
                else:
                    size = int(part) if part else 0
                if size > max_value_bytes:
                    raise ValueError(f"printf width or precision {size} is over the {max_value_bytes}-byte value limit")
            position += kind != "%"
        renderer = getattr(local, "connection", None)
        if renderer is None:
            renderer = local.connection = sqlite3.connect(":memory:", check_same_thread=False)
            renderer.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_value_bytes)
        marks = ", ".join("?" * (len(args) + 1))
        return renderer.execute(f"SELECT printf({marks})", (template, *args)).fetchone()[0]

    return printf


def resolve_database(db_path: str | Path, roots: list[str] | None = None) -> Path:
    """The real path of a database file; with ``roots``, it must lie under one of them (after
    following symlinks and ``..``), so a client cannot name any SQLite file on the host."""
    path = Path(db_path).resolve()
    if roots is not None:
        allowed = [Path(root).resolve() for root in roots]
        if not any(path.is_relative_to(root) for root in allowed):
            raise ToolError(f"database {str(db_path)!r} is outside the allowed database roots "
                            f"({', '.join(map(str, allowed)) or 'none configured'}); "
                            "configure the sql tool's database_roots to include its directory")
    if not path.is_file():
        raise ToolError(f"database {str(db_path)!r} does not exist")
    return path


def open_read_only(db_path: str | Path, limits: Limits = Limits(),
                   roots: list[str] | None = None) -> GuardedConnection:
    path = resolve_database(db_path, roots)
    connection = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True, check_same_thread=False,
                                 isolation_level=None, factory=GuardedConnection)
    connection.execute("PRAGMA query_only = ON")
    connection.execute("PRAGMA temp_store = MEMORY")  # a sort spills to the bounded heap, not to /tmp
    current = connection.execute("PRAGMA hard_heap_limit").fetchone()[0]
    if current == 0 or current > SQLITE_HEAP_LIMIT_BYTES:
        connection.execute(f"PRAGMA hard_heap_limit = {SQLITE_HEAP_LIMIT_BYTES}")
    connection.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limits.max_value_bytes)
    connection.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, limits.max_sql_chars)
    connection.setlimit(sqlite3.SQLITE_LIMIT_WORKER_THREADS, 0)
    printf = guarded_printf(limits.max_value_bytes)
    for name in ("printf", "format"):
        connection.create_function(name, -1, connection.reporting(printf), deterministic=True)
    connection.set_authorizer(connection.authorize)
    connection.set_progress_handler(connection.past_deadline, 1000)
    return connection


def value_bytes(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes)) else 8


def run_query(connection: GuardedConnection, sql: str, timeout_s: float, max_rows: int | None = 20,
              max_bytes: int | None = 1 << 20) -> Result:
    """Execute with a deadline, fetching row by row until the row or byte cap is passed."""
    with connection.query_lock:
        connection.refused = connection.function_error = None
        connection.deadline = time.monotonic() + timeout_s
        try:
            cursor = connection.execute(sql)
            rows, nbytes, cut = [], 0, False
            while (row := cursor.fetchone()) is not None:
                nbytes += 8 + sum(value_bytes(v) for v in row)
                if (max_rows is not None and len(rows) >= max_rows) or (max_bytes is not None and nbytes > max_bytes):
                    cut = True
                    break
                rows.append(row)
            cursor.close()
        except sqlite3.Error as error:
            if connection.function_error is not None:
                raise ToolError(connection.function_error) from None
            if connection.refused is not None:
                raise ToolError(f"only reads of the task database are allowed; SQLite refused "
                                f"{connection.refused}") from None
            if "interrupted" in str(error):
                raise ToolError(f"the query ran longer than {timeout_s:g} s and was stopped") from None
            if "too big" in str(error):
                raise ToolError(f"SQLite error: {error} (a value may hold at most "
                                f"{connection.getlimit(sqlite3.SQLITE_LIMIT_LENGTH)} bytes)") from None
            raise ToolError(f"SQLite error: {error}") from None
        except MemoryError:
            raise ToolError("the query needed more memory than SQLite is allowed here") from None
        finally:
            connection.deadline = math.inf
    return Result([d[0] for d in cursor.description or []], rows, cut, nbytes)


def render_table(columns: list[str], rows: list[tuple], cut: bool, max_columns: int, max_cell_chars: int) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "NULL"
        if isinstance(value, bytes):
            text = f"x'{value[:max_cell_chars].hex()}'"
        else:
            text = value[: max_cell_chars + 1] if isinstance(value, str) else str(value)
        return text if len(text) <= max_cell_chars else text[: max_cell_chars - 1] + "…"

    shown = columns[:max_columns]
    lines = [" | ".join(shown) + (" | …" if len(columns) > max_columns else "")]
    for row in rows:
        lines.append(" | ".join(cell(v) for v in row[:max_columns]) + (" | …" if len(columns) > max_columns else ""))
    footer = f"({len(rows)} row{'s' if len(rows) != 1 else ''}{', more rows not shown' if cut else ''})"
    return "\n".join(lines + [footer])


class SQLTool(Tool):
    """Run one read-only SQL query (SQLite) against the task's database and see the result table."""

    name = "sql"
    timeout = 15.0
    option_names = ("db_path", "database_roots", "dialect", "query_timeout_s", "max_rows", "max_columns",
                    "max_cell_chars", "max_result_bytes", "max_value_bytes")

    async def setup(self, context: ToolContext) -> None:
        await super().setup(context)
        db_path = self.options.get("db_path") or context.metadata.get("db_path")
        if not db_path:
            raise ToolError("no database for this task: set the sql tool's db_path option or the task's db_path")
        roots = self.options.get("database_roots")
        self.connection = open_read_only(db_path, self.limits(), None if roots is None else list(roots))

    def limits(self) -> Limits:
        defaults = Limits()
        return Limits(
            timeout_s=float(self.options.get("query_timeout_s", defaults.timeout_s)),
            max_rows=int(self.options.get("max_rows", defaults.max_rows)),
            max_bytes=int(self.options.get("max_result_bytes", defaults.max_bytes)),
            max_value_bytes=int(self.options.get("max_value_bytes", defaults.max_value_bytes)),
        )

    def call(self, query: str) -> str:
        """
        Args:
            query: a single SQLite SELECT query.
        """
        sql = check_read_only(query, self.options.get("dialect"))
        limits = self.limits()
        result = run_query(self.connection, sql, limits.timeout_s, limits.max_rows, limits.max_bytes)
        return render_table(result.columns, result.rows, result.cut, int(self.options.get("max_columns", 20)),
                            int(self.options.get("max_cell_chars", 60)))

    async def close(self) -> None:
        connection = getattr(self, "connection", None)
        if connection is not None:
            await asyncio.to_thread(connection.close)  # waits for a running query, off the event loop


def execution_match(db_path: str | Path, predicted_sql: str, gold_sql: str, timeout_s: float = 10.0,
                    max_rows: int = 100_000, max_bytes: int = 64 << 20) -> bool:
    """Execution accuracy: do both queries return the same rows?

    Rows are compared as a bag (multiset), except when the gold query orders its result, where the
    order counts too. A predicted query that is not a valid read query never matches. Both run
    under the tool's guard; the gold result bounds the predicted one (a result with more rows or
    bytes than the gold's cannot match), so the policy's query stops early.
    """
    connection = open_read_only(db_path, Limits(timeout_s=timeout_s, max_rows=max_rows, max_bytes=max_bytes))
    try:
        gold = run_query(connection, gold_sql, timeout_s, max_rows, max_bytes)
        if gold.cut:
            raise ToolError(f"the gold query returns more than {max_rows} rows or {max_bytes} bytes; "
                            "raise execution_match's max_rows / max_bytes")
        try:
            predicted = run_query(connection, check_read_only(predicted_sql), timeout_s,
                                  len(gold.rows), gold.nbytes)
        except ToolError:
            return False
    finally:
        connection.close()
    if predicted.cut:
        return False
    ordered = sqlglot.parse_one(gold_sql, read="sqlite").args.get("order") is not None
    if ordered:
        return [tuple(r) for r in predicted.rows] == [tuple(r) for r in gold.rows]
    return Counter(map(tuple, predicted.rows)) == Counter(map(tuple, gold.rows))
