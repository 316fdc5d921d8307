"""tca_flex: TCA-Attention (training-free context-adaptive sparse attention) on FlexAttention.

Typical use::

    model = tca_flex.apply(model, budgets=tca_flex.HeadBudgets.load("budgets.json"))
    model = torch.compile(model)
"""

from .budgets import HeadBudgets
from .config import TCAConfig
from .fidelity import FidelityReport, report
from .integration import apply, remove

__all__ = ["FidelityReport", "HeadBudgets", "TCAConfig", "apply", "remove", "report"]
__version__ = "0.1.0"
