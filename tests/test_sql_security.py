"""The SQL tool against an adversarial policy: SQLite itself refuses every write path, and bombs
come back as ordinary observations within the time limit.

The parser check is only the helpful first-line error; these tests also run with the parser
replaced by one that lets everything through (a model of a sqlglot/SQLite differential), and
the database file must stay byte-identical.
"""

import asyncio
import hashlib
import sqlite3
import threading
import time
import tracemalloc

import agentrl.tools.sql as sql_module
import pytest
from agentrl.tools.sql import check_read_only, execution_match, open_read_only, run_query

from agentrl.executor import ToolExecutor
from agentrl.parsing import ToolCall
from agentrl.tool import ToolContext, ToolError


@pytest.fixture()
def db_path(tmp_path):
    path = tmp_path / "data" / "shop" / "shop.sqlite"
    path.parent.mkdir(parents=True)
    connection = sqlite3.connect(path)
    connection.executescript(
        """
        CREATE TABLE customer (id INTEGER PRIMARY KEY, name TEXT, city TEXT);
        CREATE INDEX customer_city ON customer (city);
        INSERT INTO customer VALUES (1, 'Ada', 'Oslo'), (2, 'Bo', 'Lima'), (3, 'Cy', 'Oslo');
        """
    )
    connection.commit()
    connection.close()
    return path


def snapshot(root) -> dict[str, str]:
    """Every file under ``root`` with its digest: a write anywhere there shows up."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_sql(db_path, queries, options=None, metadata=None):
    async def main():
        executor = ToolExecutor(["sql"], {"sql": options or {}})
        context = ToolContext("t", metadata or {"db_path": str(db_path)})
        async with executor.session("t", context) as session:
            return [(await session.run([ToolCall("sql", {"query": q})]))[0] for q in queries]

    return asyncio.run(main())


def hide(statement: str) -> list[str]:
    """The comment differential in several spellings: a parser that ends ``--`` at ``\\r`` or
    nests ``/* */`` sees ``SELECT 1``; SQLite runs ``statement``."""
    return [
        f"-- \r/*\n{statement} -- */ SELECT 1",
        f"--x\r/*\n{statement} --*/ SELECT 1",
        f"/* /* */ {statement} -- */ SELECT 1",
        f"\r\n-- \r/* \n {statement}\n-- */ SELECT 1",
    ]


def write_paths(tmp_path, db_path) -> list[str]:
    outside = tmp_path / "outside.sqlite"
    return [
        "PRAGMA query_only = OFF",
        f"ATTACH DATABASE 'file:{db_path}?mode=rw' AS w",
        "DELETE FROM w.customer",
        "DELETE FROM customer",
        "UPDATE customer SET name = 'x'",
        "INSERT INTO customer VALUES (9, 'x', 'y')",
        "REPLACE INTO customer VALUES (1, 'x', 'y')",
        "DROP TABLE customer",
        "DROP INDEX customer_city",
        "CREATE TABLE evil (x)",
        "CREATE TEMP TABLE evil (x)",
        "CREATE TEMP VIEW evil AS SELECT 1",
        "CREATE TEMP TRIGGER evil AFTER INSERT ON customer BEGIN SELECT 1; END",
        "CREATE VIRTUAL TABLE temp.evil USING fts5(x)",
        f"ATTACH DATABASE '{outside}' AS o",
        "CREATE TABLE o.t (x)",
        "DETACH DATABASE main",
        "PRAGMA user_version = 7",
        "PRAGMA journal_mode = WAL",
        "PRAGMA writable_schema = ON",
        "PRAGMA schema_version = 99",
        "PRAGMA temp_store_directory = '/tmp'",
        f"VACUUM INTO '{tmp_path / 'data' / 'copy.sqlite'}'",
        "VACUUM",
        "REINDEX",
        "ANALYZE",
        "BEGIN IMMEDIATE",
        "SAVEPOINT s",
        "COMMIT",
        "SELECT load_extension('/tmp/evil')",
    ]


def test_hidden_statements_through_the_tool_leave_every_file_identical(tmp_path, db_path):
    before = snapshot(tmp_path)
    queries = [q for statement in write_paths(tmp_path, db_path) for q in hide(statement)]
    results = run_sql(db_path, queries)
    for query, result in zip(queries, results):
        assert result.status == "error", query
    assert snapshot(tmp_path) == before
    (after,) = run_sql(db_path, ["SELECT count(*) FROM customer"])
    assert after.status == "ok" and after.observation.text.splitlines()[1] == "3"


def test_sqlite_is_the_guard_when_the_parser_lets_everything_through(tmp_path, db_path, monkeypatch):
    """A parser differential that sqlglot does not catch today must still change nothing."""
    monkeypatch.setattr(sql_module, "check_read_only", lambda query, dialect=None: query)
    before = snapshot(tmp_path)
    statements = write_paths(tmp_path, db_path)
    results = run_sql(db_path, statements)
    for statement, result in zip(statements, results):
        assert result.status == "error", (statement, result.observation.text)
    assert snapshot(tmp_path) == before
    (after,) = run_sql(db_path, ["SELECT name FROM customer WHERE id = 1"])
    assert after.status == "ok" and "Ada" in after.observation.text


def test_a_refused_write_names_what_sqlite_refused(db_path):
    database = open_read_only(db_path)
    with pytest.raises(ToolError, match="only reads of the task database"):
        run_query(database, "ATTACH DATABASE ':memory:' AS m", timeout_s=2.0)
    database.close()


def test_reads_still_work_with_the_guard(db_path):
    (result,) = run_sql(db_path, [
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3) "
        "SELECT c.x, customer.name FROM c JOIN customer ON customer.id = c.x ORDER BY c.x"
    ])
    assert result.status == "ok", result.observation.text
    assert result.observation.text.splitlines()[1:4] == ["1 | Ada", "2 | Bo", "3 | Cy"]
    (schema,) = run_sql(db_path, ["SELECT name FROM sqlite_master WHERE type = 'table'"])
    assert schema.status == "ok" and "customer" in schema.observation.text


BOMBS = [
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000) "
    "SELECT count(*) FROM c a, c b, c d",
    "SELECT randomblob(200000000), randomblob(200000000)",
    "SELECT zeroblob(200000000)",
    "SELECT printf('%.*c', 200000000, 'x')",
    "SELECT length(replace(hex(zeroblob(50000000)), '0', 'abcdef'))",
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x, randomblob(100000) FROM c",
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 5000) "
    "SELECT group_concat(hex(randomblob(100000))) FROM c",
]


@pytest.mark.parametrize("bomb", BOMBS)
def test_a_bomb_is_an_observation_within_the_time_limit(db_path, bomb):
    tracemalloc.start()
    started = time.monotonic()
    (result,) = run_sql(db_path, [bomb], {"query_timeout_s": 1.0})
    elapsed = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 8.0, (bomb, elapsed)
    assert peak < 64 << 20, (bomb, peak)
    assert result.status in ("ok", "error") and len(result.observation.text) < 20_000


def test_a_printf_precision_bomb_is_refused_before_it_runs(db_path):
    """SQLite spends time linear in a ``%.*c`` precision inside one step, out of the progress
    handler's reach: the width is checked first."""
    started = time.monotonic()
    bomb, legit = run_sql(db_path, ["SELECT printf('%.*c', 2000000000, 'x')",
                                    "SELECT printf('%.2f %5d %s', 3.14159, 42, name) FROM customer WHERE id = 1"])
    assert bomb.status == "error" and "over the 1048576-byte value limit" in bomb.observation.text
    assert time.monotonic() - started < 5.0
    assert legit.status == "ok" and "3.14    42 Ada" in legit.observation.text


def test_a_huge_value_is_refused_by_sqlite_not_materialised(db_path):
    (result,) = run_sql(db_path, ["SELECT randomblob(200000000)"])
    assert result.status == "error" and "too big" in result.observation.text


def test_a_huge_result_is_cut_by_bytes_not_only_rows(db_path):
    query = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT hex(randomblob(400000)) FROM c"
    database = open_read_only(db_path)
    started = time.monotonic()
    result = run_query(database, query, timeout_s=5.0, max_rows=1_000_000, max_bytes=4 << 20)
    database.close()
    assert result.cut and 1 <= len(result.rows) <= 6
    assert time.monotonic() - started < 5.0


def test_execution_match_on_a_bomb_stays_bounded(db_path):
    gold = "SELECT name FROM customer"
    bomb = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT hex(randomblob(1000)) FROM c"
    tracemalloc.start()
    started = time.monotonic()
    matched = execution_match(db_path, bomb, gold, timeout_s=2.0)
    elapsed = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert matched is False
    assert peak < 16 << 20, peak
    assert elapsed < 2.5, elapsed


def test_execution_match_refuses_a_write_hidden_from_the_parser(db_path, monkeypatch):
    monkeypatch.setattr(sql_module, "check_read_only", lambda query, dialect=None: query)
    before = snapshot(db_path.parent)
    assert not execution_match(db_path, "DELETE FROM customer", "SELECT 1")
    assert not execution_match(db_path, "PRAGMA user_version = 3", "SELECT 1")
    assert snapshot(db_path.parent) == before


def test_the_deadline_survives_a_concurrent_query_on_the_same_connection(db_path):
    """A cheap first row, then an endless count: a second query finishing meanwhile must not
    leave the first one running without a deadline."""
    database = open_read_only(db_path)
    slow = ("SELECT 1 UNION ALL SELECT count(*) FROM "
            "(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c)")
    outcome = {}

    def slow_call():
        try:
            run_query(database, slow, timeout_s=1.0)
            outcome["result"] = "finished"
        except ToolError as error:
            outcome["result"] = str(error)

    thread = threading.Thread(target=slow_call, daemon=True)
    thread.start()
    until = time.monotonic() + 3.0
    while thread.is_alive() and time.monotonic() < until:
        run_query(database, "SELECT 1", timeout_s=1.0)
    thread.join(timeout=15.0)
    assert not thread.is_alive(), "the slow query kept running with no deadline"
    assert "longer than 1 s" in outcome["result"]


def test_only_databases_under_the_configured_roots_are_opened(tmp_path, db_path):
    secret = tmp_path / "private" / "cookies.sqlite"
    secret.parent.mkdir()
    sqlite3.connect(secret).execute("CREATE TABLE cookie (value TEXT)").connection.close()
    roots = {"database_roots": [str(db_path.parent.parent)]}
    (inside,) = run_sql(db_path, ["SELECT count(*) FROM customer"], roots)
    assert inside.status == "ok"
    (outside,) = run_sql(secret, ["SELECT * FROM cookie"], roots)
    assert outside.status == "error" and "outside the allowed database roots" in outside.observation.text
    link = db_path.parent / "escape.sqlite"
    link.symlink_to(secret)
    (escaped,) = run_sql(link, ["SELECT * FROM cookie"], roots)
    assert escaped.status == "error" and "outside the allowed database roots" in escaped.observation.text
    (dotted,) = run_sql(db_path.parent / ".." / ".." / "private" / "cookies.sqlite", ["SELECT 1"], roots)
    assert dotted.status == "error" and "outside the allowed database roots" in dotted.observation.text


def test_check_read_only_still_gives_the_helpful_message():
    with pytest.raises(ToolError, match="only read queries"):
        check_read_only("DELETE FROM customer")


def test_the_text2sql_reward_is_bounded_and_cannot_change_its_database(db_path, monkeypatch):
    from agentrl.envs.text2sql import Text2SQLEnv

    from agentrl.trajectory import Trajectory

    env = Text2SQLEnv(database_dir=str(db_path.parent.parent), query_timeout_s=1.0)
    task = env.make_task({"db_id": "shop", "question": "Who?", "query": "SELECT name FROM customer"}, 0)
    before = snapshot(db_path.parent)
    monkeypatch.setattr(sql_module, "check_read_only", lambda query, dialect=None: query)
    for answer in ["DELETE FROM customer", "PRAGMA query_only = OFF", BOMBS[0], BOMBS[6],
                   "SELECT name FROM customer UNION ALL SELECT hex(randomblob(100000)) FROM customer"]:
        started = time.monotonic()
        reward = env.reward(task, Trajectory(id="x", group_id="g", prompt_ids=[1], answer=answer))
        assert reward.score == 0.0 and time.monotonic() - started < 4.0, answer
    assert env.reward(task, Trajectory(id="y", group_id="g", prompt_ids=[1], answer="SELECT name FROM customer")).success
    assert snapshot(db_path.parent) == before
