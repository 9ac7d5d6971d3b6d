"""The Tool API: a tool is a small Python class (or a typed function) whose schema comes from its
signature and docstring.

    class Calculator(Tool):
        \"\"\"Evaluate an arithmetic expression.\"\"\"
        async def call(self, expression: str) -> str: ...

One instance serves one trajectory: per-trajectory state (a Python session, a database connection)
lives on the instance, is created in :meth:`Tool.setup` and released in :meth:`Tool.close`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, get_type_hints

import docstring_parser
from pydantic import ConfigDict, Field, ValidationError, create_model

ENTRY_POINT_GROUP = "agentrl.tools"


class ToolError(Exception):
    """An error the model should see and can learn from (bad query, missing file, ...)."""


class InfraError(Exception):
    """The infrastructure behind a tool failed (server unreachable, sandbox backend down).

    The trajectory is marked ``infra_error`` and left out of the loss: it says nothing about the
    policy.
    """


class UnknownToolError(LookupError):
    """A tool name that is neither registered nor an importable ``module:Class`` path."""


@dataclass
class Observation:
    """What a tool returns to the model: text, images (for vision-language models), or both."""

    text: str = ""
    images: list[Any] = field(default_factory=list)


@dataclass
class ToolContext:
    """What a tool instance knows about its trajectory: its id, the task's metadata (e.g. a
    ``db_path``) and the task's images (the image tool appends its outputs here)."""

    trajectory_id: str
    metadata: dict[str, Any] = field(default_factory=dict)
    images: list[Any] = field(default_factory=list)


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Tool:
    """Base class of every tool. Subclasses implement ``call`` with typed parameters.

    Class attributes: ``name`` (default: the class name in snake_case), ``description`` (default:
    the docstring), ``timeout`` in seconds, ``max_concurrency`` (calls of this tool running at once
    across all trajectories; ``None`` for no limit), ``max_output_chars``, and ``option_names``: the
    options (``tools.options.<name>``) the tool reads, so that a misspelt option is refused before a
    run starts (``None``: the tool does not declare them and any option is passed through).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    timeout: ClassVar[float] = 30.0
    max_concurrency: ClassVar[int | None] = None
    max_output_chars: ClassVar[int] = 16_000
    option_names: ClassVar[tuple[str, ...] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = _snake_case(cls.__name__.removesuffix("Tool") or cls.__name__)
        if not cls.__dict__.get("description"):
            cls.description = describe(inspect.getdoc(cls) or "")
        cls._arguments_model = None

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.context: ToolContext | None = None

    async def setup(self, context: ToolContext) -> None:
        """Prepare per-trajectory state. Called once, before the first call."""
        self.context = context

    async def close(self) -> None:
        """Release per-trajectory state. Called once, when the trajectory ends."""

    # `call` is defined by subclasses with their own typed signature.

    # -- schema ----------------------------------------------------------------------------

    @classmethod
    def arguments_model(cls):
        """A pydantic model of ``call``'s parameters: it validates arguments and gives the schema."""
        if cls.__dict__.get("_arguments_model") is not None:
            return cls._arguments_model
        call = getattr(cls, "call", None)
        if call is None:
            raise TypeError(f"tool {cls.__name__} must define a `call` method")
        # A function tool's hints must resolve in the function's own module.
        target = getattr(cls, "__wrapped__", None) or call
        signature = inspect.signature(target)
        hints = get_type_hints(target, include_extras=True)
        docs = _parameter_docs(inspect.getdoc(target) or "")
        fields: dict[str, Any] = {}
        for name, parameter in signature.parameters.items():
            if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            annotation = hints.get(name, Any)
            default = ... if parameter.default is inspect.Parameter.empty else parameter.default
            fields[name] = (annotation, Field(default, description=docs.get(name)))
        model = create_model(
            f"{cls.__name__}Arguments", __config__=ConfigDict(extra="forbid"), **fields
        )
        cls._arguments_model = model
        return model

    @classmethod
    def parameters_schema(cls) -> dict[str, Any]:
        schema = cls.arguments_model().model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        schema.setdefault("required", [])
        return schema

    @classmethod
    def schema(cls) -> dict[str, Any]:
        """The OpenAI function-calling schema of this tool."""
        return {
            "type": "function",
            "function": {"name": cls.name, "description": cls.description, "parameters": cls.parameters_schema()},
        }

    @classmethod
    def first_parameter(cls) -> str:
        """The parameter that the text between XML tags (``<search>q</search>``) fills."""
        names = list(cls.arguments_model().model_fields)
        if not names:
            raise TypeError(f"tool {cls.name} takes no parameters, so it cannot be called with a tag")
        return names[0]

    @classmethod
    def validate_arguments(cls, arguments: Any) -> dict[str, Any]:
        """Check arguments against the schema; raise :class:`ToolError` naming the bad parameter."""
        if not isinstance(arguments, dict):
            raise ToolError(f"arguments of '{cls.name}' must be a JSON object, got {type(arguments).__name__}")
        model = cls.arguments_model()
        try:
            validated = model.model_validate(arguments)
        except ValidationError as error:
            raise ToolError(_describe_validation_error(cls.name, error, list(model.model_fields))) from None
        return {name: getattr(validated, name) for name in model.model_fields}


def describe(docstring: str) -> str:
    """A docstring's prose (without its Args/Returns sections), one line per paragraph."""
    parsed = docstring_parser.parse(docstring)
    prose = parsed.short_description or ""
    if parsed.long_description:
        prose += ("\n\n" if parsed.blank_after_short_description else " ") + parsed.long_description
    return "\n".join(" ".join(paragraph.split()) for paragraph in prose.split("\n\n") if paragraph.strip())


def _parameter_docs(docstring: str) -> dict[str, str | None]:
    parsed = docstring_parser.parse(docstring)
    if not parsed.params and docstring:  # a docstring that opens with its "Args:" section
        parsed = docstring_parser.parse("-\n\n" + docstring)
    return {p.arg_name: p.description for p in parsed.params}


def _describe_validation_error(tool_name: str, error: ValidationError, parameters: list[str]) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "arguments"
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(item["loc"][0]), parameters, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"unknown parameter '{where}'{hint}")
        elif item["type"] == "missing":
            problems.append(f"missing required parameter '{where}'")
        else:
            problems.append(f"parameter '{where}': {item['msg']} (got {item.get('input')!r})")
    accepted = ", ".join(parameters) or "none"
    return f"invalid arguments for tool '{tool_name}': " + "; ".join(problems) + f". Parameters: {accepted}."


def tool(function: Callable | None = None, *, name: str | None = None, timeout: float | None = None,
         max_concurrency: int | None = None) -> Any:
    """Turn a typed function (sync or async) into a :class:`Tool` class.

        @tool
        def add(a: int, b: int) -> int:
            \"\"\"Add two integers.\"\"\"
            return a + b
    """

    def wrap(fn: Callable) -> type[Tool]:
        if inspect.iscoroutinefunction(fn):
            async def call(self, *args, **kwargs):
                return await fn(*args, **kwargs)
        else:
            def call(self, *args, **kwargs):
                return fn(*args, **kwargs)
        call.__doc__ = fn.__doc__
        attributes: dict[str, Any] = {
            "call": call,
            "name": name or fn.__name__,
            "description": describe(inspect.getdoc(fn) or ""),
            "__doc__": fn.__doc__,
            "__module__": fn.__module__,
            "__wrapped__": fn,
        }
        if timeout is not None:
            attributes["timeout"] = timeout
        if max_concurrency is not None:
            attributes["max_concurrency"] = max_concurrency
        return type(fn.__name__, (Tool,), attributes)

    return wrap(function) if function is not None else wrap


# -- registry ------------------------------------------------------------------------------------


def registered_tools() -> dict[str, type[Tool] | Exception]:
    """Every tool registered under the ``agentrl.tools`` entry-point group.

    A tool whose module fails to import maps to the exception, so one broken plugin never hides
    the others.
    """
    found: dict[str, type[Tool] | Exception] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found[entry.name] = entry.load()
        except Exception as error:  # report, don't crash the listing
            found[entry.name] = error
    return dict(sorted(found.items()))


def get_tool_class(name_or_path: str) -> type[Tool]:
    """A tool by registered name (``search``) or import path (``my_pkg.tools:Calculator``)."""
    if ":" in name_or_path:
        module_name, _, attribute = name_or_path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise UnknownToolError(f"cannot import '{module_name}' for tool '{name_or_path}': {error}") from error
        try:
            cls = getattr(module, attribute)
        except AttributeError:
            raise UnknownToolError(f"module '{module_name}' has no attribute '{attribute}'") from None
        if not (isinstance(cls, type) and issubclass(cls, Tool)):
            raise UnknownToolError(f"'{name_or_path}' is not a Tool subclass (use @agentrl.tool for functions)")
        return cls
    tools = registered_tools()
    entry = tools.get(name_or_path)
    if entry is None:
        close = difflib.get_close_matches(name_or_path, list(tools), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UnknownToolError(
            f"unknown tool '{name_or_path}'; {hint}registered tools: {', '.join(tools) or 'none'}; "
            "or give an import path like my_pkg.tools:MyTool"
        )
    if isinstance(entry, Exception):
        raise UnknownToolError(f"tool '{name_or_path}' failed to load: {entry}") from entry
    return entry
