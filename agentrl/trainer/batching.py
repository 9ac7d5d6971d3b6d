"""From trajectories to padded tensors, and from a model forward pass to per-token logprobs.

A batch is collated on the CPU; the update and the SFT warm start move it to the model's device
(``trainer.device``) once, with :meth:`TrainBatch.to`, before any forward pass.

Layout: every row is ``[pad ... prompt | response ... pad]``: prompts are left-padded to a common
width ``P`` and responses right-padded to ``T``. Response token ``t`` of every row then sits at
column ``P + t`` and is predicted by the logits at ``P + t - 1``, so the model computes logits for
the response columns only (``logits_to_keep``) and never for the prompt: with a 49k vocabulary the
logits, not the weights, dominate memory.

A vision-language model's rows carry their images' processed tensors (``image_inputs``, one
:class:`agentrl.multimodal.ImageInputs` per row, the very tensors the engine was given), and the
forward pass gets them as the model's image arguments, so it sees exactly what the engine saw.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch

from agentrl.multimodal import (
    ImageInputs,
    mask_unsampled,
    model_inputs,
    trajectory_image_inputs,
    unsampled_token_ids,
)
from agentrl.trajectory import Trajectory

Tensor = torch.Tensor


PER_TURN_FIELDS = ("turn_rewards", "turn_mask", "anchor_keys")


def anchor_key(token_ids: list[int], image_digests: list[str] | tuple[str, ...] = ()) -> int:
    """A stable 64-bit hash of a token sequence (the same ids give the same key in every process)
    and of the images shown with it (their blocks of image tokens are the same for any pixels)."""
    data = torch.tensor(token_ids, dtype=torch.int64).numpy().tobytes() + "".join(image_digests).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def turn_anchor_keys(trajectory: Trajectory) -> list[int]:
    """One key per assistant turn: the hash of the observation the turn answers, i.e. the tokens
    between the previous assistant turn and this one (the prompt for the first turn). Turns of
    different trajectories that answer identical observations (and images) share a key."""
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}
    for span in trajectory.turns:
        if span.role == "assistant":
            starts.setdefault(span.turn, span.start)
            ends[span.turn] = span.end
    keys, previous_end, previous_turn = [], None, -1
    for turn in sorted(starts):
        if previous_end is None:
            observed = list(trajectory.prompt_ids) + list(trajectory.response_ids[: starts[turn]])
        else:
            observed = list(trajectory.response_ids[previous_end : starts[turn]])
        images = [r.inputs_sha256 or "" for r in trajectory.images if previous_turn <= r.turn < turn]
        keys.append(anchor_key(observed, images))
        previous_end, previous_turn = ends[turn], turn
    return keys


@dataclass
class TrainBatch:
    """Padded tensors for a list of trajectories. ``(B, T)`` tensors index response tokens."""

    input_ids: Tensor  # (B, P + T)
    attention_mask: Tensor  # (B, P + T)
    prompt_width: int
    response_ids: Tensor  # (B, T)
    loss_mask: Tensor  # (B, T) float, 1 on model tokens
    sampling_logprobs: Tensor  # (B, T) the engine's logprobs
    stale: Tensor  # (B, T) 1 on model tokens sampled by an older policy version
    token_turns: Tensor  # (B, T) turn index of model tokens, -1 elsewhere
    rewards: Tensor  # (B,)
    group_ids: Tensor  # (B,)
    truncated: Tensor  # (B,) bool: stopped by a token budget
    turn_rewards: Tensor  # (B, K) per-turn rewards, the outcome reward added to the last turn
    turn_mask: Tensor  # (B, K)
    anchor_keys: Tensor  # (B, K) int64 hash of the tokens each turn answers (GiGPO's anchor state)
    prompt_lengths: Tensor  # (B,)
    response_lengths: Tensor  # (B,)
    image_inputs: list[ImageInputs] | None = None  # per row: the images of a vision-language model

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def position_ids(self) -> Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device | str) -> TrainBatch:
        """The batch with every tensor on ``device`` (a vision model's image tensors move when a
        forward pass takes them, see :func:`forward_response`)."""
        return TrainBatch(**{item.name: value.to(device) if isinstance(value := getattr(self, item.name), Tensor) else value
                             for item in fields(self)})

    def select(self, rows: Tensor | list[int]) -> TrainBatch:
        """The given rows, with the padding no longer needed by any of them trimmed away."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        prompt_width = int(self.prompt_lengths[rows].max()) if len(rows) else 0
        response_width = int(self.response_lengths[rows].max()) if len(rows) else 0
        drop = self.prompt_width - prompt_width
        values = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "prompt_width":
                values[item.name] = prompt_width
            elif item.name == "image_inputs":
                values[item.name] = None if value is None else [value[int(row)] for row in rows]
            elif item.name in ("input_ids", "attention_mask"):
                values[item.name] = value[rows][:, drop : drop + prompt_width + response_width]
            elif isinstance(value, Tensor) and value.dim() == 2 and item.name not in PER_TURN_FIELDS:
                values[item.name] = value[rows][:, :response_width]
            else:
                values[item.name] = value[rows]
        return TrainBatch(**values)


def collate(trajectories: list[Trajectory], pad_token_id: int, policy_version: int = 0) -> TrainBatch:
    """Pad trajectories into a :class:`TrainBatch`. ``policy_version`` is the version being trained:
    model tokens sampled by an earlier version are marked stale."""
    if not trajectories:
        raise ValueError("cannot collate an empty list of trajectories")
    size = len(trajectories)
    prompt_width = max(len(t.prompt_ids) for t in trajectories)
    response_width = max(1, max(len(t.response_ids) for t in trajectories))
    turns = max(1, max((t.num_turns for t in trajectories), default=1))
    input_ids = torch.full((size, prompt_width + response_width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_ids = torch.full((size, response_width), pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros((size, response_width))
    sampling_logprobs = torch.zeros((size, response_width))
    stale = torch.zeros((size, response_width))
    token_turns = torch.full((size, response_width), -1, dtype=torch.long)
    turn_rewards = torch.zeros((size, turns))
    turn_mask = torch.zeros((size, turns))
    anchor_keys = torch.zeros((size, turns), dtype=torch.long)
    group_names: dict[str, int] = {}
    for row, trajectory in enumerate(trajectories):
        prompt, response = trajectory.prompt_ids, trajectory.response_ids
        start = prompt_width - len(prompt)
        input_ids[row, start:prompt_width] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, start : prompt_width + len(response)] = 1
        if response:
            input_ids[row, prompt_width : prompt_width + len(response)] = torch.tensor(response, dtype=torch.long)
            response_ids[row, : len(response)] = torch.tensor(response, dtype=torch.long)
            loss_mask[row, : len(response)] = torch.tensor(trajectory.loss_mask, dtype=torch.float32)
            sampling_logprobs[row, : len(response)] = torch.tensor(trajectory.logprobs, dtype=torch.float32)
        # Turns are renumbered 0..k-1 over the assistant spans, so a turn index is a column.
        assistant_turns = sorted({s.turn for s in trajectory.turns if s.role == "assistant"})
        column = {turn: index for index, turn in enumerate(assistant_turns)}
        for span in trajectory.turns:
            if span.role != "assistant":
                continue
            token_turns[row, span.start : span.end] = column[span.turn]
            if span.policy_version is not None and span.policy_version < policy_version:
                stale[row, span.start : span.end] = 1.0
        if assistant_turns:
            turn_mask[row, : len(assistant_turns)] = 1.0
            anchor_keys[row, : len(assistant_turns)] = torch.tensor(turn_anchor_keys(trajectory), dtype=torch.long)
            for index, value in enumerate((trajectory.turn_rewards or [])[: len(assistant_turns)]):
                turn_rewards[row, index] = float(value)
            turn_rewards[row, len(assistant_turns) - 1] += float(trajectory.reward or 0.0)
        group_names.setdefault(trajectory.group_id, len(group_names))
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        prompt_width=prompt_width,
        response_ids=response_ids,
        loss_mask=loss_mask,
        sampling_logprobs=sampling_logprobs,
        stale=stale,
        token_turns=token_turns,
        rewards=torch.tensor([float(t.reward or 0.0) for t in trajectories]),
        group_ids=torch.tensor([group_names[t.group_id] for t in trajectories]),
        truncated=torch.tensor([t.status == "truncated" for t in trajectories]),
        turn_rewards=turn_rewards,
        turn_mask=turn_mask,
        anchor_keys=anchor_keys,
        prompt_lengths=torch.tensor([len(t.prompt_ids) for t in trajectories]),
        response_lengths=torch.tensor([max(1, len(t.response_ids)) for t in trajectories]),
        image_inputs=[trajectory_image_inputs(t) for t in trajectories] if any(t.images for t in trajectories) else None,
    )


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are: ``trainer.device``, where :func:`agentrl.trainer.local.build_run` put them."""
    return next(model.parameters()).device


@dataclass
class ResponseOutputs:
    logprobs: Tensor  # (B, T) log mu(response token) at the sampling temperature and top-p
    entropy: Tensor | None = None  # (B, T)
    values: Tensor | None = None  # (B, T) value head on the state before each token
    hidden: Tensor | None = None  # (B, T + 1, H) last-layer state before each token and after the last


def forward_response(model, batch: TrainBatch, value_head: torch.nn.Module | None = None,
                     with_entropy: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                     with_hidden: bool = False, value_trunk_grad: bool = True,
                     entropy_grad: bool = True) -> ResponseOutputs:
    """Log-probabilities (and optionally entropy, values and hidden states) of the response tokens
    under ``model``, scored at the sampling ``temperature`` and ``top_p`` (see
    :func:`agentrl.algos.sampling.sampling_logprobs`): the distribution the engine sampled from.

    ``value_trunk_grad=False`` detaches the hidden states before the value head, so the value loss
    trains the head only and not the trunk it shares with the policy. ``entropy_grad=False``
    computes the entropy for logging only, outside the autograd graph.

    Only the ``T + 1`` last columns get logits; the last one (after the final token) is dropped.
    """
    from agentrl.algos.losses import entropy_from_logits
    from agentrl.algos.sampling import sampling_logprobs, tempered_logits

    response_width = batch.response_ids.shape[1]
    images = model_inputs([t for row in batch.image_inputs or [] for t in row.tensors], batch.input_ids.device)
    output = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=response_width + 1,
        output_hidden_states=value_head is not None or with_hidden,
        **images,
    )
    logits = output.logits[:, :-1, :]
    unsampled = unsampled_token_ids(model)
    if unsampled:  # scored out as the engine sampled (a vision-language model's image placeholder)
        logits = mask_unsampled(logits, unsampled)
    logprobs = sampling_logprobs(logits, batch.response_ids, temperature, top_p)
    entropy = None
    if with_entropy:
        with nullcontext() if entropy_grad else torch.no_grad():
            entropy = entropy_from_logits(tempered_logits(logits, temperature))
    values = hidden = None
    if value_head is not None or with_hidden:
        states = output.hidden_states[-1][:, batch.prompt_width - 1 : batch.prompt_width + response_width]
        hidden = states if with_hidden else None
    if value_head is not None:
        value_input = states[:, :response_width] if value_trunk_grad else states[:, :response_width].detach()
        values = value_head(value_input.to(value_head.weight.dtype)).squeeze(-1).float()
    return ResponseOutputs(logprobs, entropy, values, hidden)
