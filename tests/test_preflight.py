"""A user's mistakes are caught before anything loads, as one line that says what to change."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from agentrl.cli import app
from agentrl.config import ConfigError, load_config
from agentrl.preflight import check_run
from tests.helpers.servers import free_port, serve_app

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def quickstart(*overrides: str):
    return load_config(QUICKSTART, list(overrides))


@pytest.mark.parametrize(
    ("override", "key", "suggestion"),
    [
        ("tools.names=[serach]", "tools.names[0]", "'search'"),
        ("tools.options.search.topkk=3", "tools.options.search.topkk", "'topk'"),
        ("tools.options.serach.topk=3", "tools.options.serach", "'search'"),
        ("env.name=serach_qa", "env.name", "'search_qa'"),
        ("env.options.hopz=2", "env.options.hopz", "'hops'"),
        ("recipe=spaer", "recipe", "'spear'"),
        ("recipe=my_pkg.recipes:Nope", "recipe", "my_pkg"),
        ("model.name=smollm2-135m", "model.name", "'smollm2-135m-instruct'"),
        ("model.name=my_pkg.models:Nope", "model.name", "embedded"),
    ],
)
def test_misspelt_names_are_refused_with_the_key_and_the_closest_name(override, key, suggestion):
    with pytest.raises(ConfigError) as caught:
        check_run(quickstart(override), probe_urls=False)
    message = str(caught.value)
    assert message.startswith(f"{key}:"), message
    assert suggestion in message
    assert "\n" not in message


def test_a_model_directory_without_config_json_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        check_run(quickstart(f"model.name={tmp_path}"), probe_urls=False)


def test_the_quickstart_and_a_local_model_directory_pass(tiny_model_dir):
    check_run(quickstart())
    check_run(quickstart(f"model.name={tiny_model_dir}"))


def test_options_of_undeclared_tools_pass_through():
    # a user tool that does not declare option_names takes whatever options it is given
    config = load_config(None, ["tools.names=[tests.helpers.demo_tools:Counter]", "tools.options.counter.anything=1",
                                "env.name=tests.helpers.ping_env:PingEnv", "env.options.whatever=1"])
    check_run(config, probe_urls=False)


def test_an_engine_url_that_does_not_answer_is_refused_and_one_that_answers_passes():
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ConfigError, match=r"rollout.engine_url: nothing answers at .*/v1/models"):
        check_run(quickstart("rollout.engine=openai", f"rollout.engine_url={dead}"))
    with pytest.raises(ConfigError, match="rollout.engine=openai needs the server's URL"):
        check_run(quickstart("rollout.engine=openai"))
    server = FastAPI()

    @server.get("/v1/models")
    def models():
        return {"data": []}

    with serve_app(server, health="/v1/models") as url:
        check_run(quickstart("rollout.engine=openai", f"rollout.engine_url={url}/v1"))


def test_a_tool_server_that_does_not_answer_is_refused():
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match="tools.server_url: nothing answers"):
        check_run(quickstart(f"tools.server_url={dead}"))
    with pytest.raises(ConfigError, match="tools.options.search.server_url: nothing answers"):
        check_run(quickstart(f"tools.options.search.server_url={dead}"))


@pytest.mark.parametrize("command", ["train", "eval", "sft"])
def test_cli_commands_print_one_line_and_exit_2(command, tmp_path):
    result = CliRunner().invoke(app, [command, QUICKSTART, "tools.names=[serach]", f"output_dir={tmp_path}"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "did you mean 'search'?" in lines[0]
    assert not (tmp_path / "config.yaml").exists()  # nothing ran


def test_agentrl_train_with_a_misspelt_tool_ends_without_a_traceback(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "agentrl.cli", "train", QUICKSTART, "tools.names=[serach]", f"output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines() == [
        "config error: tools.names[0]: unknown tool 'serach'; did you mean 'search'? registered tools: "
        "image, python, search, sql; or give an import path like my_pkg.tools:MyTool"
    ]


def test_built_in_tools_and_envs_declare_every_option_they_read():
    """A declared option list that misses an option the code reads would refuse a valid config."""
    import inspect
    import re

    from agentrl.envs import BUILTIN_ENVS, get_env_class

    from agentrl.tool import registered_tools

    classes = [cls for cls in registered_tools().values() if isinstance(cls, type)]
    classes += [get_env_class(name) for name in BUILTIN_ENVS]
    pattern = re.compile(r"""options(?:\.get\(|\[)\s*["']([a-z_]+)["']|["']([a-z_]+)["'] in self\.options""")
    for cls in classes:
        source = inspect.getsource(inspect.getmodule(cls))
        read = {a or b for a, b in pattern.findall(source)}
        assert cls.option_names is not None, f"{cls.__name__} declares no option_names"
        assert read <= set(cls.option_names), f"{cls.__name__} reads undeclared options {read - set(cls.option_names)}"
