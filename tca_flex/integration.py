"""``apply`` / ``remove``: switch a transformers model to TCA attention.

The sanctioned hooks only: the attention function is registered through
``AttentionInterface`` (its mask through ``AttentionMaskInterface``, so padded
batches reach us instead of being dropped), and each attention module gets a
small ``TCALayer`` record. No forward is copied, no class is patched and
nothing is written to ``model.config`` beyond transformers' own
``set_attn_implementation``, on a private copy (the caller's config object
may be shared with other models); ``remove`` hands the original back and
unregisters the names once no applied model uses them. The one method
replaced, on the instance, is ``prepare_inputs_for_generation``: wrapped so
that a ``TCACache`` does its per-step bookkeeping outside ``generate``'s
compiled step (``generate_hook``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from . import generate_hook
from .attention import tca_attention_forward
from .budgets import (
    FINGERPRINT_SHAPE_KEYS,
    SHIPPED_BUDGETS,
    HeadBudgets,
    check_fingerprint,
    config_conflicts,
    describe_conflicts,
    shipped_budgets,
)
from .compile import MIN_RECOMPILE_LIMIT
from .config import TCAConfig
from .layer import MODEL_STATE_ATTR, TCALayer, attach, detach, tca_layer
from .unpad import Unpadder

logger = logging.getLogger(__name__)
# Dynamo's names for every TCACache layer's count of tokens seen (a Python int that grows each
# decode step), the count at which its buffers next grow, and its layout's slot counts (the
# Triton decode kernels' grid sizes: both differ per request), as a regex over source names such
# as ``L['kwargs']['cache'].layers[0]._seen`` or ``...layers[0].segments.max_length``.
TCA_LENGTH_SOURCE = r".*\.layers\[\d+\]\.(_seen|_grow_at|segments\.(max_length|total_length))$"

ATTN_NAME = "tca"
DEFAULT_KEEP_FRACTION = 0.25
# Families whose attention is rotary, causal, full (no built-in sliding
# window or alibi) and dispatched through transformers' AttentionInterface.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "granite"})


class _State:
    """What ``apply`` keeps on a model (``MODEL_STATE_ATTR``) for ``remove`` and the accessors below.

    A deep copy of an applied model is applied too (its modules keep their TCA records and
    dispatch to "tca"): copying the state registers the copy, so removing the original leaves
    "tca" registered while the copy lives."""

    def __init__(self, **items: Any) -> None:
        self._items = items

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __deepcopy__(self, memo: dict) -> _State:
        new = _State.__new__(_State)
        memo[id(self)] = new
        new._items = copy.deepcopy(self._items, memo)
        _APPLIED.add(new)
        return new


# The states of models prepared by apply (and their deep copies) not yet removed: "tca" stays
# registered while one is left.
_APPLIED: weakref.WeakSet[_State] = weakref.WeakSet()


def tca_mask(batch_size: int, q_length: int, kv_length: int, *args, **kwargs):
    """transformers mask function for "tca": ``None`` when the mask is plainly causal.

    SDPA's own mask function keeps a materialised causal mask under
    ``torch.compile`` in some cases; a sparse prefill would then see a mask and
    refuse it as padding. With no padding mask, a plain causal mask function and
    a square (prefill) or single-query (decode) shape, ``None`` is exact.

    A padded prefill from scratch gets its bool ``[B, L]`` padding mask
    itself, not the 4-D one (``B * L^2`` bytes: 32 GiB for 8 rows of 64K):
    the attention function checks it is left padding, runs each row on its
    own tokens, and builds the 4-D mask only for prompts short enough to run
    dense. ``generate``'s decode steps over a ``TCACache`` get none
    (``generate_hook``). Every other case (decode and chunks over a padded
    cache, packed sequences) gets SDPA's mask.
    """
    padding = kwargs.get("attention_mask")
    causal = (kwargs.get("mask_function", causal_mask_function) is causal_mask_function and not args
              and _last_query_is_last_key(q_length, kv_length, kwargs))
    if causal and q_length == 1 and generate_hook.preparing_tca_decode():
        return None  # a TCACache's decode reads no mask; its padding is in the cache (generate_hook)
    if padding is None:
        plain = causal and (q_length == kv_length or q_length == 1)
        return None if plain else sdpa_mask(batch_size, q_length, kv_length, *args, **kwargs)
    if (causal and q_length == kv_length and padding.dim() == 2 and padding.shape[-1] == kv_length
            and not isinstance(kwargs.get("kv_offset", 0), torch.Tensor) and kwargs.get("kv_offset", 0) == 0):
        # Nothing hidden: no mask (as SDPA's own skip). Eager only: reading values would break a graph.
        if not torch.compiler.is_compiling() and bool(padding.all()):
            return None
        return padding.bool()
    return sdpa_mask(batch_size, q_length, kv_length, *args, **kwargs)


def _last_query_is_last_key(q_length: int, kv_length: int, kwargs: dict) -> bool:
    """No key slot lies after the last query: false for a preallocated (static) cache, whose
    ``kv_length`` is its capacity, so its empty slots stay masked."""
    q_offset, kv_offset = kwargs.get("q_offset"), kwargs.get("kv_offset", 0)
    if q_offset is None:  # transformers versions that pass lengths only
        return True
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        # Reading a device offset would sync (and break a compiled graph): only a prefill
        # from scratch (square, nothing cached) is known to be plain.
        return q_length == kv_length
    return q_offset + q_length == kv_offset + kv_length


def _register(name: str, fn: Callable[..., Any], mask_fn: Callable[..., Any]) -> None:
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, mask_fn)


def _unregister(name: str, fn: Callable[..., Any], mask_fn: Callable[..., Any]) -> None:
    """Inverse of ``_register``, for entries that are still ours (another library may have taken the name since).

    transformers (5.x) has ``register`` but no unregister; ``register`` writes
    the class-wide ``_global_mapping`` dict (which transformers itself reads),
    so deleting our entry there is its exact inverse. Where that dict is
    missing, the names stay registered: harmless, nothing dispatches to them.
    """
    for interface, ours in ((AttentionInterface, fn), (AttentionMaskInterface, mask_fn)):
        mapping = getattr(interface, "_global_mapping", None)
        if isinstance(mapping, dict) and mapping.get(name) is ours:
            del mapping[name]


def _own_config(model: torch.nn.Module) -> list[tuple[Any, Any]]:
    """Give ``model`` (and its submodules) a private copy of its config; returns ``(copy, original)`` pairs.

    ``set_attn_implementation`` writes into the config object, which the
    caller may share with other models (``Model(config)`` twice): without a
    copy, switching one model to "tca" would switch all of them.
    """
    original = model.config
    copied = copy.deepcopy(original)
    pairs, todo = {id(original): (copied, original)}, [(original, copied)]
    while todo:  # nested configs (e.g. text_config) are held by their own submodules
        old, new = todo.pop()
        for key in getattr(old, "sub_configs", {}):
            if getattr(old, key, None) is not None:
                pairs[id(getattr(old, key))] = (getattr(new, key), getattr(old, key))
                todo.append((getattr(old, key), getattr(new, key)))
    _swap_configs(model, {k: new for k, (new, _) in pairs.items()})
    return list(pairs.values())


def _swap_configs(model: torch.nn.Module, replacement: dict[int, Any]) -> None:
    for module in model.modules():
        config = module.__dict__.get("config")
        if id(config) in replacement:
            module.config = replacement[id(config)]


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


def check_model(model: torch.nn.Module) -> None:
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError("tca_flex.apply got a torch.compile'd model: call tca_flex.apply(model) first, "
                         "then torch.compile(model)")
    if is_applied(model):
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
    # Where the config lists its layers' kinds, transformers builds each layer's mask from that list.
    sliding = [i for i, kind in enumerate(getattr(config, "layer_types", None) or []) if kind != "full_attention"]
    if (window is not None and getattr(config, "use_sliding_window", True)) or sliding:
        where = f" in layers {sliding}" if sliding else ""
        raise ValueError(f"{config.model_type} is configured with a built-in sliding window ({window}){where}; "
                         "TCA needs full attention in every layer. Build the model from a config without it "
                         "(Mistral: sliding_window=None; Qwen2/Qwen3: use_sliding_window=False) if the "
                         "checkpoint allows it")
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", "rope") == "alibi":
        raise ValueError("tca_flex needs rotary position embeddings; alibi models are not supported")


def _kv_head_shard(k_proj: torch.nn.Module, head_dim: int) -> tuple[int, int, int, bool]:
    """``(local_kv_heads, rank, world, sharded)`` of the heads this process holds.

    Under transformers' tensor-parallel plan ``k_proj`` is "colwise": its weight
    is a DTensor sharded on dim 0 (output rows), so rank ``r`` of the mesh
    dimension that shards it holds rows ``[r * n / W, (r + 1) * n / W)``, i.e.
    KV heads ``[r * H / W, (r + 1) * H / W)``; ``out_features`` still reports
    the full width, so the local row count is read from the local shard. A
    plain weight in a process group may be a hand-made shard (``sharded``
    False: the budget shape decides) or a data-parallel replica.
    """
    weight = k_proj.weight
    rank, world, sharded, rows = 0, 1, False, weight.shape[0]
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor, Shard

        if isinstance(weight, DTensor):
            rows = weight.to_local().shape[0]
            for dim, placement in enumerate(weight.placements):
                if isinstance(placement, Shard) and placement.dim == 0:
                    rank, world = weight.device_mesh.get_local_rank(dim), weight.device_mesh.size(dim)
                    sharded = True
            if rows * world != weight.shape[0]:
                raise ValueError(f"k_proj's {weight.shape[0]} output rows are split unevenly over {world} "
                                 f"ranks ({rows} here): num_key_value_heads must be divisible by the "
                                 "tensor-parallel size")
        elif torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if rows % head_dim:
        raise ValueError(f"k_proj holds {rows} output rows in this process, not a whole number of KV heads "
                         f"of head_dim={head_dim}: num_key_value_heads must be divisible by the "
                         "tensor-parallel size")
    return rows // head_dim, rank, world, sharded


def _head_slice(budgets: HeadBudgets, local: int, rank: int, world: int, sharded: bool) -> tuple[int, int]:
    """The KV heads ``[start, stop)`` of ``budgets`` that this process's heads are."""
    if budgets.num_kv_heads == local * world:
        return rank * local, (rank + 1) * local
    if budgets.num_kv_heads == local and not sharded:
        return 0, local
    held = f"{local} KV heads on rank {rank} of {world}" if world > 1 else f"{local} KV heads"
    raise ValueError(f"budgets have {budgets.num_kv_heads} KV heads, but the model holds {held}; give "
                     "the budget file calibrated for the full model (tensor-parallel ranks take their slice)")


def _resolve_budgets(model: torch.nn.Module, config: TCAConfig | None,
                     budgets: HeadBudgets | str | os.PathLike | None, num_layers: int,
                     shard: tuple[int, int, int, bool]) -> tuple[HeadBudgets, tuple[int, int]]:
    local, rank, _, sharded = shard
    if config is not None and not isinstance(config, TCAConfig):
        hint = " (pass budgets=... by keyword)" if isinstance(config, HeadBudgets) else ""
        raise TypeError(f"tca_flex.apply: config must be a TCAConfig or None, got {type(config).__name__}{hint}; "
                        "TCAConfig.from_dict(d) makes one from a dict")
    if budgets is not None and not isinstance(budgets, (HeadBudgets, str, os.PathLike)):
        raise TypeError(f"tca_flex.apply: budgets= takes HeadBudgets, the path of a budget file or None, got "
                        f"{type(budgets).__name__}; HeadBudgets.load(path) reads a file, "
                        "HeadBudgets.from_json(text) its text")
    if isinstance(budgets, (str, os.PathLike)):
        budgets = HeadBudgets.load(budgets)
    if budgets is None and config is None:
        budgets = _matching_shipped_budgets(model)
    if budgets is None:
        # Without budgets the selection knobs that measured best (TCAConfig.accurate()), not the
        # paper's: with the paper's, the pruned cache kept dense's answer on 0-20% of needle prompts.
        config = config or TCAConfig.accurate()
        knobs = "TCAConfig.accurate()" if config == TCAConfig.accurate() else "the given config's"
        logger.warning("tca_flex.apply: no budgets given, every head keeps %.0f%% of each block with %s "
                       "selection knobs; calibrate per-head budgets (tca_flex.calibrate, docs/calibration.md) "
                       "for accuracy at a given KV size. TCAConfig() gives the paper's knobs",
                       100 * DEFAULT_KEEP_FRACTION, knobs)
        first = rank * local if sharded else 0
        return HeadBudgets.uniform(num_layers, local, DEFAULT_KEEP_FRACTION, config), (first, first + local)
    conflicts = {} if config is None else config_conflicts(budgets.config, config)
    if conflicts:
        raise ValueError(f"tca_flex.apply: the config differs from the one the budgets were calibrated with in "
                         f"{describe_conflicts(conflicts)}; budgets hold only for the knobs they were calibrated "
                         "with. Leave config out (the budgets carry theirs), calibrate again with this config, "
                         "or run them anyway with budgets=budgets.with_config(config) (logs a warning)")
    if budgets.fingerprint:
        check_fingerprint(budgets.fingerprint, model_fingerprint(model))
    if budgets.num_layers != num_layers:
        raise ValueError(f"budgets are for {budgets.num_layers} layers x {budgets.num_kv_heads} KV heads, "
                         f"but the model has {num_layers} layers x {local * shard[2]} KV heads; "
                         "use the budget file calibrated for this model")
    start, stop = _head_slice(budgets, *shard)
    if (start, stop) != (0, budgets.num_kv_heads):
        budgets = budgets.slice_heads(start, stop)
    return (budgets if config is None else dataclasses.replace(budgets, config=config)), (start, stop)


def _matching_shipped_budgets(model: torch.nn.Module) -> HeadBudgets | None:
    """The shipped budgets whose fingerprint matches the model's family and attention shape, if any."""
    mine = model_fingerprint(model)
    for name in SHIPPED_BUDGETS:
        budgets = shipped_budgets(name)
        if all(budgets.fingerprint.get(key) == mine.get(key) for key in FINGERPRINT_SHAPE_KEYS):
            logger.warning("tca_flex.apply: no budgets given; using the shipped budgets %r, calibrated for a "
                           "model of this family and shape (%s)", name, budgets.fingerprint.get("name_or_path"))
            return budgets
    return None


@contextlib.contextmanager
def attention_routed(model: torch.nn.Module, name: str, fn: Callable[..., Any]) -> Iterator[None]:
    """Run ``model``'s attention through ``fn`` (registered as ``name``) inside the block.

    The previous implementation comes back on exit, errors included. Used by
    calibration and the fidelity report to see each layer's q/k/v without
    copying a model's forward.
    """
    before = [getattr(i, "_global_mapping", {}).get(name) for i in (AttentionInterface, AttentionMaskInterface)]
    _register(name, fn, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        if model.config._attn_implementation != name:
            raise ValueError(f"{type(model).__name__} does not dispatch attention through transformers' "
                             "AttentionInterface, so tca_flex cannot observe its attention")
        yield
    finally:
        model.set_attn_implementation(previous)
        if before == [None, None]:  # leave no name behind that was not there
            _unregister(name, fn, sdpa_mask)


def apply(model: torch.nn.Module, config: TCAConfig | None = None,
          budgets: HeadBudgets | str | os.PathLike | None = None) -> torch.nn.Module:
    """Switch ``model`` to TCA-Attention in place and return it.

    Call before ``torch.compile(model)``. Prefills longer than
    ``config.dense_up_to`` run TCA; everything else runs dense SDPA. The
    model gets a private copy of its config object, so other models built
    from the same object keep their attention; ``remove`` gives it back.

    Args:
        model: a transformers decoder-only model of a supported family.
        config: TCAConfig; defaults to the budgets' config, else
            ``TCAConfig.accurate()`` (the paper's knobs: pass ``TCAConfig()``).
            With budgets, it may differ from theirs only in run-time knobs
            (``budgets.RUNTIME_FIELDS``, a raised ``guard_floor``); anything
            else is refused, naming the knob (override on purpose with
            ``HeadBudgets.with_config``).
        budgets: per-head budgets (from ``calibrate``) for the full model, or
            the path of a budget file (``HeadBudgets.save``). Without budgets
            and config: the shipped budgets whose model family and attention
            shape match (``shipped_budgets``), else a uniform 25% keep fraction;
            a warning says which, and that calibrating is recommended.
            Budgets with a fingerprint must match
            the model's family, layers, KV heads and head dim. Under tensor parallelism
            (transformers' ``tp_plan``, or heads sharded by hand in a process
            group) each rank keeps the slice of KV heads it holds: rank ``r``
            of ``W`` takes heads ``[r * H_kv / W, (r + 1) * H_kv / W)``.

    Raises:
        ValueError: compiled model, second application, unsupported family,
            budgets that do not match the model (or its sharded heads), or a
            config that differs from the budgets' in a knob they depend on.
    """
    check_model(model)
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"found no attention modules with k_proj/layer_idx in {type(model).__name__}")
    shard = _kv_head_shard(mods[0].k_proj, mods[0].head_dim)
    budgets, kv_heads = _resolve_budgets(model, config, budgets, len(mods), shard)
    config = budgets.config
    _register(ATTN_NAME, tca_attention_forward, tca_mask)
    configs = _own_config(model)
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        _release(model, configs)
        raise ValueError(f"{type(model).__name__} does not dispatch attention through transformers' "
                         "AttentionInterface, so TCA cannot be installed")
    device = next(model.parameters()).device
    keep = budgets.keep_per_block()
    for layer_idx, mod in enumerate(mods):
        attach(mod, TCALayer(config=config, cdf=budgets.cdf(layer_idx).to(device), layer_idx=layer_idx,
                             keep_per_block=tuple(keep[layer_idx].tolist())))
    # Packing tokens across a sharded layer's ranks is not ours to do: tensor-parallel models keep padding.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    unpadder = None if distributed else Unpadder(model, mods)
    state = _State(configs=configs, budgets=budgets, kv_heads=kv_heads, unpadder=unpadder,
                   generate_hook=generate_hook.install(model), link=tca_layer(mods[0]).link)
    setattr(model, MODEL_STATE_ATTR, state)
    _APPLIED.add(state)
    return model


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply``: the model gets its original config object back (attention as before).

    The names ``apply`` registered with transformers are unregistered once no
    other applied model uses them.
    """
    state = getattr(model, MODEL_STATE_ATTR, None)
    if state is None:
        raise ValueError("tca_flex.remove: this model was not prepared by tca_flex.apply")
    for mod in attention_modules(model):
        detach(mod)
    if state["unpadder"] is not None:
        state["unpadder"].remove()
    generate_hook.uninstall(model, state["generate_hook"])
    delattr(model, MODEL_STATE_ATTR)
    _APPLIED.discard(state)
    _release(model, state["configs"])
    return model


def _release(model: torch.nn.Module, configs: list[tuple[Any, Any]]) -> None:
    """Give ``model`` its original configs back; unregister "tca" when no applied model is left."""
    _swap_configs(model, {id(new): old for new, old in configs})
    if not _APPLIED:
        _unregister(ATTN_NAME, tca_attention_forward, tca_mask)


def _state(model: torch.nn.Module) -> _State:
    state = getattr(model, MODEL_STATE_ATTR, None)
    if state is None:
        raise ValueError("this model was not prepared by tca_flex.apply")
    return state


def is_applied(model: torch.nn.Module) -> bool:
    """Whether ``model`` is currently prepared by ``apply``."""
    return hasattr(model, MODEL_STATE_ATTR)


def applied_budgets(model: torch.nn.Module) -> HeadBudgets:
    """The HeadBudgets a model was prepared with (this rank's KV heads only)."""
    return _state(model)["budgets"]


def applied_kv_heads(model: torch.nn.Module) -> tuple[int, int]:
    """``(start, stop)``: the full model's KV heads this process holds and applied budgets for."""
    return _state(model)["kv_heads"]


def compile(model: torch.nn.Module, **kwargs: Any) -> Any:
    """``torch.compile(model, **kwargs)`` for a model prepared by ``tca_flex.apply``.

    Calling ``torch.compile`` yourself works too. This also changes two
    process-wide settings, only here, on request, each with a logged warning: it
    raises dynamo's recompile limit (``torch._dynamo.config.recompile_limit``)
    to at least 64, because a compiled whole model re-traces its decode step
    each time a ``TCACache`` grows; and it adds the cache layers' token count and
    layout slot counts (``TCA_LENGTH_SOURCE``) to ``torch.compiler.config.dynamic_sources``, so the
    first decode step compiles a graph for every length. Without it dynamo
    specialises the first step's length (transformers reads it as a Python int)
    and compiles the step a second time at the next one. The prefill itself compiles
    once for all prompt lengths and needs no limit change. Pass
    ``TCACache(model, reserve_tokens=N)`` to ``generate`` so a generation of
    up to ``N`` tokens never changes buffer shapes, and keep ``use_cache=True``
    (the default) in compiled forwards.

    Raises:
        ValueError: the model was not prepared by ``tca_flex.apply`` (compile after apply).
    """
    if not is_applied(model):
        raise ValueError("tca_flex.compile: call tca_flex.apply(model) first, then compile")
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < MIN_RECOMPILE_LIMIT:
            # A warning, not info: a process-wide setting changes (once: later calls find it raised).
            logger.warning("tca_flex.compile: raising torch._dynamo.config.%s to %d (process-wide; a compiled "
                           "model re-traces its decode step when a TCACache grows)", name, MIN_RECOMPILE_LIMIT)
            setattr(cfg, name, MIN_RECOMPILE_LIMIT)
    sources = torch.compiler.config.dynamic_sources
    if TCA_LENGTH_SOURCE not in sources.split(","):
        logger.warning("tca_flex.compile: adding %s to torch.compiler.config.dynamic_sources (process-wide; the "
                       "decode step compiles once for every length)", TCA_LENGTH_SOURCE)
        torch.compiler.config.dynamic_sources = ",".join(filter(None, (sources, TCA_LENGTH_SOURCE)))
    return torch.compile(model, **kwargs)
