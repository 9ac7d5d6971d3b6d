"""The transformers engine: batched sampling on the CPU (or one GPU) behind an async interface.

Each ``generate`` call enqueues a request and awaits its result. A background task gathers whatever
requests are waiting (up to ``max_batch_size``), and one worker thread runs them as a single
left-padded batch with a KV cache, one forward pass per token for the whole batch. Rows that finish
leave the batch (their cache rows are dropped), so short answers do not pay for long ones, and the
event loop stays free for tool calls while the batch decodes.

Logprobs are ``log_softmax`` of the raw logits (temperature 1, no top-p) at the sampled token: the
same quantity a separate forward pass of the trainer computes, so importance ratios start at 1.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections import Counter
from dataclasses import dataclass, field

import torch

from agentrl.engines.base import GenerationResult, SamplingParams


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    future: asyncio.Future
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    generator: torch.Generator | None = None


class HFEngine:
    """Dynamic batching over a transformers causal LM. Implements :class:`agentrl.engines.base.Engine`."""

    def __init__(self, model, tokenizer, max_batch_size: int = 32, batch_wait_s: float = 0.002):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.policy_version = 0
        self.batch_sizes: Counter[int] = Counter()  # how many requests each batch held
        self.forward_calls = 0
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos_ids.add(tokenizer.eos_token_id)
        self.eos_token_ids = {int(t) for t in eos_ids if t is not None}
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # transformers 5 renamed `past_key_values` to `cache`; accept either.
        forward_parameters = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_parameters else "past_key_values"
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task | None = None
        self._weights_lock = threading.Lock()

    # -- public API ------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: a request needs at least one token")
        if params.max_new_tokens <= 0:
            return GenerationResult([], [], "length", policy_version=self.policy_version)
        self._ensure_worker()
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(list(prompt_ids), params, future))
        return await future

    def update_weights(self, state_dict: dict | None = None) -> None:
        """Load new weights in place (between batches), or, when the engine shares the trainer's
        module, only mark that the policy changed."""
        with self._weights_lock:
            if state_dict is not None:
                self.model.load_state_dict(state_dict)
            self.policy_version += 1

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
            self._queue = None

    # -- batching --------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._serve())

    async def _serve(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            # Let coroutines that are about to submit do so, then take everything waiting.
            await asyncio.sleep(self.batch_wait_s)
            while len(batch) < self.max_batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [r for r in batch if not r.future.cancelled()]
            if not batch:
                continue
            try:
                await asyncio.to_thread(self._run_batch, batch)
            except Exception as error:  # a failed batch fails its requests, not the engine
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)

    def _run_batch(self, batch: list[_Request]) -> None:
        loop = batch[0].future.get_loop()
        with self._weights_lock, torch.inference_mode():
            version = self.policy_version
            self.batch_sizes[len(batch)] += 1
            for request in batch:
                if request.params.seed is not None:
                    request.generator = torch.Generator().manual_seed(request.params.seed)
            for request, result in self._decode(batch, version):
                loop.call_soon_threadsafe(_resolve, request.future, result)

    def _decode(self, batch: list[_Request], version: int):
        """Yield ``(request, GenerationResult)`` as rows finish."""
        device = next(self.model.parameters()).device
        width = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            input_ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            attention_mask[row, width - len(request.prompt_ids) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        active = list(batch)
        past = None
        step_ids = input_ids
        while active:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
            output = self.model(
                input_ids=step_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,  # only the last position is sampled: skip the LM head elsewhere
                **{self._cache_arg: past},
            )
            self.forward_calls += 1
            past = getattr(output, self._cache_arg)
            logits = output.logits[:, -1, :].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            next_tokens = [self._sample(logits[row], r) for row, r in enumerate(active)]
            keep = []
            for row, (request, token) in enumerate(zip(active, next_tokens)):
                request.token_ids.append(token)
                request.logprobs.append(float(log_probs[row, token]))
                reason, stop_text = self._finished(request, token)
                if reason is None:
                    keep.append(row)
                else:
                    yield request, GenerationResult(
                        request.token_ids, request.logprobs, reason, stop_text, version
                    )
            if not keep:
                return
            tokens = torch.tensor(next_tokens, device=device).unsqueeze(-1)
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                past.batch_select_indices(index)
                attention_mask = attention_mask.index_select(0, index)
                tokens = tokens.index_select(0, index)
                active = [active[row] for row in keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=-1)
            step_ids = tokens

    @staticmethod
    def _sample(logits: torch.Tensor, request: _Request) -> int:
        params = request.params
        if params.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = sorted_probs.cumsum(-1)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            sorted_probs[(cumulative - sorted_probs) >= params.top_p] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=request.generator))

    def _finished(self, request: _Request, token: int) -> tuple[str | None, str | None]:
        params = request.params
        if token in self.eos_token_ids:
            return "eos", None
        if params.stop:
            longest = max(len(s) for s in params.stop)
            # Decode only a tail long enough to hold any stop string (tokens hold >= 1 char).
            tail = self.tokenizer.decode(request.token_ids[-(longest + 2) :], skip_special_tokens=False)
            for stop in params.stop:
                if stop in tail:
                    return "stop", stop
        if len(request.token_ids) >= params.max_new_tokens:
            return "length", None
        return None, None


def _resolve(future: asyncio.Future, result: GenerationResult) -> None:
    if not future.done():
        future.set_result(result)
