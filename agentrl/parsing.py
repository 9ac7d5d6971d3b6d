"""Action parsing: turn one assistant turn's text into tool calls, a final answer, or format errors.

Two formats:
- ``xml``: ``<search>query</search>``, ``<python>code</python>``, ... (a tag-to-tool map from the env
  or config); the text between the tags fills the tool's first parameter.
- ``json``: hermes/Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Both accept ``<answer>...</answer>`` and several calls per turn. Anything inside ``<think>`` is
reasoning and never executed. Parsing never raises: malformed output becomes a :class:`FormatError`
whose message tells the model what to write instead.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema

THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


@dataclass
class ToolCall:
    tool: str
    arguments: dict[str, Any]
    raw: str = ""
    index: int = 0


@dataclass
class FormatError:
    message: str
    raw: str = ""


@dataclass
class ParseResult:
    calls: list[ToolCall] = field(default_factory=list)
    answer: str | None = None
    errors: list[FormatError] = field(default_factory=list)
    in_think: bool = False  # the text ends inside an unclosed <think> block


def inside_think(text: str) -> bool:
    """Whether ``text`` ends inside a ``<think>`` block that is not closed yet."""
    return text.rfind("<think>") > text.rfind("</think>")


class ActionParser:
    """Parses assistant text in one action format. ``tool_schemas`` maps a tool name to its OpenAI
    schema (``Tool.schema()``) and is used to check names and argument types."""

    def __init__(
        self,
        format: Literal["xml", "json"] = "xml",
        tags: dict[str, str] | None = None,
        answer_tag: str | None = "answer",
        tool_schemas: dict[str, dict[str, Any]] | None = None,
        max_argument_chars: int = 16_000,
    ) -> None:
        if format not in ("xml", "json"):
            raise ValueError(f"action format must be 'xml' or 'json', not {format!r}")
        self.format = format
        self.tool_schemas = dict(tool_schemas or {})
        self.tags = dict(tags) if tags is not None else ({name: name for name in self.tool_schemas} if format == "xml" else {})
        self.answer_tag = answer_tag
        self.max_argument_chars = max_argument_chars
        unknown = [tool for tool in self.tags.values() if self.tool_schemas and tool not in self.tool_schemas]
        if unknown:
            raise ValueError(f"tags map to unknown tools {unknown}; known tools: {sorted(self.tool_schemas)}")

    @property
    def stop_strings(self) -> list[str]:
        """Closing tags after which the engine should stop and hand control to the tools."""
        closing = [f"</{tag}>" for tag in self.tags] if self.format == "xml" else ["</tool_call>"]
        if self.answer_tag:
            closing.append(f"</{self.answer_tag}>")
        return closing

    def parse(self, text: str) -> ParseResult:
        try:
            result = self._parse(text)
        except Exception as error:  # parsing must never take a rollout down
            result = ParseResult(errors=[FormatError(f"could not parse the turn: {error}", text[-200:])])
        result.in_think = inside_think(text)
        return result

    # -- internals -------------------------------------------------------------------------

    def _parse(self, text: str) -> ParseResult:
        visible = THINK_BLOCK.sub("", text)
        result = ParseResult()
        tags = list(self.tags) if self.format == "xml" else ["tool_call"]
        names = tags + ([self.answer_tag] if self.answer_tag else [])
        pattern = re.compile(r"<({})>(.*?)</\1>".format("|".join(map(re.escape, names))), re.DOTALL)
        consumed = []
        for match in pattern.finditer(visible):
            tag, body = match.group(1), match.group(2)
            consumed.append(match.span())
            if tag == self.answer_tag:
                if result.answer is None:
                    result.answer = body.strip()
                continue
            call_or_error = self._xml_call(tag, body, match.group(0)) if self.format == "xml" else self._json_call(body, match.group(0))
            if isinstance(call_or_error, FormatError):
                result.errors.append(call_or_error)
            else:
                call_or_error.index = len(result.calls)
                result.calls.append(call_or_error)
        rest = _remove_spans(visible, consumed)
        result.errors.extend(self._unclosed(rest, names))
        result.errors.extend(self._misspelt_tags(rest, names))
        return result

    def _xml_call(self, tag: str, body: str, raw: str) -> ToolCall | FormatError:
        tool = self.tags[tag]
        content = body.strip()
        if not content:
            return FormatError(f"<{tag}></{tag}> is empty: put the {tool} input between the tags.", raw)
        if len(content) > self.max_argument_chars:
            return FormatError(
                f"the <{tag}> input has {len(content)} characters; the limit is {self.max_argument_chars}.", raw[:200]
            )
        schema = self.tool_schemas.get(tool)
        properties = list((schema or {}).get("function", {}).get("parameters", {}).get("properties", {}))
        parameter = properties[0] if properties else "input"
        return ToolCall(tool, {parameter: content}, raw)

    def _json_call(self, body: str, raw: str) -> ToolCall | FormatError:
        example = '<tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>'
        if len(body) > self.max_argument_chars:
            return FormatError(f"the tool call has {len(body)} characters; the limit is {self.max_argument_chars}.", raw[:200])
        try:
            payload = json.loads(body)
        except json.JSONDecodeError as error:
            return FormatError(f"the tool call is not valid JSON ({error.msg} at character {error.pos}); write {example}.", raw)
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            return FormatError(f"a tool call needs a string \"name\"; write {example}.", raw)
        name = payload["name"]
        arguments = payload.get("arguments", payload.get("parameters", {}))
        if isinstance(arguments, str):  # some models encode the arguments object as a string
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                return FormatError(f"the arguments of '{name}' are not a JSON object.", raw)
        if not isinstance(arguments, dict):
            return FormatError(f"the arguments of '{name}' must be a JSON object, not {type(arguments).__name__}.", raw)
        if self.tool_schemas and name not in self.tool_schemas:
            close = difflib.get_close_matches(name, list(self.tool_schemas), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            return FormatError(f"unknown tool '{name}'.{hint} Available tools: {', '.join(sorted(self.tool_schemas))}.", raw)
        schema = self.tool_schemas.get(name)
        if schema is not None:
            problem = _schema_problem(schema["function"].get("parameters", {}), arguments)
            if problem:
                return FormatError(f"invalid arguments for '{name}': {problem}", raw)
        return ToolCall(name, arguments, raw)

    def _unclosed(self, rest: str, names: list[str]) -> list[FormatError]:
        errors = []
        for name in names:
            position = rest.find(f"<{name}>")
            if position >= 0:
                errors.append(FormatError(f"<{name}> is never closed: end it with </{name}>.", rest[position : position + 200]))
        return errors

    def _misspelt_tags(self, rest: str, names: list[str]) -> list[FormatError]:
        errors = []
        for match in re.finditer(r"<([A-Za-z_][\w-]*)>.*?</\1>", rest, re.DOTALL):
            tag = match.group(1)
            if tag in names or tag == "think":
                continue
            close = difflib.get_close_matches(tag, names, n=1, cutoff=0.75)
            if close:
                errors.append(FormatError(f"unknown tag <{tag}>; did you mean <{close[0]}>?", match.group(0)[:200]))
        return errors


def _schema_problem(parameters: dict[str, Any], arguments: dict[str, Any]) -> str | None:
    try:
        jsonschema.validate(arguments, parameters)
    except jsonschema.ValidationError as error:
        where = ".".join(str(p) for p in error.absolute_path)
        return f"parameter '{where}': {error.message}" if where else error.message
    except jsonschema.SchemaError:
        return None
    return None


def _remove_spans(text: str, spans: list[tuple[int, int]]) -> str:
    pieces, position = [], 0
    for start, end in spans:
        pieces.append(text[position:start])
        position = end
    pieces.append(text[position:])
    return " ".join(pieces)
