"""The Tool API: schemas come from type hints and docstrings; arguments are checked against them."""

import enum
import json
import subprocess
import sys
import textwrap
from typing import Literal

import pydantic
import pytest

from agentrl import Tool, ToolError, tool
from agentrl.tool import UnknownToolError, get_tool_class, registered_tools


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Box(pydantic.BaseModel):
    left: int
    top: int


class Everything(Tool):
    """Exercise every supported parameter type."""

    def call(
        self,
        text: str,
        count: int,
        ratio: float,
        flag: bool,
        items: list[int],
        mapping: dict,
        mode: Literal["fast", "slow"],
        color: Color,
        box: Box,
        maybe: str | None = None,
        limit: int = 5,
    ) -> str:
        """
        Args:
            text: some text.
            count: how many.
            mode: which mode to use.
        """
        return "ok"


def properties():
    return Everything.schema()["function"]["parameters"]["properties"]


def test_schema_is_openai_function_format():
    schema = Everything.schema()
    assert schema["type"] == "function"
    function = schema["function"]
    assert function["name"] == "everything"
    assert function["description"] == "Exercise every supported parameter type."
    assert set(function["parameters"]["required"]) == {"text", "count", "ratio", "flag", "items", "mapping", "mode", "color", "box"}
    assert function["parameters"]["additionalProperties"] is False


@pytest.mark.parametrize(
    "name, expected",
    [
        ("text", {"type": "string", "description": "some text."}),
        ("count", {"type": "integer", "description": "how many."}),
        ("ratio", {"type": "number"}),
        ("flag", {"type": "boolean"}),
        ("items", {"type": "array", "items": {"type": "integer"}}),
        ("mapping", {"type": "object"}),
        ("mode", {"type": "string", "enum": ["fast", "slow"], "description": "which mode to use."}),
        ("limit", {"type": "integer", "default": 5}),
    ],
)
def test_schema_of_each_simple_type(name, expected):
    prop = properties()[name]
    for key, value in expected.items():
        assert prop[key] == value, (name, prop)


def test_schema_of_enum_optional_and_pydantic_model():
    schema = Everything.schema()["function"]["parameters"]
    assert schema["$defs"]["Color"]["enum"] == ["red", "blue"]
    assert schema["$defs"]["Box"]["required"] == ["left", "top"]
    maybe = properties()["maybe"]
    assert {"type": "null"} in maybe["anyOf"] and {"type": "string"} in maybe["anyOf"]


def test_arguments_are_validated_and_converted():
    args = Everything.validate_arguments(
        {"text": "a", "count": 2, "ratio": 0.5, "flag": True, "items": [1], "mapping": {}, "mode": "fast",
         "color": "blue", "box": {"left": 1, "top": 2}}
    )
    assert args["color"] is Color.BLUE and args["box"] == Box(left=1, top=2) and args["limit"] == 5


def test_wrong_type_names_the_parameter():
    with pytest.raises(ToolError, match="parameter 'count'"):
        Everything.validate_arguments({"text": "a", "count": "many"})


def test_misspelt_parameter_suggests_the_right_one():
    with pytest.raises(ToolError, match="unknown parameter 'cuont'.*did you mean 'count'"):
        Everything.validate_arguments({"cuont": 1})


def test_function_tool_from_decorator():
    @tool(timeout=3)
    def add(a: int, b: int = 2) -> int:
        """Add two integers.

        Args:
            a: the first.
            b: the second.
        """
        return a + b

    assert issubclass(add, Tool) and add.name == "add" and add.timeout == 3
    params = add.schema()["function"]["parameters"]
    assert params["properties"]["a"] == {"type": "integer", "description": "the first."}
    assert params["required"] == ["a"]
    assert add().call(1, b=4) == 5


def test_async_function_tool():
    import asyncio

    @tool
    async def echo(text: str) -> str:
        """Echo text back."""
        return text

    assert asyncio.run(echo().call(text="hi")) == "hi"


def test_builtins_are_registered_through_entry_points():
    tools = registered_tools()
    assert {"sql", "image"} <= set(tools)
    assert get_tool_class("sql").name == "sql"


def test_unknown_tool_suggests_the_closest():
    with pytest.raises(UnknownToolError, match="did you mean 'sql'"):
        get_tool_class("sqll")


def test_import_path_must_name_a_tool():
    with pytest.raises(UnknownToolError, match="not a Tool subclass"):
        get_tool_class("json:dumps")


NEW_TOOL = '''
from agentrl import Tool


class WordCount(Tool):
    """Count the words in a text."""

    def call(self, text: str, unique: bool = False) -> str:
        """
        Args:
            text: the text to count.
            unique: count distinct words only.
        """
        words = text.split()
        return str(len(set(words)) if unique else len(words))
'''


def test_a_new_tool_in_15_lines_is_listed_and_callable_from_the_cli(tmp_path):
    assert len(NEW_TOOL.strip().splitlines()) <= 15
    (tmp_path / "my_tools.py").write_text(textwrap.dedent(NEW_TOOL))
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    agentrl = [sys.executable, "-m", "agentrl.cli"]
    listed = subprocess.run([*agentrl, "tools", "list", "--json", "--tool", "my_tools:WordCount"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert listed.returncode == 0, listed.stderr
    schemas = json.loads(listed.stdout)
    assert schemas["word_count"]["function"]["parameters"]["properties"]["text"] == {
        "type": "string", "description": "the text to count."
    }
    assert "sql" in schemas  # built-ins are listed too
    called = subprocess.run([*agentrl, "tools", "call", "word_count", '{"text": "a b a", "unique": true}',
                             "--tool", "my_tools:WordCount"], capture_output=True, text=True, env=env, timeout=60)
    assert called.returncode == 0, called.stderr
    assert called.stdout.strip() == "2"
    bad = subprocess.run([*agentrl, "tools", "call", "word_count", '{"txt": "a"}', "--tool", "my_tools:WordCount"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1 and "did you mean 'text'" in bad.stdout
