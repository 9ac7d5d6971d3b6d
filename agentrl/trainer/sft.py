"""SFT cold start on demonstration chats, with the same token layout and masks as rollouts.

A demonstration is a JSONL row ``{"messages": [...]}`` with roles system/user/assistant/tool. It
becomes a :class:`~agentrl.trajectory.Trajectory` exactly as a rollout of the same conversation
would: the prompt rendered by the chat template with a generation prompt; each assistant message
tokenised on its own (loss mask 1); tool output wrapped by the env's observation template (xml
actions) or rendered by the chat template message by message (json tool calls), loss mask 0. Only
assistant tokens are trained.

:func:`generate_demonstrations` writes such chats for the built-in demo envs by running a scripted
policy against the real tools (search QA: search the entity, answer from what comes back; math with
code: print the expression, answer with the output).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from agentrl.trainer.batching import collate, forward_response, model_device
from agentrl.trainer.optim import clip_and_step
from agentrl.trajectory import Trajectory

Messages = list[dict[str, Any]]


# -- chats to trajectories -----------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def chat_to_trajectory(messages: Messages, tokenizer, env, tools: list[dict] | None = None,
                       max_turns: int | None = None, trajectory_id: str = "demo") -> Trajectory:
    """Token ids and masks of a demonstration chat, laid out as a rollout lays them out."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None:
        raise ValueError(f"demonstration {trajectory_id} has no assistant message")
    prompt = tokenizer.apply_chat_template(messages[:first], tools=tools if env.action_format == "json" else None,
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    trajectory = Trajectory(id=trajectory_id, group_id=trajectory_id, prompt_ids=list(prompt))
    if env.action_format == "xml":
        _append_xml(trajectory, messages[first:], tokenizer, env, max_turns)
    else:
        _append_json(trajectory, messages, first, tokenizer, tools)
    trajectory.validate()
    return trajectory


def _append_xml(trajectory: Trajectory, messages: Messages, tokenizer, env, max_turns: int | None) -> None:
    turn, pending_tool_output = 0, []

    def flush() -> None:
        if pending_tool_output:
            text = env.observation_template.format(observation="\n".join(pending_tool_output))
            if max_turns is not None and turn + 1 == max_turns - 1:
                text += env.final_turn_message  # the rollout warns before the last turn
            trajectory.append_observation_tokens(_encode(tokenizer, text), turn)
            pending_tool_output.clear()

    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            if index:
                flush()
                turn += 1
            ids = _encode(tokenizer, message["content"])
            trajectory.append_model_tokens(ids, [0.0] * len(ids), turn, 0)
        elif message["role"] == "tool":
            pending_tool_output.append(str(message["content"]))
        else:
            trajectory.append_observation_tokens(_encode(tokenizer, str(message["content"])), turn, role="template")
    flush()


def _append_json(trajectory: Trajectory, messages: Messages, first: int, tokenizer, tools) -> None:
    """Render the conversation prefix by prefix; each increment is one message's tokens.

    An assistant increment is split as a rollout samples it: a tool-calling turn stops at the
    call's closing tag, so its content is trained and the template's end (``<|im_end|>\n``) is
    template glue; a final answer ends with a sampled EOS, so the EOS is trained and only what
    follows it (``\n``) is glue."""
    from agentrl.assembly import TokenAssembler

    assistant_end = TokenAssembler(tokenizer, None).assistant_end()
    eos_text = tokenizer.eos_token or ""
    rendered = tokenizer.apply_chat_template(messages[:first], tools=tools, add_generation_prompt=True, tokenize=False)
    turn = 0
    for index in range(first, len(messages)):
        message = messages[index]
        following = messages[index + 1]["role"] if index + 1 < len(messages) else None
        full = tokenizer.apply_chat_template(messages[: index + 1], tools=tools, tokenize=False,
                                             add_generation_prompt=following == "assistant")
        if not full.startswith(rendered):
            raise ValueError("the chat template does not render conversations incrementally")
        text = full[len(rendered):]
        increment = _encode(tokenizer, text)
        if message["role"] == "assistant":
            if index > first:
                turn += 1
            sampled, glue = text, ""
            if assistant_end and text.endswith(assistant_end):
                sampled, glue = text[: -len(assistant_end)], assistant_end
                if following != "tool" and eos_text and glue.startswith(eos_text):
                    sampled, glue = sampled + eos_text, glue[len(eos_text):]
            ids = _encode(tokenizer, sampled)
            trajectory.append_model_tokens(ids, [0.0] * len(ids), turn, 0)
            if glue:
                trajectory.append_observation_tokens(_encode(tokenizer, glue), turn, role="template")
        else:
            trajectory.append_observation_tokens(increment, turn)
        rendered = full


def load_demonstrations(path: str | Path) -> list[Messages]:
    chats = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                row = json.loads(line)
                if "messages" not in row:
                    raise ValueError(f"{path}:{number}: a demonstration needs a 'messages' list")
                chats.append(row["messages"])
    return chats


# -- demonstrations for the demo envs ------------------------------------------------------------


def _search_qa_actions(row: dict[str, Any]) -> list[str]:
    if "entity" not in row:
        raise ValueError("search QA demonstrations need rows with an 'entity' field (the bundled data has it); "
                         "for other data give sft.data")
    return [f"<search> {row['entity']} </search>", None]


def _math_code_actions(row: dict[str, Any]) -> list[str]:
    question = row["question"]
    if match := re.search(r"remainder of (\d+) divided by (\d+)", question):
        code = f"print({match.group(1)} % {match.group(2)})"
    elif match := re.search(r"What is ([\d\s+\-*/()]+)\?", question):
        code = f"print({match.group(1).strip()})"
    elif numbers := re.findall(r"\d+", question):
        code = "print(" + " * ".join(numbers) + ")"
    else:
        raise ValueError(f"no demonstration for the problem {question!r}")
    return [f"<python>\n{code}\n</python>", None]


DEMONSTRATION_POLICIES: dict[str, Callable[[dict[str, Any]], list[str | None]]] = {
    "search_qa": _search_qa_actions,
    "math_code": _math_code_actions,
}


def _answer_text(row: dict[str, Any], task) -> str:
    answer = task.answer[0] if isinstance(task.answer, list) else task.answer
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    return f"<answer> {answer} </answer>"


async def _demonstrate(row, index, env, executor, tokenizer, tools_config) -> Messages:
    from agentrl.executor import truncate_observation
    from agentrl.tool import ToolContext

    task = env.make_task(row, index)
    parser = executor.parser(env.action_format, dict(env.tags), env.answer_tag)
    messages = list(task.messages)
    async with executor.session(f"demo-{index}", ToolContext(f"demo-{index}", dict(task.metadata), list(task.images))) as session:
        for action in DEMONSTRATION_POLICIES[env.name](row):
            if action is None:  # the answer, once the tools have been used
                messages.append({"role": "assistant", "content": _answer_text(row, task)})
                break
            messages.append({"role": "assistant", "content": action})
            for result in await session.run(parser.parse(action).calls):
                text = truncate_observation(result.observation.text, tokenizer, tools_config.max_observation_tokens,
                                            tools_config.observation_truncation)
                messages.append({"role": "tool", "content": text})
    return messages


def generate_demonstrations(env, executor, tokenizer, rows: list[dict[str, Any]], tools_config,
                            path: str | Path | None = None, loop=None) -> list[Messages]:
    """Scripted demonstrations for a built-in demo env, using the real tools; written to ``path``."""
    import asyncio

    if env.name not in DEMONSTRATION_POLICIES:
        raise ValueError(f"no demonstration generator for env '{env.name}' (have: {', '.join(DEMONSTRATION_POLICIES)}); "
                         "give sft.data, a JSONL file of {\"messages\": [...]} chats")

    async def all_rows():
        return await asyncio.gather(*(_demonstrate(row, i, env, executor, tokenizer, tools_config) for i, row in enumerate(rows)))

    chats = (loop.run_until_complete(all_rows()) if loop is not None else asyncio.run(all_rows()))
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as handle:
            for chat in chats:
                handle.write(json.dumps({"messages": chat}, ensure_ascii=False) + "\n")
    return list(chats)


# -- training ------------------------------------------------------------------------------------


def sft_train(model, tokenizer, trajectories: list[Trajectory], epochs: int = 1, lr: float = 1e-5,
              batch_size: int = 8, micro_batch_size: int = 4, max_grad_norm: float = 1.0, seed: int = 0,
              precision: str = "fp32", log: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
    """Negative log-likelihood of the assistant tokens, averaged over all assistant tokens of each
    batch (micro-batches accumulate to the same gradient as the whole batch). Runs on the model's
    device (``trainer.device``): the batch moves there once, the optimizer state is made there, and
    ``precision="bf16"`` autocasts on it over the fp32 master weights."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    batch = collate(trajectories, tokenizer.pad_token_id).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    model.train()
    started, losses = time.perf_counter(), []
    for _ in range(epochs):
        order = torch.randperm(batch.size, generator=generator)
        for start in range(0, batch.size, batch_size):
            rows = order[start : start + batch_size]
            tokens = float(batch.loss_mask[rows].sum())
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(0, len(rows), micro_batch_size):
                sub = batch.select(rows[micro : micro + micro_batch_size])
                with autocast:
                    logprobs = forward_response(model, sub).logprobs
                loss = -(logprobs * sub.loss_mask).sum() / max(tokens, 1.0)
                loss.backward()
                total += float(loss.detach())
            clip_and_step(optimizer, parameters, max_grad_norm)  # a non-finite gradient skips the step
            losses.append(total)
            if log is not None:
                log({"sft/loss": total})
    model.eval()
    return {"sft/loss_first": losses[0], "sft/loss_last": losses[-1], "sft/updates": float(len(losses)),
            "sft/examples": float(batch.size), "sft/time_s": time.perf_counter() - started}


def demonstration_trajectories(run) -> list[Trajectory]:
    """The run's demonstrations: ``sft.data`` if given, else generated (and saved) for the demo env."""
    config = run.config
    if config.sft.data:
        chats = load_demonstrations(config.sft.data)[: config.sft.num_demonstrations or None]
    else:
        # the scripted policy searches the row's entity; for a multi-hop question that is the bridge
        # entity the question does not name, so only one-hop rows are demonstrated
        rows = [row for row in run.train_rows if row.get("hops", 1) == 1][: config.sft.num_demonstrations]
        chats = generate_demonstrations(run.env, run.executor, run.tokenizer, rows, config.tools,
                                        Path(config.output_dir) / "demonstrations.jsonl", loop=run.loop)
    schemas = run.executor.schemas if run.env.action_format == "json" else None
    return [chat_to_trajectory(chat, run.tokenizer, run.env, schemas, config.rollout.max_turns, f"demo-{i}")
            for i, chat in enumerate(chats)]


def sft_warm_start(run) -> dict[str, float]:
    """Supervised warm start of ``run.model`` on the run's demonstrations (``sft`` config section)."""
    config = run.config
    trajectories = demonstration_trajectories(run)
    if not trajectories:
        raise ValueError("no demonstrations: set sft.num_demonstrations > 0 or give sft.data")
    return sft_train(run.model, run.tokenizer, trajectories, config.sft.epochs, config.sft.lr, config.sft.batch_size,
                     config.trainer.micro_batch_size, config.trainer.max_grad_norm, config.trainer.seed,
                     config.trainer.precision)
