"""Checks of a run config that need no model and no rollout: the mistakes a user makes most often
(a misspelt tool, env, option or model name, an inference or tool server that is not running) are
reported as one line that says what to change, before anything loads.

``check_run(config)`` raises :class:`~agentrl.config.ConfigError`; the CLI prints it and exits 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

from agentrl.config import ConfigError, RunConfig

PROBE_TIMEOUT_S = 5.0


def check_run(config: RunConfig, probe_urls: bool = True) -> None:
    """Raise ConfigError for the first problem found; return None when the run can start."""
    env_cls = check_env(config)
    check_recipe(config)
    tool_classes = check_tools(config, env_cls.tools)
    check_model(config.model.name)
    check_engine(config)
    if probe_urls:
        for key, url, path in endpoints(config, tool_classes):
            probe(key, url, path)


def _unknown(key: str, problem: str, value: str, known: Iterable[str], known_label: str) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{key}: {problem}; {hint}{known_label}: {', '.join(known) or 'none'}"


def check_env(config: RunConfig):
    from agentrl.envs import get_env_class

    try:
        env_cls = get_env_class(config.env.name)
    except LookupError as error:
        raise ConfigError(f"env.name: {error}") from None
    allowed = env_cls.option_names
    if allowed is not None:
        for option in config.env.options:
            if option not in allowed:
                raise ConfigError(_unknown(f"env.options.{option}", f"env '{env_cls.name}' has no option '{option}'",
                                           option, allowed, "its options"))
    return env_cls


def check_recipe(config: RunConfig) -> type:
    from agentrl.recipes import get_recipe_class

    try:
        return get_recipe_class(config.recipe)
    except (LookupError, ImportError) as error:
        raise ConfigError(f"recipe: {error}") from None


def check_tools(config: RunConfig, env_tools: Iterable[str]) -> dict[str, type]:
    """Resolve every tool of the run; refuse options for a tool that is not in it or that it does not read."""
    from agentrl.tool import UnknownToolError, get_tool_class

    names = list(config.tools.names or env_tools)
    classes: dict[str, type] = {}
    for index, name in enumerate(names):
        try:
            cls = get_tool_class(name)
        except UnknownToolError as error:
            key = f"tools.names[{index}]" if config.tools.names else f"the tools of env '{config.env.name}'"
            raise ConfigError(f"{key}: {error}") from None
        classes[cls.name] = cls
    for tool_name, options in config.tools.options.items():
        cls = classes.get(tool_name)
        if cls is None:
            raise ConfigError(_unknown(f"tools.options.{tool_name}", f"'{tool_name}' is not one of this run's tools",
                                       tool_name, classes, "the run's tools (tools.names, else the env's)"))
        allowed = cls.option_names
        if allowed is not None:
            for option in options or {}:
                if option not in allowed:
                    raise ConfigError(_unknown(f"tools.options.{tool_name}.{option}",
                                               f"tool '{tool_name}' has no option '{option}'", option, allowed,
                                               "its options"))
    return classes


def check_model(name: str) -> None:
    from agentrl.models import EMBEDDED, ModelNotFoundError, embedded_gguf_path

    if name in EMBEDDED:
        try:
            embedded_gguf_path(name)
        except ModelNotFoundError as error:
            raise ConfigError(f"model.name: {error}") from None
        return
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return
    if path.exists():
        raise ConfigError(f"model.name: {name!r} has no config.json; point it at a Hugging Face model directory")
    close = difflib.get_close_matches(name, list(EMBEDDED), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"model.name: {name!r} is neither a local model directory nor an embedded model; {hint}"
                      f"embedded: {', '.join(EMBEDDED)}")


def check_engine(config: RunConfig) -> None:
    """rollout.engine=vllm on the local trainer: the environment vLLM's server runs in is there and works."""
    if config.rollout.engine != "vllm" or config.trainer.backend != "local":
        return
    from agentrl.engines.vllm import VLLMUnavailableError, check_vllm_python

    try:
        check_vllm_python()
    except VLLMUnavailableError as error:
        raise ConfigError(str(error)) from None


def endpoints(config: RunConfig, tool_classes: dict[str, type]) -> list[tuple[str, str, str]]:
    """(config key, base URL, path to GET) for every server the run will talk to."""
    found = []
    if config.rollout.engine == "openai":
        if not config.rollout.engine_url:
            raise ConfigError("rollout.engine_url: rollout.engine=openai needs the server's URL, "
                              "e.g. rollout.engine_url=http://127.0.0.1:8000/v1")
        found.append(("rollout.engine_url", config.rollout.engine_url, "/models"))
    if config.tools.server_url:
        found.append(("tools.server_url", config.tools.server_url, "/health"))
    for tool_name in tool_classes:
        url = (config.tools.options.get(tool_name) or {}).get("server_url")
        if url and not config.tools.server_url:
            found.append((f"tools.options.{tool_name}.server_url", url, "/health"))
    return found


def probe(key: str, url: str, path: str) -> None:
    """One GET with a short timeout: any HTTP answer means a server is there; none is an error."""
    import httpx

    target = url.rstrip("/") + path
    try:
        httpx.get(target, timeout=PROBE_TIMEOUT_S)
    except httpx.InvalidURL as error:
        raise ConfigError(f"{key}: {url!r} is not a valid URL ({error})") from None
    except httpx.HTTPError as error:
        reason = type(error).__name__
        raise ConfigError(f"{key}: nothing answers at {target} ({reason}); start that server first or fix the URL") from None
