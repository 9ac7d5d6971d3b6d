"""Secrets (tokens, API keys, passwords) in a run's config never reach its config.yaml, its metrics
files or a tracker."""

import json

import yaml

from agentrl.config import RunConfig, build_config, dump_config, redact_secrets
from agentrl.tracking import Tracker

SECRET = "sk-live-5f3c9a1e"


def secret_config() -> RunConfig:
    return build_config({
        "tools": {"names": ["search"], "server_url": "http://127.0.0.1:8010", "server_token": SECRET,
                  "options": {"search": {"token": SECRET, "topk": 3},
                              "python": {"env": {"HF_TOKEN": SECRET, "OPENAI_API_KEY": SECRET, "PATH": "/usr/bin"}},
                              "custom": {"db_password": SECRET, "apiKey": SECRET, "client_secret": SECRET}}},
    }, [])


def test_dumped_config_holds_no_secret_but_keeps_everything_else():
    config = secret_config()
    text = dump_config(config)
    assert SECRET not in text
    dumped = yaml.safe_load(text)
    assert dumped["tools"]["server_token"] == "<redacted>"
    assert dumped["tools"]["options"]["search"] == {"token": "<redacted>", "topk": 3}
    assert dumped["tools"]["options"]["python"]["env"]["PATH"] == "/usr/bin"
    assert dumped["rollout"]["max_new_tokens"] == config.rollout.max_new_tokens  # not a secret
    assert dumped["model"] == config.model_dump(mode="json")["model"]  # e.g. a tokenizer name stays
    assert config.tools.server_token == SECRET  # the running config keeps it


def test_redaction_leaves_empty_values_and_non_strings_alone():
    assert redact_secrets({"token": None, "max_tokens": 5, "key": "", "nested": [{"password": "p"}]}) == {
        "token": None, "max_tokens": 5, "key": "", "nested": [{"password": "<redacted>"}]}


def test_secrets_reach_neither_the_run_directory_nor_a_tracker(tmp_path):
    config = secret_config()
    config.tracking.backends = []
    tracker = Tracker(config.tracking, tmp_path, 1, config.model_dump(mode="json"))
    assert SECRET not in json.dumps(tracker.run_config)
    tracker.log(1, {"reward_mean": 0.5})
    tracker.finish()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
