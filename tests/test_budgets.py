"""Hard budgets: no trajectory ever has more than ``max_response_tokens`` response tokens, nor more
than the engine's context length in all; an observation is cut to what is left and keeps its
closing wrapper; a trajectory that runs out ends with the budget's stop reason."""

import asyncio

from agentrl.envs.base import Env, Reward, Task
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentrl.config import RolloutConfig, ToolsConfig
from agentrl.executor import ToolExecutor
from agentrl.rollout import RolloutWorker
from agentrl.tool import Tool
from tests.helpers.scripted import ScriptedEngine

BUDGET_REASONS = {"max_response_tokens", "max_context"}


class Words(Tool):
    """Return ``count`` words."""

    name = "words"

    async def call(self, count: str) -> str:
        """
        Args:
            count: how many words.
        """
        return " ".join(f"w{i}" for i in range(int(count)))


class WordsEnv(Env):
    name, tools, action_format = "words", ("tests.test_budgets:Words",), "xml"
    tags = {"words": "words"}
    observation_template = "\n<information>{observation}</information>\n"
    final_turn_message = ""

    def make_task(self, row, index):
        return Task(id="w", messages=[{"role": "user", "content": "Count."}])

    def reward(self, task, trajectory):
        return Reward(0.0)


class JsonWordsEnv(WordsEnv):
    action_format = "json"


def script_for(turns, action_format):
    """Turn k writes ``filler`` words, then asks for ``count`` words of tool output."""

    def script(conversation):
        k = conversation.count("<information>") if action_format == "xml" else conversation.count("<|im_start|>tool")
        filler, count = turns[min(k, len(turns) - 1)]
        words = " ".join(["go"] * filler)
        if action_format == "xml":
            return f"{words} <words>{count}</words>"
        return f'{words} <tool_call>{{"name": "words", "arguments": {{"count": "{count}"}}}}</tool_call>'

    return script


def run(tokenizer, env, turns, max_model_len=None, **rollout):
    engine = ScriptedEngine(tokenizer, script_for(turns, env.action_format))
    engine.max_model_len = max_model_len
    worker = RolloutWorker(engine, tokenizer, env, ToolExecutor(list(env.tools)), RolloutConfig(**rollout),
                           ToolsConfig(max_observation_tokens=400))
    return asyncio.run(worker.run_trajectory(env.make_task({}, 0))), worker


turns_strategy = st.lists(st.tuples(st.integers(0, 25), st.integers(0, 40)), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=turns_strategy, action_format=st.sampled_from(["xml", "json"]), max_new=st.integers(1, 40))
def test_max_response_tokens_30_is_never_exceeded(tokenizer, turns, action_format, max_new):
    env = WordsEnv() if action_format == "xml" else JsonWordsEnv()
    trajectory, _ = run(tokenizer, env, turns, max_response_tokens=30, max_new_tokens=max_new, max_turns=8)
    trajectory.validate()
    assert len(trajectory.response_ids) <= 30
    closing = "</information>\n" if action_format == "xml" else "<|im_start|>assistant\n"
    for span in trajectory.turns:
        if span.role == "observation":  # cut or not, an observation keeps its closing wrapper
            assert tokenizer.decode(trajectory.response_ids[span.start:span.end]).endswith(closing)
    if trajectory.stop_reason in BUDGET_REASONS:
        assert trajectory.status == "truncated"


def test_an_observation_is_cut_to_what_is_left_and_the_trajectory_ends_on_the_budget(tokenizer):
    trajectory, _ = run(tokenizer, WordsEnv(), [(0, 200)], max_response_tokens=60, max_new_tokens=40, max_turns=8)
    observation = next(s for s in trajectory.turns if s.role == "observation")
    text = tokenizer.decode(trajectory.response_ids[observation.start:observation.end])
    assert text.startswith("\n<information>w0 w1") and "tokens truncated" in text and text.endswith("</information>\n")
    assert len(trajectory.response_ids) <= 60
    assert trajectory.stop_reason == "max_response_tokens" and trajectory.status == "truncated"


def test_prompt_and_response_never_exceed_the_engine_context_length(tokenizer):
    prompt_len = len(run(tokenizer, WordsEnv(), [(0, 1)], max_turns=1)[0].prompt_ids)
    for turns in ([(30, 2)], [(2, 50), (2, 50)], [(1, 1)] * 6):
        trajectory, _ = run(tokenizer, WordsEnv(), turns, max_model_len=prompt_len + 25,
                            max_response_tokens=1000, max_new_tokens=100, max_turns=8)
        assert len(trajectory.prompt_ids) + len(trajectory.response_ids) <= prompt_len + 25
        assert trajectory.stop_reason == "max_context" and trajectory.status == "truncated"


def test_a_turn_is_clamped_to_what_is_left(tokenizer):
    trajectory, _ = run(tokenizer, WordsEnv(), [(100, 1)], max_response_tokens=30, max_new_tokens=256)
    assert len(trajectory.response_ids) == 30 and trajectory.stop_reason == "max_response_tokens"


def test_real_tiny_model_rollout_stays_within_30_response_tokens(tokenizer, tiny_model):
    from agentrl.envs.search_qa import SearchQAEnv

    from agentrl.engines.hf import HFEngine

    env = SearchQAEnv(prompt="short")
    engine = HFEngine(tiny_model, tokenizer)
    assert engine.max_model_len == tiny_model.config.max_position_embeddings
    worker = RolloutWorker(engine, tokenizer, env, ToolExecutor(["search"]),
                           RolloutConfig(max_new_tokens=64, max_response_tokens=30, max_turns=4, temperature=1.0),
                           ToolsConfig())
    question = {"id": "q0", "question": "What was the profession of Laskam Glimbys?", "golden_answers": ["beekeeper"]}
    batch = asyncio.run(worker.run_batch([env.make_task(question, 0)], group_size=4))
    for trajectory in batch.trajectories:
        trajectory.validate()
        assert len(trajectory.response_ids) <= 30
        if trajectory.stop_reason not in ("eos", "answer"):
            assert trajectory.stop_reason in BUDGET_REASONS | {"max_turns"}
