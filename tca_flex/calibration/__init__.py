"""Offline head-specific calibration: per-head budgets from one forward pass.

``calibrate(model, input_ids, config)`` returns ``HeadBudgets``; save them with
``HeadBudgets.save`` and pass the file to ``tca_flex.apply``. Command line::

    python -m tca_flex.calibration --model smollm2 --text FILE --tokens N --out budgets.json

Modules: ``candidates`` (candidate distributions, the per-head choice),
``scoring`` (retained mass of every candidate on one layer, chunked),
``forward`` (the capturing forward pass), ``__main__`` (the CLI).
"""

from .candidates import (
    DENSE,
    CandidateScores,
    budgets_from_scores,
    candidate_distributions,
    choose_candidates,
)
from .forward import calibrate, min_calibration_tokens, score_candidates

__all__ = ["DENSE", "CandidateScores", "budgets_from_scores", "calibrate", "candidate_distributions",
           "choose_candidates", "min_calibration_tokens", "score_candidates"]
