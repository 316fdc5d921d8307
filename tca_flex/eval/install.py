"""Install a ``KeepPolicy`` (``baselines.py``) on a transformers model.

The sanctioned hook only, as ``tca_flex.integration`` does: one attention
function registered through ``AttentionInterface``, a small mutable record
per attention module (the kept set lives there between prefill and decode,
because transformers does not pass the cache to the attention function), and
``set_attn_implementation`` to switch and to restore. Batch rows must be
unpadded (the function receives no attention mask).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface

from ..integration import attention_modules
from .baselines import masked_attention

ATTN_NAME = "tca_eval_kv"
_RECORD_ATTR = "_tca_eval_kv"


@dataclass
class LayerRecord:
    """Per-layer state: the policy and the kept set of the last prefill.

    Attributes:
        policy: a ``KeepPolicy`` (``prefill`` and ``decode_visible``).
        keep: bool ``[B, H_kv, L_prompt]`` or None before the first prefill.
        kept_fraction: mean of ``keep`` (fraction of prompt KV kept).
    """

    policy: Any
    keep: torch.Tensor | None = None
    kept_fraction: float = float("nan")


def kv_policy_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: torch.Tensor | None,
                                dropout: float = 0.0, scaling: float | None = None,
                                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry point: query ``[B, H_q, Lq, D]``, key/value
    ``[B, H_kv, Lk, D]`` (cache updated); returns ``([B, Lq, H_q, D], None)``.

    A call with ``Lq == Lk`` is a fresh prefill (policy output, kept set
    recorded); any other call attends to ``decode_visible`` of the kept set.
    """
    record: LayerRecord | None = getattr(module, _RECORD_ATTR, None)
    if record is None:
        raise RuntimeError(f"{type(module).__name__} runs attn_implementation={ATTN_NAME!r} without a "
                           "policy; use tca_flex.eval.install.install_policy")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q_len, k_len = query.shape[2], key.shape[2]
    if q_len == k_len:
        out, keep = record.policy.prefill(module, query, key, value, scale)
        record.keep = keep
        record.kept_fraction = keep.double().mean().item()
    else:
        if record.keep is None or record.keep.shape[-1] > k_len:
            raise RuntimeError("decode step without a matching prefill: run a fresh prefill first")
        keep = record.keep

        def visible(q_pos: torch.Tensor) -> torch.Tensor:
            return record.policy.decode_visible(keep, q_pos, k_len)

        out = masked_attention(query, key, value, visible, scale)
    return out.transpose(1, 2).contiguous(), None


def install_policy(model: torch.nn.Module, make_policy: Callable[[int], Any]) -> Callable[[], None]:
    """Switch ``model``'s attention to ``make_policy(layer_idx)`` per layer.

    Returns:
        A cleanup function that restores the previous attention implementation.
    """
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"found no attention modules in {type(model).__name__}")
    if any(hasattr(m, _RECORD_ATTR) for m in mods):
        raise ValueError("a KV policy is already installed on this model; call its cleanup first")
    AttentionInterface.register(ATTN_NAME, kv_policy_attention_forward)
    previous = model.config._attn_implementation
    for mod in mods:
        setattr(mod, _RECORD_ATTR, LayerRecord(policy=make_policy(mod.layer_idx)))
    model.set_attn_implementation(ATTN_NAME)

    def cleanup() -> None:
        for mod in mods:
            if hasattr(mod, _RECORD_ATTR):
                delattr(mod, _RECORD_ATTR)
        model.set_attn_implementation(previous)

    return cleanup


def kept_fraction(model: torch.nn.Module) -> float | None:
    """Mean kept fraction of the prompt KV over layers after the last prefill (None: no policy)."""
    fracs = [getattr(m, _RECORD_ATTR).kept_fraction for m in attention_modules(model)
             if hasattr(m, _RECORD_ATTR)]
    return sum(fracs) / len(fracs) if fracs else None
