"""tca_flex: TCA-Attention (training-free context-adaptive sparse attention) on FlexAttention.

Typical use::

    model = tca_flex.apply(model, budgets=tca_flex.HeadBudgets.load("budgets.json"))
    model = torch.compile(model)
    out = model.generate(ids, past_key_values=tca_flex.TCACache(model), max_new_tokens=64)
"""

from .budgets import HeadBudgets
from .cache import TCACache
from .config import TCAConfig
from .integration import apply, remove

__all__ = ["HeadBudgets", "TCACache", "TCAConfig", "apply", "remove"]
__version__ = "0.1.0"
