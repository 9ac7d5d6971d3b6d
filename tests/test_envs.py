"""The math-with-code and text-to-SQL envs: data, prompts and rewards, with their real tools."""

import asyncio

import pytest
from agentrl.envs import get_env_class
from agentrl.envs.math_code import MathCodeEnv, generate_problems, parse_number
from agentrl.envs.text2sql import Text2SQLEnv

from agentrl.config import RolloutConfig, ToolsConfig
from agentrl.executor import ToolExecutor
from agentrl.rollout import RolloutWorker
from agentrl.trajectory import Trajectory
from tests.helpers.scripted import ScriptedEngine


def answered(text):
    trajectory = Trajectory(id="t", group_id="g", prompt_ids=[])
    trajectory.answer = text
    return trajectory


def test_registry_by_name_and_path():
    assert get_env_class("math_code") is MathCodeEnv
    assert get_env_class("agentrl.envs.text2sql:Text2SQLEnv") is Text2SQLEnv
    with pytest.raises(LookupError, match="did you mean 'math_code'"):
        get_env_class("math_cod")


def test_generated_problems_are_deterministic_and_split():
    assert generate_problems(8, 0) == generate_problems(8, 0)
    assert {r["question"] for r in MathCodeEnv().load("train")[:200]}.isdisjoint({r["question"] for r in MathCodeEnv().load("eval")})


@pytest.mark.parametrize("text, value", [("12,345", 12345.0), ("the answer is 7.5", 7.5), ("-3", -3.0), ("none", None)])
def test_numbers_are_parsed(text, value):
    assert parse_number(text) == value


def test_math_reward_is_numeric_match():
    env = MathCodeEnv()
    task = env.make_task({"question": "What is 1234 * 5678?", "answer": 1234 * 5678}, 0)
    assert env.reward(task, answered("7,006,652")).success
    assert not env.reward(task, answered("7006653")).success
    assert env.reward(task, Trajectory(id="t", group_id="g", prompt_ids=[])).score == 0.0


def test_math_env_end_to_end_with_the_sandboxed_python_tool(tokenizer):
    env = MathCodeEnv(eval_size=1)
    task = env.make_task(env.load("eval")[0], 0)
    a, b = [int(x) for x in task.messages[0]["content"].split("What is ")[1].rstrip("?").split(" * ")]

    def script(conversation):
        if "<output>" not in conversation.split("Problem:")[-1]:
            return f"<python>print({a} * {b})</python>"
        printed = conversation.rsplit("<output>\n", 1)[1].split("\n</output>")[0]
        return f"<answer>{printed}</answer>"

    rollout = RolloutWorker(ScriptedEngine(tokenizer, script), tokenizer, env, ToolExecutor(["python"]), RolloutConfig(), ToolsConfig())
    trajectory = asyncio.run(rollout.run_trajectory(task))
    assert trajectory.reward == 1.0 and trajectory.tool_calls[0].tool == "python"


def test_text2sql_demo_prompt_and_execution_match(tokenizer):
    env = Text2SQLEnv()
    rows = env.load("eval")
    task = env.make_task(rows[0], 0)
    assert "CREATE TABLE" in task.messages[0]["content"] and task.metadata["db_path"].endswith(".sqlite")
    assert env.reward(task, answered(rows[0]["query"])).success
    assert not env.reward(task, answered("SELECT 1")).success
    assert not env.reward(task, answered("DROP TABLE customer")).success

    def script(conversation):
        if "<output>" not in conversation.split("Question:")[-1]:
            return "<sql>SELECT count(*) FROM sqlite_master</sql>"
        return f"<answer>{rows[0]['query']}</answer>"

    rollout = RolloutWorker(ScriptedEngine(tokenizer, script), tokenizer, env, ToolExecutor(["sql"]), RolloutConfig(), ToolsConfig())
    trajectory = asyncio.run(rollout.run_trajectory(task))
    assert trajectory.reward == 1.0 and trajectory.tool_calls[0].status == "ok"


def test_spider_layout(tmp_path):
    import json
    import sqlite3

    db = tmp_path / "database" / "tiny" / "tiny.sqlite"
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as connection:
        connection.executescript("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1), (2);")
    data = tmp_path / "dev.json"
    data.write_text(json.dumps({"question": "How many rows?", "query": "SELECT count(*) FROM t", "db_id": "tiny"}) + "\n")
    env = Text2SQLEnv(database_dir=str(tmp_path / "database"))
    task = env.make_task(env.load("eval", str(data))[0], 0)
    assert env.reward(task, answered("SELECT count(x) FROM t")).success


def test_visual_images_are_deterministic_and_the_detail_is_small():
    from agentrl.envs.visual import COLOURS, VisualEnv, draw

    rows = VisualEnv(eval_size=4).load("eval")
    assert rows == VisualEnv(eval_size=4).load("eval") and rows != VisualEnv(train_size=4).load("train")
    shape = next(r for r in rows if r["kind"] == "shape")
    image = draw(shape)
    assert image.size == (1024, 1024) and image.tobytes() == draw(shape).tobytes()
    colour = COLOURS[shape["colour"]]
    coloured = [(x, y) for x in range(1024) for y in range(1024) if image.getpixel((x, y)) == colour]
    assert 10 < len(coloured) <= 64  # at most 8x8 pixels of a 1024x1024 canvas
    assert all(abs(x - shape["x"]) <= 8 and abs(y - shape["y"]) <= 8 for x, y in coloured)


def test_visual_env_zooms_with_the_image_tool_and_is_rewarded(tokenizer):
    import json

    from agentrl.envs.visual import VisualEnv

    env = VisualEnv(eval_size=2)
    row = env.load("eval")[0]
    task = env.make_task(row, 0)
    box = [max(0, row["x"] - 32), max(0, row["y"] - 32), row["x"] + 64, row["y"] + 64]
    call = json.dumps({"name": "image", "arguments": {"operation": "zoom", "box": box, "factor": 4}})

    def script(conversation):
        if "<|im_start|>tool" not in conversation:
            return f"<tool_call>{call}</tool_call>"
        return f"<answer>{row['answer']}</answer><|im_end|>"

    rollout = RolloutWorker(ScriptedEngine(tokenizer, script), tokenizer, env, ToolExecutor(["image"]), RolloutConfig(), ToolsConfig())
    trajectory = asyncio.run(rollout.run_trajectory(task))
    assert trajectory.tool_calls[0].status == "ok" and trajectory.reward == 1.0
    assert "zoom -> 384x384" in tokenizer.decode(trajectory.response_ids)
    assert not env.reward(task, answered("12")).success
