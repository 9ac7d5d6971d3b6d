"""Text-to-SQL: the model explores a SQLite database with the sql tool and answers with a query;
rewarded by execution match against the gold query.

Data: Spider format (``question``, ``query``, ``db_id``, databases at
``<database_dir>/<db_id>/<db_id>.sqlite``), or, without a path, a generated demo set of small
databases and questions (built once into the user cache directory).
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any, Literal

from agentrl.envs.base import Env, Reward, Task, load_rows
from agentrl.tools.sql import execution_match

from agentrl.trajectory import Trajectory

PROMPT = (
    "Write a SQLite query that answers the question. You can run read-only queries with <sql> query </sql> "
    "to explore the data; results come back between <output> and </output>. Give the final query as "
    "<answer> query </answer>.\nDatabase schema:\n{schema}\nQuestion: {question}"
)


def schema_text(db_path: Path) -> str:
    connection = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = connection.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND sql IS NOT NULL").fetchall()
    finally:
        connection.close()
    return "\n".join(row[0] + ";" for row in rows)


def build_demo(root: Path, seed: int = 0) -> list[dict[str, Any]]:
    """Two small databases (a shop and a school) and questions with gold queries."""
    rng = random.Random(seed)
    cities = ["Oslo", "Lima", "Porto", "Kyoto", "Tunis", "Quito"]
    subjects = ["maths", "history", "biology", "music"]
    shop = root / "database" / "shop" / "shop.sqlite"
    school = root / "database" / "school" / "school.sqlite"
    for path in (shop, school):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
    with sqlite3.connect(shop) as connection:
        connection.executescript("CREATE TABLE customer (id INTEGER PRIMARY KEY, name TEXT, city TEXT);"
                                 "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, amount REAL, year INTEGER);")
        connection.executemany("INSERT INTO customer VALUES (?, ?, ?)",
                               [(i, f"customer{i}", rng.choice(cities)) for i in range(1, 41)])
        connection.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)",
                               [(i, rng.randint(1, 40), round(rng.uniform(5, 500), 2), rng.randint(2019, 2024)) for i in range(1, 301)])
    with sqlite3.connect(school) as connection:
        connection.executescript("CREATE TABLE student (id INTEGER PRIMARY KEY, name TEXT, age INTEGER);"
                                 "CREATE TABLE grade (student_id INTEGER, subject TEXT, score INTEGER);")
        connection.executemany("INSERT INTO student VALUES (?, ?, ?)", [(i, f"student{i}", rng.randint(11, 18)) for i in range(1, 61)])
        connection.executemany("INSERT INTO grade VALUES (?, ?, ?)",
                               [(s, subject, rng.randint(30, 100)) for s in range(1, 61) for subject in subjects])
    rows = []
    for city in cities:
        rows.append({"db_id": "shop", "question": f"How many customers live in {city}?",
                     "query": f"SELECT count(*) FROM customer WHERE city = '{city}'"})
        rows.append({"db_id": "shop", "question": f"What is the total amount of orders placed by customers from {city}?",
                     "query": f"SELECT sum(o.amount) FROM orders o JOIN customer c ON o.customer_id = c.id WHERE c.city = '{city}'"})
    for year in range(2019, 2025):
        rows.append({"db_id": "shop", "question": f"How many orders were placed in {year}?",
                     "query": f"SELECT count(*) FROM orders WHERE year = {year}"})
    for subject in subjects:
        rows.append({"db_id": "school", "question": f"What is the average {subject} score?",
                     "query": f"SELECT avg(score) FROM grade WHERE subject = '{subject}'"})
        rows.append({"db_id": "school", "question": f"List the names of students who scored above 90 in {subject}.",
                     "query": f"SELECT s.name FROM student s JOIN grade g ON s.id = g.student_id WHERE g.subject = '{subject}' AND g.score > 90"})
    for age in range(11, 19):
        rows.append({"db_id": "school", "question": f"How many students are {age} years old?",
                     "query": f"SELECT count(*) FROM student WHERE age = {age}"})
    rng.shuffle(rows)
    for index, row in enumerate(rows):
        row["id"] = f"sql-{index}"
    return rows


def demo_root() -> Path:
    """The generated demo set, built once (atomically) under the user cache directory."""
    import json
    import os
    import shutil
    import tempfile

    from agentrl.models import cache_root

    root = cache_root() / "text2sql-demo"
    if not (root / "questions.jsonl").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".text2sql-demo-", dir=root.parent))
        rows = build_demo(staging)
        (staging / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        try:
            os.replace(staging, root)
        except OSError:  # another process built it first
            shutil.rmtree(staging, ignore_errors=True)
    return root


class Text2SQLEnv(Env):
    """Options: ``database_dir`` (Spider's ``database`` directory) for local data;
    ``query_timeout_s`` (10), the time limit of each query of the execution-match reward."""

    name = "text2sql"
    option_names = ("database_dir", "query_timeout_s")
    tools = ("sql",)
    action_format = "xml"
    tags = {"sql": "sql"}
    answer_tag = "answer"
    observation_template = "\n<output>\n{observation}\n</output>\n"
    final_turn_message = "\n<output>\nNo more queries are allowed. Give your final query now.\n</output>\n"

    def load(self, split: Literal["train", "eval"], path: str | None = None) -> list[dict[str, Any]]:
        if path is not None:
            return load_rows(path)
        rows = load_rows(demo_root() / "questions.jsonl")
        cut = len(rows) * 3 // 4
        return rows[:cut] if split == "train" else rows[cut:]

    def database_path(self, db_id: str) -> Path:
        root = Path(self.options["database_dir"]) if "database_dir" in self.options else demo_root() / "database"
        path = root / db_id / f"{db_id}.sqlite"
        if not path.is_file():
            raise FileNotFoundError(f"database {db_id!r} not found at {path}; set env.options.database_dir")
        return path

    def make_task(self, row: dict[str, Any], index: int) -> Task:
        db_path = self.database_path(row["db_id"])
        content = PROMPT.format(schema=schema_text(db_path), question=row["question"])
        return Task(id=str(row.get("id", index)), messages=[{"role": "user", "content": content}],
                    answer=row["query"], metadata={"db_path": str(db_path), "db_id": row["db_id"]})

    def reward(self, task: Task, trajectory: Trajectory) -> Reward:
        """Execution match: the answered query returns the gold query's rows (as a bag; in order
        when the gold query orders). The answer runs under the SQL tool's guard and limits (no
        write, bounded time, rows and bytes): the policy cannot change what it is scored on."""
        if not trajectory.answer:
            return Reward(0.0, False, info={"answered": 0.0})
        correct = execution_match(task.metadata["db_path"], trajectory.answer, task.answer,
                                  timeout_s=float(self.options.get("query_timeout_s", 10.0)))
        return Reward(float(correct), correct, info={"answered": 1.0})
