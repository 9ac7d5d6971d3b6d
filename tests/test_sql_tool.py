"""The SQL tool: read-only by construction, clear errors, compact tables, execution match."""

import asyncio
import hashlib
import sqlite3

import pytest
from agentrl.tools.sql import check_read_only, execution_match

from agentrl.executor import ToolExecutor
from agentrl.parsing import ToolCall
from agentrl.tool import ToolContext, ToolError


@pytest.fixture()
def db_path(tmp_path):
    path = tmp_path / "shop" / "shop.sqlite"
    path.parent.mkdir()
    connection = sqlite3.connect(path)
    connection.executescript(
        """
        CREATE TABLE customer (id INTEGER PRIMARY KEY, name TEXT, city TEXT);
        CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, amount REAL);
        INSERT INTO customer VALUES (1, 'Ada', 'Oslo'), (2, 'Bo', 'Lima'), (3, 'Cy', 'Oslo');
        INSERT INTO orders VALUES (1, 1, 10.5), (2, 1, 4.5), (3, 2, 7.0);
        """
    )
    connection.commit()
    connection.close()
    return path


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_sql(db_path, queries, options=None):
    async def main():
        executor = ToolExecutor(["sql"], {"sql": options or {}})
        async with executor.session("t", ToolContext("t", {"db_path": str(db_path)})) as session:
            return [(await session.run([ToolCall("sql", {"query": q})]))[0] for q in queries]

    return asyncio.run(main())


def test_select_renders_a_compact_table(db_path):
    (result,) = run_sql(db_path, ["SELECT name, city FROM customer ORDER BY id"])
    assert result.status == "ok"
    assert result.observation.text == "name | city\nAda | Oslo\nBo | Lima\nCy | Oslo\n(3 rows)"


def test_row_and_cell_limits(db_path):
    (result,) = run_sql(db_path, ["SELECT name || '-long-long-long' FROM customer"], {"max_rows": 2, "max_cell_chars": 8})
    lines = result.observation.text.splitlines()
    assert lines[1] == "Ada-lon…" and lines[-1] == "(2 rows, more rows not shown)"


ATTACKS = [
    "DELETE FROM customer",
    "UPDATE customer SET name = 'x'",
    "INSERT INTO customer VALUES (9, 'x', 'y')",
    "DROP TABLE orders",
    "CREATE TABLE evil (x)",
    "ATTACH DATABASE '/tmp/evil.db' AS evil",
    "PRAGMA writable_schema = 1",
    "SELECT 1; DROP TABLE customer",
    "VACUUM INTO '/tmp/copy.db'",
    "REPLACE INTO customer VALUES (1, 'x', 'y')",
    "WITH x AS (SELECT 1) DELETE FROM customer",
]


def test_adversarial_session_is_refused_and_leaves_the_file_unchanged(db_path):
    before = digest(db_path)
    results = run_sql(db_path, ATTACKS)
    for query, result in zip(ATTACKS, results):
        assert result.status == "error", query
        assert "allowed" in result.observation.text or "exactly one statement" in result.observation.text or "refused" in result.observation.text, (query, result.observation.text)
    assert digest(db_path) == before
    (after,) = run_sql(db_path, ["SELECT count(*) FROM customer"])
    assert after.observation.text.splitlines()[1] == "3"


def test_database_is_opened_read_only_even_past_the_parser(db_path):
    from agentrl.tools.sql import open_read_only

    connection = open_read_only(db_path)
    for statement in ("DELETE FROM customer", "PRAGMA query_only = OFF", "ATTACH ':memory:' AS m"):
        with pytest.raises(sqlite3.DatabaseError):
            connection.execute(statement)
    connection.close()


def test_syntax_errors_give_the_position(db_path):
    (result,) = run_sql(db_path, ["SELEC name FROM customer"])
    assert result.status == "error" and "line 1, column" in result.observation.text


def test_missing_table_is_sqlites_message(db_path):
    (result,) = run_sql(db_path, ["SELECT * FROM nope"])
    assert "no such table: nope" in result.observation.text


def test_slow_query_is_stopped(db_path):
    slow = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    (result,) = run_sql(db_path, [slow], {"query_timeout_s": 0.3})
    assert result.status == "error" and "longer than 0.3 s" in result.observation.text


def test_postgres_query_is_transpiled(db_path):
    (result,) = run_sql(db_path, ["SELECT name FROM customer WHERE name ILIKE 'a%'"], {"dialect": "postgres"})
    assert result.status == "ok" and "Ada" in result.observation.text


def test_check_read_only_accepts_set_operations_and_ctes():
    assert check_read_only("WITH a AS (SELECT 1) SELECT * FROM a")
    assert check_read_only("SELECT 1 UNION SELECT 2")
    with pytest.raises(ToolError):
        check_read_only("")


def test_execution_match(db_path):
    gold = "SELECT name FROM customer WHERE city = 'Oslo'"
    assert execution_match(db_path, "SELECT name FROM customer WHERE city = 'Oslo' ORDER BY name DESC", gold)
    assert execution_match(db_path, "SELECT c.name FROM customer c WHERE c.id IN (1, 3)", gold)
    assert not execution_match(db_path, "SELECT name FROM customer", gold)
    assert not execution_match(db_path, "DELETE FROM customer", gold)
    ordered = "SELECT name FROM customer ORDER BY name DESC"
    assert not execution_match(db_path, "SELECT name FROM customer ORDER BY name", ordered)
    assert execution_match(db_path, "SELECT name FROM customer ORDER BY 1 DESC", ordered)
    # a bag, not a set: duplicates count
    assert not execution_match(db_path, "SELECT DISTINCT city FROM customer", "SELECT city FROM customer")
