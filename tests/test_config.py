"""The run config: YAML plus dotted overrides, validated with errors that say what to change."""

import pytest
from typer.testing import CliRunner

from agentrl.cli import app
from agentrl.config import ConfigError, RunConfig, build_config, load_config, parse_override


def test_defaults_validate():
    config = build_config({})
    assert isinstance(config, RunConfig)
    assert config.rollout.max_turns > 0


def test_yaml_and_dotted_overrides_merge(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  lr: 3.0e-5\n  steps: 7\nrollout:\n  max_turns: 2\n")
    config = load_config(path, ["trainer.lr=1e-6", "rollout.max_turns=4", "env.options.split=dev"])
    assert config.trainer.lr == pytest.approx(1e-6)
    assert config.trainer.steps == 7  # untouched keys keep the file's value
    assert config.rollout.max_turns == 4
    assert config.env.options == {"split": "dev"}


@pytest.mark.parametrize(
    "text, path, value",
    [
        ("trainer.lr=1e-6", ["trainer", "lr"], 1e-6),
        ("rollout.max_turns=4", ["rollout", "max_turns"], 4),
        ("tools.names=[python, search]", ["tools", "names"], ["python", "search"]),
        ("model.name=./my model", ["model", "name"], "./my model"),
        ("resume=true", ["resume"], True),
    ],
)
def test_override_values_are_parsed(text, path, value):
    assert parse_override(text) == (path, value)


def test_misspelt_key_names_the_key_and_suggests_the_closest():
    with pytest.raises(ConfigError) as error:
        build_config({}, ["rollout.max_turn=3"])
    message = str(error.value)
    assert "rollout.max_turn" in message and "did you mean 'rollout.max_turns'" in message


def test_misspelt_section_is_reported():
    with pytest.raises(ConfigError, match="did you mean 'trainer'"):
        build_config({"trainr": {"lr": 1e-5}})


def test_wrong_type_names_key_value_and_expected_type():
    with pytest.raises(ConfigError) as error:
        build_config({}, ["rollout.max_turns=four"])
    message = str(error.value)
    assert "rollout.max_turns" in message and "'four'" in message and "integer" in message


def test_out_of_range_value_is_rejected():
    with pytest.raises(ConfigError, match="trainer.lr"):
        build_config({}, ["trainer.lr=-1"])


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key.subkey=value"):
        build_config({}, ["trainer.lr"])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_command_prints_resolved_config_and_rejects_typos(tmp_path):
    runner = CliRunner()
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  steps: 3\n")
    result = runner.invoke(app, ["config", str(path), "trainer.lr=2e-6"])
    assert result.exit_code == 0, result.output
    assert "steps: 3" in result.output and "lr: 2.0e-06" in result.output
    result = runner.invoke(app, ["config", str(path), "trainer.lrr=2e-6"])
    assert result.exit_code == 2
    assert "trainer.lr" in result.output


def test_version_and_help():
    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).output.startswith("agentrl ")
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "config" in result.output


def test_overrides_do_not_write_into_the_callers_dict():
    data = {"trainer": {"lr": 1e-5}, "rollout": {"group_size": 4}}
    config = build_config(data, ["trainer.lr=2e-5", "rollout.group_size=8"])
    assert config.trainer.lr == 2e-5 and config.rollout.group_size == 8
    assert data == {"trainer": {"lr": 1e-5}, "rollout": {"group_size": 4}}


@pytest.mark.parametrize("engine", ["hf", "openai"])
def test_a_serving_dtype_other_than_the_models_needs_the_vllm_engine(engine):
    with pytest.raises(ConfigError, match=f"rollout.dtype=bfloat16: rollout.engine={engine}"):
        build_config({}, [f"rollout.engine={engine}", "model.dtype=float32", "rollout.dtype=bfloat16"])
    assert build_config({}, [f"rollout.engine={engine}", "model.dtype=float32", "rollout.dtype=float32"]).rollout_dtype == "float32"


def test_the_vllm_engine_serves_rollout_dtype_or_else_the_models():
    served = build_config({}, ["rollout.engine=vllm", "model.dtype=float32", "rollout.dtype=bfloat16"])
    assert (served.model.dtype, served.rollout_dtype) == ("float32", "bfloat16")
    assert build_config({}, ["rollout.engine=vllm", "model.dtype=float32"]).rollout_dtype == "float32"
