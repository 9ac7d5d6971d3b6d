"""Tasks: datasets, prompts and rewards. Built-ins by name, any other env by import path."""

from __future__ import annotations

import importlib

BUILTIN_ENVS = {
    "search_qa": "agentrl.envs.search_qa:SearchQAEnv",
    "math_code": "agentrl.envs.math_code:MathCodeEnv",
    "text2sql": "agentrl.envs.text2sql:Text2SQLEnv",
    "visual": "agentrl.envs.visual:VisualEnv",
    "self_play_proposer": "agentrl.envs.self_play_data:SelfPlayProposerEnv",
}


def get_env_class(name_or_path: str):
    """An env class by built-in name (``search_qa``) or import path (``my_pkg.envs:MyEnv``)."""
    import difflib

    from agentrl.envs.base import Env

    path = BUILTIN_ENVS.get(name_or_path, name_or_path)
    if ":" not in path:
        close = difflib.get_close_matches(name_or_path, list(BUILTIN_ENVS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise LookupError(f"unknown env '{name_or_path}'; {hint}built-in envs: {', '.join(BUILTIN_ENVS)}; "
                          "or give an import path like my_pkg.envs:MyEnv")
    module_name, _, attribute = path.partition(":")
    cls = getattr(importlib.import_module(module_name), attribute, None)
    if not (isinstance(cls, type) and issubclass(cls, Env)):
        raise LookupError(f"'{path}' is not an Env subclass")
    return cls
