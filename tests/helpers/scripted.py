"""A scripted policy for rollout tests: it answers with token ids chosen by a function of the
conversation so far, so assembly, masking and budgets can be checked exactly."""

import asyncio

from agentrl.engines.base import GenerationResult, SamplingParams


class ScriptedEngine:
    """``script(conversation_text, turn_ids_so_far) -> list[int] | str``; strings are encoded."""

    def __init__(self, tokenizer, script, delay_s: float = 0.0):
        self.tokenizer = tokenizer
        self.script = script
        self.delay_s = delay_s
        self.policy_version = 0
        self.calls = 0

    async def generate(self, prompt_ids, params: SamplingParams) -> GenerationResult:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        out = self.script(self.tokenizer.decode(prompt_ids))
        ids = self.tokenizer.encode(out, add_special_tokens=False) if isinstance(out, str) else list(out)
        reason = "eos" if ids and ids[-1] == self.tokenizer.eos_token_id else "stop"
        if len(ids) > params.max_new_tokens:
            ids, reason = ids[: params.max_new_tokens], "length"
        return GenerationResult(ids, [-0.5] * len(ids), reason, None, self.policy_version)

    def update_weights(self, state_dict=None):
        self.policy_version += 1

    async def close(self):
        pass


class ModelThenScript(ScriptedEngine):
    """Real generation through ``engine`` (``tokens`` sampled tokens, batched with every other
    trajectory's requests, then discarded), followed by the script's action: real engine timing
    and contention with deterministic actions."""

    def __init__(self, engine, tokenizer, script, tokens: int = 4):
        super().__init__(tokenizer, script)
        self.engine = engine
        self.tokens = tokens

    async def generate(self, prompt_ids, params: SamplingParams) -> GenerationResult:
        await self.engine.generate(prompt_ids, SamplingParams(max_new_tokens=self.tokens, temperature=1.0, seed=params.seed))
        return await super().generate(prompt_ids, params)
