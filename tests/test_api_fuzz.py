"""Property-based fuzzing of every server's HTTP API with schemathesis, over 127.0.0.1 only:
whatever a client sends, the answer is never a 5xx and always matches the documented schema.

Examples are bounded so that the file stays well under a minute on a loaded machine."""

import sqlite3

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from agentrl.retrieval.index import Index
from agentrl.retrieval.server import create_app as create_retriever
from agentrl.server import create_app as create_tool_server
from tests.helpers.servers import serve_app

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def tool_server_schema(tmp_path_factory):
    root = tmp_path_factory.mktemp("databases")
    connection = sqlite3.connect(root / "shop.sqlite")
    connection.executescript("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1), (2);")
    connection.close()
    tools = ["tests.helpers.demo_tools:Counter", "tests.helpers.demo_tools:NoOp", "sql", "image"]
    app = create_tool_server(tools, {"sql": {"database_roots": [str(root)]}}, max_sessions=64)
    with serve_app(app) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


@pytest.fixture(scope="module")
def retriever_schema():
    index = Index.from_documents([{"id": "1", "contents": "Volcano\nlava from a mountain"},
                                  {"id": "2", "contents": "Chess\na board game"}])
    with serve_app(create_retriever(index, max_queries=16, max_query_chars=200)) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


@pytest.fixture(scope="module")
def sandbox_schema():
    from agentrl.sandbox.base import SandboxUnavailable, get_backend
    from agentrl.sandbox.server import create_app as create_sandbox

    try:
        backend = get_backend("bwrap", pool_size=1)
    except SandboxUnavailable as error:
        pytest.skip(f"bubblewrap sandbox unavailable: {error}")
    with serve_app(create_sandbox(backend, workers=1, queue=4, memory_budget_mb=2048)) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def fuzz(schema, examples: int, prepare=None) -> None:
    """Every operation, with valid and with invalid generated requests."""
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(FUZZ, max_examples=examples)
            def check(case):
                if prepare is not None:
                    prepare(case)
                case.call_and_validate(checks=CHECKS, timeout=30)

            try:
                check()
            except Unsatisfiable:  # nothing to make invalid (a GET without parameters)
                assert mode is GenerationMode.NEGATIVE, operation.label


def test_tool_server_api(tool_server_schema):
    fuzz(tool_server_schema, 25)


def test_retriever_api(retriever_schema):
    fuzz(retriever_schema, 25)


def bounded_run(case) -> None:
    """Generated programs may loop: each gets a second at most (memory is capped by the server)."""
    if isinstance(case.body, dict) and "run_timeout" in case.body:
        case.body["run_timeout"] = 1.0


def test_sandbox_server_api(sandbox_schema):
    fuzz(sandbox_schema, 10, bounded_run)
