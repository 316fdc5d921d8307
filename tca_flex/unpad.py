"""Padding costs no projection or MLP work in a left-padded prefill.

A batch of rows of different lengths reaches the model left-padded to the
longest row. TCA's attention already runs each row on its own tokens
(``attention.py``), but the projections and MLPs, most of a prefill's work,
would still run on every padded position: 8 rows of 19K-63K tokens pad 270K
real tokens to 500K. While ``apply`` holds the model, a pre-hook on the model
notes where the real tokens of a padded prefill from an empty cache are, and
hooks on each layer's MLP and attention projections run them on those tokens
only (gathered into one packed row) and scatter the result back, with zeros at
the padded positions, whose outputs nothing reads. Every other call (no
padding, decode steps, chunks on top of a cache) runs the modules unchanged.

Eager only: the packed length is a device value, so a traced or captured
forward (``torch.compile``, CUDA graphs) runs the padded shapes, as before.
A stale index cannot leak into a later call: every eager call of the model
notes its own (or none) first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .chunks import building_graph
from .hfcompat import kwargs_cache

# Modules whose work is per token: packing their input changes nothing for real tokens.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class RealTokens:
    """Where the real tokens of the current padded prefill are (``index`` None: run unchanged)."""

    index: torch.Tensor | None = None  # int64 [N], flat positions in the [B * L] padded batch
    shape: tuple[int, int] = (0, 0)  # (B, L)


def real_token_index(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Flat positions of the tokens a 2-D padding mask keeps, or None when it keeps every token."""
    flat = attention_mask.reshape(-1).bool()
    index = flat.nonzero().squeeze(1)  # one host sync per prefill
    return None if index.numel() == flat.numel() else index


def _prefill_from_empty_cache(kwargs: dict[str, Any]) -> bool:
    cache = kwargs_cache(kwargs)
    return cache is None or cache.get_seq_length() == 0


def _input_length(args: tuple, kwargs: dict[str, Any]) -> int | None:
    ids = args[0] if args else kwargs.get("input_ids")
    if ids is None:
        embeds = kwargs.get("inputs_embeds")
        return None if embeds is None else embeds.shape[1]
    return ids.shape[-1]


class Unpadder:
    """The hooks of one model; ``remove`` takes them all off."""

    def __init__(self, model: torch.nn.Module, attention_modules: list[torch.nn.Module]) -> None:
        self.tokens = RealTokens()
        self.packed: set[int] = set()  # modules whose running call got a packed input
        # q/k/v projections read one input: it is gathered once (held until the model's call ends).
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.handles = [model.register_forward_pre_hook(self._note, with_kwargs=True),
                        model.register_forward_hook(self._done)]
        for module in per_token_modules(model, attention_modules):
            self.handles.append(module.register_forward_pre_hook(self._pack))
            self.handles.append(module.register_forward_hook(self._unpack))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._done()

    def _note(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if building_graph():  # a traced call packs nothing (see _packs): leave no side effect in the graph
            return
        self.tokens = RealTokens()
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            return
        length = _input_length(args, kwargs)
        if length is None or length < 2 or mask.shape[-1] != length or not _prefill_from_empty_cache(kwargs):
            return
        index = real_token_index(mask)
        if index is not None:
            self.tokens = RealTokens(index, (mask.shape[0], length))

    def _done(self, *hook_args: Any) -> None:
        """After the model's call: let go of the index and the packed copies."""
        if building_graph():
            return
        self.tokens, self.last = RealTokens(), None
        self.packed.clear()

    def _packs(self, x: torch.Tensor) -> bool:
        # Never inside a trace, even after an eager _note (``model.forward`` compiled alone): a graph
        # would guard on this prefill's index and shape and recompile for the next one.
        return not building_graph() and self.tokens.index is not None and tuple(x.shape[:2]) == self.tokens.shape

    def _pack(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if not args or not self._packs(args[0]):
            return None
        x = args[0]
        self.packed.add(id(module))
        if self.last is None or self.last[0] is not x:
            self.last = (x, x.reshape(-1, x.shape[-1]).index_select(0, self.tokens.index)[None])
        return (self.last[1], *args[1:])

    def _unpack(self, module: torch.nn.Module, args: tuple, output: Any) -> torch.Tensor | None:
        if id(module) not in self.packed:
            return None
        self.packed.discard(id(module))
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"tca_flex packs the padded batch's tokens through {type(module).__name__}, which "
                            f"returned {type(output).__name__}, not one tensor; this module type is not supported")
        batch, length = self.tokens.shape
        full = output.new_zeros(batch * length, output.shape[-1])
        full.index_copy_(0, self.tokens.index, output[0])
        return full.view(batch, length, -1)


def per_token_modules(model: torch.nn.Module, attention_modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Each attention module's projections, and the MLP of the decoder layer that holds it."""
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    found = []
    for attn in attention_modules:
        found += [getattr(attn, name) for name in PROJECTIONS if isinstance(getattr(attn, name, None), torch.nn.Linear)]
        mlp = getattr(parents.get(id(attn)), "mlp", None)
        if isinstance(mlp, torch.nn.Module):
            found.append(mlp)
    return found
