"""SFT: demonstration chats become exactly the token stream and masks a rollout of the same
conversation produces; generated demonstrations are correct; fine-tuning lowers the loss."""

import asyncio

import torch
from agentrl.envs.math_code import MathCodeEnv
from agentrl.envs.search_qa import SearchQAEnv

from agentrl.config import RolloutConfig, ToolsConfig
from agentrl.executor import ToolExecutor
from agentrl.rollout import RolloutWorker
from agentrl.trainer.sft import chat_to_trajectory, generate_demonstrations, sft_train
from tests.helpers.scripted import ScriptedEngine

ROWS = [
    {"id": "q0", "question": "What was the profession of Laskam Glimbys?", "golden_answers": ["beekeeper"], "entity": "Laskam Glimbys"},
    {"id": "q1", "question": "In which city was Teizos Kindvelor born?", "golden_answers": ["Sythnas"], "entity": "Teizos Kindvelor"},
]


def replay(tokenizer, env, chat, max_turns=4):
    """Run the real rollout loop with a policy that says the chat's assistant messages in order."""
    answers = iter([m["content"] for m in chat if m["role"] == "assistant"])
    engine = ScriptedEngine(tokenizer, lambda conversation: next(answers))
    worker = RolloutWorker(engine, tokenizer, env, ToolExecutor(list(env.tools)), RolloutConfig(max_turns=max_turns), ToolsConfig())
    return asyncio.run(worker.run_trajectory(env.make_task(ROWS[0], 0)))


def test_search_demonstrations_search_the_entity_and_answer_from_the_result(tokenizer):
    env = SearchQAEnv(prompt="short")
    chats = generate_demonstrations(env, ToolExecutor(["search"]), tokenizer, ROWS, ToolsConfig())
    roles = [m["role"] for m in chats[0]]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert chats[0][1]["content"] == "<search> Laskam Glimbys </search>"
    assert "beekeeper" in chats[0][2]["content"]
    assert chats[1][3]["content"] == "<answer> Sythnas </answer>"


def test_demonstration_masks_equal_the_rollout_masks(tokenizer):
    env = SearchQAEnv(prompt="short")
    chat = generate_demonstrations(env, ToolExecutor(["search"]), tokenizer, ROWS[:1], ToolsConfig())[0]
    for max_turns in (4, 2):  # with 2 turns the rollout appends the final-turn warning
        demonstration = chat_to_trajectory(chat, tokenizer, env, max_turns=max_turns)
        rollout = replay(tokenizer, env, chat, max_turns)
        assert rollout.reward == 1.0
        assert demonstration.prompt_ids == rollout.prompt_ids
        assert demonstration.response_ids == rollout.response_ids
        assert demonstration.loss_mask == rollout.loss_mask
        assert [(s.role, s.start, s.end, s.turn) for s in demonstration.turns] == [(s.role, s.start, s.end, s.turn) for s in rollout.turns]


def test_math_demonstrations_compute_the_answer_with_the_python_tool(tokenizer):
    from agentrl.envs.math_code import generate_problems

    env = MathCodeEnv()
    rows = generate_problems(4, seed=3)
    chats = generate_demonstrations(env, ToolExecutor(["python"], {"python": {"backend": "process"}}), tokenizer, rows, ToolsConfig())
    for row, chat in zip(rows, chats):
        assert chat[1]["content"].startswith("<python>")
        assert chat[2]["content"].strip() == str(row["answer"])  # the code printed the right number
        assert chat[3]["content"] == f"<answer> {row['answer']} </answer>"


def test_json_tool_call_chats_are_rendered_message_by_message(tokenizer):
    from agentrl.envs.base import Env, Reward, Task

    class JsonEnv(Env):
        name, tools, action_format = "json_env", ("search",), "json"

        def make_task(self, row, index):
            return Task(id="j", messages=[{"role": "user", "content": "Who?"}])

        def reward(self, task, trajectory):
            return Reward(0.0)

    chat = [{"role": "user", "content": "Who?"},
            {"role": "assistant", "content": '<tool_call>{"name": "search", "arguments": {"query": "x"}}</tool_call>'},
            {"role": "tool", "content": "result"},
            {"role": "assistant", "content": "<answer> y </answer>"}]
    trajectory = chat_to_trajectory(chat, tokenizer, JsonEnv())
    text = tokenizer.decode(trajectory.prompt_ids + trajectory.response_ids)
    assert text == tokenizer.apply_chat_template(chat, tokenize=False)
    trained = [tokenizer.decode(trajectory.response_ids[s.start:s.end]) for s in trajectory.turns if s.role == "assistant"]
    assert trained[0].startswith("<tool_call>") and trained[1].startswith("<answer> y </answer>")
    assert all("result" not in t for t in trained)


def test_sft_lowers_the_loss_on_assistant_tokens_only(tokenizer, tiny_model):
    env = SearchQAEnv(prompt="short")
    chats = generate_demonstrations(env, ToolExecutor(["search"]), tokenizer, ROWS, ToolsConfig())
    trajectories = [chat_to_trajectory(c, tokenizer, env) for c in chats]
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    metrics = sft_train(tiny_model, tokenizer, trajectories, epochs=8, lr=1e-2, batch_size=2, micro_batch_size=1)
    assert metrics["sft/loss_last"] < 0.7 * metrics["sft/loss_first"]
    assert any(not torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
