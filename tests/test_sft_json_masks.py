"""SFT on JSON tool-call chats trains exactly what a rollout samples: a tool-calling turn's content
(it stops at the closing tag; the template's end is glue) and a final answer with its EOS (only the
newline after it is glue)."""

from agentrl.envs.base import Env, Reward, Task

from agentrl.trainer.sft import chat_to_trajectory


class JsonEnv(Env):
    name, tools, action_format = "json_env", ("search",), "json"

    def make_task(self, row, index):
        return Task(id="j", messages=[{"role": "user", "content": "Who?"}])

    def reward(self, task, trajectory):
        return Reward(0.0)


def test_json_demonstrations_train_only_what_a_rollout_samples(tokenizer):
    call = '<tool_call>{"name": "search", "arguments": {"query": "x"}}</tool_call>'
    chat = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": call},
            {"role": "tool", "content": "result"}, {"role": "assistant", "content": "<answer> y </answer>"}]
    trajectory = chat_to_trajectory(chat, tokenizer, JsonEnv())
    spans = [(s.role, tokenizer.decode(trajectory.response_ids[s.start:s.end])) for s in trajectory.turns]
    trained = [text for role, text in spans if role == "assistant"]
    assert trained == [call, "<answer> y </answer><|im_end|>"]
    assert spans[1] == ("template", "<|im_end|>\n")  # after the call: glue, not trained
    assert spans[-1] == ("template", "\n")  # after the sampled EOS
    text = tokenizer.decode(trajectory.prompt_ids + trajectory.response_ids)
    assert text == tokenizer.apply_chat_template(chat, tokenize=False)  # the same tokens, other masks
