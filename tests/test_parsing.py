"""Action parsing: calls, answers and format errors the model can learn from; never an exception."""

from hypothesis import given, settings
from hypothesis import strategies as st

from agentrl.parsing import ActionParser, FormatError, ParseResult
from agentrl.tool import Tool


class Search(Tool):
    """Search the corpus."""

    def call(self, query: str, topk: int = 3) -> str:
        return query


class Python(Tool):
    """Run code."""

    def call(self, code: str) -> str:
        return code


SCHEMAS = {"search": Search.schema(), "python": Python.schema()}


def xml_parser():
    return ActionParser("xml", {"search": "search", "python": "python"}, "answer", SCHEMAS)


def json_parser():
    return ActionParser("json", tool_schemas=SCHEMAS)


def test_xml_call_fills_the_first_parameter():
    result = xml_parser().parse("I should look it up. <search> capital of Zubria </search>")
    assert [(c.tool, c.arguments) for c in result.calls] == [("search", {"query": "capital of Zubria"})]
    assert result.answer is None and result.errors == []


def test_several_calls_in_order():
    result = xml_parser().parse("<search>a</search> then <python>print(1)</python> and <search>b</search>")
    assert [(c.tool, c.index) for c in result.calls] == [("search", 0), ("python", 1), ("search", 2)]


def test_answer_is_extracted():
    assert xml_parser().parse("so <answer> Velmor </answer>").answer == "Velmor"


def test_calls_inside_think_are_not_executed():
    result = xml_parser().parse("<think>maybe <search>x</search></think><answer>y</answer>")
    assert result.calls == [] and result.answer == "y"
    assert xml_parser().parse("<think>still thinking <search>x</search>").calls == []


def test_unclosed_tag_is_a_format_error():
    result = xml_parser().parse("<search>capital of Zubria")
    assert result.calls == [] and "never closed" in result.errors[0].message and "</search>" in result.errors[0].message


def test_misspelt_tag_suggests_the_right_one():
    result = xml_parser().parse("<serach>x</serach>")
    assert "did you mean <search>" in result.errors[0].message


def test_empty_and_oversized_arguments_are_format_errors():
    parser = ActionParser("xml", {"search": "search"}, tool_schemas=SCHEMAS, max_argument_chars=10)
    assert "empty" in parser.parse("<search>  </search>").errors[0].message
    assert "limit is 10" in parser.parse("<search>" + "x" * 11 + "</search>").errors[0].message


def test_stop_strings_are_the_closing_tags():
    assert xml_parser().stop_strings == ["</search>", "</python>", "</answer>"]
    assert json_parser().stop_strings == ["</tool_call>", "</answer>"]


def test_json_calls():
    text = ('<tool_call>{"name": "search", "arguments": {"query": "q", "topk": 2}}</tool_call>\n'
            '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"1+1\\"}"}</tool_call>')
    result = json_parser().parse(text)
    assert [(c.tool, c.arguments) for c in result.calls] == [("search", {"query": "q", "topk": 2}), ("python", {"code": "1+1"})]


def test_invalid_json_says_where():
    result = json_parser().parse('<tool_call>{"name": "search", "arguments": {"query": }</tool_call>')
    assert "not valid JSON" in result.errors[0].message and "at character" in result.errors[0].message


def test_unknown_tool_suggests_the_closest():
    result = json_parser().parse('<tool_call>{"name": "serch", "arguments": {"query": "q"}}</tool_call>')
    assert "unknown tool 'serch'" in result.errors[0].message and "Did you mean 'search'" in result.errors[0].message


def test_wrong_argument_type_names_the_parameter():
    result = json_parser().parse('<tool_call>{"name": "search", "arguments": {"query": "q", "topk": "three"}}</tool_call>')
    assert "parameter 'topk'" in result.errors[0].message


def test_missing_name_is_explained():
    assert 'needs a string "name"' in json_parser().parse('<tool_call>{"arguments": {}}</tool_call>').errors[0].message


TOKENS = st.sampled_from([
    "<search>", "</search>", "<python>", "</python>", "<answer>", "</answer>", "<think>", "</think>",
    "<tool_call>", "</tool_call>", '{"name": "search", "arguments": {"query": "x"}}', '{"name":', "}", "{",
    "query", " ", "\n", "<serach>", "</serach>", '"', "\\", "\x00", "é", "<", ">", "/",
])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(TOKENS, st.text(max_size=8)), max_size=30))
def test_parser_never_raises_and_always_yields_calls_or_errors(pieces):
    text = "".join(pieces)
    for parser in (xml_parser(), json_parser()):
        result = parser.parse(text)
        assert isinstance(result, ParseResult)
        assert all(isinstance(e, FormatError) and e.message for e in result.errors)
        for call in result.calls:
            assert call.tool in SCHEMAS and isinstance(call.arguments, dict)
