"""Candidate budget distributions and the per-head choice among them (pure functions).

Calibration tries ``M`` candidate distributions over per-block keep counts
``k in {0..b}``, from very sparse to nearly dense, and keeps per head the
cheapest one that retains at least ``tau`` of the attention mass
(docs/method.md, "Budgets and calibration").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..budgets import HeadBudgets
from ..config import TCAConfig

DENSE = -1  # candidate index recorded for a head that keeps everything


def candidate_distributions(block_size: int, num_candidates: int, sigma: float) -> torch.Tensor:
    """Discretised log-Gaussian budget distributions, sparsest first.

    Candidate ``m`` is a log-normal variable ``X`` with ``ln X ~ N(mu_m, sigma^2)``,
    ``mu_m`` evenly spaced from ``ln 1`` to ``ln b`` (``M = 1``: ``ln 1`` only).
    It is discretised by rounding to the nearest integer: ``p(k) = P(k - 0.5 <=
    X < k + 0.5)``; ``X < 0.5`` counts as ``k = 0`` and the upper tail
    ``X >= b - 0.5`` as ``k = b``, so each row sums to 1 without renormalising
    and no mass is lost. A larger ``mu`` stochastically dominates a smaller one,
    so every budget ladder (quantiles) grows with ``m``: the simulated kept
    sets are nested and the retained mass is non-decreasing in ``m``.

    Args:
        block_size: ``b``.
        num_candidates: ``M``.
        sigma: spread of ``ln X``.

    Returns:
        float64 ``[M, b + 1]``, rows sum to 1, expected keep count increasing in ``m``.
    """
    if block_size < 1 or num_candidates < 1 or not sigma > 0:
        raise ValueError(f"need block_size >= 1, num_candidates >= 1, sigma > 0; got "
                         f"{block_size}, {num_candidates}, {sigma}")
    mu = torch.linspace(0.0, math.log(block_size), num_candidates, dtype=torch.float64)
    # Upper bin edges k + 0.5 for k = 0..b-1; the last bin takes the rest.
    edges = torch.arange(block_size, dtype=torch.float64) + 0.5
    cdf = torch.special.ndtr((edges.log()[None, :] - mu[:, None]) / sigma)
    cdf = torch.cat([cdf, torch.ones(num_candidates, 1, dtype=torch.float64)], dim=-1)
    return torch.diff(cdf, dim=-1, prepend=torch.zeros(num_candidates, 1, dtype=torch.float64))


@dataclass(frozen=True)
class CandidateScores:
    """What calibration measured for every candidate on every head.

    Attributes:
        retained: float64 ``[layers, kv_heads, M]``, retained attention mass
            (criterion ``config.mass_criterion``, mean over the KV head's ``g``
            query heads).
        kept_fraction: float64 ``[layers, kv_heads, M]``, simulated fraction of
            global-region tokens the candidate kept on the calibration text.
        candidates: float64 ``[M, b + 1]`` from ``candidate_distributions``.
        config: the TCAConfig used.
        fingerprint: the model's fingerprint (``integration.model_fingerprint``).
        notes: how the scores were made (tokens, query sampling).
    """

    retained: torch.Tensor
    kept_fraction: torch.Tensor
    candidates: torch.Tensor
    config: TCAConfig
    fingerprint: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


def choose_candidates(retained: torch.Tensor, kept_fraction: torch.Tensor, tau: float) -> torch.Tensor:
    """Per head, the candidate keeping the fewest tokens whose retained mass is ``>= tau``.

    Ties go to the lower index (the sparser distribution). Raising ``tau``
    only removes candidates from the passing set, so the chosen kept fraction
    never shrinks (a dense head, ``DENSE``, keeps everything).

    Args:
        retained: float ``[..., M]``; kept_fraction: float ``[..., M]``.
        tau: required retained mass.

    Returns:
        int64 ``[...]``: candidate index, or ``DENSE`` (-1) where none passes.
    """
    passing = retained >= tau
    cost = kept_fraction.to(torch.float64).masked_fill(~passing, math.inf)
    best = cost.argmin(-1)  # first minimum: ties go to the sparser candidate
    return torch.where(passing.any(-1), best, torch.full_like(best, DENSE))


def budgets_from_scores(scores: CandidateScores, tau: float | None = None) -> HeadBudgets:
    """Turn measured scores into HeadBudgets for ``tau`` (default ``scores.config.tau``).

    A head where no candidate passes keeps every token (``p`` = delta at
    ``b``), records candidate ``DENSE`` and retained mass 1 (what it retains
    when run).
    """
    config = scores.config if tau is None else scores.config.replace(tau=tau)
    choice = choose_candidates(scores.retained, scores.kept_fraction, config.tau)
    dense = choice == DENSE
    b = config.block_size
    delta_b = torch.zeros(b + 1, dtype=torch.float64)
    delta_b[b] = 1.0
    probs = scores.candidates[choice.clamp(min=0)]
    probs = torch.where(dense[..., None], delta_b, probs)
    mass = scores.retained.gather(-1, choice.clamp(min=0)[..., None]).squeeze(-1)
    mass = torch.where(dense, torch.ones_like(mass), mass).to(torch.float64)
    return HeadBudgets(probs=probs, config=config, retained_mass=mass, candidate=choice,
                       fingerprint=dict(scores.fingerprint), notes=dict(scores.notes))
