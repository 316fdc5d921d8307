"""``apply`` / ``remove``: switch a transformers model to TCA attention.

The sanctioned hooks only: the attention function is registered through
``AttentionInterface`` (its mask through ``AttentionMaskInterface``, so padded
batches reach us instead of being dropped), and each attention module gets a
small ``TCALayer`` record. No forward is copied, no class is patched and
nothing is written to ``model.config`` beyond transformers' own
``set_attn_implementation``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import TCALayer, tca_attention_forward
from .budgets import HeadBudgets, check_fingerprint
from .config import TCAConfig

logger = logging.getLogger(__name__)

ATTN_NAME = "tca"
DEFAULT_KEEP_FRACTION = 0.25
# Families whose attention is rotary, causal, full (no built-in sliding
# window or alibi) and dispatched through transformers' AttentionInterface.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "granite"})

_STATE_ATTR = "_tca_flex_state"


def _register() -> None:
    AttentionInterface.register(ATTN_NAME, tca_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's self-attention modules, ordered by ``layer_idx``."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What budgets are validated against: family, architecture and attention shape."""
    mods = attention_modules(model)
    config = model.config
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return {"model_type": config.model_type, "architecture": architectures[0], "num_layers": len(mods),
            "num_kv_heads": mods[0].k_proj.out_features // mods[0].head_dim if mods else None,
            "head_dim": mods[0].head_dim if mods else None,
            "name_or_path": getattr(config, "_name_or_path", None) or None}


def _check_model(model: torch.nn.Module) -> None:
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError("tca_flex.apply got a torch.compile'd model: call tca_flex.apply(model) first, "
                         "then torch.compile(model)")
    if hasattr(model, _STATE_ATTR):
        raise ValueError("tca_flex.apply was already applied to this model: call tca_flex.remove(model) "
                         "first to change the config or budgets")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError(f"tca_flex.apply expects a transformers PreTrainedModel, got {type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"tca_flex supports decoder-only models; {config.model_type} is encoder-decoder")
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"tca_flex does not support model_type={config.model_type!r}; supported: "
                         f"{sorted(SUPPORTED_MODEL_TYPES)} (rotary, causal, full attention)")
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        raise ValueError(f"{config.model_type} is configured with a built-in sliding window ({window}); "
                         "TCA needs full attention underneath. Set config.sliding_window=None if the "
                         "checkpoint allows it")
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", "rope") == "alibi":
        raise ValueError("tca_flex needs rotary position embeddings; alibi models are not supported")


def _resolve_budgets(model: torch.nn.Module, config: TCAConfig | None,
                     budgets: HeadBudgets | str | os.PathLike | None, num_layers: int,
                     num_kv_heads: int) -> HeadBudgets:
    if isinstance(budgets, (str, os.PathLike)):
        budgets = HeadBudgets.load(budgets)
    if budgets is None:
        config = config or TCAConfig()
        logger.warning("tca_flex.apply: no budgets given, every head keeps %.0f%% of each block; "
                       "calibrate with tca_flex.calibrate for per-head budgets", 100 * DEFAULT_KEEP_FRACTION)
        return HeadBudgets.uniform(num_layers, num_kv_heads, DEFAULT_KEEP_FRACTION, config)
    if config is not None and config.block_size != budgets.config.block_size:
        raise ValueError(f"config.block_size={config.block_size} differs from the budgets' block_size="
                         f"{budgets.config.block_size}; calibrate again with this block size")
    if budgets.fingerprint:
        check_fingerprint(budgets.fingerprint, model_fingerprint(model))
    if (budgets.num_layers, budgets.num_kv_heads) != (num_layers, num_kv_heads):
        raise ValueError(f"budgets are for {budgets.num_layers} layers x {budgets.num_kv_heads} KV heads, "
                         f"but the model has {num_layers} layers x {num_kv_heads} KV heads; "
                         "use the budget file calibrated for this model")
    return budgets if config is None else dataclasses.replace(budgets, config=config)


def apply(model: torch.nn.Module, config: TCAConfig | None = None,
          budgets: HeadBudgets | str | os.PathLike | None = None) -> torch.nn.Module:
    """Switch ``model`` to TCA-Attention in place and return it.

    Call before ``torch.compile(model)``. Prefills longer than
    ``config.dense_up_to`` run TCA; everything else runs dense SDPA.

    Args:
        model: a transformers decoder-only model of a supported family.
        config: TCAConfig; defaults to the budgets' config, else ``TCAConfig()``.
        budgets: per-head budgets (from ``calibrate``) or the path of a budget
            file (``HeadBudgets.save``); defaults to a uniform 25% keep fraction.
            Budgets with a fingerprint must match the model's family, layers,
            KV heads and head dim.

    Raises:
        ValueError: compiled model, second application, unsupported family,
            or budgets that do not match the model.
    """
    _check_model(model)
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"found no attention modules with k_proj/layer_idx in {type(model).__name__}")
    num_kv_heads = mods[0].k_proj.out_features // mods[0].head_dim
    budgets = _resolve_budgets(model, config, budgets, len(mods), num_kv_heads)
    config = budgets.config
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        raise ValueError(f"{type(model).__name__} does not dispatch attention through transformers' "
                         "AttentionInterface, so TCA cannot be installed")
    device = next(model.parameters()).device
    for layer_idx, mod in enumerate(mods):
        mod._tca_layer = TCALayer(config=config, cdf=budgets.cdf(layer_idx).to(device), layer_idx=layer_idx)
    setattr(model, _STATE_ATTR, {"previous_attn": previous, "budgets": budgets})
    return model


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply``: restore the previous attention implementation."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("tca_flex.remove: this model was not prepared by tca_flex.apply")
    for mod in attention_modules(model):
        if hasattr(mod, "_tca_layer"):
            del mod._tca_layer
    model.set_attn_implementation(state["previous_attn"])
    delattr(model, _STATE_ATTR)
    return model


def applied_budgets(model: torch.nn.Module) -> HeadBudgets:
    """The HeadBudgets a model was prepared with."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("this model was not prepared by tca_flex.apply")
    return state["budgets"]
