"""tca_flex: TCA-Attention (training-free context-adaptive sparse attention) on FlexAttention.

Typical use::

    budgets = tca_flex.calibrate(model, input_ids, tca_flex.TCAConfig(window=4096))
    budgets.save("budgets.json")
    model = tca_flex.apply(model, budgets="budgets.json")
    tca_flex.warmup(model, max_length=131072)  # compile once, before the first request
    model = tca_flex.compile(model)           # or torch.compile(model)
    out = model.generate(ids, cache=tca_flex.TCACache(model), max_new_tokens=64)  # or past_key_values=

Multi-turn: pass the same ``TCACache`` to the next ``generate`` with the
conversation so far plus the new message; ``chunked_prefill`` runs a long
prompt through the cache in chunks, and ``prefill_by_reconstruction`` selects
a first prompt that later turns will question by what repeating it reads
(``docs/chunked_prefill.md``).
"""

from .budgets import HeadBudgets, shipped_budgets
from .cache import TCACache
from .calibration import calibrate
from .chunked import chunked_prefill
from .config import TCAConfig
from .fidelity import FidelityReport, report
from .integration import apply, compile, remove  # noqa: A004 - the public name the design asks for
from .reconstruct import prefill_by_reconstruction
from .warmup import load_compile_cache, save_compile_cache, warmup

__all__ = ["FidelityReport", "HeadBudgets", "TCACache", "TCAConfig", "apply", "calibrate", "chunked_prefill",
           "compile", "load_compile_cache", "prefill_by_reconstruction", "remove", "report", "save_compile_cache",
           "shipped_budgets", "warmup"]
__version__ = "0.1.0"
