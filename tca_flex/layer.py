"""What ``apply`` attaches to each attention module, and the mailbox to its cache layer.

A low layer on purpose: the attention function (``attention.py``), the pruned
cache (``cache.py``), the warm-up and the evaluation all read these records,
and none of them needs to import another to do so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import TCAConfig

_ATTR = "_tca_layer"
# The model attribute holding what ``apply`` keeps for ``remove`` (``integration._State``).
MODEL_STATE_ATTR = "_tca_flex_state"


class CacheLink:
    """Per-module mailbox: a cache layer's ``update`` posts itself with the key tensor it
    returned; the attention call takes the layer back only if it received that very tensor.

    transformers calls ``cache.update`` right before the attention function but
    does not pass it the cache. The identity check makes a stale post harmless:
    if ``update`` raised, or a later forward uses another cache, the attention
    call does not pick up a layer whose K/V it was not given. ``closed``: the
    module's record was detached (``remove``), so no TCA attention will take a
    post again; a cache layer tied to it refuses to update (``TCACacheLayer.update``).
    """

    __slots__ = ("active", "key", "closed")

    def __init__(self) -> None:
        self.active: Any = None
        self.key: torch.Tensor | None = None
        self.closed = False

    def post(self, layer: Any, key: torch.Tensor) -> None:
        self.active, self.key = layer, key

    def take(self, key: torch.Tensor) -> Any:
        layer = self.active if self.key is key else None
        self.active = self.key = None
        return layer


@dataclass(frozen=True)
class TCALayer:
    """What one attention layer needs at run time (attached by ``apply``).

    Attributes:
        config: the TCAConfig.
        cdf: float64 ``[H_kv, b + 1]``, cumulative budget distributions.
        layer_idx: index of the layer.
        keep_per_block: ``t = floor(E[k])`` per KV head: what the pruned cache
            keeps of each block that leaves the window.
        link: mailbox through which a ``TCACache`` layer reaches this
            module's attention call.
    """

    config: TCAConfig
    cdf: torch.Tensor
    layer_idx: int
    keep_per_block: tuple[int, ...] = ()
    link: CacheLink = field(default_factory=CacheLink, compare=False, repr=False)
    config_json: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "config_json", json.dumps(self.config.to_dict(), sort_keys=True))


def attach(module: torch.nn.Module, layer: TCALayer) -> None:
    setattr(module, _ATTR, layer)


def detach(module: torch.nn.Module) -> None:
    if hasattr(module, _ATTR):
        getattr(module, _ATTR).link.closed = True
        delattr(module, _ATTR)


def tca_layer(module: torch.nn.Module) -> TCALayer | None:
    """The record ``apply`` attached to an attention module (``None`` if none)."""
    return getattr(module, _ATTR, None)


def model_link(model: torch.nn.Module) -> CacheLink | None:
    """The link of ``model``'s first TCA record, which a ``TCACache`` made for it holds (None before
    ``apply``); read from what ``apply`` keeps on the model, not by walking its modules."""
    state = getattr(model, MODEL_STATE_ATTR, None)
    return None if state is None else state["link"]


def tca_layers(model: torch.nn.Module) -> list[TCALayer]:
    """Every attached record of ``model``, ordered by layer index (empty before ``apply``)."""
    found = [layer for m in model.modules() if (layer := tca_layer(m)) is not None]
    return sorted(found, key=lambda layer: layer.layer_idx)
