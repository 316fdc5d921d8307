"""Padding costs no work in a left-padded prefill.

A batch of rows of different lengths reaches the model left-padded to the
longest row: 8 rows of 19K-63K tokens pad 270K real tokens to 500K. While
``apply`` holds the model, its forward (wrapped on the instance) notes where
the real tokens of a padded prefill from an empty cache are, and the decoder
runs on those tokens only, in one of two ways:

- **whole layers** (a ``TCACache``, or no cache at all): the first decoder
  layer's input and every layer's rotary tables are gathered into one packed
  row ``[1, N, ...]``, so norms, rotary embedding, residual adds, projections
  and MLPs all run on the real tokens; the attention sees a 2-D padding mask
  wider than its packed queries and runs each row on its own slice
  (``attention.packed_prefill``), handing the pruned cache the K/V in padded
  coordinates. After the final norm the hidden states are scattered back to
  ``[B, L, ...]`` (zeros at padding, which nothing reads).
- **projections and MLPs only** (any other cache, e.g. the ``DynamicCache``
  transformers makes when none is passed, or when hidden states are asked
  for): a cache that stores what the layer gives it must get padded K/V, so
  only each layer's attention projections and MLP run packed, their outputs
  scattered back to the padded layout.

Every other call (no padding, decode steps, chunks on top of a cache) runs
the modules unchanged.

Eager only: the packed length is a device value, so a traced or captured
forward (``torch.compile``, CUDA graphs) runs the padded shapes, as before.
A stale index cannot leak into a later call: every eager call of the model
notes its own (or none) first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import instance_methods
from .cache import TCACache
from .chunks import building_graph
from .generate_hook import check_call_cache
from .hfcompat import kwargs_cache

# Modules whose work is per token: packing their input changes nothing for real tokens.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class RealTokens:
    """Where the real tokens of the current padded prefill are (``index`` None: run unchanged)."""

    index: torch.Tensor | None = None  # int64 [N], flat positions in the [B * L] padded batch
    shape: tuple[int, int] = (0, 0)  # (B, L)
    whole: bool = False  # whole decoder layers run packed (else projections and MLPs only)


def real_token_index(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Flat positions of the tokens a 2-D padding mask keeps, or None when it keeps every token."""
    flat = attention_mask.reshape(-1).bool()
    index = flat.nonzero().squeeze(1)  # one host sync per prefill
    return None if index.numel() == flat.numel() else index


def _prefill_from_empty_cache(kwargs: dict[str, Any]) -> bool:
    cache = kwargs_cache(kwargs)
    return cache is None or cache.get_seq_length() == 0


def _layers_may_pack(model: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether whole decoder layers may run on the packed row: only a cache that ``apply`` prunes takes
    its K/V through the TCA attention (which unpacks them); any other cache would store packed K/V, and
    per-layer hidden states or attention weights asked for would come out packed."""
    config = getattr(model, "config", None)
    if any(kwargs.get(name, getattr(config, name, False)) for name in ("output_hidden_states", "output_attentions")):
        return False
    cache = kwargs_cache(kwargs)
    if cache is None:
        use_cache = kwargs.get("use_cache")
        return not (use_cache if use_cache is not None else getattr(config, "use_cache", True))
    return isinstance(cache, TCACache)


def _input_length(args: tuple, kwargs: dict[str, Any]) -> int | None:
    ids = args[0] if args else kwargs.get("input_ids")
    if ids is None:
        embeds = kwargs.get("inputs_embeds")
        return None if embeds is None else embeds.shape[1]
    return ids.shape[-1]


# The model's attribute holding its Unpadder, which the forward wrapper reads at each call (a deep
# copy of the model gets its copy's).
_OWNER = "_tca_flex_unpadder"


class Unpadder:
    """The padded-prefill packing of one model; ``remove`` undoes it.

    No hook stays on between calls. The model's forward, wrapped on the instance, notes each call's
    padding first and lets go after it, raising or not. The per-module hooks that pack and unpack
    are put on for a padded prefill it packs, and taken off when that call ends: a compiled step
    guards on every hook of every module it runs (~150 guards a decoder layer, evaluated on the
    host before each decode step), and under ``torch.compile(model)`` hooks on the model itself run
    as frames of their own around the compiled forward, each with its guards, at every call.
    """

    def __init__(self, model: torch.nn.Module, attention_modules: list[torch.nn.Module]) -> None:
        self.tokens = RealTokens()
        self.packed: set[int] = set()  # modules whose running call got a packed input
        # q/k/v projections read one input: it is gathered once (held until the model's call ends).
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        # every layer gets the same rotary tables: packed once (held until the model's call ends)
        self.rotary: tuple[Any, tuple[torch.Tensor, ...]] | None = None
        self.per_token = per_token_modules(model, attention_modules)
        self.layers, self.last_module = decoder_layers(model, attention_modules)
        self.call_handles: list[torch.utils.hooks.RemovableHandle] = []  # the packing call's own
        self.model = model
        setattr(model, _OWNER, self)
        self.wrapped = instance_methods.wrap(model, "forward", _around_forward)

    def remove(self) -> None:
        """Give the model its forward back (unless someone replaced ours since) and drop any packing state."""
        instance_methods.unwrap(self.model, "forward", self.wrapped)
        if self.model.__dict__.get(_OWNER) is self:
            delattr(self.model, _OWNER)
        self._done()

    def _attach(self) -> None:
        # First among the modules' hooks: one added after apply still sees the packed tokens, as it
        # did when these stayed on from apply.
        for module in self.per_token:
            self.call_handles.append(module.register_forward_pre_hook(self._pack, prepend=True))
            self.call_handles.append(module.register_forward_hook(self._unpack, prepend=True))
        for layer in self.layers:
            self.call_handles.append(layer.register_forward_pre_hook(self._pack_layer, with_kwargs=True, prepend=True))
        if self.last_module is not None:
            self.call_handles.append(self.last_module.register_forward_hook(self._unpack_layers, prepend=True))

    def _detach(self) -> None:
        for handle in self.call_handles:
            handle.remove()
        self.call_handles = []

    def _note(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if building_graph():  # a traced call packs nothing (see _packs): leave no side effect in the graph
            return
        self.tokens = RealTokens()
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            return
        length = _input_length(args, kwargs)
        if length is None or not _prefill_from_empty_cache(kwargs):
            return
        if mask.shape[-1] != length:
            # A prefill's 2-D mask has one entry per token; any other length would reach the attention
            # as a mask it cannot read as left padding, and be refused with that (misleading) message.
            raise ValueError(f"attention_mask has {mask.shape[-1]} positions but this prefill has {length} "
                             "tokens: pass a [batch, tokens] mask of the prompt's length (1 for each token, "
                             "0 for left padding)")
        if length < 2:
            return
        index = real_token_index(mask)
        if index is not None:
            self.tokens = RealTokens(index, (mask.shape[0], length), _layers_may_pack(module, kwargs))
            self._attach()

    def _done(self) -> None:
        """After the model's call: let go of the index and the packed copies."""
        if building_graph():
            return
        self.tokens, self.last, self.rotary = RealTokens(), None, None
        self.packed.clear()
        self._detach()

    def _packs(self, x: torch.Tensor) -> bool:
        # Never inside a trace, even after an eager _note (``model.forward`` compiled alone): a graph
        # would guard on this prefill's index and shape and recompile for the next one.
        return not building_graph() and self.tokens.index is not None and tuple(x.shape[:2]) == self.tokens.shape

    def _packs_layers(self) -> bool:
        # as _packs: never inside a trace
        return not building_graph() and self.tokens.index is not None and self.tokens.whole

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, L, ...]`` (or ``[1, L, ...]``, shared by the rows) -> the packed row ``[1, N, ...]``."""
        batch, length = self.tokens.shape
        t = t.expand(batch, *t.shape[1:])
        return t.reshape(batch * length, *t.shape[2:]).index_select(0, self.tokens.index)[None]

    def _scatter(self, packed: torch.Tensor) -> torch.Tensor:
        """The packed row ``[1, N, C]`` -> ``[B, L, C]``, zeros at the padding."""
        batch, length = self.tokens.shape
        full = packed.new_zeros(batch * length, packed.shape[-1])
        full.index_copy_(0, self.tokens.index, packed[0])
        return full.view(batch, length, -1)

    def _pack_layer(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        if not self._packs_layers():
            return None
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            return None
        rotary = kwargs.get("position_embeddings")
        if tuple(hidden.shape[:2]) == self.tokens.shape:  # the first layer: pack the batch
            if rotary is None:  # positions computed inside the layer from [B, L] ids: pack its modules only
                self.tokens = RealTokens(self.tokens.index, self.tokens.shape, whole=False)
                return None
            hidden = self._gather(hidden)
        elif hidden.shape[:2] != (1, self.tokens.index.numel()):
            raise RuntimeError(f"tca_flex packs a padded prefill through whole decoder layers; "
                               f"{type(module).__name__} got hidden states of shape {tuple(hidden.shape)}, "
                               f"neither the padded batch {self.tokens.shape} nor the packed row")
        if rotary is not None:
            if self.rotary is None or self.rotary[0] is not rotary:
                self.rotary = (rotary, tuple(self._gather(t) for t in rotary))
            kwargs = {**kwargs, "position_embeddings": self.rotary[1]}
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _unpack_layers(self, module: torch.nn.Module, args: tuple, output: Any) -> torch.Tensor | None:
        if not self._packs_layers():
            return None
        if not isinstance(output, torch.Tensor) or output.shape[:2] != (1, self.tokens.index.numel()):
            raise RuntimeError(f"tca_flex expected the packed row out of {type(module).__name__}, got "
                               f"{type(output).__name__}; this model layout is not supported for padded batches")
        return self._scatter(output)

    def _pack(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if not args or not self._packs(args[0]):
            return None
        x = args[0]
        self.packed.add(id(module))
        if self.last is None or self.last[0] is not x:
            self.last = (x, self._gather(x))
        return (self.last[1], *args[1:])

    def _unpack(self, module: torch.nn.Module, args: tuple, output: Any) -> torch.Tensor | None:
        if id(module) not in self.packed:
            return None
        self.packed.discard(id(module))
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"tca_flex packs the padded batch's tokens through {type(module).__name__}, which "
                            f"returned {type(output).__name__}, not one tensor; this module type is not supported")
        return self._scatter(output)


def _around_forward(module: torch.nn.Module, call: Any, bound: tuple, args: tuple, kwargs: dict[str, Any]) -> Any:
    """The model's forward between its Unpadder's note and let-go (``instance_methods.wrap``).

    Compiled, this is traced into the forward's frame, where both calls return at once
    (``building_graph``): a traced call packs nothing."""
    if not building_graph():
        check_call_cache(module, kwargs_cache(kwargs))
    unpadder = getattr(module, _OWNER)
    unpadder._note(module, args, kwargs)
    try:
        return call(*bound, *args, **kwargs)
    finally:
        unpadder._done()


def _parents(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Each submodule's parent, by the child's id."""
    return {id(child): parent for parent in model.modules() for child in parent.children()}


def per_token_modules(model: torch.nn.Module, attention_modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Each attention module's projections, and the MLP of the decoder layer that holds it."""
    parents = _parents(model)
    found = []
    for attn in attention_modules:
        found += [getattr(attn, name) for name in PROJECTIONS if isinstance(getattr(attn, name, None), torch.nn.Linear)]
        mlp = getattr(parents.get(id(attn)), "mlp", None)
        if isinstance(mlp, torch.nn.Module):
            found.append(mlp)
    return found


def decoder_layers(model: torch.nn.Module, attention_modules: list[torch.nn.Module]
                   ) -> tuple[list[torch.nn.Module], torch.nn.Module | None]:
    """The decoder layers holding the attention modules, and the module after which the packed row
    goes back to the padded layout: the final norm beside the layers (``model.norm`` in Llama-like
    models), else the last layer."""
    parents = _parents(model)
    layers = [parents[id(attn)] for attn in attention_modules if id(attn) in parents]
    if not layers:
        return [], None
    stack = parents.get(id(layers[-1]))  # the ModuleList
    norm = getattr(parents.get(id(stack)), "norm", None) if stack is not None else None
    return layers, norm if isinstance(norm, torch.nn.Module) else layers[-1]
