"""Inference engines (token ids in, token ids and logprobs out) and the one place a run builds its own.

``hf`` samples from the trainer's module itself; ``vllm`` serves a copy of it from a local vLLM
server and receives the trainer's weights after each update; ``openai`` talks to a server someone
else runs (its weights are the server's, so it samples a policy the local trainer cannot update).
"""

from __future__ import annotations

from typing import Any


def build_engine(config: Any, model: Any, tokenizer: Any) -> Any:
    """The engine ``config.rollout.engine`` names, sampling from the policy ``model`` (the trainer's
    module, which every engine built here follows through ``update_weights``)."""
    rollout = config.rollout
    if rollout.engine == "hf":
        from agentrl.engines.hf import HFEngine

        return HFEngine(model, tokenizer, max_batch_size=rollout.max_batch_size, packed_weights=rollout.packed_weights)
    if rollout.engine == "vllm":
        from agentrl.engines.vllm import VLLMEngine

        # On the trainer's GPU the server takes a share of its memory and sleeps through each update.
        on_gpu = next(model.parameters()).device.type == "cuda"
        share = (rollout.gpu_memory_utilization or 0.5) if on_gpu else None
        return VLLMEngine(model, tokenizer, dtype=config.rollout_dtype, max_model_len=rollout.max_model_len,
                          max_num_seqs=rollout.max_batch_size, seed=config.trainer.seed,
                          threads=config.trainer.torch_threads, gpu_memory_utilization=share, sleep=on_gpu)
    from agentrl.config import ConfigError

    raise ConfigError(f"rollout.engine={rollout.engine}: the local trainer cannot put its updated weights into a server "
                      "it does not run; set rollout.engine=vllm (agentrl runs the vLLM server) or rollout.engine=hf")
