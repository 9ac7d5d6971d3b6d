"""Shared fixtures: the real SmolLM2 tokenizer and a tiny randomly initialised model of its family."""

import pytest

from agentrl.models import load_tokenizer
from agentrl.models import tiny_model as make_tiny_model


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer).eval()
