"""The agent loop: observation tokens masked and model tokens not, the token stream equal to the
rendered conversation, budgets honoured, slow tools not stalling others, infra errors excluded."""

import asyncio
import time

import pytest
from agentrl.envs.search_qa import SearchQAEnv

from agentrl.config import RolloutConfig, ToolsConfig
from agentrl.executor import ToolExecutor
from agentrl.rollout import RolloutWorker
from tests.helpers.scripted import ModelThenScript, ScriptedEngine

QUESTION = {"id": "q0", "question": "What was the profession of Laskam Glimbys?", "golden_answers": ["beekeeper"]}


def search_then_answer(conversation: str) -> str:
    if "<information>" not in conversation.split("Question:")[-1]:
        return "I will look it up. <search> Laskam Glimbys </search>"
    return "<answer> beekeeper </answer>"


def worker(tokenizer, script, tools=("search",), env=None, delay=0.0, **rollout):
    env = env or SearchQAEnv(prompt="short")
    engine = ScriptedEngine(tokenizer, script, delay)
    return RolloutWorker(engine, tokenizer, env, ToolExecutor(list(tools)), RolloutConfig(**rollout), ToolsConfig())


def spans_text(tokenizer, trajectory, role):
    return [tokenizer.decode(trajectory.response_ids[s.start:s.end]) for s in trajectory.turns if s.role == role]


def test_xml_observations_are_masked_and_model_tokens_are_not(tokenizer):
    rollout = worker(tokenizer, search_then_answer)
    task = rollout.env.make_task(QUESTION, 0)
    trajectory = asyncio.run(rollout.run_trajectory(task))
    trajectory.validate()
    assert trajectory.stop_reason == "answer" and trajectory.answer == "beekeeper" and trajectory.reward == 1.0
    model = spans_text(tokenizer, trajectory, "assistant")
    observations = spans_text(tokenizer, trajectory, "observation")
    assert model == ["I will look it up. <search> Laskam Glimbys </search>", "<answer> beekeeper </answer>"]
    assert len(observations) == 1 and observations[0].startswith("\n\n<information>Doc 1(Title: Laskam Glimbys)")
    for span in trajectory.turns:
        mask = trajectory.loss_mask[span.start:span.end]
        assert set(mask) == ({1} if span.role == "assistant" else {0})
    assert [c.tool for c in trajectory.tool_calls] == ["search"] and trajectory.tool_calls[0].status == "ok"


def test_decoded_stream_equals_the_rendered_conversation(tokenizer):
    rollout = worker(tokenizer, search_then_answer)
    task = rollout.env.make_task(QUESTION, 0)
    trajectory = asyncio.run(rollout.run_trajectory(task))
    prompt = tokenizer.apply_chat_template(task.messages, add_generation_prompt=True, tokenize=False)
    model = spans_text(tokenizer, trajectory, "assistant")
    observation = spans_text(tokenizer, trajectory, "observation")[0]
    assert tokenizer.decode(trajectory.input_ids) == prompt + model[0] + observation + model[1]


def test_sampled_ids_are_kept_across_bpe_boundaries(tokenizer):
    whole = tokenizer.encode(" Paris", add_special_tokens=False)
    pieces = [tokenizer.encode(piece, add_special_tokens=False) for piece in ("<answer>", " Par", "is", " </answer>")]
    sampled = [i for piece in pieces for i in piece]
    assert len(whole) == 1 and whole != pieces[1] + pieces[2]  # the policy sampled " Par" + "is"
    rollout = worker(tokenizer, lambda conversation: sampled)
    trajectory = asyncio.run(rollout.run_trajectory(rollout.env.make_task(QUESTION, 0)))
    assert trajectory.response_ids == sampled  # exactly what was sampled
    text = tokenizer.decode(trajectory.response_ids)
    assert tokenizer.encode(text, add_special_tokens=False) != sampled  # re-tokenising would change the ids
    assert trajectory.answer == "Paris"


def test_json_tool_calls_follow_the_chat_template(tokenizer):
    from agentrl.envs.base import Env, Reward, Task

    class JsonEnv(Env):
        name, tools, action_format = "json_env", ("search",), "json"

        def make_task(self, row, index):
            return Task(id="j", messages=[{"role": "user", "content": "Who is Laskam Glimbys?"}])

        def reward(self, task, trajectory):
            return Reward(float(trajectory.answer is not None))

    call = '<tool_call>{"name": "search", "arguments": {"query": "Laskam Glimbys"}}</tool_call>'

    def script(conversation):
        return call if "<|im_start|>tool" not in conversation else "<answer>a beekeeper</answer><|im_end|>"

    rollout = worker(tokenizer, script, env=JsonEnv())
    task = rollout.env.make_task({}, 0)
    trajectory = asyncio.run(rollout.run_trajectory(task))
    assert trajectory.stop_reason == "answer" and trajectory.reward == 1.0
    tool_text = spans_text(tokenizer, trajectory, "observation")[0]
    expected = tokenizer.apply_chat_template(
        task.messages + [{"role": "assistant", "content": call}, {"role": "tool", "content": tool_text.split("\n", 1)[1].rsplit("<|im_end|>", 1)[0]}],
        tools=rollout.executor.schemas, add_generation_prompt=True, tokenize=False,
    )
    assert tokenizer.decode(trajectory.input_ids[: trajectory.turns[-1].start + len(trajectory.prompt_ids)]) == expected
    assert [s.role for s in trajectory.turns] == ["assistant", "template", "observation", "assistant"]


def test_max_turns_runs_no_tool_on_the_last_turn(tokenizer):
    rollout = worker(tokenizer, lambda c: "<search> Drournix </search>", max_turns=3)
    trajectory = asyncio.run(rollout.run_trajectory(rollout.env.make_task(QUESTION, 0)))
    assert trajectory.stop_reason == "max_turns" and trajectory.num_turns == 3
    assert len(trajectory.tool_calls) == 2  # turns 0 and 1; the last turn is told to answer instead
    assert "No more searches" in spans_text(tokenizer, trajectory, "observation")[-1]


def test_token_budgets_stop_with_their_reason(tokenizer):
    long_text = "word " * 50 + "<search> x </search>"
    per_turn = worker(tokenizer, lambda c: long_text, max_new_tokens=10)
    trajectory = asyncio.run(per_turn.run_trajectory(per_turn.env.make_task(QUESTION, 0)))
    assert trajectory.stop_reason == "max_new_tokens" and trajectory.status == "truncated" and len(trajectory.response_ids) == 10
    whole = worker(tokenizer, lambda c: "<search> Drournix </search>", max_response_tokens=30, max_turns=10)
    trajectory = asyncio.run(whole.run_trajectory(whole.env.make_task(QUESTION, 0)))
    assert trajectory.stop_reason == "max_response_tokens" and trajectory.status == "truncated"


def test_observations_are_cut_to_the_token_budget(tokenizer):
    rollout = worker(tokenizer, search_then_answer)
    rollout.tools_config = ToolsConfig(max_observation_tokens=12, observation_truncation="tail")
    trajectory = asyncio.run(rollout.run_trajectory(rollout.env.make_task(QUESTION, 0)))
    observation = spans_text(tokenizer, trajectory, "observation")[0]
    assert "tokens truncated" in observation and len(tokenizer.encode(observation)) < 45


def test_a_slow_tool_does_not_delay_other_trajectories(tokenizer, tiny_model):
    from agentrl.envs.base import Reward, Task

    from agentrl.engines.hf import HFEngine

    class SleepEnv(SearchQAEnv):
        tools = ("tests.helpers.demo_tools:Sleeper",)
        tags = {"sleep": "sleeper"}

        def make_task(self, row, index):
            return Task(id=row["id"], messages=[{"role": "user", "content": row["id"]}], answer=["done"])

        def reward(self, task, trajectory):
            return Reward(1.0)

    calls = []  # (time, trajectory, tool results seen so far) of every action chosen

    def script(conversation):
        slow = "user\nslow" in conversation
        turns = conversation.count("<information>")
        calls.append((time.perf_counter(), "slow" if slow else "fast", turns))
        if turns >= (1 if slow else 3):
            return "<answer>done</answer>"
        return f"<sleep>{4.0 if slow else 0.05}</sleep>"

    env = SleepEnv()
    engine = ModelThenScript(HFEngine(tiny_model, tokenizer), tokenizer, script, tokens=4)
    rollout = RolloutWorker(engine, tokenizer, env, ToolExecutor(["tests.helpers.demo_tools:Sleeper"]),
                            RolloutConfig(max_turns=5), ToolsConfig())
    finished = {}

    async def main():
        async def one(name):
            trajectory = await rollout.run_trajectory(env.make_task({"id": name}, 0))
            finished[name] = (time.perf_counter() - started, trajectory.num_turns)

        started = time.perf_counter()
        await asyncio.gather(one("slow"), one("fast-a"), one("fast-b"))

    asyncio.run(main())
    # the fast ones ran 4 turns (3 tool calls) while the slow one sat in its single 4 s call
    assert finished["fast-a"][1] == finished["fast-b"][1] == 4 and finished["slow"][1] == 2
    # Not absolute times (the machine may be loaded): while the slow one sat in its call, the fast
    # ones got tool results back and generated again.
    before, after = (t for t, name, turns in calls if name == "slow")
    assert after - before >= 4.0
    assert sum(name == "fast" and turns >= 1 and before < t < after for t, name, turns in calls) >= 2


def test_infra_error_is_excluded_from_the_loss_and_counted(tokenizer):
    rollout = worker(tokenizer, lambda c: "<search> x </search>")
    rollout.executor = ToolExecutor(["search"], {"search": {"server_url": "http://127.0.0.1:9", "attempts": 1}})
    batch = asyncio.run(rollout.run_batch([rollout.env.make_task(QUESTION, 0)], group_size=2))
    assert all(t.status == "infra_error" and not t.trainable for t in batch.trajectories)
    assert batch.metrics["status/infra_error"] == 1.0 and "reward_mean" not in batch.metrics


def test_groups_and_metrics(tokenizer):
    rollout = worker(tokenizer, search_then_answer)
    tasks = [rollout.env.make_task(QUESTION, 0), rollout.env.make_task({**QUESTION, "id": "q1"}, 1)]
    batch = asyncio.run(rollout.run_batch(tasks, group_size=3))
    assert [t.group_id for t in batch.trajectories] == ["q0"] * 3 + ["q1"] * 3
    assert batch.metrics["success_rate"] == 1.0 and batch.metrics["tool_calls/search"] == 1.0
    assert batch.metrics["stop/answer"] == 1.0 and batch.metrics["turns_mean"] == 2.0
    sampled = sum(s.end - s.start for t in batch.trajectories for s in t.turns if s.role == "assistant")
    assert batch.metrics["generated_tokens"] == sampled > 0


@pytest.mark.parametrize("fmt", ["xml"])
def test_real_tiny_model_rollout_is_consistent(tokenizer, tiny_model, fmt):
    from agentrl.engines.hf import HFEngine

    env = SearchQAEnv(prompt="short")
    rollout = RolloutWorker(HFEngine(tiny_model, tokenizer), tokenizer, env, ToolExecutor(["search"]),
                            RolloutConfig(max_new_tokens=16, max_turns=2, temperature=1.0), ToolsConfig())
    batch = asyncio.run(rollout.run_batch([env.make_task(QUESTION, 0)], group_size=4))
    for trajectory in batch.trajectories:
        trajectory.validate()
        assert trajectory.stop_reason in ("eos", "max_new_tokens", "answer", "max_turns")
        assert len(trajectory.logprobs) == len(trajectory.response_ids)


def test_a_stop_string_inside_think_does_not_end_the_turn(tokenizer):
    pieces = iter(["<think>I could write <search> x </search>", " but I know it.</think><answer> beekeeper </answer>"])
    rollout = worker(tokenizer, lambda c: next(pieces))
    trajectory = asyncio.run(rollout.run_trajectory(rollout.env.make_task(QUESTION, 0)))
    assert rollout.engine.calls == 2 and trajectory.tool_calls == []
    assert trajectory.stop_reason == "answer" and trajectory.answer == "beekeeper" and trajectory.num_turns == 1
    assert [s.role for s in trajectory.turns] == ["assistant"]


def test_several_xml_calls_in_one_turn_all_run(tokenizer):
    def script(conversation):
        if "<information>" not in conversation.split("Question:")[-1]:
            return "<search> Laskam Glimbys </search> and <search> Drournix </search>"
        return "<answer> beekeeper </answer>"

    rollout = worker(tokenizer, script, parallel_tool_calls=True)
    assert rollout.stop_strings == ["</answer>"]  # the turn is not cut at the first call
    trajectory = asyncio.run(rollout.run_trajectory(rollout.env.make_task(QUESTION, 0)))
    assert [(c.tool, c.turn, c.status) for c in trajectory.tool_calls] == [("search", 0, "ok"), ("search", 0, "ok")]
    observation = spans_text(tokenizer, trajectory, "observation")
    assert len(observation) == 1 and observation[0].count("Doc 1(") == 2 and observation[0].endswith("</information>\n\n")
    assert trajectory.stop_reason == "answer"


def test_templates_and_tokenisation_run_off_the_event_loop(tokenizer):
    import threading

    class Recording:
        """The tokenizer, noting the thread of every encode, decode and template render."""

        def __init__(self, inner):
            self.inner, self.threads = inner, []

        def __getattr__(self, name):
            value = getattr(self.inner, name)
            if name in ("encode", "decode", "apply_chat_template", "__call__"):
                def recorded(*args, **kwargs):
                    self.threads.append(threading.current_thread().name)
                    return value(*args, **kwargs)
                return recorded
            return value

    recording = Recording(tokenizer)
    engine = ScriptedEngine(tokenizer, search_then_answer)  # the engine's own tokenizer is not the worker's
    env = SearchQAEnv(prompt="short")
    rollout = RolloutWorker(engine, recording, env, ToolExecutor(["search"]), RolloutConfig(), ToolsConfig())
    loop_thread = threading.current_thread().name
    trajectory = asyncio.run(rollout.run_trajectory(env.make_task(QUESTION, 0)))
    assert trajectory.stop_reason == "answer" and trajectory.reward == 1.0
    assert len(recording.threads) >= 5 and loop_thread not in recording.threads
    assert set(recording.threads) == {"agentrl-text_0"}


def test_tool_call_tags_registered_as_special_tokens_are_still_parsed(tokenizer):
    import copy

    from agentrl.envs.base import Env, Reward, Task

    special = copy.deepcopy(tokenizer)
    special.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    assert "<tool_call>" in special.all_special_tokens

    class JsonEnv(Env):
        name, tools, action_format = "json_env", ("search",), "json"

        def make_task(self, row, index):
            return Task(id="j", messages=[{"role": "user", "content": "Who is Laskam Glimbys?"}])

        def reward(self, task, trajectory):
            return Reward(float(trajectory.answer is not None))

    call = '<tool_call>{"name": "search", "arguments": {"query": "Laskam Glimbys"}}</tool_call>'
    engine = ScriptedEngine(special, lambda c: call if "<|im_start|>tool" not in c else "<answer>a beekeeper</answer><|im_end|>")
    rollout = RolloutWorker(engine, special, JsonEnv(), ToolExecutor(["search"]), RolloutConfig(), ToolsConfig())
    trajectory = asyncio.run(rollout.run_trajectory(rollout.env.make_task({}, 0)))
    assert [(c.tool, c.status) for c in trajectory.tool_calls] == [("search", "ok")]
    assert trajectory.answer == "a beekeeper"
