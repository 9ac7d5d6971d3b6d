"""An engine that samples from a vLLM or SGLang server over HTTP, token ids in and token ids out.

Token faithfulness needs the server to take the prompt as token ids and to return the sampled ids
themselves, never text to re-tokenise. Each server's own wire format is used:

* ``server="vllm"``: ``POST /v1/completions`` with ``prompt`` as a list of ids, ``logprobs: 0`` and
  ``return_token_ids: true`` (vLLM >= 0.10 then puts ``token_ids`` and ``prompt_token_ids`` on each
  choice; ``return_tokens_as_token_ids`` is also sent, so an older vLLM's ``"token_id:<id>"``
  logprob tokens are read when ``token_ids`` is missing), ``include_stop_str_in_output: true``,
  ``skip_special_tokens: false`` and a per-request ``seed``. ``finish_reason`` ``stop`` with a
  string ``stop_reason`` (the matched stop string) is a stop; ``stop`` with an int or ``None``
  (an EOS or stop token) is an EOS; ``length`` and ``abort`` map to themselves.
* ``server="sglang"``: SGLang's native ``POST /generate`` with ``input_ids``, ``sampling_params``
  (``max_new_tokens``, ``stop``, ``no_stop_trim: true``, ``skip_special_tokens: false``) and
  ``return_logprob: true``; the ids are ``output_ids`` (or the ids in
  ``meta_info.output_token_logprobs``), the logprobs ``meta_info.output_token_logprobs``, and
  ``meta_info.finish_reason`` is ``{"type": "stop", "matched": "<stop string>" | <token id>}``,
  ``{"type": "length"}`` or ``{"type": "abort"}``.

A server that returns no token ids, or that tokenised the prompt into other ids than the ones
sent, is refused with :class:`EngineRequestError` saying what to change; the rollout marks that
trajectory ``engine_error``. Connection failures and 5xx/429 answers are retried; when the retries
are spent the engine raises :class:`~agentrl.tool.InfraError` (``infra_error``).

``max_tokens`` is clamped to the server's context length (``max_model_len``: given, or read once
from ``/v1/models``). Each event loop gets its own HTTP client, so one engine serves several
``asyncio.run`` calls.

Weights: the server owns them. This process cannot load weights into it, so
:meth:`OpenAIEngine.update_weights` refuses rather than pretend; whoever reloads the server's
weights (a weight-sync hook, a restart from a checkpoint) tells the engine which policy version
it now serves with :meth:`OpenAIEngine.set_policy_version`, and every result carries that version,
which is what a trainer needs to weight stale tokens.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Literal

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from agentrl.engines.base import GenerationResult, SamplingParams
from agentrl.tool import InfraError

TOKEN_PREFIX = "token_id:"


class EngineRequestError(RuntimeError):
    """The server refused the request (4xx) or answered something this engine cannot use."""


class WeightSyncError(RuntimeError):
    """This engine cannot put new weights into the server that samples for it."""


def _transient(error: BaseException) -> bool:
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code >= 500 or error.response.status_code == 429
    return isinstance(error, httpx.TransportError)


class OpenAIEngine:
    """``OpenAIEngine(base_url, model, server="vllm" | "sglang")``; ``api_key`` defaults to
    ``$OPENAI_API_KEY`` if set."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout_s: float = 600.0, attempts: int = 4, max_connections: int = 256,
                 server: Literal["vllm", "sglang"] = "vllm", max_model_len: int | None = None) -> None:
        if server not in ("vllm", "sglang"):
            raise ValueError(f"server must be 'vllm' or 'sglang', not {server!r}")
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.server = server
        self.policy_version = 0
        self.max_model_len = max_model_len
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]] = {}
        self._model_info_read = max_model_len is not None

    # -- requests ----------------------------------------------------------------------------

    def request_body(self, prompt_ids: list[int], params: SamplingParams) -> dict[str, Any]:
        max_tokens = self._max_tokens(prompt_ids, params)
        if self.server == "sglang":
            sampling: dict[str, Any] = {
                "max_new_tokens": max_tokens, "temperature": params.temperature, "top_p": params.top_p,
                "no_stop_trim": True, "skip_special_tokens": False,
            }
            if params.stop:
                sampling["stop"] = list(params.stop)
            if params.seed is not None:
                sampling["sampling_seed"] = params.seed
            return {"input_ids": list(prompt_ids), "sampling_params": sampling, "return_logprob": True,
                    "logprob_start_len": -1}
        body: dict[str, Any] = {
            "prompt": list(prompt_ids), "max_tokens": max_tokens, "temperature": params.temperature,
            "top_p": params.top_p, "logprobs": 0, "return_token_ids": True, "return_tokens_as_token_ids": True,
            "include_stop_str_in_output": True, "skip_special_tokens": False,
        }
        if self.model:
            body["model"] = self.model
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    def _max_tokens(self, prompt_ids: list[int], params: SamplingParams) -> int:
        if self.max_model_len is None:
            return params.max_new_tokens
        return min(params.max_new_tokens, self.max_model_len - len(prompt_ids))

    @property
    def path(self) -> str:
        return "/generate" if self.server == "sglang" else "/v1/completions"

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        version = self.policy_version
        await self._read_model_info()
        body = self.request_body(prompt_ids, params)
        if body.get("max_tokens", body.get("sampling_params", {}).get("max_new_tokens", 1)) <= 0:
            return GenerationResult([], [], "length", policy_version=version)  # the context is full
        payload = await self._post(self.path, body)
        if self.server == "sglang":
            return parse_sglang(payload, version)
        return parse_completion(payload, version, prompt_ids)

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        client = self._client()
        try:
            async for attempt in AsyncRetrying(stop=stop_after_attempt(self.attempts), retry=retry_if_exception(_transient),
                                               wait=wait_exponential(multiplier=0.2, max=5.0), reraise=True):
                with attempt:
                    response = await client.post(path, json=body)
                    response.raise_for_status()
        except httpx.HTTPStatusError as error:
            if not _transient(error):
                raise EngineRequestError(f"{self.base_url}{path} answered {error.response.status_code}: "
                                         f"{error.response.text[:500]}") from None
            raise InfraError(f"the inference server failed {self.attempts} times: {error}") from error
        except httpx.TransportError as error:
            raise InfraError(f"the inference server at {self.base_url} is unreachable: {error!r}") from error
        try:
            return response.json()
        except ValueError:
            raise EngineRequestError(f"{self.base_url}{path} answered something that is not JSON: "
                                     f"{response.text[:300]!r}") from None

    async def _read_model_info(self) -> None:
        """``max_model_len`` from ``/v1/models`` (vLLM and SGLang list it), once; absent is fine."""
        if self._model_info_read:
            return
        self._model_info_read = True
        try:
            response = await self._client().get("/v1/models")
            models = response.json().get("data", []) if response.status_code == 200 else []
        except (httpx.HTTPError, ValueError, AttributeError):
            return
        for entry in models:
            if isinstance(entry, dict) and isinstance(entry.get("max_model_len"), int) and \
                    (self.model is None or entry.get("id") == self.model):
                self.max_model_len = entry["max_model_len"]
                return

    def _client(self) -> httpx.AsyncClient:
        """This event loop's client: an ``httpx.AsyncClient`` binds to the loop that first uses it."""
        loop = asyncio.get_running_loop()
        for key, (other, _) in list(self._clients.items()):
            if other.is_closed():
                del self._clients[key]
        if id(loop) not in self._clients:
            client = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self.timeout_s,
                                       limits=httpx.Limits(max_connections=self.max_connections))
            self._clients[id(loop)] = (loop, client)
        return self._clients[id(loop)][1]

    # -- weights -----------------------------------------------------------------------------

    def update_weights(self, state_dict: dict | None = None) -> None:
        raise WeightSyncError(
            f"the {self.server} server at {self.base_url} owns its weights and this engine cannot load any into it; "
            "reload them on the server (its weight-update endpoint, or a restart from the checkpoint), then call "
            "engine.set_policy_version(version) so that results carry the version the server now samples from")

    def set_policy_version(self, version: int) -> None:
        """Record that the server now serves the policy of ``version`` (after its weights were reloaded)."""
        if version < self.policy_version:
            raise ValueError(f"policy version {version} is older than the current {self.policy_version}")
        self.policy_version = version

    async def close(self) -> None:
        entry = self._clients.pop(id(asyncio.get_running_loop()), None)
        if entry is not None:
            await entry[1].aclose()


def parse_completion(payload: dict[str, Any], policy_version: int = 0,
                     prompt_ids: list[int] | None = None) -> GenerationResult:
    """A :class:`GenerationResult` from a vLLM completions response with token ids and logprobs."""
    try:
        choice = payload["choices"][0]
        logprobs = choice.get("logprobs") or {}
        tokens, token_logprobs = logprobs.get("tokens"), logprobs.get("token_logprobs")
    except (KeyError, IndexError, TypeError, AttributeError) as error:
        raise EngineRequestError(f"not a completions response: {str(payload)[:300]}") from error
    served_prompt = choice.get("prompt_token_ids", payload.get("prompt_token_ids"))
    if prompt_ids is not None and served_prompt is not None and list(served_prompt) != list(prompt_ids):
        raise EngineRequestError("the server sampled from other prompt ids than the ones sent (it re-tokenised the "
                                 "prompt); send the prompt as a list of token ids to a server that takes them as they are")
    ids = choice.get("token_ids")
    if ids is None and tokens is not None and all(isinstance(t, str) and t.startswith(TOKEN_PREFIX) for t in tokens):
        ids = [int(t[len(TOKEN_PREFIX):]) for t in tokens]
    if ids is None:
        raise EngineRequestError("the server returned no token ids; it must support 'return_token_ids' (vLLM >= 0.10) "
                                 "or 'return_tokens_as_token_ids', so that sampled ids are kept exactly; for SGLang "
                                 "use server='sglang'")
    if token_logprobs is None:
        raise EngineRequestError("the server returned no logprobs; it must support 'logprobs' on /v1/completions")
    if len(token_logprobs) != len(ids):
        raise EngineRequestError(f"the server returned {len(ids)} token ids but {len(token_logprobs)} logprobs")
    values = [float(v) if v is not None else 0.0 for v in token_logprobs]
    finish, stop_text = _finish(choice.get("finish_reason"), choice.get("stop_reason"))
    return GenerationResult([int(i) for i in ids], values, finish, stop_text, policy_version)


def _finish(kind: Any, matched: Any) -> tuple[str, str | None]:
    """A server's finish kind and matched stop (a string for a stop string, else an id or None) ->
    this project's ``(finish_reason, stop_text)``."""
    if kind in ("length", "abort"):
        return kind, None
    if isinstance(matched, str):
        return "stop", matched
    return "eos", None


def parse_sglang(payload: dict[str, Any], policy_version: int = 0) -> GenerationResult:
    """A :class:`GenerationResult` from an SGLang ``/generate`` response with ``return_logprob``."""
    if isinstance(payload, list) and len(payload) == 1:
        payload = payload[0]
    try:
        meta = payload["meta_info"]
        entries = meta.get("output_token_logprobs")
        finish_reason = meta.get("finish_reason") or {}
    except (KeyError, TypeError, AttributeError) as error:
        raise EngineRequestError(f"not an SGLang /generate response: {str(payload)[:300]}") from error
    if entries is None:
        raise EngineRequestError("the server returned no meta_info.output_token_logprobs; send return_logprob=true "
                                 "to SGLang's /generate")
    ids = payload.get("output_ids")
    if ids is None:
        ids = [entry[1] for entry in entries]
    if len(ids) != len(entries) or any(not isinstance(i, int) for i in ids):
        raise EngineRequestError("the server returned no usable token ids (output_ids); SGLang's /generate returns "
                                 "them for an input_ids request")
    values = [float(entry[0]) if entry[0] is not None else 0.0 for entry in entries]
    kind = finish_reason.get("type") if isinstance(finish_reason, dict) else finish_reason
    matched = finish_reason.get("matched") if isinstance(finish_reason, dict) else None
    finish, stop_text = _finish(kind, matched)
    return GenerationResult([int(i) for i in ids], values, finish, stop_text, policy_version)
