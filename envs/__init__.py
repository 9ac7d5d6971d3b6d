"""Tasks: datasets, prompts and rewards. Built-ins by name, any other env by import path."""

from __future__ import annotations

BUILTIN_ENVS = {
    "search_qa": "agentrl.envs.search_qa:SearchQAEnv",
    "math_code": "agentrl.envs.math_code:MathCodeEnv",
    "text2sql": "agentrl.envs.text2sql:Text2SQLEnv",
    "visual": "agentrl.envs.visual:VisualEnv",
    "self_play_proposer": "agentrl.envs.self_play_data:SelfPlayProposerEnv",
}


def get_env_class(name_or_path: str):
    """An env class by built-in name (``search_qa``) or import path (``my_pkg.envs:MyEnv``)."""
    from agentrl.envs.base import Env

    from agentrl.registry import load_class

    return load_class(name_or_path, BUILTIN_ENVS, Env, "env", "my_pkg.envs:MyEnv")
