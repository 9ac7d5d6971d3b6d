"""The transformers engine: batched sampling on the CPU (or one GPU) behind an async interface.
It samples wherever the model's weights are (the local trainer's ``trainer.device``).

Each ``generate`` call enqueues a request and awaits its result. A background task gathers whatever
requests are waiting (up to ``max_batch_size``), and the engine's own decode thread runs them as a
single left-padded batch with a KV cache, one forward pass per token for the whole batch. The thread
is the engine's alone, not one of the event loop's default pool, where synchronous tools run: a tool
stuck in a thread can never hold up generation. Rows that finish, and rows whose request was
cancelled, leave the batch at the next step (their cache rows are dropped), so short answers do not
pay for long ones and an abandoned request stops costing compute; the cache then narrows to the
longest live row, so a batch that lives long under steady traffic does not keep the width of rows
long gone. The event loop stays free for tool calls while the batch decodes. Requests that arrive
while a batch decodes join it at the next step (continuous batching): they are prefilled on their
own and their KV cache is stacked onto the running one.

Prompts prefilled together compute the tokens they all open with once (the chat template's system
turn, a task's instructions, a group's question): that prefix's cache is shared by every row and
only each row's own tokens are prefilled. On the CPU in float32 the forward passes run through
oneDNN with packed weights (:mod:`agentrl.engines.packed`), repacked whenever a weight changes.

A vision-language model's request carries its images (:class:`agentrl.multimodal.ImageInputs`:
each image's processed tensors, in the order of their blocks of image tokens in the prompt ids).
They enter the prefill only: the rows' tensors are stacked in row order, the order the model fills
image tokens in across a batch, and afterwards the KV cache holds what the model saw.

Logprobs are those of the distribution each token was drawn from (the request's temperature and
top-p, :func:`agentrl.algos.sampling.sampling_logprobs`; greedy requests score at temperature 1): the
same quantity the trainer's forward pass computes, so importance ratios start at 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import queue
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicLayer

from agentrl.algos.sampling import sampling_logprobs
from agentrl.engines import packed
from agentrl.engines.base import GenerationResult, SamplingParams
from agentrl.multimodal import ImageInputs, mask_unsampled, model_inputs, unsampled_token_ids

MIN_SHARED_PREFIX = 8  # a shorter common prefix is prefilled with each row


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    future: asyncio.Future
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    generator: torch.Generator | None = None
    images: ImageInputs | None = None


class HFEngine:
    """Dynamic batching over a transformers causal LM. Implements :class:`agentrl.engines.base.Engine`."""

    def __init__(self, model, tokenizer, max_batch_size: int = 32, batch_wait_s: float = 0.002,
                 packed_weights: bool | None = None):
        """``packed_weights``: decode float32 on the CPU through oneDNN with packed weights
        (:mod:`agentrl.engines.packed`); ``None`` uses them where they apply."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.policy_version = 0
        # prompt + response never exceed it (the rollout clamps every turn to what is left)
        self.max_model_len: int | None = getattr(model.config, "max_position_embeddings", None) or getattr(
            getattr(model.config, "text_config", None), "max_position_embeddings", None)  # vision-language models
        self.batch_sizes: Counter[int] = Counter()  # requests each batch started with
        self.forward_calls = 0
        self.joined = 0  # requests that joined a batch already decoding
        self.rows_cancelled = 0  # rows dropped mid-decode because their request was cancelled
        self.prefill_tokens = 0  # prompt positions run through the model (a shared prefix counts once)
        self.cache_width = 0  # columns of the running batch's KV cache (0 between batches)
        self._decode_thread: ThreadPoolExecutor | None = None
        self._running: asyncio.Future | None = None  # the batch decoding now, on the decode thread
        self._joining: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._update_pending = threading.Event()  # stop admitting joiners so the batch drains
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos_ids.add(tokenizer.eos_token_id)
        self.eos_token_ids = {int(t) for t in eos_ids if t is not None}
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        # transformers 5 renamed `past_key_values` to `cache`; accept either.
        forward_parameters = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_parameters else "past_key_values"
        self.unsampled_token_ids = unsampled_token_ids(model)  # a vision-language model's image placeholder
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task | None = None
        self._weights_lock = threading.Lock()
        parameter = next(model.parameters())
        applies = parameter.device.type == "cpu" and parameter.dtype == torch.float32 and packed.available()
        self.packed = packed.PackedLinears() if (applies if packed_weights is None else packed_weights) else None

    # -- public API ------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       images: ImageInputs | None = None) -> GenerationResult:
        """``images``: the pixel inputs of the image blocks in ``prompt_ids`` (vision-language models)."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: a request needs at least one token")
        if params.max_new_tokens <= 0:
            return GenerationResult([], [], "length", policy_version=self.policy_version)
        self._ensure_worker()
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(list(prompt_ids), params, future, images=images if images else None))
        return await future

    def update_weights(self, state_dict: dict | None = None) -> None:
        """Load new weights in place (between batches), or, when the engine shares the trainer's
        module, only mark that the policy changed.

        A running batch stops taking new requests and finishes with the weights it started
        with; its results carry the old ``policy_version``. Requests waiting to join it run on
        the new weights.
        """
        self._update_pending.set()
        try:
            with self._weights_lock:
                if state_dict is not None:
                    self.model.load_state_dict(state_dict)
                self.policy_version += 1
        finally:
            self._update_pending.clear()

    async def drain(self) -> None:
        """Wait until no batch is decoding. A trainer that cancels a step's unfinished requests
        (partial rollouts) calls it before updating the module the engine shares: the rows of
        cancelled requests leave at the next step, and then the decode thread is idle."""
        while self._running is not None and not self._running.done():
            await asyncio.wait({self._running})

    def release_memory(self) -> None:
        """Before the trainer's update: free what the update makes stale (the packed copies of the
        weights it trains), so they do not sit beside the update's activations."""
        if self.packed is not None:
            with self._weights_lock:
                self.packed.release_trainable()

    async def close(self) -> None:
        while not self._joining.empty():
            self._joining.get_nowait().future.cancel()
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
            self._queue = None
        if self._decode_thread is not None:
            self._decode_thread.shutdown(wait=False)  # a batch still running finishes on its own
            self._decode_thread = None

    # -- batching --------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._serve())

    async def _serve(self) -> None:
        assert self._queue is not None
        # One pending `get` is kept across iterations: cancelling a `get` that races a `put` could
        # drop a request, and a cancelled get could swallow this task's own cancellation.
        pending: asyncio.Task | None = None
        try:
            while True:
                batch = []
                # Requests handed to a batch that ended before admitting them go first.
                while len(batch) < self.max_batch_size and not self._joining.empty():
                    batch.append(self._joining.get_nowait())
                if not batch:
                    if pending is None:
                        pending = asyncio.ensure_future(self._queue.get())
                    batch.append(await pending)
                    pending = None
                    # Let coroutines that are about to submit do so, then take everything waiting.
                    await asyncio.sleep(self.batch_wait_s)
                while len(batch) < self.max_batch_size and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                batch = [r for r in batch if not r.future.cancelled()]
                if not batch:
                    continue
                if self._decode_thread is None:
                    self._decode_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentrl-hf-decode")
                running = asyncio.get_running_loop().run_in_executor(self._decode_thread, self._run_batch, batch)
                self._running = running
                # While the batch decodes, requests that arrive join it at the next step.
                while not running.done():
                    if pending is None:
                        pending = asyncio.ensure_future(self._queue.get())
                    await asyncio.wait({running, pending}, return_when=asyncio.FIRST_COMPLETED)
                    if pending.done():
                        self._joining.put(pending.result())
                        pending = None
        finally:
            if pending is not None:
                pending.cancel()

    def _run_batch(self, batch: list[_Request]) -> None:
        loop = batch[0].future.get_loop()
        admitted: list[_Request] = []
        try:
            with self._weights_lock, torch.inference_mode(), self.packed or contextlib.nullcontext():
                version = self.policy_version
                self.batch_sizes[len(batch)] += 1
                for request, result in self._decode(batch, version, admitted):
                    loop.call_soon_threadsafe(_resolve, request.future, result)
        except Exception as error:  # a failed batch fails its requests, not the engine
            for request in admitted + batch:
                loop.call_soon_threadsafe(_fail, request.future, error)
        finally:
            self.cache_width = 0

    def _admit(
        self, waiting: list[_Request], room: int, admitted: list[_Request]
    ) -> list[_Request]:
        """Requests to add to the running batch now: the initial ones, then any that arrived."""
        newcomers, waiting[:] = waiting[:room], waiting[room:]
        newcomers = [r for r in newcomers if not r.future.cancelled()]
        while (
            len(newcomers) < room
            and not self._update_pending.is_set()
            and not self._joining.empty()
        ):
            request = self._joining.get_nowait()
            if not request.future.cancelled():
                newcomers.append(request)
                self.joined += 1
        for request in newcomers:
            if request.params.seed is not None:
                request.generator = torch.Generator().manual_seed(request.params.seed)
        admitted += newcomers
        return newcomers

    def _decode(self, batch: list[_Request], version: int, admitted: list[_Request]):
        """Continuous batching. Yields ``(request, GenerationResult)`` as rows finish.

        Invariant between steps: ``past`` and ``attention_mask`` cover every token but the last
        sampled one of each active row, which waits in ``tokens``.
        """
        device = next(self.model.parameters()).device
        waiting = list(batch)
        active: list[_Request] = []
        past = attention_mask = tokens = None
        while True:
            newcomers = self._admit(waiting, self.max_batch_size - len(active), admitted)
            if newcomers:
                new_past, new_mask, logits = self._prefill(newcomers, device)
                new_tokens, keep, finished = self._step(newcomers, logits, version)
                keep = self._live(newcomers, keep)
                yield from finished
                if keep:
                    index = torch.tensor(keep, device=device)
                    if len(keep) < len(newcomers):
                        new_past.batch_select_indices(index)
                    past, attention_mask = _merge(
                        past, attention_mask, new_past, new_mask.index_select(0, index)
                    )
                    tokens = (
                        new_tokens.index_select(0, index)
                        if tokens is None
                        else torch.cat([tokens, new_tokens.index_select(0, index)])
                    )
                    active += [newcomers[i] for i in keep]
            if not active:
                if waiting or (not self._update_pending.is_set() and not self._joining.empty()):
                    continue
                return
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones((len(active), 1))], dim=-1
            )
            position_ids = (attention_mask.cumsum(-1) - 1)[:, -1:]
            output = self.model(
                input_ids=tokens.unsqueeze(-1),
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{self._cache_arg: past},
            )
            self.forward_calls += 1
            past = getattr(output, self._cache_arg)
            next_tokens, keep, finished = self._step(active, output.logits[:, -1, :], version)
            keep = self._live(active, keep)
            # the batch state is updated before the finished rows are resolved, so a caller
            # that sees its result never sees the cache it has just left
            if len(keep) < len(active):
                if not keep:
                    active, past, attention_mask, tokens = [], None, None, None
                    self.cache_width = 0
                    yield from finished
                    continue
                index = torch.tensor(keep, device=device)
                past.batch_select_indices(index)
                attention_mask = _compact(past, attention_mask.index_select(0, index))
                next_tokens = next_tokens.index_select(0, index)
                active = [active[i] for i in keep]
            tokens = next_tokens
            self.cache_width = attention_mask.shape[1]
            yield from finished

    def _live(self, requests: list[_Request], keep: list[int]) -> list[int]:
        """The rows of ``keep`` whose request is still awaited: a cancelled request's row leaves
        the batch now instead of decoding to its budget for nobody."""
        live = [row for row in keep if not requests[row].future.cancelled()]
        self.rows_cancelled += len(keep) - len(live)
        return live

    def _prefill(self, requests: list[_Request], device):
        """Prompt KV caches, attention masks and last-token logits of ``requests``.

        Prompts that open with the same tokens (the chat template's system turn, a task's
        instructions, a group's shared question) compute that prefix once: its cache is
        broadcast to every row and only each row's own suffix is prefilled, left-padded after the
        prefix. The padding sits inside the cache, masked out; position ids come from the mask.
        """
        shared = self._shared_prefix(requests)
        if shared:
            prefix = torch.tensor([requests[0].prompt_ids[:shared]], device=device)
            output = self.model(input_ids=prefix, use_cache=True, logits_to_keep=1, **{self._cache_arg: None})
            self.forward_calls += 1
            past = getattr(output, self._cache_arg)
            if all(type(layer) is DynamicLayer for layer in past.layers):
                self.prefill_tokens += shared
                for layer in past.layers:  # a view: the first decode step's concatenation copies it
                    layer.keys = layer.keys.expand(len(requests), -1, -1, -1)
                    layer.values = layer.values.expand(len(requests), -1, -1, -1)
                return self._forward_prompts(requests, device, shared, past)
        return self._forward_prompts(requests, device, 0, None)

    def _shared_prefix(self, requests: list[_Request]) -> int:
        """Tokens every prompt starts with, leaving each row one token of its own; 0 when it is
        too short to matter or a row carries images (their tensors enter the prefill whole)."""
        if len(requests) < 2 or any(r.images is not None for r in requests):
            return 0
        first = requests[0].prompt_ids
        shared = min(len(r.prompt_ids) for r in requests) - 1
        for request in requests[1:]:
            ids = request.prompt_ids
            shared = next((i for i in range(shared) if ids[i] != first[i]), shared)
        return shared if shared >= MIN_SHARED_PREFIX else 0

    def _forward_prompts(self, requests: list[_Request], device, shared: int, past):
        """Prefill each prompt after its first ``shared`` tokens, whose cache is ``past``."""
        width = max(len(r.prompt_ids) for r in requests) - shared
        input_ids = torch.full((len(requests), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(requests), shared + width), dtype=torch.long)
        attention_mask[:, :shared] = 1
        for row, request in enumerate(requests):
            own = request.prompt_ids[shared:]
            input_ids[row, width - len(own) :] = torch.tensor(own)
            attention_mask[row, shared + width - len(own) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        images = model_inputs([t for r in requests if r.images is not None for t in r.images.tensors], device)
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: past},
            **images,
        )
        self.forward_calls += 1
        self.prefill_tokens += input_ids.numel()
        return getattr(output, self._cache_arg), attention_mask, output.logits[:, -1, :]

    def _step(self, requests: list[_Request], logits: torch.Tensor, version: int):
        """Sample one token per row; return (tokens, rows still running, finished results)."""
        logits = mask_unsampled(logits, self.unsampled_token_ids)
        sampled = [self._sample(logits[row], request) for row, request in enumerate(requests)]
        keep, finished = [], []
        for row, (request, token) in enumerate(zip(requests, sampled)):
            request.token_ids.append(token)
            params = request.params  # the logprob of the distribution the token was drawn from
            request.logprobs.append(float(sampling_logprobs(logits[row], torch.tensor(token, device=logits.device),
                                                            params.temperature, params.top_p)))
            reason, stop_text = self._finished(request, token)
            if reason is None:
                keep.append(row)
            else:
                finished.append(
                    (
                        request,
                        GenerationResult(
                            request.token_ids, request.logprobs, reason, stop_text, version
                        ),
                    )
                )
        return torch.tensor(sampled, device=logits.device), keep, finished

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
        # Inverse-CDF sampling: one uniform draw and a binary search, exact like torch.multinomial
        # but ~30x cheaper over a 49k vocabulary (multinomial dominated the decode step).
        cdf = probs.cumsum(-1)
        draw = torch.rand((), generator=request.generator) * cdf[-1]
        return int(torch.searchsorted(cdf, draw, right=True).clamp(max=probs.numel() - 1))

    def _finished(self, request: _Request, token: int) -> tuple[str | None, str | None]:
        params = request.params
        if token in self.eos_token_ids:
            return "eos", None
        if params.stop:
            longest = max(len(s) for s in params.stop)
            # Decode only a tail long enough to hold any stop string (tokens hold >= 1 char).
            tail = self.tokenizer.decode(
                request.token_ids[-(longest + 2) :], skip_special_tokens=False
            )
            for stop in params.stop:
                if stop in tail:
                    return "stop", stop
        if len(request.token_ids) >= params.max_new_tokens:
            return "length", None
        return None, None


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _compact(past, mask: torch.Tensor) -> torch.Tensor:
    """Drop the cache columns the remaining rows do not attend to: left padding up to the length of
    rows that have left, and the padding a shared prefix left inside a row. Each row keeps its
    attended columns in order, right-aligned; masked columns add nothing to attention and position
    ids come from the mask, so outputs are unchanged while every later step attends over fewer
    columns."""
    width = int(mask.sum(dim=1).max())
    if width == mask.shape[1]:
        return mask
    first = int(mask.any(dim=0).int().argmax())
    if mask.shape[1] - first == width:  # the widest row has no hole: slicing the left padding is enough
        for layer in past.layers:
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]
        return mask[:, first:]
    # each row's attended columns last, in their order (a stable sort on the mask)
    order = torch.sort(mask, dim=1, stable=True).indices[:, -width:]
    for layer in past.layers:
        index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        layer.keys = torch.gather(layer.keys, 2, index)
        layer.values = torch.gather(layer.values, 2, index)
    return torch.gather(mask, 1, order)


def _merge(past, mask, new_past, new_mask):
    """Stack two KV caches (and their attention masks) along the batch, left-padding the shorter:
    padded positions are masked out and position ids come from the mask, so no row changes."""
    if past is None:
        return new_past, new_mask
    width = max(mask.shape[1], new_mask.shape[1])
    for layer, new_layer in zip(past.layers, new_past.layers):
        layer.keys = torch.cat(
            [_pad_left(layer.keys, width, 2), _pad_left(new_layer.keys, width, 2)]
        )
        layer.values = torch.cat(
            [_pad_left(layer.values, width, 2), _pad_left(new_layer.values, width, 2)]
        )
    return past, torch.cat([_pad_left(mask, width, 1), _pad_left(new_mask, width, 1)])


def _resolve(future: asyncio.Future, result: GenerationResult) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
