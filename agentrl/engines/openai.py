"""An engine that samples from any OpenAI-compatible server (vLLM, SGLang, ...) over HTTP.

Token faithfulness needs the server to take token ids in and give token ids out, so this engine
uses the legacy completions endpoint, ``POST {base_url}/v1/completions``, and asks for:

* ``prompt``: the prompt as a list of token ids (vLLM and SGLang accept this);
* ``logprobs: 0`` with ``return_tokens_as_token_ids: true`` (vLLM): ``choices[0].logprobs.tokens``
  then holds ``"token_id:<id>"`` strings, one per sampled token, alongside ``token_logprobs``;
* ``include_stop_str_in_output: true`` and ``skip_special_tokens: false``, so the sampled ids up to
  and including the stop string (or the EOS token) come back;
* ``seed`` per request.

``finish_reason`` maps as: ``length`` -> ``length``; ``stop`` with a string ``stop_reason`` (vLLM
reports the matched stop string there) -> ``stop``; ``stop`` otherwise -> ``eos``; ``abort`` ->
``abort``. A server that does not return token ids is refused with a clear error rather than
re-tokenising its text. Connection failures and 5xx/429 answers are retried; when the retries are
spent the engine raises :class:`~agentrl.tool.InfraError`, which marks the trajectory ``infra_error``.

The server owns the weights: :meth:`OpenAIEngine.update_weights` only advances the policy version
after the server has loaded new weights (e.g. through vLLM's weight-reload endpoint).
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from agentrl.engines.base import GenerationResult, SamplingParams
from agentrl.tool import InfraError

TOKEN_PREFIX = "token_id:"


class EngineRequestError(RuntimeError):
    """The server refused the request (4xx) or answered something this engine cannot use."""


def _transient(error: BaseException) -> bool:
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code >= 500 or error.response.status_code == 429
    return isinstance(error, httpx.TransportError)


class OpenAIEngine:
    """``OpenAIEngine(base_url, model)``; ``api_key`` defaults to ``$OPENAI_API_KEY`` if set."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout_s: float = 600.0, attempts: int = 4, max_connections: int = 256) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.policy_version = 0
        self.attempts = attempts
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout_s,
                                         limits=httpx.Limits(max_connections=max_connections))

    def request_body(self, prompt_ids: list[int], params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": list(prompt_ids), "max_tokens": params.max_new_tokens, "temperature": params.temperature,
            "top_p": params.top_p, "logprobs": 0, "return_tokens_as_token_ids": True,
            "include_stop_str_in_output": True, "skip_special_tokens": False,
        }
        if self.model:
            body["model"] = self.model
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        version = self.policy_version
        body = self.request_body(prompt_ids, params)
        try:
            async for attempt in AsyncRetrying(stop=stop_after_attempt(self.attempts), retry=retry_if_exception(_transient),
                                               wait=wait_exponential(multiplier=0.2, max=5.0), reraise=True):
                with attempt:
                    response = await self._client.post("/v1/completions", json=body)
                    response.raise_for_status()
        except httpx.HTTPStatusError as error:
            if not _transient(error):
                raise EngineRequestError(f"{self.base_url}/v1/completions answered {error.response.status_code}: "
                                         f"{error.response.text[:500]}") from None
            raise InfraError(f"the inference server failed {self.attempts} times: {error}") from error
        except httpx.TransportError as error:
            raise InfraError(f"the inference server at {self.base_url} is unreachable: {error!r}") from error
        return parse_completion(response.json(), version)

    def update_weights(self, state_dict: dict | None = None) -> None:
        if state_dict is not None:
            raise ValueError("an OpenAI-compatible server loads its own weights; reload them on the server, "
                             "then call update_weights() without arguments to advance the policy version")
        self.policy_version += 1

    async def close(self) -> None:
        await self._client.aclose()


def parse_completion(payload: dict[str, Any], policy_version: int = 0) -> GenerationResult:
    """A :class:`GenerationResult` from a completions response with token ids and logprobs."""
    try:
        choice = payload["choices"][0]
        logprobs = choice.get("logprobs") or {}
        tokens, token_logprobs = logprobs.get("tokens"), logprobs.get("token_logprobs")
    except (KeyError, IndexError, TypeError) as error:
        raise EngineRequestError(f"not a completions response: {str(payload)[:300]}") from error
    if tokens is None or token_logprobs is None:
        raise EngineRequestError("the server returned no logprobs; it must support 'logprobs' on /v1/completions")
    if any(not isinstance(t, str) or not t.startswith(TOKEN_PREFIX) for t in tokens):
        raise EngineRequestError("the server returned token strings, not ids; it must support "
                                 "'return_tokens_as_token_ids' (vLLM does) so that sampled ids are kept exactly")
    ids = [int(t[len(TOKEN_PREFIX):]) for t in tokens]
    values = [float(v) if v is not None else 0.0 for v in token_logprobs]
    reason, stop_reason = choice.get("finish_reason"), choice.get("stop_reason")
    if reason == "length":
        finish, stop_text = "length", None
    elif reason == "abort":
        finish, stop_text = "abort", None
    elif isinstance(stop_reason, str):
        finish, stop_text = "stop", stop_reason
    else:
        finish, stop_text = "eos", None
    return GenerationResult(ids, values, finish, stop_text, policy_version)
