"""The log-probability of a token under the distribution it was actually sampled from.

The engine samples from ``softmax(z / T)`` restricted to the top-p nucleus; importance ratios and
PPO's ratio are only right if the recorded behaviour logprob and the trainer's logprob are those of
that same distribution. Both the engine and the trainer's forward pass call :func:`sampling_logprobs`.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def tempered_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``z / T`` in fp32; ``T <= 0`` (greedy decoding) scores at ``T = 1``."""
    logits = logits.float()
    return logits / temperature if temperature > 0 and temperature != 1.0 else logits


def sampling_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """``log mu(a)`` for tokens ``a`` sampled with temperature ``T`` and nucleus ``p`` (nucleus
    sampling, Holtzman et al. 2020)::

        q = softmax(z / T),   N_p = smallest prefix of tokens by descending q with sum_N q >= p
        mu(a) = q_a / sum_{v in N_p} q_v       for a in N_p

    ``logits`` is ``(..., V)`` and ``tokens`` ``(...)``. The scored token always counts as part of
    the nucleus: for the policy that sampled it that is exact, and for a later policy in which it
    dropped out of the nucleus (true logprob ``-inf``) it keeps the ratio finite.
    """
    z = tempered_logits(logits, temperature)
    # gather minus logsumexp: no second (B, T, V) tensor, which would dominate a CPU step's memory
    chosen = z.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    if top_p >= 1.0:
        return chosen
    q = torch.softmax(z, dim=-1)
    sorted_q, _ = torch.sort(q, dim=-1, descending=True)
    kept = (sorted_q.cumsum(-1) - sorted_q) < top_p  # the first token always stays, as in the engine
    nucleus_mass = (sorted_q * kept).sum(-1)
    # membership by rank, as the engine keeps tokens: the mass ranked above the token is below p
    # (comparing q_a with the smallest kept q would misplace the boundary token by rounding)
    chosen_q = q.gather(-1, tokens.long().unsqueeze(-1))
    above = torch.where(q > chosen_q, q, torch.zeros_like(q)).sum(-1)
    chosen_q = chosen_q.squeeze(-1)
    mass = torch.where(above < top_p, nucleus_mass, nucleus_mass + chosen_q)
    return chosen - torch.log(mass)
