"""SQL against a task's SQLite database (Spider/BIRD layout), read-only by construction.

Two independent locks: the database file is opened read-only (``mode=ro`` plus ``query_only``), and
sqlglot admits only a single read query (no DDL/DML, ATTACH, PRAGMA, several statements). Queries
written for Postgres or MySQL can be transpiled to SQLite (option ``dialect``). A progress handler
enforces the time limit; results come back as a compact table with row, column and cell limits.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import sqlglot
from sqlglot import exp

from agentrl.tool import Tool, ToolContext, ToolError

READ_ROOTS = (exp.Select, exp.Union, exp.Intersect, exp.Except)
FORBIDDEN = (exp.Insert, exp.Update, exp.Delete, exp.Create, exp.Drop, exp.Alter, exp.Command,
             exp.Pragma, exp.Attach, exp.Detach, exp.Merge, exp.TruncateTable)


def check_read_only(query: str, dialect: str | None = None) -> str:
    """Return the query as SQLite SQL if it is exactly one read query; raise :class:`ToolError`."""
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
    return statement.sql(dialect="sqlite") if dialect and dialect != "sqlite" else query


def open_read_only(db_path: str | Path) -> sqlite3.Connection:
    path = Path(db_path)
    if not path.is_file():
        raise ToolError(f"database {str(path)!r} does not exist")
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    connection.execute("PRAGMA query_only = ON")
    return connection


def run_query(connection: sqlite3.Connection, sql: str, timeout_s: float, max_rows: int | None = None):
    """Execute with a deadline; return (column names, rows, whether rows were cut)."""
    deadline = time.monotonic() + timeout_s
    connection.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    try:
        cursor = connection.execute(sql)
        rows = cursor.fetchall() if max_rows is None else cursor.fetchmany(max_rows + 1)
    except sqlite3.OperationalError as error:
        if "interrupted" in str(error):
            raise ToolError(f"the query ran longer than {timeout_s:g} s and was stopped") from None
        raise ToolError(f"SQLite error: {error}") from None
    except sqlite3.Error as error:
        raise ToolError(f"SQLite error: {error}") from None
    finally:
        connection.set_progress_handler(None, 0)
    columns = [d[0] for d in cursor.description or []]
    cut = max_rows is not None and len(rows) > max_rows
    return columns, rows[:max_rows] if cut else rows, cut


def render_table(columns: list[str], rows: list[tuple], cut: bool, max_columns: int, max_cell_chars: int) -> str:
    def cell(value: Any) -> str:
        text = "NULL" if value is None else str(value)
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

    async def setup(self, context: ToolContext) -> None:
        await super().setup(context)
        db_path = self.options.get("db_path") or context.metadata.get("db_path")
        if not db_path:
            raise ToolError("no database for this task: set the sql tool's db_path option or the task's db_path")
        self.connection = open_read_only(db_path)

    def call(self, query: str) -> str:
        """
        Args:
            query: a single SQLite SELECT query.
        """
        sql = check_read_only(query, self.options.get("dialect"))
        columns, rows, cut = run_query(
            self.connection, sql, float(self.options.get("query_timeout_s", 5.0)), int(self.options.get("max_rows", 20))
        )
        return render_table(columns, rows, cut, int(self.options.get("max_columns", 20)), int(self.options.get("max_cell_chars", 60)))

    async def close(self) -> None:
        connection = getattr(self, "connection", None)
        if connection is not None:
            connection.close()


def execution_match(db_path: str | Path, predicted_sql: str, gold_sql: str, timeout_s: float = 10.0) -> bool:
    """Execution accuracy: do both queries return the same rows?

    Rows are compared as a bag (multiset), except when the gold query orders its result, where the
    order counts too. A predicted query that is not a valid read query never matches.
    """
    connection = open_read_only(db_path)
    try:
        try:
            predicted = run_query(connection, check_read_only(predicted_sql), timeout_s)[1]
        except ToolError:
            return False
        gold = run_query(connection, gold_sql, timeout_s)[1]
    finally:
        connection.close()
    ordered = sqlglot.parse_one(gold_sql, read="sqlite").args.get("order") is not None
    if ordered:
        return [tuple(r) for r in predicted] == [tuple(r) for r in gold]
    return Counter(map(tuple, predicted)) == Counter(map(tuple, gold))
