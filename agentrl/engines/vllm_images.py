"""The vLLM engine's side of images (a vision-language policy served by vLLM, see
:mod:`agentrl.engines.vllm`): which processor a served model has, agentrl's ids as vLLM's
multimodal processor takes them, and the ``/inference/v1/generate`` response read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agentrl.engines.base import GenerationResult
from agentrl.engines.openai import EngineRequestError, _finish
from agentrl.multimodal import is_vision_model_dir, processor_for, unsampled_token_ids


def vision_parts(module: Any, tokenizer: Any, model_dir: str | Path | None) -> tuple[Any, list[int]]:
    """A vision-language policy's processor and the ids it never samples; ``(None, [])`` for a text
    model. The processor is the one attached to ``tokenizer``, or a ``model_dir``'s own."""
    processor = processor_for(tokenizer) if tokenizer is not None else None
    if processor is not None:
        base = module.get_base_model() if hasattr(module, "get_base_model") else module
        return processor, unsampled_token_ids(base)
    if model_dir is None or not is_vision_model_dir(model_dir):
        return None, []
    from transformers import AutoProcessor

    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    token = config.get("image_token_id")
    return AutoProcessor.from_pretrained(model_dir), [int(token)] if token is not None else []


def collapse_image_blocks(prompt_ids: list[int], blocks: list[list[int]], placeholder_id: int) -> list[int]:
    """``prompt_ids`` with each image's block (``blocks[i]``, in order) replaced by the one
    placeholder token the processor expanded it from: what vLLM's processor expands again.

    Raises :class:`EngineRequestError` when a block is not in the ids after the previous one, or
    when a placeholder stands in the ids outside any block (vLLM would take it for an image)."""
    collapsed, position = [], 0
    for index, block in enumerate(blocks):
        start = _find(prompt_ids, block, position)
        if start < 0:
            raise EngineRequestError(f"image {index}'s block of {len(block)} tokens is not in the prompt ids after "
                                     f"position {position}: the ids and the images do not belong together")
        collapsed += prompt_ids[position:start] + [placeholder_id]
        position = start + len(block)
    collapsed += prompt_ids[position:]
    if collapsed.count(placeholder_id) != len(blocks):
        raise EngineRequestError(f"the prompt ids hold {collapsed.count(placeholder_id) - len(blocks)} image "
                                 "placeholder tokens outside the images' blocks")
    return collapsed


def _find(sequence: list[int], block: list[int], start: int) -> int:
    """Where ``block`` first occurs in ``sequence`` at or after ``start``; -1 if nowhere."""
    if not block:
        return start
    last = len(sequence) - len(block)
    while start <= last:
        try:
            start = sequence.index(block[0], start, last + 1)
        except ValueError:
            return -1
        if sequence[start:start + len(block)] == block:
            return start
        start += 1
    return -1


def parse_generate(payload: dict[str, Any], policy_version: int, prompt_ids: list[int]) -> GenerationResult:
    """A :class:`GenerationResult` from an ``/inference/v1/generate`` response (``output_mode``
    ``tokens``, ``return_token_ids``). The prompt vLLM ran, its images expanded, must be exactly
    ``prompt_ids``: otherwise the trainer would score other inputs than the ones sampled from."""
    try:
        choice = payload["choices"][0]
        ids = [int(i) for i in choice["token_ids"]]
        entries = (choice.get("logprobs") or {}).get("content")
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise EngineRequestError(f"not an /inference/v1/generate response: {str(payload)[:300]}") from error
    served = payload.get("prompt_token_ids")
    if served is None or list(served) != list(prompt_ids):
        first = next((i for i, (a, b) in enumerate(zip(served or [], prompt_ids)) if a != b),
                     min(len(served or []), len(prompt_ids)))
        raise EngineRequestError(f"vLLM expanded the images into other prompt ids than agentrl's processor "
                                 f"({len(served or [])} ids against {len(prompt_ids)}, first difference at "
                                 f"{first}): the two environments' processors disagree")
    if entries is None or len(entries) != len(ids):
        raise EngineRequestError(f"the server returned {len(ids)} token ids but no logprob for each")
    finish, stop_text = _finish(choice.get("finish_reason"), choice.get("stop_reason"))
    return GenerationResult(ids, [float(entry["logprob"]) for entry in entries], finish, stop_text, policy_version)
