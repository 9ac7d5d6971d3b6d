"""The ``agentrl`` command line."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.syntax import Syntax

from agentrl import __version__
from agentrl.config import ConfigError, dump_config, load_config

app = typer.Typer(
    name="agentrl",
    help="Reinforcement learning for multi-turn, tool-using LLM agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Command groups; each is added to `app` at the bottom only once it has commands.
serve_app = typer.Typer(help="Run a service: tools, sandbox or retriever.", no_args_is_help=True)
tools_app = typer.Typer(help="List registered tools or call one.", no_args_is_help=True)
index_app = typer.Typer(help="Build and inspect retrieval indexes.", no_args_is_help=True)

console = Console()
error_console = Console(stderr=True)

ConfigArg = Annotated[Optional[str], typer.Argument(help="YAML run config (omit for all defaults)")]
OverridesArg = Annotated[
    Optional[list[str]], typer.Argument(help="dotted overrides, e.g. trainer.lr=1e-6 rollout.max_turns=4")
]


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"agentrl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Reinforcement learning for multi-turn, tool-using LLM agents."""


def resolve_config(config: str | None, overrides: list[str] | None):
    """Load a config for a command, turning a ConfigError into a clear message and exit code 2."""
    # Allow `agentrl cmd key=value` without a config file.
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides = [config, *(overrides or [])]
        config = None
    try:
        return load_config(config, overrides or [])
    except ConfigError as error:
        error_console.print(f"[bold red]config error:[/] {error}")
        raise typer.Exit(2) from None


@app.command("config")
def config_command(config: ConfigArg = None, overrides: OverridesArg = None) -> None:
    """Validate a config and print the resolved result."""
    resolved = resolve_config(config, overrides)
    console.print(Syntax(dump_config(resolved), "yaml", theme="ansi_dark", background_color="default"))


# -- command groups are registered last, once every command above has been defined ----------------

for _group, _name in ((serve_app, "serve"), (tools_app, "tools"), (index_app, "index")):
    if _group.registered_commands:
        app.add_typer(_group, name=_name)

if __name__ == "__main__":
    app()
