"""The engine interface: token ids in, token ids (with logprobs) out.

Every engine (``hf`` on the CPU, ``vllm`` on GPUs, ``openai`` for any compatible endpoint) takes
prompt token ids and returns sampled token ids with their log-probabilities, so the rollout never
re-tokenises model output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "eos", "abort"]


@dataclass
class SamplingParams:
    """Per-request sampling settings. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerationResult:
    """What one request produced.

    ``finish_reason``: ``stop`` (a stop string matched; ``stop_text`` says which), ``eos`` (an
    end-of-sequence token), ``length`` (``max_new_tokens``), ``abort`` (cancelled). The tokens up to and including the one
    that completed the stop string are kept, so the token ids stay exactly what was sampled.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    stop_text: str | None = None
    policy_version: int = 0


@runtime_checkable
class Engine(Protocol):
    """What the rollout needs from an inference engine.

    An engine that serves vision-language models also takes ``generate(..., images=ImageInputs)``:
    the images whose blocks of image tokens ``prompt_ids`` already holds, in order, with each one's
    processed tensors (the contract is in :mod:`agentrl.multimodal`). The rollout passes ``images``
    only when a trajectory has images.
    """

    policy_version: int
    # The context length: prompt + response tokens never exceed it (``None``: unknown, not clamped).
    max_model_len: int | None

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult: ...

    def update_weights(self, state_dict: dict | None = None) -> None:
        """Take new policy weights (or, for an engine sharing the trainer's module, just bump the
        policy version) so the next request samples from the updated policy."""
        ...

    async def close(self) -> None: ...
